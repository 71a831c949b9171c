"""The network side of retrieves: what a C-MOVE proposes to its destination, which
presentation context each instance goes on, and the C-STORE sub-operations themselves.

The sub-operations do not go through pynetdicom's C-GET / C-MOVE service class, which
takes decoded data sets from the handler and re-encodes them: :class:`Retrieval` writes each
stored data set, byte for byte when the receiver accepted its transfer syntax, over a
:class:`scp.engine.sender.Link`: the association a C-MOVE opens to its destination
(:class:`MoveDestination`), or the C-GET's own association, lent by pynetdicom for the
length of the retrieve (:func:`scp.engine.reactor.leased`). pynetdicom still takes the
request, calls the handler and sends the final response, which :class:`Final` rewrites
with the outcome (:class:`scp.engine.retrieve.Responses`).

Each failed sub-operation is one log line: ``<service> sub-operation failed for SOP
Instance <uid>: <reason>``; once the receiver is gone, the first instance that cannot go
gets a line and the others one line together (:meth:`Retrieval.finish`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from storage import (
    Archive,
    CannotConvert,
    InstanceUnavailable,
    NotAsWritten,
    StorageError,
    StoredInstance,
    Withheld,
)

from . import metrics, status
from .config import Config, PeerConfig
from .engine import dimse
from .engine import retrieve as engine_retrieve
from .engine.reactor import leased
from .engine.sender import AssociationFailed, Link, ReceiverGone, StoreAssociation

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context IDs 1 to 255

Contexts = dict[str, list[tuple[int, str]]]
"""SOP Class UID -> [(presentation context ID, transfer syntax UID)] the receiver accepted."""


def get_contexts(assoc: Any) -> Contexts:
    """What a C-GET's requestor accepted to receive from us: the contexts where we are the
    C-STORE SCU (PS3.7 D.3.3.4, SCP/SCU role selection)."""
    out: Contexts = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            out.setdefault(str(cx.abstract_syntax), []).append(
                (int(cx.context_id), str(cx.transfer_syntax[0])))
    return out


def proposed_contexts(
    items: Iterable[StoredInstance], peer: PeerConfig
) -> list[PresentationContext]:
    """The presentation contexts a C-MOVE proposes to ``peer`` for ``items``.

    For every SOP Class one context with the uncompressed syntaxes we can always produce
    (only the peer's ``transfer_syntax`` when it names one), so that every instance has a
    way through; then, unless ``transfer_syntax`` is set, one context per stored syntax, so
    that instances go as stored when the peer takes that syntax. When more than 128 would
    be needed, the stored-syntax contexts of the least frequent pairs are left out
    (those instances are converted); SOP Classes beyond 128 cannot be proposed at all
    and their sub-operations fail (logged).
    """
    return contexts_for(Counter((i.sop_class_uid, i.transfer_syntax_uid) for i in items), peer)


def contexts_for(pairs: Counter[tuple[str, str]], peer: PeerConfig
                 ) -> list[PresentationContext]:
    """:func:`proposed_contexts` for instances counted by (SOP Class UID, stored transfer
    syntax UID) (``minipacs doctor`` proposes them too)."""
    classes = list(dict.fromkeys(cls for cls, _ in pairs))
    plain = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    fallback = [peer.transfer_syntax] if peer.transfer_syntax else plain
    contexts = [build_context(cls, fallback) for cls in classes[:MAX_CONTEXTS]]
    if len(classes) > MAX_CONTEXTS:
        logger.error("C-MOVE to %s: %d SOP Classes, only %d can be proposed; the instances of"
                     " the others fail", peer.ae_title, len(classes), MAX_CONTEXTS)
    if not peer.transfer_syntax:
        for (cls, syntax), _ in pairs.most_common():
            if len(contexts) >= MAX_CONTEXTS:
                break
            if syntax not in fallback:
                contexts.append(build_context(cls, syntax))
    return contexts


Prepared = tuple[int, Iterable[bytes | memoryview], str]
"""A sub-operation's presentation context ID, data set and SOP Instance UID."""


def data_set_for(archive: Archive, item: StoredInstance, contexts: list[tuple[int, str]],
                 profile: str = "") -> Prepared:
    """The presentation context ``item`` goes on, its data set and the SOP Instance UID it
    goes under: the stored bytes when the receiver accepted the stored syntax; Explicit VR
    Little Endian rewritten as Implicit on the bytes when the receiver took only that
    (:meth:`storage.Archive.stored_as_implicit`); else decoded and encoded into one it
    accepted (:meth:`storage.Archive.read_instance`). With a de-identification
    ``profile`` (``peers[].deidentify``), a de-identified copy under its replaced UID
    (:meth:`storage.Archive.read_deidentified`). The stored file is read before this
    returns.

    Raises
    ------
    InstanceUnavailable
        The file is missing or damaged.
    CannotConvert
        No accepted syntax can be produced (nothing was accepted for its SOP Class).
    Withheld
        De-identified, it would still show the patient in its pixels.
    """
    accepted = [syntax for _, syntax in contexts]
    if profile:
        for context_id, syntax in contexts:
            if syntax == item.transfer_syntax_uid:  # rewritten on the stored bytes
                try:
                    chunks, uid = archive.deidentified_data_set(item, profile)
                except NotAsWritten:
                    break
                return context_id, chunks, uid
        ds = archive.read_deidentified(item, profile, accepted)
        uid = str(ds.SOPInstanceUID)
        return (*_encoded(ds, contexts, uid), uid)
    for context_id, syntax in contexts:
        if syntax == item.transfer_syntax_uid:
            pieces = archive.stored_data_set(item)
            try:
                first = next(pieces)
            except NotAsWritten:
                break
            return context_id, itertools.chain([first], pieces), item.sop_instance_uid
    if item.transfer_syntax_uid == ExplicitVRLittleEndian:
        for context_id, syntax in contexts:
            if syntax == ImplicitVRLittleEndian:  # the same values, other headers
                try:
                    return (context_id, [archive.stored_as_implicit(item)],
                            item.sop_instance_uid)
                except (NotAsWritten, CannotConvert):
                    break  # decoded below, which says why if that fails too
    ds = archive.read_instance(item, accepted)
    return (*_encoded(ds, contexts, item.sop_instance_uid), item.sop_instance_uid)


def _encoded(ds: Dataset, contexts: list[tuple[int, str]],
             uid: str) -> tuple[int, list[bytes]]:
    """``ds`` (in a syntax one of ``contexts`` accepts, or native little endian) encoded
    for the context that takes its syntax, else Explicit (then any native little endian)
    VR Little Endian."""
    produced = str(ds.file_meta.TransferSyntaxUID)
    ranked = sorted(contexts, key=lambda c: (c[1] != produced,
                                             c[1] != str(ExplicitVRLittleEndian)))
    for context_id, syntax in ranked:
        syntax_uid = UID(syntax)
        if syntax == produced or (not syntax_uid.is_encapsulated
                                  and syntax_uid.is_little_endian):
            raw = encode(ds, syntax_uid.is_implicit_VR, syntax_uid.is_little_endian,
                         syntax_uid.is_deflated)
            if raw is None:
                raise CannotConvert(f"{uid} cannot be encoded as {syntax_uid.name}")
            return context_id, [raw]
    raise CannotConvert(f"{uid}: no accepted syntax can be produced")


PENDING_EVERY_SUBOPERATION_UP_TO = 1000
"""Retrieves of up to this many instances get a Pending response after every one."""
PENDING_INTERVAL = 0.5
"""Larger ones get one Pending response per this many seconds at most."""

RECEIVER_GONE = "the receiver is gone (it released or aborted the association)"
REQUESTOR_GONE = "not sent: the requestor is gone (it released or aborted the association)"
CANCELLED = "cancelled"



@dataclass
class Final:
    """The final response of a C-GET or C-MOVE (PS3.4 C.4.2.1.4, C.4.3.1.3), applied by
    :meth:`rewrite` to the one pynetdicom sends when the handler returns."""

    status: int
    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    comment: str | None = None
    sent_uids: list[str] = field(default_factory=list)
    """The SOP Instance UIDs (as stored) the receiver took, for the audit trail."""
    withheld: dict[str, str] = field(default_factory=dict)
    """Those of ``failed_uids`` a de-identified sending withheld, and why (they would fail
    again: routing does not retry them)."""

    @classmethod
    def of(cls, refusal: int | Dataset) -> Final:
        """The final response of a retrieve refused (or failed) before any sub-operation
        with ``refusal``: its code, and its ErrorComment if it has one."""
        if isinstance(refusal, Dataset):
            return cls(int(refusal.Status), comment=refusal.get("ErrorComment"))
        return cls(refusal)

    def rewrite(self, primitive: Any, transfer_syntax: UID) -> None:
        primitive.Status = self.status
        primitive.NumberOfRemainingSuboperations = self.remaining
        primitive.NumberOfCompletedSuboperations = self.completed
        primitive.NumberOfFailedSuboperations = self.failed
        primitive.NumberOfWarningSuboperations = self.warning
        primitive.ErrorComment = self.comment
        primitive.Identifier = None
        if self.failed_uids:  # PS3.4 C.4.2.1.4.2: only when a sub-operation failed
            ds = Dataset()
            ds.FailedSOPInstanceUIDList = self.failed_uids
            primitive.Identifier = BytesIO(encode(
                ds, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                transfer_syntax.is_deflated) or b"")


class Retrieval:
    """The C-STORE sub-operations of one C-GET or C-MOVE (``service``), one at a time over
    ``link``, counted, logged when they fail, with Pending responses through ``pending``
    (every sub-operation up to :data:`PENDING_EVERY_SUBOPERATION_UP_TO` instances, else
    every :data:`PENDING_INTERVAL` s; PS3.4
    C.4.2.3.1 and C.4.3.3.1 make them optional).

    ``message_id`` is the request's: the sub-operations take the Message IDs after it, as
    pynetdicom numbered them; ``originator`` the Move Originator AE Title and Message ID
    of a C-MOVE's sub-operations (PS3.7 9.3.1.1). ``cancelled`` and ``requestor_up`` are
    asked before each sub-operation: a C-CANCEL stops the retrieve after the current one
    (FE00), a requestor gone stops it with the rest failed.
    """

    def __init__(self, service: str, archive: Archive, items: list[StoredInstance],
                 link: Link, contexts: Contexts, message_id: int, priority: int = 0,
                 originator: tuple[str, int] | None = None,
                 pending: Callable[[Final], None] = lambda _: None,
                 cancelled: Callable[[], bool] = lambda: False,
                 requestor_up: Callable[[], bool] = lambda: True, profile: str = "") -> None:
        self.service = service
        self.profile = profile
        self.archive = archive
        self.items = items
        self.link = link
        self.contexts = contexts
        self.message_id = message_id
        self.priority = priority
        self.originator = originator
        self._pending = pending
        self._cancelled = cancelled
        self._requestor_up = requestor_up
        self.completed = self.warning = 0
        self.failed_uids: list[str] = []
        self.sent_uids: list[str] = []  # as stored, each sub-operation that succeeded
        self.withheld: dict[str, str] = {}  # SOP Instance UID -> why (de-identified only)
        self.was_cancelled = False
        self._last_pending = -PENDING_INTERVAL
        self._ahead_of: StoredInstance | None = None  # the instance read ahead, and what
        self._ahead: Prepared | Exception | None = None  # it gave
        self._repeated: dict[str, int] = {}  # reason -> failures after its first line

    def run(self) -> Final:
        """Send every instance (or stop early), and the final response to give."""
        done = 0
        try:
            for done, item in enumerate(self.items):
                if self._cancelled():
                    self.was_cancelled = True
                    break
                if not self._requestor_up():
                    for rest in self.items[done:]:
                        self._once(rest.sop_instance_uid, REQUESTOR_GONE)
                    done = len(self.items)
                    break
                following = self.items[done + 1] if done + 1 < len(self.items) else None
                self._one(done, item, following)
                self._maybe_pending(done + 1)
            else:
                done = len(self.items)
        finally:
            self.finish()
        return self.final(done)

    def _prepare(self, item: StoredInstance) -> Prepared | Exception:
        """What :func:`data_set_for` gives for ``item``, or the exception it raised."""
        try:
            return data_set_for(self.archive, item, self.contexts.get(item.sop_class_uid, []),
                                self.profile)
        except Exception as exc:
            return exc

    def _one(self, number: int, item: StoredInstance,
             following: StoredInstance | None) -> None:
        """Send ``item``; while its response is awaited, read ``following``'s file (one
        file read ahead: the receiver works meanwhile)."""
        uid = item.sop_instance_uid
        if self.link.gone is not None:
            self._fail(uid, RECEIVER_GONE, once=True)
            return
        ahead = self._ahead if self._ahead_of is item else None
        prepared = ahead if ahead is not None else self._prepare(item)
        self._ahead_of = self._ahead = None
        if isinstance(prepared, Withheld):
            self.withheld[uid] = str(prepared)
            self._fail(uid, f"withheld from a de-identified sending: {prepared}")
            return
        if isinstance(prepared, StorageError):  # unreadable, not convertible, or a profile
            self._fail(uid, str(prepared))  # whose table cannot be read: said, no traceback
            return
        if isinstance(prepared, Exception):  # a fault of ours: this one fails, not all
            self._fail(uid, "an unexpected error", exc_info=prepared)
            return
        context_id, chunks, sent_uid = prepared
        sent = [0]

        def counted() -> Iterator[bytes | memoryview]:  # what goes out: no File Meta
            for chunk in chunks:
                sent[0] += len(chunk)
                yield chunk
        data_set = counted()

        def read_ahead() -> None:
            if following is not None:
                self._ahead_of, self._ahead = following, self._prepare(following)
        message_id = (self.message_id + number) % 65535 + 1  # US, 1..65535
        originator, originator_id = self.originator or (None, None)
        command = dimse.c_store_rq(message_id, item.sop_class_uid, sent_uid, self.priority,
                                   originator, originator_id)
        try:
            code, _ = self.link.store(context_id, command, data_set, message_id,
                                      meanwhile=read_ahead)
        except ReceiverGone as exc:
            self._fail(uid, str(exc))
            return
        except (InstanceUnavailable, CannotConvert) as exc:  # the file failed halfway
            self._fail(uid, str(exc))
            return
        category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            metrics.count_bytes(self.service, "out", sent[0])
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            self.sent_uids.append(uid)
        if category == STATUS_SUCCESS:
            self.completed += 1
        elif category == STATUS_WARNING:
            self.warning += 1
        else:  # PS3.4 B.2.3: any other status is a failure
            self._fail(uid, f"the receiver answered {code:04X} ({meaning})")

    def _fail(self, uid: str, reason: str, once: bool = False,
              exc_info: bool | BaseException = False) -> None:
        self.failed_uids.append(uid)
        if once:
            self._once(uid, reason, counted=True)
        else:
            logger.error("%s sub-operation failed for SOP Instance %s: %s", self.service,
                         uid, reason, exc_info=exc_info)

    def _once(self, uid: str, reason: str, counted: bool = False) -> None:
        """A failure whose reason repeats: its first line only, the others counted."""
        if not counted:
            self.failed_uids.append(uid)
        if reason in self._repeated:
            self._repeated[reason] += 1
        else:
            self._repeated[reason] = 0
            logger.error("%s sub-operation failed for SOP Instance %s: %s", self.service,
                         uid, reason)

    def finish(self) -> None:
        """One line per repeated reason for the failures after the first."""
        for reason, count in self._repeated.items():
            if count:
                logger.error("%s: %d more sub-operation%s failed: %s", self.service, count,
                             "s" if count > 1 else "", reason)
        self._repeated.clear()

    def _maybe_pending(self, done: int) -> None:
        now = time.monotonic()
        if (len(self.items) > PENDING_EVERY_SUBOPERATION_UP_TO
                and now - self._last_pending < PENDING_INTERVAL):
            return
        self._last_pending = now
        self._pending(Final(status.PENDING, len(self.items) - done, self.completed,
                            len(self.failed_uids), self.warning))

    def final(self, done: int) -> Final:
        """PS3.4 C.4.2.1.5 and C.4.3.1.4: FE00 after a C-CANCEL (with what remains),
        Success when nothing failed or warned, A702 when every one failed, else B000."""
        failed = len(self.failed_uids)
        counts = dict(completed=self.completed, failed=failed, warning=self.warning,
                      failed_uids=list(self.failed_uids), sent_uids=list(self.sent_uids),
                      withheld=dict(self.withheld))
        if self.was_cancelled:
            return Final(status.CANCEL, remaining=len(self.items) - done, **counts)  # type: ignore[arg-type]
        if not failed and not self.warning:
            return Final(status.SUCCESS, **counts)  # type: ignore[arg-type]
        if failed == len(self.items):
            return Final(status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS, **counts)  # type: ignore[arg-type]
        return Final(status.SUBOPERATIONS_WITH_FAILURES, **counts)  # type: ignore[arg-type]


class MoveDestination:
    """The association a C-MOVE opens to its destination, a peer of the configuration
    (:class:`scp.engine.sender.StoreAssociation`), calling it by its AE title.

    When it cannot be established the move is answered A702 (Refused: Out of Resources -
    Unable to perform sub-operations, PS3.4 C.4.2.1.5), as dcm4chee answers, every
    instance failed, with the reason as Error Comment and in the log.
    """

    def __init__(self, peer: PeerConfig, calling: str, max_pdu_size: int,
                 acse_timeout: float | None, dimse_timeout: float | None,
                 service: str = "C-MOVE") -> None:
        self.service = service  # what the log calls the sending
        self.peer = peer
        self.profile = peer.deidentify  # "" or the profiles entry it gets copies by
        self.calling = calling
        self.max_pdu_size = peer.max_pdu_size or max_pdu_size
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout

    def open(self, items: list[StoredInstance]) -> StoreAssociation | Final:
        """The association, or the final response when it failed."""
        peer = self.peer
        try:
            return StoreAssociation.open(
                (peer.host, peer.port), calling=self.calling, called=peer.ae_title,
                contexts=proposed_contexts(items, peer), max_pdu=self.max_pdu_size,
                connect_timeout=self.acse_timeout, acse_timeout=self.acse_timeout,
                dimse_timeout=self.dimse_timeout)
        except AssociationFailed as exc:
            reason = f"{exc}: {peer.ae_title} at {peer.host}:{peer.port}"
            logger.error("%s to %s: %s (%s)", self.service, peer.ae_title, reason, exc.detail)
            return Final(status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS, failed=len(items),
                         comment=status.trim_comment(reason))


def run_send(archive: Archive, items: list[StoredInstance], destination: MoveDestination,
             progress: Callable[[int, int], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> Final:
    """``minipacs send``: the C-STORE sub-operations of a C-MOVE with no requestor, to
    ``destination`` (stored files as stored when it accepts their syntax, as for C-MOVE);
    ``progress(done, total)`` as they go; ``cancelled()`` asked before each instance
    stops it early (Cancel, with the instances not tried as ``remaining``: they are the
    last ones). The outcome's counts, as a C-MOVE's final response would give them."""
    if not items:
        return Final(status.SUCCESS)
    opened = destination.open(items)
    if isinstance(opened, Final):
        return opened
    total = len(items)

    def pending(counts: Final) -> None:
        if progress is not None:
            progress(total - (counts.remaining or 0), total)

    try:
        final = Retrieval("send", archive, items, opened.link, opened.accepted, 0,
                          pending=pending, cancelled=cancelled,
                          profile=destination.profile).run()
    finally:
        opened.release()
    if progress is not None:
        progress(total, total)
    return final


def send_to(config: Config, archive: Archive, peer: PeerConfig, items: list[StoredInstance],
            progress: Callable[[int, int], None] | None = None, service: str = "send",
            cancelled: Callable[[], bool] = lambda: False) -> Final:
    """``items`` sent to ``peer`` by C-STORE over an association calling it as ``config``'s
    AE (:func:`run_send`): ``minipacs send``, the page's send button, routing."""
    ae = config.ae
    return run_send(archive, items, MoveDestination(
        peer, ae.title, ae.max_pdu_size, ae.acse_timeout, ae.dimse_timeout, service=service),
        progress, cancelled)


class Requestor:
    """The association a C-GET or C-MOVE came on, as its retrieve sees it: where Pending
    responses go, whether a C-CANCEL came (PS3.4 C.4.2.3.1, C.4.3.3.1), whether the
    requestor is still there. Over its socket, lent by pynetdicom (``link``,
    :func:`scp.engine.reactor.leased`), or, when it could not be lent (a C-MOVE with an
    untested pynetdicom), through pynetdicom."""

    def __init__(self, event: Any, link: Link | None, command_field: int) -> None:
        self.event = event
        self.link = link
        self.command_field = command_field
        self.request = event.request
        self.context_id = int(event.context.context_id)
        self._cancelled = False

    def pending(self, counts: Final) -> None:
        req = self.request
        if self.link is not None:
            with contextlib.suppress(ReceiverGone):  # the next check says it is gone
                self.link.command(self.context_id, dimse.retrieve_pending(
                    self.command_field, int(req.MessageID or 0), str(req.AffectedSOPClassUID),
                    counts.status, counts.remaining or 0, counts.completed, counts.failed,
                    counts.warning))
            return
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        counts.rewrite(rsp, UID(str(self.event.context.transfer_syntax)))
        engine_retrieve.send_response(self.event.assoc, rsp, self.context_id)

    def cancelled(self) -> bool:
        """A C-CANCEL of this request came (remembered: pynetdicom forgets it once asked)."""
        if self.link is not None:
            with contextlib.suppress(ReceiverGone):
                self.link.poll()
            self._cancelled = self._cancelled or self.link.cancelled
        # one pynetdicom took in before the socket was lent (during the query, or while
        # the destination was being reached) is in its queue
        self._cancelled = self._cancelled or bool(self.event.is_cancelled)
        return self._cancelled

    def present(self) -> bool:
        """The requestor is there, and the server is not stopping (it wants the socket
        back to abort the association: the rest are then not sent)."""
        if self.link is not None:
            return self.link.present()
        return engine_retrieve.requestor_present(self.event.assoc)


def run_get(event: Any, archive: Archive, items: list[StoredInstance],
            profile: str = "") -> Final:
    """The sub-operations of a C-GET, over its own association (PS3.4 C.4.3.3), and the
    final response to give; de-identified by ``profile`` when the requestor is a peer
    with ``deidentify``."""
    if not items:
        return Final(status.SUCCESS)
    req = event.request
    with leased(event.assoc, cancel_of=int(req.MessageID or 0)) as link:
        if link is None:  # pynetdicom could not lend its socket: an untested version
            reason = "this server cannot send C-GET sub-operations (see its log at start)"
            logger.error("C-GET from %s: %s", event.assoc.requestor.ae_title, reason)
            return Final(status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS, failed=len(items),
                         comment=reason)
        requestor = Requestor(event, link, dimse.C_GET_RSP)
        final = Retrieval("C-GET", archive, items, link, get_contexts(event.assoc),
                          int(req.MessageID or 0), int(req.Priority or 0),
                          pending=requestor.pending, cancelled=requestor.cancelled,
                          profile=profile).run()
    if link.must_abort:  # a data set left half sent, no response in time: PS3.8 7.3
        logger.error("C-GET from %s: association aborted: %s",
                     event.assoc.requestor.ae_title, link.gone)
        event.assoc.abort()
    return final


def run_move(event: Any, archive: Archive, items: list[StoredInstance],
             destination: MoveDestination) -> Final:
    """The sub-operations of a C-MOVE, over an association of ours to ``destination``
    (PS3.4 C.4.2.3), and the final response to give."""
    if not items:
        return Final(status.SUCCESS)
    opened = destination.open(items)
    if isinstance(opened, Final):
        return opened
    req = event.request
    message_id = int(req.MessageID or 0)
    try:
        with leased(event.assoc, cancel_of=message_id) as link:
            if link is not None:  # a server that stops does not wait for the destination
                opened.link.wanted_back = link.wanted_back
            requestor = Requestor(event, link, dimse.C_MOVE_RSP)
            return Retrieval(
                "C-MOVE", archive, items, opened.link, opened.accepted, message_id,
                int(req.Priority or 0),
                originator=(event.assoc.requestor.ae_title, message_id),
                pending=requestor.pending, cancelled=requestor.cancelled,
                requestor_up=requestor.present, profile=destination.profile).run()
    finally:
        opened.release()
