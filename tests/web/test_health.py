"""``GET /healthz``: up or down for a load balancer, without credentials, unaudited; and a
node whose object store or index is down for a while answers A700, then recovers by itself."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from scp import status
from storage import WriteResult
from storage.models import Study
from tests.factory import encode, make_ds
from tests.objects import Weed, s3_overrides
from tests.postgres import Postgres, started_postgres
from tests.test_cluster import Sender
from tests.web.conftest import WebRunning


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    yield from started_postgres()


def test_a_healthy_node_answers_200_to_anyone_and_is_not_audited(
        start_web: Callable[..., WebRunning], tmp_path: Path) -> None:
    running = start_web(**{"web.anonymous_local": "none",
                           "audit.path": str(tmp_path / "audit.jsonl")})
    rsp = httpx.get(f"{running.root}/healthz")
    assert (rsp.status_code, rsp.json()) == (200, {"status": "ok"})
    assert rsp.headers["cache-control"] == "no-store"
    assert httpx.head(f"{running.root}/healthz").status_code == 200
    assert httpx.get(f"{running.url}/studies").status_code == 401  # the rest still needs them
    audit = tmp_path / "audit.jsonl"
    lines = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() \
        else []
    assert not [line for line in lines if line.get("path") == "/healthz"]
    assert [line for line in lines if line.get("path") == "/dicom-web/studies"]


def test_a_node_whose_file_store_cannot_be_written_answers_503(
        web: WebRunning) -> None:
    tmp = web.dicom.data_dir / "files" / "tmp"
    tmp.rename(tmp.with_name("elsewhere"))
    try:
        rsp = httpx.get(f"{web.root}/healthz")
        assert (rsp.status_code, rsp.json()) == (
            503, {"status": "unavailable", "failed": ["files"]})
    finally:
        tmp.with_name("elsewhere").rename(tmp)
    assert httpx.get(f"{web.root}/healthz").status_code == 200


def test_a_node_whose_object_store_is_down_answers_503_then_200_when_it_is_back(
        start_web: Callable[..., WebRunning], tmp_path: Path) -> None:
    weed = Weed(tmp_path / "weed")
    weed.start()
    try:
        running = start_web(**s3_overrides(weed, uuid.uuid4().hex))
        assert httpx.get(f"{running.root}/healthz").status_code == 200
        weed.stop()
        rsp = httpx.get(f"{running.root}/healthz", timeout=60)
        assert (rsp.status_code, rsp.json()["failed"]) == (503, ["files"])
        weed.start()
        assert httpx.get(f"{running.root}/healthz", timeout=60).status_code == 200
    finally:
        weed.stop()


def test_a_node_whose_index_is_down_answers_a700_and_recovers_by_itself(
        postgres: Postgres, start_web: Callable[..., WebRunning]) -> None:
    running = start_web(**{"storage.index_url": postgres.new_database()})
    server = running.dicom
    stored = make_ds()
    before = Sender(server.port, [stored])
    before.run()
    assert before.acknowledged == [str(stored.SOPInstanceUID)]
    assert server.archive.submit(  # the committer thread's connection, open before
        encode(make_ds(StudyInstanceUID=stored.StudyInstanceUID)),
        ExplicitVRLittleEndian).result().result is WriteResult.STORED
    postgres.stop()
    try:
        during = Sender(server.port, [make_ds(StudyInstanceUID=stored.StudyInstanceUID)])
        during.run()
        assert (during.acknowledged, during.refused) == ([], [status.STORE_OUT_OF_RESOURCES])
        rsp = httpx.get(f"{running.root}/healthz", timeout=60)
        assert (rsp.status_code, rsp.json()["failed"]) == (503, ["index"])
    finally:
        postgres.start()
    assert httpx.get(f"{running.root}/healthz", timeout=60).status_code == 200
    after = [make_ds(StudyInstanceUID=stored.StudyInstanceUID) for _ in range(2)]
    sender = Sender(server.port, after)
    sender.run()
    assert (len(sender.acknowledged), sender.refused) == (2, [])
    # the committer thread's connection (STOW-RS parts) broke too: it is opened again
    for _ in range(2):
        pending = server.archive.submit(
            encode(make_ds(StudyInstanceUID=stored.StudyInstanceUID)), ExplicitVRLittleEndian)
        assert pending.result().result is WriteResult.STORED
    assert server.archive.verify().problems == []
    assert Study.get().num_instances == 6  # nothing acknowledged that is not stored
