"""storage/fastparse.py against the path it stands in for: ``extract(read_header(...))``.

Every case is read three ways: pydicom's path (the reference), :func:`fast_parse` alone, and
:func:`parse_header` (what the archive calls). Whenever the fast path gives a result it
must be the reference's, field for field and the JSON strings byte for byte; it must never
give one where the reference refuses the data set; and the cases the fast path claims must
not be declined, so that a fast path that silently never runs fails here.
"""

from __future__ import annotations

import sqlite3
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian

from storage import Archive, InvalidInstance
from storage.fastparse import Declined, fast_parse
from storage.parsing import Parsed, extract, parse_header, read_header, split_part10

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

Outcome = Parsed | str  # a result, or the InvalidInstance message


def reference(data: bytes, ts: str) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd values on purpose
        try:
            return extract(read_header(data, ts))
        except InvalidInstance as exc:
            return f"InvalidInstance: {exc}"


def fast(data: bytes, ts: str) -> Outcome | None:
    """The fast path's outcome; None when it declines."""
    try:
        return fast_parse(data, ts)
    except Declined:
        return None
    except InvalidInstance as exc:
        return f"InvalidInstance: {exc}"


def check(data: bytes, ts: str, claimed: bool) -> Outcome:
    """The three ways agree; the fast path ran if ``claimed``. Returns the reference."""
    expected = reference(data, ts)
    got = fast(data, ts)
    if got is not None:
        assert got == expected
    if claimed:
        assert got is not None, "the fast path declined a case it claims"
        assert isinstance(got, Parsed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            through: Outcome = parse_header(data, ts)
        except InvalidInstance as exc:
            through = f"InvalidInstance: {exc}"
    assert through == expected
    return expected


# -- pydicom's test files ------------------------------------------------------------------


def little_endian_test_files() -> Iterator[Any]:
    """pydicom's test files that are Part 10 files in a little endian transfer syntax.

    Skipped: files without a readable File Meta header (raw data sets, ACR-NEMA, damaged
    meta), and big endian ones (the fast path declines big endian; pydicom's path serves
    them as before).
    """
    for path in sorted(get_testdata_files()):
        try:
            ts, data = split_part10(Path(path).read_bytes(), preamble_optional=True)
            little = UID(ts).is_little_endian
        except (InvalidInstance, ValueError, OSError):
            continue
        if little:
            yield pytest.param(ts, data, id=Path(path).name)


TEST_FILES = list(little_endian_test_files())


@pytest.mark.parametrize(("ts", "data"), TEST_FILES)
def test_pydicom_test_files(ts: str, data: bytes) -> None:
    """Each little endian test file: the fast path, when it answers, answers alike."""
    check(data, ts, claimed=False)


def test_the_fast_path_reads_some_of_pydicoms_files() -> None:
    """Not every test file declines (most have sequences, which it leaves to pydicom)."""
    read = [p.id for p in TEST_FILES if isinstance(fast(p.values[1], p.values[0]), Parsed)]
    assert len(read) >= 5, read


# -- generated data sets --------------------------------------------------------------------


def element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    """One element as PS3.5 7.1.2 / 7.1.3 encode it, ``value`` as given (odd lengths too)."""
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, elem, len(value)) + value
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", group, elem, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value


def ui(text: str) -> bytes:
    value = text.encode()
    return value + b"\0" if len(value) % 2 else value


def base() -> dict[int, tuple[str, bytes]]:
    """The elements every generated data set has: the required UIDs and a few keys."""
    return {
        0x00080016: ("UI", ui(CTImageStorage)),
        0x00080018: ("UI", ui("1.2.826.0.1.3680043.8.498.1")),
        0x00080060: ("CS", b"CT"),
        0x00100010: ("PN", b"Doe^John"),
        0x00100020: ("LO", b"PID1"),
        0x0020000D: ("UI", ui("1.2.826.0.1.3680043.8.498.2")),
        0x0020000E: ("UI", ui("1.2.826.0.1.3680043.8.498.3")),
        0x00200013: ("IS", b"7 "),
    }


def encode(elements: dict[int, tuple[str, bytes]], implicit: bool) -> bytes:
    return b"".join(element(tag, vr, value, implicit)
                    for tag, (vr, value) in sorted(elements.items()))


def syntaxes() -> list[Any]:
    return [pytest.param(False, id="explicit"), pytest.param(True, id="implicit")]


# a public tag of each VR (the column keys among them); PS3.6 gives the VR
KEYWORDS = {
    "AE": ["RetrieveAETitle"], "AS": ["PatientAge"], "CS": ["Modality", "PatientSex"],
    "DA": ["StudyDate", "PatientBirthDate"], "DT": ["AcquisitionDateTime"],
    "TM": ["StudyTime"], "UI": ["FrameOfReferenceUID"], "UR": ["RetrieveURL"],
    "SH": ["AccessionNumber", "StudyID"], "LO": ["PatientID", "IssuerOfPatientID",
                                                 "StudyDescription", "SeriesDescription"],
    "UC": ["LongCodeValue"], "ST": ["InstitutionAddress"], "LT": ["AdditionalPatientHistory"],
    "UT": ["PrivateDataElementDescription"],
    "PN": ["PatientName", "ReferringPhysicianName", "OperatorsName"],
    "DS": ["SliceThickness", "PixelSpacing"], "IS": ["SeriesNumber", "InstanceNumber"],
    "AT": ["FrameIncrementPointer"], "US": ["Rows"], "SS": ["TagAngleSecondAxis"],
    "UL": ["SimpleFrameList"], "SL": ["ReferencePixelX0"], "FL": ["RecommendedDisplayFrameRateInFloat"],
    "FD": ["TimeRange"], "SV": ["SelectorSVValue"], "UV": ["FileOffsetInContainer"],
    "OB": ["RecordKey"], "OD": ["FilterLookupTableData"], "OF": ["VerticesOfThePolygonalOutline"],
    "OL": ["LongPrimitivePointIndexList"], "OV": ["SelectorOVValue"],
    "OW": ["RedPaletteColorLookupTableData"],
}
PRIVATE_CREATOR, PRIVATE_TAG = 0x00090010, 0x00091001
UNKNOWN_PUBLIC_TAG = 0x00100099  # in no dictionary: stays UN

TEXT_VRS = ["AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "SH", "LO", "UC", "ST", "LT",
            "UT", "PN"]
CHARSET_VRS = {"SH", "LO", "UC", "ST", "LT", "UT", "PN"}  # PS3.5 6.1.2.3
TEXTS = [b"", b" ", b"  ", b"ABC", b"ABC ", b" ABC", b" A B ", b"A\\B", b"A\\B\\", b"\\",
         b"\\\\", b" A \\ B ", b"A\0", b"A \0\0", b"\0A", b"ABC", b"A\tB\r\n", b"\x01X\x7f",
         b"X" * 300, b"1.2.3\0", b" 1.2.3 ", b"19700101", b"20240102\\19991231", b"101500.5 ",
         b"Doe^John", b"M\xfcller^J\xf6rg", b"caf\xc3\xa9\\\xe3\x83\x89\xe3\x83\xb3",
         b"\xff\xfe", b"http://x/y z\0", b"A=B", b"\x1b$)A\xb0\xa1"]
NAMES = [  # PS3.5 6.2.1: 1, 2 and 3 component groups; (bytes, claimed)
    (b"Doe^John", True), (b"Doe^John^^Dr^", True), (b" Doe ^ John ", True),
    (b"Yamada^Tarou=\xe5\xb1\xb1\xe7\x94\xb0^\xe5\xa4\xaa\xe9\x83\x8e", True),
    (b"Yamada^Tarou=\xe5\xb1\xb1\xe7\x94\xb0=\xe3\x82\x84\xe3\x81\xbe\xe3\x81\xa0", True),
    (b"A=B=C=D", True), (b"=", True), (b"==", True), (b"A^B=", True), (b"==X", True),
    (b"=Y", True), (b"A\\B", True), (b"A=B\\C=D=E", True), (b"A\\B ", True),
    (b"A\\\\B", False), (b"A\\=", False), (b"\\", False), (b"A^B\0", True),
]
DS_VALUES = [  # (bytes, claimed)
    (b"1e999", True), (b"-1e999\\2", True), (b" 12.50 ", True), (b"+.5", True),
    (b"1.5\\2.5\\-3", True), (b"0.5\0", True), (b"  ", True), (b"", True), (b"1.", True),
    (b"1234567890123e999", True), (b"12345678901234567e999", True), (b"-0", True),
    (b"nan", False), (b"inf", False), (b"-Infinity", False), (b"1\\", False), (b"\\", False),
    (b"abc", False), (b"1_0", False), (b"\t1.5", False), (b"1.5 \\ 2", True),
    (b"1e999\\nan", False), (b"1,5", False), (b" ", True),
]
IS_VALUES = [
    (b"  42", True), (b"42 ", True), (b"-7\\8", True), (b"+3", True), (b"", True), (b"0", True),
    (b"007", True), (b"-0", True), (b"2147483648", True), (b"123456789012345", True),
    (b" ", True), (b"4.0", False), (b"4.5", False), (b"99999999999999999999", False),
    (b"x", False), (b"1\\", False), (b"1 2", False), (b"\t5", False),
]
CHARSETS = [None, b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO_IR 100 "]
DECLINED_CHARSETS = [b"ISO_IR 144", b"ISO 2022 IR 100", b"ISO_IR 100\\ISO_IR 192",
                     b"\\ISO 2022 IR 87", b" ISO_IR 100", b"GB18030", b"ISO_IR 13"]


def tags_of(vr: str) -> list[int]:
    tags = [tag_for_keyword(keyword) for keyword in KEYWORDS[vr]]
    assert all(tag is not None and dictionary_VR(tag) == vr for tag in tags)
    return [int(tag) for tag in tags if tag is not None]


def with_element(tag: int, vr: str, value: bytes, charset: bytes | None = None,
                 private: bool = False) -> dict[int, tuple[str, bytes]]:
    elements = base()
    if charset is not None:
        elements[0x00080005] = ("CS", charset)
    if private:
        elements[PRIVATE_CREATOR] = ("LO", b"MINIPACS TEST")
    elements[tag] = (vr, value)
    return elements


def text_claimed(vr: str, value: bytes, charset: bytes | None) -> bool:
    """Text is read unless it holds an escape (ISO 2022), does not decode in its set, or is
    a multi-valued PN with an empty value."""
    if b"\x1b" in value:
        return False
    names = value.rstrip(b"\0 ").split(b"\\")
    if vr == "PN" and len(names) > 1 and not all(name.rstrip(b"=") for name in names):
        return False  # an empty name among several: pydicom's JSON fails on it, warns
    if charset == b"ISO_IR 192" and vr in CHARSET_VRS:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


@pytest.mark.parametrize("implicit", syntaxes())
@pytest.mark.parametrize("charset", CHARSETS, ids=repr)
@pytest.mark.parametrize("vr", TEXT_VRS)
def test_text(vr: str, charset: bytes | None, implicit: bool) -> None:
    ts = IMPLICIT if implicit else EXPLICIT
    for tag in tags_of(vr):
        for value in TEXTS:
            claimed = text_claimed(vr, value, charset)
            check(encode(with_element(tag, vr, value, charset), implicit), ts, claimed)
    if not implicit:  # a private tag keeps its explicit VR
        for value in TEXTS:
            data = encode(with_element(PRIVATE_TAG, vr, value, charset, private=True), False)
            check(data, ts, text_claimed(vr, value, charset))


@pytest.mark.parametrize("implicit", syntaxes())
@pytest.mark.parametrize("charset", [None, b"ISO_IR 100", b"ISO_IR 192"], ids=repr)
@pytest.mark.parametrize(("value", "claimed"), NAMES, ids=repr)
def test_person_names(value: bytes, claimed: bool, charset: bytes | None, implicit: bool) -> None:
    ts = IMPLICIT if implicit else EXPLICIT
    for tag in tags_of("PN"):
        check(encode(with_element(tag, "PN", value, charset), implicit), ts, claimed)


@pytest.mark.parametrize("implicit", syntaxes())
@pytest.mark.parametrize(("vr", "value", "claimed"),
                         [("DS", v, c) for v, c in DS_VALUES] + [("IS", v, c) for v, c in IS_VALUES],
                         ids=repr)
def test_decimal_and_integer_strings(vr: str, value: bytes, claimed: bool, implicit: bool) -> None:
    ts = IMPLICIT if implicit else EXPLICIT
    for tag in tags_of(vr):
        check(encode(with_element(tag, vr, value), implicit), ts, claimed)
    if not implicit:
        check(encode(with_element(PRIVATE_TAG, vr, value, private=True), False), ts, claimed)


BINARY = [  # (VR, value, claimed)
    *[(vr, v, c) for vr, size, code in (("US", 2, "H"), ("SS", 2, "h"), ("UL", 4, "L"),
                                          ("SL", 4, "l"), ("SV", 8, "q"), ("UV", 8, "Q"))
      for v, c in ((b"", True), (struct.pack(f"<{code}", 1), True),
                   (struct.pack(f"<3{code}", 0, 1, 2 ** (8 * size - 1) - 1), True),
                   (b"\xff" * size, True), (b"\x01" * (size + 1), False))],
    *[(vr, v, c) for vr, code in (("FL", "f"), ("FD", "d"))
      for v, c in ((b"", True), (struct.pack(f"<{code}", 1.5), True),
                   (struct.pack(f"<3{code}", 0.1, -2.5e10, 3), True),
                   (struct.pack(f"<{code}", float("nan")), True),
                   (struct.pack(f"<2{code}", 1.0, float("inf")), True),
                   (b"\x00" * 3, False))],
    ("AT", b"", True), ("AT", b"\x08\x00\x18\x00", True),
    ("AT", b"\x08\x00\x18\x00\x28\x00\x10\x00", True), ("AT", b"\x08\x00\x18", False),
    *[(vr, v, True) for vr in ("OB", "OD", "OF", "OL", "OV", "OW")
      for v in (b"", b"\x00\x01\x02\x03\x04", b"\xab" * 768, b"\xab" * 769, bytes(range(256)) * 16)],
]


@pytest.mark.parametrize("implicit", syntaxes())
@pytest.mark.parametrize(("vr", "value", "claimed"), BINARY,
                         ids=[f"{vr}-{len(v)}" for vr, v, _ in BINARY])
def test_binary(vr: str, value: bytes, claimed: bool, implicit: bool) -> None:
    ts = IMPLICIT if implicit else EXPLICIT
    for tag in tags_of(vr):
        check(encode(with_element(tag, vr, value), implicit), ts, claimed)
    if not implicit:
        check(encode(with_element(PRIVATE_TAG, vr, value, private=True), False), ts, claimed)
        if vr == "OB":  # UN of a tag no dictionary knows stays UN
            assert not dictionary_has_tag(UNKNOWN_PUBLIC_TAG)
            check(encode(with_element(UNKNOWN_PUBLIC_TAG, "UN", value), False), ts, claimed)


@pytest.mark.parametrize("implicit", syntaxes())
def test_a_typical_ct_header_in_latin_1(implicit: bool) -> None:
    """Many elements at every level, as a CT modality sends them."""
    elements = base()
    elements.update({
        0x00080005: ("CS", b"ISO_IR 100"), 0x00080008: ("CS", b"ORIGINAL\\PRIMARY\\AXIAL "),
        0x00080020: ("DA", b"20240102"), 0x00080030: ("TM", b"101500.123 "),
        0x00080050: ("SH", b"ACC1"), 0x00080070: ("LO", b"Acme \xc9lectrique"),
        0x00080090: ("PN", b"House^Gregory"), 0x00081030: ("LO", b"Thorax \\ Abdomen "),
        0x00100030: ("DA", b"19700101"), 0x00100040: ("CS", b"M "),
        0x00180050: ("DS", b"1.25"), 0x00180060: ("DS", b"120 "),
        0x00200011: ("IS", b"3 "), 0x00200032: ("DS", b"-100.0\\-100.0\\0.0 "),
        0x00200037: ("DS", b"1\\0\\0\\0\\1\\0 "), 0x00280002: ("US", b"\x01\x00"),
        0x00280004: ("CS", b"MONOCHROME2 "), 0x00280010: ("US", b"\x40\x00"),
        0x00280011: ("US", b"\x40\x00"), 0x00280030: ("DS", b"0.5\\0.5 "),
        0x00280100: ("US", b"\x10\x00"), 0x00281050: ("DS", b"40"),
    })
    data = encode(elements, implicit) + element(0x7FE00010, "OW", b"\0\1" * 64, implicit)
    parsed = check(data, IMPLICIT if implicit else EXPLICIT, claimed=True)
    assert isinstance(parsed, Parsed)
    assert parsed.record.study["study_description"] == "Thorax"
    assert "7FE00010" not in parsed.record.instance["attrs"]


@pytest.mark.parametrize("charset", DECLINED_CHARSETS, ids=repr)
def test_other_character_sets_are_left_to_pydicom(charset: bytes) -> None:
    data = encode(with_element(0x00100010, "PN", b"Doe^John", charset), False)
    assert check(data, EXPLICIT, claimed=False)
    assert fast(data, EXPLICIT) is None


UID_CASES = [  # the required UIDs as sent: (value or None to leave it out, VR, claimed)
    ("1.2.3", "UI", True), ("1.2.3\0", "UI", True), ("1.2.3 ", "UI", True),
    (None, "UI", False), ("", "UI", False), (" 1.2.3", "UI", False), ("\t1.2.3", "UI", False),
    ("1.2.abc", "UI", False), ("1.2\\3.4", "UI", False), ("1." + "2" * 70, "UI", False),
    ("1.2.3", "LO", False),
]


# implicit VR sends no VR: a UID sent with another VR is an explicit VR case only
UID_SYNTAX_CASES = [
    pytest.param(value, vr, claimed, implicit,
                 id=f"{value!r}-{vr}-{'implicit' if implicit else 'explicit'}")
    for value, vr, claimed in UID_CASES for implicit in (False, True)
    if not (implicit and vr != "UI")
]


@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                     "SeriesInstanceUID"])
@pytest.mark.parametrize(("value", "vr", "claimed", "implicit"), UID_SYNTAX_CASES)
def test_required_uids(value: str | None, vr: str, claimed: bool, keyword: str,
                       implicit: bool) -> None:
    """A UID refused by the reference is refused alike (by the fallback: same message)."""
    elements = base()
    tag = int(tag_for_keyword(keyword) or 0)
    if value is None:
        del elements[tag]
    else:
        elements[tag] = (vr, value.encode("latin-1"))
    check(encode(elements, implicit), IMPLICIT if implicit else EXPLICIT, claimed)


def test_structure_faults_raise_as_before() -> None:
    data = encode(base(), False)
    for cut in (3, 10, len(data) - 1):
        expected = check(data[:cut], EXPLICIT, claimed=False)
        assert isinstance(expected, str) and expected.startswith("InvalidInstance")
        assert fast(data[:cut], EXPLICIT) == expected  # the shared structure check
    assert isinstance(check(b"", EXPLICIT, claimed=False), str)


def test_what_the_fast_path_declines() -> None:
    """Each decline, and that pydicom's path then gives the same as before."""
    undefined_sq = (struct.pack("<HH2sHL", 0x0008, 0x1111, b"SQ", 0, 0xFFFFFFFF)
                    + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    cases = {
        "sequence": (encode(with_element(0x00081111, "SQ", b""), False), EXPLICIT),
        "undefined length": (encode(base(), False).replace(
            b"\x08\x00\x60\x00", undefined_sq + b"\x08\x00\x60\x00"), EXPLICIT),
        "out of order": (element(0x00100010, "PN", b"A ", False) + encode(base(), False),
                         EXPLICIT),
        "repeated": (encode(base(), False) + element(0x00200013, "IS", b"8 ", False), EXPLICIT),
        "UN of a known tag": (encode(with_element(0x00081030, "UN", b"X "), False), EXPLICIT),
        "private UN": (encode(with_element(PRIVATE_TAG, "UN", b"X ", private=True), False),
                       EXPLICIT),
        "private in implicit": (encode(with_element(PRIVATE_TAG, "LO", b"X ", private=True),
                                       True), IMPLICIT),
        "ambiguous in implicit": (encode(with_element(0x00280106, "US", b"\0\0"), True),
                                  IMPLICIT),
        "LUT Descriptor": (encode(with_element(0x00281101, "US", b"\0\1\0\0\x10\0"), False),
                           EXPLICIT),
        "lower-case VR": (encode(with_element(0x00081030, "lo", b"X "), False), EXPLICIT),
        "binary column": (encode(with_element(0x00200013, "US", b"\1\0"), False), EXPLICIT),
        "deflated": (encode(base(), False), DeflatedExplicitVRLittleEndian),
        "big endian": (encode(base(), False), "1.2.840.10008.1.2.2"),
    }
    for name, (data, ts) in cases.items():
        check(data, ts, claimed=False)
        assert fast(data, ts) is None, name


def test_a_spooled_view_reads_as_bytes() -> None:
    data = encode(base(), False) + element(0x7FE00010, "OB", b"\0" * 100, False)
    assert fast_parse(memoryview(data), EXPLICIT) == reference(data, EXPLICIT)


# -- through the archive ----------------------------------------------------------------------

COLUMNS = {"patient": "patient_key", "study": "study_instance_uid",
           "series": "series_instance_uid", "instance": "sop_instance_uid"}


def archive_files() -> list[Any]:
    names = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm")
    found = {Path(p).name: p for p in get_testdata_files()}
    return [pytest.param(found[n], id=n) for n in names if n in found]


@pytest.mark.parametrize("implicit", syntaxes())
def test_stored_rows_are_the_references(new_archive: Archive, tmp_path: Path,
                                        implicit: bool) -> None:
    """A generated instance stored through the archive: its index rows hold what pydicom's
    path makes of it, column for column."""
    elements = base()
    elements.update({0x00080005: ("CS", b"ISO_IR 192"),
                     0x00100010: ("PN", "Müller^Jörg=ミュラー".encode()),
                     0x00081030: ("LO", b" Chest \\ second "), 0x00200011: ("IS", b" 3")})
    data = encode(elements, implicit)
    ts = IMPLICIT if implicit else EXPLICIT
    assert isinstance(fast(data, ts), Parsed)
    assert_rows(new_archive, tmp_path, data, ts)


@pytest.mark.parametrize("path", archive_files())
def test_stored_test_files_rows_are_the_references(new_archive: Archive, tmp_path: Path,
                                                   path: str) -> None:
    ts, data = split_part10(Path(path).read_bytes())
    assert_rows(new_archive, tmp_path, data, ts)


def assert_rows(archive: Archive, tmp_path: Path, data: bytes, ts: str) -> None:
    expected = reference(data, ts)
    assert isinstance(expected, Parsed)
    archive.store(data, ts)
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.row_factory = sqlite3.Row
        for level, key in COLUMNS.items():
            want = getattr(expected.record, level)
            row = db.execute(f"SELECT * FROM {level} WHERE {key} = ?", (want[key],)).fetchone()
            assert row is not None, level
            assert {k: row[k] for k in want} == want, level


FUZZ_BYTES = b"0123456789+-.eE \\\0=^\t\x1b\xe9\xc3\xa9\xffAZaz"


@pytest.mark.parametrize("seed", range(8))
def test_random_values(seed: int) -> None:
    """Seeded random values of every VR the fast path reads, in both syntaxes and three
    character sets: wherever it answers, it answers as pydicom's path does."""
    import random

    rng = random.Random(seed)
    answered = 0
    vrs = sorted(KEYWORDS)
    for _ in range(150):
        implicit = rng.random() < 0.5
        elements = base()
        charset = rng.choice([None, b"ISO_IR 100", b"ISO_IR 192"])
        if charset is not None:
            elements[0x00080005] = ("CS", charset)
        for _ in range(rng.randint(1, 6)):
            vr = rng.choice(vrs)
            tag = rng.choice(tags_of(vr))
            if vr in TEXT_VRS or vr in ("DS", "IS"):
                value = bytes(rng.choice(FUZZ_BYTES) for _ in range(rng.randint(0, 20)))
            else:
                value = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 8, 12, 16, 800]))
            elements[tag] = (vr, value)
        ts = IMPLICIT if implicit else EXPLICIT
        check(encode(elements, implicit), ts, claimed=False)
        answered += isinstance(fast(encode(elements, implicit), ts), Parsed)
    assert answered >= 15  # the fast path runs on a fair share of them
