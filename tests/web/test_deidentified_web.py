"""An account of ``web.deidentify`` sees only de-identified data through DICOMweb (PS3.15
Annex E; the table is tests/storage/data/part15-sample.xml): its searches, metadata,
instances and frames, named by replaced UIDs, with instances whose pixels may show the
patient left out; a stored UID, a match on what the profile changes, a write, the page and
the metrics are refused. dicomweb-client and httpx against a real server on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from scp.config import ConfigError, load_config
from storage.deidentify import Pseudonyms
from tests.factory import encode, make_ds
from tests.test_deidentified_peers import SETTINGS, one_study
from tests.web.conftest import WebRunning
from tests.web.test_audit import wait_for
from web.auth import hash_token, new_token

SECRET_TOKEN = new_token()
RESEARCH = f"research:read-write:{hash_token(SECRET_TOKEN)}"
"""read-write on purpose: web.deidentify still keeps it to reading DICOMweb."""
BEARER = {"Authorization": f"Bearer {SECRET_TOKEN}"}


def client(running: WebRunning) -> DICOMwebClient:
    return DICOMwebClient(running.url, headers=BEARER)


@pytest.fixture
def deidentified(start_web: Callable[..., WebRunning]) -> tuple[WebRunning, list[Dataset]]:
    """A server with the study of :func:`one_study` (three CTs, an ultrasound image without
    Burned In Annotation) and the token of an account that sees it de-identified."""
    running = start_web(**{**SETTINGS, "web.tokens": [RESEARCH],
                           "web.deidentify": ["research:research"]})
    datasets = one_study()
    for ds in [datasets[3], *datasets[:3]]:  # the ultrasound image first: the study's
        running.archive.store(encode(ds), ExplicitVRLittleEndian)  # thumbnail would be it
    return running, datasets


def stored_values(datasets: list[Dataset]) -> list[str]:
    """What must never reach the account: the name, the ID, every stored UID."""
    return ["Doe", "PID-4711", *{str(ds[k].value) for ds in datasets for k in (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}]


def assert_none_of(values: list[str], text: str) -> None:
    found = [v for v in values if v in text]
    assert not found, found


def test_a_de_identified_account_sees_replaced_uids_pseudonyms_and_no_burned_in_image(
        deidentified: tuple[WebRunning, list[Dataset]]) -> None:
    running, datasets = deidentified
    secret = stored_values(datasets)
    dw = client(running)

    [study] = dw.search_for_studies(fields=["StudyDescription", "NumberOfStudyRelatedSeries"])
    assert_none_of(secret, json.dumps(study))
    study_uid = study["0020000D"]["Value"][0]
    assert study_uid.startswith("2.25.")
    assert study["00100010"]["Value"][0]["Alphabetic"].startswith("ANONYMOUS^")
    patient_id = study["00100020"]["Value"][0]
    assert study["00081190"]["Value"] == [f"{running.url}/studies/{study_uid}"]
    assert study["00201206"]["Value"] == [2]  # a computed key, as stored
    study_date = study["00080020"]["Value"][0]
    assert study_date != datasets[0].StudyDate  # retain_long_modified_dates: shifted

    series = dw.search_for_series(study_uid)
    assert len(series) == 2
    assert_none_of(secret, json.dumps(series))
    instances = dw.search_for_instances(study_uid)
    assert len(instances) == 3  # the ultrasound image is withheld (burned-in annotation)
    assert_none_of(secret, json.dumps(instances))
    [us_series] = [s["0020000E"]["Value"][0] for s in series
                   if s["00080060"]["Value"] == ["US"]]
    assert dw.search_for_instances(study_uid, us_series) == []

    copies = dw.retrieve_study(study_uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in copies) == sorted(
        i["00080018"]["Value"][0] for i in instances)
    for ds in copies:
        assert str(ds.PatientName).startswith("ANONYMOUS^")
        assert ds.PatientID == patient_id  # one pseudonym and one date shift throughout
        assert ds.StudyDate == study_date
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientIdentityRemoved == "YES"
        assert not [e.tag for e in ds if e.tag.is_private]
        assert_none_of(secret, repr(ds))

    ct_series = copies[0].SeriesInstanceUID
    metadata = dw.retrieve_series_metadata(study_uid, ct_series)
    assert len(metadata) == 3
    assert_none_of(secret, json.dumps(metadata))
    whole = dw.retrieve_study_metadata(study_uid)  # the ultrasound image left out
    assert sorted(m["00080018"]["Value"][0] for m in whole) == sorted(
        m["00080018"]["Value"][0] for m in metadata)
    sop = metadata[0]["00080018"]["Value"][0]
    assert metadata[0]["7FE00010"]["BulkDataURI"] == (
        f"{running.url}/studies/{study_uid}/series/{ct_series}/instances/{sop}/bulkdata/7FE00010")
    [frame] = dw.retrieve_instance_frames(study_uid, ct_series, sop, [1])
    assert frame == datasets[0].PixelData  # the pixels are not changed, only the header

    # what it was not given, or may not see, is not there
    base = f"{running.url}/studies"
    with httpx.Client(headers=BEARER, timeout=30) as http:
        stored = str(datasets[0].StudyInstanceUID)
        assert http.get(f"{base}/{stored}").status_code == 404
        assert http.get(f"{base}?StudyInstanceUID={stored}").json() == []
        rendered = http.get(f"{base}/{study_uid}/series/{us_series}/rendered")
        assert rendered.status_code == 404
        assert "nothing there is shown de-identified" in rendered.text
        other_bulk = http.get(f"{base}/{study_uid}/series/{ct_series}/instances/{sop}/"
                              "bulkdata/00100010")
        assert other_bulk.status_code == 404
        assert "given the pixel data only" in other_bulk.text
        refused = http.get(f"{base}?PatientName=Doe*")
        assert refused.status_code == 400
        assert "the profile 'research' changes it" in refused.text
        assert len(http.get(f"{base}?ModalitiesInStudy=CT").json()) == 1  # kept: matched
        # its pseudonym finds that patient's studies, exactly (the viewer looks for others
        # so): not the same ID under another issuer, nor one a stored "*" would match
        for other in (make_ds(PatientID="PID-4711", IssuerOfPatientID="ELSEWHERE"),
                      make_ds(PatientID="PID-4711*"), make_ds(PatientID="PID-4711X")):
            running.archive.store(encode(other), ExplicitVRLittleEndian)
        [again] = http.get(f"{base}?PatientID={patient_id}").json()
        assert again["0020000D"]["Value"] == [study_uid]
        assert len(http.get(f"{running.url}/series?00100020={patient_id}").json()) == 2
        assert len(http.get(f"{base}/{study_uid}/series?PatientID={patient_id}"
                            "&IssuerOfPatientID=ELSEWHERE").json()) == 2  # the issuer is ours
        for other in (make_ds(PatientID="W*"), make_ds(PatientID="WX")):
            running.archive.store(encode(other), ExplicitVRLittleEndian)
        http.get(f"{base}?limit=50")  # the account is shown every patient's pseudonym
        starred = Pseudonyms(SETTINGS["deidentify.secret"].encode()).patient("\\W*")[0]
        assert len(http.get(f"{base}?PatientID={starred}").json()) == 1  # "*" as stored
        assert http.get(f"{base}?PatientID=PID-4711").json() == []  # stored: not its own
        assert http.get(f"{base}?PatientID=0123456789ABCDEF").json() == []
        assert http.get(f"{base}?PatientID={patient_id[:4]}*").status_code == 400
        # the pseudonym's row is no UID: as one, it names nothing and tells nothing
        for url in (f"{base}/patient:{patient_id}/series",
                    f"{base}?StudyInstanceUID=patient:{patient_id}"):
            answer = http.get(url)
            assert answer.status_code == 200 and answer.json() == [], (url, answer.text)
        for method, url in (("POST", f"{base}"), ("DELETE", f"{base}/{study_uid}"),
                            ("GET", f"{running.root}/admin/status"),
                            ("GET", f"{running.root}/metrics")):
            answer = http.request(method, url)
            assert answer.status_code == 403, (method, url, answer.text)
            assert "sees de-identified data (research)" in answer.text

    # no error tells a stored UID: paths mixed up, a frame it has not, what is withheld
    us_study = f"{base}/{study_uid}/series/{us_series}"
    with httpx.Client(headers=BEARER, timeout=30) as http:
        for url in (f"{base}/{ct_series}", f"{base}/{study_uid}/series/{sop}",
                    f"{base}/{study_uid}/series/{ct_series}/instances/{ct_series}",
                    f"{base}/{study_uid}/series/{ct_series}/instances/{sop}/frames/99",
                    f"{us_study}/thumbnail", f"{us_study}/metadata", us_study):
            answer = http.get(url)
            assert answer.status_code == 404, (url, answer.status_code, answer.text)
            assert_none_of(secret, answer.text)
        assert "(a UID)" in http.get(f"{base}/{ct_series}").text
        # the study's thumbnail is of an image it may see
        assert http.get(f"{base}/{study_uid}/thumbnail").status_code == 200

    # an account without a profile still sees the study as stored
    plain = DICOMwebClient(running.url).search_for_studies()
    assert plain[0]["00100020"]["Value"] == ["PID-4711"]


def test_a_de_identified_retrieve_is_audited_with_its_profile(
        deidentified: tuple[WebRunning, list[Dataset]]) -> None:
    running, datasets = deidentified
    dw = client(running)
    [study] = dw.search_for_studies()
    dw.retrieve_study(study["0020000D"]["Value"][0])
    def retrieved(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [a for a in lines if a["event"] == "http" and "instances" in a]

    def searched(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [a for a in lines if a["event"] == "http" and a["service"] == "QIDO-RS"]
    trail = wait_for(running.dicom.data_dir / "audit.jsonl",
                     lambda lines: bool(retrieved(lines) and searched(lines)))
    [line] = retrieved(trail)
    assert (line["user"], line["profile"]) == ("research", "research")
    assert line["study"] == str(datasets[0].StudyInstanceUID)  # as stored
    assert (line["instances"], line["withheld"]) == (3, 1)
    [search] = searched(trail)
    assert search["profile"] == "research"


def test_under_retain_uids_the_account_names_the_stored_uids(
        start_web: Callable[..., WebRunning]) -> None:
    settings: dict[str, Any] = {**SETTINGS, "profiles": [
        {"name": "uids", "options": ["retain_uids"]}]}
    running = start_web(**{**settings, "web.tokens": [RESEARCH],
                           "web.deidentify": ["research:uids"]})
    datasets = one_study()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    study = str(datasets[0].StudyInstanceUID)
    copies = client(running).retrieve_study(study)
    assert len(copies) == 3
    assert {ds.StudyInstanceUID for ds in copies} == {study}
    assert all(str(ds.PatientName).startswith("ANONYMOUS^") for ds in copies)
    us = datasets[3]  # nameable here, and still not shown
    url = (f"{running.url}/studies/{study}/series/{us.SeriesInstanceUID}/instances/"
           f"{us.SOPInstanceUID}")
    with httpx.Client(headers=BEARER, timeout=30) as http:
        for tail in ("/frames/1", "/rendered", "/thumbnail", "/bulkdata/7FE00010", ""):
            answer = http.get(url + tail)
            assert answer.status_code == 404, (tail, answer.text)
            assert "shown de-identified" in answer.text, tail


def test_web_deidentify_names_an_account_and_a_profile(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "deidentify": {"table": SETTINGS["deidentify.table"],
                       "secret": SETTINGS["deidentify.secret"]},
        "profiles": SETTINGS["profiles"],
        "web": {"tokens": [RESEARCH],
                "deidentify": ["research:nothing", "nobody:research", "no-colon",
                               "research:research"]}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    for fragment in ("web.deidentify[0]: 'nothing' is not the name of a profiles entry",
                     "web.deidentify[1]: 'nobody' is not the name of a web.users or",
                     "web.deidentify[2]: must be \"account:PROFILE\"",
                     "web.deidentify[3]: 'research' is listed more than once"):
        assert any(fragment in p for p in problems), (fragment, problems)
    assert len(problems) == 4, problems
