"""storage.min_free_disk_mb counts the stores in flight (README "Data safety")."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest

from storage import Archive, ArchiveOptions, StorageFull
from storage.files import FilesystemStore, Staged
from tests.factory import encode, make_ds

MB = 2**20


class HeldStore(FilesystemStore):
    """A real file store whose first write waits until the test lets it go on."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, fsync=False)
        self.writing = threading.Event()
        self.go_on = threading.Event()

    def stage(self, chunks: Iterable[bytes]) -> Staged:
        if not self.writing.is_set():
            self.writing.set()
            assert self.go_on.wait(30)
        return super().stage(chunks)


def test_a_store_in_flight_reserves_its_bytes(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files = tmp_path / "files"
    files.mkdir()
    size = 40 * MB
    # the free space as measured now, whatever else writes to this disk meanwhile (a
    # parallel test run took more than the 20 MB to spare between the two reads)
    usage = shutil.disk_usage(files)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    # room for one instance of 40 MB above the floor (20 MB to spare), not for two
    floor = usage.free - size - 20 * MB
    if floor < 0:
        pytest.skip("less than 60 MB free on the test disk")
    options = ArchiveOptions(files_path=files, index_url=f"sqlite:///{tmp_path / 'i.sqlite'}",
                             durable=False, min_free_bytes=floor)
    store = HeldStore(files)
    archive = Archive(options, files=store)
    try:
        first = encode(make_ds(Rows=1024, Columns=size // 2048, PixelData=bytes(size)))
        second = encode(make_ds(Rows=1024, Columns=size // 2048, PixelData=bytes(size)))
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(
            archive.store(first, "1.2.840.10008.1.2.1")))
        thread.start()
        assert store.writing.wait(30)
        # the first store has passed the check and not written yet: its bytes are reserved
        with pytest.raises(StorageFull, match="reserved by stores in flight"):
            archive.store(second, "1.2.840.10008.1.2.1")
        store.go_on.set()
        thread.join(30)
        assert outcome and not isinstance(outcome[0], Exception)
        assert archive._reserved == 0  # released once written
    finally:
        store.go_on.set()
        archive.close()
