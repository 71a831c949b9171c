"""Socket options pynetdicom does not set."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Any

from pynetdicom import events as evt
from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)


def disable_nagle(event: evt.Event) -> None:
    """Set TCP_NODELAY on a connection (bound to EVT_CONN_OPEN).

    pynetdicom leaves Nagle's algorithm on, so a response written in several pieces (a
    command, then its data set) waits for the peer's delayed acknowledgement: about 40 ms on
    every C-FIND. Measured with the benchmark: a one-PatientID C-FIND fell from 57 to 17.5 ms.
    On the association to a C-MOVE destination the same stall made every C-STORE
    sub-operation wait ~45 ms: 21 instead of 210 small instances/s.
    """
    try:
        sock: Any = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # another pynetdicom layout, or a closed socket
        logger.debug("cannot set TCP_NODELAY: %s", exc)


def quick_ack(event: evt.Event) -> None:
    """Acknowledge every read at once (TCP_QUICKACK, Linux), bound to EVT_CONN_OPEN.

    A sender that leaves Nagle's algorithm on (Debian's DCMTK tools unless TCP_NODELAY=1 is
    in their environment) holds its next small segment until the previous one is
    acknowledged, and Linux delays acknowledgements by up to 40 ms: one stall per C-STORE.
    Linux leaves quick-ack mode on its own after a while, so it is set again after every
    read of the connection (a setsockopt per read). Measured with bench/profile_ingest.py
    --nagle (bench/README.md).
    """
    try:
        transport: Any = event.assoc.dul.socket
        sock = transport.socket
        recv = transport.recv
    except AttributeError as exc:  # another pynetdicom layout
        logger.debug("cannot set TCP_QUICKACK: %s", exc)
        return
    if _QUICKACK is None or sock is None:
        return

    def recv_and_ack(nr_bytes: int) -> Any:
        data = recv(nr_bytes)
        ack_now(sock)
        return data

    transport.recv = recv_and_ack


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def ack_now(sock: Any) -> None:
    """Acknowledge what was just read at once (TCP_QUICKACK, Linux; see :func:`quick_ack`);
    nothing where the option does not exist or the socket is gone."""
    if _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def adopt_listeners(listeners: dict[int, socket.socket]) -> None:
    """In a worker process (``ae.workers``): pynetdicom's listener for a port in
    ``listeners`` takes that listening socket, made by the supervisor and shared by every
    worker, instead of binding its own. The kernel gives each connection to one worker's
    ``accept``: the socket is made non-blocking, so the others find nothing and go on
    (socketserver ignores the error). Closing it in one worker must not ``shutdown`` it, which
    would stop the others listening: pynetdicom's ``server_close`` does, so it is replaced
    for these sockets. Pinned like scp/engine/reactor.py (pynetdicom 3.0's ``server_bind`` and
    ``server_close``)."""
    adopted = {id(sock) for sock in listeners.values()}
    original_bind = ThreadedAssociationServer.server_bind
    original_close = ThreadedAssociationServer.server_close

    def server_bind(self: Any) -> None:
        shared = listeners.get(int(self.server_address[1]))
        if shared is None:
            original_bind(self)
            return
        self.socket.close()
        shared.setblocking(False)
        self.socket = shared
        self.server_address = shared.getsockname()

    def server_close(self: Any) -> None:
        if id(self.socket) in adopted:
            self.socket.close()
        else:
            original_close(self)

    ThreadedAssociationServer.server_bind = server_bind  # type: ignore[method-assign]
    ThreadedAssociationServer.server_close = server_close  # type: ignore[method-assign]
