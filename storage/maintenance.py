"""Checking and repairing the archive: ``verify [--repair]``, ``reindex`` and ``import``.

The index is authoritative for what was acknowledged; the file store holds the bytes.
After a crash the two can disagree in ways :meth:`Archive.store`'s ordering allows and
nothing else: a file written but not yet indexed (the sender got no Success), or a file
replaced by a newer one but not yet removed. ``verify`` also finds what only damage can
cause: a row whose file is gone or changed, and counters that do not match the rows.

- :func:`verify` checks every index row against its file (exists, size, SHA-256 of the
  stored transfer syntax and data set, as :meth:`Archive.store` computed it), finds
  files no row points to, and recounts every study, series and patient. With ``repair``
  it removes rows whose file is gone, removes a stray file whose SOP Instance is indexed
  under another file (the index wins), indexes a stray file whose instance is not indexed
  (through the C-STORE path), and rewrites the counters. A file whose content changed is
  reported, never deleted.
- :func:`reindex` rebuilds the whole index from the files.
- :func:`import_folder` stores every DICOM file of a folder through the C-STORE path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import index
from .errors import StorageError
from .index import WriteResult
from .models import Instance, Patient, Series, Study
from .parsing import content_hash, extract, read_header, split_part10

if TYPE_CHECKING:  # pragma: no cover
    from .archive import Archive

logger = logging.getLogger(__name__)

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
    archive: Archive, repair: bool = False, progress: Progress | None = None
) -> VerifyReport:
    """Check the index against the file store, and with ``repair`` make them agree."""
    report = VerifyReport()
    files = archive.files
    keys = set(files.keys())
    report.files = len(keys)
    total = Instance.select().count() + len(keys)
    done = 0
    gone: list[int] = []
    studies: set[int] = set()
    indexed_keys: set[str] = set()
    for row in _rows():
        report.instances += 1
        indexed_keys.add(row.file_key)
        problem = _check_row(archive, row, row.file_key in keys)
        if problem is not None:
            if problem.kind == "missing file":
                gone.append(row.id)
                studies.add(row.study_id)
                problem = Problem(problem.kind, problem.subject, problem.detail, repair)
            report.problems.append(problem)
        done += 1
        if progress:
            progress(done, total)
    if repair and gone:
        with archive.writing():
            for start in range(0, len(gone), _PAGE):
                Instance.delete().where(Instance.id.in_(gone[start:start + _PAGE])).execute()
            index.recompute_counters(studies)
    for key in sorted(keys - indexed_keys):
        report.problems.append(_stray(archive, key, repair))
        done += 1
        if progress:
            progress(done, total)
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


def _check_row(archive: Archive, row: Any, present: bool) -> Problem | None:
    uid = row.sop_instance_uid
    if not present:
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


def _stray(archive: Archive, key: str, repair: bool) -> Problem:
    """A file no row points to: an instance stored but not yet indexed when the server
    stopped (never acknowledged), or one replaced but not yet removed."""
    try:
        with archive.files.open(key) as fp:
            syntax, data = split_part10(fp.read())
        uid = extract(read_header(data, syntax)).sop_instance_uid
    except (OSError, StorageError) as exc:
        return Problem("stray file", key, f"not readable as a stored instance: {exc}; kept")
    if index.lookup(uid) is not None:
        if repair:
            archive.files.delete(key)
        return Problem("stray file", key, f"{uid} is indexed under another file: removed"
                       if repair else f"{uid} is indexed under another file", repair)
    if repair:
        archive.store(data, syntax)  # written anew through the C-STORE path, then indexed
        archive.files.delete(key)
    return Problem("stray file", key, f"{uid} is not indexed"
                   + (": indexed it" if repair else ""), repair)


def _counters(archive: Archive, repair: bool) -> list[Problem]:
    """Recount every study from its rows; compare with the stored counters."""
    before = _counter_snapshot()
    with archive.writing(commit=repair):
        index.recompute_counters({s.id for s in Study.select(Study.id)})
        after = _counter_snapshot()
    problems = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            problems.append(Problem("counter", key,
                                    f"stored {before.get(key)}, recounted {after.get(key)}",
                                    repair))
    return problems


def _counter_snapshot() -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for p in Patient.select(Patient.patient_key, Patient.num_studies, Patient.num_series,
                            Patient.num_instances):
        snap[f"patient {p.patient_key}"] = (p.num_studies, p.num_series, p.num_instances)
    for s in Study.select(Study.study_instance_uid, Study.num_series, Study.num_instances,
                          Study.modalities, Study.sop_classes):
        snap[f"study {s.study_instance_uid}"] = (
            s.num_series, s.num_instances, set(s.modalities.split("\\")) - {""},
            set(s.sop_classes.split("\\")) - {""})
    for r in Series.select(Series.series_instance_uid, Series.num_instances):
        snap[f"series {r.series_instance_uid}"] = r.num_instances
    return snap


@dataclass
class ImportReport:
    """What ``import`` or ``reindex`` did with each file."""

    stored: int = 0
    duplicates: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def import_folder(archive: Archive, folder: Path, progress: Progress | None = None
                  ) -> ImportReport:
    """Store every file under ``folder`` through the C-STORE path (files that are not
    DICOM Part 10 files are rejected and listed)."""
    def store(path: Path) -> bool:
        syntax, data = split_part10(path.read_bytes())
        result = archive.store(data, syntax).result
        return result in (WriteResult.IDENTICAL, WriteResult.KEPT)

    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return _tally(paths, store, progress)


def reindex(archive: Archive, progress: Progress | None = None) -> ImportReport:
    """Rebuild the index from the file store: every row is removed, then every file is
    indexed where it is (oldest first, so that of two files of one instance the newer
    wins, as it did when it replaced the other; the older is removed)."""
    keys = _by_age(archive, archive.files.keys())
    with archive.writing():
        for model in (Instance, Series, Study, Patient):
            model.delete().execute()
    return _tally(keys, lambda key: archive.index_file(key) is WriteResult.REPLACED, progress)


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


def _by_age(archive: Archive, keys: Iterable[str]) -> list[str]:
    def mtime(key: str) -> float:
        try:
            return archive.files.modified(key)
        except OSError:
            return 0.0
    return sorted(keys, key=lambda k: (mtime(k), k))


__all__ = ["ImportReport", "Problem", "VerifyReport", "import_folder", "reindex", "verify"]
