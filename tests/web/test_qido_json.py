"""DICOM JSON answers of QIDO-RS that stay valid whatever was stored: no NaN or Infinity
(RFC 8259, PS3.18 F.2.3), BulkDataURIs that resolve (PS3.18 F.2.2).

Each test starts its own server (the ``web`` fixture): tests/web/test_qido.py keeps one
server open for its whole module, and a process opens one index at a time.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from dicomweb_client.api import DICOMwebClient
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from scp import status
from tests.conftest import find
from tests.factory import encode, make_ds
from tests.web.conftest import WebRunning
from tests.web.test_qido import qido

# ---------------------------------------------------------------------------------------
# Values JSON cannot hold (RFC 8259; PS3.18 F.2.3)

DIFFUSION_B_VALUE = 0x00189087  # FD


def _refuse(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (RFC 8259)")


def strict_json(text: str) -> Any:
    """``text`` parsed as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""
    return json.loads(text, parse_constant=_refuse)


def test_non_finite_numbers_never_reach_the_json(web: WebRunning) -> None:
    """A DS "nan" loses its Value (not a DS, PS3.5 6.2), a DS "1e999" keeps its text
    (Table F.2.3-1: a String may keep a DS's original format), an FD infinity its Value
    (a JSON Number only): QIDO-RS and WADO-RS /metadata answer valid JSON."""
    ds = make_ds(PatientID="NONFINITE", WindowCenter="nan", WindowWidth=["1", "-1E400"],
                 SliceThickness="1e999")
    ds.add_new(DIFFUSION_B_VALUE, "FD", float("inf"))
    item = Dataset()
    item.add_new(DIFFUSION_B_VALUE, "FD", float("nan"))
    ds.RequestAttributesSequence = Sequence([item])
    with pydicom_config.strict_reading(), pydicom_config.disable_value_validation():
        DICOMwebClient(url=web.url).store_instances([ds])
    response = httpx.get(f"{web.url}/instances", params={"PatientID": "NONFINITE",
                                                         "includefield": "all"})
    assert response.status_code == 200
    r, = strict_json(response.text)
    assert r["00281050"] == {"vr": "DS"}
    assert r["00281051"] == {"vr": "DS", "Value": ["1", "-1E400"]}
    assert r["00180050"] == {"vr": "DS", "Value": ["1e999"]}
    assert r[f"{DIFFUSION_B_VALUE:08X}"] == {"vr": "FD"}
    series = strict_json(httpx.get(f"{web.url}/series", params={
        "PatientID": "NONFINITE", "includefield": "RequestAttributesSequence"}).text)
    assert series[0]["00400275"]["Value"] == [{f"{DIFFUSION_B_VALUE:08X}": {"vr": "FD"}}]
    metadata = httpx.get(f"{web.url}/studies/{ds.StudyInstanceUID}/metadata")
    assert metadata.status_code == 200
    assert strict_json(metadata.text)[0]["00180050"] == {"vr": "DS", "Value": ["1e999"]}
    # C-FIND answers the kept text too
    matches, final = find(web.dicom, QueryRetrieveLevel="IMAGE", PatientID="NONFINITE",
                          StudyInstanceUID=ds.StudyInstanceUID,
                          SeriesInstanceUID=ds.SeriesInstanceUID, SOPInstanceUID="",
                          SliceThickness="", WindowCenter="")
    assert final == status.SUCCESS and str(matches[0].SliceThickness) == "1e999"
    assert matches[0].WindowCenter is None


def test_an_index_row_written_with_nan_is_answered_without_it(web: WebRunning) -> None:
    """Rows indexed before the fix may hold bare NaN and Infinity: QIDO-RS leaves those
    values out (PS3.18 F.2.5) and answers, never a 500."""
    from storage.models import Instance

    ds = make_ds(PatientID="OLDNAN", SliceThickness="2.5")
    web.archive.store(encode(ds), ExplicitVRLittleEndian)
    old = ('{"00180050":{"vr":"DS","Value":[NaN]},"00281050":{"vr":"DS","Value":[Infinity]},'
           '"00400275":{"vr":"SQ","Value":[{"00189087":{"vr":"FD","Value":[-Infinity]}}]}}')
    assert Instance.update(attrs=old).where(
        Instance.sop_instance_uid == ds.SOPInstanceUID).execute() == 1
    response = httpx.get(f"{web.url}/instances", params={"PatientID": "OLDNAN",
                                                         "includefield": "all"})
    assert response.status_code == 200, response.text
    r, = strict_json(response.text)
    assert r["00180050"] == {"vr": "DS"} and r["00281050"] == {"vr": "DS"}
    assert r["00400275"]["Value"] == [{f"{DIFFUSION_B_VALUE:08X}": {"vr": "FD"}}]


# ---------------------------------------------------------------------------------------
# Bulk data URIs that resolve (PS3.18 F.2.2)

WAVEFORM_DATA = "54000100/0/54001010"  # WaveformSequence, item 0, WaveformData
ENCAPSULATED_DOCUMENT = 0x00420011  # OB
BIG = 4096  # bytes: beyond storage.parsing.BULK_THRESHOLD


def bulk_instance() -> Dataset:
    """pydicom's ECG (bulk WaveformData in a sequence), with a bulk value at the top level
    and one in a sequence of the series (RequestAttributesSequence)."""
    ds = dcmread(get_testdata_file("waveform_ecg.dcm"))
    ds.PatientID = "BULK"
    ds.add_new(ENCAPSULATED_DOCUMENT, "OB", bytes(range(256)) * (BIG // 256))
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.add_new(ENCAPSULATED_DOCUMENT, "OB", b"\x07" * BIG)
    ds.RequestAttributesSequence = Sequence([item])
    return ds


def test_bulk_data_uris_resolve_or_are_left_out(web: WebRunning) -> None:
    """An instance result names each bulk value by a URI that WADO-RS answers with its bytes;
    a series result, which has no such URI, leaves the bulk values out: never an empty
    BulkDataURI."""
    ds = bulk_instance()
    client = DICOMwebClient(url=web.url)
    client.store_instances([ds])
    instance_url = (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                    f"/instances/{ds.SOPInstanceUID}")
    expected = {f"{instance_url}/bulkdata/54000100/{i}/54001010": item.WaveformData
                for i, item in enumerate(ds.WaveformSequence)}
    expected |= {f"{instance_url}/bulkdata/{ENCAPSULATED_DOCUMENT:08X}": ds.EncapsulatedDocument,
                f"{instance_url}/bulkdata/00400275/0/{ENCAPSULATED_DOCUMENT:08X}":
                ds.RequestAttributesSequence[0].EncapsulatedDocument}
    for fields in ("WaveformSequence,EncapsulatedDocument,RequestAttributesSequence", "all"):
        r, = qido(web, "/instances", {"PatientID": "BULK", "includefield": fields})
        assert r["54000100"]["Value"][0]["54001010"] == {
            "vr": "OW", "BulkDataURI": f"{instance_url}/bulkdata/{WAVEFORM_DATA}"}
        assert r["00420011"]["BulkDataURI"] in expected
        uris = set(re.findall(r'"BulkDataURI":\s*"([^"]*)"', json.dumps(r)))
        series_level = {u for u in expected if "/00400275/" in u}  # not in an instance's "all"
        assert uris == (set(expected) - series_level if fields == "all" else set(expected))
    for uri, data in expected.items():
        assert client.retrieve_bulkdata(uri) == [data]
    series = httpx.get(f"{web.url}/series", params={"PatientID": "BULK",
                                                    "includefield": "all"})
    assert series.status_code == 200 and "BulkDataURI" not in series.text
    item, = series.json()[0]["00400275"]["Value"]
    assert set(item) == {"00401001"}  # RequestedProcedureID; the bulk value left out
    assert "BulkDataURI" not in httpx.get(f"{web.url}/studies", params={
        "PatientID": "BULK", "includefield": "all"}).text
