"""Moving the files to another store while the servers go on: ``storage.files_previous_url``
and ``minipacs migrate-files``.

1. Every node is given the new store as ``storage.files_url`` and the old one as
   ``storage.files_previous_url``, and restarted (one at a time behind a balancer). New
   files go to the new store; a file the new store does not have is read from the old one
   (:class:`FallbackStore`); a delete removes it from both.
2. ``minipacs migrate-files --to URL`` lists the old store and moves each file: it copies
   it to the new store under the same key, reads the copy back and compares its SHA-256
   with the original's (both hashed as they stream, so memory stays flat whatever the
   size), then removes the original. The index rows need no change: a key names the same
   file in either store. A kill leaves each file in one store or both (then the next run
   checks the copy and removes the original), so running it again resumes.
3. When it reports nothing left, ``files_previous_url`` is taken out again.

A file a server deletes (or replaces) while its copy is being made: the copy is removed
again once the original is found gone (a server deletes from the new store first, then the
old one).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from .errors import StorageError, StorageFull
from .files import FileStore, Staged

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

CHUNK = 2**20
"""Bytes read at a time while a file is copied and hashed."""


class FallbackStore:
    """The new store, with the old one behind it for the files not moved yet: writes go to
    the new one; a read the new one cannot answer is answered by the old; a delete removes
    from both. Listing (``verify``) covers the new store only."""

    def __init__(self, current: FileStore, previous: FileStore) -> None:
        self.current = current
        self.previous = previous
        self.settle_seconds = current.settle_seconds

    def put(self, chunks: Iterable[bytes]) -> str:
        return self.current.put(chunks)

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        return self.current.stage(chunks)

    def publish(self, staged: Sequence[Staged]) -> list[StorageFull | None]:
        return self.current.publish(staged)

    def abandon(self, staged: Staged) -> None:
        self.current.abandon(staged)

    def open(self, key: str) -> BinaryIO:
        return self._either(lambda store: store.open(key))

    def delete(self, key: str) -> None:
        self.current.delete(key)
        self.previous.delete(key)

    def size(self, key: str) -> int:
        return self._either(lambda store: store.size(key))

    def modified(self, key: str) -> float:
        return self._either(lambda store: store.modified(key))

    def _either(self, read: Callable[[FileStore], _T]) -> _T:
        """``read`` from the new store, else from the old one, else from the new one again
        (moved in between: ``migrate-files`` publishes the copy before it removes the
        original)."""
        try:
            return read(self.current)
        except FileNotFoundError:
            pass
        try:
            return read(self.previous)
        except FileNotFoundError:
            return read(self.current)

    def keys(self) -> Iterator[str]:
        return self.current.keys()

    def check(self) -> None:
        self.current.check()
        self.previous.check()

    def close(self) -> None:
        try:
            self.current.close()
        finally:
            self.previous.close()


@dataclass
class MoveReport:
    """What ``migrate-files`` did."""

    moved: int = 0
    already: int = 0  # copied by an earlier, interrupted run: checked, original removed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (key, why)

    @property
    def left(self) -> int:
        return len(self.failed)


def move_files(source: FileStore, target: FileStore,
               progress: Callable[[int, int], None] | None = None) -> MoveReport:
    """Move every file of ``source`` to ``target`` under its key (see the module's text).

    Raises
    ------
    StorageError
        ``source`` cannot be listed.
    """
    report = MoveReport()
    try:
        keys = sorted(source.keys())
    except OSError as exc:
        raise StorageError(f"cannot list the store the files move from: {exc}") from exc
    for n, key in enumerate(keys, start=1):
        try:
            if _copy_checked(source, target, key):
                report.moved += 1
            else:
                report.already += 1
            source.delete(key)
        except FileNotFoundError:
            pass  # deleted by a server since the listing: nothing to move
        except (OSError, StorageError) as exc:
            logger.error("migrate-files: %s was not moved: %s", key, exc)
            report.failed.append((key, str(exc)))
        if progress:
            progress(n, len(keys))
    return report


def _copy_checked(source: FileStore, target: FileStore, key: str) -> bool:
    """Copy ``key`` unless ``target`` already holds an identical copy; True when copied.

    Raises
    ------
    StorageError
        The copy does not have the original's SHA-256 (it is removed again).
    """
    original = _sha256(source, key)
    try:
        if _sha256(target, key) == original:
            return False  # an interrupted run copied it already
    except FileNotFoundError:
        pass
    with source.open(key) as fp:
        target_publish(target, key, _chunks(fp))
    if _sha256(target, key) != original:
        target.delete(key)
        raise StorageError(f"the copy of {key} differs from the original (SHA-256): removed;"
                           " the original is kept")
    try:
        source.size(key)
    except FileNotFoundError:  # deleted while it was copied (a server deletes the new
        target.delete(key)     # store's first, then the old): the copy must go too
        raise
    return True


def target_publish(target: FileStore, key: str, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` to ``target`` under ``key`` (not a new key: the index rows keep
    theirs)."""
    staged = target.stage(chunks)
    staged = Staged(key, staged.temp, staged.data)
    (error,) = target.publish([staged])
    if error is not None:
        raise error


def _sha256(store: FileStore, key: str) -> str:
    digest = hashlib.sha256()
    with store.open(key) as fp:
        for chunk in _chunks(fp):
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(fp: Any) -> Iterator[bytes]:
    while chunk := fp.read(CHUNK):
        yield chunk


__all__ = ["FallbackStore", "MoveReport", "move_files"]
