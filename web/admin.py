"""The administrator's page, at the root of the HTTP listener: server-rendered templates
(``web/templates``, Jinja2 with autoescaping) and one small plain script
(``web/static/admin.js``), no build step.

- ``/``: search studies (patient name or ID, date range, modality, accession), each with
  its counts, page by page. The search is a QIDO-RS study search (:meth:`Archive.search`),
  so it matches as C-FIND and QIDO-RS do (PS3.4 C.2.2.2, PS3.18 10.6).
- ``/admin/studies/{study}``: the study's series with thumbnails (WADO-RS ``/thumbnail``),
  delete (the DICOMweb DELETE of :mod:`web.delete`, after a confirmation), send to a peer,
  open in the OHIF viewer.
- ``/admin/upload``: files stored through STOW-RS (PS3.18 10.5), by the script.
- ``/admin/peers``: the configured peers, each with an echo button.
- ``/admin/queue``: routing's outbox and the Storage Commitment reports waiting, with retry
  and drop.
- ``/admin/status``: what the index holds, the disk, counts from ``/metrics`` and the last
  lines of the audit trail.

The same access rules as DICOMweb (:mod:`web.auth`): reading a page needs ``read``, an
action (a POST to ``/admin/api/...``) ``read-write``. An action takes a JSON body and is
refused when the request's ``Origin`` is another site's: a form on another site cannot
post one (a browser asks first, CORS preflight, for a JSON body), nor a script there.

Every page says how long the server took to build it in a ``Server-Timing`` header (W3C
Server Timing), which ``bench/page.py`` reads.

Sending and echoing talk DICOM, which this package leaves to ``scp``: the server hands in an
:class:`Operations` (``scp/admin.py``). Without one (an application built by
:func:`web.create_app` alone) the peers and those buttons are not offered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode, urlsplit

import jinja2
from pydicom.datadict import tag_for_keyword
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from storage import COMMITMENT, ROUTE, Archive, InvalidQuery, Level, Selection

from .errors import BAD_REQUEST, FORBIDDEN, NOT_FOUND, UNSUPPORTED_MEDIA_TYPE, WebError

HERE = Path(__file__).parent
PAGE_SIZE = 50
"""Studies on one page of the search."""
THUMBNAIL = "128,128"
"""The thumbnails' viewport (PS3.18 8.3.5.1.3)."""
QUEUE_ENTRIES = 200
"""Outbox items listed on the queue page, per kind (the counts are all of them)."""
AUDIT_LINES = 50
"""Lines of the audit trail on the status page."""

STUDY_FIELDS = ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances", "StudyInstanceUID")
SERIES_FIELDS = ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDescription",
                 "NumberOfSeriesRelatedInstances")


# -- what the server hands in ----------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A peer of the configuration, as the page shows it."""

    ae_title: str
    host: str
    port: int
    services: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    """What an operation gave: ``ok`` or not, in words; ``counts`` for a send (with, for a
    peer that gets de-identified copies, the profile and the instances sent)."""

    ok: bool
    message: str
    counts: dict[str, Any] | None = None


class Operations(Protocol):
    """The DICOM side of the page's actions (``scp/admin.py`` implements it)."""

    def peers(self) -> list[Peer]:
        """The configured peers."""

    def echo(self, ae_title: str) -> Done:
        """A C-ECHO to the peer, diagnosed."""

    def send(self, ae_title: str, selection: Selection) -> Done:
        """The selected instances sent to the peer by C-STORE, as ``minipacs send`` does."""

    def audit_tail(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` lines of the audit trail, oldest first."""


# -- templates -------------------------------------------------------------------------

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}
"""No page is shown inside another site's frame, where its buttons could be clicked for a
visitor who does not see them (clickjacking)."""


def _page(request: Request, template: str, started: float, status_code: int = 200,
          **values: Any) -> HTMLResponse:
    config = request.app.state.config
    html = TEMPLATES.get_template(template).render(
        base=config.base_path, viewer=config.viewer, path=request.url.path, **values)
    taken = (time.perf_counter() - started) * 1000
    return HTMLResponse(html, status_code=status_code,
                        headers={"Server-Timing": f"app;dur={taken:.1f}", **NOT_FRAMED})


def _operations(request: Request) -> Operations | None:
    return getattr(request.app.state, "operations", None)


# -- DICOM JSON to what a table shows ------------------------------------------------------


def _value(item: dict[str, Any], keyword: str) -> str:
    """The value of ``keyword`` in a DICOM JSON object (PS3.18 F.2) as text: a person name
    by its first group present, several values joined by backslashes."""
    element = item.get(f"{tag_for_keyword(keyword):08X}") or {}
    values = element.get("Value") or []
    return "\\".join(_person(v) if isinstance(v, dict) else str(v) for v in values)


def _person(name: dict[str, str]) -> str:
    """A PN value's first group that is there (Alphabetic, Ideographic, Phonetic)."""
    return next((name[g] for g in ("Alphabetic", "Ideographic", "Phonetic") if name.get(g)), "")


def _rows(item_list: Iterable[dict[str, Any]], fields: Iterable[str]) -> list[dict[str, str]]:
    names = tuple(fields)
    return [{name: _value(item, name) for name in names} for item in item_list]


def _search(archive: Archive, level: Level, params: list[tuple[str, str]],
            study: str = "") -> list[dict[str, Any]]:
    """A QIDO-RS search's results, read whole (the caller limits them)."""
    try:
        answer = archive.search(archive.parse_search(params, level, study))
        body = answer.first + b"".join(answer.rest or ())
    finally:
        archive.release()
    return json.loads(body) if body else []


def _date(text: str) -> str:
    """``2026-12-04`` (an HTML date input) as a DICOM DA, ``20261204``."""
    return text.replace("-", "")


def _study_search(form: dict[str, str]) -> list[tuple[str, str]]:
    """The QIDO-RS parameters of the search form: a name without a wildcard matches as a
    prefix (PS3.4 C.2.2.2.4), a date range is inclusive (C.2.2.2.5)."""
    params: list[tuple[str, str]] = []
    name = form.get("name", "").strip()
    if name:
        params.append(("PatientName", name if any(c in name for c in "*?") else name + "*"))
    for key, field in (("patient_id", "PatientID"), ("modality", "ModalitiesInStudy"),
                       ("accession", "AccessionNumber")):
        if form.get(key, "").strip():
            params.append((field, form[key].strip()))
    low, high = _date(form.get("from", "").strip()), _date(form.get("to", "").strip())
    if low or high:
        params.append(("StudyDate", low if low == high else f"{low}-{high}"))
    return params


# -- pages -----------------------------------------------------------------------------


async def studies(request: Request) -> Response:
    """``/``: the study search."""
    started = time.perf_counter()
    form = {k: v for k, v in request.query_params.items()
            if k in ("name", "patient_id", "from", "to", "modality", "accession", "page")}
    try:
        page = max(int(form.get("page") or 1), 1)
    except ValueError:
        page = 1
    params = _study_search(form)
    wanted = [*params, *(("includefield", f) for f in STUDY_FIELDS),
              ("limit", str(PAGE_SIZE + 1)), ("offset", str((page - 1) * PAGE_SIZE))]
    error = ""
    found: list[dict[str, Any]] = []
    try:
        found = await run_in_threadpool(_search, request.app.state.archive, Level.STUDY,
                                        wanted)
    except InvalidQuery as exc:
        error = str(exc)
    rows = _rows(found[:PAGE_SIZE], STUDY_FIELDS)
    kept = {k: v for k, v in form.items() if k != "page" and v}

    def link(number: int) -> str:
        return "/?" + urlencode({**kept, "page": str(number)})

    return _page(request, "studies.html", started, status_code=400 if error else 200,
                 form=form, rows=rows, error=error, page=page,
                 previous=link(page - 1) if page > 1 else "",
                 next=link(page + 1) if len(found) > PAGE_SIZE else "")


async def study(request: Request) -> Response:
    """``/admin/studies/{study}``: one study, its series and what can be done with it."""
    started = time.perf_counter()
    uid = request.path_params["study"]
    archive: Archive = request.app.state.archive
    try:
        found = await run_in_threadpool(
            _search, archive, Level.STUDY,
            [("StudyInstanceUID", uid), *(("includefield", f) for f in STUDY_FIELDS)])
        series = await run_in_threadpool(
            _search, archive, Level.SERIES,
            [*(("includefield", f) for f in SERIES_FIELDS)], uid)
    except InvalidQuery as exc:
        raise WebError(BAD_REQUEST, str(exc)) from exc
    if not found:
        raise WebError(NOT_FOUND, "no such study")
    rows = sorted(_rows(series, SERIES_FIELDS),
                  key=lambda r: (int(r["SeriesNumber"]) if r["SeriesNumber"].lstrip(
                      "-").isdigit() else 0, r["SeriesInstanceUID"]))
    operations = _operations(request)
    peers = [p for p in operations.peers() if p.host] if operations else []
    return _page(request, "study.html", started, study=_rows(found, STUDY_FIELDS)[0],
                 series=rows, peers=peers, thumbnail=THUMBNAIL)


async def upload(request: Request) -> Response:
    """``/admin/upload``: the upload form (the script posts the files to STOW-RS)."""
    return _page(request, "upload.html", time.perf_counter())


async def peers(request: Request) -> Response:
    """``/admin/peers``: the peers of the configuration, each with an echo button."""
    operations = _operations(request)
    return _page(request, "peers.html", time.perf_counter(),
                 peers=operations.peers() if operations else [], available=bool(operations))


async def queue(request: Request) -> Response:
    """``/admin/queue``: routing's outbox and the commitment reports waiting."""
    started = time.perf_counter()
    archive: Archive = request.app.state.archive

    def read() -> dict[str, Any]:
        try:
            return {kind: {"summary": archive.routing_queue(kind),
                           "entries": archive.outbox.entries(limit=QUEUE_ENTRIES, kind=kind)}
                    for kind in (ROUTE, COMMITMENT)}
        finally:
            archive.release()

    kinds = await run_in_threadpool(read)
    return _page(request, "queue.html", started, kinds=kinds, limit=QUEUE_ENTRIES)


async def status(request: Request) -> Response:
    """``/admin/status``: storage, counts from ``/metrics``, the audit trail's end."""
    started = time.perf_counter()
    archive: Archive = request.app.state.archive

    def read() -> tuple[dict[str, int], tuple[int, int]]:
        try:
            return archive.totals(), archive.disk_usage()
        finally:
            archive.release()

    totals, (free, total) = await run_in_threadpool(read)
    operations = _operations(request)
    audit = await run_in_threadpool(operations.audit_tail, AUDIT_LINES) if operations else []
    return _page(request, "status.html", started, totals=totals, free=free, total=total,
                 used_percent=100.0 * (total - free) / total if total else 0.0,
                 metrics=_metric_lines(request.app.state.metrics),
                 audit=[_audit_line(line) for line in reversed(audit)])


METRICS_SHOWN = {
    "minipacs_dicom_associations": "DICOM associations, by calling AE title",
    "minipacs_dicom_associations_rejected": "DICOM associations rejected",
    "minipacs_dimse_operation_seconds": "DIMSE operations, by operation and status",
    "minipacs_http_request_seconds": "HTTP requests, by service and status",
    "minipacs_dicom_routed_instances": "Instances routed, by peer and outcome",
}
"""The families the status page sums up (counters' totals, histograms' counts)."""


def _metric_lines(registry: Any) -> list[tuple[str, str, float]]:
    """(what, labels, value) for each series of :data:`METRICS_SHOWN`."""
    lines: dict[tuple[str, str], float] = {}
    for family in registry.collect():
        title = METRICS_SHOWN.get(family.name)
        if title is None:
            continue
        for sample in family.samples:
            if not sample.name.endswith(("_total", "_count")):
                continue
            labels = ", ".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                               if k != "method")
            lines[(title, labels)] = lines.get((title, labels), 0.0) + sample.value
    return [(title, labels, value) for (title, labels), value in lines.items()]


def _audit_line(line: dict[str, Any]) -> dict[str, str]:
    rest = {k: v for k, v in line.items() if k not in ("time", "event")}
    return {"time": str(line.get("time", "")), "event": str(line.get("event", "")),
            "details": json.dumps(rest, ensure_ascii=False)[:300]}


# -- actions ---------------------------------------------------------------------------


async def _action_body(request: Request) -> dict[str, Any]:
    """The JSON body of an action, once it is known to come from this site.

    Raises
    ------
    WebError
        415 for another body, 403 for another site's ``Origin``, 400 for bad JSON.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise WebError(UNSUPPORTED_MEDIA_TYPE, "an action takes a JSON body")
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None:  # a browser's own word (Fetch Metadata), whatever a proxy did
        if site not in SAME_SITE:
            raise WebError(FORBIDDEN, f"an action from another site ({site}) is not taken:"
                           " the page's own origin only")
    elif origin and urlsplit(origin).netloc not in _hosts(request):
        raise WebError(FORBIDDEN, f"an action from {origin} is not taken: the page's own"
                       " origin only")
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise WebError(BAD_REQUEST, f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise WebError(BAD_REQUEST, "the body must be a JSON object")
    return body


SAME_SITE = frozenset({"same-origin", "none"})
"""``Sec-Fetch-Site`` values of a request the page itself made (``none``: typed by the user)."""


def _hosts(request: Request) -> set[str]:
    """The names this request was sent to: its ``Host``, and the ``X-Forwarded-Host`` a
    reverse proxy that rewrites ``Host`` adds (another site's script cannot set either
    without the browser's CORS check)."""
    hosts = {request.headers.get("host", "")}
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded:
        hosts.add(forwarded.split(",")[0].strip())
    return hosts


def _text(body: dict[str, Any], key: str, required: bool = True) -> str:
    value = body.get(key)
    if value is None:  # absent or null; any other falsy value is an error, not "all"
        value = ""
    if not isinstance(value, str) or (required and not value):
        raise WebError(BAD_REQUEST, f"{key!r} must be a non-empty string")
    return value


def _user(request: Request) -> str:
    return str(request.scope.get("minipacs.user") or "anonymous")


def _record(request: Request, event: str, **fields: Any) -> None:
    audit = getattr(request.app.state, "audit", None)
    if audit is not None:
        audit(event, user=_user(request), via="web page",
              address=request.client.host if request.client else "", **fields)


def _needs(request: Request) -> Operations:
    operations = _operations(request)
    if operations is None:
        raise WebError(NOT_FOUND, "this server offers no DICOM actions to the page")
    return operations


async def echo(request: Request) -> Response:
    """``POST /admin/api/echo`` ``{"peer": AE}``: a C-ECHO, diagnosed."""
    body = await _action_body(request)
    operations = _needs(request)
    done = await run_in_threadpool(operations.echo, _text(body, "peer"))
    return JSONResponse({"ok": done.ok, "message": done.message})


async def send(request: Request) -> Response:
    """``POST /admin/api/send`` ``{"peer": AE, "study": UID, "series": UID?}``: the study
    (or one of its series) sent to the peer; audited as ``send``."""
    body = await _action_body(request)
    operations = _needs(request)
    peer, study_uid = _text(body, "peer"), _text(body, "study")
    series_uid = _text(body, "series", required=False)
    selection = (Selection(series_uids=(series_uid,)) if series_uid
                 else Selection(study_uids=(study_uid,)))
    done = await run_in_threadpool(operations.send, peer, selection)
    _record(request, "send", peer=peer, study=study_uid, series=series_uid or None,
            ok=done.ok, **(done.counts or {}))
    return JSONResponse({"ok": done.ok, "message": done.message, **(done.counts or {})})


async def queue_action(request: Request) -> Response:
    """``POST /admin/api/queue`` ``{"action": "retry"|"drop", "kind": "route"|"commitment",
    "peer": AE?, "id": N?}``: what ``minipacs queue retry|drop`` does (the failed items of
    a peer, or one item); audited as ``queue-retry`` / ``queue-drop``."""
    body = await _action_body(request)
    action, kind = body.get("action"), body.get("kind", ROUTE)
    if action not in ("retry", "drop") or kind not in (ROUTE, COMMITMENT):
        raise WebError(BAD_REQUEST, "action must be retry or drop, kind route or commitment")
    peer = _text(body, "peer", required=False) or None
    item = body.get("id")
    if item is not None and (not isinstance(item, int) or isinstance(item, bool)
                             or not 0 < item < 2**63):
        raise WebError(BAD_REQUEST, "id must be an item's number (a positive integer)")
    archive: Archive = request.app.state.archive
    act = archive.outbox.retry if action == "retry" else archive.outbox.drop
    ids = (item,) if item is not None else ()

    def run() -> int:
        try:
            return act(peer, ids, failed_only=item is None, kind=kind)
        finally:
            archive.release()

    count = await run_in_threadpool(run)
    _record(request, f"queue-{action}", peer=peer or "", ids=list(ids), kind=kind,
            items=count)
    return JSONResponse({"items": count, "message": f"{action}: {count} item(s)"})


def _home(request: Request) -> Response:
    return RedirectResponse("/", status_code=307)


def routes() -> list[BaseRoute]:
    """The page's routes, for :func:`web.app.create_app`."""
    actions: list[tuple[str, Callable[[Request], Awaitable[Response]]]] = [
        ("/admin/api/echo", echo), ("/admin/api/send", send),
        ("/admin/api/queue", queue_action)]
    return [
        Route("/", studies, methods=["GET"]),
        Route("/admin", _home, methods=["GET"]),
        Route("/admin/", _home, methods=["GET"]),
        Route("/admin/studies/{study}", study, methods=["GET"]),
        Route("/admin/upload", upload, methods=["GET"]),
        Route("/admin/peers", peers, methods=["GET"]),
        Route("/admin/queue", queue, methods=["GET"]),
        Route("/admin/status", status, methods=["GET"]),
        *(Route(path, endpoint, methods=["POST"]) for path, endpoint in actions),
        Mount("/admin/static", StaticFiles(directory=HERE / "static"), name="admin-static"),
    ]
