"""``/metrics``: what the server is doing, in Prometheus's text format (``prometheus_client``).

Three sources, one registry per application (:func:`registry`):

- the DICOM listener's counts (associations, each DIMSE operation's count, bytes and
  latency by status): ``prometheus_client``'s default registry in this process, or, when a
  supervisor runs ``ae.workers`` processes, what they wrote to ``PROMETHEUS_MULTIPROC_DIR``
  (``scp/metrics.py`` defines them; this module never imports ``scp``);
- the HTTP listener's own (:class:`MetricsMiddleware`): requests by service, method and
  status with their latency, and body bytes in and out (the same middleware writes each
  request, scrapes but, to the audit trail it is given);
- the archive's state, read at each scrape (:class:`ArchiveCollector`): patients, studies,
  series and instances held, the file store's disk, routing's queue per peer.

``GET /metrics`` needs ``read`` rights, as DICOMweb's GETs do (:mod:`web.auth`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage import COMMITMENT, Archive, StorageError

logger = logging.getLogger(__name__)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
DIMSE_PREFIXES = ("minipacs_dicom_", "minipacs_dimse_")
"""The DICOM listener's metric families (scp/metrics.py)."""

SERVICES = {"web.qido": "QIDO-RS", "web.wado": "WADO-RS", "web.stow": "STOW-RS",
            "web.delete": "DELETE", "web.viewer": "viewer", "web.metrics": "metrics",
            "web.admin": "page", "web.health": "health"}
"""The service label of a request, by its endpoint's module; ``other`` for the rest (a
path no route has, a refusal before routing)."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
"""Methods that are labels as they are; any other is ``other`` (a client may send any
token as a method: it must not make series at will)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class _Default(Collector):
    """The default registry's families (the DICOM listener's, the process's), or, with
    worker processes, everything but the DICOM listener's, which the workers' files hold."""

    def __init__(self, skip_dimse: bool) -> None:
        self.skip_dimse = skip_dimse

    def collect(self) -> Iterator[Any]:
        for family in REGISTRY.collect():
            if not (self.skip_dimse and family.name.startswith(DIMSE_PREFIXES)):
                yield family


class ArchiveCollector(Collector):
    """What the archive holds and the disk it has, read at each scrape."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def collect(self) -> Iterator[Any]:
        try:
            totals = self.archive.totals()
            free, total = self.archive.disk_usage()
            queues = self.archive.routing_queue()
            reports = self.archive.routing_queue(COMMITMENT)
        except (StorageError, OSError) as exc:
            logger.warning("/metrics: the archive could not be read: %s", exc)
            return
        finally:
            self.archive.release()
        held = GaugeMetricFamily("minipacs_held", "What the archive holds, by level",
                                 labels=["level"])
        for level in ("patients", "studies", "series", "instances"):
            held.add_metric([level], totals[level])
        yield held
        yield GaugeMetricFamily("minipacs_files_disk_free_bytes",
                                "Free bytes on the file store's disk", value=free)
        yield GaugeMetricFamily("minipacs_files_disk_size_bytes",
                                "Size of the file store's disk", value=total)
        items = GaugeMetricFamily(
            "minipacs_routing_queue_items", "Instances routing has still to send, by peer:"
            " waiting (to be sent or retried) or failed (given up until retried)",
            labels=["peer", "state"])
        oldest = GaugeMetricFamily(
            "minipacs_routing_queue_oldest_seconds",
            "Age of the oldest instance routing has still to send, by peer", labels=["peer"])
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        for queue in queues:
            items.add_metric([queue.peer, "waiting"], queue.waiting)
            items.add_metric([queue.peer, "failed"], queue.failed)
            if queue.oldest is not None:
                oldest.add_metric([queue.peer], max(0.0, (now - queue.oldest).total_seconds()))
        yield items
        yield oldest
        commitment = GaugeMetricFamily(
            "minipacs_storage_commitment_reports", "Storage Commitment reports still to"
            " send: waiting (to be sent or retried) or failed (given up until retried)",
            labels=["state"])
        commitment.add_metric(["waiting"], sum(r.waiting for r in reports))
        commitment.add_metric(["failed"], sum(r.failed for r in reports))
        yield commitment


class HttpMetrics:
    """The HTTP listener's metrics, in one application's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Histogram(
            "minipacs_http_request_seconds",
            "HTTP requests answered, by service, method and status, with how long each took"
            " (to the end of its body)", ["service", "method", "status"],
            buckets=LATENCY_BUCKETS, registry=registry)
        self.bytes = Counter(
            "minipacs_http_bytes", "HTTP body bytes received (in) and sent (out), by service",
            ["service", "direction"], registry=registry)


def registry(archive: Archive) -> tuple[CollectorRegistry, HttpMetrics]:
    """A registry with every source of the module's docstring."""
    made = CollectorRegistry()
    folder = os.environ.get(MULTIPROCESS_ENV)
    if folder:
        multiprocess.MultiProcessCollector(made, path=folder)
    made.register(_Default(skip_dimse=bool(folder)))
    made.register(ArchiveCollector(archive))
    return made, HttpMetrics(made)


class MetricsMiddleware:
    """Counts every request (pure ASGI: streamed bodies pass through untouched)."""

    def __init__(self, app: ASGIApp, http: HttpMetrics,
                 audit: Callable[..., None] | None = None) -> None:
        self.app = app
        self.http = http
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        code = 500  # what the client gets when the application fails before answering
        sizes = {"in": 0, "out": 0}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            endpoint = scope.get("endpoint")
            service = SERVICES.get(getattr(endpoint, "__module__", ""), "other")
            seconds = time.monotonic() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.http.requests.labels(service, method, str(code)).observe(seconds)
            for direction, size in sizes.items():
                if size:
                    self.http.bytes.labels(service, direction).inc(size)
            if self.audit is not None and service not in ("metrics", "health"):  # not actions
                client = scope.get("client") or ("", 0)
                self.audit("http", service=service, method=scope["method"],
                           path=scope.get("path", ""),
                           query=scope.get("query_string", b"").decode("latin-1") or None,
                           status=code, user=scope.get("minipacs.user") or None,
                           address=client[0], bytes_in=sizes["in"], bytes_out=sizes["out"],
                           ms=round(seconds * 1000, 1),
                           # an account that sees de-identified data: under which profile
                           **({"profile": scope["minipacs.profile"]}
                              if scope.get("minipacs.profile") else {}),
                           **scope.get("minipacs.audit", {}))  # what the endpoint adds


def metrics(request: Request) -> Response:
    """``GET /metrics``: every family of the application's registry."""
    return Response(generate_latest(request.app.state.metrics),
                    media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/metrics", metrics, methods=["GET"])]
