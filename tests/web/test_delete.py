"""DELETE of a study, series or instance over HTTP (issue 16, item 1): read-write rights
only, a path checked as WADO-RS checks it, and what it deletes gone from QIDO-RS, WADO-RS and
C-FIND at once, with exact counts for the rest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from scp import status
from tests.conftest import find
from tests.factory import encode, expected_counts, hierarchy
from tests.web.conftest import WebRunning
from web.auth import hash_password

STUDIES_COUNT = "00201208"  # NumberOfStudyRelatedInstances


def store(running: WebRunning, datasets: list[Dataset]) -> None:
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)


def qido_counts(running: WebRunning) -> dict[str, int]:
    got = httpx.get(f"{running.url}/studies", params={"includefield": STUDIES_COUNT})
    if got.status_code == 204:
        return {}
    assert got.status_code == 200, got.text
    return {s["0020000D"]["Value"][0]: s[STUDIES_COUNT]["Value"][0] for s in got.json()}


def test_delete_a_series_then_an_instance_then_a_study(web: WebRunning) -> None:
    datasets = hierarchy()
    store(web, datasets)
    first = datasets[0]
    study = first.StudyInstanceUID
    series_uids = list(dict.fromkeys(ds.SeriesInstanceUID for ds in datasets
                                     if ds.StudyInstanceUID == study))
    everything = {s: len(c.instances) for s, c in expected_counts(datasets).items()}
    assert qido_counts(web) == everything

    gone = httpx.delete(f"{web.url}/studies/{study}/series/{series_uids[1]}")
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"instances": 2, "series": 1, "studies": 0, "patients": 0,
                           "filesLeft": []}
    assert qido_counts(web)[study] == everything[study] - 2
    assert httpx.get(f"{web.url}/studies/{study}/series/{series_uids[1]}/metadata"
                     ).status_code == 404

    one = httpx.delete(f"{web.url}/studies/{study}/series/{first.SeriesInstanceUID}"
                       f"/instances/{first.SOPInstanceUID}")
    assert one.status_code == 200 and one.json()["instances"] == 1
    assert qido_counts(web)[study] == everything[study] - 3

    whole = httpx.delete(f"{web.url}/studies/{study}")
    assert whole.status_code == 200
    assert whole.json()["instances"] == everything[study] - 3
    rest = {s: n for s, n in everything.items() if s != study}
    assert qido_counts(web) == rest
    matches, final = find(web.dicom, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                          NumberOfStudyRelatedInstances="")
    assert final == status.SUCCESS
    assert {str(m.StudyInstanceUID): int(m.NumberOfStudyRelatedInstances)
            for m in matches} == rest
    assert httpx.delete(f"{web.url}/studies/{study}").status_code == 404

    store(web, [ds for ds in datasets if ds.StudyInstanceUID == study])  # sent again
    assert qido_counts(web) == everything


def test_what_is_not_there_is_a_404_and_a_bad_uid_a_400(web: WebRunning) -> None:
    datasets = hierarchy()
    store(web, datasets)
    a = datasets[0]
    b = next(ds for ds in datasets if ds.StudyInstanceUID != a.StudyInstanceUID)
    before = qido_counts(web)
    for path, why in [
        ("/studies/1.2.3.4", "no such study"),
        (f"/studies/{a.StudyInstanceUID}/series/{b.SeriesInstanceUID}",
         "no such series in that study"),
        (f"/studies/{a.StudyInstanceUID}/series/{a.SeriesInstanceUID}/instances/"
         f"{b.SOPInstanceUID}", "no such instance in that series"),
    ]:
        got = httpx.delete(web.url + path)
        assert got.status_code == 404, (path, got.text)
        assert why in got.text
    assert httpx.delete(f"{web.url}/studies/1.2.x").status_code == 400
    assert qido_counts(web) == before


@pytest.fixture(scope="module")
def users() -> dict[str, Any]:
    return {"reader": ("alice", "alice pw"), "writer": ("bob", "bob pw"),
            "entries": [f"alice:read:{hash_password('alice pw')}",
                        f"bob:read-write:{hash_password('bob pw')}"]}


def test_only_read_write_rights_delete(start_web: Callable[..., WebRunning],
                                       users: dict[str, Any]) -> None:
    running = start_web(**{"web.anonymous_local": "read", "web.users": users["entries"]})
    datasets = hierarchy()
    store(running, datasets)
    study = datasets[0].StudyInstanceUID
    url = f"{running.url}/studies/{study}"
    assert httpx.delete(url).status_code == 401  # anonymous read: credentials could help
    assert httpx.delete(url, auth=users["reader"]).status_code == 403
    assert study in qido_counts(running)
    assert httpx.delete(url, auth=users["writer"]).status_code == 200
    assert study not in qido_counts(running)
