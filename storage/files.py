"""The file store: DICOM files kept under opaque keys, written atomically.

Like Orthanc's ``IStorageArea``, the store knows nothing of DICOM: it puts bytes under a
key it makes up, opens and deletes them. Keys are random hex strings (never a UID from the
network, which is untrusted input) and are fanned out as ``ab/cd/<key>`` so no folder grows
too large. A write goes to a temporary file inside the store, is fsync'd, renamed into place
with :func:`os.replace` and the folder is fsync'd, so a crash leaves either no file or the
whole file under its key.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from .errors import StorageError, StorageFull, StoreInUse

_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
TEMP_DIR = "tmp"
LOCK_FILE = ".lock"


class FileStore(Protocol):
    """What the archive needs of a place to keep files."""

    def put(self, chunks: Iterable[bytes]) -> str:
        """Write the chunks as one new file and return its key."""
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
        before it started the workers.
    """

    def __init__(self, root: Path, fsync: bool = True, shared: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.shared = shared
        self._lock_fd: int | None = None
        self._durable: set[Path] = set()  # fan-out folders whose own entries were fsync'd
        self._durable_lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock()
            (self.root / TEMP_DIR).mkdir(exist_ok=True)
            # what a crash left half-written is no one's file: no index row points to it
            for leftover in [] if shared else (self.root / TEMP_DIR).glob("*.part"):
                leftover.unlink()
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot use {self.root} as the file store: {exc}") from exc

    def _lock(self) -> None:
        """Take the store for this process alone, or with the other workers of one server
        when shared (``flock`` on ``<root>/.lock``, released by :meth:`close` or when the
        process dies, even by SIGKILL).

        A server, ``verify``, ``reindex`` and ``import`` each assume that no one else
        writes: ``verify`` would take a file being written for a stray, or remove another
        process's temporary file.
        """
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUse(
                f"{self.root} is in use by another minipacs process (a server, verify,"
                " reindex or import): stop it first"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Give the store back (idempotent)."""
        fd, self._lock_fd = self._lock_fd, None
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
        """Write ``chunks`` to a new file and return its key.

        Raises
        ------
        StorageFull
            When the file cannot be written (no space, read-only, I/O error); nothing is
            left behind.
        """
        key = new_key()
        final = self.path(key)
        tmp = self.root / TEMP_DIR / f"{key}.part"
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
                self._make_folder_durable(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageFull(f"cannot write to the file store: {exc.strerror or exc}") from exc
        return key

    def _make_folder_durable(self, folder: Path) -> None:
        """fsync the entries of ``ab/`` and ``ab/cd/`` once per folder and process.

        Whichever thread created a folder, no put into it returns before the folder's own
        entry is on disk: a thread that finds it unmarked fsyncs the chain itself.
        """
        with self._durable_lock:
            if folder in self._durable:
                return
        _fsync_dir(folder.parent)
        _fsync_dir(self.root)
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


FOLDER_MINUTES = 1
"""Minutes during which new files go to one ``ab/cd`` folder (see :func:`new_key`)."""


def new_key(now: float | None = None) -> str:
    """A new file key: 32 hex digits, the first four from the current minute (so they cycle
    through the 65,536 ``ab/cd`` folders in 45 days), the other 112 bits random.

    Files stored together share a folder: a random first four would make nearly every file
    of the first tens of thousands create its folder, and a new folder costs a mkdir and two
    more fsyncs (its own entry, and its parent's) before the store may answer.
    """
    minute = int((time.time() if now is None else now) // (60 * FOLDER_MINUTES))
    return f"{minute & 0xFFFF:04x}{uuid.uuid4().hex[4:]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
