"""Who may read and who may write: the ``web`` section's access rules.

A request without credentials gets ``web.anonymous_local`` rights when it comes from this
machine (a loopback address) and ``web.anonymous_remote`` otherwise. Reading (GET, HEAD)
needs ``read``; storing (POST) needs ``read-write``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import WebConfig
from .errors import FORBIDDEN, UNAUTHORIZED

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (the peer's address) is this machine."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allows(rights: str, method: str) -> bool:
    """Whether ``rights`` (none, read, read-write) allow ``method``."""
    if rights == "read-write":
        return True
    return rights == "read" and method in READ_METHODS


class AccessMiddleware:
    """Refuse with 401 (no or unknown credentials) or 403 (not enough rights) before any
    endpoint runs."""

    def __init__(self, app: ASGIApp, config: WebConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        local = is_loopback(client[0] if client else None)
        rights = self.config.anonymous_local if local else self.config.anonymous_remote
        method = scope["method"]
        if not allows(rights, method):
            status = UNAUTHORIZED if rights == "none" else FORBIDDEN
            reason = ("credentials are required" if status == UNAUTHORIZED
                      else f"{method} needs read-write rights")
            await _refuse(send, status, reason)
            return
        scope["minipacs.rights"] = rights
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, reason: str) -> None:
    headers: list[tuple[bytes, Any]] = [(b"content-type", b"text/plain; charset=utf-8")]
    if status == UNAUTHORIZED:
        headers.append((b"www-authenticate", b'Basic realm="minipacs"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": reason.encode() + b"\n"})
