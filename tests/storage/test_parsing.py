"""storage/parsing.py pieces that have a reference to compare with."""

from __future__ import annotations

import io
import struct
import time
import zlib

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from storage import parsing
from storage.errors import InvalidInstance
from storage.files import new_key
from storage.index import InstanceRecord
from storage.parsing import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    Parsed,
    file_meta,
    read_header,
)


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


# -- what toolkits read and devices write is accepted (check_structure's leniencies) ------

EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
_LONG = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def ex(tag: int, vr: bytes, value: bytes | None) -> bytes:
    """An explicit VR little endian element; ``None``: undefined length, no value."""
    if vr in _LONG:
        length = 0xFFFFFFFF if value is None else len(value)
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, length) + (value or b"")
    assert value is not None
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def im(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def item(body: bytes, defined: bool = True) -> bytes:
    if defined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
    return (struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
            + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))


SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
UID_VALUES = ((0x00080016, b"1.2.840.10008.5.1.4.1.1.7\0"), (0x00080018, b"1.2.3.4\0"),
              (0x0020000D, b"1.2.3.5\0"), (0x0020000E, b"1.2.3.6\0"))
UIDS = b"".join(ex(tag, b"UI", value) for tag, value in UID_VALUES)
UIDS_IMPLICIT = b"".join(im(tag, value) for tag, value in UID_VALUES)


@pytest.mark.parametrize(("data", "syntax"), [
    pytest.param(UIDS + ex(0x00081140, b"SQ", None) + item(im(0x00081150, b"1.2\0"), False)
                 + SEQUENCE_END, EXPLICIT, id="explicit-sequence-with-implicit-vr-items"),
    pytest.param(UIDS + ex(0x00091010, b"UN", None)
                 + item(ex(0x00100010, b"PN", b"DOE^J "), False) + SEQUENCE_END, EXPLICIT,
                 id="undefined-length-un-with-explicit-items-before-cp-246"),
    pytest.param(UIDS + ex(0x00091010, b"UN", None) + item(im(0x00100010, b"DOE^J "), False)
                 + SEQUENCE_END, EXPLICIT, id="undefined-length-un-with-implicit-items"),
    pytest.param(UIDS + ex(0x00081140, b"SQ", None)
                 + item(ex(0x00081150, b"UI", b"1.2\0") + ITEM_END) + SEQUENCE_END, EXPLICIT,
                 id="item-delimiter-in-a-defined-length-item"),
    pytest.param(UIDS + ex(0x00081140, b"SQ", item(ex(0x00081150, b"UI", b"1.2\0"))
                           + SEQUENCE_END), EXPLICIT,
                 id="sequence-delimiter-in-a-defined-length-sequence"),
    pytest.param(UIDS_IMPLICIT + im(0x00120064, b"Siemens Healthcare Header Anonymizer"),
                 IMPLICIT, id="implicit-dictionary-sequence-holding-text"),
    pytest.param(UIDS + im(0x7FE00010, bytes(16)), EXPLICIT,
                 id="implicit-pixel-data-header-in-explicit-vr"),
    pytest.param(UIDS + ex(0x00091010, b"lo", b"ab"), EXPLICIT, id="lowercase-vr"),
    pytest.param(UIDS + ex(0x00280010, b"US", b"\x40\x00") + ex(0x7FE00010, b"OB", None)
                 + item(b"") + item(b"\xff\xd8\xff\xd9") + SEQUENCE_END,
                 "1.2.840.10008.1.2.4.50", id="encapsulated-pixel-data"),
])
def test_lenient_encodings_are_read(data: bytes, syntax: str) -> None:
    assert str(read_header(data, syntax).SOPInstanceUID) == "1.2.3.4"


def test_a_deflated_data_set_longer_than_the_header_limit(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Only the first HEADER_LIMIT bytes are inflated to parse: a long value (an
    Encapsulated PDF, no pixel data) running past them is not "truncated"."""
    monkeypatch.setattr(parsing, "HEADER_LIMIT", 1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = UIDS + ex(0x00420011, b"OB", bytes(3 << 20))
    deflated = compressor.compress(data) + compressor.flush()
    assert str(read_header(deflated, DEFLATED).SOPInstanceUID) == "1.2.3.4"
    with pytest.raises(InvalidInstance, match="truncated"):
        read_header(deflated[:-100], DEFLATED)  # the stream itself cut short


def test_stored_files_are_reread_without_the_stricter_checks() -> None:
    """reindex and verify re-read files stored before check_structure existed."""
    data = UIDS_IMPLICIT + im(0x00100010, b"DOE^J ")  # implicit bytes, explicit syntax
    with pytest.raises(InvalidInstance, match="no VR"):
        read_header(data, EXPLICIT)
    assert str(read_header(data, EXPLICIT, strict=False).SOPInstanceUID) == "1.2.3.4"
