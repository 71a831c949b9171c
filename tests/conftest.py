"""Shared fixtures: a real minipacs server on a free loopback port over a real SQLite file,
pynetdicom associations to it, and DCMTK's command-line tools."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from scp import status
from scp.config import Config, load_config
from scp.server import Server
from storage import Archive, ArchiveOptions, open_archive
from storage.files import LOCK_FILE, SERVER_LOCK

STORE_LOCKS = (LOCK_FILE, SERVER_LOCK)
"""The file store's own lock files, beside the stored files (storage/files.py)."""

DCMTK_TOOLS = ("storescu", "findscu", "echoscu")


def dcmtk_tool(name: str) -> str | None:
    """The path of DCMTK's ``name``, looked up on PATH without the virtualenv's bin folder:
    pynetdicom installs Python tools of the same names there (echoscu, findscu, storescp,
    storescu, getscu, movescu), which an activated venv would put first."""
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.realpath(p) != venv_bin)
    return shutil.which(name, path=path)


def unavailable(message: str) -> NoReturn:
    """A tool or engine a test needs is missing: fail with ``message`` when ``CI`` is set,
    else skip saying why."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A loopback port that was free a moment ago, for a program that must be told its port
    before it binds (a PostgreSQL server): another process could take it in between. When a
    server is started before that program binds, use :func:`reserved_port`: the server's
    own port 0 could otherwise be given the same number."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback port held, bound but not listening, while the block runs: a server started
    in the block on port 0 (minipacs itself) cannot be given it, and a connection to it is
    refused. It is free again after the block, for the program (a peer's Storage SCP) that
    binds it then."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port nothing listens on for the whole test (:func:`reserved_port`)."""
    with reserved_port() as port:
        yield port


@dataclass
class Running:
    """A server started by a test."""

    server: Server
    config: Config
    data_dir: Path

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def archive(self) -> Any:
        return self.server.archive

    @property
    def ae_title(self) -> str:
        return self.config.ae.title


def server_config(data_dir: Path, **overrides: Any) -> Config:
    values = {"ae.port": 0, "ae.bind": "127.0.0.1", "storage.data_dir": str(data_dir)}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Start servers on free ports (``start_server(**config_overrides)``); all are stopped
    at the end of the test."""
    started: list[Server] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> Running:
        data_dir = data_dir or tmp_path / "data"
        config = server_config(data_dir, **overrides)
        server = Server(config)
        started.append(server)  # stopped (its archive closed) even if start fails
        server.start()
        return Running(server, config, data_dir)

    yield start
    for server in started:
        server.stop(grace=5)


@pytest.fixture
def server(start_server: Callable[..., Running]) -> Running:
    """A running server with the default configuration on an empty data folder."""
    return start_server()


def client_ae(storage: bool = True) -> AE:
    """A pynetdicom SCU proposing verification, the FIND models and (optionally) storage."""
    ae = AE(ae_title="PYTEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    if storage:
        # 128 contexts at most: the uncompressed storage contexts that fit
        for cx in AllStoragePresentationContexts[: 128 - 3]:
            ae.add_requested_context(cx.abstract_syntax)
    return ae


def associate(running: Running, ae: AE | None = None, contexts: list[Any] | None = None) -> Association:
    """An established association to ``running``."""
    ae = ae or client_ae()
    if contexts is not None:
        ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established, "association to minipacs was not established"
    return assoc


def context(sop_class: str, *transfer_syntaxes: str) -> Any:
    return build_context(sop_class, list(transfer_syntaxes) or None)


@pytest.fixture
def dcmtk() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a DCMTK tool: ``dcmtk("findscu", *args)``.

    Without DCMTK the test is skipped, or fails with a clear message when ``CI`` is set.
    """
    missing = [tool for tool in DCMTK_TOOLS if dcmtk_tool(tool) is None]
    if missing:
        message = (
            f"DCMTK is not installed (missing {', '.join(missing)}): "
            "install the Debian package 'dcmtk' (make test does it when run as root)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def run(tool: str, *args: str, check: bool = True, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, TCP_NODELAY="1")
        proc = subprocess.run(
            [dcmtk_tool(tool) or tool, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{tool} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    return run


def find(running: Running, model: Any = StudyRootQueryRetrieveInformationModelFind,
         **keys: Any) -> tuple[list[Dataset], int]:
    """A C-FIND with pynetdicom: the matches and the final status."""
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    assoc = associate(running)
    matches, final = [], -1
    for rsp_status, identifier in assoc.send_c_find(q, model):
        code = int(rsp_status.Status)
        if code in (status.PENDING, status.PENDING_WARNING):
            matches.append(identifier)
        else:
            final = code
    assoc.release()
    return matches, final


def hold(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str,
         timeout: float = 30.0) -> tuple[threading.Event, threading.Event]:
    """Make every call of ``owner.name`` wait until the returned ``release`` is set, and
    say when one has begun: ``(entered, release)``."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(timeout)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, held)
    return entered, release


def record_returns(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """Record what every call of ``owner.name`` returns, in order (the list returned)."""
    returned: list[Any] = []
    original = getattr(owner, name)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        returned.append(original(*args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(owner, name, recorded)
    return returned


def hold_second_read_until_cancelled(running: Running) -> None:
    """Make ``running``'s second instance read of a retrieve wait (polling, with a
    deadline) until a C-CANCEL has arrived, so that a cancel test is not a race."""
    original = running.archive.read_instance
    calls: list[int] = []

    def held(item: Any, accepted: Any = None) -> Any:
        calls.append(1)
        if len(calls) == 2:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    a.dimse.cancel_req for a in running.server.ae.active_associations):
                time.sleep(0.005)
        return original(item, accepted)

    running.archive.read_instance = held


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SeaweedFS S3 server for the whole run (:class:`tests.objects.Weed`), on loopback;
    give each test its own prefix in its bucket."""
    from tests.objects import started_weed  # it imports this module

    yield from started_weed(tmp_path_factory.mktemp("weed"))


@pytest.fixture
def new_archive(tmp_path: Path) -> Iterator[Archive]:
    """An archive with default options on an empty folder (SQLite), closed after the test."""
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files",
                                          index_url=f"sqlite:///{tmp_path / 'index.sqlite'}"))
    yield archive
    archive.close()
