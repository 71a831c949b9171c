"""The query model without a database: parsing (PS3.4 C.4.1.2.1) and matching (C.2.2.2)
as tables."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset

from storage import InvalidQuery, Level, Model
from storage.query import (
    Constraint,
    Kind,
    Op,
    build_response,
    constraint_matches,
    parse_identifier,
    response_charset,
)
from storage.values import fold, norm_da, norm_pn, norm_tm, pn_framed, strip


def identifier(level: str | None = "STUDY", **keys: Any) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def constraint_for(keyword: str, value: Any, fold_pn: bool = True) -> Constraint:
    query = parse_identifier(identifier(**{keyword: value}), Model.STUDY_ROOT, fold_pn)
    assert len(query.constraints) == 1, query.constraints
    return query.constraints[0]


# -- identifier validation --------------------------------------------------------------

@pytest.mark.parametrize(
    ("ds", "model", "message"),
    [
        (identifier(None, PatientID=""), Model.STUDY_ROOT, "QueryRetrieveLevel (0008,0052) is missing"),
        (identifier("", PatientID=""), Model.STUDY_ROOT, "QueryRetrieveLevel (0008,0052) is missing"),
        (identifier("STUDIES"), Model.STUDY_ROOT, "unknown QueryRetrieveLevel 'STUDIES'"),
        (identifier("PATIENT"), Model.STUDY_ROOT, "level PATIENT is not part of the STUDY_ROOT"),
        (identifier("STUDY", SeriesInstanceUID="1.2"), Model.STUDY_ROOT,
         "SeriesInstanceUID is below the query level STUDY"),
        (identifier("STUDY", SOPInstanceUID=""), Model.STUDY_ROOT,
         "SOPInstanceUID is below the query level STUDY"),
        (identifier("STUDY", StudyInstanceUID=""), Model.PATIENT_ROOT,
         "PatientID must hold a single value for a STUDY level query"),
        (identifier("STUDY", PatientID="P*"), Model.PATIENT_ROOT,
         "PatientID must hold a single value"),
        (identifier("SERIES", Modality=""), Model.STUDY_ROOT,
         "StudyInstanceUID must hold a single value for a SERIES level query"),
        (identifier("STUDY", StudyDate="2024-2025-2026"), Model.STUDY_ROOT, "malformed range"),
        (identifier("STUDY", StudyDate="2024XX01"), Model.STUDY_ROOT, "malformed DA value"),
        (identifier("STUDY", StudyDate="20240101-20XX"), Model.STUDY_ROOT, "malformed DA range"),
        (identifier("STUDY", StudyTime="25h"), Model.STUDY_ROOT, "malformed TM value"),
        # PS3.5 Table 6.2-1: dates of the calendar, times of the clock, range ends included
        (identifier("STUDY", StudyDate="20241345"), Model.STUDY_ROOT, "malformed DA value"),
        (identifier("STUDY", StudyDate="20240230"), Model.STUDY_ROOT, "malformed DA value"),
        (identifier("STUDY", StudyDate="20230229"), Model.STUDY_ROOT, "malformed DA value"),
        (identifier("STUDY", StudyDate="00000101"), Model.STUDY_ROOT, "malformed DA value"),
        (identifier("STUDY", StudyDate="20240101-20240230"), Model.STUDY_ROOT,
         "malformed DA range"),
        (identifier("STUDY", StudyDate="20240132-"), Model.STUDY_ROOT, "malformed DA range"),
        (identifier("STUDY", PatientBirthDate="19701301"), Model.STUDY_ROOT,
         "malformed DA value"),
        (identifier("STUDY", StudyTime="2400"), Model.STUDY_ROOT, "malformed TM value"),
        (identifier("STUDY", StudyTime="1260"), Model.STUDY_ROOT, "malformed TM value"),
        (identifier("STUDY", StudyTime="120061"), Model.STUDY_ROOT, "malformed TM value"),
        (identifier("STUDY", StudyTime="0800-2500"), Model.STUDY_ROOT, "malformed TM range"),
    ],
)
def test_invalid_identifiers_are_refused_with_a_reason(ds: Dataset, model: Model, message: str) -> None:
    with pytest.raises(InvalidQuery, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_identifier(ds, model)


def test_study_root_study_level_accepts_patient_keys_and_lists_requested_keys() -> None:
    ds = identifier(PatientName="Doe*", PatientID="", StudyInstanceUID="",
                    NumberOfStudyRelatedInstances="", ModalitiesInStudy="CT")
    query = parse_identifier(ds, Model.STUDY_ROOT)
    assert query.level is Level.STUDY
    assert [c.keyword for c in query.constraints] == ["ModalitiesInStudy", "PatientName"]
    assert {r.tag for r in query.requested} == {e.tag for e in ds if e.keyword != "QueryRetrieveLevel"}
    assert query.ignored == ()


def test_identifier_is_not_modified() -> None:
    ds = identifier(PatientName="Doe*", StudyDate="20200101-")
    before = ds.to_json_dict()
    parse_identifier(ds, Model.STUDY_ROOT)
    assert ds.to_json_dict() == before


def test_lower_level_optional_keys_are_ignored_and_reported() -> None:
    query = parse_identifier(identifier(Modality="CT", InstitutionName=""), Model.STUDY_ROOT)
    assert query.constraints == ()
    assert query.ignored == ("Modality",)  # a value we could not match: FF01
    assert {r.level for r in query.requested} == {Level.SERIES}


def test_patient_root_study_query_with_patient_id() -> None:
    query = parse_identifier(identifier(PatientID="P1", StudyDate=""), Model.PATIENT_ROOT)
    assert [c.keyword for c in query.constraints] == ["PatientID"]


# -- constraint kinds --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("keyword", "value", "kind", "terms"),
    [
        ("PatientID", "P1", Kind.TERMS, [(Op.EQ, "P1", "")]),
        ("PatientID", "  P1 ", Kind.TERMS, [(Op.EQ, "P1", "")]),  # PS3.5 6.2 padding
        ("PatientID", "P*", Kind.TERMS, [(Op.WILDCARD, "P*", "")]),
        ("PatientID", "P?", Kind.TERMS, [(Op.WILDCARD, "P?", "")]),
        ("PatientID", '""', Kind.EMPTY, []),
        ("StudyInstanceUID", "1.2\\1.3", Kind.TERMS, [(Op.EQ, "1.2", ""), (Op.EQ, "1.3", "")]),
        ("StudyInstanceUID", "1.2*", Kind.TERMS, [(Op.EQ, "1.2*", "")]),  # no wildcards on UI
        ("StudyDate", "20240101", Kind.TERMS, [(Op.EQ, "20240101", "")]),
        ("StudyDate", "2024.01.01", Kind.TERMS, [(Op.EQ, "20240101", "")]),
        ("StudyDate", "20240101-20240131", Kind.TERMS, [(Op.RANGE, "20240101", "20240131")]),
        ("StudyDate", "-20240131", Kind.TERMS, [(Op.RANGE, "", "20240131")]),
        ("StudyDate", "20240101-", Kind.TERMS, [(Op.RANGE, "20240101", "")]),
        ("StudyTime", "0800-1200", Kind.TERMS, [(Op.RANGE, "080000.000000", "120059.999999")]),
        ("StudyTime", "1015", Kind.TERMS, [(Op.RANGE, "101500.000000", "101559.999999")]),
        ("StudyTime", "101530.5-", Kind.TERMS, [(Op.RANGE, "101530.500000", "")]),
        ("PatientName", "DOE^JOHN", Kind.TERMS, [(Op.EQ, "doe^john", "")]),
        ("ModalitiesInStudy", "CT\\MR", Kind.TERMS, [(Op.EQ, "CT", ""), (Op.EQ, "MR", "")]),
    ],
)
def test_constraint_kinds(keyword: str, value: str, kind: Kind, terms: list[tuple[Op, str, str]]) -> None:
    c = constraint_for(keyword, value)
    assert c.kind is kind
    assert [(t.op, t.value, t.upper) for t in c.terms] == terms


@pytest.mark.parametrize(("keyword", "value"), [
    ("PatientID", ""), ("PatientName", "*"), ("PatientName", "**"), ("StudyDate", ""),
    ("StudyDate", "*"), ("StudyInstanceUID", ""),
])
def test_universal_matching_gives_no_constraint(keyword: str, value: str) -> None:
    query = parse_identifier(identifier(**{keyword: value}), Model.STUDY_ROOT)
    assert query.constraints == ()
    assert len(query.requested) == 1


# -- matching ----------------------------------------------------------------------------

MATCHES = [
    # PS3.4 C.2.2.2.1 Single Value: exact, case-sensitive except PN
    ("PatientID", "P1", ["P1"], True),
    ("PatientID", "P1", ["p1"], False),
    ("PatientID", "P1", ["P10"], False),
    ("PatientID", "P1", ["P1 "], True),
    ("AccessionNumber", "A%1", ["A%1"], True),
    ("AccessionNumber", "A%1", ["AX1"], False),   # % is no wildcard
    ("AccessionNumber", "A_1", ["AX1"], False),   # _ is no wildcard
    ("StudyDescription", "a.b", ["axb"], False),   # regex characters are literal
    ("StudyDescription", "[CT]", ["[CT]"], True),
    ("StudyDescription", "[CT]", ["C"], False),
    # PN: case and accent insensitive by default
    ("PatientName", "doe^john", ["Doe^John"], True),
    ("PatientName", "MULLER^JURGEN", ["Müller^Jürgen"], True),
    ("PatientName", "Doe^John", ["Doe^John^^^"], True),    # empty trailing components
    ("PatientName", "Doe", ["Doe^John"], False),
    ("PatientName", "山田^太郎", ["Yamada^Tarou=山田^太郎=やまだ^たろう"], True),
    ("PatientName", "Yamada^Tarou", ["Yamada^Tarou=山田^太郎=やまだ^たろう"], True),
    ("PatientName", "Yamada^Tarou=山田^太郎", ["Yamada^Tarou=山田^太郎=やまだ^たろう"], True),
    ("PatientName", "Yamada^Tarou=山田^花子", ["Yamada^Tarou=山田^太郎=やまだ^たろう"], False),
    # PS3.4 C.2.2.2.4 Wild Card
    ("PatientName", "doe*", ["Doe^John"], True),
    ("PatientName", "*john", ["Doe^John"], True),
    ("PatientName", "d?e^john", ["Doe^John"], True),
    ("PatientName", "d?e^john", ["Dooe^John"], False),
    ("PatientName", "m?ller*", ["Müller^Jürgen"], True),   # ? is one character, not one byte
    ("PatientName", "山?*", ["山田^太郎"], True),
    ("PatientName", "김?", ["김철"], True),          # Hangul: ? is one syllable
    ("PatientName", "??", ["김철"], True),
    ("PatientName", "かとう", ["がとう"], False),     # a voiced mark is no accent
    ("PatientName", "stra?e", ["Straße"], True),    # ß stays one character
    ("PatientName", "ΣΩΚΡΆΤΗΣ", ["σωκρατης"], True),
    ("PatientName", "иванов", ["ИВАНОВ"], True),
    ("PatientName", "Dvořák", ["DVORAK"], True),
    ("PatientID", "P*", ["p1"], False),   # case-sensitive outside PN
    ("PatientID", "P*", ["P1"], True),
    ("PatientID", "P?", ["P"], False),
    ("StudyDescription", "*.*", ["a.b"], True),
    ("StudyDescription", "*.*", ["ab"], False),
    ("StudyDescription", "%*", ["%abc"], True),
    ("StudyDescription", "%*", ["abc"], False),
    ("StudyDescription", "a\nb*", ["a\nbc"], True),
    # PS3.4 C.2.2.2.5 Range, inclusive
    ("StudyDate", "20240101-20240131", ["20240101"], True),
    ("StudyDate", "20240101-20240131", ["20240131"], True),
    ("StudyDate", "20240101-20240131", ["20240201"], False),
    ("StudyDate", "-20240131", ["19000101"], True),
    ("StudyDate", "20240101-", ["20991231"], True),
    ("StudyDate", "20240101-", ["20231231"], False),
    ("StudyDate", "20240101", ["2024.01.01"], True),
    ("StudyTime", "0800-1200", ["120059"], True),
    ("StudyTime", "0800-1200", ["1201"], False),
    ("StudyTime", "0800-1200", ["075959.999"], False),
    ("StudyTime", "0800-1200", ["08"], True),
    ("StudyTime", "1015", ["101530.25"], True),
    ("StudyTime", "101530.25", ["101530.25"], True),
    ("StudyTime", "101530.25", ["101530.26"], False),
    # PS3.4 C.2.2.2.2 List of UID
    ("StudyInstanceUID", "1.2.3\\1.2.4", ["1.2.4"], True),
    ("StudyInstanceUID", "1.2.3\\1.2.4", ["1.2.5"], False),
    ("StudyInstanceUID", "1.2.3", ["1.2.3\0"], True),
    # multi-valued stored attributes and OR semantics for several query values
    ("ModalitiesInStudy", "CT", ["MR", "CT"], True),
    ("ModalitiesInStudy", "CT\\MR", ["MR"], True),
    ("ModalitiesInStudy", "CT\\MR", ["US"], False),
    ("ModalitiesInStudy", "C?", ["PT", "CT"], True),
    # PS3.4 C.2.2.2.7 Empty Value, and our choice for empty stored values
    ("PatientID", '""', [], True),
    ("PatientID", '""', [""], True),
    ("PatientID", '""', ["P1"], False),
    ("PatientID", "P1", [], False),
    ("PatientName", "*x*", [""], False),
]


@pytest.mark.parametrize(("keyword", "value", "stored", "expected"), MATCHES)
def test_matching(keyword: str, value: str, stored: list[str], expected: bool) -> None:
    c = constraint_for(keyword, value)
    assert constraint_matches(c, stored) is expected


@pytest.mark.parametrize("n", [1, 89, 90, 500, 3000])
def test_long_uid_lists_parse(n: int) -> None:
    uids = "\\".join(f"1.2.3.{i}" for i in range(n))
    c = constraint_for("StudyInstanceUID", uids)
    assert len(c.terms) == n
    assert constraint_matches(c, [f"1.2.3.{n - 1}"])


@pytest.mark.timeout(60)  # a hang guard: a backtracking regex takes hours here
def test_hostile_wildcards_do_not_hang() -> None:
    c = constraint_for("StudyDescription", "*a" * 40 + "*b")
    assert not constraint_matches(c, ["a" * 2000])


@pytest.mark.parametrize(("pattern", "text", "expected"), [
    ("", "", True), ("*", "", True), ("?", "", False), ("a*b?c", "aXXbYc", True),
    ("a*b?c", "abc", False), ("*b*", "abc", True), ("a**", "a", True), ("*a", "ba", True),
    ("*a", "ab", False), ("a?", "ab\n", False),
])
def test_wildcard_match(pattern: str, text: str, expected: bool) -> None:
    from storage.query import wildcard_match

    assert wildcard_match(pattern, text) is expected


@pytest.mark.parametrize(("value", "stored", "expected"), [
    ("doe^john", ["Doe^John"], False),
    ("Doe^John", ["Doe^John"], True),
    ("D*", ["doe"], False),
])
def test_pn_matching_can_be_case_sensitive(value: str, stored: list[str], expected: bool) -> None:
    c = constraint_for("PatientName", value, fold_pn=False)
    assert constraint_matches(c, stored, fold_pn=False) is expected


# -- values ------------------------------------------------------------------------------

@pytest.mark.parametrize(("vr", "value", "expected"), [
    ("LO", "  P1  ", "P1"), ("ST", "  text  ", "  text"), ("UI", "1.2\0", "1.2"),
    ("CS", "CT ", "CT"),
])
def test_strip(vr: str, value: str, expected: str) -> None:
    assert strip(vr, value) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("20240101", "20240101"), ("2024.01.01", "20240101"), ("2024010", ""), ("", ""),
    # the form only: a stored value is taken as written (the calendar is checked for queries)
    ("20240230", "20240230"),
])
def test_norm_da(value: str, expected: str) -> None:
    assert norm_da(value) == expected


@pytest.mark.parametrize(("value", "upper", "expected"), [
    ("10", False, "100000.000000"), ("10", True, "105959.999999"),
    ("1015", False, "101500.000000"), ("101530.5", False, "101530.500000"),
    ("101530.5", True, "101530.599999"), ("10:15:30", False, "101530.000000"),
    ("x", False, ""), ("235960", False, "235960.000000"),
])
def test_norm_tm(value: str, upper: bool, expected: str) -> None:
    assert norm_tm(value, upper=upper) == expected


@pytest.mark.parametrize(("vr", "value", "real"), [
    ("DA", "20240229", True), ("DA", "20230229", False), ("DA", "20240230", False),
    ("DA", "20241345", False), ("DA", "20241301", False), ("DA", "20240100", False),
    ("DA", "00000101", False), ("DA", "20241231", True),
    ("TM", "235960", True),  # SS 60: a leap second
    ("TM", "2400", False), ("TM", "2360", False), ("TM", "235961", False),
    ("TM", "000000.000000", True),
])
def test_of_the_clock_and_calendar(vr: str, value: str, real: bool) -> None:
    from storage.values import of_the_clock_and_calendar

    normalised = norm_da(value) if vr == "DA" else norm_tm(value)
    assert of_the_clock_and_calendar(vr, normalised) is real


def test_clean_text_drops_a_left_over_ir58_escape() -> None:
    from storage.values import clean_text

    assert clean_text("Zhang=\x1b$)A张^\x1b$)A三") == "Zhang=张^三"
    assert clean_text("plain") == "plain"


def test_pn_forms() -> None:
    assert norm_pn(" Doe ^ John ^^^") == "Doe^John"
    assert norm_pn("Doe^John==") == "Doe^John"
    assert fold("Müller") == fold("MULLER") == "muller"
    assert pn_framed("Yamada^Tarou=山田^太郎", folded=True) == "=yamada^tarou=山田^太郎="
    assert pn_framed("", folded=True) == ""


# -- responses ---------------------------------------------------------------------------

class _FakeRow:
    def __init__(self, elements: dict[int, dict[str, Any]]) -> None:
        self.elements = elements

    def element(self, tag: int, level: Level) -> dict[str, Any] | None:
        return self.elements.get(tag)


def test_response_holds_exactly_the_requested_keys() -> None:
    query = parse_identifier(
        identifier(PatientName="", StudyInstanceUID="", StudyDescription="", IssuerOfPatientID="",
                   SpecificCharacterSet="ISO_IR 100"),
        Model.STUDY_ROOT,
    )
    row = _FakeRow({
        0x00100010: {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]},
        0x0020000D: {"vr": "UI", "Value": ["1.2.3"]},
        0x00081030: {"vr": "LO"},
        0x00100020: {"vr": "LO", "Value": ["not requested"]},
    })
    rsp = build_response(query, row)  # type: ignore[arg-type]
    assert sorted(e.keyword for e in rsp) == sorted([
        "SpecificCharacterSet", "QueryRetrieveLevel", "PatientName", "StudyInstanceUID",
        "StudyDescription", "IssuerOfPatientID"])
    assert rsp.PatientName == "Müller^Jürgen"
    assert rsp.StudyDescription in ("", None)
    assert rsp.IssuerOfPatientID in ("", None)
    assert rsp.SpecificCharacterSet == "ISO_IR 100"  # the query's set can encode it


def test_retrieve_ae_title_is_answered_not_matched() -> None:
    """PS3.4 C.4.1.1.3.2: every response names the AE to retrieve from; a value in the
    request is not a constraint on the stored entities."""
    query = parse_identifier(identifier(StudyInstanceUID="", RetrieveAETitle="ELSEWHERE"),
                             Model.STUDY_ROOT)
    assert query.constraints == () and query.ignored == ()
    row = _FakeRow({0x0020000D: {"vr": "UI", "Value": ["1.2.3"]}})
    rsp = build_response(query, row, retrieve_ae_title="MINIPACS")  # type: ignore[arg-type]
    assert rsp.RetrieveAETitle == "MINIPACS"
    assert "RetrieveAETitle" not in build_response(query, row)  # type: ignore[arg-type]


@pytest.mark.parametrize(("query_charset", "texts", "expected"), [
    ((), ["abc"], "ISO_IR 192"),
    (("ISO_IR 100",), ["abc"], "ISO_IR 100"),
    (("ISO_IR 100",), ["Müller"], "ISO_IR 100"),
    (("ISO_IR 100",), ["Иванов"], "ISO_IR 192"),
    ((), ["Иванов"], "ISO_IR 192"),
    (("ISO_IR 144",), ["Иванов"], "ISO_IR 144"),
    (("ISO_IR 6",), ["Müller"], "ISO_IR 192"),      # the default repertoire is ASCII only
    (("ISO 2022 IR 6",), ["Müller"], "ISO_IR 192"),
    (("",), ["Müller"], "ISO_IR 192"),
    (("ISO_IR 999",), ["Müller"], "ISO_IR 192"),    # an unknown term is never echoed
    (("ISO_IR 999",), ["abc"], "ISO_IR 192"),
    (("ISO_IR 6",), ["abc"], "ISO_IR 6"),
    (("", "ISO 2022 IR 87"), ["山田^太郎=やまだ"], ["", "ISO 2022 IR 87"]),
    (("ISO 2022 IR 6", "ISO 2022 IR 87"), ["Yamada^Tarou=山田^太郎"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
    (("", "ISO 2022 IR 87"), ["Иванов"], ["", "ISO 2022 IR 87"]),  # JIS X 0208 has Cyrillic
    (("", "ISO 2022 IR 87"), ["Müller"], "ISO_IR 192"),
    (("", "ISO 2022 IR 149"), ["김철수"], ["", "ISO 2022 IR 149"]),
    (("", "ISO 2022 IR 149"), ["洪吉洞"], ["", "ISO 2022 IR 149"]),  # KS X 1001 has Hanja
    (("", "ISO 2022 IR 149"), ["かとう"], ["", "ISO 2022 IR 149"]),
    (("", "ISO 2022 IR 149"), ["Ü"], "ISO_IR 192"),
    (("GB18030",), ["张三"], "GB18030"),
    # what pydicom would write must be what the response declares (second review):
    (("ISO_IR 13",), ["ﾔﾏﾀﾞ"], "ISO_IR 13"),
    (("ISO_IR 13",), ["山田"], "ISO_IR 192"),             # pydicom writes JIS X 0201 only
    (("", "ISO 2022 IR 87"), ["CT 5×5 mm ±2°"], "ISO_IR 192"),  # would go out as raw Latin-1
    (("", "ISO 2022 IR 100"), ["Søren"], "ISO_IR 192"),  # no ESC - A would be written
    (("", "ISO 2022 IR 149"), ["Søren"], "ISO_IR 192"),
    (("", "ISO 2022 IR 58"), ["张三"], "ISO_IR 192"),  # pydicom cannot write IR 58
    (("ISO_IR 192",), ["Müller^山田"], "ISO_IR 192"),
])
def test_response_charset_never_loses_characters(query_charset: tuple[str, ...], texts: list[str],
                                                 expected: str | list[str]) -> None:
    assert response_charset(query_charset, texts) == expected


def test_private_and_unknown_keys_come_back_empty() -> None:
    ds = identifier(StudyInstanceUID="")
    ds.add_new(0x00091010, "LO", "")
    ds.add_new(0x00091011, "LO", "x")
    query = parse_identifier(ds, Model.STUDY_ROOT)
    assert {r.tag for r in query.requested} == {0x0020000D, 0x00091010, 0x00091011}
    assert query.ignored == ("(0009,1011)",)
    rsp = build_response(query, _FakeRow({}))  # type: ignore[arg-type]
    assert rsp[0x00091010].value in ("", None) and rsp[0x00091011].value in ("", None)


def test_known_keys_are_matched_by_their_dictionary_vr() -> None:
    ds = identifier()
    ds.add_new(0x00100010, "LO", "DOE^JOHN")  # PatientName sent with the wrong VR
    [c] = parse_identifier(ds, Model.STUDY_ROOT).constraints
    assert c.vr == "PN"
    assert constraint_matches(c, ["Doe^John"])


def test_relational_queries_need_no_unique_keys_above() -> None:
    ds = identifier("IMAGE", SOPInstanceUID="", PatientName="Doe*")
    with pytest.raises(InvalidQuery, match="StudyInstanceUID must hold a single value"):
        parse_identifier(ds, Model.STUDY_ROOT)
    query = parse_identifier(ds, Model.STUDY_ROOT, relational=True)
    assert [c.keyword for c in query.constraints] == ["PatientName"]
    with pytest.raises(InvalidQuery, match="below the query level"):  # still hierarchical below
        parse_identifier(identifier("STUDY", SOPInstanceUID="1.2"), Model.STUDY_ROOT,
                         relational=True)


class _Stored:
    def __init__(self, date: str, time: str) -> None:
        self.values = {0x00080020: {"vr": "DA", "Value": [date]} if date else {},
                       0x00080030: {"vr": "TM", "Value": [time]} if time else {}}

    def element(self, tag: int, level: Level) -> dict[str, Any] | None:
        return self.values.get(tag)


@pytest.mark.parametrize(("date", "time", "stored_date", "stored_time", "separate", "combined"), [
    # PS3.4 C.2.2.2.5.1: 1 January 22:00 to 2 January 06:00
    ("20240101-20240102", "2200-0600", "20240101", "2300", False, True),
    ("20240101-20240102", "2200-0600", "20240102", "0500", False, True),
    ("20240101-20240102", "2200-0600", "20240101", "0500", False, False),
    ("20240101-20240102", "2200-0600", "20240102", "0601", False, False),
    ("20240101-", "1200-", "20240101", "1100", False, False),
    ("20240101-", "1200-", "20240102", "1100", False, True),
    ("-20240102", "-1200", "20240101", "2300", False, True),
    ("20240101", "1015", "20240101", "101530", True, True),
    ("20240101-20240102", "2200-0600", "20240101", "", False, False),  # no time: 00:00
])
def test_combined_date_time_matching(date: str, time: str, stored_date: str, stored_time: str,
                                     separate: bool, combined: bool) -> None:
    from storage.query import row_matches

    ds = identifier(StudyDate=date, StudyTime=time)
    row = _Stored(stored_date, stored_time)
    assert row_matches(parse_identifier(ds, Model.STUDY_ROOT), row) is separate  # type: ignore[arg-type]
    assert row_matches(parse_identifier(ds, Model.STUDY_ROOT, combined_datetime=True),
                       row) is combined  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "upper", "expected"), [
    ("2024", False, "20240101000000.000000"),
    ("2024", True, "20241231235959.999999"),
    ("202402", True, "20240229235959.999999"),
    ("20240101101530.5", False, "20240101101530.500000"),
    ("20240101120000+0100", False, "20240101110000.000000"),  # moved to UTC
    ("20240101060000-0500", False, "20240101110000.000000"),
    ("20240101-0500", False, "20240101050000.000000"),
    ("20241301", False, ""), ("2024010", False, ""), ("20240101+2400", False, ""),
    ("20241231235960", False, "20241231235959.999999"),  # a leap second: SS 60
    ("20241231235961", False, ""),
])
def test_norm_dt(value: str, upper: bool, expected: str) -> None:
    from storage.values import norm_dt

    assert norm_dt(value, upper=upper) == expected


@pytest.mark.parametrize(("query", "stored", "expected"), [
    ("20240101-20240131", "20240115", True),
    ("20240101-20240131", "20240131235959", True),   # the whole last day is inside
    ("20240101-20240131", "20240201", False),
    ("2024-", "20240101000000", True),
    ("-2023", "20231231235959.999", True),
    ("-2023", "20240101", False),
    ("2020-2024", "2022", True),                      # a range of years, not an offset
    ("20240101120000+0100", "20240101110000+0000", True),   # the same instant
    ("20240101120000+0100", "20240101120000+0000", False),
    ("20240101100000-20240101120000", "20240101130000+0200", True),  # 11:00 UTC
    ("20240101-0500", "20240101120000-0500", False),  # "-" is a range (to year 500), as
    # PS3.4 C.2.2.2.1.3 says: a query's single DT value carries no negative offset
])
def test_dt_matching(query: str, stored: str, expected: bool) -> None:
    ds = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
                    AcquisitionDateTime=query)
    [c] = [c for c in parse_identifier(ds, Model.STUDY_ROOT).constraints if c.vr == "DT"]
    assert constraint_matches(c, [stored]) is expected


@pytest.mark.parametrize(("value", "stored", "any_of", "all_of"), [
    (["CT", "MR"], ["MR", "CT", "OT"], True, True),
    (["CT", "MR"], ["CT"], True, False),
    (["CT", "MR"], ["US"], False, False),
    (["C*", "M?"], ["CT", "MR"], True, True),
])
def test_multiple_value_matching_when_negotiated(value: list[str], stored: list[str],
                                                 any_of: bool, all_of: bool) -> None:
    ds = identifier(ModalitiesInStudy=value)
    [plain] = parse_identifier(ds, Model.STUDY_ROOT).constraints
    [negotiated] = parse_identifier(ds, Model.STUDY_ROOT, multiple_values=True).constraints
    assert constraint_matches(plain, stored) is any_of
    assert constraint_matches(negotiated, stored) is all_of


def test_uid_lists_stay_lists_with_multiple_value_matching() -> None:
    ds = identifier(StudyInstanceUID=["1.2", "1.3"])
    [c] = parse_identifier(ds, Model.STUDY_ROOT, multiple_values=True).constraints
    assert constraint_matches(c, ["1.3"])


def test_combined_date_time_needs_the_same_form_of_range() -> None:
    ds = identifier(StudyDate="20240101-20240102", StudyTime="2200-")
    query = parse_identifier(ds, Model.STUDY_ROOT, combined_datetime=True)
    assert all(c.kind is not Kind.DATETIME for c in query.constraints)


def test_wildcard_match_agrees_with_a_regular_expression() -> None:
    import random
    import re

    from storage.query import wildcard_match

    rng = random.Random(7)
    for _ in range(20000):
        pattern = "".join(rng.choice("ab*?") for _ in range(rng.randint(0, 7)))
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 8)))
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
        expected = re.fullmatch(regex, text, re.DOTALL) is not None
        assert wildcard_match(pattern, text) is expected, (pattern, text)


@pytest.mark.timeout(60)  # a hang guard, not a speed target
def test_long_wildcard_patterns_do_not_stall() -> None:
    from storage.query import wildcard_match

    assert not wildcard_match("*" + "a" * 2000 + "b", "a" * 20000)
    assert not wildcard_match("*a?" * 300 + "*b", "a" * 20000)


@pytest.mark.parametrize(("keyword", "value", "stored", "expected"), [
    ("PatientName", "ΑΣ*", ["ΑΣΠΡΟΣ"], True),          # no final-sigma surprise
    ("PatientName", "Doe*^*", ["Doe"], True),           # omitted trailing components
    ("PatientName", "Doe^John^*", ["Doe^John"], True),
    ("PatientName", "Yamada*=*", ["Yamada^Tarou"], True),
    ("PatientName", "*=*=*", ["Yamada^Tarou"], True),
    ("SeriesDate", "-19000101", ["2024-06-30"], False),  # not a date: no value
])
def test_review_cases(keyword: str, value: str, stored: list[str], expected: bool) -> None:
    ds = identifier("SERIES", StudyInstanceUID="1.2", **{keyword: value})
    [c] = [c for c in parse_identifier(ds, Model.STUDY_ROOT).constraints if c.keyword == keyword]
    assert constraint_matches(c, stored) is expected


def test_control_attributes_and_unmatchable_keys() -> None:
    ds = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.3",
                    TimezoneOffsetFromUTC="+0100")
    ds.add_new(0x00091010, "UN", b"other value")
    query = parse_identifier(ds, Model.STUDY_ROOT)
    assert [c.keyword for c in query.constraints] == ["StudyInstanceUID", "SeriesInstanceUID"]
    assert 0x00080201 not in {r.tag for r in query.requested}  # never echoed empty
    assert query.ignored == ("(0009,1010)",)  # FF01


def test_star_among_values_under_and_semantics() -> None:
    ds = identifier(ModalitiesInStudy=["CT", "*"])
    [c] = parse_identifier(ds, Model.STUDY_ROOT, multiple_values=True).constraints
    assert not constraint_matches(c, ["MR"]) and constraint_matches(c, ["CT", "MR"])
    assert parse_identifier(ds, Model.STUDY_ROOT).constraints == ()  # OR: universal


def test_at_keys_match() -> None:
    ds = identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.3")
    ds.add_new(0x00209165, "AT", [0x00100010])  # DimensionIndexPointer
    c = [c for c in parse_identifier(ds, Model.STUDY_ROOT).constraints if c.vr == "AT"][0]
    assert constraint_matches(c, ["00100010"])


def test_sequence_responses_hold_matching_items_and_requested_nested_keys() -> None:
    def code(value: str, nested: str) -> dict[str, Any]:
        return {"00080100": {"vr": "SH", "Value": [value]},
                "00080104": {"vr": "LO", "Value": [f"meaning {value}"]},
                "00080121": {"vr": "SQ", "Value": [{
                    "00080100": {"vr": "SH", "Value": [nested]},
                    "00080102": {"vr": "SH", "Value": ["X"]}}]}}

    stored = {0x00081032: {"vr": "SQ", "Value": [code("A", "A1"), code("B", "B1")]}}
    nested = Dataset()
    nested.CodeValue = ""
    item = Dataset()
    item.CodeValue = "B"
    item.EquivalentCodeSequence = [nested]
    ds = identifier()
    ds.ProcedureCodeSequence = [item]
    rsp = build_response(parse_identifier(ds, Model.STUDY_ROOT), _FakeRow(stored))  # type: ignore[arg-type]
    [only] = rsp.ProcedureCodeSequence  # the item that matched, not A
    assert only.CodeValue == "B" and "CodeMeaning" not in only
    [inner] = only.EquivalentCodeSequence
    assert inner.CodeValue == "B1" and "CodingSchemeDesignator" not in inner
