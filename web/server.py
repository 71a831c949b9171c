"""The HTTP listener: uvicorn serving :func:`web.app.create_app` in a thread of its own.

The DICOM listener runs pynetdicom's threads in the same process; uvicorn gets one thread
with its own event loop, and Starlette runs the blocking index and file reads in its worker
threads. :meth:`WebServer.stop` lets requests in flight finish (up to a grace period).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from storage import Archive

from .admin import Operations
from .app import AuditRecord, create_app
from .config import WebConfig

logger = logging.getLogger("minipacs.web")

START_TIMEOUT = 30.0
"""Seconds uvicorn may take to start serving on its bound socket."""
HEADER_TIMEOUT = 30.0
"""Seconds a connection may take to send a request's line and headers (the first, or the
next one on a kept-alive connection) before it is closed: uvicorn waits for them forever,
so clients that stall (or send a byte a minute) would pile up open connections."""
MAX_CONNECTIONS = 1000
"""Connections (and requests in flight) served at once; beyond, a new request is answered
503 (uvicorn's ``limit_concurrency``), and each connection still meets HEADER_TIMEOUT."""
FILE_LIMIT = 65536
"""The soft limit of open files raised to (at most the hard limit) when the listener
starts, so that many HTTP connections cannot starve the DICOM listener and the file store."""


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request line and headers do
    not arrive within ``header_timeout`` seconds (tested with uvicorn 0.55; a subclass
    through ``uvicorn.Config(http=...)``, its public hook for a protocol class).

    The deadline is armed when the connection opens and again when a response completes;
    it does nothing once a new request has begun (uvicorn then has a new ``cycle``)."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        cycle = self.cycle
        self.loop.call_later(self.header_timeout, self._expire, cycle)

    def _expire(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing() and (
                cycle is None or cycle.response_complete):
            self.transport.close()


def raise_file_limit(wanted: int = FILE_LIMIT) -> None:
    """Raise this process's soft limit of open files towards ``wanted`` (never above the
    hard limit, never lower than it is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class WebListenError(OSError):
    """The HTTP listener could not bind its address and port, or did not start."""


class WebServer:
    """A running HTTP listener.

    Parameters
    ----------
    config : WebConfig
        The ``web`` section; ``port`` 0 picks a free port (see :attr:`port`).
    archive : Archive
        The archive the DICOM listener serves too.
    certificate, private_key : str
        PEM files for HTTPS (``web.https``: the ``tls`` section's certificate).
    audit : callable, optional
        One line of the audit trail per request.
    operations : Operations, optional
        The DICOM actions of the administrator's page (:mod:`web.admin`).
    """

    def __init__(self, config: WebConfig, archive: Archive, certificate: str = "",
                 private_key: str = "", *, header_timeout: float = HEADER_TIMEOUT,
                 audit: AuditRecord | None = None,
                 operations: Operations | None = None) -> None:
        self.config = config
        self.archive = archive
        self.app = create_app(archive, config, audit, operations)
        self._tls = (certificate, private_key) if config.https else None
        self._port = config.port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._header_timeout = header_timeout

    @property
    def port(self) -> int:
        """The port actually bound."""
        return self._port

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    @property
    def root_url(self) -> str:
        """Where this listener answers, e.g. ``http://127.0.0.1:8080``."""
        host = self.config.bind
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The DICOMweb root, e.g. ``http://127.0.0.1:8080/dicom-web``."""
        return self.root_url + self.config.base_path

    def start(self) -> None:
        """Bind and start serving (returns once uvicorn serves).

        Raises
        ------
        WebListenError
            The port cannot be bound, or uvicorn did not start.
        """
        bind = self.config.bind
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            sock = socket.create_server((bind, self.config.port), family=family, backlog=128)
        except OSError as exc:
            raise WebListenError(
                f"cannot listen on {bind}:{self.config.port} (web): {exc.strerror or exc}"
            ) from exc
        # accepted connections inherit it: asyncio sets TCP_NODELAY only on sockets it
        # made itself, and without it each kept-alive request waits ~40 ms for the client's
        # delayed ACK (Nagle's algorithm)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._port = int(sock.getsockname()[1])
        raise_file_limit()
        protocol = type("HeaderDeadline", (HeaderDeadline,),
                        {"header_timeout": self._header_timeout})
        kwargs: dict[str, Any] = {}
        if self._tls:
            kwargs.update(ssl_certfile=self._tls[0], ssl_keyfile=self._tls[1])
        config = uvicorn.Config(
            self.app, lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=10, server_header=False, http=protocol,
            limit_concurrency=MAX_CONNECTIONS,
            # X-Forwarded-For is believed from a proxy on this machine only, whatever the
            # FORWARDED_ALLOW_IPS environment says: else a remote client could claim to be
            # local and get web.anonymous_local's rights
            proxy_headers=True, forwarded_allow_ips=["127.0.0.1", "::1"], **kwargs)
        server = self._server = uvicorn.Server(config)
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                failed.append(exc)
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="minipacs-web", daemon=True)
        self._thread.start()
        while not server.started:  # poll until it serves, or its thread ended
            self._thread.join(0.02)
            if not self._thread.is_alive():
                raise WebListenError(f"the web listener did not start: {failed or 'exited'}")
        logger.info("minipacs DICOMweb at %s%s", self.url,
                    f"; viewer at {self.root_url}/viewer/" if self.config.viewer else "")

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``grace`` seconds)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(grace)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5.0)
        self._server = None
        logger.info("minipacs DICOMweb stopped")
