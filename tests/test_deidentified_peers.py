"""A peer with ``deidentify: PROFILE`` gets de-identified copies by every way out: C-MOVE
to it, its own C-GET, routing (PS3.15 Annex E; the table is
tests/storage/data/part15-sample.xml). Real pynetdicom peers on loopback; the same secret
on two servers gives the same copies."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
)

from scp import status
from tests.conftest import Running, free_port
from tests.factory import encode, make_ds, save
from tests.test_cli import minipacs_command, wait_until_echo
from tests.test_move import STUDY_ROOT, Peer, c_move, start_peer  # noqa: F401 (a fixture)
from tests.test_routing import queue_of, wait_for

SAMPLE = Path(__file__).parent / "storage" / "data" / "part15-sample.xml"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
PROFILE = {"name": "research", "options": ["retain_long_modified_dates", "clean_descriptors"]}
SETTINGS = {"deidentify.table": str(SAMPLE), "deidentify.secret": "the site's secret, 32 chars.",
            "profiles": [PROFILE]}


def one_study(patient_id: str = "PID-4711") -> list[Dataset]:
    """Three CTs of Doe^John (a private block, a description naming him) and an
    ultrasound image without Burned In Annotation."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for n in range(3):
        ds = make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid,
                     InstanceNumber=n + 1, PatientID=patient_id, PatientName="Doe^John",
                     StudyDescription="CT for John Doe", BurnedInAnnotation="NO")
        ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "Doe^John")
        out.append(ds)
    out.append(make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=generate_uid(),
                       SOPClassUID=US_IMAGE, Modality="US", PatientID=patient_id,
                       PatientName="Doe^John"))
    return out


def check_copies(peer: Peer, originals: list[Dataset]) -> None:
    """What ``peer`` got: a de-identified copy of each CT, under its replaced UID."""
    assert len(peer.datasets) == 3
    stored_uids = {str(ds.SOPInstanceUID) for ds in originals}
    for ds, request_uid in zip(peer.datasets, peer.requests, strict=True):
        assert str(ds.SOPInstanceUID).startswith("2.25.")
        assert str(ds.SOPInstanceUID) not in stored_uids
        assert request_uid == ds.SOPInstanceUID  # the C-STORE-RQ names the copy
        assert str(ds.PatientName).startswith("ANONYMOUS^")
        assert ds.PatientIdentityRemoved == "YES"
        assert not [e.tag for e in ds if e.tag.is_private]
    for raw, _ in peer.received:
        assert b"Doe" not in raw and b"PID-4711" not in raw


def audit_lines(running: Running, event: str) -> list[dict[str, Any]]:
    lines = (running.data_dir / "audit.jsonl").read_text().splitlines()
    return [line for line in map(json.loads, lines) if line["event"] == event]


def test_a_move_to_a_de_identified_peer_sends_copies_and_withholds_burned_in_pixels(
        start_server: Callable[..., Running],
        start_peer: Callable[..., Peer]) -> None:  # noqa: F811  (imported above)
    research, plain = start_peer("RESEARCH"), start_peer("PLAIN")
    running = start_server(peers=[{**research.entry(), "deidentify": "research"},
                                  plain.entry()], **SETTINGS)
    datasets = one_study()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    study = str(datasets[0].StudyInstanceUID)

    final = c_move(running, STUDY_ROOT, "RESEARCH", QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=study)[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 1)
    assert final.FailedSOPInstanceUIDList == datasets[3].SOPInstanceUID  # as stored
    check_copies(research, datasets)
    [line] = [a for a in audit_lines(running, "dimse")
              if a["operation"] == "C-MOVE" and a.get("profile")]
    assert line["profile"] == "research"
    assert sorted(line["instances"]) == sorted(str(ds.SOPInstanceUID) for ds in datasets[:3])
    assert line["withheld"] == [str(datasets[3].SOPInstanceUID)]

    # the other peer still gets the instances as stored, byte for byte
    final = c_move(running, STUDY_ROOT, "PLAIN", QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=study)[-1]
    assert final.Status == status.SUCCESS
    assert sorted(raw for raw, _ in plain.received) == sorted(encode(ds) for ds in datasets)


def test_two_nodes_with_one_secret_send_the_same_copies(
        start_server: Callable[..., Running],
        start_peer: Callable[..., Peer],  # noqa: F811  (the fixture imported above)
        tmp_path: Path) -> None:
    """Consistency across nodes (and runs): every replacement is keyed by the secret, so a
    second server process (``minipacs serve``) with its own data sends the same copies."""
    datasets = one_study()
    first, second = start_peer("RESEARCH"), start_peer("RESEARCH")
    running = start_server(peers=[{**first.entry(), "deidentify": "research"}], **SETTINGS)
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    study = str(datasets[0].StudyInstanceUID)
    c_move(running, STUDY_ROOT, "RESEARCH", QueryRetrieveLevel="STUDY", StudyInstanceUID=study)

    for n, ds in enumerate(datasets):
        save(ds, tmp_path / "incoming" / f"{n}.dcm")
    config = tmp_path / "node2.yaml"
    config.write_text(yaml.safe_dump({
        "ae": {"bind": "127.0.0.1", "port": free_port(), "title": "NODE2"},
        "web": {"enabled": False},
        "storage": {"data_dir": str(tmp_path / "node2")},
        "deidentify": {"table": str(SAMPLE), "secret": SETTINGS["deidentify.secret"]},
        "profiles": [PROFILE],
        "peers": [{**second.entry(), "deidentify": "research"}, {"ae_title": "MOVESCU"}]}))
    command = [*minipacs_command(), "--config", str(config)]
    imported = subprocess.run([command[0], "import", str(tmp_path / "incoming"), *command[1:]],
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stdout + imported.stderr
    port = yaml.safe_load(config.read_text())["ae"]["port"]
    node = subprocess.Popen([command[0], "serve", *command[1:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until_echo(port, node)
        other = SimpleNamespace(port=port, ae_title="NODE2")
        c_move(other, STUDY_ROOT, "RESEARCH", QueryRetrieveLevel="STUDY",  # type: ignore[arg-type]
               StudyInstanceUID=study)
    finally:
        node.terminate()
        node.wait(30)

    def copies(peer: Peer) -> list[tuple[str, ...]]:
        return sorted((str(d.PatientID), str(d.StudyInstanceUID), str(d.SOPInstanceUID),
                       str(d.StudyDate)) for d in peer.datasets)
    assert len(copies(first)) == 3 and copies(first) == copies(second)


def test_a_de_identified_peer_gets_copies_by_its_own_c_get(
        start_server: Callable[..., Running]) -> None:
    running = start_server(peers=[{"ae_title": "RESEARCH", "deidentify": "research"}],
                           **SETTINGS)
    datasets = one_study()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000
    ae = AE(ae_title="RESEARCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(US_IMAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title,
                         ext_neg=[build_role(CTImageStorage, scp_role=True),
                                  build_role(US_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = datasets[0].StudyInstanceUID
    responses = [rsp for rsp, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    final = responses[-1]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 1)
    assert len(received) == 3
    assert all(str(ds.PatientName).startswith("ANONYMOUS^") and
               str(ds.SOPInstanceUID).startswith("2.25.") for ds in received)


def test_routing_to_a_de_identified_peer_sends_copies_and_fails_the_withheld_at_once(
        start_server: Callable[..., Running],
        start_peer: Callable[..., Peer]) -> None:  # noqa: F811  (imported above)
    peer = start_peer("RESEARCH")
    running = start_server(peers=[{**peer.entry(), "deidentify": "research"}],
                           routes=[{"name": "all", "to": ["RESEARCH"]}],
                           **{**SETTINGS, "routing.retry_seconds": 60.0})
    datasets = one_study()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    wait_for("the three CT copies at RESEARCH", lambda: len(peer.datasets) == 3)
    wait_for("the ultrasound image failed", lambda: queue_of(running) == {"RESEARCH": (0, 1)})
    check_copies(peer, datasets)
    [entry] = running.archive.outbox.entries("RESEARCH")
    assert entry.sop_instance_uid == datasets[3].SOPInstanceUID
    assert entry.attempts == 1 and entry.failed  # not retried: it would be withheld again
    assert entry.last_error.startswith("withheld from a de-identified sending: Ultrasound")
    lines = audit_lines(running, "route")
    assert {line["profile"] for line in lines} == {"research"}
    assert sorted(uid for line in lines for uid in line.get("withheld", [])) == [
        str(datasets[3].SOPInstanceUID)]
