"""Auto-routing's senders: one thread per destination peer of ``routes`` (``connections``
of them for a peer that says so, each with its own batches and association) works off that
peer's part of the outbox (:mod:`storage.outbox`), so that one dead destination never
holds back another.

A sender claims the items due for its peer (:data:`BATCH` at first; up to
:data:`MAX_BATCH` while a backlog lasts; leased for :data:`LEASE_SECONDS`), sends them over
one association as ``minipacs send`` does (stored files as stored when the peer accepts
their syntax, else converted; ``peers[].transfer_syntax``
honoured: :func:`scp.retrieve.run_send`), then deletes those the peer took and puts the
others off: ``routing.retry_seconds`` after the first failure, doubling up to
``routing.retry_max_seconds``, failed after ``routing.max_attempts`` (kept, shown by
``minipacs queue``, until retried or dropped). When the association cannot be opened the
sender also waits that long before it tries the peer again. An instance deleted since it
was queued is dropped from the outbox. Each batch is a log line, and an audit line per 100
instances. A batch keeps its lease while it goes (renewed every minute); a sender that stops
lets go of the items it had not tried. While a backlog lasts (a full claim), the next batch
is claimed on a helper thread while the current one goes; what a batch sent is recorded
before the next one starts, so a sender killed mid-batch sends at most that batch again.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from storage import Archive, OutboxEntry, StoredInstance, lease_owner

from . import metrics
from .audit import Audit
from .config import Config, PeerConfig, RoutingConfig
from .retrieve import Final, send_to

logger = logging.getLogger(__name__)

BATCH = 100
"""Items a sender claims at first, and again after a batch that was not full: what one
association sends while routing keeps up with the stores."""
MAX_BATCH = 2500
"""Items a sender claims at most: a backlog (full batches, each sent quickly) grows the
claim fourfold per batch up to this, so that its claim and ``sent`` transactions and its
association weigh little (bench/README.md, "Routing": a backlog of 10,000 small instances
went at 3,579 inst/s in batches of 100, at 5,515 in batches of 2,500; C-MOVE 4,834)."""
RENEW_SECONDS = 60.0
"""While a batch goes, its lease is renewed (to :data:`LEASE_SECONDS` from then) when this
long has passed since the last renewal: a batch slower than its claim foresaw (large
instances after small ones) keeps other senders off."""
AUDIT_INSTANCES = 100
"""SOP Instance UIDs per ``route`` audit line: a batch of 2,500 is 25 lines."""
GROW_SECONDS = 30.0
"""A full batch grows the next claim only if it was sent within this (a twentieth of
:data:`LEASE_SECONDS`), so large instances keep small claims, far inside their lease."""
LEASE_SECONDS = 600.0
"""How long a claim keeps other senders off a batch (a sender that dies keeps it that long,
unless a process of its host frees it first: :meth:`storage.outbox.Outbox.free_dead_leases`)."""
POLL_SECONDS = 1.0
"""How often an idle sender looks for items queued by other processes or now due."""
GATHER_SECONDS = 0.25
"""How long a sender woken by a store, or done with a batch smaller than :data:`BATCH`,
waits for more before it claims: during an ingest its batches (and associations, and
claim transactions, which hold the index's write lock) come at most 4 a second, not one
per instance."""
MAX_DOUBLINGS = 40
"""The retry delay doubles at most this many times (then ``retry_max_seconds`` holds it)."""


def delay(routing: RoutingConfig, attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: ``retry_seconds`` doubled per attempt after
    the first, at most ``retry_max_seconds``."""
    return min(routing.retry_max_seconds,
               routing.retry_seconds * 2 ** min(MAX_DOUBLINGS, max(0, attempts - 1)))


def next_size(size: int, claimed: int, seconds: float, reached: bool) -> int:
    """The next claim's size after a batch of ``claimed`` items (a claim of ``size``) sent
    in ``seconds``: four times larger, up to :data:`MAX_BATCH`, after a full batch sent
    within :data:`GROW_SECONDS` (a backlog); else :data:`BATCH` again."""
    if reached and claimed == size and seconds < GROW_SECONDS:
        return min(size * 4, MAX_BATCH)
    return BATCH


def free_dead_leases(archive: Archive) -> None:
    """Queue again what dead processes of this host left leased (routes and Storage
    Commitment reports); a failure is logged (their leases end by themselves)."""
    try:
        freed = archive.outbox.free_dead_leases(socket.gethostname())
    except Exception:  # noqa: BLE001
        logger.exception("the outbox leases of stopped processes could not be freed")
        return
    finally:
        with contextlib.suppress(Exception):
            archive.release()
    if freed:
        logger.info("%d outbox item(s) left by a stopped process are queued again", freed)


def put_off(archive: Archive, owner: str, routing: RoutingConfig,
            entries: list[OutboxEntry], error: str) -> None:
    """Put ``owner``'s ``entries`` off after an attempt that failed, as ``routing`` says
    (routes and Storage Commitment reports alike); a failure to do so is logged (their
    leases end by themselves)."""
    try:
        archive.outbox.put_off(entries, owner, error, lambda attempts: delay(routing, attempts),
                               routing.max_attempts)
    except Exception:  # noqa: BLE001
        logger.exception("%d outbox item(s) could not be put off", len(entries))


class Router:
    """The senders of one server process.

    Parameters
    ----------
    config : Config
        Its ``routes``, ``routing``, ``peers`` and ``ae``.
    archive : Archive
        Whose outbox it works off.
    audit : Audit
        Where each batch is recorded.
    """

    def __init__(self, config: Config, archive: Archive, audit: Audit) -> None:
        self.config = config
        self.archive = archive
        self.audit = audit
        self.owner = lease_owner()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        titles = dict.fromkeys(t.strip(" ") for route in config.routes for t in route.to)
        self.peers = [p for t in titles if (p := config.destination(t)) is not None]

    def start(self) -> None:
        """Start ``connections`` senders per peer (none without routes)."""
        for peer in self.peers:
            for number in range(peer.connections):
                suffix = f"-{number + 1}" if number else ""
                # each sender its own lease owner: one never settles a sibling's items
                owner = self.owner + suffix.replace("-", ":")
                thread = threading.Thread(target=self._run, args=(peer, owner), daemon=True,
                                          name=f"minipacs-route-{peer.ae_title}{suffix}")
                thread.start()
                self._threads.append(thread)

    def request_stop(self) -> None:
        """Stop after the instance being sent (what a batch did not try, and a batch
        claimed ahead, are let go: due again at once); see :meth:`join`."""
        self._stop.set()
        self.archive.outbox.notify()

    def join(self, deadline: float) -> None:
        """Wait for the senders until ``deadline`` (``time.monotonic()``)."""
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    def _run(self, peer: PeerConfig, owner: str) -> None:
        # during a backlog the next claim (with its instances' rows) is made on a helper
        # thread while this one sends: it waits for the peer's responses about half its
        # time (bench/README.md, "The backlog, like for like")
        with ThreadPoolExecutor(1, thread_name_prefix=f"{threading.current_thread().name}-index"
                                ) as helper:
            try:
                self._work(peer, helper, owner)
            finally:
                with contextlib.suppress(Exception):
                    self.archive.release()

    def _work(self, peer: PeerConfig, helper: ThreadPoolExecutor, owner: str) -> None:
        seen = 0
        unreachable = 0  # batches in a row whose association could not be opened
        size = BATCH
        last = 0.0  # how long the last batch took
        ahead: Future[Batch | None] | None = None  # the next batch, claimed during a send
        try:
            while not self._stop.is_set():
                if unreachable and self._stop.wait(delay(self.config.routing, unreachable)):
                    return
                batch: Batch | None = None
                try:
                    if ahead is not None:  # forgotten first: a failed claim is not kept
                        claimed, ahead = ahead, None
                        batch = claimed.result()
                    else:
                        batch = self._prepare(peer, size, owner)
                    if batch is None:
                        unreachable = 0
                        before, seen = seen, self.archive.outbox.wait(seen, POLL_SECONDS)
                        if seen != before:  # a store queued one: let the others come too
                            self._stop.wait(GATHER_SECONDS)
                        continue
                    if batch.full:  # a backlog: claim the next while this one goes, sized
                        # as the last batch's time says (this one's is not known yet)
                        ahead = helper.submit(self._prepare, peer,
                                              next_size(batch.size, batch.size, last, True),
                                              owner)
                    began = time.monotonic()
                    opened = self._send(peer, batch, helper, ahead)
                    last = time.monotonic() - began
                    unreachable = 0 if opened else unreachable + 1
                    size = next_size(batch.size, len(batch.entries), last, opened)
                    if not opened and ahead is not None:  # due again, as it was
                        self._let_go(ahead)
                        ahead = None
                    if not batch.full:  # caught up with the stores: gather again
                        self._stop.wait(GATHER_SECONDS)
                except Exception as exc:  # noqa: BLE001 - e.g. the index is down
                    logger.exception("routing to %s failed; trying again", peer.ae_title)
                    unreachable += 1
                    size = BATCH
                    if batch is not None:
                        self._put_off(batch.entries, owner, f"an unexpected error: {exc}")
                finally:
                    with contextlib.suppress(Exception):
                        self.archive.release()
        finally:
            if ahead is not None:  # claimed for a batch that will not go now
                self._let_go(ahead)

    @staticmethod
    def title(peer: PeerConfig) -> str:
        """The peer's name in the outbox (as :mod:`storage.outbox` rows have it)."""
        return peer.ae_title.strip(" ")

    def _put_off(self, entries: list[OutboxEntry], owner: str, error: str) -> None:
        put_off(self.archive, owner, self.config.routing, entries, error)

    def _let_go(self, ahead: Future[Batch | None]) -> None:
        """Release a batch claimed ahead that will not be sent now (a failed claim's
        leases end by themselves)."""
        with contextlib.suppress(Exception):
            batch = ahead.result()
            if batch is not None:
                self.archive.outbox.let_go(batch.entries, batch.owner)
        with contextlib.suppress(Exception):
            self.archive.release()

    def _prepare(self, peer: PeerConfig, size: int, owner: str) -> Batch | None:
        """Claim up to ``size`` items for ``peer``, with their instances' rows; those no
        longer stored are dropped from the outbox. ``None`` when none is due."""
        try:
            outbox = self.archive.outbox
            claimed = outbox.claim_instances(self.title(peer), owner, size, LEASE_SECONDS)
            if not claimed:
                return None
            batch = Batch([entry for entry, _ in claimed],
                          [item for _, item in claimed if item is not None], size, owner)
            if gone := [entry for entry, item in claimed if item is None]:
                logger.info("routing to %s: %d queued instance(s) no longer stored, dropped",
                            peer.ae_title, len(gone))
                try:
                    outbox.sent(gone, owner)
                except Exception:  # noqa: BLE001 - dropped at their next claim
                    logger.exception("routing to %s: the outbox could not be updated",
                                     peer.ae_title)
            return batch
        finally:
            with contextlib.suppress(Exception):
                self.archive.release()

    def _send(self, peer: PeerConfig, batch: Batch, helper: ThreadPoolExecutor,
              ahead: Future[Batch | None] | None) -> bool:
        """Send one claimed batch (its lease, and that of the batch claimed ``ahead``,
        renewed on ``helper``) and record what the peer took or refused; ``False`` when the
        association could not be opened."""
        items, outbox, owner = batch.items, self.archive.outbox, batch.owner
        if not items:
            return True
        renewed = time.monotonic()

        def keep_lease(done: int, total: int) -> None:  # a long batch keeps its leases
            nonlocal renewed
            if time.monotonic() - renewed > RENEW_SECONDS:
                renewed = time.monotonic()
                entries = list(batch.entries)
                if ahead is not None and ahead.done() and ahead.exception() is None:
                    next_batch = ahead.result()
                    entries += next_batch.entries if next_batch is not None else []
                helper.submit(self._released, outbox.renew, entries, owner, LEASE_SECONDS)

        final = send_to(self.config, self.archive, peer, items, keep_lease, service="routing",
                        cancelled=self._stop.is_set)
        unopened = final.failed == len(items) and not final.failed_uids
        self._record(peer, batch, final, unopened)  # before the next batch goes: after a
        return not unopened  # kill, at most the batch in flight goes twice

    def _released(self, work: Callable[..., object], *args: object) -> None:
        """``work(*args)`` on the helper thread, logged if it fails, its index connection
        given back."""
        try:
            work(*args)
        except Exception:  # noqa: BLE001 - leases end by themselves: sent again at worst
            logger.exception("routing: the outbox could not be updated")
        finally:
            with contextlib.suppress(Exception):
                self.archive.release()

    def _record(self, peer: PeerConfig, batch: Batch, final: Final, unopened: bool) -> None:
        """After a batch went: delete from the outbox what the peer took, put off what it
        did not, let go of what was not tried; count, log and audit it."""
        by_uid = {e.sop_instance_uid: e for e in batch.entries}
        items, outbox, owner = batch.items, self.archive.outbox, batch.owner
        failed = {i.sop_instance_uid for i in items} if unopened else set(final.failed_uids)
        # stopped early: the instances not tried are the last ``remaining``
        tried = items[:len(items) - (final.remaining or 0)]
        done = [by_uid[i.sop_instance_uid] for i in tried if i.sop_instance_uid not in failed]
        outbox.sent(done, owner)
        outbox.let_go([by_uid[i.sop_instance_uid] for i in items[len(tried):]], owner)
        reason = final.comment or "the peer did not take it (see the log)"
        self._put_off([by_uid[uid] for uid in failed - set(final.withheld)], owner, reason)
        for uid, why in final.withheld.items():  # it would be withheld again: failed now
            with contextlib.suppress(Exception):  # else its lease ends by itself
                outbox.put_off([by_uid[uid]], owner, f"withheld from a de-identified"
                               f" sending: {why}", lambda _: 0.0, 1)
        metrics.ROUTED.labels(peer.ae_title, "sent").inc(len(done))
        metrics.ROUTED.labels(peer.ae_title, "failed").inc(len(failed))
        routes = sorted({e.route for e in batch.entries})
        listed = sorted(i.sop_instance_uid for i in items)
        for start in range(0, len(listed), AUDIT_INSTANCES):  # lines of a readable size
            some = listed[start:start + AUDIT_INSTANCES]
            self.audit.record("route", user="routing", peer=peer.ae_title,
                              address=f"{peer.host}:{peer.port}", routes=routes,
                              status=f"{final.status:04X}", completed=final.completed,
                              warning=final.warning, failed=len(failed),
                              studies=sorted({by_uid[uid].study_instance_uid for uid in some}),
                              instances=some, profile=peer.deidentify or None,
                              withheld=sorted(set(some) & set(final.withheld)) or None)
        logger.info("routing to %s (%s): %d sent, %d failed%s", peer.ae_title,
                    ", ".join(routes), len(done), len(failed),
                    f" ({final.comment})" if final.comment else "")


@dataclass(frozen=True)
class Batch:
    """One claim of a sender: its outbox ``entries``, the ``items`` (instances) of those
    still stored, in the order they were queued, the ``size`` it asked for, and the lease
    ``owner`` (the sender's)."""

    entries: list[OutboxEntry]
    items: list[StoredInstance]
    size: int
    owner: str

    @property
    def full(self) -> bool:
        """It got as many as it asked for: a backlog may wait behind it."""
        return len(self.entries) == self.size


__all__ = ["BATCH", "LEASE_SECONDS", "MAX_BATCH", "POLL_SECONDS", "Router", "delay",
           "free_dead_leases", "next_size", "put_off"]
