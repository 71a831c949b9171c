#!/usr/bin/env python3
"""How minipacs behaves as the archive grows: issue 6 targets 3, 4 and 6.

For each archive size (instances already indexed: 0, 10k, 100k, 1M by default) the index is
pre-populated by :func:`populate` through minipacs's own schema (``storage.index.connect``
creates it; rows carry what ``storage.parsing.extract`` makes of a real header; counters
exact), then a real ``minipacs serve`` is started on it and measured:

- **startup**: from the ``minipacs serve`` process start to its first C-ECHO answered;
- **ingest**: a fresh set of small instances sent by DCMTK ``storescu`` over one association
  (C-STORE, ``storage.durability: full``), rounds alternating over the sizes;
- **C-FIND** on one open pynetdicom association (server time, not process start): STUDY level
  with every computed key by PatientID, by StudyInstanceUID, by a PatientName wildcard that
  matches 50 studies, and every study streamed; SERIES and IMAGE level by their parent UID
  (time to the first response and to the last);
- **the query plan** of each C-FIND (SQLite ``EXPLAIN QUERY PLAN`` of the SELECT the server
  runs, from ``storage.query.page_select``);
- **idle RSS** of the server before and after the ingest.

Run from the repository root (without activating the venv: DCMTK's tools must win)::

    TCP_NODELAY=1 .venv/bin/python bench/scale.py                    # 0, 10k, 100k, 1M
    TCP_NODELAY=1 .venv/bin/python bench/scale.py --quick            # 0, 10k, 100k; 1 round

(RSS across a 100,000-instance ingest: ``bench/memory_ingest.py --count 100000``.)
Populated indexes are kept under ``bench/work/scale/`` (git-ignored) and reused by the next
run unless ``--repopulate``; the 1M one takes about 40 s to build and 1.5 GB. Each run's
ingested instances go to a copy, so the kept indexes stay exactly their size.

**PostgreSQL** (issue 17), ``--index postgresql`` or ``--index both`` (SQLite and PostgreSQL
side by side, each size and round on one then the other)::

    TCP_NODELAY=1 .venv/bin/python bench/scale.py --index both --sizes 0,1000000
    TCP_NODELAY=1 .venv/bin/python bench/scale.py --index postgresql --sizes 0,1000000,10000000

measures the same, plus QIDO-RS ``GET /dicom-web/studies`` by PatientID and by
StudyInstanceUID (same return keys, one kept-alive connection) and PostgreSQL's ``EXPLAIN
(ANALYZE, BUFFERS)`` of each C-FIND's SELECT. The index is a PostgreSQL cluster of its own
(bench/scale_pg.py: tests/postgres.py's, but ``fsync`` on and memory for a 24 GB machine),
kept in ``bench/work/scale/postgresql`` with one database per size, populated with the same
rows by ``COPY`` (10M instances: about 20 min and 15 GB) and set back after each round
(the rows a round added deleted, the sequences reset). ``--populate-only`` builds the kept
indexes and stops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import httpx  # noqa: E402
import run as bench  # noqa: E402  (bench/run.py: data, processes, receivers)
import scale_pg  # noqa: E402  (the PostgreSQL index: cluster, bulk load)
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from storage import index, query  # noqa: E402
from storage.keys import Model  # noqa: E402
from storage.models import SCHEMA_VERSION  # noqa: E402
from storage.parsing import extract  # noqa: E402

SCALE_DIR = bench.WORK_ROOT / "scale"
INSTANCES_PER_SERIES = 50
SERIES_PER_STUDY = 2
INSTANCES_PER_STUDY = INSTANCES_PER_SERIES * SERIES_PER_STUDY
STUDIES_PER_PATIENT = 5
UID_ROOT = "1.2.826.0.1.3680043.8.498.77."
"""Under pydicom's UID root, like every UID pydicom generates; ``77`` marks bulk rows."""
MARK_UID = UID_ROOT + "999999999"
MARK_NUMBER = 987654321
BATCH = 20_000
ALL_STUDY_KEYS = (*bench.STUDY_KEYS, "SOPClassesInStudy")
"""STUDY-level return keys: the common ones and every computed key (PS3.4 C.3.4)."""
NAME_PATTERN = "SCALE^P0001*"
"""Matches patients 10 to 19: 50 studies once the archive has 20 patients (100k+)."""
README_START = "<!-- scale:start -->"
README_END = "<!-- scale:end -->"
LONG_STREAM = 20_000
"""Every study streamed is timed ``--reps`` times up to this many studies (1M instances),
once (after a warm-up; and twice by ``findscu``) beyond: 100,000 studies take a minute."""


# -- the bulk tool --------------------------------------------------------------------------


def patient_id(p: int) -> str:
    return f"SCALE{p:05d}"


def study_uid(k: int) -> str:
    return f"{UID_ROOT}1.{k}"


def series_uid(k: int, r: int) -> str:
    return f"{UID_ROOT}2.{k}.{r}"


def sop_uid(i: int) -> str:
    return f"{UID_ROOT}3.{i}"


@dataclass
class Layout:
    """Shape of a populated archive: 100 instances per study in 2 series, 5 studies per
    patient (1M instances = 10,000 studies of 2,000 patients)."""

    instances: int

    @property
    def studies(self) -> int:
        return self.instances // INSTANCES_PER_STUDY

    @property
    def patients(self) -> int:
        return -(-self.studies // STUDIES_PER_PATIENT)

    def patient_of(self, k: int) -> int:
        return k // STUDIES_PER_PATIENT


def _header(layout: Layout, k: int, r: int) -> Dataset:
    """A real header of study ``k``, series ``r``, with marker values for the instance."""
    p = layout.patient_of(k)
    ds = bench._series_template("scale", p, k % STUDIES_PER_PATIENT, r, study_uid(k),
                                f"{UID_ROOT}4.{k}", 64)
    ds.PatientName = f"SCALE^P{p:05d}"
    ds.PatientID = patient_id(p)
    ds.AccessionNumber = f"SC{k:08d}"
    ds.SeriesInstanceUID = series_uid(k, r)
    ds.SOPInstanceUID = MARK_UID
    ds.InstanceNumber = MARK_NUMBER
    return ds


def _insert(conn: Any, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    names = list(rows[0])
    sql = (f"INSERT INTO {table} ({', '.join(names)}) "
           f"VALUES ({', '.join('?' * len(names))})")
    conn.executemany(sql, [tuple(row[n] for n in names) for row in rows])


def bulk_batches(instances: int, first: int = 0, last: int | None = None
                 ) -> Iterator[tuple[int, dict[str, list[dict[str, Any]]]]]:
    """The bulk rows of an archive of ``instances`` instances (of its studies ``first`` to
    ``last``, all by default), by batches of about :data:`BATCH` instances: (instances so
    far, table name to its new rows). Every row is what :func:`storage.parsing.extract`
    makes of a real header (one per series; each instance's SOP Instance UID and Instance
    Number are put into its JSON), ids assigned here, counters exact. The lists are emptied
    once the caller has them."""
    layout = Layout(instances)
    now = "2026-11-27 12:00:00.000000"
    patients: list[dict[str, Any]] = []
    studies: list[dict[str, Any]] = []
    series_rows: list[dict[str, Any]] = []
    instance_rows: list[dict[str, Any]] = []
    tables = {"patient": patients, "study": studies, "series": series_rows,
              "instance": instance_rows}
    i = first * INSTANCES_PER_STUDY
    for k in range(first, layout.studies if last is None else min(last, layout.studies)):
        p = layout.patient_of(k)
        for r in range(SERIES_PER_STUDY):
            record = extract(_header(layout, k, r)).record
            if r == 0 and k % STUDIES_PER_PATIENT == 0:
                in_patient = min(STUDIES_PER_PATIENT, layout.studies - k)
                patients.append({
                    "id": p + 1, **record.patient, "num_studies": in_patient,
                    "num_series": in_patient * SERIES_PER_STUDY,
                    "num_instances": in_patient * INSTANCES_PER_STUDY})
            if r == 0:
                studies.append({
                    "id": k + 1, "patient_id": p + 1, **record.study,
                    "num_series": SERIES_PER_STUDY, "num_instances": INSTANCES_PER_STUDY,
                    "modalities": "CT", "sop_classes": CTImageStorage, "created_at": now})
            series_id = k * SERIES_PER_STUDY + r + 1
            series_rows.append({"id": series_id, "study_id": k + 1, **record.series,
                                "num_instances": INSTANCES_PER_SERIES})
            inst = record.instance
            attrs = inst["attrs"]
            for n in range(1, INSTANCES_PER_SERIES + 1):
                i += 1
                uid = sop_uid(i)
                instance_rows.append({
                    "id": i, "series_id": series_id, "study_id": k + 1,
                    "sop_instance_uid": uid, "sop_class_uid": inst["sop_class_uid"],
                    "instance_number": str(n),
                    "attrs": attrs.replace(MARK_UID, uid).replace(str(MARK_NUMBER), str(n)),
                    "transfer_syntax_uid": ExplicitVRLittleEndian,
                    "file_key": f"bulk{i:08d}", "file_size": 9_300,
                    "content_hash": f"{i:064x}", "received_at": now})
        if len(instance_rows) >= BATCH:
            yield i, tables
            for rows in tables.values():
                rows.clear()
    yield i, tables


def bulk_chunk(instances: int, first: int, last: int) -> dict[str, list[dict[str, Any]]]:
    """The bulk rows of studies ``first`` to ``last`` (:func:`bulk_batches`), at once."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for _, batch in bulk_batches(instances, first, last):
        for table, rows in batch.items():
            tables.setdefault(table, []).extend(rows)
    return tables


def populate(data_dir: Path, instances: int, progress: Callable[[int], None]) -> float:
    """Fill a new archive's SQLite index with ``instances`` instances through minipacs's
    schema (:func:`bulk_batches`); return the seconds it took.

    No files are written: C-FIND reads only the index, and the measured ingest writes its
    own. Rows go in by plain ``executemany``.
    """
    start = time.perf_counter()
    data_dir.mkdir(parents=True)
    (data_dir / "files").mkdir()
    database = index.connect(f"sqlite:///{data_dir / 'index.sqlite'}", synchronous_full=False)
    try:
        conn = database.connection()
        conn.execute("PRAGMA synchronous=OFF")
        for i, tables in bulk_batches(instances):
            with database.atomic():
                for table, rows in tables.items():
                    _insert(conn, table, rows)
            progress(i)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        index.close()
        index.disconnect()
    return time.perf_counter() - start


def populated(instances: int, repopulate: bool) -> Path:
    """The kept archive of ``instances`` bulk instances (built when missing)."""
    path = SCALE_DIR / f"archive-{instances}"
    done = path / "populated.json"
    if done.exists() and not repopulate:
        made = json.loads(done.read_text())
        if made.get("schema", 1) != SCHEMA_VERSION:  # kept from an earlier minipacs: migrate
            start = time.perf_counter()
            index.connect(f"sqlite:///{path / 'index.sqlite'}")
            index.close()
            index.disconnect()
            made.update(schema=SCHEMA_VERSION, migrated_seconds=round(
                time.perf_counter() - start, 2))
            print(f"  {instances:,}: index migrated to schema {SCHEMA_VERSION} in "
                  f"{made['migrated_seconds']} s", file=sys.stderr)
            done.write_text(json.dumps(made))
        return path
    if path.exists():
        shutil.rmtree(path)

    def progress(i: int) -> None:
        print(f"\r  populating {instances:,}: {i:,}", end="", file=sys.stderr, flush=True)

    seconds = populate(path, instances, progress)
    print(file=sys.stderr)
    done.write_text(json.dumps({"instances": instances, "seconds": round(seconds, 1),
                                "schema": SCHEMA_VERSION}))
    return path


# -- the server -----------------------------------------------------------------------------


class ScaleMinipacs(bench.Minipacs):
    """minipacs on an archive that already exists; times its startup."""

    wrapper: Path | None = None
    """A Python script run instead of the ``minipacs`` command, with the same arguments
    (``--minipacs-wrapper``: an experiment's patched server, measured by the same harness)."""

    def __init__(self, log_dir: Path, config_dir: Path, index_url: str = "",
                 web: bool = False) -> None:
        super().__init__(log_dir, config_dir)
        self.startup = 0.0
        self.http_port = bench.free_port() if web else 0
        text = self.config.read_text()
        if index_url:  # PostgreSQL: the index is there, the files still in the data folder
            text = text.replace("storage:\n", f"storage:\n  index_url: {index_url}\n", 1)
        if web:  # the DICOMweb listener on a port of ours (QIDO-RS); no viewer
            text += "web:\n  viewer: false\n"
        self.config.write_text(text)
        self.ae = AE(ae_title=bench.SCU_AET)
        self.ae.add_requested_context(Verification)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 10

    def ready(self) -> bool:
        assoc = self.ae.associate(bench.HOST, self.port, ae_title=self.aet)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and status.Status == 0
        finally:
            assoc.release()

    def command(self) -> list[str | Path]:
        command = super().command()
        if self.http_port:
            command[command.index("--http-port") + 1] = str(self.http_port)
        if self.wrapper is not None:
            command[:1] = [sys.executable, self.wrapper]
        return command

    def start(self, data_dir: Path, tag: str) -> None:
        self.data_dir = data_dir
        self.port = bench.free_port()
        self.log = self.log_dir / f"{self.name}-{tag}.log"
        begin = time.perf_counter()
        with open(self.log, "wb") as log:
            self.proc = bench.spawn(self.command(), log)
        deadline = begin + bench.READY_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"minipacs exited:\n{bench.tail(self.log)}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"minipacs not ready:\n{bench.tail(self.log)}")
            time.sleep(0.01)  # polling a starting process, not waiting on the server
        self.startup = time.perf_counter() - begin

    def count(self) -> tuple[int, str]:
        files = sum(1 for p in (self.data_dir / "files").glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*")
                    if p.is_file())
        return files, "files in the store (the bulk rows have none)"

    def rss_kib(self) -> int:
        return bench.vm_rss(self.proc.pid) if self.proc else 0


# -- C-FIND ---------------------------------------------------------------------------------


@dataclass
class Find:
    """One C-FIND measured at one size: latencies (s) to the first and the last response."""

    label: str
    level: str
    keys: list[tuple[str, str]]
    expected: int
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    answers: int = 0
    plan: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def identifier(self) -> Dataset:
        return bench.make_identifier(self.level, self.keys)


def finds(layout: Layout, ingested_studies: int) -> list[Find]:
    """The queries of issue 6 target 4, aimed at the middle of the bulk data."""
    k = max(layout.studies // 2, 0)
    p = layout.patient_of(k)
    study_keys = [(kw, "") for kw in ALL_STUDY_KEYS]

    def with_(kw: str, value: str) -> list[tuple[str, str]]:
        return [(key, value if key == kw else v) for key, v in study_keys]

    in_patient = min(STUDIES_PER_PATIENT, layout.studies - p * STUDIES_PER_PATIENT)
    named = sum(1 for q in range(10, 20) if q < layout.patients) * STUDIES_PER_PATIENT
    one = 1 if layout.studies else 0  # an empty archive has no bulk study to aim at
    return [
        Find("STUDY by PatientID", "STUDY", with_("PatientID", patient_id(p)), in_patient),
        Find("STUDY by StudyInstanceUID", "STUDY", with_("StudyInstanceUID", study_uid(k)),
             one),
        Find(f"STUDY by PatientName {NAME_PATTERN}", "STUDY",
             with_("PatientName", NAME_PATTERN), named),
        Find("STUDY, all streamed", "STUDY", study_keys, layout.studies + ingested_studies),
        Find("SERIES by StudyInstanceUID", "SERIES",
             [("StudyInstanceUID", study_uid(k)),
              *((kw, "") for kw in bench.SERIES_KEYS)], SERIES_PER_STUDY * one),
        Find("IMAGE by SeriesInstanceUID", "IMAGE",
             [("StudyInstanceUID", study_uid(k)), ("SeriesInstanceUID", series_uid(k, 0)),
              *((kw, "") for kw in bench.IMAGE_KEYS)], INSTANCES_PER_SERIES * one),
    ]


def time_finds(server: ScaleMinipacs, queries: list[Find], reps: int) -> None:
    """Run every query ``reps`` times on one open association (after one warm-up)."""
    ae = AE(ae_title=bench.SCU_AET)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = bench.associate(ae, server.aet, server.port)
    try:
        for q in queries:
            if q.expected == 0:
                continue  # nothing to aim at in this archive: n/a
            identifier = q.identifier()
            runs = reps if q.expected <= LONG_STREAM else 1
            for rep in range(runs + 1):
                answers = 0
                first = 0.0
                start = time.perf_counter()
                for status, _ in assoc.send_c_find(
                        identifier, StudyRootQueryRetrieveInformationModelFind):
                    if not status:
                        raise RuntimeError(f"{q.label}: no response")
                    if status.Status in (0xFF00, 0xFF01):
                        answers += 1
                        if answers == 1:
                            first = time.perf_counter() - start
                    elif status.Status != 0:
                        raise RuntimeError(f"{q.label}: status 0x{status.Status:04X}")
                last = time.perf_counter() - start
                if answers != q.expected:
                    q.problems.append(f"{answers} answers, expected {q.expected}")
                if rep:  # the first run warms the caches
                    q.first.append(first)
                    q.last.append(last)
                q.answers = answers
    finally:
        assoc.release()


@dataclass
class Stream:
    """Every study streamed to DCMTK ``findscu`` (a fresh process each time): seconds of
    each run, and of a C-ECHO by ``echoscu`` (process start, association, release)."""

    seconds: list[float] = field(default_factory=list)
    echo: list[float] = field(default_factory=list)
    answers: int = 0
    problems: list[str] = field(default_factory=list)

    def rate(self) -> float:
        """Responses per second, the echo's fixed cost taken off."""
        net = statistics.median(self.seconds) - statistics.median(self.echo)
        return self.answers / net if net > 0 else 0.0


def time_findscu_stream(server: ScaleMinipacs, expected: int, reps: int, log: Path) -> Stream:
    """The pynetdicom client decodes each response in Python and cannot keep up with the
    server; DCMTK's ``findscu`` can, so the streaming rate is measured with it."""
    out = Stream()
    keys = [arg for kw in ALL_STUDY_KEYS for arg in ("-k", kw)]
    find = ["findscu", "-aet", bench.SCU_AET, "-aec", server.aet, "-S",
            "-k", "QueryRetrieveLevel=STUDY", *keys, bench.HOST, str(server.port)]
    echo = ["echoscu", "-aet", bench.SCU_AET, "-aec", server.aet, bench.HOST,
            str(server.port)]
    for _ in range(reps):
        start = time.perf_counter()
        result = bench.run(echo, 60)
        out.echo.append(time.perf_counter() - start)
        start = time.perf_counter()
        with open(log, "w") as sink:
            proc = subprocess.run(find, stdout=sink, stderr=subprocess.STDOUT,
                                        env=bench.DCMTK_ENV, timeout=600, check=False)
        out.seconds.append(time.perf_counter() - start)
        out.answers = log.read_text(errors="replace").count("(Pending)")
        if proc.returncode or result.returncode:
            out.problems.append(f"findscu/echoscu exit codes {proc.returncode}, "
                                f"{result.returncode}")
        if out.answers != expected:
            out.problems.append(f"findscu got {out.answers} responses, expected {expected}")
    return out


def explain(data_dir: Path, queries: list[Find]) -> None:
    """Put into each query the plan SQLite makes for the SELECT the server runs."""
    database = index.connect(f"sqlite:///{data_dir / 'index.sqlite'}", synchronous_full=False)
    try:
        for q in queries:
            parsed = query.parse_identifier(q.identifier(), Model.STUDY_ROOT)
            sql, params = query.page_select(parsed).sql()
            rows = database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            q.plan = [str(row[-1]) for row in rows]
            for step in q.plan:
                if step.startswith("SCAN") and "USING" not in step:
                    q.problems.append(f"full scan without an index: {step}")
            if parsed.constraints and not any("INDEX" in step for step in q.plan):
                q.problems.append("no index narrows it: every row of its level is read "
                                  "(by rowid) and matched")
    finally:
        index.close()
        index.disconnect()


SEQ_SCAN_ROWS = 10_000
"""A sequential scan reading more rows than this (kept and filtered out, every loop) is
reported: smaller tables are scanned by choice."""


def _seq_scans(plan: list[str]) -> list[str]:
    """The sequential scans of an ``EXPLAIN ANALYZE`` that read more than
    :data:`SEQ_SCAN_ROWS` rows."""
    found = []
    for j, step in enumerate(plan):
        if "Seq Scan" not in step:
            continue
        actual = re.search(r"actual time=\S+ rows=(\d+) loops=(\d+)", step)
        rows, loops = (int(actual[1]), int(actual[2])) if actual else (0, 1)
        depth = len(step) - len(step.lstrip())
        for detail in plan[j + 1:]:
            if len(detail) - len(detail.lstrip()) <= depth:
                break
            removed = re.search(r"Rows Removed by Filter: (\d+)", detail)
            if removed:
                rows += int(removed[1])
        if rows * loops > SEQ_SCAN_ROWS:
            found.append(f"sequential scan reading {rows * loops:,} rows: "
                         f"{step.strip().split('  (')[0].lstrip('-> ')}")
    return found


def explain_pg(url: str, queries: list[Find]) -> None:
    """Put into each query the plan PostgreSQL makes for the SELECT the server runs
    (``EXPLAIN (ANALYZE, BUFFERS)``: run once more, with its actual rows and times)."""
    database = index.connect(url)
    try:
        for q in queries:
            parsed = query.parse_identifier(q.identifier(), Model.STUDY_ROOT)
            sql, params = query.page_select(parsed).sql()
            rows = database.execute_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
            q.plan = [str(row[0]) for row in rows]
            if parsed.constraints:
                q.problems += _seq_scans(q.plan)
    finally:
        index.close()
        index.disconnect()


@dataclass
class Qido:
    """One QIDO-RS search measured at one size: seconds to the whole JSON answer."""

    label: str
    params: list[tuple[str, str]]
    expected: int
    seconds: list[float] = field(default_factory=list)
    answers: int = 0
    problems: list[str] = field(default_factory=list)


def qidos(layout: Layout) -> list[Qido]:
    """The two STUDY C-FINDs of issue 17 as QIDO-RS searches, with the same return keys."""
    k = max(layout.studies // 2, 0)
    p = layout.patient_of(k)
    fields = [("includefield", kw) for kw in ALL_STUDY_KEYS]
    one = 1 if layout.studies else 0
    in_patient = min(STUDIES_PER_PATIENT, layout.studies - p * STUDIES_PER_PATIENT)
    return [Qido("STUDY by PatientID", [("PatientID", patient_id(p)), *fields], in_patient),
            Qido("STUDY by StudyInstanceUID", [("StudyInstanceUID", study_uid(k)), *fields],
                 one)]


def time_qido(server: ScaleMinipacs, queries: list[Qido], reps: int) -> None:
    """Every search ``reps`` times on one kept-alive HTTP connection (after one warm-up),
    interleaved."""
    base = f"http://{bench.HOST}:{server.http_port}"
    with httpx.Client(base_url=base, timeout=120,
                      headers={"Accept": "application/dicom+json"}) as http:
        deadline = time.monotonic() + 60
        while True:  # the HTTP listener starts beside the DICOM one: poll until it answers
            try:
                http.get("/dicom-web/studies", params={"StudyInstanceUID": "1.2.3"})
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the HTTP listener did not answer") from None
                time.sleep(0.05)  # polling a starting process
        for rep in range(reps + 1):
            for q in queries:
                if q.expected == 0:
                    continue
                start = time.perf_counter()
                answer = http.get("/dicom-web/studies", params=tuple(q.params))
                body = answer.content
                seconds = time.perf_counter() - start
                if answer.status_code != 200:
                    q.problems.append(f"HTTP {answer.status_code}: {body[:200]!r}")
                    continue
                q.answers = len(json.loads(body))
                if q.answers != q.expected:
                    q.problems.append(f"{q.answers} answers, expected {q.expected}")
                if rep:
                    q.seconds.append(seconds)


# -- the run --------------------------------------------------------------------------------


@dataclass
class PgIndex:
    """The kept PostgreSQL cluster of a run: its database of each size and their bulk ids."""

    cluster: scale_pg.ScaleCluster
    names: dict[int, str] = field(default_factory=dict)
    ids: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass
class Cell:
    size: int
    engine: str = "sqlite"
    qido: list[Qido] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)
    startup: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    rss_idle: list[int] = field(default_factory=list)
    rss_after: list[int] = field(default_factory=list)
    finds: list[Find] = field(default_factory=list)
    stream: Stream | None = None
    problems: list[str] = field(default_factory=list)


def _copy(source: Path, target: Path) -> None:
    """A working copy of a kept archive (its index, and its empty file store)."""
    target.mkdir(parents=True)
    (target / "files").mkdir()
    if (source / "index.sqlite").exists():
        shutil.copyfile(source / "index.sqlite", target / "index.sqlite")


def measure(size: int, rnd: int, args: argparse.Namespace, work: Path, log_dir: Path,
            cell: Cell, pg: PgIndex | None = None) -> None:
    """One round at one size: copy (SQLite; PostgreSQL's kept database is set back after
    the round instead), start, ingest, (first round) query, stop."""
    on_pg = cell.engine == "postgresql"
    assert pg is not None or not on_pg
    archive = work / (f"pg-size{size}-round{rnd}" if on_pg else f"size{size}-round{rnd}")
    _copy(populated(size, False) if size and not on_pg else archive.with_suffix(".none"),
          archive)
    name = f"r{rnd}s{len(str(size))}"
    data = bench.generate(work / f"data-{name}", name, args.ingest, 64, 10, 10, 2,
                          seed=rnd * 100 + size % 97)
    bench.run(["sync"], 120)
    url = pg.cluster.url(pg.names[size]) if pg is not None and on_pg else ""
    server = ScaleMinipacs(log_dir, work, index_url=url, web=args.qido)
    cell.loads.append(os.getloadavg()[0])
    server.start(archive, f"{size}-{rnd}" if not on_pg else f"pg-{size}-{rnd}")
    try:
        cell.startup.append(server.startup)
        cell.rss_idle.append(server.rss_kib())
        ingest = bench.send(server, data, 1, log_dir, f"{size}-{rnd}")
        cell.problems += ingest.problems
        cell.rate.append(ingest.rate)
        cell.rss_after.append(server.rss_kib())
        if rnd == 0:
            cell.finds = finds(Layout(size), len(data.studies))
            time_finds(server, cell.finds, args.reps)
            every = Layout(size).studies + len(data.studies)
            cell.stream = time_findscu_stream(
                server, every, max(3, args.reps // 4) if every <= LONG_STREAM else 2,
                log_dir / f"findscu-{cell.engine}-{size}.log")
            if args.qido:
                cell.qido = qidos(Layout(size))
                time_qido(server, cell.qido, args.reps)
    finally:
        server.stop()
    if rnd == 0:
        if pg is not None and on_pg:
            explain_pg(url, cell.finds)
        else:
            explain(archive, cell.finds)
    if pg is not None and on_pg:
        scale_pg.reset(pg.cluster, pg.names[size], pg.ids[size])
    shutil.rmtree(data.root)
    shutil.rmtree(archive)
    print(f"  {cell.engine} size {size:,} round {rnd}: {cell.rate[-1]:.0f} inst/s, "
          f"startup {cell.startup[-1]:.2f} s, load {cell.loads[-1]:.2f}", file=sys.stderr)


def rounds_order(sizes: Sequence[int], rounds: int) -> Iterator[tuple[int, int]]:
    """Sizes in each round, alternating direction so that drift of the machine cancels."""
    for rnd in range(rounds):
        for size in (sizes if rnd % 2 == 0 else list(reversed(sizes))):
            yield rnd, size


def _ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f}" if values else "n/a"


def report(cells: list[Cell], args: argparse.Namespace, seconds: float,
           machine: list[str]) -> str:
    """The README block; ``machine`` is :func:`bench.machine_info` as taken at the start
    (the minipacs tree may change during the run)."""
    base = statistics.median(cells[0].rate) if cells and cells[0].rate else 0.0
    lines = [
        bench.recorded("scale.py", f"{args.rounds} rounds of {args.ingest:,} small instances "
                       f"per size, C-FIND {args.reps} repetitions", seconds,
                       env="TCP_NODELAY=1 "),
        "",
        *machine[:3],
        "",
        "| instances indexed | startup (s) | ingest inst/s (median; each round) | vs empty |"
        " idle RSS (MiB) | RSS after ingest (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        rate = statistics.median(c.rate) if c.rate else 0.0
        each = ", ".join(f"{r:.0f}" for r in c.rate)
        lines.append(
            f"| {c.size:,} | {statistics.median(c.startup):.2f} | {rate:.0f} ({each}) | "
            f"{rate / base * 100:.0f} % | {statistics.median(c.rss_idle) / 1024:.0f} | "
            f"{statistics.median(c.rss_after) / 1024:.0f} |")
    labels = [q.label for q in cells[-1].finds] if cells else []
    lines += ["", "C-FIND on one open association, median ms to the last response "
              "(to the first, for SERIES and IMAGE), all computed study keys:", "",
              "| instances indexed | " + " | ".join(labels) + " | STUDY, all, by findscu |",
              "|---|" + "---|" * (len(labels) + 1)]
    for c in cells:
        row = []
        for q in c.finds:
            if not q.last:
                row.append("n/a")
            elif q.label.startswith("STUDY, all"):
                rate = q.answers / statistics.median(q.last)
                row.append(f"{_ms(q.last)} ({q.answers:,} = {rate:,.0f}/s)")
            elif q.level in ("SERIES", "IMAGE"):
                row.append(f"{_ms(q.last)} (first {_ms(q.first)})")
            else:
                row.append(f"{_ms(q.last)} ({q.answers})")
        if c.stream and c.stream.seconds:
            row.append(f"{_ms(c.stream.seconds)} ({c.stream.answers:,} = "
                       f"{c.stream.rate():,.0f}/s net of a {_ms(c.stream.echo)} C-ECHO)")
        else:
            row.append("n/a")
        lines.append(f"| {c.size:,} | " + " | ".join(row) + " |")
    if cells and cells[-1].finds:
        lines += ["", f"Query plans at {cells[-1].size:,} instances (SQLite `EXPLAIN QUERY "
                  "PLAN` of the page SELECT the server runs):", ""]
        for q in cells[-1].finds:
            lines.append(f"- {q.label}: " + "; ".join(f"`{s}`" for s in q.plan))
    problems = [f"{c.size:,}: {p}" for c in cells for p in c.problems]
    problems += [f"{c.size:,} {q.label}: {p}" for c in cells for q in c.finds
                 for p in dict.fromkeys(q.problems)]
    problems += [f"{c.size:,} findscu: {p}" for c in cells if c.stream
                 for p in dict.fromkeys(c.stream.problems)]
    lines += ["", "Anomalies detected by the script:" + ("" if problems else " none.")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def _ms95(values: Sequence[float]) -> str:
    """Median / p95 in ms."""
    if not values:
        return "n/a"
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(values) * 1000:.1f} / {p95 * 1000:.1f}"


def _mib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def report_engines(cells: list[Cell], args: argparse.Namespace, seconds: float,
                   machine: list[str], pg_info: list[str],
                   populating: list[str]) -> str:
    """The block of a run with PostgreSQL (``--index postgresql|both``): each table with
    an index column, QIDO-RS beside C-FIND, PostgreSQL's ``EXPLAIN (ANALYZE, BUFFERS)``."""
    lines = [
        bench.recorded("scale.py", f"{args.rounds} rounds of {args.ingest:,} small instances "
                       f"per size and index, C-FIND and QIDO-RS {args.reps} repetitions",
                       seconds, env="TCP_NODELAY=1 "),
        "",
        *machine[:3],
        *pg_info,
        "",
        "| index | instances populated | populate | on disk |",
        "|---|---|---|---|",
        *populating,
        "",
        "| index | instances indexed | startup (s) | ingest inst/s (median; each round) | "
        "vs empty | idle RSS (MiB) | RSS after ingest (MiB) | load average at the rounds' "
        "start |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {c.engine: statistics.median(c.rate) for c in cells if c.size == 0 and c.rate}
    for c in cells:
        rate = statistics.median(c.rate) if c.rate else 0.0
        each = ", ".join(f"{r:.0f}" for r in c.rate)
        empty = base.get(c.engine, 0.0)
        lines.append(
            f"| {c.engine} | {c.size:,} | {statistics.median(c.startup):.2f} | {rate:.0f} "
            f"({each}) | {f'{rate / empty * 100:.0f} %' if empty else 'n/a'} | "
            f"{statistics.median(c.rss_idle) / 1024:.0f} | "
            f"{statistics.median(c.rss_after) / 1024:.0f} | "
            f"{', '.join(f'{x:.2f}' for x in c.loads)} |")
    labels = [q.label for q in cells[-1].finds] if cells else []
    lines += ["", "C-FIND on one open association, median / p95 ms to the last response "
              "(median to the first, for SERIES and IMAGE), all computed study keys:", "",
              "| index | instances indexed | " + " | ".join(labels) +
              " | STUDY, all, by findscu |",
              "|---|---|" + "---|" * (len(labels) + 1)]
    for c in cells:
        row = []
        for q in c.finds:
            if not q.last:
                row.append("n/a")
            elif q.label.startswith("STUDY, all"):
                rate = q.answers / statistics.median(q.last)
                row.append(f"{_ms(q.last)} ({q.answers:,} = {rate:,.0f}/s)")
            elif q.level in ("SERIES", "IMAGE"):
                row.append(f"{_ms95(q.last)} (first {_ms(q.first)})")
            else:
                row.append(f"{_ms95(q.last)} ({q.answers})")
        if c.stream and c.stream.seconds:
            row.append(f"{_ms(c.stream.seconds)} ({c.stream.answers:,} = "
                       f"{c.stream.rate():,.0f}/s net of a {_ms(c.stream.echo)} C-ECHO)")
        else:
            row.append("n/a")
        lines.append(f"| {c.engine} | {c.size:,} | " + " | ".join(row) + " |")
    qlabels = [q.label for q in cells[-1].qido] if cells else []
    lines += ["", "QIDO-RS `GET /dicom-web/studies?...` with the same return keys "
              "(`includefield` each), one kept-alive HTTP connection (httpx), median / p95 "
              "ms to the whole JSON answer:", "",
              "| index | instances indexed | " + " | ".join(qlabels) + " |",
              "|---|---|" + "---|" * len(qlabels)]
    for c in cells:
        row = [f"{_ms95(q.seconds)} ({q.answers})" if q.seconds else "n/a" for q in c.qido]
        lines.append(f"| {c.engine} | {c.size:,} | " + " | ".join(row) + " |")
    for engine in dict.fromkeys(c.engine for c in cells):
        last = [c for c in cells if c.engine == engine and c.finds][-1:]
        if not last:
            continue
        c = last[0]
        if engine == "sqlite":
            lines += ["", f"SQLite query plans at {c.size:,} instances (`EXPLAIN QUERY PLAN` "
                      "of the page SELECT the server runs):", ""]
            for q in c.finds:
                lines.append(f"- {q.label}: " + "; ".join(f"`{s}`" for s in q.plan))
        else:
            lines += ["", f"PostgreSQL query plans at {c.size:,} instances (`EXPLAIN "
                      "(ANALYZE, BUFFERS)` of the page SELECT the server runs, after the "
                      "run):", ""]
            for q in c.finds:
                lines += [f"- {q.label}:", "", "  ```", *(f"  {s}" for s in q.plan),
                          "  ```", ""]
    problems = [f"{c.engine} {c.size:,}: {p}" for c in cells for p in c.problems]
    problems += [f"{c.engine} {c.size:,} {q.label}: {p}" for c in cells for q in c.finds
                 for p in dict.fromkeys(q.problems)]
    problems += [f"{c.engine} {c.size:,} QIDO-RS {q.label}: {p}" for c in cells
                 for q in c.qido for p in dict.fromkeys(q.problems)]
    problems += [f"{c.engine} {c.size:,} findscu: {p}" for c in cells if c.stream
                 for p in dict.fromkeys(c.stream.problems)]
    lines += ["", "Anomalies detected by the script:" + ("" if problems else " none.")]
    lines += [f"- {p}" for p in problems]
    return "\n".join(lines)


def write_readme(block: str) -> None:
    bench.write_readme(block, README_START, README_END, "Scale (targets 3, 4, 6)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10000,100000,1000000",
                        help="instances already indexed, comma-separated (0,10000,100000,1000000)")
    parser.add_argument("--ingest", type=int, default=2000,
                        help="small instances sent per round and size (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="ingest rounds per size (3)")
    parser.add_argument("--reps", type=int, default=20, help="C-FIND repetitions (20)")
    parser.add_argument("--quick", action="store_true", help="sizes 0,10000,100000; 1 round")
    parser.add_argument("--index", choices=("sqlite", "postgresql", "both"), default="sqlite",
                        help="the index measured: SQLite (as before), a throwaway "
                        "PostgreSQL kept under bench/work/scale/postgresql, or both side by "
                        "side (sqlite)")
    parser.add_argument("--repopulate", action="store_true", help="rebuild the kept indexes")
    parser.add_argument("--minipacs-wrapper", type=Path,
                        help="a Python script run instead of the minipacs command (an "
                        "experiment, e.g. bench/pg_pool_wrapper.py)")
    parser.add_argument("--populate-only", action="store_true",
                        help="build the kept indexes of --sizes and --index, measure nothing")
    parser.add_argument("--write-readme", action="store_true",
                        help="record the results in bench/README.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.rounds, args.reps = "0,10000,100000", 1, 5
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.engines = {"sqlite": ["sqlite"], "postgresql": ["postgresql"],
                    "both": ["sqlite", "postgresql"]}[args.index]
    args.qido = args.index != "sqlite"
    return args


def start_pg(args: argparse.Namespace) -> tuple[PgIndex, list[str]]:
    """The kept cluster, started, with a populated database of each size; what to say of
    it and of each database (populate time, size)."""
    cluster = scale_pg.ScaleCluster(SCALE_DIR / "postgresql")
    cluster.start()
    pg = PgIndex(cluster)
    for size in args.sizes:
        pg.names[size] = scale_pg.kept(cluster, size, Layout(size).studies,
                                       args.repopulate, bulk_chunk)
        pg.ids[size] = scale_pg.bulk_ids(cluster, pg.names[size])
    settings = ", ".join(f"{k}={v}" for k, v in scale_pg.SETTINGS.items())
    info = [f"- PostgreSQL {cluster.version()} on loopback TCP, in a cluster of its own kept "
            f"in `bench/work/scale/postgresql` (initdb, trust; {settings}; every other "
            "setting its default)"]
    return pg, info


def populating_rows(args: argparse.Namespace, pg: PgIndex | None) -> list[str]:
    rows = []
    for engine in args.engines:
        for size in args.sizes:
            if not size:
                continue
            if engine == "sqlite":
                path = SCALE_DIR / f"archive-{size}"
                made = json.loads((path / "populated.json").read_text())
                on_disk = sum(f.stat().st_size for f in path.glob("index.sqlite*"))
                rows.append(f"| sqlite | {size:,} | {made.get('seconds', '?')} s (executemany) "
                            f"| {_mib(on_disk)} |")
            elif pg is not None:
                made = scale_pg.populated_record(pg.cluster, size)
                phases = ", ".join(f"{k} {v} s" for k, v in made.get("phases", {}).items())
                rows.append(f"| postgresql | {size:,} | {made.get('seconds', '?')} s (COPY; "
                            f"{phases}) | {_mib(pg.cluster.database_bytes(pg.names[size]))} |")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ScaleMinipacs.wrapper = args.minipacs_wrapper
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # refused while starting
    begin = time.perf_counter()
    machine = bench.machine_info()
    if "sqlite" in args.engines:
        for size in args.sizes:
            if size:
                populated(size, args.repopulate)
    pg: PgIndex | None = None
    pg_info: list[str] = []
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=bench.WORK_ROOT))
    log_dir = bench.WORK_ROOT / f"scale-logs-{datetime.date.today()}"
    log_dir.mkdir(exist_ok=True)
    cells = {(engine, size): Cell(size, engine) for engine in args.engines
             for size in args.sizes}
    try:
        if "postgresql" in args.engines:
            pg, pg_info = start_pg(args)
        if args.populate_only:
            print("\n".join([*pg_info, *(populating_rows(args, pg) if pg else [])]))
            return 0
        populating = populating_rows(args, pg) if pg is not None else []
        bench.after_removals()  # its own removals between rounds are not waited out
        for rnd, size in rounds_order(args.sizes, args.rounds):
            for engine in (args.engines if rnd % 2 == 0 else reversed(args.engines)):
                measure(size, rnd, args, work, log_dir, cells[engine, size], pg)
        if pg is not None:
            opened, kept = scale_pg.connect_ms(pg.cluster, pg.names[args.sizes[-1]])
            pg_info.append(f"- PostgreSQL cluster on disk after the run: "
                           f"{_mib(pg.cluster.folder_bytes())}; a new connection (connect, "
                           f"`SELECT 1`, close) takes {opened:.1f} ms (median of 30, after "
                           f"the run), a `SELECT 1` on an open one {kept:.2f} ms")
    finally:
        bench.cleanup()
        bench.remove(work)
        if pg is not None:
            pg.cluster.stop("fast")
    seconds = time.perf_counter() - begin
    ordered = [cells[engine, size] for engine in args.engines for size in args.sizes]
    if args.index == "sqlite":
        block = report(ordered, args, seconds, machine)
    else:
        block = report_engines(ordered, args, seconds, machine, pg_info, populating)
    print(block)
    if args.write_readme:
        if args.index == "sqlite":
            write_readme(block)
        else:
            marker = "scale-pg" if args.index == "postgresql" else "scale-both"
            bench.write_readme(block, f"<!-- {marker}:start -->", f"<!-- {marker}:end -->",
                               "Scale on PostgreSQL (issue 17)")
    return 1 if "Anomalies detected by the script: none." not in block else 0


if __name__ == "__main__":
    sys.exit(main())
