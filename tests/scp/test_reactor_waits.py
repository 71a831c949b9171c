"""scp/engine/reactor.py's waits on the associations it serves, accepted or opened for a C-MOVE:
when the association reactor waits, when it returns at once, and where C-STORE data sets
are spooled. Unit tests on a stand-in association (the network paths are in
tests/test_move.py and the rest of the suite)."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from scp.engine import reactor


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
