"""Character sets end to end: pydicom's charset sample files (ISO 8859 parts, ISO 2022
JIS / KS X 1001, UTF-8, GB18030) are stored over the network; each name is then found by a
query written in UTF-8 and by one written in the file's own character set, and comes back
intact, in a response whose SpecificCharacterSet tells the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from tests.conftest import Running, associate
from tests.factory import uid


def charset_samples() -> list[tuple[str, Dataset]]:
    out = []
    for name in sorted(get_charset_files("chr*.dcm")):
        ds = dcmread(name)
        if "PatientName" not in ds or not str(ds.PatientName):
            continue
        out.append((Path(name).name, ds))
    return out


SAMPLES = charset_samples()


def as_instance(ds: Dataset) -> Dataset:
    """The sample, made a storable instance (its text stays in its own character set)."""
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, uid())
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientID = uid()[-12:]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def find_names(running: Running, name: str | bytes, charset: Any) -> list[tuple[str, Any]]:
    from pydicom.dataelem import DataElement

    q = Dataset()
    q.SpecificCharacterSet = charset
    q.QueryRetrieveLevel = "STUDY"
    q.add(DataElement(0x00100010, "PN", name))  # bytes: already encoded in ``charset``
    q.PatientID = ""
    assoc = associate(running)
    out = []
    for rsp, identifier in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if rsp.Status == status.PENDING:
            out.append((str(identifier.PatientName), identifier.SpecificCharacterSet))
    assoc.release()
    return out


# Character sets the samples lack, with a name each can encode.
SYNTHETIC = [
    ("ISO_IR 101", "Dvořák^Antonín"),
    ("ISO_IR 109", "Ĝirardo^Ĉu"),
    ("ISO_IR 110", "Šķēle^Āris"),
    ("ISO_IR 148", "Öztürk^Şükrü"),
    ("ISO_IR 166", "สมชาย^ใจดี"),
    ("GBK", "张^三丰"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"),
]


def synthetic(charset: Any, name: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.file_meta = FileMetaDataset()
    return ds


def gb2312_sample() -> Dataset:
    """ISO 2022 IR 58 written by hand: pydicom 3.0.2 writes it without the escape sequence
    ESC $ ) A that designates GB 2312 (PS3.3 Table C.12-4), so its bytes are built here."""
    from pydicom.dataelem import DataElement

    escape = b"\x1b$)A"
    raw = (b"Zhang^Sanfeng=" + escape + "张".encode("gb2312") + b"^" + escape
           + "三丰".encode("gb2312"))
    ds = synthetic(["", "ISO 2022 IR 58"], "")
    ds.add(DataElement(0x00100010, "PN", raw))
    return ds


GB2312_CASE = "['', 'ISO 2022 IR 58']"
CASES = SAMPLES + [(f"{c}", synthetic(c, n)) for c, n in SYNTHETIC] + [
    (GB2312_CASE, gb2312_sample())]


def _terms(ds: Dataset) -> set[str]:
    value = ds.get("SpecificCharacterSet", "")
    return {value} if isinstance(value, str) else {str(v) for v in value}


def test_cases_cover_the_character_sets() -> None:
    covered = set().union(*(_terms(ds) for _, ds in CASES))
    for expected in ("ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                     "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166",
                     "ISO_IR 192", "GB18030", "GBK", "ISO 2022 IR 87", "ISO 2022 IR 149",
                     "ISO 2022 IR 13", "ISO 2022 IR 58"):

        assert expected in covered, expected


@pytest.mark.parametrize(("filename", "sample"), CASES, ids=[n for n, _ in CASES])
def test_names_round_trip_in_every_character_set(server: Running, filename: str,
                                                 sample: Dataset) -> None:
    ds = as_instance(sample)
    name = "Zhang^Sanfeng=张^三丰" if filename == GB2312_CASE else str(ds.PatientName)
    assoc = associate(server)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    own = ds.SpecificCharacterSet
    for charset in ("ISO_IR 192", own):
        value: str | bytes = name
        if filename == GB2312_CASE and charset == own:
            value = sample["PatientName"].value  # pydicom cannot write IR 58 itself
        found = find_names(server, value, charset)
        assert [n for n, _ in found] == [name], (charset, found)
        [(_, declared)] = found
        # declared is what the bytes were encoded with: ours, or UTF-8 when ours cannot
        assert declared in (charset, "ISO_IR 192") or list(declared) == list(charset)
