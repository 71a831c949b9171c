"""Deleting instances: the index rows first, in one transaction, then the files.

A delete selects instances by PatientID, Study, Series or SOP Instance UID (any mix: the
union; :mod:`storage.selection`), and then:

1. in one write transaction, records each selected file in ``pending_removal``, deletes
   the instance rows, and recounts what held them (:func:`storage.index.recompute_counters`,
   which also removes the series, studies and patients left empty): once it commits, no
   query and no retrieve sees the instances, and each can be stored again;
2. removes the files, then their ``pending_removal`` rows.

A crash between the two leaves files that ``pending_removal`` names: the next delete
removes them first (:func:`finish`), and ``verify --repair`` does too, rather than take
them for instances nobody indexed and index them again.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from . import index
from .errors import StorageError
from .files import FileStore
from .models import Instance, Patient, PendingRemoval, Series, Study
from .selection import Selection
from .selection import rows as selected_rows

logger = logging.getLogger(__name__)

_CHUNK = 500
"""Rows per statement (SQLite allows 32,766 variables; PostgreSQL more)."""


@dataclass(frozen=True)
class StudyPart:
    """A study with instances selected: what ``--dry-run`` lists."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    study_date: str
    selected: int
    held: int


@dataclass
class Deletion:
    """What a delete did (or, dry, would do); :attr:`studies_selected` and
    :attr:`file_keys` are a plan's (:func:`plan`), the files' outcome a delete's."""

    instances: int = 0
    series: int = 0
    studies: int = 0
    patients: int = 0
    studies_selected: list[StudyPart] = field(default_factory=list)
    files_removed: int = 0
    files_left: list[str] = field(default_factory=list)
    file_keys: frozenset[str] = frozenset()
    """The files of the instances listed (:func:`plan`): what a confirmed delete may
    remove (``only``), nothing stored since."""


def plan(selection: Selection) -> Deletion:
    """What :func:`delete` would delete, per study, without changing anything."""
    deletion = Deletion()
    per_study: dict[int, int] = {}
    keys: set[str] = set()
    for key, _, study_id, _ in selected_rows(selection):
        per_study[study_id] = per_study.get(study_id, 0) + 1
        keys.add(key)
    deletion.instances = sum(per_study.values())
    deletion.file_keys = frozenset(keys)
    for start in range(0, len(per_study), _CHUNK):
        ids = list(per_study)[start:start + _CHUNK]
        rows: Any = (Study.select(Study.id, Study.study_instance_uid, Study.study_date,
                             Study.num_instances, Patient.patient_id, Patient.patient_name)
                .join(Patient).where(Study.id.in_(ids)).order_by(Study.id).dicts())
        for row in rows:
            deletion.studies_selected.append(StudyPart(
                row["patient_id"], row["patient_name"], row["study_instance_uid"],
                row["study_date"], per_study[row["id"]], row["num_instances"]))
    return deletion


def delete(selection: Selection, files: FileStore,
           writing: Callable[[], AbstractContextManager[None]],
           only: Collection[str] | None = None, tidy: bool = True) -> Deletion:
    """Delete the selected instances (index first, in one ``writing()`` transaction, then
    the files; see the module). A file that cannot be removed stays in
    ``pending_removal`` and is listed in :attr:`Deletion.files_left`. ``only``: delete
    no instance but those whose file is one of these (the :attr:`Deletion.file_keys` of
    the plan someone confirmed: what was stored or replaced since stays). ``tidy``: first
    remove the files earlier deletes left (:func:`finish`; it reads every instance's
    file key, so a caller deleting many studies in a row does it once).

    Raises
    ------
    StorageError
        The index cannot be written: nothing was deleted.
    """
    if not selection:
        raise StorageError("nothing selected: name a patient, study, series or instance")
    if tidy:
        finish(files, writing)  # what an earlier delete left
    deletion = Deletion()
    try:
        # every other writer waits (storage.index.write_transaction): a store committing
        # into a study between this recount and its commit would leave a counter short
        with writing():
            rows = [row for row in selected_rows(selection)
                    if only is None or row[0] in only]
            keys = [(key, uid) for key, uid, _, _ in rows]
            series_ids = {series_id for *_, series_id in rows}
            study_ids = {study_id for _, _, study_id, _ in rows}
            patient_ids = _patients_of(study_ids)
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            for chunk in _chunks(keys):
                PendingRemoval.insert_many(
                    [(key, uid, now) for key, uid in chunk],
                    fields=[PendingRemoval.file_key, PendingRemoval.sop_instance_uid,
                            PendingRemoval.queued_at]).execute()
                Instance.delete().where(Instance.file_key.in_([k for k, _ in chunk])).execute()
            index.recompute_counters(study_ids)
            deletion.instances = len(rows)
            deletion.series = len(series_ids) - _existing(Series, series_ids)
            deletion.studies = len(study_ids) - _existing(Study, study_ids)
            deletion.patients = len(patient_ids) - _existing(Patient, patient_ids)
    except pw.DatabaseError as exc:
        raise StorageError(f"cannot write the index: {exc}; nothing was deleted") from exc
    for key, uid in keys:
        logger.info("deleted %s (file %s)", uid, key)
    deletion.files_removed, deletion.files_left = _remove(files, [k for k, _ in keys], writing)
    return deletion


def finish(files: FileStore, writing: Callable[[], AbstractContextManager[None]]
           ) -> tuple[int, list[str]]:
    """Remove the files an earlier delete could not (a crash, an I/O error): how many were
    removed, and the keys still left. A file an instance row names again (``reindex``
    indexed it meanwhile) is that instance's now: only its pending row goes."""
    live = [row.file_key for row in PendingRemoval.select(PendingRemoval.file_key).where(
        PendingRemoval.file_key.in_(Instance.select(Instance.file_key)))]
    if live:
        logger.warning("%d file(s) of deleted instances are indexed again (reindex?): kept",
                       len(live))
        forget(live, writing)
    keys = list(pending_keys())
    return _remove(files, keys, writing) if keys else (0, [])


def pending_keys() -> set[str]:
    """The files of deleted instances not yet removed that no instance row names."""
    return {row.file_key for row in PendingRemoval.select(PendingRemoval.file_key).where(
        PendingRemoval.file_key.not_in(Instance.select(Instance.file_key)))}


def forget(keys: list[str], writing: Callable[[], AbstractContextManager[None]]) -> None:
    """Drop the ``pending_removal`` rows of files that are gone."""
    with writing():
        for chunk in _chunks(keys):
            PendingRemoval.delete().where(PendingRemoval.file_key.in_(chunk)).execute()


def _remove(files: FileStore, keys: list[str],
            writing: Callable[[], AbstractContextManager[None]]) -> tuple[int, list[str]]:
    removed: list[str] = []
    left: list[str] = []
    for key in keys:
        try:
            if index.names_file(key):  # indexed again meanwhile (verify, reindex): keep it
                removed.append(key)  # only its pending row goes
                continue
            files.delete(key)  # a file already gone is not an error
        except (OSError, StorageError) as exc:
            logger.error("cannot remove the file %s of a deleted instance: %s; "
                         "verify --repair or the next delete retries", key, exc)
            left.append(key)
            continue
        removed.append(key)
    try:
        forget(removed, writing)
    except pw.DatabaseError as exc:  # the files are gone; the rows name nothing now
        logger.warning("cannot drop %d pending_removal rows: %s", len(removed), exc)
    return len(removed), left


def _patients_of(study_ids: set[int]) -> set[int]:
    found: set[int] = set()
    for chunk in _chunks(list(study_ids)):
        rows: Any = Study.select(Study.patient).where(Study.id.in_(chunk))
        found |= {row[0] for row in rows.tuples()}
    return found


def _existing(model: Any, ids: set[int]) -> int:
    return sum(model.select().where(model.id.in_(chunk)).count()
               for chunk in _chunks(list(ids)))


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start:start + _CHUNK]
