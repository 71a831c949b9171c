"""WADO-RS (PS3.18 10.4) against a real server: instances stored by C-STORE (pynetdicom) or
the archive, retrieved over HTTP by dicomweb-client and httpx: the stored bytes, converted
syntaxes, Accept negotiation, metadata from the index with resolving BulkDataURIs, frames,
rendered images and thumbnails, errors, and the memory of a streamed retrieve."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
from pynetdicom import AE

from storage.models import Instance
from tests.conftest import associate
from tests.factory import encode, file_parts, make_ds, uid
from tests.web.conftest import WebRunning

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
ANY = f'multipart/related; type="{DICOM}"; transfer-syntax=*'
OCTETS = "application/octet-stream"
TIMEOUT = 60
PREAMBLE = 132  # 128 bytes and "DICM"
PIXEL_DATA = "7FE00010"


def sample(name: str) -> Path:
    """One of pydicom's bundled test files (never downloaded: the test fails if absent)."""
    path = get_testdata_file(name, download=False)
    assert path, f"pydicom's test file {name} is not installed"
    return Path(path)


def store_file(web: WebRunning, path: Path, **changes: Any) -> Dataset:
    """Store a file through the archive (with ``changes`` to its attributes: then it is
    re-encoded in its own syntax); return it as read."""
    ds = dcmread(path)
    if changes:
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        out.seek(0)
        ds = dcmread(out)
        data, syntax = split(out.getvalue())
    else:
        data, syntax = file_parts(path)
    web.archive.store(data, syntax)
    return ds


def split(raw: bytes) -> tuple[bytes, str]:
    """The data set bytes and transfer syntax of a Part 10 file in memory."""
    ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return data_set(raw), str(ds.file_meta.TransferSyntaxUID)


def data_set(raw: bytes) -> bytes:
    """What follows the File Meta group of a Part 10 file (PS3.10 7.1: its length is in
    (0002,0000), the first element after the preamble and "DICM")."""
    (length,) = struct.unpack_from("<L", raw, PREAMBLE + 8)
    return raw[PREAMBLE + 12 + length:]


def stored_file(web: WebRunning, ds: Dataset) -> bytes:
    """The bytes the archive keeps for ``ds``."""
    (item,) = web.archive.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    with web.archive.files.open(item.file_key) as fp:
        return bytes(fp.read())


def url_of(web: WebRunning, ds: Dataset, tail: str = "") -> str:
    return (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}{tail}")


def parts(response: httpx.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related response: (headers, body) each."""
    content_type = response.headers["content-type"]
    assert content_type.startswith("multipart/related"), content_type
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    return body_parts(response.content, boundary)


def body_parts(body: bytes, boundary: bytes | None = None) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body (its boundary read from its first line when
    not given: dicomweb-client returns the body of a rendered series alone)."""
    boundary = boundary or body.split(b"\r\n", 1)[0][2:]
    assert body.startswith(b"--" + boundary + b"\r\n")
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    chunks = body[len(boundary) + 4:-(len(boundary) + 8)].split(b"\r\n--" + boundary + b"\r\n")
    out = []
    for chunk in chunks:
        head, _, content = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        out.append((headers, content))
    return out


def get(url: str, accept: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return httpx.get(url, headers=headers, timeout=TIMEOUT, **kwargs)


def client(web: WebRunning) -> DICOMwebClient:
    return DICOMwebClient(url=web.url)


def one_line_reason(response: httpx.Response) -> str:
    text = response.text.strip()
    assert text and "\n" not in text, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return text


# -- instances -------------------------------------------------------------------------------

def test_cstore_in_then_the_stored_bytes_out(web: WebRunning) -> None:
    """C-STORE by pynetdicom, then WADO-RS with transfer-syntax=*: the file we keep, byte
    for byte (its data set is what pynetdicom encoded: the original less its group
    lengths, so compared as DICOM JSON)."""
    path = sample("CT_small.dcm")
    ds = dcmread(path)
    ae = AE(ae_title="PYTEST")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = associate(web.dicom, ae)
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    response = get(url_of(web, ds), ANY)
    assert response.status_code == 200
    ((headers, body),) = parts(response)
    assert headers["content-type"] == f"{DICOM}; transfer-syntax={ExplicitVRLittleEndian}"
    assert headers["content-location"] == url_of(web, ds)
    sha = hashlib.sha256
    assert sha(body).hexdigest() == sha(stored_file(web, ds)).hexdigest()
    assert dcmread(io.BytesIO(body)).to_json_dict() == ds.to_json_dict()


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "SC_rgb_rle_2frame.dcm", "MR_small.dcm"])
def test_any_syntax_sends_the_stored_bytes(web: WebRunning, name: str) -> None:
    ds = store_file(web, sample(name))
    response = get(url_of(web, ds), ANY)
    ((headers, body),) = parts(response)
    assert headers["content-type"].endswith(f"transfer-syntax={ds.file_meta.TransferSyntaxUID}")
    assert body == stored_file(web, ds)
    assert data_set(body) == file_parts(sample(name))[0]


def test_implicit_vr_goes_as_explicit(web: WebRunning) -> None:
    """PS3.18 8.7.3: no Implicit VR Little Endian on the web, even for transfer-syntax=*."""
    ds = store_file(web, sample("MR_small_implicit.dcm"))
    for accept in (ANY, f'multipart/related; type="{DICOM}"', None):
        ((headers, body),) = parts(get(url_of(web, ds), accept))
        assert headers["content-type"] == f"{DICOM}; transfer-syntax={ExplicitVRLittleEndian}"
        back = dcmread(io.BytesIO(body))
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.to_json_dict() == ds.to_json_dict()


def test_default_syntax_decodes_lossless_and_keeps_lossy(web: WebRunning) -> None:
    """PS3.18 8.7.3.4: Explicit VR Little Endian by default; lossy compressed pixel data
    may go as stored."""
    rle = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    ((headers, body),) = parts(get(url_of(web, rle), f'multipart/related; type="{DICOM}"'))
    assert headers["content-type"].endswith(ExplicitVRLittleEndian)
    back = dcmread(io.BytesIO(body))
    assert np.array_equal(back.pixel_array, rle.pixel_array)
    j2k = store_file(web, sample("JPEG2000.dcm"))
    ((headers, body),) = parts(get(url_of(web, j2k), f'multipart/related; type="{DICOM}"'))
    assert headers["content-type"].endswith(str(j2k.file_meta.TransferSyntaxUID))


def test_explicit_asked_for_decodes_compressed(web: WebRunning) -> None:
    ds = store_file(web, sample("JPEG2000.dcm"))
    accept = f'multipart/related; type="{DICOM}"; transfer-syntax={ExplicitVRLittleEndian}'
    ((headers, body),) = parts(get(url_of(web, ds), accept))
    back = dcmread(io.BytesIO(body))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(back.pixel_array, ds.pixel_array)


def test_dicomweb_client_retrieves_study_series_instance(web: WebRunning) -> None:
    study, series = uid(), uid()
    stored = [store_file(web, sample(name), StudyInstanceUID=study, SeriesInstanceUID=series,
                         SOPInstanceUID=uid())
              for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle_2frame.dcm")]
    other = store_file(web, sample("MR_small.dcm"), StudyInstanceUID=study,
                       SeriesInstanceUID=uid(), SOPInstanceUID=uid())
    dw = client(web)
    got = {ds.SOPInstanceUID: ds for ds in dw.retrieve_study(study)}
    assert set(got) == {ds.SOPInstanceUID for ds in [*stored, other]}
    for ds in stored:
        assert np.array_equal(got[ds.SOPInstanceUID].pixel_array, ds.pixel_array)
    assert {ds.SOPInstanceUID for ds in dw.retrieve_series(study, series)} == {
        ds.SOPInstanceUID for ds in stored}
    one = dw.retrieve_instance(study, series, stored[0].SOPInstanceUID)
    assert one.PatientName == stored[0].PatientName
    assert one.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.parametrize("accept", [
    f'multipart/related; type="{DICOM}"; transfer-syntax=*',
    f"multipart/related; type={DICOM}; transfer-syntax=*",  # OHIF's unquoted form
    f'Multipart/Related; Type="{DICOM}"; Transfer-Syntax=*',
    f"text/html;q=0.9, multipart/related; type={DICOM}; transfer-syntax=*;q=0.8, */*;q=0.1",
    "*/*",
    "multipart/*",
    DICOM,
    "",
])
def test_accept_forms(web: WebRunning, accept: str) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    response = get(url_of(web, ds), accept)
    assert response.status_code == 200, response.text
    ((headers, _),) = parts(response)
    assert headers["content-type"].startswith(DICOM)


def test_head_answers_headers_only(web: WebRunning) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    for tail, media_type in (("", "multipart/related"), ("/metadata", DICOM_JSON)):
        response = httpx.head(url_of(web, ds, tail), timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert response.content == b""


def test_accept_prefers_higher_quality(web: WebRunning) -> None:
    ds = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    accept = (f'multipart/related; type="{DICOM}"; transfer-syntax={ExplicitVRLittleEndian};'
              f'q=0.4, multipart/related; type="{DICOM}"; transfer-syntax={RLELossless}')
    ((headers, _),) = parts(get(url_of(web, ds), accept))
    assert headers["content-type"].endswith(RLELossless)
    ((headers, _),) = parts(get(url_of(web, ds) + "?accept=" + httpx.QueryParams(
        {"a": f'multipart/related; type="{DICOM}"; transfer-syntax={ExplicitVRLittleEndian}'}
    )["a"], accept))
    assert headers["content-type"].endswith(ExplicitVRLittleEndian)


@pytest.mark.parametrize("accept", [
    f'multipart/related; type="{DICOM}"; transfer-syntax=1.2.840.10008.1.2.4.50',
    f'multipart/related; type="{DICOM}"; transfer-syntax={ImplicitVRLittleEndian}',
    "image/png",
    f'multipart/related; type="{OCTETS}"',
    f'multipart/related; type="{DICOM}"; transfer-syntax=*;q=0',
])
def test_unsatisfiable_accept_is_406(web: WebRunning, accept: str) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    response = get(url_of(web, ds), accept)
    assert response.status_code == 406
    one_line_reason(response)


def test_accept_query_parameter_of_any_text_is_never_a_500(web: WebRunning) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    for text in ("\u0101/x", "multipart/related; type=\"\u00e9", ";;;", "q=2"):
        response = get(url_of(web, ds), params={"accept": text})
        assert response.status_code == 406, text
        one_line_reason(response)


def test_some_instances_in_the_syntax_asked_is_206(web: WebRunning) -> None:
    """PS3.18 Table 10.4.3-1: 206 when only some of the target can be sent as asked."""
    study, series = uid(), uid()
    rle = store_file(web, sample("SC_rgb_rle_2frame.dcm"), StudyInstanceUID=study,
                     SeriesInstanceUID=series, SOPInstanceUID=uid())
    store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study, SeriesInstanceUID=series,
               SOPInstanceUID=uid())
    response = get(f"{web.url}/studies/{study}/series/{series}",
                   f'multipart/related; type="{DICOM}"; transfer-syntax={RLELossless}')
    assert response.status_code == 206
    ((headers, body),) = parts(response)
    assert dcmread(io.BytesIO(body)).SOPInstanceUID == rle.SOPInstanceUID


@pytest.mark.parametrize("tail", ["", "/series/1.2.3", "/series/1.2.3/instances/1.2.3.4",
                                  "/metadata", "/series/1.2.3/metadata",
                                  "/series/1.2.3/instances/1.2/frames/1",
                                  "/series/1.2.3/instances/1.2/rendered",
                                  "/series/1.2.3/instances/1.2/bulkdata/7FE00010",
                                  "/thumbnail"])
def test_unknown_uids_are_404(web: WebRunning, tail: str) -> None:
    store_file(web, sample("CT_small.dcm"))
    response = get(f"{web.url}/studies/1.2.3.999{tail}")
    assert response.status_code == 404
    assert "1.2.3.999" in one_line_reason(response)


def test_series_of_another_study_is_404(web: WebRunning) -> None:
    a = store_file(web, sample("CT_small.dcm"))
    b = store_file(web, sample("MR_small.dcm"))
    response = get(f"{web.url}/studies/{a.StudyInstanceUID}/series/{b.SeriesInstanceUID}")
    assert response.status_code == 404
    assert b.SeriesInstanceUID in one_line_reason(response)
    response = get(f"{web.url}/studies/{a.StudyInstanceUID}/series/{a.SeriesInstanceUID}"
                   f"/instances/{b.SOPInstanceUID}/metadata")
    assert response.status_code == 404


@pytest.mark.parametrize("tail", ["/studies/1.2.abc", "/studies/1..2", "/studies/" + "1" * 65,
                                  "/studies/1.2/series/x.y/metadata",
                                  "/studies/1.2/series/1.3/instances/%20/frames/1",
                                  "/studies/1.2/series/1.3/instances/1.4/frames/0",
                                  "/studies/1.2/series/1.3/instances/1.4/frames/1,1",
                                  "/studies/1.2/series/1.3/instances/1.4/frames/a",
                                  "/studies/1.2/series/1.3/instances/1.4/frames/\u00b2",
                                  "/studies/1.2/series/1.3/instances/1.4/rendered?quality=\u00b2",
                                  "/studies/1.2/series/1.3/instances/1.4/rendered?viewport=\u00b2,1",
                                  "/studies/\u0661.2",
                                  "/studies/1.2/series/1.3/instances/1.4/bulkdata/zz",
                                  "/studies/1.2/series/1.3/instances/1.4/bulkdata/00880200/x/7FE00010",
                                  "/studies/1.2/series/1.3/instances/1.4/rendered?quality=0",
                                  "/studies/1.2/series/1.3/instances/1.4/rendered?viewport=a,b",
                                  "/studies/1.2/series/1.3/instances/1.4/rendered?window=1",
                                  "/studies/1.2/series/1.3/instances/1.4/frames/1,2/rendered"])
def test_malformed_requests_are_400(web: WebRunning, tail: str) -> None:
    response = get(web.url + tail)
    assert response.status_code == 400
    one_line_reason(response)


# -- metadata --------------------------------------------------------------------------------

def expected_json(ds: Dataset, url: str = "") -> dict[str, Any]:
    """What the metadata of ``ds`` holds: pydicom's DICOM JSON less the File Meta, and the
    pixel data and what follows it (trailing padding); a bulk value at the top level as a
    BulkDataURI under ``url`` (the instance's), those in sequences left out."""
    out = ds.to_json_dict(bulk_data_threshold=1024,
                          bulk_data_element_handler=lambda e: f"{url}/bulkdata/{e.tag:08X}")
    return {tag: value for tag, value in out.items()
            if not tag.startswith("0002") and tag < PIXEL_DATA  # the index stops there
            and ("BulkDataURI" not in value or value["BulkDataURI"].endswith(tag))}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
def test_metadata_is_the_stored_attributes(web: WebRunning, name: str) -> None:
    ds = store_file(web, sample(name))
    dw = client(web)
    meta = dw.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
    assert list(meta) == sorted(meta)  # PS3.18 F.2.2
    expected = expected_json(ds, url_of(web, ds, ""))
    assert {tag: meta[tag] for tag in expected} == expected
    assert meta["00083002"] == {"vr": "UI", "Value": [str(ds.file_meta.TransferSyntaxUID)]}
    assert set(meta) - set(expected) == {"00083002", "7FE00010"}
    for tag, value in expected.items():  # a bulk value at the top level (CT_small: private)
        if "BulkDataURI" in value:
            (data,) = dw.retrieve_bulkdata(value["BulkDataURI"])
            assert data == ds[int(tag, 16)].value
    pixel = meta["7FE00010"]
    assert pixel["BulkDataURI"] == url_of(web, ds, "/bulkdata/7FE00010")
    for level in (dw.retrieve_series_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID),
                  dw.retrieve_study_metadata(ds.StudyInstanceUID)):
        assert level == [meta]


def test_metadata_of_implicit_vr_names_explicit(web: WebRunning) -> None:
    """AvailableTransferSyntaxUID is what transfer-syntax=* sends: never Implicit VR."""
    ds = store_file(web, sample("MR_small_implicit.dcm"))
    (meta,) = get(url_of(web, ds, "/metadata"), DICOM_JSON).json()
    assert meta["00083002"] == {"vr": "UI", "Value": [ExplicitVRLittleEndian]}
    assert meta["7FE00010"]["vr"] == "OW"


def test_metadata_has_what_a_viewer_needs(web: WebRunning) -> None:
    ds = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    (meta,) = get(url_of(web, ds, "/metadata"), DICOM_JSON).json()
    for keyword, tag in [("NumberOfFrames", "00280008"), ("Rows", "00280010"),
                         ("Columns", "00280011"), ("BitsAllocated", "00280100"),
                         ("PhotometricInterpretation", "00280004"),
                         ("SOPClassUID", "00080016"), ("StudyInstanceUID", "0020000D"),
                         ("SeriesInstanceUID", "0020000E"), ("PatientName", "00100010")]:
        assert tag in meta, keyword
    assert meta["00280008"]["Value"] == [2]
    mr = store_file(web, sample("MR_small.dcm"))
    (meta,) = get(url_of(web, mr, "/metadata"), DICOM_JSON).json()
    assert meta["00281050"]["Value"] and meta["00281051"]["Value"]  # Window Center / Width


def test_metadata_accept(web: WebRunning) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    for accept in (DICOM_JSON, "application/json", "*/*", "", "application/*"):
        response = get(url_of(web, ds, "/metadata"), accept)
        assert response.status_code == 200, accept
        assert response.headers["content-type"] == DICOM_JSON
    response = get(url_of(web, ds, "/metadata"), 'multipart/related; type="application/dicom+xml"')
    assert response.status_code == 406
    one_line_reason(response)


def test_metadata_of_a_study_lists_every_instance(web: WebRunning) -> None:
    study = uid()
    series = [uid(), uid()]
    sops = set()
    for i in range(6):
        ds = make_ds(StudyInstanceUID=study, SeriesInstanceUID=series[i % 2])
        sops.add(ds.SOPInstanceUID)
        web.archive.store(encode(ds), ExplicitVRLittleEndian)
    objects = get(f"{web.url}/studies/{study}/metadata", DICOM_JSON).json()
    assert {o["00080018"]["Value"][0] for o in objects} == sops
    assert all(o["0020000D"]["Value"] == [study] for o in objects)
    assert all(o["00100020"]["Value"] == ["PID1"] for o in objects)  # the patient's level


def strict_json(text: str) -> Any:
    """``text`` as JSON (RFC 8259): a NaN or an infinity is an error, as in any other
    client than Python's."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_metadata_of_a_row_holding_nan(web: WebRunning) -> None:
    """An index row written before non-finite numbers were kept out of the index: its
    metadata is valid JSON, each attribute holding one without its Value (PS3.18 F.2.5)."""
    ds = store_file(web, sample("CT_small.dcm"))
    row = Instance.get(Instance.sop_instance_uid == ds.SOPInstanceUID)
    attrs = json.loads(row.attrs)
    attrs["00181050"] = {"vr": "DS", "Value": [1.5, float("nan")]}  # SpatialResolution
    attrs["00189087"] = {"vr": "FD", "Value": [float("inf")]}  # DiffusionBValue
    attrs["00400555"] = {"vr": "SQ", "Value": [{"0040A30A": {"vr": "DS", "Value": [float("-inf")]},
                                                "0040A160": {"vr": "UT", "Value": ["kept"]}}]}
    Instance.update(attrs=json.dumps(attrs).replace("Infinity]", "1e999]", 1)).where(
        Instance.id == row.id).execute()
    response = get(url_of(web, ds, "/metadata"), DICOM_JSON)
    assert response.status_code == 200
    (meta,) = strict_json(response.text)
    assert meta["00181050"] == {"vr": "DS"}
    assert meta["00189087"] == {"vr": "FD"}
    (item,) = meta["00400555"]["Value"]
    assert item == {"0040A30A": {"vr": "DS"}, "0040A160": {"vr": "UT", "Value": ["kept"]}}
    assert meta["00100010"] == expected_json(ds)["00100010"]
    assert meta["7FE00010"]["BulkDataURI"] == url_of(web, ds, "/bulkdata/7FE00010")


def test_bulkdata_uris_resolve(web: WebRunning) -> None:
    """Every BulkDataURI of the metadata gives the value's bytes: a waveform inside a
    sequence, and the pixel data."""
    ecg = store_file(web, sample("waveform_ecg.dcm"))
    (meta,) = get(url_of(web, ecg, "/metadata"), DICOM_JSON).json()
    waves = meta["54000100"]["Value"]
    uris = [item["54001010"]["BulkDataURI"] for item in waves]
    assert uris == [url_of(web, ecg, f"/bulkdata/54000100/{i}/54001010")
                    for i in range(len(waves))]
    dw = client(web)
    for i, uri in enumerate(uris):
        (value,) = dw.retrieve_bulkdata(uri)
        assert value == ecg.WaveformSequence[i].WaveformData
    ct = store_file(web, sample("CT_small.dcm"))
    meta = dw.retrieve_instance_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID,
                                         ct.SOPInstanceUID)
    (value,) = dw.retrieve_bulkdata(meta["7FE00010"]["BulkDataURI"])
    assert value == ct.PixelData
    response = get(url_of(web, ct, "/bulkdata/7FE00010"), f"multipart/related; type={OCTETS}")
    ((headers, body),) = parts(response)
    assert headers["content-type"] == f"{OCTETS}; transfer-syntax={ExplicitVRLittleEndian}"


def test_top_level_bulk_value_from_the_file(web: WebRunning) -> None:
    ds = store_file(web, sample("examples_overlay.dcm"))
    # the metadata names it (PS3.18 F.2.2: a BulkDataURI for each bulk value), and it resolves
    (meta,) = get(url_of(web, ds, "/metadata"), DICOM_JSON).json()
    assert meta["60003000"] == {"vr": "OW", "BulkDataURI": url_of(web, ds, "/bulkdata/60003000")}
    (value,) = client(web).retrieve_bulkdata(meta["60003000"]["BulkDataURI"])
    assert value == ds[0x60003000].value
    ((_, body),) = parts(get(url_of(web, ds, "/bulkdata/60003000"), f"multipart/related; type={OCTETS}"))
    assert body == ds[0x60003000].value
    for absent in ("60013000", "00100010"):  # not there; not a bulk data VR (PN)
        response = get(url_of(web, ds, f"/bulkdata/{absent}"))
        assert response.status_code == 404
        assert absent in one_line_reason(response)
    response = get(url_of(web, ds, "/bulkdata/60003000"), "image/png")
    assert response.status_code == 406


def test_compressed_pixel_data_as_bulk(web: WebRunning) -> None:
    ds = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    stored = list(generate_frames(ds.PixelData, number_of_frames=2))
    response = get(url_of(web, ds, "/bulkdata/7FE00010"),
                   f"multipart/related; type={OCTETS}; transfer-syntax=*")
    got = parts(response)
    assert [body for _, body in got] == stored
    assert got[0][0]["content-type"] == f"image/dicom-rle; transfer-syntax={RLELossless}"
    ((headers, body),) = parts(get(url_of(web, ds, "/bulkdata/7FE00010"),
                                   f"multipart/related; type={OCTETS}"))
    assert body == ds.pixel_array.tobytes()


# -- frames ----------------------------------------------------------------------------------

def test_frames_uncompressed_and_as_stored(web: WebRunning) -> None:
    ds = store_file(web, sample("rtdose_rle.dcm"))
    assert ds.NumberOfFrames == 15
    dw = client(web)
    frames = dw.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID, [1, 3, 15])
    array = ds.pixel_array
    assert frames == [array[i].tobytes() for i in (0, 2, 14)]
    stored = list(generate_frames(ds.PixelData, number_of_frames=15))
    response = get(url_of(web, ds, "/frames/15,2"),
                   f"multipart/related; type={OCTETS}; transfer-syntax=*")
    got = parts(response)
    assert [body for _, body in got] == [stored[14], stored[1]]
    assert got[0][0]["content-type"] == f"image/dicom-rle; transfer-syntax={RLELossless}"
    response = get(url_of(web, ds, "/frames/2"), 'multipart/related; type="image/dicom-rle"')
    assert [body for _, body in parts(response)] == [stored[1]]


def test_frames_of_native_data(web: WebRunning) -> None:
    ds = store_file(web, sample("rtdose.dcm"))  # Implicit VR, 15 frames
    for accept in (f"multipart/related; type={OCTETS}; transfer-syntax=*",
                   f'multipart/related; type="{OCTETS}"', "*/*"):
        got = parts(get(url_of(web, ds, "/frames/1,15"), accept))
        assert [body for _, body in got] == [ds.pixel_array[i].tobytes() for i in (0, 14)]
        assert got[0][0]["content-type"] == f"{OCTETS}; transfer-syntax={ExplicitVRLittleEndian}"


def test_frames_errors(web: WebRunning) -> None:
    ds = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    response = get(url_of(web, ds, "/frames/3"))
    assert response.status_code == 404
    assert "3" in one_line_reason(response)
    response = get(url_of(web, ds, "/frames/1"), 'multipart/related; type="image/jp2"')
    assert response.status_code == 406
    one_line_reason(response)
    sr = store_file(web, sample("test-SR.dcm"))
    response = get(url_of(web, sr, "/frames/1"))
    assert response.status_code == 404


# -- rendered and thumbnails -----------------------------------------------------------------

def picture(response: httpx.Response, media_type: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    image = Image.open(io.BytesIO(response.content))
    assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[media_type]
    return np.asarray(image)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm",
                                  "SC_rgb_rle_2frame.dcm", "examples_palette.dcm",
                                  "MR_small_implicit.dcm"])
def test_rendered_jpeg_and_png(web: WebRunning, name: str) -> None:
    ds = store_file(web, sample(name))
    dw = client(web)
    jpeg = dw.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                         ds.SOPInstanceUID)
    image = np.asarray(Image.open(io.BytesIO(jpeg)))
    assert image.shape[:2] == (ds.Rows, ds.Columns)
    assert image.std() > 10  # not uniform
    png = picture(get(url_of(web, ds, "/rendered"), "image/png"), "image/png")
    assert png.std() > 10
    if ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation != "PALETTE COLOR":
        assert png.ndim == 2


def test_rendered_applies_the_stored_window(web: WebRunning) -> None:
    """MR_small's first window (center 600, width 1600) gives the picture pydicom's
    windowing gives, scaled to 8 bits."""
    ds = store_file(web, sample("MR_small.dcm"))
    png = picture(get(url_of(web, ds, "/rendered"), "image/png"), "image/png")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)  # one window
    values = ds.pixel_array.astype(float)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    expected[values <= low], expected[values > high] = 0, 255
    assert np.abs(png.astype(float) - np.rint(expected)).max() <= 1
    narrow = picture(get(url_of(web, ds, "/rendered?window=300,100"), "image/png"), "image/png")
    assert not np.array_equal(narrow, png)
    assert (narrow == 255).mean() > (png == 255).mean()


def test_rendered_parameters(web: WebRunning) -> None:
    ds = store_file(web, sample("CT_small.dcm"))
    small = picture(get(url_of(web, ds, "/rendered?viewport=64,32"), "image/jpeg"), "image/jpeg")
    assert small.shape == (32, 32)
    low = get(url_of(web, ds, "/rendered?quality=5"), "image/jpeg").content
    high = get(url_of(web, ds, "/rendered?quality=100"), "image/jpeg").content
    assert len(low) < len(high)
    frame = picture(get(url_of(web, ds, "/frames/1/rendered"), "image/*"), "image/jpeg")
    assert frame.shape == (128, 128)
    assert get(url_of(web, ds, "/rendered"), "image/gif").status_code == 406
    assert get(url_of(web, ds, "/frames/2/rendered")).status_code == 404


def test_rendered_frame_of_a_multiframe(web: WebRunning) -> None:
    ds = store_file(web, sample("SC_rgb_rle_2frame.dcm"))
    first = picture(get(url_of(web, ds, "/frames/1/rendered"), "image/png"), "image/png")
    second = picture(get(url_of(web, ds, "/frames/2/rendered"), "image/png"), "image/png")
    assert np.array_equal(first, ds.pixel_array[0])
    assert np.array_equal(second, ds.pixel_array[1])


def test_thumbnails(web: WebRunning) -> None:
    study, series = uid(), uid()
    sops = {number: uid() for number in (3, 1, 2)}  # the middle image by InstanceNumber: 2
    for number, sop in sops.items():
        store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                   SeriesInstanceUID=series, SOPInstanceUID=sop, InstanceNumber=number)
    sr = store_file(web, sample("test-SR.dcm"), StudyInstanceUID=study)
    base = f"{web.url}/studies/{study}"
    for tail in ("/thumbnail", f"/series/{series}/thumbnail",
                 f"/series/{series}/instances/{sops[2]}/thumbnail"):
        image = picture(get(base + tail), "image/jpeg")
        assert max(image.shape) <= 128 and image.std() > 10
    assert picture(get(base + "/thumbnail?viewport=40,40", "image/png"),
                   "image/png").shape == (40, 40)
    response = get(f"{base}/series/{sr.SeriesInstanceUID}/thumbnail")
    assert response.status_code == 404
    one_line_reason(response)
    response = get(url_of(web, sr, "/rendered"))
    assert response.status_code == 406


def rendered_parts(body: bytes, media_type: str, boundary: bytes | None = None
                   ) -> list[tuple[str, np.ndarray]]:
    """The Content-Location and decoded picture of each part of a rendered study or series."""
    out = []
    for headers, content in body_parts(body, boundary):
        assert headers["content-type"] == media_type  # no transfer-syntax (PS3.18 8.7.4)
        image = Image.open(io.BytesIO(content))
        assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[media_type]
        out.append((headers["content-location"], np.asarray(image)))
    return out


def rendered_response(response: httpx.Response, media_type: str,
                      status: int = 200) -> list[tuple[str, np.ndarray]]:
    assert response.status_code == status, response.text
    content_type = response.headers["content-type"]
    assert content_type.startswith(f'multipart/related; type="{media_type}"; boundary=')
    boundary = content_type.split("boundary=")[1].encode()
    return rendered_parts(response.content, media_type, boundary)


def images_study(web: WebRunning) -> tuple[str, str, list[Dataset], list[Dataset]]:
    """A study of a series of three CT images and a series of an MR image, a two-frame RGB
    image and a 15-frame RT dose, plus an SR (no pixel data): the study, the CT series,
    the CT instances and every image."""
    study, series = uid(), uid()
    cts = [store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                      SeriesInstanceUID=series, SOPInstanceUID=uid(), InstanceNumber=n)
           for n in (1, 2, 3)]
    other = uid()
    more = [store_file(web, sample(name), StudyInstanceUID=study, SeriesInstanceUID=other,
                       SOPInstanceUID=uid())
            for name in ("MR_small.dcm", "SC_rgb_rle_2frame.dcm", "rtdose.dcm")]
    store_file(web, sample("test-SR.dcm"), StudyInstanceUID=study, SOPInstanceUID=uid())
    return study, series, cts, [*cts, *more]


def test_dicomweb_client_retrieves_rendered_series_and_study(web: WebRunning) -> None:
    """PS3.18 10.4.1.1.3: a rendered series or study is one picture per instance with
    pixel data, each as its ``{instance}/rendered`` is (a multi-frame's first frame),
    in a multipart/related payload (8.6.1: several representations). The SR is not an
    image: the study is partial content (Table 10.4.3-1)."""
    study, series, cts, images = images_study(web)
    dw = client(web)
    got = rendered_parts(dw.retrieve_series_rendered(study, series), "image/jpeg")
    assert [location for location, _ in got] == [url_of(web, ds, "/rendered") for ds in cts]
    for _, image in got:
        assert image.shape == (128, 128)
        assert image.std() > 10  # not uniform
    got = rendered_parts(dw.retrieve_series_rendered(study, series, media_types=("image/png",)),
                         "image/png")
    assert len(got) == len(cts)
    for ds, (_, png) in zip(cts, got, strict=True):
        single = picture(get(url_of(web, ds, "/rendered"), "image/png"), "image/png")
        assert np.array_equal(png, single)
    response = get(f"{web.url}/studies/{study}/rendered", 'multipart/related; type="image/png"')
    got = rendered_parts(response.content, "image/png",
                         response.headers["content-type"].split("boundary=")[1].encode())
    assert response.status_code == 206  # the SR cannot be rendered as an image
    assert [location for location, _ in got] == [url_of(web, ds, "/rendered") for ds in images]
    assert all(png.std() > 10 for _, png in got)
    assert np.array_equal(got[-2][1], images[-2].pixel_array[0])  # RGB: its first frame
    dose = images[-1]  # 15 frames: the first, not the middle one
    first, middle = (picture(get(url_of(web, dose, f"/frames/{n}/rendered"), "image/png"),
                             "image/png") for n in (1, 8))
    assert np.array_equal(got[-1][1], first) and not np.array_equal(first, middle)


@pytest.mark.parametrize(("accept", "media_type"), [
    ('multipart/related; type="image/jpeg"', "image/jpeg"),
    ("multipart/related; type=image/png", "image/png"),  # OHIF's unquoted form
    ('Multipart/Related; Type="image/png"', "image/png"),
    ("multipart/related", "image/jpeg"),  # no type: the default rendered media type
    ("multipart/*", "image/jpeg"),
    ("image/png", "image/png"),  # as dicomweb-client sends it
    ("image/*", "image/jpeg"),
    ("*/*", "image/jpeg"),
    ("", "image/jpeg"),
    ('multipart/related; type="application/dicom", multipart/related; type=image/png;q=0.5',
     "image/png"),
])
def test_rendered_series_accept_forms(web: WebRunning, accept: str, media_type: str) -> None:
    ds = store_file(web, sample("MR_small.dcm"), SOPInstanceUID=uid())
    url = f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/rendered"
    ((location, image),) = rendered_response(get(url, accept), media_type)
    assert location == url_of(web, ds, "/rendered")
    assert image.shape == (ds.Rows, ds.Columns) and image.std() > 10


def test_rendered_series_parameters(web: WebRunning) -> None:
    """quality, viewport and window (PS3.18 8.3.5.1) apply to every part."""
    study, series, cts, _ = images_study(web)
    url = f"{web.url}/studies/{study}/series/{series}/rendered"
    small = rendered_response(get(url + "?viewport=64,32", "image/png"), "image/png")
    assert [image.shape for _, image in small] == [(32, 32)] * len(cts)
    low = get(url + "?quality=5", "image/jpeg")
    high = get(url + "?quality=100", "image/jpeg")
    assert low.status_code == high.status_code == 200
    assert len(low.content) < len(high.content)
    plain = rendered_response(get(url, "image/png"), "image/png")
    narrow = rendered_response(get(url + "?window=100,50", "image/png"), "image/png")
    for (_, default), (_, windowed) in zip(plain, narrow, strict=True):
        assert not np.array_equal(default, windowed)
        assert (windowed == 255).mean() > (default == 255).mean()
    assert get(url + "?viewport=0,10").status_code == 400
    assert get(url + "?quality=101").status_code == 400


@pytest.mark.parametrize("accept", [
    "image/gif",
    "application/dicom",
    'multipart/related; type="application/dicom"',
    "multipart/related; type=image/gif",
    "image/png;q=0, text/html",
])
def test_rendered_study_unacceptable_is_406(web: WebRunning, accept: str) -> None:
    ds = store_file(web, sample("CT_small.dcm"), SOPInstanceUID=uid())
    for url in (f"{web.url}/studies/{ds.StudyInstanceUID}/rendered",
                f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/rendered"):
        response = get(url, accept)
        assert response.status_code == 406
        assert "rendered images" in one_line_reason(response)


def test_rendered_study_not_found_and_nothing_to_render(web: WebRunning) -> None:
    ds = store_file(web, sample("CT_small.dcm"), SOPInstanceUID=uid())
    study = ds.StudyInstanceUID
    for url, says in ((f"{web.url}/studies/{uid()}/rendered", "no study"),
                      (f"{web.url}/studies/{study}/series/{uid()}/rendered", "no series")):
        response = get(url)
        assert response.status_code == 404
        assert says in one_line_reason(response)
    assert get(f"{web.url}/studies/1.2.x/rendered").status_code == 400
    sr = store_file(web, sample("test-SR.dcm"), SOPInstanceUID=uid())
    response = get(f"{web.url}/studies/{sr.StudyInstanceUID}/rendered")
    assert response.status_code == 406  # PS3.18 Table 10.4.3-1: nothing is an image
    assert "no instance of study" in one_line_reason(response)
    (item,) = web.archive.locate(study, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    web.archive.files.path(item.file_key).unlink()
    response = get(f"{web.url}/studies/{study}/rendered")
    assert response.status_code == 404  # the only image's file is lost
    assert "cannot be read" in one_line_reason(response)


def test_rendered_study_leaves_out_what_cannot_be_rendered(
        web: WebRunning, caplog: pytest.LogCaptureFixture) -> None:
    """PS3.18 Table 10.4.3-1: the pictures that can be made, as a 206: not the SR's, nor
    the lost file's, nor the damaged image's (rendered, and failing, before the response
    starts). HEAD reads headers only: the same status, nothing rendered. Once the body has
    started, a failure ends it without the closing delimiter."""
    study = uid()
    damaged = damaged_rle(web, StudyInstanceUID=study)
    good = store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                      SeriesInstanceUID=uid(), SOPInstanceUID=uid())
    lost = store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                      SeriesInstanceUID=uid(), SOPInstanceUID=uid())
    store_file(web, sample("test-SR.dcm"), StudyInstanceUID=study, SOPInstanceUID=uid())
    (item,) = web.archive.locate(study, lost.SeriesInstanceUID, lost.SOPInstanceUID)
    web.archive.files.path(item.file_key).unlink()
    url = f"{web.url}/studies/{study}/rendered"
    response = httpx.head(url, timeout=TIMEOUT)
    assert response.status_code == 206
    assert "left out" not in caplog.text
    ((location, image),) = rendered_response(get(url), "image/jpeg", 206)
    assert location == url_of(web, good, "/rendered") and image.std() > 10
    assert f"{damaged.SOPInstanceUID}/rendered left out" in caplog.text
    later = uid()
    store_file(web, sample("CT_small.dcm"), StudyInstanceUID=later, SeriesInstanceUID=uid(),
               SOPInstanceUID=uid())
    damaged_rle(web, StudyInstanceUID=later)
    response = get(f"{web.url}/studies/{later}/rendered")
    assert response.status_code == 200
    assert not response.content.rstrip().endswith(b"--")  # no closing delimiter
    assert "response cut short" in caplog.text


def test_rendered_study_leaves_out_a_syntax_no_decoder_reads_before_it_starts(
        web: WebRunning) -> None:
    """An image in a transfer syntax no installed decoder reads (MPEG-2 here) is left out
    before the status is sent, even after a good picture: a 206 whose body is whole (its
    closing delimiter there), not a 200 cut short (PS3.18 Table 10.4.3-1)."""
    study = uid()
    good = store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                      SeriesInstanceUID=uid(), SOPInstanceUID=uid(), InstanceNumber=1)
    video = dcmread(sample("SC_rgb_rle_2frame.dcm"))
    video.StudyInstanceUID, video.SeriesInstanceUID = study, uid()
    video.SOPInstanceUID = video.file_meta.MediaStorageSOPInstanceUID = uid()
    video.file_meta.TransferSyntaxUID = MPEG2MPML
    out = io.BytesIO()
    video.save_as(out, enforce_file_format=True)
    data, syntax = split(out.getvalue())
    web.archive.store(data, syntax)
    response = get(f"{web.url}/studies/{study}/rendered")
    ((location, image),) = rendered_response(response, "image/jpeg", 206)
    assert location == url_of(web, good, "/rendered") and image.std() > 10
    assert response.content.rstrip().endswith(b"--")  # the closing delimiter


def test_a_lost_file(web: WebRunning, caplog: pytest.LogCaptureFixture) -> None:
    """A file gone from the store (``minipacs verify`` finds it): the instance is a 404
    saying why (PS3.18 Table 10.4.3-1), on GET and HEAD, and so are its frames; its
    metadata still comes from the index."""
    ds = store_file(web, sample("CT_small.dcm"))
    (item,) = web.archive.locate(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    web.archive.files.path(item.file_key).unlink()
    for url in (url_of(web, ds), f"{web.url}/studies/{ds.StudyInstanceUID}"):
        response = get(url, ANY)
        assert response.status_code == 404
        assert "missing" in one_line_reason(response)
        assert httpx.head(url, headers={"Accept": ANY}, timeout=TIMEOUT).status_code == 404
    response = get(url_of(web, ds, "/frames/1"))
    assert response.status_code == 404
    assert "cannot be read" in one_line_reason(response)
    assert get(url_of(web, ds, "/metadata")).status_code == 200


def test_a_lost_file_in_a_study_is_206(web: WebRunning) -> None:
    """PS3.18 Table 10.4.3-1: the instances whose files are there, as a 206."""
    study = uid()
    kept, lost = (store_file(web, sample("CT_small.dcm"), StudyInstanceUID=study,
                             SeriesInstanceUID=uid(), SOPInstanceUID=uid()) for _ in range(2))
    (item,) = web.archive.locate(study, lost.SeriesInstanceUID, lost.SOPInstanceUID)
    web.archive.files.path(item.file_key).unlink()
    response = get(f"{web.url}/studies/{study}", ANY)
    assert response.status_code == 206
    ((_, body),) = parts(response)
    assert dcmread(io.BytesIO(body)).SOPInstanceUID == kept.SOPInstanceUID
    response = httpx.head(f"{web.url}/studies/{study}", headers={"Accept": ANY}, timeout=TIMEOUT)
    assert response.status_code == 206


def damaged_rle(web: WebRunning, **changes: Any) -> Dataset:
    """An RLE instance whose frames no decoder reads (zero segments): stored as it is, it
    cannot be converted."""
    return store_file(web, sample("SC_rgb_rle_2frame.dcm"), SOPInstanceUID=uid(),
                      SeriesInstanceUID=uid(), PixelData=encapsulate([bytes(64), bytes(64)]), **changes)


def test_a_failed_conversion_is_406_and_head_converts_nothing(
        web: WebRunning, caplog: pytest.LogCaptureFixture) -> None:
    """The conversion is made before the status is sent: a failure is a 406 (PS3.18
    Table 10.4.3-1), not an empty 200; a HEAD answers from the index and a stat, and
    converts nothing."""
    ds = damaged_rle(web)
    response = get(url_of(web, ds), f'multipart/related; type="{DICOM}"')
    assert response.status_code == 406
    assert "RLE" in one_line_reason(response)
    caplog.clear()
    response = httpx.head(url_of(web, ds), headers={"Accept": f'multipart/related; type="{DICOM}"'},
                          timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("multipart/related")
    assert "WADO-RS" not in caplog.text
    assert get(url_of(web, ds), ANY).status_code == 200  # as stored: nothing to convert


def test_a_failure_before_the_start_leaves_out_after_it_cuts_short(
        web: WebRunning, caplog: pytest.LogCaptureFixture) -> None:
    """In a study, an instance that fails before the response starts is left out (206); one
    that fails once it has started ends the body without its closing delimiter, so that
    no client takes it for the whole study. HEAD reads no file: nothing is logged."""
    accept = f'multipart/related; type="{DICOM}"'
    first, second = uid(), uid()
    bad = damaged_rle(web, StudyInstanceUID=first)
    good = store_file(web, sample("CT_small.dcm"), StudyInstanceUID=first,
                      SeriesInstanceUID=uid(), SOPInstanceUID=uid())
    response = httpx.head(f"{web.url}/studies/{first}", headers={"Accept": accept},
                          timeout=TIMEOUT)
    assert response.status_code == 200  # every file is there; none was converted
    assert "WADO-RS" not in caplog.text
    response = get(f"{web.url}/studies/{first}", accept)
    assert response.status_code == 206
    ((_, body),) = parts(response)
    assert dcmread(io.BytesIO(body)).SOPInstanceUID == good.SOPInstanceUID
    assert f"{bad.SOPInstanceUID} left out" in caplog.text
    store_file(web, sample("CT_small.dcm"), StudyInstanceUID=second, SeriesInstanceUID=uid(),
               SOPInstanceUID=uid())
    damaged_rle(web, StudyInstanceUID=second)
    response = get(f"{web.url}/studies/{second}", accept)
    assert response.status_code == 200
    assert not response.content.rstrip().endswith(b"--")  # no closing delimiter
    assert "response cut short" in caplog.text


def index_connections(web: WebRunning) -> int:
    """Open connections to the server's index (in this process): file descriptors on its
    write-ahead log, which each SQLite connection opens and closes for itself (those on the
    database file are not a measure: SQLite keeps a closed connection's descriptor for
    reuse while another connection holds a lock on the file)."""
    index = (web.dicom.config.storage.data_dir / "index.sqlite-wal").resolve()
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += Path(os.readlink(fd)) == index
        except OSError:  # closed meanwhile
            continue
    return count


def test_endpoints_give_their_index_connection_back(web: WebRunning) -> None:
    """Each endpoint runs in one of Starlette's worker threads (up to 40): the connection
    its index reads took is given back to the pool (storage/index.py) when it returns, as
    QIDO-RS does, so the connections open are at most as many as the requests at once."""
    ds = store_file(web, sample("CT_small.dcm"))
    before = index_connections(web)
    at_once = 3
    urls = [url_of(web, ds, tail) for tail in ("/metadata", "", "/frames/1", "/rendered")]
    urls.append(f"{web.url}/studies/{ds.StudyInstanceUID}/rendered")
    with httpx.Client(timeout=TIMEOUT) as http, ThreadPoolExecutor(at_once) as pool:
        responses = list(pool.map(http.get, urls * 8))
    assert {response.status_code for response in responses} == {200}
    assert index_connections(web) <= before + at_once


# -- streaming -------------------------------------------------------------------------------

def test_a_large_retrieve_streams_in_flat_memory(start_web: Callable[..., WebRunning]) -> None:
    """40 MB of instances go out while the server's memory grows by less than a quarter of
    that (traced Python allocations of the whole process, server and client)."""
    web = start_web(**{"storage.durability": "relaxed"})
    study, series = uid(), uid()
    rows = cols = 1024
    count = 20  # 2 MB each
    pixels = np.random.default_rng(1).integers(0, 4096, (rows, cols), dtype=np.uint16)
    for _ in range(count):
        ds = make_ds(StudyInstanceUID=study, SeriesInstanceUID=series, Rows=rows,
                     Columns=cols, PixelData=pixels.tobytes())
        web.archive.store(encode(ds), ExplicitVRLittleEndian)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        total = 0
        with httpx.stream("GET", f"{web.url}/studies/{study}", headers={"Accept": ANY},
                          timeout=TIMEOUT) as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers
            for chunk in response.iter_bytes():
                total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert total > count * rows * cols * 2
    assert peak < total / 4, f"{peak / 2**20:.1f} MB traced for {total / 2**20:.1f} MB sent"


def test_implicit_vr_is_converted_in_flat_memory(start_web: Callable[..., WebRunning]) -> None:
    """A 16 MB Implicit VR instance goes out as Explicit VR (PS3.18 8.7.3) while the
    server's memory grows by less than half of it: its pixel data is copied from the
    stored file a chunk at a time (the elements after it too), never held whole."""
    web = start_web(**{"storage.durability": "relaxed"})
    rows = cols = 2048
    pixels = np.random.default_rng(2).integers(0, 4096, (2, rows, cols), dtype=np.uint16)
    ds = make_ds(Rows=rows, Columns=cols, NumberOfFrames=2, PixelData=pixels.tobytes())
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 8)  # trailing padding, after the pixel data
    web.archive.store(encode(ds, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    body = tempfile.TemporaryFile()  # noqa: SIM115 - the client's copy, on disk; closed below
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with httpx.stream("GET", url_of(web, ds), headers={"Accept": ANY},
                          timeout=TIMEOUT) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                body.write(chunk)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    total = pixels.nbytes
    # a few MB whatever the size (the read-ahead's two 1 MiB batches, the conversion's 1 MiB
    # chunk, the HTTP buffers); converting in memory held the instance twice (32 MB)
    assert peak < total / 2, f"{peak / 2**20:.1f} MB traced for {total / 2**20:.1f} MB sent"
    body.seek(0)
    response = httpx.Response(200, headers=response.headers, content=body.read())
    body.close()
    ((headers, part),) = parts(response)
    assert headers["content-type"] == f"{DICOM}; transfer-syntax={ExplicitVRLittleEndian}"
    back = dcmread(io.BytesIO(part))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back["PixelData"].VR == "OW"
    assert np.array_equal(back.pixel_array, pixels)
    assert back[0xFFFCFFFC].value == b"\0" * 8
    assert back.to_json_dict(bulk_data_threshold=1 << 30) == dcmread(io.BytesIO(
        stored_file(web, ds))).to_json_dict(bulk_data_threshold=1 << 30)


def test_metadata_of_a_large_series_is_fast(start_web: Callable[..., WebRunning]) -> None:
    """The /metadata of a 1,000-instance series comes from the index, not the files: a
    generous bound here on a shared 2-core machine (bench/ measures it against Orthanc)."""
    web = start_web(**{"storage.durability": "relaxed"})
    study, series = uid(), uid()
    template = dcmread(sample("MR_small.dcm"), stop_before_pixels=True)
    for number in range(1000):
        ds = make_ds(StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=number)
        for elem in template:
            if elem.tag.group not in (0x0002, 0x0008, 0x0010, 0x0020):
                ds[elem.tag] = elem
        web.archive.store(encode(ds), ExplicitVRLittleEndian)
    url = f"{web.url}/studies/{study}/series/{series}/metadata"
    with httpx.Client(timeout=TIMEOUT) as http:
        assert len(http.get(url).json()) == 1000
        times = []
        for _ in range(5):
            start = time.perf_counter()
            response = http.get(url)
            times.append(time.perf_counter() - start)
            assert response.status_code == 200
    assert sorted(times)[2] < 1.0, times

