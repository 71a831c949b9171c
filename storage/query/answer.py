"""Responses: the requested keys of one match as a pydicom Dataset, as encoded DIMSE bytes,
and the character set that can carry them (PS3.4 C.4.1.1.3.2; PS3.5 6.1)."""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes, encode_string, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from ..keys import Level
from ..values import PN_GROUPS
from .match import _item_matches
from .model import (
    AUTO,
    INSTANCE_AVAILABILITY,
    ONLINE,
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    UTF8,
    Constraint,
    Kind,
    Query,
    Requested,
    Row,
    _storage_level,
)


def build_response(
    query: Query, row: Row, charset: str = AUTO, retrieve_ae_title: str = ""
) -> Dataset:
    """The response identifier of one match (PS3.4 C.4.1.1.3.2).

    It holds exactly the requested keys (zero-length where the match has no value),
    QueryRetrieveLevel, RetrieveAETitle (0008,0054) naming ``retrieve_ae_title`` (the AE a
    C-MOVE or C-GET of the entity goes to) when given, and SpecificCharacterSet naming
    the encoding of its values: ``charset`` "auto" answers in the query's character set
    when it can, another value (``query.response_charset``) in that set when it can; else
    ISO_IR 192.
    """
    elements, specific_charset = _response_elements(query, row, charset, retrieve_ae_title)
    ds = Dataset()
    for element in elements.values():
        ds.add(element.data_element())
    ds.SpecificCharacterSet = specific_charset
    return ds


def encode_response(
    query: Query,
    row: Row,
    charset: str = AUTO,
    retrieve_ae_title: str = "",
    *,
    implicit_vr: bool = False,
) -> bytes:
    """:func:`build_response`, encoded in Implicit (or Explicit) VR Little Endian.

    The same bytes as pydicom's writer gives for :func:`build_response`'s data set (pinned
    by tests/storage/test_response_encoding.py), made faster: elements whose value is plain
    ASCII text (most of every response) are packed here; every other one (sequences,
    binary VRs, DS, text outside ASCII) is written by pydicom on its own. Streaming
    responses is bound by this (issue 6, bench/README.md "Scale").
    """
    elements, specific_charset = _response_elements(query, row, charset, retrieve_ae_title)
    charset_value = (None if not specific_charset
                     else [specific_charset] if isinstance(specific_charset, str)
                     else list(specific_charset))
    elements[SPECIFIC_CHARACTER_SET] = _Out(SPECIFIC_CHARACTER_SET, "CS", charset_value)
    out = []
    for tag in sorted(elements):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # pydicom never writes retired group lengths (PS3.5 7.2)
        out.append(elements[tag].encode(implicit_vr, specific_charset))
    return b"".join(out)


RETRIEVE_URL = 0x00081190


def json_answer(
    query: Query,
    row: Row,
    *,
    everything: Sequence[Level] = (),
    when_known: Collection[int] = (),
    retrieve_url: str = "",
) -> bytes:
    """:func:`answer_elements` as one DICOM JSON object (PS3.18 Annex F), UTF-8 encoded.

    Every value is as the index keeps it, already decoded from the stored character set:
    PN as component groups (F.2.2), IS, DS and the binary numbers as JSON numbers
    (F.2.3), small binary values as InlineBinary (F.2.7); an empty attribute has no
    ``Value`` (F.2.5). No SpecificCharacterSet: the JSON is UTF-8 (F.2). The attributes in
    ``when_known`` are left out when empty (PS3.18 Tables 10.6.3-3 to -5 "shall be present
    if known"); ``retrieve_url`` is answered as RetrieveURL (0008,1190).
    """
    # PS3.18 F.2.2: a BulkDataURI resolves; only an instance's URL has bulk data below it
    bulk = retrieve_url if query.level is Level.IMAGE else ""
    elements = answer_elements(query, row, None, everything, bulk)
    if retrieve_url:
        elements[RETRIEVE_URL] = _Out(RETRIEVE_URL, "UR", [retrieve_url])
    out: dict[str, Any] = {}
    for tag in sorted(elements):
        element = elements[tag]
        if element.value is None:
            if tag not in when_known:
                out[f"{tag:08X}"] = {"vr": element.vr}
        else:
            out[f"{tag:08X}"] = {"vr": element.vr, element.value_key: element.value}
    try:  # RFC 8259 (PS3.18 F.2) has no NaN or Infinity
        text = json.dumps(out, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # an index row written before storage.parsing kept them out
        text = json.dumps(_finite(out), ensure_ascii=False, separators=(",", ":"),
                          allow_nan=False)
    return text.encode("utf-8", "replace")


def _finite(value: Any) -> Any:
    """DICOM JSON without a NaN or an infinity: an attribute holding one is left without
    its Value (PS3.18 F.2.5), as storage.parsing now indexes it."""
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if not isinstance(value, dict):
        return value
    values = value.get("Value")
    if "vr" in value and isinstance(values, list) and any(
            isinstance(v, float) and not math.isfinite(v) for v in values):
        return {k: v for k, v in value.items() if k != "Value"}
    return {k: _finite(v) for k, v in value.items()}


@dataclass
class _Out:
    """One element of a response, as DICOM JSON, before it is encoded."""

    tag: int
    vr: str
    value: Any  # a list of values, a BulkDataURI or an InlineBinary; None: zero length
    value_key: str = "Value"

    def data_element(self) -> DataElement:
        if self.value is None:
            return DataElement(self.tag, self.vr, [] if self.vr == "SQ" else None)
        if self.vr in _NUMBER_TEXT_VRS and all(isinstance(v, str) for v in self.value):
            # a DS kept as its text (storage.parsing: "1e999"): pydicom's JSON reader
            # would make it a float and write "inf"
            return DataElement(self.tag, self.vr, list(self.value))
        return DataElement.from_json(Dataset, f"{self.tag:08X}", self.vr, self.value,
                                     self.value_key)

    def encode(self, implicit_vr: bool, specific_charset: str | list[str]) -> bytes:
        value = _ascii_value(self.vr, self.value) if self.value_key == "Value" else None
        if value is None or (not implicit_vr and len(value) > 0xFFFE
                             and self.vr not in _LONG_VRS):
            return _pydicom_element(self.data_element(), implicit_vr, specific_charset)
        group, elem = self.tag >> 16, self.tag & 0xFFFF
        if implicit_vr:
            return struct.pack("<HHL", group, elem, len(value)) + value
        vr = self.vr.encode("ascii")
        if self.vr in _LONG_VRS:
            return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)  # PS3.5 Table 7.1-1
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                        "TM", "UC", "UI", "UR", "UT"})
_SINGLE_VALUED = frozenset({"LT", "ST", "UR", "UT"})
# PS3.18 Table F.2.3-1: "Number or String"; a String keeps the original text
_NUMBER_TEXT_VRS = frozenset({"DS", "IS"})


def _ascii_value(vr: str, values: list[Any] | None) -> bytes | None:
    """The value bytes of a text element whose every value is ASCII, padded as pydicom
    pads them (PS3.5 6.2: UI with NUL, the rest with a space); ``None`` for anything else,
    which pydicom then writes."""
    if values is None:
        return b""
    if vr not in _ASCII_VRS or (vr in _SINGLE_VALUED and len(values) != 1):
        return None
    texts = []
    for value in values:
        if vr == "PN":
            if not isinstance(value, dict):
                return None
            # as pydicom's JSON reader joins the groups: up to the last one present
            last = max((i for i, g in enumerate(PN_GROUPS) if g in value), default=0)
            groups = [value.get(g, "") for g in PN_GROUPS[:last + 1]]
            if not all(isinstance(g, str) for g in groups):
                return None
            # and as its PersonName writes them: empty trailing groups dropped
            parts = "=".join(groups).split("=")
            while parts and not parts[-1]:
                parts.pop()
            if len(parts) > len(PN_GROUPS):
                return None
            value = "=".join(parts)
        elif vr == "IS":
            if type(value) is not int:
                return None
            value = str(value)
        elif not isinstance(value, str):
            return None
        elif vr == "UI":
            value = value.strip()  # as pydicom's UID does
        if "\\" in value:
            return None  # pydicom splits it into values, and treats each one apart
        texts.append(value)
    text = "\\".join(texts)
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _pydicom_element(element: DataElement, implicit_vr: bool,
                     specific_charset: str | list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit_vr
    write_data_element(fp, element, specific_charset or None)
    return fp.getvalue()


def _response_elements(
    query: Query, row: Row, charset: str, retrieve_ae_title: str
) -> tuple[dict[int, _Out], str | list[str]]:
    """The elements of a DIMSE response by tag (SpecificCharacterSet apart), and the
    SpecificCharacterSet that can encode them."""
    texts: list[str] = []
    elements = answer_elements(query, row, texts)
    elements[QUERY_RETRIEVE_LEVEL] = _Out(QUERY_RETRIEVE_LEVEL, "CS", [query.level.name])
    if retrieve_ae_title:
        elements[RETRIEVE_AE_TITLE] = _Out(RETRIEVE_AE_TITLE, "AE", [retrieve_ae_title])
    wanted = query.charset if charset == AUTO else (charset,)
    return elements, response_charset(wanted, texts)


def answer_elements(
    query: Query,
    row: Row,
    texts: list[str] | None = None,
    everything: Sequence[Level] = (),
    bulk: str | None = None,
) -> dict[int, _Out]:
    """The answer to ``query`` of one match, element by element: the step every form of an
    answer shares (a DIMSE data set or its bytes, DICOM JSON).

    Each requested key holds the match's value, zero-length where it has none (PS3.4
    C.4.1.1.3.2); a sequence key with item keys holds only the matching items (PS3.4
    C.2.2.2.6) with only those item keys. ``everything`` adds every other attribute kept
    at those levels (QIDO-RS ``includefield=all``, PS3.18 8.3.4.3). SpecificCharacterSet
    is never among them: each form declares its own. ``texts`` collects the text values,
    for the character set of a DIMSE response.

    ``bulk`` is for DICOM JSON: the URL of the match's instance, under which each bulk
    value the index left in the file gets its BulkDataURI (``{bulk}/bulkdata/{path}``,
    the resource WADO-RS serves, PS3.18 10.4.1.1.5); ``""`` when there is none (a study
    or series), and then those values are left out, as an empty BulkDataURI resolves to
    nothing (PS3.18 F.2.2). ``None`` (DIMSE): a bulk value is answered zero-length.
    """
    sequences = {c.tag: c for c in query.constraints if c.kind is Kind.SEQUENCE}
    elements: dict[int, _Out] = {}
    for req in query.requested:
        if req.tag == INSTANCE_AVAILABILITY:  # PS3.3 C.4.23.1.1
            elements[req.tag] = _Out(req.tag, "CS", [ONLINE])
            continue
        element = None
        stored_at = _storage_level(req.tag)
        if req.level <= query.level and stored_at <= query.level:
            element = row.element(req.tag, stored_at)
        if element and bulk is not None:
            element = with_bulk_uris(element, [f"{req.tag:08X}"], bulk)
            if element is None:
                continue
        if element and req.tag in sequences:
            element = _matching_items(element, sequences[req.tag], query.fold_pn)
        elements[req.tag] = _element(req, element, texts)
    for level in everything:
        for key, stored in row.attrs(level).items():
            tag = int(key, 16)
            if tag in elements or not isinstance(stored, dict):
                continue
            element = stored if bulk is None else with_bulk_uris(stored, [key], bulk)
            if element is not None:
                elements[tag] = _element(Requested(tag, stored.get("vr", ""), level),
                                         element, texts)
    elements.pop(SPECIFIC_CHARACTER_SET, None)
    return elements


def with_bulk_uris(element: dict[str, Any], path: list[str], url: str
                    ) -> dict[str, Any] | None:
    """``element`` (DICOM JSON of the index) with each bulk value's empty BulkDataURI made
    ``{url}/bulkdata/{path}``: tags and item numbers from 0, as :func:`storage.instances.
    bulk_path` reads them. Without ``url`` a bulk value is left out: None for the element,
    or the item without it. Items are numbered as stored, before any are filtered."""
    if "BulkDataURI" in element:
        return {**element, "BulkDataURI": f"{url}/bulkdata/{'/'.join(path)}"} if url else None
    values = element.get("Value")
    if element.get("vr") != "SQ" or not isinstance(values, list):
        return element
    changed = False
    items: list[Any] = []
    for number, item in enumerate(values):
        if not isinstance(item, dict):
            items.append(item)
            continue
        out: dict[str, Any] = {}
        for key, sub in item.items():
            new = (with_bulk_uris(sub, [*path, str(number), key], url)
                   if isinstance(sub, dict) else sub)
            changed = changed or new is not sub
            if new is not None:
                out[key] = new
        items.append(out)
    return {**element, "Value": items} if changed else element


def _element(
    req: Requested, element: dict[str, Any] | None, texts: list[str] | None
) -> _Out:
    if element and element.get("BulkDataURI"):  # resolved by with_bulk_uris
        return _Out(req.tag, element.get("vr", req.vr), element["BulkDataURI"], "BulkDataURI")
    if not element or ("Value" not in element and "InlineBinary" not in element):
        vr = req.vr if req.vr not in ("UN", "") else _dictionary_vr(req.tag)
        return _Out(req.tag, vr, None)
    vr = element.get("vr", req.vr)
    value: Any = element.get("Value", element.get("InlineBinary"))
    if vr == "SQ" and req.items:
        value = [_requested_only(item, req.items) for item in value if isinstance(item, dict)]
    value_key = "Value" if "Value" in element else "InlineBinary"
    if texts is not None:
        texts.extend(_all_text(value))
    return _Out(req.tag, vr, value, value_key)


def _matching_items(element: dict[str, Any], c: Constraint, fold_pn: bool) -> dict[str, Any]:
    """PS3.4 C.2.2.2.6: "a sequence of matching Items" is returned, not every stored item."""
    items = [i for i in element.get("Value", []) if isinstance(i, dict)]
    return {**element, "Value": [i for i in items if _item_matches(c.items, i, fold_pn)]}


def _requested_only(item: dict[str, Any], wanted: tuple[Requested, ...]) -> dict[str, Any]:
    """An item holding only the requested item keys, nested sequences filtered alike."""
    out: dict[str, Any] = {}
    for req in wanted:
        key = f"{req.tag:08X}"
        if key not in item:
            continue
        element = item[key]
        if req.items and element.get("vr") == "SQ":
            sub = [_requested_only(i, req.items) for i in element.get("Value", [])
                   if isinstance(i, dict)]
            element = {**element, "Value": sub}
        out[key] = element
    return out


def _dictionary_vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _all_text(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _all_text(v)
    elif isinstance(value, list):
        for v in value:
            yield from _all_text(v)


_ASCII_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# sets pydicom 3.0 cannot encode correctly (it writes IR 58 without its escape sequence)
_NOT_ECHOED = frozenset({"ISO 2022 IR 58"})


def response_charset(query_charset: Sequence[str], texts: Sequence[str]) -> str | list[str]:
    """The SpecificCharacterSet of a response (PS3.5 6.1; PS3.4 C.4.1.1.3.2).

    The query's own character set when pydicom knows it and it can encode every value of
    the response (with ISO 2022 code extensions, every character by one of the sets), else
    ISO_IR 192 (UTF-8), so that no character is lost and the declared set is always true of
    the bytes. The default repertoire (empty, ISO_IR 6) only covers ASCII.
    """
    known = bool(query_charset) and all(
        term in python_encoding and term not in _NOT_ECHOED for term in query_charset
    )
    echo: str | list[str] = (
        list(query_charset) if len(query_charset) > 1 else (query_charset or ("",))[0]
    )
    if all(t.isascii() for t in texts):
        return echo if known else UTF8
    if known and all(_pydicom_keeps(t, tuple(query_charset)) for t in texts if not t.isascii()):
        return echo
    return UTF8


@functools.lru_cache(maxsize=4096)
def _pydicom_keeps(text: str, charset: tuple[str, ...]) -> bool:
    """Whether pydicom, encoding ``text`` in ``charset`` as it will for the response, keeps
    every character and writes bytes that ``charset`` allows.

    pydicom's own encoder decides (its choices differ from Python's codecs: it tries the
    first set first, writes JIS X 0208 only through ESC $ B, JIS X 0201 single-byte only).
    Each PN component is checked on its own, as escape sequences end at delimiters. A value
    outside ASCII under a default first set (``""``, ISO_IR 6) needs an escape sequence.
    """
    encodings = convert_encodings(list(charset))
    ascii_first = charset[0] in _ASCII_TERMS
    for piece in re.split(r"[\^=]", text):
        if piece.isascii():
            continue
        try:  # on failure pydicom warns (once) and replaces: the round trip shows it
            raw = encode_string(piece, encodings)
            back = decode_bytes(raw, encodings, set())
        except (UnicodeError, LookupError, ValueError):
            return False
        if back != piece or (ascii_first and b"\x1b" not in raw):
            return False
    return True


def response_charset_problem(value: str) -> str | None:
    """Why ``value`` cannot be ``query.response_charset`` (None if it can)."""
    if value == AUTO or (value in python_encoding and value not in _NOT_ECHOED
                         and not value.startswith("ISO 2022")):
        return None
    return ("must be auto or a single-byte or stand-alone character set pydicom knows "
            "(ISO_IR 100, ISO_IR 192, GB18030, ...)")

