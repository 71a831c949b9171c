"""``minipacs export``: stored instances written out as a DICOM File-set (PS3.10: Part 10
files under a DICOMDIR, made by pydicom's :class:`~pydicom.fileset.FileSet`), as stored or
de-identified by a profile (:mod:`storage.deidentify`). The stored originals never change:
each instance is read, de-identified in memory and written into the folder."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.fileset import FileSet

from .errors import StorageError, Withheld
from .index import StoredInstance


class Source(Protocol):
    """What :func:`export` reads instances with (:class:`storage.Archive`)."""

    def read_instance(self, item: StoredInstance,
                      accepted: Collection[str] | None = None) -> Dataset: ...

    def read_deidentified(self, item: StoredInstance, profile: str,
                          accepted: Collection[str] | None = None) -> Dataset: ...

DIRECTORY_PLACEHOLDERS = {"StudyDate": "19000101", "StudyTime": "000000", "StudyID": "1",
                          "SeriesNumber": "1", "InstanceNumber": "1"}
"""What a DICOMDIR's records need (PS3.3 F.5: Type 1 there, Type 2 or emptied by
de-identification in an instance): an instance without one is written with this
placeholder. Table E.1-1a's ``Z`` allows a dummy value in place of an empty one."""


@dataclass
class Exported:
    """What :func:`export` wrote, withheld and could not write."""

    directory: Path
    profile: str
    written: list[tuple[str, str]] = field(default_factory=list)
    """(stored SOP Instance UID, the one written): the same unless de-identified."""
    withheld: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Instance UID, why): burned-in annotation (:func:`~storage.deidentify.burned_in`)."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Instance UID, why): unreadable, or not to be described in a DICOMDIR."""


def export(archive: Source, items: Iterable[StoredInstance], directory: Path,
           profile: str = "", progress: Callable[[int, int], None] | None = None) -> Exported:
    """Write ``items`` into ``directory`` (new, or empty) as a File-set.

    Raises
    ------
    StorageError
        ``directory`` is not an empty folder, or the File-set cannot be written there.
    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise StorageError(f"export: {directory} is not an empty folder")
    items = list(items)
    done = Exported(directory, profile)
    file_set = FileSet()
    for n, item in enumerate(items, 1):
        uid = item.sop_instance_uid
        try:
            ds = (archive.read_deidentified(item, profile) if profile
                  else archive.read_instance(item))
        except Withheld as exc:
            done.withheld.append((uid, str(exc)))
            continue
        except StorageError as exc:  # unreadable, or not to be de-identified (big endian)
            done.failed.append((uid, str(exc)))
            continue
        _fill_for_directory(ds)
        try:
            file_set.add(ds)
        except (ValueError, KeyError, AttributeError) as exc:  # a record it cannot make
            done.failed.append((uid, f"not written: {exc}"))
            continue
        done.written.append((uid, str(ds.SOPInstanceUID)))
        if progress is not None:
            progress(n, len(items))
    if progress is not None:
        progress(len(items), len(items))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        file_set.write(directory)
    except (OSError, ValueError) as exc:
        raise StorageError(f"export: the File-set cannot be written to {directory}: "
                           f"{exc}") from exc
    return done


def _fill_for_directory(ds: Dataset) -> None:
    for keyword, placeholder in DIRECTORY_PLACEHOLDERS.items():
        if not ds.get(keyword):
            setattr(ds, keyword, placeholder)
