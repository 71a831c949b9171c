"""Crash safety: the server is killed with SIGKILL while 4 associations store (several
times over); every
instance that was answered Success is there after a restart, indexed, byte for byte and
counted, and `minipacs verify --repair` leaves no stray or temporary file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from storage import ArchiveOptions, open_archive
from storage.files import TEMP_DIR
from storage.models import Instance, Study
from tests.conftest import client_ae, hold
from tests.factory import encode, make_ds, uid
from tests.test_cli import REPO, free_port, minipacs_command, wait_until_echo

SENDERS = 4
PER_SENDER = 600  # far more than fit before the kill


def serve(data: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*minipacs_command(), "serve", "--http-port", "0", "--config", str(REPO / "config.yaml"), "--port",
         str(port), "--data-dir", str(data), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))


def sender(port: int, study: str, acknowledged: dict[str, tuple[str, Dataset]],
           lock: threading.Lock, stop: threading.Event) -> None:
    """Store instances of one study until the server dies; remember every Success."""
    ae = client_ae()
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    if not assoc.is_established:
        return
    series = uid()
    for _ in range(PER_SENDER):
        if stop.is_set() or not assoc.is_established:
            break
        ds = make_ds(StudyInstanceUID=study, SeriesInstanceUID=series, PatientID=study[-8:])
        try:
            rsp = assoc.send_c_store(ds)
        except Exception:  # the connection went away mid-request
            break
        if getattr(rsp, "Status", None) == status.SUCCESS:
            with lock:
                acknowledged[str(ds.SOPInstanceUID)] = (study, ds)
    if assoc.is_established:
        assoc.abort()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*minipacs_command(), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


CYCLES = 4


def test_sigkill_during_stores_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    """CYCLES times: start, store from 4 associations, SIGKILL at a random moment; then
    check every instance acknowledged in any cycle."""
    seed = int(os.environ.get("MINIPACS_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    data = tmp_path / "data"
    port = free_port()
    acknowledged: dict[str, tuple[str, Dataset]] = {}
    lock = threading.Lock()
    studies = [uid() for _ in range(SENDERS)]
    for cycle in range(CYCLES):
        kill_after = rng.uniform(0.2, 2.0)
        print(f"crash test: seed {seed}, cycle {cycle}: SIGKILL {kill_after:.2f} s in")
        proc = serve(data, port)
        stop = threading.Event()
        before = len(acknowledged)
        try:
            wait_until_echo(port, proc)
            threads = [threading.Thread(target=sender, args=(port, s, acknowledged, lock, stop))
                       for s in studies]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60  # wait (polling) until stores are flowing
            while len(acknowledged) < before + 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(kill_after)  # the random moment of the crash, not a wait for readiness
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            stop.set()
            for t in threads:
                t.join(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert len(acknowledged) >= before + 10, f"cycle {cycle}: the stores never got going"

    # every acknowledged instance: indexed, its file byte for byte, counted
    archive = open_archive(ArchiveOptions(files_path=data / "files",
                                          index_url=f"sqlite:///{data / 'index.sqlite'}"))
    try:
        rows = {r.sop_instance_uid: r for r in Instance.select()}
        missing = sorted(set(acknowledged) - set(rows))
        assert not missing, f"{len(missing)} acknowledged instances lost (seed {seed})"
        for sop_uid, (_, ds) in acknowledged.items():
            row = rows[sop_uid]
            sent = encode(ds, row.transfer_syntax_uid)  # as pynetdicom put it on the wire
            with archive.files.open(row.file_key) as fp:
                assert fp.read().endswith(sent), sop_uid
        indexed = {}
        for study in Study.select():
            n = Instance.select().where(Instance.study == study.id).count()
            assert study.num_instances == n  # counted exactly, no more, no less
            indexed[study.study_instance_uid] = n
        problems = archive.verify().problems
        # only what the crash may leave: files written but never acknowledged or indexed
        assert {p.kind for p in problems} <= {"stray file"}, [str(p) for p in problems]
    finally:
        archive.close()

    repaired = run_cli("verify", "--repair", "--config", str(REPO / "config.yaml"),
                       "--data-dir", str(data))
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    again = run_cli("verify", "--config", str(REPO / "config.yaml"), "--data-dir", str(data))
    assert again.returncode == 0 and "0 problem(s)" in again.stdout, again.stdout
    assert list((data / "files" / TEMP_DIR).iterdir()) == []

    # after a restart the server answers every study with its acknowledged instances
    # counted (and those a stray file added back, which verify --repair indexed)
    proc = serve(data, port)
    try:
        wait_until_echo(port, proc)
        assoc = client_ae().associate("127.0.0.1", port, ae_title="MINIPACS")
        for study in studies:
            q = Dataset()
            q.QueryRetrieveLevel = "STUDY"
            q.StudyInstanceUID = study
            q.NumberOfStudyRelatedInstances = ""
            answers = [i for s, i in
                       assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)
                       if s.Status == status.PENDING]
            acked = sum(1 for st, _ in acknowledged.values() if st == study)
            if indexed.get(study):
                assert int(answers[0].NumberOfStudyRelatedInstances) >= max(acked, indexed[study])
            else:
                assert acked == 0
        assoc.release()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_no_success_before_the_index_commit(start_server: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: while the index write of an instance is held, its C-STORE gets no
    response; released, it gets Success."""
    from storage import index

    running = start_server()
    entered, release = hold(monkeypatch, index, "write_instance", timeout=60)
    answered = threading.Event()
    result: list[Any] = []

    def store() -> None:
        ae = client_ae()
        assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
        result.append(assoc.send_c_store(make_ds()))
        answered.set()
        assoc.release()

    t = threading.Thread(target=store)
    t.start()
    assert entered.wait(60)  # the file is written, the commit not yet made
    assert not answered.wait(1.0)  # and nothing was answered meanwhile
    release.set()
    t.join(60)
    assert result[0].Status == status.SUCCESS
