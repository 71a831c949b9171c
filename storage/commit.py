"""Group commit: the stores in flight made durable and indexed together.

A store's own work (parsing its header, writing its file under a temporary name) runs in
the caller's thread. What must happen one after the other and costs a disk flush each
(fsync the file, rename it into place, fsync its folder, commit the index transaction with
``synchronous=FULL``) is done by one committer thread for every store that is waiting at
that moment: the files of a batch are fsync'd (on ext4 the first fsync commits the journal
for all of them), renamed, their folders fsync'd once, and the batch is indexed in one
transaction; one refused instance (a duplicate under ``storage.on_duplicate: reject``)
fails alone, and a database error fails the transaction, after which its instances are
indexed again one per transaction. The promises of DESIGN.md's C-STORE
data flow hold for each instance: its outcome is given only after its file is durable and
the transaction that indexes it has committed; if the file or the index cannot be written
the new file is removed; a file replaced, or one a resend made redundant, is removed only
after the commit.

A single store waits for nothing: the committer takes whatever is queued when it wakes.
Parallel C-STORE associations, parallel STOW-RS requests and the parts of one STOW-RS
request (:meth:`storage.Archive.submit` does not wait) share the flushes.

A caller that waits for its store anyway (a C-STORE: :meth:`storage.Archive.store`) commits
in its own thread instead (:meth:`GroupCommit.commit_now`): whoever holds the commit lock
commits everything queued, its own store and the others', so the flushes are still shared,
and the store costs no wake-up of the committer thread and no wake-up back (small
instances over one association: 354 -> 411 inst/s, bench/README.md "Ingest after the
receive path").
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import peewee as pw

from . import index, outbox
from .errors import StorageError, StorageFull
from .files import FileStore, Staged
from .index import DuplicatePolicy, InstanceRecord, WriteOutcome, WriteResult

logger = logging.getLogger(__name__)

MAX_BATCH = 256
"""Most instances indexed in one transaction."""

ROUTED = (WriteResult.STORED, WriteResult.REPLACED)
"""The outcomes that queue an instance for routing: new content (an identical resend, or
one kept out by ``on_duplicate: keep``, is not sent again)."""


@dataclass
class Pending:
    """A store waiting for the committer: its staged file, its index record, and where
    routing must send it (queued in the outbox in the same transaction)."""

    staged: Staged
    record: InstanceRecord
    targets: list[outbox.Target] = field(default_factory=list)
    future: Future[WriteOutcome] = field(default_factory=Future)


class GroupCommit:
    """The group commit of one archive: the callers of :meth:`commit_now`, and a committer
    thread for the stores that do not wait (started with the first :meth:`submit` that
    wakes it).

    Parameters
    ----------
    files : FileStore
        Where the staged files are published.
    policy : DuplicatePolicy
        ``storage.on_duplicate``.
    write_lock : threading.Lock
        The archive's lock around index writes (maintenance writes take it too).
    routed : callable, optional
        Called after a commit that queued something in the outbox.
    """

    def __init__(self, files: FileStore, policy: DuplicatePolicy,
                 write_lock: threading.Lock,
                 routed: Callable[[], None] = lambda: None) -> None:
        self.files = files
        self.policy = policy
        self.write_lock = write_lock
        self.routed = routed
        self._queue: collections.deque[Pending] = collections.deque()
        self._wake = threading.Condition()  # guards _queue, _thread and _closing
        self._committing = threading.Lock()  # held by whoever commits a batch
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, staged: Staged, record: InstanceRecord, *, wake: bool = True,
               targets: list[outbox.Target] | None = None) -> Future[WriteOutcome]:
        """Queue a staged file and its record (and the routing ``targets`` to queue it
        for once it is indexed, unless it was a duplicate); the future gives the index's
        :class:`~storage.index.WriteOutcome` once the file is durable and the transaction
        committed, or the :class:`~storage.errors.StorageError` that kept it from being
        stored (its file is then removed).

        ``wake=False``: the caller commits it with :meth:`commit_now` (the committer thread
        is not woken for it, though it may take it with others).

        Raises
        ------
        StorageError
            The archive is closed (the staged file is removed).
        """
        pending = Pending(staged, record, targets or [])
        with self._wake:
            if self._closing:
                self.files.abandon(staged)
                raise StorageError("the archive is closed")
            self._queue.append(pending)
            if wake:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="minipacs-commit",
                                                    daemon=True)
                    self._thread.start()
                self._wake.notify()
        return pending.future

    def commit_now(self, settled: Future[Any]) -> None:
        """Commit in this thread until ``settled`` (a store's future, or one settled by its
        callbacks) is done: take the commit lock, commit everything queued, again until
        it is. One store waiting alone costs no thread hand-off; stores in parallel wait
        for the lock, and the next holder commits all that queued meanwhile."""
        while not settled.done():
            with self._committing:
                if settled.done():
                    return
                batch = self._take()
                if not batch:  # settled by no one: not a queued store's future
                    return
                self._commit(batch)

    def close(self) -> None:
        """Commit what is queued, then stop the thread (idempotent)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._committing:  # stores queued for commit_now whose caller has not run it
            while batch := self._take():
                self._commit(batch)

    def _take(self) -> list[Pending]:
        """The next batch: what is queued, up to :data:`MAX_BATCH`."""
        with self._wake:
            return [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._closing:
                        self._wake.wait()
                    if not self._queue:
                        return
                with self._committing:
                    batch = self._take()
                    if batch:
                        self._commit(batch)
        finally:
            index.close()  # this thread's connection goes back to the pool

    def _commit(self, batch: list[Pending]) -> None:
        """Publish the batch's files, index them, settle each future; no store may wait for
        ever, whatever fails: what interrupts the committing thread itself (SystemExit,
        KeyboardInterrupt) fails the batch's unsettled stores before it goes on (their
        files stay: the transaction may have committed; ``verify`` settles them)."""
        try:
            self._publish_and_index(batch)
        except BaseException:
            interrupted = StorageFull("the commit was interrupted")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(interrupted)
            raise

    def _publish_and_index(self, batch: list[Pending]) -> None:
        try:
            errors = self.files.publish([p.staged for p in batch])
        except Exception as exc:  # noqa: BLE001 - a fault of ours: every store fails
            logger.exception("publishing %d files failed", len(batch))
            self._fail(batch, StorageFull(f"cannot write to the file store: {exc}"))
            return
        published = []
        for p, error in zip(batch, errors, strict=True):
            if error is None:
                published.append(p)
            else:
                p.future.set_exception(error)
        if published:
            self._index(published)

    def _index(self, batch: list[Pending]) -> None:
        """Index the batch in one transaction (DESIGN.md, C-STORE step 3), then settle.

        A refused duplicate (:class:`~storage.errors.StorageError` from
        :func:`storage.index.write_instance`, raised before it writes anything) fails
        alone. Any database error ends the transaction: SQLite may have rolled all of it
        back already (SQLITE_FULL, SQLITE_IOERR, SQLITE_BUSY, an interrupt), and nothing
        of it may be committed piecemeal; a batch of several is then indexed again one
        instance per transaction, as single stores are, so that only the instance at
        fault fails.
        """
        try:
            with self.write_lock, index.write_transaction():
                outcomes = [self._write(p) for p in batch]
                routed = any(p.targets for p, o in zip(batch, outcomes, strict=True)
                             if not isinstance(o, StorageError) and o.result in ROUTED)
        except pw.DatabaseError as exc:
            if len(batch) > 1:
                logger.warning("group commit of %d instances failed (%s); indexing them"
                               " one by one", len(batch), exc)
                for p in batch:
                    self._index([p])
                return
            self._fail(batch, StorageFull(f"cannot write to the index: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - a fault of ours: none was committed
            logger.exception("indexing %d instances failed", len(batch))
            self._fail(batch, StorageFull(f"cannot write to the index: {exc}"))
            return
        # committed: from here on nothing may turn an answer into a failure, nor remove
        # a file a committed row names
        if routed:
            try:
                self.routed()
            except Exception:  # noqa: BLE001 - the senders poll anyway
                logger.exception("waking the routing senders failed")
        for p, outcome in zip(batch, outcomes, strict=True):
            try:
                if isinstance(outcome, StorageError):
                    self._discard(p.staged.key, unless_named=True)
                    p.future.set_exception(outcome)
                    continue
                if outcome.result in (WriteResult.IDENTICAL, WriteResult.KEPT):
                    # unless a row names it: this batch is indexed again one by one after a
                    # COMMIT that failed to say it succeeded, and finds its own rows there
                    self._discard(p.staged.key, unless_named=True)
                if outcome.old_file_key:
                    self._discard(outcome.old_file_key)
                p.future.set_result(outcome)
            except Exception:  # noqa: BLE001 - logged; the other stores are settled
                logger.exception("settling a committed store failed")

    def _write(self, pending: Pending) -> WriteOutcome | StorageError:
        """One instance's rows (and its outbox rows when it is new content), or the
        duplicate refusal that wrote none."""
        try:
            outcome = index.write_instance(pending.record, self.policy)
        except StorageError as exc:
            return exc
        if pending.targets and outcome.result in ROUTED:
            outbox.enqueue(pending.targets, pending.record.instance["sop_instance_uid"],
                           pending.record.study["study_instance_uid"])
        return outcome

    def _fail(self, batch: list[Pending], error: StorageError) -> None:
        """Nothing of ``batch`` was indexed, as far as the database said: remove its files
        (unless a row names one after all: a COMMIT can succeed and still report an error,
        when the connection to PostgreSQL breaks during it), fail each store."""
        for p in batch:
            self.files.abandon(p.staged)
            self._discard(p.staged.key, unless_named=True)
            if not p.future.done():
                p.future.set_exception(error)

    def _discard(self, key: str, unless_named: bool = False) -> None:
        """Remove a file no index row points to; a failure is logged (``verify`` finds it).
        ``unless_named``: first make sure no row names it; when that cannot be known (the
        index is down), the file is left for ``verify``."""
        try:
            if unless_named and index.names_file(key):
                return
        except Exception as exc:  # noqa: BLE001 - the index cannot be read
            logger.warning("file %s is left for verify: whether the index names it cannot be"
                           " read (%s)", key, exc)
            return
        try:
            self.files.delete(key)
        except Exception as exc:  # noqa: BLE001 - an OSError, or a key that is not ours
            logger.error("cannot remove unreferenced file %s: %s", key, exc)


__all__ = ["MAX_BATCH", "GroupCommit", "Pending"]
