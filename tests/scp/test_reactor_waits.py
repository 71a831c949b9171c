"""scp/engine/reactor.py's waits on the associations it serves, accepted or opened for a C-MOVE:
when the association reactor waits, when it returns at once, and where C-STORE data sets
are spooled. Unit tests on a stand-in association (the network paths are in
tests/test_move.py and the rest of the suite), and one on a real association: where the
DUL thread waits once the receiver has answered."""

from __future__ import annotations

import queue
import select
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from scp import status
from scp.engine import reactor
from scp.engine.receiver import StoreReceiver
from storage import Spooled
from tests.conftest import Running, associate, record_returns
from tests.factory import make_ds


class _Recording:
    """An event whose ``wait`` records that the reactor did wait (and returns at once)."""

    def __init__(self) -> None:
        self.waits = 0

    def clear(self) -> None:
        pass

    def set(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return False


def _waker(acceptor: bool, queued_messages: int = 0, paused: bool = False) -> Any:
    msg_queue: queue.Queue[Any] = queue.Queue()
    for _ in range(queued_messages):
        msg_queue.put((1, "a C-STORE-RSP nobody takes"))
    checkpoint = threading.Event()
    if not paused:
        checkpoint.set()
    dul = SimpleNamespace(to_user_queue=queue.Queue(), to_provider_queue=queue.Queue(),
                          event_queue=queue.Queue())
    assoc = SimpleNamespace(is_acceptor=acceptor, dul=dul, _reactor_checkpoint=checkpoint,
                            dimse=SimpleNamespace(msg_queue=msg_queue))
    waker = reactor._Waker(assoc)
    waker.event = _Recording()  # type: ignore[assignment]
    return waker


def test_an_accepted_association_with_a_message_queued_does_not_wait() -> None:
    waker = _waker(acceptor=True, queued_messages=1)
    waker.wait_association()
    assert waker.event.waits == 0
    waker.close()


def test_a_message_nobody_takes_on_a_move_sub_association_does_not_make_it_spin() -> None:
    # the sender takes its responses there (scp/retrieve.py _only_the_sender_reads): a stale
    # one left in the queue must not end every wait at once
    waker = _waker(acceptor=False, queued_messages=1)
    waker.wait_association()
    assert waker.event.waits == 1
    waker.close()


@pytest.mark.parametrize("acceptor", [True, False])
def test_a_pause_request_ends_the_wait(acceptor: bool) -> None:
    # send_c_store from another thread clears the checkpoint and polls until the reactor
    # has paused: the reactor must not sit out IDLE_WAIT first
    waker = _waker(acceptor=acceptor, paused=True)
    waker.wait_association()
    assert waker.event.waits == 0
    waker.close()


@pytest.mark.parametrize(("acceptor", "spooled"), [(True, True), (False, False)])
def test_only_associations_we_accept_spool_c_store_data_sets(
    acceptor: bool, spooled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a C-STORE request a move destination sent on our sub-association has no handler to
    # remove its spool file: it stays in memory there, as pynetdicom does by default
    waker = _waker(acceptor=acceptor)
    waker.dul = threading.current_thread()
    monkeypatch.setitem(reactor._wakers, threading.current_thread(), waker)
    assert reactor._SpoolingConfig().STORE_RECV_CHUNKED_DATASET is spooled
    waker.close()


def test_a_request_there_when_the_receiver_returns_is_the_receivers_too(
        start_server: Callable[..., Running], monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the receiver (scp/engine/receiver.py) has answered, the DUL thread goes on
    waiting in ``wait_dul``: a C-STORE request already there when ``serve`` returns is read
    by the receiver too, not by pynetdicom's per-PDU path, which looks at the socket before
    its loop sleeps again (and spools the data set: ``reactor.spooled`` gives a file)."""
    serve = StoreReceiver.serve
    lingered: list[bool] = []

    def serve_then_linger(self: StoreReceiver, sock: Any) -> bool:
        served = serve(self, sock)
        if handed and not lingered:  # once a store is answered: until the next is there
            lingered.append(bool(select.select([sock], [], [], 10)[0]))
        return served
    monkeypatch.setattr(StoreReceiver, "serve", serve_then_linger)
    handed: list[Spooled | None] = record_returns(monkeypatch, reactor, "spooled")
    running = start_server()
    assoc = associate(running)
    try:
        assert assoc.send_c_echo().Status == status.SUCCESS  # the association settled
        for _ in range(3):
            assert assoc.send_c_store(make_ds()).Status == status.SUCCESS
    finally:
        assoc.release()
    assert lingered == [True]
    # the second (there as the receiver returned) and the third (after the receiver's
    # wait) read by the receiver, in memory; the first may be pynetdicom's, which reads
    # again without sleeping after an action of its own (the C-ECHO response)
    assert len(handed) == 3 and handed[1:] == [None, None]
