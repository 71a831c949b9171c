"""The PostgreSQL index: a real, throwaway PostgreSQL server (Debian's ``postgresql``
package, started here with ``initdb`` and ``pg_ctl``), the same archive code as over SQLite.

Without PostgreSQL or psycopg2 the tests are skipped, or fail with a clear message when
``CI`` is set.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from storage import Archive, ArchiveOptions, Model, Selection, StorageError, index, open_archive
from storage.models import SCHEMA_VERSION, PendingRemoval
from storage.query import page_select
from tests.factory import encode, expected_table, hierarchy, make_ds, study_counts
from tests.postgres import started_postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Callable[[], str]]:
    """A PostgreSQL server for this module; calling the fixture's value creates a fresh,
    empty database and returns its URL."""
    try:
        for server in started_postgres():
            yield server.new_database
    finally:
        index.disconnect()


@pytest.fixture
def pg_archive(postgres: Callable[[], str], tmp_path: Path) -> Iterator[Archive]:
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=postgres()))
    yield archive
    archive.close()
    index.disconnect()


def _candidates(archive: Archive, **keys: Any) -> int:
    """How many studies the SQL filter lets through (Python matching then checks them)."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.SpecificCharacterSet = "ISO_IR 192"
    for k, v in keys.items():
        setattr(q, k, v)
    return len(list(page_select(archive.parse_query(q, Model.STUDY_ROOT), page_size=10**6)))


def _query(archive: Archive, level: str = "STUDY", **keys: Any) -> list[Dataset]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.SpecificCharacterSet = "ISO_IR 192"
    for k in ("StudyInstanceUID", "AccessionNumber", "NumberOfStudyRelatedInstances",
              "NumberOfStudyRelatedSeries", "ModalitiesInStudy", "SOPClassesInStudy"):
        setattr(q, k, "")
    for k, v in keys.items():
        setattr(q, k, v)
    return list(archive.find(archive.parse_query(q, Model.STUDY_ROOT)))


def test_counts_and_matching_on_postgresql(pg_archive: Archive) -> None:
    datasets = hierarchy()
    for ds in datasets:
        pg_archive.store(encode(ds), "1.2.840.10008.1.2.1")
    got = {r.StudyInstanceUID: study_counts(r) for r in _query(pg_archive)}
    assert got == expected_table(datasets)

    def studies(**keys: Any) -> set[str]:
        return {str(r.AccessionNumber) for r in _query(pg_archive, **keys)}
    assert studies(PatientName="doe^john") == {"A1", "A2"}
    assert studies(PatientName="MULLER*") == {"A4"}
    assert studies(PatientName='""') == {"A5"}
    assert studies(PatientName="^") == set()
    assert studies(ModalitiesInStudy="CT\\MR") == {"A1", "A2", "A3", "A4", "A5"}
    assert studies(StudyDate="20240101-") == {"A1", "A2"}
    assert studies(StudyDescription="Study ?") == {"A1", "A2", "A3", "A4", "A5"}
    # LIKE's own wildcards are literal in DICOM (PS3.4 C.2.2.2.4): escaped in the SQL too
    assert studies(StudyDescription="Study%*") == set()
    assert _candidates(pg_archive, StudyDescription="Study%*") == 0


def test_delete_on_postgresql(pg_archive: Archive) -> None:
    """Issue 16, item 1: the rows, counters and files on PostgreSQL, with its table locks."""
    datasets = hierarchy()
    for ds in datasets:
        pg_archive.store(encode(ds), "1.2.840.10008.1.2.1")
    first = datasets[0].StudyInstanceUID
    done = pg_archive.delete(Selection(patient_ids=("PID2",), study_uids=(first,)))
    kept = [ds for ds in datasets if ds.PatientID != "PID2" and ds.StudyInstanceUID != first]
    assert (done.instances, done.studies, done.patients, done.files_left) == (15, 2, 1, [])
    assert {r.StudyInstanceUID: study_counts(r) for r in _query(pg_archive)} == \
        expected_table(kept)
    assert len(list(pg_archive.files.keys())) == len(kept)
    assert PendingRemoval.select().count() == 0
    assert pg_archive.verify().problems == []


def test_routing_outbox_and_retention_on_postgresql(postgres: Callable[[], str],
                                                    tmp_path: Path) -> None:
    """Issue 16, items 3 and 4: the outbox's upsert, claim and settle, and a retention
    plan, on PostgreSQL."""
    from storage import Origin, RetentionRules, Route, Selection, lease_owner

    route = Route("ct", (("Modality", "CT"),), ("AI", "WS"), stable_seconds=0.0)
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=postgres(),
                                          routes=(route,)))
    try:
        ds = make_ds(Modality="CT")
        archive.store(encode(ds), "1.2.840.10008.1.2.1", origin=Origin("CT1"))
        [first] = archive.outbox.claim("AI", lease_owner(), 10, 60)
        ds.PatientName = "Other^Name"  # replaced while claimed: queued again
        archive.store(encode(ds), "1.2.840.10008.1.2.1", origin=Origin("CT1"))
        archive.outbox.sent([first], lease_owner())
        [(again, item)] = archive.outbox.claim_instances("AI", lease_owner(), 10, 60)
        assert again.generation == first.generation + 1
        assert item is not None and item.sop_instance_uid == str(ds.SOPInstanceUID)
        archive.outbox.sent([again], lease_owner())
        archive.delete(Selection(instance_uids=(str(ds.SOPInstanceUID),)))
        [(gone, item)] = archive.outbox.claim_instances("WS", lease_owner(), 10, 60)
        assert item is None  # no longer stored: the router drops it
        archive.outbox.sent([gone], lease_owner())
        assert archive.routing_queue() == []
        assert archive.plan_retention(RetentionRules(max_age_days=1)) == []
    finally:
        archive.close()
        index.disconnect()


def test_index_writes_of_two_processes_take_turns_on_postgresql(
        postgres: Callable[[], str], tmp_path: Path) -> None:
    """Every write transaction takes one advisory lock first (a server's stores and a
    delete in another process): while one is open, another connection's write waits,
    where table locks taken in different orders deadlocked (review of 8c7ce42)."""
    import psycopg2

    url = postgres()
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=url))
    other = psycopg2.connect(url)
    try:
        with archive.writing():
            cur = other.cursor()
            cur.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg2.errors.LockNotAvailable):
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (index.WRITE_LOCK_KEY,))
            other.rollback()
        cur = other.cursor()  # the writer is done: the lock is free
        cur.execute("SET lock_timeout = '5s'")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (index.WRITE_LOCK_KEY,))
        other.rollback()
    finally:
        other.close()
        archive.close()
        index.disconnect()


def test_names_in_every_group_on_postgresql(pg_archive: Archive) -> None:
    for n, name in enumerate(["Yamada^Tarou=山田^太郎=やまだ^たろう", "=李^四", "O_Brien^Pat",
                              "Oxbrien^Pat"]):
        pg_archive.store(encode(make_ds(PatientID=f"P{n}", PatientName=name,
                                        AccessionNumber=f"N{n}",
                                        SpecificCharacterSet="ISO_IR 192")),
                         "1.2.840.10008.1.2.1")

    def studies(name: str) -> set[str]:
        return {str(r.AccessionNumber) for r in _query(pg_archive, PatientName=name)}
    assert studies("YAMADA^T*") == {"N0"}
    assert studies("山田*") == {"N0"}
    assert studies("=山田^太郎") == {"N0"}
    assert studies("やまだ^たろう") == {"N0"}
    assert studies("李*") == {"N1"}
    assert studies("o_brien*") == {"N2"}  # "_" is a letter in DICOM, not LIKE's wildcard
    assert _candidates(pg_archive, PatientName="o_brien*") == 1
    assert _candidates(pg_archive, PatientName="山田*") == 1  # the SQL narrows every group


def _migrated(archive: Archive, version: int, url: str, files: Path) -> Archive:
    """``archive``'s index marked as schema ``version``, closed, and opened again (which
    migrates it to :data:`SCHEMA_VERSION`)."""
    archive.database.execute_sql("UPDATE schema_version SET version = %s", (version,))
    archive.close()
    index.disconnect()
    archive = open_archive(ArchiveOptions(files_path=files, index_url=url))
    found = archive.database.execute_sql("SELECT version FROM schema_version").fetchall()
    if found != [(SCHEMA_VERSION,)]:
        archive.close()
        index.disconnect()
        pytest.fail(f"schema {version} was not migrated to {SCHEMA_VERSION}: {found}")
    return archive


def test_a_schema_1_index_is_migrated_on_postgresql(postgres: Callable[[], str],
                                                    tmp_path: Path) -> None:
    # schema 1 made by hand from schema 2 (the exact DDL minipacs 72beb01 created, checked
    # on SQLite by tests/storage/test_schema.py with an index that version wrote)
    url = postgres()
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=url))
    for n, name in enumerate(["Doe^John", "Yamada^Tarou=山田^太郎"]):
        archive.store(encode(make_ds(PatientID=f"P{n}", PatientName=name,
                                     AccessionNumber=f"M{n}", SpecificCharacterSet="ISO_IR 192")),
                      "1.2.840.10008.1.2.1")
    db = archive.database
    for name in ("alphabetic", "ideographic", "phonetic"):
        db.execute_sql(f'ALTER TABLE patient DROP COLUMN "patient_name_{name}_folded"')
    db.execute_sql("ALTER TABLE patient ADD COLUMN patient_name_folded TEXT NOT NULL DEFAULT ''")
    db.execute_sql("ALTER TABLE patient ALTER COLUMN patient_name_folded DROP DEFAULT")
    db.execute_sql("UPDATE patient SET patient_name_folded = '=' || lower(patient_name) || '='")
    db.execute_sql('CREATE INDEX "patient_patient_name_folded" ON patient (patient_name_folded)')
    archive = _migrated(archive, 1, url, tmp_path / "files")
    try:
        db = archive.database
        assert {str(r.AccessionNumber) for r in _query(archive, PatientName="山田*")} == {"M1"}
        assert {str(r.AccessionNumber) for r in _query(archive, PatientName="doe*")} == {"M0"}
        [(count,)] = db.execute_sql("SELECT count(*) FROM instance").fetchall()
        assert count == 2
    finally:
        archive.close()
        index.disconnect()


def test_a_newer_schema_is_refused_on_postgresql(postgres: Callable[[], str],
                                                 tmp_path: Path) -> None:
    url = postgres()
    open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=url)).close()
    index.disconnect()
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "f2", index_url=url))
    archive.database.execute_sql("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    archive.close()
    index.disconnect()
    with pytest.raises(StorageError, match="is not the supported"):
        open_archive(ArchiveOptions(files_path=tmp_path / "f3", index_url=url))
    index.disconnect()


OPEN_INDEX = """
import sys, tempfile
from pathlib import Path
from storage import ArchiveOptions, open_archive
try:
    open_archive(ArchiveOptions(files_path=Path(tempfile.mkdtemp()), index_url=sys.argv[1])).close()
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}")
"""


def test_nodes_opening_an_empty_index_at_once_make_one_schema(
        postgres: Callable[[], str]) -> None:
    """Several nodes started together on a new database: without the schema lock, one in
    eight such starts here failed on a CREATE TABLE IF NOT EXISTS race
    (pg_class_relname_nsp_index)."""
    for _ in range(6):
        url = postgres()
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_INDEX, url],
                                  stdout=subprocess.PIPE, text=True) for _ in range(4)]
        assert [p.communicate(timeout=120)[0].strip() for p in procs] == [""] * 4
        archive = open_archive(ArchiveOptions(files_path=Path(tempfile.mkdtemp()),
                                              index_url=url))
        try:
            assert archive.database.execute_sql(
                "SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        finally:
            archive.close()
            index.disconnect()


@pytest.mark.parametrize(("keys", "index_name"), [
    ({"PatientName": "DOE^J*"}, "patient_patient_name_alphabetic_folded_pattern"),
    ({"PatientName": "=山田*"}, "patient_patient_name_ideographic_folded_pattern"),
    ({"PatientName": "Doe^John"}, "patient_patient_name_alphabetic_folded_pattern"),
    ({"PatientID": "PID1*"}, "patient_patient_id_pattern"),
    ({"PatientID": "PID1"}, "patient_patient_id_pattern"),
    ({"AccessionNumber": "A1*"}, "study_accession_number_pattern"),
])
def test_a_wildcard_with_a_literal_start_reads_an_index_on_postgresql(
        pg_archive: Archive, keys: dict[str, str], index_name: str) -> None:
    """PS3.4 C.2.2.2.4: ``LIKE 'doe^j%'`` is a range of a ``text_pattern_ops`` index
    whatever the database's collation; a plain index under ``C.UTF-8`` serves none, and
    every patient row was read (bench/README.md, "Scale on PostgreSQL")."""
    for ds in hierarchy():
        pg_archive.store(encode(ds), "1.2.840.10008.1.2.1")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.SpecificCharacterSet = "ISO_IR 192"
    for k, v in keys.items():
        setattr(q, k, v)
    sql, params = page_select(pg_archive.parse_query(q, Model.STUDY_ROOT)).sql()
    db = pg_archive.database
    with db.atomic():  # a handful of rows: make the planner show what it could use
        db.execute_sql("SET LOCAL enable_seqscan = off")
        plan = [row[0] for row in db.execute_sql("EXPLAIN " + sql, params).fetchall()]
    assert any(index_name in step for step in plan), plan
    assert not any("Seq Scan on patient" in step or "Seq Scan on study" in step
                   for step in plan), plan


def test_a_schema_4_index_gets_its_pattern_indexes_on_postgresql(
        postgres: Callable[[], str], tmp_path: Path) -> None:
    """4 to 5: the plain indexes of the wildcard-matched columns give way to byte-ordered
    ones, and ``series_study_id`` (covered by ``series_study_id_modality``) goes."""
    url = postgres()
    archive = open_archive(ArchiveOptions(files_path=tmp_path / "files", index_url=url))
    for ds in hierarchy():
        archive.store(encode(ds), "1.2.840.10008.1.2.1")
    db = archive.database
    plain = {"patient_patient_id": ("patient", "patient_id"),
             "patient_patient_name_alphabetic_folded": ("patient", "patient_name_alphabetic_folded"),
             "patient_patient_name_ideographic_folded": ("patient",
                                                         "patient_name_ideographic_folded"),
             "patient_patient_name_phonetic_folded": ("patient", "patient_name_phonetic_folded"),
             "study_accession_number": ("study", "accession_number"),
             "series_study_id": ("series", "study_id")}
    for name in plain:  # schema 4, as minipacs 1765fe5 made it
        db.execute_sql(f'DROP INDEX IF EXISTS "{name}_pattern"')
    for name, (table, column) in plain.items():
        db.execute_sql(f'CREATE INDEX "{name}" ON "{table}" ("{column}")')
    archive = _migrated(archive, 4, url, tmp_path / "files")
    try:
        db = archive.database
        made = {name: definition for name, definition in db.execute_sql(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'").fetchall()}
        assert not set(plain) & set(made)
        for name in plain:
            if name != "series_study_id":
                assert "text_pattern_ops" in made[f"{name}_pattern"]
        assert "series_study_id_modality" in made
        assert {str(r.AccessionNumber) for r in _query(archive, PatientName="doe*")} == {
            "A1", "A2"}
    finally:
        archive.close()
        index.disconnect()
