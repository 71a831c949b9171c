"""The audit trail (issue 16, item 7): who did what, when, with what result, as JSON lines,
from the DICOM listener, the HTTP listener and the command line; appended by several
processes without interleaving, rotated by size."""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from scp.audit import AuditTrail
from scp.logs import JsonLines
from tests.conftest import associate, find
from tests.factory import encode, hierarchy, make_ds
from tests.test_atna import Repository, events, repositories, schema  # noqa: F401 - fixtures
from tests.test_cli import minipacs_command
from tests.web.conftest import WebRunning
from tests.web.test_stow import body, part10, post


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def wait_for(path: Path, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """The trail once ``done`` says it holds what is awaited (the server writes an
    association's end just after the peer's release returns)."""
    deadline = time.monotonic() + 30
    while True:
        got = lines(path) if path.exists() else []
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.02)  # poll interval


def test_associations_operations_and_requests_are_in_the_trail(
        start_web: Callable[..., WebRunning]) -> None:
    web = start_web(**{"peers": [{"ae_title": "PYTEST"}], "security.allow_unknown_peers": False})
    trail = web.dicom.config.audit_path
    datasets = hierarchy()[:2]
    assoc = associate(web.dicom)
    assert assoc.send_c_echo().Status == status.SUCCESS
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    _, final = find(web.dicom, QueryRetrieveLevel="STUDY", PatientID="PID1",
                    StudyInstanceUID="", ModalitiesInStudy=["CT", "MR"])
    assert final == status.SUCCESS
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context("1.2.840.10008.1.1")
    assert stranger.associate("127.0.0.1", web.dicom.port,
                              ae_title=web.dicom.ae_title).is_rejected
    assert httpx.get(f"{web.url}/studies", params={"PatientID": "PID1"}).status_code == 200
    assert httpx.get(f"{web.root}/metrics").status_code == 200  # not audited

    got = wait_for(trail, lambda ls: sum(e["event"] == "association-released"
                                         for e in ls) == 2 and any(e["event"] == "http"
                                                                   for e in ls))
    events = [e["event"] for e in got]
    assert events.count("association-established") == 2
    assert events.count("association-released") == 2
    assert all(e["time"].endswith("Z") for e in got)
    stores = [e for e in got if e.get("operation") == "C-STORE"]
    assert [(e["status"], e["calling_ae"], e["sop_instance_uid"]) for e in stores] == [
        ("0000", "PYTEST", ds.SOPInstanceUID) for ds in datasets]
    echo = next(e for e in got if e.get("operation") == "C-ECHO")
    assert echo["status"] == "0000" and echo["address"] == "127.0.0.1"
    query = next(e for e in got if e.get("operation") == "C-FIND")
    assert query["keys"]["PatientID"] == "PID1" and query["keys"]["QueryRetrieveLevel"] == "STUDY"
    assert query["keys"]["ModalitiesInStudy"] == "CT\\MR"  # a multi-value as on the wire
    ended = [e for e in got if e["event"] == "association-released"]
    assert {"echo": 1, "store": 2} in [e["operations"] for e in ended]
    rejected = next(e for e in got if e["event"] == "association-rejected")
    assert rejected["calling_ae"] == "STRANGER" and "reason" in rejected
    http = [e for e in got if e["event"] == "http"]
    assert len(http) == 1  # the /metrics scrape is not an action
    assert (http[0]["service"], http[0]["method"], http[0]["status"], http[0]["query"]) == (
        "QIDO-RS", "GET", 200, "PatientID=PID1")


def test_a_delete_from_the_command_line_says_who(tmp_path: Path, server: Any) -> None:
    for ds in hierarchy():
        server.archive.store(encode(ds), ExplicitVRLittleEndian)
    done = subprocess.run(
        [*minipacs_command(), "delete", "--patient", "PID3", "--yes", "--data-dir",
         str(server.data_dir)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [entry] = [e for e in lines(server.config.audit_path) if e["event"] == "delete"]
    assert entry["user"] and entry["selection"] == {"patient_ids": ["PID3"]}
    assert (entry["instances"], entry["studies"], entry["patients"]) == (2, 1, 1)


def test_disabled_writes_nothing(start_server: Callable[..., Any]) -> None:
    running = start_server(**{"audit.enabled": False})
    assoc = associate(running)
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    assert not running.config.audit_path.exists()


WRITER = """
import sys
from pathlib import Path
from scp.audit import AuditTrail
trail = AuditTrail(Path(sys.argv[1]), 2000, 1000)
for n in range(int(sys.argv[3])):
    trail.record("test", writer=sys.argv[2], n=n, padding="x" * 40)
trail.close()
"""


def test_several_processes_append_whole_lines_and_rotate_together(tmp_path: Path) -> None:
    """Four processes write 400 lines each into a trail rotated every 2,000 bytes: every
    line is whole, none is lost (1,000 backups keep them all), none is written twice."""
    path = tmp_path / "audit.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w), "400"],
                              cwd=Path(__file__).resolve().parents[2])  # the repository
             for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    files = [path, *sorted(tmp_path.glob("audit.jsonl.[0-9]*"))]
    assert len(files) > 10  # rotated many times
    seen = [(e["writer"], e["n"]) for f in files for e in lines(f)]
    assert sorted(seen) == sorted((str(w), n) for w in range(4) for n in range(400))
    # a file may pass the size by the lines written while another process renames it


def test_rotation_keeps_the_backups_asked_for(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "a.jsonl", 300, 3)
    for n in range(100):
        trail.record("test", n=n)
    trail.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "a.jsonl", "a.jsonl.1", "a.jsonl.2", "a.jsonl.3"]
    kept = [e["n"] for name in ("a.jsonl.3", "a.jsonl.2", "a.jsonl.1", "a.jsonl")
            for e in lines(tmp_path / name)]
    assert kept == list(range(kept[0], 100))  # the newest, in order, oldest dropped


def test_json_log_lines() -> None:
    record = logging.LogRecord("minipacs", logging.WARNING, __file__, 1, "a %s line", ("json",),
                               None)
    line = json.loads(JsonLines().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "minipacs",
                                                                "a json line")
    assert line["time"].endswith("Z")


def test_a_huge_or_deflated_identifier_is_not_written_out(server: Any) -> None:
    """Review of 002856f: the keys of a query were decoded again by pynetdicom (a deflated
    identifier inflated whole) and written out however large."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = "P" * 64
    block = query.private_block(0x0009, "MINIPACS TEST", create=True)
    block.add_new(0x01, "OB", bytes(200_000))
    _, final = find(server, **{k.keyword: k.value for k in query if k.keyword})
    assoc = associate(server)
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert responses[-1][0].Status in (status.SUCCESS, status.PENDING_WARNING)
    got = wait_for(server.config.audit_path,
                   lambda ls: sum(e.get("operation") == "C-FIND" for e in ls) == 2)
    small, large = [e for e in got if e.get("operation") == "C-FIND"]
    assert small["keys"]["PatientID"] == "P" * 64
    assert "not recorded" in large["keys"]["(identifier)"]
    assert max(len(line) for line in server.config.audit_path.read_text().splitlines()) < 4000


def test_a_rotation_that_fails_loses_no_line(tmp_path: Path) -> None:
    """Review of 002856f: after one failed rotation every later line was lost."""
    (tmp_path / "a.jsonl.lock").mkdir()  # cannot be opened as the rotation's lock file
    trail = AuditTrail(tmp_path / "a.jsonl", 300, 3)
    for n in range(20):
        trail.record("test", n=n)
    trail.close()
    assert [e["n"] for e in lines(tmp_path / "a.jsonl")] == list(range(20))


def test_a_line_that_cannot_be_encoded_is_written_escaped_never_raised(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path / "a.jsonl", 10_000, 3)
    trail.record("delete", user="\udcff")  # an undecodable byte of argv (surrogateescape)
    trail.record("after", n=1)
    trail.close()
    trail.record("closed", n=2)  # an operation that outlived the server: dropped quietly
    got = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(got) == 2 and "\\udcff" in got[0] and json.loads(got[1])["n"] == 1


def test_dicomweb_requests_reach_the_audit_repository_in_the_atna_form(
        start_web: Callable[..., WebRunning], schema: etree.RelaxNG,  # noqa: F811
        repositories: list[Repository]) -> None:  # noqa: F811
    repository = Repository("tcp")
    repositories.append(repository)
    web = start_web(**{"audit.syslog": repository.url})
    ds = make_ds(PatientID="ATNA1")
    study = str(ds.StudyInstanceUID)
    assert post(web, body(part10(ds)), Accept="application/dicom+json").status_code == 200
    assert httpx.get(f"{web.url}/studies", params={"PatientID": "ATNA1"}).status_code == 200
    assert httpx.get(f"{web.url}/studies/{study}/metadata").status_code == 200
    assert httpx.delete(f"{web.url}/studies/{study}").status_code == 200
    assert httpx.get(f"{web.root}/").status_code == 200  # the page: no audit message
    # a last query marks the end: it is the sixth message only if the page sent none
    assert httpx.get(f"{web.url}/studies", params={"PatientID": "LAST"}).status_code in (
        200, 204)

    got = events(repository.wait_for(6), schema)  # the application's start, then these
    last = got[5][2].find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert last is not None and base64.b64decode(last.text).endswith(b"PatientID=LAST")
    by_action = {xml.find("EventIdentification").get("EventActionCode"): (event, xml)
                 for event, _, xml in got[1:5]}
    assert {action: event for action, (event, _) in by_action.items()} == {
        "C": "110104", "E": "110112", "R": "110104", "D": "110105"}
    for action in "CRD":
        named = by_action[action][1].find("ParticipantObjectIdentification")
        assert named.get("ParticipantObjectID") == study, action
    query = by_action["E"][1].find("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert base64.b64decode(query.text).endswith(b"/studies?PatientID=ATNA1")
    stowed = by_action["C"][1]
    assert [(p.get("UserID"), p.get("NetworkAccessPointID")) for p in stowed.findall(
        "ActiveParticipant")] == [("anonymous", "127.0.0.1"),
                                  (web.dicom.ae_title, socket.gethostname())]


def test_a_long_list_of_uids_is_cut_between_two_of_them(
        start_web: Callable[..., WebRunning]) -> None:
    web = start_web()
    uids = ["1.2.826.0.1.3680043.8.498." + str(10**37 + n) for n in range(5)]  # 64 each
    assert all(len(u) == 64 for u in uids)
    _, final = find(web.dicom, QueryRetrieveLevel="STUDY", StudyInstanceUID=uids)
    assert final == status.SUCCESS
    got = wait_for(web.dicom.config.audit_path,
                   lambda ls: any(e.get("operation") == "C-FIND" for e in ls))
    recorded = next(e for e in got if e.get("operation") == "C-FIND")["keys"]
    kept = recorded["StudyInstanceUID"].split("\\")
    assert kept == uids[:len(kept)] and 1 <= len(kept) < len(uids)  # whole UIDs only
