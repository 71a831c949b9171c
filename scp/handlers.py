"""Event handlers: thin adapters from pynetdicom events to the storage façade.

Each handler takes what the event carries, calls one ``Archive`` method and maps the result
(or the error) to a status through :mod:`scp.status`. No parsing, SQL or paths here, and no
exception ever reaches pynetdicom's catch-all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE

from storage import (
    Archive,
    Model,
    Origin,
    Query,
    Spooled,
)

from . import status
from .access import Access
from .activity import Activity
from .contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS
from .engine import responses
from .engine.retrieve import Responses
from .retrieve import Final, MoveDestination, run_get, run_move

logger = logging.getLogger(__name__)


def handle_echo(event: evt.Event, activity: Activity, access: Access) -> int | Dataset:
    """C-ECHO (PS3.4 A.4): Success, unless the peer may not use it (0124)."""
    if not access.allows(event, "echo"):
        activity.count(event, "echo", ok=False)
        return status.not_authorised("echo")
    activity.count(event, "echo", ok=True)
    return status.SUCCESS


# PS3.4 C.5.1.1 (Table C.5-1): bytes of the C-FIND Service Class Application Information,
# counted from 0: relational-queries, combined date-time matching, fuzzy semantic matching
# of person names (2, not supported), timezone query adjustment (3, not supported),
# enhanced multi-frame image conversion (4, not supported), empty value matching,
# multiple value matching
RELATIONAL_QUERIES = 0
COMBINED_DATETIME = 1
EMPTY_VALUE = 5  # always performed; accepted when asked
MULTIPLE_VALUES = 6
_SUPPORTED_EXTENSIONS = (RELATIONAL_QUERIES, COMBINED_DATETIME, EMPTY_VALUE, MULTIPLE_VALUES)


def handle_sop_extended(event: evt.Event, activity: Activity) -> dict[str, bytes]:
    """SOP Class Extended Negotiation (PS3.7 D.3.3.5) for the FIND models: we accept
    relational queries, combined date-time matching, empty value matching and multiple
    value matching when asked; the other options are answered 0 (not supported)."""
    accepted: dict[str, bytes] = {}
    requested: dict[Any, bytes] = getattr(event, "app_info", {})
    for uid, info in requested.items():
        if str(uid) not in FIND_MODELS or not info:
            continue
        reply = bytearray(len(info))
        for i in _SUPPORTED_EXTENSIONS:
            if i < len(info) and info[i] == 1:
                reply[i] = 1
        accepted[str(uid)] = bytes(reply)
    activity.set_extended(event, accepted)
    return accepted


def handle_store(
    event: evt.Event, archive: Archive, activity: Activity, access: Access
) -> int | Dataset:
    """C-STORE (PS3.4 B.2): store the sender's bytes, answer only once they are indexed."""
    req = cast(C_STORE, event.request)
    if not access.allows(event, "store"):
        activity.count(event, "store", ok=False)
        return status.not_authorised("store")
    if (mismatch := _context_mismatch(event)) is not None:
        activity.count(event, "store", ok=False)
        return mismatch
    with activity.operation():
        try:
            outcome = archive.store(
                _received(event),
                str(event.context.transfer_syntax),
                sop_class_uid=str(req.AffectedSOPClassUID),
                sop_instance_uid=str(req.AffectedSOPInstanceUID),
                origin=Origin(event.assoc.requestor.ae_title, event.assoc.requestor.address),
            )
        except Exception as exc:  # mapped to a status in one place; logged once
            result = status.store_error_status(exc)
            _log_failure("C-STORE", event, exc)
            activity.count(event, "store", ok=False)
            return result
    activity.count(event, "store", ok=True)
    return status.store_status(outcome)


def handle_find(
    event: evt.Event, archive: Archive, activity: Activity, access: Access
) -> Iterator[Any]:
    """C-FIND (PS3.4 C.4.1): one Pending per match, produced lazily so C-CANCEL works."""
    if not access.allows(event, "find"):
        activity.count(event, "find", ok=False)
        yield status.not_authorised("find"), None
        return
    sop_class = str(event.request.AffectedSOPClassUID)
    model = _model(event, FIND_MODELS)
    if isinstance(model, Dataset):
        activity.count(event, "find", ok=False)
        yield model, None
        return
    extended = activity.extended(event, sop_class)
    with activity.operation():
        try:
            query = _parse_query(
                archive,
                event,
                model,
                relational=_accepted(extended, RELATIONAL_QUERIES),
                combined_datetime=_accepted(extended, COMBINED_DATETIME),
                multiple_values=_accepted(extended, MULTIPLE_VALUES),
            )
            pending = status.PENDING_WARNING if query.ignored else status.PENDING
            cancel = _CancelFlag(event)
            syntax = str(event.context.transfer_syntax)
            for identifier in responses.identifiers(archive, query, cancel, event.assoc,
                                                    syntax):
                yield pending, identifier  # cancel is checked before every row
            if cancel():
                yield status.CANCEL, None  # PS3.4 C.4.1.1.4 Cancel
                return
        except Exception as exc:
            _log_failure("C-FIND", event, exc)
            activity.count(event, "find", ok=False)
            yield status.find_error_status(exc), None
            return
    activity.count(event, "find", ok=True)


def handle_get(
    event: evt.Event, archive: Archive, activity: Activity, access: Access
) -> Iterator[Any]:
    """C-GET (PS3.4 C.4.3): the matching instances go back over this association, which
    pynetdicom lends us for the sub-operations (:class:`scp.retrieve.Retrieval`)."""
    req = cast(C_GET, event.request)
    model = _model(event, GET_MODELS)
    outcome = "get failed"
    with activity.operation():
        final: Final | None = None
        responses = Responses(event.assoc, req, rewrite=lambda rsp: _final(rsp, final, event))
        try:  # finally: also when pynetdicom drops us (the association went away)
            responses.install()
            refusal = None if access.allows(event, "get") else status.not_authorised("get")
            if refusal is None and isinstance(model, Dataset):
                refusal = model
            elif refusal is None and isinstance(model, Model):
                try:
                    items = archive.retrieve(_parse_query(archive, event, model))
                except Exception as exc:
                    _log_failure("C-GET", event, exc)
                    refusal = status.find_error_status(exc)
            if refusal is not None:
                final = Final(int(refusal.Status), comment=refusal.get("ErrorComment"))
            else:
                final = run_get(event, archive, items)
                outcome = "get cancelled" if final.status == status.CANCEL else "get"
            yield 1  # pynetdicom wants a number first: the final response follows it
            yield status.SUCCESS, None  # rewritten with ``final`` on its way out
        finally:
            responses.restore()
            activity.count(event, outcome, ok=True)


def handle_move(
    event: evt.Event, archive: Archive, activity: Activity, access: Access
) -> Iterator[Any]:
    """C-MOVE (PS3.4 C.4.2): the matching instances go to the Move Destination, a peer of
    the configuration, over an association we open to it (:class:`scp.retrieve.MoveDestination`)."""
    req = cast(C_MOVE, event.request)
    model = _model(event, MOVE_MODELS)
    config = access.config
    peer = config.destination(str(req.MoveDestination))
    outcome = "move failed"
    with activity.operation():
        final: Final | None = None
        responses = Responses(event.assoc, req, rewrite=lambda rsp: _final(rsp, final, event))
        try:  # finally: also when pynetdicom drops us
            responses.install()
            if not access.allows(event, "move"):
                final = _refusal(status.not_authorised("move"))
            elif isinstance(model, Dataset):
                final = _refusal(model)
            elif peer is None:
                logger.warning("C-MOVE from %s: Move Destination %r is not in peers (or has"
                               " no host)", _peer_name(event), str(req.MoveDestination))
                final = Final(status.MOVE_DESTINATION_UNKNOWN)  # PS3.4 C.4.2.1.5 A801
            else:
                try:
                    items = archive.retrieve(_parse_query(archive, event, model))
                except Exception as exc:
                    _log_failure("C-MOVE", event, exc)
                    final = _refusal(status.find_error_status(exc))
                else:
                    final = run_move(event, archive, items, MoveDestination(
                        peer, config.ae.title, config.ae.max_pdu_size,
                        config.ae.acse_timeout, config.ae.dimse_timeout))
                    outcome = "move cancelled" if final.status == status.CANCEL else "move"
            yield None, None  # pynetdicom answers A801, rewritten with ``final``
        finally:
            responses.restore()
            activity.count(event, outcome, ok=True)


def _refusal(refusal: Dataset) -> Final:
    return Final(int(refusal.Status), comment=refusal.get("ErrorComment"))


def _final(primitive: Any, final: Final | None, event: evt.Event) -> None:
    """The final response of a C-GET or C-MOVE, as :class:`scp.retrieve.Final` says."""
    if final is not None:
        final.rewrite(primitive, UID(str(event.context.transfer_syntax)))


class _CancelFlag:
    """``event.is_cancelled``, remembered: pynetdicom forgets a C-CANCEL once asked."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self._cancelled = False

    def __call__(self) -> bool:
        self._cancelled = self._cancelled or bool(self._event.is_cancelled)
        return self._cancelled


def _received(event: evt.Event) -> bytes | Spooled:
    """The C-STORE data set as received: in the file pynetdicom spooled it to (see
    scp/engine/reactor.py, _SpoolingConfig), or in memory."""
    try:
        path = event.dataset_path
    except AttributeError:  # pynetdicom without spooling
        path = None
    if path is None:  # not spooled
        return event.encoded_dataset(include_meta=False)
    _, spooled = Spooled.part10(path)  # the syntax is the context's, as written there
    if spooled.length <= _IN_MEMORY_UP_TO:
        return b"".join(spooled.chunks(size=_IN_MEMORY_UP_TO))  # one read
    return spooled


_IN_MEMORY_UP_TO = 4 * 1024 * 1024
"""Spooled data sets up to this size are read into memory at once and stored like any
bytes, not mapped and streamed (bounded; measured no faster nor slower on small
instances: 167-171 vs 165-173 inst/s, bench/profile_ingest.py, 2,000 64x64)."""


def _context_mismatch(event: evt.Event) -> Dataset | None:
    """The refusal of a request whose Affected SOP Class UID is not the abstract syntax of
    the presentation context it came on (PS3.8 7.1.1.13: a context carries one abstract
    syntax, the SOP Class of the messages on it; pynetdicom picks the service from the
    command's), ``None`` when they agree:
    A900, the data set / identifier does not match the SOP Class (PS3.4 B.2.3, C.4.1.1.4).
    """
    command = str(event.request.AffectedSOPClassUID)
    context = str(event.context.abstract_syntax)
    return status.sop_class_mismatch(command, context) if command != context else None


def _model(event: evt.Event, models: Mapping[str, Model]) -> Model | Dataset:
    """The query model of a C-FIND / C-GET / C-MOVE, or the refusal to answer with: A900
    for a context mismatch (see :func:`_context_mismatch`), 0122 SOP Class not supported
    (PS3.7 C.5) for a model we do not have, such as the retired Patient/Study Only."""
    refusal = _context_mismatch(event)
    if refusal is not None:
        return refusal
    sop_class = str(event.request.AffectedSOPClassUID)
    return models.get(sop_class) or status.sop_class_not_supported(sop_class)


def _parse_query(archive: Archive, event: evt.Event, model: Model, **negotiated: bool) -> Query:
    """The request's identifier, as received, checked and parsed by the archive."""
    raw = cast(C_FIND | C_GET | C_MOVE, event.request).Identifier
    return archive.parse_query(raw.getvalue() if raw is not None else b"", model,
                               transfer_syntax_uid=str(event.context.transfer_syntax),
                               **negotiated)


def _accepted(extended: bytes, option: int) -> bool:
    return extended[option:option + 1] == b"\x01"


def _peer_name(event: evt.Event) -> str:
    return f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"


def _log_failure(service: str, event: evt.Event, exc: Exception) -> None:
    peer = _peer_name(event)
    if isinstance(exc, ValueError | LookupError | OSError) or type(exc).__module__.startswith(
        "storage"
    ):
        logger.warning("%s from %s failed: %s", service, peer, exc)
    else:
        logger.exception("%s from %s failed unexpectedly", service, peer)
