"""A server whose files are in an object store (``storage.files_url: s3://...``, SeaweedFS
started by the tests): DCMTK stores, C-FIND counts, C-GET byte for byte, WADO-RS instances
and frames, and a multi-frame too large for memory, all through the bucket."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from scp import status
from storage.models import Instance
from storage.objects import IN_MEMORY_BYTES, ObjectStore
from tests.conftest import find
from tests.factory import encode, expected_table, hierarchy, make_ds, save, study_counts
from tests.objects import Weed, s3_overrides
from tests.test_e2e import STUDY_KEYS
from tests.test_retrieve import c_get
from tests.web.conftest import WebRunning


def big_multiframe(study: str) -> Dataset:
    """A 16-bit multi-frame of more than :data:`IN_MEMORY_BYTES`: spooled locally, then
    uploaded in parts."""
    rows = cols = 512
    frames = IN_MEMORY_BYTES // (rows * cols * 2) + 4
    ds = make_ds(StudyInstanceUID=study, Modality="OT",
                 SOPClassUID=MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
    pixels = (np.arange(frames * rows * cols, dtype=np.uint32) % 65_521).astype("<u2")
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    return ds


def test_a_server_on_the_object_store_stores_finds_and_retrieves(
        weed: Weed, start_web: Callable[..., WebRunning], dcmtk: Callable[..., Any],
        tmp_path: Path) -> None:
    running = start_web(**s3_overrides(weed, uuid.uuid4().hex))
    server = running.dicom
    assert isinstance(server.archive.files, ObjectStore)
    datasets = hierarchy()
    big = big_multiframe(make_ds().StudyInstanceUID)
    datasets.append(big)
    paths = [str(save(ds, tmp_path / "in" / f"{i}.dcm")) for i, ds in enumerate(datasets)]
    dcmtk("storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *paths)

    # every file is in the bucket, none in the node's folder (but for its locks)
    keys = {row.file_key for row in Instance.select(Instance.file_key)}
    assert len(keys) == len(datasets) and set(server.archive.files.keys()) == keys
    local = server.data_dir / "files"
    assert [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")] == []

    matches, final = find(server, QueryRetrieveLevel="STUDY", **{k: "" for k in STUDY_KEYS})
    assert final == status.SUCCESS
    assert {m.StudyInstanceUID: study_counts(m) for m in matches} == expected_table(datasets)

    study = datasets[0].StudyInstanceUID
    received, responses = c_get(server, StudyRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    assert int(responses[-1].Status) == status.SUCCESS
    sent = [encode(ds) for ds in datasets if ds.StudyInstanceUID == study]
    assert sorted(received) == sorted(sent)

    # WADO-RS: an instance as stored, and a frame from the middle of the big one
    with httpx.Client(timeout=60) as client:
        one = datasets[1]
        rsp = client.get(f"{running.url}/studies/{one.StudyInstanceUID}/series/"
                         f"{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}",
                         headers={"Accept": "multipart/related; type=\"application/dicom\""})
        assert rsp.status_code == 200 and encode(one) in rsp.content
        frame = int(big.NumberOfFrames) - 2
        rsp = client.get(f"{running.url}/studies/{big.StudyInstanceUID}/series/"
                         f"{big.SeriesInstanceUID}"
                         f"/instances/{big.SOPInstanceUID}/frames/{frame}",
                         headers={"Accept": "multipart/related; type=\"application/octet-stream\""})
        assert rsp.status_code == 200
        size = int(big.Rows) * int(big.Columns) * 2
        expected = big.PixelData[(frame - 1) * size:frame * size]
        assert expected in rsp.content
    assert server.archive.verify().problems == []
