"""The ASGI application: DICOMweb under ``web.base_path``, the viewer under ``/viewer/``,
``/metrics``, ``/healthz``, the administrator's page at ``/`` and under ``/admin/``.

Endpoints find the archive and the configuration in ``request.app.state`` (``archive``,
``config``). Each service keeps its routes in its own module; this one assembles them.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Mount

from storage import Archive

from . import admin, delete, errors, health, metrics, qido, stow, viewer, wado
from .auth import AccessMiddleware
from .config import WebConfig

AuditRecord = Callable[..., None]
"""``audit(event, **fields)``: one line of the server's audit trail (scp/audit.py's
``AuditTrail.record``, handed in by ``scp``, which this package does not import)."""


def create_app(archive: Archive, config: WebConfig, audit: AuditRecord | None = None,
               operations: admin.Operations | None = None) -> Starlette:
    """The application serving ``archive`` as ``config`` says; each request is a line of
    ``audit`` when given. ``operations`` are the DICOM actions the administrator's page
    offers (:mod:`web.admin`; ``scp/admin.py`` makes them)."""
    dicomweb: list[BaseRoute] = [*qido.ROUTES, *wado.ROUTES, *stow.ROUTES, *delete.ROUTES]
    routes: list[BaseRoute] = [*metrics.ROUTES, *health.ROUTES,
                               Mount(config.base_path, routes=dicomweb), *admin.routes()]
    if config.viewer:
        routes += viewer.routes(config)
    middleware = [Middleware(AccessMiddleware, config=config)]
    if config.cors_origins:  # outermost: a refused request still says where it may come from
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
            expose_headers=["Content-Location", "Warning"]))
    registry, http = metrics.registry(archive)
    middleware.insert(0, Middleware(metrics.MetricsMiddleware, http=http,
                                    audit=audit))  # counts all, refusals too
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers=errors.handlers())
    app.state.metrics = registry
    app.state.archive = archive
    app.state.config = config
    app.state.audit = audit
    app.state.operations = operations
    return app
