"""The object store (``storage.files_url: s3://...``) on a real S3-compatible server,
SeaweedFS's ``weed`` (:mod:`tests.objects`): the file store's promises kept over PUT, GET
and LIST."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import obstore
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from storage import (
    Archive,
    ArchiveOptions,
    S3Options,
    Selection,
    StorageError,
    StorageFull,
    index,
    open_archive,
)
from storage.files import FilesystemStore
from storage.models import Instance, Study
from storage.objects import IN_MEMORY_BYTES, READ_AHEAD, ObjectStore
from storage.parsing import extract, file_meta, read_header
from tests.factory import encode, expected_table, hierarchy, make_ds
from tests.objects import BUCKET, Weed


def options(weed: Weed) -> S3Options:
    return S3Options(weed.endpoint, "us-east-1", "minipacs", "minipacs")


def url() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def store(weed: Weed, tmp_path: Path) -> Iterator[ObjectStore]:
    objects = ObjectStore(url(), options(weed), FilesystemStore(tmp_path / "local"))
    yield objects
    objects.close()


def get_ranges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every ranged GET obstore makes from now on, as they are made."""
    lengths: list[int] = []
    real = obstore.get_range

    def counted(*args: Any, **kwargs: Any) -> Any:
        lengths.append(kwargs["length"])
        return real(*args, **kwargs)

    monkeypatch.setattr(obstore, "get_range", counted)
    return lengths


def archive_on(weed: Weed, tmp_path: Path, files_url: str | None = None) -> Archive:
    return open_archive(ArchiveOptions(
        files_path=tmp_path / "files", index_url=f"sqlite:///{tmp_path / 'index.sqlite'}",
        files_url=files_url or url(), s3=options(weed)))


def test_an_object_is_put_read_in_ranges_listed_and_deleted(store: ObjectStore) -> None:
    data = bytes(range(256)) * 12_000  # 3 MB: read in several ranged GETs
    key = store.put([data[:1000], data[1000:]])
    assert list(store.keys()) == [key]
    assert store.size(key) == len(data)
    with store.open(key) as fp:
        assert fp.read(10) == data[:10]
        fp.seek(READ_AHEAD + 5)
        assert fp.read(20) == data[READ_AHEAD + 5:READ_AHEAD + 25]
        fp.seek(-7, io.SEEK_END)
        assert fp.read() == data[-7:]
        fp.seek(0)
        assert fp.read() == data
    store.delete(key)
    store.delete(key)  # a missing object is not an error
    assert list(store.keys()) == []
    with pytest.raises(FileNotFoundError):
        store.open(key)


def test_an_object_too_large_for_memory_is_spooled_locally_then_uploaded_in_parts(
        store: ObjectStore, tmp_path: Path) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MB
    count = IN_MEMORY_BYTES // len(chunk) + 3
    staged = store.stage(chunk for _ in range(count))
    assert staged.data is None and staged.temp is not None and staged.temp.exists()
    assert staged.temp.parent == tmp_path / "local" / "tmp"
    assert store.publish([staged]) == [None]
    assert not staged.temp.exists()  # the spool is gone once the object is up
    assert store.size(staged.key) == count * len(chunk)
    with store.open(staged.key) as fp:
        fp.seek((count - 1) * len(chunk))
        assert fp.read() == chunk


def test_only_our_keys_are_listed(store: ObjectStore) -> None:
    obstore.put(store._store, "README.txt", b"not an instance")  # noqa: SLF001
    key = store.put([b"x" * 200])
    assert list(store.keys()) == [key]


def test_the_archive_stores_finds_replaces_and_deletes_through_the_object_store(
        weed: Weed, tmp_path: Path) -> None:
    archive = archive_on(weed, tmp_path)
    try:
        assert isinstance(archive.files, ObjectStore)
        datasets = hierarchy()
        for ds in datasets:
            archive.store(encode(ds), ExplicitVRLittleEndian)
        assert {s.study_instance_uid: (s.num_series, s.num_instances)
                for s in Study.select()} == {
            uid: (series, instances)
            for uid, (series, instances, _, _) in expected_table(datasets).items()}
        keys = {row.file_key for row in Instance.select(Instance.file_key)}
        assert set(archive.files.keys()) == keys
        first = datasets[0]
        with archive.files.open(Instance.get(
                Instance.sop_instance_uid == first.SOPInstanceUID).file_key) as fp:
            assert fp.read().endswith(encode(first))
        # a different instance under the same UID replaces it; the old object goes after
        # the commit
        old = Instance.get(Instance.sop_instance_uid == first.SOPInstanceUID).file_key
        first.PatientComments = "second version"
        archive.store(encode(first), ExplicitVRLittleEndian)
        new = Instance.get(Instance.sop_instance_uid == first.SOPInstanceUID).file_key
        assert new != old and old not in set(archive.files.keys())
        assert archive.verify().problems == []
        # deleting a study removes its objects
        study = first.StudyInstanceUID
        gone = {r.file_key for r in Instance.select(Instance.file_key).join(Study)
                .where(Study.study_instance_uid == study)}
        archive.delete(Selection(study_uids=(study,)))
        assert not gone & set(archive.files.keys())
        assert archive.verify().problems == []
    finally:
        archive.close()


def test_verify_repair_removes_what_a_crash_between_put_and_commit_left(
        weed: Weed, tmp_path: Path) -> None:
    archive = archive_on(weed, tmp_path)
    try:
        ds = make_ds()
        archive.store(encode(ds), ExplicitVRLittleEndian)
        parsed = extract(read_header(encode(ds), ExplicitVRLittleEndian))
        # the object of a second store of the same instance, PUT and never committed
        orphan = archive.files.put((file_meta(parsed, ExplicitVRLittleEndian, "X"),
                                    encode(ds) + b""))
        # another node may be committing it: an object this young is left alone
        assert archive.verify(repair=True).problems == []
        assert orphan in set(archive.files.keys())
        archive.files.settle_seconds = 0  # type: ignore[misc]  # as if an hour had passed
        report = archive.verify(repair=True)
        assert [(p.kind, p.subject, p.repaired) for p in report.problems] == [
            ("stray file", orphan, True)]
        assert orphan not in set(archive.files.keys())
        assert archive.verify().problems == []
    finally:
        archive.close()


def test_a_store_fails_with_out_of_resources_while_the_object_store_is_down_and_recovers(
        tmp_path: Path) -> None:
    weed = Weed(tmp_path / "weed")
    weed.start()
    archive = archive_on(weed, tmp_path)
    try:
        stored = make_ds()
        archive.store(encode(stored), ExplicitVRLittleEndian)
        weed.stop()
        refused = make_ds(StudyInstanceUID=stored.StudyInstanceUID)
        with pytest.raises(StorageFull, match="object store"):
            archive.store(encode(refused), ExplicitVRLittleEndian)
        assert Instance.select().count() == 1  # nothing acknowledged that is not stored
        weed.start()
        archive.store(encode(refused), ExplicitVRLittleEndian)
        assert Instance.select().count() == 2
        assert Study.get().num_instances == 2
        assert archive.verify().problems == []
    finally:
        archive.close()
        weed.stop()


def test_a_read_to_the_end_takes_a_few_large_gets_not_thousands_of_small_ones(
        store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 40_000  # 10 MB
    key = store.put([data])
    ranges = get_ranges(monkeypatch)
    with store.open(key) as fp:
        assert fp.read() == data  # what verify and reindex do
    assert len(ranges) <= 2, ranges  # io's own readall asked for 8 kB a time: 1,160 GETs


def test_once_a_put_of_a_batch_fails_the_ones_not_begun_fail_at_once(
        store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that does not answer costs each PUT its whole timeout: a batch fails after
    the first, not after every one of its PUTs in turn."""
    monkeypatch.setattr("storage.objects.PUT_THREADS", 1)
    attempts = []

    def hung(*args: Any, **kwargs: Any) -> None:
        attempts.append(args[1])
        raise TimeoutError("operation timed out")

    monkeypatch.setattr(obstore, "put", hung)
    staged = [store.stage([b"x" * 100]) for _ in range(20)]
    errors = store.publish(staged)
    assert len(attempts) == 1
    assert all(isinstance(e, StorageFull) and "timed out" in str(e) for e in errors)


def test_a_bad_endpoint_is_refused_when_the_store_opens(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="http://host"):
        ObjectStore(url(), S3Options("127.0.0.1:8333"), FilesystemStore(tmp_path / "l"))
    assert "secret" not in repr(S3Options("http://x", "r", "id", "secret"))


def test_small_reads_far_apart_fetch_a_little_each_and_sequential_reads_grow(
        store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Walking a multi-frame's fragment headers (8 bytes, megabytes apart) must not fetch a
    megabyte at each; reading on from one place reads ahead more and more."""
    data = bytes(range(256)) * 160_000  # 40 MB
    key = store.put([data])
    fetched = get_ranges(monkeypatch)
    with store.open(key) as fp:
        for at in range(2 * 2**20, 40 * 2**20, 2 * 2**20):
            fp.seek(at)
            assert fp.read(8) == data[at:at + 8]
        assert sum(fetched) <= 19 * 64 * 1024, fetched
        fetched.clear()
        fp.seek(5)
        assert fp.read(10 * 2**20) == data[5:5 + 10 * 2**20]  # a large read: one GET
        assert len(fetched) == 1
        fetched.clear()
        fp.seek(1000)
        chunks = [fp.read(8192) for _ in range(512)]  # 4 MB read on, 8 kB at a time
        assert b"".join(chunks) == data[1000:1000 + 512 * 8192]
        assert len(fetched) <= 8, fetched  # 64 kB, 128 kB, ... up to 1 MB a GET


def test_moving_from_the_object_store_to_a_folder_verify_runs_and_reindex_waits(
        weed: Weed, tmp_path: Path) -> None:
    """S3 -> local: the node's folder is both the new store and the old store's spool
    folder; verify, which takes the folder alone, must still open it. A whole reindex
    would list only the new store: refused until the move is done."""
    source = url()
    archive = archive_on(weed, tmp_path, source)
    ds = make_ds()
    archive.store(encode(ds), ExplicitVRLittleEndian)
    archive.close()
    index.disconnect()
    archive = open_archive(ArchiveOptions(
        files_path=tmp_path / "files", index_url=f"sqlite:///{tmp_path / 'index.sqlite'}",
        files_previous_url=source, s3=options(weed)))
    try:
        assert archive.verify().problems == []  # the file read from the old store
        with pytest.raises(StorageError, match="files_previous_url"):
            archive.reindex()
        report = archive.migrate_files()
        assert (report.moved, report.failed) == (1, [])
        assert archive.verify().problems == []
    finally:
        archive.close()
