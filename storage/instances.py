"""What WADO-RS needs of the archive (PS3.18 10.4), behind :class:`~storage.archive.Archive`.

* :func:`locate`: the stored instances a study, series or instance names (index rows only);
* :func:`metadata`: their DICOM JSON (PS3.18 F.2) from the index's per-level ``attrs``,
  never opening a file: each level's text is split into its attributes without decoding
  their values (``msgspec.Raw``), the levels are merged and written in tag order;
* :func:`syntax_for`: the transfer syntax an instance goes in for what a client asked
  (PS3.18 8.7.3.4), decided from the index before anything is sent;
* :func:`file_chunks`, :func:`converted_chunks`: an instance's stored bytes, or converted;
* :class:`PixelSource`: one file opened for its frames (as stored or decoded), its bulk
  data values, and a frame's pixels for rendering, reading only the values it needs.

Nothing here knows HTTP or media types: ``web`` turns these bytes into responses.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import numpy as np
import peewee as pw
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import as_pixel_options, get_decoder, pack_bits, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    JPEG2000MC,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MPEGTransferSyntaxes,
)

from .convert import as_stored
from .errors import CannotConvert, InstanceUnavailable, NotFound, QueryFailed, StorageError
from .files import FileStore
from .index import StoredInstance
from .models import Instance, Patient, Series, Study, database_proxy
from .query.answer import with_bulk_uris

CHUNK = 1 << 20
"""Bytes read from a stored file at a time while it is streamed."""

DEFER_BYTES = 64 * 1024
"""Values longer than this are skipped, not read, when a file is opened for its frames or
bulk data (the pixel data, large overlays); they are read from where they start when asked."""

ANY_SYNTAX = "*"
"""A client's ``transfer-syntax=*``: as stored (PS3.18 8.7.3.5.2)."""

DEFAULT_SYNTAX = ""
"""No transfer syntax asked for: the default of PS3.18 8.7.3.4."""

WEB_FORBIDDEN = frozenset({ImplicitVRLittleEndian, ExplicitVRBigEndian})
"""PS3.18 8.7.3: "The Implicit VR Little Endian and Explicit VR Big Endian Transfer
Syntaxes shall not be used with Web Services"."""

LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC,
                   HTJ2K, *MPEGTransferSyntaxes})
"""Syntaxes whose pixel data we take for lossy: PS3.18 8.7.3.4 lets an origin server send
those as stored where Explicit VR Little Endian is the default (JPEG 2000 and HTJ2K can be
lossless too; we do not look inside to tell)."""

PIXEL_DATA = 0x7FE00010
PIXEL_DATA_KEY = f"{PIXEL_DATA:08X}"
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_ITEM_DIGITS = 9
BULK_VRS = frozenset({"DS", "FL", "FD", "IS", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "SL",
                      "SS", "ST", "SV", "UC", "UL", "UN", "US", "UT", "UV", "OB or OW",
                      "US or SS", "US or OW", "US or SS or OW"})
"""The VRs whose value PS3.18 F.2.2 lets a BulkDataURI stand for (and pydicom's ambiguous
ones among them): other elements are not bulk data resources."""
ROWS, BITS_ALLOCATED = "00280010", "00280100"
AVAILABLE_TRANSFER_SYNTAX_UID = "00083002"
EXTENDED_OFFSET_TABLE = 0x7FE00001
EXTENDED_OFFSET_TABLE_LENGTHS = 0x7FE00002
_EMPTY_BULK_URI = '"BulkDataURI":""'
_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_SORTED = msgspec.json.Encoder(order="sorted")


@dataclass(frozen=True)
class WebInstance:
    """One stored instance as WADO-RS names it (no file is opened to list them)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_key: str
    file_size: int

    @property
    def stored(self) -> StoredInstance:
        """What :meth:`Archive.read_instance` takes."""
        return StoredInstance(self.sop_class_uid, self.sop_instance_uid,
                              self.transfer_syntax_uid, self.file_key, self.file_size)


def _where(study: str, series: str | None, sop: str | None) -> Any:
    condition = Study.study_instance_uid == study
    if series is not None:
        condition &= Series.series_instance_uid == series
    if sop is not None:
        condition &= Instance.sop_instance_uid == sop
    return condition


def _instances(*columns: Any) -> Any:
    return (Instance.select(*columns)
            .join(Series, on=(Instance.series == Series.id))
            .switch(Instance).join(Study, on=(Instance.study == Study.id)))


WEB_COLUMNS = (Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid,
               Instance.sop_class_uid, Instance.transfer_syntax_uid, Instance.file_key,
               Instance.file_size)
"""The columns of a :class:`WebInstance`, in its fields' order."""


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """An index read: a database error is a :class:`QueryFailed`."""
    try:
        yield
    except pw.DatabaseError as exc:
        raise QueryFailed(f"the index could not be read: {exc}") from exc


def locate(study: str, series: str | None = None, sop: str | None = None) -> list[WebInstance]:
    """The instances of a study, of one of its series, or one of that series' instances,
    in the order they were stored.

    Raises
    ------
    NotFound
        Nothing is stored there (the message says which UID is unknown).
    QueryFailed
        The index could not be read.
    """
    with _reading():
        rows = list(_instances(*WEB_COLUMNS).where(_where(study, series, sop))
                    .order_by(Instance.id).tuples())
        if not rows:
            raise _not_found(study, series, sop)
    return [WebInstance(*row) for row in rows]


def _not_found(study: str, series: str | None, sop: str | None) -> NotFound:
    """Which of the UIDs names nothing stored (PS3.18 10.4.3: 404, the Target Resource does
    not exist)."""
    if not Study.select().where(Study.study_instance_uid == study).exists():
        return NotFound(f"no study {study}")
    if series is not None and not _instances().where(_where(study, series, None)).exists():
        return NotFound(f"no series {series} in study {study}")
    return NotFound(f"no instance {sop} in series {series} of study {study}")


def representative(study: str, series: str | None = None,
                   shown: Callable[[WebInstance], bool] | None = None) -> WebInstance:
    """The image that stands for a study or a series in a thumbnail: in the series (the
    study's first by SeriesNumber that holds images), the middle one by InstanceNumber.
    With ``shown``, the first image it accepts, series by series in that order, the
    middle one first (an account that sees de-identified data: not one withheld).

    Raises
    ------
    NotFound
        Nothing is stored there, or no image (no Rows in any instance; with ``shown``,
        none it accepts).
    QueryFailed
        The index could not be read.
    """
    with _reading():
        rows = list(_instances(*WEB_COLUMNS, Series.series_number, Instance.instance_number)
                    .where(_where(study, series, None) & Instance.attrs.contains(f'"{ROWS}"'))
                    .order_by(Instance.id).tuples())
        if not rows and not _instances().where(_where(study, series, None)).exists():
            raise _not_found(study, series, None)
    if not rows:
        raise NotFound(f"no image in {'series ' + series if series else 'study ' + study}")
    order = sorted({row[1]: _number(row[7]) for row in rows}.items(), key=lambda p: p[1])
    for series_uid, _ in order:
        images = sorted((row for row in rows if row[1] == series_uid),
                        key=lambda row: _number(row[8]))
        middle = (len(images) - 1) // 2
        for row in [images[middle], *images[:middle], *images[middle + 1:]]:
            item = WebInstance(*row[:len(WEB_COLUMNS)])
            if shown is None or shown(item):
                return item
    raise NotFound(f"no image in {'series ' + series if series else 'study ' + study} can be"
                   " shown")


def _number(text: str) -> float:
    """An IS value for sorting; after every number when it is not one."""
    try:
        return float(text)
    except ValueError:
        return float("inf")


def metadata(study: str, series: str | None, sop: str | None,
             instance_url: Callable[[str, str, str], str]) -> bytes:
    """The DICOM JSON of every instance :func:`locate` names, as one array (PS3.18 F.2.1).

    Each object holds the patient's, study's, series' and instance's attributes as the
    index keeps them (everything but bulk data: storage.parsing), in tag order (PS3.18
    F.2.2), plus AvailableTransferSyntaxUID (0008,3002), the syntax ``transfer-syntax=*``
    sends, and a BulkDataURI for the pixel data of an image (the index does not hold it)
    and for each bulk value inside a sequence. ``instance_url(study, series, sop)`` is the
    URL of an instance; bulk data URIs are ``<that>/bulkdata/<path>`` (:func:`bulk_path`).

    Raises
    ------
    NotFound, QueryFailed
        As :func:`locate`.
    """
    with _reading():
        query = _instances(
            Study.study_instance_uid, Series.series_instance_uid, Instance.sop_instance_uid,
            Instance.transfer_syntax_uid, Instance.attrs, Series.id, Patient.attrs,
            Study.attrs, Series.attrs,
        ).join(Patient, on=(Study.patient == Patient.id)).where(
            _where(study, series, sop)).order_by(Instance.id)
        rows = database_proxy.execute(query).fetchall()  # plain tuples, no model objects
        objects: list[dict[str, msgspec.Raw]] = []
        above: dict[int, tuple[dict[str, msgspec.Raw], list[str]]] = {}
        for (study_uid, series_uid, sop_uid, syntax, attrs, series_id, *upper) in rows:
            if series_id not in above:  # the patient's, study's and series' attributes
                members: dict[str, msgspec.Raw] = {}
                for text in upper:
                    members.update(_members(text))
                above[series_id] = members, _with_bulk(members, any(
                    _EMPTY_BULK_URI in text for text in upper))
            shared, shared_bulk = above[series_id]
            own = _members(attrs)
            own.update(shared)
            url = instance_url(study_uid, series_uid, sop_uid)
            for tag in shared_bulk + _with_bulk(own, _EMPTY_BULK_URI in attrs):
                own[tag] = _resolved(own[tag], tag, url)
            _add_instance_extras(own, syntax, url)
            objects.append(own)
        if not objects:
            raise _not_found(study, series, sop)
    return _SORTED.encode(objects)


def _members(text: str) -> dict[str, msgspec.Raw]:
    """An index row's JSON text split into its attributes, their values left undecoded.

    A row written before the index kept non-finite numbers out may hold ``NaN``,
    ``Infinity`` or ``1e999``, which JSON has no form for (RFC 8259 6) and msgspec refuses:
    such a row is read by the standard library, which takes them, and an attribute holding
    one loses its Value (PS3.18 F.2.5: an attribute without a value), as the index now
    writes it, so that the answer stays valid JSON.

    Raises
    ------
    QueryFailed
        The text is not JSON at all.
    """
    try:
        return _MEMBERS.decode(text)
    except msgspec.DecodeError:
        pass
    try:
        members = json.loads(text, parse_constant=lambda _: _NON_FINITE,
                             parse_float=_finite_or_marked)
    except ValueError as exc:
        raise QueryFailed(f"an index row cannot be read: {exc}") from exc
    return {tag: msgspec.Raw(msgspec.json.encode(_without_non_finite(element)))
            for tag, element in members.items()}


_NON_FINITE = object()
"""What a NaN or an infinity in an index row is read as (:func:`_members`)."""


def _finite_or_marked(text: str) -> float | object:
    number = float(text)
    return number if math.isfinite(number) else _NON_FINITE


def _without_non_finite(element: Any) -> Any:
    """A DICOM JSON attribute (and those of its items) without the Value arrays that hold
    a :data:`_NON_FINITE`."""
    if isinstance(element, list):
        return [_without_non_finite(item) for item in element]
    if not isinstance(element, dict):
        return element
    if any(value is _NON_FINITE for value in element.get("Value") or ()):
        return {key: value for key, value in element.items() if key != "Value"}
    return {key: _without_non_finite(value) for key, value in element.items()}


def _with_bulk(members: dict[str, msgspec.Raw], any_bulk: bool) -> list[str]:
    """The attributes (sequences) holding a bulk value whose BulkDataURI is still empty."""
    if not any_bulk:
        return []
    return [tag for tag, raw in members.items() if _EMPTY_BULK_URI.encode() in bytes(raw)]


def _resolved(raw: msgspec.Raw, tag: str, url: str) -> msgspec.Raw:
    """``raw`` (the DICOM JSON of attribute ``tag``) with each empty BulkDataURI inside it
    made the URL of that value (:func:`bulk_path`), by QIDO-RS's own walk
    (:func:`storage.query.answer.with_bulk_uris`)."""
    value = with_bulk_uris(json.loads(bytes(raw)), [tag], url)
    return msgspec.Raw(json.dumps(value, separators=(",", ":")).encode())


def _add_instance_extras(members: dict[str, msgspec.Raw], syntax: str, url: str) -> None:
    """AvailableTransferSyntaxUID, and the pixel data's BulkDataURI for an image."""
    available, encapsulated = _syntax_facts(syntax)
    members[AVAILABLE_TRANSFER_SYNTAX_UID] = available
    if ROWS in members and PIXEL_DATA_KEY not in members:
        vr = b"OB"
        if not encapsulated and BITS_ALLOCATED in members:
            bits = msgspec.json.decode(members[BITS_ALLOCATED]).get("Value") or [8]
            vr = b"OW" if bits[0] > 8 else b"OB"
        uri = msgspec.json.encode(f"{url}/bulkdata/{PIXEL_DATA_KEY}")
        members[PIXEL_DATA_KEY] = msgspec.Raw(b'{"vr":"' + vr + b'","BulkDataURI":' + uri + b"}")


@functools.lru_cache(maxsize=64)
def _syntax_facts(syntax: str) -> tuple[msgspec.Raw, bool]:
    """The AvailableTransferSyntaxUID (0008,3002) of an instance stored as ``syntax`` (what
    ``transfer-syntax=*`` sends), and whether its pixel data is encapsulated."""
    sent = syntax_for(syntax, ANY_SYNTAX) or syntax
    available = msgspec.json.encode({"vr": "UI", "Value": [str(sent)]})
    return msgspec.Raw(available), UID(syntax).is_encapsulated


def bulk_path(text: str) -> list[int]:
    """The path of a bulk value in its instance, from a BulkDataURI's tail: a tag
    (``7FE00010``), or tags and item numbers from 0 through sequences
    (``00880200/0/7FE00010``); tags are ints, item numbers too, alternating.

    Raises
    ------
    ValueError
        ``text`` is not such a path.
    """
    parts = text.strip("/").split("/")
    if len(parts) % 2 == 0:
        raise ValueError("a bulk data path ends with a tag")
    path: list[int] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if len(part) != 8 or not all(c in "0123456789abcdefABCDEF" for c in part):
                raise ValueError(f"{part!r} is not a tag (8 hexadecimal digits)")
            path.append(int(part, 16))
        else:
            if not (part.isascii() and part.isdigit()) or len(part) > MAX_ITEM_DIGITS:
                raise ValueError(f"{part!r} is not an item number")
            path.append(int(part))
    return path


# -- transfer syntaxes ---------------------------------------------------------------------


def decodable(syntax: UID) -> bool:
    """Whether pydicom has a decoder for ``syntax`` with its plugins installed."""
    try:
        return bool(get_decoder(syntax).is_available)
    except NotImplementedError:
        return False


def syntax_for(stored: str, wanted: str) -> str | None:
    """The transfer syntax an instance stored as ``stored`` is sent in when a client asks
    for ``wanted`` (a UID, :data:`ANY_SYNTAX` or :data:`DEFAULT_SYNTAX`); ``None`` when we
    cannot produce it. Only the conversions of :func:`storage.convert.to_accepted` (the
    one C-MOVE uses) are made: native little endian re-encoded, compressed pixel data
    decoded; never a compression, never from big endian.

    * ``*``: as stored, but Implicit VR Little Endian goes as Explicit (PS3.18 8.7.3);
    * nothing asked: Explicit VR Little Endian (PS3.18 8.7.3.4), except lossy compressed
      pixel data, which goes as stored (8.7.3.4, note 2), as does pixel data no installed
      decoder reads;
    * Explicit VR Little Endian: native data re-encoded, compressed data decoded;
    * another syntax: only when it is the stored one.
    """
    uid = UID(stored)
    native = not uid.is_encapsulated and uid.is_little_endian
    if wanted == ANY_SYNTAX:
        if uid == ImplicitVRLittleEndian:
            return ExplicitVRLittleEndian
        return None if uid in WEB_FORBIDDEN else stored
    if wanted == DEFAULT_SYNTAX:
        if native:
            return ExplicitVRLittleEndian
        if uid in WEB_FORBIDDEN:
            return None
        return ExplicitVRLittleEndian if uid not in LOSSY and decodable(uid) else stored
    if wanted == stored and uid not in WEB_FORBIDDEN:
        return stored
    if wanted == ExplicitVRLittleEndian and (native or (uid.is_encapsulated and decodable(uid))):
        return ExplicitVRLittleEndian
    return None


def present(files: FileStore, items: list[WebInstance]) -> list[WebInstance]:
    """Those of ``items`` whose file is in the store (a ``stat`` each: a lost file, which
    ``minipacs verify`` reports, is known before a response starts)."""
    found = []
    for item in items:
        try:
            files.size(item.file_key)
        except (OSError, StorageError):
            continue
        found.append(item)
    return found


def file_chunks(files: FileStore, key: str) -> Iterator[bytes]:
    """The stored file ``key``, :data:`CHUNK` bytes at a time.

    Raises
    ------
    InstanceUnavailable
        The file cannot be opened or read.
    """
    try:
        with files.open(key) as fp:
            while chunk := fp.read(CHUNK):
                yield chunk
    except OSError as exc:
        raise InstanceUnavailable(f"file {key} cannot be read: {exc}") from exc


def converted_chunks(files: FileStore, item: WebInstance, folder: Path,
                     read: Callable[[], Dataset]) -> Iterator[bytes]:
    """``item`` as a Part 10 file in Explicit VR Little Endian (PS3.10 7.1; PS3.18 8.7.3.4),
    :data:`CHUNK` bytes at a time: written first to an anonymous temporary file in
    ``folder`` (the store's own disk; gone when closed, or when the process dies), then
    read back, so that the first chunk is there only once the whole conversion is made.

    Stored as Implicit VR Little Endian, the header is read with values over
    :data:`DEFER_BYTES` left in the file and the pixel data copied from the stored file a
    chunk at a time: a 1 GB instance costs no more memory than a small one. Otherwise (a
    decoding of compressed pixel data, a deflated file) ``read()`` gives the data set,
    converted as for C-MOVE, which is held in memory while it is written.

    Raises
    ------
    InstanceUnavailable
        The stored file cannot be read.
    CannotConvert
        The conversion failed (from ``read``), or pydicom cannot write the data set so.
    StorageError
        The temporary file cannot be written (the store's disk is full).
    """
    with _temporary_file(folder) as out:
        if item.transfer_syntax_uid == ImplicitVRLittleEndian:
            _write_from_implicit(files, item, out)
        else:
            _write_explicit(read(), out)
        out.seek(0)
        while chunk := out.read(CHUNK):
            yield chunk


def part10(data: bytes, sop_class_uid: str, sop_instance_uid: str,
           transfer_syntax_uid: str) -> bytes:
    """A Part 10 file (PS3.10 7.1): the preamble, ``DICM``, a File Meta group naming
    ``data`` (a data set encoded in ``transfer_syntax_uid``) and ``data``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    out.write(data)
    return out.getvalue()


@contextlib.contextmanager
def _temporary_file(folder: Path) -> Iterator[BinaryIO]:
    """An anonymous temporary file in ``folder``, closed (and so removed) at the end; an
    OSError making, writing or reading it is a :class:`StorageError` (the disk is full)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as out:
            yield out
    except OSError as exc:
        raise StorageError(f"a conversion cannot be written to {folder}: {exc}") from exc


def _write_explicit(ds: Dataset, out: BinaryIO) -> None:
    """``ds`` (with its File Meta) written to ``out`` in Explicit VR Little Endian."""
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        ds.save_as(out, enforce_file_format=True, implicit_vr=False, little_endian=True)
    except OSError as exc:
        raise StorageError(f"a conversion cannot be written: {exc}") from exc
    except Exception as exc:  # a value pydicom cannot write in explicit VR
        raise CannotConvert(f"{ds.get('SOPInstanceUID', 'an instance')} cannot be encoded in"
                            f" Explicit VR Little Endian: {_one_line(exc)}") from exc


def _write_from_implicit(files: FileStore, item: WebInstance, out: BinaryIO) -> None:
    """The Implicit VR Little Endian file of ``item`` written to ``out`` in Explicit VR
    Little Endian, its pixel data (of defined length, left in the stored file) copied a
    chunk at a time; the elements after it (trailing padding) written after it."""
    cannot = f"file of {item.sop_instance_uid} cannot be read"
    try:
        source = files.open(item.file_key)
    except OSError as exc:
        raise InstanceUnavailable(f"{cannot}: {exc!r}") from exc
    with source:
        try:
            ds = as_stored(dcmread(source, defer_size=DEFER_BYTES))
            pixel = ds.get_item(PIXEL_DATA, keep_deferred=True)
            if not (isinstance(pixel, RawDataElement) and pixel.value is None
                    and pixel.length != UNDEFINED_LENGTH):
                _write_explicit(ds, out)  # small: nothing was left in the file
                return
            tail = Dataset()
            tags = list(ds.keys())  # not ds itself, which would read every deferred value
            for tag in [tag for tag in tags if tag > PIXEL_DATA]:
                tail.add(ds[tag])
                del ds[tag]
            del ds[PIXEL_DATA]
        except StorageError:
            raise
        except Exception as exc:  # missing, unreadable or damaged
            raise InstanceUnavailable(f"{cannot}: {exc!r}") from exc
        _write_explicit(ds, out)
        try:
            # PS3.5 A.1: native pixel data read in Implicit VR is OW; 7.1.2: explicit VR
            # OW has two reserved bytes and a 32-bit length
            out.write(struct.pack("<HH2sHL", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF, b"OW", 0,
                                  pixel.length))
            source.seek(pixel.value_tell)
            left = pixel.length
            while left:
                chunk = source.read(min(left, CHUNK))
                if not chunk:
                    raise InstanceUnavailable(f"{cannot}: its pixel data is cut short")
                out.write(chunk)
                left -= len(chunk)
            if len(tail):
                fp = DicomFileLike(out)
                fp.is_little_endian, fp.is_implicit_VR = True, False
                write_dataset(fp, tail)
        except OSError as exc:
            raise StorageError(f"a conversion cannot be written: {exc}") from exc


# -- frames, bulk data, pixels --------------------------------------------------------------


class PixelSource:
    """One stored file opened for its frames, bulk data and pixels (a context manager).

    The header is read with values over :data:`DEFER_BYTES` left in the file; frames and
    large values are read from where they start, so a 2 GB multi-frame costs a frame's
    memory. A deflated file is read whole (its offsets are those of the inflated bytes).

    Raises
    ------
    InstanceUnavailable
        The file cannot be read or parsed.
    """

    def __init__(self, files: FileStore, item: WebInstance) -> None:
        self.item = item
        self.syntax = UID(item.transfer_syntax_uid)
        try:
            self._fp: BinaryIO = files.open(item.file_key)
            deflated = self.syntax == DeflatedExplicitVRLittleEndian
            self.ds = dcmread(self._fp, defer_size=None if deflated else DEFER_BYTES)
        except Exception as exc:  # missing, unreadable or damaged
            self.close()
            raise InstanceUnavailable(
                f"file of {item.sop_instance_uid} cannot be read: {exc!r}") from exc
        self._deflated = deflated

    def __enter__(self) -> PixelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fp = getattr(self, "_fp", None)
        if fp is not None:
            fp.close()

    @property
    def frame_count(self) -> int:
        """NumberOfFrames (1 when absent); 0 when there is no pixel data."""
        if PIXEL_DATA not in self.ds:
            return 0
        try:
            return max(int(self.ds.get("NumberOfFrames") or 1), 1)
        except (TypeError, ValueError):
            return 1

    def check_frames(self, numbers: list[int]) -> None:
        """Raises :class:`NotFound` unless every frame number (from 1) exists."""
        count = self.frame_count
        if count == 0:
            raise NotFound(f"instance {self.item.sop_instance_uid} has no pixel data")
        missing = [n for n in numbers if not 1 <= n <= count]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise NotFound(f"no frame {missing[0]}{more} in instance "
                           f"{self.item.sop_instance_uid}: it has {count}")

    def _pixel_value(self) -> bytes | BinaryIO:
        """The pixel data value: its bytes, or the file positioned where it starts."""
        elem = self.ds.get_item(PIXEL_DATA, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None and not self._deflated:
            self._fp.seek(elem.value_tell)
            return self._fp
        return bytes(self.ds[PIXEL_DATA].value)

    def stored_frame(self, number: int) -> bytes:
        """Frame ``number`` (from 1) as stored: one encapsulated frame (PS3.5 A.4), or a
        native frame's bytes.

        Raises
        ------
        CannotConvert
            Big endian native data (the web is little endian).
        """
        if not self.syntax.is_encapsulated:
            return self.native_frame(number)
        extended = None
        if EXTENDED_OFFSET_TABLE in self.ds and EXTENDED_OFFSET_TABLE_LENGTHS in self.ds:
            extended = (self.ds[EXTENDED_OFFSET_TABLE].value,
                        self.ds[EXTENDED_OFFSET_TABLE_LENGTHS].value)
        try:
            return get_frame(self._pixel_value(), number - 1, extended_offsets=extended,
                             number_of_frames=self.frame_count)
        except Exception as exc:  # damaged encapsulation
            raise InstanceUnavailable(
                f"frame {number} of {self.item.sop_instance_uid} cannot be read: {exc}"
            ) from exc

    def native_frame(self, number: int) -> bytes:
        """Frame ``number`` (from 1) of native pixel data, little endian, as stored
        (1-bit data packed from the frame's first pixel)."""
        if not self.syntax.is_little_endian:
            raise CannotConvert(f"stored as {self.syntax.name}: frames are not converted"
                                " from big endian")
        options = as_pixel_options(self.ds, pixel_keyword="PixelData")
        if options.get("bits_allocated") == 1:
            return pack_bits(self.pixels(number))
        try:
            buffer, _ = get_decoder(self.syntax).as_buffer(
                self._pixel_value(), index=number - 1, **options)
        except Exception as exc:
            raise InstanceUnavailable(
                f"frame {number} of {self.item.sop_instance_uid} cannot be read: {exc}"
            ) from exc
        return bytes(buffer)

    def decoded_frame(self, number: int) -> bytes:
        """Frame ``number`` (from 1) uncompressed, little endian: native frames as stored,
        compressed ones decoded by pydicom (colour as RGB, samples interleaved, as C-MOVE's
        conversion gives them).

        Raises
        ------
        CannotConvert
            No decoder for the stored syntax, or decoding failed.
        """
        if not self.syntax.is_encapsulated:
            return self.native_frame(number)
        return self.pixels(number).tobytes()

    def pixels(self, number: int, header: Dataset | None = None) -> np.ndarray:
        """Frame ``number`` (from 1) as an array (pydicom's ``pixel_array``: colour as
        RGB); ``header`` receives the Image Pixel module and the rest of group 0028
        (windows, rescale, LUTs).

        Raises
        ------
        CannotConvert
            The pixel data cannot be decoded here.
        """
        cannot = f"cannot decode frame {number} of {self.item.sop_instance_uid}"
        if self.syntax.is_encapsulated and not decodable(self.syntax):
            raise CannotConvert(f"{cannot}: no decoder available for {self.syntax.name}")
        try:
            if self._deflated:
                if header is not None:
                    for elem in self.ds.group_dataset(0x0028):
                        header.add(elem)
                return pixel_array(self.ds, index=number - 1)
            with _at(self._fp, 0):  # pixel_array reads the file from its start
                return pixel_array(self._fp, index=number - 1, ds_out=header)
        except Exception as exc:  # any decoder failure: corrupt or unsupported data
            raise CannotConvert(f"{cannot}: {_one_line(exc)}") from exc

    def bulk_value(self, path: list[int]) -> bytes:
        """The bytes of the value at ``path`` (:func:`bulk_path`; not the pixel data, whose
        frames are read one by one), little endian as stored.

        Raises
        ------
        NotFound
            Nothing is at ``path``.
        CannotConvert
            The file is big endian.
        """
        if not self.syntax.is_little_endian:
            raise CannotConvert(f"stored as {self.syntax.name}: bulk data is not converted"
                                " from big endian")
        where = "/".join(f"{p:08X}" if i % 2 == 0 else str(p) for i, p in enumerate(path))
        try:
            return self._bulk_value(path, where)
        except StorageError:
            raise
        except Exception as exc:  # a damaged element pydicom cannot read
            raise InstanceUnavailable(f"{where} of {self.item.sop_instance_uid} cannot be"
                                      f" read: {_one_line(exc)}") from exc

    def _bulk_value(self, path: list[int], where: str) -> bytes:
        ds: Dataset = self.ds
        for depth in range(0, len(path) - 1, 2):
            tag, number = path[depth], path[depth + 1]
            elem = ds.get(Tag(tag))
            if elem is None or elem.VR != "SQ" or not 0 <= number < len(elem.value):
                raise NotFound(f"no bulk data at {where} in {self.item.sop_instance_uid}")
            ds = elem.value[number]
        elem = ds.get_item(Tag(path[-1]), keep_deferred=True)
        if elem is None or _vr_of(elem) not in BULK_VRS:
            raise NotFound(f"no bulk data at {where} in {self.item.sop_instance_uid}")
        if (isinstance(elem, RawDataElement) and elem.value is None and ds is self.ds
                and elem.length != UNDEFINED_LENGTH and not self._deflated):
            with _at(self._fp, elem.value_tell):  # a value left in the file
                return self._fp.read(elem.length)
        value = elem.value if isinstance(elem, RawDataElement) else None
        if value is None:  # converted already, or of undefined length: pydicom reads it
            value = ds[Tag(path[-1])].value
        if not isinstance(value, bytes | bytearray):
            raise NotFound(f"{where} in {self.item.sop_instance_uid} is not a bulk value")
        return bytes(value)


def _vr_of(elem: Any) -> str:
    """An element's VR: as read (explicit VR), else the dictionary's (UN if unknown)."""
    if elem.VR:
        return str(elem.VR)
    try:
        return str(dictionary_VR(elem.tag))
    except KeyError:
        return "UN"


@contextlib.contextmanager
def _at(fp: BinaryIO, offset: int) -> Iterator[None]:
    """``fp`` at ``offset`` for the block, then back where it was."""
    position = fp.tell()
    fp.seek(offset)
    try:
        yield
    finally:
        fp.seek(position)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or repr(exc)


# -- retrieve: a stored data set as it is in its file -------------------------------------

SEND_WHOLE_UP_TO = 64 * 1024 * 1024
"""Data sets up to this size are read in one piece before the first byte is sent; larger
ones a :data:`SEND_CHUNK` at a time."""
SEND_CHUNK = 4 * 1024 * 1024
_META_START = 128 + 4  # PS3.10 7.1: preamble, "DICM"
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"  # (0002,0000) UL, length 4, explicit VR LE


class NotAsWritten(InstanceUnavailable):
    """The file does not start the way the store writes files (a File Meta group led by
    its group length): it can still be read by pydicom (:meth:`Archive.read_instance`)."""


def stored_data_set(files: FileStore, item: StoredInstance) -> Iterator[bytes]:
    """The data set of ``item``'s file, byte for byte, File Meta group left out: what a
    C-STORE sub-operation sends when the receiver accepted the stored transfer syntax
    (Deflated included: the network carries the same deflated stream, PS3.5 A.5).

    The first piece is read when the iterator is first advanced, before it yields, so that
    a missing or damaged file fails before anything is sent.

    Raises
    ------
    NotAsWritten
        No File Meta group length where the store writes one.
    InstanceUnavailable
        The file cannot be opened or read, or is shorter than the index says.
    """
    try:
        with files.open(item.file_key) as fp:
            head = fp.read(_META_START + 12)
            if head[128:132] != b"DICM" or head[_META_START:_META_START + 8] != _GROUP_LENGTH:
                raise NotAsWritten(f"file of {item.sop_instance_uid} has no File Meta group"
                                   " length")
            (meta_length,) = struct.unpack_from("<I", head, _META_START + 8)
            offset = _META_START + 12 + meta_length
            length = item.file_size - offset
            if length <= 0:
                raise InstanceUnavailable(f"file of {item.sop_instance_uid} is damaged: no"
                                          " data set")
            size = length if length <= SEND_WHOLE_UP_TO else SEND_CHUNK
            pieces = [meta_length] + [min(size, length - at) for at in range(0, length, size)]
            for number, wanted in enumerate(pieces):
                piece = _read_exactly(fp, wanted)
                if len(piece) != wanted:
                    raise InstanceUnavailable(
                        f"file of {item.sop_instance_uid} is shorter than indexed"
                        f" ({item.file_size} bytes)")
                if number:
                    yield piece
    except OSError as exc:
        raise InstanceUnavailable(
            f"file of {item.sop_instance_uid} cannot be read: {exc!r}") from exc


def _read_exactly(fp: BinaryIO, size: int) -> bytes:
    """``size`` bytes of ``fp``, fewer only at its end (a stream may return less per read)."""
    data = fp.read(size)
    while len(data) < size:
        more = fp.read(size - len(data))
        if not more:
            break
        data += more
    return data
