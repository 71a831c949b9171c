"""storage/parsing.py pieces that have a reference to compare with."""

from __future__ import annotations

import io
import time

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from storage.files import new_key
from storage.index import InstanceRecord
from storage.parsing import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, Parsed, file_meta


def pydicom_file_meta(sop_class: str, sop_instance: str, syntax: str, ae_title: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if ae_title.strip():
        meta.SourceApplicationEntityTitle = ae_title.strip()[:16]
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax", "ae_title"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "STORESCU"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2", "ODD"),
    ("1.2.840.10008.5.1.4.1.1.7", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.50", ""),
    ("1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.840.10008.1.2.1.99", " SIXTEEN_CHARS_AE_TITLE "),
])
def test_file_meta_is_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str,
                                          ae_title: str) -> None:
    record = InstanceRecord({}, {}, {}, {})
    parsed = Parsed(record, sop_class, sop_instance)
    assert file_meta(parsed, syntax, ae_title) == pydicom_file_meta(
        sop_class, sop_instance, syntax, ae_title)


def test_file_keys_of_one_minute_share_a_folder() -> None:
    now = time.time()
    keys = {new_key(now) for _ in range(100)}
    assert len(keys) == 100 and all(len(k) == 32 for k in keys)
    assert len({k[:4] for k in keys}) == 1
    assert new_key(now + 60)[:4] != new_key(now)[:4]
