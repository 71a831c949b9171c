"""The façade: everything a front end (DIMSE, DICOMweb, the command line) asks of storage.

``Archive.store`` follows DESIGN.md's C-STORE data flow: parse the header only, write the
sender's bytes untouched behind a proper File Meta header (temporary file, fsync, atomic
rename), index them in one transaction, and only then report success; if indexing fails
the new file is removed, and a replaced file is removed only after the commit.
``Archive.find`` runs the query model of :mod:`storage.query`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import enum
import functools
import io
import itertools
import json
import logging
import shutil
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee as pw
from playhouse.pool import PooledDatabase
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import (
    deidentified,
    exporting,
    index,
    instances,
    maintenance,
    outbox,
    query,
    removal,
    retention,
)
from .commit import GroupCommit
from .convert import as_stored, explicit_to_implicit, to_accepted
from .deidentify import Deidentifier, Deidentifiers, DeidentifyOptions, Option, burned_in
from .errors import (
    CannotConvert,
    DuplicateRejected,
    InstanceUnavailable,
    InvalidInstance,
    InvalidQuery,
    NotFound,
    QueryFailed,
    SOPClassMismatch,
    StorageError,
    StorageFull,
    StudyMismatch,
    TooManyMatches,
    TransferSyntaxNotSupported,
    WarningCode,
    Withheld,
)
from .files import TEMP_DIR, FileStore, FilesystemStore
from .index import DuplicatePolicy, StoredInstance, WriteOutcome, WriteResult
from .instances import PixelSource, WebInstance
from .keys import Model
from .models import Instance
from .moving import FallbackStore, MoveReport, move_files
from .objects import ObjectStore, S3Options, is_object_url
from .parsing import (
    Parsed,
    Spooled,
    chunks_of,
    content_hash,
    extract,
    file_meta,
    parse_header,
    read_header,
    read_identifier,
    split_part10,
)
from .selection import Selection
from .selection import instances as selected_instances
from .values import strip

logger = logging.getLogger(__name__)

KNOWN_SYNTAXES = frozenset(str(uid) for uid in AllTransferSyntaxes)
"""The transfer syntaxes a Part 10 file may be in (:meth:`Archive.store_part10`): those
pydicom knows, which C-STORE's presentation contexts offer."""

PART10_HEADER_ALLOWANCE = 64 * 1024
"""Bytes by which a Part 10 file may exceed ``max_instance_bytes`` before
:meth:`Archive.check_part_size` refuses it: its preamble and File Meta group, which the
limit (on the data set) does not count."""

@dataclass(frozen=True)
class Origin:
    """Who sent an instance (recorded as SourceApplicationEntityTitle in the file meta)."""

    ae_title: str = ""
    address: str = ""


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to a stored instance; every outcome here is a success, one of them
    with a warning (:attr:`warning_code`)."""

    result: WriteResult
    sop_instance_uid: str
    warnings: tuple[str, ...] = ()
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""

    @property
    def warning_code(self) -> WarningCode | None:
        """The warning a front end answers with (a C-STORE Warning status, a STOW-RS
        Warning Reason; PS3.4 B.2.3, PS3.18 Table I.2-1), ``None`` for a plain success:
        only a duplicate kept under ``storage.on_duplicate: keep`` has one."""
        return WarningCode.ELEMENTS_DISCARDED if self.result is WriteResult.KEPT else None


@dataclass(frozen=True)
class PendingStore:
    """A store handed to the group commit (:meth:`Archive.submit`): the instance it is,
    and the future of its outcome."""

    sop_class_uid: str
    sop_instance_uid: str
    future: Future[StoreOutcome]

    def result(self) -> StoreOutcome:
        """Wait for the outcome; raises the error that kept the instance from being
        stored."""
        return self.future.result()


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
    max_results : int
        Most matches one query returns (0 = no limit).
    response_charset : str
        "auto" (answer in the query's character set when it can) or a character set to
        answer in when it can; ISO_IR 192 otherwise.
    retrieve_ae_title : str
        The AE title every C-FIND response names as RetrieveAETitle (our own); "" = none.
    max_instance_bytes : int
        Largest data set :meth:`Archive.store` accepts (0 = no limit).
    min_free_bytes : int
        Free space the file store's disk (and the SQLite index's, when another) must keep
        after a store, counting the stores in flight of this process (0 = no check).
    shared : bool
        One of several worker processes of a server (``ae.workers``): the file store is
        shared with the others (see :class:`~storage.files.FilesystemStore`); also
        ``delete``, which runs beside a server.
    serving : bool
        The archive of a single-process server (see
        :class:`~storage.files.FilesystemStore`): ``delete`` may run beside it.
    routes : tuple of Route
        ``routes``: each stored instance that matches one is queued in the outbox for its
        peers (:mod:`storage.outbox`).
    files_url : str
        ``s3://bucket/prefix``: the files are kept in that object store
        (:class:`~storage.objects.ObjectStore`), and ``files_path`` holds only the node's
        locks and spool; "" = in ``files_path``.
    s3 : S3Options
        How to reach the object store.
    """

    files_path: Path
    index_url: str
    on_duplicate: DuplicatePolicy = DuplicatePolicy.REPLACE
    durable: bool = True
    fold_pn: bool = True
    max_results: int = 0
    response_charset: str = "auto"
    retrieve_ae_title: str = ""
    max_instance_bytes: int = 0
    min_free_bytes: int = 0
    shared: bool = False
    serving: bool = False
    routes: tuple[outbox.Route, ...] = ()
    files_url: str = ""
    s3: S3Options = S3Options()
    files_previous_url: str = ""
    """Where the files were before (a folder or ``s3://``): read from there when the store
    does not have them, until ``migrate-files`` has moved them all (:mod:`storage.moving`)."""
    deidentify: DeidentifyOptions | None = None
    """``deidentify`` and ``profiles``: the de-identification profiles instances may go out
    under (:mod:`storage.deidentify`); None = none."""


def open_files(options: ArchiveOptions) -> FileStore:
    """The file store ``options`` name: a local folder, or an object store with the node's
    local folder beside it.

    With an object store the local folder holds nothing ``verify``, ``reindex`` or
    ``import`` must have to themselves (other nodes write to the bucket anyway): they take
    its lock shared, and run beside this node's server (``reindex`` is kept from serving
    nodes by the index instead: :func:`storage.index.hold_alone`).
    """
    current: FileStore
    if not options.files_url:
        current = FilesystemStore(options.files_path, options.durable, options.shared,
                                  options.serving)
    else:
        local = FilesystemStore(options.files_path, options.durable,
                                options.shared or not options.serving, options.serving)
        current = ObjectStore(options.files_url, options.s3, local)
    if not options.files_previous_url:
        return current
    try:  # only read and deleted from: shared with whoever else uses it
        previous: FileStore
        if is_object_url(options.files_previous_url):  # the node's folder: the current one's
            local = current if isinstance(current, FilesystemStore) else current.local
            previous = ObjectStore(options.files_previous_url, options.s3, local)
        else:
            previous = FilesystemStore(Path(options.files_previous_url), shared=True)
    except BaseException:
        current.close()
        raise
    return FallbackStore(current, previous)


class Commitment(enum.Enum):
    """What :meth:`Archive.commitment` says of one instance (PS3.4 J.3.3.1.1: the SCP
    commits only what it holds; scp/status.py maps each failure to its Failure Reason)."""

    COMMITTED = "committed"
    NO_SUCH_INSTANCE = "no such instance"
    CLASS_CONFLICT = "stored under another SOP Class"
    DAMAGED = "its file is missing or does not verify"


@dataclass(frozen=True)
class Health:
    """What :meth:`Archive.health` found: by part (``index``, ``files``), what is wrong."""

    problems: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.problems


MAX_SELECTED_STUDIES = 30_000
"""Most studies a query may select for ``delete`` or ``send`` (SQLite binds at most 32,766
values in one statement)."""


class Archive:
    """The archive: a file store plus its index. Thread-safe; one per process."""

    def __init__(self, options: ArchiveOptions, files: FileStore | None = None) -> None:
        self.options = options
        self.files: FileStore = files or open_files(options)
        try:
            self.database = index.connect(options.index_url, synchronous_full=options.durable)
        except BaseException:
            self.files.close()
            raise
        try:  # a server's: reindex must not empty the index under it (any node's)
            self._serving = index.hold_serving(self.database) if options.serving else None
        except BaseException:
            self.database.close()
            index.disconnect()
            self.files.close()
            raise
        self._write_lock = threading.Lock()
        self.outbox = outbox.Outbox(self._write_lock)
        self._committer = GroupCommit(self.files, options.on_duplicate, self._write_lock,
                                      routed=self.outbox.notify)
        self._in_flight: collections.Counter[str] = collections.Counter()  # UIDs queued
        self._in_flight_lock = threading.Lock()
        self._reserve_lock = threading.Lock()
        self._reserved = 0  # bytes of the stores in flight (see _reserving)
        self.deidentifiers = Deidentifiers(options.deidentify)

    # -- C-STORE -------------------------------------------------------------------------

    def store(
        self,
        data: bytes | Spooled,
        transfer_syntax_uid: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        origin: Origin | None = None,
    ) -> StoreOutcome:
        """Store one encoded data set and wait for the outcome: :meth:`submit`, then its
        future's result, committed in this thread (see :mod:`storage.commit`). Raises what
        :meth:`submit` and its future raise."""
        pending = self._submit(data, transfer_syntax_uid, sop_class_uid, sop_instance_uid,
                               study_instance_uid, origin, wake=False)
        self._committer.commit_now(pending.future)
        return pending.result()

    def submit(
        self,
        data: bytes | Spooled,
        transfer_syntax_uid: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_instance_uid: str | None = None,
        origin: Origin | None = None,
    ) -> PendingStore:
        """Store one encoded data set (without file meta) in ``transfer_syntax_uid``.

        The header is parsed and checked, and the file written under a temporary name, in
        the caller's thread; making the file durable and indexing it is the group commit's
        (:mod:`storage.commit`), shared with the other stores in flight. The returned
        :class:`PendingStore`'s future gives the :class:`StoreOutcome` once the file is
        durable and indexed, or raises the error that kept it from being stored; ``data``
        may be reused or removed as soon as this returns.

        Parameters
        ----------
        data : bytes or Spooled
            The data set exactly as the sender encoded it, in memory or in a file (then
            it is read a chunk at a time, and only its header is parsed in memory).
        transfer_syntax_uid : str
            Its transfer syntax (the presentation context's).
        sop_class_uid, sop_instance_uid : str, optional
            What the request declared (AffectedSOPClassUID / AffectedSOPInstanceUID); the
            data set must agree.
        study_instance_uid : str, optional
            The study the request names (a STOW-RS ``/studies/{study}``); the data set must
            be of that study.
        origin : Origin, optional
            The sender.

        Raises
        ------
        InvalidInstance
            The data set cannot be parsed or lacks a required UID (PS3.4 B.2.3 Cxxx).
        SOPClassMismatch
            Its SOP Class differs from the request's (PS3.4 B.2.3 A900). A differing SOP
            Instance UID is stored under the data set's own UID, with a warning.
        StudyMismatch
            Its Study Instance UID differs from ``study_instance_uid`` (nothing is written).
        DuplicateRejected
            Policy ``reject`` and other content is stored under the UID (PS3.7 C 0111).
        StorageFull
            The file or the index cannot be written, the instance is larger than
            ``max_instance_bytes``, or storing it would leave less than ``min_free_bytes``
            on the disk (PS3.4 B.2.3 A700); in the last two cases nothing is written.

        Each is raised here or by the future's result (those found once the file is
        written: a duplicate refused by the index, a file or index that cannot be written).
        """
        return self._submit(data, transfer_syntax_uid, sop_class_uid, sop_instance_uid,
                            study_instance_uid, origin, wake=True)

    def _submit(self, data: bytes | Spooled, transfer_syntax_uid: str,
                sop_class_uid: str | None, sop_instance_uid: str | None,
                study_instance_uid: str | None, origin: Origin | None,
                wake: bool) -> PendingStore:
        """:meth:`submit`; ``wake=False``: the caller commits the store itself
        (:meth:`storage.commit.GroupCommit.commit_now`)."""
        origin = origin or Origin()
        size = data.length if isinstance(data, Spooled) else len(data)
        limit = self.options.max_instance_bytes
        if limit and size > limit:
            raise StorageFull(
                f"instance of {size / 2**20:.0f} MB exceeds storage.max_instance_mb"
                f" ({limit // 2**20} MB)"
            )
        if isinstance(data, Spooled):
            with data.view() as view:
                parsed = parse_header(view, transfer_syntax_uid)
        else:
            parsed = parse_header(data, transfer_syntax_uid)
        if sop_class_uid and parsed.sop_class_uid != strip("UI", sop_class_uid):
            raise SOPClassMismatch(
                f"data set SOP Class {parsed.sop_class_uid} differs from the request's "
                f"{sop_class_uid}"
            )
        study = parsed.record.study["study_instance_uid"]
        if study_instance_uid is not None and study != study_instance_uid:
            raise StudyMismatch(f"instance of study {study}, not of the request's"
                                f" {study_instance_uid}")
        if sop_instance_uid and parsed.sop_instance_uid != strip("UI", sop_instance_uid):
            # The data set's own UID is authoritative (it is what every query and retrieve
            # will name); the mismatch is worth a line in the log, not a lost image.
            parsed.warnings.append(
                f"request named SOP Instance {strip('UI', sop_instance_uid)}; "
                "stored under the data set's own UID"
            )
        digest = content_hash(transfer_syntax_uid, data)
        uid = parsed.sop_instance_uid
        uids = {"sop_class_uid": parsed.sop_class_uid, "study_instance_uid": study,
                "series_instance_uid": parsed.record.series["series_instance_uid"],
                "patient_id": parsed.record.patient["patient_id"]}

        with self._in_flight_lock:  # stores of one UID are indexed in the order submitted
            queued_before = self._in_flight[uid] > 0
            self._in_flight[uid] += 1
        try:
            pending = self._stage_and_queue(data, transfer_syntax_uid, size, parsed, digest,
                                            origin, uids, queued_before, wake)
        except BaseException:
            self._leave(uid)
            raise
        pending.future.add_done_callback(lambda _: self._leave(uid))
        return pending

    def _stage_and_queue(self, data: bytes | Spooled, transfer_syntax_uid: str, size: int,
                         parsed: Parsed, digest: str, origin: Origin, uids: dict[str, Any],
                         queued_before: bool, wake: bool) -> PendingStore:
        """:meth:`submit` once the header is checked: the early duplicate check, the file
        staged, the store queued for the group commit."""
        uid = parsed.sop_instance_uid
        # A cheap look before writing anything: resends and refused duplicates cost no I/O.
        # Not while a store of this UID is queued: the index does not show it yet, and the
        # later store must be indexed after it (the last part of a STOW-RS request wins).
        existing = None
        if not queued_before:
            try:
                existing = index.lookup(uid)
            except pw.DatabaseError as exc:
                raise StorageFull(f"cannot read the index: {exc}") from exc
        if existing is not None:
            early = self._early_duplicate(existing[0], digest, uid)
            if early is not None:
                done: Future[StoreOutcome] = Future()
                done.set_result(dataclasses.replace(early, **uids))
                return PendingStore(parsed.sop_class_uid, uid, done)

        targets = outbox.targets(self.options.routes, parsed.record, origin.ae_title)
        meta = file_meta(parsed, transfer_syntax_uid, origin.ae_title)
        chunks = itertools.chain((meta,), chunks_of(data))
        with self._reserving(len(meta) + size):  # after the resend check: it writes nothing
            staged = self.files.stage(chunks)
        record = parsed.record
        record.instance.update(
            transfer_syntax_uid=transfer_syntax_uid,
            file_key=staged.key,
            file_size=len(meta) + size,
            content_hash=digest,
        )
        outcome: Future[StoreOutcome] = Future()

        def settle(written: Future[WriteOutcome]) -> None:  # in the committing thread
            error = written.exception()
            if error is not None:
                outcome.set_exception(error)
                return
            result = written.result()
            warnings = tuple(parsed.warnings + result.warnings)
            for warning in warnings:
                logger.warning("%s: %s", uid, warning)
            outcome.set_result(StoreOutcome(result.result, uid, warnings, **uids))

        self._committer.submit(staged, record, wake=wake,
                               targets=targets).add_done_callback(settle)
        return PendingStore(parsed.sop_class_uid, uid, outcome)

    def _leave(self, uid: str) -> None:
        """A store of ``uid`` is settled (see :meth:`submit`)."""
        with self._in_flight_lock:
            self._in_flight[uid] -= 1
            if not self._in_flight[uid]:
                del self._in_flight[uid]

    @contextlib.contextmanager
    def _reserving(self, size: int) -> Iterator[None]:
        """Refuse, before anything is written, an instance that would leave less than
        ``min_free_bytes`` on the file store's disk (or the SQLite index's, when that is
        another disk), counting the stores in flight: their bytes are reserved until their
        file is written, so four parallel stores cannot all pass with room for one."""
        floor = self.options.min_free_bytes
        if not floor:
            yield
            return
        with self._reserve_lock:
            for path in self._watched_disks:
                try:
                    free = shutil.disk_usage(path).free
                except OSError as exc:
                    raise StorageFull(f"cannot read the free disk space: {exc}") from exc
                if free - self._reserved - size < floor:
                    in_flight = f", {self._reserved // 2**20} MB of it reserved by stores in " \
                        "flight" if self._reserved else ""
                    raise StorageFull(
                        f"disk almost full: {free // 2**20} MB free{in_flight}, "
                        f"storage.min_free_disk_mb is {floor // 2**20} MB"
                    )
            self._reserved += size
        try:
            yield
        finally:
            with self._reserve_lock:
                self._reserved -= size

    @functools.cached_property
    def _watched_disks(self) -> list[Path]:
        """The file store's folder, and the SQLite index's when it is on another device
        (found once: resolving and stat'ing them on every store cost more than the free
        space check itself)."""
        paths = [self.options.files_path]
        db_file = getattr(self.database, "database", None)
        if isinstance(self.database, pw.SqliteDatabase) and db_file and db_file != ":memory:":
            folder = Path(db_file).resolve().parent
            with contextlib.suppress(OSError):
                if folder.stat().st_dev != self.options.files_path.stat().st_dev:
                    paths.append(folder)
        return paths

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

    # -- STOW-RS -------------------------------------------------------------------------

    def check_part_size(self, size: int) -> None:
        """Refuse a Part 10 file of which ``size`` bytes have arrived as soon as its data
        set must be larger than ``max_instance_bytes``, so that a front end stops reading
        it into memory or a spool file there and then (its data set could be up to
        :data:`PART10_HEADER_ALLOWANCE` smaller than the file: :meth:`store` makes the
        exact check).

        Raises
        ------
        StorageFull
            The part is too large (PS3.4 B.2.3 / PS3.18 Table I.2-2 A700).
        """
        limit = self.options.max_instance_bytes
        if limit and size > limit + PART10_HEADER_ALLOWANCE:
            raise StorageFull(f"part of more than {size / 2**20:.0f} MB exceeds"
                              f" storage.max_instance_mb ({limit // 2**20} MB)")

    @contextlib.contextmanager
    def spooling(self, size: int) -> Iterator[None]:
        """Reserve ``size`` bytes a front end is about to append to a spool file in
        :meth:`spool_folder`, for as long as it writes them: the same reservation as the
        stores in flight (:meth:`_reserving`), so that parallel spools and stores cannot
        together take the disk below ``min_free_bytes``. Bytes once written are counted by
        the disk itself, so a spool holds no reservation between writes, and the store of
        a spooled part reserves only the file it writes (never the spool twice).

        Raises
        ------
        StorageFull
            Writing them would leave less than ``min_free_bytes`` (PS3.4 B.2.3 A700).
        """
        with self._reserving(size):
            yield

    def spool_folder(self) -> Path:
        """Where a front end spools an incoming object too large for memory before
        :meth:`store_part10`: the file store's temporary folder, on the store's own disk
        (never a RAM-backed ``/tmp``). Name spool files ``*.part``: what a crash leaves of
        them is removed when the store is opened again."""
        return self.options.files_path / TEMP_DIR

    def store_part10(
        self,
        source: bytes | Path,
        *,
        study_instance_uid: str | None = None,
        origin: Origin | None = None,
    ) -> StoreOutcome:
        """:meth:`submit_part10`, waiting for the outcome."""
        return self.submit_part10(source, study_instance_uid=study_instance_uid,
                                  origin=origin).result()

    def submit_part10(
        self,
        source: bytes | Path,
        *,
        study_instance_uid: str | None = None,
        origin: Origin | None = None,
    ) -> PendingStore:
        """Store a DICOM Part 10 file (PS3.10 7.1: preamble, File Meta, data set), held in
        memory or in a file, through :meth:`store`: its data set in the transfer syntax its
        File Meta names, with every check and promise of a C-STORE. A file is read a chunk
        at a time, never whole into memory. The File Meta group may start the file, without
        preamble (what dicomweb-client sends of a data set not read from a file). As
        :meth:`submit`, it returns once the file is written; ``source`` may then go.

        Raises
        ------
        InvalidInstance
            Not a Part 10 file, or a data set :meth:`store` refuses.
        TransferSyntaxNotSupported
            Its transfer syntax is not one pydicom knows (C-STORE's presentation contexts
            offer those only).
        StudyMismatch, DuplicateRejected, StorageFull
            As :meth:`store`.
        """
        data: bytes | Spooled
        if isinstance(source, Path):
            syntax, data = Spooled.part10(source, preamble_optional=True)
        else:
            syntax, data = split_part10(source, preamble_optional=True)
        if syntax not in KNOWN_SYNTAXES:
            raise TransferSyntaxNotSupported(f"transfer syntax {syntax} is not supported")
        return self.submit(data, syntax, study_instance_uid=study_instance_uid, origin=origin)

    def identify_part10(self, source: bytes | Path) -> tuple[str, str]:
        """The SOP Class and SOP Instance UIDs of a Part 10 file that :meth:`store_part10`
        refused, as far as its header can be read (``""`` for what cannot): what names the
        refused instance in an answer."""
        try:
            if isinstance(source, Path):
                syntax, spooled = Spooled.part10(source, preamble_optional=True)
                with spooled.view() as view:
                    ds = read_header(view, syntax, strict=False)
            else:
                syntax, raw = split_part10(source, preamble_optional=True)
                ds = read_header(raw, syntax, strict=False)
            return (strip("UI", str(ds.get("SOPClassUID", ""))),
                    strip("UI", str(ds.get("SOPInstanceUID", ""))))
        except Exception:  # noqa: BLE001 - a part we cannot read is named by nothing
            return "", ""

    # -- C-FIND --------------------------------------------------------------------------

    def parse_query(
        self,
        identifier: Dataset | bytes,
        model: Model,
        *,
        transfer_syntax_uid: str = ExplicitVRLittleEndian,
        relational: bool = False,
        combined_datetime: bool = False,
        multiple_values: bool = False,
    ) -> query.Query:
        """Validate a C-FIND / C-MOVE / C-GET identifier (raises
        :class:`~storage.errors.InvalidQuery`).

        ``identifier`` is a data set, or its bytes as received in ``transfer_syntax_uid``:
        those are checked to be one complete data set first (a value cut short is refused,
        PS3.4 C.4.1.1.4 A900, where a lenient decoder would query with what is left).
        ``relational``, ``combined_datetime`` and ``multiple_values`` say what the SCU
        negotiated (PS3.4 C.5.1.1).
        """
        if isinstance(identifier, bytes):
            try:
                identifier = read_identifier(identifier, transfer_syntax_uid)
            except InvalidInstance as exc:
                raise InvalidQuery(f"identifier: {exc}") from exc
        return query.parse_identifier(
            identifier,
            model,
            fold_pn=self.options.fold_pn,
            relational=relational,
            combined_datetime=combined_datetime,
            multiple_values=multiple_values,
        )

    def find(
        self, parsed: query.Query, cancelled: Callable[[], bool] | None = None
    ) -> Iterator[Dataset]:
        """Yield one response identifier per match, reading the index page by page.

        ``cancelled`` is asked before every candidate row, so a C-CANCEL also stops a scan
        through rows that do not match (PS3.4 C.4.1.3.1); the caller then answers Cancel.

        Raises
        ------
        QueryFailed
            The index could not be read.
        TooManyMatches
            After ``max_results`` responses, when there is one more match.
        """
        for row in self._matches(parsed, cancelled):
            yield query.build_response(
                parsed, row, self.options.response_charset, self.options.retrieve_ae_title)

    def find_encoded(
        self,
        parsed: query.Query,
        cancelled: Callable[[], bool] | None = None,
        *,
        implicit_vr: bool = False,
    ) -> Iterator[bytes]:
        """:meth:`find`, each response already encoded in Implicit (or Explicit) VR Little
        Endian (:func:`storage.query.encode_response`): what a DIMSE front end sends."""
        for row in self._matches(parsed, cancelled):
            yield query.encode_response(
                parsed, row, self.options.response_charset, self.options.retrieve_ae_title,
                implicit_vr=implicit_vr)

    def _matches(
        self, parsed: query.Query, cancelled: Callable[[], bool] | None
    ) -> Iterator[query.Row]:
        limit = self.options.max_results
        sent = 0
        try:
            for row in query.select_rows(parsed):
                if cancelled is not None and cancelled():
                    return
                if query.row_matches(parsed, row):
                    if limit and sent == limit:
                        raise TooManyMatches(
                            f"more than {limit} matches (query.max_results): refine the query"
                        )
                    sent += 1
                    yield row
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    # -- QIDO-RS --------------------------------------------------------------------------

    def parse_search(
        self,
        params: query.SearchParams,
        level: query.Level,
        study: str = "",
        series: str = "",
        profile: str = "",
    ) -> query.Search:
        """Validate a QIDO-RS search (PS3.18 10.6) into the same query as a C-FIND
        identifier: :func:`storage.query.parse_search` (raises
        :class:`~storage.errors.InvalidQuery`). With ``profile``, for an account that sees
        data de-identified by it: the UIDs of the path and of the matches are the ones its
        answers gave (:func:`storage.deidentified.search_params`; raises
        :class:`~storage.errors.NotFound` when nothing can match), and only what the profile
        keeps may be matched (:func:`storage.deidentified.check_search`)."""
        if not profile:
            return query.parse_search(params, level, study, series,
                                      fold_pn=self.options.fold_pn)
        deidentifier = self.deidentifier(profile)
        path = [uid for uid in (study, series) if uid]
        try:
            known = deidentified.originals(deidentifier, path) if path else {}
            if any(uid not in known for uid in path):
                raise NotFound("the path names nothing this account was shown")
            params, patient = deidentified.search_params(params, deidentifier)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc
        finally:
            self.release()
        parsed = query.parse_search(params, level, known.get(study, ""), known.get(series, ""),
                                    fold_pn=self.options.fold_pn)
        deidentified.check_search(parsed, deidentifier)
        if patient is not None:  # checked: its constraints are ours, not the account's
            parsed = deidentified.patient_constraints(parsed, patient)
        return parsed

    def search(self, search: query.Search, retrieve_base: str = "",
               profile: str = "") -> query.SearchAnswer:
        """Answer a QIDO-RS search as a DICOM JSON array (PS3.18 Annex F), streamed in
        chunks: :func:`storage.query.run_search`, with ``max_results`` as the server's
        maximum and the index connection given back after every chunk. Each result's
        RetrieveURL starts with ``retrieve_base`` (the DICOMweb root). With ``profile``
        (a search :meth:`parse_search` made with it), the answer is de-identified by it
        (:func:`storage.deidentified.search`), and the UIDs each batch gives are kept
        before it goes.

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        if not profile:
            return query.run_search(search, retrieve_base, self.options.max_results,
                                    self.release)

        def keep_then_release(replaced: deidentified.Replaced) -> None:
            try:
                self._remember(replaced)
            finally:
                self.release()

        return deidentified.search(search, retrieve_base, self.options.max_results,
                                   self.deidentifier(profile),
                                   not self.deidentifiers.send_burned_in, keep_then_release)

    # -- C-MOVE / C-GET -------------------------------------------------------------------

    def retrieve(self, parsed: query.Query) -> list[StoredInstance]:
        """The instances below every entity that ``parsed`` matches (PS3.4 C.4.2.2, C.4.3.2:
        a retrieve names entities at its level, usually by their Unique keys or UID lists).

        Only index rows are read; open each file with :meth:`read_instance` when it is sent,
        so memory stays flat however large the retrieve.

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        try:
            ids = [row.rows[parsed.level].id for row in query.select_rows(parsed)
                   if query.row_matches(parsed, row)]
            return index.instances_under(parsed.level, ids)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def read_instance(
        self, item: StoredInstance, accepted: Collection[str] | None = None
    ) -> Dataset:
        """Read one stored instance, File Meta included, for sending.

        Parameters
        ----------
        item : StoredInstance
            One of :meth:`retrieve`'s instances.
        accepted : collection of str, optional
            The transfer syntaxes the receiver accepted for its SOP Class; the instance
            comes back as stored when that syntax is among them, else converted
            (:func:`storage.convert.to_accepted`). ``None``: as stored.

        Raises
        ------
        InstanceUnavailable
            Its file is missing, cannot be read or is damaged (the sub-operation fails;
            ``verify`` finds why).
        CannotConvert
            It cannot be sent in any of ``accepted``.
        """
        try:
            with self.files.open(item.file_key) as fp:
                ds = as_stored(dcmread(fp))
        except Exception as exc:  # missing, unreadable, or damaged (zlib, struct, ... errors)
            raise InstanceUnavailable(
                f"file of {item.sop_instance_uid} cannot be read: {exc!r}"
            ) from exc
        return ds if accepted is None else to_accepted(ds, accepted)

    def stored_data_set(self, item: StoredInstance) -> Iterator[bytes]:
        """The data set of ``item`` as stored, byte for byte, without its File Meta group,
        for a receiver that accepted the stored transfer syntax
        (:func:`storage.instances.stored_data_set`: read before the first piece is
        yielded; raises :class:`InstanceUnavailable`, or its subclass
        :class:`~storage.instances.NotAsWritten` for a file to go through
        :meth:`read_instance` instead)."""
        return instances.stored_data_set(self.files, item)

    def stored_as_implicit(self, item: StoredInstance) -> bytes:
        """The data set of ``item``, stored as Explicit VR Little Endian, in Implicit VR
        Little Endian, rewritten on the bytes (:func:`storage.convert.explicit_to_implicit`):
        for a receiver that took only Implicit VR. Raises :class:`InstanceUnavailable`
        (:class:`~storage.instances.NotAsWritten`: use :meth:`read_instance`) or
        :class:`CannotConvert` (what Implicit VR cannot carry, or more than
        :data:`storage.instances.SEND_WHOLE_UP_TO` bytes: decode it instead)."""
        if item.file_size > instances.SEND_WHOLE_UP_TO:
            raise CannotConvert(f"{item.sop_instance_uid} is too large to rewrite in memory")
        return explicit_to_implicit(b"".join(instances.stored_data_set(self.files, item)))

    # -- WADO-RS --------------------------------------------------------------------------

    def locate(self, study_uid: str, series_uid: str | None = None,
               sop_instance_uid: str | None = None) -> list[WebInstance]:
        """The instances of a study, a series of it, or one instance of that series
        (:func:`storage.instances.locate`: index rows only; raises
        :class:`~storage.errors.NotFound`)."""
        return instances.locate(study_uid, series_uid, sop_instance_uid)

    def metadata(self, study_uid: str, series_uid: str | None, sop_instance_uid: str | None,
                 instance_url: Callable[[str, str, str], str], profile: str = "") -> bytes:
        """The DICOM JSON array of those instances, from the index alone
        (:func:`storage.instances.metadata`); with ``profile``, de-identified by it
        (:func:`storage.deidentified.metadata`), the UIDs it gives kept."""
        body = instances.metadata(study_uid, series_uid, sop_instance_uid, instance_url)
        if not profile:
            return body
        replaced = deidentified.Replaced()
        body = deidentified.metadata(json.loads(body), instance_url, self.deidentifier(profile),
                                     not self.deidentifiers.send_burned_in, replaced)
        self._remember(replaced)
        return body

    def representative(self, study_uid: str, series_uid: str | None = None,
                       shown: Callable[[WebInstance], bool] | None = None) -> WebInstance:
        """The image a thumbnail of a study or series shows
        (:func:`storage.instances.representative`; ``shown``: the first it accepts)."""
        return instances.representative(study_uid, series_uid, shown)

    def present(self, items: list[WebInstance]) -> list[WebInstance]:
        """Those of ``items`` whose file is in the store: a ``stat`` each, nothing read
        (:func:`storage.instances.present`)."""
        return instances.present(self.files, items)

    def instance_bytes(self, item: WebInstance, transfer_syntax_uid: str) -> Iterator[bytes]:
        """The Part 10 file of ``item`` in ``transfer_syntax_uid`` (one that
        :func:`storage.instances.syntax_for` gave), a chunk at a time: the stored file byte
        for byte when that is its syntax, else converted as for C-MOVE (:meth:`read_instance`)
        into Explicit VR Little Endian through a temporary file in :meth:`spool_folder`
        (:func:`storage.instances.converted_chunks`: Implicit VR a chunk at a time).

        Raises
        ------
        InstanceUnavailable
            The file cannot be read.
        CannotConvert
            The conversion failed (e.g. damaged pixel data).
        """
        if transfer_syntax_uid == item.transfer_syntax_uid:
            yield from instances.file_chunks(self.files, item.file_key)
            return
        yield from instances.converted_chunks(
            self.files, item, self.spool_folder(),
            lambda: self.read_instance(item.stored, [transfer_syntax_uid]))

    def open_pixels(self, item: WebInstance) -> PixelSource:
        """``item``'s file opened for its frames, bulk data and pixels (close it, or use it
        in a ``with``; raises :class:`~storage.errors.InstanceUnavailable`)."""
        return PixelSource(self.files, item)

    # -- maintenance (verify, reindex, import) ------------------------------------------

    @contextlib.contextmanager
    def writing(self, commit: bool = True) -> Iterator[None]:
        """One index write transaction under the archive's write lock; ``commit=False``
        rolls it back at the end (to compute what a repair would change)."""
        with self._write_lock, index.write_transaction() as txn:
            yield
            if not commit:
                txn.rollback()

    def index_file(self, key: str) -> WriteResult:
        """Index the stored file ``key`` where it is (``reindex``, ``verify --repair``): no
        new file is written, and an instance already indexed from another file stays as
        it is (:attr:`WriteResult.KEPT`; the file is left alone).

        Raises
        ------
        InstanceUnavailable
            The file cannot be read.
        InvalidInstance
            The file is not a stored instance we can parse.
        StorageFull
            The index cannot be written.
        """
        try:
            with self.files.open(key) as fp:
                raw = fp.read()
        except OSError as exc:
            raise InstanceUnavailable(f"file {key} cannot be read: {exc}") from exc
        syntax, data = split_part10(raw)
        parsed = extract(read_header(data, syntax, strict=False))
        parsed.record.instance.update(
            transfer_syntax_uid=syntax, file_key=key, file_size=len(raw),
            content_hash=content_hash(syntax, data),
        )
        try:
            with self._write_lock:
                return index.write_instance(parsed.record, DuplicatePolicy.KEEP).result
        except pw.DatabaseError as exc:
            raise StorageFull(f"cannot write to the index: {exc}") from exc

    def health(self) -> Health:
        """Whether this node can store and retrieve: the index answers a query and the file
        store answers (:meth:`storage.files.FileStore.check`), for a load balancer's health
        check. Never raises."""
        problems: dict[str, str] = {}
        try:
            index.ping()
        except pw.DatabaseError as exc:
            index.close()  # a broken connection: the next use opens another
            problems["index"] = f"cannot be read: {exc}".strip()
        try:
            self.files.check()
        except (OSError, StorageError) as exc:
            problems["files"] = str(exc)
        return Health(problems)

    def totals(self) -> dict[str, int]:
        """How many patients, studies, series and instances the index holds (from the
        study counters: no instance row is read), for ``/metrics``.

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        try:
            return index.totals()
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def commitment(self, references: Sequence[tuple[str, str]]
                   ) -> list[tuple[str, str, Commitment]]:
        """Storage Commitment (PS3.4 J.3.3.1): for each (SOP Class UID, SOP Instance UID),
        whether we hold the instance safely: stored under that class, and its file has
        the bytes indexed (read and hashed now).

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        uids = list(dict.fromkeys(uid for _, uid in references))
        rows: dict[str, Any] = {}
        try:
            for start in range(0, len(uids), 500):
                for found in Instance.select(
                        Instance.sop_instance_uid, Instance.sop_class_uid, Instance.file_key,
                        Instance.file_size, Instance.content_hash).where(
                        Instance.sop_instance_uid.in_(uids[start:start + 500])):
                    rows[found.sop_instance_uid] = found
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc
        out = []
        for sop_class, uid in references:
            row: Any = rows.get(uid)
            if row is None:
                result = Commitment.NO_SUCH_INSTANCE
            elif row.sop_class_uid != sop_class:
                result = Commitment.CLASS_CONFLICT
            else:
                problem = maintenance.check_row(self, row, present=True)  # else unreadable
                if problem is not None:
                    logger.error("storage commitment of %s refused: %s", uid, problem.detail)
                result = Commitment.COMMITTED if problem is None else Commitment.DAMAGED
            out.append((sop_class, uid, result))
        return out

    def routing_queue(self, kind: str = outbox.ROUTE) -> list[outbox.PeerQueue]:
        """Per peer, what routing (or, ``kind`` :data:`storage.outbox.COMMITMENT`, Storage
        Commitment) still has to send (:meth:`storage.outbox.Outbox.summary`).

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        try:
            return self.outbox.summary(kind)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def held_syntaxes(self) -> dict[tuple[str, str], int]:
        """How many instances the archive holds of each (SOP Class UID, stored transfer
        syntax UID), most first: what a send from it would propose (``minipacs doctor``).

        Raises
        ------
        QueryFailed
            The index could not be read.
        """
        try:
            return index.held_syntaxes()
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def disk_usage(self) -> tuple[int, int]:
        """Free and total bytes of the file store's disk."""
        usage = shutil.disk_usage(self.options.files_path)
        return usage.free, usage.total

    def selected(self, selection: Selection) -> list[StoredInstance]:
        """The instances ``selection`` names, as a retrieve sends them (``minipacs send``):
        index rows only, in the order they were stored.

        Raises
        ------
        InvalidQuery
            The selection's query is not a valid study-level search.
        QueryFailed
            The index could not be read, or the query matches too many studies.
        """
        try:
            return selected_instances(self._resolved(selection))
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def deidentifier(self, profile: str) -> Deidentifier:
        """The de-identifier of ``profile`` (config ``profiles``).

        Raises
        ------
        StorageError
            No such profile, or the standard's table cannot be read.
        """
        return self.deidentifiers.get(profile)

    def read_deidentified(self, item: StoredInstance, profile: str,
                          accepted: Collection[str] | None = None) -> Dataset:
        """``item`` as :meth:`read_instance` reads it, de-identified by ``profile``
        (:class:`storage.deidentify.Deidentifier`; the stored file does not change).

        Raises
        ------
        Withheld
            Its pixels may show the patient (:func:`storage.deidentify.burned_in`) and
            ``deidentify.send_burned_in`` is off.
        StorageError
            As :meth:`read_instance` and :meth:`deidentifier` raise.
        """
        deidentifier = self.deidentifier(profile)
        ds = self.read_instance(item, accepted)
        if not self.deidentifiers.send_burned_in:
            why = burned_in(ds)
            if why is not None:
                raise Withheld(why)
        out = deidentifier.apply(ds).dataset
        _copy_uid(item, deidentifier, str(out.get("SOPInstanceUID", "")))
        return out

    def deidentified_data_set(self, item: StoredInstance, profile: str
                              ) -> tuple[list[bytes | memoryview], str]:
        """``item``'s data set in its stored transfer syntax, de-identified by ``profile``
        on the encoded bytes (:func:`storage.deidentify.stream.rewrite`: what is kept is
        copied as stored, a long run such as the pixel data referenced, not copied), in
        pieces, and the SOP Instance UID it now has.

        Raises
        ------
        NotAsWritten
            A file that must go through :meth:`read_deidentified` instead (not as the store
            writes files, or Deflated, or big endian).
        Withheld, CannotConvert, InstanceUnavailable
            Its pixels may show the patient; its data set cannot be parsed; its file
            cannot be read.
        """
        syntax = UID(item.transfer_syntax_uid)
        if syntax.is_deflated or not syntax.is_little_endian:
            raise instances.NotAsWritten(f"{item.sop_instance_uid}: {syntax.name} is"
                                         " de-identified decoded")
        deidentifier = self.deidentifier(profile)
        data = b"".join(self.stored_data_set(item))
        done = deidentifier.apply_encoded(data, syntax == ImplicitVRLittleEndian,
                                          not self.deidentifiers.send_burned_in)
        return done.chunks, _copy_uid(item, deidentifier,
                                      done.uids.get(item.sop_instance_uid))

    # -- DICOMweb for de-identified accounts (storage.deidentified) ---------------------

    def original_uids(self, profile: str, study_uid: str, series_uid: str | None = None,
                      sop_instance_uid: str | None = None
                      ) -> tuple[str, str | None, str | None]:
        """The stored UIDs that a path's UIDs, as answers de-identified by ``profile`` gave
        them, stand for.

        Raises
        ------
        NotFound
            One of them was never given (PS3.18 10.4.3: 404).
        """
        asked = [uid for uid in (study_uid, series_uid, sop_instance_uid) if uid is not None]
        try:
            known = deidentified.originals(self.deidentifier(profile), asked)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc
        if any(uid not in known for uid in asked):
            raise NotFound("the path names nothing this account was shown")
        return (known[study_uid], None if series_uid is None else known[series_uid],
                None if sop_instance_uid is None else known[sop_instance_uid])

    def replaced_uids(self, items: Sequence[WebInstance], profile: str) -> dict[str, str]:
        """The study, series and SOP Instance UIDs of ``items`` as answers de-identified by
        ``profile`` give them (stored UID -> its replacement), kept so that the account
        can name them next (:meth:`original_uids`)."""
        deidentifier = self.deidentifier(profile)
        stored = {uid for item in items
                  for uid in (item.study_uid, item.series_uid, item.sop_instance_uid)}
        if Option.RETAIN_UIDS in deidentifier.options:
            return {uid: uid for uid in stored}
        given = {uid: deidentifier.pseudonyms.uid(uid) for uid in stored}
        self._remember(deidentified.Replaced({new: old for old, new in given.items()}))
        return given

    def _remember(self, replaced: deidentified.Replaced) -> None:
        """Keep the UIDs an answer gives that are not kept yet (one write, none when all
        are)."""
        try:
            known = index.originals_of(list(replaced.pairs)) if replaced.pairs else {}
            new = {r: o for r, o in replaced.pairs.items() if r not in known}
            if new:
                index.remember_pseudonyms(new)
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not keep the UIDs an answer gives: {exc}"
                              ) from exc

    def withheld(self, item: WebInstance) -> str | None:
        """Why ``item`` is not shown de-identified (its pixels may show the patient and
        ``deidentify.send_burned_in`` is off: :func:`storage.deidentify.burned_in`), or
        None; its file's header is read (raises :class:`InstanceUnavailable`)."""
        if self.deidentifiers.send_burned_in:
            return None
        try:
            with self.files.open(item.file_key) as fp:
                ds = dcmread(fp, stop_before_pixels=True,
                             specific_tags=["BurnedInAnnotation", "SOPClassUID", "Modality"])
        except Exception as exc:  # missing, unreadable, or damaged
            raise InstanceUnavailable(
                f"file of {item.sop_instance_uid} cannot be read: {exc!r}") from exc
        return burned_in(ds)

    def deidentified_file(self, item: WebInstance, transfer_syntax_uid: str,
                          profile: str) -> bytes:
        """``item`` as a Part 10 file in ``transfer_syntax_uid`` (one that
        :func:`storage.instances.syntax_for` gave), de-identified by ``profile``: rewritten
        on its encoded bytes when that is its stored syntax
        (:meth:`deidentified_data_set`), else read, converted and de-identified
        (:meth:`read_deidentified`).

        Raises
        ------
        Withheld, CannotConvert, InstanceUnavailable
            As :meth:`deidentified_data_set` and :meth:`read_deidentified` raise.
        """
        if transfer_syntax_uid == item.transfer_syntax_uid:
            try:
                chunks, uid = self.deidentified_data_set(item.stored, profile)
            except instances.NotAsWritten:
                pass
            else:
                return instances.part10(b"".join(chunks), item.sop_class_uid, uid,
                                        transfer_syntax_uid)
        ds = self.read_deidentified(item.stored, profile, [transfer_syntax_uid])
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def export(self, items: Sequence[StoredInstance], directory: Path, profile: str = "",
               progress: Callable[[int, int], None] | None = None) -> exporting.Exported:
        """Write ``items`` (:meth:`selected`) into the new or empty folder ``directory`` as a
        DICOM File-set with a DICOMDIR, de-identified by ``profile`` ("" = as stored);
        :func:`storage.exporting.export`. Raises :class:`StorageError` as it does."""
        if profile:
            self.deidentifier(profile)  # an unknown profile, an unreadable table: say so now
        return exporting.export(self, items, directory, profile, progress)

    def plan_delete(self, selection: Selection) -> removal.Deletion:
        """What :meth:`delete` would delete, per study; nothing changes (raises as
        :meth:`selected` does)."""
        return removal.plan(self._resolved(selection))

    def plan_retention(self, rules: retention.RetentionRules) -> list[retention.Doomed]:
        """The studies ``rules`` delete now (:func:`storage.retention.plan`), oldest first,
        each with its files at this moment; nothing changes.

        Raises
        ------
        InvalidQuery
            A ``protect`` search is not a valid study-level search.
        QueryFailed
            The index could not be read.
        """
        protected: set[int] = set()
        for search in rules.protect:  # however many: no MAX_SELECTED_STUDIES here
            protected.update(self._matching_studies(search))
        free, total = self.disk_usage()
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        try:
            chosen = retention.plan(rules, protected, total - free, total, now)
            return [dataclasses.replace(d, file_keys=self.plan_delete(
                Selection(study_uids=(d.study_instance_uid,))).file_keys) for d in chosen]
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def delete_retained(self, doomed: retention.Doomed, rules: retention.RetentionRules,
                        tidy: bool = True) -> removal.Deletion | None:
        """Delete a study :meth:`plan_retention` chose, as :meth:`delete` does: the
        instances it held then (what was stored since stays), unless a ``protect`` search
        matches it now (``None``). ``tidy``: first remove what earlier deletes left
        (once a pass is enough).

        Raises
        ------
        StorageError
            As :meth:`delete`, or a ``protect`` search cannot be run.
        """
        uid = doomed.study_instance_uid
        for search in rules.protect:
            if self._matching_studies((*search, ("StudyInstanceUID", uid))):
                return None
        return removal.delete(Selection(study_uids=(uid,)), self.files, self.writing,
                              doomed.file_keys, tidy=tidy)

    def _resolved(self, selection: Selection) -> Selection:
        """``selection`` with its query's studies found (PS3.18 10.6: the search's
        parameters, matched as C-FIND matches them, PS3.4 C.2.2.2)."""
        if not selection.query or selection.study_ids is not None:
            return selection
        ids = self._matching_studies(selection.query)
        if len(ids) > MAX_SELECTED_STUDIES:
            raise QueryFailed(f"the query matches {len(ids)} studies, more than"
                              f" {MAX_SELECTED_STUDIES} at once: narrow it")
        return dataclasses.replace(selection, study_ids=tuple(ids))

    def _matching_studies(self, search_pairs: tuple[tuple[str, str], ...]) -> list[int]:
        """The study rows a study-level QIDO-RS search matches (raises as
        :meth:`_resolved`)."""
        search = self.parse_search(search_pairs, query.Level.STUDY)
        try:
            return [row.rows[query.Level.STUDY].id for row in query.select_rows(search.query)
                    if query.row_matches(search.query, row)]
        except pw.DatabaseError as exc:
            raise QueryFailed(f"the index could not be read: {exc}") from exc

    def delete(self, selection: Selection, only: Collection[str] | None = None
               ) -> removal.Deletion:
        """Delete the selected instances: their index rows and the counters in one
        transaction, then their files (:mod:`storage.removal`); with ``only``, none but
        those whose file is one of these (the ``file_keys`` of :meth:`plan_delete` that
        someone confirmed).

        Raises
        ------
        StorageError
            Nothing selected, or the index cannot be written (nothing was deleted).
        """
        return removal.delete(self._resolved(selection), self.files, self.writing, only)

    def verify(
        self, repair: bool = False, progress: maintenance.Progress | None = None
    ) -> maintenance.VerifyReport:
        """Check (and with ``repair`` fix) the index against the files:
        :func:`storage.maintenance.verify`."""
        return maintenance.verify(self, repair, progress)

    def reindex(self, progress: maintenance.Progress | None = None, *,
                missing_only: bool = False) -> maintenance.ImportReport:
        """Rebuild the index from the files: :func:`storage.maintenance.reindex`; with
        ``missing_only``, index only the files no row names, beside serving nodes
        (:func:`storage.maintenance.index_missing`).

        Raises
        ------
        StoreInUse
            A server uses this index (on PostgreSQL, on any node): the index would be
            emptied under it.
        """
        if isinstance(self.files, FallbackStore):
            raise StorageError("reindex lists the store the files move to, not the one they"
                               " move from: finish migrate-files and take"
                               " storage.files_previous_url out first")
        if missing_only:
            return maintenance.index_missing(self, progress)
        alone = index.hold_alone(self.database)
        try:
            self.outbox.refuse_if_nodes_beat()
        except BaseException:
            if alone is not None:
                alone.close()
            raise
        try:
            return maintenance.reindex(self, progress)
        finally:
            if alone is not None:
                alone.close()

    def migrate_files(self, progress: maintenance.Progress | None = None) -> MoveReport:
        """Move every file of ``files_previous_url`` to the store (:mod:`storage.moving`).

        Raises
        ------
        StorageError
            No ``files_previous_url`` is configured, or it cannot be listed.
        """
        if not isinstance(self.files, FallbackStore):
            raise StorageError("storage.files_previous_url is not set: give it the store the"
                               " files move from, and storage.files_url the one they move to")
        return move_files(self.files.previous, self.files.current, progress)

    def import_folder(
        self, folder: Path, progress: maintenance.Progress | None = None
    ) -> maintenance.ImportReport:
        """Store every DICOM file under ``folder``: :func:`storage.maintenance.import_folder`."""
        return maintenance.import_folder(self, folder, progress)

    # -- life cycle ----------------------------------------------------------------------

    def release(self) -> None:
        """Give back this thread's index connection (at the end of an association)."""
        index.close()

    def close(self) -> None:
        """Commit the stores in flight and close the index; another archive may then be
        opened in this process."""
        self._committer.close()
        serving, self._serving = getattr(self, "_serving", None), None
        if serving is not None:
            with contextlib.suppress(Exception):
                serving.close()
        with contextlib.suppress(pw.DatabaseError):
            self.database.close()
            if isinstance(self.database, PooledDatabase):
                self.database.close_all()  # the pool's idle connections too
        index.disconnect()
        self.files.close()


def _copy_uid(item: StoredInstance, deidentifier: Deidentifier, uid: str | None) -> str:
    """The SOP Instance UID a de-identified copy of ``item`` goes under: its replacement,
    or under Retain UIDs the stored one. Fails closed: a UID the profile replaces but the
    copy kept (not found where the table says it is) is :class:`CannotConvert`."""
    if uid and uid != item.sop_instance_uid:
        return uid
    if Option.RETAIN_UIDS in deidentifier.options:
        return item.sop_instance_uid
    raise CannotConvert(f"{item.sop_instance_uid}: its SOP Instance UID was not replaced:"
                        " not sent de-identified")


def open_archive(options: ArchiveOptions) -> Archive:
    """Open (creating if needed) the archive described by ``options``."""
    return Archive(options)


