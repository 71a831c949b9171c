"""A ``multipart/related`` body (RFC 2387; PS3.18 8.6.1.2) read as a stream, part by part.

python-multipart's :class:`~python_multipart.multipart.MultipartParser` finds the boundaries;
:class:`PartReader` keeps each part's headers and bytes: in memory while the part is small,
in a spool file once it grows past :data:`IN_MEMORY_UP_TO`, so that a large part is never
held whole in memory. A :class:`SpoolGuard` (the archive) may refuse a part while it
arrives: too large for the store, or its spool would take the disk below the store's free
space floor; the rest of that part is then read and dropped, and the parts after it are read
on. Whoever feeds the reader takes each part as soon as its closing
boundary has arrived, and must :meth:`Part.discard` it (and :meth:`PartReader.close` the
reader) when done.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from storage import StorageError

IN_MEMORY_UP_TO = 1024 * 1024
"""Bytes of a part kept in memory; a larger part goes to a spool file as it arrives."""

SPOOL_PREFIX = "web-"
SPOOL_SUFFIX = ".part"
"""Spool files are ``web-*.part`` in the spool folder (the file store's temporary folder,
whose ``*.part`` leftovers a crash may leave are removed when the store opens)."""


class SpoolGuard(Protocol):
    """What may refuse a part while it arrives (:class:`storage.Archive` is one)."""

    def check_part_size(self, size: int) -> None:
        """Raise :class:`~storage.StorageError` once a part of ``size`` bytes is too large."""

    def spooling(self, size: int) -> AbstractContextManager[None]:
        """Hold a reservation of ``size`` bytes while they are written to a spool file;
        raise :class:`~storage.StorageError` when the disk has no room for them."""


class MalformedBody(ValueError):
    """The body is not the multipart body its Content-Type announces."""


def media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type header's media type (lower case) and its parameters (names in lower
    case; quoted and unquoted values alike, RFC 9110 5.6.6)."""
    raw = (header or "").encode("latin-1", "replace")  # a header's text is latin-1 anyway
    kind, params = parse_options_header(raw)
    return kind.decode("latin-1").lower(), {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in params.items()}


@dataclass
class Part:
    """One body part: its headers (names in lower case) and its bytes, in memory
    (:attr:`data`) or in a spool file (:attr:`path`); or, when it could not be spooled
    (disk full), why (:attr:`spool_error`) and no bytes."""

    number: int
    headers: dict[str, str]
    size: int
    data: bytes | None = None
    path: Path | None = None
    spool_error: str = ""

    @property
    def content(self) -> bytes | Path:
        """The part's bytes, or the file that holds them."""
        if self.path is not None:
            return self.path
        return self.data or b""

    def discard(self) -> None:
        """Remove the spool file, if any."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.path = None
        self.data = None


@dataclass
class _Current:
    """The part being read."""

    headers: dict[str, str] = field(default_factory=dict)
    name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    memory: bytearray = field(default_factory=bytearray)
    file: BinaryIO | None = None
    path: Path | None = None
    size: int = 0
    spool_error: str = ""


class PartReader:
    """Feed it a body chunk by chunk (:meth:`feed`); it returns the parts each chunk
    completed.

    Parameters
    ----------
    boundary : str
        The body's boundary (the Content-Type's ``boundary`` parameter).
    spool_folder : Path
        Where parts larger than ``in_memory_up_to`` are written as they arrive.
    in_memory_up_to : int
        Bytes of a part kept in memory.
    guard : SpoolGuard, optional
        Asked before each byte of a part is kept, in memory or in its spool file.
    """

    def __init__(self, boundary: str, spool_folder: Path,
                 in_memory_up_to: int = IN_MEMORY_UP_TO,
                 guard: SpoolGuard | None = None) -> None:
        self.spool_folder = spool_folder
        self._guard = guard
        self._boundary = boundary
        self.in_memory_up_to = in_memory_up_to
        self.complete = False
        """Whether the closing boundary arrived (RFC 2046 5.1.1 close-delimiter)."""
        self.parts = 0
        """Parts begun so far."""
        self.malformed = ""
        """Why the body is not a multipart body, once it is known not to be."""
        self._current: _Current | None = None
        self._done: list[Part] = []
        try:
            self._parser = MultipartParser(boundary.encode("latin-1"), {
                "on_part_begin": self._begin,
                "on_header_field": self._header_name,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_end": self._finished,
            })
        except (ValueError, UnicodeEncodeError) as exc:
            raise MalformedBody(f"unusable multipart boundary: {exc}") from exc

    @property
    def in_part(self) -> bool:
        """Whether a part has begun whose closing boundary has not arrived."""
        return self._current is not None

    def feed(self, chunk: bytes) -> list[Part]:
        """Parse ``chunk``; return the parts it completed, in order. When the bytes break
        the multipart syntax (RFC 2046 5.1.1: no boundary where one must be, a part's
        headers too many or too long), the parts completed before the fault are returned
        and :attr:`malformed` says what is wrong; feeding more then raises.

        Raises
        ------
        MalformedBody
            Fed again after :attr:`malformed` was set.
        """
        if self.malformed:
            raise MalformedBody(self.malformed)
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self.malformed = (f"malformed multipart body in part {max(self.parts, 1)}"
                              f" (RFC 2046 5.1.1, boundary {self._boundary!r}): {exc}")
            current, self._current = self._current, None
            if current is not None:
                self._close_spool(current, remove=True)
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Remove what a part cut short left (its spool file)."""
        current, self._current = self._current, None
        if current is not None:
            self._close_spool(current, remove=True)
        for part in self._done:
            part.discard()
        self._done = []

    # python-multipart's callbacks --------------------------------------------------------

    def _begin(self) -> None:
        self.parts += 1
        self._current = _Current()

    def _header_name(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.value += data[start:end]

    def _header_end(self) -> None:
        current = self._current
        assert current is not None
        name = current.name.decode("latin-1").strip().lower()
        current.headers[name] = current.value.decode("latin-1").strip()
        current.name.clear()
        current.value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        current = self._current
        assert current is not None
        current.size += end - start
        if current.spool_error:  # the rest of a refused part: read, not kept
            return
        try:
            if self._guard is not None:
                self._guard.check_part_size(current.size)
            if current.file is not None:
                with self._spooling(end - start):
                    current.file.write(data[start:end])
                return
            current.memory += data[start:end]
            if len(current.memory) > self.in_memory_up_to:  # from now on in a file
                with self._spooling(len(current.memory)):
                    fd, name = tempfile.mkstemp(SPOOL_SUFFIX, SPOOL_PREFIX,
                                                self.spool_folder)
                    current.path = Path(name)
                    current.file = os.fdopen(fd, "wb")
                    current.file.write(current.memory)
                current.memory = bytearray()
        except (OSError, StorageError) as exc:  # this part fails; the parts after it are read on
            self._spool_failed(current, exc)

    def _spooling(self, size: int) -> AbstractContextManager[None]:
        return self._guard.spooling(size) if self._guard is not None else \
            contextlib.nullcontext()

    def _end(self) -> None:
        current, self._current = self._current, None
        assert current is not None
        if current.file is not None:
            try:
                current.file.close()  # its last bytes are flushed here: a full disk shows
            except OSError as exc:
                self._spool_failed(current, exc)
        part = Part(self.parts, current.headers, current.size,
                    spool_error=current.spool_error)
        if not current.spool_error:
            part.path = current.path
            part.data = None if current.path is not None else bytes(current.memory)
        self._done.append(part)

    def _finished(self) -> None:
        self.complete = True

    def _spool_failed(self, current: _Current, exc: OSError | StorageError) -> None:
        reason = exc.strerror if isinstance(exc, OSError) else None
        current.spool_error = f"cannot spool part {self.parts}: {reason or exc}"
        current.memory = bytearray()
        self._close_spool(current, remove=True)

    @staticmethod
    def _close_spool(current: _Current, remove: bool) -> None:
        if current.file is not None:
            with contextlib.suppress(OSError):
                current.file.close()
            current.file = None
        if remove and current.path is not None:
            with contextlib.suppress(FileNotFoundError):
                current.path.unlink()

