"""Checking and repairing the archive: ``verify [--repair]``, ``reindex`` and ``import``.

The index is authoritative for what was acknowledged; the file store holds the bytes.
After a crash the two can disagree in ways :meth:`Archive.store`'s ordering allows and
nothing else: a file written but not yet indexed (the sender got no Success), or a file
replaced by a newer one but not yet removed. ``verify`` also finds what only damage can
cause: a row whose file is gone or changed, and counters that do not match the rows.

- :func:`verify` checks every index row against its file (exists, size, SHA-256 of the
  stored transfer syntax and data set, as :meth:`Archive.store` computed it), finds
  files no row points to, and recounts every study, series and patient. With ``repair``
  it makes them agree without ever deleting the only intact copy of an instance (see
  :func:`_repair_strays`), removes rows whose file is gone for good, and rewrites the
  counters. A file whose content changed is reported, never deleted.

On a local folder each runs with the file store to itself: the store's lock keeps a
server (or another of these) out meanwhile. With an object store other nodes keep storing:
``verify`` leaves alone the objects younger than the store's ``settle_seconds``, checks a
file again before calling it missing, and changes a row only if it still names the file it
checked; ``reindex`` is refused while any server uses the index
(:func:`storage.index.hold_alone`).
- :func:`reindex` rebuilds the whole index from the files.
- :func:`import_folder` stores every DICOM file of a folder through the C-STORE path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import index, removal
from .errors import InvalidInstance, StorageError
from .files import FileStore
from .index import WriteResult
from .models import Instance, Patient, PendingRemoval, Series, Study
from .parsing import content_hash, extract, read_header, split_part10

logger = logging.getLogger(__name__)


class Stored(Protocol):
    """What :meth:`Archive.store` returns, as far as ``import`` reads it."""

    @property
    def result(self) -> WriteResult: ...


class MaintainedArchive(Protocol):
    """What this module uses of :class:`storage.Archive`, which calls it: described here so
    that the archive imports this module and not the other way round."""

    @property
    def files(self) -> FileStore: ...

    def writing(self, commit: bool = True) -> AbstractContextManager[None]:
        """One index write transaction under the archive's write lock."""
        ...

    def index_file(self, key: str) -> WriteResult:
        """Index the stored file ``key`` where it is."""
        ...

    def store(self, data: bytes, transfer_syntax_uid: str) -> Stored:
        """Store one encoded data set and wait for the outcome."""
        ...

Progress = Callable[[int, int], None]
"""``progress(done, total)``, called as work goes on (for a progress bar)."""

_PAGE = 1000


@dataclass(frozen=True)
class Problem:
    """One thing ``verify`` found."""

    kind: str
    subject: str
    detail: str
    repaired: bool = False

    def __str__(self) -> str:
        state = " (repaired)" if self.repaired else ""
        return f"{self.kind}: {self.subject}: {self.detail}{state}"


@dataclass
class VerifyReport:
    """What ``verify`` checked and found."""

    instances: int = 0
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]


def verify(
    archive: MaintainedArchive, repair: bool = False, progress: Progress | None = None
) -> VerifyReport:
    """Check the index against the file store, and with ``repair`` make them agree."""
    report = VerifyReport()
    keys = set(archive.files.keys())
    pending = removal.pending_keys()
    left = set(removal.finish(archive.files, archive.writing)[1]) if repair and pending \
        else set()
    for key in sorted(pending & keys):  # a delete's files left by a crash: not strays
        removed = repair and key not in left
        report.problems.append(Problem(
            "deleted instance's file", key, "its instance was deleted; the file was left"
            + (": removed" if removed else ": kept, it cannot be removed" if repair else ""),
            removed))
    keys -= pending
    report.files = len(keys)
    total = Instance.select().count() + len(keys)
    done = 0
    damaged: dict[str, tuple[Any, int]] = {}  # SOP Instance UID -> (row, its problem's index)
    indexed_keys: set[str] = set()
    for row in _rows():
        report.instances += 1
        indexed_keys.add(row.file_key)
        problem = check_row(archive, row, row.file_key in keys)
        if problem is not None:
            damaged[row.sop_instance_uid] = (row, len(report.problems))
            report.problems.append(problem)
        done += 1
        if progress:
            progress(done, total)
    for uid, copies in _strays(archive, _settled(archive, keys - indexed_keys),
                               report).items():
        _repair_strays(archive, uid, copies, damaged, report, repair)
        done += len(copies)
        if progress:
            progress(done, total)
    if repair:
        gone = [row for row, i in damaged.values()
                if report.problems[i].kind == "missing file" and not report.problems[i].repaired]
        with archive.writing():
            for row in gone:  # unless it was stored again meanwhile (another node)
                Instance.delete().where((Instance.id == row.id)
                                        & (Instance.file_key == row.file_key)).execute()
            index.recompute_counters({row.study_id for row in gone})
        for row in gone:
            i = damaged[row.sop_instance_uid][1]
            report.problems[i] = replace(report.problems[i], repaired=True,
                                         detail=report.problems[i].detail + "; row removed")
    report.problems.extend(_counters(archive, repair))
    return report


def _rows() -> Iterator[Any]:
    last = 0
    while True:
        page = list(
            Instance.select(Instance.id, Instance.study, Instance.sop_instance_uid,
                            Instance.file_key, Instance.file_size, Instance.content_hash,
                            Instance.transfer_syntax_uid)
            .where(Instance.id > last).order_by(Instance.id).limit(_PAGE)
        )
        if not page:
            return
        yield from page
        last = page[-1].id


def check_row(archive: MaintainedArchive, row: Any, present: bool) -> Problem | None:
    """What is wrong with the file of the index row ``row`` (its ``sop_instance_uid``,
    ``file_key``, ``file_size`` and ``content_hash``; ``present``: the store lists the
    file): missing, unreadable, or not the bytes indexed. ``None`` when it verifies."""
    uid = row.sop_instance_uid
    if not present and not _exists(archive, row.file_key):  # stored since the listing?
        return Problem("missing file", uid, f"file {row.file_key} is not in the store")
    try:
        with archive.files.open(row.file_key) as fp:
            raw = fp.read()
    except OSError as exc:
        return Problem("unreadable file", uid, f"file {row.file_key}: {exc}")
    if len(raw) != row.file_size:
        return Problem("changed file", uid,
                       f"file {row.file_key} has {len(raw)} bytes, the index says {row.file_size}")
    try:
        syntax, data = split_part10(raw)
    except StorageError as exc:
        return Problem("changed file", uid, f"file {row.file_key}: {exc}")
    if content_hash(syntax, data) != row.content_hash:
        return Problem("changed file", uid, f"file {row.file_key}: content hash differs")
    return None


def _exists(archive: MaintainedArchive, key: str) -> bool:
    try:
        archive.files.size(key)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, or not known: check_row reads it and says which
    return True


def _settled(archive: MaintainedArchive, keys: set[str]) -> set[str]:
    """The files among ``keys`` (none named by an index row) old enough to be strays: in a
    store other nodes share, a file written in the last ``settle_seconds`` may be one whose
    store is still committing (:attr:`storage.files.FileStore.settle_seconds`)."""
    settle = archive.files.settle_seconds
    if not settle:
        return keys
    now = time.time()
    settled = set()
    for key in keys:
        try:
            if now - archive.files.modified(key) >= settle:
                settled.add(key)
        except FileNotFoundError:
            continue  # removed since the listing: a replaced instance's, or a failed store's
        except OSError:
            settled.add(key)  # _strays reports it unreadable, and keeps it
    if len(settled) < len(keys):
        logger.info("%d files no index row names were written in the last %.0f s: left"
                    " alone (stores in flight on other nodes)", len(keys) - len(settled),
                    settle)
    return settled


@dataclass(frozen=True)
class _Copy:
    key: str
    content_hash: str
    modified: float
    size: int


def _strays(archive: MaintainedArchive, keys: Iterable[str], report: VerifyReport
            ) -> dict[str, list[_Copy]]:
    """The files no row points to, by the SOP Instance UID they hold (unreadable ones are
    reported and kept)."""
    out: dict[str, list[_Copy]] = {}
    for key in sorted(keys):
        try:
            with archive.files.open(key) as fp:
                raw = fp.read()
            syntax, data = split_part10(raw)
            uid = extract(read_header(data, syntax, strict=False)).sop_instance_uid
            copy = _Copy(key, content_hash(syntax, data), archive.files.modified(key), len(raw))
        except (OSError, StorageError) as exc:
            report.problems.append(
                Problem("stray file", key, f"not readable as a stored instance: {exc}; kept"))
            continue
        out.setdefault(uid, []).append(copy)
    return out


def _repair_strays(archive: MaintainedArchive, uid: str, copies: list[_Copy],
                   damaged: dict[str, tuple[Any, int]], report: VerifyReport,
                   repair: bool) -> None:
    """What a crash (or a restore) left: files of ``uid`` no row points to.

    - ``uid`` indexed, its file intact: the copies are older versions or unacknowledged
      resends; repair removes them.
    - ``uid`` indexed, its file missing or changed: a copy with the indexed content becomes
      the indexed file; other copies are kept and reported.
    - ``uid`` not indexed: the newest copy is indexed where it is and older ones removed;
      when several are equally new none is chosen (kept, reported).
    """
    problems = report.problems
    indexed = index.lookup(uid)
    if indexed is not None:
        if uid not in damaged:
            for c in copies:
                if c.key == indexed[1]:  # indexed meanwhile (another verify --repair)
                    continue
                if repair:
                    archive.files.delete(c.key)
                problems.append(Problem("stray file", c.key, f"{uid} is indexed under another,"
                                        " intact file" + (": removed" if repair else ""), repair))
            return
        row, i = damaged[uid]
        same = next((c for c in copies if c.content_hash == row.content_hash), None)
        for c in copies:
            if c is same and repair:
                with archive.writing():  # unless stored again meanwhile (another node)
                    Instance.update(file_key=c.key, file_size=c.size).where(
                        (Instance.id == row.id) & (Instance.file_key == row.file_key)).execute()
                problems[i] = replace(problems[i], repaired=True, detail=problems[i].detail
                                      + f"; its intact copy {c.key} is indexed instead")
            problems.append(Problem(
                "stray file", c.key,
                f"a copy of {uid}, whose indexed file is damaged or missing: "
                + ("indexed" if c is same and repair else "kept"), c is same and repair))
        return
    newest = max(c.modified for c in copies)
    latest = [c for c in copies if c.modified == newest]
    if len(latest) > 1:
        for c in copies:
            problems.append(Problem("stray file", c.key, f"{uid} is not indexed and"
                                    f" {len(latest)} copies are equally new: kept; import the"
                                    " right one"))
        return
    chosen = latest[0]
    if repair and chosen.key in removal.pending_keys():  # deleted since verify began
        problems.append(Problem("deleted instance's file", chosen.key,
                                f"{uid} was deleted while verify ran: left to the delete"))
        return
    if repair:
        try:
            archive.index_file(chosen.key)
        except StorageError as exc:
            problems.append(Problem("stray file", chosen.key,
                                    f"{uid} is not indexed; indexing it failed: {exc}"))
            return
    problems.append(Problem("stray file", chosen.key, f"{uid} is not indexed"
                            + (": indexed where it is" if repair else ""), repair))
    for c in copies:
        if c is not chosen:
            if repair:
                archive.files.delete(c.key)
            problems.append(Problem("stray file", c.key, f"an older copy of {uid}"
                                    + (": removed" if repair else ""), repair))


COUNT_PAGE = 200
"""Patients recounted per write transaction by ``verify``: the index's write lock (every
node's, on PostgreSQL) is held for one page at a time, not for the whole archive."""


def _counters(archive: MaintainedArchive, repair: bool) -> list[Problem]:
    """Recount every study from its rows, a page of patients per transaction; compare
    with the stored counters (each page's before and after read in its transaction)."""
    found: dict[str, tuple[Any, Any]] = {}
    last = 0
    while True:
        patients = [p.id for p in Patient.select(Patient.id).where(Patient.id > last)
                    .order_by(Patient.id).limit(COUNT_PAGE)]
        if not patients:
            break
        last = patients[-1]
        with archive.writing(commit=repair):
            studies = {s.id for s in Study.select(Study.id).where(Study.patient.in_(patients))}
            before = _counter_snapshot(patients, studies)
            index.recompute_counters(studies)
            after = _counter_snapshot(patients, studies)
        for key in set(before) | set(after):
            if before.get(key) != after.get(key):
                found[key] = (before.get(key), after.get(key))
    return [Problem("counter", key, f"stored {found[key][0]}, recounted {found[key][1]}",
                    repair) for key in sorted(found)]


def _counter_snapshot(patients: list[int], studies: set[int]) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for p in Patient.select(Patient.patient_key, Patient.num_studies, Patient.num_series,
                            Patient.num_instances).where(Patient.id.in_(patients)):
        snap[f"patient {p.patient_key}"] = (p.num_studies, p.num_series, p.num_instances)
    for s in Study.select(Study.study_instance_uid, Study.num_series, Study.num_instances,
                          Study.modalities, Study.sop_classes).where(Study.id.in_(list(studies))):
        snap[f"study {s.study_instance_uid}"] = (
            s.num_series, s.num_instances, set(s.modalities.split("\\")) - {""},
            set(s.sop_classes.split("\\")) - {""})
    for r in Series.select(Series.series_instance_uid, Series.num_instances).where(
            Series.study.in_(list(studies))):
        snap[f"series {r.series_instance_uid}"] = r.num_instances
    return snap


@dataclass
class ImportReport:
    """What ``import`` or ``reindex`` did with each file."""

    stored: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def import_folder(archive: MaintainedArchive, folder: Path, progress: Progress | None = None
                  ) -> ImportReport:
    """Store every file under ``folder`` through the C-STORE path (files that are not
    DICOM Part 10 files are rejected and listed)."""
    def store(path: Path) -> bool:
        with open(path, "rb") as fp:  # look at the first bytes before reading it all
            if fp.read(132)[128:] != b"DICM":
                raise InvalidInstance("not a DICOM Part 10 file (no DICM after the preamble)")
        syntax, data = split_part10(path.read_bytes())
        result = archive.store(data, syntax).result
        return result in (WriteResult.IDENTICAL, WriteResult.KEPT)

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return _tally(paths, store, progress)


def index_missing(archive: MaintainedArchive, progress: Progress | None = None
                  ) -> ImportReport:
    """``reindex --missing``: index the files no row names, where they are, newest first,
    leaving the index as it is, so that serving nodes go on meanwhile. The files of deleted
    instances not yet removed are left alone, and so are those younger than the store's
    ``settle_seconds`` (a store another node is committing). An instance already indexed
    from another file stays as it is (a duplicate, for ``verify --repair``)."""
    keys = set(archive.files.keys())
    named = {r.file_key for r in Instance.select(Instance.file_key)}
    others = _settled(archive, keys - named - removal.pending_keys())

    def index_one(key: str) -> bool:
        if PendingRemoval.select().where(PendingRemoval.file_key == key).exists():
            return True  # deleted since the listing: the delete removes it
        return archive.index_file(key) is WriteResult.KEPT

    return _tally(sorted(others, key=lambda k: -_modified(archive, k)), index_one, progress)


def reindex(archive: MaintainedArchive, progress: Progress | None = None) -> ImportReport:
    """Rebuild the index from the file store, every file indexed where it is.

    The files the index named are indexed first, so that what was acknowledged last stays
    current; then the others, newest first. A file of an instance already indexed from
    another file is left alone (counted as a duplicate; ``verify --repair`` removes it once
    the indexed file is known to be intact). Nothing is deleted, and the files of deleted
    instances not yet removed (``pending_removal``) are not indexed again: ``verify
    --repair`` or the next ``delete`` removes them.
    """
    keys = set(archive.files.keys())
    current = {r.file_key for r in Instance.select(Instance.file_key)} & keys
    deleted = removal.pending_keys()
    others = sorted(keys - current - deleted, key=lambda k: -_modified(archive, k))
    with archive.writing():
        for model in (Instance, Series, Study, Patient):
            model.delete().execute()
    return _tally([*sorted(current), *others],
                  lambda key: archive.index_file(key) is WriteResult.KEPT, progress)


def _modified(archive: MaintainedArchive, key: str) -> float:
    try:
        return archive.files.modified(key)
    except OSError:
        return 0.0


def _tally(items: list[Any], action: Callable[[Any], bool], progress: Progress | None
           ) -> ImportReport:
    """Run ``action`` on each item (``True``: a duplicate; an error: rejected), counting."""
    report = ImportReport()
    for n, item in enumerate(items, start=1):
        try:
            duplicate = action(item)
        except (OSError, StorageError) as exc:
            report.rejected.append((str(item), str(exc)))
        else:
            if duplicate:
                report.duplicates += 1
            else:
                report.stored += 1
        if progress:
            progress(n, len(items))
    return report


__all__ = ["ImportReport", "Problem", "VerifyReport", "import_folder", "index_missing",
           "reindex", "verify"]
