"""Nodes watching each other: a heartbeat in the index, and the outbox leases of a node that
stopped beating freed for the others to take.

Routing and Storage Commitment reports are leased from the outbox (:mod:`scp.routing`) for
:data:`~scp.routing.LEASE_SECONDS`. When the process holding a lease dies, its own host frees
the lease at its next start (:func:`scp.routing.free_dead_leases`, by process ID). In a
cluster the dead node's host may not come back: every node counts a heartbeat in the index
every :data:`HEARTBEAT_SECONDS`, and a node whose count has not moved for
:data:`DEAD_AFTER_SECONDS` by the watcher's own clock (no two hosts' clocks are compared)
is taken for dead. The first node that sees it frees its leases, in the same transaction
that forgets it, unless it beat meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from storage import NODE_HEARTBEAT_SECONDS, Archive, lease_owner

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = NODE_HEARTBEAT_SECONDS
"""How often a node counts its heartbeat (one short write transaction)."""
DEAD_AFTER_SECONDS = 20.0
"""How long a node's count may stand still before others free its leases: ten heartbeats,
so that a node slowed by a long index write or a busy machine is not taken for dead."""


class Heartbeat:
    """This process's heartbeat, and the watch over the others'."""

    def __init__(self, archive: Archive, name: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.archive = archive
        self.name = name or lease_owner()
        self.clock = clock
        self._seen: dict[str, tuple[int, float]] = {}  # node -> (its count, since when)
        self._last_tick: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="minipacs-heartbeat")
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()

    def join(self, deadline: float) -> None:
        """Wait for the thread until ``deadline`` (``time.monotonic()``), then take this
        node's heartbeat out of the index (a clean stop is not a death)."""
        if self._thread is None:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.archive.outbox.forget_node(self.name)
        except Exception:  # noqa: BLE001 - the others will take it for dead: no harm
            logger.warning("this node's heartbeat could not be removed from the index")
        finally:
            with contextlib.suppress(Exception):
                self.archive.release()

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the index is down: the next one tries
                logger.warning("heartbeat: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    self.archive.release()
            if self._stop.wait(HEARTBEAT_SECONDS):
                return

    def tick(self) -> None:
        """Beat once; free the leases of nodes whose count stood still too long."""
        beats = self.archive.outbox.beat(self.name)
        now = self.clock()
        if self._last_tick is not None and now - self._last_tick > 3 * HEARTBEAT_SECONDS:
            # this node was held up itself (its index busy or down): what it saw of the
            # others is stale, not their deaths
            self._seen = {node: (count, now) for node, (count, _) in self._seen.items()}
        self._last_tick = now
        for node in list(self._seen):
            if node not in beats:  # stopped cleanly, or freed by another node
                del self._seen[node]
        for node, count in beats.items():
            if node == self.name:
                continue
            seen = self._seen.get(node)
            if seen is None or seen[0] != count:
                self._seen[node] = (count, now)
                continue
            if now - seen[1] < DEAD_AFTER_SECONDS:
                continue
            del self._seen[node]
            freed = self.archive.outbox.free_leases_of(node, count)
            if freed is not None:
                logger.warning("node %s stopped beating %.0f s ago: %d outbox item(s) it"
                               " held are queued again", node, now - seen[1], freed)


__all__ = ["DEAD_AFTER_SECONDS", "HEARTBEAT_SECONDS", "Heartbeat"]
