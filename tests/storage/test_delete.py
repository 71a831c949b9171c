"""Deleting instances (issue 16, item 1): the index rows and the counters in one transaction,
then the files; what a failure between the two leaves is removed by the next delete or by
``verify --repair``, and never indexed again."""

from __future__ import annotations

import datetime
from typing import Any

import peewee as pw
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, Model, Selection, StorageError, WriteResult, removal
from storage.models import Instance, Patient, PendingRemoval
from tests.factory import encode, expected_table, hierarchy, make_ds, study_counts


@pytest.fixture
def archive(new_archive: Archive) -> Archive:
    return new_archive


def stored(archive: Archive) -> list[Dataset]:
    datasets = hierarchy()
    for ds in datasets:
        archive.store(encode(ds), ExplicitVRLittleEndian)
    return datasets


def answers(archive: Archive) -> dict[str, tuple[int, int, set[str], set[str]]]:
    """What a STUDY level C-FIND of every study answers: its four computed keys."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    for keyword in ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                    "ModalitiesInStudy", "SOPClassesInStudy"):
        setattr(q, keyword, "")
    return {str(r.StudyInstanceUID): study_counts(r)
            for r in archive.find(archive.parse_query(q, Model.STUDY_ROOT))}


def patients(archive: Archive) -> dict[str, tuple[int, int, int]]:
    return {p.patient_id: (p.num_studies, p.num_series, p.num_instances)
            for p in Patient.select()}


def files(archive: Archive) -> set[str]:
    return set(archive.files.keys())


def test_a_series_goes_with_its_files_and_every_counter_follows(archive: Archive) -> None:
    datasets = stored(archive)
    study = datasets[0].StudyInstanceUID  # PID1's first study: CT 3, MR 2, OT 1
    mr = next(ds.SeriesInstanceUID for ds in datasets
              if ds.StudyInstanceUID == study and ds.Modality == "MR")
    gone = [ds for ds in datasets if ds.SeriesInstanceUID == mr]
    keys = {Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key
            for ds in gone}
    before = files(archive)

    done = archive.delete(Selection(series_uids=(mr,)))

    kept = [ds for ds in datasets if ds.SeriesInstanceUID != mr]
    assert (done.instances, done.series, done.studies, done.patients) == (2, 1, 0, 0)
    assert (done.files_removed, done.files_left) == (2, [])
    assert answers(archive) == expected_table(kept)
    assert answers(archive)[study][2] == {"CT", "OT"}  # ModalitiesInStudy without MR
    assert patients(archive)["PID1"] == (2, 3, 8)
    assert files(archive) == before - keys
    assert PendingRemoval.select().count() == 0
    report = archive.verify()
    assert report.problems == [] and report.instances == len(kept)


def test_a_patients_last_study_takes_the_patient_with_it(archive: Archive) -> None:
    datasets = stored(archive)
    pid1_first = datasets[0].StudyInstanceUID
    pid2 = {ds.StudyInstanceUID for ds in datasets if ds.PatientID == "PID2"}

    done = archive.delete(Selection(patient_ids=("PID2",), study_uids=(pid1_first,)))

    kept = [ds for ds in datasets
            if ds.PatientID != "PID2" and ds.StudyInstanceUID != pid1_first]
    assert (done.instances, done.studies, done.patients) == (9 + 6, 2, 1)
    assert answers(archive) == expected_table(kept)
    assert set(answers(archive)).isdisjoint(pid2 | {pid1_first})
    assert "PID2" not in patients(archive)
    assert patients(archive)["PID1"] == (1, 1, 4)
    assert len(files(archive)) == len(kept)
    assert archive.verify().problems == []


def test_one_instance_and_the_same_one_stored_again(archive: Archive) -> None:
    datasets = stored(archive)
    ds = datasets[-1]  # PID4's only instance
    assert archive.delete(Selection(instance_uids=(ds.SOPInstanceUID,))).instances == 1
    assert ds.StudyInstanceUID not in answers(archive)
    assert "PID4" not in patients(archive)

    again = archive.store(encode(ds), ExplicitVRLittleEndian)
    assert again.result is WriteResult.STORED  # a new instance, not a resend of a known one
    assert answers(archive) == expected_table(datasets)
    assert archive.verify().problems == []


def test_a_dry_run_lists_per_study_and_changes_nothing(archive: Archive) -> None:
    datasets = stored(archive)
    before = (answers(archive), files(archive))
    study = datasets[0].StudyInstanceUID
    one = datasets[0].SOPInstanceUID

    plan = archive.plan_delete(Selection(study_uids=(study,), instance_uids=(one,),
                                         patient_ids=("PID3",)))

    assert plan.instances == 6 + 2
    parts = {p.study_instance_uid: p for p in plan.studies_selected}
    assert (parts[study].selected, parts[study].held, parts[study].patient_id) == (6, 6, "PID1")
    assert [p.patient_name for p in parts.values() if p.patient_id == "PID3"] == ["Müller^Jürgen"]
    assert (answers(archive), files(archive)) == before
    assert archive.plan_delete(Selection(study_uids=("1.2.3.4",))).instances == 0


def test_nothing_selected_is_refused(archive: Archive) -> None:
    stored(archive)
    with pytest.raises(StorageError, match="nothing selected"):
        archive.delete(Selection())
    done = archive.delete(Selection(study_uids=("1.2.3.4",)))
    assert (done.instances, done.files_removed) == (0, 0)


def test_files_left_by_a_failure_after_the_commit_are_removed_not_indexed_again(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = stored(archive)
    pid3 = [ds for ds in datasets if ds.PatientID == "PID3"]
    keys = {Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID).file_key
            for ds in pid3}
    real_delete = archive.files.delete

    def cannot(key: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(archive.files, "delete", cannot)
    done = archive.delete(Selection(patient_ids=("PID3",)))
    assert (done.instances, done.files_removed, sorted(done.files_left)) == (2, 0, sorted(keys))
    assert keys <= files(archive)  # the files are there, the instances are not
    assert "PID3" not in patients(archive)
    assert {row.file_key for row in PendingRemoval.select()} == keys

    # verify reports them as a delete's files, not as unindexed instances to index again
    report = archive.verify()
    assert sorted(p.kind for p in report.problems) == ["deleted instance's file"] * 2
    assert not any(p.repaired for p in report.problems)
    assert "PID3" not in patients(archive)

    monkeypatch.setattr(archive.files, "delete", real_delete)
    repaired = archive.verify(repair=True)
    assert [p.repaired for p in repaired.problems] == [True, True]
    assert files(archive).isdisjoint(keys)
    assert PendingRemoval.select().count() == 0
    assert "PID3" not in patients(archive)
    assert archive.verify().problems == []
    assert answers(archive) == expected_table([ds for ds in datasets if ds.PatientID != "PID3"])


def test_the_next_delete_finishes_what_an_earlier_one_left(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = stored(archive)
    real_delete = archive.files.delete
    failing: list[Any] = [True]

    def flaky(key: str) -> None:
        if failing[0]:
            raise OSError(5, "Input/output error")
        real_delete(key)

    monkeypatch.setattr(archive.files, "delete", flaky)
    left = archive.delete(Selection(patient_ids=("PID4",))).files_left
    assert len(left) == 1 and left[0] in files(archive)
    failing[0] = False
    done = archive.delete(Selection(patient_ids=("PID3",)))
    assert (done.instances, done.files_removed, done.files_left) == (2, 2, [])
    assert left[0] not in files(archive)
    assert PendingRemoval.select().count() == 0
    assert len(files(archive)) == len(datasets) - 3


def test_an_index_that_cannot_be_written_deletes_nothing(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = stored(archive)
    before = (answers(archive), files(archive))

    def refused(study_ids: set[int]) -> None:  # late in the transaction: rows already gone
        raise pw.OperationalError("disk I/O error")

    monkeypatch.setattr(removal.index, "recompute_counters", refused)
    with pytest.raises(StorageError, match="nothing was deleted"):
        archive.delete(Selection(study_uids=(datasets[0].StudyInstanceUID,)))
    assert (answers(archive), files(archive)) == before
    assert PendingRemoval.select().count() == 0


def test_reindex_leaves_a_deleted_instances_file_out_and_live_files_stay(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of 8c7ce42: a file a delete could not remove was indexed again by reindex,
    and the next delete then removed the file under that live row."""
    datasets = stored(archive)
    real_delete = archive.files.delete
    monkeypatch.setattr(archive.files, "delete", lambda key: (_ for _ in ()).throw(
        OSError(5, "Input/output error")))
    left = archive.delete(Selection(patient_ids=("PID3",))).files_left
    assert len(left) == 2
    monkeypatch.setattr(archive.files, "delete", real_delete)

    archive.reindex()
    kept = [ds for ds in datasets if ds.PatientID != "PID3"]
    assert "PID3" not in patients(archive)
    assert answers(archive) == expected_table(kept)

    archive.delete(Selection(patient_ids=("PID4",)))  # removes PID3's files, nothing live
    kept = [ds for ds in kept if ds.PatientID != "PID4"]
    assert files(archive).isdisjoint(left)
    assert len(files(archive)) == len(kept)
    assert archive.verify().problems == []


def test_a_pending_file_that_a_row_names_again_is_kept(archive: Archive) -> None:
    """A file of a deleted instance indexed again (a reindex of an index without the
    pending rows' protection, an import) belongs to that instance: never removed."""
    datasets = stored(archive)
    live = Instance.get(Instance.sop_instance_uid == datasets[0].SOPInstanceUID).file_key
    with archive.writing():
        PendingRemoval.create(file_key=live, sop_instance_uid=datasets[0].SOPInstanceUID,
                              queued_at=datetime.datetime(2026, 1, 1))
    assert archive.verify().problems == []  # not reported as a deleted instance's file
    archive.delete(Selection(patient_ids=("PID4",)))
    assert live in files(archive)
    assert PendingRemoval.select().count() == 0
    assert archive.verify().problems == []


def test_only_what_was_listed_is_deleted(archive: Archive) -> None:
    """A delete confirmed from a listing removes what was listed, not an instance stored
    into the selection since (review of 8c7ce42)."""
    datasets = stored(archive)
    listed = archive.plan_delete(Selection(patient_ids=("PID2",)))
    late = make_ds(PatientID="PID2", PatientName="Smith^Anna", StudyDate="20250101")
    archive.store(encode(late), ExplicitVRLittleEndian)

    done = archive.delete(Selection(patient_ids=("PID2",)), only=listed.file_keys)

    assert done.instances == listed.instances == 9
    assert answers(archive) == expected_table(
        [ds for ds in datasets if ds.PatientID != "PID2"] + [late])
    assert patients(archive)["PID2"] == (1, 1, 1)


def test_a_query_selects_studies_as_c_find_matches_them(archive: Archive) -> None:
    datasets = stored(archive)
    by_date = Selection(query=(("StudyDate", "20240101-"),))  # PID1's two studies
    wanted = {ds.StudyInstanceUID for ds in datasets if (ds.get("StudyDate") or "") >= "2024"}
    assert {p.study_instance_uid for p in archive.plan_delete(by_date).studies_selected} \
        == wanted
    assert len(archive.selected(by_date)) == 10
    mr_and_date = Selection(query=(("ModalitiesInStudy", "MR"), ("StudyDate", "20220707")))
    assert archive.plan_delete(mr_and_date).instances == 0  # both must match
    with pytest.raises(StorageError, match="StudyDate"):
        archive.plan_delete(Selection(query=(("StudyDate", "yesterday"),)))

    done = archive.delete(Selection(query=(("ModalitiesInStudy", "MR"),),
                                    patient_ids=("PID3",)))  # the union of both
    kept = [ds for ds in datasets if ds.PatientID == "PID1"
            and ds.StudyInstanceUID != datasets[0].StudyInstanceUID]
    assert done.instances == len(datasets) - len(kept)
    assert answers(archive) == expected_table(kept)
