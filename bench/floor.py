#!/usr/bin/env python3
"""The ceiling of a C-STORE receiver built on pynetdicom 3.0 on this machine.

Serves a pynetdicom AE whose C-STORE handler does nothing but answer Success (no parsing,
no file, no index), and times DCMTK ``storescu`` sending small instances to it, as
``bench/run.py`` does for the real receivers:

- ``plain``: pynetdicom as shipped (its reactors poll every 1 ms);
- ``minipacs``: with what minipacs puts around pynetdicom (``scp/engine/reactor.py`` wake-ups and
  spooling, TCP_NODELAY and TCP_QUICKACK, ``scp/engine/responses.py``), the handler still empty,
  C-STORE requests through pynetdicom's own path;
- ``engine receive``: the same, C-STORE requests read and answered by the DUL thread itself
  (``scp/engine/receiver.py``);
- ``engine receive + flushes``: the same, and the handler stores the way minipacs must
  (issue 15, target 2) with nothing else: the data set written to a new temporary file,
  fsync'd, renamed into a folder, the folder fsync'd, then one row (its key and
  SOP Instance UID) committed to a SQLite index in WAL mode with ``synchronous=FULL``; no
  parse, no File Meta, no counters. The floor of the durable design;
- ``engine receive + flushes, group commit``: the same, the index commit shared by the
  associations that store at once (as ``storage.commit.GroupCommit.commit_now``: whoever
  takes the commit lock commits every row queued meanwhile); with one association, the
  same as the last;
- ``engine receive + batched flushes``: each file still written, fsync'd and renamed by its
  own association, then the folder's fsync and the index commit shared (one of each for
  every association that stores at once): the floor of a per-file store with every flush
  that can be shared, shared;
- ``engine receive + pack file``: another store design, no file per instance: each data
  set appended to one shared file, then one ``fdatasync`` of it and one index commit for
  every association that stores at once (no create, no rename, no folder fsync).

Each line gives the rate of every round and the server's CPU time (this process's, user
and system) per instance meanwhile.

No minipacs handler can be faster than the second; if it is slower than another server,
pynetdicom alone is (issue 6, target 1)::

    TCP_NODELAY=1 .venv/bin/python bench/floor.py --count 2000 [--parallel 4]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run as bench  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.presentation import AllStoragePresentationContexts  # noqa: E402

from scp.engine import reactor, responses  # noqa: E402
from scp.engine.sockets import disable_nagle, quick_ack  # noqa: E402

VARIANTS = ("plain", "minipacs", "engine receive", "engine receive + flushes",
            "engine receive + flushes, group commit", "engine receive + batched flushes",
            "engine receive + pack file")
"""pynetdicom as shipped; with minipacs's wake-ups, socket options and C-FIND responses,
C-STORE still through pynetdicom's per-PDU path; the same with C-STORE requests read and
answered by the DUL thread itself (scp/engine/receiver.py); the same storing durably; the
same with the index commit shared by the associations storing at once; the same with the
folder's fsync shared too; a pack file instead of a file per instance."""


class Flushes:
    """A C-STORE handler that stores as durably as minipacs, and does nothing else."""

    def __init__(self, root: Path, group: bool = False, batch_folder: bool = False,
                 pack: bool = False) -> None:
        self.root = root
        self.group = group or batch_folder or pack
        self.batch_folder = batch_folder
        self.pack = (open(root.parent / f"{root.name}.pack", "ab")  # noqa: SIM115 (the run)
                     if pack else None)
        self.pack_lock = threading.Lock()
        self.packed = 0
        self.pending: list[tuple[str, str, threading.Event]] = []
        self.pending_lock = threading.Lock()
        (root / "tmp").mkdir(parents=True)
        (root / "files").mkdir()
        self.index = sqlite3.connect(root / "index.sqlite", check_same_thread=False,
                                     isolation_level=None)
        self.index.execute("PRAGMA journal_mode=WAL")
        self.index.execute("PRAGMA synchronous=FULL")
        self.index.execute("CREATE TABLE instance (file_key TEXT PRIMARY KEY,"
                           " sop_instance_uid TEXT)")  # each round sends the same UIDs
        self.index.execute("CREATE INDEX instance_uid ON instance (sop_instance_uid)")
        self.lock = threading.Lock()

    def handle_store(self, event: Any) -> int:
        key = uuid.uuid4().hex
        if self.pack is not None:
            data = _data_set(event)
            with self.pack_lock:
                key, self.packed = str(self.packed), self.packed + len(data)
                self.pack.write(data)
                self.pack.flush()
        else:
            temp, final = self.root / "tmp" / key, self.root / "files" / key
            with open(temp, "wb") as f:
                f.write(_data_set(event))
            _fsync(temp)
            os.replace(temp, final)
            if not self.batch_folder:
                _fsync(self.root / "files")
        row = (key, str(event.request.AffectedSOPInstanceUID))
        if not self.group:
            with self.lock:
                self._commit([row])
            return 0x0000
        done = threading.Event()  # as storage.commit.GroupCommit.commit_now
        with self.pending_lock:
            self.pending.append((*row, done))
        with self.lock:
            if not done.is_set():
                with self.pending_lock:
                    batch, self.pending = self.pending, []
                if self.pack is not None:
                    os.fdatasync(self.pack.fileno())
                elif self.batch_folder:
                    _fsync(self.root / "files")
                self._commit([(k, u) for k, u, _ in batch])
                for *_, committed in batch:
                    committed.set()
        return 0x0000

    def _commit(self, rows: list[tuple[str, str]]) -> None:
        self.index.execute("BEGIN IMMEDIATE")
        self.index.executemany("INSERT INTO instance VALUES (?, ?)", rows)
        self.index.execute("COMMIT")


def _data_set(event: Any) -> bytes:
    """The request's data set, also where pynetdicom spooled it (a request the engine's
    receiver did not take: before 2026-12-05 this floor wrote those as empty files)."""
    spool = reactor.spooled(event)
    return spool.path.read_bytes() if spool is not None else event.request.DataSet.getvalue()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # a failure ends the benchmark: no need to close
    os.close(fd)


def handle_store(event: Any) -> int:
    """Success, having looked at nothing."""
    return 0x0000


def serve(patched: bool, store: Any = handle_store) -> tuple[AE, Any]:
    """A do-nothing SCP. The patches are installed process-wide, but they change only the
    associations registered by ``reactor.handle_conn_open``: the plain one has none."""
    ae = AE(ae_title="FLOOR")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = 262144
    handlers: list[Any] = [(evt.EVT_C_STORE, store)]
    if patched:
        handlers = [(evt.EVT_CONN_OPEN, disable_nagle), (evt.EVT_CONN_OPEN, quick_ack),
                    (evt.EVT_CONN_OPEN, reactor.handle_conn_open),
                    (evt.EVT_CONN_CLOSE, reactor.handle_conn_close), *handlers]
    server = ae.start_server((bench.HOST, 0), block=False, evt_handlers=handlers)
    return ae, server


def send(port: int, data: bench.DataSet, parallel: int) -> tuple[float, float]:
    """Wall time of the storescu processes, and this process's CPU time meanwhile."""
    groups = [data.parts] if parallel == 1 else [[p] for p in data.parts[:parallel]]
    cpu = time.process_time()
    start = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", bench.SCU_AET, "-aec", "FLOOR", "+sd", "+r",
                               bench.HOST, str(port), *map(str, folders)],
                              env=bench.DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT) for folders in groups]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"storescu exit codes {codes}")
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="small instances (2000)")
    parser.add_argument("--parallel", type=int, default=1, help="storescu processes (1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--only", action="append", choices=VARIANTS,
                        help="run this variant (repeatable; all by default)")
    args = parser.parse_args()
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="floor-", dir=bench.WORK_ROOT))
    try:
        data = bench.generate(work / "in", "floor", args.count, 64, 10, 10, 2, seed=11)
        bench.after_removals()
        reactor.install()
        responses.install()
        handlers = {"engine receive + flushes": Flushes(work / "flushes").handle_store,
                    "engine receive + flushes, group commit":
                        Flushes(work / "grouped", group=True).handle_store,
                    "engine receive + batched flushes":
                        Flushes(work / "batched", batch_folder=True).handle_store,
                    "engine receive + pack file": Flushes(work / "pack", pack=True).handle_store}
        names = [name for name in VARIANTS if not args.only or name in args.only]
        servers = {name: serve(name != "plain", handlers.get(name, handle_store))
                   for name in names}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):  # alternated, so that the machine's drift falls on both
            for name, (_, server) in servers.items():
                port = int(server.server_address[1])
                reactor.RECEIVE_C_STORE = name.startswith("engine receive")
                elapsed, used = send(port, data, args.parallel)
                rates[name].append(args.count / elapsed)
                cpu[name].append(1000 * used / args.count)
        for ae, _ in servers.values():
            ae.shutdown()
        for name, values in rates.items():
            print(f"{name}: pynetdicom C-STORE SCP, {args.count} small instances, "
                  f"{args.parallel} association(s): "
                  + ", ".join(f"{r:.0f}" for r in values) + " inst/s; server CPU "
                  + ", ".join(f"{c:.2f}" for c in cpu[name]) + " ms per instance")
        return 0
    finally:
        bench.remove(work)


if __name__ == "__main__":
    sys.exit(main())
