"""What our C-GET and C-MOVE handlers need below pynetdicom's public API (scp/retrieve.py
and scp/handlers.py hold the rest): whether an association can still carry a
sub-operation (its DUL state), the filter on the responses of one retrieve (its DIMSE
``send_msg``), and, on the association to a C-MOVE destination, the Move Originator of each
sub-operation and a reactor that takes no C-STORE responses (its DIMSE ``get_msg``).
Pinned to pynetdicom 3.0, like the rest of scp/engine/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE

from ..status import PENDING_CODES


def transferring(assoc: Association) -> bool:
    """Whether ``assoc`` can still carry a sub-operation: established, and its DUL still in
    Sta6 (data transfer). An A-ABORT from the peer moves the DUL to Sta1 at once, while
    ``is_established`` turns false only when the association's reactor gets to it: in
    between, a sub-operation sent would wait the whole DIMSE timeout for its response."""
    return bool(assoc.is_established) and assoc.dul.state_machine.current_state == "Sta6"


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
        self.failed = 0
        """The failed sub-operations so far, as pynetdicom counts them: the Number of
        Failed Sub-operations of the last Pending response it made (sent or not)."""
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
        if ours and primitive.Status in PENDING_CODES:
            self.failed = primitive.NumberOfFailedSuboperations or 0
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


def only_the_sender_reads(assoc: Association) -> None:
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


def set_move_originator(assoc: Association, originator: str) -> None:
    """PS3.7 9.3.1.1: a C-STORE sub-operation's Move Originator AE Title is the AE that
    asked for the move; pynetdicom puts our own title there. Set it on the way out."""
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE):
            primitive.MoveOriginatorApplicationEntityTitle = originator
        send(primitive, context_id)

    dimse.send_msg = send_msg  # type: ignore[method-assign]
