"""Table E.1-1's actions applied to an encoded data set, element by element, without
decoding it into pydicom objects: what is kept is copied as encoded (the pixel data too),
only the values an action changes are decoded and encoded again.

A C-MOVE sends stored bytes as they are; decoding every instance into a pydicom
:class:`~pydicom.dataset.Dataset`, changing it and encoding it again cost about 30 times
that (bench/README.md, "De-identified C-MOVE"). Little endian data sets, Explicit or
Implicit VR (every transfer syntax but Deflated and Explicit VR Big Endian, which
:class:`~.profile.Deidentifier` decodes first). A sequence or item that is rewritten is
written with undefined length and its delimiter (PS3.5 7.5.1), whatever it had; group
lengths (gggg,0000) are left out (retired in data sets, PS3.5 7.2).
"""

from __future__ import annotations

import datetime
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pydicom.charset import TEXT_VR_DELIMS, convert_encodings, decode_bytes, encode_string
from pydicom.datadict import dictionary_VR
from pydicom.sr.coding import Code

from ..errors import CannotConvert
from .pseudonyms import Pseudonyms
from .table import Option


class Rules(Protocol):
    """What the rewrite asks of its :class:`~.profile.Deidentifier`."""

    options: frozenset[Option]
    safe_private: frozenset[tuple[int, str, int]]
    pseudonyms: Pseudonyms
    cleans_text: bool

    def code_of(self, tag: int) -> str | None: ...

    def method(self) -> str: ...

    def codes(self) -> list[Code]: ...


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_VRS = {vr.encode("ascii"): vr for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FL", "FD", "IS", "LO", "LT", "OB", "OD", "OF",
    "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN",
    "UR", "US", "UT", "UV")}
"""The VRs of PS3.5 Table 6.2-1."""
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_LENGTH = struct.Struct("<I")
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_ITEM_END_BYTES = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END_BYTES = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_ITEM_START = struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED)
_ITEM_TAG = _ITEM_START[:4]

TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8,
                 "AT": 4}
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D",
          "IS": "0", "DS": "0"}
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
ISSUER_OF_PATIENT_ID, STUDY_UID = 0x00100021, 0x0020000D
CHARSET, SOP_CLASS, MODALITY, BURNED_IN = 0x00080005, 0x00080016, 0x00080060, 0x00280301
_TOP_VALUES = (PATIENT_ID, ISSUER_OF_PATIENT_ID, STUDY_UID, CHARSET, SOP_CLASS, MODALITY,
               BURNED_IN)
MARKERS = (0x00120062, 0x00120063, 0x00120064, 0x00280303)
"""Patient Identity Removed, De-identification Method (and its Code Sequence),
Longitudinal Temporal Information Modified: written by :func:`rewrite`, never copied."""


class Header(NamedTuple):
    """One element's header: where it starts, its tag, VR, value length and value start."""

    start: int
    tag: int
    vr: str
    length: int
    value: int


@dataclass
class Rewritten:
    """The de-identified data set, in pieces (:class:`Out`: runs of the original kept as
    views of it, not copied), and what was learnt on the way."""

    chunks: list[bytes | memoryview]
    uids: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> bytes:
        """The data set in one piece (a copy)."""
        return b"".join(self.chunks)


LONG_RUN = 64 * 1024
"""A run of kept elements at least this long (the pixel data, mostly) goes out as a view of
the original rather than a copy: copying a CT's 512 kB twice cost more than de-identifying
its header (bench/README.md, "Issue 18")."""


class Out(bytearray):
    """What :func:`rewrite` writes: bytes, and between them long runs of the original
    (:meth:`keep`) left where they are."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces: list[bytes | memoryview] = []

    def keep(self, run: memoryview) -> None:
        """Append ``run``, a part of the original kept as it is: copied when short (or the
        original is writable), referenced when :data:`LONG_RUN` or more."""
        if run.nbytes < LONG_RUN or not run.readonly:  # a writable original may change
            self.extend(run)
            return
        if self:
            self.pieces.append(bytes(self))
            self.clear()
        self.pieces.append(run)

    def finish(self) -> list[bytes | memoryview]:
        """The pieces, in order."""
        if self or not self.pieces:
            self.pieces.append(bytes(self))
            self.clear()
        return self.pieces


class _Reader:
    """The element headers of a little endian data set."""

    def __init__(self, buf: memoryview, implicit: bool) -> None:
        self.buf = buf
        self.implicit = implicit

    def header(self, at: int) -> Header:
        buf = self.buf
        if at + 8 > len(buf):
            raise CannotConvert(f"cannot de-identify: the data set ends inside an element "
                                f"header at byte {at}")
        if self.implicit:
            group, element, length = _IMPLICIT.unpack_from(buf, at)
            tag = group << 16 | element
            vr = "" if group == 0xFFFE else _implicit_vr(tag, length)
            return Header(at, tag, vr, length, at + 8)
        group, element, vr_bytes, length = _EXPLICIT.unpack_from(buf, at)
        tag = group << 16 | element
        if group == 0xFFFE:
            (length,) = _LENGTH.unpack_from(buf, at + 4)
            return Header(at, tag, "", length, at + 8)
        known = _VRS.get(vr_bytes)
        if known is None:
            raise CannotConvert(f"cannot de-identify: no VR at byte {at + 4} ({tag:08X})")
        if vr_bytes in _LONG_VRS:
            if at + 12 > len(buf):
                raise CannotConvert(f"cannot de-identify: the data set ends inside the header"
                                    f" of {tag:08X}")
            (length,) = _LENGTH.unpack_from(buf, at + 8)
            return Header(at, tag, known, length, at + 12)
        return Header(at, tag, known, length, at + 8)

    def elements(self, start: int, end: int) -> Iterator[tuple[Header, int]]:
        """Each element from ``start`` to ``end`` (or an item's delimiter) and where it
        ends."""
        at = start
        while at < end:
            head = self.header(at)
            if head.tag == ITEM_END:
                return
            at = self.end(head)
            yield head, at

    def is_sequence(self, head: Header) -> bool:
        """SQ, or UN holding one (PS3.5 6.2.2: of undefined length, or a sequence in the
        dictionary; its items are in Implicit VR Little Endian, :meth:`inner`)."""
        if head.vr == "SQ":
            return True
        if head.vr != "UN" or head.tag == 0x7FE00010:
            return False
        if head.length == UNDEFINED or _implicit_vr(head.tag, head.length) == "SQ":
            return True
        if _implicit_vr(head.tag, head.length) != "UN":  # the dictionary knows it: not SQ
            return False
        if head.length < 8 or bytes(self.buf[head.value:head.value + 4]) != _ITEM_TAG:
            return False
        try:  # an unknown or private attribute: a sequence only if it reads as one
            stop, inner = head.value + head.length, self.inner(head)
            for start, end in self.items(head):
                if end > stop:
                    return False
                for _ in inner.elements(start, end):
                    pass
        except CannotConvert:
            return False
        return True

    def end(self, head: Header) -> int:
        """Where the element ends (after its delimiter when of undefined length)."""
        if head.length != UNDEFINED:
            end = head.value + head.length
            if end > len(self.buf):
                raise CannotConvert(f"cannot de-identify: {head.tag:08X} runs past the end")
            return end
        at = head.value  # items (a sequence) or fragments (encapsulated pixel data)
        inner = self.inner(head) if head.vr == "UN" else self
        while True:
            item = self.header(at)
            if item.tag == SEQUENCE_END:
                return item.value
            if item.tag != ITEM:
                raise CannotConvert(f"cannot de-identify: {item.tag:08X} where an item of "
                                    f"{head.tag:08X} should be")
            at = inner.item_end(item)

    def item_end(self, item: Header) -> int:
        if item.length != UNDEFINED:
            return item.value + item.length
        at = item.value
        while True:
            head = self.header(at)
            if head.tag == ITEM_END:
                return head.value
            at = self.end(head)

    def items(self, head: Header) -> list[tuple[int, int]]:
        """(start, end) of each item's data set; the reader to read them with is
        :meth:`inner`."""
        found = []
        inner = self.inner(head)
        at, stop = head.value, (None if head.length == UNDEFINED else head.value + head.length)
        while stop is None or at < stop:
            item = self.header(at)
            if item.tag == SEQUENCE_END:
                break
            if item.tag != ITEM:
                raise CannotConvert(f"cannot de-identify: {item.tag:08X} in {head.tag:08X}")
            end = inner.item_end(item)
            found.append((item.value, end - 8 if item.length == UNDEFINED else end))
            at = end
        return found

    def inner(self, head: Header) -> _Reader:
        """The reader of a sequence's items: its own, or for UN Implicit VR (PS3.5 6.2.2)
        unless the first item's first element has a VR (as some writers leave it, and
        pydicom reads it)."""
        if head.vr != "UN" or self.implicit:
            return _Reader(self.buf, True) if head.vr == "UN" else self
        first = head.value + 8 + 4  # the first item's header, its first element's tag
        if first + 2 <= len(self.buf) and bytes(self.buf[first:first + 2]) in _VRS:
            return self
        return _Reader(self.buf, True)


def _implicit_vr(tag: int, length: int) -> str:
    if tag & 0xFFFF == 0 or tag >> 16 & 1:
        return "UL" if tag & 0xFFFF == 0 else "UN"
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if vr == "SQ" or (length == UNDEFINED and tag != 0x7FE00010):
        return "SQ"
    return {"US or SS": "US", "OB or OW": "OW", "US or OW": "OW",
            "US or SS or OW": "OW"}.get(vr, vr)


def rewrite(deidentifier: Rules, data: bytes | memoryview, implicit: bool,
            burned_in: Callable[[dict[int, str]], str | None] | None = None) -> Rewritten:
    """``data`` (a data set without File Meta, little endian) de-identified.

    ``burned_in`` is given the top level's values first; when it returns a reason,
    :class:`~storage.errors.Withheld` is raised with it before anything is rewritten.
    """
    from ..errors import Withheld

    buf = memoryview(data)
    reader = _Reader(buf, implicit)
    work = _Work(deidentifier)
    work.scan(0, len(buf), reader, level=0)
    if burned_in is not None:
        why = burned_in(work.top)
        if why is not None:
            raise Withheld(why)
    work.begin()
    out = Out()
    work.dataset(out, 0, len(buf), reader, level=0)
    return Rewritten(out.finish(), work.uids)


class _Work:
    """One data set's pass: the patient's key and shift, the charset, the identifying
    values, the UIDs replaced."""

    def __init__(self, d: Rules) -> None:
        self.d = d
        self.options = d.options
        self.top: dict[int, str] = {}
        self.raw_text: list[tuple[bytes, bool]] = []  # (value, a PN) to take out of texts
        self.identifying: set[str] = set()
        self.scrub: re.Pattern[str] | None = None
        self.uids: dict[str, str] = {}

    def begin(self) -> None:
        """What the scan found made ready for the rewrite."""
        top = self.top
        patient_id = top.get(PATIENT_ID, "")
        self.key = (f"{top.get(ISSUER_OF_PATIENT_ID, '')}\\{patient_id}" if patient_id
                    else f"study:{top.get(STUDY_UID, '')}")
        self.shift = datetime.timedelta(days=self.d.pseudonyms.date_shift_days(self.key))
        charset = top.get(CHARSET, "")
        self.encodings = convert_encodings([c.strip() for c in charset.split("\\")]
                                           if charset else [""])
        for raw, person in self.raw_text:
            text = _decoded(raw, self.encodings, person)
            for value in text.split("\\"):
                self.identifying.add(value)
                if person:
                    self.identifying.update(re.split(r"[\^=]+", value))
        self.compile()

    # -- pass 1: the top level's values, what a cleaned text must not repeat ------------

    def scan(self, start: int, end: int, reader: _Reader, level: int) -> None:
        """Read :data:`_TOP_VALUES` at the top level; when the profile cleans text
        (:attr:`Rules.cleans_text`), every text value it removes or replaces."""
        cleans = self.d.cleans_text
        for head, _ in reader.elements(start, end):
            tag = head.tag
            if not cleans and tag > BURNED_IN:
                break
            if head.vr == "UN" and not reader.is_sequence(head):  # a known attribute as UN
                head = head._replace(vr=_implicit_vr(tag, head.length))
            if level == 0 and tag in _TOP_VALUES and head.length != UNDEFINED:
                self.top[tag] = bytes(reader.buf[head.value:head.value + head.length]).decode(
                    "latin-1").strip(" \x00")
            if not cleans:
                pass
            elif reader.is_sequence(head):
                inner = reader.inner(head)
                for item_start, item_end in reader.items(head):
                    self.scan(item_start, item_end, inner, level + 1)
            elif head.vr in TEXT_VRS and not (tag >> 16 & 1 and 0x0010 <= tag & 0xFFFF <= 0x00FF):
                code = self.d.code_of(tag)
                if code is not None and code not in ("K", "C"):
                    self.raw_text.append((bytes(reader.buf[head.value:head.value + head.length]),
                                          head.vr == "PN"))

    def compile(self) -> None:
        """The pattern of :attr:`identifying`: values of fewer than 3 characters are too
        common to take out of a text; the longest are tried first."""
        words = sorted((v for v in self.identifying if len(v.strip()) >= 3),
                       key=len, reverse=True)
        self.scrub = (re.compile("|".join(re.escape(v) for v in words), re.IGNORECASE)
                      if words else None)

    def text(self, head: Header, reader: _Reader) -> str:
        return _decoded(bytes(reader.buf[head.value:head.value + head.length]),
                        self.encodings, head.vr == "PN")

    # -- pass 2: the rewritten data set -------------------------------------------------

    def dataset(self, out: Out, start: int, end: int, reader: _Reader,
                level: int) -> None:
        creators: dict[int, str] = {}
        markers = list(MARKERS) if level == 0 else []
        buf, code_of = reader.buf, self.d.code_of
        kept = -1  # the start of a run of elements copied as they are
        at = start
        for head, stop in reader.elements(start, end):
            tag = head.tag
            at = stop
            code = code_of(tag)
            if (code is None and tag & 0xFFFF and not tag >> 16 & 1
                    and not (markers and markers[0] <= tag) and not reader.is_sequence(head)):
                if kept < 0:  # nothing to do: copied with its neighbours in one piece
                    kept = head.start
                continue
            if kept >= 0:
                out.keep(buf[kept:head.start])
                kept = -1
            while markers and markers[0] <= tag:
                self.marker(out, markers.pop(0), reader.implicit)
            if tag in MARKERS and level == 0:
                continue  # written by marker()
            self.element(out, head, stop, reader, creators, level, code)
        if kept >= 0:
            out.keep(buf[kept:at])
        for tag in markers:
            self.marker(out, tag, reader.implicit)

    def element(self, out: Out, head: Header, stop: int, reader: _Reader,
                creators: dict[int, str], level: int, code: str | None) -> None:
        """Write ``head``'s element as its action ``code`` (:meth:`Rules.code_of`) says."""
        tag = head.tag
        if tag & 0xFFFF == 0:  # a group length: left out
            return
        if tag >> 16 & 1:  # private (PS3.5 7.8.1)
            if 0x0010 <= tag & 0xFFFF <= 0x00FF and head.length != UNDEFINED:
                creators[tag] = bytes(reader.buf[head.value:head.value + head.length]).decode(
                    "latin-1").strip(" \x00")
            if self.safe_private(tag, creators):
                out.keep(reader.buf[head.start:stop])
            return
        sequence = reader.is_sequence(head)
        if head.vr == "UN" and not sequence:  # a known attribute sent as UN: its value is
            head = head._replace(vr=_implicit_vr(tag, head.length))  # as in Implicit VR
        if code is None:
            if sequence:
                self.sequence(out, head, reader, level)
            else:
                out.keep(reader.buf[head.start:stop])
            return
        if code == "X":
            return
        if code in ("K", "X/Z/U*") or (code == "C" and sequence):
            if sequence:
                self.sequence(out, head, reader, level)
            else:
                out.keep(reader.buf[head.start:stop])
        elif code in ("Z", "X/Z"):
            self.emit(out, head, reader, self.empty(head))
        elif code in ("D", "Z/D", "X/D", "X/Z/D"):
            self.emit(out, head, reader, self.dummy(head, reader))
        elif code == "U":
            self.emit(out, head, reader, self.replaced_uids(head, reader))
        elif code == "C":
            self.emit(out, head, reader, self.cleaned(head, reader))
        else:  # read_table refuses any other code
            raise AssertionError(f"unknown action {code!r}")

    def sequence(self, out: Out, head: Header, reader: _Reader, level: int) -> None:
        """A sequence kept: written with undefined length, each item de-identified."""
        inner = reader.inner(head)
        self.head(out, head.tag, head.vr or "SQ", UNDEFINED, reader.implicit)
        for item_start, item_end in reader.items(head):
            out += _ITEM_START
            self.dataset(out, item_start, item_end, inner, level + 1)
            out += _ITEM_END_BYTES
        out += _SEQUENCE_END_BYTES

    # the values of the actions: bytes, or None for an empty sequence -------------------

    def empty(self, head: Header) -> bytes:
        if head.tag in (PATIENT_ID, PATIENT_NAME):
            patient_id, name = self.d.pseudonyms.patient(self.key)
            return _ascii(patient_id if head.tag == PATIENT_ID else name, head.vr)
        return b""

    def dummy(self, head: Header, reader: _Reader) -> bytes | list[bytes]:
        """Table E.1-1a ``D``: a value of the VR, the same for the same original."""
        vr = head.vr
        if head.tag in (PATIENT_ID, PATIENT_NAME):
            return self.empty(head)
        if reader.is_sequence(head):
            return [b""]  # one empty item
        if vr == "UI":
            return self.replaced_uids(head, reader)
        if vr in _DUMMY:
            return _ascii(_DUMMY[vr], vr)
        if vr in _BINARY_SIZES:
            return bytes(_BINARY_SIZES[vr])
        if vr in _BYTES_VRS:
            return b"\x00\x00"
        original = bytes(reader.buf[head.value:head.value + head.length])
        code = self.d.pseudonyms.text(f"dummy:{head.tag:08X}", original.hex())
        return _ascii(f"ANON^{code}" if vr == "PN" else code, vr)

    def replaced_uids(self, head: Header, reader: _Reader) -> bytes:
        if head.vr != "UI":
            value = self.dummy(head, reader)
            return value if isinstance(value, bytes) else b""
        raw = bytes(reader.buf[head.value:head.value + head.length]).decode("ascii", "replace")
        new = []
        for uid in raw.rstrip("\x00 ").split("\\"):
            uid = uid.strip("\x00 ")
            if uid:
                found = self.uids.get(uid)
                if found is None:
                    found = self.uids[uid] = self.d.pseudonyms.uid(uid)
                uid = found
            new.append(uid)
        return _ascii("\\".join(new), "UI")

    def cleaned(self, head: Header, reader: _Reader) -> bytes | list[bytes]:
        """Table E.1-1a ``C``: dates moved by the patient's shift (E.3.6, Modified Dates;
        times stay), text kept without the data set's identifying values, the rest like
        ``D``."""
        vr = head.vr
        if vr in ("DA", "DT"):
            if Option.RETAIN_LONG_MODIFIED_DATES in self.options:
                text = bytes(reader.buf[head.value:head.value + head.length]).decode("latin-1")
                return _ascii("\\".join(_shift(v.strip("\x00 "), vr, self.shift)
                                        for v in text.split("\\")), vr)
            if Option.RETAIN_LONG_FULL_DATES in self.options:
                return bytes(reader.buf[head.value:head.value + head.length])
            return self.dummy(head, reader)
        if vr == "TM":
            if {Option.RETAIN_LONG_MODIFIED_DATES, Option.RETAIN_LONG_FULL_DATES} & self.options:
                return bytes(reader.buf[head.value:head.value + head.length])
            return self.dummy(head, reader)
        if vr in TEXT_VRS - {"PN"}:
            if self.scrub is None:
                return bytes(reader.buf[head.value:head.value + head.length])
            text = self.scrub.sub("***", self.text(head, reader))
            return _padded(encode_string(text, self.encodings), vr)
        if vr == "UI":
            return self.replaced_uids(head, reader)
        if vr in _BYTES_VRS and head.length != UNDEFINED:  # Overlay Data, Curve Data: their
            return bytes(head.length)  # size kept, their contents (maybe text) blanked
        return self.dummy(head, reader)

    def safe_private(self, tag: int, creators: dict[int, str]) -> bool:
        """PS3.15 E.3.10 Retain Safe Private: a private attribute whose (creator, element
        byte) the profile lists, and the creator elements of such blocks."""
        safe = self.d.safe_private
        if Option.RETAIN_SAFE_PRIVATE not in self.options or not safe:
            return False
        group, element = tag >> 16, tag & 0xFFFF
        if 0x0010 <= element <= 0x00FF:
            return any(g == group and c == creators.get(tag, "") for g, c, _ in safe)
        creator = creators.get(group << 16 | element >> 8, "")
        return (group, creator, element & 0xFF) in safe

    # -- writing ------------------------------------------------------------------------

    def emit(self, out: Out, head: Header, reader: _Reader,
             value: bytes | list[bytes]) -> None:
        if isinstance(value, list):  # a sequence of (empty) items
            self.head(out, head.tag, "SQ", UNDEFINED, reader.implicit)
            for _ in value:
                out += _ITEM_START + _ITEM_END_BYTES
            out += _SEQUENCE_END_BYTES
            return
        vr = "SQ" if reader.is_sequence(head) else head.vr
        if vr == "SQ":  # emptied
            self.head(out, head.tag, vr, 0, reader.implicit)
            return
        self.head(out, head.tag, vr, len(value), reader.implicit)
        out += value

    def head(self, out: Out, tag: int, vr: str, length: int, implicit: bool) -> None:
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            out += struct.pack("<I", length)
        elif vr.encode("ascii") in _LONG_VRS:
            out += vr.encode("ascii") + b"\x00\x00" + struct.pack("<I", length)
        else:
            out += vr.encode("ascii") + struct.pack("<H", length)

    def marker(self, out: Out, tag: int, implicit: bool) -> None:
        """PS3.15 E.1.1, 6: what says the data set was de-identified, and how."""
        options = self.options
        if tag == 0x00120062:
            self.head(out, tag, "CS", 4, implicit)
            out += b"YES "
        elif tag == 0x00120063:
            value = _ascii(self.d.method(), "LO")
            self.head(out, tag, "LO", len(value), implicit)
            out += value
        elif tag == 0x00120064:
            self.head(out, tag, "SQ", UNDEFINED, implicit)
            for code in self.d.codes():
                out += _ITEM_START
                for item_tag, vr, text in ((0x00080100, "SH", code.value),
                                           (0x00080102, "SH", code.scheme_designator),
                                           (0x00080104, "LO", code.meaning)):
                    value = _ascii(text, vr)
                    self.head(out, item_tag, vr, len(value), implicit)
                    out += value
                out += _ITEM_END_BYTES
            out += _SEQUENCE_END_BYTES
        elif tag == 0x00280303:
            text = ("MODIFIED" if Option.RETAIN_LONG_MODIFIED_DATES in options
                    else "UNMODIFIED" if Option.RETAIN_LONG_FULL_DATES in options
                    else "REMOVED")
            value = _ascii(text, "CS")
            self.head(out, tag, "CS", len(value), implicit)
            out += value


def _decoded(raw: bytes, encodings: list[str], person: bool) -> str:
    delimiters = {0x5E, 0x3D, 0x5C} if person else TEXT_VR_DELIMS
    return decode_bytes(raw, encodings, delimiters).rstrip(" \x00")


def _ascii(text: str, vr: str) -> bytes:
    return _padded(text.encode("ascii"), vr)


def _padded(value: bytes, vr: str) -> bytes:
    """PS3.5 6.2: an even length, padded with NUL for UI, a space for the others."""
    if len(value) % 2:
        value += b"\x00" if vr == "UI" else b" "
    return value


def _shift(value: str, vr: str, shift: datetime.timedelta) -> str:
    """A DA (YYYYMMDD) or the date part of a DT moved back by ``shift``; a value that is
    not a full date (a DT of a year only) is replaced by the shifted year's start."""
    if len(value) >= 8 and value[:8].isdigit():
        try:
            moved = (datetime.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
                     - shift).strftime("%Y%m%d")
        except ValueError:
            return _DUMMY[vr]
        return moved + (value[8:] if vr == "DT" else "")
    return _DUMMY[vr] if value else value
