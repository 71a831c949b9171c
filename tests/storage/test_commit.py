"""The group commit (storage/commit.py): stores in flight share their fsyncs and one index
transaction, yet each succeeds or fails on its own, only once its file is durable and
indexed."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peewee
import pytest
from pydicom.dataset import Dataset

from storage import (
    Archive,
    ArchiveOptions,
    DuplicatePolicy,
    DuplicateRejected,
    StorageError,
    StorageFull,
    WriteResult,
    index,
    open_archive,
)
from storage.files import FilesystemStore
from storage.index import InstanceRecord
from storage.models import database_proxy
from storage.parsing import extract
from tests.factory import encode, expected_table, make_ds, study_counts, uid
from tests.storage.test_archive import stored_files, study_query

TS = "1.2.840.10008.1.2.1"


def _archive(tmp_path: Path, **options: object) -> Archive:
    return open_archive(ArchiveOptions(files_path=tmp_path / "files",
                                       index_url=f"sqlite:///{tmp_path / 'index.sqlite'}",
                                       **options))  # type: ignore[arg-type]


def _counts(archive: Archive) -> dict[str, tuple[int, ...]]:
    return {r.StudyInstanceUID: study_counts(r) for r in study_query(archive)}


def _temp_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "files" / "tmp").iterdir())


def test_a_refused_instance_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """Stores queued while the index is busy are indexed together; a duplicate the index
    refuses (``on_duplicate: reject``, found only inside the transaction, since both
    arrived before either was indexed) fails alone, and its file goes."""
    archive = _archive(tmp_path, on_duplicate=DuplicatePolicy.REJECT)
    try:
        first = make_ds(SeriesDescription="first")
        other = make_ds(SOPInstanceUID=first.SOPInstanceUID,
                        StudyInstanceUID=first.StudyInstanceUID,
                        SeriesInstanceUID=first.SeriesInstanceUID, SeriesDescription="other")
        third = make_ds(StudyInstanceUID=first.StudyInstanceUID,
                        SeriesInstanceUID=first.SeriesInstanceUID)
        with archive.writing():  # the committer waits for the index meanwhile
            pending = [archive.submit(encode(ds), TS) for ds in (first, other, third)]
            assert not any(p.future.done() for p in pending)
        assert pending[0].result().result is WriteResult.STORED
        with pytest.raises(DuplicateRejected):
            pending[1].result()
        assert pending[2].result().result is WriteResult.STORED
        assert _counts(archive) == expected_table([first, third])
        assert len(stored_files(tmp_path)) == 2
        assert not _temp_files(tmp_path)
    finally:
        archive.close()


def test_parallel_stores_are_each_durable_and_counted(tmp_path: Path) -> None:
    """Eight threads storing at once: every outcome is STORED, every file is there, and
    the counters are exact."""
    archive = _archive(tmp_path)
    study = make_ds()
    series = [study.SeriesInstanceUID if t % 2 else uid() for t in range(8)]
    datasets: list[list[Dataset]] = [
        [make_ds(StudyInstanceUID=study.StudyInstanceUID, SeriesInstanceUID=series[t])
         for _ in range(15)] for t in range(8)]
    results: list[WriteResult] = []
    errors: list[BaseException] = []

    def send(batch: list[Dataset]) -> None:
        try:
            for ds in batch:
                results.append(archive.store(encode(ds), TS).result)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(batch,)) for batch in datasets]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert results == [WriteResult.STORED] * 120
        every = [ds for batch in datasets for ds in batch]
        assert _counts(archive) == expected_table(every)
        assert len(stored_files(tmp_path)) == 120
    finally:
        archive.close()


def test_close_commits_what_is_queued(tmp_path: Path) -> None:
    """Closing the archive waits for the stores handed to the committer."""
    archive = _archive(tmp_path)
    datasets = [make_ds() for _ in range(6)]
    with archive.writing():
        pending = [archive.submit(encode(ds), TS) for ds in datasets]
    archive.close()
    assert [p.future.result(timeout=0).result for p in pending] == [WriteResult.STORED] * 6
    reopened = _archive(tmp_path)
    try:
        assert _counts(reopened) == expected_table(datasets)
    finally:
        reopened.close()


def test_a_store_after_close_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    archive.close()
    with pytest.raises(StorageError, match="closed"):
        archive.submit(encode(make_ds()), TS)
    assert not _temp_files(tmp_path)
    assert not stored_files(tmp_path)


def test_a_file_that_cannot_be_published_fails_alone(tmp_path: Path) -> None:
    """One staged file whose fsync or rename fails (here: its temporary file is gone)
    gets its own error; the others of the batch are published under their keys."""
    store = FilesystemStore(tmp_path / "files")
    try:
        staged = [store.stage([b"x" * n]) for n in (10, 20, 30)]
        staged[1].temp.unlink()
        errors = store.publish(staged)
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], StorageFull)
        assert store.size(staged[0].key) == 10 and store.size(staged[2].key) == 30
        assert not store.path(staged[1].key).exists()
        assert not _temp_files(tmp_path)
    finally:
        store.close()


def test_stores_of_one_uid_are_indexed_in_the_order_submitted(tmp_path: Path) -> None:
    """Two stores of one SOP Instance UID in flight (two parts of one STOW-RS request):
    the second is not answered from the index before the first is in it, so the last one
    submitted is what stays (``on_duplicate: replace``), as when stored one by one."""
    archive = _archive(tmp_path)
    try:
        x = make_ds(SeriesDescription="X")
        y = make_ds(SOPInstanceUID=x.SOPInstanceUID, StudyInstanceUID=x.StudyInstanceUID,
                    SeriesInstanceUID=x.SeriesInstanceUID, SeriesDescription="Y")
        archive.store(encode(x), TS)
        stored_x = index.lookup(x.SOPInstanceUID)
        with archive.writing():
            first = archive.submit(encode(y), TS)
            second = archive.submit(encode(x), TS)
        assert first.result().result is WriteResult.REPLACED
        assert second.result().result is WriteResult.REPLACED
        assert stored_x is not None and index.lookup(x.SOPInstanceUID) is not None
        assert index.lookup(x.SOPInstanceUID)[0] == stored_x[0]  # type: ignore[index]
        assert len(stored_files(tmp_path)) == 1
    finally:
        archive.close()


def test_an_index_error_in_a_batch_fails_only_the_instance_at_fault(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error that makes SQLite roll the whole transaction back (an interrupted INSERT
    here; SQLITE_FULL and SQLITE_IOERR may do the same) while a batch is indexed: nothing
    of the batch is committed piecemeal, the others are indexed again one by one, the one at
    fault fails and its file goes; no row is left without its file, and a resend of it is
    stored."""
    archive = _archive(tmp_path)
    datasets = [make_ds() for _ in range(4)]
    victim = datasets[2].SOPInstanceUID
    real_write = index.write_instance

    def interrupted(record: InstanceRecord, policy: DuplicatePolicy) -> Any:
        if record.instance["sop_instance_uid"] != victim:
            return real_write(record, policy)
        db = database_proxy.obj
        connection: sqlite3.Connection = db.connection()
        real_execute = db.execute_sql

        def execute_sql(sql: str, *args: Any, **kwargs: Any) -> Any:
            if sql.startswith("INSERT"):
                connection.set_progress_handler(lambda: 1, 1)  # sqlite3_interrupt
                try:
                    return real_execute(sql, *args, **kwargs)
                finally:
                    connection.set_progress_handler(None, 1)
            return real_execute(sql, *args, **kwargs)

        db.execute_sql = execute_sql
        try:
            return real_write(record, policy)
        finally:
            del db.execute_sql

    try:
        monkeypatch.setattr(index, "write_instance", interrupted)
        with archive.writing():  # all four in one batch
            pending = [archive.submit(encode(ds), TS) for ds in datasets]
        for i, p in enumerate(pending):
            if i == 2:
                with pytest.raises(StorageFull, match="index"):
                    p.result()
            else:
                assert p.result().result is WriteResult.STORED
        monkeypatch.setattr(index, "write_instance", real_write)
        rows = {uid: index.lookup(uid) for uid in (ds.SOPInstanceUID for ds in datasets)}
        assert rows[victim] is None
        files = {p.name for p in stored_files(tmp_path)}
        assert {row[1] for row in rows.values() if row} == files  # each row has its file
        assert archive.store(encode(datasets[2]), TS).result is WriteResult.STORED
        assert _counts(archive) == expected_table(datasets)
        assert len(stored_files(tmp_path)) == 4
    finally:
        archive.close()


def _commit_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "minipacs-commit"]


def test_a_store_that_waits_commits_in_its_own_thread(tmp_path: Path) -> None:
    """``Archive.store`` (a C-STORE) commits its own store: no committer thread is woken
    for it, and the instance is durable and indexed when it returns."""
    archive = _archive(tmp_path)
    try:
        before = _commit_threads()
        ds = make_ds()
        assert archive.store(encode(ds), TS).result is WriteResult.STORED
        assert _commit_threads() == before
        assert _counts(archive) == expected_table([ds])
        assert len(stored_files(tmp_path)) == 1
    finally:
        archive.close()


def test_stores_queued_during_a_commit_share_the_next(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores that arrive while another commits wait for the commit lock; the next
    holder commits all of them in one batch (one set of flushes), and each gets its own
    outcome."""
    archive = _archive(tmp_path)
    committer = archive._committer
    batches: list[int] = []
    real_commit = committer._commit
    monkeypatch.setattr(committer, "_commit",
                        lambda batch: (batches.append(len(batch)), real_commit(batch))[1])
    datasets = [make_ds() for _ in range(3)]
    results: list[WriteResult] = []
    threads = [threading.Thread(target=lambda ds=ds: results.append(
        archive.store(encode(ds), TS).result)) for ds in datasets]
    try:
        with committer._committing:  # a commit in progress
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while len(committer._queue) < 3 and time.monotonic() < deadline:
                time.sleep(0.005)  # polls the queue, which the three threads fill
            assert len(committer._queue) == 3
        for thread in threads:
            thread.join(30)
        assert results == [WriteResult.STORED] * 3
        assert batches == [3]
        assert _counts(archive) == expected_table(datasets)
    finally:
        archive.close()


def _queue_unwoken(archive: Archive, count: int) -> list[tuple[str, Any]]:
    """``count`` staged stores queued for their callers to commit (``wake=False``)."""
    queued = []
    for _ in range(count):
        staged = archive.files.stage([b"x" * 10])
        record = extract(make_ds()).record
        record.instance.update(file_key=staged.key, file_size=10, content_hash="0" * 64,
                               transfer_syntax_uid=TS)
        queued.append((staged.key, archive._committer.submit(staged, record, wake=False)))
    return queued


def test_close_commits_every_store_whose_caller_has_not_committed_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores queued for their callers to commit (``wake=False``) are still committed by
    :meth:`GroupCommit.close` if the callers never do, however many batches they take."""
    monkeypatch.setattr("storage.commit.MAX_BATCH", 2)
    archive = _archive(tmp_path)
    queued = _queue_unwoken(archive, 5)
    assert not any(future.done() for _, future in queued)
    archive.close()
    assert [future.result(timeout=0).result for _, future in queued] == [WriteResult.STORED] * 5
    assert all(archive.files.path(key).exists() for key, _ in queued)


class _Interrupt(BaseException):
    """What ends a thread without being an error (as SystemExit would)."""


def test_an_interrupted_commit_fails_the_other_stores_of_its_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread that commits a batch carries other callers' stores: if it is interrupted,
    their stores fail (A700 for the sender) instead of waiting for ever."""
    archive = _archive(tmp_path)
    try:
        (_, mine), (_, other) = _queue_unwoken(archive, 2)

        def interrupted(staged: Any) -> Any:
            raise _Interrupt

        monkeypatch.setattr(archive.files, "publish", interrupted)
        with pytest.raises(_Interrupt):
            archive._committer.commit_now(mine)
        assert isinstance(other.exception(timeout=0), StorageFull)
        assert isinstance(mine.exception(timeout=0), StorageFull)
    finally:
        monkeypatch.undo()
        archive.close()


@pytest.mark.parametrize("count", [1, 3])
def test_a_commit_that_succeeds_but_reports_an_error_keeps_every_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """A COMMIT can reach the database and still fail on the way back (PostgreSQL's
    connection breaking during it). The rows are then there: no file they name may be
    removed, whether the batch failed (one store: the sender is told so, and its resend is
    a Success) or was indexed again one by one (found identical: Success)."""
    archive = _archive(tmp_path)
    real = index.write_transaction
    calls = 0

    @contextlib.contextmanager
    def lost_answer() -> Iterator[Any]:
        nonlocal calls
        outermost = database_proxy.obj.transaction_depth() == 0
        calls += outermost
        with real() as txn:
            yield txn
        if outermost and calls == 1:  # committed; the answer is lost
            raise peewee.OperationalError("server closed the connection unexpectedly")

    try:
        datasets = [make_ds() for _ in range(count)]
        with archive._committer._committing:  # all in one batch
            pending = [archive.submit(encode(ds), TS) for ds in datasets]
            monkeypatch.setattr(index, "write_transaction", lost_answer)
        outcomes = []
        for p in pending:
            try:
                outcomes.append(p.result().result)
            except StorageFull:
                outcomes.append(None)
        assert outcomes == ([None] if count == 1 else [WriteResult.IDENTICAL] * count)
        monkeypatch.setattr(index, "write_transaction", real)
        rows = {ds.SOPInstanceUID: index.lookup(ds.SOPInstanceUID) for ds in datasets}
        assert all(rows.values())
        assert {row[1] for row in rows.values() if row} == {
            p.name for p in stored_files(tmp_path)}  # every row's file is there
        assert archive.store(encode(datasets[0]), TS).result is WriteResult.IDENTICAL
        assert archive.verify().problems == []
    finally:
        archive.close()
