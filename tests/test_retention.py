"""Retention (issue 16, item 4) end to end: ``minipacs retention`` (dry run, then deleting)
beside a running server while a modality stores, with the counters and ``verify`` exact
afterwards; the server's own passes; each deletion logged and audited. The choice of
studies itself: tests/storage/test_retention.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset

from scp import status
from storage.models import Study
from tests.conftest import Running, associate
from tests.factory import make_ds
from tests.storage.test_retention import study
from tests.test_cli import REPO, minipacs_command


def write_config(tmp_path: Path, data: Path, **retention: Any) -> Path:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    base["storage"]["data_dir"] = str(data)
    base["retention"].update(retention)
    path = tmp_path / "retention.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*minipacs_command(), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_minipacs_retention_beside_a_server_while_modalities_store(
        start_server: Callable[..., Running], tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = start_server(data_dir=data)
    old = [study(running.archive, 100 + i, count=3, PatientID=f"OLD{i}") for i in range(5)]
    keep = study(running.archive, 1, count=2, PatientID="NEW")
    config = write_config(tmp_path, data, max_age_days=30)
    dry = cli("retention", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "5 study(ies) would be deleted" in dry.stdout
    assert all(u in dry.stdout for u in old) and keep not in dry.stdout
    assert running.archive.totals()["instances"] == 17  # nothing deleted

    stored: list[Dataset] = []
    stop = threading.Event()

    def modality() -> None:  # new studies arrive meanwhile
        assoc = associate(running)
        try:
            while not stop.is_set() and len(stored) < 200:
                ds = make_ds(PatientID="BUSY")
                assert assoc.send_c_store(ds).Status == status.SUCCESS
                stored.append(ds)
        finally:
            assoc.release()
    sender = threading.Thread(target=modality)
    sender.start()
    try:
        done = cli("retention", "--config", str(config), "--yes")
    finally:
        stop.set()
        sender.join(60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deleted 5 study(ies), 15 instance(s); 0 failed" in done.stdout
    totals = running.archive.totals()
    assert totals["studies"] == 1 + len(stored)
    assert totals["instances"] == 2 + len(stored)
    audit = [json.loads(line) for line in (data / "audit.jsonl").read_text().splitlines()]
    gone = {a["study_instance_uid"] for a in audit if a["event"] == "retention"}
    assert gone == set(old)
    running.server.stop(grace=5)
    verified = cli("verify", "--data-dir", str(data))
    assert verified.returncode == 0 and "0 problem(s)" in verified.stdout, verified.stdout


def test_the_server_applies_the_rules_itself(start_server: Callable[..., Running],
                                              caplog: Any) -> None:
    running = start_server(**{"retention.max_age_days": 30,
                              "retention.interval_minutes": 0.002})
    keep = study(running.archive, 2)
    caplog.set_level("INFO", logger="scp.retention")
    old = study(running.archive, 31)
    audit = running.data_dir / "audit.jsonl"
    deadline = time.monotonic() + 60
    while not audit.exists() or old not in audit.read_text():  # the deletion's last step
        assert time.monotonic() < deadline, "the server did not delete the old study"
        time.sleep(0.05)  # poll interval
    assert [s.study_instance_uid for s in Study.select()] == [keep]
    assert f"retention: deleted study {old}" in caplog.text
    [line] = [json.loads(x) for x in audit.read_text().splitlines() if old in x]
    assert (line["event"], line["user"], line["instances"]) == ("retention", "retention", 2)


def test_minipacs_retention_without_a_rule_says_so(tmp_path: Path) -> None:
    result = cli("retention", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "no retention rule is on" in result.stderr
