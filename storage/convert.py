"""Transfer syntax conversion for retrieves: send as stored when the receiver accepted the
stored syntax, else decode to an uncompressed one it accepted.

PS3.4 C.4.2.3.1 / C.4.3.3.1 leave the choice of encoding to the SCP within what the C-STORE
association accepted. We keep the stored bytes whenever we may; compressed pixel data is
decoded with pydicom's own decoders (the ``codecs`` extra installs pylibjpeg, its
OpenJPEG and RLE plugins, and GDCM) into Explicit VR Little Endian, which the network
layer re-encodes losslessly into any other uncompressed little endian syntax the receiver
took (Implicit VR, deflated). Nothing is ever re-compressed.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Collection, Iterator
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels import get_decoder
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from .errors import CannotConvert


class AsStored(FileDataset):
    """A data set read from the file store that keeps every element as read.

    pydicom converts an element when it is first read (``ds.SOPClassUID``) and keeps the
    converted form, which is written back in pydicom's own way: a known tag stored with VR
    UN gets its dictionary VR, a UID padded with a space gets a NUL. pynetdicom reads the
    SOP Class and Instance UIDs of every data set it sends, so the receiver would not get
    the bytes we stored. Here a read converts a copy and leaves the element as read, so
    pydicom's writer (used by pynetdicom) writes the stored bytes again.
    """

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return super().__getitem__(key)
        tag = key if isinstance(key, BaseTag) else Tag(key)
        elem = self._dict.get(tag)
        if isinstance(elem, RawDataElement) and (elem.value is not None or elem.length == 0):
            charset = self.original_character_set or self._character_set
            converted: DataElement = convert_raw_data_element(elem, encoding=charset, ds=self)
            if converted.VR not in ("SQ", "US or SS", "OB or OW", "US or OW", "US or SS or OW"):
                return converted
        return super().__getitem__(key)

    def get_item(self, key: Any, *, keep_deferred: bool = False) -> Any:
        """What pydicom's writer writes: a zero-length element as read (pydicom would
        convert it first, giving a UN element its dictionary VR)."""
        if not isinstance(key, slice):
            elem = self._dict.get(Tag(key))
            if isinstance(elem, RawDataElement) and elem.length == 0 and elem.value is None:
                return elem._replace(value=b"")
        return super().get_item(key, keep_deferred=keep_deferred)


def as_stored(ds: FileDataset) -> FileDataset:
    """``ds``, from :func:`pydicom.dcmread`, made an :class:`AsStored`."""
    ds.__class__ = AsStored
    return ds


def _plain_little_endian(uid: UID) -> bool:
    """Native (not encapsulated) little endian: Implicit, Explicit, Deflated Explicit."""
    return uid.is_little_endian and not uid.is_encapsulated


def to_accepted(ds: Dataset, accepted: Collection[str]) -> Dataset:
    """``ds`` ready to be sent to a receiver that accepted ``accepted`` for its SOP Class.

    Returns ``ds`` itself when its stored syntax was accepted, or when both it and one of
    ``accepted`` are native little endian (the network layer converts among those without
    touching a value); otherwise ``ds`` with its pixel data decoded into Explicit VR Little
    Endian.

    Raises
    ------
    CannotConvert
        No accepted syntax can be produced: nothing was accepted, the receiver wants only
        other compressed syntaxes, the stored syntax is big endian, or decoding failed (no
        codec installed, corrupt pixel data).
    """
    stored = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    syntaxes = [UID(s) for s in accepted]
    if stored in syntaxes:
        return ds
    names = ", ".join(s.name for s in syntaxes) or "nothing"
    plain = [s for s in syntaxes if _plain_little_endian(s)]
    if not plain:
        raise CannotConvert(
            f"stored as {stored.name}; the receiver accepted {names}, and we do not"
            " compress into another syntax"
        )
    if _plain_little_endian(stored):
        return ds
    if not stored.is_little_endian:
        raise CannotConvert(f"stored as {stored.name}; converting to {names} is not supported")
    if isinstance(ds, AsStored):
        # decoded anyway: let pydicom keep what it converts
        ds.__class__ = FileDataset  # type: ignore[assignment]
    _decode(ds, stored, " or ".join(s.name for s in plain))
    return ds


def _decode(ds: Dataset, stored: UID, target: str) -> None:
    """Decode the pixel data of ``ds``, stored as ``stored``, into Explicit VR Little Endian
    (in place), for a receiver that accepted ``target``.

    pydicom 3.0's ``decompress`` turns each decoded frame into a NumPy view of the bytes
    the decoding plugin returned and applies its sign correction (a JPEG 2000 codestream
    whose signedness disagrees with Pixel Representation, or JPEG-LS signed data) in place.
    GDCM's plugin, tried first, returns immutable bytes, so that correction fails with
    "output array is read-only" (pydicom/pixels/decoders/base.py, ``Decoder.iter_array``)
    although the frame was decoded. Decoding frame by frame (``indices``) goes through
    ``Decoder._as_array_encapsulated``, which copies each frame into an array of its own
    first: that is the second attempt, after a ValueError (the read-only array, or another
    value pydicom did not expect).

    Raises
    ------
    CannotConvert
        No decoder exists or is installed for ``stored``, or decoding failed: the message
        says which, and the decoder's reason.
    """
    cannot = f"cannot convert from {stored.name} to {target}"
    try:
        decoder = get_decoder(stored)
    except NotImplementedError as exc:
        raise CannotConvert(f"{cannot}: pydicom has no decoder for {stored.name}") from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise CannotConvert(
            f"{cannot}: no decoder available for {stored.name} (the codecs extra installs"
            f" them; missing: {missing})"
        )
    try:
        with _quiet_plugin_failures():
            try:
                ds.decompress(generate_instance_uid=False)
            except ValueError:
                frames = int(ds.get("NumberOfFrames") or 1)
                ds.decompress(generate_instance_uid=False, indices=range(frames))
    except Exception as exc:  # any decoder failure: corrupt or unsupported data
        raise CannotConvert(f"{cannot}: the decoder failed: {_one_line(exc)}") from exc


_decoding = threading.local()


@contextlib.contextmanager
def _quiet_plugin_failures() -> Iterator[None]:
    """While this thread decodes: see :class:`_PluginFailures`."""
    _decoding.active = True
    try:
        yield
    finally:
        _decoding.active = False


class _PluginFailures(logging.Filter):
    """Demotes to DEBUG pydicom's traceback of each decoding plugin that fails while we
    decode (:func:`_quiet_plugin_failures`).

    pydicom 3.0 logs every failing plugin's exception at ERROR, traceback included, before
    it tries the next one (``DecodeRunner._decode_frame``, pixels/decoders/base.py), even
    when the next one succeeds; when all fail, the error it raises lists every plugin's
    reason, and :class:`CannotConvert` carries it: one log line per failed sub-operation,
    the retrieve's. Those tracebacks are kept for whoever wants them: at DEBUG, and only
    when their logger is enabled for DEBUG (pydicom sets its ``pydicom`` logger to WARNING
    when imported). pydicom's other lines, and its tracebacks when it decodes for someone
    else, pass unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None or not getattr(_decoding, "active", False):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_PLUGIN_FAILURES = _PluginFailures()
DECODERS_LOGGER = "pydicom.pixels.decoders.base"
"""pydicom 3.0's logger of the decoding plugins' failures."""


def install_log_filters() -> None:
    """Install :class:`_PluginFailures` on pydicom's decoders logger (once; a program that
    converts, such as the DICOM server when it starts, calls this). Without it, each plugin
    that fails to decode an instance we convert logs its traceback at ERROR."""
    logging.getLogger(DECODERS_LOGGER).addFilter(_PLUGIN_FAILURES)  # addFilter: once


def _one_line(exc: Exception) -> str:
    """``exc``'s message on one line (pydicom lists each plugin's failure on a line)."""
    text = ""
    for line in filter(None, (line.strip() for line in str(exc).splitlines())):
        text += line if not text else (" " if text.endswith(":") else "; ") + line
    return text or repr(exc)


# -- Explicit VR Little Endian -> Implicit VR Little Endian, on the bytes ----------------

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
"""PS3.5 7.1.2: explicit VRs with a reserved field and a 4-byte length."""
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"})
"""PS3.5 Table 6.2-1: the other VRs, with a 2-byte length."""
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD  # group FFFE
_HEADER = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def explicit_to_implicit(data: bytes | bytearray | memoryview) -> bytes:
    """A native Explicit VR Little Endian data set, as Implicit VR Little Endian: the same
    values, each element header rewritten (tag, then a 4-byte length; PS3.5 7.1.3),
    sequences and items walked as they are, defined or undefined lengths kept. Values are
    copied, never decoded: what a receiver that took only Implicit VR Little Endian gets
    of a stored instance, about 100 times faster than decoding and re-encoding it. Group
    length elements (gggg,0000), retired (PS3.5 7.2) and no longer right once headers
    shrink, are left out, as pydicom's writer leaves them out.

    Raises
    ------
    CannotConvert
        The bytes are not such a data set (a VR that is not one, a length past the end),
        or they hold what Implicit VR cannot carry (encapsulated pixel data, an undefined
        length on an element that is not a sequence): decode it instead.
    """
    out = bytearray()
    view = memoryview(data)
    end = _walk(view, 0, len(view), out, None)
    if end != len(view):  # pragma: no cover - _walk consumes to ``stop`` or raises
        raise CannotConvert("trailing bytes after the data set")
    return bytes(out)


def _walk(view: memoryview, at: int, stop: int, out: bytearray, until: int | None,
          sequence: bool = False) -> int:
    """Rewrite elements from ``at`` up to ``stop``, or up to and including the item or
    sequence delimitation ``until`` (group FFFE); returns where it stopped. In a
    ``sequence`` only items may come (PS3.5 7.5); elsewhere no item may."""
    while at < stop:
        if stop - at < 8:
            raise CannotConvert("truncated element header")
        group, element = _HEADER.unpack_from(view, at)
        if group == 0xFFFE:
            (length,) = _U32.unpack_from(view, at + 4)
            out += view[at:at + 8]  # items and delimiters have no VR (PS3.5 7.5)
            at += 8
            if element == until:
                return at
            if element != _ITEM or not sequence:
                raise CannotConvert(f"unexpected (FFFE,{element:04X})")
            at = _contents(view, at, stop, out, length, _ITEM_END, sequence=False)
            continue
        if sequence:
            raise CannotConvert(f"({group:04X},{element:04X}) in a sequence, not in an item")
        vr = bytes(view[at + 4:at + 6])
        if vr in _LONG_VRS:
            if stop - at < 12:
                raise CannotConvert("truncated element header")
            (length,) = _U32.unpack_from(view, at + 8)
            header = 12
        elif vr in _SHORT_VRS:
            (length,) = _U16.unpack_from(view, at + 6)
            header = 8
        else:
            raise CannotConvert(f"({group:04X},{element:04X}) has no valid VR")
        tag = view[at:at + 4]
        at += header
        if vr == b"SQ":
            out += tag
            out += _U32.pack(length)
            at = _contents(view, at, stop, out, length, _SEQUENCE_END, sequence=True)
            continue
        if length == _UNDEFINED:
            raise CannotConvert(f"({group:04X},{element:04X}) {vr.decode()} of undefined"
                                " length (encapsulated or a sequence as UN)")
        if at + length > stop:
            raise CannotConvert(f"({group:04X},{element:04X}) runs past the data set")
        if element != 0x0000:  # group lengths (retired, PS3.5 7.2) would be wrong: left out
            out += tag
            out += _U32.pack(length)
            out += view[at:at + length]
        at += length
    if until is not None:
        raise CannotConvert("a sequence or item has no delimitation")
    return at


def _contents(view: memoryview, at: int, stop: int, out: bytearray, length: int,
              delimitation: int, sequence: bool) -> int:
    """The contents of a sequence or an item whose 4-byte length was just written to
    ``out``: up to ``delimitation`` when undefined, else ``length`` bytes, the length then
    rewritten (the headers inside shrink: PS3.5 7.5.1)."""
    if length == _UNDEFINED:
        return _walk(view, at, stop, out, delimitation, sequence)
    if at + length > stop:
        raise CannotConvert("a sequence or item runs past its container")
    start = len(out)
    _walk(view, at, at + length, out, None, sequence)
    _U32.pack_into(out, start - 4, len(out) - start)
    return at + length
