"""``minipacs migrate-files``: a server's files moved from its folder to an object store
(SeaweedFS) while it serves, the move killed halfway and resumed; every instance stays
retrievable byte for byte throughout, and nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from scp import status
from scp.config import ConfigError, load_config
from storage.files import FilesystemStore
from storage.models import Instance
from storage.moving import FallbackStore
from tests.conftest import Running
from tests.factory import encode, make_ds, uid
from tests.objects import BUCKET, Weed
from tests.test_cli import minipacs_command
from tests.test_retrieve import c_get

COUNT = 300
TIMEOUT = 120.0


def get_study(running: Running, study: str) -> list[bytes]:
    received, responses = c_get(running, StudyRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert int(responses[-1].Status) == status.SUCCESS
    return sorted(received)


def migrate(config: Path, to: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*minipacs_command(), "migrate-files", "--to", to, "--config",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))


def test_files_move_to_an_object_store_under_a_serving_node_and_a_killed_move_resumes(
        weed: Weed, start_server: Callable[..., Running], tmp_path: Path) -> None:
    data = tmp_path / "data"
    folder = data / "files"
    study = uid()
    datasets: list[Dataset] = [make_ds(StudyInstanceUID=study) for _ in range(COUNT)]
    first = start_server(data)
    for ds in datasets:
        first.archive.store(encode(ds), ExplicitVRLittleEndian)
    first.server.stop(grace=5)

    # every node: the new store as files_url, the old folder as files_previous_url
    target = f"s3://{BUCKET}/{uuid.uuid4().hex}"
    storage = {"data_dir": str(data), "files_url": target,
               "files_previous_url": str(folder), "s3_endpoint": weed.endpoint,
               "s3_region": "us-east-1", "s3_access_key_id": "minipacs",
               "s3_secret_access_key": "minipacs"}
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": storage}))
    running = start_server(data, **{f"storage.{k}": v for k, v in storage.items()})
    files = running.archive.files
    assert isinstance(files, FallbackStore)
    assert get_study(running, study) == sorted(encode(ds) for ds in datasets)  # from the old

    # the move, killed once the first files are over
    move = migrate(config, target)
    deadline = time.monotonic() + TIMEOUT
    while len(list(files.current.keys())) < COUNT // 5:
        assert move.poll() is None, move.communicate()
        assert time.monotonic() < deadline, "the move did not get going"
        time.sleep(0.05)  # polling
    assert move.poll() is None, "the move finished before it could be killed"
    move.send_signal(signal.SIGKILL)
    move.wait(timeout=30)
    moved_before = len(list(files.current.keys()))
    assert 0 < moved_before < COUNT + 10

    # the node serves meanwhile: new instances go to the new store; all are retrievable
    later = [make_ds(StudyInstanceUID=study) for _ in range(10)]
    for ds in later:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    expected = sorted(encode(ds) for ds in datasets + later)
    assert get_study(running, study) == expected

    # resumed: done, each file checked; the old folder empty, the rows unchanged
    keys_before = {r.sop_instance_uid: r.file_key for r in Instance.select()}
    move = migrate(config, target)
    out, err = move.communicate(timeout=TIMEOUT)
    assert move.returncode == 0, out + err
    assert "0 not moved" in out and "migrate-files [" in err  # the progress bar
    old = FilesystemStore(folder, shared=True)
    try:
        assert list(old.keys()) == []
    finally:
        old.close()
    assert {r.sop_instance_uid: r.file_key for r in Instance.select()} == keys_before
    assert set(files.current.keys()) == set(keys_before.values())
    assert get_study(running, study) == expected
    assert running.archive.verify().problems == []


def test_migrate_files_says_what_to_configure(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "d")}}))
    proc = subprocess.run([*minipacs_command(), "migrate-files", "--to", "s3://b/p",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "files_previous_url" in proc.stderr
    config.write_text(yaml.safe_dump({"storage": {
        "data_dir": str(tmp_path / "d"), "files_url": "s3://b/p",
        "files_previous_url": str(tmp_path / "old")}}))
    proc = subprocess.run([*minipacs_command(), "migrate-files", "--to", "s3://other/p",
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "is not storage.files_url" in proc.stderr


@pytest.mark.parametrize(("current", "previous"), [
    ("", "{data}/files"), ("s3://bucket/images", "s3://bucket/images/")])
def test_the_previous_store_cannot_be_the_store_itself(tmp_path: Path, current: str,
                                                       previous: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storage": {
        "data_dir": str(tmp_path / "d"), "files_url": current,
        "files_previous_url": previous.format(data=tmp_path / "d")}}))
    with pytest.raises(ConfigError, match="files_previous_url: is the store"):
        load_config(config)
