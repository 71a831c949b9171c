"""C-FIND at every level of both information models, with pynetdicom and DCMTK findscu,
and every computed key at every level it belongs to, against the stored set."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
)

from scp import status
from tests.conftest import Running, associate, client_ae, find
from tests.factory import encode, hierarchy, make_ds, uid
from tests.test_move import Peer, start_peer  # noqa: F401  (a fixture)
from tests.test_retrieve import c_get

PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind
STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind


@pytest.fixture
def corpus(server: Running) -> list[Dataset]:
    """The synthetic hierarchy plus patients named in Cyrillic and in Japanese (ISO 2022),
    every other instance in implicit VR, stored over the network."""
    datasets = hierarchy() + [
        make_ds(PatientID="PID5", PatientName="Иванов^Иван", SpecificCharacterSet="ISO_IR 144",
                StudyDate=None),
        make_ds(PatientID="PID6", PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
                SpecificCharacterSet=["", "ISO 2022 IR 87"], StudyDescription=None),
    ]
    ae = client_ae(storage=False)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # one context each
            ae.add_requested_context(sop_class, syntax)
    assoc = associate(server, ae)
    for i, ds in enumerate(datasets):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if i % 2 else ExplicitVRLittleEndian
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    return datasets


def c_find(running: Running, model: Any, **keys: Any) -> list[Dataset]:
    """The matches of a C-FIND that must end in Success."""
    matches, final = find(running, model, **keys)
    assert final == status.SUCCESS
    return matches


def findscu(dcmtk: Callable[..., Any], running: Running, out: Path, root: str,
            **keys: str) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = [root, "-aec", running.ae_title, "-X", "-od", str(out)]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    dcmtk("findscu", *args, "127.0.0.1", str(running.port))
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def by_patient(datasets: list[Dataset]) -> dict[str, tuple[int, int, int]]:
    studies, series, instances = defaultdict(set), defaultdict(set), defaultdict(set)
    for ds in datasets:
        studies[ds.PatientID].add(ds.StudyInstanceUID)
        series[ds.PatientID].add(ds.SeriesInstanceUID)
        instances[ds.PatientID].add(ds.SOPInstanceUID)
    return {p: (len(studies[p]), len(series[p]), len(instances[p])) for p in studies}


def patient_answers(rsps: list[Dataset]) -> dict[str, tuple[int, int, int]]:
    return {r.PatientID: (int(r.NumberOfPatientRelatedStudies), int(r.NumberOfPatientRelatedSeries),
                          int(r.NumberOfPatientRelatedInstances)) for r in rsps}


PATIENT_KEYS = {"QueryRetrieveLevel": "PATIENT", "PatientID": "", "PatientName": "",
                "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                "NumberOfPatientRelatedInstances": ""}


def test_patient_level(server: Running, corpus: list[Dataset], dcmtk: Callable[..., Any],
                       tmp_path: Path) -> None:
    expected = by_patient(corpus)
    rsps = c_find(server, PATIENT_ROOT, **PATIENT_KEYS)
    assert patient_answers(rsps) == expected
    names = {r.PatientID: str(r.PatientName) for r in rsps}
    assert (names["PID3"], names["PID5"]) == ("Müller^Jürgen", "Иванов^Иван")
    assert names["PID6"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    by_findscu = findscu(dcmtk, server, tmp_path / "p", "-P", **PATIENT_KEYS)
    assert patient_answers(by_findscu) == expected
    assert {r.PatientID: str(r.PatientName) for r in by_findscu} == names
    # matching at PATIENT level
    [one] = c_find(server, PATIENT_ROOT, **{**PATIENT_KEYS, "PatientName": "smith*"})
    assert one.PatientID == "PID2"


def test_patient_keys_at_study_root_study_level(server: Running, corpus: list[Dataset]) -> None:
    rsps = c_find(server, STUDY_ROOT, QueryRetrieveLevel="STUDY", PatientID="PID1",
                  NumberOfPatientRelatedStudies="", NumberOfPatientRelatedInstances="")
    assert [(int(r.NumberOfPatientRelatedStudies), int(r.NumberOfPatientRelatedInstances))
            for r in rsps] == [(2, 10), (2, 10)]


@pytest.mark.parametrize(("root", "model"), [("-P", PATIENT_ROOT), ("-S", STUDY_ROOT)])
def test_series_and_image_levels(server: Running, corpus: list[Dataset], dcmtk: Callable[..., Any],
                                 tmp_path: Path, root: str, model: Any) -> None:
    study = corpus[0].StudyInstanceUID
    in_study = [ds for ds in corpus if ds.StudyInstanceUID == study]
    above = {"PatientID": corpus[0].PatientID} if model is PATIENT_ROOT else {}

    series_keys = {"QueryRetrieveLevel": "SERIES", **above, "StudyInstanceUID": study,
                   "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
                   "NumberOfSeriesRelatedInstances": ""}
    expected_series: dict[str, tuple[str, int, int]] = {}
    for ds in in_study:
        modality, number, n = expected_series.get(ds.SeriesInstanceUID, (ds.Modality, ds.SeriesNumber, 0))
        expected_series[ds.SeriesInstanceUID] = (modality, int(number), n + 1)

    def series_answers(rsps: list[Dataset]) -> dict[str, tuple[str, int, int]]:
        return {r.SeriesInstanceUID: (r.Modality, int(r.SeriesNumber),
                                      int(r.NumberOfSeriesRelatedInstances)) for r in rsps}

    assert series_answers(c_find(server, model, **series_keys)) == expected_series
    assert series_answers(findscu(dcmtk, server, tmp_path / "s", root, **series_keys)) == expected_series
    assert series_answers(c_find(server, model, **{**series_keys, "Modality": "MR"})) == {
        uid: v for uid, v in expected_series.items() if v[0] == "MR"}

    series = corpus[0].SeriesInstanceUID
    image_keys = {"QueryRetrieveLevel": "IMAGE", **above, "StudyInstanceUID": study,
                  "SeriesInstanceUID": series, "SOPInstanceUID": "", "InstanceNumber": "",
                  "SOPClassUID": "", "AvailableTransferSyntaxUID": ""}
    expected_images = {
        ds.SOPInstanceUID: (int(ds.InstanceNumber), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        for ds in in_study if ds.SeriesInstanceUID == series}

    def image_answers(rsps: list[Dataset]) -> dict[str, tuple[int, str, str]]:
        return {r.SOPInstanceUID: (int(r.InstanceNumber), str(r.SOPClassUID),
                                   str(r.AvailableTransferSyntaxUID)) for r in rsps}

    assert image_answers(c_find(server, model, **image_keys)) == expected_images
    assert image_answers(findscu(dcmtk, server, tmp_path / "i", root, **image_keys)) == expected_images
    assert len({v[2] for v in expected_images.values()}) == 2  # both syntaxes really occur


@pytest.mark.parametrize(("model", "keys", "comment"), [
    (PATIENT_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2"}, "PatientID"),
    (STUDY_ROOT, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": "1.2"}, "SeriesInstanceUID"),
])
def test_unique_keys_above_the_level_are_required(server: Running, model: Any,
                                                  keys: dict[str, str], comment: str) -> None:
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    assoc = associate(server)
    [(rsp, _)] = list(assoc.send_c_find(q, model))
    assoc.release()
    assert rsp.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert comment in rsp.ErrorComment


def test_configured_response_charset(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"query.response_charset": "ISO_IR 100"})
    for ds in (make_ds(PatientID="L", PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100"),
               make_ds(PatientID="C", PatientName="Иванов^Иван", SpecificCharacterSet="ISO_IR 144")):
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    rsps = c_find(running, STUDY_ROOT, QueryRetrieveLevel="STUDY", PatientID="", PatientName="")
    got = {r.PatientID: (str(r.PatientName), r.SpecificCharacterSet) for r in rsps}
    assert got == {"L": ("Müller^Jürgen", "ISO_IR 100"),      # the configured set
                   "C": ("Иванов^Иван", "ISO_IR 192")}         # it cannot: UTF-8


def test_max_results(start_server: Callable[..., Running], dcmtk: Callable[..., Any]) -> None:
    running = start_server(**{"query.max_results": 3, "storage.durability": "relaxed"})
    for ds in hierarchy():
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    assoc = associate(running)
    codes = [(int(rsp.Status), rsp.get("ErrorComment")) for rsp, _ in assoc.send_c_find(q, STUDY_ROOT)]
    assoc.release()
    assert [c for c, _ in codes] == [status.PENDING] * 3 + [status.FIND_OUT_OF_RESOURCES]
    assert "more than 3 matches" in codes[-1][1]
    proc = dcmtk("findscu", "-v", "-S", "-aec", running.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", "StudyInstanceUID", "127.0.0.1", str(running.port))
    log = proc.stdout + proc.stderr
    assert log.count("(Pending)") == 3 and "Refused: OutOfResources" in log, log[-1500:]


def _negotiating_ae(info: bytes) -> Any:
    from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = STUDY_ROOT
    item.service_class_application_information = info
    return item


def test_extended_negotiation_options(server: Running,
                                                          corpus: list[Dataset]) -> None:
    image_query = Dataset()
    image_query.QueryRetrieveLevel = "IMAGE"
    image_query.PatientName = "Smith*"
    image_query.SOPInstanceUID = ""

    # without negotiation: hierarchical, so the missing StudyInstanceUID is an error
    assoc = associate(server)
    [(rsp, _)] = list(assoc.send_c_find(image_query, STUDY_ROOT))
    assoc.release()
    assert rsp.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

    ae = client_ae()
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         ext_neg=[_negotiating_ae(b"\x01" * 7)])
    assert assoc.is_established
    accepted = assoc.acceptor.sop_class_extended
    # relational, combined date-time; not fuzzy names, timezone adjustment, enhanced
    # multi-frame conversion; empty value and multiple value matching
    assert accepted[STUDY_ROOT] == b"\x01\x01\x00\x00\x00\x01\x01"
    got = {str(i.SOPInstanceUID) for r, i in assoc.send_c_find(image_query, STUDY_ROOT)
           if r.Status == status.PENDING}
    assert got == {ds.SOPInstanceUID for ds in corpus if ds.PatientName == "Smith^Anna"}

    # combined: studies from 2023-11-20 10:00 to 2024-01-02 10:00 (times are all 10:15)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyDate = "20231120-20240102"
    q.StudyTime = "1000-1000"
    q.AccessionNumber = ""
    combined = {str(i.AccessionNumber) for r, i in assoc.send_c_find(q, STUDY_ROOT)
                if r.Status == status.PENDING}

    # multiple value matching: every value must match (AND); without it they are OR'ed
    m = Dataset()
    m.QueryRetrieveLevel = "STUDY"
    m.ModalitiesInStudy = ["CT", "MR"]
    m.AccessionNumber = ""
    both = {str(i.AccessionNumber) for r, i in assoc.send_c_find(m, STUDY_ROOT)
            if r.Status == status.PENDING}
    assoc.release()
    assert both == {"A1"}  # the only study with a CT and an MR series
    either = {str(i.AccessionNumber) for i in c_find(server, STUDY_ROOT, **{
        "QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": ["CT", "MR"], "AccessionNumber": ""})}
    assert either == {str(ds.AccessionNumber) for ds in corpus if ds.Modality in ("CT", "MR")}
    assert combined == {"A3"}  # 2023-11-20 10:15 is inside, 2024-01-02 10:15 is after
    separate = {str(i.AccessionNumber) for i in c_find(server, STUDY_ROOT, **{
        "QueryRetrieveLevel": "STUDY", "StudyDate": "20231120-20240102",
        "StudyTime": "1000-1000", "AccessionNumber": ""})}
    assert separate == set()  # not combined: a time 10:00-10:00:59 on any day, and all are 10:15


@pytest.fixture
def without_patient_id(server: Running) -> list[Dataset]:
    """Two studies whose instances have no PatientID (each a patient of its own), and one
    of patient PID1."""
    return _store_without_patient_id(server)


def _store_without_patient_id(server: Running) -> list[Dataset]:
    first, second = uid(), uid()
    datasets = [
        make_ds(PatientID=None, PatientName="Anon^One", StudyInstanceUID=first),
        make_ds(PatientID=None, PatientName="Anon^One", StudyInstanceUID=first),
        make_ds(PatientID="", PatientName="Anon^Two", StudyInstanceUID=second),
        make_ds(PatientID="PID1"),
    ]
    assoc = associate(server)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    return datasets


def test_patient_root_reaches_patients_without_a_patient_id(
        server: Running, without_patient_id: list[Dataset], dcmtk: Callable[..., Any],
        tmp_path: Path) -> None:
    """PatientID is Type 2: a patient may have none. A hierarchical Patient Root query names
    such a patient by Empty Value Matching, PatientID '""' (PS3.4 C.2.2.2.7)."""
    anonymous = {ds.StudyInstanceUID for ds in without_patient_id if not ds.get("PatientID")}
    patients = c_find(server, PATIENT_ROOT, QueryRetrieveLevel="PATIENT", PatientID="",
                      PatientName="")
    assert sorted(str(p.PatientID) for p in patients) == ["", "", "PID1"]

    studies = c_find(server, PATIENT_ROOT, QueryRetrieveLevel="STUDY", PatientID='""',
                     StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    assert {s.StudyInstanceUID: int(s.NumberOfStudyRelatedInstances) for s in studies} == {
        ds.StudyInstanceUID: 2 if ds.PatientName == "Anon^One" else 1
        for ds in without_patient_id if not ds.get("PatientID")}
    # DCMTK findscu, as a user would type it
    rsps = findscu(dcmtk, server, tmp_path / "findscu", "-P", QueryRetrieveLevel="STUDY",
                   PatientID='""', StudyInstanceUID="")
    assert {str(r.StudyInstanceUID) for r in rsps} == anonymous

    study = sorted(anonymous)[0]
    series = c_find(server, PATIENT_ROOT, QueryRetrieveLevel="SERIES", PatientID='""',
                    StudyInstanceUID=study, SeriesInstanceUID="")
    assert {s.SeriesInstanceUID for s in series} == {
        ds.SeriesInstanceUID for ds in without_patient_id if ds.StudyInstanceUID == study}

    received, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="STUDY", PatientID='""',
                                StudyInstanceUID=study)
    assert responses[-1].Status == status.SUCCESS
    assert len(received) == sum(ds.StudyInstanceUID == study for ds in without_patient_id)


def test_an_empty_patient_id_in_a_hierarchical_query_says_how_to_name_none(
        server: Running, without_patient_id: list[Dataset], caplog: Any) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = ""
    q.StudyInstanceUID = ""
    assoc = associate(server)
    with caplog.at_level(logging.WARNING, logger="scp.handlers"):
        [(rsp, _)] = list(assoc.send_c_find(q, PATIENT_ROOT))
    assoc.release()
    assert rsp.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    # the ErrorComment is an LO (64 characters): the whole reason is in the log
    assert "PatientID must hold a single value" in rsp.ErrorComment
    assert """for patients without a PatientID: '""', PS3.4 C.2.2.2.7""" in caplog.text


def test_patient_root_move_reaches_patients_without_a_patient_id(
        start_server: Callable[..., Running],
        start_peer: Callable[..., Peer]) -> None:  # noqa: F811  (the fixture imported above)
    peer = start_peer()
    running = start_server(peers=[peer.entry()])
    datasets = _store_without_patient_id(running)
    study = next(ds.StudyInstanceUID for ds in datasets if ds.PatientName == "Anon^One")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = '""'
    q.StudyInstanceUID = study
    ae = client_ae(storage=False)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelMove)
    assoc = associate(running, ae)
    responses = [rsp for rsp, _ in assoc.send_c_move(
        q, peer.ae_title, PatientRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert responses[-1].Status == status.SUCCESS
    assert sorted(str(ds.SOPInstanceUID) for ds in peer.datasets) == sorted(
        ds.SOPInstanceUID for ds in datasets if ds.StudyInstanceUID == study)
