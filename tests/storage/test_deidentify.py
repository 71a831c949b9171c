"""De-identification (PS3.15 Annex E): the reader of Table E.1-1's DocBook, the actions of
Table E.1-1a driven by the table's rows, the options, and keyed consistency.

The table here is tests/storage/data/part15-sample.xml: the standard's DocBook layout with
rows typed in for the tests. Every check that walks "each row" reads its expectations from
that table, not from a list of its own.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from storage import StorageError
from storage.deidentify import (
    Deidentifier,
    Option,
    Profile,
    Table,
    action,
    burned_in,
    read_table,
)

SAMPLE = Path(__file__).parent / "data" / "part15-sample.xml"
SECRET = b"a secret of the site, 32 bytes.."
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def table() -> Table:
    return read_table(SAMPLE)


def patient_ds(patient_id: str = "PID-12345", name: str = "Doe^John", study: str = "1.2.3.4",
               sop: str = "1.2.3.4.5.6") -> Dataset:
    """A CT header carrying an attribute of (nearly) every row of the sample table."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = study + ".1"
    ds.FrameOfReferenceUID = study + ".9"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700215"
    ds.PatientSex = "M"
    ds.PatientAge = "054Y"
    ds.MedicalAlerts = f"allergic; call {name.replace('^', ' ')}'s wife"
    ds.AccessionNumber = "ACC-778899"
    ds.StudyDate = "20240301"
    ds.StudyTime = "101500"
    ds.ContentDate = "20240302"
    ds.DateOfLastCalibration = "20240101"
    ds.DeviceSerialNumber = "SN-4711"
    ds.InstitutionName = "St. Elsewhere"
    ds.StationName = "CT-ROOM-2"
    ds.OperatorsName = "Tech^Tina"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.StudyDescription = f"CT head for {patient_id} John Doe"
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = sop + ".7"
    ds.ReferencedImageSequence = Sequence([ref])
    request = Dataset()
    request.RequestedProcedureID = "RP-1"
    ds.RequestAttributesSequence = Sequence([request])
    content = Dataset()
    content.ValueType = "TEXT"
    content.TextValue = "John Doe, seen 2024-03-01"
    content.ReferencedSOPSequence = Sequence([copy.deepcopy(ref)])
    ds.ContentSequence = Sequence([content])
    ds.add_new(0x60003000, "OW", b"\x01\x02" * 8)  # Overlay Data, group 6000
    ds.add_new(0x60023000, "OW", b"\x03\x04" * 8)  # and 6002
    block = ds.private_block(0x0029, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "operator: Tina Tech")
    block.add_new(0x11, "DS", "1.5")
    other = ds.private_block(0x0031, "OTHER VENDOR", create=True)
    other.add_new(0x01, "LO", "John Doe")
    return ds


def deidentify(table: Table, ds: Dataset, *options: Option,
               **profile: object) -> Dataset:
    chosen = Profile("test", frozenset(options), **profile)  # type: ignore[arg-type]
    return Deidentifier(table, chosen, SECRET).apply(ds).dataset


_GONE = object()


def _pairs(before: Dataset, after: Dataset) -> list[tuple[int, object, object]]:
    """(tag, value before, value after or _GONE) of every attribute of ``before``, nested
    ones included where the sequence kept its items."""
    found: list[tuple[int, object, object]] = []
    for element in before:
        tag = int(element.tag)
        there = after.get(tag)
        found.append((tag, element.value, there.value if there is not None else _GONE))
        if (element.VR == "SQ" and there is not None
                and len(there.value) == len(element.value)):
            for old, new in zip(element.value, there.value, strict=True):
                found += _pairs(old, new)
    return found


def check_row(code: str, before: object, after: object, present: bool) -> str | None:
    """What is wrong with one attribute's outcome under ``code`` (Table E.1-1a), or None.
    The combined codes are taken as minipacs documents: X/Z as Z, Z/D, X/D and X/Z/D as D,
    X/Z/U* as a kept sequence whose UIDs have their own rows."""
    if code == "X":
        return None if not present else f"kept {after!r}"
    if not present:
        return "removed"
    if code in ("Z", "X/Z"):
        return None if after in ("", None) or after != before else f"kept {after!r}"
    if code in ("D", "Z/D", "X/D", "X/Z/D", "U"):
        return None if after not in ("", None) and after != before else f"gave {after!r}"
    if code in ("K", "X/Z/U*", "C"):
        return None  # checked by the option tests, value by value
    return f"unknown code {code}"


def test_the_reader_takes_every_row_with_its_columns(table: Table) -> None:
    assert table.edition == "2099z"
    assert len(table.rules) == 26 and table.private is not None
    assert len(table.sha256) == 64
    by_tag = {rule.tag: rule for rule in table}
    assert by_tag["(0008,0020)"].basic == "Z"
    assert by_tag["(0008,0020)"].options == {Option.RETAIN_LONG_FULL_DATES: "K",
                                             Option.RETAIN_LONG_MODIFIED_DATES: "C"}
    assert table.private.options == {Option.RETAIN_SAFE_PRIVATE: "C"}
    # a repeating group covers its even groups; an odd group is private (PS3.5 7.6, 7.8)
    assert table.rule(0x60003000).name == table.rule(0x601E3000).name == "Overlay Data"
    assert table.rule(0x60033000) is table.private
    assert table.rule(0x00291010) is table.private
    assert table.rule(0x00080060) is None  # Modality: not in the table, kept


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("<para>Z/D</para>", "<para>Q</para>", 1),
     "row 2 Content Date \\(0008,0023\\): unknown action 'Q' under 'Basic Prof.'"),
    (lambda t: t.replace("Clean Graph. Opt.", "Something Else"), "unknown columns"),
    (lambda t: t.replace('xml:id="table_E.1-1"', 'xml:id="table_E.1-2"'), "has no table"),
    (lambda t: t.replace("<td align=\"left\"><para>(0008,0050)</para></td>",
                         "<td align=\"left\" colspan=\"2\"><para>(0008,0050)</para></td>"),
     "row 1 .* is not one cell per column"),
    (lambda t: t.replace("(0008,0050)", "(0008,005)"), "row 1 Accession Number: unknown tag"),
    (lambda t: t[:200], "cannot read"),
])
def test_the_reader_refuses_a_table_it_does_not_know(
        tmp_path: Path, edit: Callable[[str], str], message: str) -> None:
    path = tmp_path / "part15.xml"
    path.write_text(edit(SAMPLE.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(StorageError, match=message):
        read_table(path)


def test_the_basic_profile_applies_each_row_of_the_table(table: Table) -> None:
    ds = patient_ds()
    out = deidentify(table, ds)
    problems = []
    for rule in table:
        pairs = [(tag, b, a) for tag, b, a in _pairs(ds, out) if rule.covers(tag)]
        assert pairs, f"the test data set has nothing for {rule.name} {rule.tag}"
        for tag, before, after in pairs:
            wrong = check_row(rule.basic, before, after, after is not _GONE)
            if wrong:
                problems.append(f"{rule.name} {rule.tag} at {tag:08X} ({rule.basic}): {wrong}")
    assert problems == []
    assert not [e.tag for e in out if e.tag.is_private]
    # inside sequences the rows apply too (E.1.1: every attribute, nested ones included)
    [ref] = out.ReferencedImageSequence
    assert ref.ReferencedSOPClassUID == CT
    assert ref.ReferencedSOPInstanceUID.startswith("2.25.")
    assert ref.ReferencedSOPInstanceUID != ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    # the instance's own references stay consistent with what they point at
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.Modality == "CT" and out.SOPClassUID == CT


def test_the_result_says_how_it_was_de_identified(table: Table) -> None:
    out = deidentify(table, patient_ds(), Option.RETAIN_LONG_MODIFIED_DATES,
                     Option.CLEAN_DESCRIPTORS)
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == "PS3.15 2099z E.1-1 test"
    assert [(i.CodeValue, i.CodingSchemeDesignator) for i in
            out.DeidentificationMethodCodeSequence] == [
        ("113100", "DCM"), ("113107", "DCM"), ("113105", "DCM")]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert deidentify(table, patient_ds()).LongitudinalTemporalInformationModified == "REMOVED"
    assert deidentify(table, patient_ds(), Option.RETAIN_LONG_FULL_DATES
                      ).LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_the_original_is_not_changed(table: Table) -> None:
    ds = patient_ds()
    before = copy.deepcopy(ds)
    deidentify(table, ds, Option.RETAIN_LONG_MODIFIED_DATES, Option.CLEAN_DESCRIPTORS)
    assert ds == before and ds.file_meta == before.file_meta


def test_an_option_overrides_the_basic_profile_and_cleaning_wins(table: Table) -> None:
    by_tag = {rule.tag: rule for rule in table}
    calibration = by_tag["(0018,1200)"]
    assert action(calibration, []) == "X"
    assert action(calibration, [Option.RETAIN_DEVICE_IDENTITY]) == "K"
    assert action(calibration, [Option.RETAIN_DEVICE_IDENTITY,
                                Option.RETAIN_LONG_MODIFIED_DATES]) == "C"
    assert action(by_tag["(0008,0050)"], list(Option)) == "Z"  # no option has a code


def test_retain_options_keep_their_rows(table: Table) -> None:
    ds = patient_ds()
    out = deidentify(table, ds, Option.RETAIN_UIDS, Option.RETAIN_DEVICE_IDENTITY,
                     Option.RETAIN_INSTITUTION_IDENTITY, Option.RETAIN_PATIENT_CHARACTERISTICS,
                     Option.RETAIN_LONG_FULL_DATES)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                    "FrameOfReferenceUID", "DeviceSerialNumber", "StationName",
                    "InstitutionName", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
                    "ContentDate", "DateOfLastCalibration"):
        assert out[keyword].value == ds[keyword].value, keyword
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert out.PatientName != ds.PatientName and out.OperatorsName != ds.OperatorsName


def test_modified_dates_move_by_one_shift_per_patient(table: Table) -> None:
    """PS3.15 E.3.6: dates change, the intervals between them do not, for all of a
    patient's instances and studies; times stay."""
    first = deidentify(table, patient_ds(study="1.2.3.4"), Option.RETAIN_LONG_MODIFIED_DATES)
    later = patient_ds(study="1.2.3.99", sop="1.2.3.99.1")
    later.StudyDate = "20250301"
    second = deidentify(table, later, Option.RETAIN_LONG_MODIFIED_DATES)
    assert first.StudyDate != "20240301"
    import datetime as dt

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value, "%Y%m%d").date()
    shift = day("20240301") - day(first.StudyDate)
    assert 1 <= shift.days <= 3650
    assert day("20250301") - day(second.StudyDate) == shift
    assert day("20240302") - day(first.ContentDate) == shift
    assert day("20240101") - day(first.DateOfLastCalibration) == shift
    assert first.StudyTime == "101500"
    other = deidentify(table, patient_ds(patient_id="PID-999"), Option.RETAIN_LONG_MODIFIED_DATES)
    assert other.StudyDate != first.StudyDate  # another patient, another shift


def test_clean_descriptors_keeps_text_without_the_identifying_values(table: Table) -> None:
    ds = patient_ds()
    out = deidentify(table, ds, Option.CLEAN_DESCRIPTORS)
    # "PID-12345 John Doe": the PatientID, and the name's parts (a private attribute says
    # "John Doe" too): gone, the rest kept
    assert out.StudyDescription in ("CT head for *** *** ***", "CT head for *** ***")
    assert out.MedicalAlerts in ("allergic; call *** ***'s wife", "allergic; call ***'s wife")
    assert out.RequestAttributesSequence[0].RequestedProcedureID == "RP-1"
    assert "StudyDescription" not in deidentify(table, ds)


def test_clean_structured_content_keeps_the_tree_and_cleans_inside(table: Table) -> None:
    ds = patient_ds()
    out = deidentify(table, ds, Option.CLEAN_STRUCTURED_CONTENT)
    [item] = out.ContentSequence
    assert item.ValueType == "TEXT"
    assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        out.ReferencedImageSequence[0].ReferencedSOPInstanceUID  # the same UID, replaced alike
    basic = deidentify(table, ds)
    assert basic.ContentSequence != ds.ContentSequence  # D: a dummy in place of the tree


def test_safe_private_keeps_only_what_the_profile_lists(table: Table) -> None:
    ds = patient_ds()
    elsewhere = ds.private_block(0x0051, "ACME 1.0", create=True)  # same creator, another
    elsewhere.add_new(0x11, "LO", "Doe^John was here")  # group: another attribute
    out = deidentify(table, ds, Option.RETAIN_SAFE_PRIVATE,
                     safe_private=frozenset({(0x0029, "ACME 1.0", 0x11)}))
    assert out.private_block(0x0029, "ACME 1.0")[0x11].value == "1.5"
    assert not [e for e in out if e.tag.group == 0x0051]
    assert 0x00291010 not in out  # same block, not listed
    assert 0x00310010 not in out and 0x00311001 not in out  # another vendor's
    assert not [e.tag for e in deidentify(table, ds, Option.RETAIN_SAFE_PRIVATE)
                if e.tag.is_private]


def test_the_same_patient_gets_the_same_pseudonym_and_uids_in_every_study(
        table: Table) -> None:
    one = deidentify(table, patient_ds(study="1.2.3.4"))
    two = deidentify(table, patient_ds(study="1.2.3.5", sop="1.2.3.5.1"))
    assert one.PatientID == two.PatientID and one.PatientName == two.PatientName
    assert one.PatientID not in ("", "PID-12345")
    assert one.StudyInstanceUID != two.StudyInstanceUID
    again = deidentify(table, patient_ds(study="1.2.3.4"))
    assert again.SOPInstanceUID == one.SOPInstanceUID
    assert again.StudyInstanceUID == one.StudyInstanceUID
    other = deidentify(table, patient_ds(patient_id="PID-999"))
    assert other.PatientID != one.PatientID
    keyed = Deidentifier(table, Profile("test"), b"another secret of 32 bytes......")
    assert keyed.apply(patient_ds()).dataset.SOPInstanceUID != one.SOPInstanceUID


REPLACE_IN_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from storage.deidentify import Deidentifier, Profile, read_table
from pydicom.dataset import Dataset
ds = Dataset()
ds.PatientID, ds.PatientName, ds.SOPInstanceUID = "PID-12345", "Doe^John", "1.2.3.4.5.6"
out = Deidentifier(read_table(Path(sys.argv[1])), Profile("test"), sys.argv[2].encode()
                   ).apply(ds).dataset
print(out.PatientID, out.PatientName, out.SOPInstanceUID)
"""


def test_another_process_replaces_alike(table: Table) -> None:
    """Two nodes with the same secret: nothing per process (hash seeds, counters) enters
    a replacement."""
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.SOPInstanceUID = "PID-12345", "Doe^John", "1.2.3.4.5.6"
    here = Deidentifier(table, Profile("test"), SECRET).apply(ds).dataset
    there = subprocess.run([sys.executable, "-c", REPLACE_IN_ANOTHER_PROCESS, str(SAMPLE),
                            SECRET.decode()], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "random", "PATH": ""},
                           cwd=Path(__file__).parents[2])
    assert there.stdout.split() == [here.PatientID, str(here.PatientName), here.SOPInstanceUID]


def test_a_short_secret_is_refused(table: Table) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Deidentifier(table, Profile("test"), b"short")


def test_a_profile_that_contradicts_itself_says_so() -> None:
    assert Profile("p", frozenset({Option.RETAIN_LONG_FULL_DATES,
                                   Option.RETAIN_LONG_MODIFIED_DATES})).problems() == [
        "profile p: retain_long_full_dates and retain_long_modified_dates exclude each other "
        "(PS3.15 E.3.6)"]
    assert Profile("p", safe_private=frozenset({(0x0029, "ACME", 1)})).problems() == [
        "profile p: safe_private needs the retain_safe_private option"]
    assert Profile("p", frozenset(Option)).problems() != []
    assert Profile("p", frozenset({Option.CLEAN_DESCRIPTORS})).problems() == []


@pytest.mark.parametrize(("keywords", "reason"), [
    ({"BurnedInAnnotation": "YES", "Modality": "CT"}, "Burned In Annotation (0028,0301) is YES"),
    ({"BurnedInAnnotation": "NO", "Modality": "US",
      "SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, None),
    ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"},
     "Secondary Capture Image Storage without Burned In Annotation (0028,0301) NO"),
    ({"Modality": "US", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.99"},
     "Modality US without Burned In Annotation (0028,0301) NO"),
    ({"Modality": "CT", "SOPClassUID": CT}, None),
])
def test_burned_in_annotation_is_flagged(keywords: dict[str, str], reason: str | None) -> None:
    ds = Dataset()
    for keyword, value in keywords.items():
        setattr(ds, keyword, value)
    assert burned_in(ds) == reason


def test_a_data_set_read_from_the_store_is_de_identified(table: Table, tmp_path: Path) -> None:
    """The store's reader (storage.convert.AsStored) hands out converted copies of its
    elements: values set on those would not stay."""
    from pydicom import dcmread

    from storage.convert import as_stored

    path = tmp_path / "one.dcm"
    patient_ds().save_as(path, enforce_file_format=True)
    out = deidentify(table, as_stored(dcmread(path)))
    assert str(out.PatientName).startswith("ANONYMOUS^")
    assert out.SOPInstanceUID.startswith("2.25.")


@pytest.mark.parametrize("implicit", [False, True])
def test_the_encoded_data_set_is_rewritten_alike_in_either_vr_encoding(
        table: Table, implicit: bool) -> None:
    """C-MOVE's path (:meth:`Deidentifier.apply_encoded`): the stored bytes rewritten,
    Explicit or Implicit VR Little Endian, give what :meth:`Deidentifier.apply` gives; the
    pixel data is copied as encoded."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    ds = patient_ds()
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x02" * 32
    ds.add_new(0x00091001, "UN", b"private bytes")  # odd group: removed in either encoding
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    chosen = Profile("test", frozenset({Option.RETAIN_LONG_MODIFIED_DATES,
                                        Option.CLEAN_DESCRIPTORS}))
    deidentifier = Deidentifier(table, chosen, SECRET)
    done = deidentifier.apply_encoded(buffer.getvalue(), implicit)
    got = read_dataset(BytesIO(done.data), implicit, True)
    expected = deidentifier.apply(ds).dataset
    for keyword in ("PatientID", "PatientName", "SOPInstanceUID", "StudyInstanceUID",
                    "StudyDate", "ContentDate", "PatientIdentityRemoved",
                    "DeidentificationMethod", "LongitudinalTemporalInformationModified"):
        assert str(got[keyword].value) == str(expected[keyword].value), keyword
    # private values have no VR in Implicit VR: "John Doe" there is not one whole value
    assert got.StudyDescription.startswith("CT head for ***")
    assert not {"John", "Doe", "PID"} & set(got.StudyDescription.replace("*", " ").split())
    assert got.ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
        expected.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert [i.CodeValue for i in got.DeidentificationMethodCodeSequence] == [
        "113100", "113107", "113105"]
    assert got.PixelData == ds.PixelData
    assert not [e.tag for e in got if e.tag.is_private]
    assert done.uids[str(ds.SOPInstanceUID)] == got.SOPInstanceUID


def test_long_kept_runs_go_out_as_views_of_the_original_not_copies(table: Table) -> None:
    """A CT's pixel data is most of its bytes: the rewrite refers to it in the original
    instead of copying it (stream.LONG_RUN); the pieces joined are the same data set."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import write_dataset

    from storage.deidentify.stream import LONG_RUN

    ds = patient_ds()
    ds.BitsAllocated = 16
    ds.PixelData = bytes(range(256)) * (LONG_RUN // 128)  # 2 * LONG_RUN bytes
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "OB", b"\x07" * LONG_RUN)  # a long private value: removed
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    original = buffer.getvalue()
    done = Deidentifier(table, Profile("test"), SECRET).apply_encoded(original, False)
    views = [c for c in done.chunks if isinstance(c, memoryview)]
    assert len(views) == 1 and views[0].obj is original
    assert bytes(views[0]).endswith(ds.PixelData)
    assert not any(isinstance(c, memoryview) and len(c) < LONG_RUN for c in done.chunks)
    got = read_dataset(BytesIO(done.data), False, True)
    assert got.PixelData == ds.PixelData
    assert got.PatientName != ds.PatientName
    assert not [e.tag for e in got if e.tag.is_private]


def test_burned_in_pixels_are_withheld_before_anything_is_rewritten(table: Table) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from storage import Withheld

    ds = patient_ds()
    ds.BurnedInAnnotation = "YES"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    deidentifier = Deidentifier(table, Profile("test"), SECRET)
    with pytest.raises(Withheld, match="Burned In Annotation \\(0028,0301\\) is YES"):
        deidentifier.apply_encoded(buffer.getvalue(), False, withhold_burned_in=True)
    assert deidentifier.apply_encoded(buffer.getvalue(), False).data  # when allowed


def test_a_data_set_cut_short_cannot_be_de_identified(table: Table) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from storage import CannotConvert

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, patient_ds())
    with pytest.raises(CannotConvert, match="cannot de-identify"):
        Deidentifier(table, Profile("test"), SECRET).apply_encoded(
            buffer.getvalue()[:-7], False)


def test_the_file_meta_keeps_only_what_says_what_the_file_holds(table: Table) -> None:
    """The Source Application Entity Title (the sender's AE, which the store records) and
    private File Meta elements do not follow a de-identified copy."""
    ds = patient_ds()
    ds.file_meta.SourceApplicationEntityTitle = "STELSEWHERE_CT2"
    out = deidentify(table, ds)
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert out.file_meta.MediaStorageSOPClassUID == CT
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_clean_graphics_blanks_overlay_data_keeping_its_size(table: Table) -> None:
    out = deidentify(table, patient_ds(), Option.CLEAN_GRAPHICS)
    assert out[0x60003000].value == bytes(16) and out[0x60023000].value == bytes(16)
    assert 0x60003000 not in deidentify(table, patient_ds())


def test_a_data_set_cut_inside_a_long_header_cannot_be_de_identified(table: Table) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from storage import CannotConvert

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, patient_ds())
    cut = buffer.getvalue() + b"\xe0\x7f\x10\x00OB\x00\x00"  # 8 of Pixel Data's 12 bytes
    with pytest.raises(CannotConvert, match="ends inside the header of 7FE00010"):
        Deidentifier(table, Profile("test"), SECRET).apply_encoded(cut, False)


def test_an_unreadable_table_is_said_once_not_read_again(tmp_path: Path) -> None:
    from storage import DeidentifyOptions, StorageError
    from storage.deidentify import Deidentifiers

    missing = tmp_path / "part15.xml"
    profiles = Deidentifiers(DeidentifyOptions(missing, "s" * 16, {"p": Profile("p")}))
    with pytest.raises(StorageError, match="cannot read") as first:
        profiles.get("p")
    missing.write_bytes(SAMPLE.read_bytes())  # not read again in this process
    with pytest.raises(StorageError) as second:
        profiles.get("p")
    assert str(second.value) == str(first.value)


@pytest.mark.parametrize(("tag", "options"), [
    (0x00281201, frozenset()),  # LUT Data, known, not a sequence, not in the table
    (0x60003000, frozenset({Option.CLEAN_GRAPHICS})),  # Overlay Data, cleaned
    (0x00291010, frozenset({Option.CLEAN_DESCRIPTORS})),  # private, dropped
])
def test_a_un_value_that_starts_like_an_item_is_not_taken_for_a_sequence(
        table: Table, tag: int, options: frozenset[Option]) -> None:
    """A UN value of a known non-sequence attribute, or one that does not read as items,
    is a value (review of dce8901: such instances were refused)."""
    import struct

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = patient_ds()
    for element in [e for e in ds if e.tag.is_private]:
        del ds[element.tag]
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    value = b"\xfe\xff\x00\xe0" + b"\x22" * 12  # an item tag, then no item
    element = struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"UN", 0, len(value)) + value
    if tag >> 16 & 1:  # its creator first
        element = struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", 8) + b"ACME 1.0" + element
    data = buffer.getvalue() + element  # last, out of tag order: the rewrite reads it so
    done = Deidentifier(table, Profile("test", options), SECRET).apply_encoded(data, False)
    assert done.data  # rewritten, not refused
