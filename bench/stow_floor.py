#!/usr/bin/env python3
"""The floor of STOW-RS in minipacs's design, beside minipacs and Orthanc in one run.

What can a Python HTTP server built as ``web/`` is (uvicorn's h11 protocol, Starlette, the
body read on the event loop and the blocking work in Starlette's thread pool) do per
request, with the client ``bench/web.py`` uses for issue 14's STOW-RS benchmark (httpx, one
keep-alive connection per client thread, one 64x64 instance per request)? Two stand-ins,
neither of which parses, checks or indexes anything:

- ``echo``: reads the body and answers a Store Instances Response naming its parts;
- ``durable``: the same, plus the disk flushes minipacs promises before Success (the file
  fsync'd, renamed into place, its folder fsync'd, one row committed to a SQLite index in
  WAL mode with ``synchronous=FULL``), in a worker thread as minipacs does them.

Each is run in one process, and in two processes sharing the port (``SO_REUSEPORT``): the
design one would need for more than one core (``ae.workers`` serves DICOM that way today,
but HTTP from the supervisor only). No real server can be faster than its stand-in::

    TCP_NODELAY=1 .venv/bin/python bench/stow_floor.py [--count 2000]

See bench/README.md, "DICOMweb", the notes on STOW-RS.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def _bench_web() -> Any:
    """bench/web.py as a module (``import web`` would be the repository's package)."""
    sys.path.insert(0, str(BENCH_DIR))
    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("bench_web", BENCH_DIR / "web.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_web"] = module
    spec.loader.exec_module(module)
    return module


# -- the stand-in servers ------------------------------------------------------------------


def serve(mode: str, port: int, folder: Path) -> None:
    """Serve ``POST /dicom-web/studies`` on 127.0.0.1:``port`` (SO_REUSEPORT) until killed."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    local = threading.local()
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    (folder / "files").mkdir(exist_ok=True)

    def index() -> sqlite3.Connection:
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(folder / "index.sqlite", isolation_level=None,
                                       timeout=30)
            local.db.execute("PRAGMA journal_mode=WAL")
            local.db.execute("PRAGMA synchronous=FULL")
            local.db.execute("CREATE TABLE IF NOT EXISTS instance (key TEXT, size INTEGER)")
        return local.db

    def persist(body: bytes) -> None:
        key = uuid.uuid4().hex
        temp, final = folder / "tmp" / key, folder / "files" / key
        with open(temp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
        fd = os.open(folder / "files", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        db = index()
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO instance VALUES (?, ?)", (key, len(body)))
        db.execute("COMMIT")

    async def store(request: Request) -> JSONResponse:
        body = await request.body()
        boundary = request.headers["content-type"].split("boundary=")[1].encode()
        parts = body.count(b"--" + boundary) - 1
        if mode == "durable":
            await run_in_threadpool(persist, body)
        answer = {"00081199": {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}] * parts}}
        return JSONResponse(answer, media_type="application/dicom+json")

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse([])

    app = Starlette(routes=[Route("/dicom-web/studies", store, methods=["POST"]),
                            Route("/dicom-web/studies", ready, methods=["GET"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, http="h11", loop="asyncio", log_level="warning",
                            access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


class StandIn:
    """``processes`` stand-in servers of one ``mode`` sharing a port, with bench/web.py's
    client interface (:meth:`client`)."""

    def __init__(self, mode: str, processes: int, work: Path) -> None:
        self.mode, self.processes = mode, processes
        self.name = f"{mode} x{processes}"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        folder = Path(tempfile.mkdtemp(prefix=f"floor-{mode}-", dir=work))
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "--serve", mode, "--port", str(self.port),
             "--dir", str(folder)]) for _ in range(processes)]
        self._wait()

    def _wait(self) -> None:
        import httpx
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"{self.name}: a server process exited")
            try:
                httpx.get(self.url + "/studies", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.05)  # polling a starting server, not waiting for a result
        raise RuntimeError(f"{self.name}: no answer in 30 s")

    def client(self) -> Any:
        import httpx
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Accept-Encoding": "identity"})

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="instances per cell (2000)")
    parser.add_argument("--serve", choices=("echo", "durable"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.dir)
        return 0
    web = _bench_web()
    bench = web.bench
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stow-floor-", dir=bench.WORK_ROOT))
    log_dir = work / "logs"
    log_dir.mkdir()
    print(f"load average at the start: {web.load()}")
    starters: list[tuple[str, Callable[[], Any]]] = [
        ("echo x1", lambda: StandIn("echo", 1, work)),
        ("durable x1", lambda: StandIn("durable", 1, work)),
        ("echo x2", lambda: StandIn("echo", 2, work)),
        ("durable x2", lambda: StandIn("durable", 2, work)),
        ("minipacs", lambda: _started(web.Minipacs(log_dir, work), work / "minipacs")),
        ("orthanc", lambda: _started(web.Orthanc(log_dir), work / "orthanc")),
    ]
    modes = ((1, 1), (1, web.STOW_PARALLEL))
    rows: dict[str, list[float]] = {}
    seed = 1000
    for name, start in starters:
        server = start()
        try:
            for per_request, clients in modes:
                seed += 1
                instances = web.fresh_instances(f"floor{seed}", args.count, seed)
                web.stow(server, instances[:50], per_request, clients)  # warm up
                seconds = web.stow(server, instances[50:], per_request, clients)
                rows.setdefault(name, []).append((args.count - 50) / seconds)
        finally:
            server.stop()
    print("\n| server | 1 client, 1 per request (inst/s) | 4 clients, 1 per request (inst/s) |")
    print("|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {values[0]:,.0f} | {values[1]:,.0f} |")
    print(f"\nload average at the end: {web.load()}")
    return 0


def _started(server: Any, data_dir: Path) -> Any:
    server.start(data_dir, "floor")
    return server


if __name__ == "__main__":
    sys.exit(main())
