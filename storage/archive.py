"""The façade: everything a front end (DIMSE, DICOMweb, the command line) asks of storage.

``Archive.store`` follows DESIGN.md's C-STORE data flow: parse the header only, write the
sender's bytes untouched behind a proper File Meta header (temporary file, fsync, atomic
rename), index them in one transaction, and only then report success; if indexing fails
the new file is removed, and a replaced file is removed only after the commit.
``Archive.find`` runs the query model of :mod:`storage.query`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peewee as pw
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, generate_uid

from . import index, query
from .errors import (
    DuplicateRejected,
    InvalidInstance,
    QueryFailed,
    SOPClassMismatch,
    StorageError,
    StorageFull,
)
from .files import FileStore, FilesystemStore
from .index import DuplicatePolicy, InstanceRecord, WriteResult
from .keys import Level, Model, level_of
from .values import norm_da, norm_pn, norm_tm, pn_framed, strip

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["minipacs"])
IMPLEMENTATION_VERSION_NAME = "MINIPACS_01"
BULK_THRESHOLD = 1024
"""Binary values longer than this many bytes are bulk data: kept in the file, not the index."""

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


@dataclass(frozen=True)
class Origin:
    """Who sent an instance (recorded as SourceApplicationEntityTitle in the file meta)."""

    ae_title: str = ""
    address: str = ""


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to a stored instance; every outcome here is a success."""

    result: WriteResult
    sop_instance_uid: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchiveOptions:
    """The storage settings (the ``storage`` and ``query`` sections of the config).

    Attributes
    ----------
    files_path : Path
        Where the file store keeps files.
    index_url : str
        peewee database URL of the index.
    on_duplicate : DuplicatePolicy
        Policy for a different instance under a stored SOP Instance UID.
    durable : bool
        fsync files and folders and use ``synchronous=FULL`` (``storage.durability: full``).
    fold_pn : bool
        PN matching ignores case and accents.
    """

    files_path: Path
    index_url: str
    on_duplicate: DuplicatePolicy = DuplicatePolicy.REPLACE
    durable: bool = True
    fold_pn: bool = True


@dataclass
class _Parsed:
    record: InstanceRecord
    sop_class_uid: str
    sop_instance_uid: str
    warnings: list[str] = field(default_factory=list)


class Archive:
    """The archive: a file store plus its index. Thread-safe; one per process."""

    def __init__(self, options: ArchiveOptions, files: FileStore | None = None) -> None:
        self.options = options
        self.files: FileStore = files or FilesystemStore(options.files_path, options.durable)
        self.database = index.connect(options.index_url, synchronous_full=options.durable)
        self._write_lock = threading.Lock()

    # -- C-STORE -------------------------------------------------------------------------

    def store(
        self,
        data: bytes,
        transfer_syntax_uid: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        origin: Origin | None = None,
    ) -> StoreOutcome:
        """Store one encoded data set (without file meta) in ``transfer_syntax_uid``.

        Parameters
        ----------
        data : bytes
            The data set exactly as the sender encoded it.
        transfer_syntax_uid : str
            Its transfer syntax (the presentation context's).
        sop_class_uid, sop_instance_uid : str, optional
            What the request declared (AffectedSOPClassUID / AffectedSOPInstanceUID); the
            data set must agree.
        origin : Origin, optional
            The sender.

        Raises
        ------
        InvalidInstance
            The data set cannot be parsed or lacks a required UID (PS3.4 B.2.3 Cxxx).
        SOPClassMismatch
            Its SOP Class differs from the request's (PS3.4 B.2.3 A900). A differing SOP
            Instance UID is stored under the data set's own UID, with a warning.
        DuplicateRejected
            Policy ``reject`` and other content is stored under the UID (PS3.7 C 0111).
        StorageFull
            The file or the index cannot be written (PS3.4 B.2.3 A700).
        """
        origin = origin or Origin()
        header = read_header(data, transfer_syntax_uid)
        parsed = _extract(header)
        if sop_class_uid and parsed.sop_class_uid != strip("UI", sop_class_uid):
            raise SOPClassMismatch(
                f"data set SOP Class {parsed.sop_class_uid} differs from the request's "
                f"{sop_class_uid}"
            )
        if sop_instance_uid and parsed.sop_instance_uid != strip("UI", sop_instance_uid):
            # The data set's own UID is authoritative (it is what every query and retrieve
            # will name); the mismatch is worth a line in the log, not a lost image.
            parsed.warnings.append(
                f"request named SOP Instance {strip('UI', sop_instance_uid)}; "
                "stored under the data set's own UID"
            )
        content_hash = hashlib.sha256(transfer_syntax_uid.encode() + b"\0" + data).hexdigest()
        uid = parsed.sop_instance_uid

        # A cheap look before writing anything: resends and refused duplicates cost no I/O.
        existing = index.lookup(uid)
        if existing is not None:
            early = self._early_duplicate(existing[0], content_hash, uid)
            if early is not None:
                return early

        meta = _file_meta(parsed, transfer_syntax_uid, origin)
        key = self.files.put((meta, data))
        record = parsed.record
        record.instance.update(
            transfer_syntax_uid=transfer_syntax_uid,
            file_key=key,
            file_size=len(meta) + len(data),
            content_hash=content_hash,
        )
        try:
            with self._write_lock:
                written = index.write_instance(record, self.options.on_duplicate)
        except StorageError:
            self.files.delete(key)
            raise
        except pw.DatabaseError as exc:
            self.files.delete(key)
            raise StorageFull(f"cannot write to the index: {exc}") from exc
        except BaseException:
            self.files.delete(key)
            raise
        if written.result in (WriteResult.IDENTICAL, WriteResult.KEPT):
            self.files.delete(key)
        if written.old_file_key:
            self.files.delete(written.old_file_key)
        warnings = tuple(parsed.warnings + written.warnings)
        for warning in warnings:
            logger.warning("%s: %s", uid, warning)
        return StoreOutcome(written.result, uid, warnings)

    def _early_duplicate(
        self, stored_hash: str, content_hash: str, uid: str
    ) -> StoreOutcome | None:
        if stored_hash == content_hash:
            return StoreOutcome(WriteResult.IDENTICAL, uid)
        policy = self.options.on_duplicate
        if policy is DuplicatePolicy.KEEP:
            return StoreOutcome(WriteResult.KEPT, uid)
        if policy is DuplicatePolicy.REJECT:
            raise DuplicateRejected(f"SOP Instance {uid} is already stored with other content")
        return None

    # -- C-FIND --------------------------------------------------------------------------

    def parse_query(self, identifier: Dataset, model: Model) -> query.Query:
        """Validate a C-FIND identifier (raises :class:`~storage.errors.InvalidQuery`)."""
        return query.parse_identifier(identifier, model, fold_pn=self.options.fold_pn)

    def find(self, parsed: query.Query) -> Iterator[Dataset]:
        """Yield one response identifier per match, reading the index page by page.

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        try:
            for row in query.select_rows(parsed):
                if query.row_matches(parsed, row):
                    yield query.build_response(parsed, row)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    # -- life cycle ----------------------------------------------------------------------

    def release(self) -> None:
        """Give back this thread's index connection (at the end of an association)."""
        index.close()

    def close(self) -> None:
        """Close the index."""
        self.database.close()


def open_archive(options: ArchiveOptions) -> Archive:
    """Open (creating if needed) the archive described by ``options``."""
    return Archive(options)


# ---------------------------------------------------------------------------------------
# Header parsing


def read_header(data: bytes, transfer_syntax_uid: str) -> Dataset:
    """Parse a data set up to its pixel data.

    Raises
    ------
    InvalidInstance
        When the bytes are not a data set in that transfer syntax.
    """
    ts = UID(transfer_syntax_uid)
    try:
        implicit = ts.is_implicit_VR
        little = ts.is_little_endian
    except ValueError:
        implicit, little = False, True  # an unknown (private) syntax: explicit little endian
    try:
        if ts == DeflatedExplicitVRLittleEndian:
            data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
        ds = read_dataset(
            io.BytesIO(data), implicit, little, stop_when=lambda tag, vr, length: tag in _PIXEL_TAGS
        )
        # Decoding happens lazily: touch the elements now so a broken one fails here.
        for elem in ds:
            _ = elem.value
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise InvalidInstance(f"data set cannot be parsed: {exc}") from exc
    if len(ds) == 0:
        raise InvalidInstance("data set is empty")
    return ds


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    text = strip("UI", str(value)) if value else ""
    if not text:
        raise InvalidInstance(f"{keyword} is missing")
    if len(text) > 64 or not _UID_RE.match(text):
        raise InvalidInstance(f"{keyword} is not a valid UID: {text[:80]!r}")
    return text


def _text(ds: Dataset, keyword: str, vr: str = "LO") -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return strip(vr, str(value))


def _extract(ds: Dataset) -> _Parsed:
    """Column values and per-level DICOM JSON of one header."""
    sop_class_uid = _uid(ds, "SOPClassUID")
    sop_instance_uid = _uid(ds, "SOPInstanceUID")
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    attrs, warnings = _level_json(ds)
    patient_name = _text(ds, "PatientName", "PN")
    referring = _text(ds, "ReferringPhysicianName", "PN")
    record = InstanceRecord(
        patient={
            "patient_id": _text(ds, "PatientID"),
            "issuer_of_patient_id": _text(ds, "IssuerOfPatientID"),
            "patient_name": norm_pn(patient_name),
            "patient_name_folded": pn_framed(patient_name, folded=True),
            "patient_birth_date": norm_da(_text(ds, "PatientBirthDate", "DA")),
            "patient_sex": _text(ds, "PatientSex", "CS"),
            "attrs": attrs[Level.PATIENT],
        },
        study={
            "study_instance_uid": study_uid,
            "study_date": norm_da(_text(ds, "StudyDate", "DA")),
            "study_time": norm_tm(_text(ds, "StudyTime", "TM")),
            "accession_number": _text(ds, "AccessionNumber", "SH"),
            "study_id": _text(ds, "StudyID", "SH"),
            "referring_physician_name": norm_pn(referring),
            "referring_physician_name_folded": pn_framed(referring, folded=True),
            "study_description": _text(ds, "StudyDescription"),
            "attrs": attrs[Level.STUDY],
        },
        series={
            "series_instance_uid": series_uid,
            "modality": _text(ds, "Modality", "CS"),
            "series_number": _text(ds, "SeriesNumber", "IS"),
            "series_description": _text(ds, "SeriesDescription"),
            "attrs": attrs[Level.SERIES],
        },
        instance={
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "instance_number": _text(ds, "InstanceNumber", "IS"),
            "attrs": attrs[Level.IMAGE],
        },
    )
    return _Parsed(record, sop_class_uid, sop_instance_uid, warnings)


def _bulk_uri(elem: DataElement) -> str:
    return ""  # bulk data stays in the file


def _level_json(ds: Dataset) -> tuple[dict[Level, str], list[str]]:
    out: dict[Level, dict[str, Any]] = {lv: {} for lv in Level}
    warnings: list[str] = []
    for elem in ds:
        tag = int(elem.tag)
        if (tag >> 16) == 0x0002 or tag in _PIXEL_TAGS or (tag & 0xFFFF) == 0:
            continue
        if elem.VR in _BINARY_VRS and elem.value is not None and len(elem.value) > BULK_THRESHOLD:
            continue
        try:
            out[level_of(tag)][f"{tag:08X}"] = elem.to_json_dict(_bulk_uri, BULK_THRESHOLD)
        except Exception as exc:  # one malformed optional element does not refuse the image
            warnings.append(f"{elem.keyword or elem.tag} not indexed: {exc}")
    return {lv: json.dumps(v, separators=(",", ":")) for lv, v in out.items()}, warnings


def _file_meta(parsed: _Parsed, transfer_syntax_uid: str, origin: Origin) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for the stored file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(parsed.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(parsed.sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    if origin.ae_title:
        meta.SourceApplicationEntityTitle = origin.ae_title.strip()[:16]
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()
