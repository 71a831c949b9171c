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
    NotFound,
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


UID_IN_TEXT = re.compile(r"(?<![0-9])[0-9]+(?:\.[0-9]+)+(?![0-9])")
"""What may be a UID in a reason: two components or more."""

OWN_REASONS: tuple[type[StorageError], ...] = (NotFound, InvalidQuery, Withheld)
"""Storage errors whose text is minipacs' own (UIDs and keywords, no value read from a
file): told to an account that sees de-identified data once its UIDs are scrubbed."""


def _reason(request: Request, text: str, own: bool = True) -> str:
    """``text`` on one line. For an account that sees de-identified data
    (``scope["minipacs.profile"]``): past the path the archive works on the stored UIDs,
    which it must never see, so every UID in ``text`` that the request did not name itself
    is replaced by ``(a UID)``; a text not ``own`` (it may quote a value read from a file:
    pydicom's, the system's) is replaced by the status's name. What was replaced is logged
    at INFO for the administrator."""
    line = reason_line(text)
    if not request.scope.get("minipacs.profile"):
        return line
    if own:
        asked = set(UID_IN_TEXT.findall(f"{request.url.path}?{request.url.query}"))
        safe = UID_IN_TEXT.sub(lambda m: m[0] if m[0] in asked else "(a UID)", line)
    else:
        safe = "the request cannot be answered (the administrator's log says why)"
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
    return PlainTextResponse(_reason(request, str(exc), isinstance(exc, OWN_REASONS)) + "\n",
                             status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    return PlainTextResponse(reason_line(exc.detail) + "\n", exc.status_code, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("%s %s failed", request.method, request.url.path)
    return PlainTextResponse(f"internal error: {_reason(request, repr(exc), own=False)}\n",
                             INTERNAL_ERROR)


def handlers() -> dict[Any, Any]:
    """Starlette's ``exception_handlers`` for every error above."""
    return {WebError: _web_error, StorageError: _storage_error, HTTPException: _http_error,
            Exception: _unexpected}
