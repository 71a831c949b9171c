"""``GET /healthz``: whether this node can serve, for a load balancer's health check.

200 ``{"status": "ok"}`` when the index answers a query and the file store answers
(:meth:`storage.Archive.health`); else 503 with the parts that failed,
``{"status": "unavailable", "failed": ["index"]}``. The reasons go to the log, not to the
client: anyone may ask (a load balancer has no credentials, :func:`web.auth.is_public`),
and the answer says no more than whether to send this node work. Not audited, as
``/metrics`` scrapes are not: HAProxy asks every few seconds.
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth import HEALTH_PATH

logger = logging.getLogger(__name__)


async def health(request: Request) -> Response:
    """``GET /healthz`` (and HEAD)."""
    found = await run_in_threadpool(request.app.state.archive.health)
    if found.ok:
        return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})
    for part, why in found.problems.items():
        logger.warning("health check: the %s: %s", part, why)
    return JSONResponse({"status": "unavailable", "failed": sorted(found.problems)},
                        status_code=503, headers={"Cache-Control": "no-store"})


ROUTES = [Route(HEALTH_PATH, health, methods=["GET", "HEAD"])]
