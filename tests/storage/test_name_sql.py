"""PatientName in SQL: the per-group columns never lose a name that Python matching keeps
(PS3.5 6.2.1, PS3.4 C.2.2.2.4), and a name with a literal start is found through an index."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from storage import ArchiveOptions, InvalidQuery, Model, open_archive
from storage.models import Patient, database_proxy
from storage.query import constraint_matches, page_select, parse_identifier
from storage.values import norm_pn, pn_groups

STORED_ALPHABET = "ab^="
QUERY_ALPHABET = "aAb^=*?"


def _names() -> list[str]:
    """Every name of up to 5 characters over a tiny alphabet, with its groups and carets
    in every place."""
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
    stored = {pid: norm_pn("=".join(name.split("=")[:3]))
              for pid, name in Patient.select(Patient.id, Patient.patient_name).tuples()}
    yield stored
    archive.close()


def _query(name: str, level: str = "PATIENT") -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.PatientName = name
    return q


def test_the_name_index_holds_every_stored_name(names: dict[int, str]) -> None:
    assert len(names) == len(_names()) == 1364


@settings(max_examples=600, deadline=None)
@given(value=st.text(alphabet=QUERY_ALPHABET, min_size=1, max_size=7))
def test_sql_keeps_every_name_python_matches(names: dict[int, str], value: str) -> None:
    try:
        query = parse_identifier(_query(value), Model.PATIENT_ROOT)
    except InvalidQuery:
        assume(False)
        return
    found = {row[0] for row in page_select(query, page_size=10**6)}
    if not query.constraints:  # "=" or "==": universal matching (PS3.4 C.2.2.2.3)
        assert found == set(names)
        return
    [c] = query.constraints
    wanted = {pid for pid, name in names.items() if constraint_matches(c, [name] if name else [])}
    assert wanted <= found, f"{value!r}: SQL lost {sorted(names[i] for i in wanted - found)}"
    [term] = c.terms
    if "*" not in value and "?" not in value and value.count("=") < 3 and term.value:
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
    sql, params = page_select(parse_identifier(q, Model.STUDY_ROOT)).sql()
    plan = [str(row[-1]) for row in database_proxy.execute_sql(
        "EXPLAIN QUERY PLAN " + sql, params).fetchall()]
    assert any(index_name in step for step in plan), plan
    assert any("INDEX study_patient_id" in step for step in plan), plan
