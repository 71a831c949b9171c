"""The common header read straight from its bytes, without building a pydicom Dataset.

:func:`fast_parse` gives what ``extract(read_header(data, ts))`` gives (the same
:class:`~storage.parsed.Parsed`, byte for byte) for the data sets most modalities send:
little endian, elements of simple VRs and sequences of them (defined or undefined
lengths, nested), a single-byte or UTF-8 character set. Whatever it is not sure of it
declines (:class:`Declined`), and
:func:`storage.parsing.parse_header` then takes pydicom's path, which raises the right
:class:`~storage.errors.InvalidInstance` on bad input.

Every value is decoded as pydicom 3.0 decodes it (``pydicom.values`` converters, the
``DSfloat``/``IS``/``PersonName`` classes) and rendered as its ``DataElement.to_json_dict``
renders it, then cleaned as :func:`storage.parsing._element_json` cleans it; where those
rules meet an odd value (a DS or IS pydicom would warn about, an empty value in a
multi-valued PN, text that does not decode) the data set is declined rather than guessed.
tests/storage/test_fastparse.py holds the two paths equal on pydicom's test files and on
generated data sets.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from .keys import LEVEL_OF, Level
from .parsed import BULK_THRESHOLD, REQUIRED_UIDS, Parsed, dump_levels, parsed_from
from .structure import (
    ITEM,
    ITEM_END,
    PIXEL_TAGS,
    SEQUENCE_END,
    UNDEFINED,
    Buffer,
    check_structure,
)
from .values import is_uid, strip


class Declined(Exception):
    """The fast path is not certain to read this data set as pydicom does; the reason."""


# -- the text VRs ----------------------------------------------------------------------------

# PS3.5 6.1.2.3, C.12.1.1.2 (Specific Character Set): the values read here, without code
# extensions; pydicom's convert_encodings names their Python codecs
_CHARSETS = {term: convert_encodings(term)[0]
             for term in ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192")}
_DEFAULT = convert_encodings(None)[0]  # no (0008,0005): pydicom's default repertoire

Element = tuple[dict[str, Any], str | None]
"""One attribute's DICOM JSON (PS3.18 F.2.2) and the text of its first value (as ``str()``
of pydicom's value gives it, for an index column), or ``None`` when it has no such text."""


def _strings(vr: str, items: list[str]) -> Element:
    """A string VR's values: one empty value is no value; several are all kept (PS3.5 6.4,
    PS3.18 F.2.4)."""
    if len(items) == 1:
        return ({"vr": vr, "Value": items} if items[0] else {"vr": vr}), items[0]
    return {"vr": vr, "Value": items}, items[0]


def _multi_string(vr: str, raw: bytes, codec: str) -> Element:
    """AS, CS, DA, DT, TM (pydicom's ``convert_string``): the default repertoire (PS3.5
    6.1.2.2); trailing spaces and NULs of the whole value removed, then split at ``\\``
    (PS3.5 6.2, 6.4)."""
    return _strings(vr, raw.decode(_DEFAULT).rstrip(" \0").split("\\"))


def _ae(vr: str, raw: bytes, codec: str) -> Element:
    """AE: each value stripped of leading and trailing spaces (PS3.5 Table 6.2-1)."""
    return _strings(vr, [value.strip() for value in raw.decode(_DEFAULT).split("\\")])


def _ui(vr: str, raw: bytes, codec: str) -> Element:
    """UI: trailing NUL padding removed (PS3.5 9.1), each value stripped as pydicom's UID
    strips it."""
    return _strings(vr, [value.strip() for value in raw.decode(_DEFAULT).rstrip("\0 ")
                         .split("\\")])


def _text(vr: str, raw: bytes, codec: str) -> Element:
    """SH, LO, UC in the Specific Character Set (PS3.5 6.1.2.3): each value's trailing
    spaces removed (PS3.5 Table 6.2-1), leading ones significant."""
    return _strings(vr, [value.rstrip("\0 ") for value in _decode(raw, codec).split("\\")])


def _long_text(vr: str, raw: bytes, codec: str) -> Element:
    """ST, LT, UT: one value, ``\\`` a character of it (PS3.5 6.4), trailing spaces
    insignificant (PS3.5 Table 6.2-1)."""
    return _strings(vr, [_decode(raw, codec).rstrip("\0 ")])


def _ur(vr: str, raw: bytes, codec: str) -> Element:
    """UR: one value, trailing spaces insignificant (PS3.5 Table 6.2-1)."""
    return _strings(vr, [raw.decode(_DEFAULT).rstrip()])


def _decode(raw: bytes, codec: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:  # pydicom warns and replaces: not for the fast path
        raise Declined("text does not decode in its character set") from None


def _pn(vr: str, raw: bytes, codec: str) -> Element:
    """PN: values split at ``\\``, each into at most three component groups at ``=``
    (PS3.5 6.2.1), trailing empty groups dropped; each value a JSON object of its
    Alphabetic, Ideographic and Phonetic groups (PS3.18 F.2.2, Table F.2.3-1)."""
    names = []
    for value in _decode(raw.rstrip(b"\0 "), codec).split("\\"):
        groups = value.split("=")
        while groups and not groups[-1]:
            groups.pop()
        names.append(groups)
    if len(names) == 1 and not names[0]:
        return {"vr": vr}, ""
    objects = []
    for groups in names:
        if not groups:  # pydicom's to_json_dict fails on it: a warning, not ours to give
            raise Declined("an empty value in a multi-valued PN")
        name = {"Alphabetic": groups[0]}
        if len(groups) > 1:
            name["Ideographic"] = groups[1]
        if len(groups) > 2:
            name["Phonetic"] = groups[2]
        objects.append(name)
    return {"vr": vr, "Value": objects}, "=".join(names[0])


# -- the numbers -----------------------------------------------------------------------------

# PS3.5 Table 6.2-1 DS: a fixed or floating point number; what Python's float() reads
# exactly as ANSI X3.9 means it (no "nan", "inf", "_"); spaces around
_DS_ITEM = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")
_DS_CHARS = re.compile(rb"[0-9+\-.eE \\\0]*")
# PS3.5 Table 6.2-1 IS: an integer, spaces around
_IS_ITEM = re.compile(r" *[+-]?[0-9]+ *")
_IS_CHARS = re.compile(rb"[0-9+\- \\\0]*")
_DS_TEXT_MAX = 16
_EXACT_IN_FLOAT = 2**53


def _ds(vr: str, raw: bytes, codec: str) -> Element:
    """DS: numbers (PS3.5 Table 6.2-1) as JSON Numbers (PS3.18 Table F.2.3-1). One beyond
    a double (``1e999``) keeps its text as a JSON String, when every value of the
    attribute is a valid DS of at most 16 bytes, else the Value is left out (PS3.18 F.2.5),
    as :func:`storage.parsing._element_json` does."""
    if not _DS_CHARS.fullmatch(raw):
        raise Declined("DS text beyond digits, signs, points and exponents")
    text = raw.decode(_DEFAULT).strip().rstrip(" \0")
    if not text:
        return {"vr": vr}, ""
    items = text.split("\\")
    if not all(_DS_ITEM.fullmatch(item) for item in items):
        raise Declined("a DS value pydicom would not read as a number")
    numbers = [float(item) for item in items]
    texts = [item.strip(" ") for item in items]
    if all(math.isfinite(number) for number in numbers):
        return {"vr": vr, "Value": numbers}, texts[0]
    if all(len(t) <= _DS_TEXT_MAX for t in texts):  # each one matches _DS_ITEM already
        return {"vr": vr, "Value": texts}, texts[0]
    return {"vr": vr}, texts[0]


def _is(vr: str, raw: bytes, codec: str) -> Element:
    """IS: integers (PS3.5 Table 6.2-1) as JSON Numbers (PS3.18 Table F.2.3-1)."""
    if not _IS_CHARS.fullmatch(raw):
        raise Declined("IS text beyond digits and signs")
    text = raw.decode(_DEFAULT).rstrip(" \0")
    items = text.split("\\")
    if len(items) == 1 and not items[0].strip(" "):
        return {"vr": vr}, ""
    if not all(_IS_ITEM.fullmatch(item) for item in items):
        raise Declined("an IS value pydicom would not read as an integer")
    numbers = [int(item) for item in items]
    if any(abs(number) >= _EXACT_IN_FLOAT for number in numbers):
        raise Declined("an IS value pydicom would read as a float")  # its ISfloat
    return {"vr": vr, "Value": numbers}, items[0].strip(" ")


def _binary_numbers(code: str, size: int) -> Callable[[str, bytes, str], Element]:
    """US SS UL SL FL FD SV UV: little endian binary numbers (PS3.5 Table 6.2-1) as JSON
    Numbers; a NaN or an infinity leaves the Value out (PS3.18 Table F.2.3-1, F.2.5)."""

    def read(vr: str, raw: bytes, codec: str) -> Element:
        count, rest = divmod(len(raw), size)
        if rest:  # pydicom raises: the slow path gives the error
            raise Declined(f"{vr} value of {len(raw)} bytes")
        if not count:
            return {"vr": vr}, None
        numbers = list(struct.unpack(f"<{count}{code}", raw))
        if code in "fd" and not all(math.isfinite(n) for n in numbers):
            return {"vr": vr}, None
        return {"vr": vr, "Value": numbers}, None

    return read


def _at(vr: str, raw: bytes, codec: str) -> Element:
    """AT: tags as 8 hexadecimal digits (PS3.18 Table F.2.3-1)."""
    count, rest = divmod(len(raw), 4)
    if rest:
        raise Declined(f"AT value of {len(raw)} bytes")
    if not count:
        return {"vr": vr}, None
    pairs = struct.unpack(f"<{2 * count}H", raw)
    return {"vr": vr, "Value": [f"{pairs[i] << 16 | pairs[i + 1]:08X}"
                                for i in range(0, 2 * count, 2)]}, None


_INLINE_MAX = (BULK_THRESHOLD // 4) * 3  # pydicom's to_json_dict: base64 grows by a third


def _bytes(vr: str, raw: bytes, codec: str) -> Element:
    """OB OD OF OL OV OW UN: InlineBinary, base64 (PS3.18 F.2.7), or a bulk value kept in
    the file (an empty BulkDataURI, F.2.6) beyond :data:`BULK_THRESHOLD`."""
    if not raw:
        return {"vr": vr}, None
    if len(raw) > _INLINE_MAX:
        return {"vr": vr, "BulkDataURI": ""}, None
    return {"vr": vr, "InlineBinary": base64.b64encode(raw).decode("ascii")}, None


_READERS: dict[str, Callable[[str, bytes, str], Element]] = {
    "AE": _ae, "AS": _multi_string, "CS": _multi_string, "DA": _multi_string,
    "DT": _multi_string, "TM": _multi_string, "UI": _ui, "UR": _ur,
    "SH": _text, "LO": _text, "UC": _text, "ST": _long_text, "LT": _long_text,
    "UT": _long_text, "PN": _pn, "DS": _ds, "IS": _is, "AT": _at,
    "US": _binary_numbers("H", 2), "SS": _binary_numbers("h", 2),
    "UL": _binary_numbers("L", 4), "SL": _binary_numbers("l", 4),
    "FL": _binary_numbers("f", 4), "FD": _binary_numbers("d", 8),
    "SV": _binary_numbers("q", 8), "UV": _binary_numbers("Q", 8),
    "OB": _bytes, "OD": _bytes, "OF": _bytes, "OL": _bytes, "OV": _bytes, "OW": _bytes,
    "UN": _bytes,
}
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "SH", "LO", "UC",
                         "ST", "LT", "UT", "PN", "DS", "IS"})
_EXPLICIT = {vr.encode(): vr for vr in (*_READERS, "SQ")}
# explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV",
                   "UV"})
# the LUT Descriptors, whose first value pydicom reads as unsigned whatever the VR
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_CHARSET_TAG = 0x00080005


@functools.lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str | None:
    """The VR of an implicit VR element by the data dictionary (PS3.5 A.1, PS3.6), as
    pydicom takes it; None when the fast path cannot tell it alone (private, unknown, or
    ambiguous like ``US or SS``)."""
    if (tag >> 16) & 1:
        return None  # private: its VR depends on its creator
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UL" if tag & 0xFFFF == 0 else None  # a group length (PS3.5 7.2)
    return vr if vr in _READERS or vr == "SQ" else None


@functools.lru_cache(maxsize=4096)
def _known(tag: int) -> bool:
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True


_COLUMN_TAGS = {keyword: int(tag_for_keyword(keyword) or 0) for keyword in (
    "PatientID", "IssuerOfPatientID", "PatientName", "ReferringPhysicianName",
    "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
    "StudyID", "StudyDescription", "Modality", "SeriesNumber", "SeriesDescription",
    "InstanceNumber")}
_UID_TAGS = {int(tag_for_keyword(keyword) or 0): keyword for keyword in REQUIRED_UIDS}

_EXPLICIT_HEAD = struct.Struct("<HH2sH").unpack_from
_IMPLICIT_HEAD = struct.Struct("<HHL").unpack_from
_U32 = struct.Struct("<L").unpack_from


def fast_parse(data: Buffer, transfer_syntax_uid: str) -> Parsed:
    """What ``extract(read_header(data, transfer_syntax_uid))`` gives, read straight from
    the bytes.

    The structure check (:func:`~storage.structure.check_structure`) runs first, as on the
    slow path, and raises as it does.

    Raises
    ------
    InvalidInstance
        The structure is not whole (PS3.5 7.1, 7.5).
    Declined
        Anything this reader is not certain to read as pydicom does: big endian or deflated
        syntaxes; undefined lengths other than a sequence's or an item's (UN, encapsulated
        values); private or unknown tags in implicit VR, at any depth; ambiguous VRs; LUT
        Descriptors; other character sets, or one inside an item, or a sequence before
        it; an item in implicit VR inside an explicit VR data set; a delimiter inside a
        defined length; elements out of order or repeated; values pydicom would warn
        about or refuse (then the slow path gives its error).
    """
    ts = UID(transfer_syntax_uid)
    try:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except ValueError:
        implicit, little = False, True  # as storage.parsing._read: explicit little endian
    if not little or ts == DeflatedExplicitVRLittleEndian:
        raise Declined(f"transfer syntax {ts}")
    if not data:
        raise Declined("empty")
    end = check_structure(data, implicit, little)
    raw = data if isinstance(data, bytes) else bytes(data[:end])
    elements = _walk(raw, end, implicit)
    if not elements:
        raise Declined("empty")
    return _parse(elements)


_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian

Node = tuple[int, str, Any]
"""One element as walked: (tag, VR, value), the value the bytes of a simple VR, or a
sequence's items, each a list of its own nodes."""


def _walk(raw: bytes, end: int, implicit: bool) -> list[Node]:
    """The top-level elements before the pixel data, sequences walked into their items."""
    if implicit and end >= 6 and 0x40 < raw[4] < 0x5B and 0x40 < raw[5] < 0x5B:
        raise Declined("an implicit VR data set that pydicom would take for explicit")
    elements, _ = _elements(raw, 0, end, implicit, False)
    return elements


def _elements(raw: bytes, pos: int, end: int, implicit: bool,
              delimited: bool) -> tuple[list[Node], int]:
    """The elements of a data set from ``pos``: (tag, VR, value), by PS3.5 7.1.2
    (explicit) or 7.1.3 (implicit), in ascending tag order (PS3.5 7.1), up to ``end``, or
    up to its Item Delimitation Item when ``delimited`` (an item of undefined length,
    PS3.5 7.5.2). Returns them and the offset after them.

    Sequences nest by recursion, as deep as the structure check allows
    (:data:`~storage.structure.MAX_DEPTH`). An item is read in its data set's syntax
    (pydicom reads an item of an explicit VR data set that starts without a VR as
    implicit VR; here the unknown VR declines it)."""
    elements: list[Node] = []
    last = -1
    while True:
        if pos + 8 > end:
            if delimited or pos != end:
                raise Declined("an item or sequence that does not end as walked")
            return elements, pos
        vr: str | None
        if implicit:
            group, elem, length = _IMPLICIT_HEAD(raw, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if delimited and tag == ITEM_END:
                    return elements, pos + 8
                raise Declined(f"delimiter ({group:04X},{elem:04X}) inside a data set")
            vr = _implicit_vr(tag)
            if vr is None:
                raise Declined(f"implicit VR element ({group:04X},{elem:04X})")
            pos += 8
        else:
            group, elem, code, length = _EXPLICIT_HEAD(raw, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if delimited and tag == ITEM_END:
                    return elements, pos + 8
                raise Declined(f"delimiter ({group:04X},{elem:04X}) inside a data set")
            vr = _EXPLICIT.get(code)
            if vr is None:  # a VR pydicom reads otherwise, or an item in implicit VR
                raise Declined(f"VR {code!r} of ({group:04X},{elem:04X})")
            if vr in _LONG:
                if pos + 12 > end:
                    raise Declined("an element header cut short")
                (length,) = _U32(raw, pos + 8)
                pos += 12
            else:
                pos += 8
            if vr == "UN" and (group & 1 or _known(tag)):
                raise Declined("UN that pydicom reads with another VR")
        if tag <= last:
            raise Declined("elements out of order or repeated")
        if tag in _LUT_DESCRIPTORS:
            raise Declined("LUT Descriptor")
        last = tag
        if vr == "SQ":
            items, pos = _items(raw, pos, length, end, implicit)
            elements.append((tag, vr, items))
            continue
        if length == UNDEFINED:
            raise Declined("undefined length other than a sequence's")
        if pos + length > end:
            raise Declined("a value beyond its data set")
        elements.append((tag, vr, raw[pos:pos + length]))
        pos += length


def _items(raw: bytes, pos: int, length: int, end: int,
           implicit: bool) -> tuple[list[list[Node]], int]:
    """A sequence's items (PS3.5 7.5): of defined length, or up to the Sequence
    Delimitation Item; each item of defined or undefined length. Returns them and the
    offset after the sequence."""
    if length == UNDEFINED:
        stop, delimited = end, True
    else:
        stop, delimited = pos + length, False
        if stop > end:
            raise Declined("a sequence beyond its data set")
        if implicit and length and raw[pos:pos + 4] != _ITEM_TAG:
            raise Declined("an implicit VR sequence whose value is not items")
    items: list[list[Node]] = []
    while True:
        if pos + 8 > stop:
            if delimited or pos != stop:
                raise Declined("a sequence that does not end as walked")
            return items, pos
        tag_group, tag_elem, item_length = _IMPLICIT_HEAD(raw, pos)  # PS3.5 7.5
        tag = tag_group << 16 | tag_elem
        pos += 8
        if tag == SEQUENCE_END and delimited:
            return items, pos
        if tag != ITEM:  # pydicom ends a defined-length sequence at a stray delimiter
            raise Declined(f"({tag_group:04X},{tag_elem:04X}) where an item must be")
        if item_length == UNDEFINED:
            item, pos = _elements(raw, pos, stop, implicit, True)
        else:
            if pos + item_length > stop:
                raise Declined("an item beyond its sequence")
            item, pos = _elements(raw, pos, pos + item_length, implicit, False)
        items.append(item)


def _parse(elements: list[Node]) -> Parsed:
    codec = _DEFAULT
    sequence_before = False
    for tag, vr, value in elements:
        if tag == _CHARSET_TAG:
            if vr != "CS":
                raise Declined("Specific Character Set of another VR")
            term = value.decode(_DEFAULT)
            if "\\" in term or "\x1b" in term:
                raise Declined("multi-valued Specific Character Set")
            found = _CHARSETS.get(term.rstrip(" \0"))
            if found is None:
                raise Declined(f"Specific Character Set {term!r}")
            if sequence_before and found != _DEFAULT:
                # pydicom reads an undefined-length one before it knows the set
                raise Declined("a sequence before the Specific Character Set")
            codec = found
        elif tag > _CHARSET_TAG:
            break
        elif vr == "SQ":
            sequence_before = True
    out: dict[Level, dict[str, Any]] = {lv: {} for lv in Level}
    texts: dict[int, str | None] = {}
    raws: dict[int, tuple[str, bytes]] = {}
    level_of = LEVEL_OF.get
    image = Level.IMAGE
    for tag, vr, value in elements:
        if vr == "SQ":
            element, text = _sequence(value, codec), None
        else:
            if vr in _STRING_VRS and b"\x1b" in value:
                raise Declined("an escape sequence (ISO 2022) in text")
            element, text = _READERS[vr](vr, value, codec)
            if tag in _UID_TAGS:
                raws[tag] = vr, value
        texts[tag] = text
        if (tag >> 16) == 0x0002 or tag in PIXEL_TAGS or (tag & 0xFFFF) == 0:
            continue
        out[level_of(tag, image)][f"{tag:08X}"] = element
    uids = []
    for tag in _UID_TAGS:
        # as storage.parsing._check_raw_uids reads it: as sent, only trailing NUL padding
        # (and spaces) insignificant (PS3.5 6.2, 9.1)
        vr, value = raws.get(tag, ("", b""))
        uid = value.decode("latin-1").rstrip("\0 ")
        if vr != "UI" or not is_uid(uid):
            raise Declined("a required UID missing, malformed, or not a UI")
        uids.append(uid)

    def column(keyword: str, vr: str) -> str:
        tag = _COLUMN_TAGS[keyword]
        if tag not in texts:
            return ""
        text = texts[tag]
        if text is None:
            raise Declined(f"{keyword} of a binary VR")
        return strip(vr, text)

    return parsed_from(uids, dump_levels(out), [], column)


def _sequence(items: list[list[Node]], codec: str) -> dict[str, Any]:
    """SQ: a JSON Array of items, each a JSON Object of its attributes as the top-level
    data set's (PS3.18 F.2.2, Table F.2.3-1), in the order sent; an empty sequence an
    empty Value (as pydicom's ``to_json_dict`` gives it), an empty item ``{}``.

    Unlike the top level, an item keeps its group lengths, File Meta and pixel data tags
    (pydicom's ``Dataset.to_json_dict`` leaves nothing out). Its text is in the data set's
    character set (PS3.5 C.12.1.1.2 applies the set to the items); an item with a set of
    its own is declined."""
    value = []
    for item in items:
        attributes: dict[str, Any] = {}
        for tag, vr, raw in item:
            if tag == _CHARSET_TAG:
                raise Declined("a Specific Character Set inside an item")
            if vr == "SQ":
                attributes[f"{tag:08X}"] = _sequence(raw, codec)
                continue
            if vr in _STRING_VRS and b"\x1b" in raw:
                raise Declined("an escape sequence (ISO 2022) in text")
            attributes[f"{tag:08X}"] = _READERS[vr](vr, raw, codec)[0]
        value.append(attributes)
    return {"vr": "SQ", "Value": value}

