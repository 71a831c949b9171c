"""Group commit: the stores in flight made durable and indexed together.

A store's own work (parsing its header, writing its file under a temporary name) runs in
the caller's thread. What must happen one after the other and costs a disk flush each
(fsync the file, rename it into place, fsync its folder, commit the index transaction with
``synchronous=FULL``) is done by one committer thread for every store that is waiting at
that moment: the files of a batch are fsync'd (on ext4 the first fsync commits the journal
for all of them), renamed, their folders fsync'd once, and the batch is indexed in one
transaction, each instance in its own savepoint so that one refused instance (a duplicate
under ``storage.on_duplicate: reject``) fails alone. The promises of DESIGN.md's C-STORE
data flow hold for each instance: its outcome is given only after its file is durable and
the transaction that indexes it has committed; if the file or the index cannot be written
the new file is removed; a file replaced, or one a resend made redundant, is removed only
after the commit.

A single store waits for nothing: the committer takes whatever is queued when it wakes.
Parallel C-STORE associations, parallel STOW-RS requests and the parts of one STOW-RS
request (:meth:`storage.Archive.submit` does not wait) share the flushes.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import peewee as pw

from . import index
from .errors import StorageError, StorageFull
from .files import FileStore, Staged
from .index import DuplicatePolicy, InstanceRecord, WriteOutcome, WriteResult

logger = logging.getLogger(__name__)

MAX_BATCH = 256
"""Most instances indexed in one transaction."""


@dataclass
class Pending:
    """A store waiting for the committer: its staged file and its index record."""

    staged: Staged
    record: InstanceRecord
    future: Future[WriteOutcome] = field(default_factory=Future)


class GroupCommit:
    """The committer thread of one archive (started with the first store).

    Parameters
    ----------
    files : FileStore
        Where the staged files are published.
    policy : DuplicatePolicy
        ``storage.on_duplicate``.
    write_lock : threading.Lock
        The archive's lock around index writes (maintenance writes take it too).
    """

    def __init__(self, files: FileStore, policy: DuplicatePolicy,
                 write_lock: threading.Lock) -> None:
        self.files = files
        self.policy = policy
        self.write_lock = write_lock
        self._queue: collections.deque[Pending] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, staged: Staged, record: InstanceRecord) -> Future[WriteOutcome]:
        """Queue a staged file and its record; the future gives the index's
        :class:`~storage.index.WriteOutcome` once the file is durable and the transaction
        committed, or the :class:`~storage.errors.StorageError` that kept it from being
        stored (its file is then removed).

        Raises
        ------
        StorageError
            The archive is closed (the staged file is removed).
        """
        pending = Pending(staged, record)
        with self._wake:
            if self._closing:
                self.files.abandon(staged)
                raise StorageError("the archive is closed")
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="minipacs-commit",
                                                daemon=True)
                self._thread.start()
            self._queue.append(pending)
            self._wake.notify()
        return pending.future

    def close(self) -> None:
        """Commit what is queued, then stop the thread (idempotent)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._closing:
                        self._wake.wait()
                    if not self._queue:
                        return
                    batch = [self._queue.popleft()
                             for _ in range(min(len(self._queue), MAX_BATCH))]
                self._commit(batch)
        finally:
            index.close()  # this thread's connection goes back to the pool

    def _commit(self, batch: list[Pending]) -> None:
        """Publish the batch's files, index them in one transaction, settle each future."""
        try:
            errors = self.files.publish([p.staged for p in batch])
            published = [p for p, error in zip(batch, errors, strict=True) if error is None]
            for p, error in zip(batch, errors, strict=True):
                if error is not None:
                    p.future.set_exception(error)
            if published:
                self._index(published)
        except BaseException as exc:  # noqa: BLE001 - no store may wait for ever
            logger.exception("group commit of %d instances failed", len(batch))
            for p in batch:
                if not p.future.done():
                    self._discard(p.staged.key)
                    p.future.set_exception(exc)

    def _index(self, batch: list[Pending]) -> None:
        """One transaction, one savepoint per instance (DESIGN.md, C-STORE step 3)."""
        outcomes: list[WriteOutcome | BaseException] = []
        try:
            with self.write_lock, index.write_transaction():
                for p in batch:
                    try:
                        outcomes.append(index.write_instance(p.record, self.policy))
                    except StorageError as exc:  # this instance only (its savepoint)
                        outcomes.append(exc)
                    except pw.DatabaseError as exc:
                        outcomes.append(StorageFull(f"cannot write to the index: {exc}"))
        except pw.DatabaseError as exc:  # the transaction (its commit) failed: none stored
            failure = StorageFull(f"cannot write to the index: {exc}")
            for p in batch:
                self._discard(p.staged.key)
                p.future.set_exception(failure)
            return
        # committed: from here on nothing may turn an answer into a failure
        for p, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                self._discard(p.staged.key)
                p.future.set_exception(outcome)
                continue
            if outcome.result in (WriteResult.IDENTICAL, WriteResult.KEPT):
                self._discard(p.staged.key)
            if outcome.old_file_key:
                self._discard(outcome.old_file_key)
            p.future.set_result(outcome)

    def _discard(self, key: str) -> None:
        """Remove a file no index row points to; a failure is logged (``verify`` finds it)."""
        try:
            self.files.delete(key)
        except OSError as exc:
            logger.error("cannot remove unreferenced file %s: %s", key, exc)


__all__ = ["MAX_BATCH", "GroupCommit", "Pending"]
