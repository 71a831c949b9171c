"""Several server processes on one port (``ae.workers``): a supervisor and its workers.

pynetdicom runs every association as Python threads of one process, so one server uses one
core however many senders it has. With ``ae.workers: N`` the ``minipacs serve`` process
becomes a supervisor that:

1. opens and closes the archive once, alone: the schema is created, and the temporary files
   a crash left are swept (no worker may sweep them: another one may be writing);
2. holds ``<files>/.server.lock`` for as long as it runs, so that no second server starts
   on the same folder, and reserves the port(s) (:func:`scp.sockets.reserve_port`);
3. starts N worker processes (``multiprocessing``, spawn). Each runs a :class:`Server`
   whose listeners bind the same port with SO_REUSEPORT (the kernel spreads new
   connections over them) and whose archive shares the file store (a shared lock:
   ``verify``, ``reindex`` and ``import``, which take it alone, stay out). SQLite's
   ``BEGIN IMMEDIATE`` serialises their index writes, so every counter stays exact;
4. on SIGTERM or Ctrl-C asks every worker to stop gracefully (SIGTERM), and kills those
   still running after ``ae.dimse_timeout`` + 10 s. If a worker dies on its own, the others
   are stopped too and the supervisor exits 1, for the service manager to restart the whole.

Each worker serves up to ``ae.max_associations`` associations: the kernel spreads
connections by a hash, not by load, so a share of the limit would refuse associations one
worker could take while another is full. A worker whose supervisor is gone (killed) stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

from storage import StorageError, open_archive
from storage.errors import StoreInUse

from .config import Config
from .sockets import reserve_port, share_port

logger = logging.getLogger("minipacs")

SERVER_LOCK = ".server.lock"
READY_TIMEOUT = 120.0
"""Seconds a worker may take to open the archive and start listening."""
STOP_MARGIN = 10.0
"""Seconds a worker gets beyond ``ae.dimse_timeout`` to stop before it is killed."""


def serve_workers(config: Config, stop: threading.Event, log_level: str) -> int:
    """Run ``config.ae.workers`` worker processes until ``stop`` is set; the exit code."""
    count = config.ae.workers
    open_archive(config.archive_options()).close()  # schema, sweep; raises when in use
    lock = _server_lock(config)
    reserved = []
    try:
        ae = config.ae
        if not config.tls.only:
            reserved.append(reserve_port(ae.bind, ae.port))
        if config.tls.enabled:
            reserved.append(reserve_port(ae.bind, config.tls.port))
        ports = iter(int(sock.getsockname()[1]) for sock in reserved)
        worker_config = dataclasses.replace(
            config,
            ae=dataclasses.replace(ae, port=ae.port if config.tls.only else next(ports)),
            tls=dataclasses.replace(config.tls, port=next(ports, config.tls.port)),
        )
        workers = _start(worker_config, count, log_level)
        for sock in reserved:
            sock.close()
        reserved = []
        if not workers:
            return 1
        logger.info("minipacs: %d worker processes (pids %s) serve port %d", count,
                    ", ".join(str(p.pid) for p in workers), worker_config.ae.port)
        failed = _supervise(workers, stop)
        _stop(workers, config.ae.dimse_timeout + STOP_MARGIN)
        return 1 if failed else 0
    finally:
        for sock in reserved:
            sock.close()
        os.close(lock)


def _server_lock(config: Config) -> int:
    """``flock`` on ``<files>/.server.lock``, held by the supervisor while it runs."""
    fd = os.open(config.files_path / SERVER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUse(f"{config.files_path} is in use by another minipacs server: "
                         "stop it first") from None
    return fd


def _start(config: Config, count: int, log_level: str) -> list[Any]:
    """Start the workers and wait until each listens; none are left running on failure."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for _ in range(count):
        ours, theirs = context.Pipe(duplex=False)
        process = context.Process(target=worker_main, args=(config, theirs, log_level),
                                  name="minipacs-worker", daemon=False)
        process.start()
        theirs.close()
        workers.append((process, ours))
    problems = []
    for process, ours in workers:
        message = ours.recv() if ours.poll(READY_TIMEOUT) else ("error", "did not start")
        if message[0] != "ready":
            problems.append(f"worker {process.pid}: {message[1]}")
        ours.close()
    processes = [process for process, _ in workers]
    if problems:
        for problem in problems:
            logger.error("%s", problem)
        _stop(processes, STOP_MARGIN)
        return []
    return processes


def _supervise(workers: list[Any], stop: threading.Event) -> bool:
    """Wait for ``stop`` or for a worker to end on its own (then ``True``)."""
    while not stop.wait(0.5):
        ended = [p for p in workers if not p.is_alive()]
        if ended:
            for process in ended:
                logger.error("worker %d ended with exit code %s: stopping the others",
                             process.pid, process.exitcode)
            return True
    return False


def _stop(workers: list[Any], timeout: float) -> None:
    for process in workers:
        if process.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    for process in workers:
        process.join(timeout)
        if process.is_alive():
            logger.error("worker %d did not stop within %.0f s: killed", process.pid, timeout)
            process.kill()
            process.join(5)


def worker_main(config: Config, ready: Connection, log_level: str) -> None:
    """One worker: serve until SIGTERM or SIGINT (the entry point of its process)."""
    from .__main__ import setup_logging  # in the new process
    from .server import ListenError, Server

    setup_logging(log_level, process_ids=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    share_port()
    options = dataclasses.replace(config.archive_options(), shared=True)
    try:
        server = Server(config, open_archive(options))
    except StorageError as exc:
        ready.send(("error", str(exc)))
        raise SystemExit(1) from None
    try:
        server.start()
    except ListenError as exc:
        server.archive.close()
        ready.send(("error", str(exc)))
        raise SystemExit(1) from None
    ready.send(("ready", os.getpid()))
    ready.close()
    supervisor = os.getppid()
    while not stop.wait(0.5):
        if os.getppid() != supervisor:
            logger.error("the supervisor (pid %d) is gone: stopping", supervisor)
            break
    server.stop(grace=config.ae.dimse_timeout)
