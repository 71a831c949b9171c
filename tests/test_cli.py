"""The README's path: the installed ``minipacs serve`` command as a subprocess, with the
repository's config.yaml and port / data-dir overrides, stopped with SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from tests.conftest import client_ae
from tests.factory import make_ds

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def minipacs_command() -> list[str]:
    exe = Path(sys.executable).parent / "minipacs"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("minipacs")
    assert found, "the minipacs console script is not installed (pip install -e .)"
    return [found]


def wait_until_echo(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Poll with C-ECHO until the server answers (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    ae = client_ae(storage=False)
    ae.acse_timeout = ae.network_timeout = 2
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"minipacs exited early with {proc.returncode}"
        assoc = ae.associate("127.0.0.1", port, ae_title="CLITEST")
        if assoc.is_established:
            ok = assoc.send_c_echo().Status == status.SUCCESS
            assoc.release()
            if ok:
                return
        time.sleep(0.05)  # poll interval, not a wait for readiness
    raise AssertionError(f"minipacs did not answer C-ECHO on port {port} within {timeout} s")


def test_serve_store_query_and_stop_with_sigterm(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*minipacs_command(), "serve", "--config", str(REPO / "config.yaml"), "--port", str(port),
         "--data-dir", str(data), "--ae-title", "CLITEST", "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env=dict(os.environ),
    )
    try:
        wait_until_echo(port, proc)
        ae = client_ae()
        assoc = ae.associate("127.0.0.1", port, ae_title="CLITEST")
        assert assoc.is_established
        ds = make_ds()
        assert assoc.send_c_store(ds).Status == status.SUCCESS
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ""
        q.NumberOfStudyRelatedInstances = ""
        rsps = list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
        assoc.release()
        assert [int(s.Status) for s, _ in rsps] == [status.PENDING, status.SUCCESS]
        assert rsps[0][1].StudyInstanceUID == ds.StudyInstanceUID
        assert int(rsps[0][1].NumberOfStudyRelatedInstances) == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"AE title CLITEST on 127.0.0.1:{port}" in out
    assert str(data / "index.sqlite") in out and str(data / "files") in out
    assert "minipacs stopped" in out
    assert (data / "index.sqlite").exists()


def test_bad_config_is_reported_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ae:\n  title: ''\n  port: 99999\n  colour: blue\n")
    proc = subprocess.run([*minipacs_command(), "serve", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "3 problem(s)" in proc.stderr
    assert "ae.colour" in proc.stderr and "ae.port" in proc.stderr and "ae.title" in proc.stderr


def test_unusable_data_dir_is_reported_and_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([*minipacs_command(), "serve", "--port", str(free_port()),
                           "--data-dir", str(blocker / "data")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "cannot use" in proc.stderr or "cannot open the index" in proc.stderr


def test_import_reindex_and_verify_commands(tmp_path: Path) -> None:
    from tests.factory import hierarchy, save

    folder = tmp_path / "incoming"
    datasets = hierarchy()[:5]
    for n, ds in enumerate(datasets):
        save(ds, folder / f"{n}.dcm")
    (folder / "README.txt").write_text("not DICOM")
    data = tmp_path / "data"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*minipacs_command(), *args, "--data-dir", str(data)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    imported = run("import", str(folder))
    assert imported.returncode == 1  # one file was rejected
    assert "stored 5, duplicates 0, rejected 1" in imported.stdout
    assert "README.txt: not a DICOM Part 10 file" in imported.stdout
    assert "import [" in imported.stderr and "6/6" in imported.stderr  # the progress bar
    again = run("import", str(folder))
    assert "stored 0, duplicates 5, rejected 1" in again.stdout

    rebuilt = run("reindex")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "indexed 5 files" in rebuilt.stdout
    checked = run("verify")
    assert checked.returncode == 0
    assert "5 indexed instances, 5 files: 0 problem(s)" in checked.stdout
    assert run("import", str(tmp_path / "absent")).returncode == 2


def test_maintenance_refuses_a_data_folder_a_server_uses(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [*minipacs_command(), "serve", "--port", str(port), "--data-dir", str(data),
         "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        text=True, cwd=tmp_path)
    try:
        wait_until_echo(port, proc)
        for command in (["verify"], ["verify", "--repair"], ["reindex"]):
            done = subprocess.run([*minipacs_command(), *command, "--data-dir", str(data)],
                                  capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert done.returncode == 1, command
            assert "in use by another minipacs process" in done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
