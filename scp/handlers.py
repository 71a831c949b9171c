"""Event handlers: thin adapters from pynetdicom events to the storage façade.

Each handler takes what the event carries, calls one ``Archive`` method and answers with
the status of its result, or refuses with :class:`scp.service.Refused`. Access checks,
activity counts, errors and their statuses are the shared wrapper's (:mod:`scp.service`).
No parsing, SQL or paths here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE

from storage import Archive, Model, Origin, Query, Spooled

from . import commitment, metrics, status
from .access import Access
from .activity import Activity
from .contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS
from .engine import reactor, responses
from .retrieve import Final, MoveDestination, run_get, run_move
from .service import (
    COMMIT,
    ECHO,
    FIND,
    GET,
    MOVE,
    STORE,
    Matches,
    Refused,
    Status,
    handler,
    note,
)

logger = logging.getLogger(__name__)


@handler(ECHO)
def handle_echo(event: evt.Event, activity: Activity, access: Access) -> int:
    """C-ECHO (PS3.4 A.4): Success, unless the peer may not use it (0124)."""
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
SUPPORTED_EXTENSIONS: dict[int, str] = {
    RELATIONAL_QUERIES: "relational queries", COMBINED_DATETIME: "combined date-time matching",
    EMPTY_VALUE: "empty value matching", MULTIPLE_VALUES: "multiple value matching"}
"""The C-FIND extended negotiation bytes accepted when asked, with their names."""


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
        for i in SUPPORTED_EXTENSIONS:
            if i < len(info) and info[i] == 1:
                reply[i] = 1
        accepted[str(uid)] = bytes(reply)
    activity.set_extended(event, accepted)
    return accepted


@handler(STORE)
def handle_store(event: evt.Event, archive: Archive, activity: Activity,
                 access: Access) -> int | Dataset:
    """C-STORE (PS3.4 B.2): store the sender's bytes, answer only once they are indexed
    (PS3.4 B.2.3: Success, or the Warning of storage's outcome)."""
    req = cast(C_STORE, event.request)
    _check_context(event)
    received = _received(event)
    metrics.count_bytes("C-STORE", "in",
                        received.length if isinstance(received, Spooled) else len(received))
    outcome = archive.store(
        received,
        str(event.context.transfer_syntax),
        sop_class_uid=str(req.AffectedSOPClassUID),
        sop_instance_uid=str(req.AffectedSOPInstanceUID),
        origin=Origin(event.assoc.requestor.ae_title, event.assoc.requestor.address),
    )
    if outcome.study_instance_uid:  # for the audit trail (and its ATNA messages)
        note(event, study_instance_uid=outcome.study_instance_uid,
             patient_id=outcome.patient_id or None)
    return status.store_status(outcome)


@handler(COMMIT)
def handle_n_action(event: evt.Event, archive: Archive, activity: Activity,
                    access: Access) -> Status:
    """N-ACTION of the Storage Commitment Push Model (PS3.4 J.3.2): Success once the
    request is recorded (the report follows on its own association,
    :class:`scp.commitment.Reporter`); refused (0110, 0112, 0115, 0123, 0213) when it cannot be."""
    transaction, references = commitment.parse_request(event)
    peer = commitment.requester(access.config, event)
    archive.outbox.add_commitment(peer.ae_title.strip(" "), transaction, references)
    return status.SUCCESS


@handler(FIND)
def handle_find(event: evt.Event, archive: Archive, activity: Activity,
                access: Access) -> Matches:
    """C-FIND (PS3.4 C.4.1): one Pending per match, produced lazily so C-CANCEL works."""
    model = _model(event, FIND_MODELS)
    extended = activity.extended(event, str(event.request.AffectedSOPClassUID))
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
    for identifier in responses.identifiers(archive, query, cancel, event.assoc, syntax):
        yield pending, identifier  # cancel is checked before every row
    return status.CANCEL if cancel() else None  # PS3.4 C.4.1.1.4 Cancel


@handler(GET)
def handle_get(event: evt.Event, archive: Archive, activity: Activity,
               access: Access) -> Final:
    """C-GET (PS3.4 C.4.3): the matching instances go back over this association, which
    pynetdicom lends us for the sub-operations (:class:`scp.retrieve.Retrieval`)."""
    items = archive.retrieve(_parse_query(archive, event, _model(event, GET_MODELS)))
    peer = access.config.peer(event.assoc.requestor.ae_title)
    profile = peer.deidentify if peer is not None else ""
    final = run_get(event, archive, items, profile)
    if profile:  # what left de-identified, by which profile (issue 18)
        note(event, profile=profile, instances=final.sent_uids,
             withheld=sorted(final.withheld) or None)
    return final


@handler(MOVE)
def handle_move(event: evt.Event, archive: Archive, activity: Activity,
                access: Access) -> Final:
    """C-MOVE (PS3.4 C.4.2): the matching instances go to the Move Destination, a peer of
    the configuration, over an association we open to it (:class:`scp.retrieve.MoveDestination`)."""
    destination = str(cast(C_MOVE, event.request).MoveDestination)
    model = _model(event, MOVE_MODELS)
    config = access.config
    peer = config.destination(destination)
    if peer is None:
        requestor = event.assoc.requestor
        logger.warning("C-MOVE from %s@%s: Move Destination %r is not in peers (or has no"
                       " host)", requestor.ae_title, requestor.address, destination)
        raise Refused(status.MOVE_DESTINATION_UNKNOWN)  # PS3.4 C.4.2.1.5 A801
    items = archive.retrieve(_parse_query(archive, event, model))
    final = run_move(event, archive, items, MoveDestination(
        peer, config.ae.title, config.ae.max_pdu_size, config.ae.acse_timeout,
        config.ae.dimse_timeout))
    if peer.deidentify:  # what left de-identified, by which profile (issue 18)
        note(event, profile=peer.deidentify, instances=final.sent_uids,
             withheld=sorted(final.withheld) or None)
    return final


class _CancelFlag:
    """``event.is_cancelled``, remembered: pynetdicom forgets a C-CANCEL once asked."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self._cancelled = False

    def __call__(self) -> bool:
        self._cancelled = self._cancelled or bool(self._event.is_cancelled)
        return self._cancelled


def _received(event: evt.Event) -> bytes | Spooled:
    """The C-STORE data set as received: in the file pynetdicom spooled it to
    (:func:`scp.engine.reactor.spooled`), or in memory."""
    spooled = reactor.spooled(event)
    if spooled is None:
        return event.encoded_dataset(include_meta=False)
    if spooled.length <= _IN_MEMORY_UP_TO:
        return b"".join(spooled.chunks(size=_IN_MEMORY_UP_TO))  # one read
    return spooled


_IN_MEMORY_UP_TO = 4 * 1024 * 1024
"""Spooled data sets up to this size are read into memory at once and stored like any
bytes, not mapped and streamed (bounded; measured no faster nor slower on small
instances: 167-171 vs 165-173 inst/s, bench/profile_ingest.py, 2,000 64x64)."""


def _check_context(event: evt.Event) -> None:
    """Refuse a request whose Affected SOP Class UID is not the abstract syntax of the
    presentation context it came on (PS3.8 7.1.1.13: a context carries one abstract
    syntax, the SOP Class of the messages on it; pynetdicom picks the service from the
    command's): A900, the data set / identifier does not match the SOP Class (PS3.4
    B.2.3, C.4.1.1.4).
    """
    command = str(event.request.AffectedSOPClassUID)
    context = str(event.context.abstract_syntax)
    if command != context:
        raise Refused(status.sop_class_mismatch(command, context))


def _model(event: evt.Event, models: Mapping[str, Model]) -> Model:
    """The query model of a C-FIND / C-GET / C-MOVE; refused with A900 for a context
    mismatch (see :func:`_check_context`), with 0122 SOP Class not supported (PS3.7 C.5)
    for a model we do not have, such as the retired Patient/Study Only."""
    _check_context(event)
    sop_class = str(event.request.AffectedSOPClassUID)
    model = models.get(sop_class)
    if model is None:
        raise Refused(status.sop_class_not_supported(sop_class))
    return model


def _parse_query(archive: Archive, event: evt.Event, model: Model, **negotiated: bool) -> Query:
    """The request's identifier, as received, checked and parsed by the archive."""
    raw = cast(C_FIND | C_GET | C_MOVE, event.request).Identifier
    return archive.parse_query(raw.getvalue() if raw is not None else b"", model,
                               transfer_syntax_uid=str(event.context.transfer_syntax),
                               **negotiated)


def _accepted(extended: bytes, option: int) -> bool:
    return extended[option:option + 1] == b"\x01"
