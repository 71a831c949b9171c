"""The audit trail: who did what, when, with what result, one JSON object per line.

Every association (established, ended, rejected), DIMSE operation, HTTP request, delete and
send is a line of ``audit.path`` (``<data_dir>/audit.jsonl`` by default)::

    {"time": "2026-12-05T14:02:11.532Z", "event": "dimse", "operation": "C-STORE",
     "status": "0000", "calling_ae": "CT1", "address": "10.0.0.7", "sop_instance_uid": ...}

:class:`AuditTrail` appends each line with one ``write`` to a file opened ``O_APPEND``, so
the lines of several processes (``ae.workers``, a ``minipacs delete`` beside the server)
never interleave. The file is rotated before a line would take it past ``audit.max_mb``
(``audit.jsonl.1`` ... ``audit.jsonl.<backups>``) by whichever process finds it full, under
an ``flock`` of ``<path>.lock``; the others reopen the new file at their next line.
Writing never fails an operation: a line that cannot be written is lost, and the log says so
(once a minute at most); a rotation that fails lets the file grow rather than lose lines.
With ``audit.syslog`` each line with a DICOM audit message counterpart is also sent to an
audit record repository in the IHE ATNA form (:mod:`scp.atna`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .atna import SyslogForwarder
from .config import Config

logger = logging.getLogger(__name__)

COMPLAIN_EVERY = 60.0
"""Seconds between two log lines about the same trail's trouble."""


class AuditTrail:
    """An append-only JSON-lines file, rotated by size (see the module).

    Parameters
    ----------
    path : Path
        The file; its folder is created when missing.
    max_bytes : int
        Size past which the file is rotated.
    backups : int
        Rotated files kept.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int,
                 forward: SyslogForwarder | None = None) -> None:
        self.path = Path(path)
        self.forward = forward
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._closed = False
        self._complained = -COMPLAIN_EVERY

    def record(self, event: str, **fields: Any) -> None:
        """Append one line: the time, ``event``, then ``fields`` (``None`` values left out).
        Never raises: a line that cannot be written is lost, and said so in the log."""
        try:
            now = datetime.datetime.now(datetime.UTC)
            line = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.")
                    + f"{now.microsecond // 1000:03d}Z",
                    "event": event, **{k: v for k, v in fields.items() if v is not None}}
            data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode(
                "utf-8", errors="backslashreplace")  # lone surrogates (argv's undecodable bytes)
            with self._lock:
                if self._closed:
                    return
                fd = self._current()
                size = os.fstat(fd).st_size
                if size and size + len(data) > self.max_bytes:  # full: a new file first
                    try:
                        self._rotate()
                    except OSError as exc:  # then this one grows on: no line lost for it
                        self._complain(f"cannot rotate it: {exc}")
                    fd = self._current()
                os.write(fd, data)
            if self.forward is not None:  # queued: sent by its own thread
                self.forward.put(line)
        except Exception as exc:
            self._complain(f"a line is lost: {exc}")

    def _complain(self, what: str) -> None:
        """Log a problem of the trail, at most once a minute."""
        now = time.monotonic()
        if now - self._complained >= COMPLAIN_EVERY:
            self._complained = now
            logger.error("audit trail %s: %s", self.path, what)

    def close(self) -> None:
        """Close the file; later records are dropped (an operation that outlived the
        server's stop)."""
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
        if self.forward is not None:
            self.forward.close()

    def _current(self) -> int:
        """The file's descriptor, reopened when another process rotated it."""
        fd = self._fd
        if fd is not None:
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
            self._fd = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        return self._fd

    def _current_fd(self) -> int:
        assert self._fd is not None  # _current opened it
        return self._fd

    def _rotate(self) -> None:
        """``path`` -> ``path.1`` -> ... -> ``path.<backups>`` (the oldest dropped), unless
        another process is at it or did it already."""
        lock = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process rotates it now
            try:
                if os.stat(self.path).st_ino != os.fstat(self._current_fd()).st_ino:
                    return  # rotated meanwhile by another process: write to the new one
            except FileNotFoundError:
                return
            prefix = self.path.name + "."
            numbers = sorted((int(name[len(prefix):]) for name in os.listdir(self.path.parent)
                              if name.startswith(prefix) and name[len(prefix):].isascii()
                              and name[len(prefix):].isdigit()), reverse=True)
            for n in numbers:  # the highest first; past ``backups``, dropped
                with contextlib.suppress(FileNotFoundError):
                    if n >= self.backups:
                        os.remove(f"{self.path}.{n}")
                    else:
                        os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        finally:
            os.close(lock)  # the flock goes with it


class NoAudit:
    """``audit.enabled: false``: records nothing."""

    def record(self, event: str, **fields: Any) -> None:
        return None

    def close(self) -> None:
        return None


Audit = AuditTrail | NoAudit


def open_audit(config: Config) -> Audit:
    """The audit trail ``config``'s ``audit`` section asks for."""
    audit = config.audit
    if not audit.enabled:
        return NoAudit()
    forward = SyslogForwarder(
        audit.syslog, config.ae.title, config.tls.certificate, config.tls.private_key,
        config.tls.ca_certificates) if audit.syslog else None
    return AuditTrail(config.audit_path, audit.max_mb * 1024 * 1024, audit.backups, forward)
