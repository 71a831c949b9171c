"""``ae.workers``: several server processes on one port, one file store, one index
(scp/workers.py). Real ``minipacs serve`` processes; pynetdicom clients."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from tests.conftest import client_ae
from tests.factory import make_ds, uid
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
        [*minipacs_command(), "serve", "--config", str(_config(tmp_path)), "--port", str(port),
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


def _store(port: int, studies: list[str], failures: list[str]) -> None:
    assoc = client_ae().associate("127.0.0.1", port, ae_title="CLITEST")
    if not assoc.is_established:
        failures.append("association refused")
        return
    study = uid()
    studies.append(study)
    for _ in range(PER_ASSOCIATION):
        code = assoc.send_c_store(make_ds(StudyInstanceUID=study, PatientID="WORKERS")).Status
        if code != status.SUCCESS:
            failures.append(f"C-STORE status 0x{code:04X}")
    assoc.release()


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


def test_workers_share_the_port_the_store_and_the_index(tmp_path: Path) -> None:
    with _supervisor(tmp_path) as running:
        studies: list[str] = []
        failures: list[str] = []
        senders = [threading.Thread(target=_store, args=(running.port, studies, failures))
                   for _ in range(ASSOCIATIONS)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert failures == []
        # every worker sees every study, with exact counts (one index)
        for _ in range(4):
            assert _study_counts(running.port) == {s: PER_ASSOCIATION for s in studies}
        files = [p for p in (running.data / "files").glob("*/*/*") if p.is_file()]
        assert len(files) == ASSOCIATIONS * PER_ASSOCIATION
        running.proc.send_signal(signal.SIGTERM)
        log = running.finish()
    assert running.proc.returncode == 0, log
    # the kernel spread the associations: each worker served some (all 16 on one worker
    # would happen once in 2**15 runs)
    served = Counter(int(m.group(1)) for m in
                     re.finditer(r"minipacs.association\[(\d+)\]: association from .* store", log))
    assert set(served) == set(running.pids), served
    assert sum(served.values()) == ASSOCIATIONS
    assert log.count("minipacs stopped") == WORKERS


def test_a_second_server_and_maintenance_are_refused(tmp_path: Path) -> None:
    with _supervisor(tmp_path) as running:
        single = ["serve", "--port", str(free_port())]
        supervisor = [*single, "--config", str(_config(tmp_path))]
        for command in (single, supervisor, ["verify"], ["reindex"]):
            done = subprocess.run(
                [*minipacs_command(), *command, "--data-dir", str(running.data)],
                capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert done.returncode == 1, (command, done.stderr)
            assert "in use by another minipacs" in done.stderr, done.stderr
        running.proc.send_signal(signal.SIGTERM)
        log = running.finish()
    assert running.proc.returncode == 0, log


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
