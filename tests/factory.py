"""Synthetic DICOM data for the tests: one instance or a whole hierarchy, and the counts a
stored set implies."""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

_counter = itertools.count(1)
ROOT = "1.2.826.0.1.3680043.8.498."


def uid() -> str:
    """A fresh UID."""
    return generate_uid(prefix=ROOT)


def make_ds(**keywords: Any) -> Dataset:
    """A small valid image instance; any keyword overrides or adds an attribute.

    Pass ``None`` as a value to leave that attribute out.
    """
    n = next(_counter)
    values: dict[str, Any] = {
        "SOPClassUID": CTImageStorage,
        "SOPInstanceUID": uid(),
        "StudyInstanceUID": uid(),
        "SeriesInstanceUID": uid(),
        "PatientID": "PID1",
        "PatientName": "Doe^John",
        "PatientBirthDate": "19700101",
        "PatientSex": "M",
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "AccessionNumber": f"ACC{n}",
        "StudyID": "1",
        "StudyDescription": "Chest",
        "ReferringPhysicianName": "House^Gregory",
        "Modality": "CT",
        "SeriesNumber": 1,
        "InstanceNumber": n,
        "Rows": 4,
        "Columns": 4,
        "BitsAllocated": 16,
        "BitsStored": 12,
        "HighBit": 11,
        "PixelRepresentation": 0,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "PixelData": bytes(32),
    }
    values.update(keywords)
    ds = Dataset()
    for keyword, value in values.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CTImageStorage)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", uid())
    return ds


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set's bytes (no file meta) in an uncompressed transfer syntax."""
    ts = UID(transfer_syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = ts.is_little_endian
    fp.is_implicit_VR = ts.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def file_parts(path: str | Path) -> tuple[bytes, str]:
    """Split a DICOM file into its data set bytes and transfer syntax."""
    raw = Path(path).read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return fp.read(), str(meta.TransferSyntaxUID)


def save(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def hierarchy() -> list[Dataset]:
    """Several patients; studies with several series, modalities and SOP classes.

    Patient PID1 has two studies (CT+MR+SC, and CT), PID2 one (MR+SC), PID3 one study
    with a Latin-1 name, and one study has an empty PatientName and no StudyDate.
    """
    out: list[Dataset] = []
    plan = [
        ("PID1", "Doe^John", "20240102", [("CT", CTImageStorage, 3), ("MR", MRImageStorage, 2),
                                          ("OT", SecondaryCaptureImageStorage, 1)]),
        ("PID1", "Doe^John", "20240315", [("CT", CTImageStorage, 4)]),
        ("PID2", "Smith^Anna", "20231120", [("MR", MRImageStorage, 5), ("MR", MRImageStorage, 2),
                                            ("OT", SecondaryCaptureImageStorage, 2)]),
        ("PID3", "Müller^Jürgen", "20220707", [("CT", CTImageStorage, 2)]),
        ("PID4", "", None, [("MR", MRImageStorage, 1)]),
    ]
    for number, (pid, name, date, series) in enumerate(plan, start=1):
        study = uid()
        for series_number, (modality, sop_class, count) in enumerate(series, start=1):
            series_uid = uid()
            for _ in range(count):
                extra: dict[str, Any] = {}
                if not name.isascii():
                    extra["SpecificCharacterSet"] = "ISO_IR 100"
                out.append(make_ds(
                    PatientID=pid, PatientName=name, StudyDate=date, StudyInstanceUID=study,
                    SeriesInstanceUID=series_uid, Modality=modality, SOPClassUID=sop_class,
                    SeriesNumber=series_number, AccessionNumber=f"A{number}",
                    StudyDescription=f"Study {number}", **extra,
                ))
    return out


@dataclass
class StudyCounts:
    series: set[str] = field(default_factory=set)
    instances: set[str] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)
    sop_classes: set[str] = field(default_factory=set)


def expected_counts(datasets: Iterable[Dataset]) -> dict[str, StudyCounts]:
    """The study counts a stored sequence implies: a later instance with the same SOP
    Instance UID replaces the earlier one; a series' modality is its first instance's."""
    final: dict[str, Dataset] = {}
    series_modality: dict[str, str] = {}
    for ds in datasets:
        final[ds.SOPInstanceUID] = ds
        series_modality.setdefault(ds.SeriesInstanceUID, str(ds.get("Modality", "")))
    out: dict[str, StudyCounts] = {}
    for ds in final.values():
        c = out.setdefault(ds.StudyInstanceUID, StudyCounts())
        c.series.add(ds.SeriesInstanceUID)
        c.instances.add(ds.SOPInstanceUID)
        if series_modality[ds.SeriesInstanceUID]:
            c.modalities.add(series_modality[ds.SeriesInstanceUID])
        c.sop_classes.add(str(ds.SOPClassUID))
    return out


def values(v: Any) -> set[str]:
    """The values of a possibly multi-valued element, as a set of strings."""
    if v is None or v == "":
        return set()
    return {str(v)} if isinstance(v, str) else {str(x) for x in v}


def study_counts(rsp: Dataset) -> tuple[int, int, set[str], set[str]]:
    """The four computed keys of a STUDY level response."""
    return (int(rsp.NumberOfStudyRelatedSeries), int(rsp.NumberOfStudyRelatedInstances),
            values(rsp.ModalitiesInStudy), values(rsp.SOPClassesInStudy))


def expected_table(datasets: Iterable[Dataset]) -> dict[str, tuple[int, int, set[str], set[str]]]:
    """What :func:`study_counts` should give for each study of a stored sequence."""
    return {study: (len(c.series), len(c.instances), c.modalities, c.sop_classes)
            for study, c in expected_counts(datasets).items()}


def retrieve_levels(
    datasets: list[Dataset],
) -> list[tuple[str, dict[str, Any], Callable[[Dataset], bool]]]:
    """("patient" or "study" root, identifier, which of ``datasets`` (a :func:`hierarchy`)
    it names) for every level of both models; at the query level a list of two UIDs."""
    a, b = datasets[0], datasets[-1]  # first and last instance: different patients
    pid1 = [ds for ds in datasets if ds.PatientID == "PID1"]
    s1, s2 = pid1[0].StudyInstanceUID, pid1[-1].StudyInstanceUID
    series = [ds.SeriesInstanceUID for ds in datasets if ds.StudyInstanceUID == s1]
    se1, se2 = series[0], series[-1]
    sops = [ds.SOPInstanceUID for ds in datasets if ds.SeriesInstanceUID == se1][:2]
    return [
        ("patient", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PID2"},
         lambda ds: ds.PatientID == "PID2"),
        ("patient", {"QueryRetrieveLevel": "STUDY", "PatientID": "PID1",
                        "StudyInstanceUID": [s1, s2]},
         lambda ds: ds.StudyInstanceUID in (s1, s2)),
        ("patient", {"QueryRetrieveLevel": "SERIES", "PatientID": "PID1",
                        "StudyInstanceUID": s1, "SeriesInstanceUID": [se1, se2]},
         lambda ds: ds.SeriesInstanceUID in (se1, se2)),
        ("patient", {"QueryRetrieveLevel": "IMAGE", "PatientID": "PID1", "StudyInstanceUID": s1,
                        "SeriesInstanceUID": se1, "SOPInstanceUID": sops},
         lambda ds: ds.SOPInstanceUID in sops),
        ("study", {"QueryRetrieveLevel": "STUDY",
                      "StudyInstanceUID": [a.StudyInstanceUID, b.StudyInstanceUID]},
         lambda ds: ds.StudyInstanceUID in (a.StudyInstanceUID, b.StudyInstanceUID)),
        ("study", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": s1,
                      "SeriesInstanceUID": se2},
         lambda ds: ds.SeriesInstanceUID == se2),
        ("study", {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": s1,
                      "SeriesInstanceUID": se1, "SOPInstanceUID": sops[0]},
         lambda ds: ds.SOPInstanceUID == sops[0]),
    ]


LEVEL_CASE_IDS = ["patient-PATIENT", "patient-STUDY", "patient-SERIES", "patient-IMAGE",
                  "study-STUDY", "study-SERIES", "study-IMAGE"]
