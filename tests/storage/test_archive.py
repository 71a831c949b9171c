"""The archive over a real SQLite file and file store: the store path, duplicates,
counters and queries, without the network."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from storage import (
    Archive,
    ArchiveOptions,
    DuplicatePolicy,
    DuplicateRejected,
    InstanceUnavailable,
    InvalidInstance,
    Model,
    Origin,
    SOPClassMismatch,
    StorageError,
    StorageFull,
    WriteResult,
    index,
    open_archive,
)
from tests.conftest import STORE_LOCKS
from tests.factory import encode, expected_table, hierarchy, make_ds, study_counts, uid

STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "NumberOfStudyRelatedInstances",
              "NumberOfStudyRelatedSeries", "ModalitiesInStudy", "SOPClassesInStudy")


def options(tmp_path: Path, **kw: Any) -> ArchiveOptions:
    return ArchiveOptions(files_path=tmp_path / "files",
                          index_url=f"sqlite:///{tmp_path / 'index.sqlite'}", **kw)


@pytest.fixture
def make_archive(tmp_path: Path) -> Any:
    """Open archives (``make_archive(**options)``); all are closed after the test."""
    opened: list[Archive] = []

    def make(**kw: Any) -> Archive:
        a = open_archive(options(tmp_path, **kw))
        opened.append(a)
        return a

    yield make
    for a in opened:
        a.close()


@pytest.fixture
def archive(make_archive: Any) -> Archive:
    return make_archive()


def put(archive: Archive, ds: Dataset, ts: str = "1.2.840.10008.1.2.1", **kw: Any) -> Any:
    return archive.store(encode(ds, ts), ts, **kw)


def study_query(archive: Archive, **keys: Any) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    for k in STUDY_KEYS:
        setattr(q, k, "")
    for k, v in keys.items():
        setattr(q, k, v)
    return list(archive.find(archive.parse_query(q, Model.STUDY_ROOT)))


def check_counts(archive: Archive, datasets: list[Dataset]) -> None:
    got = {r.StudyInstanceUID: study_counts(r) for r in study_query(archive)}
    assert got == expected_table(datasets)


def stored_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "files").rglob("*")
            if p.is_file() and p.parent.name != "tmp" and p.name not in STORE_LOCKS]


def test_store_writes_the_senders_bytes_behind_a_file_meta_header(archive: Archive, tmp_path: Path) -> None:
    ds = make_ds()
    data = encode(ds, ImplicitVRLittleEndian)
    outcome = archive.store(data, ImplicitVRLittleEndian, origin=Origin("MODALITY", "127.0.0.1"))
    assert outcome.result is WriteResult.STORED
    [path] = stored_files(tmp_path)
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert raw.endswith(data)  # byte for byte as received
    assert ds.SOPInstanceUID not in str(path)  # opaque key, never a UID
    saved = dcmread(path)
    assert saved.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert saved.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert saved.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert saved.PatientName == "Doe^John"
    assert len(path.relative_to(tmp_path / "files").parts) == 3  # ab/cd/<key>
    assert not list((tmp_path / "files" / "tmp").iterdir())


def test_counters_match_the_stored_hierarchy(archive: Archive) -> None:
    datasets = hierarchy()
    for ds in datasets:
        assert put(archive, ds).result is WriteResult.STORED
    check_counts(archive, datasets)


@pytest.mark.parametrize(("policy", "result", "kept_description"), [
    (DuplicatePolicy.REPLACE, WriteResult.REPLACED, "second"),
    (DuplicatePolicy.KEEP, WriteResult.KEPT, "first"),
])
def test_duplicates_replace_or_keep(tmp_path: Path, make_archive: Any, policy: DuplicatePolicy,
                                    result: WriteResult, kept_description: str) -> None:
    archive = make_archive(on_duplicate=policy)
    first = make_ds(SeriesDescription="first")
    second = make_ds(SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                     SeriesInstanceUID=first.SeriesInstanceUID, SeriesDescription="second")
    assert put(archive, first).result is WriteResult.STORED
    assert put(archive, first).result is WriteResult.IDENTICAL  # a resend changes nothing
    assert put(archive, second).result is result
    files = stored_files(tmp_path)
    assert len(files) == 1
    assert dcmread(files[0]).SeriesDescription == kept_description
    check_counts(archive, [first])


def test_duplicate_reject(tmp_path: Path, make_archive: Any) -> None:
    archive = make_archive(on_duplicate=DuplicatePolicy.REJECT)
    first = make_ds()
    put(archive, first)
    assert put(archive, first).result is WriteResult.IDENTICAL
    with pytest.raises(DuplicateRejected):
        put(archive, make_ds(SOPInstanceUID=first.SOPInstanceUID))
    assert len(stored_files(tmp_path)) == 1
    check_counts(archive, [first])


def test_replacement_that_moves_an_instance_keeps_counts_exact(archive: Archive, tmp_path: Path) -> None:
    a = make_ds(Modality="CT")
    b = make_ds(StudyInstanceUID=a.StudyInstanceUID, SeriesInstanceUID=a.SeriesInstanceUID)
    moved = make_ds(SOPInstanceUID=b.SOPInstanceUID, Modality="MR", SOPClassUID=MRImageStorage)
    lone = make_ds()
    relocated = make_ds(SOPInstanceUID=lone.SOPInstanceUID, StudyInstanceUID=a.StudyInstanceUID)
    for ds in (a, b, moved, lone, relocated):
        put(archive, ds)
    check_counts(archive, [a, b, moved, lone, relocated])
    assert len(stored_files(tmp_path)) == 3
    # the study `lone` was in is gone, and so is its patient row's count of it
    assert index.Patient.get(index.Patient.patient_id == "PID1").num_studies == 2


def test_study_under_another_patient_is_filed_with_a_warning(archive: Archive) -> None:
    a = make_ds(PatientID="P-A")
    b = make_ds(PatientID="P-B", StudyInstanceUID=a.StudyInstanceUID)
    put(archive, a)
    outcome = put(archive, b)
    assert outcome.result is WriteResult.STORED
    assert any("belongs to PatientID 'P-A'" in w for w in outcome.warnings)
    [rsp] = study_query(archive)
    assert rsp.PatientID == "P-A" and int(rsp.NumberOfStudyRelatedInstances) == 2
    assert study_query(archive, PatientID="P-B") == []


def test_series_under_another_study_is_filed_with_a_warning(archive: Archive) -> None:
    a = make_ds()
    b = make_ds(SeriesInstanceUID=a.SeriesInstanceUID)  # a new study UID
    put(archive, a)
    outcome = put(archive, b)
    assert any("belongs to study" in w for w in outcome.warnings)
    [rsp] = study_query(archive)
    assert rsp.StudyInstanceUID == a.StudyInstanceUID
    assert int(rsp.NumberOfStudyRelatedInstances) == 2


@pytest.mark.parametrize(("data", "message"), [
    (b"\x00garbage" * 3, "cannot be parsed|is missing|has no VR|truncated"),
    (b"", "empty"),
])
def test_unparseable_data_is_refused(archive: Archive, data: bytes, message: str) -> None:
    with pytest.raises(InvalidInstance, match=message):
        archive.store(data, "1.2.840.10008.1.2.1")


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                     "SOPClassUID"])
def test_missing_uid_is_refused(archive: Archive, tmp_path: Path, missing: str) -> None:
    with pytest.raises(InvalidInstance, match=f"{missing} is missing"):
        put(archive, make_ds(**{missing: None}))
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.abc", "1." + "2" * 70])
def test_malformed_uid_is_refused(archive: Archive, bad: str) -> None:
    with pytest.raises(InvalidInstance, match="not a valid UID"):
        put(archive, make_ds(SOPInstanceUID=bad))


def test_sop_class_mismatch(archive: Archive) -> None:
    with pytest.raises(SOPClassMismatch):
        put(archive, make_ds(), sop_class_uid=MRImageStorage)


def test_truncated_data_set_is_refused(archive: Archive, tmp_path: Path) -> None:
    data = encode(make_ds(PatientComments="x" * 500))
    with pytest.raises(InvalidInstance):
        archive.store(data[:300], "1.2.840.10008.1.2.1")
    assert stored_files(tmp_path) == []


def test_index_failure_removes_the_new_file(archive: Archive, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise pw.OperationalError("disk I/O error")

    monkeypatch.setattr(index, "write_instance", broken)
    with pytest.raises(StorageFull, match="index"):
        put(archive, make_ds())
    assert stored_files(tmp_path) == []
    monkeypatch.undo()
    assert study_query(archive) == []


def test_file_store_write_error_is_out_of_resources(archive: Archive, tmp_path: Path) -> None:
    # a regular file where the temporary folder should be: every write fails, as when full
    tmp = tmp_path / "files" / "tmp"
    tmp.rmdir()
    tmp.write_text("in the way")
    with pytest.raises(StorageFull, match="cannot write"):
        put(archive, make_ds())
    assert study_query(archive) == []


def test_matching_with_sql_special_characters_on_a_real_index(archive: Archive) -> None:
    for acc in ("A%1", "AX1", "A_1", "A[1]", "a%1"):
        put(archive, make_ds(AccessionNumber=acc))
    def accessions(value: str) -> list[str]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.AccessionNumber = value
        return sorted(r.AccessionNumber for r in archive.find(archive.parse_query(q, Model.STUDY_ROOT)))
    assert accessions("A%1") == ["A%1"]
    assert accessions("A_1") == ["A_1"]
    assert accessions("A[1]") == ["A[1]"]
    assert accessions("A?1") == ["A%1", "AX1", "A_1"]
    assert accessions("A*") == ["A%1", "AX1", "A[1]", "A_1"]
    assert accessions("a*") == ["a%1"]


def test_study_level_matching_on_a_real_index(archive: Archive) -> None:
    datasets = hierarchy()
    for ds in datasets:
        put(archive, ds)
    def studies(**keys: Any) -> set[str]:
        return {str(r.AccessionNumber) for r in study_query(archive, AccessionNumber="", **keys)}
    assert studies() == {"A1", "A2", "A3", "A4", "A5"}
    assert studies(ModalitiesInStudy="CT") == {"A1", "A2", "A4"}
    assert studies(ModalitiesInStudy="CT\\MR") == {"A1", "A2", "A3", "A4", "A5"}
    assert studies(ModalitiesInStudy="OT") == {"A1", "A3"}
    assert studies(SOPClassesInStudy=MRImageStorage) == {"A1", "A3", "A5"}
    assert studies(PatientName="doe^john") == {"A1", "A2"}
    assert studies(PatientName="MULLER*") == {"A4"}
    assert studies(PatientName='""') == {"A5"}
    assert studies(PatientID="PID1") == {"A1", "A2"}
    assert studies(PatientID="pid1") == set()
    assert studies(StudyDate="20240101-") == {"A1", "A2"}
    assert studies(StudyDate="-20231231") == {"A3", "A4"}
    assert studies(StudyDate="20231120") == {"A3"}
    assert studies(StudyTime="1000-1100") == {"A1", "A2", "A3", "A4", "A5"}
    assert studies(StudyTime="1016-") == set()
    assert studies(StudyInstanceUID=f"{datasets[0].StudyInstanceUID}\\{uid()}") == {"A1"}
    assert studies(StudyDescription="Study ?") == {"A1", "A2", "A3", "A4", "A5"}
    [a4] = study_query(archive, AccessionNumber="A4")
    assert a4.PatientName == "Müller^Jürgen"
    assert a4.SpecificCharacterSet == "ISO_IR 192"


def test_restart_gives_the_same_answers(make_archive: Any) -> None:
    datasets = hierarchy()
    first = make_archive()
    for ds in datasets:
        put(first, ds)
    before = [r.to_json_dict() for r in study_query(first)]
    first.close()
    second = make_archive()
    assert [r.to_json_dict() for r in study_query(second)] == before
    check_counts(second, datasets)


def test_index_uses_wal_and_foreign_keys(archive: Archive, tmp_path: Path) -> None:
    put(archive, make_ds())
    con = sqlite3.connect(tmp_path / "index.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    assert archive.database.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1


@pytest.mark.parametrize(("durability", "fsyncs", "synchronous"), [
    (True, True, 2),    # storage.durability: full -> fsync, synchronous=FULL
    (False, False, 1),  # relaxed -> no fsync, synchronous=NORMAL
])
def test_durability_setting(make_archive: Any, monkeypatch: pytest.MonkeyPatch, durability: bool,
                            fsyncs: bool, synchronous: int) -> None:
    import storage.files

    archive = make_archive(durable=durability)
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(storage.files.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    put(archive, make_ds())
    assert (len(calls) >= 2) is fsyncs  # the file and its folder
    assert archive.database.execute_sql("PRAGMA synchronous").fetchone()[0] == synchronous


def test_a_second_archive_in_one_process_is_refused(archive: Archive, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="already open"):
        open_archive(options(tmp_path / "other"))


def test_leftover_temporary_files_are_removed_on_open(make_archive: Any, tmp_path: Path) -> None:
    first = make_archive()
    part = tmp_path / "files" / "tmp" / "deadbeef.part"
    part.write_bytes(b"half a file")
    first.close()
    make_archive()
    assert not part.exists()


def test_long_uid_list_on_a_real_index(archive: Archive) -> None:
    stored = [make_ds() for _ in range(3)]
    for ds in stored:
        put(archive, ds)
    wanted = [stored[0].StudyInstanceUID, stored[2].StudyInstanceUID]
    uids = [uid() for _ in range(2999)] + wanted
    got = study_query(archive, StudyInstanceUID="\\".join(uids))
    assert sorted(r.StudyInstanceUID for r in got) == sorted(wanted)
    many = "\\".join(["XX"] * 1000 + ["CT"])
    assert len(study_query(archive, ModalitiesInStudy=many)) == 3


def test_studies_without_patient_id_keep_their_own_demographics(archive: Archive) -> None:
    put(archive, make_ds(PatientID="", PatientName="Alpha^Anna", PatientSex="F"))
    put(archive, make_ds(PatientID=None, PatientName="Beta^Bob", PatientSex="M"))
    got = {str(r.PatientName) for r in study_query(archive)}
    assert got == {"Alpha^Anna", "Beta^Bob"}
    [beta] = study_query(archive, PatientName="Beta*")
    assert beta.PatientName == "Beta^Bob"


def test_other_demographics_under_a_known_patient_id_are_reported(archive: Archive) -> None:
    put(archive, make_ds(PatientID="P7", PatientName="Alpha^Anna"))
    outcome = put(archive, make_ds(PatientID="P7", PatientName="Other^Name"))
    assert outcome.result is WriteResult.STORED
    assert any("already filed with other patient_name" in w for w in outcome.warnings)


def test_replacement_refreshes_the_index(archive: Archive) -> None:
    first = make_ds(PatientName="Wrong^Name", StudyDescription="typo 1", Modality="CT")
    fixed = make_ds(SOPInstanceUID=first.SOPInstanceUID, StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID, PatientName="Right^Name",
                    StudyDescription="Chest CT", Modality="MR", SOPClassUID=MRImageStorage)
    put(archive, first)
    assert put(archive, fixed).result is WriteResult.REPLACED
    [rsp] = study_query(archive, StudyDescription="")
    assert (rsp.PatientName, rsp.StudyDescription) == ("Right^Name", "Chest CT")
    assert study_counts(rsp) == (1, 1, {"MR"}, {MRImageStorage})
    assert len(study_query(archive, PatientName="right*")) == 1
    assert study_query(archive, PatientName="wrong*") == []


def test_first_value_of_a_multi_valued_single_value_key_is_matched(archive: Archive) -> None:
    put(archive, make_ds(AccessionNumber=["A1", "A2"]))
    [rsp] = study_query(archive, AccessionNumber="A1")
    assert list(rsp.AccessionNumber) == ["A1", "A2"]  # returned as received
    assert study_query(archive, AccessionNumber="A2") == []  # the README's documented rule


def test_truncated_pixel_data_is_refused(archive: Archive, tmp_path: Path) -> None:
    data = encode(make_ds(PixelData=bytes(512)))
    with pytest.raises(InvalidInstance, match=r"\(7FE0,0010\) is truncated"):
        archive.store(data[:-300], "1.2.840.10008.1.2.1")
    assert stored_files(tmp_path) == []


def test_unterminated_encapsulated_pixel_data_is_refused(archive: Archive) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = make_ds(PixelData=encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"]))
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = encode(ds)  # explicit VR little endian bytes, the same layout as JPEG's
    assert archive.store(data, JPEGBaseline8Bit).result is WriteResult.STORED
    other = make_ds(PixelData=encapsulate([bytes(100)]))
    other["PixelData"].VR = "OB"
    other["PixelData"].is_undefined_length = True
    cut = encode(other)[:-8]  # no sequence delimiter
    with pytest.raises(InvalidInstance, match="never ends"):
        archive.store(cut, JPEGBaseline8Bit)


def _deflate(data: bytes) -> bytes:
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def test_deflated_data_sets_are_inflated_only_as_far_as_the_header(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED

    import storage.parsing

    monkeypatch.setattr(storage.parsing, "HEADER_LIMIT", 64 * 1024)
    monkeypatch.setattr(storage.parsing, "INFLATED_LIMIT", 4 * 1024 * 1024)
    big = make_ds(Rows=1024, Columns=1024, PixelData=bytes(2 * 1024 * 1024))
    assert archive.store(_deflate(encode(big)), DEFLATED).result is WriteResult.STORED
    bomb = make_ds(Rows=2048, Columns=2048, PixelData=bytes(8 * 1024 * 1024))
    with pytest.raises(InvalidInstance, match="inflates beyond"):
        archive.store(_deflate(encode(bomb)), DEFLATED)
    with pytest.raises(InvalidInstance, match="truncated"):
        archive.store(_deflate(encode(make_ds()))[:-20], DEFLATED)


def test_no_transaction_is_open_between_responses(archive: Archive, tmp_path: Path) -> None:
    from storage import query as query_module
    from storage.models import database_proxy

    other = sqlite3.connect(tmp_path / "index.sqlite", timeout=0)
    datasets = hierarchy()
    for ds in datasets:
        put(archive, ds)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    parsed = archive.parse_query(q, Model.STUDY_ROOT)
    rows = 0
    for _ in query_module.select_rows(parsed, page_size=2):  # several pages
        rows += 1
        db = database_proxy.obj
        assert not db.in_transaction()
        # a write (into a known study, so the result set does not grow) lands in the WAL...
        put(archive, make_ds(StudyInstanceUID=datasets[0].StudyInstanceUID,
                             SeriesInstanceUID=datasets[0].SeriesInstanceUID))
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # ...and can be checkpointed: no reader holds a snapshot open
    assert rows == 5
    other.close()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def test_sequence_matching_on_a_real_index(archive: Archive) -> None:
    """PS3.4 C.2.2.2.6: one item; its keys matched item by item; an empty item returns the
    whole sequence; returned items hold only the requested item keys."""
    chest = make_ds(AccessionNumber="S1", ProcedureCodeSequence=[
        _code("CT-CHEST", "LOCAL", "CT Chest"), _code("CT-ABD", "LOCAL", "CT Abdomen")])
    head = make_ds(AccessionNumber="S2", ProcedureCodeSequence=[_code("MR-HEAD", "LOCAL", "MR Head")])
    none = make_ds(AccessionNumber="S3")
    for ds in (chest, head, none):
        put(archive, ds)

    def query(**item_keys: str) -> dict[str, Any]:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.AccessionNumber = ""
        item = Dataset()
        for k, v in item_keys.items():
            setattr(item, k, v)
        q.ProcedureCodeSequence = [item]
        return {str(r.AccessionNumber): r.ProcedureCodeSequence
                for r in archive.find(archive.parse_query(q, Model.STUDY_ROOT))}

    got = query(CodeValue="CT-ABD", CodeMeaning="")
    assert list(got) == ["S1"]
    # only the matching items come back, holding only the requested item keys
    assert [(i.CodeValue, i.CodeMeaning) for i in got["S1"]] == [("CT-ABD", "CT Abdomen")]
    assert all("CodingSchemeDesignator" not in i for i in got["S1"])
    assert [len(v) for v in query(CodeValue="CT-*", CodingSchemeDesignator="LOCAL").values()] == [2]
    assert query(CodeValue="CT-CHEST", CodeMeaning="MR Head") == {}  # one item must match all
    everything = query()  # an empty item: universal, the whole sequence comes back
    assert sorted(everything) == ["S1", "S2", "S3"]
    assert len(everything["S1"]) == 2 and everything["S1"][0].CodingSchemeDesignator == "LOCAL"
    assert len(everything["S3"]) == 0


def test_retrieve_lists_the_instances_below_each_match(archive: Archive, tmp_path: Path) -> None:
    datasets = hierarchy()
    for ds in datasets:
        put(archive, ds)

    def retrieve(level: str, model: Model = Model.STUDY_ROOT, **keys: Any) -> set[str]:
        q = Dataset()
        q.QueryRetrieveLevel = level
        for k, v in keys.items():
            setattr(q, k, v)
        return {i.sop_instance_uid for i in archive.retrieve(archive.parse_query(q, model))}

    def uids(pred: Any) -> set[str]:
        return {ds.SOPInstanceUID for ds in datasets if pred(ds)}

    first, other = datasets[0], datasets[-1]
    assert retrieve("PATIENT", Model.PATIENT_ROOT, PatientID="PID1") == uids(
        lambda d: d.PatientID == "PID1")
    both = f"{first.StudyInstanceUID}\\\\{other.StudyInstanceUID}"  # a UID list
    assert retrieve("STUDY", StudyInstanceUID=both) == uids(
        lambda d: d.StudyInstanceUID in (first.StudyInstanceUID, other.StudyInstanceUID))
    assert retrieve("SERIES", StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID) == uids(
        lambda d: d.SeriesInstanceUID == first.SeriesInstanceUID)
    assert retrieve("IMAGE", StudyInstanceUID=first.StudyInstanceUID,
                    SeriesInstanceUID=first.SeriesInstanceUID,
                    SOPInstanceUID=first.SOPInstanceUID) == {first.SOPInstanceUID}
    assert retrieve("STUDY", StudyInstanceUID=uid()) == set()

    [item] = archive.retrieve(archive.parse_query(
        Dataset.from_json({"00080052": {"vr": "CS", "Value": ["STUDY"]},
                           "0020000D": {"vr": "UI", "Value": [other.StudyInstanceUID]}}),
        Model.STUDY_ROOT))
    assert archive.read_instance(item).SOPInstanceUID == other.SOPInstanceUID
    for path in stored_files(tmp_path):
        path.unlink()
    with pytest.raises(InstanceUnavailable, match="cannot be read"):
        archive.read_instance(item)


def test_find_stops_scanning_when_cancelled(archive: Archive) -> None:
    for i in range(5):
        put(archive, make_ds(PatientID=f"C{i}", AdditionalPatientHistory="no match"))
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.AdditionalPatientHistory = "never"  # matched in Python only: every row is scanned
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2

    assert list(archive.find(archive.parse_query(q, Model.STUDY_ROOT), cancelled)) == []
    assert len(asked) == 3  # it stopped at the third row instead of scanning all five


def test_stored_data_set_is_the_senders_bytes_and_fails_before_yielding(
        archive: Archive) -> None:
    """What a retrieve sends as stored (Archive.stored_data_set): the data set exactly as
    received, without the File Meta group; a file that cannot serve fails at the first
    piece, before anything could be sent."""
    from storage import InstanceUnavailable, NotAsWritten, StoredInstance
    from storage.models import Instance

    ds = make_ds()
    raw = encode(ds, ImplicitVRLittleEndian)
    put(archive, ds, ImplicitVRLittleEndian)
    row = Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID)
    item = StoredInstance(row.sop_class_uid, row.sop_instance_uid, row.transfer_syntax_uid,
                          row.file_key, row.file_size)
    assert b"".join(archive.stored_data_set(item)) == raw
    path = archive.files.path(item.file_key)
    whole = path.read_bytes()
    path.write_bytes(whole[:-10])  # shorter than indexed
    with pytest.raises(InstanceUnavailable, match="shorter than indexed"):
        next(archive.stored_data_set(item))
    path.write_bytes(whole[:132] + whole[144:])  # no File Meta group length
    with pytest.raises(NotAsWritten):
        next(archive.stored_data_set(item))
    path.unlink()
    with pytest.raises(InstanceUnavailable, match="cannot be read"):
        next(archive.stored_data_set(item))
