"""The object store: DICOM files kept in an S3-compatible bucket, through obstore.

The same :class:`~storage.files.FileStore` as the local folder, with the same promises
(DESIGN.md, C-STORE): keys are ours (never a UID from the network), an object is written
whole by one PUT (or a multipart upload that completes at once) before the index commits,
and a replaced object is removed only after the new one is committed. A crash between the
PUT and the commit leaves an object no row names: ``verify --repair`` lists the bucket and
removes it, or indexes it when it holds an instance the index lacks, once it is older than
:attr:`ObjectStore.settle_seconds` (other nodes may be between the two steps of their own
stores).

Why obstore and not boto3 (bench/README.md, "Object store clients"): on this workload (a
PUT and GETs of 10 kB to 500 kB objects from server threads) boto3 spent 1.3-2.4 ms of
Python CPU per request against obstore's 0.16-0.8 ms, which does its HTTP and signing in
Rust outside the GIL. minipacs retrieves at about 170 us of CPU per instance: boto3 alone
would have cost more than the whole rest of a C-MOVE.

The node still has a local folder (``<data_dir>/files``): its lock files (one server per
folder) and ``tmp/``, where incoming objects too large for memory are spooled before their
PUT. It is a :class:`~storage.files.FilesystemStore` that this store wraps.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import itertools
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import obstore
from obstore.store import S3Store

from .errors import StorageError, StorageFull
from .files import _KEY_RE, FilesystemStore, Staged, new_key

logger = logging.getLogger(__name__)

IN_MEMORY_BYTES = 8 * 2**20
"""Objects up to this size are PUT from memory; larger ones are spooled to the local
``tmp/`` first and uploaded from there in parts (a 2 GB multi-frame never sits in memory)."""
READ_AHEAD = 2**20
"""Bytes one ranged GET reads ahead when a file is read a little at a time; the first GET
of an object reads this much, so most objects (a CT slice is 0.5 MB) take one request."""
SEEK_AHEAD = 64 * 1024
"""Bytes a GET reads after a seek away from the window (then doubling while reads go on
from there): fragment headers 2 MB apart cost 64 kB each, not a megabyte."""
BUFFER = 64 * 1024
"""The buffer of the reader :meth:`ObjectStore.open` returns (in memory, over the window)."""
READ_ALL_BYTES = 16 * 2**20
"""Bytes per GET when a file is read to its end at once (``verify``, ``reindex``)."""
PUT_THREADS = 16
"""PUTs of one group commit sent at once (:meth:`ObjectStore.publish`)."""
PART_UPLOADS = 4
"""Parts of one multipart upload (a spooled instance over :data:`IN_MEMORY_BYTES`) sent at
once: each holds a 5 MB part in memory (obstore's default of 12 held 66 MB per upload)."""
SETTLE_SECONDS = 3600.0
"""How old an object no index row names must be before ``verify`` takes it for a stray:
another node may be between its PUT and its commit (seconds to minutes while the index is
unreachable; never near an hour, since its store then fails and removes the object)."""
HEALTH_NAME = "minipacs-health-check"
"""What :meth:`ObjectStore.check` asks the store for (never an object of ours)."""
TIMEOUT = "30s"
CONNECT_TIMEOUT = "5s"
"""Per request: an unreachable store fails a C-STORE with A700 in seconds, not minutes."""


class ObjectStoreError(OSError):
    """The object store refused or could not be reached (an OSError, as a file system's
    failures are, so that every caller's handling of an unreadable file applies)."""


@dataclass(frozen=True)
class S3Options:
    """How to reach an S3-compatible store (``storage.s3_*``); empty values come from the
    standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_REGION``, ``AWS_ENDPOINT_URL``)."""

    endpoint: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end).

    Raises
    ------
    StorageError
        Not an s3:// URL, or no bucket.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise StorageError(f"not an object store URL (s3://bucket/prefix): {url!r}")
    return parts.netloc, parts.path.strip("/")


def is_object_url(url: str) -> bool:
    """Whether ``storage.files_url`` names an object store rather than a folder."""
    return url.startswith("s3://")


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``storage.s3_endpoint`` is not ``http(s)://host[:port]``, or None."""
    if not endpoint:
        return None
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be http://host[:port] or https://host[:port], not {endpoint!r}"
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return f"has a port that is not a number: {endpoint!r}"
    return None


def files_url_problem(url: str) -> str | None:
    """Why ``storage.files_url`` is neither a folder nor an object store URL, or None."""
    if is_object_url(url):
        try:
            parse_url(url)
        except StorageError as exc:
            return str(exc)
    elif "://" in url:
        return f"neither a folder nor an s3://bucket/prefix URL: {url!r}"
    return None


def _short(exc: BaseException) -> str:
    """obstore's message without its debug dump: its first line."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _failing(what: str) -> Iterator[None]:
    """Raise what goes wrong inside as :class:`ObjectStoreError` ("<what>: <why>"); a
    missing object stays a :class:`FileNotFoundError`, which obstore raises. A panic of
    obstore's Rust code (``pyo3_runtime.PanicException``, not an Exception) too."""
    try:
        yield
    except FileNotFoundError:
        raise
    except BaseException as exc:  # obstore's errors, its OSErrors, and a Rust panic
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        raise ObjectStoreError(f"{what}: {_short(exc)}") from exc


class ObjectStore:
    """A :class:`~storage.files.FileStore` in an S3-compatible bucket.

    Parameters
    ----------
    url : str
        ``s3://bucket/prefix``: objects are named ``<prefix>/<key>``.
    options : S3Options
        Endpoint, region and credentials.
    local : FilesystemStore
        The node's local folder: its locks, and the spool of large objects.
    settle_seconds : float
        See :data:`SETTLE_SECONDS`.
    """

    def __init__(self, url: str, options: S3Options, local: FilesystemStore,
                 settle_seconds: float = SETTLE_SECONDS) -> None:
        self.url = url
        self.local = local
        self.settle_seconds = settle_seconds
        bucket, prefix = parse_url(url)
        config: Any = {}
        for name, value in (("endpoint", options.endpoint), ("region", options.region),
                            ("access_key_id", options.access_key_id),
                            ("secret_access_key", options.secret_access_key)):
            if value:
                config[name] = value
        client: Any = {"timeout": TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
        endpoint = (options.endpoint or os.environ.get("AWS_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT") or "")
        why = endpoint_problem(endpoint)
        if why:
            local.close()
            raise StorageError(f"cannot use {url} as the file store: its endpoint {why}")
        if endpoint.startswith("http://"):  # a store on the node's own network
            client["allow_http"] = True
        retry: Any = {"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=20),
                      "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                                  "max_backoff": datetime.timedelta(seconds=2), "base": 2.0}}
        try:
            self._store = S3Store(bucket, prefix=prefix or None, config=config,
                                  client_options=client, retry_config=retry)
        except Exception as exc:  # noqa: BLE001 - obstore's configuration errors
            local.close()
            raise StorageError(f"cannot use {url} as the file store: {_short(exc)}") from exc
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        """Hold ``chunks`` for :meth:`publish`: in memory up to :data:`IN_MEMORY_BYTES`,
        else spooled to the local ``tmp/``."""
        held: list[bytes] = []
        size = 0
        iterator = iter(chunks)
        for chunk in iterator:
            held.append(chunk)
            size += len(chunk)
            if size > IN_MEMORY_BYTES:
                spooled = self.local.stage(itertools.chain(held, iterator))
                return Staged(spooled.key, spooled.temp)
        return Staged(new_key(), None, b"".join(held))

    def publish(self, staged: Sequence[Staged]) -> list[StorageFull | None]:
        """PUT each staged object (several at once); per object, the error that kept it
        from being stored, else None. A spooled object's local file is removed either way."""
        if len(staged) == 1:
            return [self._put(staged[0])]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PUT_THREADS, "minipacs-put")
            pool = self._pool
        failing: list[StorageFull] = []
        return list(pool.map(lambda item: self._put(item, failing), staged))

    def _put(self, item: Staged, failing: list[StorageFull] | None = None) -> StorageFull | None:
        """PUT one staged object. ``failing`` (shared by a batch): once one PUT of the batch
        failed, those not yet begun fail at once with its error instead of each waiting out
        a store that does not answer (:data:`TIMEOUT` apiece)."""
        try:
            if failing:
                return failing[0]
            source: Any = item.data if item.data is not None else item.temp
            obstore.put(self._store, self._name(item.key), source,
                        max_concurrency=PART_UPLOADS)
        except BaseException as exc:  # obstore's errors, OSErrors, and a Rust panic
            if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            error = StorageFull(f"cannot write to the object store: {_short(exc)}")
            if failing is not None:
                failing.append(error)
            return error
        finally:
            self.abandon(item)
        return None

    def put(self, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` as one new object and return its key.

        Raises
        ------
        StorageFull
            The PUT failed.
        """
        staged = self.stage(chunks)
        (error,) = self.publish([staged])
        if error is not None:
            raise error
        return staged.key

    def abandon(self, staged: Staged) -> None:
        """Forget a staged object: remove its local spool file, if any."""
        if staged.temp is not None:
            self.local.abandon(staged)

    # -- reading and the rest ----------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """Open the object ``key`` for reading: ranged GETs of :data:`READ_AHEAD` bytes as
        it is read (memory stays flat whatever its size).

        Raises
        ------
        FileNotFoundError
            No such object.
        ObjectStoreError
            The store could not be read.
        """
        name = self._name(key)
        with _failing(f"cannot read {key} from the object store"):
            first = obstore.get(self._store, name, options={"range": (0, READ_AHEAD)})
            size = int(first.meta["size"])
            head = memoryview(first.bytes())
        raw = _RangedObject(self._store, name, size, head)
        return io.BufferedReader(raw, buffer_size=BUFFER)

    def delete(self, key: str) -> None:
        """Remove the object ``key``; a missing one is not an error."""
        with contextlib.suppress(FileNotFoundError), _failing(
                f"cannot remove {key} from the object store"):
            obstore.delete(self._store, self._name(key))

    def _head(self, key: str) -> Any:
        with _failing(f"cannot read {key} in the object store"):
            return obstore.head(self._store, self._name(key))

    def size(self, key: str) -> int:
        """The object's size in bytes."""
        return int(self._head(key)["size"])

    def modified(self, key: str) -> float:
        """When the object was written (seconds since the epoch)."""
        return float(self._head(key)["last_modified"].timestamp())

    def keys(self) -> Iterator[str]:
        """Every key in the bucket's prefix (objects whose names are not our keys are left
        out: a bucket may hold other things)."""
        for name, _ in self.listing():
            yield name

    def listing(self) -> Iterator[tuple[str, float]]:
        """Every key with the time its object was written (one LIST per 1,000)."""
        with _failing("cannot list the object store"):
            for page in obstore.list(self._store, chunk_size=1000):
                for meta in page:
                    name = str(meta["path"])
                    if _KEY_RE.match(name):
                        yield name, float(meta["last_modified"].timestamp())

    def check(self) -> None:
        """Raise :class:`ObjectStoreError` unless the store answers: a HEAD of a name that
        is never one of our keys, to which "not found" is the healthy answer; and the
        node's local folder can be written."""
        self.local.check()
        with contextlib.suppress(FileNotFoundError), _failing("the object store"):
            obstore.head(self._store, HEALTH_NAME)

    def close(self) -> None:
        """Give the store back (idempotent)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        self.local.close()

    def _name(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise StorageError(f"not a file store key: {key!r}")
        return key


class _RangedObject(io.RawIOBase):
    """An object read by ranged GETs, through a window of what the last GET brought: its
    first :data:`READ_AHEAD` bytes at first. Reading on where the window ends doubles the
    next GET's read-ahead up to :data:`READ_AHEAD`; a read elsewhere (a seek: walking a
    multi-frame's fragments to one frame) fetches only :data:`SEEK_AHEAD`."""

    def __init__(self, store: S3Store, name: str, size: int, head: memoryview) -> None:
        super().__init__()
        self.name = name  # what a file's name is to a reader (pydicom's dcmread asks)
        self._store = store
        self._name = name
        self._size = size
        self._start, self._window = 0, head
        self._ahead = READ_AHEAD
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        wanted = min(len(out), self._size - self._pos)
        if wanted <= 0:
            return 0
        offset = self._pos - self._start
        if not 0 <= offset < len(self._window):
            self._fill(wanted)
            offset = 0
        got = min(wanted, len(self._window) - offset)
        out[:got] = self._window[offset:offset + got]
        self._pos += got
        return got

    def _fill(self, wanted: int) -> None:
        """GET at least ``wanted`` bytes from the position, with read-ahead."""
        sequential = self._pos == self._start + len(self._window)
        self._ahead = min(self._ahead * 2, READ_AHEAD) if sequential else SEEK_AHEAD
        length = min(max(wanted, self._ahead), self._size - self._pos)
        with _failing(f"cannot read {self._name} from the object store"):
            data = memoryview(obstore.get_range(self._store, self._name, start=self._pos,
                                                length=length))
        if not len(data):
            raise ObjectStoreError(f"cannot read {self._name} from the object store: no"
                                   f" bytes at {self._pos} of {self._size}")
        self._start, self._window = self._pos, data

    def readall(self) -> bytes:
        """The rest of the object, in GETs of :data:`READ_ALL_BYTES` (io's own readall
        would ask for 8 kB at a time)."""
        parts = []
        while self._pos < self._size:
            buffer = bytearray(min(READ_ALL_BYTES, self._size - self._pos))
            got = self.readinto(buffer)
            if not got:
                break
            parts.append(bytes(buffer[:got]))
        return b"".join(parts)

    def close(self) -> None:
        self._window = memoryview(b"")
        super().close()


__all__ = ["IN_MEMORY_BYTES", "ObjectStore", "ObjectStoreError", "S3Options",
           "endpoint_problem", "files_url_problem", "is_object_url", "parse_url"]
