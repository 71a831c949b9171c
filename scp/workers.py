"""Several server processes on one port (``ae.workers``): a supervisor and its workers.

pynetdicom runs every association as Python threads of one process, so one server uses one
core however many senders it has. With ``ae.workers: N`` the ``minipacs serve`` process
becomes a supervisor that:

1. opens and closes the archive once, alone: the schema is created, and the temporary files
   a crash left are swept (no worker may sweep them: another one may be writing);
2. holds ``<files>/.server.lock`` for as long as it runs, and opens the listening socket(s)
   itself, as a single server would (a port in use is an error, as it is for one process);
3. starts N worker processes (``multiprocessing``, spawn) and hands them the listening
   sockets: each runs a :class:`Server` whose listeners accept from them
   (:func:`scp.engine.sockets.adopt_listeners`), so each association goes to a worker that is
   waiting for one. Their archives share the file store (a shared lock: ``verify``,
   ``reindex`` and ``import``, which take it alone, stay out), and SQLite's
   ``BEGIN IMMEDIATE`` serialises their index writes, so every counter stays exact (only
   SQLite: the configuration refuses workers with another index);
4. on SIGTERM or Ctrl-C asks every worker to stop gracefully (SIGTERM), and kills those
   still running after ``ae.dimse_timeout`` + 10 s. If a worker dies, at start or later, the
   others are stopped too and the supervisor exits 1, for the service manager to restart
   the whole. A worker whose supervisor is gone stops.

Each worker serves up to ``ae.max_associations`` associations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from storage import StorageError, open_archive, server_lock

from . import metrics
from .config import Config
from .engine.sockets import adopt_listeners
from .logs import setup_logging

logger = logging.getLogger("minipacs")

READY_TIMEOUT = 120.0
"""Seconds a worker may take to open the archive and start listening."""
STOP_MARGIN = 10.0
"""Seconds a worker gets beyond ``ae.dimse_timeout`` to stop before it is killed."""
BACKLOG = 64
"""Connections the shared listening socket queues until a worker accepts them."""
_POLL = 0.2


def serve_workers(
    config: Config,
    stop: threading.Event,
    log_level: str,
    beside: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> int:
    """Run ``config.ae.workers`` worker processes until ``stop`` is set; the exit code.

    ``beside`` gives a context that runs in this process for as long as the workers do,
    entered once they listen (the web listener); an :class:`OSError` or
    :class:`~storage.StorageError` from it stops them (exit code 1)."""
    # schema, sweep (unless a delete runs); raises when another server has the store
    open_archive(dataclasses.replace(config.archive_options(), serving=True)).close()
    lock = _server_lock(config)
    listeners: dict[int, socket.socket] = {}
    workers: list[Any] = []
    metrics_dir = contextlib.ExitStack()  # the workers' /metrics, read by web/metrics.py
    metrics_dir.enter_context(metrics.multiprocess_dir(config.storage.data_dir / ".metrics"))
    try:
        try:
            if not config.tls.only:
                _listen(listeners, config.ae.bind, config.ae.port)
            if config.tls.enabled:
                _listen(listeners, config.ae.bind, config.tls.port)
        except OSError as exc:
            logger.error("cannot listen on %s: %s", config.ae.bind, exc.strerror or exc)
            return 1
        ports = iter(listeners)
        worker_config = dataclasses.replace(
            config,
            ae=dataclasses.replace(config.ae, port=(config.ae.port if config.tls.only
                                                    else next(ports))),
            tls=dataclasses.replace(config.tls, port=next(ports, config.tls.port)),
        )
        workers, started = _start(worker_config, listeners, log_level, stop)
        for sock in listeners.values():
            sock.close()  # the workers have theirs
        if not started:
            return 0 if stop.is_set() else 1
        logger.info("minipacs: %d worker processes (pids %s) serve port(s) %s",
                    len(workers), ", ".join(str(p.pid) for p in workers),
                    ", ".join(str(port) for port in listeners))
        try:
            with beside() if beside is not None else contextlib.nullcontext():
                return 1 if _supervise(workers, stop) else 0
        except (OSError, StorageError) as exc:
            logger.error("%s", exc)
            return 1
    finally:
        _stop(workers, config.ae.dimse_timeout + STOP_MARGIN)
        for sock in listeners.values():
            sock.close()
        metrics_dir.close()
        os.close(lock)


def _listen(listeners: dict[int, socket.socket], host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    listeners[int(sock.getsockname()[1])] = sock


def _server_lock(config: Config) -> int:
    """:data:`storage.SERVER_LOCK`, held by the supervisor while it runs."""
    return server_lock(config.files_path)


def _start(config: Config, listeners: dict[int, socket.socket], log_level: str,
           stop: threading.Event, target: Any = None) -> tuple[list[Any], bool]:
    """Start the workers and wait until each listens: the processes, and whether all did.
    A worker that fails or dies while starting, or ``stop``, ends the wait (``False``):
    the caller stops the processes."""
    context = multiprocessing.get_context("spawn")
    started: list[tuple[Any, Connection]] = []
    for _ in range(config.ae.workers):
        ours, theirs = context.Pipe(duplex=False)
        process = context.Process(
            target=target or worker_main, name="minipacs-worker",
            args=(config, listeners, theirs, log_level, os.getpid()))
        process.start()
        theirs.close()
        started.append((process, ours))
    processes = [process for process, _ in started]
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for process, ours in started:
            problem = _wait_ready(process, ours, deadline, stop)
            if problem:
                if not stop.is_set():
                    logger.error("worker %d: %s", process.pid, problem)
                return processes, False
    finally:
        for _, ours in started:
            ours.close()
    return processes, True


def _wait_ready(process: Any, ours: Connection, deadline: float,
                stop: threading.Event) -> str | None:
    """None once ``process`` said it listens; else what went wrong."""
    while not ours.poll(_POLL):
        if stop.is_set():
            return "stopped while starting"
        if not process.is_alive():
            return f"ended with exit code {process.exitcode} while starting"
        if time.monotonic() > deadline:
            return f"not listening after {READY_TIMEOUT:.0f} s"
    try:
        kind, detail = ours.recv()
    except (EOFError, OSError):
        process.join(1)
        return f"ended with exit code {process.exitcode} while starting"
    return None if kind == "ready" else str(detail)


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


def worker_main(config: Config, listeners: dict[int, socket.socket], ready: Connection,
                log_level: str, supervisor: int) -> None:
    """One worker: serve until SIGTERM, SIGINT or the supervisor's end (its process's
    entry point)."""
    from .engine import UntestedVersion
    from .server import ListenError, Server

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    setup_logging(log_level, process_ids=True, json_lines=config.logging.json)
    adopt_listeners(listeners)
    options = dataclasses.replace(config.archive_options(), shared=True)
    try:
        server = Server(config, open_archive(options))
    except StorageError as exc:
        _tell(ready, ("error", str(exc)))
        raise SystemExit(1) from None
    try:
        server.start()  # scp.engine.install(), in this process
    except (ListenError, UntestedVersion) as exc:
        server.archive.close()
        _tell(ready, ("error", str(exc)))
        raise SystemExit(1) from None
    _tell(ready, ("ready", os.getpid()))
    while not stop.wait(0.5):
        if os.getppid() != supervisor:
            logger.error("the supervisor (pid %d) is gone: stopping", supervisor)
            break
    server.stop(grace=config.ae.dimse_timeout)


def _tell(ready: Connection, message: tuple[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the supervisor is gone: the loop notices
        ready.send(message)
    ready.close()
