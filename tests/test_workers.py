"""``ae.workers``: several server processes on one port, one file store, one index
(scp/workers.py). Real ``minipacs serve`` processes; pynetdicom clients."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from scp.config import load_config
from scp.workers import _start, _stop
from storage import SERVER_LOCK
from tests.conftest import client_ae, dcmtk_tool
from tests.factory import make_ds, save, uid
from tests.test_cli import free_port, minipacs_command, wait_until_echo

WORKERS = 2
ASSOCIATIONS = 16
PER_ASSOCIATION = 5


def _config(tmp_path: Path, workers: int = WORKERS) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"ae:\n  title: CLITEST\n  bind: 127.0.0.1\n  workers: {workers}\n"
                    "storage:\n  durability: relaxed\nlogging:\n  level: INFO\n")
    return path


def _serve(tmp_path: Path, port: int, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*minipacs_command(), "serve", "--http-port", "0", "--config", str(_config(tmp_path)), "--port", str(port),
         "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        start_new_session=True)


def _end(proc: subprocess.Popen[str]) -> str:
    """Kill what is left of the server (its workers too, who hold its output open)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out


def _worker_pids(proc: subprocess.Popen[str], lines: list[str]) -> list[int]:
    """Read the log until the supervisor names its workers."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"minipacs exited:\n{''.join(lines)}"
        lines.append(line)
        found = re.search(r"worker processes \(pids ([\d, ]+)\) serve port", line)
        if found:
            return [int(p) for p in found.group(1).split(", ")]
    raise AssertionError("the supervisor never named its workers:\n" + "".join(lines))


def _senders(tmp_path: Path, port: int) -> tuple[list[list[str]], list[str]]:
    """One ``storescu`` command per association, each sending a study of its own."""
    storescu = dcmtk_tool("storescu")
    assert storescu, "DCMTK's storescu is needed"
    commands, studies = [], []
    for n in range(ASSOCIATIONS):
        study = uid()
        studies.append(study)
        files = [str(save(make_ds(StudyInstanceUID=study, PatientID="WORKERS"),
                          tmp_path / "in" / f"{n}-{i}.dcm")) for i in range(PER_ASSOCIATION)]
        commands.append([storescu, "-aet", "SENDER", "-aec", "CLITEST", "-to", "60",
                         "-td", "60", "127.0.0.1", str(port), *files])
    return commands, studies


def _study_counts(port: int) -> dict[str, int]:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = "WORKERS"
    q.StudyInstanceUID = ""
    q.NumberOfStudyRelatedInstances = ""
    assoc = client_ae(storage=False).associate("127.0.0.1", port, ae_title="CLITEST")
    assert assoc.is_established
    out = {}
    for rsp, identifier in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if rsp.Status == status.PENDING:
            out[str(identifier.StudyInstanceUID)] = int(identifier.NumberOfStudyRelatedInstances)
    assoc.release()
    return out


@dataclass
class Supervised:
    """A running ``minipacs serve`` with workers: its process, port, folder, worker pids
    and what it has logged so far."""

    proc: subprocess.Popen[str]
    port: int
    data: Path
    pids: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def finish(self, timeout: float = 120) -> str:
        """Wait for the supervisor to exit; its whole log."""
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return "".join(self.lines)


@contextlib.contextmanager
def _supervisor(tmp_path: Path) -> Iterator[Supervised]:
    port, data = free_port(), tmp_path / "data"
    running = Supervised(_serve(tmp_path, port, data), port, data)
    try:
        running.pids = _worker_pids(running.proc, running.lines)
        assert len(running.pids) == WORKERS
        wait_until_echo(port, running.proc)
        yield running
    finally:
        if running.proc.poll() is None:
            _end(running.proc)


def test_workers_share_the_port_the_store_and_the_index(
        tmp_path: Path, dcmtk: Callable[..., Any]) -> None:
    with _supervisor(tmp_path) as running:
        commands, studies = _senders(tmp_path, running.port)
        senders = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, env={**os.environ, "TCP_NODELAY": "1"})
                   for command in commands]  # 16 modalities at once
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        assert [sender.returncode for sender in senders] == [0] * ASSOCIATIONS, outputs
        # every worker sees every study, with exact counts (one index)
        for _ in range(4):
            assert _study_counts(running.port) == {s: PER_ASSOCIATION for s in studies}
        files = [p for p in (running.data / "files").glob("*/*/*") if p.is_file()]
        assert len(files) == ASSOCIATIONS * PER_ASSOCIATION
        running.proc.send_signal(signal.SIGTERM)
        log = running.finish()
    assert running.proc.returncode == 0, log
    # the associations were spread: each worker accepted some of the 16
    served = Counter(int(m.group(1)) for m in re.finditer(
        r"minipacs.association\[(\d+)\]: association from SENDER.* store", log))
    assert set(served) == set(running.pids), served
    assert sum(served.values()) == ASSOCIATIONS
    assert log.count("minipacs stopped") == WORKERS


def test_a_second_server_and_maintenance_are_refused(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    with _supervisor(tmp_path) as running:
        others = [
            ["serve", "--http-port", "0", "--config", str(_config(single, workers=1)), "--port", str(free_port())],
            ["serve", "--http-port", "0", "--config", str(_config(tmp_path)), "--port", str(free_port())],
            ["verify"], ["reindex"],
        ]
        for command in others:
            done = subprocess.run(
                [*minipacs_command(), *command, "--data-dir", str(running.data)],
                capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert done.returncode == 1, (command, done.stderr)
            assert "in use by another minipacs" in done.stderr, done.stderr
        # another archive cannot take the port either (as for a single server)
        elsewhere = subprocess.run(
            [*minipacs_command(), "serve", "--http-port", "0", "--config", str(_config(tmp_path)), "--port",
             str(running.port), "--data-dir", str(tmp_path / "elsewhere")],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert elsewhere.returncode == 1
        assert "cannot listen on 127.0.0.1" in elsewhere.stderr, elsewhere.stderr
        assert "Traceback" not in elsewhere.stderr
        running.proc.send_signal(signal.SIGTERM)
        log = running.finish()
    assert running.proc.returncode == 0, log


def test_the_server_lock_keeps_a_second_supervisor_out(tmp_path: Path) -> None:
    """The supervisor's own lock, held while it starts and runs its workers."""
    data = tmp_path / "data"
    (data / "files").mkdir(parents=True)
    fd = os.open(data / "files" / SERVER_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        done = subprocess.run(
            [*minipacs_command(), "serve", "--http-port", "0", "--config", str(_config(tmp_path)), "--port",
             str(free_port()), "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert "in use by another minipacs server" in done.stderr, done.stderr


def _dies_at_start(*args: Any) -> None:
    os._exit(3)


def _never_ready(*args: Any) -> None:
    time.sleep(60)


@pytest.mark.parametrize(("target", "message"), [
    (_dies_at_start, "ended with exit code 3 while starting"),
    (_never_ready, None),
])
def test_a_worker_that_fails_to_start_ends_the_start(
        tmp_path: Path, target: Any, message: str | None,
        caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(_config(tmp_path), {"storage.data_dir": str(tmp_path / "data")})
    stop = threading.Event()
    if message is None:  # a SIGTERM while the workers start
        threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    processes, ok = _start(config, {}, "INFO", stop, target=target)
    try:
        assert not ok
        assert time.monotonic() - started < 30
        if message:
            assert message in caplog.text
    finally:
        _stop(processes, 5)
    assert all(not p.is_alive() for p in processes)


def test_a_worker_that_dies_stops_the_server(tmp_path: Path) -> None:
    with _supervisor(tmp_path) as running:
        os.kill(running.pids[0], signal.SIGKILL)
        log = running.finish()
    assert running.proc.returncode == 1, log
    assert f"worker {running.pids[0]} ended with exit code -9: stopping the others" in log
    for pid in running.pids[1:]:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text().lower()
    # nothing listens on the port any more
    assoc = client_ae(storage=False).associate("127.0.0.1", running.port, ae_title="CLITEST")
    assert not assoc.is_established


@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_starts_beside_a_delete_that_verify_waits_for(tmp_path: Path,
                                                               workers: int) -> None:
    """``minipacs delete`` holds the store's lock shared, as a server does: a server of one
    or more processes starts beside it (without sweeping temporary files, which it would
    only do alone), and ``verify`` is still kept out (review of 8c7ce42: the supervisor
    wanted the lock alone to sweep)."""
    data = tmp_path / "data"
    (data / "files" / "tmp").mkdir(parents=True)
    leftover = data / "files" / "tmp" / "0123456789abcdef0123456789abcdef.part"
    leftover.write_bytes(b"a crash left this")
    fd = os.open(data / "files" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as a delete waiting at its prompt holds it
    try:
        port = free_port()
        proc = subprocess.Popen(
            [*minipacs_command(), "serve", "--http-port", "0", "--config",
             str(_config(tmp_path, workers=workers)), "--port", str(port), "--data-dir",
             str(data)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=tmp_path, start_new_session=True)
        try:
            wait_until_echo(port, proc)
            assert leftover.exists()  # not alone: not swept
            verify = subprocess.run([*minipacs_command(), "verify", "--data-dir", str(data)],
                                    capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert verify.returncode == 1
            assert "in use by another minipacs process" in verify.stderr
        finally:
            log = _end(proc)
        assert "temporary files are not swept this time" in log
    finally:
        os.close(fd)
    alone = subprocess.Popen(  # alone again: the next start sweeps
        [*minipacs_command(), "serve", "--http-port", "0", "--config",
         str(_config(tmp_path, workers=workers)), "--port", str(port := free_port()),
         "--data-dir", str(data)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=tmp_path, start_new_session=True)
    try:
        wait_until_echo(port, alone)
        assert not leftover.exists()
    finally:
        _end(alone)
