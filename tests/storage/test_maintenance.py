"""verify [--repair], reindex and import: the index and the file store made to agree after
what a crash or damage can leave, without losing an acknowledged instance."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, Selection, maintenance, removal
from storage.models import Instance, PendingRemoval, Study
from storage.parsing import extract, file_meta, read_header
from tests.factory import encode, expected_table, hierarchy, make_ds, save


@pytest.fixture
def archive(new_archive: Archive) -> Archive:
    return new_archive


def stored(archive: Archive) -> list[Any]:
    datasets = hierarchy()
    for ds in datasets:
        archive.store(encode(ds), ExplicitVRLittleEndian)
    return datasets


def counts(archive: Archive) -> dict[str, Any]:
    return {s.study_instance_uid: (s.num_series, s.num_instances) for s in Study.select()}


def path_of(archive: Archive, uid: str) -> Path:
    key = Instance.get(Instance.sop_instance_uid == uid).file_key
    return archive.files.path(key)  # type: ignore[attr-defined, no-any-return]


def test_a_healthy_archive_verifies_clean(archive: Archive) -> None:
    datasets = stored(archive)
    report = archive.verify()
    assert (report.instances, report.files, report.problems) == (len(datasets), len(datasets), [])


def test_missing_file_changed_file_and_drifted_counters(archive: Archive) -> None:
    datasets = stored(archive)
    before = counts(archive)
    lost, changed = datasets[0], datasets[1]
    path_of(archive, lost.SOPInstanceUID).unlink()
    p = path_of(archive, changed.SOPInstanceUID)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the pixel data
    p.write_bytes(bytes(raw))
    Study.update(num_instances=Study.num_instances + 5).execute()  # drifted counters

    report = archive.verify()
    kinds = sorted(p.kind for p in report.problems)
    assert kinds.count("missing file") == 1 and kinds.count("changed file") == 1
    assert kinds.count("counter") == len(before)
    assert not any(p.repaired for p in report.problems)
    assert counts(archive) != before  # verify alone changes nothing

    repaired = archive.verify(repair=True)
    assert {p.kind for p in repaired.unrepaired} == {"changed file"}  # never deleted
    assert path_of(archive, changed.SOPInstanceUID).exists()
    assert not Instance.select().where(Instance.sop_instance_uid == lost.SOPInstanceUID).exists()
    remaining = [ds for ds in datasets if ds is not lost]
    assert counts(archive) == {uid: (series, instances) for uid, (series, instances, _, _)
                               in expected_table(remaining).items()}
    assert [p.kind for p in archive.verify().problems] == ["changed file"]


def test_stray_files_are_indexed_or_removed(archive: Archive) -> None:
    datasets = stored(archive)
    # a file written but never indexed (the server died before its commit)
    orphan = make_ds()
    parsed = extract(read_header(encode(orphan), ExplicitVRLittleEndian))
    unindexed = archive.files.put((file_meta(parsed, ExplicitVRLittleEndian, "X"),
                                   encode(orphan)))
    # a file replaced by a newer one but not yet removed
    old = datasets[0]
    parsed = extract(read_header(encode(old), ExplicitVRLittleEndian))
    superseded = archive.files.put((file_meta(parsed, ExplicitVRLittleEndian, "X"),
                                    encode(old)))
    report = archive.verify()
    strays = {p.subject: p.detail for p in report.problems if p.kind == "stray file"}
    assert set(strays) == {unindexed, superseded}
    assert "is not indexed" in strays[unindexed]
    assert "indexed under another, intact file" in strays[superseded]

    archive.verify(repair=True)
    assert set(archive.files.keys()) == {r.file_key for r in Instance.select()}
    assert Instance.select().where(Instance.sop_instance_uid == orphan.SOPInstanceUID).exists()
    assert Instance.select().count() == len(datasets) + 1
    assert archive.verify().problems == []


def test_reindex_rebuilds_the_same_index(archive: Archive) -> None:
    datasets = stored(archive)
    before = counts(archive)
    keys = {r.sop_instance_uid: r.file_key for r in Instance.select()}
    report = archive.reindex()
    assert (report.stored, report.duplicates, report.rejected) == (len(datasets), 0, [])
    assert counts(archive) == before
    assert {r.sop_instance_uid: r.file_key for r in Instance.select()} == keys  # in place
    assert archive.verify().problems == []


def test_import_a_folder(archive: Archive, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    datasets = hierarchy()[:6]
    for n, ds in enumerate(datasets):
        save(ds, folder / "sub" / f"{n}.dcm")
    save(datasets[0], folder / "again.dcm")  # the same instance twice
    (folder / "notes.txt").write_text("not DICOM")
    report = archive.import_folder(folder)
    assert (report.stored, report.duplicates) == (6, 1)
    assert [Path(name).name for name, _ in report.rejected] == ["notes.txt"]
    assert "not a DICOM Part 10 file" in report.rejected[0][1]
    assert Instance.select().count() == 6


def _put_copy(archive: Archive, ds: Any, mtime: float | None = None) -> str:
    """A file of ``ds`` no row points to, as a crash or a restore leaves one."""
    parsed = extract(read_header(encode(ds), ExplicitVRLittleEndian))
    key = archive.files.put((file_meta(parsed, ExplicitVRLittleEndian, "X"), encode(ds)))
    if mtime is not None:
        import os

        os.utime(archive.files.path(key), (mtime, mtime))  # type: ignore[attr-defined]
    return key


def test_the_only_intact_copy_is_never_deleted(archive: Archive) -> None:
    """The indexed file is damaged, a stray file holds the same instance intact: repair
    indexes the intact copy; nothing is deleted."""
    datasets = stored(archive)
    ds = datasets[0]
    damaged = path_of(archive, ds.SOPInstanceUID)
    intact = _put_copy(archive, ds)
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    report = archive.verify(repair=True)
    assert [p.kind for p in report.unrepaired] == []
    assert Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key == intact
    assert damaged.exists()  # kept: now a stray of an intact instance, removed next time
    assert any(p.subject == intact and "indexed" in p.detail for p in report.problems)


def test_copies_of_an_unindexed_instance_newest_wins_ties_are_kept(archive: Archive) -> None:
    v1, v2 = make_ds(), None
    v2 = make_ds(SOPInstanceUID=v1.SOPInstanceUID, StudyInstanceUID=v1.StudyInstanceUID,
                 SeriesInstanceUID=v1.SeriesInstanceUID, PatientID=v1.PatientID,
                 InstanceNumber="99")
    older, newer = _put_copy(archive, v1, 1_000_000), _put_copy(archive, v2, 2_000_000)
    archive.verify(repair=True)
    row = Instance.get(Instance.sop_instance_uid == v1.SOPInstanceUID)
    assert row.file_key == newer and not archive.files.path(older).exists()  # type: ignore[attr-defined]

    w1 = make_ds()
    w2 = make_ds(SOPInstanceUID=w1.SOPInstanceUID, StudyInstanceUID=w1.StudyInstanceUID,
                 SeriesInstanceUID=w1.SeriesInstanceUID, PatientID=w1.PatientID,
                 InstanceNumber="7")
    a, b = _put_copy(archive, w1, 3_000_000), _put_copy(archive, w2, 3_000_000)
    report = archive.verify(repair=True)
    tied = [p for p in report.unrepaired if p.kind == "stray file"]
    assert {p.subject for p in tied} == {a, b} and "equally new" in tied[0].detail
    assert not Instance.select().where(Instance.sop_instance_uid == w1.SOPInstanceUID).exists()


def test_reindex_keeps_the_file_the_index_named(archive: Archive) -> None:
    """An old version's file left by a crash (or restored from a backup with newer times)
    does not win over the acknowledged version the index named; nothing is deleted."""
    datasets = stored(archive)
    ds = datasets[0]
    current = Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key
    old = make_ds(SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=ds.StudyInstanceUID,
                  SeriesInstanceUID=ds.SeriesInstanceUID, PatientID=ds.PatientID,
                  InstanceNumber="1234")
    stale = _put_copy(archive, old, 4_000_000_000)  # newer time than everything
    report = archive.reindex()
    assert (report.stored, report.duplicates) == (len(datasets), 1)
    assert Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key == current
    assert archive.files.path(stale).exists()  # type: ignore[attr-defined]


def _orphan(archive: Archive) -> tuple[Any, str]:
    """A file written and never indexed: its data set and key."""
    ds = make_ds()
    parsed = extract(read_header(encode(ds), ExplicitVRLittleEndian))
    return ds, archive.files.put((file_meta(parsed, ExplicitVRLittleEndian, "X"), encode(ds)))


def test_a_stray_another_verify_indexed_meanwhile_is_not_removed(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``verify --repair`` at once (beside a cluster, nothing keeps them apart): one
    indexes a stray; the other, which listed it as a stray before, must not remove it as
    "indexed under another, intact file": it is that file."""
    ds, key = _orphan(archive)
    real = maintenance._strays

    def listed_then_indexed_by_another(*args: Any) -> Any:
        found = real(*args)
        archive.index_file(key)  # the other verify, between the listing and the repair
        return found

    monkeypatch.setattr(maintenance, "_strays", listed_then_indexed_by_another)
    archive.verify(repair=True)
    monkeypatch.undo()
    assert key in set(archive.files.keys())
    assert Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key == key
    assert archive.verify().problems == []


def test_an_instance_deleted_while_verify_runs_is_not_indexed_again(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete commits (rows gone, the file queued for removal) after verify listed the
    files: the file looks like a stray of an instance not indexed, and must not be indexed
    again (the delete then removes it)."""
    datasets = stored(archive)
    gone = datasets[0]
    real_rows = maintenance._rows
    real_delete = archive.files.delete

    def deleted_meanwhile() -> Any:
        def not_yet(key: str) -> None:  # the delete's removal of the file comes later
            raise OSError("not yet")

        monkeypatch.setattr(archive.files, "delete", not_yet)
        archive.delete(Selection(instance_uids=(str(gone.SOPInstanceUID),)))
        monkeypatch.setattr(archive.files, "delete", real_delete)
        return real_rows()

    monkeypatch.setattr(maintenance, "_rows", deleted_meanwhile)
    report = archive.verify(repair=True)
    monkeypatch.undo()
    assert not Instance.select().where(
        Instance.sop_instance_uid == gone.SOPInstanceUID).exists()
    assert [p.kind for p in report.problems] == ["deleted instance's file"]
    assert removal.finish(archive.files, archive.writing) == (1, [])
    assert archive.verify().problems == []


def test_a_deleted_instances_file_indexed_again_is_not_removed(archive: Archive) -> None:
    datasets = stored(archive)
    key = Instance.get(Instance.sop_instance_uid == datasets[0].SOPInstanceUID).file_key
    PendingRemoval.create(file_key=key, sop_instance_uid=datasets[0].SOPInstanceUID,
                          queued_at=datetime.datetime.now())
    assert removal._remove(archive.files, [key], archive.writing) == (1, [])
    assert key in set(archive.files.keys())
    assert archive.verify().problems == []


def test_reindex_missing_indexes_what_no_row_names_and_keeps_the_index(
        archive: Archive) -> None:
    datasets = stored(archive)
    keys = {r.sop_instance_uid: r.file_key for r in Instance.select()}
    ds, key = _orphan(archive)
    lost = datasets[1]  # a row the index lost (its counters recounted by verify)
    Instance.delete().where(Instance.sop_instance_uid == lost.SOPInstanceUID).execute()
    report = archive.reindex(missing_only=True)
    assert (report.stored, report.duplicates, report.rejected) == (2, 0, [])
    after = {r.sop_instance_uid: r.file_key for r in Instance.select()}
    assert after == {**keys, ds.SOPInstanceUID: key}  # the others kept their rows as they were
    archive.verify(repair=True)  # the counters the lost row left behind
    assert archive.verify().problems == []


def test_counters_are_recounted_a_page_of_patients_per_transaction(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify holds the index's write lock (every node's, on PostgreSQL) for one page of
    patients at a time, and finds the same drift as in one go."""
    stored(archive)
    Study.update(num_instances=Study.num_instances + 5).execute()
    whole = sorted(p.subject for p in archive.verify().problems)
    monkeypatch.setattr(maintenance, "COUNT_PAGE", 1)
    transactions = 0
    real = archive.writing

    def counted(commit: bool = True) -> Any:
        nonlocal transactions
        transactions += 1
        return real(commit)

    monkeypatch.setattr(archive, "writing", counted)
    paged = archive.verify(repair=True)
    assert sorted(p.subject for p in paged.problems) == whole and whole
    assert transactions >= len({s.patient_id for s in Study.select()}) > 1
    assert archive.verify().problems == []
