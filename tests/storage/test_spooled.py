"""A data set spooled to a file (every C-STORE since pynetdicom spools them) is stored
exactly as the same bytes in memory would be, reading the file a chunk at a time."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from storage import Archive, Spooled
from storage.errors import InvalidInstance
from storage.parsing import content_hash
from tests.factory import encode, make_ds

EXPLICIT = "1.2.840.10008.1.2.1"


def spool(tmp_path: Path, data: bytes, name: str = "spool.dcm") -> Spooled:
    """``data`` behind a preamble and a File Meta group, as pynetdicom writes its spool."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = "1.2.3"
        meta.TransferSyntaxUID = EXPLICIT
        write_file_meta_info(f, meta)  # type: ignore[arg-type]
        f.write(data)
    syntax, spooled = Spooled.part10(path)
    assert syntax == EXPLICIT and spooled.length == len(data)
    return spooled


def test_a_spooled_data_set_is_stored_like_the_same_bytes(new_archive: Archive,
                                                          tmp_path: Path) -> None:
    data = encode(make_ds(Rows=256, Columns=256, PixelData=bytes(range(256)) * 512))
    spooled = spool(tmp_path, data)
    assert b"".join(spooled.chunks(size=1000)) == data
    assert content_hash(EXPLICIT, spooled) == content_hash(EXPLICIT, data)
    new_archive.store(spooled, EXPLICIT)
    [stored] = [p for p in (tmp_path / "files").glob("*/*/*") if p.is_file()]
    assert stored.read_bytes().endswith(data)


def test_a_spooled_data_set_cut_short_is_refused(new_archive: Archive, tmp_path: Path) -> None:
    data = encode(make_ds(Rows=64, Columns=64, PixelData=bytes(8192)))
    with pytest.raises(InvalidInstance, match="truncated"):
        new_archive.store(spool(tmp_path, data[:-100]), EXPLICIT)


def test_a_data_set_starting_with_group_0002_keeps_it(new_archive: Archive,
                                                      tmp_path: Path) -> None:
    """Some senders put group 0002 elements in the data set itself: the spool's File Meta
    ends where its group length says, so they stay part of the stored bytes."""
    stray = struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", 2) + b"X "
    data = stray + encode(make_ds(Rows=64, Columns=64, PixelData=bytes(8192)))
    spooled = spool(tmp_path, data)
    assert b"".join(spooled.chunks()) == data
    new_archive.store(spooled, EXPLICIT)
    [stored] = [p for p in (tmp_path / "files").glob("*/*/*") if p.is_file()]
    assert stored.read_bytes().endswith(data)
