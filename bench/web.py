#!/usr/bin/env python3
"""DICOMweb: minipacs beside Orthanc and its DICOMweb plugin, issue 14's four benchmarks.

Both servers run side by side on this machine, each on its own data, and are measured with
the same client (``httpx``, one keep-alive connection per client thread; ``curl`` for the
timed WADO-RS retrieves), the requests alternating between the two (A B A B) so that the
machine's drift falls on both:

1. **QIDO-RS** ``/studies?PatientID=`` and ``/studies?StudyInstanceUID=`` over an index of
   1,000,000 instances (100 per study in 2 series, 5 studies per patient: ``bench/scale.py``'s
   layout and UIDs). minipacs's index is built by ``scale.populate``; Orthanc cannot be
   populated that way, so it is given the same instances by ``POST /instances`` (64x64
   instances with the same patients, studies and UIDs, 4 clients in parallel, about 40 min
   for 1M here; kept under ``bench/work/web/`` for the next run). With ``--qido-minipacs-size``
   above ``--qido-size``, minipacs is also measured alone over the larger index.
2. **/metadata** of a 1,000-instance series (128x128 CT, stored by ``storescu`` into both).
3. **WADO-RS** of a 1,000-instance 512x512 CT series
   (``Accept: multipart/related; type="application/dicom"; transfer-syntax=*``), MB/s; and
   of a ~1 GB study (2,000 x 512x512x16 bits) with the servers' VmRSS sampled meanwhile.
   Checked once with httpx (every part counted), timed with curl (httpx is the bottleneck
   above ~800 MB/s here).
4. **STOW-RS** ingest, instances/s: one instance per request, 50 per request, and 4 clients
   in parallel with one instance per request.

Run from the repository root (DCMTK's ``storescu`` loads the files of 2 and 3)::

    TCP_NODELAY=1 .venv/bin/python bench/web.py --quick          # a few minutes
    TCP_NODELAY=1 .venv/bin/python bench/web.py                  # full (the first: +40 min)
    TCP_NODELAY=1 .venv/bin/python bench/web.py --write-readme   # and record it

See bench/README.md, section "DICOMweb".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import io
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import run as bench  # noqa: E402  (bench/run.py: data, processes, receivers)
import scale  # noqa: E402  (bench/scale.py: the 1M index, its layout and UIDs)
from pydicom import dcmwrite  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid  # noqa: E402

WEB_DIR = bench.WORK_ROOT / "web"
"""Orthanc archives populated for QIDO-RS, kept for the next run (git-ignored)."""
README_START = "<!-- web:start -->"
README_END = "<!-- web:end -->"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_JSON = "application/dicom+json"
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/lib/*/orthanc/libOrthancDicomWeb.so*",
)
SERVERS = ("minipacs", "orthanc")
PARTS = ("qido", "metadata", "wado", "stow")
POPULATE_CLIENTS = 4
"""Parallel ``POST /instances`` clients that load Orthanc's QIDO archive."""
STOW_PER_REQUEST = 50
STOW_PARALLEL = 4
HTTP_TIMEOUT = 900.0

TARGETS = {
    "qido": "median < 10 ms, and faster than Orthanc",
    "metadata": "< 100 ms, and at least 5x faster than Orthanc",
    "wado": "MB/s at least Orthanc's; minipacs VmRSS growth < 64 MB for a 1 GB study",
    "stow": "instances/s at least Orthanc's, durable",
}


def plugin_path() -> str:
    """Where Debian's ``orthanc-dicomweb`` put the plugin."""
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise SystemExit("Orthanc's DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")


def load() -> str:
    """The load average, as ``uptime`` shows it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- servers --------------------------------------------------------------------------------


class WebServer:
    """What both servers offer here: a DICOMweb root URL and an HTTP client for it, and
    :meth:`count` net of a ``baseline`` (so that bench.send checks each set it sends to a
    server that holds others already)."""

    name: str
    proc: Any
    url: str
    baseline = 0

    def count(self) -> tuple[int, str]:
        held, how = super().count()  # type: ignore[misc]
        if self.baseline:
            return held - self.baseline, f"{how}, less the {self.baseline:,} held before"
        return held, how

    def client(self) -> httpx.Client:
        """Uncompressed answers (``Accept-Encoding: identity``): Orthanc would otherwise
        gzip some (``HttpCompressionEnabled``), and MB/s would not be of the same bytes."""
        return httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT,
                            headers={"Accept-Encoding": "identity"})

    def answers_http(self) -> bool:
        try:
            httpx.get(self.url + "/studies?limit=1", timeout=5)
        except httpx.HTTPError:
            return False
        return True

    def pid(self) -> int:
        return int(self.proc.pid) if self.proc is not None else 0


class Minipacs(WebServer, bench.Minipacs):
    """``minipacs serve`` as bench/run.py starts it (durability full, SQLite, WARNING),
    with its HTTP listener on a port of ours and the viewer off; it may start on an archive
    that already exists."""

    def __init__(self, log_dir: Path, config_dir: Path) -> None:
        super().__init__(log_dir, config_dir)
        self.http_port = 0
        with open(self.config, "a") as config:
            config.write("web:\n  viewer: false\n")

    @property
    def url(self) -> str:
        return f"http://{bench.HOST}:{self.http_port}/dicom-web"

    wrapper: Path | None = None
    """A Python script run instead of the ``minipacs`` command, with the same arguments
    (``--minipacs-wrapper``: an experiment's patched server, measured by the same harness)."""

    def command(self) -> list[str | Path]:
        cmd = super().command()
        self.http_port = bench.free_port()
        cmd[cmd.index("--http-port") + 1] = str(self.http_port)
        if self.wrapper is not None:
            cmd[:1] = [sys.executable, self.wrapper]
        return cmd

    def ready(self) -> bool:
        return bench.echo_ok(self.aet, self.port) and self.answers_http()

    def start(self, data_dir: Path, tag: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        _start(self, data_dir, tag)


class Orthanc(WebServer, bench.Orthanc):
    """Orthanc 1.10 as bench/run.py starts it, plus its DICOMweb plugin at ``/dicom-web/``,
    authentication off, storage compression off, every other option at its default (among
    them the plugin's ``StudiesMetadata`` / ``SeriesMetadata``: ``Full``)."""

    def command(self) -> list[str | Path]:
        cmd = super().command()
        path = Path(cmd[-1])
        config = json.loads(path.read_text())
        config.update(
            Plugins=[plugin_path()],
            DicomWeb={"Enable": True, "Root": "/dicom-web/"},
            StorageCompression=False,
            AuthenticationEnabled=False,
        )
        path.write_text(json.dumps(config, indent=2))
        return cmd

    @property
    def url(self) -> str:
        return f"http://{bench.HOST}:{self.http_port}/dicom-web"

    def ready(self) -> bool:
        return super().ready() and self.answers_http()

    def start(self, data_dir: Path, tag: str) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        _start(self, data_dir, tag)


def _start(server: bench.Receiver, data_dir: Path, tag: str) -> None:
    """bench.Receiver.start, on a folder that may exist already."""
    server.data_dir = data_dir
    server.port = bench.free_port()
    server.log = server.log_dir / f"{server.name}-{tag}.log"
    with open(server.log, "wb") as log:
        server.proc = bench.spawn(server.command(), log)
    bench.wait_until(server.ready, server.proc, server.name, server.log)


@contextlib.contextmanager
def running(server: bench.Receiver, data_dir: Path, tag: str, results: Results
            ) -> Iterator[None]:
    """Start ``server`` on ``data_dir``, stop it at the end; note a bad exit code."""
    server.start(data_dir, tag)
    try:
        yield
    finally:
        server.stop()
        code = server.exit_codes[-1] if server.exit_codes else 0
        if code != 0:
            results.problems.append(f"{server.name} ({tag}) exit code on SIGTERM: {code}")


# -- instances made in memory ----------------------------------------------------------------


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (a short-length VR, or OB)."""
    if vr == "OB":
        return struct.pack("<HH2s2xI", group, element, b"OB", len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" * (len(raw) % 2)


def _is(value: int) -> bytes:
    raw = str(value).encode()
    return raw + b" " * (len(raw) % 2)


class Template:
    """A series' instance encoded once by pydicom, then spliced for each instance: only the
    SOP Instance UID (data set and File Meta) and the Instance Number change."""

    def __init__(self, ds: Dataset) -> None:
        ds = ds.copy()
        self.sop_class = str(ds.SOPClassUID)
        ds.SOPInstanceUID = scale.MARK_UID
        ds.InstanceNumber = scale.MARK_NUMBER
        del ds.file_meta
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
        body = buffer.getvalue()
        sop = _element(0x0008, 0x0018, "UI", _uid(scale.MARK_UID))
        number = _element(0x0020, 0x0013, "IS", _is(scale.MARK_NUMBER))
        head, rest = body.split(sop)
        middle, tail = rest.split(number)
        self.parts = (head, middle, tail)

    def instance(self, sop_uid: str, number: int) -> bytes:
        """A Part 10 file of this series with ``sop_uid`` and ``number``."""
        meta = b"".join((
            _element(0x0002, 0x0001, "OB", b"\0\1"),
            _element(0x0002, 0x0002, "UI", _uid(self.sop_class)),
            _element(0x0002, 0x0003, "UI", _uid(sop_uid)),
            _element(0x0002, 0x0010, "UI", _uid(ExplicitVRLittleEndian)),
            _element(0x0002, 0x0012, "UI", _uid(PYDICOM_IMPLEMENTATION_UID)),
        ))
        head, middle, tail = self.parts
        return b"".join((
            b"\0" * 128, b"DICM", _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta))),
            meta, head, _element(0x0008, 0x0018, "UI", _uid(sop_uid)), middle,
            _element(0x0020, 0x0013, "IS", _is(number)), tail))


def _pixels(ds: Dataset, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds.Rows = ds.Columns = size
    ds.PixelData = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).astype("<u2").tobytes()


def scale_instances(layout: scale.Layout, studies: range) -> Iterator[bytes]:
    """The instances of ``studies`` in ``bench/scale.py``'s layout, with its UIDs and
    patients, 64x64 pixels: what ``scale.populate`` indexes, as files."""
    for k in studies:
        for r in range(scale.SERIES_PER_STUDY):
            ds = scale._header(layout, k, r)
            _pixels(ds, 64, k)
            template = Template(ds)
            first = k * scale.INSTANCES_PER_STUDY + r * scale.INSTANCES_PER_SERIES + 1
            for n in range(1, scale.INSTANCES_PER_SERIES + 1):
                yield template.instance(scale.sop_uid(first + n - 1), n)


def fresh_instances(name: str, count: int, seed: int) -> list[bytes]:
    """``count`` new 64x64 CT instances (10 studies of 2 series each, fresh UIDs)."""
    templates = []
    for s in range(10):
        study, frame = generate_uid(), generate_uid()
        for r in range(2):
            ds = bench._series_template(name, seed, s, r, study, frame, 64)
            _pixels(ds, 64, seed * 100 + s)
            templates.append(Template(ds))
    return [templates[i % len(templates)].instance(generate_uid(), i // len(templates) + 1)
            for i in range(count)]


# -- populating Orthanc for QIDO-RS ------------------------------------------------------------


def orthanc_archive(instances: int, log_dir: Path, results: Results) -> Path:
    """The kept Orthanc archive of ``instances`` instances in scale.py's layout, loaded by
    :data:`POPULATE_CLIENTS` clients posting to ``/instances`` when missing."""
    path = WEB_DIR / f"orthanc-{instances}"
    done = path / "populated.json"
    if done.exists():
        made = json.loads(done.read_text())
        results.notes.append(
            f"Orthanc's {instances:,}-instance QIDO archive: kept from "
            f"{made['when']} (loaded by {made['clients']} `POST /instances` clients at "
            f"{made['rate']:.0f} inst/s, {made['seconds'] / 60:.1f} min)")
        return path
    if path.exists():
        shutil.rmtree(path)
    layout = scale.Layout(instances)
    server = Orthanc(log_dir)
    posted = [0] * POPULATE_CLIENTS
    failures: list[str] = []
    print(f"populating Orthanc with {instances:,} instances ...", file=sys.stderr, flush=True)
    with running(server, path / "data", f"populate-{instances}", results):
        begin = time.perf_counter()

        def post(worker: int) -> None:
            with httpx.Client(base_url=f"http://{bench.HOST}:{server.http_port}",
                              timeout=HTTP_TIMEOUT) as client:
                studies = range(worker, layout.studies, POPULATE_CLIENTS)
                for body in scale_instances(layout, studies):
                    response = client.post("/instances", content=body,
                                           headers={"Content-Type": "application/dicom"})
                    if response.status_code != 200:
                        failures.append(f"POST /instances: HTTP {response.status_code}")
                        return
                    posted[worker] += 1

        threads = [threading.Thread(target=post, args=(w,)) for w in range(POPULATE_CLIENTS)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            threads[0].join(5)
            total = sum(posted)
            rate = total / (time.perf_counter() - begin)
            print(f"\r  {total:,} / {instances:,} ({rate:.0f} inst/s)", end="",
                  file=sys.stderr, flush=True)
        seconds = time.perf_counter() - begin
        print(file=sys.stderr)
        held, _ = server.count()
    if failures or held != instances:
        raise RuntimeError(f"populating Orthanc: {failures[:1]}, holds {held} of {instances}")
    made = {"instances": instances, "seconds": seconds, "rate": instances / seconds,
            "clients": POPULATE_CLIENTS,
            "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    done.write_text(json.dumps(made))
    results.notes.append(
        f"Orthanc's {instances:,}-instance QIDO archive loaded in this run by "
        f"{POPULATE_CLIENTS} `POST /instances` clients: {made['rate']:.0f} inst/s, "
        f"{seconds / 60:.1f} min")
    return path


# -- results ----------------------------------------------------------------------------------


@dataclass
class Cell:
    """One measurement on one server: its values (ms, MB/s or inst/s), and what was seen."""

    values: list[float] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    def largest(self) -> float | None:
        return max(self.values) if self.values else None


@dataclass
class Row:
    """One line of the table: what, its unit, which target, and a cell per server."""

    label: str
    unit: str
    target: str
    cells: dict[str, Cell] = field(default_factory=dict)
    higher_is_better: bool = False

    def cell(self, server: str) -> Cell:
        return self.cells.setdefault(server, Cell())

    def value(self, server: str) -> float | None:
        """The cell's median; its largest value for a memory growth (the target's bound)."""
        cell = self.cells.get(server)
        if cell is None:
            return None
        return cell.largest() if self.unit == "MiB" else cell.median()


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def row(self, label: str, unit: str, target: str, higher: bool = False) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        row = Row(label, unit, target, higher_is_better=higher)
        self.rows.append(row)
        return row


def alternate(servers: Sequence[Any], rep: int) -> Sequence[Any]:
    """A B, then B A: the order of the servers in repetition ``rep``."""
    return servers if rep % 2 == 0 else list(reversed(servers))


def guarded(row: Row, server: str, what: Callable[[], None]) -> None:
    """Run one measurement; an exception becomes a problem of its cell, not the run's end."""
    cell = row.cell(server)
    try:
        cell.loads.append(load())
        what()
    except (httpx.HTTPError, RuntimeError, ValueError, KeyError, OSError) as exc:
        message = f"{type(exc).__name__}: {exc}"
        if message not in cell.problems:
            cell.problems.append(message)


def check_status(response: httpx.Response, what: str) -> None:
    if response.status_code != 200:
        text = response.text[:200].replace("\n", " ") if response.content else ""
        raise RuntimeError(f"{what}: HTTP {response.status_code} {text}".rstrip())


# -- 1. QIDO-RS -----------------------------------------------------------------------------


def _qido_targets(layout: scale.Layout, reps: int) -> list[tuple[int, int]]:
    """(patient, study) pairs spread over the archive, one per repetition."""
    out = []
    for rep in range(reps):
        k = (rep * 7919 + layout.studies // 2) % layout.studies
        out.append((layout.patient_of(k), k))
    return out


def qido(servers: Sequence[WebServer], layout: scale.Layout, reps: int, results: Results,
         label: str) -> None:
    """``/studies?PatientID=`` and ``/studies?StudyInstanceUID=`` on every server, ``reps``
    times each after one warm-up, alternating; every answer checked."""
    rows = {
        "PatientID": results.row(f"QIDO-RS /studies?PatientID= ({label})", "ms", "qido"),
        "StudyInstanceUID": results.row(f"QIDO-RS /studies?StudyInstanceUID= ({label})",
                                        "ms", "qido"),
    }
    clients = {server.name: server.client() for server in servers}
    try:
        for rep, (p, k) in enumerate([(0, 0), *_qido_targets(layout, reps)]):
            in_patient = {scale.study_uid(q) for q in range(p * scale.STUDIES_PER_PATIENT,
                          min((p + 1) * scale.STUDIES_PER_PATIENT, layout.studies))}
            queries = (("PatientID", scale.patient_id(p), in_patient),
                       ("StudyInstanceUID", scale.study_uid(k), {scale.study_uid(k)}))
            for server in alternate(servers, rep):
                for key, value, expected in queries:
                    def one(server: WebServer = server, key: str = key, value: str = value,
                            expected: set[str] = expected, rep: int = rep) -> None:
                        client = clients[server.name]
                        begin = time.perf_counter()
                        response = client.get("/studies", params={key: value},
                                              headers={"Accept": ACCEPT_JSON})
                        seconds = time.perf_counter() - begin
                        check_status(response, f"/studies?{key}=")
                        got = {str(a.get("0020000D", {}).get("Value", [""])[0])
                               for a in response.json()}
                        if got != expected:
                            raise RuntimeError(f"/studies?{key}={value}: {len(got)} studies, "
                                               f"expected {len(expected)}")
                        if rep:  # the first is the warm-up
                            rows[key].cell(server.name).values.append(seconds * 1000)
                    guarded(rows[key], server.name, one)
    finally:
        for client in clients.values():
            client.close()


def run_qido(args: argparse.Namespace, work: Path, log_dir: Path, results: Results) -> None:
    size = args.qido_size
    orthanc_path = orthanc_archive(size, log_dir, results) if "orthanc" in args.servers else None
    servers: list[WebServer] = []
    with contextlib.ExitStack() as stack:
        if "minipacs" in args.servers:
            archive = work / f"qido-{size}"
            scale._copy(scale.populated(size, False), archive)
            m = Minipacs(log_dir, work)
            stack.enter_context(running(m, archive, f"qido-{size}", results))
            servers.append(m)
        if orthanc_path is not None:
            o = Orthanc(log_dir)
            stack.enter_context(running(o, orthanc_path / "data", f"qido-{size}", results))
            servers.append(o)
        print(f"QIDO-RS over {size:,} instances ({load()})", file=sys.stderr, flush=True)
        qido(servers, scale.Layout(size), args.reps, results, f"{size:,} instances")
    if "minipacs" in args.servers and args.qido_minipacs_size > size:
        big = args.qido_minipacs_size
        archive = work / f"qido-{big}"
        scale._copy(scale.populated(big, False), archive)
        m = Minipacs(log_dir, work)
        with running(m, archive, f"qido-{big}", results):
            print(f"QIDO-RS over {big:,} instances, minipacs alone ({load()})",
                  file=sys.stderr, flush=True)
            qido([m], scale.Layout(big), args.reps, results,
                 f"{big:,} instances, minipacs alone")
        shutil.rmtree(archive)


# -- data on disk for 2 and 3 ---------------------------------------------------------------


def one_series(data: bench.DataSet) -> tuple[str, str]:
    series_uid, info = next(iter(data.series.items()))
    return info.study_uid, series_uid


# -- 2. /metadata ---------------------------------------------------------------------------


def metadata(servers: Sequence[WebServer], data: bench.DataSet, reps: int,
             results: Results) -> None:
    study, series = one_series(data)
    row = results.row(f"/metadata of a {data.count:,}-instance series (median; first)", "ms",
                      "metadata")
    clients = {server.name: server.client() for server in servers}
    path = f"/studies/{study}/series/{series}/metadata"
    try:
        for rep in range(reps + 1):
            for server in alternate(servers, rep):
                def one(server: WebServer = server, rep: int = rep) -> None:
                    begin = time.perf_counter()
                    response = clients[server.name].get(path, headers={"Accept": ACCEPT_JSON})
                    seconds = time.perf_counter() - begin
                    check_status(response, "/metadata")
                    answers = response.json()
                    if len(answers) != data.count:
                        raise RuntimeError(f"/metadata: {len(answers)} instances, "
                                           f"expected {data.count}")
                    cell = row.cell(server.name)
                    if rep == 0:
                        cell.extra["first"] = seconds * 1000
                        cell.extra["bytes"] = len(response.content)
                        cell.extra["attributes"] = len(answers[0])
                    else:
                        cell.values.append(seconds * 1000)
                guarded(row, server.name, one)
    finally:
        for client in clients.values():
            client.close()


# -- 3. WADO-RS -----------------------------------------------------------------------------


def _boundary(content_type: str) -> bytes:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            return value.strip().strip('"').encode()
    raise RuntimeError(f"no boundary in Content-Type {content_type!r}")


def retrieve(server: WebServer, client: httpx.Client, path: str, expected: int,
             total_bytes: int) -> tuple[float, int]:
    """Stream one multipart retrieve to its end; return (seconds, bytes); check that it
    holds ``expected`` parts."""
    begin = time.perf_counter()
    received = parts = 0
    with client.stream("GET", path, headers={"Accept": ACCEPT_DICOM}) as response:
        check_status(response, f"GET {path}")
        dash_boundary = b"--" + _boundary(response.headers.get("content-type", ""))
        delimiter = b"\r\n" + dash_boundary
        keep = b""
        for chunk in response.iter_raw(1 << 20):
            if not received and chunk.startswith(dash_boundary):
                parts += 1  # the first delimiter may start the body without a CRLF
            received += len(chunk)
            window = keep + chunk
            parts += window.count(delimiter)
            keep = window[-(len(delimiter) - 1):]
    seconds = time.perf_counter() - begin
    parts -= 1  # the close delimiter
    if parts != expected:
        raise RuntimeError(f"GET {path}: {parts} parts, expected {expected}")
    if received < total_bytes * 0.95:
        raise RuntimeError(f"GET {path}: {received:,} bytes, files hold {total_bytes:,}")
    return seconds, received


def curl(server: WebServer, path: str) -> tuple[float, int]:
    """Retrieve ``path`` with curl into /dev/null; return (seconds to the last byte, bytes).

    The timed client: curl is C and costs the 2 cores little, whereas httpx itself tops out
    near 700-900 MB/s here, which hides the servers' difference."""
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--output", "/dev/null",
         "--header", f"Accept: {ACCEPT_DICOM}", "--header", "Accept-Encoding: identity",
         "--write-out", "%{size_download} %{time_total}", server.url + path],
        capture_output=True, text=True, timeout=HTTP_TIMEOUT, check=False)
    if result.returncode:
        raise RuntimeError(f"curl {path}: exit {result.returncode}: {result.stderr.strip()}")
    size, seconds = result.stdout.split()
    return float(seconds), int(size)


def wado(servers: Sequence[WebServer], data: bench.DataSet, reps: int, results: Results,
         study_level: bool, sample_rss: bool) -> None:
    """Retrieve the series (or the study) of ``data``: once with httpx, which checks every
    part, then ``reps`` times timed with curl; with ``sample_rss``, each server's VmRSS is
    sampled from before the first retrieve on."""
    study, series = one_series(data)
    path = f"/studies/{study}" + ("" if study_level else f"/series/{series}")
    what = "study" if study_level else "series"
    row = results.row(f"WADO-RS {what} of {data.count:,} x 512x512 "
                      f"({data.total_bytes / 1e9:.2f} GB), curl", "MB/s", "wado", higher=True)
    rss = results.row(f"VmRSS growth retrieving that {what} (idle -> peak; largest, not "
                      "median)", "MiB", "wado") if sample_rss else None
    idle = {server.name: bench.vm_rss(server.pid()) for server in servers}
    for rep in range(-1, reps):
        for server in alternate(servers, rep):
            def one(server: WebServer = server, rep: int = rep) -> None:
                sampler = bench.RssSampler(server.pid())
                with sampler:
                    if rep < 0:  # the checked retrieve (every part counted), also a warm-up
                        with server.client() as client:
                            seconds, received = retrieve(server, client, path, data.count,
                                                         data.total_bytes)
                    else:
                        seconds, received = curl(server, path)
                cell = row.cell(server.name)
                if rep < 0:
                    cell.extra["httpx MB/s (the checked retrieve)"] = received / 1e6 / seconds
                else:
                    cell.values.append(received / 1e6 / seconds)
                    if received != cell.extra.setdefault("bytes", received):
                        raise RuntimeError(f"{received} bytes, before {cell.extra['bytes']}")
                if rss is not None:
                    grown = rss.cell(server.name)
                    grown.values.append((sampler.peak - idle[server.name]) / 1024)
                    grown.extra["idle before the first retrieve"] = (
                        f"{idle[server.name] / 1024:.1f} MiB")
                    grown.extra.setdefault("peak of each", []).append(
                        f"{sampler.peak / 1024:.1f}")
            guarded(row, server.name, one)
    if rss is not None:
        for server in servers:
            after = bench.vm_rss(server.pid()) / 1024
            rss.cell(server.name).extra["idle after"] = f"{after:.1f} MiB"


# -- 4. STOW-RS -----------------------------------------------------------------------------


def stow_body(instances: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), i)
             for i in instances]
    body = b"".join(parts) + b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _stored(response: httpx.Response) -> tuple[int, int]:
    """(referenced, failed) instances of a STOW-RS response."""
    answer = response.json()
    if isinstance(answer, list):
        answer = answer[0] if answer else {}
    return (len(answer.get("00081199", {}).get("Value", [])),
            len(answer.get("00081198", {}).get("Value", [])))


def stow(server: WebServer, instances: list[bytes], per_request: int, clients: int) -> float:
    """POST ``instances`` to ``/studies``, ``per_request`` per request, from ``clients``
    threads (one keep-alive connection each); return the seconds; every one must be
    referenced as stored."""
    bodies = [stow_body(instances[i:i + per_request])
              for i in range(0, len(instances), per_request)]
    stored = [0] * clients
    failures: list[str] = []

    def post(worker: int) -> None:
        with server.client() as client:
            for body, content_type in bodies[worker::clients]:
                response = client.post("/studies", content=body, headers={
                    "Content-Type": content_type, "Accept": ACCEPT_JSON})
                if response.status_code != 200:
                    failures.append(f"HTTP {response.status_code} "
                                    f"{response.text[:200]!r}")
                    return
                ok, failed = _stored(response)
                stored[worker] += ok
                if failed:
                    failures.append(f"{failed} FailedSOPSequence items")

    threads = [threading.Thread(target=post, args=(w,)) for w in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - begin
    if failures:
        raise RuntimeError(f"STOW-RS: {failures[0]}")
    if sum(stored) != len(instances):
        raise RuntimeError(f"STOW-RS: {sum(stored)} referenced, sent {len(instances)}")
    return seconds


STOW_MODES = ((1, 1), (STOW_PER_REQUEST, 1), (1, STOW_PARALLEL))


def run_stow(servers: Sequence[WebServer], count: int, rounds: int, results: Results) -> None:
    seed = 1
    for per_request, clients in STOW_MODES:
        how = (f"{per_request} per request" if clients == 1
               else f"{clients} clients, {per_request} per request")
        row = results.row(f"STOW-RS {count:,} x 64x64, {how}", "inst/s", "stow", higher=True)
        for rep in range(rounds):
            for server in alternate(servers, rep):
                seed += 1
                instances = fresh_instances(f"stow{seed}", count, seed)

                def one(server: WebServer = server, instances: list[bytes] = instances,
                        per_request: int = per_request, clients: int = clients,
                        row: Row = row) -> None:
                    before, _ = server.count()
                    seconds = stow(server, instances, per_request, clients)
                    after, how_counted = server.count()
                    if after - before != len(instances):
                        raise RuntimeError(f"holds {after - before} more, expected "
                                           f"{len(instances)} ({how_counted})")
                    row.cell(server.name).values.append(len(instances) / seconds)
                guarded(row, server.name, one)


# -- the run --------------------------------------------------------------------------------


def run_files(args: argparse.Namespace, work: Path, log_dir: Path, results: Results) -> None:
    """Parts 2, 3 and 4 on two fresh servers holding the same files."""
    parts = set(args.only)
    print("generating data ...", file=sys.stderr, flush=True)
    sets: dict[str, bench.DataSet] = {}
    if "metadata" in parts:
        sets["metadata"] = bench.generate(work / "data-meta", "meta", args.series, 128,
                                          1, 1, 1, seed=11)
    if "wado" in parts:
        sets["ct"] = bench.generate(work / "data-ct", "ct", args.series, 512, 1, 1, 1, seed=12)
        sets["big"] = bench.generate(work / "data-big", "big", args.big, 512, 1, 1, 2,
                                     seed=13)
    bench.run(["sync"], 300)
    servers: list[WebServer] = []
    with contextlib.ExitStack() as stack:
        if "minipacs" in args.servers:
            m = Minipacs(log_dir, work)
            stack.enter_context(running(m, work / "minipacs", "files", results))
            servers.append(m)
        if "orthanc" in args.servers:
            o = Orthanc(log_dir)
            stack.enter_context(running(o, work / "orthanc", "files", results))
            servers.append(o)
        for name, data in sets.items():
            for server in servers:
                print(f"storescu: {data.count:,} {name} instances to {server.name}",
                      file=sys.stderr, flush=True)
                server.baseline = 0
                server.baseline = server.count()[0]
                cell = bench.send(server, data, 1, log_dir, f"web-{name}")  # type: ignore
                server.baseline = 0
                results.problems += [f"storescu {name} to {server.name}: {p}"
                                     for p in cell.problems]
                results.notes.append(
                    f"{data.count:,} {name} instances ({data.total_bytes / 1e6:.0f} MB) "
                    f"stored into {server.name} by storescu at {cell.rate:.0f} inst/s")
        if "metadata" in parts:
            print(f"/metadata ({load()})", file=sys.stderr, flush=True)
            metadata(servers, sets["metadata"], args.reps, results)
        if "wado" in parts:
            print(f"WADO-RS series ({load()})", file=sys.stderr, flush=True)
            wado(servers, sets["ct"], args.wado_reps, results, False, False)
            print(f"WADO-RS study ({load()})", file=sys.stderr, flush=True)
            wado(servers, sets["big"], args.wado_reps, results, True, True)
        if "stow" in parts:
            print(f"STOW-RS ({load()})", file=sys.stderr, flush=True)
            run_stow(servers, args.stow, args.stow_rounds, results)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def verdict(row: Row) -> str:
    """Whether minipacs meets the row's target, from the numbers of this run."""
    mv, ov = row.value("minipacs"), row.value("orthanc")
    if mv is None:
        return "not measured"
    checks: list[bool] = []
    if row.target == "qido":
        checks.append(mv < 10)
        if ov is not None:
            checks.append(mv < ov)
    elif row.target == "metadata":
        checks.append(mv < 100)
        if ov is not None:
            checks.append(ov / mv >= 5)
    elif row.target == "wado" and row.unit == "MiB":
        checks.append(mv < 64 * 1e6 / 2**20)
    elif row.target in ("wado", "stow") and ov is not None:
        checks.append(mv >= ov)
    if not checks:
        return "(minipacs alone)"
    return "met" if all(checks) else "**missed**"


def table(results: Results) -> list[str]:
    lines = ["| measurement | unit | minipacs (median) | Orthanc + DICOMweb (median) "
             "| Orthanc / minipacs | target | met? |", "|---|---|---|---|---|---|---|"]
    for row in results.rows:
        m, o = row.cells.get("minipacs"), row.cells.get("orthanc")
        mv, ov = row.value("minipacs"), row.value("orthanc")
        ms = _fmt(mv, row.unit)
        os_ = _fmt(ov, row.unit)
        if row.label.startswith("/metadata"):
            ms += f" (first {_fmt(m.extra.get('first'), 'ms')})" if m and m.extra else ""
            os_ += f" (first {_fmt(o.extra.get('first'), 'ms')})" if o and o.extra else ""
        ratio = f"{ov / mv:.2f}" if mv and ov else ""
        target = TARGETS[row.target]
        if row.target == "wado":
            target = ("MB/s at least Orthanc's" if row.unit == "MB/s"
                      else "minipacs growth < 64 MB")
        lines.append(f"| {row.label} | {row.unit} | {ms} | {os_} | {ratio} | {target} | "
                     f"{verdict(row)} |")
    return lines


def raw(results: Results) -> list[str]:
    lines = []
    for row in results.rows:
        for name, cell in row.cells.items():
            values = ", ".join(_fmt(v, row.unit) for v in cell.values)
            extra = "; ".join(f"{k} {round(v, 3) if isinstance(v, float) else v}"
                              for k, v in cell.extra.items())
            loads = f"load {cell.loads[0]} .. {cell.loads[-1]}" if cell.loads else ""
            lines.append(f"- {row.label}, {name}: {len(cell.values)} values [{values}]"
                         + (f"; {extra}" if extra else "") + f"; {loads}")
    return lines


def _curl_version() -> str:
    try:
        out = subprocess.run(["curl", "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except OSError:
        return "curl"
    return " ".join(out.split()[:2]) if out else "curl"


def report(results: Results, args: argparse.Namespace, seconds: float,
           machine: list[str], began: str) -> str:
    problems = list(results.problems)
    for row in results.rows:
        for name, cell in row.cells.items():
            problems += [f"{row.label}, {name}: {p}" for p in cell.problems]
    lines = [
        bench.recorded("web.py", f"QIDO-RS over {args.qido_size:,} instances"
                       + (f" (and {args.qido_minipacs_size:,} on minipacs alone)"
                          if args.qido_minipacs_size > args.qido_size else "")
                       + f", {args.reps} repetitions; "
                       f"series of {args.series:,}; a study of {args.big:,} x 512x512; "
                       f"STOW-RS {args.stow:,} x {args.stow_rounds} rounds; began {began}",
                       seconds, env="TCP_NODELAY=1 "),
        "",
        *machine,
        *([f"- minipacs run through `{args.minipacs_wrapper}` (an experiment), not the "
            "`minipacs` command"] if args.minipacs_wrapper else []),
        f"- Orthanc's DICOMweb plugin: `{plugin_path()}` (Debian `orthanc-dicomweb`); "
        "`StudiesMetadata` / `SeriesMetadata` at their default (`Full`); Orthanc's storage "
        "options at their defaults but `StorageCompression: false`",
        f"- clients: httpx {httpx.__version__}, one keep-alive connection per client thread, "
        "`Accept-Encoding: identity`; the WADO-RS retrieves timed with "
        f"{_curl_version()} into /dev/null (httpx checks the parts once); the same for both "
        "servers; requests alternate between the servers (A B, B A)",
        "",
        *table(results),
        "",
        "Notes:",
        "",
        *[f"- {note}" for note in results.notes],
        "",
        "Raw numbers (each repetition, in order; load average at the cell's first and last "
        "repetition):",
        "",
        *raw(results),
        "",
        "Anomalies detected by the script:" + ("" if problems else " none."),
    ]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="QIDO over 10,000 (minipacs also 100,000); series of 200; a "
                             "study of 400; STOW 200 x 1 round; 10 repetitions")
    parser.add_argument("--qido-size", type=int, default=1_000_000,
                        help="instances indexed in both servers for QIDO-RS (1000000)")
    parser.add_argument("--qido-minipacs-size", type=int, default=1_000_000,
                        help="instances indexed for minipacs alone (1000000)")
    parser.add_argument("--series", type=int, default=1_000,
                        help="instances of the /metadata and WADO-RS series (1000)")
    parser.add_argument("--big", type=int, default=2_000,
                        help="512x512 instances of the ~1 GB study (2000)")
    parser.add_argument("--stow", type=int, default=2_000,
                        help="instances per STOW-RS cell (2000)")
    parser.add_argument("--stow-rounds", type=int, default=2, help="STOW-RS rounds (2)")
    parser.add_argument("--reps", type=int, default=30, help="QIDO and /metadata repetitions")
    parser.add_argument("--wado-reps", type=int, default=5, help="WADO-RS repetitions (5)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts, of " + ",".join(PARTS))
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated subset of " + ",".join(SERVERS))
    parser.add_argument("--write-readme", action="store_true",
                        help="record the results in bench/README.md")
    parser.add_argument("--minipacs-wrapper", type=Path, metavar="SCRIPT",
                        help="run this Python script (which runs scp.__main__.main) instead "
                             "of the minipacs command: for by-hand experiments")
    args = parser.parse_args(argv)
    if args.quick:
        args.qido_size, args.qido_minipacs_size = 10_000, 100_000
        args.series, args.big, args.stow, args.stow_rounds = 200, 400, 200, 1
        args.reps, args.wado_reps = 10, 2
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.only or set(args.only) - set(PARTS):
        parser.error(f"--only: choose from {PARTS}")
    if not args.servers or set(args.servers) - set(SERVERS):
        parser.error(f"--servers: choose from {SERVERS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Minipacs.wrapper = args.minipacs_wrapper
    if "orthanc" in args.servers:
        plugin_path()
    if "wado" in args.only and shutil.which("curl") is None:
        sys.exit("curl is missing (apt-get install curl): it times the WADO-RS retrieves")
    began = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    start = time.perf_counter()
    machine = bench.machine_info()
    machine.insert(2, f"- load average at the start: {load()} (other work on this machine)")
    bench.WORK_ROOT.mkdir(exist_ok=True)
    WEB_DIR.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = bench.WORK_ROOT / f"web-logs-{stamp}"
    log_dir.mkdir()
    work = Path(tempfile.mkdtemp(prefix=f"web-{stamp}-", dir=bench.WORK_ROOT))
    results = Results()
    bench.after_removals()
    with bench.terminate_on_signal():
        try:
            if "qido" in args.only:
                run_qido(args, work, log_dir, results)
            if set(args.only) - {"qido"}:
                run_files(args, work, log_dir, results)
        finally:
            bench.cleanup()
            bench.remove(work)
    for log in sorted(log_dir.glob("minipacs-*.log")):
        if "storescu" in log.name:
            continue  # bench.send reads those
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", line)]
        if lines:
            results.problems.append(f"{log.name}: {len(lines)} WARNING/ERROR line(s), "
                                    f"first: {lines[0]}")
    block = report(results, args, time.perf_counter() - start, machine, began)
    print(block)
    if args.write_readme:
        bench.write_readme(block, README_START, README_END, "DICOMweb (issue 14)")
        print(f"\nwritten to {bench.README}")
    return 1 if "Anomalies detected by the script: none." not in block else 0


if __name__ == "__main__":
    sys.exit(main())
