"""DELETE of a study, a series or an instance (not in PS3.18; as dcm4chee-arc and Orthanc
offer it): the DICOMweb path of ``minipacs delete`` (:meth:`storage.Archive.delete`).

A DELETE needs ``read-write`` rights (:mod:`web.auth`: every method but GET and HEAD does).
The path is checked as WADO-RS checks it: a malformed UID is a 400; a study, a series of
that study or an instance of that series that is not stored is a 404. The answer is 200
with what went, as JSON::

    {"instances": 6, "series": 3, "studies": 1, "patients": 0, "filesLeft": []}

``filesLeft`` names the files of deleted instances that could not be removed yet (the next
delete or ``minipacs verify --repair`` removes them); the instances are gone either way.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from storage import Archive, Selection

from .errors import NOT_FOUND, WebError
from .urls import path_target
from .wado import INSTANCE, SERIES, STUDY

logger = logging.getLogger(__name__)

def delete(request: Request) -> Response:
    """Delete the study, series or instance the path names, once it is found there."""
    archive: Archive = request.app.state.archive
    study, series, sop = path_target(request)
    selection = (Selection(instance_uids=(sop,)) if sop else
                 Selection(series_uids=(series,)) if series else
                 Selection(study_uids=(study,)))
    try:
        plan = archive.plan_delete(selection)
        where = {part.study_instance_uid for part in plan.studies_selected}
        if where != {study} or (sop and series and not _in_series(archive, study, series,
                                                                  sop)):
            what = "instance" if sop else "series" if series else "study"
            raise WebError(NOT_FOUND, f"no such {what}" + ("" if what == "study" else
                                                            " in that " + ("series" if sop
                                                                           else "study")))
        done = archive.delete(selection, only=plan.file_keys)  # what was checked, no more
    finally:
        archive.release()
    account = request.scope.get("minipacs.user") or "anonymous"
    logger.info("DELETE %s by %s: %d instance(s)", request.url.path, account, done.instances)
    return JSONResponse({"instances": done.instances, "series": done.series,
                         "studies": done.studies, "patients": done.patients,
                         "filesLeft": done.files_left})


def _in_series(archive: Archive, study: str, series: str, sop: str) -> bool:
    """Whether the instance is one of that series of that study."""
    return any(item.sop_instance_uid == sop for item in archive.locate(study, series, sop))


ROUTES: list[BaseRoute] = [
    Route(STUDY, delete, methods=["DELETE"]),
    Route(SERIES, delete, methods=["DELETE"]),
    Route(INSTANCE, delete, methods=["DELETE"]),
]
