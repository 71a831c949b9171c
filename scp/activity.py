"""What the server is doing: operations in flight (for a graceful stop) and one log line
per association (peer, services used, counts, duration)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pynetdicom import events as evt

from . import metrics
from .audit import Audit, NoAudit

logger = logging.getLogger("minipacs.association")


@dataclass
class _AssocStats:
    started: float = field(default_factory=time.monotonic)
    counts: Counter[str] = field(default_factory=Counter)


class Activity:
    """Counts operations in flight and per-association statistics.

    Parameters
    ----------
    on_association_end : callable, optional
        Called (in the association's thread) when an association ends; the server uses it
        to give back that thread's index connection.
    """

    def __init__(self, on_association_end: Callable[[], None] | None = None,
                 known_peer: Callable[[str], bool] = lambda _: False,
                 audit: Audit | None = None) -> None:
        self._known_peer = known_peer
        self.audit: Audit = audit or NoAudit()
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stats: dict[int, _AssocStats] = {}  # of the associations open now
        self._extended: dict[int, dict[str, bytes]] = {}
        self._on_end = on_association_end

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """Mark a DIMSE operation in flight for its duration."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no operation is in flight; ``False`` if ``timeout`` ran out first."""
        with self._lock:
            return self._lock.wait_for(lambda: self._in_flight == 0, timeout)

    def count(self, event: evt.Event, service: str, ok: bool) -> None:
        """Count one operation of ``event``'s association."""
        stats = self._stats.get(id(event.assoc))
        if stats is not None:  # else it closed meanwhile (a connection lost mid-move)
            stats.counts[service if ok else f"{service} failed"] += 1

    def set_extended(self, event: evt.Event, accepted: dict[str, bytes]) -> None:
        """Remember the SOP Class Extended Negotiation accepted for ``event``'s association."""
        self._extended[id(event.assoc)] = accepted

    def extended(self, event: evt.Event, sop_class_uid: str) -> bytes:
        """What was accepted for ``sop_class_uid`` on ``event``'s association (b"" if none)."""
        return self._extended.get(id(event.assoc), {}).get(sop_class_uid, b"")

    def handle_established(self, event: evt.Event) -> None:
        self._stats[id(event.assoc)] = _AssocStats()
        requestor = event.assoc.requestor
        metrics.ASSOCIATIONS_OPEN.inc()
        metrics.ASSOCIATIONS.labels(
            metrics.calling_ae(requestor.ae_title, self._known_peer)).inc()
        self.audit.record("association-established", calling_ae=requestor.ae_title.strip(),
                          called_ae=event.assoc.acceptor.ae_title.strip(),
                          address=requestor.address, port=requestor.port)

    def handle_rejected(self, event: evt.Event) -> None:
        """EVT_REJECTED: pynetdicom rejected a request itself (too many associations, no
        presentation context, ...); scp/access.py counts its own rejections."""
        requestor = event.assoc.requestor
        metrics.REJECTED.labels(metrics.calling_ae(requestor.ae_title, self._known_peer)).inc()
        self.audit.record("association-rejected", calling_ae=requestor.ae_title.strip(),
                          address=requestor.address)

    def handle_closed(self, event: evt.Event) -> None:
        self._extended.pop(id(event.assoc), None)
        stats = self._stats.pop(id(event.assoc), None)
        if stats is not None:
            metrics.ASSOCIATIONS_OPEN.dec()
            # EVT_CONN_CLOSE may come before either: on a release, the peer closes as soon
            # as it has the A-RELEASE-RP, before pynetdicom marks the association released
            aborted = event.event is evt.EVT_ABORTED or getattr(event.assoc, "is_aborted", False)
            how = "aborted" if aborted else "released"
            counts = ", ".join(f"{n} {name}" for name, n in sorted(stats.counts.items()))
            requestor = event.assoc.requestor
            logger.info(
                "association from %s@%s:%s %s after %.2f s: %s",
                requestor.ae_title,
                requestor.address,
                requestor.port,
                how,
                time.monotonic() - stats.started,
                counts or "no operations",
            )
            self.audit.record("association-" + how, calling_ae=requestor.ae_title.strip(),
                              address=requestor.address, port=requestor.port,
                              seconds=round(time.monotonic() - stats.started, 3),
                              operations=dict(stats.counts))
        if self._on_end is not None:
            self._on_end()
