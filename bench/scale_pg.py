"""bench/scale.py's PostgreSQL index: a kept cluster, its bulk load, its plans.

The cluster is tests/postgres.py's :class:`~tests.postgres.Postgres` (``initdb`` and
``pg_ctl`` as the user ``postgres`` when run as root), kept under ``bench/work/scale/`` so
that its populated databases serve the next run, and started with settings of a benchmark
rather than of the tests: ``fsync`` on (durability like SQLite's ``synchronous=FULL``) and
memory for this machine (:data:`SETTINGS`). One database per archive size, populated
through minipacs's schema (``storage.index.connect`` creates it) by ``COPY``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from storage import index
from storage.models import SCHEMA_VERSION
from tests.postgres import Postgres, tool

SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "2GB",
    "effective_cache_size": "8GB",
    "maintenance_work_mem": "1GB",
    "work_mem": "16MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_connections": "200",
}
"""For a 24 GB, 2-core machine; every other setting is PostgreSQL's default (among them
``random_page_cost`` 4, ``jit`` on, ``max_parallel_workers_per_gather`` 2)."""

BULK_TABLES = ("patient", "study", "series", "instance")


class ScaleCluster(Postgres):
    """A PostgreSQL cluster in a kept folder (``root``): made by ``initdb`` when the folder
    has none, else started as it was left."""

    def __init__(self, root: Path) -> None:
        initdb, pg_ctl = tool("initdb"), tool("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        import psycopg2  # noqa: F401  (fails here rather than after the SQLite sizes)

        self.pg_ctl = pg_ctl
        self.root = root
        self.as_user: list[str] = []
        self.data = root / "data"
        self.made = 0
        from tests.conftest import free_port

        self.port = free_port()
        if not (self.data / "PG_VERSION").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            if os.geteuid() == 0:
                shutil.chown(root, "postgres")
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
        if not (self.data / "PG_VERSION").exists():
            self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in SETTINGS.items())
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-t", "300", "-l",
                  str(self.root / "log"), "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 {options}",
                  "start")

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def sql(self, database: str, statement: str, params: Any = None,
            autocommit: bool = True) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(self.url(database))
        try:
            conn.autocommit = autocommit
            with conn.cursor() as cur:
                cur.execute(statement, params)
                rows = cur.fetchall() if cur.description else []
            if not autocommit:
                conn.commit()
            return rows
        finally:
            conn.close()

    def version(self) -> str:
        return str(self.sql("postgres", "SHOW server_version")[0][0])

    def database_bytes(self, name: str) -> int:
        return int(self.sql("postgres", "SELECT pg_database_size(%s)", (name,))[0][0])

    def folder_bytes(self) -> int:
        out = subprocess.run(["du", "-sb", str(self.data)], capture_output=True, text=True,
                             check=False).stdout.split()
        return int(out[0]) if out else 0


# -- the bulk load --------------------------------------------------------------------------


def _csv(rows: list[dict[str, Any]], names: list[str]) -> io.StringIO:
    """The rows as PostgreSQL ``COPY ... CSV``: strings quoted (an empty string stays one),
    numbers bare."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
    writer.writerows([tuple(row[n] for n in names) for row in rows])
    buffer.seek(0)
    return buffer


def _secondary_indexes(cur: Any) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of every index of the bulk tables but their primary
    keys."""
    cur.execute("SELECT i.indexname, i.indexdef FROM pg_indexes i "
                "WHERE i.schemaname = 'public' AND i.tablename = ANY(%s) AND NOT EXISTS ("
                "SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname "
                "AND c.contype = 'p')", (list(BULK_TABLES),))
    return [(str(name), str(sql)) for name, sql in cur.fetchall()]


Chunk = Callable[[int, int, int], dict[str, list[dict[str, Any]]]]
"""``chunk(instances, first, last)``: the rows of studies ``first`` to ``last`` of an
archive of ``instances`` instances (table name to rows, ids assigned)."""

STUDIES_PER_CHUNK = 200
WORKERS = 2
"""Processes making the rows while this one copies them in: the machine's 2 cores are
shared with PostgreSQL's backend."""


def _encode(job: tuple[Chunk, int, int, int]) -> tuple[int, dict[str, tuple[list[str], str]]]:
    """In a worker: a chunk's rows as CSV text, by table."""
    chunk, instances, first, last = job
    out = {}
    for table, rows in chunk(instances, first, last).items():
        if rows:
            names = list(rows[0])
            out[table] = (names, _csv(rows, names).getvalue())
    return last, out


def _chunks(chunk: Chunk, instances: int, studies: int
            ) -> Iterator[tuple[int, dict[str, tuple[list[str], str]]]]:
    """The encoded chunks in order, made by :data:`WORKERS` processes, at most a few
    ahead of the copy (memory)."""
    import multiprocessing

    jobs = [(chunk, instances, first, min(first + STUDIES_PER_CHUNK, studies))
            for first in range(0, studies, STUDIES_PER_CHUNK)]
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pending: list[Any] = []
        for job in jobs:
            pending.append(pool.apply_async(_encode, (job,)))
            if len(pending) > 2 * WORKERS:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


def populate(cluster: ScaleCluster, name: str, instances: int, studies: int, chunk: Chunk,
             progress: Callable[[int], None]) -> dict[str, float]:
    """A new database ``name`` with minipacs's schema, filled with the rows of ``chunk``
    by ``COPY`` (made and encoded by worker processes): the secondary indexes are dropped
    first and made again after (as ``CREATE INDEX`` made them, with the same definitions),
    foreign keys are not checked while loading (``session_replication_role = replica``:
    the rows are consistent by construction), the sequences are set past the ids, and
    ``VACUUM ANALYZE`` leaves statistics and a visibility map as a settled archive has.
    The seconds of each phase."""
    import psycopg2

    cluster.sql("postgres", f"DROP DATABASE IF EXISTS {name}")
    cluster.sql("postgres", f"CREATE DATABASE {name}")
    times: dict[str, float] = {}
    start = time.perf_counter()
    index.connect(cluster.url(name))  # minipacs's schema, as the server makes it
    index.close()
    index.disconnect()
    conn = psycopg2.connect(cluster.url(name))
    try:
        with conn.cursor() as cur:
            cur.execute("SET session_replication_role = replica")
            cur.execute("SET synchronous_commit = off")  # the loader only; fsync stays on
            cur.execute("SET maintenance_work_mem = '1GB'")
            made = _secondary_indexes(cur)
            for index_name, _ in made:
                cur.execute(f"DROP INDEX {index_name}")
            conn.commit()
            times["schema"] = time.perf_counter() - start
            start = time.perf_counter()
            for last, tables in _chunks(chunk, instances, studies):
                for table in BULK_TABLES:
                    if table in tables:
                        names, text = tables[table]
                        cur.copy_expert(f"COPY {table} ({', '.join(names)}) FROM STDIN "
                                        "WITH (FORMAT csv)", io.StringIO(text))
                conn.commit()
                progress(last * instances // max(studies, 1))
            times["copy"] = time.perf_counter() - start
            start = time.perf_counter()
            for _, statement in made:
                cur.execute(statement)
                conn.commit()
            times["indexes"] = time.perf_counter() - start
            for table in BULK_TABLES:
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"GREATEST((SELECT max(id) FROM {table}), 1))")
            conn.commit()
        conn.autocommit = True
        start = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute("VACUUM (ANALYZE)")
            cur.execute("CHECKPOINT")
        times["vacuum"] = time.perf_counter() - start
    finally:
        conn.close()
    return times


def kept(cluster: ScaleCluster, instances: int, studies: int, repopulate: bool,
         chunk: Chunk) -> str:
    """The name of the kept database of ``instances`` bulk instances (built when missing or
    ``repopulate``); its record in ``populated-<instances>.json`` beside the cluster."""
    name = f"scale_{instances}"
    done = cluster.root.parent / f"postgresql-populated-{instances}.json"
    exists = cluster.sql("postgres", "SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if exists and done.exists() and not repopulate:
        made = json.loads(done.read_text())
        if made.get("schema") != SCHEMA_VERSION:  # kept from an earlier minipacs: migrate
            start = time.perf_counter()
            index.connect(cluster.url(name))
            index.close()
            index.disconnect()
            made.update(schema=SCHEMA_VERSION,
                        migrated_seconds=round(time.perf_counter() - start, 2))
            print(f"  PostgreSQL {instances:,}: index migrated to schema {SCHEMA_VERSION} in "
                  f"{made['migrated_seconds']} s", file=sys.stderr)
            done.write_text(json.dumps(made))
        return name
    done.unlink(missing_ok=True)

    def progress(i: int) -> None:
        print(f"\r  populating PostgreSQL {instances:,}: {i:,}", end="", file=sys.stderr,
              flush=True)

    start = time.perf_counter()
    times = populate(cluster, name, instances, studies, chunk, progress)
    seconds = time.perf_counter() - start
    print(file=sys.stderr)
    done.write_text(json.dumps({
        "instances": instances, "seconds": round(seconds, 1), "schema": SCHEMA_VERSION,
        "phases": {k: round(v, 1) for k, v in times.items()},
        "bytes": cluster.database_bytes(name)}))
    return name


def populated_record(cluster: ScaleCluster, instances: int) -> dict[str, Any]:
    done = cluster.root.parent / f"postgresql-populated-{instances}.json"
    return dict(json.loads(done.read_text())) if done.exists() else {}


def bulk_ids(cluster: ScaleCluster, name: str) -> dict[str, int]:
    """The highest id of each bulk table (the kept database's own rows)."""
    return {table: int(cluster.sql(name, f"SELECT COALESCE(max(id), 0) FROM {table}")[0][0])
            for table in BULK_TABLES}


def reset(cluster: ScaleCluster, name: str, ids: dict[str, int]) -> None:
    """Take out what a round added (rows past the bulk ids; the rest by ``ON DELETE
    CASCADE``), set the sequences back and vacuum the pages it touched, so that the kept
    database stays exactly its size."""
    for table in reversed(BULK_TABLES):
        cluster.sql(name, f"DELETE FROM {table} WHERE id > %s", (ids[table],))
        cluster.sql(name, f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), %s)",
                    (max(ids[table], 1),))
    for table in ("pending_removal", "outbox", "node"):
        cluster.sql(name, f"DELETE FROM {table}")
    cluster.sql(name, "VACUUM (ANALYZE)")


def explain(cluster: ScaleCluster, name: str, sql: str, params: Any) -> list[str]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of a SELECT (run, so with its actual rows and time)."""
    rows = cluster.sql(name, "EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
    return [str(row[0]) for row in rows]


def connect_ms(cluster: ScaleCluster, name: str, times: int = 30) -> tuple[float, float]:
    """Median ms of a new connection (connect, ``SELECT 1``, close), and of a
    ``SELECT 1`` on an open one: what a request pays when it opens its own."""
    import statistics

    import psycopg2

    opened = []
    for _ in range(times):
        start = time.perf_counter()
        conn = psycopg2.connect(cluster.url(name))
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchall()
        conn.close()
        opened.append(time.perf_counter() - start)
    conn = psycopg2.connect(cluster.url(name))
    kept = []
    try:
        with conn.cursor() as cur:
            for _ in range(times):
                start = time.perf_counter()
                cur.execute("SELECT 1")
                cur.fetchall()
                kept.append(time.perf_counter() - start)
    finally:
        conn.close()
    return statistics.median(opened) * 1000, statistics.median(kept) * 1000
