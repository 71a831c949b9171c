"""Reading what the index needs from an incoming data set, and writing its File Meta.

Only the header is parsed (up to the pixel data); what follows is walked, not decoded, to
make sure it is complete (:mod:`storage.structure`). Every value needed for an index
column and the per-level DICOM JSON come from here (:class:`~storage.parsed.Parsed`), by
pydicom's path or, when it is sure of the bytes, by :mod:`storage.fastparse`'s; nothing is
re-encoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from . import fastparse
from .errors import InvalidInstance
from .keys import Level, level_of
from .parsed import BULK_THRESHOLD, REQUIRED_UIDS, Parsed, dump_levels, parsed_from
from .structure import LONG_VRS, PIXEL_TAGS, Buffer, check_structure
from .values import clean_text, is_uid, strip

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["minipacs"])
IMPLEMENTATION_VERSION_NAME = "MINIPACS_01"
HEADER_LIMIT = 64 * 1024 * 1024
"""Most bytes of a deflated data set inflated to read its header."""
INFLATED_LIMIT = 4 * 1024 * 1024 * 1024
"""Most bytes a deflated data set may inflate to (a "deflate bomb" is refused)."""


def read_header(data: Buffer, transfer_syntax_uid: str, strict: bool = True) -> Dataset:
    """Parse a data set up to its pixel data, after checking that all of it is complete.

    ``strict`` false is for files already in the store (``reindex``, ``verify``): they are
    parsed as pydicom reads them, without the structure walk and the check of the UIDs as
    sent, so that a file stored before those checks existed stays indexable.

    Raises
    ------
    InvalidInstance
        When the bytes are not a complete data set in that transfer syntax (PS3.4 B.2.3
        "Cannot understand").
    """
    if not strict:
        return _read(data, transfer_syntax_uid, stop_at_pixel_data=True, walk=False)
    return _read(data, transfer_syntax_uid, stop_at_pixel_data=True, check_raw=_check_raw_uids)


def parse_header(data: Buffer, transfer_syntax_uid: str) -> Parsed:
    """What the index needs of an incoming data set: ``extract(read_header(...))``, the
    same result read straight from the bytes when :mod:`storage.fastparse` is sure of
    them (the common case, several times faster), else by pydicom.

    Raises
    ------
    InvalidInstance
        As :func:`read_header` and :func:`extract` raise it.
    """
    try:
        return fastparse.fast_parse(data, transfer_syntax_uid)
    except InvalidInstance:
        raise  # the structure check, which the slow path runs first too
    except Exception:  # Declined, or anything unforeseen: pydicom's path decides
        return extract(read_header(data, transfer_syntax_uid))


def read_identifier(data: bytes, transfer_syntax_uid: str) -> Dataset:
    """Parse a whole C-FIND / C-MOVE / C-GET identifier, after checking it is complete.

    Raises
    ------
    InvalidInstance
        When the bytes are not a complete data set in that transfer syntax.
    """
    return _read(data, transfer_syntax_uid, stop_at_pixel_data=False)


def _read(data: Buffer, transfer_syntax_uid: str, stop_at_pixel_data: bool,
          check_raw: Callable[[Dataset], None] | None = None, walk: bool = True) -> Dataset:
    ts = UID(transfer_syntax_uid)
    try:
        implicit = ts.is_implicit_VR
        little = ts.is_little_endian
    except ValueError:
        implicit, little = False, True  # an unknown (private) syntax: explicit little endian
    complete = True
    if ts == DeflatedExplicitVRLittleEndian:
        data, complete = _inflate_header(data)
    if not data:
        raise InvalidInstance("data set is empty")
    # pydicom's reader stops silently where the bytes end, ends the data set at a stray
    # delimiter and switches to implicit VR when the VRs look wrong: walk the structure
    # first (PS3.5 7.1, 7.5), so that whatever it parses is all there is
    header_end = len(data)
    if walk:
        header_end = check_structure(data, implicit, little, complete=complete)
    if isinstance(data, bytes):
        fp = io.BytesIO(data)  # shares the bytes
    else:  # a view of a spooled file: copy only the header (and the pixel data's tag)
        fp = io.BytesIO(bytes(data[:header_end + 12 if stop_at_pixel_data else len(data)]))

    def at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
        return stop_at_pixel_data and int(tag) in PIXEL_TAGS

    try:
        ds = read_dataset(fp, implicit, little, stop_when=at_pixel_data)
        if check_raw is not None:
            check_raw(ds)  # before decoding: it reads the values as sent
        # Decoding happens lazily: touch the elements now so a broken one fails here.
        for elem in ds:
            _ = elem.value
    except InvalidInstance:
        raise
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise InvalidInstance(f"data set cannot be parsed: {exc}") from exc
    if len(ds) == 0:
        raise InvalidInstance("data set is empty")
    return ds


def _inflate_header(data: Buffer) -> tuple[bytes, bool]:
    """Inflate at most :data:`HEADER_LIMIT` bytes to parse; stream through the rest without
    keeping it, to check the deflate stream is whole and not a bomb. Returns the bytes
    inflated and whether they are the whole data set."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        head = inflater.decompress(data, HEADER_LIMIT)
        total = len(head)
        while not inflater.eof and total <= INFLATED_LIMIT:
            # output the limit held back may be pending with no input left to consume
            chunk = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
            if not chunk and not inflater.unconsumed_tail:
                break  # nothing left: a stream cut short
            total += len(chunk)
    except zlib.error as exc:
        raise InvalidInstance(f"deflated data set cannot be inflated: {exc}") from exc
    if total > INFLATED_LIMIT:
        raise InvalidInstance(f"deflated data set inflates beyond {INFLATED_LIMIT} bytes")
    if not inflater.eof:
        raise InvalidInstance("deflated data set is truncated")
    return head, total == len(head)


def _check_raw_uids(ds: Dataset) -> None:
    """Check the required UIDs as sent: pydicom's UID strips surrounding whitespace and
    control characters, which would index ``1.2.3`` for a value stored as ``\\t1.2.3``. Only
    trailing NUL padding (and, leniently, spaces) is insignificant (PS3.5 6.2, 9.1)."""
    for keyword in REQUIRED_UIDS:
        elem = ds.get_item(keyword)
        raw = elem.value if elem is not None else None
        if isinstance(raw, bytes):
            _valid_uid(keyword, raw.decode("latin-1").rstrip("\0 "))


def _valid_uid(keyword: str, text: str) -> str:
    if not text:
        raise InvalidInstance(f"{keyword} is missing")
    if not is_uid(text):
        raise InvalidInstance(f"{keyword} is not a valid UID: {text[:80]!r}")
    return text


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return _valid_uid(keyword, strip("UI", str(value)) if value else "")


def _text(ds: Dataset, keyword: str, vr: str = "LO") -> str:
    """The value of a single-valued key for its index column: the first value, should the
    sender have sent several (the README documents it)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else ""
    return strip(vr, clean_text(str(value)))


def extract(ds: Dataset) -> Parsed:
    """Column values and per-level DICOM JSON of one header.

    Raises
    ------
    InvalidInstance
        When a required UID is missing or malformed.
    """
    uids = [_uid(ds, keyword) for keyword in REQUIRED_UIDS]
    attrs, warnings = _level_json(ds)
    return parsed_from(uids, attrs, warnings, lambda keyword, vr: _text(ds, keyword, vr))


def _bulk_uri(elem: DataElement) -> str:
    return ""  # bulk data stays in the file


def _level_json(ds: Dataset) -> tuple[dict[Level, str], list[str]]:
    out: dict[Level, dict[str, Any]] = {lv: {} for lv in Level}
    warnings: list[str] = []
    for elem in ds:
        tag = int(elem.tag)
        if (tag >> 16) == 0x0002 or tag in PIXEL_TAGS or (tag & 0xFFFF) == 0:
            continue
        try:  # a bulk value (binary, > BULK_THRESHOLD) is kept as {"vr", "BulkDataURI": ""}
            out[level_of(tag)][f"{tag:08X}"] = _element_json(
                elem.to_json_dict(_bulk_uri, BULK_THRESHOLD), elem
            )
        except Exception as exc:  # one malformed optional element does not refuse the image
            warnings.append(f"{elem.keyword or elem.tag} not indexed: {exc}")
    return dump_levels(out), warnings


# PS3.5 Table 6.2-1 DS: a fixed or floating point number (ANSI X3.9), at most 16 bytes
_DS_TEXT = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")
_DS_MAX_LENGTH = 16


def _element_json(element: dict[str, Any], source: DataElement | None) -> dict[str, Any]:
    """One attribute of pydicom's DICOM JSON, made fit for the index.

    Text is cleaned (:func:`clean_text`). A number JSON cannot hold (NaN, an infinity,
    or a DS such as ``1e999`` beyond a double) never enters it: a DS keeps its original
    text, as PS3.18 Table F.2.3-1 allows ("a JSON String representation can be used to
    preserve the original format") when that text is a valid DS (PS3.5 Table 6.2-1);
    anything else ("nan", "inf", an FL or FD value, which Table F.2.3-1 makes a JSON
    Number only) loses its Value and stays as an attribute without one (PS3.18 F.2.5).
    ``source`` is the element the JSON was made of (None when it cannot be told).
    """
    out: dict[str, Any] = {}
    for key, value in element.items():
        if key == "Value" and isinstance(value, list):
            values = _values_json(element.get("vr", ""), value, source)
            if values is not None:
                out[key] = values
        else:
            out[key] = _clean_json(value)
    return out


def _values_json(vr: str, values: list[Any], source: DataElement | None) -> list[Any] | None:
    """The Value array of an attribute (:func:`_element_json`); None to leave it out."""
    if vr == "SQ":
        items = list(source.value) if source is not None and source.VR == "SQ" else []
        return [_item_json(item, items[i] if i < len(items) else None)
                for i, item in enumerate(values)]
    cleaned = [_clean_json(v) for v in values]
    if all(not isinstance(v, float) or math.isfinite(v) for v in cleaned):
        return cleaned
    return _ds_texts(source) if vr == "DS" else None


def _item_json(item: Any, source: Dataset | None) -> Any:
    if not isinstance(item, dict):
        return _clean_json(item)
    out: dict[str, Any] = {}
    for key, element in item.items():
        sub = source.get(int(key, 16)) if source is not None else None
        out[key] = (_element_json(element, sub if isinstance(sub, DataElement) else None)
                    if isinstance(element, dict) else _clean_json(element))
    return out


def _ds_texts(source: DataElement | None) -> list[str] | None:
    """The DS values of ``source`` as their original texts, when each is a valid DS."""
    if source is None or source.VR != "DS":
        return None
    value = source.value
    values = value if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" \
        else [value]
    texts = []
    for v in values:
        text = str(getattr(v, "original_string", None) or v)
        if len(text) > _DS_MAX_LENGTH or not _DS_TEXT.fullmatch(text):
            return None
        texts.append(text.strip())
    return texts


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_json(v) for k, v in value.items()}
    return value


def file_meta(parsed: Parsed, transfer_syntax_uid: str, source_ae_title: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for the stored file.

    Encoded here (Explicit VR Little Endian, PS3.10 Table 7.1-1) rather than with pydicom's
    writer, which cost as much as the rest of the header work; the bytes are the same
    (tests/storage/test_parsing.py compares them).
    """
    elements = [
        (0x0001, b"OB", b"\x00\x01"),
        (0x0002, b"UI", _ui(parsed.sop_class_uid)),
        (0x0003, b"UI", _ui(parsed.sop_instance_uid)),
        (0x0010, b"UI", _ui(transfer_syntax_uid)),
        (0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
        (0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME)),
    ]
    ae_title = source_ae_title.strip()[:16]
    if ae_title:
        elements.append((0x0016, b"AE", _padded(ae_title)))
    return b"\0" * 128 + b"DICM" + meta_group(elements)


def meta_group(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    """Group 0002 in Explicit VR Little Endian (PS3.10 7.1): its group length, then the
    elements, each (element number, VR, value padded to even length)."""
    body = b"".join(_meta_element(elem, vr, value) for elem, vr, value in elements)
    return _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _padded(text: str) -> bytes:
    value = text.encode("ascii", "replace")
    return value + b" " if len(value) % 2 else value


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2sHL", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def content_hash(transfer_syntax_uid: str, data: bytes | Spooled) -> str:
    """What the index records of an instance's content: SHA-256 of its transfer syntax UID,
    a NUL, and its data set bytes (the File Meta header we write is not part of it)."""
    digest = hashlib.sha256(transfer_syntax_uid.encode() + b"\0")
    for chunk in chunks_of(data):
        digest.update(chunk)
    return digest.hexdigest()


def chunks_of(data: bytes | Spooled) -> Iterable[bytes]:
    """The data set's bytes: as they are in memory, or a spooled file's a chunk at a time."""
    return data.chunks() if isinstance(data, Spooled) else (data,)


SPOOL_CHUNK = 1 << 20
"""Bytes read at a time from a spooled data set."""


@dataclass(frozen=True)
class Spooled:
    """A data set waiting in a file rather than in memory: ``length`` bytes at ``offset``
    of ``path`` (pynetdicom spools every received C-STORE data set to a file; a 1 GB
    multi-frame then never has to be in memory)."""

    path: Path
    offset: int
    length: int

    @classmethod
    def part10(cls, path: Path, preamble_optional: bool = False) -> tuple[str, Spooled]:
        """The transfer syntax and data set of the Part 10 file ``path`` (read up to the end
        of its File Meta Information only); ``preamble_optional``: see :func:`split_part10`.

        Raises
        ------
        InvalidInstance
            Not a Part 10 file, or its File Meta group is damaged.
        """
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
            size = os.fstat(f.fileno()).st_size
        # the group ends where its (0002,0000) group length says: a data set that itself
        # starts with group 0002 elements (some senders) must not be taken for File Meta
        at = _meta_at(head, preamble_optional)
        if head[at:at + 6] == b"\x02\x00\x00\x00UL" and len(head) >= at + 12:
            (group_length,) = struct.unpack_from("<L", head, at + 8)
            end = at + 12 + group_length
            if end <= len(head):
                syntax, _ = split_part10(head[:end], preamble_optional)
                return syntax, cls(path, end, size - end)
        syntax, rest = split_part10(head, preamble_optional)
        offset = len(head) - len(rest)
        return syntax, cls(path, offset, size - offset)

    def chunks(self, size: int = SPOOL_CHUNK) -> Iterator[bytes]:
        """The data set's bytes, ``size`` at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                chunk = f.read(min(size, left))
                if not chunk:
                    raise InvalidInstance(f"{self.path} is shorter than announced")
                left -= len(chunk)
                yield chunk

    @contextlib.contextmanager
    def view(self) -> Iterator[memoryview]:
        """The data set's bytes as a read-only view of the file, mapped, not read: only
        the pages looked at are loaded (the structure walk touches element headers)."""
        with open(self.path, "rb") as f:
            if self.length == 0:
                yield memoryview(b"")
                return
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                whole = memoryview(mapped)
                view = whole[self.offset:self.offset + self.length]
                try:
                    yield view
                finally:
                    view.release()
                    whole.release()
            finally:
                mapped.close()


_PART10_MAGIC_AT = 128


def _meta_at(head: bytes, preamble_optional: bool) -> int:
    """Where the File Meta group starts: after the preamble and "DICM" (PS3.10 7.1) or, when
    the preamble is optional, at the start of a file that begins with a group 0002 element
    in Explicit VR (what pydicom's ``dcmwrite`` writes of a data set not read from a file,
    and so what dicomweb-client sends).

    Raises
    ------
    InvalidInstance
        Neither.
    """
    if head[_PART10_MAGIC_AT:_PART10_MAGIC_AT + 4] == b"DICM":
        return _PART10_MAGIC_AT + 4
    if preamble_optional and head[:2] == b"\x02\x00" and head[4:6].isalpha():
        return 0
    raise InvalidInstance("not a DICOM Part 10 file (no DICM after the preamble)")


def split_part10(raw: bytes, preamble_optional: bool = False) -> tuple[str, bytes]:
    """The transfer syntax and data set bytes of a DICOM Part 10 file (PS3.10 7.1: a
    128-byte preamble, "DICM", the File Meta group 0002 in Explicit VR Little Endian; with
    ``preamble_optional``, the File Meta group may also start the file).

    Raises
    ------
    InvalidInstance
        It is not a Part 10 file, or its File Meta group is damaged or names no
        Transfer Syntax UID.
    """
    pos = _meta_at(raw, preamble_optional)
    syntax = ""
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > len(raw):
                break
            (length,) = struct.unpack_from("<I", raw, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", raw, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > len(raw):
            raise InvalidInstance("damaged File Meta Information (bad element length)")
        if elem == 0x0010:
            syntax = raw[start:start + length].decode("ascii", "replace").rstrip("\0 ")
        pos = start + length
    if not syntax:
        raise InvalidInstance("the File Meta Information names no Transfer Syntax UID")
    return syntax, raw[pos:]
