"""Write faults over the network: a full disk (ENOSPC at fsync) or a read-only file store
answers A700 with the reason, leaves no partial file and no index row, and the server goes on
serving once the fault is gone."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scp import status
from storage.models import Instance
from tests.conftest import STORE_LOCKS, Running, associate
from tests.factory import make_ds


def everything_in(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "files").rglob("*") if p.is_file() and p.name not in STORE_LOCKS]


@pytest.mark.parametrize("fault", ["disk full at fsync", "read-only file store"])
def test_a_write_fault_is_a700_and_leaves_nothing(start_server: Callable[..., Running],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   fault: str) -> None:
    running = start_server()
    real_fsync, real_open = os.fsync, os.open

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def in_store(path: Any) -> bool:  # the file store's disk only (pynetdicom spools to /tmp)
        return str(path).startswith(str(running.data_dir))

    def read_only(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and in_store(path):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args, **kwargs)

    if fault == "disk full at fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(os, "open", read_only)
        import builtins

        real_builtin_open = builtins.open

        def builtin_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if any(c in mode for c in "wax+") and in_store(file):
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_builtin_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", builtin_open)
    assoc = associate(running)
    ds = make_ds()
    rsp = assoc.send_c_store(ds)
    monkeypatch.undo()
    assert rsp.Status == status.STORE_OUT_OF_RESOURCES
    assert "cannot write to the file store" in rsp.ErrorComment
    assert everything_in(running.data_dir) == []  # no partial file, not even a temporary one
    assert not Instance.select().where(Instance.sop_instance_uid == ds.SOPInstanceUID).exists()
    # the fault is gone: the same instance is stored now, on the same association
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    assert len(everything_in(running.data_dir)) == 1
    assert real_fsync is os.fsync
