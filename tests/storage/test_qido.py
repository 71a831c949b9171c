"""QIDO-RS in storage: search parameters become the same query as a C-FIND identifier, and
one match's answer is the same whether rendered as a DIMSE data set or as DICOM JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, InvalidQuery, Level, Model, QueryFailed
from storage.query import BATCH_SIZE, parse_identifier, parse_search, run_search
from storage.values import is_uid
from tests.factory import encode, hierarchy, make_ds, uid

S1, S2, SE = "1.2.3.4", "1.2.3.5", "1.2.3.6"


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def item(**keys: Any) -> Sequence:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return Sequence([ds])


# (search parameters, level, path study, path series) ~ the C-FIND identifier's keys
SAME = [
    ([("PatientID", "PID1")], Level.STUDY, "", "", {"PatientID": "PID1"}),
    ([("00100020", "PID1")], Level.STUDY, "", "", {"PatientID": "PID1"}),
    ([("PatientName", "doe^j*")], Level.STUDY, "", "", {"PatientName": "doe^j*"}),
    ([("StudyDate", "20240101-20240131")], Level.STUDY, "", "",
     {"StudyDate": "20240101-20240131"}),
    ([("StudyTime", "-1200")], Level.STUDY, "", "", {"StudyTime": "-1200"}),
    ([("StudyInstanceUID", f"{S1},{S2}")], Level.STUDY, "", "",
     {"StudyInstanceUID": [S1, S2]}),
    ([("StudyInstanceUID", S1), ("StudyInstanceUID", S2)], Level.STUDY, "", "",
     {"StudyInstanceUID": [S1, S2]}),
    ([("StudyDate", '""')], Level.STUDY, "", "", {"StudyDate": '""'}),
    ([("ModalitiesInStudy", "CT\\MR")], Level.STUDY, "", "", {"ModalitiesInStudy": "CT\\MR"}),
    ([("ModalitiesInStudy", "CT"), ("ModalitiesInStudy", "MR")], Level.STUDY, "", "",
     {"ModalitiesInStudy": ["CT", "MR"]}),
    ([("AccessionNumber", "A?")], Level.STUDY, "", "", {"AccessionNumber": "A?"}),
    ([("ReferencedStudySequence.ReferencedSOPInstanceUID", S1)], Level.STUDY, "", "",
     {"ReferencedStudySequence": item(ReferencedSOPInstanceUID=S1)}),
    ([("00081110.00081155", S1)], Level.STUDY, "", "",
     {"ReferencedStudySequence": item(ReferencedSOPInstanceUID=S1)}),
    ([("Modality", "CT")], Level.SERIES, S1, "", {"StudyInstanceUID": S1, "Modality": "CT"}),
    ([("PatientID", "P"), ("SeriesNumber", "2")], Level.SERIES, "", "",
     {"PatientID": "P", "SeriesNumber": "2"}),
    ([("SOPInstanceUID", f"{S1},{S2}")], Level.IMAGE, S1, SE,
     {"StudyInstanceUID": S1, "SeriesInstanceUID": SE, "SOPInstanceUID": [S1, S2]}),
    ([("Rows", "512")], Level.IMAGE, "", "", {"Rows": 512}),
    ([("InstanceNumber", "7")], Level.IMAGE, S1, "", {"StudyInstanceUID": S1,
                                                      "InstanceNumber": "7"}),
]


@pytest.mark.parametrize(("params", "level", "study", "series", "keys"), SAME)
def test_search_parameters_make_the_cfind_constraints(
        params: list[tuple[str, str]], level: Level, study: str, series: str,
        keys: dict[str, Any]) -> None:
    search = parse_search(params, level, study, series)
    query = parse_identifier(identifier(level.name, **keys), Model.STUDY_ROOT,
                             relational=True)
    assert search.query.constraints == query.constraints
    assert search.query.level is level and search.query.model is Model.STUDY_ROOT
    # every key matched is also answered
    assert {c.tag for c in query.constraints} <= {r.tag for r in search.query.requested}


def test_multiplevaluematching_is_cfind_multiple_value_matching() -> None:
    search = parse_search([("ModalitiesInStudy", "CT\\MR"), ("multiplevaluematching", "true")],
                          Level.STUDY)
    query = parse_identifier(identifier("STUDY", ModalitiesInStudy="CT\\MR"),
                             Model.STUDY_ROOT, relational=True, multiple_values=True)
    assert search.query.constraints == query.constraints
    assert search.query.constraints[0].all_terms


def test_paging_and_warnings_parameters() -> None:
    search = parse_search([("limit", "10"), ("offset", "20"), ("fuzzymatching", "TRUE"),
                           ("emptyvaluematching", "true")], Level.STUDY)
    assert (search.limit, search.offset, search.fuzzy_ignored) == (10, 20, True)
    assert parse_search([], Level.STUDY).limit is None
    assert parse_search([("includefield", "all")], Level.STUDY).everything == (
        Level.PATIENT, Level.STUDY)


@pytest.mark.parametrize(("params", "level", "study"), [
    ([("Foo", "1")], Level.STUDY, ""),
    ([("includefield", "Foo")], Level.STUDY, ""),
    ([("SpecificCharacterSet", "ISO_IR 192")], Level.STUDY, ""),
    ([("SOPInstanceUID", S1)], Level.SERIES, ""),
    ([("StudyDate", "2024")], Level.STUDY, ""),
    ([("StudyInstanceUID", "1.2.3.")], Level.STUDY, ""),
    ([("offset", "1.5")], Level.STUDY, ""),
    ([("multiplevaluematching", "yes")], Level.STUDY, ""),
    ([("PatientName.PatientID", "x")], Level.STUDY, ""),
    ([], Level.SERIES, "1..2"),
])
def test_bad_parameters_are_invalid_queries(params: list[tuple[str, str]], level: Level,
                                            study: str) -> None:
    with pytest.raises(InvalidQuery):
        parse_search(params, level, study)


def test_is_uid() -> None:
    assert is_uid("1.2.840.10008.1.2.1") and is_uid("0.0")
    assert not any(is_uid(u) for u in ("", "1.", ".1", "1..2", "1.2a", "1 2", "1" * 65))


def _store(archive: Archive, datasets: list[Dataset]) -> None:
    for ds in datasets:
        archive.store(encode(ds), ExplicitVRLittleEndian)


def test_json_and_dimse_answers_come_from_one_pipeline(new_archive: Archive) -> None:
    """Every element of every answer is the same as a pydicom Dataset (what C-FIND sends)
    and as DICOM JSON: value and VR, names in every component group."""
    datasets = hierarchy()
    datasets[0].SliceThickness = "2.50"
    datasets[0].add_new(0x00420011, "OB", b"\x01\x02\x03\x04")  # InlineBinary
    datasets.append(make_ds(PatientID="PID9", PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
                            SpecificCharacterSet=["", "ISO 2022 IR 87"],
                            StudyInstanceUID=uid()))
    _store(new_archive, datasets)
    for level, params in ((Level.STUDY, [("includefield", "all")]),
                          (Level.SERIES, [("includefield", "all")]),
                          (Level.IMAGE, [("includefield", "all")])):
        search = new_archive.parse_search(params, level)
        answer = new_archive.search(search)
        results = json.loads(answer.first)
        dimse = list(new_archive.find(search.query))
        assert len(results) == len(dimse) == {
            Level.STUDY: 6, Level.SERIES: 10, Level.IMAGE: len(datasets)}[level]
        for result, ds in zip(results, dimse, strict=True):
            from_json = Dataset.from_json(result)
            for elem in ds:
                if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet",
                                    "RetrieveAETitle"):
                    assert elem.tag not in from_json
                    continue
                if elem.tag not in from_json:  # "shall be present if known"
                    assert elem.tag in search.when_known and elem.value in (None, "")
                    continue
                other = from_json[elem.tag]
                assert other.VR == elem.VR, elem.keyword
                assert str(other.value or "") == str(elem.value or ""), elem.keyword


def test_large_answers_come_in_batches_with_the_connection_given_back(
        new_archive: Archive) -> None:
    study, series = uid(), uid()
    count = 2 * BATCH_SIZE + 5
    _store(new_archive, [make_ds(StudyInstanceUID=study, SeriesInstanceUID=series,
                                 InstanceNumber=n) for n in range(count)])
    released: list[int] = []
    search = new_archive.parse_search([], Level.IMAGE, study, series)
    answer = run_search(search, "", 0, lambda: released.append(1))
    assert answer.rest is not None and len(released) == 1  # the first batch, read at once
    body = answer.first + b"".join(answer.rest)
    assert len(json.loads(body)) == count
    assert len(released) == 3  # one release per batch read
    small = run_search(new_archive.parse_search([("limit", "5")], Level.IMAGE), "", 0,
                       lambda: released.append(1))
    assert small.rest is None and len(json.loads(small.first)) == 5


def test_max_results_counts_what_it_leaves_out(new_archive: Archive) -> None:
    _store(new_archive, [make_ds(PatientID=f"P{n}") for n in range(7)])
    search = new_archive.parse_search([], Level.STUDY)
    cut = run_search(search, "", 3, lambda: None)
    assert (len(json.loads(cut.first)), cut.remaining, cut.rest) == (3, 4, None)
    offset = run_search(new_archive.parse_search([("offset", "5")], Level.STUDY), "", 3,
                        lambda: None)
    assert (len(json.loads(offset.first)), offset.remaining) == (2, 0)
    limited = run_search(new_archive.parse_search([("limit", "2")], Level.STUDY), "", 3,
                         lambda: None)
    assert (len(json.loads(limited.first)), limited.remaining) == (2, 0)


def test_a_result_left_out_by_its_renderer_does_not_count_against_the_limits(
        new_archive: Archive) -> None:
    """A de-identified search leaves out a match it cannot de-identify (render gives None)
    and one withheld (keep says no): the limit and the server's maximum count answers, and
    the Warning's count what the maximum left out."""
    _store(new_archive, [make_ds(PatientID=f"P{n}") for n in range(10)])
    search = new_archive.parse_search([], Level.STUDY)

    def render(row: Any) -> bytes | None:
        patient = row.attrs(Level.PATIENT)["00100020"]["Value"][0]
        return None if patient == "P2" else json.dumps(patient).encode()

    def keep(row: Any) -> bool:
        return bool(row.attrs(Level.PATIENT)["00100020"]["Value"][0] != "P7")

    cut = run_search(search, "", 5, lambda: None, render, keep)
    assert json.loads(cut.first) == ["P0", "P1", "P3", "P4", "P5"]
    assert cut.remaining == 3  # P6, P8, P9: P7 is no match
    limited = run_search(new_archive.parse_search([("limit", "4")], Level.STUDY), "", 0,
                         lambda: None, render, keep)
    assert json.loads(limited.first) == ["P0", "P1", "P3", "P4"]


def test_an_unreadable_index_is_query_failed(new_archive: Archive) -> None:
    _store(new_archive, [make_ds()])
    new_archive.database.execute_sql('DROP TABLE "instance"')
    with pytest.raises(QueryFailed):
        new_archive.search(new_archive.parse_search([], Level.IMAGE))


NAMES = ["PatientName", "PatientID", "StudyDate", "StudyTime", "StudyInstanceUID",
         "ModalitiesInStudy", "Rows", "InstanceNumber", "ReferencedStudySequence",
         "ReferencedStudySequence.ReferencedSOPInstanceUID", "00100010", "00081110.00081155",
         "PixelData", "includefield", "limit", "offset", "fuzzymatching",
         "multiplevaluematching", "emptyvaluematching", "SeriesNumber", "00091010",
         "AcquisitionDateTime", "SliceThickness", "FrameIncrementPointer", "PixelSpacing"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), st.text(max_size=12)),
                                 st.text(max_size=24)), max_size=6),
       level=st.sampled_from([Level.STUDY, Level.SERIES, Level.IMAGE]),
       study=st.one_of(st.just(""), st.just(S1), st.text(max_size=10)))
def test_any_parameters_are_a_search_or_an_invalid_query(
        params: list[tuple[str, str]], level: Level, study: str) -> None:
    """Hostile parameters never raise anything but InvalidQuery (a 400, never a 500)."""
    try:
        parse_search(params, level, study)
    except InvalidQuery as exc:
        assert str(exc) and "\n" not in str(exc)
