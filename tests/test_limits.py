"""Limits, each from the configuration: concurrent associations, PDU size, timeouts for an
idle or stalled peer, instance size and the free-disk watermark."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from scp import status
from tests.conftest import STORE_LOCKS, Running, associate, client_ae
from tests.factory import make_ds


def files_in(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "files").rglob("*") if p.is_file() and p.name not in STORE_LOCKS]


def test_associations_beyond_the_maximum_are_rejected_transient(
        start_server: Callable[..., Running]) -> None:
    running = start_server(**{"ae.max_associations": 2})
    first, second = associate(running), associate(running)
    third = client_ae().associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert third.is_rejected
    rsp = third.acceptor.primitive
    # PS3.8 9.3.4: rejected-transient, DICOM UL service-provider (presentation), local limit
    assert (rsp.result, rsp.result_source, rsp.diagnostic) == (0x02, 0x03, 0x02)
    first.release()
    deadline = time.monotonic() + 30  # the slot frees once the server has seen the release
    while time.monotonic() < deadline:
        again = client_ae().associate("127.0.0.1", running.port, ae_title=running.ae_title)
        if again.is_established:
            again.release()
            break
        time.sleep(0.05)
    else:
        raise AssertionError("a released association's slot was not given back")
    second.release()


def test_we_announce_our_maximum_pdu_size(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"ae.max_pdu_size": 16384})
    assoc = associate(running)
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()


def test_an_idle_association_is_dropped(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"ae.network_timeout": 1.0})
    assoc = associate(running)
    deadline = time.monotonic() + 30
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established  # the server gave up on the silent peer


def test_a_peer_that_connects_and_says_nothing_is_dropped(
        start_server: Callable[..., Running]) -> None:
    running = start_server(**{"ae.acse_timeout": 1.0})
    with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, without an A-ASSOCIATE-RQ
        assert time.monotonic() - started < 20
    assoc = associate(running)  # and it still serves the others
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_an_instance_over_the_size_limit_is_refused(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"storage.max_instance_mb": 1})
    assoc = associate(running)
    big = make_ds(Rows=1024, Columns=1024, BitsAllocated=16, BitsStored=16, HighBit=15,
                  PixelData=bytes(2 * 1024 * 1024))
    rsp = assoc.send_c_store(big)
    small = assoc.send_c_store(make_ds())
    assoc.release()
    assert rsp.Status == status.STORE_OUT_OF_RESOURCES
    assert "exceeds storage.max_instance_mb" in rsp.ErrorComment
    assert small.Status == status.SUCCESS
    assert len(files_in(running.data_dir)) == 1  # only the small one


def test_below_the_free_disk_watermark_nothing_is_written(
        start_server: Callable[..., Running]) -> None:
    running = start_server(**{"storage.min_free_disk_mb": 1024 ** 3})  # a petabyte
    assoc = associate(running)
    rsp = assoc.send_c_store(make_ds())
    assoc.release()
    assert rsp.Status == status.STORE_OUT_OF_RESOURCES
    assert rsp.ErrorComment.startswith("disk almost full")
    assert files_in(running.data_dir) == []
