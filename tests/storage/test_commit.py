"""The group commit (storage/commit.py): stores in flight share their fsyncs and one index
transaction, yet each succeeds or fails on its own, only once its file is durable and
indexed."""

from __future__ import annotations

import threading
from pathlib import Path

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
    open_archive,
)
from storage.files import FilesystemStore
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
    arrived before either was indexed) fails alone, in its savepoint, and its file goes."""
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
