"""Errors and their HTTP statuses, in one place (PS3.18 8.6 and each service's table).

Endpoints raise :class:`WebError` (or let a storage error through); :func:`handlers`
turns each into its status with a one-line ``text/plain`` reason, never a 500 with a
traceback.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from storage import (
    CannotConvert,
    InstanceUnavailable,
    InvalidQuery,
    QueryFailed,
    StorageError,
    StorageFull,
    TooManyMatches,
    Withheld,
)

logger = logging.getLogger("minipacs.web")

NOT_MODIFIED = 304
BAD_REQUEST = 400
UNAUTHORIZED = 401
FORBIDDEN = 403
NOT_FOUND = 404
NOT_ACCEPTABLE = 406
REQUEST_TIMEOUT = 408
CONFLICT = 409
PAYLOAD_TOO_LARGE = 413
UNSUPPORTED_MEDIA_TYPE = 415
INTERNAL_ERROR = 500
SERVICE_UNAVAILABLE = 503
INSUFFICIENT_STORAGE = 507


class WebError(Exception):
    """A request we answer with ``status`` and the one-line ``reason``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


STORAGE_STATUS: tuple[tuple[type[StorageError], int], ...] = (
    (InvalidQuery, BAD_REQUEST),
    # QIDO-RS answers query.max_results with a 299 Warning (PS3.18 8.3.4.4.1), not this
    (TooManyMatches, PAYLOAD_TOO_LARGE),
    (InstanceUnavailable, NOT_FOUND),
    # not shown to an account that sees de-identified data (PS3.15 E.1.1: burned-in text)
    (Withheld, NOT_FOUND),
    (CannotConvert, NOT_ACCEPTABLE),
    (StorageFull, INSUFFICIENT_STORAGE),
    (QueryFailed, SERVICE_UNAVAILABLE),
)
"""A storage error's HTTP status; any other storage error is a 503."""


def status_of(exc: StorageError) -> int:
    """The HTTP status of a storage error (:data:`STORAGE_STATUS`)."""
    return next((status for kind, status in STORAGE_STATUS if isinstance(exc, kind)),
                SERVICE_UNAVAILABLE)


def reason_line(text: str) -> str:
    """``text`` on one line."""
    return " ".join(str(text).split())


UID_IN_TEXT = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+){2,}(?![0-9.])")
"""What looks like a UID in a reason (three components or more)."""


def _reason(request: Request, text: str) -> str:
    """``text`` on one line; for an account that sees de-identified data
    (``scope["minipacs.profile"]``), every UID in it that the request did not name itself
    replaced by ``(a UID)``: past the path, the archive works on the stored UIDs, which
    such an account must never see (the full reason is logged for the administrator)."""
    line = reason_line(text)
    if not request.scope.get("minipacs.profile"):
        return line
    asked = set(UID_IN_TEXT.findall(f"{request.url.path}?{request.url.query}"))
    safe = UID_IN_TEXT.sub(lambda m: m[0] if m[0] in asked else "(a UID)", line)
    if safe != line:
        logger.info("%s %s for a de-identified account: %s", request.method,
                    request.url.path, line)
    return safe


async def _web_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, WebError)
    return PlainTextResponse(_reason(request, exc.reason) + "\n", exc.status,
                             headers=exc.headers)


async def _storage_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StorageError)
    status = status_of(exc)
    if status >= INTERNAL_ERROR:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return PlainTextResponse(_reason(request, str(exc)) + "\n", status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    return PlainTextResponse(reason_line(exc.detail) + "\n", exc.status_code, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path)
    return PlainTextResponse(f"internal error: {_reason(request, repr(exc))}\n",
                             INTERNAL_ERROR)


def handlers() -> dict[Any, Any]:
    """Starlette's ``exception_handlers`` for every error above."""
    return {WebError: _web_error, StorageError: _storage_error, HTTPException: _http_error,
            Exception: _unexpected}
