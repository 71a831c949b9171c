"""Guards around pynetdicom 3.0's connection handling, for peers that send garbage or stall.

pynetdicom trusts the bytes on the wire more than a server facing a hospital network can.
Each guard below is bound to a pynetdicom event and touches only the one connection or
association of that event (instance attributes, never pynetdicom's classes); each is pinned
by a test in tests/test_hostile.py that fails without it:

- a read that stalls in the middle of a PDU: accepted sockets get ``ae.network_timeout`` as
  their timeout (pynetdicom reads only when ``select`` says data is there, so an idle
  association is not affected; a half-sent PDU ends the connection instead of blocking its
  thread forever);
- a PDU longer than we accept (a P-DATA-TF longer than the ``ae.max_pdu_size`` we announced,
  any other PDU over :data:`MAX_OTHER_PDU`) or of an unknown type is answered with an
  A-ABORT (PS3.8 9.3.8, source: service provider) and the connection closed, before its
  body is read: pynetdicom would read up to 4 GiB into memory, or, for an unknown type,
  read the next header out of the unread body and wait;
- a command set that cannot be decoded gets an A-ABORT (pynetdicom's decoder raises in the
  reactor thread, which dies, and the socket is closed without one);
- so does any PDU whose state machine action raises (a value pynetdicom's primitives
  refuse, an event invalid in the current state): the DUL thread would die, leaving the
  connection open;
- an A-ASSOCIATE-RQ with a presentation context that has no transfer syntax (PS3.8
  9.3.2.2 requires one) gets an A-ABORT (pynetdicom's negotiation raises IndexError and
  leaves the connection open, unanswered);
- a connection that closes before associating (a port probe, a health check, garbage
  already aborted) frees its association slot at once: pynetdicom's acceptor waits
  ``ae.acse_timeout`` for an A-ASSOCIATE-RQ that can no longer come, and counts against
  ``ae.max_associations`` meanwhile;
- on stop, connections that have not associated are closed, not aborted
  (:func:`close_unassociated`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import events as evt

logger = logging.getLogger(__name__)

# PS3.8 9.3.1, PDU types
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
              0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
P_DATA_TF = 0x04
# PS3.8 9.3.8, A-ABORT: source 2 (service provider) and its reasons
ABORT_SOURCE_PROVIDER = 0x02
UNRECOGNIZED_PDU = 0x01
INVALID_PDU_PARAMETER_VALUE = 0x06

MAX_OTHER_PDU = 1 << 20
"""Longest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing 128 contexts with
ten transfer syntaxes each is about 40 KB)."""
PDU_LENGTH_SLACK = 1024
"""Bytes a P-DATA-TF may exceed the announced maximum by: some senders count the PDV item
headers outside it."""


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason`` (PS3.8 Table 9-26)."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER, reason)


class Guards:
    """The guards of one server; its ``handlers`` are bound to every association."""

    def __init__(self, network_timeout: float | None, max_pdu_size: int) -> None:
        self.network_timeout = network_timeout
        self.max_pdu_size = max_pdu_size

    def handlers(self) -> list[tuple[evt.InterventionEvent | evt.NotificationEvent,
                                     Callable[..., Any]]]:
        return [
            (evt.EVT_CONN_OPEN, self.handle_conn_open),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
            (evt.EVT_REQUESTED, self.handle_requested),
        ]

    def handle_conn_open(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: the socket timeout, the PDU reader and the command decoder."""
        assoc = event.assoc
        transport = assoc.dul.socket
        if transport is None or transport.socket is None:  # pragma: no cover - closed already
            return
        if self.network_timeout and transport.socket.gettimeout() is None:
            # TLS sockets already have ae.acse_timeout, from scp/tls.py
            transport.socket.settimeout(self.network_timeout)
        peer = _peer(event)
        transport.recv = _PDUReader(transport, self.max_pdu_size, peer)  # type: ignore[method-assign]
        dimse = assoc.dimse
        dimse.receive_primitive = _DecodeGuard(  # type: ignore[method-assign]
            dimse.receive_primitive, assoc, peer)
        machine = assoc.dul.state_machine
        machine.do_action = _ActionGuard(  # type: ignore[method-assign]
            machine.do_action, assoc, peer)

    def handle_conn_close(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: end the acceptor's wait for an A-ASSOCIATE-RQ that cannot come.

        pynetdicom's acceptor blocks on the DUL's queue for ``acse_timeout``; ``None`` on
        that queue is what it gets when the wait times out, and it then ends the
        association as for a timeout. Only when nothing is queued and no request came."""
        assoc = event.assoc
        if _awaiting_request(assoc) and assoc.dul.to_user_queue.empty():
            cast(Any, assoc.dul.to_user_queue).put(None)  # see the docstring

    def handle_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: abort a request with a presentation context that proposes no
        transfer syntax (PS3.8 9.3.2.2: one or more Transfer Syntax sub-items)."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        contexts = request.presentation_context_definition_list if request else []
        empty = [c.context_id for c in contexts if not c.transfer_syntax]
        if not empty:
            return
        logger.warning("association from %s aborted: presentation context %s proposes no "
                       "transfer syntax", _peer(event), ", ".join(map(str, empty)))
        assoc.acse.send_abort(ABORT_SOURCE_PROVIDER)
        assoc.kill()


def close_unassociated(ae: Any, timeout: float = 2.0) -> None:
    """Close the connections that have not associated yet, before ``AE.shutdown()``: it
    aborts every association, and an A-ABORT request in state Sta2 (no A-ASSOCIATE-RQ yet)
    is an invalid event that kills the DUL thread (pynetdicom fsm.py InvalidEventError).
    A closed connection is Evt17 there, and :meth:`Guards.handle_conn_close` ends the wait."""
    waiting = [a for a in ae.active_associations if _awaiting_request(a)]
    for assoc in waiting:
        with contextlib.suppress(AttributeError, OSError):
            assoc.dul.socket.close()
    for assoc in waiting:
        assoc.join(timeout)


def _awaiting_request(assoc: Any) -> bool:
    """An association we accept that has not received its A-ASSOCIATE-RQ yet (Sta2)."""
    return bool(assoc.is_acceptor and not assoc.is_established
                and assoc.requestor.primitive is None)


class _PDUReader:
    """``AssociationSocket.recv`` of one connection, checking each PDU header it reads.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type, reserved, length), then
    ``recv(length)``; reads alternate between the two. A header with an unknown type or a
    length over the limit is answered with an A-ABORT and read as a closed connection (a
    short header), so pynetdicom ends the association quietly and never reads the body.
    """

    def __init__(self, transport: Any, max_pdu_size: int, peer: str) -> None:
        self._recv: Callable[[int], bytearray] = transport.recv
        self._transport = transport
        self._max_p_data = max_pdu_size + PDU_LENGTH_SLACK if max_pdu_size else 0
        self._peer = peer
        self._header_next = True

    def __call__(self, nr_bytes: int) -> bytearray:
        data = self._recv(nr_bytes)
        if not self._header_next:
            self._header_next = True
            return data
        if nr_bytes != 6 or len(data) != 6:
            return data  # a short header: pynetdicom reads it as the connection closing
        pdu_type, _, length = struct.unpack(">BBL", data)
        name = _PDU_NAMES.get(pdu_type)
        limit = self._max_p_data if pdu_type == P_DATA_TF else MAX_OTHER_PDU
        if name is None:
            why, reason = f"unknown PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU
        elif limit and length > limit:
            why, reason = (f"{name} of {length} bytes, over the {limit} we accept",
                           INVALID_PDU_PARAMETER_VALUE)
        else:
            self._header_next = False
            return data
        logger.warning("connection from %s aborted: %s", self._peer, why)
        with contextlib.suppress(AttributeError, OSError):  # gone already
            self._transport.socket.sendall(abort_pdu(reason))
        return bytearray()


class _Wrapped:
    """One pynetdicom method of one association, replaced by a guard that calls it."""

    def __init__(self, wrapped: Callable[[Any], None], assoc: Any, peer: str) -> None:
        self._wrapped = wrapped
        self._assoc = assoc
        self._peer = peer


class _DecodeGuard(_Wrapped):
    """``DIMSEServiceProvider.receive_primitive`` of one association: a P-DATA whose
    command set cannot be decoded aborts the association (pynetdicom's Evt19, "invalid
    PDU", as it does itself for a message it cannot convert) instead of killing the
    reactor thread."""

    def __call__(self, primitive: Any) -> None:
        try:
            self._wrapped(primitive)
        except Exception as exc:
            logger.warning("association with %s aborted: undecodable DIMSE message (%s: %s)",
                           self._peer, type(exc).__name__, exc)
            discard_spool(self._assoc.dimse.message)
            self._assoc.dimse.message = None
            self._assoc.dul.event_queue.put("Evt19")


def discard_spool(message: Any) -> None:
    """Close and remove the file pynetdicom spools a C-STORE data set to, when the message
    will never reach a handler (pynetdicom removes it only after the handler ran)."""
    spool = getattr(message, "_data_set_file", None)
    if spool is None:
        return
    with contextlib.suppress(OSError):  # a full disk fails the flush of close()
        spool.close()
    with contextlib.suppress(OSError):
        os.unlink(spool.name)


class _ActionGuard(_Wrapped):
    """``StateMachine.do_action`` of one association: an action that raises (pynetdicom
    converts a received PDU to a primitive inside the action, and raises on values it
    cannot represent, such as an A-ABORT source of 255 or an undecodable AE title) sends an
    A-ABORT and closes the connection, instead of killing the DUL thread and leaving the
    connection open. The state is unchanged (the action did not complete), so the closed
    connection's Evt17 takes the association down the standard way (PS3.8 9.2, AA-4/AA-5)."""

    def __call__(self, event: str) -> None:
        try:
            self._wrapped(event)
        except Exception as exc:
            logger.warning("association with %s aborted: %s in state %s (%s: %s)",
                           self._peer, event, self._assoc.dul.state_machine.current_state,
                           type(exc).__name__, exc)
            dul = self._assoc.dul
            transport = dul.socket
            with contextlib.suppress(AttributeError, OSError):
                transport.socket.sendall(abort_pdu(INVALID_PDU_PARAMETER_VALUE))
            with contextlib.suppress(AttributeError, OSError):
                transport.close()  # queues Evt17
            # pynetdicom's do_action has told the DUL loop to stop before raising, which
            # would leave Evt17 unprocessed (no EVT_CONN_CLOSE, no A-P-ABORT to the
            # association: its slot held until acse_timeout); let it run until Sta1
            dul._kill_thread = False


def _peer(event: evt.Event) -> str:
    address = event.assoc.requestor.address
    return f"{address}:{event.assoc.requestor.port}"
