"""Routing's outbox: the stored instances a route must still send to a peer, kept in the
index (DESIGN.md, "Routing and other background work").

A stored instance that matches a :class:`Route` gets one row per destination peer in the
transaction that indexes it (:mod:`storage.commit`), so that nothing acknowledged is ever
left unrouted, whatever is killed when. A sender (:mod:`scp.routing`) claims the rows due
for its peer under a lease (:meth:`Outbox.claim`), sends them, and deletes them once the
peer took them (:meth:`Outbox.sent`) or puts them off with a growing delay
(:meth:`Outbox.put_off`); after ``max_attempts`` an item is *failed*: kept and shown until
someone retries or drops it. A sender killed mid-batch leaves its rows leased: a process
of this host frees the leases of its dead processes when it starts
(:meth:`Outbox.free_dead_leases`), and any lease ends by itself after its time. The
promise is at-least-once: a batch that was sent but not yet marked sent goes again.

A route with ``stable_seconds`` holds a study's items until no instance of the study has
matched it for that long: each new one puts the study's waiting items off again.

The outbox also keeps the Storage Commitment requests whose report (N-EVENT-REPORT) is
still to be sent (kind :data:`COMMITMENT`, :meth:`Outbox.add_commitment`), claimed and put
off the same way; ``minipacs queue`` and the routing metrics show routes' items only.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee as pw
from pydicom.datadict import tag_for_keyword

from . import index
from .errors import StoreInUse
from .index import InstanceRecord, StoredInstance
from .keys import Level, level_of
from .models import Instance, NodeBeat, OutboxItem, database_proxy

HEARTBEAT_SECONDS = 2.0
"""How often a serving node counts its heartbeat in the index (scp/nodes.py)."""

ROUTE = "route"
COMMITMENT = "commitment"
"""The kinds of outbox item: an instance to route; a Storage Commitment report to send."""

CALLING_AE_TITLE = "CallingAETitle"
"""The match key that is not an attribute: the AE title the instance came from (empty for
STOW-RS)."""

COLUMN_OF: dict[str, str] = {
    "PatientID": "patient_id", "IssuerOfPatientID": "issuer_of_patient_id",
    "PatientName": "patient_name", "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex", "StudyInstanceUID": "study_instance_uid",
    "StudyDate": "study_date", "StudyTime": "study_time",
    "AccessionNumber": "accession_number", "StudyID": "study_id",
    "ReferringPhysicianName": "referring_physician_name",
    "StudyDescription": "study_description", "SeriesInstanceUID": "series_instance_uid",
    "Modality": "modality", "SeriesNumber": "series_number",
    "SeriesDescription": "series_description", "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid", "InstanceNumber": "instance_number",
}
"""The attributes an :class:`~storage.index.InstanceRecord` keeps as columns, not in its
levels' DICOM JSON (:func:`storage.parsed.parsed_from`)."""


def match_key_problem(keyword: str) -> str | None:
    """Why ``keyword`` cannot be a key of ``routes[].match``, or ``None``."""
    if keyword == CALLING_AE_TITLE or keyword in COLUMN_OF:
        return None
    if tag_for_keyword(keyword) is None:
        return f"{keyword!r} is not a DICOM keyword (nor {CALLING_AE_TITLE})"
    return None


@dataclass(frozen=True)
class Route:
    """One entry of ``routes``: every stored instance whose attributes match each pattern
    of ``match`` (``*`` and ``?`` wildcards, case-sensitive; a multi-valued attribute
    matches when one value does) is sent to each peer of ``to``."""

    name: str
    match: tuple[tuple[str, str], ...]
    to: tuple[str, ...]
    stable_seconds: float = 0.0

    def matches(self, values: Callable[[str], list[str]]) -> bool:
        """Does the instance whose values of a keyword ``values`` gives match?"""
        return all(any(fnmatch.fnmatchcase(v, pattern) for v in values(keyword) or [""])
                   for keyword, pattern in self.match)


@dataclass(frozen=True)
class Target:
    """Where one stored instance goes: a route and one of its peers."""

    route: str
    peer: str
    stable_seconds: float


def targets(routes: Sequence[Route], record: InstanceRecord,
            calling_ae_title: str) -> list[Target]:
    """Where ``record``'s instance, received from ``calling_ae_title``, must be sent: one
    :class:`Target` per peer (the first route to name a peer wins)."""
    if not routes:
        return []
    levels = {Level.PATIENT: record.patient, Level.STUDY: record.study,
              Level.SERIES: record.series, Level.IMAGE: record.instance}
    decoded: dict[Level, dict[str, Any]] = {}

    def values(keyword: str) -> list[str]:
        if keyword == CALLING_AE_TITLE:
            return [calling_ae_title.strip(" ")]
        tag = tag_for_keyword(keyword)
        if tag is None:
            return []
        row = levels[level_of(tag)]
        if keyword in COLUMN_OF:
            value = str(row.get(COLUMN_OF[keyword], ""))
            return value.split("\\") if value else []
        level = level_of(tag)
        if level not in decoded:
            decoded[level] = json.loads(row.get("attrs") or "{}")
        element = decoded[level].get(f"{int(tag):08X}", {})
        return [_text(v) for v in element.get("Value", [])]

    out: dict[str, Target] = {}
    for route in routes:
        if route.matches(values):
            for peer in route.to:
                out.setdefault(peer, Target(route.name, peer, route.stable_seconds))
    return list(out.values())


def _text(value: Any) -> str:
    """A DICOM JSON value as text (PS3.18 F.2.3: a PN's Alphabetic group)."""
    if isinstance(value, dict):
        return str(value.get("Alphabetic", ""))
    return str(value)


@dataclass(frozen=True)
class Entry:
    """One outbox row."""

    id: int
    peer: str
    route: str
    sop_instance_uid: str
    """The instance to route; for a commitment report, its Transaction UID."""
    study_instance_uid: str
    queued_at: datetime.datetime
    due_at: datetime.datetime
    attempts: int
    failed: bool
    last_error: str
    generation: int
    kind: str = ROUTE
    payload: str = ""


@dataclass(frozen=True)
class PeerQueue:
    """What the outbox holds for one peer."""

    peer: str
    waiting: int
    failed: int
    oldest: datetime.datetime | None


def enqueue(found: Iterable[Target], sop_instance_uid: str, study_instance_uid: str) -> int:
    """Queue a just-indexed instance for each of ``found``, in the caller's write
    transaction (:mod:`storage.commit`); an instance already queued for a peer is queued
    again from now (a new version of it was stored). Returns how many were queued.

    One statement for all of them (``INSERT ... ON CONFLICT DO UPDATE``, SQLite 3.24+ and
    PostgreSQL), in plain SQL: building peewee queries would cost more than running them,
    once per stored instance."""
    found = list(found)
    if not found:
        return 0
    now = _now()
    for target in found:
        if target.stable_seconds:  # the study is not stable yet: its waiting items wait
            due = now + datetime.timedelta(seconds=target.stable_seconds)
            OutboxItem.update(due_at=due).where(
                (OutboxItem.kind == ROUTE)
                & (OutboxItem.study_instance_uid == study_instance_uid)
                & (OutboxItem.route == target.route) & (OutboxItem.attempts == 0)
                & (OutboxItem.failed == False)  # noqa: E712 - peewee's SQL comparison
                & (OutboxItem.due_at < due)).execute()
    database = OutboxItem._meta.database
    mark = database.param
    values = []
    for target in found:
        due = now + datetime.timedelta(seconds=target.stable_seconds)
        values += [ROUTE, target.peer, target.route, sop_instance_uid, study_instance_uid,
                   OutboxItem.queued_at.db_value(now), OutboxItem.due_at.db_value(due)]
    row = f"({', '.join([mark] * 7)}, 0, {_FALSE[_dialect(database)]}, '', 0, '', NULL, '')"
    database.execute_sql(
        'INSERT INTO "outbox" ("kind", "peer", "route", "sop_instance_uid",'
        ' "study_instance_uid", "queued_at", "due_at", "attempts", "failed", "last_error",'
        ' "generation", "lease_owner", "lease_until", "payload") VALUES '
        + ", ".join([row] * len(found))
        + ' ON CONFLICT ("kind", "peer", "sop_instance_uid") DO UPDATE SET'
        ' "route" = excluded."route", "due_at" = excluded."due_at", "attempts" = 0,'
        f' "failed" = {_FALSE[_dialect(database)]}, "last_error" = \'\','
        ' "generation" = "outbox"."generation" + 1, "queued_at" = excluded."queued_at",'
        ' "study_instance_uid" = excluded."study_instance_uid"', values)
    return len(found)


_FALSE = {"sqlite": "0", "postgresql": "FALSE"}


def _dialect(database: Any) -> str:
    return "sqlite" if isinstance(database, pw.SqliteDatabase) else "postgresql"


class Outbox:
    """The outbox of one archive, for its senders and for ``minipacs queue``.

    Parameters
    ----------
    write_lock : threading.Lock
        The archive's lock around index writes.
    """

    def __init__(self, write_lock: threading.Lock) -> None:
        self.write_lock = write_lock
        self._changed = {ROUTE: threading.Condition(), COMMITMENT: threading.Condition()}
        self._version = {ROUTE: 0, COMMITMENT: 0}

    # -- in-process wake-ups ----------------------------------------------------------

    def notify(self, kind: str = ROUTE) -> None:
        """Something of ``kind`` was queued in this process: wake its senders."""
        with self._changed[kind]:
            self._version[kind] += 1
            self._changed[kind].notify_all()

    def wait(self, seen: int, timeout: float, kind: str = ROUTE) -> int:
        """Wait until something of ``kind`` is queued after ``seen`` (a value this returned
        before; 0 the first time) or ``timeout`` s pass; return the new value."""
        with self._changed[kind]:
            if self._version[kind] == seen:
                self._changed[kind].wait(timeout)
            return self._version[kind]

    # -- senders ----------------------------------------------------------------------

    def claim(self, peer: str | None, owner: str, limit: int, lease_seconds: float,
              kind: str = ROUTE, exclude: Sequence[str] = ()) -> list[Entry]:
        """Lease up to ``limit`` items of ``kind`` due for ``peer`` (``None``: any but
        those of ``exclude``) to ``owner``, oldest due first; nothing is written when none
        is due."""
        return [entry for entry, _ in self._claim(kind, peer, exclude, owner, limit,
                                                  lease_seconds)]

    def claim_instances(self, peer: str, owner: str, limit: int, lease_seconds: float
                        ) -> list[tuple[Entry, StoredInstance | None]]:
        """:meth:`claim` routes' items for ``peer``, each with what a retrieve needs of its
        instance, read in the same statement (``None``: no longer stored)."""
        return self._claim(ROUTE, peer, (), owner, limit, lease_seconds, INSTANCE_COLUMNS)

    def _claim(self, kind: str, peer: str | None, exclude: Sequence[str], owner: str,
               limit: int, lease_seconds: float, instance_columns: Sequence[Any] = (),
               ) -> list[tuple[Entry, StoredInstance | None]]:
        now = _now()
        due = ((OutboxItem.kind == kind) & (OutboxItem.failed == False)  # noqa: E712
               & (OutboxItem.due_at <= now)
               & (OutboxItem.lease_until.is_null() | (OutboxItem.lease_until < now)))
        if peer is not None:
            due &= OutboxItem.peer == peer
        if exclude:
            due &= OutboxItem.peer.not_in(list(exclude))
        if not OutboxItem.select(OutboxItem.id).where(due).limit(1).exists():
            return []  # no write transaction when nothing is due
        with self.write_lock, index.write_transaction():
            def chosen(*columns: Any) -> Any:
                return (OutboxItem.select(*columns).where(due)
                        .order_by(OutboxItem.due_at, OutboxItem.id).limit(limit))
            query = chosen(*ENTRY_COLUMNS, *instance_columns)
            if instance_columns:
                query = query.join(Instance, pw.JOIN.LEFT_OUTER, on=(
                    Instance.sop_instance_uid == OutboxItem.sop_instance_uid))
            width = len(ENTRY_COLUMNS)
            # the driver's rows as they are, converted here: a backlog claims thousands,
            # and peewee's conversion (its datetime parsing above all) took most of the time
            claimed = [(_entry_of(row[:width]), _instance_of(row[width:])
                        if instance_columns and row[width] is not None else None)
                       for row in database_proxy.execute(query).fetchall()]
            # the same rows (nothing else writes in this transaction), leased by one
            # statement: no list of thousands of IDs to build and bind
            OutboxItem.update(
                lease_owner=owner, lease_until=now + datetime.timedelta(seconds=lease_seconds)
            ).where(OutboxItem.id.in_(chosen(OutboxItem.id))).execute()
        return claimed

    def sent(self, entries: Iterable[Entry], owner: str) -> None:
        """``entries`` went (or need not go any more): delete them, unless stored again
        since they were claimed (then they are only let go, to go again)."""
        by_generation: dict[int, list[int]] = {}
        for e in entries:  # a batch was claimed together: mostly one group
            by_generation.setdefault(e.generation, []).append(e.id)
        if not by_generation:
            return
        with self.write_lock, index.write_transaction():
            for generation, ids in by_generation.items():
                for chunk in _chunks(ids):
                    held = OutboxItem.id.in_(chunk) & (OutboxItem.lease_owner == owner)
                    deleted = OutboxItem.delete().where(
                        held & (OutboxItem.generation == generation)).execute()
                    if deleted < len(chunk):  # what is still ours was stored again
                        OutboxItem.update(lease_owner="", lease_until=None).where(
                            held).execute()

    def renew(self, entries: Iterable[Entry], owner: str, lease_seconds: float) -> None:
        """Extend the lease of ``entries`` still leased to ``owner`` to ``lease_seconds``
        from now (a batch that takes long)."""
        until = _now() + datetime.timedelta(seconds=lease_seconds)
        ids = [e.id for e in entries]
        if not ids:
            return
        with self.write_lock, index.write_transaction():
            for chunk in _chunks(ids):
                OutboxItem.update(lease_until=until).where(
                    OutboxItem.id.in_(chunk) & (OutboxItem.lease_owner == owner)).execute()

    def let_go(self, entries: Iterable[Entry], owner: str) -> None:
        """Release the leases ``owner`` holds on ``entries``, unsent and unchanged: they are
        due again at once (a sender that stopped before trying them)."""
        entries = list(entries)
        if not entries:
            return
        with self.write_lock, index.write_transaction():
            same, moved = _still_held(entries, owner)
            _let_go([*same, *moved])

    def put_off(self, entries: Iterable[Entry], owner: str, error: str,
                delay: Callable[[int], float], max_attempts: int) -> None:
        """``entries`` could not go: count the attempt, keep ``error``, and make each due
        again after ``delay(attempts)`` seconds, or failed after ``max_attempts``."""
        entries = list(entries)
        if not entries:
            return
        now = _now()
        with self.write_lock, index.write_transaction():
            same, moved = _still_held(entries, owner)
            by_attempts: dict[int, list[int]] = {}
            for e in same:  # a batch was claimed together: mostly one group
                by_attempts.setdefault(e.attempts + 1, []).append(e.id)
            for attempts, ids in by_attempts.items():
                for chunk in _chunks(ids):
                    OutboxItem.update(
                        attempts=attempts, failed=attempts >= max_attempts,
                        last_error=error[:1000], lease_owner="", lease_until=None,
                        due_at=now + datetime.timedelta(seconds=delay(attempts)),
                    ).where(OutboxItem.id.in_(chunk)).execute()
            _let_go(moved)  # stored again meanwhile: the new version is due as queued

    def add_commitment(self, peer: str, transaction_uid: str,
                       references: Sequence[tuple[str, str]]) -> None:
        """Record a Storage Commitment request of ``peer`` (its Transaction UID and the
        SOP Class and Instance UIDs it names), to be reported on; a request with the
        Transaction UID of one not yet reported replaces it.

        Raises
        ------
        peewee.DatabaseError
            It could not be recorded (the request must then be refused).
        """
        now = _now()
        payload = json.dumps([list(r) for r in references])
        with self.write_lock, index.write_transaction():
            OutboxItem.delete().where(
                (OutboxItem.kind == COMMITMENT) & (OutboxItem.peer == peer)
                & (OutboxItem.sop_instance_uid == transaction_uid)).execute()
            OutboxItem.insert(kind=COMMITMENT, peer=peer, route="storage-commitment",
                              sop_instance_uid=transaction_uid, study_instance_uid="",
                              queued_at=now, due_at=now, payload=payload).execute()
        self.notify(COMMITMENT)

    def free_dead_leases(self, host: str) -> int:
        """Free the leases of this host's processes that are gone (owners written by
        :func:`lease_owner`); returns how many items were freed."""
        owners = [row.lease_owner for row in OutboxItem.select(OutboxItem.lease_owner)
                  .where(OutboxItem.lease_owner != "").distinct()]
        dead = [owner for owner in owners
                if owner.startswith(f"{host}:") and not _alive(owner, host)]
        if not dead:
            return 0
        with self.write_lock, index.write_transaction():
            return int(OutboxItem.update(lease_owner="", lease_until=None)
                       .where(OutboxItem.lease_owner.in_(dead)).execute())

    # -- nodes' heartbeats (scp/nodes.py) ----------------------------------------------

    def beat(self, name: str) -> dict[str, int]:
        """Count one heartbeat of the node ``name``; every node's count."""
        with self.write_lock, index.write_transaction():
            NodeBeat.insert(name=name, beats=1).on_conflict(
                conflict_target=[NodeBeat.name],
                update={NodeBeat.beats: NodeBeat.beats + 1}).execute()
        return {str(row.name): int(row.beats)
                for row in NodeBeat.select(NodeBeat.name, NodeBeat.beats)}

    def free_leases_of(self, name: str, beats: int) -> int | None:
        """The node ``name`` was seen at ``beats`` for too long: forget it and free what it
        leased (its senders' owners are ``name`` and ``name:N``), in one transaction.
        ``None`` when it has beaten since (alive after all: nothing is freed)."""
        with self.write_lock, index.write_transaction():
            if not NodeBeat.delete().where((NodeBeat.name == name)
                                           & (NodeBeat.beats == beats)).execute():
                return None
            return int(OutboxItem.update(lease_owner="", lease_until=None)
                       .where(_held_by(name)).execute())

    def forget_node(self, name: str) -> None:
        """The node ``name`` stops (cleanly): its heartbeat row goes, and what it still
        holds is let go (a sender that did not finish in time)."""
        with self.write_lock, index.write_transaction():
            NodeBeat.delete().where(NodeBeat.name == name).execute()
            OutboxItem.update(lease_owner="", lease_until=None).where(_held_by(name)).execute()

    def refuse_if_nodes_beat(self, wait: float = HEARTBEAT_SECONDS * 2.5) -> None:
        """Raise :class:`~storage.errors.StoreInUse` if a node's heartbeat moves within
        ``wait`` seconds (a serving node: a whole ``reindex`` must not run). The serving
        lock of :func:`storage.index.hold_alone` says so at once, but it is lost when the
        database restarts; the heartbeats come back with the nodes' connections."""
        before = {str(r.name): int(r.beats) for r in NodeBeat.select()}
        if not before:
            return
        time.sleep(wait)  # two heartbeats and a half: a serving node has beaten
        after = {str(r.name): int(r.beats) for r in NodeBeat.select()}
        beating = sorted(n for n, beats in after.items() if before.get(n) != beats)
        if beating:
            raise StoreInUse(f"servers are using this index ({', '.join(beating)}): stop"
                             " every node first")

    # -- ``minipacs queue`` ------------------------------------------------------------

    def summary(self, kind: str = ROUTE) -> list[PeerQueue]:
        """Per peer: the items of ``kind`` waiting (due or not), those failed, the oldest
        queued."""
        failed = pw.fn.SUM(pw.Case(None, [(OutboxItem.failed == True, 1)], 0))  # noqa: E712
        query: Any = (OutboxItem.select(OutboxItem.peer, pw.fn.COUNT(OutboxItem.id), failed,
                                        pw.fn.MIN(OutboxItem.queued_at))
                      .group_by(OutboxItem.peer).order_by(OutboxItem.peer).tuples())
        rows: list[tuple[Any, ...]] = list(query.where(OutboxItem.kind == kind))
        out = []
        for peer, count, failed_count, oldest in rows:
            if isinstance(oldest, str):  # SQLite's MIN() gives the stored text
                oldest = OutboxItem.queued_at.python_value(oldest)
            out.append(PeerQueue(peer, int(count) - int(failed_count or 0),
                                 int(failed_count or 0), oldest))
        return out

    def entries(self, peer: str | None = None, failed: bool | None = None,
                limit: int = 1000, kind: str = ROUTE) -> list[Entry]:
        """Outbox rows of ``kind``, oldest queued first."""
        query = OutboxItem.select(*ENTRY_COLUMNS).where(OutboxItem.kind == kind)
        if peer is not None:
            query = query.where(OutboxItem.peer == peer)
        if failed is not None:
            query = query.where(OutboxItem.failed == failed)
        rows: Any = query.order_by(OutboxItem.queued_at, OutboxItem.id).limit(limit).tuples()
        return [_entry_of(row) for row in rows]

    def retry(self, peer: str | None = None, ids: Sequence[int] = (),
              failed_only: bool = True, kind: str = ROUTE) -> int:
        """Make items due now with their attempts counted from zero: the failed ones (or
        all, ``failed_only=False``) of ``peer``, or those of ``ids``. Returns how many."""
        with self.write_lock, index.write_transaction():
            return int(OutboxItem.update(attempts=0, failed=False, due_at=_now())
                       .where(_chosen(peer, ids, failed_only, kind)).execute())

    def drop(self, peer: str | None = None, ids: Sequence[int] = (),
             failed_only: bool = True, kind: str = ROUTE) -> int:
        """Delete items without sending them (chosen as :meth:`retry` chooses)."""
        with self.write_lock, index.write_transaction():
            return int(OutboxItem.delete().where(
                _chosen(peer, ids, failed_only, kind)).execute())


CHUNK = 500
"""Row IDs per ``IN (...)`` list: well under SQLite's and PostgreSQL's parameter limits."""


def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    for start in range(0, len(ids), CHUNK):
        yield list(ids[start:start + CHUNK])


def _still_held(entries: Sequence[Entry], owner: str) -> tuple[list[Entry], list[Entry]]:
    """Of ``entries``, in the caller's write transaction: those still leased to ``owner``
    as claimed, and those leased to it but stored again since (a new generation). Rows
    gone, or leased to another owner since (an expired lease), are neither.

    Reading first and then writing by ID is safe because every writer of the outbox holds
    the index's write transaction (SQLite's ``BEGIN IMMEDIATE``, PostgreSQL's advisory
    lock: :func:`storage.index.write_transaction`): nothing changes between the two."""
    held: dict[int, int] = {}
    for chunk in _chunks([e.id for e in entries]):
        rows: Any = (OutboxItem.select(OutboxItem.id, OutboxItem.generation)
                     .where(OutboxItem.id.in_(chunk) & (OutboxItem.lease_owner == owner))
                     .tuples())
        held.update((int(i), int(g)) for i, g in rows)
    same = [e for e in entries if held.get(e.id) == e.generation]
    moved = [e for e in entries if e.id in held and held[e.id] != e.generation]
    return same, moved


def _let_go(entries: Sequence[Entry]) -> None:
    """Release the lease of ``entries`` (they go again as they are now queued)."""
    for chunk in _chunks([e.id for e in entries]):
        OutboxItem.update(lease_owner="", lease_until=None).where(
            OutboxItem.id.in_(chunk)).execute()


def _chosen(peer: str | None, ids: Sequence[int], failed_only: bool, kind: str) -> Any:
    where: Any = OutboxItem.kind == kind
    if ids:
        where &= OutboxItem.id.in_(list(ids))
    if peer is not None:
        where &= OutboxItem.peer == peer
    if failed_only:
        where &= OutboxItem.failed == True  # noqa: E712
    return where


def _held_by(node: str) -> Any:
    """The items leased to the node ``node``: by its own name, or a sender's ``node:N``."""
    return (OutboxItem.lease_owner == node) | OutboxItem.lease_owner.startswith(f"{node}:")


def lease_owner() -> str:
    """This process's name on the leases it takes: host, process ID and a random tag (a
    new process with the ID of a dead one is not taken for it)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_TAG}"


_TAG = os.urandom(4).hex()


def _alive(owner: str, host: str) -> bool:
    """Is the process of this host that ``owner`` names still running?"""
    try:
        pid_text, tag = owner[len(host) + 1:].split(":", 1)
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():  # a sender of this process may add ":N" (peers[].connections)
        return tag.split(":", 1)[0] == _TAG
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


ENTRY_COLUMNS = (OutboxItem.id, OutboxItem.peer, OutboxItem.route, OutboxItem.sop_instance_uid,
                 OutboxItem.study_instance_uid, OutboxItem.queued_at, OutboxItem.due_at,
                 OutboxItem.attempts, OutboxItem.failed, OutboxItem.last_error,
                 OutboxItem.generation, OutboxItem.kind, OutboxItem.payload)
"""An :class:`Entry`'s columns, in its order."""


INSTANCE_COLUMNS = (Instance.sop_class_uid, Instance.sop_instance_uid,
                    Instance.transfer_syntax_uid, Instance.file_key, Instance.file_size)
"""A :class:`storage.index.StoredInstance`'s columns, in its order."""


def _entry_of(row: Sequence[Any]) -> Entry:
    """The :class:`Entry` of a row of :data:`ENTRY_COLUMNS` (as ``.tuples()`` gives it, or
    the database driver: SQLite gives datetimes as text, booleans as integers)."""
    (id_, peer, route, uid, study, queued_at, due_at, attempts, failed, last_error,
     generation, kind, payload) = row
    return Entry(int(id_), peer, route, uid, study, _when(queued_at), _when(due_at),
                 int(attempts), bool(failed), last_error, int(generation), kind, payload)


def _instance_of(row: Sequence[Any]) -> StoredInstance:
    """The :class:`storage.index.StoredInstance` of a row of :data:`INSTANCE_COLUMNS`."""
    sop_class_uid, sop_instance_uid, transfer_syntax_uid, file_key, file_size = row
    return StoredInstance(sop_class_uid, sop_instance_uid, transfer_syntax_uid, file_key,
                          int(file_size))


def _when(value: Any) -> datetime.datetime:
    """A datetime column's value: as it is, or parsed from SQLite's text."""
    if isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(str(value))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


__all__ = ["CALLING_AE_TITLE", "COMMITMENT", "ROUTE", "Entry", "Outbox", "PeerQueue", "Route",
           "Target", "enqueue", "lease_owner", "match_key_problem", "targets"]
