"""The network side of retrieves: which transfer syntaxes a receiver took, what to propose
to a C-MOVE destination, and how the outcome of that association is reported.

pynetdicom runs the C-STORE sub-operations of C-GET (on the requesting association) and
C-MOVE (on an association it opens with the address our handler yields); this module
holds what our handlers need around that, so that the handlers stay short.

Each failed sub-operation is one log line of ours (:class:`SubOperations`), and pynetdicom's
lines about it are dropped by a filter on its loggers that :func:`install_log_filters`
installs when the server starts. That filter knows pynetdicom 3.0's logger names and
texts, so it is installed only for a tested pynetdicom (``scp.engine.versions.tested``):

- ``pynetdicom.service_class`` (``_get_scp``, ``_move_scp``): "C-STORE sub-operation
  failed." (WARNING) and the text of the exception ``send_c_store`` raised (ERROR):
  "No presentation context for '<stand-in SOP Class>' has been accepted by the peer ...",
  "The association with a peer SCP must be established before sending a C-STORE
  request", or, when no response came, "'Dataset' object has no attribute 'Status'";
- ``pynetdicom.association``: "No presentation context for '<stand-in SOP Class>' ..."
  (``_get_valid_context``), "Connection closed while waiting for DIMSE message" and
  "DIMSE timeout reached while waiting for message response" (``_handle_no_response``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import build_context
from pynetdicom import events as evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
)

from storage import StoredInstance

from . import status
from .config import PeerConfig
from .engine import reactor
from .engine.retrieve import (
    Responses,
    only_the_sender_reads,
    set_move_originator,
    transferring,
)
from .engine.sockets import disable_nagle
from .engine.versions import tested

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context IDs 1 to 255


def accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    """The transfer syntaxes ``assoc``'s peer accepted for receiving ``sop_class_uid`` from
    us (we are the C-STORE SCU on it, PS3.7 D.3.3.4 for C-GET's role selection)."""
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class_uid and cx.as_scu
    ]


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
    pairs = Counter((i.sop_class_uid, i.transfer_syntax_uid) for i in items)
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


# -- failed sub-operations ---------------------------------------------------------------

STAND_IN_SOP_CLASS = generate_uid(entropy_srcs=["minipacs", "unsendable"])
"""The SOP Class of :func:`stand_in`: one that no presentation context carries."""

C_STORE_RQ = 0x0001  # PS3.7 E.1-1, Command Field of a C-STORE request
C_STORE_RSP = 0x8001  # PS3.7 E.1-1, Command Field of a C-STORE response
A_ABORT = 0x07  # PS3.8 9.3.8, PDU type of an A-ABORT

RECEIVER_GONE = "the receiver is gone (it released or aborted the association)"
REQUESTOR_GONE = "not sent: the requestor is gone (it released or aborted the association)"


def stand_in(sop_instance_uid: str) -> Dataset:
    """What the C-GET / C-MOVE handler yields, as Pending, for an instance that cannot be
    sent (its file is missing, it cannot be converted, the receiver is gone).

    pynetdicom counts a sub-operation as failed, with its SOP Instance UID in the final
    FailedSOPInstanceUIDList (PS3.4 C.4.2.3.1, C.4.3.3.1), only when sending it fails: this
    data set names :data:`STAND_IN_SOP_CLASS`, so sending fails before any byte leaves
    and the receiver never sees it. Yield it inside :meth:`SubOperations.failing`, after
    :meth:`SubOperations.failed` (or :meth:`SubOperations.receiver_gone`) has said why.
    """
    ds = Dataset()
    ds.SOPClassUID = STAND_IN_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class SubOperations:
    """The C-STORE sub-operations of one C-GET or C-MOVE (``service``), and the one log
    line of each that fails: ``<service> sub-operation failed for SOP Instance <uid>:
    <reason>``, at ERROR.

    Its :meth:`handlers`, bound to the association that carries the sub-operations, learn
    which request went out for which instance (EVT_DIMSE_SENT, by Message ID), which were
    answered (EVT_DIMSE_RECV, by Message ID Being Responded To: a C-STORE response need
    not carry its Affected SOP Instance UID, PS3.7 Table 9.1-1, "U") and whether the
    receiver sent an A-ABORT (EVT_PDU_RECV). A failure is logged

    - by the handler, for what it could not send (the file, the conversion):
      :meth:`failed`, then it yields a :func:`stand_in` inside :meth:`failing`;
    - when the response arrives, for a refusal (any status but Success and Warning, PS3.4
      B.2.3): "the receiver answered A700 (Refused: Out of Resources)"; pynetdicom says
      it only at INFO;
    - when the handler resumes after yielding a data set (:meth:`sending`), for one that
      pynetdicom counted failed (``responses.failed`` went up) without a response: the
      receiver aborted the association, the connection closed, the DIMSE timeout
      passed, or the request was never sent. pynetdicom's lines about it ("C-STORE
      sub-operation failed." and the exception, see :func:`install_log_filters`) are
      dropped;
    - once for the receiver being gone (:meth:`receiver_gone`): its first instance gets a
      line, the others are counted and :meth:`finish` logs ``<service>: N more
      sub-operations failed: <reason>``, so that a large retrieve to a receiver that left
      does not log thousands of identical lines. So are the instances pynetdicom does
      not send when it ends a retrieve early (its requestor is gone).

    Sub-operations run one at a time, in the thread that runs the handler; the response
    handlers run in the association's DUL thread, which records a response before it
    hands it to the sender.
    """

    def __init__(self, service: str, responses: Responses,
                 receiving: Callable[[], bool]) -> None:
        self.service = service
        self._receiving = receiving
        self._responses = responses
        self._requests: dict[int, str] = {}  # unanswered: Message ID -> SOP Instance UID
        self._current: str | None = None  # the instance being sent (:meth:`sending`)
        self._request: int | None = None  # the Message ID of its request, once sent
        self._said = False  # its line is logged (the receiver refused it)
        self._aborted = False  # the receiver sent an A-ABORT
        self._timeout: float | None = None  # the DIMSE timeout of the receiver's association
        self._repeated: dict[str, int] = {}  # reason -> failures after its first line

    def receiving(self) -> bool:
        """Whether the receiver's association can still carry a sub-operation: as the
        ``receiving`` given says, and not once the receiver has sent an A-ABORT. That is
        known here (EVT_PDU_RECV) before pynetdicom's state machine takes the A-ABORT in
        and wakes the sender of the sub-operation in flight; asked right after, the
        association may still look established, and the next sub-operation would be
        sent and wait the whole DIMSE timeout for its response."""
        return not self._aborted and self._receiving()

    def handlers(self) -> list[tuple[Any, Callable[[evt.Event], None]]]:
        """Notification handlers for the association that carries the sub-operations."""
        return [(evt.EVT_DIMSE_SENT, self._on_sent), (evt.EVT_DIMSE_RECV, self._on_received),
                (evt.EVT_PDU_RECV, self._on_pdu)]

    def bind(self, assoc: Association) -> None:
        """Bind :meth:`handlers` to ``assoc`` (a C-GET's requesting association)."""
        for event, handler in self.handlers():
            assoc.bind(event, handler)

    def unbind(self, assoc: Association) -> None:
        """Undo :meth:`bind`."""
        for event, handler in self.handlers():
            assoc.unbind(event, handler)

    def failed(self, sop_instance_uid: str, reason: str, exc_info: bool = False) -> None:
        """The log line of a failed sub-operation, naming its instance and why."""
        logger.error("%s sub-operation failed for SOP Instance %s: %s", self.service,
                     sop_instance_uid, reason, exc_info=exc_info)

    def receiver_gone(self, sop_instance_uid: str) -> None:
        """``sop_instance_uid`` fails because the receiver is gone: the first such failure
        of the retrieve is logged, the others are counted for :meth:`finish`."""
        self._once(sop_instance_uid, RECEIVER_GONE)

    def _once(self, sop_instance_uid: str, reason: str) -> None:
        if reason in self._repeated:
            self._repeated[reason] += 1
        else:
            self._repeated[reason] = 0
            self.failed(sop_instance_uid, reason)

    def finish(self, unsent: Iterable[str] = ()) -> None:
        """The retrieve is over: one line per reason of :meth:`receiver_gone` for the
        failures after the first. ``unsent`` are the instances pynetdicom did not send
        because it stopped early: it does so when the requestor aborts or asks to release
        (``ServiceClass._wrap_handler``), and then those fail too, the first logged and
        the others counted. The requestor of a C-GET is its receiver."""
        reason = RECEIVER_GONE if self.service == "C-GET" else REQUESTOR_GONE
        for sop_instance_uid in unsent:
            self._once(sop_instance_uid, reason)
        for reason, count in self._repeated.items():
            if count:
                logger.error("%s: %d more sub-operation%s failed: %s", self.service, count,
                             "s" if count > 1 else "", reason)
        self._repeated.clear()

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Around the yield of a :func:`stand_in`: pynetdicom's lines about it failing to go
        are dropped (see :func:`install_log_filters`)."""
        with _quiet():
            yield

    @contextlib.contextmanager
    def sending(self, sop_instance_uid: str) -> Iterator[None]:
        """Around the yield of ``sop_instance_uid``'s data set: when the handler resumes,
        pynetdicom has sent it (or failed to) and counted the outcome in the Pending
        response it made; a failure nobody logged gets its line here, and pynetdicom's
        lines about it are dropped. Nothing is checked when the handler is closed at
        the yield instead (pynetdicom stopped, see :meth:`finish`)."""
        self._current, self._request, self._said = sop_instance_uid, None, False
        failed = self._responses.failed
        started = time.monotonic()
        try:
            with _quiet() as window:
                yield
        finally:
            self._current = None
        if self._responses.failed > failed and not self._said:
            self._unanswered(sop_instance_uid, window, time.monotonic() - started)

    def _unanswered(self, sop_instance_uid: str, window: _Window, elapsed: float) -> None:
        """pynetdicom counted ``sop_instance_uid`` failed and no line said why."""
        request = self._request
        if request is None:  # never sent: send_c_store raised first
            if not self.receiving():
                self.receiver_gone(sop_instance_uid)
            else:
                self.failed(sop_instance_uid, f"not sent: {window.reason or 'unknown error'}")
            return
        answered = self._requests.pop(request, None) is None
        if answered:  # pynetdicom failed on a response whose status is not a failure
            why = f"the response could not be read: {window.reason or 'unknown error'}"
        elif self._aborted:
            why = "the receiver aborted the association before answering"
        elif self._timeout is not None and elapsed >= self._timeout:
            why = (f"no response within the DIMSE timeout ({self._timeout:g} s); the"
                   " association was aborted")
        else:
            why = "the connection to the receiver closed before it answered"
        self.failed(sop_instance_uid, why)

    def _on_sent(self, event: evt.Event) -> None:
        command = event.message.command_set
        if command is None or command.get("CommandField") != C_STORE_RQ:
            return
        message_id = int(command.MessageID)
        sop_instance_uid = str(command.AffectedSOPInstanceUID)
        self._requests[message_id] = sop_instance_uid
        self._timeout = event.assoc.dimse_timeout
        if sop_instance_uid == self._current:
            self._request = message_id

    def _on_received(self, event: evt.Event) -> None:
        command = event.message.command_set
        if command is None or command.get("CommandField") != C_STORE_RSP:
            return
        message_id = command.get("MessageIDBeingRespondedTo")
        sop_instance_uid = self._requests.pop(int(message_id), None) if (
            message_id is not None) else None
        code = int(command.get("Status", -1))
        category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))
        if category in (STATUS_SUCCESS, STATUS_WARNING):
            return
        if sop_instance_uid is None:  # a response to no request we know of: its own word
            sop_instance_uid = str(command.get("AffectedSOPInstanceUID") or "") or (
                f"unknown (response to Message ID {message_id})")
        if sop_instance_uid == self._current:
            self._said = True
        self.failed(sop_instance_uid, f"the receiver answered {code:04X} ({meaning})")

    def _on_pdu(self, event: evt.Event) -> None:
        if event.pdu.pdu_type == A_ABORT:
            self._aborted = True


class _Window:
    """What pynetdicom said while it sent one sub-operation of ours (see :func:`_quiet`)."""

    def __init__(self) -> None:
        self.after_failure = False  # "C-STORE sub-operation failed." came; its reason next
        self.reason = ""  # that reason: the exception send_c_store raised


_windows = threading.local()  # .current: the _Window of this thread, if any


@contextlib.contextmanager
def _quiet() -> Iterator[_Window]:
    """While pynetdicom, in this thread, sends (or fails to send) one sub-operation: its
    lines about that failing are dropped (:class:`_QuietSubOperations`).

    The window is a thread-local, so it cannot outlive its thread nor hide another
    thread's lines; a generator closed from another thread (garbage collected) leaves
    that thread's window alone.
    """
    window = _Window()
    _windows.current = window
    try:
        yield window
    finally:
        if getattr(_windows, "current", None) is window:
            _windows.current = None


SUB_OPERATION_FAILED = "C-STORE sub-operation failed."
"""pynetdicom 3.0's WARNING when send_c_store raised (service_class.py ``_get_scp`` and
``_move_scp``), followed by an ERROR with the exception's text."""

_DROPPED_IN_A_WINDOW = frozenset({
    # the exception texts that follow SUB_OPERATION_FAILED for a sub-operation whose
    # receiver is gone: send_c_store returned an empty Dataset (no response) and the
    # Status was read from it, or it refused to send on an association no longer up
    "'Dataset' object has no attribute 'Status'",
    "The association with a peer SCP must be established before sending a C-STORE request",
    # association.py ``_handle_no_response``, before send_c_store returns no response
    "Connection closed while waiting for DIMSE message",
    "DIMSE timeout reached while waiting for message response",
})

_FILTERED_LOGGERS = ("pynetdicom.association", "pynetdicom.service_class")


class _QuietSubOperations(logging.Filter):
    """Drops pynetdicom's lines about a sub-operation failing, which we log once ourselves
    (:class:`SubOperations`): every line naming :data:`STAND_IN_SOP_CLASS`, and, in the
    thread that sends a sub-operation and while it does (:func:`_quiet`),
    :data:`SUB_OPERATION_FAILED` with the exception line after it (whose text it keeps,
    as the reason) and the lines of :data:`_DROPPED_IN_A_WINDOW`. Every other line passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if STAND_IN_SOP_CLASS in message:
            return False
        window: _Window | None = getattr(_windows, "current", None)
        if window is None:
            return True
        if message == SUB_OPERATION_FAILED:
            window.after_failure = True
            return False
        if window.after_failure and record.levelno >= logging.ERROR and (
                record.name == "pynetdicom.service_class"):
            window.after_failure = False
            window.reason = message
            return False
        return message not in _DROPPED_IN_A_WINDOW


_QUIET_SUB_OPERATIONS = _QuietSubOperations()


def install_log_filters() -> bool:
    """Install :class:`_QuietSubOperations` on pynetdicom's loggers (once; the server calls
    this when it starts). ``False`` when the installed versions are not tested ones, whose
    lines may differ: then nothing is installed, and pynetdicom's lines about failed
    sub-operations are logged beside ours."""
    if not tested(
            "scp/retrieve.py", "pynetdicom's lines about failed sub-operations are logged"
            " beside ours"):
        return False
    for name in _FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET_SUB_OPERATIONS)  # addFilter: once
    return True


class MoveDestination:
    """The association pynetdicom opens to a C-MOVE destination, as our handler sees it.

    :meth:`associate_kwargs` is what the handler yields to pynetdicom with the address: it
    proposes :func:`proposed_contexts` and registers :meth:`_capture`, so that the handler
    learns which syntaxes the destination accepted, and, when the association fails, why.

    pynetdicom answers A801 (Move Destination unknown) in two cases where PS3.4 C.4.2.1.5
    has a better status; :meth:`rewrite`, given to :class:`Responses`, corrects them: a
    destination that cannot be reached, though it is known (it is in ``peers``), gets
    A702 (Refused: Out of Resources - Unable to perform sub-operations), as dcm4chee
    answers; and a request we refuse before any sub-operation (an invalid identifier:
    A900, see :meth:`refuse`) is answered without opening an association to the
    destination, which pynetdicom would otherwise do first.
    """

    def __init__(
        self, peer: PeerConfig | None, max_pdu_size: int, requesting: Association
    ) -> None:
        self.peer = peer or PeerConfig()
        self.max_pdu_size = self.peer.max_pdu_size or max_pdu_size
        self.originator = requesting.requestor.ae_title
        self.assoc: Association | None = None
        self.answered = False  # an A-ASSOCIATE-AC or -RJ came back
        self.count = 0
        self.refusal: Dataset | None = None

    def associate_kwargs(self, items: list[StoredInstance],
                         handlers: Iterable[tuple[Any, Callable[[evt.Event], None]]] = (),
                         ) -> dict[str, Any]:
        """Keyword arguments for pynetdicom's ``AE.associate`` to the destination, which
        binds ``handlers`` too (:meth:`SubOperations.handlers`)."""
        self.count = len(items)
        # the reactor's wake-ups, as on the associations we accept: else the DUL thread
        # naps 1 ms between reads and every C-STORE-RSP waits for the next nap
        bound: list[Any] = [(evt.EVT_CONN_OPEN, disable_nagle),
                            (evt.EVT_CONN_OPEN, reactor.handle_conn_open),
                            (evt.EVT_CONN_CLOSE, reactor.handle_conn_close)]
        bound += [(e, self._capture) for e in (evt.EVT_ACCEPTED, evt.EVT_REJECTED,
                                               evt.EVT_ABORTED)]
        bound += handlers
        return {
            "contexts": proposed_contexts(items, self.peer),
            "max_pdu": self.max_pdu_size,
            "evt_handlers": bound,
        }

    def _capture(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        self.answered = self.answered or event.event in (evt.EVT_ACCEPTED, evt.EVT_REJECTED)
        if event.event is evt.EVT_ACCEPTED:
            set_move_originator(event.assoc, self.originator)
            only_the_sender_reads(event.assoc)

    def is_established(self) -> bool:
        """The association to the destination is (still) up."""
        return self.assoc is not None and transferring(self.assoc)

    def accepted(self, sop_class_uid: str) -> list[str]:
        """What the destination accepted for ``sop_class_uid`` (none before it answered)."""
        return [] if self.assoc is None else accepted_syntaxes(self.assoc, sop_class_uid)

    def failure(self) -> str:
        """Why the association to the destination was not established."""
        where = f"{self.peer.ae_title} at {self.peer.host}:{self.peer.port}"
        if self.assoc is None or not self.answered:
            why = "no answer"  # refused, unreachable, timed out: pynetdicom logs which
        elif self.assoc.is_rejected:
            why = "association rejected"
        elif not self.assoc.accepted_contexts:
            why = "no presentation context accepted"
        else:
            why = "association aborted"
        return f"{why}: {where}"

    def refuse(self, refusal: Dataset) -> None:
        """Answer the move with ``refusal`` (Status, ErrorComment) instead of A801: the
        handler then yields ``(None, None)``, so that no association is opened."""
        self.refusal = refusal

    def rewrite(self, primitive: Any) -> None:
        """Correct pynetdicom's A801 for this move (see above); other statuses pass."""
        if primitive.Status != status.MOVE_DESTINATION_UNKNOWN:
            return
        if self.refusal is not None:
            primitive.Status = int(self.refusal.Status)
            primitive.ErrorComment = self.refusal.get("ErrorComment")
            return
        reason = self.failure()
        logger.error("C-MOVE to %s: %s", self.peer.ae_title, reason)
        # PS3.4 C.4.2.1.5: A702, no sub-operation was performed
        primitive.Status = status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS
        primitive.ErrorComment = status.trim_comment(reason)
        primitive.NumberOfFailedSuboperations = self.count
        primitive.NumberOfCompletedSuboperations = 0
        primitive.NumberOfWarningSuboperations = 0
