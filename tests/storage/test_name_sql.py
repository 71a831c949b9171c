"""PatientName in SQL: the per-group columns never lose a name that Python matching keeps
(PS3.5 6.2.1, PS3.4 C.2.2.2.4), and a name with a literal start is found through an index."""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from storage import ArchiveOptions, InvalidQuery, Model, open_archive
from storage.keys import Level
from storage.models import Patient, Study, database_proxy
from storage.query import Op, constraint_matches, page_select, parse_identifier, select_rows
from storage.values import norm_pn, pn_groups

STORED_ALPHABET = "ab^=["
QUERY_ALPHABET = "aAb^=*?[\\"


def _names() -> list[str]:
    """Every name of up to 5 characters over a tiny alphabet, with its groups, carets and
    a GLOB-special "[" in every place."""
    return ["".join(p) for n in range(1, 6) for p in itertools.product(STORED_ALPHABET, repeat=n)]


@pytest.fixture(scope="module")
def names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, str]]:
    """Patient rows for :func:`_names`, as the index writes them; id -> the name Python
    matching sees (the first three groups, as pydicom's DICOM JSON keeps them)."""
    tmp = tmp_path_factory.mktemp("names")
    archive = open_archive(ArchiveOptions(files_path=tmp / "files",
                                          index_url=f"sqlite:///{tmp / 'index.sqlite'}"))
    rows = []
    for i, name in enumerate(_names()):
        alphabetic, ideographic, phonetic = pn_groups(name, folded=True)
        rows.append({"patient_key": f"\\K{i}", "patient_id": f"K{i}", "patient_name": norm_pn(name),
                     "patient_name_alphabetic_folded": alphabetic,
                     "patient_name_ideographic_folded": ideographic,
                     "patient_name_phonetic_folded": phonetic})
    with archive.database.atomic():
        Patient.insert_many(rows).execute()
        # one study per patient, in an order unlike the patients' (ids must not coincide)
        ids = [pid for (pid,) in Patient.select(Patient.id).tuples()]
        Study.insert_many([{"patient": pid, "study_instance_uid": f"1.2.{pid}",
                            "created_at": datetime.datetime(2026, 1, 1)}
                           for pid in reversed(ids)]).execute()
    stored = {pid: norm_pn("=".join(name.split("=")[:3]))
              for pid, name in Patient.select(Patient.id, Patient.patient_name).tuples()}
    yield stored
    archive.close()


def _plan(sql: str, params: list[object]) -> list[str]:
    return [str(row[-1])
            for row in database_proxy.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]


def _query(name: str, level: str = "PATIENT") -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.PatientName = name
    return q


@settings(max_examples=400, deadline=None)
@given(value=st.text(alphabet=QUERY_ALPHABET, min_size=1, max_size=7), multiple=st.booleans())
def test_sql_keeps_every_name_python_matches(
    names: dict[int, str], value: str, multiple: bool
) -> None:
    try:
        # multiple: PS3.4 C.2.2.2.8 Multiple Value Matching ("\\" = AND) negotiated
        query = parse_identifier(_query(value), Model.PATIENT_ROOT, multiple_values=multiple)
    except InvalidQuery:
        assume(False)
        return
    if not query.constraints:  # pydicom reads "=" or "==" as empty: universal matching
        assert {row[0] for row in page_select(query, page_size=10**6)} == set(names)
        return
    [c] = query.constraints
    wanted = {pid for pid, name in names.items() if constraint_matches(c, [name] if name else [])}
    exact = not c.all_terms and all(t.op is Op.EQ and t.value.count("=") < 3 for t in c.terms)
    for indexed in (True, False):  # through the group indexes, and as a filter (page_select)
        found = {row[0] for row in page_select(query, page_size=10**6, indexed=indexed)}
        assert wanted <= found, f"{value!r}: SQL lost {sorted(names[i] for i in wanted - found)}"
        if exact:
            assert found == wanted, f"{value!r}: an exact name is matched exactly in SQL"


@pytest.mark.parametrize(("value", "index_name"), [
    ("SMITH^J*", "patient_patient_name_alphabetic_folded"),
    ("Smith^John", "patient_patient_name_alphabetic_folded"),
    ("=山田*", "patient_patient_name_ideographic_folded"),
])
def test_a_name_with_a_literal_start_is_found_through_its_index(
    names: dict[int, str], value: str, index_name: str
) -> None:
    # PS3.4 C.6.2.1: STUDY level, the patient's name a Study Root key
    q = _query(value, "STUDY")
    q.SpecificCharacterSet = "ISO_IR 192"
    plan = _plan(*page_select(parse_identifier(q, Model.STUDY_ROOT)).sql())
    assert any(index_name in step for step in plan), plan
    assert any("INDEX study_patient_id" in step for step in plan), plan


def test_a_name_matching_many_studies_is_read_in_id_order_after_the_first_page(
    names: dict[int, str],
) -> None:
    # the first page: the name indexes, then every matching study sorted by id; reading
    # each page so would cost every match per page. Later pages read the studies in id
    # order (no sort), so a broad name costs one pass.
    query = parse_identifier(_query("a*", "STUDY"), Model.STUDY_ROOT)
    every = sorted(row[0] for row in page_select(query, page_size=10**6))
    assert len(every) > 1000
    paged = [row.rows[Level.STUDY].id for row in select_rows(query, page_size=100)]
    assert paged == every  # complete, in id order, each once
    first = _plan(*page_select(query, 0, 100).sql())
    assert any("patient_patient_name_alphabetic_folded" in step for step in first), first
    later = _plan(*page_select(query, every[99], 100).sql())
    assert not any("TEMP B-TREE" in step for step in later), later
    assert any("USING INTEGER PRIMARY KEY (rowid>?)" in step for step in later), later


@pytest.mark.parametrize("fold_pn", [True, False])
def test_an_empty_name_is_filtered_in_sql_whatever_the_matching(
    names: dict[int, str], fold_pn: bool
) -> None:
    # PS3.4 C.2.2.2.7 Empty Value Matching: folding keeps an empty name empty, so the
    # folded columns serve it for exact matching (query.pn_case_insensitive false) too
    query = parse_identifier(_query('""'), Model.PATIENT_ROOT, fold_pn=fold_pn)
    found = {row[0] for row in page_select(query, page_size=10**6)}
    assert found == {pid for pid, name in names.items() if not name}
    assert 0 < len(found) < len(names)
