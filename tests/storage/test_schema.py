"""Schema versions: an index an earlier minipacs wrote is migrated in place, with every row
and counter kept; a newer one is refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from storage import Archive, ArchiveOptions, Model, StorageError, open_archive
from storage.models import SCHEMA_VERSION
from storage.values import json_strings, pn_groups
from tests.factory import encode, make_ds

SCHEMA_1 = Path(__file__).parent / "data" / "index-schema-1.sql"
TABLES = ("patient", "study", "series", "instance")
COUNTERS = {
    "patient": "num_studies, num_series, num_instances",
    "study": "num_series, num_instances, modalities, sop_classes",
    "series": "num_instances",
    "instance": "sop_instance_uid, file_key, content_hash",
}


def rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's ids with its counters (or, for instances, its file), in id order."""
    con = sqlite3.connect(path)
    try:
        return {t: con.execute(f'SELECT id, {COUNTERS[t]} FROM "{t}" ORDER BY id').fetchall()
                for t in TABLES}
    finally:
        con.close()


def load(sql: Path, tmp_path: Path) -> Path:
    path = tmp_path / "index.sqlite"
    con = sqlite3.connect(path)
    con.executescript(sql.read_text(encoding="utf-8"))
    con.close()
    return path


def open_at(tmp_path: Path) -> Archive:
    return open_archive(ArchiveOptions(files_path=tmp_path / "files",
                                       index_url=f"sqlite:///{tmp_path / 'index.sqlite'}"))


def studies(archive: Archive, name: str) -> dict[str, int]:
    """AccessionNumber -> NumberOfStudyRelatedInstances of the studies ``name`` matches."""
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.SpecificCharacterSet = "ISO_IR 192"
    q.AccessionNumber = ""
    q.NumberOfStudyRelatedInstances = ""
    q.PatientName = name
    return {str(r.AccessionNumber): int(r.NumberOfStudyRelatedInstances)
            for r in archive.find(archive.parse_query(q, Model.STUDY_ROOT))}


def test_a_schema_1_index_is_migrated_with_every_row_and_counter_kept(tmp_path: Path) -> None:
    path = load(SCHEMA_1, tmp_path)
    before = rows(path)
    assert [len(before[t]) for t in TABLES] == [6, 7, 14, 21]
    archive = open_at(tmp_path)
    try:
        assert rows(path) == before
        con = sqlite3.connect(path)
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        columns = [r[1] for r in con.execute("PRAGMA table_info(patient)")]
        assert "patient_name_folded" not in columns
        for patient_id, name, *groups in con.execute(
            "SELECT id, patient_name, patient_name_alphabetic_folded,"
            " patient_name_ideographic_folded, patient_name_phonetic_folded FROM patient"
        ):
            assert tuple(groups) == pn_groups(name, folded=True), patient_id
        indexes = {r[1] for r in con.execute("PRAGMA index_list(patient)")}
        assert {"patient_patient_name_alphabetic_folded", "patient_patient_name_ideographic_folded",
                "patient_patient_name_phonetic_folded"} <= indexes
        assert "patient_patient_name_folded" not in indexes
        series_indexes = {r[1] for r in con.execute("PRAGMA index_list(series)")}
        assert "series_study_id" not in series_indexes  # schema 5: the pair below covers it
        assert "series_study_id_modality" in series_indexes
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "pending_removal" in tables  # schema 3
        assert "pseudonym_uid" in tables  # schema 6
        con.close()

        # PS3.5 6.2.1: a value without "=" matches any group; with "=", group by group
        assert studies(archive, "doe^john") == {"A1": 3, "A2": 3}
        assert studies(archive, "DOE*") == {"A1": 3, "A2": 3}
        assert studies(archive, "YAMADA^T*") == {"A3": 3}
        assert studies(archive, "山田*") == {"A3": 3}
        assert studies(archive, "やまだ^たろう") == {"A3": 3}
        assert studies(archive, "=山田^太郎") == {"A3": 3}
        assert studies(archive, "yamada*=李*") == {}
        assert studies(archive, "MULLER^JURGEN") == {"A4": 3}
        assert studies(archive, "李^四") == {"A7": 3}
        assert studies(archive, "nobody^*") == {"A6": 3}
        assert studies(archive, '""') == {"A5": 3}

        # the migrated table takes new patients and names
        ds = make_ds(PatientID="P9", PatientName="Zed^Zoe", AccessionNumber="A8")
        archive.store(encode(ds), "1.2.840.10008.1.2.1")
        assert studies(archive, "zed*") == {"A8": 1}
    finally:
        archive.close()

    reopened = open_at(tmp_path)  # a migrated index opens as it is
    try:
        assert studies(reopened, "YAMADA*") == {"A3": 3}
    finally:
        reopened.close()


def test_a_failed_migration_leaves_the_index_as_it_was(tmp_path: Path) -> None:
    # a trigger makes the last step (filling the new columns) fail, after every ALTER TABLE:
    # the one write transaction undoes them all
    path = load(SCHEMA_1, tmp_path)
    con = sqlite3.connect(path)
    con.execute("CREATE TRIGGER refuse BEFORE UPDATE ON patient BEGIN "
                "SELECT RAISE(ABORT, 'refused by a test trigger'); END")
    con.commit()
    con.close()
    before = rows(path)
    with pytest.raises(StorageError, match="migrating version 1 to 2 failed, nothing was "
                       "changed: refused by a test trigger"):
        open_at(tmp_path)
    assert rows(path) == before
    con = sqlite3.connect(path)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    assert "patient_name_folded" in [r[1] for r in con.execute("PRAGMA table_info(patient)")]
    assert "patient_patient_name_folded" in {r[1] for r in con.execute("PRAGMA index_list(patient)")}
    con.close()


def test_an_index_of_a_newer_minipacs_is_refused(tmp_path: Path) -> None:
    open_at(tmp_path).close()
    con = sqlite3.connect(tmp_path / "index.sqlite")
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(StorageError, match=f"version {SCHEMA_VERSION + 1} is not the supported"):
        open_at(tmp_path)


@pytest.mark.parametrize("name", [
    "Doe^John", "a=b=c=d", "=Yamada", "==x", " Doe ^ John =  ", "Müller^Jürgen",
    "Yamada^Tarou=山田^太郎=やまだ^たろう", "a^b^c^d^e^f", "^^^", "Smith^[J]*?",
])
def test_the_name_columns_hold_what_python_matching_reads(tmp_path: Path, name: str) -> None:
    # the SQL filter and Python matching must see the same groups: the columns are made by
    # extract from the header, Python reads the DICOM JSON pydicom made of it
    archive = open_at(tmp_path)
    try:
        archive.store(encode(make_ds(PatientName=name, SpecificCharacterSet="ISO_IR 192")),
                      "1.2.840.10008.1.2.1")
        [(attrs, *groups)] = archive.database.execute_sql(
            "SELECT attrs, patient_name_alphabetic_folded, patient_name_ideographic_folded,"
            " patient_name_phonetic_folded FROM patient").fetchall()
        [seen] = json_strings(json.loads(attrs)["00100010"]) or [""]
        assert tuple(groups) == pn_groups(seen, folded=True)
    finally:
        archive.close()
