"""STOW-RS (PS3.18 10.5): storing multipart/related bodies of DICOM instances.

``POST {base}/studies`` and ``POST {base}/studies/{study}`` take a
``multipart/related; type="application/dicom"`` body. It is read as a stream
(:class:`web.multipart.PartReader`: small parts in memory, large ones spooled to a file in
the store's temporary folder), parsed chunk by chunk in a worker thread, off the event
loop, and each part is stored as soon as its closing boundary has arrived, through
:meth:`storage.Archive.submit_part10`, the C-STORE path with its checks, durability,
duplicate policy and counters. The request does not wait for one part's fsyncs and index
commit before reading the next: the parts in flight share them (the archive's group
commit), and their outcomes are gathered before the answer. The answer is a Store
Instances Response Module (PS3.18 Annex I) in DICOM JSON, with the HTTP status of PS3.18
Table 10.5.3-1.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from storage import (
    Archive,
    FailureCode,
    Origin,
    PendingStore,
    StorageError,
    StoreOutcome,
    failure_code,
)

from .accept import DICOM, DICOM_JSON, JSON, matches, ranges
from .errors import (
    BAD_REQUEST,
    CONFLICT,
    NOT_ACCEPTABLE,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    UNSUPPORTED_MEDIA_TYPE,
    WebError,
    reason_line,
)
from .multipart import IN_MEMORY_UP_TO, MalformedBody, Part, PartReader, media_type
from .urls import path_uid, service_url

logger = logging.getLogger("minipacs.web.stow")

OK = 200
ACCEPTED = 202


MB = 1024 * 1024

BODY_IDLE_TIMEOUT = 60.0
"""Seconds a request body may stall (no bytes arrive) before we answer 408 and drop what
the part in progress had spooled. uvicorn has no such timeout of its own. A test may set
``app.state.stow_idle_timeout`` to a shorter one, and ``app.state.stow_in_memory_up_to`` to
fewer bytes kept in memory (:data:`web.multipart.IN_MEMORY_UP_TO`) before a part is
spooled."""



@dataclass
class StoreResponse:
    """The Store Instances Response Module (PS3.18 Table I.1-1) being built, part by part.

    Parameters
    ----------
    root : str
        The DICOMweb root URL, for the RetrieveURLs.
    study : str or None
        The study of the request's target resource (``/studies/{study}``).
    """

    root: str
    study: str | None
    referenced: list[Dataset] = field(default_factory=list)
    failed: list[Dataset] = field(default_factory=list)
    warnings: int = 0
    studies: set[str] = field(default_factory=set)
    pending: list[tuple[int, PendingStore]] = field(default_factory=list)

    async def settle(self, client: str) -> None:
        """Wait for the parts handed to the group commit, and note each outcome."""
        pending, self.pending = self.pending, []
        for number, store in pending:
            try:
                outcome = await asyncio.wrap_future(store.future)
            except Exception as exc:  # noqa: BLE001 - a part's failure, never a 500
                self.refused(store.sop_class_uid, store.sop_instance_uid, failure_code(exc))
                _log_refusal(client, number, exc)
            else:
                self.stored(outcome)

    def stored(self, outcome: StoreOutcome) -> None:
        """A ReferencedSOPSequence item (PS3.18 Table I.1-1) for a stored instance."""
        item = _reference(outcome.sop_class_uid, outcome.sop_instance_uid)
        item.RetrieveURL = (f"{self.root}/studies/{outcome.study_instance_uid}/series/"
                            f"{outcome.series_instance_uid}/instances/{outcome.sop_instance_uid}")
        if outcome.warning_code is not None:  # PS3.18 Table I.2-1, as C-STORE's warning
            item.WarningReason = int(outcome.warning_code)
            self.warnings += 1
        self.referenced.append(item)
        self.studies.add(outcome.study_instance_uid)

    def refused(self, sop_class_uid: str, sop_instance_uid: str, code: int) -> None:
        """A FailedSOPSequence item with its FailureReason (PS3.18 Table I.2-2)."""
        item = _reference(sop_class_uid, sop_instance_uid)
        item.FailureReason = int(code)
        self.failed.append(item)

    @property
    def status(self) -> int:
        """PS3.18 Table 10.5.3-1: 200 when every instance was stored, 202 when some were
        and others failed or carry warnings, 409 when none was."""
        if not self.referenced:
            return CONFLICT
        return ACCEPTED if self.failed or self.warnings else OK

    def render(self, answer_type: str, headers: dict[str, str] | None = None) -> Response:
        """The module in DICOM JSON (PS3.18 Annex F)."""
        ds = Dataset()
        # Type 2 (PS3.18 Table I.1-1): the study's URL when the stored instances have one
        study = self.study or (next(iter(self.studies)) if len(self.studies) == 1 else None)
        ds.RetrieveURL = f"{self.root}/studies/{study}" if study and self.referenced else None
        if self.failed:
            ds.FailedSOPSequence = self.failed
        if self.referenced:
            ds.ReferencedSOPSequence = self.referenced
        return JSONResponse(ds.to_json_dict(), self.status, headers=headers,
                            media_type=answer_type)


def _reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """The SOP Instance Reference Macro (PS3.3 Table 10-11); a part we could not read is
    named by empty UIDs."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid or None
    item.ReferencedSOPInstanceUID = sop_instance_uid or None
    return item


async def store_instances(request: Request) -> Response:
    """POST ``{base}/studies[/{study}]`` (PS3.18 10.5.1): store each part of the body as it
    arrives, and answer with the Store Instances Response Module (PS3.18 10.5.3)."""
    started = time.monotonic()
    study = request.path_params.get("study")
    if study is not None:
        path_uid(study, "study")
    answer_type = answer_media_type(request)
    boundary = dicom_boundary(request.headers.get("content-type"))
    limit = request.app.state.config.max_request_mb * MB
    check_declared_length(request.headers.get("content-length"), limit)
    response = StoreResponse(service_url(request), study)
    headers = await _receive(request, boundary, limit, response)
    request.scope["minipacs.audit"] = {  # the audit line's (web/metrics.py)
        "studies": sorted(response.studies), "stored": len(response.referenced),
        "failed": len(response.failed)}
    logger.info("STOW-RS from %s: %d stored, %d failed, %.2f s", _client(request),
                len(response.referenced), len(response.failed), time.monotonic() - started)
    return response.render(answer_type, headers)


async def _receive(request: Request, boundary: str, limit: int,
                   response: StoreResponse) -> dict[str, str]:
    """Read the body and store each part as it completes; the answer's extra headers. A
    body cut short, too large, stalled or malformed raises :class:`WebError` once the parts
    before the fault were stored; what the part in progress spooled is removed."""
    archive: Archive = request.app.state.archive
    try:
        reader = PartReader(boundary, archive.spool_folder(), guard=archive,
                            in_memory_up_to=getattr(request.app.state,
                                                    "stow_in_memory_up_to", IN_MEMORY_UP_TO))
    except MalformedBody as exc:
        raise WebError(BAD_REQUEST, str(exc)) from exc
    try:
        return await _read(request, reader, limit, response)
    finally:
        reader.close()
        await response.settle(_client(request))  # what was stored before any fault


async def _read(request: Request, reader: PartReader, limit: int,
                response: StoreResponse) -> dict[str, str]:
    archive: Archive = request.app.state.archive
    origin = Origin("", _client(request))
    study = response.study
    received = 0
    chunks = _chunks(request, getattr(request.app.state, "stow_idle_timeout",
                                      BODY_IDLE_TIMEOUT), reader)
    async for chunk in chunks:
        allowed = chunk[:max(limit - received, 0)] if limit else chunk
        received += len(chunk)
        await run_in_threadpool(_feed, archive, reader, allowed, study, origin, response)
        if reader.malformed:
            await response.settle(origin.address)
            raise WebError(BAD_REQUEST, f"{reader.malformed}{_stored_before(response)}")
        if limit and received > limit:  # RFC 9110 15.5.14
            await response.settle(origin.address)
            raise WebError(PAYLOAD_TOO_LARGE, f"the body exceeds web.max_request_mb"
                           f" ({limit // MB} MB) in part {reader.parts}"
                           f"{_stored_before(response)}")
    await response.settle(origin.address)
    return _ending(reader, response)


async def _chunks(request: Request, idle_timeout: float,
                  reader: PartReader) -> AsyncIterator[bytes]:
    """The body's chunks; :class:`WebError` when the client stalls (408) or leaves."""
    stream = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(idle_timeout):
                chunk = await stream.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:  # RFC 9110 15.5.9
            reason = f"no body bytes for {idle_timeout:g} s in part {reader.parts}"
            logger.warning("STOW-RS from %s: %s", _client(request), reason)
            raise WebError(REQUEST_TIMEOUT, f"{reason}; that part is not stored") from None
        except ClientDisconnect:  # no one to answer: the log says it
            logger.warning("STOW-RS from %s: the client left in part %d", _client(request),
                           reader.parts)
            raise WebError(BAD_REQUEST, f"the client left in part {reader.parts}") from None
        if chunk:
            yield chunk


def _ending(reader: PartReader, response: StoreResponse) -> dict[str, str]:
    """What the end of the body says: nothing when it closed properly; a body cut short
    inside a part fails that part (0xC000) when instances before it were stored (with a
    ``Warning`` header saying why), else is a 400 (PS3.18 Table 10.5.3-1, bad syntax)."""
    if reader.complete and reader.parts:
        return {}
    if not reader.parts:
        raise WebError(BAD_REQUEST, "the body holds no part (PS3.18 10.5.1.4: one or more"
                       " instances)")
    reason = f"the body ends inside part {reader.parts}: no closing boundary"
    if not response.referenced:
        raise WebError(BAD_REQUEST, f"{reason}; nothing stored")
    response.refused("", "", FailureCode.CANNOT_UNDERSTAND)
    return {"Warning": f'299 minipacs "{reason}; that part is not stored"'}


def _feed(archive: Archive, reader: PartReader, chunk: bytes, study: str | None,
          origin: Origin, response: StoreResponse) -> None:
    """Parse ``chunk`` and store the parts it completed, in a worker thread: parsing, spool
    writes and stores block, and the event loop serves the other requests meanwhile. The
    thread's index connection is given back after each chunk (as QIDO-RS does after each
    batch): the threadpool's threads would otherwise each keep one open."""
    try:
        for part in reader.feed(chunk):
            _store_part(archive, part, study, origin, response)
    finally:
        archive.release()


def _store_part(archive: Archive, part: Part, study: str | None, origin: Origin,
                response: StoreResponse) -> None:
    """Store one part (in a worker thread) and note the outcome in ``response``."""
    try:
        refusal = _refusal(part)
        if refusal is not None:
            code, reason = refusal
            response.refused("", "", code)
            logger.warning("STOW-RS from %s: part %d refused (%04X): %s", origin.address,
                           part.number, code, reason_line(reason))
            return
        try:
            pending = archive.submit_part10(part.content, study_instance_uid=study,
                                            origin=origin)
        except Exception as exc:  # noqa: BLE001 - a part's failure, never a 500
            response.refused(*archive.identify_part10(part.content), failure_code(exc))
            _log_refusal(origin.address, part.number, exc)
        else:
            response.pending.append((part.number, pending))
    finally:
        part.discard()


def _log_refusal(client: str, number: int, exc: Exception) -> None:
    """A line for a part the archive refused; a fault of ours gets its traceback."""
    if not isinstance(exc, StorageError):
        logger.error("STOW-RS part %d", number, exc_info=exc)
    logger.warning("STOW-RS from %s: part %d refused (%04X): %s", client, number,
                   failure_code(exc), reason_line(str(exc)))


def _refusal(part: Part) -> tuple[int, str] | None:
    """Why a part is refused before it is read, if it is: it was refused as it arrived
    (larger than ``storage.max_instance_mb``, its spool would cross
    ``storage.min_free_disk_mb``, or the spool could not be written: A700, PS3.18 Table
    I.2-2), or it is not ``application/dicom`` (C000, PS3.18 10.5.1.4)."""
    if part.spool_error:
        return FailureCode.OUT_OF_RESOURCES, part.spool_error
    kind, _ = media_type(part.headers.get("content-type", DICOM))
    if kind != DICOM:
        return FailureCode.CANNOT_UNDERSTAND, f"part of type {kind!r}, not {DICOM}"
    return None


def _stored_before(response: StoreResponse) -> str:
    stored = len(response.referenced)
    return f"; {stored} instance{'s' if stored != 1 else ''} before it stored" if stored else \
        "; nothing stored"


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def answer_media_type(request: Request) -> str:
    """The media type of the answer (PS3.18 10.5.1.3, 8.7): DICOM JSON, or
    ``application/json`` when the client prefers that; 406 when it accepts neither (XML is
    not served)."""
    for media in ranges(request):  # best first
        if media.media_type == JSON:
            return JSON
        if matches(media.media_type, DICOM_JSON):
            return DICOM_JSON
    raise WebError(NOT_ACCEPTABLE, f"STOW-RS answers {DICOM_JSON} or {JSON}, not"
                   f" {request.headers.get('accept', '')[:120]!r}")


def dicom_boundary(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` body (quoted or
    not; PS3.18 10.5.1.3, 8.6.1.2): 415 for another media type (PS3.18 Table 10.5.3-1),
    400 without a boundary."""
    kind, params = media_type(content_type)
    wanted = f'multipart/related; type="{DICOM}"'
    if kind != "multipart/related":
        raise WebError(UNSUPPORTED_MEDIA_TYPE, f"STOW-RS takes {wanted}, not"
                       f" {(content_type or 'no Content-Type')[:120]!r}")
    part_type = params.get("type", "").lower()
    if part_type != DICOM:
        detail = (" (metadata and bulk data parts are not supported)"
                  if part_type.startswith(("application/dicom+", "application/octet-stream"))
                  else "")
        raise WebError(UNSUPPORTED_MEDIA_TYPE, f"STOW-RS takes {wanted}, not type="
                       f"{part_type or 'nothing'!r}{detail}")
    boundary = params.get("boundary", "")
    if not boundary:
        raise WebError(BAD_REQUEST, "the Content-Type names no boundary (RFC 2046 5.1.1)")
    return boundary


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading a body whose Content-Length exceeds ``limit`` bytes (0: none)."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise WebError(BAD_REQUEST, f"bad Content-Length {content_length[:40]!r}") from None
    if limit and length > limit:  # RFC 9110 15.5.14
        raise WebError(PAYLOAD_TOO_LARGE, f"a body of {length / MB:.1f} MB exceeds"
                       f" web.max_request_mb ({limit // MB} MB); nothing stored")


ROUTES: list[BaseRoute] = [
    Route("/studies", store_instances, methods=["POST"]),
    Route("/studies/{study}", store_instances, methods=["POST"]),
]
