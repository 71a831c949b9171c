"""QIDO-RS (PS3.18 10.6): the search resources, answered in DICOM JSON (PS3.18 Annex F).

Each resource hands its query parameters and path to ``Archive.parse_search`` (the same
query engine as C-FIND) and streams ``Archive.search``'s answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from itertools import chain

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from storage import Archive, Level, NotFound

from .accept import DICOM_JSON, JSON, matches, ranges
from .errors import NOT_ACCEPTABLE, WebError
from .urls import profile_of, service_url

WARN = 299  # PS3.18 8.4.5: the Warning code of every DICOMweb warning
FUZZY_WARNING = ("The fuzzymatching parameter is not supported."
                 " Only literal matching has been performed.")  # PS3.18 8.3.4.2


def _check_accept(request: Request) -> None:
    """PS3.18 10.6.3.3: search results are DICOM JSON here (``application/json`` too, as
    dicomweb-client and OHIF ask beside it; no Accept means any); else 406 (PS3.18 8.7.4:
    none of the Acceptable Media Types is supported). The ``accept`` query parameter
    (PS3.18 8.3.3.1) counts as the header."""
    accepted = ranges(request)
    if not any(matches(r.media_type, DICOM_JSON) or matches(r.media_type, JSON)
               for r in accepted):
        said = request.query_params.get("accept") or request.headers.get("accept", "")
        raise WebError(NOT_ACCEPTABLE, f"search results are {DICOM_JSON} only (PS3.18"
                       f" 10.6.3.3), not {said}")


def _search(level: Level) -> Callable[[Request], Awaitable[Response]]:
    async def search(request: Request) -> Response:
        """PS3.18 10.6: Search for studies, series or instances."""
        _check_accept(request)
        archive: Archive = request.app.state.archive
        path = request.path_params
        profile = profile_of(request)
        params = request.query_params.multi_items()
        study, series = path.get("study", ""), path.get("series", "")
        if not profile:
            search = archive.parse_search(params, level, study, series)
        else:  # its UIDs are looked up in the index
            try:
                search = await run_in_threadpool(archive.parse_search, params, level, study,
                                                 series, profile)
            except NotFound:  # a UID this account was never shown matches nothing
                return Response(b"[]", media_type=DICOM_JSON)
        service = service_url(request)
        answer = await run_in_threadpool(archive.search, search, service, profile)
        response: Response = (Response(answer.first, media_type=DICOM_JSON)
                              if answer.rest is None else
                              StreamingResponse(chain([answer.first], answer.rest),
                                                media_type=DICOM_JSON))
        if search.fuzzy_ignored:
            response.headers.append("Warning", f"{WARN} {service}: {FUZZY_WARNING}")
        if answer.remaining:  # PS3.18 8.3.4.4.1: the server's maximum cut the answer
            response.headers.append("Warning", f"{WARN} {service}: There are"
                                    f" {answer.remaining} additional results that can be"
                                    " requested")
        return response

    return search


ROUTES: list[BaseRoute] = [  # PS3.18 Table 10.6.1-1 (GET; Starlette answers HEAD too)
    Route("/studies", _search(Level.STUDY), methods=["GET"]),
    Route("/studies/{study}/series", _search(Level.SERIES), methods=["GET"]),
    Route("/series", _search(Level.SERIES), methods=["GET"]),
    Route("/studies/{study}/series/{series}/instances", _search(Level.IMAGE), methods=["GET"]),
    Route("/studies/{study}/instances", _search(Level.IMAGE), methods=["GET"]),
    Route("/instances", _search(Level.IMAGE), methods=["GET"]),
]
