"""verify [--repair], reindex and import: the index and the file store made to agree after
what a crash or damage can leave, without losing an acknowledged instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive
from storage.models import Instance, Study
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
    assert "indexed under another file" in strays[superseded]

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
