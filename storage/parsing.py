"""Reading what the index needs from an incoming data set, and writing its File Meta.

Only the header is parsed (up to the pixel data); what follows is walked, not decoded, to
make sure it is complete. Every value needed for an index column and the per-level DICOM
JSON come from here; nothing is re-encoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from .errors import InvalidInstance
from .index import InstanceRecord
from .keys import Level, level_of
from .values import clean_text, is_uid, norm_da, norm_pn, norm_tm, pn_framed, pn_groups, strip

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["minipacs"])
IMPLEMENTATION_VERSION_NAME = "MINIPACS_01"
BULK_THRESHOLD = 1024
"""Binary values longer than this many bytes are bulk data: kept in the file, not the index."""
HEADER_LIMIT = 64 * 1024 * 1024
"""Most bytes of a deflated data set inflated to read its header."""
INFLATED_LIMIT = 4 * 1024 * 1024 * 1024
"""Most bytes a deflated data set may inflate to (a "deflate bomb" is refused)."""

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


@dataclass
class Parsed:
    """What one header gives the index."""

    record: InstanceRecord
    sop_class_uid: str
    sop_instance_uid: str
    warnings: list[str] = field(default_factory=list)


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
    from . import fastparse  # it builds on this module

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
        return stop_at_pixel_data and int(tag) in _PIXEL_TAGS

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


MAX_DEPTH = 64
"""Most sequences nested in one another in a data set we accept (real IODs nest a few)."""

_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


@dataclass
class _Frame:
    """One open container of the structure walk: a data set (the top one or an item), a
    sequence's items, or encapsulated pixel data's fragments."""

    kind: int
    end: int  # where its bytes must end (a defined length, or its parent's end)
    until: int | None  # the delimiter that closes it (undefined length), else None
    implicit: bool | None  # None: an item whose first element tells (see check_structure)


_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                  b"LO", b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH",
                  b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
                  b"UR", b"US", b"UT", b"UV"})


def check_structure(data: Buffer, implicit: bool, little: bool, complete: bool = True) -> int:
    """Check that ``data`` is one complete data set: every element header whole, every
    value inside its container, every undefined length closed by its delimiter, no stray
    delimiter, and in an explicit VR syntax a VR on every top-level element (PS3.5 7.1,
    7.5, A.4).

    Values are not decoded; sequences and items are followed iteratively, at most
    :data:`MAX_DEPTH` deep. With ``complete`` false (the first bytes of a longer data set)
    the walk ends at the top-level pixel data or where the bytes end.

    What pydicom and other toolkits read, and devices write, is accepted: an item of an
    explicit VR sequence encoded in implicit VR (and the items of an undefined-length UN
    in explicit VR, written before CP-246), told by its first element; top-level pixel
    data whose element header is implicit in an explicit VR data set; an implicit VR
    element the dictionary calls a sequence whose value is not items (a text, as some
    anonymisers write); and a delimiter inside a defined-length item or sequence.

    Returns the offset of the top-level pixel data element (the length of ``data`` when it
    has none): what precedes it is the header.

    Raises
    ------
    InvalidInstance
        Naming the first fault and its byte offset.
    """
    order = "<" if little else ">"
    tag_of = struct.Struct(order + "HH").unpack_from
    u16 = struct.Struct(order + "H").unpack_from
    u32 = struct.Struct(order + "L").unpack_from
    size = len(data)
    stack = [_Frame(_DATASET, size, None, implicit)]
    pos = 0
    pixel_at = size
    while stack:
        frame = stack[-1]
        if pos == frame.end:
            if frame.until is not None:
                if not complete and pos == size:
                    return pixel_at
                raise InvalidInstance(
                    f"data set is truncated at byte {pos}: a sequence or item never ends")
            stack.pop()
            continue
        if pos + 8 > frame.end:
            if not complete and pos + 8 > size:
                return pixel_at
            raise InvalidInstance(f"data set is truncated at byte {pos}: element header "
                                  f"cut short")
        group, elem = tag_of(data, pos)
        tag = group << 16 | elem
        name = f"({group:04X},{elem:04X})"
        if frame.kind != _DATASET:
            # a sequence holds items and its delimiter; pixel data, fragments (PS3.5 A.4)
            if tag == _SEQUENCE_END and (frame.until == _SEQUENCE_END or frame.until is None):
                pos += 8
                if frame.until is not None:
                    stack.pop()
                continue  # in a defined-length sequence: a redundant delimiter
            if tag != _ITEM:
                raise InvalidInstance(f"unexpected {name} at byte {pos}, where an item "
                                      f"must be")
            (length,) = u32(data, pos + 4)
            pos += 8
            item_syntax = frame.implicit if implicit else None  # explicit: ask the item
            if length == _UNDEFINED and frame.kind == _SEQUENCE:
                stack.append(_Frame(_DATASET, frame.end, _ITEM_END, item_syntax))
            elif length == _UNDEFINED or pos + length > frame.end:
                if not complete and length != _UNDEFINED and pos + length > size:
                    return pixel_at
                raise InvalidInstance(f"item at byte {pos - 8} runs past its end")
            elif frame.kind == _SEQUENCE:
                stack.append(_Frame(_DATASET, pos + length, None, item_syntax))
            else:
                pos += length
            continue
        if group == 0xFFFE:
            if tag == _ITEM_END and (frame.until == _ITEM_END
                                     or (frame.until is None and len(stack) > 1)):
                pos += 8
                if frame.until is not None:
                    stack.pop()
                continue  # in a defined-length item: a redundant delimiter
            raise InvalidInstance(f"unexpected delimiter {name} at byte {pos}")
        top = len(stack) == 1
        if top and tag in _PIXEL_TAGS and pixel_at == size:
            pixel_at = pos
            if not complete:
                return pixel_at
        vr = bytes(data[pos + 4:pos + 6])
        if frame.implicit is None:  # an item's first element: explicit if it has a VR
            frame.implicit = vr not in _VRS
        element_implicit = frame.implicit
        if not element_implicit and not (vr.isalpha() or vr == b"  "):  # as pydicom reads
            if not (top and tag in _PIXEL_TAGS):
                raise InvalidInstance(f"element {name} at byte {pos} has no VR, in an "
                                      f"explicit VR transfer syntax")
            element_implicit = True  # some writers encode the pixel data header so
        if element_implicit:
            vr = b""
            (length,) = u32(data, pos + 4)
            pos += 8
        elif vr in _LONG_VRS:
            if pos + 12 > frame.end:
                if not complete and pos + 12 > size:
                    return pixel_at
                raise InvalidInstance(f"data set is truncated at byte {pos}: "
                                      f"element header cut short")
            (length,) = u32(data, pos + 8)
            pos += 12
        else:
            (length,) = u16(data, pos + 6)
            pos += 8
        sequence = vr == b"SQ" or (element_implicit and _is_sequence(tag))
        if length == _UNDEFINED:
            if tag in _PIXEL_TAGS or vr in (b"OB", b"OW"):
                stack.append(_Frame(_FRAGMENTS, frame.end, _SEQUENCE_END, frame.implicit))
            elif sequence or vr == b"UN" or element_implicit:
                # UN of undefined length is a sequence in implicit VR (PS3.5 6.2.2)
                stack.append(_Frame(_SEQUENCE, frame.end, _SEQUENCE_END,
                                    True if vr == b"UN" else frame.implicit))
            else:
                raise InvalidInstance(f"element {name} ({vr.decode()}) at byte {pos} "
                                      f"has an undefined length")
        elif pos + length > frame.end:
            if not complete and pos + length > size:
                return pixel_at
            raise InvalidInstance(
                f"value of {name} is truncated: {length} bytes announced, "
                f"{frame.end - pos} left")
        elif sequence and (vr == b"SQ" or length == 0 or bytes(data[pos:pos + 4]) in _ITEM_TAGS):
            stack.append(_Frame(_SEQUENCE, pos + length, None, frame.implicit))
        else:
            pos += length  # a value; an implicit "sequence" that holds no items is one too
        if len(stack) > 2 * MAX_DEPTH + 1:
            raise InvalidInstance(f"sequences are nested more than {MAX_DEPTH} deep")
    return pixel_at


_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000), little and big endian


def _is_sequence(tag: int) -> bool:
    """Whether an implicit VR element is a sequence, by the data dictionary."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _check_raw_uids(ds: Dataset) -> None:
    """Check the required UIDs as sent: pydicom's UID strips surrounding whitespace and
    control characters, which would index ``1.2.3`` for a value stored as ``\\t1.2.3``. Only
    trailing NUL padding (and, leniently, spaces) is insignificant (PS3.5 6.2, 9.1)."""
    for keyword in _REQUIRED_UIDS:
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
    uids = [_uid(ds, keyword) for keyword in _REQUIRED_UIDS]
    attrs, warnings = _level_json(ds)
    return parsed_from(uids, attrs, warnings, lambda keyword, vr: _text(ds, keyword, vr))


def parsed_from(uids: list[str], attrs: dict[Level, str], warnings: list[str],
                text: Callable[[str, str], str]) -> Parsed:
    """The :class:`Parsed` of one header, whichever way it was read: ``uids`` are the
    values of :data:`_REQUIRED_UIDS` (checked), ``attrs`` the per-level DICOM JSON, and
    ``text(keyword, vr)`` a key's column value as :func:`_text` gives it."""
    sop_class_uid, sop_instance_uid, study_uid, series_uid = uids
    patient_id = text("PatientID", "LO")
    issuer = text("IssuerOfPatientID", "LO")
    patient_name = text("PatientName", "PN")
    alphabetic, ideographic, phonetic = pn_groups(patient_name, folded=True)
    referring = text("ReferringPhysicianName", "PN")
    record = InstanceRecord(
        patient={
            # PS3.4 C.6.1.1.1: PatientID is the patient's Unique key. An instance without
            # one is a patient of its own, per study, never merged with other anonymous ones.
            "patient_key": f"{issuer}\\{patient_id}" if patient_id else f"\\\\{study_uid}",
            "patient_id": patient_id,
            "issuer_of_patient_id": issuer,
            "patient_name": norm_pn(patient_name),
            "patient_name_alphabetic_folded": alphabetic,
            "patient_name_ideographic_folded": ideographic,
            "patient_name_phonetic_folded": phonetic,
            "patient_birth_date": norm_da(text("PatientBirthDate", "DA")),
            "patient_sex": text("PatientSex", "CS"),
            "attrs": attrs[Level.PATIENT],
        },
        study={
            "study_instance_uid": study_uid,
            "study_date": norm_da(text("StudyDate", "DA")),
            "study_time": norm_tm(text("StudyTime", "TM")),
            "accession_number": text("AccessionNumber", "SH"),
            "study_id": text("StudyID", "SH"),
            "referring_physician_name": norm_pn(referring),
            "referring_physician_name_folded": pn_framed(referring, folded=True),
            "study_description": text("StudyDescription", "LO"),
            "attrs": attrs[Level.STUDY],
        },
        series={
            "series_instance_uid": series_uid,
            "modality": text("Modality", "CS"),
            "series_number": text("SeriesNumber", "IS"),
            "series_description": text("SeriesDescription", "LO"),
            "attrs": attrs[Level.SERIES],
        },
        instance={
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "instance_number": text("InstanceNumber", "IS"),
            "attrs": attrs[Level.IMAGE],
        },
    )
    return Parsed(record, sop_class_uid, sop_instance_uid, warnings)


def _bulk_uri(elem: DataElement) -> str:
    return ""  # bulk data stays in the file


def _level_json(ds: Dataset) -> tuple[dict[Level, str], list[str]]:
    out: dict[Level, dict[str, Any]] = {lv: {} for lv in Level}
    warnings: list[str] = []
    for elem in ds:
        tag = int(elem.tag)
        if (tag >> 16) == 0x0002 or tag in _PIXEL_TAGS or (tag & 0xFFFF) == 0:
            continue
        try:  # a bulk value (binary, > BULK_THRESHOLD) is kept as {"vr", "BulkDataURI": ""}
            out[level_of(tag)][f"{tag:08X}"] = _element_json(
                elem.to_json_dict(_bulk_uri, BULK_THRESHOLD), elem
            )
        except Exception as exc:  # one malformed optional element does not refuse the image
            warnings.append(f"{elem.keyword or elem.tag} not indexed: {exc}")
    return dump_levels(out), warnings


def dump_levels(out: dict[Level, dict[str, Any]]) -> dict[Level, str]:
    """The per-level DICOM JSON strings of the index (PS3.18 F.2), compact."""
    # RFC 8259 (PS3.18 F.2) has no NaN or Infinity: _element_json keeps them out, and a
    # number that slipped through would be refused here rather than written
    return {lv: json.dumps(v, separators=(",", ":"), allow_nan=False)
            for lv, v in out.items()}


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


def transfer_syntax_group(transfer_syntax_uid: str) -> bytes:
    """The smallest File Meta group :func:`split_part10` reads back: the Transfer Syntax
    UID (a spool's, see scp/engine/reactor.py)."""
    return meta_group([(0x0010, b"UI", _ui(transfer_syntax_uid))])


def _ui(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def _padded(text: str) -> bytes:
    value = text.encode("ascii", "replace")
    return value + b" " if len(value) % 2 else value


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
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


Buffer = bytes | memoryview
"""Data set bytes: in memory, or a view of a spooled file (:meth:`Spooled.view`)."""


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
