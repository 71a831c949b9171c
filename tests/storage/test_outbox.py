"""Routing's outbox (storage.outbox): what a route matches, rows written with the instance,
claims under a lease, put off then failed, a new store while a sender has an item, and
the leases of dead processes freed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, ArchiveOptions, Origin, Route, open_archive
from storage.models import OutboxItem
from storage.outbox import lease_owner
from tests.factory import encode, make_ds

ROUTES = (
    Route("ct-scanners", (("Modality", "CT"), ("CallingAETitle", "SCANNER*")), ("AI",)),
    Route("axial", (("ImageType", "AXIAL"),), ("RECON",)),  # multi-valued, in the JSON
    Route("does", (("PatientName", "Doe^*"), ("BodyPartExamined", "CHEST")), ("TEACH",)),
    Route("no-pn", (("PatientName", ""),), ("EMPTY",)),  # absent = empty
)


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(ArchiveOptions(
        files_path=tmp_path / "files", index_url=f"sqlite:///{tmp_path / 'index.sqlite'}",
        routes=ROUTES))
    yield archive
    archive.close()


def peers_of(archive: Archive, uid: str) -> set[str]:
    return {e.peer for e in archive.outbox.entries(failed=None) if e.sop_instance_uid == uid}


def test_what_each_route_matches(routed: Archive) -> None:
    cases = [
        (dict(Modality="CT"), "SCANNER2", {"AI"}),
        (dict(Modality="CT"), "WARD", set()),
        (dict(Modality="MR"), "SCANNER2", set()),
        (dict(Modality="MR", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"]), "X", {"RECON"}),
        (dict(Modality="MR", ImageType=["ORIGINAL", "PRIMARY"]), "X", set()),
        (dict(Modality="MR", PatientName="Doe^Jane", BodyPartExamined="CHEST"), "X",
         {"TEACH"}),
        (dict(Modality="MR", PatientName="Roe^Jane", BodyPartExamined="CHEST"), "X", set()),
        (dict(Modality="MR", PatientName=None), "X", {"EMPTY"}),
    ]
    for keywords, calling, expected in cases:
        ds = make_ds(**keywords)
        routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title=calling))
        assert peers_of(routed, str(ds.SOPInstanceUID)) == expected, (keywords, calling)


def test_claim_put_off_fail_retry_and_a_new_store_while_claimed(routed: Archive) -> None:
    outbox, me = routed.outbox, lease_owner()
    ds = make_ds(Modality="CT")
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    [entry] = outbox.claim("AI", me, 10, 60)
    assert outbox.claim("AI", me, 10, 60) == []  # leased
    outbox.put_off([entry], me, "no answer", lambda attempts: 0.0, max_attempts=2)
    [entry] = outbox.claim("AI", me, 10, 60)
    assert (entry.attempts, entry.last_error) == (1, "no answer")
    outbox.put_off([entry], me, "still no answer", lambda attempts: 0.0, max_attempts=2)
    assert outbox.claim("AI", me, 10, 60) == []  # failed: only by hand
    [failed] = outbox.entries(failed=True)
    assert (failed.attempts, failed.failed) == (2, True)
    assert outbox.retry("AI") == 1
    [entry] = outbox.claim("AI", me, 10, 60)
    assert entry.attempts == 0
    # stored again (other content) while the sender has it: it must go again
    ds.PatientName = "Other^Name"
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    outbox.sent([entry], me)
    [again] = outbox.claim("AI", me, 10, 60)
    assert again.generation == entry.generation + 1
    outbox.sent([again], me)
    assert outbox.entries(failed=None) == []


def test_a_claim_leases_exactly_what_it_returns_oldest_first(routed: Archive) -> None:
    outbox, me = routed.outbox, lease_owner()
    for _ in range(5):
        routed.store(encode(make_ds(Modality="CT")), ExplicitVRLittleEndian,
                     origin=Origin(ae_title="SCANNER1"))
    first = outbox.claim("AI", me, 2, 60)
    second = outbox.claim("AI", me, 2, 60)
    third = outbox.claim("AI", me, 2, 60)
    assert [len(first), len(second), len(third)] == [2, 2, 1]
    claimed = [e.id for e in first + second + third]
    assert claimed == sorted(claimed) and len(set(claimed)) == 5
    assert outbox.claim("AI", me, 2, 60) == []
    # read from the driver's rows: the same values the other readers convert with peewee
    listed = {e.id: e for e in outbox.entries(peer="AI", failed=None)}
    assert [listed[e.id] for e in first + second + third] == first + second + third
    assert [listed[e.id] for e, _ in routed.outbox.claim_instances("AI", "x", 9, 60)] == []
    held = {row.id: row.lease_owner for row in OutboxItem.select()
            if row.peer == "AI"}
    assert held == dict.fromkeys(claimed, me)
    # some of a batch stored again since: the rest are deleted, those go again
    ds = make_ds(Modality="CT")
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    [entry] = outbox.claim("AI", me, 10, 60)
    ds.PatientName = "Other^Name"
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    outbox.sent([*first, entry], me)
    assert [e.id for e in outbox.claim("AI", me, 10, 60)] == [entry.id]
    assert {row.id for row in OutboxItem.select() if row.peer == "AI"} == {
        *claimed[2:], entry.id}


def test_the_leases_of_dead_processes_are_freed(routed: Archive) -> None:
    import socket

    host = socket.gethostname()
    routed.store(encode(make_ds(Modality="CT")), ExplicitVRLittleEndian,
                 origin=Origin(ae_title="SCANNER1"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert routed.outbox.claim("AI", f"{host}:{dead}:0000", 10, 3600)
    assert routed.outbox.free_dead_leases("elsewhere") == 0  # another host's: left
    assert routed.outbox.claim("AI", lease_owner(), 10, 60) == []
    assert routed.outbox.free_dead_leases(host) == 1
    assert routed.outbox.claim("AI", lease_owner(), 10, 60)
    assert routed.outbox.free_dead_leases(host) == 0  # this process's own: alive
    routed.store(encode(make_ds(Modality="CT")), ExplicitVRLittleEndian,
                 origin=Origin(ae_title="SCANNER1"))
    assert routed.outbox.claim("AI", lease_owner() + ":2", 10, 60)  # a second sender's
    assert routed.outbox.free_dead_leases(host) == 0
    assert OutboxItem.select().count() == 2


def test_an_item_stored_again_while_it_failed_is_due_at_once(routed: Archive) -> None:
    outbox, me = routed.outbox, lease_owner()
    ds = make_ds(Modality="CT")
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    [entry] = outbox.claim("AI", me, 10, 3600)
    ds.PatientName = "Other^Name"
    routed.store(encode(ds), ExplicitVRLittleEndian, origin=Origin(ae_title="SCANNER1"))
    # the attempt at the old version failed: the new version is neither put off nor leased
    outbox.put_off([entry], me, "no answer", lambda attempts: 3600.0, max_attempts=1)
    [again] = outbox.claim("AI", me, 10, 60)
    assert (again.attempts, again.failed, again.generation) == (0, False, entry.generation + 1)



def test_a_long_batch_renews_its_lease_and_untried_items_are_let_go(routed: Archive) -> None:
    outbox, me = routed.outbox, lease_owner()
    for _ in range(3):
        routed.store(encode(make_ds(Modality="CT")), ExplicitVRLittleEndian,
                     origin=Origin(ae_title="SCANNER1"))
    batch = outbox.claim("AI", me, 10, lease_seconds=30)
    assert len(batch) == 3
    before = {r.id: r.lease_until for r in OutboxItem.select()}
    outbox.renew(batch, me, lease_seconds=600)
    outbox.renew(batch, "someone-else", lease_seconds=6000)  # not theirs: nothing changes
    after = {r.id: r.lease_until for r in OutboxItem.select()}
    assert all((after[i] - before[i]).total_seconds() > 500 for i in before), (before, after)
    assert outbox.claim("AI", "other:1:x", 10, lease_seconds=30) == []  # still ours
    outbox.let_go(batch[1:], me)  # a stopping sender had not tried these
    again = outbox.claim("AI", "other:1:x", 10, lease_seconds=30)
    assert sorted(e.id for e in again) == sorted(e.id for e in batch[1:])
    assert [e.attempts for e in again] == [0, 0]  # let go is not an attempt
