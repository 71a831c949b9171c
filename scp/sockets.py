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
    option = getattr(socket, "TCP_QUICKACK", None)
    try:
        transport: Any = event.assoc.dul.socket
        sock = transport.socket
        recv = transport.recv
    except AttributeError as exc:  # another pynetdicom layout
        logger.debug("cannot set TCP_QUICKACK: %s", exc)
        return
    if option is None or sock is None:
        return

    def recv_and_ack(nr_bytes: int) -> Any:
        data = recv(nr_bytes)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, 1)
        return data

    transport.recv = recv_and_ack


def share_port() -> None:
    """Make this process's DICOM listeners bind with SO_REUSEPORT (Linux), so that the
    worker processes of one server (``ae.workers``) each listen on the same port and the
    kernel spreads new connections over them. pynetdicom's ``server_bind`` sets only
    SO_REUSEADDR; the option must be set on every socket before it binds. Called in
    worker processes only; pinned like scp/reactor.py."""
    original = ThreadedAssociationServer.server_bind

    def server_bind(self: Any) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        original(self)

    ThreadedAssociationServer.server_bind = server_bind  # type: ignore[method-assign]


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host``:``port`` with SO_REUSEPORT: it holds the
    port for workers to bind to with :func:`share_port` (port 0: the kernel picks one).
    A socket that does not listen receives no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
