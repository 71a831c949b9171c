"""The network side of retrieves: which transfer syntaxes a receiver took, what to propose
to a C-MOVE destination, and how the outcome of that association is reported.

pynetdicom runs the C-STORE sub-operations of C-GET (on the requesting association) and
C-MOVE (on an association it opens with the address our handler yields); this module
holds what our handlers need around that, so that the handlers stay short.

Each failed sub-operation is one log line of ours (:func:`sub_operation_failed`), and
pynetdicom's lines about it are dropped by a filter on its loggers that
:func:`install_log_filters` installs when the server starts. That filter knows
pynetdicom 3.0's logger names and texts, so it is installed only for a tested pynetdicom
(``reactor.tested_pynetdicom``):

- ``pynetdicom.service_class`` (``_get_scp``, ``_move_scp``): "C-STORE sub-operation
  failed." (WARNING) and the text of the exception ``send_c_store`` raised (ERROR):
  "No presentation context for '<stand-in SOP Class>' has been accepted by the peer ..."
  or "The association with a peer SCP must be established before sending a C-STORE
  request";
- ``pynetdicom.association``: "No presentation context for '<stand-in SOP Class>' ..."
  (``_get_valid_context``).
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
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import (
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
)

from storage import StoredInstance

from . import reactor, status
from .config import PeerConfig
from .sockets import disable_nagle

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd presentation context IDs 1 to 255


def transferring(assoc: Association) -> bool:
    """Whether ``assoc`` can still carry a sub-operation: established, and its DUL still in
    Sta6 (data transfer). An A-ABORT from the peer moves the DUL to Sta1 at once, while
    ``is_established`` turns false only when the association's reactor gets to it: in
    between, a sub-operation sent would wait the whole DIMSE timeout for its response."""
    return bool(assoc.is_established) and assoc.dul.state_machine.current_state == "Sta6"


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

C_STORE_RSP = 0x8001  # PS3.7 E.1-1, Command Field of a C-STORE response


def sub_operation_failed(service: str, sop_instance_uid: str, reason: str) -> None:
    """The one log line of a failed C-STORE sub-operation of a C-GET or C-MOVE
    (``service``), naming its instance and why it failed."""
    logger.error("%s sub-operation failed for SOP Instance %s: %s", service, sop_instance_uid,
                 reason)


def stand_in(sop_instance_uid: str) -> Dataset:
    """What the C-GET / C-MOVE handler yields, as Pending, for an instance that cannot be
    sent (its file is missing, it cannot be converted, the receiver is gone).

    pynetdicom counts a sub-operation as failed, with its SOP Instance UID in the final
    FailedSOPInstanceUIDList (PS3.4 C.4.2.3.1, C.4.3.3.1), only when sending it fails: this
    data set names :data:`STAND_IN_SOP_CLASS`, so sending fails before any byte leaves
    and the receiver never sees it. Yield it inside :func:`failing_on_purpose`, after
    :func:`sub_operation_failed` has said why.
    """
    ds = Dataset()
    ds.SOPClassUID = STAND_IN_SOP_CLASS
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


_windows = threading.local()  # .current: the window of this thread, if any


@contextlib.contextmanager
def failing_on_purpose() -> Iterator[None]:
    """While pynetdicom, in this thread, fails to send a :func:`stand_in` (the handler's
    generator is suspended at its yield): its lines about that failure are dropped.

    The window is a thread-local, so it cannot outlive its thread: a generator left
    suspended in it by a thread that ended cannot hide a line of a later thread that
    gets the same thread id. A generator closed from another thread (garbage collected)
    leaves that thread's own window alone.
    """
    window = object()
    _windows.current = window
    try:
        yield
    finally:
        if getattr(_windows, "current", None) is window:
            _windows.current = None


SUB_OPERATION_FAILED = "C-STORE sub-operation failed."
"""pynetdicom 3.0's WARNING when send_c_store raised (service_class.py ``_get_scp`` and
``_move_scp``), followed by an ERROR with the exception's text."""

_DROPPED_IN_A_WINDOW = frozenset({
    SUB_OPERATION_FAILED,
    "The association with a peer SCP must be established before sending a C-STORE request",
})

_FILTERED_LOGGERS = ("pynetdicom.association", "pynetdicom.service_class")


class _QuietStandIns(logging.Filter):
    """Drops pynetdicom's lines about a :func:`stand_in` failing to go, which we log once
    ourselves (:func:`sub_operation_failed`): every line naming
    :data:`STAND_IN_SOP_CLASS`, and, in the thread that sends a stand-in and while it
    does (:func:`failing_on_purpose`), the lines of :data:`_DROPPED_IN_A_WINDOW`. Every
    other line passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if STAND_IN_SOP_CLASS in message:
            return False
        window = getattr(_windows, "current", None)
        return window is None or message not in _DROPPED_IN_A_WINDOW


_QUIET_STAND_INS = _QuietStandIns()


def install_log_filters() -> bool:
    """Install :class:`_QuietStandIns` on pynetdicom's loggers (once; the server calls
    this when it starts). ``False`` when this pynetdicom is not a tested version, whose
    lines may differ: then nothing is installed, and pynetdicom's lines about failed
    sub-operations are logged beside ours."""
    if not reactor.tested_pynetdicom(
            "scp/retrieve.py", "pynetdicom's lines about failed sub-operations are logged"
            " beside ours"):
        return False
    for name in _FILTERED_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET_STAND_INS)  # addFilter: once
    return True


def log_refused_store(event: evt.Event, service: str) -> None:
    """EVT_DIMSE_RECV, on the association that carries the C-STORE sub-operations of a
    ``service`` (C-GET or C-MOVE): a C-STORE response whose status pynetdicom counts as a
    failure (any but Success and Warning, PS3.4 B.2.3) is that sub-operation's log line
    (pynetdicom's own is at INFO)."""
    command = event.message.command_set
    if command is None or command.get("CommandField") != C_STORE_RSP:
        return
    code = int(command.get("Status", -1))
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return
    sub_operation_failed(service, str(command.get("AffectedSOPInstanceUID", "")),
                         f"the receiver answered {code:04X} ({meaning})")


PENDING_EVERY_SUBOPERATION_UP_TO = 1000
"""Retrieves of up to this many instances get a Pending response after every one."""
PENDING_INTERVAL = 0.5
"""Larger ones get one Pending response per this many seconds at most."""


class Responses:
    """The responses of one C-MOVE or C-GET on their way out of pynetdicom.

    pynetdicom sends a Pending response after every sub-operation and answers A801 itself
    in cases where we want another status. While installed (:meth:`install`, until the
    final response or :meth:`restore`), this wraps the requesting association's DIMSE
    ``send_msg`` and, for this request's responses only:

    - lets every Pending through for retrieves of up to
      :data:`PENDING_EVERY_SUBOPERATION_UP_TO` instances, and at most one per
      :data:`PENDING_INTERVAL` seconds for larger ones (PS3.4 C.4.2.3.1 and C.4.3.3.1:
      Pending responses are optional), so that a large retrieve does not spend its time
      reporting;
    - hands the final response to ``rewrite`` (see :class:`MoveDestination`);
    - sends the final response without a data set when no sub-operation failed: PS3.4
      C.4.2.1.4.2 and C.4.3.1.3.2, "If no C-STORE sub-operation failed, Failed SOP
      Instance UID List (0008,0058) is absent and therefore no Data Set shall be sent".
      pynetdicom adds an empty list to a refusal (A900, 0124, ...), a cancel or a
      warning; DCMTK's ``getscu`` never reads a C-GET response's data set, finds it
      waiting when it releases the association, and aborts ("Association Release
      Failed: 0006:0316 DUL P-Data PDU arrived"). It does so after a B000 or A702 with
      failed instances too, which must carry their list: that one is DCMTK's to fix.

    Each association serves one request at a time in its own thread, so nothing else is
    sent on it meanwhile. Tests pin this against the pynetdicom version we ship with.
    """

    def __init__(
        self,
        requesting: Association,
        request: C_MOVE | C_GET,
        rewrite: Callable[[Any], None] | None = None,
    ) -> None:
        self.requesting = requesting
        self.kind = type(request)
        self.message_id = request.MessageID
        self.rewrite = rewrite
        self.total = 0
        self._last_pending = -PENDING_INTERVAL
        self._original: Callable[[Any, int], None] | None = None

    def install(self) -> None:
        """Start filtering this request's responses."""
        dimse = self.requesting.dimse
        self._original = dimse.send_msg
        dimse.send_msg = self._send  # type: ignore[method-assign]

    def restore(self) -> None:
        """Put the association's ``send_msg`` back (idempotent)."""
        original, self._original = self._original, None
        if original is not None:
            self.requesting.dimse.send_msg = original  # type: ignore[method-assign, assignment]

    def _send(self, primitive: Any, context_id: int) -> None:
        original = self._original
        assert original is not None  # we are installed
        ours = isinstance(primitive, self.kind) and (
            primitive.MessageIDBeingRespondedTo == self.message_id)
        if ours and primitive.Status in status.PENDING_CODES:
            now = time.monotonic()
            if (self.total > PENDING_EVERY_SUBOPERATION_UP_TO
                    and now - self._last_pending < PENDING_INTERVAL):
                return
            self._last_pending = now
        elif ours:
            if self.rewrite is not None:
                self.rewrite(primitive)
            if not primitive.NumberOfFailedSuboperations:
                primitive.Identifier = None
            self.restore()
        original(primitive, context_id)


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

    def associate_kwargs(self, items: list[StoredInstance]) -> dict[str, Any]:
        """Keyword arguments for pynetdicom's ``AE.associate`` to the destination."""
        self.count = len(items)
        # the reactor's wake-ups, as on the associations we accept: else the DUL thread
        # naps 1 ms between reads and every C-STORE-RSP waits for the next nap
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, disable_nagle),
                               (evt.EVT_CONN_OPEN, reactor.handle_conn_open),
                               (evt.EVT_CONN_CLOSE, reactor.handle_conn_close)]
        handlers += [(e, self._capture) for e in (evt.EVT_ACCEPTED, evt.EVT_REJECTED,
                                                  evt.EVT_ABORTED)]
        handlers.append((evt.EVT_DIMSE_RECV, log_refused_store, ["C-MOVE"]))
        return {
            "contexts": proposed_contexts(items, self.peer),
            "max_pdu": self.max_pdu_size,
            "evt_handlers": handlers,
        }

    def _capture(self, event: evt.Event) -> None:
        self.assoc = event.assoc
        self.answered = self.answered or event.event in (evt.EVT_ACCEPTED, evt.EVT_REJECTED)
        if event.event is evt.EVT_ACCEPTED:
            self._set_move_originator(event.assoc)
            self._only_the_sender_reads(event.assoc)

    @staticmethod
    def _only_the_sender_reads(assoc: Association) -> None:
        """Keep the association's reactor thread from taking C-STORE responses.

        pynetdicom 3.0's ``send_c_store`` pauses the association's reactor before it sends
        and then waits for the response, but the pause has a race: the reactor may take
        the response off the queue (and drop it as an "unexpected C-STORE service
        message"), so the sub-operation waits for the DIMSE timeout and the association
        is lost. The benchmark hit it once in 10,000 sub-operations. The reactor reads
        without blocking and ``send_c_store`` with blocking, and a Storage SCP sends us no
        requests here, so non-blocking reads get nothing on this association.
        """
        dimse = assoc.dimse
        get = dimse.get_msg

        def get_msg(block: bool = False) -> Any:
            return get(block=True) if block else (None, None)

        dimse.get_msg = get_msg  # type: ignore[method-assign]

    def _set_move_originator(self, assoc: Association) -> None:
        """PS3.7 9.3.1.1: a C-STORE sub-operation's Move Originator AE Title is the AE that
        asked for the move; pynetdicom puts our own title there. Set it on the way out."""
        dimse = assoc.dimse
        send = dimse.send_msg
        originator = self.originator

        def send_msg(primitive: Any, context_id: int) -> None:
            if isinstance(primitive, C_STORE):
                primitive.MoveOriginatorApplicationEntityTitle = originator
            send(primitive, context_id)

        dimse.send_msg = send_msg  # type: ignore[method-assign]

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
