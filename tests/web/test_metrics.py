"""``/metrics`` (issue 16, item 6): Prometheus's text format, parsed by prometheus_client's
own parser; associations, DIMSE operations by status with bytes and latency, HTTP requests
the same way, what the archive holds and its disk; with ``ae.workers`` processes too."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from scp import status
from tests.conftest import associate, find
from tests.factory import encode, hierarchy, make_ds
from tests.test_cli import free_port, minipacs_command, wait_until_echo
from tests.web.conftest import WebRunning


def scrape(root: str, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``GET /metrics``: (name, sorted labels) -> value."""
    got = httpx.get(f"{root}/metrics", **kwargs)
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(got.text) for s in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_dimse_http_and_archive_metrics(start_web: Callable[..., WebRunning]) -> None:
    web = start_web(**{"peers": [{"ae_title": "PYTEST"}],
                       "security.allow_unknown_peers": False})
    before = scrape(web.root)
    datasets = hierarchy()[:5]
    assoc = associate(web.dicom)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    bad = make_ds()
    del bad.StudyInstanceUID  # refused: C000 (cannot be indexed)
    refused = assoc.send_c_store(bad)
    assert refused.Status != status.SUCCESS
    open_now = value(scrape(web.root), "minipacs_dicom_associations_open")
    assert open_now == value(before, "minipacs_dicom_associations_open") + 1
    assoc.release()
    matches, final = find(web.dicom, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    assert final == status.SUCCESS
    assert httpx.get(f"{web.url}/studies").status_code == 200
    assert httpx.get(f"{web.url}/studies/1.2.3/metadata").status_code == 404
    assert httpx.request("M0X", f"{web.url}/studies").status_code == 405  # any token
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context("1.2.840.10008.1.1")
    refused_assoc = stranger.associate("127.0.0.1", web.dicom.port,
                                       ae_title=web.dicom.ae_title)
    assert refused_assoc.is_rejected  # not in peers

    # the server ends an association just after the peer's release returns: poll for it
    deadline = time.monotonic() + 30
    scrapes = 2  # ``before``'s and the one while the association was open
    while True:
        after = scrape(web.root)  # in the next answer, not in its own
        settled = value(after, "minipacs_dicom_associations_open") == value(
            before, "minipacs_dicom_associations_open") and value(
            after, "minipacs_dicom_associations_rejected_total", calling_ae="other") > value(
            before, "minipacs_dicom_associations_rejected_total", calling_ae="other")
        if settled or time.monotonic() > deadline:
            break
        scrapes += 1
        time.sleep(0.02)  # poll interval

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    stores = "minipacs_dimse_operation_seconds_count"
    assert delta(stores, operation="C-STORE", status="0000") == 5
    failures = {k[1]: delta(stores, **dict(k[1])) for k in after
                if k[0] == stores and ("operation", "C-STORE") in k[1]
                and ("status", "0000") not in k[1]}  # the process's other tests count too
    assert {dict(k)["status"]: n for k, n in failures.items() if n} == {"C000": 1}
    assert delta(stores, operation="C-FIND", status="0000") == 1
    assert delta("minipacs_dimse_operation_seconds_sum", operation="C-STORE",
                 status="0000") > 0
    assert delta("minipacs_dimse_bytes_total", operation="C-STORE", direction="in") >= sum(
        len(encode(ds)) for ds in datasets)
    assert delta("minipacs_dicom_associations_total", calling_ae="PYTEST") == 2
    assert delta("minipacs_dicom_associations_rejected_total", calling_ae="other") == 1
    assert delta("minipacs_dicom_associations_open") == 0
    assert delta("minipacs_http_request_seconds_count", service="QIDO-RS", method="GET",
                 status="200") == 1
    assert delta("minipacs_http_request_seconds_count", service="WADO-RS", method="GET",
                 status="404") == 1
    assert delta("minipacs_http_request_seconds_count", service="metrics", method="GET",
                 status="200") == scrapes  # a scrape is counted once its answer is sent
    assert delta("minipacs_http_bytes_total", service="QIDO-RS", direction="out") > 0
    assert delta("minipacs_http_request_seconds_count", service="QIDO-RS", method="other",
                 status="405") == 1  # not a series of its own
    assert not any(dict(k[1]).get("method") == "M0X" for k in after)
    studies = {ds.StudyInstanceUID for ds in datasets}
    assert value(after, "minipacs_held", level="instances") == 5
    assert value(after, "minipacs_held", level="studies") == len(studies)
    assert value(after, "minipacs_files_disk_free_bytes") > 0
    assert value(after, "minipacs_files_disk_size_bytes") >= value(
        after, "minipacs_files_disk_free_bytes")


def test_metrics_need_read_rights(start_web: Callable[..., WebRunning]) -> None:
    web = start_web(**{"web.anonymous_local": "none"})
    assert httpx.get(f"{web.root}/metrics").status_code == 401


def test_worker_processes_counts_add_up(tmp_path: Path) -> None:
    """With ``ae.workers: 2`` each worker counts its own associations and stores in
    ``PROMETHEUS_MULTIPROC_DIR``; the supervisor's ``/metrics`` adds them up."""
    config = tmp_path / "config.yaml"
    web_port, port = free_port(), free_port()
    config.write_text("ae:\n  title: METRICS\n  bind: 127.0.0.1\n  workers: 2\n"
                      "storage:\n  durability: relaxed\n"
                      f"web:\n  port: {web_port}\n  bind: 127.0.0.1\n")
    proc = subprocess.Popen(
        [*minipacs_command(), "serve", "--config", str(config), "--port", str(port),
         "--data-dir", str(tmp_path / "data")], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_until_echo(port, proc)
        datasets = hierarchy()[:8]
        for pair in (datasets[:4], datasets[4:]):  # two associations: any worker may serve
            ae = AE(ae_title="PYTEST")
            ae.add_requested_context(datasets[0].SOPClassUID)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")  # SC
            assoc = ae.associate("127.0.0.1", port, ae_title="METRICS")
            assert assoc.is_established
            for ds in pair:
                assert assoc.send_c_store(ds).Status == status.SUCCESS
            assoc.release()
        deadline = time.monotonic() + 30  # the web listener starts once the workers do
        while True:
            try:
                samples = scrape(f"http://127.0.0.1:{web_port}")
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "no HTTP listener within 30 s"
                time.sleep(0.05)  # poll interval, not a wait for readiness
        assert value(samples, "minipacs_dimse_operation_seconds_count",
                     operation="C-STORE", status="0000") == 8
        assert value(samples, "minipacs_held", level="instances") == 8
        names = [k[0] for k in samples]
        assert names.count("minipacs_dimse_operation_seconds_count") == len(
            {k for k in samples if k[0] == "minipacs_dimse_operation_seconds_count"})
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    assert proc.returncode == 0


def test_routing_queue_metrics(start_web: Callable[..., WebRunning], held_port: int) -> None:
    """Routing's queue per peer and what was routed, while a peer cannot be reached."""
    if True:
        web = start_web(**{"peers": [{"ae_title": "DOWN", "host": "127.0.0.1",
                                      "port": held_port}],
                           "routes": [{"name": "ct", "match": {"Modality": "CT"},
                                       "to": ["DOWN"]}],
                           "routing.retry_seconds": 60.0})
    before = scrape(web.root)
    assoc = associate(web.dicom)
    for ds in [make_ds(Modality="CT") for _ in range(3)] + [make_ds(Modality="MR")]:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    deadline = time.monotonic() + 30
    while True:  # poll until the sender has tried (its first batch may be one instance)
        after = scrape(web.root)
        failed = value(after, "minipacs_dicom_routed_instances_total", peer="DOWN",
                       outcome="failed") - value(before, "minipacs_dicom_routed_instances_total",
                                                 peer="DOWN", outcome="failed")
        if failed >= 1:
            break
        assert time.monotonic() < deadline, "the sender did not try"
        time.sleep(0.05)  # poll interval
    assert failed <= 3
    waiting = ("minipacs_routing_queue_items", (("peer", "DOWN"), ("state", "waiting")))
    given_up = ("minipacs_routing_queue_items", (("peer", "DOWN"), ("state", "failed")))
    oldest = ("minipacs_routing_queue_oldest_seconds", (("peer", "DOWN"),))
    assert (after[waiting], after[given_up]) == (3, 0)
    assert after[("minipacs_storage_commitment_reports", (("state", "waiting"),))] == 0
    assert 0 <= after[oldest] < 600
    assert value(after, "minipacs_dicom_routed_instances_total", peer="DOWN",
                 outcome="sent") == 0
