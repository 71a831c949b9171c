"""Auto-routing (issue 16, item 3) end to end: instances stored from a modality go on to
DCMTK ``storescp`` peers through the outbox kept in the index, byte for byte as stored; a
dead destination holds back no other; a server killed with SIGKILL, before and while it
sends, sends everything after a restart (at least once); failed items are retried or
dropped with ``minipacs queue``; a route with ``stable_seconds`` waits for its study."""

from __future__ import annotations

import collections
import contextlib
import datetime
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from scp import status
from storage import Selection, open_archive
from tests.conftest import Running, dcmtk_tool, free_port, reserved_port
from tests.factory import encode, file_parts, make_ds, uid
from tests.test_cli import REPO, minipacs_command, wait_until_echo

TIMEOUT = 60.0


def modality(title: str) -> AE:
    """A modality whose calling AE title is ``title``."""
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    return ae


def store_from(title: str, port: int, datasets: list[Dataset]) -> None:
    assoc = modality(title).associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == status.SUCCESS
    finally:
        assoc.release()


@contextlib.contextmanager
def storescp(ae_title: str, port: int, out: Path | None = None, nagle: bool = False
             ) -> Iterator[None]:
    """DCMTK's storescp as ``ae_title`` on ``port``, writing every instance it receives to
    ``out`` under a name of its own (``+uf``: a second copy is a second file), or keeping
    none when ``out`` is ``None``. ``nagle``: without ``TCP_NODELAY`` in its environment, so
    with Nagle's algorithm on (Debian's DCMTK's default)."""
    tool = dcmtk_tool("storescp")
    if tool is None:
        message = "DCMTK is not installed: install the Debian package 'dcmtk'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if not nagle:
        env["TCP_NODELAY"] = "1"
    if out is not None:
        out.mkdir(exist_ok=True)
    keep = ["-od", str(out), "+uf", "+xa"] if out is not None else ["--ignore"]
    proc = subprocess.Popen([tool, "-aet", ae_title, *keep, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        echo = AE(ae_title="PROBE")
        echo.acse_timeout = echo.network_timeout = 2
        echo.add_requested_context("1.2.840.10008.1.1")
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, "storescp exited"
            assoc = echo.associate("127.0.0.1", port, ae_title=ae_title)
            if assoc.is_established:
                assoc.release()
                break
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def received(out: Path) -> collections.Counter[str]:
    """How many copies of each SOP Instance storescp wrote (files still being written are
    left for the next look)."""
    copies: collections.Counter[str] = collections.Counter()
    for path in out.iterdir() if out.exists() else ():
        try:
            copies[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
        except (InvalidDicomError, OSError, EOFError, AttributeError, ValueError):
            continue
    return copies


def wait_for(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ct(**keywords: Any) -> Dataset:
    return make_ds(Modality="CT", SOPClassUID=CTImageStorage, **keywords)


def queue_of(running: Running) -> dict[str, tuple[int, int]]:
    return {q.peer: (q.waiting, q.failed) for q in running.archive.routing_queue()}


# -- in-process server ------------------------------------------------------------------

def test_matching_instances_go_to_each_peer_and_a_dead_one_holds_back_none(
        start_server: Callable[..., Running], tmp_path: Path, held_port: int) -> None:
    out = tmp_path / "ai"
    dead_port = held_port  # nothing listens there for the whole test
    with reserved_port() as ai_port:
        running = start_server(
            peers=[{"ae_title": "AINODE", "host": "127.0.0.1", "port": ai_port},
                   {"ae_title": "DEAD", "host": "127.0.0.1", "port": dead_port}],
            routes=[{"name": "ct-to-ai", "match": {"Modality": "CT",
                                                   "CallingAETitle": "SCANNER*"},
                     "to": ["DEAD", "AINODE"]}],
            **{"routing.retry_seconds": 2.0})
    if True:  # the port is free again: storescp may take it
        with storescp("AINODE", ai_port, out):
            scanned = [ct() for _ in range(12)]
            store_from("SCANNER1", running.port, scanned)
            store_from("SCANNER1", running.port, [make_ds(Modality="MR",
                                                          SOPClassUID=MRImageStorage)])
            store_from("WARD", running.port, [ct()])  # not from a scanner
            wanted = {str(ds.SOPInstanceUID): ds for ds in scanned}
            wait_for("the CTs at AINODE", lambda: set(received(out)) == set(wanted))
            wait_for("AINODE's queue to empty", lambda: "AINODE" not in queue_of(running))
    for path in out.iterdir():  # byte for byte as stored
        raw, syntax = file_parts(path)
        uid_ = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert (raw, syntax) == (encode(wanted[uid_]), ExplicitVRLittleEndian)
    assert received(out) == collections.Counter(wanted.keys())  # nothing else, each once
    # DEAD keeps all twelve, each put off after an attempt
    wait_for("DEAD's attempts", lambda: all(
        e.attempts >= 1 for e in running.archive.outbox.entries("DEAD", failed=False)))
    entries = running.archive.outbox.entries("DEAD", failed=False)
    assert {e.sop_instance_uid for e in entries} == set(wanted)
    assert all("DEAD at 127.0.0.1" in e.last_error for e in entries), entries[0].last_error
    assert queue_of(running) == {"DEAD": (12, 0)}


def queue(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``minipacs queue`` beside the running server."""
    return subprocess.run([*minipacs_command(), "queue", *args, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_failed_items_are_retried_or_dropped_with_minipacs_queue(
        start_server: Callable[..., Running], tmp_path: Path) -> None:
    out = tmp_path / "ws"
    with reserved_port() as port:
        running = start_server(
            peers=[{"ae_title": "WS", "host": "127.0.0.1", "port": port}],
            routes=[{"name": "all", "to": ["WS"]}],
            **{"routing.retry_seconds": 0.1, "routing.max_attempts": 2})
    if True:  # the port is free again (for storescp, later)
        first, second = [ct() for _ in range(3)], [ct() for _ in range(2)]
        store_from("CT1", running.port, first + second)
        wait_for("every item to fail", lambda: queue_of(running) == {"WS": (0, 5)})
        data = running.data_dir
        shown = queue(data)
        assert shown.returncode == 0 and "WS: 0 waiting, 5 failed" in shown.stdout, shown
        listed = queue(data, "list")
        listing = listed.stdout.splitlines()
        assert listed.returncode == 0 and len(listing) == 5, listed
        assert all("failed after 2 attempt(s): no answer: WS at 127.0.0.1" in line
                   for line in listing), listing
        ids = {line.split()[3]: line.split()[0] for line in listing}
        dropped = [a for ds in second for a in ("--id", ids[str(ds.SOPInstanceUID)])]
        assert queue(data, "drop", "--yes", *dropped).returncode == 0
        assert queue_of(running) == {"WS": (0, 3)}
        with storescp("WS", port, out):
            retried = queue(data, "retry", "--peer", "WS")
            assert retried.returncode == 0 and "retry: 3 item(s)" in retried.stdout, retried
            wait_for("the retried items at WS",
                     lambda: received(out) == collections.Counter(
                         str(ds.SOPInstanceUID) for ds in first))
            wait_for("the queue to empty", lambda: queue_of(running) == {})
    assert queue(data, "retry").returncode == 1  # nothing left to retry


def test_a_study_waits_until_stable(start_server: Callable[..., Running],
                                    tmp_path: Path) -> None:
    out = tmp_path / "stable"
    with reserved_port() as port:
        running = start_server(
            peers=[{"ae_title": "LATER", "host": "127.0.0.1", "port": port}],
            routes=[{"name": "whole-studies", "to": ["LATER"], "stable_seconds": 2.0}])
    if True:  # the port is free again, for storescp
        study = uid()
        datasets = [ct(StudyInstanceUID=study) for _ in range(3)]
        with storescp("LATER", port, out):
            store_from("CT1", running.port, datasets[:2])
            before_last = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            store_from("CT1", running.port, datasets[2:])
            # every item of the study waits 2 s from the last instance, not its own
            due = [e.due_at for e in running.archive.outbox.entries(failed=False)]
            if len(due) == 3:  # none sent yet (a slow machine may have sent some)
                assert all(d >= before_last + datetime.timedelta(seconds=2) for d in due)
            wait_for("the study at LATER", lambda: set(received(out)) == {
                str(ds.SOPInstanceUID) for ds in datasets})
        first_arrival = min(p.stat().st_mtime for p in out.iterdir())
        assert first_arrival >= before_last.replace(tzinfo=datetime.UTC).timestamp() + 1.5


def test_an_identical_resend_is_not_routed_again(tmp_path: Path) -> None:
    route = {"name": "r", "match": {"Modality": "CT"}, "to": ["X"]}
    from scp.config import load_config
    config = load_config(None, {"storage.data_dir": str(tmp_path),
                                "peers": [{"ae_title": "X", "host": "127.0.0.1"}],
                                "routes": [route]})
    archive = open_archive(config.archive_options())
    try:
        ds = ct()
        archive.store(encode(ds), ExplicitVRLittleEndian)
        [entry] = archive.outbox.entries()
        archive.outbox.drop(ids=[entry.id], failed_only=False)
        archive.store(encode(ds), ExplicitVRLittleEndian)  # identical: not new content
        assert archive.outbox.entries() == []
        ds.PatientName = "Changed^Name"  # replaced (on_duplicate: replace): routed again
        archive.store(encode(ds), ExplicitVRLittleEndian)
        assert [e.sop_instance_uid for e in archive.outbox.entries()] == [ds.SOPInstanceUID]
    finally:
        archive.close()


def test_the_retry_delay_doubles_up_to_its_limit() -> None:
    from scp.config import RoutingConfig
    from scp.routing import delay

    routing = RoutingConfig(retry_seconds=10.0, retry_max_seconds=600.0)
    assert [delay(routing, n) for n in (1, 2, 3, 7, 5000)] == [10.0, 20.0, 40.0, 600.0, 600.0]


# -- a server killed with SIGKILL ---------------------------------------------------------

def serve(config: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*minipacs_command(), "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def test_a_server_killed_before_and_while_sending_sends_everything_after_restart(
        tmp_path: Path) -> None:
    out = tmp_path / "dest"
    port, dest_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    base["storage"]["data_dir"] = str(tmp_path / "data")
    base["ae"]["bind"] = "127.0.0.1"
    base["web"]["enabled"] = False
    base["peers"] = [{"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}]
    base["routes"] = [{"name": "everything", "to": ["DEST"]}]
    base["routing"]["retry_seconds"] = 0.2
    base["routing"]["retry_max_seconds"] = 0.5
    base["routing"]["max_attempts"] = 100_000  # DEST is down for a while: never give up
    config.write_text(yaml.safe_dump(base))

    # 1. stored while DEST is down, then the server is killed: the queue survives
    proc = serve(config, port)
    try:
        wait_until_echo(port, proc)
        before = [ct() for _ in range(20)]
        store_from("CT1", port, before)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    # 2. DEST up, the server restarted: it sends them; killed again while it sends more
    with storescp("DEST", dest_port, out):
        proc = serve(config, port)
        try:
            wait_until_echo(port, proc)
            wait_for("the first twenty", lambda: set(received(out)) >= {
                str(ds.SOPInstanceUID) for ds in before})
            during = [ct() for _ in range(150)]
            store_from("CT1", port, during)
            wait_for("some of the rest to arrive",
                     lambda: len(received(out)) > len(before), timeout=TIMEOUT)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        # 3. restarted once more: whatever was not marked sent goes (again)
        proc = serve(config, port)
        try:
            wait_until_echo(port, proc)
            wanted = {str(ds.SOPInstanceUID) for ds in before + during}
            wait_for("every instance at DEST", lambda: set(received(out)) == wanted)
            wait_for("the queue to empty", lambda: queue_empty(tmp_path / "data"))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    copies = received(out)
    assert set(copies) == wanted
    # at least once; more only for what a killed sender had in flight: one batch, here at
    # most the first claim of the 150 (100: a claim grows only after a full batch went, and
    # then 50 are left)
    from scp.routing import BATCH
    assert sum(copies.values()) - len(wanted) <= BATCH, copies.most_common(3)


def queue_empty(data: Path) -> bool:
    result = subprocess.run([*minipacs_command(), "queue", "--data-dir", str(data)],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    return "the routing queue is empty" in result.stdout


def test_an_instance_deleted_before_its_turn_is_dropped_from_the_queue(
        start_server: Callable[..., Running], held_port: int, caplog: Any) -> None:
    running = start_server(
        peers=[{"ae_title": "GONE", "host": "127.0.0.1", "port": held_port}],
        routes=[{"name": "all", "to": ["GONE"]}], **{"routing.retry_seconds": 0.1,
                                                     "routing.max_attempts": 1})
    ds = ct()
    store_from("CT1", running.port, [ds])
    wait_for("the attempt to fail", lambda: queue_of(running) == {"GONE": (0, 1)})
    running.archive.delete(Selection(instance_uids=(str(ds.SOPInstanceUID),)))
    caplog.set_level("INFO", logger="scp.routing")
    assert running.archive.outbox.retry("GONE") == 1
    wait_for("the queue to empty", lambda: queue_of(running) == {})
    assert "1 queued instance(s) no longer stored, dropped" in caplog.text


def test_a_backlog_grows_the_claim_and_a_slow_or_short_batch_shrinks_it() -> None:
    from scp.routing import BATCH, GROW_SECONDS, MAX_BATCH, next_size

    sizes = [BATCH]
    while sizes[-1] < MAX_BATCH:
        sizes.append(next_size(sizes[-1], sizes[-1], 0.5, True))
    assert sizes == [100, 400, 1600, 2500]
    assert next_size(MAX_BATCH, MAX_BATCH, 0.5, True) == MAX_BATCH
    assert next_size(1600, 1599, 0.5, True) == BATCH  # caught up
    assert next_size(400, 400, GROW_SECONDS, True) == BATCH  # large instances: stay small
    assert next_size(400, 400, 0.5, False) == BATCH  # the peer could not be reached


def test_a_peer_with_two_connections_gets_a_backlog_over_both_at_once_each_instance_once(
        start_server: Callable[..., Running]) -> None:
    """``peers[].connections: 2``: two senders, each with its own association and batches.
    The peer holds the first C-STORE of the first two associations until both are open
    (with one sender the second never opens while the first waits: the barrier breaks
    and the test fails)."""
    both_open = threading.Barrier(2, timeout=30)
    lock = threading.Lock()
    got: collections.Counter[str] = collections.Counter()
    held: set[int] = set()
    open_now, most = 0, 0

    def on_open(event: Any) -> None:
        nonlocal open_now, most
        with lock:
            open_now += 1
            most = max(most, open_now)

    def on_close(event: Any) -> None:
        nonlocal open_now
        with lock:
            open_now -= 1

    def on_store(event: Any) -> int:
        with lock:
            first = id(event.assoc) not in held and len(held) < 2
            held.add(id(event.assoc))
            got[str(event.request.AffectedSOPInstanceUID)] += 1
        if first:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_open.wait()
        return status.SUCCESS

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    peer = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_open),
        (evt.EVT_RELEASED, on_close), (evt.EVT_ABORTED, on_close)])
    try:
        running = start_server(
            peers=[{"ae_title": "DEST", "host": "127.0.0.1",
                    "port": peer.server_address[1], "connections": 2}],
            routes=[{"name": "all", "to": ["DEST"]}])
        sent = [ct() for _ in range(300)]
        store_from("CT1", running.port, sent)
        wait_for("every instance at DEST", lambda: len(got) == len(sent))
        wait_for("the queue to empty", lambda: queue_of(running) == {})
    finally:
        peer.shutdown()
    assert not both_open.broken, "the second association never came"
    assert most == 2
    assert set(got) == {str(ds.SOPInstanceUID) for ds in sent}
    assert max(got.values()) == 1  # each claimed by one sender only


def test_a_claim_made_ahead_that_fails_does_not_stop_the_sender(
        start_server: Callable[..., Running], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A backlog (full batches) claims the next batch on a helper thread; when that claim
    fails (the index locked, a pool exhausted), the sender claims again by itself."""
    from storage.outbox import Outbox

    got: collections.Counter[str] = collections.Counter()

    def on_store(event: Any) -> int:
        got[str(event.request.AffectedSOPInstanceUID)] += 1
        return status.SUCCESS

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.require_calling_aet = ["NOBODY"]  # down: every association rejected, for now
    peer = ae.start_server(("127.0.0.1", 0), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])
    failed_once = threading.Event()
    claim = Outbox.claim_instances

    def failing_ahead(self: Outbox, *args: Any, **kwargs: Any) -> Any:
        # once the peer is up, so that the failure reaches the sender (a batch that cannot
        # go lets its claim ahead go unread); 700 due: there is always a full batch then
        if (threading.current_thread().name.endswith("-index_0") and not ae.require_calling_aet
                and not failed_once.is_set()):
            failed_once.set()
            raise OSError("the index is locked")
        return claim(self, *args, **kwargs)

    try:
        running = start_server(
            peers=[{"ae_title": "DEST", "host": "127.0.0.1", "port": peer.server_address[1]}],
            routes=[{"name": "all", "to": ["DEST"]}],
            **{"routing.retry_seconds": 0.2, "routing.retry_max_seconds": 0.5,
               "routing.max_attempts": 100_000})
        sent = [ct() for _ in range(700)]
        store_from("CT1", running.port, sent)
        wait_for("a failed attempt", lambda: all(
            e.attempts for e in running.archive.outbox.entries(peer="DEST")))
        monkeypatch.setattr(Outbox, "claim_instances", failing_ahead)
        caplog.set_level("ERROR", logger="scp.routing")
        ae.require_calling_aet = []  # up
        wait_for("every instance at DEST", lambda: len(got) == len(sent))
        wait_for("the queue to empty", lambda: queue_of(running) == {})
    finally:
        peer.shutdown()
    assert failed_once.is_set()
    assert "routing to DEST failed; trying again" in caplog.text  # the sender saw it
    assert "the index is locked" in caplog.text
    assert set(got) == {str(ds.SOPInstanceUID) for ds in sent}
