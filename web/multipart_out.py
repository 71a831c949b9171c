"""``multipart/related`` responses written as a stream, part by part (RFC 2387; PS3.18
8.6.1.2 and 8.7.3: each part with its Content-Type and transfer syntax).

A part's body is an iterable of byte chunks that is read only when the part is sent, from
Starlette's worker threads: a study of any size goes out one file chunk at a time. A part
whose first chunk cannot be produced (its file is gone, its conversion failed) is left out
and logged; one that fails half-way ends the response without its closing delimiter, so
that the client sees a truncated body rather than a shortened instance.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from starlette.responses import StreamingResponse

from storage import StorageError

from .errors import reason_line

logger = logging.getLogger("minipacs.web")

CRLF = b"\r\n"
MULTIPART_RELATED = "multipart/related"
BOUNDARY_BYTES = 16
"""Random bytes of each response's boundary (hex: twice as many characters)."""

OK = 200
PARTIAL_CONTENT = 206


@dataclass(frozen=True)
class Part:
    """One part: its Content-Type, its body's chunks, and the URL it came from."""

    content_type: str
    body: Iterable[bytes]
    location: str = ""


def multipart(parts: Iterable[Part], part_type: str, status: int = OK) -> StreamingResponse:
    """A streamed ``multipart/related; type="<part_type>"`` response of ``parts``."""
    boundary = secrets.token_hex(BOUNDARY_BYTES)
    media_type = f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}'
    return StreamingResponse(_body(parts, boundary.encode()), status_code=status,
                             media_type=media_type)


def _body(parts: Iterable[Part], boundary: bytes) -> Iterator[bytes]:
    delimiter = b"--" + boundary
    remaining = iter(parts)
    while True:
        try:
            part = next(remaining, None)
        except StorageError as exc:  # what makes the parts failed (a file gone since)
            logger.warning("WADO-RS: response cut short: %s", reason_line(str(exc)))
            return
        if part is None:
            break
        chunks = iter(part.body)
        try:
            first = next(chunks, b"")
        except StorageError as exc:
            logger.warning("WADO-RS: %s left out of the response: %s",
                           part.location or "a part", reason_line(str(exc)))
            continue
        head = [delimiter, b"Content-Type: " + part.content_type.encode("ascii")]
        if part.location:
            head.append(b"Content-Location: " + part.location.encode("latin-1", "replace"))
        yield CRLF.join(head) + CRLF + CRLF + first
        try:
            yield from chunks
        except StorageError as exc:
            logger.warning("WADO-RS: response cut short in %s: %s",
                           part.location or "a part", reason_line(str(exc)))
            return
        yield CRLF
    yield delimiter + b"--" + CRLF
