#!/usr/bin/env python3
"""Benchmark minipacs against Orthanc and DCMTK storescp on this machine.

Measures C-STORE ingest (DCMTK ``storescu``, one association and four in parallel, small and
CT-sized instances), C-FIND latency at the STUDY, SERIES and IMAGE levels (a fresh
``findscu`` process, and one pynetdicom association kept open), and retrieve throughput
(``movescu`` to a DCMTK ``storescp``, and ``getscu``, of the whole small and CT sets, with
the server's memory during the CT move). Run it from anywhere with the project's
virtualenv::

    .venv/bin/python bench/run.py             # full run: 10,000 small + 1,000 CT, 20 reps
    .venv/bin/python bench/run.py --quick     # 2,000 small + 200 CT, 5 reps
    .venv/bin/python bench/run.py --no-retrieve   # ingest and C-FIND only
    make bench BENCH_ARGS="--write-readme"    # also record the results in bench/README.md

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK_ROOT = BENCH_DIR / "work"
README = BENCH_DIR / "README.md"
VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
SCU_AET = "BENCHSCU"
PARALLEL = 4
RECEIVERS = ("minipacs", "orthanc", "storescp")
DEST_AET = "BENCHDEST"
"""AE title of the DCMTK ``storescp`` that C-MOVE sends to (a peer of both servers)."""
RETRIEVES = ("C-MOVE", "C-GET")
RSS_INTERVAL = 0.05
"""Seconds between two reads of the server's VmRSS during a retrieve."""
STUDY_KEYS = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "NumberOfStudyRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "ModalitiesInStudy",
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPInstanceUID", "InstanceNumber", "SOPClassUID")
FIND_LABELS = ("all studies", "one PatientID", "series of a study", "images of a series")
"""The C-FIND queries measured, in table order (see :func:`find_queries`)."""
RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 90.0
# DCMTK as packaged by Debian leaves Nagle's algorithm on unless TCP_NODELAY is set.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
NAGLE_ENV = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
"""The environment of the one sender left as Debian ships it (issue 6 target 2)."""
NAGLE_COUNT = 300
"""Small instances the Nagle sender sends (fewer with --small below it): at the 22/s Orthanc
and storescp get from such a sender (run of 2026-11-27 18:13), 300 take 14 s."""

MINIPACS_WORKERS = 1
"""minipacs's ``ae.workers`` (``--workers``)."""

_processes: list[subprocess.Popen[bytes]] = []
"""Every long-running child we started, so that :func:`cleanup` can end it."""


# -- data ---------------------------------------------------------------------------------


@dataclass
class Study:
    """What was generated for one study."""

    patient_id: str
    instances: int = 0
    series: set[str] = field(default_factory=set)


@dataclass
class Series:
    """What was generated for one series."""

    study_uid: str
    number: int
    instances: dict[str, int] = field(default_factory=dict)
    """SOP Instance UID -> InstanceNumber."""


@dataclass
class DataSet:
    """A generated set of instances, split over :data:`PARALLEL` folders."""

    name: str
    root: Path
    count: int = 0
    total_bytes: int = 0
    studies: dict[str, Study] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def parts(self) -> list[Path]:
        """The :data:`PARALLEL` folders the instances are split over."""
        return [self.root / f"part{i}" for i in range(PARALLEL)]

    def studies_of(self, patient_id: str = "") -> dict[str, Study]:
        """The studies of one patient, or all of them."""
        return {
            uid: study
            for uid, study in self.studies.items()
            if not patient_id or study.patient_id == patient_id
        }


def generate(
    root: Path,
    name: str,
    count: int,
    size: int,
    patients: int,
    studies_per_patient: int,
    series_per_study: int,
    seed: int,
) -> DataSet:
    """Write ``count`` synthetic CT instances of ``size`` x ``size`` 16-bit pixels.

    Instances go round-robin over the series (patients x studies x series), and round-robin
    over :data:`PARALLEL` sub-folders. Explicit VR Little Endian files with a proper File
    Meta header, CT Image Storage, fresh UIDs.
    """
    data = DataSet(name, root)
    for part in data.parts:
        part.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    series: list[Dataset] = []
    for p in range(patients):
        for s in range(studies_per_patient):
            study_uid = generate_uid()
            frame_uid = generate_uid()
            for r in range(series_per_study):
                series.append(_series_template(name, p, s, r, study_uid, frame_uid, size))
    for i in range(count):
        ds = series[i % len(series)]
        number = i // len(series) + 1
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-100.0, -100.0, -1.25 * number]
        ds.SliceLocation = -1.25 * number
        ds.PixelData = ((base + i % 4096) & 0x0FFF).astype("<u2").tobytes()
        path = data.parts[i % PARALLEL] / f"{name}{i:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        data.count += 1
        data.total_bytes += path.stat().st_size
        in_study, in_series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        study = data.studies.setdefault(in_study, Study(str(ds.PatientID)))
        study.instances += 1
        study.series.add(in_series)
        info = data.series.setdefault(in_series, Series(in_study, int(ds.SeriesNumber)))
        info.instances[sop_uid] = number
    return data


def _series_template(
    name: str,
    patient: int,
    study: int,
    series: int,
    study_uid: str,
    frame_uid: str,
    size: int,
) -> Dataset:
    """Build the data set shared by every instance of one series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()  # replaced for each instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "BENCH_1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    day = datetime.date(2020, 1, 1) + datetime.timedelta(days=37 * patient + 11 * study)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = day.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = f"{8 + study % 10:02d}{series:02d}00"
    ds.AccessionNumber = f"{name[:3].upper()}{patient:03d}{study:03d}"
    ds.Modality = "CT"
    ds.Manufacturer = "minipacs bench"
    ds.ReferringPhysicianName = "REFERRER^BENCH"
    ds.StudyDescription = f"{name} study {study}"
    ds.SeriesDescription = f"{name} series {series}"
    ds.PatientName = f"BENCH{name.upper()}^PATIENT{patient:03d}"
    ds.PatientID = f"{name.upper()}{patient:04d}"
    ds.PatientBirthDate = f"19{50 + patient % 50:02d}0101"
    ds.PatientSex = "MF"[patient % 2]
    ds.SliceThickness = 1.25
    ds.KVP = 120
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-100.0, -100.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = 0.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = b""
    ds["PixelData"].VR = "OW"
    return ds


# -- processes ----------------------------------------------------------------------------


REMOVAL_MARK = WORK_ROOT / ".removed"
"""Touched whenever a benchmark removes its files (:func:`remove`)."""

INODE_REUSE_DELAY = 61.0
"""Seconds after a removal (its inode tables written back) during which this VM's ext4
makes every new file scan past the removed inodes: fs/ext4/ialloc.c, recently_deleted(),
60 s, 360 s while their inode table block is dirty; up to 0.6 ms a file (bench/README.md,
"Creating a file after a removal")."""


def remove(path: Path) -> None:
    """Remove a benchmark's folder, write the removal back, and mark when
    (:func:`after_removals`)."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    WORK_ROOT.mkdir(exist_ok=True)
    REMOVAL_MARK.touch()


def after_removals() -> None:
    """Wait out :data:`INODE_REUSE_DELAY` since the last :func:`remove` of any benchmark,
    so that no receiver's first files pay for it."""
    try:
        since = time.time() - REMOVAL_MARK.stat().st_mtime
    except FileNotFoundError:
        return
    if since < INODE_REUSE_DELAY:
        print(f"waiting {INODE_REUSE_DELAY - since:.0f} s: files were removed {since:.0f} s"
              " ago (bench/README.md, \"Creating a file after a removal\")", flush=True)
        time.sleep(INODE_REUSE_DELAY - since)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def spawn(
    cmd: Sequence[str | Path], log: BinaryIO, env: dict[str, str] = DCMTK_ENV
) -> subprocess.Popen[bytes]:
    """Start a long-running child with its output in ``log``; remember it for cleanup."""
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    _processes.append(proc)
    return proc


def end_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM ``proc``, wait up to ``timeout`` seconds, then SIGKILL; return its exit code
    (``None`` when it had to be killed)."""
    killed = False
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            killed = True
    if proc in _processes:
        _processes.remove(proc)
    return None if killed else proc.returncode


def cleanup() -> None:
    """End every child still running (on exit, error or signal)."""
    for proc in list(_processes):
        with contextlib.suppress(Exception):
            end_process(proc, timeout=15)


def run(cmd: Sequence[str | Path], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short command to completion (DCMTK environment), capturing its output."""
    return subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=DCMTK_ENV,
        check=False,
    )


def tail(path: Path, lines: int = 15) -> str:
    """Return the last ``lines`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def echo_ok(aet: str, port: int) -> bool:
    """Whether a C-ECHO to ``aet`` on ``port`` succeeds (one fresh ``echoscu``)."""
    try:
        result = run(["echoscu", "-aet", SCU_AET, "-aec", aet, "-to", "2", HOST, str(port)], 10)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    """Poll ``ready()`` until it is true; fail if ``proc`` exits or after READY_TIMEOUT."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:.0f} s:\n{tail(log)}")
        time.sleep(0.05)


# -- receivers ----------------------------------------------------------------------------


class Receiver:
    """A storage SCP run as its own process on an empty data folder."""

    name = ""
    aet = ""
    supports_find = False
    supports_retrieve = False

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = 0
        self.data_dir = Path()
        self.log = Path()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int | None] = []

    def command(self) -> list[str | Path]:
        """The command line that serves ``self.data_dir`` on ``self.port``."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers (C-ECHO by default)."""
        return echo_ok(self.aet, self.port)

    def start(self, data_dir: Path, tag: str) -> None:
        """Start on the empty folder ``data_dir`` and return once it answers C-ECHO."""
        self.data_dir = data_dir
        data_dir.mkdir(parents=True)
        self.port = free_port()
        self.log = self.log_dir / f"{self.name}-{tag}.log"
        with open(self.log, "wb") as log:
            self.proc = spawn(self.command(), log)
        wait_until(self.ready, self.proc, self.name, self.log)

    def stop(self) -> None:
        """SIGTERM the server and wait for it; record its exit code."""
        if self.proc is not None:
            self.exit_codes.append(end_process(self.proc))
            self.proc = None

    def count(self) -> tuple[int, str]:
        """Return how many instances the receiver holds, and how that was found out."""
        raise NotImplementedError


class Minipacs(Receiver):
    """minipacs with ``storage.durability: full`` and SQLite, logging at WARNING; the move
    destination (when there is one) is its only peer."""

    name = "minipacs"
    aet = "MINIPACS"
    supports_find = True
    supports_retrieve = True

    def __init__(self, log_dir: Path, config_dir: Path, dest_port: int | None = None,
                 workers: int = 1) -> None:
        super().__init__(log_dir)
        self.config = config_dir / "minipacs.yaml"
        # locked down as the README advises (no startup warning): the benchmark's SCU and
        # the move destination are the only peers
        peers = f"peers:\n  - ae_title: {SCU_AET}\n    host: {HOST}\n"
        if dest_port is not None:
            peers += f"  - ae_title: {DEST_AET}\n    host: {HOST}\n    port: {dest_port}\n"
        self.config.write_text(
            f"ae:\n  bind: 127.0.0.1\n  workers: {workers}\n"
            "storage:\n  durability: full\n  on_duplicate: replace\n"
            "security:\n  allow_unknown_peers: false\n"
            "logging:\n  level: WARNING\n" + peers
        )

    def command(self) -> list[str | Path]:
        """``minipacs serve`` with our config, port, data folder and AE title."""
        return [
            VENV_BIN / "minipacs",
            "serve",
            "--http-port",
            "0",
            "--config",
            self.config,
            "--port",
            str(self.port),
            "--data-dir",
            self.data_dir,
            "--ae-title",
            self.aet,
        ]

    def count(self) -> tuple[int, str]:
        """Sum NumberOfStudyRelatedInstances over a C-FIND of every study; count files too."""
        answers = find_once(self.aet, self.port, study_query())
        indexed = sum(int(a.get("NumberOfStudyRelatedInstances", 0) or 0) for a in answers)
        files = sum(
            1
            for p in (self.data_dir / "files").glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*")
            if p.is_file()
        )
        if files != indexed:
            return indexed, f"C-FIND says {indexed}, but {files} files in the store"
        return indexed, "C-FIND sum of NumberOfStudyRelatedInstances (= files in the store)"


class Orthanc(Receiver):
    """Orthanc with its default SQLite index and file storage, no plugins; the move
    destination (when there is one) is its only DICOM modality."""

    name = "orthanc"
    aet = "ORTHANC"
    supports_find = True
    supports_retrieve = True

    def __init__(self, log_dir: Path, dest_port: int | None = None) -> None:
        super().__init__(log_dir)
        self.http_port = 0
        self.dest_port = dest_port

    def command(self) -> list[str | Path]:
        """``Orthanc <config.json>`` with a config written next to the data folder."""
        self.http_port = free_port()
        config: dict[str, Any] = {
            "Name": "minipacs-bench",
            "StorageDirectory": str(self.data_dir / "storage"),
            "IndexDirectory": str(self.data_dir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        if self.dest_port is not None:
            config["DicomModalities"] = {DEST_AET: [DEST_AET, HOST, self.dest_port]}
        path = self.data_dir.parent / f"{self.data_dir.name}-orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return ["Orthanc", path]

    def ready(self) -> bool:
        """C-ECHO and the REST API both answer."""
        return echo_ok(self.aet, self.port) and self._statistics() is not None

    def _statistics(self) -> dict[str, Any] | None:
        try:
            url = f"http://{HOST}:{self.http_port}/statistics"
            with urllib.request.urlopen(url, timeout=10) as response:
                return dict(json.load(response))
        except OSError:
            return None

    def count(self) -> tuple[int, str]:
        """CountInstances from GET /statistics."""
        stats = self._statistics()
        if stats is None:
            return -1, "GET /statistics failed"
        return int(stats["CountInstances"]), "REST GET /statistics CountInstances"


class Storescp(Receiver):
    """DCMTK ``storescp``: writes each instance to a file, no index, no fsync, no fork."""

    name = "storescp"
    aet = "STORESCP"

    def command(self) -> list[str | Path]:
        """``storescp --output-directory DIR -aet STORESCP PORT``."""
        return ["storescp", "--output-directory", self.data_dir, "-aet", self.aet, str(self.port)]

    def count(self) -> tuple[int, str]:
        """Count the files it wrote."""
        files = sum(1 for p in self.data_dir.rglob("*") if p.is_file())
        return files, "files in the output directory"


class Destination:
    """DCMTK ``storescp`` as the C-MOVE destination of the whole run: AE title
    :data:`DEST_AET`, on a port chosen when it is built (so that the servers' configurations
    can name it). It runs with ``--ignore`` (receives every data set and answers Success,
    writes nothing) and ``-v``, so that its log names every C-STORE request it received."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = log_dir / "storescp-destination.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = 0

    def start(self) -> None:
        """Start it and return once it answers C-ECHO."""
        cmd = ["storescp", "--ignore", "-v", "-aet", DEST_AET, str(self.port)]
        with open(self.log, "wb") as log:
            self.proc = spawn(cmd, log)
        ready = partial(echo_ok, DEST_AET, self.port)
        wait_until(ready, self.proc, "storescp (move destination)", self.log)

    def log_size(self) -> int:
        """The length of its log so far, for :meth:`received_since`."""
        return self.log.stat().st_size

    def received_since(self, offset: int) -> int:
        """The C-STORE requests its log names after ``offset`` (a :meth:`log_size`)."""
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().count(b"Received Store Request")

    def stop(self) -> None:
        """SIGTERM it and wait; remember its exit code."""
        if self.proc is not None:
            self.exit_code = end_process(self.proc)
            self.proc = None


# -- measurements -------------------------------------------------------------------------


class _Throughput:
    """``rate`` and ``mbps`` of a cell with ``expected`` instances of ``total_bytes`` moved in
    ``seconds``."""

    expected: int
    total_bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Instances per second."""
        return self.expected / self.seconds if self.seconds else 0.0

    @property
    def mbps(self) -> float:
        """Megabytes (10^6 bytes) of DICOM files per second."""
        return self.total_bytes / 1e6 / self.seconds if self.seconds else 0.0


@dataclass
class Ingest(_Throughput):
    """One ingest cell: a data set sent to one receiver over 1 or 4 associations."""

    receiver: str
    data: str
    parallel: int
    expected: int
    total_bytes: int
    seconds: float = 0.0
    held: int = -1
    how_counted: str = ""
    exit_codes: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class FindTiming:
    """Latencies of one C-FIND, in seconds: fresh findscu and open association."""

    findscu: list[float] = field(default_factory=list)
    assoc: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def send(
    receiver: Receiver,
    data: DataSet,
    parallel: int,
    log_dir: Path,
    tag: str,
    env: dict[str, str] = DCMTK_ENV,
) -> Ingest:
    """Send ``data`` with ``parallel`` storescu processes (all files over one association
    each, ``env`` their environment) and time them from the first start to the last
    exit."""
    cell = Ingest(receiver.name, data.name, parallel, data.count, data.total_bytes)
    groups = [data.parts] if parallel == 1 else [[part] for part in data.parts[:parallel]]
    timeout = 120 + data.count * 0.1  # gives up below roughly 10 instances/s
    logs = [log_dir / f"{receiver.name}-{tag}-storescu{i}.log" for i in range(len(groups))]
    procs: list[subprocess.Popen[bytes]] = []
    start = time.perf_counter()
    for folders, log_path in zip(groups, logs, strict=True):
        cmd: list[str | Path] = ["storescu", "-aet", SCU_AET, "-aec", receiver.aet, "-ta", "300"]
        cmd += ["+sd", "+r", HOST, str(receiver.port), *folders]
        with open(log_path, "wb") as log:
            procs.append(spawn(cmd, log, env))
    deadline = start + timeout
    for proc in procs:
        try:
            proc.wait(max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            cell.problems.append(f"storescu still running after {timeout:.0f} s: killed")
            proc.kill()
            proc.wait(10)
        _processes.remove(proc)
    cell.seconds = time.perf_counter() - start
    cell.exit_codes = [proc.returncode for proc in procs]
    if any(cell.exit_codes):
        cell.problems.append(f"storescu exit codes {cell.exit_codes}")
    for log_path in logs:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line]
        if lines:
            cell.problems.append(
                f"storescu printed {len(lines)} line(s) in {log_path.name}, first: {lines[0]}"
            )
    cell.held, cell.how_counted = receiver.count()
    if cell.held != data.count:
        cell.problems.append(
            f"receiver holds {cell.held} instances, expected {data.count} ({cell.how_counted})"
        )
    return cell


@dataclass
class FindQuery:
    """One C-FIND measured (Study Root): its level, its keys and how to check the matches."""

    label: str
    level: str
    keys: list[tuple[str, str]]
    """(keyword, value) pairs in command-line order; an empty value is a return key."""
    check: Callable[[list[Dataset]], list[str]]
    """Compares the matches with the generated data; returns the differences found."""

    def identifier(self) -> Dataset:
        """The identifier sent by pynetdicom."""
        return make_identifier(self.level, self.keys)


def make_identifier(level: str, keys: Sequence[tuple[str, str]]) -> Dataset:
    """A C-FIND identifier: QueryRetrieveLevel ``level`` and every (keyword, value) of ``keys``."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys:
        setattr(ds, keyword, value)
    return ds


def study_keys(patient_id: str = "") -> list[tuple[str, str]]:
    """:data:`STUDY_KEYS` as return keys, PatientID matching ``patient_id`` when given."""
    return [(keyword, patient_id if keyword == "PatientID" else "") for keyword in STUDY_KEYS]


def study_query(patient_id: str = "") -> Dataset:
    """A STUDY-level identifier asking for :data:`STUDY_KEYS` (optionally one PatientID)."""
    return make_identifier("STUDY", study_keys(patient_id))


def find_queries(data: DataSet, patient_id: str) -> list[FindQuery]:
    """The queries of :data:`FIND_LABELS`: every study; the studies of ``patient_id``; the
    series of that patient's first study (by StudyInstanceUID); the images of that study's
    first series (by StudyInstanceUID and SeriesInstanceUID)."""
    study_uid = next(iter(data.studies_of(patient_id)))
    series_uid = next(uid for uid, s in data.series.items() if s.study_uid == study_uid)
    series_keys = [("StudyInstanceUID", study_uid), *((k, "") for k in SERIES_KEYS)]
    image_keys = [("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)]
    image_keys += [(keyword, "") for keyword in IMAGE_KEYS]
    labels = iter(FIND_LABELS)
    return [
        FindQuery(next(labels), "STUDY", study_keys(), partial(check_studies, data=data)),
        FindQuery(
            next(labels),
            "STUDY",
            study_keys(patient_id),
            partial(check_studies, data=data, patient_id=patient_id),
        ),
        FindQuery(
            next(labels), "SERIES", series_keys, partial(check_series, data=data, study=study_uid)
        ),
        FindQuery(
            next(labels), "IMAGE", image_keys, partial(check_images, data=data, series=series_uid)
        ),
    ]


def _find_ae() -> AE:
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae


def associate(ae: AE, receiver_aet: str, port: int) -> Association:
    """Open a pynetdicom association and turn Nagle's algorithm off on our side.

    pynetdicom sets no TCP_NODELAY; it writes a C-FIND request as two PDUs (command, then
    identifier), and with Nagle on the second waits for the server's delayed ACK: about
    40 ms per request that are the client's, not the server's.
    """
    assoc = ae.associate(HOST, port, ae_title=receiver_aet)
    if not assoc.is_established:
        raise RuntimeError(f"association to {receiver_aet} on port {port} not established")
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _collect(assoc: Association, query: Dataset) -> list[Dataset]:
    """Send one C-FIND on an open association; return the matches, raise on failure."""
    answers: list[Dataset] = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise RuntimeError("C-FIND: no response (timeout or abort)")
        if status.Status in (0xFF00, 0xFF01):
            if identifier is None:
                raise RuntimeError("C-FIND: a Pending response without an identifier")
            answers.append(identifier)
        elif status.Status != 0x0000:
            raise RuntimeError(f"C-FIND failed with status 0x{status.Status:04X}")
    return answers


def find_once(aet: str, port: int, query: Dataset) -> list[Dataset]:
    """Run one C-FIND over a new pynetdicom association and return the matches."""
    assoc = associate(_find_ae(), aet, port)
    try:
        return _collect(assoc, query)
    finally:
        assoc.release()


def _int(value: Any) -> int | None:
    """An IS or US value as an int; ``None`` when absent, empty or not a number."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _match_problems(answers: int, got: set[str], expected: set[str]) -> list[str]:
    """A problem when the matches are not exactly the ``expected`` UIDs, once each."""
    if got == expected and answers == len(expected):
        return []
    return [
        f"{answers} matches, expected {len(expected)} ({len(expected - got)} expected UIDs "
        f"missing, {len(got - expected)} unexpected)"
    ]


def check_studies(answers: list[Dataset], data: DataSet, patient_id: str = "") -> list[str]:
    """Compare STUDY-level matches with the studies generated (for ``patient_id``, or all)."""
    expected = data.studies_of(patient_id)
    got = {str(a.get("StudyInstanceUID", "")): a for a in answers}
    problems = _match_problems(len(answers), set(got), set(expected))
    for uid, answer in got.items():
        study = expected.get(uid)
        if study is None:
            continue
        n = _int(answer.get("NumberOfStudyRelatedInstances"))
        series = _int(answer.get("NumberOfStudyRelatedSeries"))
        if (n, series) != (study.instances, len(study.series)):
            problems.append(
                f"study {uid}: {n} instances / {series} series, expected "
                f"{study.instances} / {len(study.series)}"
            )
            break
        if str(answer.get("PatientID", "")) != study.patient_id:
            problems.append(f"study {uid}: PatientID {answer.get('PatientID')!r}")
            break
        if "CT" not in str(answer.get("ModalitiesInStudy", "")):
            problems.append(f"study {uid}: ModalitiesInStudy {answer.get('ModalitiesInStudy')}")
            break
    return problems


def check_series(answers: list[Dataset], data: DataSet, study: str) -> list[str]:
    """Compare SERIES-level matches with the series generated for the study ``study``.

    A NumberOfSeriesRelatedInstances left out or empty is reported once, as such."""
    expected = {uid: s for uid, s in data.series.items() if s.study_uid == study}
    got = {str(a.get("SeriesInstanceUID", "")): a for a in answers}
    problems = _match_problems(len(answers), set(got), set(expected))
    unanswered: list[str] = []
    for uid, answer in got.items():
        series = expected.get(uid)
        if series is None:
            continue
        if str(answer.get("StudyInstanceUID", "")) != study:
            problems.append(f"series {uid}: StudyInstanceUID {answer.get('StudyInstanceUID')!r}")
        if str(answer.get("Modality", "")) != "CT":
            problems.append(f"series {uid}: Modality {answer.get('Modality')!r}")
        if _int(answer.get("SeriesNumber")) != series.number:
            problems.append(
                f"series {uid}: SeriesNumber {answer.get('SeriesNumber')!r}, "
                f"expected {series.number}"
            )
        n = _int(answer.get("NumberOfSeriesRelatedInstances"))
        if n is None:
            unanswered.append(
                "absent" if "NumberOfSeriesRelatedInstances" not in answer else "empty"
            )
        elif n != len(series.instances):
            problems.append(
                f"series {uid}: NumberOfSeriesRelatedInstances {n}, "
                f"expected {len(series.instances)}"
            )
    if unanswered:
        problems.append(
            f"NumberOfSeriesRelatedInstances not answered in {len(unanswered)} of {len(got)} "
            f"matches ({', '.join(sorted(set(unanswered)))})"
        )
    return problems


def check_images(answers: list[Dataset], data: DataSet, series: str) -> list[str]:
    """Compare IMAGE-level matches with the instances generated for the series ``series``."""
    expected = data.series[series].instances
    got = {str(a.get("SOPInstanceUID", "")): a for a in answers}
    problems = _match_problems(len(answers), set(got), set(expected))
    for uid, answer in got.items():
        number = expected.get(uid)
        if number is None:
            continue
        if str(answer.get("SeriesInstanceUID", "")) != series:
            problems.append(f"image {uid}: SeriesInstanceUID {answer.get('SeriesInstanceUID')!r}")
            break
        if _int(answer.get("InstanceNumber")) != number:
            problems.append(
                f"image {uid}: InstanceNumber {answer.get('InstanceNumber')!r}, expected {number}"
            )
            break
        if str(answer.get("SOPClassUID", "")) != CTImageStorage:
            problems.append(f"image {uid}: SOPClassUID {answer.get('SOPClassUID')!r}")
            break
    return problems


def findscu_command(receiver: Receiver, query: FindQuery, verbose: bool = False) -> list[str]:
    """The ``findscu -S`` command line of ``query``."""
    cmd = ["findscu", "-S", *(["-v"] if verbose else []), "-aet", SCU_AET, "-aec", receiver.aet]
    cmd += [HOST, str(receiver.port), "-k", f"QueryRetrieveLevel={query.level}"]
    for keyword, value in query.keys:
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    return cmd


def time_find(receiver: Receiver, query: FindQuery, reps: int) -> FindTiming:
    """Time ``reps`` C-FINDs with fresh findscu processes, then ``reps`` on one association;
    check the matches against the generated data."""
    timing = FindTiming()
    cmd = findscu_command(receiver, query)
    for _ in range(reps):
        start = time.perf_counter()
        result = run(cmd, 60)
        timing.findscu.append(time.perf_counter() - start)
        if result.returncode != 0:
            timing.problems.append(f"findscu exit code {result.returncode}: {result.stderr[-300:]}")
            break
    # count findscu's matches once, verbosely, outside the timing
    verbose = run(findscu_command(receiver, query, verbose=True), 60)
    findscu_matches = len(re.findall(r"Find Response: \d+ \(Pending", verbose.stderr))
    assoc = associate(_find_ae(), receiver.aet, receiver.port)
    answers: list[Dataset] = []
    try:
        for _ in range(reps):
            identifier = query.identifier()
            start = time.perf_counter()
            answers = _collect(assoc, identifier)
            timing.assoc.append(time.perf_counter() - start)
    finally:
        assoc.release()
    timing.problems += query.check(answers)
    if findscu_matches != len(answers):
        timing.problems.append(f"findscu got {findscu_matches} matches, pynetdicom {len(answers)}")
    return timing


def time_association(receiver: Receiver, reps: int) -> tuple[list[float], list[float]]:
    """Time ``reps`` pynetdicom association set-ups (A-ASSOCIATE until accepted), and
    ``reps`` C-ECHOs on one open association: what every fresh findscu pays, and the
    round trip of the pynetdicom client itself."""
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    setups: list[float] = []
    echoes: list[float] = []
    for i in range(reps):
        start = time.perf_counter()
        assoc = associate(ae, receiver.aet, receiver.port)
        setups.append(time.perf_counter() - start)
        try:
            if i == 0:
                for _ in range(reps):
                    start = time.perf_counter()
                    status = assoc.send_c_echo()
                    echoes.append(time.perf_counter() - start)
                    if not status or status.Status != 0x0000:
                        raise RuntimeError(f"C-ECHO to {receiver.name} failed")
        finally:
            assoc.release()
    return setups, echoes


@dataclass
class Retrieve(_Throughput):
    """One retrieve cell: a whole data set moved (C-MOVE) or fetched (C-GET) from a receiver
    with one DCMTK process, and the receiver's resident memory meanwhile."""

    receiver: str
    data: str
    service: str
    """One of :data:`RETRIEVES`."""
    expected: int
    total_bytes: int
    """Bytes of the generated files of the data set (what MB/s counts)."""
    seconds: float = 0.0
    received: int = -1
    """Instances that arrived (C-STORE requests seen by the destination or getscu)."""
    exit_code: int | None = None
    rss_before: int = 0
    """VmRSS of the receiver just before the retrieve, kB (0 = could not be read)."""
    rss_peak: int = 0
    """Largest VmRSS seen during the retrieve, kB."""
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def growth(self) -> float:
        """Peak minus before, MiB."""
        return (self.rss_peak - self.rss_before) / 1024


def vm_rss(pid: int) -> int:
    """VmRSS of the process ``pid`` in kB, from /proc; 0 when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssSampler:
    """Reads a process's VmRSS once on entry, then every :data:`RSS_INTERVAL` seconds in a
    thread until exit (and once more then); keeps the first value and the largest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        rss = vm_rss(self.pid)
        self.peak = max(self.peak, rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.before = vm_rss(self.pid)
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def retrieve(
    receiver: Receiver, data: DataSet, service: str, destination: Destination | None, log_dir: Path
) -> Retrieve:
    """Retrieve every study of ``data`` from ``receiver`` with one DCMTK process, timed from
    its start to its exit: ``movescu`` to ``destination`` for C-MOVE, ``getscu --ignore``
    for C-GET; Study Root, STUDY level, the StudyInstanceUIDs as one UID list. The receiver's
    VmRSS is sampled meanwhile. Then check the exit code, the final status and how many
    instances arrived (C-STORE requests in the destination's log, or in getscu's output)."""
    cell = Retrieve(receiver.name, data.name, service, data.count, data.total_bytes)
    if receiver.proc is None:
        raise RuntimeError(f"{receiver.name} is not running")
    uids = "\\".join(data.studies)
    if service == "C-MOVE" and destination is None:
        raise RuntimeError("no move destination")
    dest = destination if service == "C-MOVE" else None
    if dest is not None:
        cmd = ["movescu", "-v", "-S", "-aet", SCU_AET, "-aec", receiver.aet, "-aem", DEST_AET]
        final = "Received Final Move Response (Success)"
    else:
        cmd = ["getscu", "-v", "--ignore", "-S", "-aet", SCU_AET, "-aec", receiver.aet]
        final = "Received C-GET Response (Success)"
    cmd += [HOST, str(receiver.port), "-k", "QueryRetrieveLevel=STUDY"]
    cmd += ["-k", f"StudyInstanceUID={uids}"]
    timeout = 120 + data.count * 0.2  # gives up below roughly 5 instances/s
    os.sync()  # the ingest's write-back must not land in the retrieve
    offset = dest.log_size() if dest is not None else 0
    with RssSampler(receiver.proc.pid) as rss:
        start = time.perf_counter()
        try:
            result: subprocess.CompletedProcess[str] | None = run(cmd, timeout)
        except subprocess.TimeoutExpired:
            result = None
        cell.seconds = time.perf_counter() - start
    cell.rss_before, cell.rss_peak, cell.samples = rss.before, rss.peak, rss.samples
    tool = cmd[0]
    output = "" if result is None else result.stdout + result.stderr
    log_path = log_dir / f"{receiver.name}-{data.name}-{tool}.log"
    log_path.write_text(output)
    if result is None:
        cell.problems.append(f"{tool} still running after {timeout:.0f} s: killed")
    else:
        cell.exit_code = result.returncode
        if result.returncode != 0:
            cell.problems.append(f"{tool} exit code {result.returncode}")
        if final not in output:
            finals = re.findall(r"Received (?:Final Move|C-GET) Response \([^P].*", output)
            cell.problems.append(
                f"{tool}: no '{final}' in {log_path.name}; "
                + (f"last: {finals[-1]}" if finals else "no final response")
            )
        odd = [line for line in output.splitlines() if re.match(r"[WEF]: ", line)]
        if odd:
            cell.problems.append(
                f"{tool} printed {len(odd)} warning/error line(s) in {log_path.name}, "
                f"first: {odd[0]}"
            )
    if dest is not None:
        cell.received = dest.received_since(offset)
        where = f"C-STORE requests in {dest.log.name}"
    else:
        cell.received = output.count("Received C-STORE Request")
        where = f"C-STORE requests in {log_path.name}"
    if cell.received != data.count:
        cell.problems.append(f"{cell.received} {where}, expected {data.count}")
    if not cell.rss_before:
        cell.problems.append(f"could not read VmRSS of {receiver.name} (pid {receiver.proc.pid})")
    return cell


# -- one run ------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured in one run."""

    ingest: dict[tuple[str, str, int], Ingest] = field(default_factory=dict)
    find: dict[tuple[str, str], FindTiming] = field(default_factory=dict)
    """(query label of :data:`FIND_LABELS`, receiver) -> timings."""
    errors: list[str] = field(default_factory=list)
    server_logs: list[Path] = field(default_factory=list)
    server_exit_codes: dict[str, list[int | None]] = field(default_factory=dict)
    association: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    retrieve: dict[tuple[str, str, str], Retrieve] = field(default_factory=dict)
    """(receiver, data set name, service of :data:`RETRIEVES`) -> the cell."""


def make_receiver(name: str, log_dir: Path, work: Path, dest_port: int | None) -> Receiver:
    """Build the receiver called ``name``; ``dest_port`` is the move destination's port."""
    if name == "minipacs":
        return Minipacs(log_dir, work, dest_port, workers=MINIPACS_WORKERS)
    if name == "orthanc":
        return Orthanc(log_dir, dest_port)
    return Storescp(log_dir)


def benchmark(
    receivers: Sequence[str],
    small: DataSet,
    ct: DataSet,
    reps: int,
    work: Path,
    log_dir: Path,
    services: Sequence[str] = RETRIEVES,
    nagle: DataSet | None = None,
) -> Results:
    """Run every cell: for each receiver, data set and 1 / 4 associations, a fresh server on
    an empty folder; C-FIND timings on the small set after its one-association ingest; the
    retrieves of ``services`` (a subset of :data:`RETRIEVES`) of each set after its
    one-association ingest, C-MOVE to one DCMTK storescp started for the whole run; and
    ``nagle`` (small instances) from one storescu with Nagle's algorithm left on."""
    results = Results()
    work.mkdir(parents=True, exist_ok=True)
    patients = sorted({study.patient_id for study in small.studies.values()})
    queries = find_queries(small, patients[len(patients) // 2])
    destination: Destination | None = None
    if "C-MOVE" in services and any(name != "storescp" for name in receivers):
        destination = Destination(log_dir)
        try:
            destination.start()
        except Exception as exc:  # no C-MOVE then (each one fails), but everything else
            results.errors.append(f"move destination: {type(exc).__name__}: {exc}")
            print(f"  ! {results.errors[-1]}", flush=True)
            destination.stop()
            destination = None
    try:
        for name in receivers:
            dest_port = destination.port if destination else None
            receiver = make_receiver(name, log_dir, work, dest_port)
            for data in (small, ct):
                for parallel in (1, PARALLEL):
                    cells = Cells(data is small and parallel == 1, parallel == 1)
                    run_cell(
                        receiver, data, parallel, cells, queries, reps, work, log_dir, services,
                        destination, results,
                    )
            if nagle is not None:
                run_cell(receiver, nagle, 1, Cells(False, False), queries, reps, work, log_dir,
                         services, destination, results, sender_env=NAGLE_ENV)
            results.server_exit_codes[name] = receiver.exit_codes
    finally:
        if destination is not None:
            destination.stop()
            results.server_exit_codes["storescp (move destination)"] = [destination.exit_code]
            results.server_logs.append(destination.log)
    return results


@dataclass
class Cells:
    """What is measured after an ingest, besides the ingest itself."""

    find: bool
    """Association set-up and the C-FIND queries (where supported)."""
    retrieve: bool
    """The retrieves (where supported)."""


def run_cell(
    receiver: Receiver,
    data: DataSet,
    parallel: int,
    cells: Cells,
    queries: Sequence[FindQuery],
    reps: int,
    work: Path,
    log_dir: Path,
    services: Sequence[str],
    destination: Destination | None,
    results: Results,
    sender_env: dict[str, str] = DCMTK_ENV,
) -> None:
    """One fresh server on an empty folder: ingest ``data`` over ``parallel`` associations
    (storescu with ``sender_env``), then what ``cells`` asks for, with the retrieves of
    ``services`` (C-MOVE to ``destination``). Results and errors go into ``results``."""
    name = receiver.name
    tag = f"{data.name}-{parallel}"
    data_dir = work / f"{name}-{tag}"
    print(f"  {name}: {data.name} x{data.count}, {parallel} assoc ...", flush=True)
    try:
        receiver.start(data_dir, tag)
        results.server_logs.append(receiver.log)
        cell = send(receiver, data, parallel, log_dir, tag, sender_env)
        results.ingest[(name, data.name, parallel)] = cell
        print(f"    {cell.seconds:.1f} s, {cell.rate:,.0f} inst/s", flush=True)
        for problem in cell.problems:
            print(f"    ! {problem}", flush=True)
        if cells.find:
            results.association[name] = time_association(receiver, reps)
        if cells.find and receiver.supports_find:
            for query in queries:
                find_cell(receiver, query, reps, results)
        if cells.retrieve and receiver.supports_retrieve:
            for service in services:
                retrieve_cell(receiver, data, service, destination, log_dir, results)
    except Exception as exc:  # one broken cell must not lose the others
        results.errors.append(f"{name} {tag}: {type(exc).__name__}: {exc}")
        print(f"    ! {results.errors[-1]}", flush=True)
    finally:
        receiver.stop()
        # The folder stays until the run ends (main removes the whole work folder): a
        # removal here would slow the next cell's file creation (INODE_REUSE_DELAY).
        os.sync()  # the next cell must not pay for this one's writeback


def retrieve_cell(
    receiver: Receiver,
    data: DataSet,
    service: str,
    destination: Destination | None,
    log_dir: Path,
    results: Results,
) -> None:
    """Measure one retrieve (see :func:`retrieve`) into ``results``; a failure is recorded
    as an error and does not keep the other retrieves from being measured."""
    try:
        cell = retrieve(receiver, data, service, destination, log_dir)
    except Exception as exc:
        results.errors.append(f"{receiver.name} {service} {data.name}: {type(exc).__name__}: {exc}")
        print(f"    ! {results.errors[-1]}", flush=True)
        return
    results.retrieve[(receiver.name, data.name, service)] = cell
    print(
        f"    {service} {data.name} x{data.count}: {cell.seconds:.1f} s, "
        f"{cell.rate:,.0f} inst/s, {cell.mbps:,.1f} MB/s; {receiver.name} RSS "
        f"{cell.rss_before / 1024:,.1f} MiB before, peak {cell.rss_peak / 1024:,.1f} MiB "
        f"({cell.growth:+,.1f} MiB)",
        flush=True,
    )
    for problem in cell.problems:
        print(f"    ! {service} {data.name}: {problem}", flush=True)


def find_cell(receiver: Receiver, query: FindQuery, reps: int, results: Results) -> None:
    """Measure ``query`` on ``receiver`` into ``results``; a failure is recorded as an error
    and does not keep the other queries from being measured."""
    try:
        timing = time_find(receiver, query, reps)
    except Exception as exc:
        results.errors.append(f"{receiver.name} C-FIND {query.label}: {type(exc).__name__}: {exc}")
        print(f"    ! {results.errors[-1]}", flush=True)
        return
    results.find[(query.label, receiver.name)] = timing
    med = statistics.median
    print(
        f"    C-FIND {query.label}: {med(timing.findscu) * 1000:.1f} ms / "
        f"{med(timing.assoc) * 1000:.1f} ms",
        flush=True,
    )
    for problem in timing.problems:
        print(f"    ! C-FIND {query.label}: {problem}", flush=True)


# -- report -------------------------------------------------------------------------------


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} ms" if values else "failed"


def _ingest_cell(cell: Ingest | None, with_mbps: bool) -> str:
    if cell is None:
        return "failed"
    text = f"{cell.rate:,.0f} inst/s"
    if with_mbps:
        text += f" ({cell.mbps:,.0f} MB/s)"
    return text + (" (!)" if cell.problems else "")


def _find_cell(timing: FindTiming | None, supported: bool) -> str:
    if not supported:
        return "n/a"
    if timing is None:
        return "failed"
    return f"{_ms(timing.findscu)} / {_ms(timing.assoc)}" + (" (!)" if timing.problems else "")


def _retrieve_cell(cell: Retrieve | None) -> str:
    if cell is None:
        return "failed"
    text = f"{cell.rate:,.0f} inst/s ({cell.mbps:,.1f} MB/s)"
    return text + (" (!)" if cell.problems else "")


def _memory_cell(cell: Retrieve | None) -> str:
    if cell is None or not cell.rss_before:
        return "failed"
    return (
        f"{cell.rss_before / 1024:,.0f} → {cell.rss_peak / 1024:,.0f} MiB "
        f"({cell.growth:+,.0f} MiB)"
    )


def retrieve_table(results: Results, receivers: Sequence[str], services: Sequence[str]) -> str:
    """The retrieve results as a Markdown table, one row per receiver that retrieves."""
    header = ["receiver"]
    for service in services:
        header += [f"{service} small 64x64", f"{service} CT 512x512"]
    header += [f"RSS during CT {service}: before → peak (growth)" for service in services]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in receivers:
        if name == "storescp":
            continue
        cells = [name]
        for service in services:
            cells += [
                _retrieve_cell(results.retrieve.get((name, data, service)))
                for data in ("small", "ct")
            ]
        cells += [_memory_cell(results.retrieve.get((name, "ct", service))) for service in services]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(results: Results, receivers: Sequence[str], nagle: bool = True) -> str:
    """The results as a Markdown table, one row per receiver (with the Nagle sender's
    column when it was measured)."""
    header = (
        "| receiver | small 64x64, 1 assoc | small, 4 parallel | CT 512x512, 1 assoc "
        "| CT, 4 parallel " + ("| small, 1 assoc, sender with Nagle on " if nagle else "")
        + "| C-FIND all studies (findscu / open assoc) | C-FIND one PatientID "
        "| C-FIND series of a study | C-FIND images of a series |"
    )
    lines = [header, "|" + "---|" * (5 + nagle + len(FIND_LABELS))]
    for name in receivers:
        supported = name != "storescp"
        cells = [
            name,
            _ingest_cell(results.ingest.get((name, "small", 1)), False),
            _ingest_cell(results.ingest.get((name, "small", PARALLEL)), False),
            _ingest_cell(results.ingest.get((name, "ct", 1)), True),
            _ingest_cell(results.ingest.get((name, "ct", PARALLEL)), True),
            *([_ingest_cell(results.ingest.get((name, "nagle", 1)), False)] if nagle else []),
            *(_find_cell(results.find.get((label, name)), supported) for label in FIND_LABELS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(results: Results) -> list[str]:
    """Per-cell raw numbers (seconds, counts, min/median/max latencies)."""
    lines = []
    for (name, data, parallel), cell in results.ingest.items():
        lines.append(
            f"- {name}, {data} x{cell.expected}, {parallel} assoc: {cell.seconds:.2f} s, "
            f"{cell.total_bytes / 1e6:.0f} MB, holds {cell.held} ({cell.how_counted}), "
            f"storescu exit {cell.exit_codes}"
        )
    for name, (setups, echoes) in results.association.items():
        lines.append(
            f"- {name}, pynetdicom association set-up (A-ASSOCIATE-RQ to -AC): median "
            f"{statistics.median(setups) * 1000:.1f} ms; C-ECHO on an open association: median "
            f"{statistics.median(echoes) * 1000:.2f} ms"
        )
    for label in FIND_LABELS:
        for (of, name), t in results.find.items():
            if of != label:
                continue
            for how, values in (("findscu", t.findscu), ("open assoc", t.assoc)):
                if values:
                    lines.append(
                        f"- {name}, C-FIND {label}, {how}: min {min(values) * 1000:.1f} / "
                        f"median {statistics.median(values) * 1000:.1f} / "
                        f"max {max(values) * 1000:.1f} ms over {len(values)}"
                    )
    for (name, data, service), r in results.retrieve.items():
        tool = "movescu" if service == "C-MOVE" else "getscu"
        lines.append(
            f"- {name}, {service} {data} x{r.expected}: {r.seconds:.2f} s, "
            f"{r.total_bytes / 1e6:.0f} MB, {r.received} instances arrived, {tool} exit "
            f"{r.exit_code}; {name} VmRSS {r.rss_before / 1024:.1f} MiB "
            f"before, peak {r.rss_peak / 1024:.1f} MiB ({r.samples} samples)"
        )
    return lines


def anomalies(results: Results) -> list[str]:
    """Every problem seen: failed cells, count mismatches, storescu output, server logs."""
    found = list(results.errors)
    for (name, data, parallel), cell in results.ingest.items():
        found += [f"{name}, {data}, {parallel} assoc: {p}" for p in cell.problems]
    for label in FIND_LABELS:
        found += [
            f"{name}, C-FIND {label}: {p}"
            for (of, name), t in results.find.items()
            if of == label
            for p in t.problems
        ]
    for (name, data, service), r in results.retrieve.items():
        found += [f"{name}, {service} {data}: {p}" for p in r.problems]
    for name, codes in results.server_exit_codes.items():
        # storescp has no SIGTERM handler
        normal = (0, -signal.SIGTERM) if name.startswith("storescp") else (0,)
        if any(code not in normal for code in codes):
            found.append(f"{name} exit codes on SIGTERM: {codes} (None = had to be killed)")
    for log in results.server_logs:
        if not log.name.startswith("minipacs"):
            continue
        lines = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", line)
        ]
        if lines:
            found.append(f"{log.name}: {len(lines)} WARNING/ERROR line(s), first: {lines[0]}")
    return found


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = run(cmd, 30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    return lines[0] if lines else "unknown"


def machine_info() -> list[str]:
    """The machine and the versions of everything measured."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    uname = os.uname()
    versions = ", ".join(
        f"{package} {metadata.version(package)}"
        for package in ("minipacs", "pynetdicom", "pydicom", "peewee")
    )
    git = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        f"- Machine: `{uname.sysname} {uname.nodename} {uname.release} {uname.version} "
        f"{uname.machine}`",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {memory}",
        f"- Python {platform.python_version()}; {versions}; minipacs tree at git `{git}`",
        f"- {_first_line(['Orthanc', '--version'])}; "
        f"DCMTK {_first_line(['storescu', '--version'])}",
    ]


def recorded(script: str, details: str, seconds: float, env: str = "") -> str:
    """The first line of a benchmark's README block: when, the command as run (``env``
    before it), what was measured and how long it took."""
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = " ".join([f"{env}.venv/bin/python bench/{script}", *sys.argv[1:]])
    what = f" ({details})" if details else ""
    return f"Recorded {when} with `{command}`{what}; the run took {seconds / 60:.1f} min."


def report(
    results: Results,
    receivers: Sequence[str],
    args: argparse.Namespace,
    seconds: float,
    machine: list[str],
) -> str:
    """The Markdown block written to stdout and, with --write-readme, to the README;
    ``machine`` is :func:`machine_info` as taken at the start of the run."""
    found = anomalies(results)
    retrieves = ["", retrieve_table(results, receivers, args.retrieve)] if args.retrieve else []
    lines = [
        recorded("run.py", f"{args.small:,} small instances, {args.ct:,} CT instances, "
                 f"{args.reps} C-FIND repetitions"
                 + (f", {min(NAGLE_COUNT, args.small):,} small instances from the Nagle sender"
                    if args.nagle else ""), seconds),
        "",
        *machine,
        "",
        table(results, receivers, args.nagle),
        *retrieves,
        "",
        "Raw numbers:",
        "",
        *details(results),
        "",
        "Anomalies detected by the script:" if found else "Anomalies detected by the script: none.",
    ]
    if found:
        lines += ["", *[f"- {problem}" for problem in found]]
    return "\n".join(lines)


def write_readme(
    block: str, start: str = RESULTS_START, end: str = RESULTS_END, heading: str = "Results"
) -> None:
    """Replace the text between the ``start`` and ``end`` markers of bench/README.md with
    ``block`` (a new ``heading`` section at the end when the markers are missing). The
    other benchmark scripts record their blocks with it too."""
    text = README.read_text() if README.exists() else "# minipacs benchmark\n"
    new = f"{start}\n{block}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + new + after
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + new + "\n"
    README.write_text(text)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--small", type=int, default=10_000, help="64x64 instances (10000)")
    parser.add_argument("--ct", type=int, default=1_000, help="512x512 instances (1000)")
    parser.add_argument("--reps", type=int, default=20, help="C-FIND repetitions (20)")
    parser.add_argument("--quick", action="store_true", help="2000 small, 200 CT, 5 repetitions")
    parser.add_argument(
        "--receivers",
        default=",".join(RECEIVERS),
        help="comma-separated subset of " + ",".join(RECEIVERS),
    )
    parser.add_argument(
        "--write-readme", action="store_true", help="record the results in bench/README.md"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated data (logs are always kept)"
    )
    parser.add_argument(
        "--retrieve",
        default=",".join(RETRIEVES),
        help="comma-separated retrieves to measure, of " + ",".join(RETRIEVES) + " ('' = none)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="minipacs's ae.workers (1)"
    )
    parser.add_argument(
        "--no-nagle",
        action="store_false",
        dest="nagle",
        help=f"skip the sender with Nagle's algorithm on ({NAGLE_COUNT} small instances)",
    )
    parser.add_argument(
        "--no-retrieve",
        action="store_const",
        const="",
        dest="retrieve",
        help="measure no retrieve (= --retrieve '')",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.small, args.ct, args.reps = 2_000, 200, 5
    args.receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
    unknown = set(args.receivers) - set(RECEIVERS)
    if unknown or not args.receivers:
        parser.error(f"--receivers: unknown {sorted(unknown)}; choose from {RECEIVERS}")
    args.retrieve = [s.strip().upper() for s in args.retrieve.split(",") if s.strip()]
    if set(args.retrieve) - set(RETRIEVES):
        parser.error(f"--retrieve: choose from {RETRIEVES}")
    args.retrieve = [s for s in RETRIEVES if s in args.retrieve]
    if min(args.small, args.ct, args.reps) < 1:
        parser.error("--small, --ct and --reps must be positive")
    return args


def check_tools(receivers: Sequence[str], services: Sequence[str]) -> None:
    """Fail early when a needed program is missing."""
    needed = ["storescu", "findscu", "echoscu"]
    needed += ["Orthanc"] if "orthanc" in receivers else []
    needed += ["storescp"] if "storescp" in receivers or "C-MOVE" in services else []
    needed += ["movescu"] if "C-MOVE" in services else []
    needed += ["getscu"] if "C-GET" in services else []
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if "minipacs" in receivers and not (VENV_BIN / "minipacs").exists():
        missing.append(str(VENV_BIN / "minipacs"))
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (DCMTK: apt-get install dcmtk; Orthanc: orthanc)")


@contextlib.contextmanager
def terminate_on_signal() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into SystemExit so that ``finally`` blocks run."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the data, run every cell, print (and optionally record) the table."""
    args = parse_args(argv)
    global MINIPACS_WORKERS
    MINIPACS_WORKERS = args.workers
    check_tools(args.receivers, args.retrieve)
    began = time.perf_counter()
    machine = machine_info()  # before the run: the minipacs tree may change meanwhile
    WORK_ROOT.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = WORK_ROOT / f"logs-{stamp}"
    log_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix=f"run-{stamp}-", dir=WORK_ROOT))
    with terminate_on_signal():
        try:
            print(f"generating data in {work} ...", flush=True)
            t = time.perf_counter()
            small = generate(work / "data-small", "small", args.small, 64, 10, 10, 2, seed=1)
            ct = generate(work / "data-ct", "ct", args.ct, 512, 2, 2, 2, seed=2)
            nagle = (generate(work / "data-nagle", "nagle", min(NAGLE_COUNT, args.small), 64, 3,
                              2, 2, seed=3) if args.nagle else None)
            os.sync()
            after_removals()
            print(
                f"  {small.count} small ({small.total_bytes / 1e6:.0f} MB, "
                f"{len(small.studies)} studies), {ct.count} CT "
                f"({ct.total_bytes / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s; "
                f"logs in {log_dir}",
                flush=True,
            )
            results = benchmark(
                args.receivers, small, ct, args.reps, work / "servers", log_dir, args.retrieve,
                nagle,
            )
        finally:
            cleanup()
            if not args.keep:
                remove(work)
    block = report(results, args.receivers, args, time.perf_counter() - began, machine)
    print()
    print(block)
    if args.write_readme:
        write_readme(block)
        print(f"\nwritten to {README}")
    return 1 if anomalies(results) else 0


if __name__ == "__main__":
    sys.exit(main())
