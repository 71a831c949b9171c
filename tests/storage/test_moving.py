"""storage/moving.py on two local folders: each file copied under its key, checked by
SHA-256, the original removed; a bad copy never costs the original; an earlier run's copy
is checked, not made again."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from storage.files import FilesystemStore
from storage.moving import FallbackStore, move_files


def stores(tmp_path: Path) -> tuple[FilesystemStore, FilesystemStore]:
    return FilesystemStore(tmp_path / "old"), FilesystemStore(tmp_path / "new")


def test_files_move_checked_and_the_fallback_reads_either(tmp_path: Path) -> None:
    old, new = stores(tmp_path)
    contents = {old.put([bytes([n]) * (1000 + n)]): bytes([n]) * (1000 + n) for n in range(5)}
    both = FallbackStore(new, old)
    first = next(iter(contents))
    with both.open(first) as fp:  # not moved yet: from the old store
        assert fp.read() == contents[first]
    seen: list[tuple[int, int]] = []
    report = move_files(old, new, lambda done, total: seen.append((done, total)))
    assert (report.moved, report.already, report.failed) == (5, 0, [])
    assert seen[-1] == (5, 5)
    assert list(old.keys()) == []
    for key, content in contents.items():
        with both.open(key) as fp:
            assert fp.read() == content
    both.delete(first)
    assert first not in set(new.keys())


def test_a_copy_that_differs_is_removed_and_the_original_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = stores(tmp_path)
    key = old.put([b"original" * 100])
    real_stage = new.stage

    def damaged(chunks: Iterable[bytes]) -> object:
        return real_stage([b"X" + b"".join(chunks)[1:]])

    monkeypatch.setattr(new, "stage", damaged)
    report = move_files(old, new)
    assert (report.moved, [k for k, _ in report.failed]) == (0, [key])
    assert "SHA-256" in report.failed[0][1]
    assert list(old.keys()) == [key] and list(new.keys()) == []


def test_a_file_an_interrupted_run_copied_is_checked_then_its_original_removed(
        tmp_path: Path) -> None:
    old, new = stores(tmp_path)
    key = old.put([b"data" * 100])
    with old.open(key) as fp:
        copy = new.stage([fp.read()])
    staged = type(copy)(key, copy.temp, copy.data)
    assert new.publish([staged]) == [None]  # the copy made before the kill
    report = move_files(old, new)
    assert (report.moved, report.already, report.failed) == (0, 1, [])
    assert list(old.keys()) == [] and list(new.keys()) == [key]


def test_a_file_deleted_while_it_is_copied_leaves_no_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = stores(tmp_path)
    key = old.put([b"data" * 100])
    both = FallbackStore(new, old)
    real_publish = new.publish

    def deleted_meanwhile(staged: Any) -> Any:
        both.delete(key)  # a server's delete, done before the copy lands
        return real_publish(staged)

    monkeypatch.setattr(new, "publish", deleted_meanwhile)
    report = move_files(old, new)
    assert (report.moved, report.failed) == (0, [])
    assert list(new.keys()) == [] and list(old.keys()) == []
