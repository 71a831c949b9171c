"""Wake pynetdicom's reactor threads when there is work, instead of polling every 1 ms.

Each pynetdicom association runs two loops: the DUL reactor (socket and state machine) and
the association reactor (DIMSE messages), and each sleeps 1 ms whenever it found nothing to
do. A C-STORE crosses them twice (request in, response out), so a sender that waits for
each response (storescu, every modality) loses up to ~2 ms per instance to sleeping, and the
idle loops burn CPU that the handlers need. Measured with bench/profile_ingest.py (see
bench/README.md).

Here the two sleeps of *our* associations (registered from EVT_CONN_OPEN) become waits that
end as soon as there is work:

- the DUL reactor waits in ``select`` on its socket and on a wake-up pipe written whenever a
  primitive is queued for it, or an event is queued by another thread;
- the association reactor waits on an event set whenever a DIMSE message or an ACSE
  primitive is queued for it, or another thread asks it to pause (``send_c_store`` and
  ``release`` called from outside the reactor clear its ``_reactor_checkpoint`` and poll
  until it has stopped: without the wake-up each would wait out :data:`IDLE_WAIT`).

Both waits are capped at :data:`IDLE_WAIT`, so the timers those loops check (ARTIM, the
network idle timeout, a kill from another thread) keep a resolution of a few milliseconds.
"Ours" are the associations we accept (a C-MOVE's association to its destination is not
pynetdicom's at all: scp/engine/sender.py). Every other sleep in pynetdicom, and the loops
of associations nobody registered, are untouched: the modules' ``time`` is replaced by a
proxy that changes ``sleep`` only for a registered thread at the loop's own sleep.

The same registry makes pynetdicom's DIMSE decoder spool the C-STORE data sets of our
associations to a temporary file as they arrive (:class:`_SpoolingConfig`), the data set
alone, with no File Meta before it (:func:`_start_spool`): the handler hands storage the
whole file as it is (:func:`spooled`). It also lets a C-GET borrow the socket of its
association from the DUL thread for its sub-operations (:func:`leased`).

Pinned to pynetdicom 3.0 (the loops in dul.py ``run_reactor`` and association.py
``_run_reactor``, the ``_config`` lookup of dimse_messages.py ``decode_msg``), by the gate
of scp/engine/versions.py; with another version nothing is installed and a warning says so
(and data sets stay in memory).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pynetdicom import _config as _pynetdicom_config
from pynetdicom import association as _association
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom import dul as _dul
from pynetdicom import events as evt
from pynetdicom.transport import AssociationSocket

from storage import Spooled

from . import guards
from .receiver import StoreReceiver
from .sender import Link
from .versions import tested

logger = logging.getLogger(__name__)

IDLE_WAIT = 0.02
"""Longest wait of a reactor with nothing to do, in seconds."""
ASSOCIATION_LOOP_SLEEP = 0.001
"""The sleep at the top of pynetdicom 3.0's Association._run_reactor loop."""

_wakers: weakref.WeakKeyDictionary[threading.Thread, _Waker] = weakref.WeakKeyDictionary()
_installed = False


class _Waker:
    """The wake-ups of one association: its reactor's event, its DUL's pipe."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.event = threading.Event()
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self.closed = False
        self.reactor_waiting = False
        self._lock = threading.Lock()  # no write to a closed (and perhaps reused) fd
        self._lease = _IDLE  # the socket lent to a retrieve (see :func:`leased`)
        self.receiver: StoreReceiver | None = None  # set for associations we accept
        self._lease_changed = threading.Condition()

    def wake_dul(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # full pipe: already woken
            if not self.closed:
                os.write(self.write_fd, b"\0")

    def wake_association(self) -> None:
        self.event.set()

    def wait_association(self) -> None:
        """The association reactor's sleep: until a message or primitive is queued."""
        self.event.clear()
        # a DIMSE message waits for the reactor only on associations we accept: on a C-MOVE
        # sub-association the sender takes its responses (scp/retrieve.py), and one it never
        # takes (a duplicate response) must not make the reactor spin
        if self.assoc.is_acceptor and self.assoc.dimse.msg_queue.qsize():
            return
        if self.dul.to_user_queue.qsize():
            return
        if not self.assoc._reactor_checkpoint.is_set():
            return  # another thread asks the reactor to pause (see handle_conn_open)
        self.reactor_waiting = True
        try:
            self.event.wait(IDLE_WAIT)
        finally:
            self.reactor_waiting = False

    def settled(self) -> bool:
        """Nothing in flight: the reactor waits for work and the DUL has sent all it had."""
        return self.reactor_waiting and not self.dul.to_provider_queue.qsize()

    def wait_dul(self) -> None:
        """The DUL reactor's sleep: until the socket has data or work is queued; while the
        socket is lent (:func:`leased`), until it is given back.

        C-STORE requests the receiver takes are served here, and the wait goes on here
        afterwards: back in pynetdicom's loop, a request that arrived before its next sleep
        would be read by pynetdicom's per-PDU path (its ``_is_transport_event`` looks at
        the socket first), which happened to 10-15 % of the requests of four parallel
        senders, the GIL keeping this thread away from its sleep (bench/README.md).
        pynetdicom's loop runs again as soon as it has work: something queued, a kill, a
        wake-up, anything the receiver did not take (another message, bytes handed back,
        the end of the stream), or an association the receiver no longer reads (not in
        data transfer, where ARTIM runs). In data transfer with nothing to read, the wait
        goes on here, :data:`IDLE_WAIT` at a time: the network idle timeout is the
        association thread's to check."""
        dul = self.dul
        while True:
            if dul.to_provider_queue.qsize() or dul.event_queue.qsize() or dul._kill_thread:
                return
            if self._lease is _WANTED:
                self._lend()
                return
            if getattr(dul.socket, _UNREAD, None):
                return  # bytes a retrieve or the receiver handed back: the loop reads them
            transport = dul.socket
            sock = getattr(transport, "socket", None)
            if sock is not None and getattr(sock, "pending", None) and sock.pending():
                return  # TLS: bytes already decrypted, invisible to select
            watched = [self.read_fd] + ([sock] if sock is not None else [])
            try:
                ready, _, _ = select.select(watched, [], [], IDLE_WAIT)
            except (OSError, ValueError):  # closed under us: pynetdicom notices on its own
                time.sleep(ASSOCIATION_LOOP_SLEEP)
                return
            if self.read_fd in ready:
                with contextlib.suppress(OSError):
                    os.read(self.read_fd, 4096)
            receiver = self.receiver
            if receiver is None or self._lease is not _IDLE or not receiver.ready():
                return
            if not ready and sock is not None:
                continue  # data transfer, idle: pynetdicom's loop has nothing to do (no ARTIM)
            if sock not in ready:
                return  # a wake-up
            if not receiver.serve(sock):  # C-STORE requests, read and answered here
                return  # pynetdicom reads what the receiver did not take (an end included)

    # -- lending the socket to a retrieve (see leased) ---------------------------------

    def borrow(self, timeout: float) -> bool:
        """Ask the DUL thread for the socket; ``True`` once it has stopped reading it."""
        with self._lease_changed:
            self._lease = _WANTED
        self.wake_dul()
        with self._lease_changed:
            if self._lease_changed.wait_for(lambda: self._lease is _LENT, timeout):
                return True
            self._lease = _IDLE
            return False

    def give_back(self) -> None:
        with self._lease_changed:
            self._lease = _IDLE
            self._lease_changed.notify_all()

    def wanted_back(self) -> bool:
        """pynetdicom needs the socket: something is queued to send (an A-ABORT when the
        server stops), or the association is being killed."""
        dul = self.dul
        return bool(dul.to_provider_queue.qsize() or dul._kill_thread or self.closed)

    def _lend(self) -> None:
        """In the DUL thread: stop, reading nothing, until the socket is given back; then
        the network idle timer starts over (the lender read what came meanwhile)."""
        with self._lease_changed:
            if self._lease is not _WANTED:  # the borrower gave up meanwhile
                return
            self._lease = _LENT
            self._lease_changed.notify_all()
            while self._lease is _LENT and not self.dul._kill_thread:
                self._lease_changed.wait(IDLE_WAIT)
        self.dul._idle_timer.restart()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                for fd in (self.read_fd, self.write_fd):
                    with contextlib.suppress(OSError):
                        os.close(fd)


RECEIVE_C_STORE = True
"""Whether the DUL threads of associations we accept (plain TCP) read C-STORE requests
themselves (:mod:`scp.engine.receiver`) rather than through pynetdicom's per-PDU path."""

_IDLE, _WANTED, _LENT = "idle", "wanted", "lent"
_UNREAD = "_minipacs_unread"
"""The attribute of an AssociationSocket holding bytes a retrieve read and gave back."""
LEASE_WAIT = 5.0
"""Longest wait for a DUL thread to lend its socket (it is idle within IDLE_WAIT)."""


@contextlib.contextmanager
def leased(assoc: Any, cancel_of: int | None = None) -> Iterator[Link | None]:
    """The socket of ``assoc`` (one we accepted, in data transfer) for the C-STORE
    sub-operations of a C-GET: its DUL thread stops reading it until the block ends, and
    what the :class:`~scp.engine.sender.Link` read that was not ours is handed back to
    it, to be read first (an A-RELEASE-RQ, an A-ABORT, another request). ``None`` when it
    cannot be lent (not registered here, the DUL busy for :data:`LEASE_WAIT`).

    The block must not let pynetdicom send on ``assoc`` meanwhile; the link gives up
    (:data:`scp.engine.sender.INTERRUPTED`) when pynetdicom wants the socket back.
    """
    waker = _wakers.get(assoc)
    if waker is None or waker.closed or not waker.borrow(LEASE_WAIT):
        yield None
        return
    transport = assoc.dul.socket
    sock = transport.socket
    timeout = sock.gettimeout()
    link = Link(sock, int(assoc.requestor.maximum_length or 0), assoc.dimse_timeout,
                wanted_back=waker.wanted_back, cancel_of=cancel_of,
                max_receive=int(assoc.acceptor.maximum_length or 0))
    try:
        yield link
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)
        _unread(transport, link.leftover())
        waker.give_back()


def _unread(transport: Any, data: bytes) -> None:
    """Put ``data`` in front of what ``transport`` reads next (:func:`leased`,
    scp/engine/receiver.py): :func:`_recv_unread` serves it first, beneath every wrapper of
    ``recv`` (the guards' PDU checks see these bytes as they would have)."""
    if not data:
        return
    buffer = getattr(transport, _UNREAD, None)
    if buffer:
        buffer[:0] = data
    else:
        setattr(transport, _UNREAD, bytearray(data))


def _recv_unread(self: Any, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv, serving first the bytes given back by :func:`_unread`."""
    buffer = getattr(self, _UNREAD, None)
    if not buffer:
        return _recv(self, nr_bytes)
    out = bytearray(buffer[:nr_bytes])
    del buffer[:nr_bytes]
    if len(out) < nr_bytes:
        out += _recv(self, nr_bytes - len(out))
    return out


def _ready_or_unread(self: Any) -> bool:
    """AssociationSocket.ready, true too while bytes a retrieve gave back wait there."""
    return bool(getattr(self, _UNREAD, None)) or bool(_ready.fget(self))  # type: ignore[attr-defined]


_ready = AssociationSocket.ready
_recv = AssociationSocket.recv


class _TimeProxy:
    """The ``time`` module as one pynetdicom module sees it: ``sleep`` of a registered
    thread at its loop's own sleep becomes a wait for work; all else is ``time``'s."""

    def __init__(self, module: str) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if self._module == "dul" and (waker := _waker_of("dul")) is not None:
            waker.wait_dul()
        elif (self._module == "association" and seconds == ASSOCIATION_LOOP_SLEEP
              and (waker := _waker_of("assoc")) is not None):
            waker.wait_association()
        else:
            time.sleep(seconds)


def _waker_of(role: str) -> _Waker | None:
    """The waker of the running thread when it is the ``role`` ("dul" or "assoc") thread
    of one of our open associations."""
    thread = threading.current_thread()
    waker = _wakers.get(thread)
    if waker is None or waker.closed or getattr(waker, role) is not thread:
        return None
    return waker


class _SpoolingConfig:
    """pynetdicom's ``_config`` as its DIMSE decoder sees it: STORE_RECV_CHUNKED_DATASET is
    true in the DUL thread of our own associations, so the data set of every C-STORE they
    receive goes to a temporary file as it arrives (scp/handlers.py hands it to the archive
    as :class:`storage.Spooled`, :func:`spooled`: a 1 GB multi-frame is never in memory),
    and false elsewhere: the C-MOVE sub-associations we open (a request the destination
    sent there would be spooled with no handler to remove the file), other pynetdicom
    users."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_pynetdicom_config, name)

    @property
    def STORE_RECV_CHUNKED_DATASET(self) -> bool:  # noqa: N802  (pynetdicom's name)
        waker = _waker_of("dul")
        return waker is not None and bool(waker.assoc.is_acceptor)


def _no_file_meta(**_: Any) -> None:
    """In place of pynetdicom's ``create_file_meta``, which dimse_messages.py ``decode_msg``
    calls to build the spool's File Meta (it and ``write_file_meta_info`` cost ~1 ms per
    C-STORE, about as much as storing a small instance): the spool has none
    (:func:`_start_spool`)."""
    return None


def _start_spool(fp: Any, *_: Any, **__: Any) -> None:
    """In place of pydicom's ``write_file_meta_info``, which dimse_messages.py
    ``decode_msg`` calls on the new spool ``fp`` once the request's command set is
    complete, after the preamble and prefix it wrote there and before the data set's first
    fragment: the file is emptied, so that the data set is all it holds (:func:`spooled`)."""
    fp.seek(0)
    fp.truncate()


def spooled(event: evt.Event) -> Spooled | None:
    """The data set of ``event``'s C-STORE request where pynetdicom spooled it, or
    ``None`` when it is in memory (``event.encoded_dataset()``): the whole spool file,
    which holds the data set alone (:func:`_start_spool`), its syntax the context's."""
    try:
        path = event.dataset_path
    except AttributeError:  # pynetdicom spools nothing (this module is not installed)
        return None
    if path is None:
        return None
    return Spooled(Path(path), 0, os.stat(path).st_size)


def install() -> bool:
    """Put the proxies in pynetdicom's dul, association and dimse_messages modules (once);
    ``False`` when the installed versions are not tested ones, and nothing was changed."""
    global _installed
    if _installed:
        return True
    if not tested("scp/engine/reactor.py", "its reactors poll every 1 ms, and C-STORE data"
                  " sets are held in memory, not spooled"):
        return False
    _dul.time = _TimeProxy("dul")  # type: ignore[assignment]
    _association.time = _TimeProxy("association")  # type: ignore[assignment]
    _dimse_messages._config = _SpoolingConfig()  # type: ignore[assignment]
    _dimse_messages.create_file_meta = _no_file_meta  # type: ignore[assignment]
    _dimse_messages.write_file_meta_info = _start_spool
    AssociationSocket.ready = property(_ready_or_unread)  # type: ignore[method-assign,assignment]
    AssociationSocket.recv = _recv_unread  # type: ignore[method-assign]
    _association.Association._serve_request = _keep_awaited_response(  # type: ignore[method-assign]
        _association.Association._serve_request)
    _installed = True
    return True


def _keep_awaited_response(serve_request: Any) -> Any:
    """pynetdicom's requestor reactor can take a response off the DIMSE queue between its
    pause checkpoint and the ``send_*()`` that waits for it, and drop it as "unexpected"
    (pydicom/pynetdicom#875): the sender then waits for its DIMSE timeout. A response taken
    while a ``send_*()`` has paused the reactor (its checkpoint cleared) goes back to the
    front of the queue for that sender; anything else is served as pynetdicom would."""

    def _serve_request(self: Any, msg: Any, context_id: int) -> None:
        if (self.is_requestor and not msg.is_valid_request
                and not self._reactor_checkpoint.is_set()):
            waiting = self.dimse.msg_queue
            with waiting.mutex:
                waiting.queue.appendleft((context_id, msg))
                waiting.not_empty.notify()
            return
        serve_request(self, msg, context_id)

    return _serve_request


def handle_conn_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN: wake this association's reactors when work is queued for them."""
    if not _installed:
        return
    assoc = event.assoc
    waker = _Waker(assoc)
    dul = assoc.dul
    _wrap_put(dul.to_provider_queue, waker.wake_dul)
    _wrap_put(dul.event_queue, waker.wake_dul)
    _wrap_put(dul.to_user_queue, waker.wake_association)
    _wrap_put(assoc.dimse.msg_queue, waker.wake_association)
    # send_c_store / release from another thread (a C-MOVE handler sending on the
    # sub-association) pause the reactor and poll until it is paused: wake it at once
    checkpoint = assoc._reactor_checkpoint
    clear = checkpoint.clear

    def clear_and_wake() -> None:
        clear()
        waker.wake_association()

    checkpoint.clear = clear_and_wake  # type: ignore[method-assign]
    transport = dul.socket
    if (assoc.is_acceptor and RECEIVE_C_STORE
            and not isinstance(getattr(transport, "socket", None), ssl.SSLSocket)):
        waker.receiver = StoreReceiver(assoc, functools.partial(_unread, transport),
                                       assoc.network_timeout)
    _wakers[assoc] = waker
    _wakers[dul] = waker


def handle_conn_close(event: evt.Event) -> None:
    """EVT_CONN_CLOSE: back to plain sleeps, the pipe closed, and the spool of a C-STORE
    cut off by the closing removed (pynetdicom deletes a spool only once its handler ran:
    a data set that never arrived whole would stay in ``$TMPDIR``)."""
    waker = _wakers.pop(event.assoc, None)
    if waker is not None:
        _wakers.pop(waker.dul, None)
        waker.wake_association()
        waker.close()
    guards.discard_spool(getattr(getattr(event.assoc, "dimse", None), "message", None))


def settle(associations: list[Any], timeout: float) -> None:
    """Wait (up to ``timeout`` seconds) until each of ``associations`` has answered what it
    was serving: its reactor is back waiting for work and its DUL has sent every queued
    response. A server that stops aborts its associations next; an operation's handler
    returns before pynetdicom sends its response (for a C-STORE, after deleting the
    spooled data set), and an abort then would cut that response off."""
    wakers = [w for w in (_wakers.get(a) for a in associations) if w is not None]
    wait_until(lambda: all(w.closed or w.settled() for w in wakers), timeout, 0.005)


def wait_until(done: Callable[[], bool], timeout: float | None, step: float) -> None:
    """Sleep ``step`` at a time until ``done()`` or ``timeout`` seconds have passed (None:
    no limit), for states pynetdicom's queues and reactors give no signal of."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done() and (deadline is None or time.monotonic() < deadline):
        time.sleep(step)


def _wrap_put(queue: Any, wake: Any) -> None:
    put = queue.put

    def put_and_wake(*args: Any, **kwargs: Any) -> None:
        put(*args, **kwargs)
        wake()

    queue.put = put_and_wake
