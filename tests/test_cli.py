"""The README's path: the installed ``minipacs serve`` command as a subprocess, with the
repository's config.yaml and port / data-dir overrides, stopped with SIGTERM."""

from __future__ import annotations

import importlib.metadata
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp import status
from tests.conftest import Running, associate, client_ae, find, free_port
from tests.factory import expected_counts, hierarchy, make_ds

REPO = Path(__file__).resolve().parent.parent


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
        [*minipacs_command(), "serve", "--http-port", "0", "--config", str(REPO / "config.yaml"), "--port", str(port),
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
    proc = subprocess.run([*minipacs_command(), "serve", "--http-port", "0", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "3 problem(s)" in proc.stderr
    assert "ae.colour" in proc.stderr and "ae.port" in proc.stderr and "ae.title" in proc.stderr


def test_a_bad_flag_is_named_not_the_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*minipacs_command(), "serve", "--http-port", "0", "--config", str(REPO / "config.yaml"),
         "--ae-title", "THIS_IS_WAY_TOO_LONG_AE", "--port", "99999", "--bind", "nowhere",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert "the command line has 3 problem(s)" in proc.stderr, proc.stderr
    assert "  - --ae-title: must be at most 16 characters" in proc.stderr
    assert "  - --port: must be between 0 and 65535, not 99999" in proc.stderr
    assert "  - --bind: must be an IP address, not 'nowhere'" in proc.stderr
    assert "config.yaml" not in proc.stderr and "ae.title" not in proc.stderr


def test_problems_of_flags_and_file_are_reported_together(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("ae:\n  port: 70000\n  max_associations: 0\n")
    proc = subprocess.run([*minipacs_command(), "serve", "--http-port", "0", "--config", str(bad),
                           "--ae-title", "THIS_IS_WAY_TOO_LONG_AE"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"the command line and {bad} have 3 problem(s)" in proc.stderr, proc.stderr
    assert "  - --ae-title: must be at most 16 characters" in proc.stderr
    assert f"  - {bad}: ae.port: must be between 0 and 65535, not 70000" in proc.stderr
    assert f"  - {bad}: ae.max_associations: must be at least 1" in proc.stderr


def test_version_is_printed_and_exits_0() -> None:
    proc = subprocess.run([*minipacs_command(), "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"minipacs {importlib.metadata.version('minipacs')}"


# one file of each transfer syntax (distinct SOP Instance UIDs) from pydicom's test files
MIXED = {
    "CT_small.dcm": "",  # Explicit VR Little Endian
    "ExplVR_BigEnd.dcm": "",  # Explicit VR Big Endian
    "rtplan.dcm": "",  # Implicit VR Little Endian
    "image_dfl.dcm": "",  # Deflated Explicit VR Little Endian
    "MR_small_jpeg_ls_lossless.dcm": "sub",  # JPEG-LS lossless
    "693_J2KI.dcm": "sub",  # JPEG 2000
    "GDCMJ2K_TextGBR.dcm": "sub",  # JPEG 2000 lossless
    "JPEG-lossy.dcm": "sub",  # JPEG Extended
    "SC_rgb_jpeg_dcmtk.dcm": "sub/deeper",  # JPEG Baseline
    "SC_rgb_jpeg_gdcm.dcm": "sub/deeper",  # JPEG Lossless SV1
    "SC_rgb_rle.dcm": "sub/deeper",  # RLE Lossless (SC_rgb_jpeg_gdcm's UID: given another)
}


def readme_send_command() -> list[str]:
    """The Quick start's command that sends a folder, as the README writes it."""
    readme = (REPO / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.endswith(" /path/to/dicom/folder")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def test_the_readmes_send_command_sends_a_mixed_folder(
        start_server: Callable[..., Running], dcmtk: Callable[..., Any], tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    expected = []
    for name, where in MIXED.items():
        (folder / where).mkdir(parents=True, exist_ok=True)
        shutil.copy(pydicom.data.get_testdata_file(name), folder / where / name)
        if name == "SC_rgb_rle.dcm":  # the header changes, the RLE pixel data stays
            ds = pydicom.dcmread(folder / where / name)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / where / name)
        expected.append(pydicom.dcmread(folder / where / name, stop_before_pixels=True))
    (folder / "README.txt").write_text("not DICOM")  # what a real folder holds too
    running = start_server()
    tool, *args = readme_send_command()
    args = [{"localhost": "127.0.0.1", "11112": str(running.port),
             "/path/to/dicom/folder": str(folder)}.get(a, a) for a in args]
    sent = dcmtk(tool, *args, check=False)
    assert len({ds.SOPInstanceUID for ds in expected}) == len(MIXED)
    for ds in expected:
        matches, final = find(running, QueryRetrieveLevel="IMAGE",
                              StudyInstanceUID=ds.StudyInstanceUID,
                              SeriesInstanceUID=ds.SeriesInstanceUID,
                              SOPInstanceUID=ds.SOPInstanceUID, AvailableTransferSyntaxUID="")
        assert final == status.SUCCESS
        assert len(matches) == 1, (ds.filename, sent.stdout, sent.stderr)
        syntax = UID(ds.file_meta.TransferSyntaxUID)
        if syntax.is_encapsulated:  # compressed files go as they are
            assert matches[0].AvailableTransferSyntaxUID == syntax, ds.filename
    assert sent.returncode == 0, sent.stderr


def test_unusable_data_dir_is_reported_and_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = subprocess.run([*minipacs_command(), "serve", "--http-port", "0", "--port", str(free_port()),
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
        [*minipacs_command(), "serve", "--http-port", "0", "--port", str(port), "--data-dir", str(data),
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


def test_delete_beside_a_running_server(tmp_path: Path, server: Running) -> None:
    """``minipacs delete`` in another process while the server runs: what it deletes is gone
    from the server's C-FIND at once, with exact counts for the rest, and can be sent
    again (issue 16, item 1)."""
    datasets = hierarchy()
    assoc = associate(server)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    study = datasets[0].StudyInstanceUID
    ours = [ds for ds in datasets if ds.StudyInstanceUID == study]

    def delete(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*minipacs_command(), "delete", *args, "--data-dir", str(server.data_dir)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)

    def studies() -> dict[str, int]:
        matches, final = find(server, QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                              NumberOfStudyRelatedInstances="")
        assert final == status.SUCCESS
        return {str(m.StudyInstanceUID): int(m.NumberOfStudyRelatedInstances) for m in matches}

    everything = {s: len(c.instances) for s, c in expected_counts(datasets).items()}
    assert studies() == everything

    dry = delete("--study", study, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"study {study} of 'PID1'" in dry.stdout and "whole study" in dry.stdout
    assert f"would delete {len(ours)} instance(s) of 1 study(ies)" in dry.stdout
    by_query = delete("--where", "PatientID=PID1", "--where", "StudyDate=20240101-",
                      "--dry-run")
    assert by_query.returncode == 0, by_query.stderr
    assert "would delete 10 instance(s) of 2 study(ies)" in by_query.stdout
    assert delete("--where", "StudyDate").returncode == 2  # not KEY=VALUE
    malformed = delete("--where", "StudyDate=yesterday", "--dry-run")
    assert malformed.returncode == 1 and "malformed DA value" in malformed.stderr
    asked = delete("--study", study)  # no terminal to ask on, no --yes: nothing happens
    assert asked.returncode == 1 and "pass --yes" in asked.stderr
    assert studies() == everything

    done = delete("--study", study, "--yes")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"deleted {len(ours)} instance(s): 3 series, 1 study(ies), 0 patient(s) left"
            f" nothing; {len(ours)} file(s) removed") in done.stdout
    rest = {s: n for s, n in everything.items() if s != study}
    assert studies() == rest

    assoc = associate(server)  # sent again: stored anew
    for ds in ours:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    assert studies() == everything

    assert delete("--study", "1.2.3.4", "--yes").returncode == 1
    refused = delete()
    assert refused.returncode == 2 and "needs --patient" in refused.stderr
