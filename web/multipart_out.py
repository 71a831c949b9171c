"""``multipart/related`` responses written as a stream, part by part (RFC 2387; PS3.18
8.6.1.2 and 8.7.3: each part with its Content-Type and transfer syntax).

A part's body is an iterable of byte chunks that is read only when the part is sent, from
Starlette's worker threads: a study of any size goes out one file chunk at a time.

The status is sent before the body, so what decides it is done first (PS3.18 Table
10.4.3-1: 200 for the whole target, 206 for part of it, else an error): :func:`multipart`
produces the first chunk of the first part before it returns (the file opened, a conversion
made), so that a file that cannot be read or converted is that error (404, 406), not an
empty 200. With ``partial``, a part whose first chunk fails then is left out, logged, and the
status becomes 206 (an error when no part is left). Once the response has started, a part
that fails ends it without the closing delimiter, so that the client sees a truncated body,
never a clean success with an instance missing or shortened.

On ``HEAD`` nothing is read: the headers (and the status the endpoint's checks gave) only.

The body is read ahead (:func:`read_ahead`): a worker thread gathers the next chunks, up to
:data:`BATCH_BYTES`, while the event loop sends the previous ones, instead of one thread
round trip per chunk with the file idle while the socket is written.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass

import anyio.to_thread
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
BATCH_BYTES = 1024 * 1024
"""Bytes of chunks a worker thread gathers in one call (two such batches are in memory at
most: the one being sent and the one being read)."""


@dataclass(frozen=True)
class Part:
    """One part: its Content-Type, its body's chunks, and the URL it came from."""

    content_type: str
    body: Iterable[bytes]
    location: str = ""


def multipart(parts: Iterable[Part], part_type: str, status: int = OK, *,
              partial: bool = False, head: bool = False) -> StreamingResponse:
    """A streamed ``multipart/related; type="<part_type>"`` response of ``parts``.

    Parameters
    ----------
    parts : iterable of Part
        Produced lazily; nothing of them is read on ``head``.
    part_type : str
        The ``type`` parameter (PS3.18 8.7.3).
    status : int
        :data:`OK`, or :data:`PARTIAL_CONTENT` when the endpoint already knows that only
        some of the target goes.
    partial : bool
        Parts whose first chunk fails before the response starts may be left out (a study
        or series): the status is then :data:`PARTIAL_CONTENT`.
    head : bool
        A ``HEAD`` request: the headers only, no part produced.

    Raises
    ------
    StorageError
        The first part cannot be produced (with ``partial``: no part can), before anything
        is sent; ``web.errors`` gives its status (404 for a lost file, 406 for a failed
        conversion).
    """
    boundary = secrets.token_hex(BOUNDARY_BYTES)
    media_type = f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}'
    if head:
        return StreamingResponse(iter(()), status_code=status, media_type=media_type)
    remaining = iter(parts)
    started, left_out = _start(remaining, partial)
    if left_out:
        status = PARTIAL_CONTENT  # PS3.18 Table 10.4.3-1: some of the target only
    return StreamingResponse(read_ahead(_body(started, remaining, boundary.encode())),
                             status_code=status, media_type=media_type)


async def read_ahead(chunks: Generator[bytes, None, None]) -> AsyncIterator[bytes]:
    """The chunks of ``chunks`` (a blocking iterator: file reads, conversions), gathered in
    a worker thread a batch (:data:`BATCH_BYTES`) at a time, the next batch read while this
    one is sent. ``chunks`` is only ever advanced by one thread at a time, and closed (its
    files with it) when the response ends or the client goes away."""

    def take() -> list[bytes]:
        batch: list[bytes] = []
        size = 0
        for chunk in chunks:
            batch.append(chunk)
            size += len(chunk)
            if size >= BATCH_BYTES:
                break
        return batch

    pending = asyncio.ensure_future(anyio.to_thread.run_sync(take))
    try:
        while batch := await pending:
            pending = asyncio.ensure_future(anyio.to_thread.run_sync(take))
            for chunk in batch:
                yield chunk
    finally:  # the end, or the client went away: close ``chunks`` once no thread runs it
        pending.add_done_callback(lambda done: _close(chunks, done))


def _close(chunks: Generator[bytes, None, None], done: asyncio.Future[list[bytes]]) -> None:
    if not done.cancelled():
        done.exception()  # retrieved: a batch nobody waits for any more may have failed
    chunks.close()


def _start(remaining: Iterator[Part], partial: bool
           ) -> tuple[tuple[Part, bytes, Iterator[bytes]] | None, int]:
    """The first part that can go, its first chunk and the rest of its chunks (``None``
    when there are no parts), and how many parts were left out before it.

    Raises
    ------
    StorageError
        The first part fails (with ``partial``: the last of them, when all fail).
    """
    left_out = 0
    failure: StorageError | None = None
    for part in remaining:
        chunks = iter(part.body)
        try:
            first = next(chunks, b"")
        except StorageError as exc:
            if not partial:
                raise
            logger.warning("WADO-RS: %s left out of the response: %s",
                           part.location or "a part", reason_line(str(exc)))
            left_out, failure = left_out + 1, exc
            continue
        return (part, first, chunks), left_out
    if failure is not None:
        raise failure
    return None, 0


def _body(started: tuple[Part, bytes, Iterator[bytes]] | None, remaining: Iterator[Part],
          boundary: bytes) -> Generator[bytes, None, None]:
    delimiter = b"--" + boundary
    current = started
    while current is not None:
        part, first, chunks = current
        head = [delimiter, b"Content-Type: " + part.content_type.encode("ascii")]
        if part.location:
            head.append(b"Content-Location: " + part.location.encode("latin-1", "replace"))
        yield CRLF.join(head) + CRLF + CRLF + first
        try:
            yield from chunks
            yield CRLF
            following = next(remaining, None)
            if following is None:
                break
            part, chunks = following, iter(following.body)
            current = part, next(chunks, b""), chunks
        except StorageError as exc:  # a file gone since the checks: no closing delimiter
            logger.warning("WADO-RS: response cut short in %s: %s",
                           part.location or "a part", reason_line(str(exc)))
            return
    yield delimiter + b"--" + CRLF
