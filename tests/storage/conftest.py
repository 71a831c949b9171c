"""Shared fixtures of the storage tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import Archive, ArchiveOptions, open_archive


@pytest.fixture
def new_archive(tmp_path: Path) -> Iterator[Archive]:
    """An archive with default options on an empty folder, closed after the test."""
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files",
                                          index_url=f"sqlite:///{tmp_path / 'index.sqlite'}"))
    yield archive
    archive.close()
