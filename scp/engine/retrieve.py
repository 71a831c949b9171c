"""What our C-GET and C-MOVE handlers need below pynetdicom's public API (scp/retrieve.py
and scp/handlers.py hold the rest): the final response of a retrieve, rewritten on its way
out (the DIMSE ``send_msg`` of the requesting association), and pynetdicom's own line
about the A801 it makes for it dropped. The sub-operations themselves go through
scp/engine/sender.py. Pinned to pynetdicom 3.0, like the rest of scp/engine/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from ..status import PENDING_CODES

UNKNOWN_MOVE_DESTINATION = "Unknown Move Destination: "
"""pynetdicom 3.0's ERROR (service_class.py ``_move_scp``) when the handler yields no
destination, which ours always does once the sub-operations are over: the final response
it then makes is rewritten (:class:`Responses`), and the line would be wrong."""


def requestor_present(assoc: Association) -> bool:
    """The requestor of a C-MOVE is still there: established, and no A-ABORT or
    A-RELEASE-RQ of its waits in the queue of the association's reactor, which runs our
    handler and so takes neither until the move is over (pynetdicom's
    ``ServiceClass._wrap_handler`` asks the same between two sub-operations)."""
    acse = assoc.acse
    return bool(assoc.is_established) and not (
        acse.is_aborted() or acse.is_release_requested())


def association_gone(assoc: Association) -> bool:
    """The association ended, or an A-ABORT of its peer waits in its reactor's queue (which
    the thread running a handler does not take in until the handler returns); unlike
    :func:`requestor_present` it takes no A-RELEASE-RQ out of the queue."""
    return not assoc.is_established or bool(assoc.acse.is_aborted())


def send_response(assoc: Association, primitive: C_GET | C_MOVE, context_id: int) -> None:
    """Send a (Pending) C-GET or C-MOVE response on the requesting association, through
    pynetdicom's DIMSE provider and DUL thread, as its service class would."""
    assoc.dimse.send_msg(primitive, context_id)


class _NoUnknownDestination(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str)
                    and record.msg.startswith(UNKNOWN_MOVE_DESTINATION))


_FILTER = _NoUnknownDestination()


def install() -> None:
    """Drop pynetdicom's :data:`UNKNOWN_MOVE_DESTINATION` lines (once; the handler logs an
    unknown destination itself)."""
    logging.getLogger("pynetdicom.service_class").addFilter(_FILTER)


class Responses:
    """The responses of one C-MOVE or C-GET on their way out of pynetdicom.

    Our handlers run the sub-operations themselves (scp/retrieve.py) and then let
    pynetdicom send the final response: for a C-MOVE the A801 it answers to a handler that
    names no destination, for a C-GET a Success. While installed (:meth:`install`, until
    the final response or :meth:`restore`), this wraps the requesting association's DIMSE
    ``send_msg`` and, for this request's responses only:

    - hands the final response to ``rewrite``, which gives it the outcome
      (:class:`scp.retrieve.Final`);
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
        if ours and primitive.Status not in PENDING_CODES:  # the final response
            if self.rewrite is not None:
                self.rewrite(primitive)
            if not primitive.NumberOfFailedSuboperations:
                primitive.Identifier = None
            self.restore()
        original(primitive, context_id)
