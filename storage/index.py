"""Writes and lookups on the index: one transaction per stored instance, exact counters.

:func:`write_instance` upserts patient, study and series, inserts (or replaces) the instance
and changes every counter in the same transaction, so a reader sees either all of an
instance or none of it. Writers are serialised by the caller's lock and, on SQLite, by a
``BEGIN IMMEDIATE`` transaction (no lost update between two processes either).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import sqlite3
import urllib.parse
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import peewee as pw
from playhouse.db_url import connect as db_url_connect
from playhouse.db_url import parse as db_url_parse
from playhouse.pool import PooledPostgresqlDatabase

from .errors import DuplicateRejected, StorageError, StoreInUse
from .keys import Level
from .models import (
    MODELS,
    SCHEMA_VERSION,
    TEXT_INDEXES,
    Instance,
    Patient,
    PseudonymUid,
    SchemaVersion,
    Series,
    Study,
)
from .models import database_proxy as db
from .values import pn_groups

logger = logging.getLogger(__name__)


class DuplicatePolicy(enum.Enum):
    """What to do with a different instance under an already stored SOP Instance UID."""

    REPLACE = "replace"
    KEEP = "keep"
    REJECT = "reject"


class WriteResult(enum.Enum):
    STORED = "stored"
    REPLACED = "replaced"
    IDENTICAL = "identical"
    KEPT = "kept"


@dataclass
class InstanceRecord:
    """What the archive extracted from one header: column values and DICOM JSON per level."""

    patient: dict[str, Any]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]


@dataclass
class WriteOutcome:
    result: WriteResult
    old_file_key: str | None = None
    warnings: list[str] = field(default_factory=list)


_open_url: str | None = None

BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock (another thread's or process's)."""
POOL_SIZE = 64
"""Most connections to the SQLite index open at once (every association and HTTP worker
thread that reads or writes holds one until it gives it back)."""
PG_POOL_SIZE = 32
"""Most connections one process holds to a PostgreSQL index at once (each thread that
reads or writes holds one while it works): PostgreSQL's ``max_connections`` must exceed
nodes x 32, plus whatever else connects."""
POOL_WAIT_SECONDS = 30
"""How long a thread waits for a connection when POOL_SIZE are in use."""
POOL_STALE_SECONDS = 300
"""A connection left unused this long is closed when next taken."""


def connect(url: str, synchronous_full: bool = True) -> pw.Database:
    """Open the index at ``url`` (``sqlite:///path`` or ``postgresql://...``) and create the
    schema when it is new.

    SQLite gets WAL mode, foreign keys, a 30 s busy timeout, and ``synchronous=FULL`` when
    durability is full, so that a committed instance survives a power loss. The models are
    bound to one database per process: a second index cannot be opened until
    :func:`disconnect`.

    Raises
    ------
    StorageError
        When another index is open in this process, or this one cannot be opened.
    """
    global _open_url
    if _open_url is not None:
        raise StorageError(f"an index is already open in this process: {_open_url}")
    try:
        database = _open(url, synchronous_full)
    except (pw.DatabaseError, OSError) as exc:
        raise StorageError(f"cannot open the index {url}: {exc}") from exc
    _open_url = url
    return database


def disconnect() -> None:
    """Forget the open index, so that another may be opened."""
    global _open_url
    _open_url = None


def _open(url: str, synchronous_full: bool) -> pw.Database:
    if url.startswith("sqlite"):
        # a pool (peewee's PooledSqliteDatabase): a thread gives its connection back after
        # each association or HTTP request (Archive.release) and the next one takes it as
        # it is, instead of opening one (2.6 ms of a one-instance STOW-RS request) and
        # having the last one closed checkpoint and delete the WAL
        database = db_url_connect(
            "sqlite+pool" + url[len("sqlite"):],
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": 2 if synchronous_full else 1,
                "cache_size": -32000,
                "busy_timeout": BUSY_TIMEOUT_MS,
            },
            max_connections=POOL_SIZE,
            stale_timeout=POOL_STALE_SECONDS,
            timeout=POOL_WAIT_SECONDS,
            check_same_thread=False,  # a pooled connection serves one thread at a time
        )
    elif urllib.parse.urlsplit(url).scheme in ("postgres", "postgresql"):
        database = ReconnectingPostgresqlDatabase(
            **db_url_parse(url), max_connections=PG_POOL_SIZE,
            stale_timeout=POOL_STALE_SECONDS, timeout=POOL_WAIT_SECONDS)
    else:
        database = db_url_connect(url)
    db.initialize(database)
    with database.connection_context():
        if isinstance(database, pw.SqliteDatabase):
            _schema(database)
        else:  # several nodes starting at once on an empty database: one makes the schema
            with database.atomic():
                database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                _schema(database)
    return database


class ReconnectingPostgresqlDatabase(PooledPostgresqlDatabase):
    """PostgreSQL through a pool of connections (:data:`PG_POOL_SIZE` per process), each
    opened again when the server closed it (a restart, a failover, a cut).

    The pool: a thread gives its connection back after each association or HTTP request
    (:meth:`storage.Archive.release`) and the next one takes it as it is. Opening one per
    request cost a QIDO-RS search 6-7 ms of its 9.6 at 10M instances (bench/README.md,
    "Scale on PostgreSQL"). Reconnecting: outside a transaction, a statement that finds its
    connection lost (psycopg2's messages, :data:`LOST`) is tried once more on a new one, and
    the pool's idle connections, lost with it, are dropped; inside a transaction the
    transaction fails as it would have, and its stores answer A700. Without it a thread's
    broken connection (the group commit's lives as long as the process) failed every later
    statement.
    """

    LOST = ("server closed the connection", "terminating connection", "connection not open",
            "could not receive data from server", "ssl connection has been closed",
            "connection already closed")

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        return self._again(super().execute_sql, sql, params)

    def begin(self, *args: Any, **kwargs: Any) -> Any:
        return self._again(super().begin, *args, **kwargs)

    def _again(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except (pw.OperationalError, pw.InterfaceError) as exc:
            if self.in_transaction() or not any(m in str(exc).lower() for m in self.LOST):
                raise
            logger.info("the connection to PostgreSQL was lost (%s): opening another",
                        str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            self.manual_close()  # not back into the pool
            self.close_idle()  # they went with it
            self.connect()
            return call(*args, **kwargs)


def _schema(database: pw.Database) -> None:
    """Migrate, create what is missing, and check the schema's version."""
    _migrate(database)
    database.create_tables(MODELS, safe=True)
    text_indexes(database)
    row = SchemaVersion.select().first()
    if row is None:
        SchemaVersion.create(version=SCHEMA_VERSION)
    elif row.version != SCHEMA_VERSION:
        raise StorageError(
            f"index schema version {row.version} is not the supported {SCHEMA_VERSION}")


def _migrate(database: pw.Database) -> None:
    """Bring an index an earlier minipacs wrote up to :data:`SCHEMA_VERSION`, in one write
    transaction (a second process opening it meanwhile waits, then finds it done)."""
    if not database.table_exists(SchemaVersion._meta.table_name):
        return  # a new index: create_tables makes the current schema
    row = SchemaVersion.select().first()
    if row is None or row.version >= SCHEMA_VERSION:
        return  # current (a newer one is refused by the caller): no write lock taken
    with write_transaction():
        if not isinstance(database, pw.SqliteDatabase):  # SQLite: BEGIN IMMEDIATE did it
            database.execute_sql('LOCK TABLE "schema_version" IN EXCLUSIVE MODE')
        row = SchemaVersion.select().first()  # again: another process may have done it
        if row is None or row.version >= SCHEMA_VERSION:
            return
        for version in range(row.version, SCHEMA_VERSION):
            logger.info("index schema: migrating version %d to %d", version, version + 1)
            try:
                _MIGRATIONS[version](database)
            except pw.DatabaseError as exc:
                raise StorageError(f"index schema: migrating version {version} to "
                                   f"{version + 1} failed, nothing was changed: {exc}") from exc
        SchemaVersion.update(version=SCHEMA_VERSION).execute()


def _patient_name_groups(database: pw.Database) -> None:
    """1 to 2: PatientName folded per component group, each group indexed (an index serves
    a wildcard with a literal start), replacing the framed ``patient_name_folded``.

    Plain ``ALTER TABLE`` only: a migrator that rebuilds the table (as peewee's does to
    add a NOT NULL column on SQLite) drops it, and the foreign keys' ON DELETE CASCADE
    then empties the study, series and instance tables.
    """
    # schema 2's names, written out: a migration must not follow later renames
    groups = ("patient_name_alphabetic_folded", "patient_name_ideographic_folded",
              "patient_name_phonetic_folded")
    if isinstance(database, pw.SqliteDatabase) and sqlite3.sqlite_version_info < (3, 35):
        raise StorageError(
            "index schema: migrating version 1 to 2 needs SQLite 3.35 or later (ALTER TABLE "
            f"DROP COLUMN); this Python has {sqlite3.sqlite_version}: nothing was changed")
    database.execute_sql('DROP INDEX "patient_patient_name_folded"')
    database.execute_sql('ALTER TABLE "patient" DROP COLUMN "patient_name_folded"')
    for name in groups:
        database.execute_sql(
            f'ALTER TABLE "patient" ADD COLUMN "{name}" TEXT NOT NULL DEFAULT \'\'')
    rows = database.execute_sql('SELECT "id", "patient_name" FROM "patient"').fetchall()
    mark = database.param
    update = f"UPDATE patient SET {', '.join(f'{n} = {mark}' for n in groups)} WHERE id = {mark}"
    for patient_id, name in rows:
        database.execute_sql(update, (*pn_groups(name, folded=True), patient_id))
    # the indexes: create_tables makes them after the migration


def _pending_removals(database: pw.Database) -> None:
    """2 to 3: nothing to change in the existing tables; ``create_tables`` then adds
    ``pending_removal``. The version moves on so that an older minipacs, which does not
    know that table, refuses the index instead of indexing a deleted instance's file again."""


def _outbox(database: pw.Database) -> None:
    """3 to 4: ``create_tables`` adds ``outbox`` (routing); an older minipacs, which would
    not send what it holds, refuses the index."""


def _pattern_indexes(database: pw.Database) -> None:
    """4 to 5: on PostgreSQL, the plain indexes of the wildcard-matched text columns are
    dropped (:func:`text_indexes` then makes byte-ordered ones); ``series_study_id`` is
    dropped on both backends."""
    # schema 4's index names, written out: a migration must not follow later renames
    database.execute_sql('DROP INDEX IF EXISTS "series_study_id"')
    if not isinstance(database, pw.SqliteDatabase):
        for name in ("patient_patient_id", "patient_patient_name_alphabetic_folded",
                     "patient_patient_name_ideographic_folded",
                     "patient_patient_name_phonetic_folded", "study_accession_number"):
            database.execute_sql(f'DROP INDEX IF EXISTS "{name}"')


def _pseudonym_uids(database: pw.Database) -> None:
    """5 to 6: ``create_tables`` adds ``pseudonym_uid`` (DICOMweb for de-identified
    accounts); an older minipacs would not know where a replaced UID came from."""


_MIGRATIONS = {1: _patient_name_groups, 2: _pending_removals, 3: _outbox, 4: _pattern_indexes,
               5: _pseudonym_uids}


def text_indexes(database: pw.Database) -> None:
    """Index each column of :data:`storage.models.TEXT_INDEXES`, if not yet done.

    A wildcard with a literal start (``DOE*``) is a range of an index only if the index
    orders bytes as the pattern does: SQLite's GLOB uses a plain (BINARY) index; PostgreSQL's
    ``LIKE 'doe%'`` uses none made under a database collation such as ``C.UTF-8`` or
    ``en_US.UTF-8`` (the PostgreSQL manual, "Operator Classes and Operator Families"), so there
    the index is ``text_pattern_ops``, which also serves equality. Without it a PatientName
    wildcard read every patient row (bench/README.md, "Scale on PostgreSQL").
    """
    sqlite = isinstance(database, pw.SqliteDatabase)
    for table, column in TEXT_INDEXES:
        if sqlite:
            database.execute_sql(
                f'CREATE INDEX IF NOT EXISTS "{table}_{column}" ON "{table}" ("{column}")')
        else:
            database.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_{column}_pattern" '
                                 f'ON "{table}" ("{column}" text_pattern_ops)')


def close() -> None:
    """Close this thread's connection to the index, if any."""
    if db.obj is not None and not db.is_closed():
        db.close()


WRITE_LOCK_KEY = 0x6D696E69
"""PostgreSQL's transaction-level advisory lock every index write takes first ("mini")."""
SCHEMA_LOCK_KEY = WRITE_LOCK_KEY + 1
"""The one a process takes while it creates or migrates the schema on PostgreSQL (CREATE
TABLE IF NOT EXISTS is not safe against another process doing the same at once)."""


@contextlib.contextmanager
def write_transaction() -> Iterator[Any]:
    """A write transaction that keeps every other writer out until it ends, in this process
    and in others (a server and ``minipacs delete``): SQLite's ``BEGIN IMMEDIATE``, or on
    PostgreSQL an advisory lock taken as its first statement (a delete's recount and a
    store into the same study would otherwise interleave, and table locks taken in
    different orders deadlock). Yields peewee's transaction (``.rollback()`` undoes what
    was done in it)."""
    database = db.obj
    if isinstance(database, pw.SqliteDatabase):
        with database.atomic("IMMEDIATE") as txn:
            yield txn
    else:
        with database.atomic() as txn:
            database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            yield txn


SERVING_LOCK_KEY = WRITE_LOCK_KEY + 2
"""On PostgreSQL, the advisory lock every server holds shared for as long as it serves, and
``reindex`` must take alone: emptying the index under serving nodes would lose what they
store meanwhile. (On SQLite the file store's lock does this, on one machine.)"""


def hold_serving(database: pw.Database) -> Any | None:
    """Hold :data:`SERVING_LOCK_KEY` shared on a connection of its own (returned: close it
    to let go; ``None`` on SQLite)."""
    connection = _own_connection(database)
    if connection is not None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock_shared(%s)", (SERVING_LOCK_KEY,))
    return connection


def hold_alone(database: pw.Database) -> Any | None:
    """Hold :data:`SERVING_LOCK_KEY` alone on a connection of its own (``None`` on SQLite).

    Raises
    ------
    StoreInUse
        A server of this index is running (on any node).
    """
    connection = _own_connection(database)
    if connection is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (SERVING_LOCK_KEY,))
        alone = bool(cursor.fetchone()[0])
    if not alone:
        connection.close()
        raise StoreInUse("servers are using this index (on this node or another): stop"
                         " every node first")
    return connection


def _own_connection(database: pw.Database) -> Any | None:
    """A PostgreSQL connection outside peewee's pool, for a lock held for a long time
    (``None`` on SQLite)."""
    if isinstance(database, pw.SqliteDatabase):
        return None
    import psycopg2  # the postgres extra: the index is PostgreSQL

    params = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3, **database.connect_params}
    connection = psycopg2.connect(dbname=database.database, **params)
    connection.autocommit = True
    return connection


def names_file(file_key: str) -> bool:
    """Whether an instance row names the file ``file_key`` (on a connection of its own
    when this thread's broke: the caller is often cleaning up after a failed commit)."""
    try:
        return bool(Instance.select(Instance.id).where(Instance.file_key == file_key).exists())
    except (pw.DatabaseError, pw.InterfaceError):
        close()
        return bool(Instance.select(Instance.id).where(Instance.file_key == file_key).exists())


def ping() -> None:
    """One trivial query: raises the database's error when the index cannot be reached."""
    db.obj.execute_sql("SELECT 1").fetchone()


def totals() -> dict[str, int]:
    """Patients, studies, series and instances held, from the counters."""
    series, instances = Study.select(pw.fn.COALESCE(pw.fn.SUM(Study.num_series), 0),
                                     pw.fn.COALESCE(pw.fn.SUM(Study.num_instances), 0)
                                     ).scalar(as_tuple=True)
    return {"patients": Patient.select().count(), "studies": Study.select().count(),
            "series": int(series), "instances": int(instances)}


def held_syntaxes() -> dict[tuple[str, str], int]:
    """How many instances are held of each (SOP Class UID, stored transfer syntax UID), most
    first (one scan of the instance table)."""
    count = pw.fn.COUNT(Instance.id)
    rows: Any = (Instance.select(Instance.sop_class_uid, Instance.transfer_syntax_uid, count)
            .group_by(Instance.sop_class_uid, Instance.transfer_syntax_uid)
            .order_by(count.desc()).tuples())
    return {(str(cls), str(syntax)): int(n) for cls, syntax, n in rows}


def lookup(sop_instance_uid: str) -> tuple[str, str] | None:
    """Return ``(content_hash, file_key)`` of a stored instance, or ``None``."""
    database = db.obj
    row = database.execute_sql(_statements(database)["lookup"], (sop_instance_uid,)).fetchone()
    return (row[0], row[1]) if row else None


def originals_of(replacements: Collection[str]) -> dict[str, str]:
    """The stored UIDs that ``replacements`` stand for (``pseudonym_uid``), each known one
    mapped from its replacement."""
    found: dict[str, str] = {}
    wanted = list(dict.fromkeys(replacements))
    for start in range(0, len(wanted), _IN_BATCH):
        rows: Any = (PseudonymUid.select(PseudonymUid.replacement, PseudonymUid.original)
                     .where(PseudonymUid.replacement.in_(wanted[start:start + _IN_BATCH]))
                     .tuples())
        found.update((str(r), str(o)) for r, o in rows)
    return found


def remember_pseudonyms(pairs: dict[str, str]) -> None:
    """Keep ``pairs`` (replacement -> stored UID) in ``pseudonym_uid``, in a transaction of
    its own; a pair already kept (by this node or another) is left as it is. Not under the
    archive's write lock (:func:`write_transaction`): nothing else writes that table and a
    row never changes, so PostgreSQL needs no more than ``ON CONFLICT DO NOTHING``; SQLite
    takes its database lock (``BEGIN IMMEDIATE``) as for any write, waiting its busy
    timeout for a store's commit."""
    # in one order everywhere: two PostgreSQL transactions inserting some of the same new
    # rows in different orders would deadlock
    rows = [{"replacement": r, "original": pairs[r]} for r in sorted(pairs)]
    database = db.obj
    with database.atomic("IMMEDIATE") if isinstance(database, pw.SqliteDatabase) \
            else database.atomic():
        for start in range(0, len(rows), _IN_BATCH):
            PseudonymUid.insert_many(rows[start:start + _IN_BATCH]).on_conflict_ignore() \
                .execute()


_IN_BATCH = 500
"""Values per ``IN (...)`` or rows per ``INSERT`` (SQLite allows 32,766 parameters)."""


def _append(values: str, value: str) -> str:
    """Add ``value`` to a backslash-joined set, keeping first-seen order."""
    if not value:
        return values
    parts = values.split("\\") if values else []
    if value in parts:
        return values
    return "\\".join([*parts, value])


def write_instance(record: InstanceRecord, policy: DuplicatePolicy) -> WriteOutcome:
    """Index one instance in one transaction (DESIGN.md, C-STORE step 3).

    Identity follows the UIDs: a study is its StudyInstanceUID, a series its
    SeriesInstanceUID. An instance whose study is already filed under another patient, or
    whose series is under another study, is filed where the existing study or series is, and
    a warning says so (the rule is in the README).

    Raises
    ------
    DuplicateRejected
        When a different instance has this SOP Instance UID and the policy is ``reject``.
    """
    outcome = WriteOutcome(WriteResult.STORED)
    inst = record.instance
    with write_transaction():
        if _write_into_known_series(record):
            return outcome
        existing = Instance.get_or_none(Instance.sop_instance_uid == inst["sop_instance_uid"])
        stale_studies: set[int] = set()
        if existing is not None:
            if existing.content_hash == inst["content_hash"]:
                return WriteOutcome(WriteResult.IDENTICAL)
            if policy is DuplicatePolicy.KEEP:
                return WriteOutcome(WriteResult.KEPT)
            if policy is DuplicatePolicy.REJECT:
                raise DuplicateRejected(
                    f"SOP Instance {inst['sop_instance_uid']} is already stored with other content"
                )
            outcome = WriteOutcome(WriteResult.REPLACED, old_file_key=existing.file_key)
            stale_studies.add(existing.study_id)
            existing.delete_instance()

        study = Study.get_or_none(Study.study_instance_uid == record.study["study_instance_uid"])
        if study is None:
            patient = _patient(record.patient, outcome.warnings)
            study = Study.create(patient=patient, created_at=_now(), **record.study)
            Patient.update(num_studies=Patient.num_studies + 1).where(
                Patient.id == patient.id
            ).execute()
        elif study.patient.patient_key != record.patient["patient_key"]:
            outcome.warnings.append(
                f"study {study.study_instance_uid} belongs to PatientID "
                f"{study.patient.patient_id!r}; instance with PatientID "
                f"{record.patient['patient_id']!r} filed under it"
            )

        series = Series.get_or_none(
            Series.series_instance_uid == record.series["series_instance_uid"]
        )
        if series is None:
            series = Series.create(study=study, **record.series)
            Study.update(
                num_series=Study.num_series + 1,
                modalities=_append(study.modalities, record.series["modality"]),
            ).where(Study.id == study.id).execute()
            Patient.update(num_series=Patient.num_series + 1).where(
                Patient.id == study.patient_id
            ).execute()
            study = Study.get_by_id(study.id)
        elif series.study_id != study.id:
            outcome.warnings.append(
                f"series {series.series_instance_uid} belongs to study "
                f"{series.study.study_instance_uid}; instance filed under it"
            )
            stale_studies.add(study.id)
            study = series.study

        Instance.create(series=series, study=study, received_at=_now(), **inst)
        Series.update(num_instances=Series.num_instances + 1).where(
            Series.id == series.id
        ).execute()
        Study.update(
            num_instances=Study.num_instances + 1,
            sop_classes=_append(study.sop_classes, inst["sop_class_uid"]),
        ).where(Study.id == study.id).execute()
        Patient.update(num_instances=Patient.num_instances + 1).where(
            Patient.id == study.patient_id
        ).execute()
        if outcome.result is WriteResult.REPLACED:
            _refresh(record, series.id, study)
        if outcome.result is WriteResult.REPLACED or stale_studies:
            recompute_counters(stale_studies | {study.id})
    return outcome


def _write_into_known_series(record: InstanceRecord) -> bool:
    """The common case in few statements: a new instance of a series already filed under
    its own study and patient. Inserts it and counts it (series, study with its SOP
    Classes, patient); returns ``False``, having written nothing, for anything else (a
    resend, a new series, study or patient, a misfiled series), which
    :func:`write_instance`'s general path handles.

    Plain SQL, because building peewee queries cost more than running them (bench/README.md,
    profile of the ingest)."""
    database = db.obj
    sql = _statements(database)
    inst = record.instance
    if database.execute_sql(sql["instance_exists"], (inst["sop_instance_uid"],)).fetchone():
        return False
    row = database.execute_sql(
        sql["series_of"], (record.series["series_instance_uid"],)).fetchone()
    if (row is None or row[2] != record.study["study_instance_uid"]
            or row[4] != record.patient["patient_key"]):
        return False
    series_id, study_id, _, patient_id, _, sop_classes = row
    columns = tuple(sorted(inst))
    insert = sql.get(columns)
    if insert is None:
        names = (*columns, "series_id", "study_id", "received_at")
        insert = sql[columns] = (
            f"INSERT INTO instance ({', '.join(names)}) "
            f"VALUES ({', '.join([database.param] * len(names))})")
    database.execute_sql(insert, (*(inst[c] for c in columns), series_id, study_id,
                                  Instance.received_at.db_value(_now())))
    database.execute_sql(sql["count_series"], (series_id,))
    database.execute_sql(sql["count_study"],
                         (_append(sop_classes, inst["sop_class_uid"]), study_id))
    database.execute_sql(sql["count_patient"], (patient_id,))
    return True


_STATEMENTS: dict[str, dict[Any, str]] = {}


def _statements(database: pw.Database) -> dict[Any, str]:
    """The fast path's SQL, with this backend's parameter placeholder."""
    p = database.param
    key = type(database).__name__ + p
    if key not in _STATEMENTS:
        _STATEMENTS[key] = {
            "instance_exists": f"SELECT 1 FROM instance WHERE sop_instance_uid = {p}",
            "series_of": (
                "SELECT se.id, se.study_id, st.study_instance_uid, st.patient_id, "
                "pa.patient_key, st.sop_classes FROM series se "
                "JOIN study st ON st.id = se.study_id "
                "JOIN patient pa ON pa.id = st.patient_id "
                f"WHERE se.series_instance_uid = {p}"),
            "count_series": f"UPDATE series SET num_instances = num_instances + 1 WHERE id = {p}",
            "count_study": ("UPDATE study SET num_instances = num_instances + 1, "
                            f"sop_classes = {p} WHERE id = {p}"),
            "count_patient": ("UPDATE patient SET num_instances = num_instances + 1 "
                              f"WHERE id = {p}"),
            "lookup": (f"SELECT content_hash, file_key FROM instance "
                       f"WHERE sop_instance_uid = {p}"),
        }
    return _STATEMENTS[key]


_IDENTITY = frozenset({"patient_key", "patient_id", "issuer_of_patient_id",
                       "study_instance_uid", "series_instance_uid"})


def _refresh(record: InstanceRecord, series_id: int, study: Study) -> None:
    """A replacing instance is the newest word on its series, study and patient: their
    columns and attributes are rewritten from it (a corrected resend corrects the index)."""
    def values(level: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in level.items() if k not in _IDENTITY}

    Series.update(**values(record.series)).where(Series.id == series_id).execute()
    Study.update(**values(record.study)).where(Study.id == study.id).execute()
    if study.patient.patient_key == record.patient["patient_key"]:
        Patient.update(**values(record.patient)).where(Patient.id == study.patient_id).execute()


_DEMOGRAPHICS = ("patient_name", "patient_birth_date", "patient_sex")


def _patient(values: dict[str, Any], warnings: list[str]) -> Patient:
    patient = Patient.get_or_none(Patient.patient_key == values["patient_key"])
    if patient is None:
        return Patient.create(**values)
    differ = [k for k in _DEMOGRAPHICS if getattr(patient, k) != values[k]]
    if differ:
        warnings.append(
            f"PatientID {values['patient_id']!r} is already filed with other "
            f"{', '.join(differ)} ({patient.patient_name!r}); the new study is filed under it"
        )
    return patient


def recompute_counters(study_ids: set[int]) -> None:
    """Recount the given studies (and their patients) from the rows themselves.

    Used after a replacement moved or removed an instance, and by ``verify``; empty series,
    studies and patients are removed. Must run inside a write transaction.
    """
    patient_ids: set[int] = set()
    for study in Study.select().where(Study.id.in_(list(study_ids))):
        patient_ids.add(study.patient_id)
        modalities = ""
        series_count = 0
        for series in study.series.order_by(Series.id):
            n = Instance.select().where(Instance.series == series.id).count()
            if n == 0:
                series.delete_instance()
                continue
            series_count += 1
            Series.update(num_instances=n).where(Series.id == series.id).execute()
            modalities = _append(modalities, series.modality)
        sop_classes = ""
        rows: Any = (
            Instance.select(Instance.sop_class_uid)
            .where(Instance.study == study.id)
            .group_by(Instance.sop_class_uid)
            .order_by(pw.fn.MIN(Instance.id))
            .tuples()
        )
        for row in rows:
            sop_classes = _append(sop_classes, str(row[0]))
        n_instances = Instance.select().where(Instance.study == study.id).count()
        if n_instances == 0:
            study.delete_instance()
            continue
        Study.update(
            num_series=series_count,
            num_instances=n_instances,
            modalities=modalities,
            sop_classes=sop_classes,
        ).where(Study.id == study.id).execute()
    for patient in Patient.select().where(Patient.id.in_(list(patient_ids))):
        studies = Study.select(Study.id).where(Study.patient == patient.id)
        n_studies = studies.count()
        if n_studies == 0:
            patient.delete_instance()
            continue
        Patient.update(
            num_studies=n_studies,
            num_series=Series.select().where(Series.study.in_(studies)).count(),
            num_instances=Instance.select().where(Instance.study.in_(studies)).count(),
        ).where(Patient.id == patient.id).execute()


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class StoredInstance:
    """What a retrieve needs of one stored instance (no file is opened to list them)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    file_key: str
    file_size: int


_CHUNK = 500


def instances_under(level: Level, ids: list[int]) -> list[StoredInstance]:
    """The instances of the given patients, studies, series or instances (by row id), in
    the order they were stored."""
    column: Any = {
        Level.PATIENT: Study.patient,
        Level.STUDY: Instance.study,
        Level.SERIES: Instance.series,
        Level.IMAGE: Instance.id,
    }[level]
    out: list[StoredInstance] = []
    for i in range(0, len(ids), _CHUNK):
        select = Instance.select(
            Instance.sop_class_uid, Instance.sop_instance_uid, Instance.transfer_syntax_uid,
            Instance.file_key, Instance.file_size,
        )
        if level is Level.PATIENT:
            select = select.join(Study, on=(Instance.study == Study.id))
        rows: Any = select.where(column.in_(ids[i:i + _CHUNK])).order_by(Instance.id).tuples()
        out.extend(StoredInstance(*row) for row in rows)
    return out
