"""QIDO-RS (PS3.18 10.6) over a real server, with a client nobody here wrote
(``dicomweb-client``) and with httpx for the raw cases.

The heart of it is a table of queries answered equally by C-FIND (pynetdicom) and QIDO-RS:
the same matches and the same values of the keys asked for, at every level, for every
matching rule C-FIND has.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from scp import status
from scp.server import Server
from storage import Level
from tests.conftest import Running, find, server_config
from tests.factory import encode, expected_table, hierarchy, make_ds, uid
from tests.web.conftest import WebRunning
from web import WebServer

DICOM_JSON = "application/dicom+json"
JAPANESE = "chrH31.dcm"  # ISO 2022 IR 87: Yamada^Tarou=山田^太郎=やまだ^たろう
RUSSIAN = "chrRuss.dcm"  # ISO_IR 144 (Cyrillic)
REFERENCED = "1.2.826.0.1.3680043.8.498.999.1"  # ReferencedSOPInstanceUID of study 3
TIMEZONE = "+0100"  # TimezoneOffsetFromUTC of PID3's instances
MANY = 130  # instances of one series: more than one batch of results (storage BATCH 100)


def charset_sample(name: str) -> Dataset:
    """A pydicom charset sample, made a storable instance in its own character set."""
    ds = dcmread(next(f for f in get_charset_files(name)))
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, uid())
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientID = f"CHARSET-{name}"
    return ds


def dataset() -> list[Dataset]:
    """:func:`tests.factory.hierarchy`, a referenced study on study 3, non-ASCII names in
    ISO 2022 and ISO_IR 144, and one large series."""
    out = hierarchy()
    for ds in out:
        if ds.PatientID == "PID2":
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            item.ReferencedSOPInstanceUID = REFERENCED
            other = Dataset()
            other.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            other.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.999.2"
            ds.ReferencedStudySequence = Sequence([item, other])
        if ds.PatientID == "PID3":  # a DS number and a small binary value (Annex F)
            ds.SliceThickness = "2.50"
            ds.add_new(0x00420011, "OB", b"\x01\x02\x03\x04")  # EncapsulatedDocument
            ds.TimezoneOffsetFromUTC = TIMEZONE
    out += [charset_sample(JAPANESE), charset_sample(RUSSIAN)]
    study, series = uid(), uid()
    out += [make_ds(PatientID="MANY", StudyInstanceUID=study, SeriesInstanceUID=series,
                    InstanceNumber=n) for n in range(1, MANY + 1)]
    return out


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WebRunning, list[Dataset]]]:
    """One server for the module (its data is only read), with :func:`dataset` stored."""
    data_dir = tmp_path_factory.mktemp("qido")
    config = server_config(data_dir, **{"web.port": 0, "storage.durability": "relaxed"})
    server = Server(config)
    web = WebServer(config.web, server.archive)
    try:
        server.start()
        web.start()
        datasets = dataset()
        for ds in datasets:
            server.archive.store(encode(ds), ExplicitVRLittleEndian)
        yield WebRunning(Running(server, config, Path(data_dir)), web), datasets
    finally:
        web.stop(grace=5)
        server.stop(grace=5)


@pytest.fixture
def pacs(stored: tuple[WebRunning, list[Dataset]]) -> WebRunning:
    return stored[0]


@pytest.fixture
def datasets(stored: tuple[WebRunning, list[Dataset]]) -> list[Dataset]:
    return stored[1]


def qido(pacs: WebRunning, path: str, params: Any = None,
         accept: str = DICOM_JSON) -> list[dict[str, Any]]:
    response = httpx.get(f"{pacs.url}{path}", params=params, headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    result: list[dict[str, Any]] = response.json()
    return result


def value(result: dict[str, Any], keyword_or_tag: str) -> Any:
    """The first value of an attribute of a DICOM JSON result (None when empty)."""
    tag = keyword_or_tag if keyword_or_tag[:1].isdigit() else f"{_tag(keyword_or_tag):08X}"
    return (result.get(tag, {}).get("Value") or [None])[0]


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    assert tag is not None
    return int(tag)


def studies_of(datasets: list[Dataset], **keys: Any) -> set[str]:
    return {ds.StudyInstanceUID for ds in datasets
            if all(ds.get(k) == v for k, v in keys.items())}


# ---------------------------------------------------------------------------------------
# C-FIND and QIDO-RS answer a query equally

STUDY_KEYS = ("PatientName", "PatientID", "StudyDate", "AccessionNumber", "StudyDescription",
              "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances", "InstanceAvailability")
SERIES_KEYS = ("Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPClassUID", "InstanceNumber", "InstanceAvailability")
UNIQUE = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID",
          Level.IMAGE: "SOPInstanceUID"}
RETURNED = {Level.STUDY: STUDY_KEYS, Level.SERIES: SERIES_KEYS, Level.IMAGE: IMAGE_KEYS}


def _pid(datasets: list[Dataset], pid: str) -> list[Dataset]:
    return [ds for ds in datasets if ds.PatientID == pid]


def equality_cases() -> list[tuple[str, Level, Any]]:
    """(id, level, keys): ``keys`` maps a keyword to its C-FIND value, or is a function of
    the stored data sets giving that mapping (for UIDs)."""
    def first_study(d: list[Dataset]) -> str:
        return str(_pid(d, "PID1")[0].StudyInstanceUID)

    def first_series(d: list[Dataset]) -> tuple[str, str]:
        ds = _pid(d, "PID1")[0]
        return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)

    def in_study(**keys: Any) -> Any:
        return lambda d: {"StudyInstanceUID": first_study(d), **keys}

    def in_series(**keys: Any) -> Any:
        return lambda d: dict(zip(("StudyInstanceUID", "SeriesInstanceUID"), first_series(d),
                                  strict=True)) | keys

    return [
        ("single PatientID", Level.STUDY, {"PatientID": "PID1"}),
        ("no key: every study", Level.STUDY, {}),
        ("PN wildcard, folded case", Level.STUDY, {"PatientName": "doe*"}),
        ("PN folded accents", Level.STUDY, {"PatientName": "MULLER^JURGEN"}),
        ("PN ? wildcard", Level.STUDY, {"PatientName": "Sm?th^*"}),
        ("PN ideographic group", Level.STUDY, {"PatientName": "山田^太郎"}),
        ("PN Cyrillic wildcard", Level.STUDY, lambda d: {"PatientName": str(next(
            ds for ds in d if ds.PatientID == f"CHARSET-{RUSSIAN}").PatientName)[:4] + "*"}),
        ("date range", Level.STUDY, {"StudyDate": "20231101-20240131"}),
        ("open date range", Level.STUDY, {"StudyDate": "-20230101"}),
        ("single date", Level.STUDY, {"StudyDate": "20240315"}),
        ("empty value", Level.STUDY, {"StudyDate": '""'}),
        ("empty PN value", Level.STUDY, {"PatientName": '""'}),
        ("UID list", Level.STUDY, lambda d: {"StudyInstanceUID": [
            first_study(d), str(_pid(d, "PID2")[0].StudyInstanceUID)]}),
        ("modalities OR", Level.STUDY, {"ModalitiesInStudy": ["CT", "OT"]}),
        ("modality MR", Level.STUDY, {"ModalitiesInStudy": "MR"}),
        ("wildcard ?", Level.STUDY, {"AccessionNumber": "A?"}),
        ("lone * universal", Level.STUDY, {"PatientName": "*"}),
        ("description", Level.STUDY, {"StudyDescription": "Study 1"}),
        ("case-sensitive LO", Level.STUDY, {"StudyDescription": "study 1"}),
        ("sequence item", Level.STUDY, {"ReferencedStudySequence": [
            {"ReferencedSOPInstanceUID": REFERENCED, "ReferencedSOPClassUID": ""}]}),
        ("two keys", Level.STUDY, {"PatientID": "PID1", "StudyDate": "20240301-"}),
        ("series of a study", Level.SERIES, in_study()),
        ("series modality", Level.SERIES, in_study(Modality="CT")),
        ("series modality wildcard", Level.SERIES, in_study(Modality="?R")),
        ("series number", Level.SERIES, in_study(SeriesNumber="2")),
        ("series UID list", Level.SERIES, lambda d: {
            "StudyInstanceUID": first_study(d),
            "SeriesInstanceUID": sorted({ds.SeriesInstanceUID for ds in d
                                         if ds.StudyInstanceUID == first_study(d)})[:2]}),
        ("instances of a series", Level.IMAGE, in_series()),
        ("instance SOP class", Level.IMAGE, in_series(SOPClassUID="1.2.840.10008.5.1.4.1.1.2")),
        ("instance number", Level.IMAGE, lambda d: in_series()(d) | {
            "InstanceNumber": str(_pid(d, "PID1")[0].InstanceNumber)}),
    ]


CASES = equality_cases()


def cfind_and_qido(pacs: WebRunning, level: Level, keys: dict[str, Any]
                   ) -> tuple[list[Dataset], list[Dataset]]:
    """The same query as C-FIND (Study Root, hierarchical) and as QIDO-RS."""
    returned = [k for k in RETURNED[level] if k not in keys]
    identifier: dict[str, Any] = {"SpecificCharacterSet": "ISO_IR 192",
                                  "QueryRetrieveLevel": level.name, UNIQUE[level]: "",
                                  **{k: "" for k in returned}}
    params: list[tuple[str, str]] = [("includefield", ",".join(returned))]
    path = {Level.STUDY: "/studies"}.get(level, "")
    for keyword, val in keys.items():
        if keyword == "StudyInstanceUID" and level > Level.STUDY:
            path = f"/studies/{val}"
        elif keyword == "SeriesInstanceUID" and level > Level.SERIES:
            path += f"/series/{val}"
        elif isinstance(val, list) and val and isinstance(val[0], dict):  # a sequence
            for item_key, item_value in val[0].items():
                params.append((f"{keyword}.{item_key}", item_value))
        elif isinstance(val, list):
            params.append((keyword, ",".join(val) if keyword.endswith("UID") else
                           "\\".join(val)))
        else:
            params.append((keyword, val))
        if isinstance(val, list) and val and isinstance(val[0], dict):
            item = Dataset()
            for item_key, item_value in val[0].items():
                setattr(item, item_key, item_value)
            identifier[keyword] = Sequence([item])
        else:
            identifier[keyword] = val
    path += {Level.SERIES: "/series", Level.IMAGE: "/instances"}.get(level, "")
    matches, final = find(pacs.dicom, **identifier)
    assert final == status.SUCCESS
    results = qido(pacs, path, params)
    return matches, [Dataset.from_json(r) for r in results]


def normal(val: Any) -> Any:
    """A value compared across C-FIND and QIDO-RS (types differ: IS('3') and 3)."""
    if val is None or val == "":
        return ""
    if isinstance(val, Sequence):
        return tuple(tuple(sorted((e.keyword, normal(e.value)) for e in item)) for item in val)
    if isinstance(val, MultiValue | list):
        return tuple(sorted(str(v) for v in val))
    return str(val)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cfind_and_qido_answer_alike(pacs: WebRunning, datasets: list[Dataset],
                                     case: tuple[str, Level, Any]) -> None:
    _, level, keys = case
    keys = keys(datasets) if callable(keys) else keys
    matches, results = cfind_and_qido(pacs, level, keys)
    unique = UNIQUE[level]
    by_find = {str(m.get(unique)): m for m in matches}
    by_qido = {str(r.get(unique)): r for r in results}
    assert len(by_find) == len(matches) and len(by_qido) == len(results)
    assert set(by_qido) == set(by_find)
    compared = [k for k in (*RETURNED[level], *keys) if k not in ("QueryRetrieveLevel",)]
    for key, m in by_find.items():
        for keyword in compared:
            assert normal(by_qido[key].get(keyword)) == normal(m.get(keyword)), (key, keyword)


def test_the_table_is_not_trivial(pacs: WebRunning, datasets: list[Dataset]) -> None:
    """Each query of the table selects something, and most leave something out: equality
    of empty answers would prove nothing."""
    sizes = {}
    for name, level, keys in CASES:
        keys = keys(datasets) if callable(keys) else keys
        _, results = cfind_and_qido(pacs, level, keys)
        sizes[name] = len(results)
    empty = [name for name, n in sizes.items() if n == 0 and name != "case-sensitive LO"]
    assert not empty
    assert sizes["case-sensitive LO"] == 0
    assert sizes["single PatientID"] == 2 and sizes["sequence item"] == 1


# ---------------------------------------------------------------------------------------
# What every result holds (PS3.18 10.6.3.3)

STUDY_TABLE = ("00080020", "00080030", "00080050", "00080061", "00080090", "00081190",
               "00100010", "00100020", "00100030", "00100040", "0020000D", "00200010",
               "00201206", "00201208", "00080056")  # Table 10.6.3-3
SERIES_TABLE = ("00080060", "0008103E", "00081190", "0020000E", "00200011",
                "00201209")  # Table 10.6.3-4
INSTANCE_TABLE = ("00080016", "00080018", "00081190", "00200013", "00280010", "00280011",
                  "00280100", "00080056")  # Table 10.6.3-5, with the Type C ones our images have


def test_study_results_hold_table_10_6_3_3_with_exact_counts(
        pacs: WebRunning, datasets: list[Dataset]) -> None:
    results = qido(pacs, "/studies", {"includefield": "StudyDescription"})
    expected = expected_table(datasets)
    assert {value(r, "StudyInstanceUID") for r in results} == set(expected)
    for r in results:
        assert set(STUDY_TABLE) <= set(r), set(STUDY_TABLE) - set(r)
        assert "00081030" in r and "00080005" not in r and "00080052" not in r
        series, instances, modalities, _ = expected[value(r, "StudyInstanceUID")]
        assert value(r, "NumberOfStudyRelatedSeries") == series
        assert value(r, "NumberOfStudyRelatedInstances") == instances
        assert set(r["00080061"].get("Value", [])) == modalities
        assert r["00201208"]["vr"] == "IS"


def test_series_and_instance_results_hold_their_tables(pacs: WebRunning,
                                                       datasets: list[Dataset]) -> None:
    study = _pid(datasets, "PID2")[0].StudyInstanceUID
    series = qido(pacs, f"/studies/{study}/series", {"includefield": "00080021"})
    by_series: dict[str, int] = {}
    for ds in datasets:
        if ds.StudyInstanceUID == study:
            by_series[ds.SeriesInstanceUID] = by_series.get(ds.SeriesInstanceUID, 0) + 1
    assert {value(r, "SeriesInstanceUID"): value(r, "NumberOfSeriesRelatedInstances")
            for r in series} == by_series
    for r in series:
        assert set(SERIES_TABLE) <= set(r) and value(r, "StudyInstanceUID") == study
        assert "00100010" not in r  # study attributes only for /series (all series)
        assert "00080021" in r  # includefield by tag, empty: the series has no SeriesDate
    se = value(series[0], "SeriesInstanceUID")
    instances = qido(pacs, f"/studies/{study}/series/{se}/instances")
    assert len(instances) == by_series[se]
    for r in instances:
        assert set(INSTANCE_TABLE) <= set(r)
        assert value(r, "SeriesInstanceUID") == se and value(r, "StudyInstanceUID") == study
        assert "00280008" not in r  # NumberOfFrames: only when known (Table 10.6.3-5)
        assert value(r, "Rows") == 4 and r["00280010"]["vr"] == "US"


def test_all_series_and_all_instances_carry_the_levels_above(pacs: WebRunning) -> None:
    """PS3.18 10.6.3.3.2/3: /series answers the study attributes too; /instances the
    study's and the series'; /studies/{study}/instances the series'."""
    series = qido(pacs, "/series", {"PatientID": "PID2"})
    assert len(series) == 3
    for r in series:
        assert set(STUDY_TABLE) | set(SERIES_TABLE) <= set(r)
        assert value(r, "PatientID") == "PID2"
    instances = qido(pacs, "/instances", {"PatientID": "PID2", "Modality": "OT"})
    assert len(instances) == 2
    for r in instances:
        assert set(STUDY_TABLE) | set(SERIES_TABLE) | set(INSTANCE_TABLE) <= set(r)
    study = value(series[0], "StudyInstanceUID")
    for r in qido(pacs, f"/studies/{study}/instances"):
        assert set(SERIES_TABLE) | set(INSTANCE_TABLE) <= set(r)
        assert "00100020" not in r


def test_instance_availability_and_timezone_offset(pacs: WebRunning) -> None:
    """PS3.18 Tables 10.6.3-3 to -5: InstanceAvailability is ONLINE (PS3.3 C.4.23.1.1) in
    every study and instance result; TimezoneOffsetFromUTC is there when known (an
    instance's), and empty when includefield asks for it where it is not."""
    for path in ("/studies", "/instances"):
        results = qido(pacs, path, {"PatientID": "PID3"})
        assert results and all(r["00080056"] == {"vr": "CS", "Value": ["ONLINE"]}
                               for r in results)
    instances = qido(pacs, "/instances", {"PatientID": "PID3"})
    assert all(r["00080201"] == {"vr": "SH", "Value": [TIMEZONE]} for r in instances)
    assert all("00080201" not in r for r in qido(pacs, "/instances", {"PatientID": "PID1"}))
    assert all("00080201" not in r for r in qido(pacs, "/studies", {"PatientID": "PID3"}))
    study, = qido(pacs, "/studies", {"PatientID": "PID3",
                                     "includefield": "TimezoneOffsetFromUTC"})
    assert study["00080201"] == {"vr": "SH"}
    series = qido(pacs, "/series", {"PatientID": "PID3",
                                    "includefield": "InstanceAvailability"})
    assert all(value(r, "InstanceAvailability") == "ONLINE" for r in series)


@pytest.mark.parametrize("charset", [None, "utf-8", "UTF-8", "iso-8859-1, utf-8;q=0.5", "*",
                                     "utf-8;q=1.000"])
def test_charset_parameter_accepting_utf8(pacs: WebRunning, charset: str | None) -> None:
    """PS3.18 8.3.3.2: the charset parameter; results are UTF-8 (F.2)."""
    params = {"PatientID": "PID1"} | ({"charset": charset} if charset else {})
    assert len(qido(pacs, "/studies", params)) == 2


def test_retrieve_url_names_the_wado_rs_resource(pacs: WebRunning) -> None:
    r = qido(pacs, "/instances", {"PatientID": "PID3", "limit": "1"})[0]
    study, series, sop = (value(r, k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                  "SOPInstanceUID"))
    assert r["00081190"]["vr"] == "UR"
    assert value(r, "RetrieveURL") == f"{pacs.url}/studies/{study}/series/{series}/instances/{sop}"
    s = qido(pacs, "/series", {"SeriesInstanceUID": series})[0]
    assert value(s, "RetrieveURL") == f"{pacs.url}/studies/{study}/series/{series}"
    st = qido(pacs, "/studies", {"StudyInstanceUID": study})[0]
    assert value(st, "RetrieveURL") == f"{pacs.url}/studies/{study}"


def test_includefield_forms_and_all(pacs: WebRunning) -> None:
    """PS3.18 8.3.4.3: keywords, tags, comma lists, repeated parameters, "all"."""
    plain = qido(pacs, "/studies", {"PatientID": "PID1"})
    assert all("00081030" not in r and "00100040" in r for r in plain)
    for params in ({"includefield": "StudyDescription"}, {"includefield": "00081030"},
                   {"includefield": "00081030,IssuerOfPatientID"},
                   [("includefield", "00100021"), ("includefield", "StudyDescription")]):
        query = [("PatientID", "PID1"), *(params.items() if isinstance(params, dict)
                                          else params)]
        results = qido(pacs, "/studies", query)
        assert {value(r, "StudyDescription") for r in results} == {"Study 1", "Study 2"}
    every = qido(pacs, "/studies", {"PatientID": "PID1", "includefield": "all"})
    assert all("00081030" in r and "00080062" in r and "00201200" in r for r in every)
    # a lower level's attribute in includefield is not returned (PS3.18 10.6.3.3.1)
    low = qido(pacs, "/studies", {"PatientID": "PID1", "includefield": "Modality"})
    assert all("00080060" not in r for r in low)
    instances = qido(pacs, "/instances", {"PatientID": "PID3", "includefield": "all"})
    assert all(value(r, "PhotometricInterpretation") == "MONOCHROME2" for r in instances)


def test_json_values_follow_annex_f(pacs: WebRunning) -> None:
    """PS3.18 F.2.3 numbers as JSON numbers, F.2.7 InlineBinary, F.2.5 an empty attribute
    without Value; HEAD answers like GET without a body."""
    r = qido(pacs, "/instances", {"PatientID": "PID3", "limit": "1",
                                  "includefield": "SliceThickness,00420011,PatientComments"})[0]
    assert r["00180050"] == {"vr": "DS", "Value": [2.5]}
    assert isinstance(r["00200013"]["Value"][0], int)  # IS
    assert r["00420011"] == {"vr": "OB", "InlineBinary": "AQIDBA=="}
    assert r["00104000"] == {"vr": "LT"}
    head = httpx.head(f"{pacs.url}/studies", params={"PatientID": "PID3"})
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == DICOM_JSON


def test_keys_by_tag_dotted_paths_and_repeated_uids(pacs: WebRunning,
                                                     datasets: list[Dataset]) -> None:
    assert {value(r, "PatientID") for r in qido(pacs, "/studies", {"00100020": "PID2"})
            } == {"PID2"}
    dotted = qido(pacs, "/studies", {"00081110.00081155": REFERENCED,
                                     "includefield": "ReferencedStudySequence"})
    assert len(dotted) == 1
    items = dotted[0]["00081110"]["Value"]  # only the matching item (PS3.4 C.2.2.2.6)
    assert [i["00081155"]["Value"] for i in items] == [[REFERENCED]]
    s1, s2 = sorted(studies_of(datasets, PatientID="PID1"))
    repeated = qido(pacs, "/studies", [("StudyInstanceUID", s1), ("StudyInstanceUID", s2)])
    comma = qido(pacs, "/studies", {"StudyInstanceUID": f"{s1},{s2}"})
    assert {value(r, "StudyInstanceUID") for r in repeated} == {
        value(r, "StudyInstanceUID") for r in comma} == {s1, s2}


def test_multiple_value_matching_when_asked(pacs: WebRunning,
                                            datasets: list[Dataset]) -> None:
    """PS3.18 8.3.4.6 (PS3.4 C.2.2.2.8): several values OR'ed by default, AND'ed when
    asked."""
    either = qido(pacs, "/studies", {"ModalitiesInStudy": "CT\\MR"})
    both = qido(pacs, "/studies", {"ModalitiesInStudy": "CT\\MR",
                                   "multiplevaluematching": "true"})
    assert len(either) > len(both) == 1
    assert set(both[0]["00080061"]["Value"]) >= {"CT", "MR"}


def test_non_ascii_names_come_back_in_utf8(pacs: WebRunning) -> None:
    """Names stored in ISO 2022 IR 87, ISO_IR 144 and ISO_IR 100 are answered in UTF-8
    JSON, every component group intact; no SpecificCharacterSet."""
    for sample in (JAPANESE, RUSSIAN):
        stored = dcmread(get_charset_files(sample)[0])
        response = httpx.get(f"{pacs.url}/studies", params={"PatientID": f"CHARSET-{sample}"})
        text = response.content.decode("utf-8")
        name = json.loads(text)[0]["00100010"]["Value"][0]
        groups = str(stored.PatientName).split("=")
        assert [name.get(g, "") for g in ("Alphabetic", "Ideographic", "Phonetic")
                ][:len(groups)] == groups
        assert "00080005" not in json.loads(text)[0]
    raw = httpx.get(f"{pacs.url}/studies", params={"PatientName": "mül*"}).content
    assert "Müller^Jürgen".encode() in raw
    assert "山田".encode() in httpx.get(f"{pacs.url}/studies",
                                       params={"PatientName": "山田*"}).content


# ---------------------------------------------------------------------------------------
# Paging, limits, warnings (PS3.18 8.3.4.4)


def test_paging_has_no_gaps_and_no_duplicates(pacs: WebRunning, datasets: list[Dataset]) -> None:
    everything = [value(r, "StudyInstanceUID") for r in qido(pacs, "/studies")]
    assert len(everything) == len(set(everything)) == len(expected_table(datasets))
    pages = [qido(pacs, "/studies", {"limit": "3", "offset": str(at)})
             for at in range(0, len(everything) + 3, 3)]
    paged = [value(r, "StudyInstanceUID") for page in pages for r in page]
    assert paged == everything
    assert pages[-1] == [] and all(len(p) <= 3 for p in pages)
    assert qido(pacs, "/studies", {"limit": "0"}) == []
    huge = "9" * 40  # beyond any C integer: still just "all of them"
    assert len(qido(pacs, "/studies", {"limit": huge})) == len(everything)
    assert qido(pacs, "/studies", {"offset": huge}) == []


def test_a_large_answer_streams_in_batches(pacs: WebRunning, datasets: list[Dataset]) -> None:
    many = next(ds for ds in datasets if ds.PatientID == "MANY")
    path = f"/studies/{many.StudyInstanceUID}/series/{many.SeriesInstanceUID}/instances"
    response = httpx.get(f"{pacs.url}{path}")
    assert "content-length" not in response.headers  # streamed (chunked)
    numbers = sorted(value(r, "InstanceNumber") for r in response.json())
    assert numbers == list(range(1, MANY + 1))
    assert len(qido(pacs, path, {"offset": "20", "limit": "105"})) == 105
    assert len(qido(pacs, path, {"offset": "120"})) == MANY - 120


def test_no_match_is_200_with_an_empty_array(pacs: WebRunning) -> None:
    """PS3.18 8.3.4.4.1 (current edition): no match is 200 with an empty list, no longer
    204."""
    response = httpx.get(f"{pacs.url}/studies", params={"PatientID": "NOBODY"})
    assert (response.status_code, response.json()) == (200, [])
    assert httpx.get(f"{pacs.url}/studies/1.2.3/series").json() == []


def test_fuzzymatching_is_answered_with_the_standard_warning(pacs: WebRunning) -> None:
    """PS3.18 8.3.4.2: we do not do fuzzy semantic matching (PN case and accents are
    always folded, literal matching being ours to define)."""
    plain = httpx.get(f"{pacs.url}/studies", params={"PatientName": "doe"})
    fuzzy = httpx.get(f"{pacs.url}/studies", params={"PatientName": "doe",
                                                      "fuzzymatching": "true"})
    assert fuzzy.json() == plain.json() == []
    assert fuzzy.headers["warning"] == (
        f"299 {pacs.url}: The fuzzymatching parameter is not supported. Only literal"
        " matching has been performed.")
    assert "warning" not in plain.headers
    assert "warning" not in httpx.get(f"{pacs.url}/studies",
                                      params={"fuzzymatching": "false"}).headers


@pytest.fixture
def max_results(pacs: WebRunning) -> Iterator[int]:
    """``query.max_results: 2`` on the running server, for one test (one index per
    process: the module's server cannot have a sibling)."""
    archive = pacs.archive
    options = archive.options
    archive.options = dataclasses.replace(options, max_results=2)
    try:
        yield 2
    finally:
        archive.options = options


def test_max_results_cuts_with_the_paging_warning(pacs: WebRunning, datasets: list[Dataset],
                                                  max_results: int) -> None:
    """PS3.18 8.3.4.4.1: the server's maximum gives at most that many results and a
    Warning with the number of matches left out; a smaller limit needs no warning."""
    total = len(expected_table(datasets))
    response = httpx.get(f"{pacs.url}/studies")
    assert response.status_code == 200 and len(response.json()) == max_results
    assert response.headers["warning"] == (f"299 {pacs.url}: There are {total - max_results}"
                                           " additional results that can be requested")
    last = httpx.get(f"{pacs.url}/studies", params={"offset": str(total - 1)})
    assert len(last.json()) == 1 and "warning" not in last.headers
    small = httpx.get(f"{pacs.url}/studies", params={"limit": "1"})
    assert len(small.json()) == 1 and "warning" not in small.headers
    big = httpx.get(f"{pacs.url}/studies", params={"limit": "10", "offset": "1"})
    assert len(big.json()) == max_results
    assert f"There are {total - 1 - max_results} additional" in big.headers["warning"]


# ---------------------------------------------------------------------------------------
# Media types and bad requests

@pytest.mark.parametrize("accept", [
    None, DICOM_JSON, "application/json", "*/*", "application/dicom+json, application/json",
    'application/dicom+json; charset="utf-8", multipart/related; type="application/dicom"',
    "text/html, application/json;q=0.9", "application/*",
])
def test_accepted_media_types(pacs: WebRunning, accept: str | None) -> None:
    headers = {"Accept": accept} if accept else {}
    response = httpx.get(f"{pacs.url}/studies", params={"PatientID": "PID2"}, headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == DICOM_JSON
    assert len(response.json()) == 1


def test_the_accept_query_parameter_counts_as_the_header(pacs: WebRunning) -> None:
    """PS3.18 8.3.3.1: ``accept`` as a query parameter, for user agents that cannot set
    the header."""
    ok = httpx.get(f"{pacs.url}/studies", params={"PatientID": "PID2",
                                                   "accept": "application/json"},
                   headers={"Accept": "text/html"})
    assert ok.status_code == 200 and len(ok.json()) == 1
    refused = httpx.get(f"{pacs.url}/studies", params={"accept": "application/dicom+xml"})
    assert refused.status_code == 406


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom+xml"', "application/dicom+xml",
    "text/html", "application/dicom+json;q=0", 'multipart/related; type="application/dicom"',
])
def test_other_media_types_are_406(pacs: WebRunning, accept: str) -> None:
    response = httpx.get(f"{pacs.url}/studies", headers={"Accept": accept})
    assert response.status_code == 406
    assert "application/dicom+json" in response.text
    assert response.text.count("\n") == 1


BAD = [
    ("/studies", {"foo": "bar"}, "unknown query parameter"),
    ("/studies", {"PatientNam": "x"}, "PatientNam"),
    ("/studies", {"QueryRetrieveLevel": "STUDY"}, "QueryRetrieveLevel"),
    ("/studies", {"StudyDate": "20241345"}, "StudyDate"),
    ("/studies", {"StudyDate": "2024-01-01-2024"}, "StudyDate"),
    ("/studies", {"StudyTime": "2500"}, "StudyTime"),
    ("/studies", {"StudyInstanceUID": "1.2.3x"}, "not a UID"),
    ("/studies", {"offset": "-1"}, "offset"),
    ("/studies", {"limit": "ten"}, "limit"),
    ("/studies", {"charset": "iso-8859-1"}, "UTF-8 only"),
    ("/studies", {"charset": "utf-8;q=0"}, "UTF-8 only"),
    ("/studies", {"charset": "utf-8;x"}, "is not a charset"),
    ("/studies", {"InstanceAvailability": "ONLINE"}, "returned only"),
    ("/instances", {"TimezoneOffsetFromUTC": "+0100"}, "returned only"),
    ("/studies", [("limit", "1"), ("limit", "2")], "more than once"),
    ("/studies", {"fuzzymatching": "maybe"}, "fuzzymatching"),
    ("/studies", {"includefield": "NoSuchKeyword"}, "NoSuchKeyword"),
    ("/studies", {"Modality": "CT"}, "below STUDY"),
    ("/studies", {"ReferencedStudySequence": "1.2"}, "item keys"),
    ("/studies", {"PatientID.PatientName": "x"}, "not a sequence"),
    ("/instances", {"PixelData": "00"}, "binary"),
    ("/instances", {"Rows": "many"}, "not a number"),
    ("/series", {"SeriesNumber": "one"}, "not a valid IS"),
    ("/studies/1.2.3/series", {"StudyInstanceUID": "1.2.3"}, "path"),
    ("/studies/1.2.abc/series", {}, "not a valid UID"),
    ("/studies/1.2.3/series/x/instances", {}, "not a valid UID"),
    (f"/studies/1.{'2' * 70}/instances", {}, "not a valid UID"),
]


@pytest.mark.parametrize(("path", "params", "reason"), BAD,
                         ids=[f"{p}?{q}" for p, q, _ in BAD])
def test_bad_requests_are_400_with_a_reason(pacs: WebRunning, path: str, params: Any,
                                            reason: str) -> None:
    response = httpx.get(f"{pacs.url}{path}", params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert reason in response.text and response.text.count("\n") == 1


# ---------------------------------------------------------------------------------------
# dicomweb-client


def test_dicomweb_client_searches(pacs: WebRunning, datasets: list[Dataset]) -> None:
    client = DICOMwebClient(url=pacs.url)
    studies = client.search_for_studies(search_filters={"PatientID": "PID1"},
                                        fields=["StudyDescription"])
    assert {value(s, "StudyInstanceUID") for s in studies} == studies_of(datasets,
                                                                        PatientID="PID1")
    assert {value(s, "StudyDescription") for s in studies} == {"Study 1", "Study 2"}
    study = value(studies[0], "StudyInstanceUID")
    series = client.search_for_series(study, search_filters={"Modality": "CT"})
    assert series and all(value(s, "Modality") == "CT" for s in series)
    se = value(series[0], "SeriesInstanceUID")
    instances = client.search_for_instances(study, se, fields=["Rows"])
    assert len(instances) == value(series[0], "NumberOfSeriesRelatedInstances")
    every = client.search_for_studies(limit=2, offset=1)
    assert len(every) == 2
    paged = client.search_for_studies(limit=2, get_remaining=True)
    assert len(paged) == len(expected_table(datasets))
    assert client.search_for_studies(fuzzymatching=True,
                                     search_filters={"PatientName": "SMITH^ANNA"})
    assert client.search_for_series(search_filters={"PatientID": "PID3"})
    assert len(client.search_for_instances(search_filters={"PatientID": "PID3"})) == 2
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    # dicomweb-client sends Host without the port: the RetrieveURL has it all the same
    assert value(studies[0], "RetrieveURL") == f"{pacs.url}/studies/{study}"
