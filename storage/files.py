"""The file store: DICOM files kept under opaque keys, written atomically.

Like Orthanc's ``IStorageArea``, the store knows nothing of DICOM: it puts bytes under a
key it makes up, opens and deletes them. Keys are random hex strings (never a UID from the
network, which is untrusted input) and are fanned out as ``ab/cd/<key>`` so no folder grows
too large. A write goes to a temporary file inside the store, is fsync'd, renamed into place
with :func:`os.replace` and the folder is fsync'd, so a crash leaves either no file or the
whole file under its key.

A write has two steps, so that many files can be made durable together (the archive's
group commit, :mod:`storage.commit`): :meth:`FilesystemStore.stage` writes the temporary
file, :meth:`FilesystemStore.publish` fsyncs a batch of them, renames each into place and
fsyncs each folder once. :meth:`FilesystemStore.put` is both for one file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import StorageError, StorageFull, StoreInUse

logger = logging.getLogger(__name__)
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
FSYNC_THREADS = 8
"""Threads that fsync the files of one group commit together (:meth:`FilesystemStore.publish`)."""
TEMP_DIR = "tmp"
LOCK_FILE = ".lock"
SERVER_LOCK = ".server.lock"
"""Held (exclusively) by the one server of a store: a single-process server
(``serving``), or the supervisor of ``ae.workers`` processes."""


@dataclass(frozen=True)
class Staged:
    """A file written by :meth:`FileStore.stage`, not yet durable nor under its key: in a
    temporary file, or (an object store's small objects) in memory."""

    key: str
    temp: Path | None
    data: bytes | None = None


class FileStore(Protocol):
    """What the archive needs of a place to keep files."""

    settle_seconds: float
    """How old a file no index row names must be before ``verify`` takes it for a stray:
    0 where ``verify`` has the store to itself, longer where other nodes share it."""

    def put(self, chunks: Iterable[bytes]) -> str:
        """Write the chunks as one new file and return its key."""
        ...

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        """Write the chunks as one new file, not yet durable nor readable under its key."""
        ...

    def publish(self, staged: Sequence[Staged]) -> list[StorageFull | None]:
        """Make staged files durable under their keys; per file, the error that kept it
        from being published (it is then gone), else None."""
        ...

    def abandon(self, staged: Staged) -> None:
        """Remove a staged file that will not be published."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open the file under ``key`` for reading."""
        ...

    def delete(self, key: str) -> None:
        """Remove the file under ``key``; a missing file is not an error."""
        ...

    def size(self, key: str) -> int:
        """Return the size in bytes of the file under ``key``."""
        ...

    def keys(self) -> Iterator[str]:
        """Yield the key of every file in the store."""
        ...

    def modified(self, key: str) -> float:
        """When the file under ``key`` was written (seconds since the epoch)."""
        ...

    def check(self) -> None:
        """Raise the :class:`OSError` that keeps the store from being used, if any (a
        load balancer's health check, :meth:`storage.Archive.health`)."""
        ...

    def close(self) -> None:
        """Give the store back."""
        ...


class FilesystemStore:
    """A :class:`FileStore` on a local folder.

    Parameters
    ----------
    root : pathlib.Path
        The folder; created when missing.
    fsync : bool
        Whether to fsync each file and its folder before :meth:`put` returns. Turning it off
        trades durability on power loss for speed (``storage.durability: relaxed``).
    shared : bool
        Several server processes use the store at once (``ae.workers``): the lock is shared
        (maintenance commands, which take it alone, are still kept out), and temporary files
        are not swept, since another process may be writing them; the supervisor swept them
        before it started the workers. A ``delete`` takes the store shared too: it removes
        files, and writes none.
    serving : bool
        The store of a single-process server: it holds :data:`SERVER_LOCK` (a second server
        is kept out) and ``.lock`` shared, so that ``delete`` can run beside it while
        ``verify``, ``reindex`` and ``import`` still cannot; it sweeps temporary files,
        which no other process writes meanwhile.
    """

    settle_seconds = 0.0

    def __init__(self, root: Path, fsync: bool = True, shared: bool = False,
                 serving: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.shared = shared
        self.serving = serving
        self._lock_fd: int | None = None
        self._server_fd: int | None = None
        self._durable: set[Path] = set()  # fan-out folders whose own entries were fsync'd
        self._durable_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # fsyncs of a batch (_fsync_files)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            alone = self._lock()
            (self.root / TEMP_DIR).mkdir(exist_ok=True)
            # what a crash left half-written is no one's file: no index row points to it
            for leftover in (self.root / TEMP_DIR).glob("*.part") if alone else []:
                leftover.unlink()
            if alone and serving and self._lock_fd is not None:  # swept: now shared
                fcntl.flock(self._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot use {self.root} as the file store: {exc}") from exc

    def _lock(self) -> bool:
        """Take the store for this process alone, or with the other workers of one server
        when shared (``flock`` on ``<root>/.lock``, released by :meth:`close` or when the
        process dies, even by SIGKILL).

        ``verify``, ``reindex`` and ``import`` each assume that no one else writes:
        ``verify`` would take a file being written for a stray, or remove another process's
        temporary file. A server (``serving``) and ``delete`` take it shared. A server
        takes it alone first when it can, to sweep temporary files, then shares it; when a
        ``delete`` (or a worker of a server killed a moment ago) holds it, it starts
        without sweeping.

        Returns whether the store is this process's alone (temporary files may be swept).
        """
        if self.serving:
            self._server_fd = server_lock(self.root)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.serving:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._lock_fd = fd
                    return True
                except BlockingIOError:
                    logger.info("%s is shared with a delete or a stopping server: temporary"
                                " files are not swept this time", self.root)
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared or self.serving else fcntl.LOCK_EX)
                        | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.close()  # the server lock too
            raise StoreInUse(
                f"{self.root} is in use by another minipacs process (a server, verify,"
                " reindex or import): stop it first"
            ) from None
        self._lock_fd = fd
        return not (self.shared or self.serving)

    def close(self) -> None:
        """Give the store back (idempotent)."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown()
        for name in ("_lock_fd", "_server_fd"):
            fd = getattr(self, name, None)
            setattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def path(self, key: str) -> Path:
        """Return the path of ``key``, refusing anything that is not a key we made."""
        if not _KEY_RE.match(key):
            raise StorageError(f"not a file store key: {key!r}")
        return self.root / key[0:2] / key[2:4] / key

    def put(self, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` to a new file and return its key (:meth:`stage`, then
        :meth:`publish`).

        Raises
        ------
        StorageFull
            When the file cannot be written (no space, read-only, I/O error); nothing is
            left behind.
        """
        staged = self.stage(chunks)
        (error,) = self.publish([staged])
        if error is not None:
            raise error
        return staged.key

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        """Write ``chunks`` to a new temporary file in the store, not fsync'd yet.

        Raises
        ------
        StorageFull
            When the file cannot be written; nothing is left behind.
        """
        key = new_key()
        tmp = self.root / TEMP_DIR / f"{key}.part"
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageFull(f"cannot write to the file store: {exc.strerror or exc}") from exc
        return Staged(key, tmp)

    def publish(self, staged: Sequence[Staged]) -> list[StorageFull | None]:
        """Make ``staged`` files durable under their keys: fsync them (several at once,
        :meth:`_fsync_files`), rename each into place, then fsync each folder once (and a
        new folder's own entry, see :meth:`_make_folder_durable`). A crash before the
        folder's fsync leaves either no file or a whole one under the key, and no index row
        yet points to it.

        Returns, per file, the error that kept it from being published (the file is then
        removed), else None.
        """
        errors: list[StorageFull | None] = [None] * len(staged)
        synced = self._fsync_files([_temp(item) for item in staged]) if self.fsync else None
        placed: dict[Path, list[int]] = {}
        for i, item in enumerate(staged):
            final = self.path(item.key)
            failure = synced[i] if synced is not None else None
            try:
                if failure is not None:
                    raise failure
                if final.parent not in placed:
                    final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(_temp(item), final)
            except OSError as exc:
                self.abandon(item)
                errors[i] = StorageFull(
                    f"cannot write to the file store: {exc.strerror or exc}")
                continue
            placed.setdefault(final.parent, []).append(i)
        if self.fsync:
            for folder, members in placed.items():
                try:
                    _fsync(folder)
                    self._make_folder_durable(folder)
                except OSError as exc:
                    for i in members:
                        with contextlib.suppress(OSError):
                            self.delete(staged[i].key)
                        errors[i] = StorageFull(
                            f"cannot write to the file store: {exc.strerror or exc}")
        return errors

    def _fsync_files(self, paths: list[Path]) -> list[OSError | None]:
        """fsync each file; several at once from a few threads, which the file system
        then flushes together (on ext4, one file after another costs a journal commit
        each). Per file, the error, else None."""
        if len(paths) == 1:
            return [_fsync_error(paths[0])]
        with self._durable_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(FSYNC_THREADS, "minipacs-fsync")
            pool = self._pool
        return list(pool.map(_fsync_error, paths))

    def abandon(self, staged: Staged) -> None:
        """Remove a staged file that will not be published (missing is not an error)."""
        if staged.temp is not None:
            with contextlib.suppress(OSError):
                staged.temp.unlink()

    def _make_folder_durable(self, folder: Path) -> None:
        """fsync the entries of ``ab/`` and ``ab/cd/`` once per folder and process.

        Whichever thread created a folder, no put into it returns before the folder's own
        entry is on disk: a thread that finds it unmarked fsyncs the chain itself.
        """
        with self._durable_lock:
            if folder in self._durable:
                return
        _fsync(folder.parent)
        _fsync(self.root)
        with self._durable_lock:
            self._durable.add(folder)

    def open(self, key: str) -> BinaryIO:
        """Open the file under ``key`` for reading in binary mode."""
        return open(self.path(key), "rb")

    def delete(self, key: str) -> None:
        """Remove the file under ``key`` if it is there."""
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def size(self, key: str) -> int:
        """Return the size of the file under ``key``."""
        return self.path(key).stat().st_size

    def keys(self) -> Iterator[str]:
        """Yield every key in the store (for verify and reindex)."""
        for path in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*"):
            if _KEY_RE.match(path.name):
                yield path.name

    def modified(self, key: str) -> float:
        """The file's modification time (reindex: of two files of one instance, the newer
        wins)."""
        return self.path(key).stat().st_mtime

    def check(self) -> None:
        """Raise an OSError unless the folder can be written (its ``tmp/``)."""
        folder = self.root / TEMP_DIR
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(f"{folder} cannot be written")


FOLDER_MINUTES = 1
"""Minutes during which new files go to one ``ab/cd`` folder (see :func:`new_key`)."""


def server_lock(root: Path) -> int:
    """Take :data:`SERVER_LOCK` of the store at ``root`` (its file descriptor; closing it
    gives the lock back).

    Raises
    ------
    StoreInUse
        Another server holds it.
    """
    fd = os.open(Path(root) / SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUse(f"{root} is in use by another minipacs server: stop it first"
                         ) from None
    return fd


def new_key(now: float | None = None) -> str:
    """A new file key: 32 hex digits, the first four from the current minute (so they cycle
    through the 65,536 ``ab/cd`` folders in 45 days), the other 112 bits random.

    Files stored together share a folder: a random first four would make nearly every file
    of the first tens of thousands create its folder, and a new folder costs a mkdir and two
    more fsyncs (its own entry, and its parent's) before the store may answer.
    """
    minute = int((time.time() if now is None else now) // (60 * FOLDER_MINUTES))
    return f"{minute & 0xFFFF:04x}{uuid.uuid4().hex[4:]}"


def _temp(staged: Staged) -> Path:
    """The temporary file of a file staged by :meth:`FilesystemStore.stage`."""
    if staged.temp is None:
        raise StorageError(f"{staged.key} was not staged to a file")
    return staged.temp


def _fsync_error(path: Path) -> OSError | None:
    """:func:`_fsync` the file at ``path``; the error instead of raising it."""
    try:
        _fsync(path)
    except OSError as exc:
        return exc
    return None


def _fsync(path: Path) -> None:
    """fsync the file or folder at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
