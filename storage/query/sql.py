"""SQL push-down: the filters that the index columns can answer (a superset of the matches,
never fewer), and the paged SELECT of candidates."""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import peewee as pw

from .. import models
from ..keys import KEYS, Key, Level
from ..values import NUMERIC_VRS
from .model import (
    Constraint,
    Entity,
    Kind,
    Op,
    Query,
    Row,
    Term,
)

_LEVEL_MODEL: dict[Level, type[models.BaseModel]] = {
    Level.PATIENT: models.Patient,
    Level.STUDY: models.Study,
    Level.SERIES: models.Series,
    Level.IMAGE: models.Instance,
}



def _dialect() -> str:
    db = models.database_proxy.obj
    return "postgres" if isinstance(db, pw.PostgresqlDatabase) else "sqlite"


def wildcard_sql(column: Any, pattern: str) -> Any:
    """SQL for "``column`` matches the DICOM wildcard ``pattern``", case-sensitively.

    The one place that knows each backend's pattern syntax (like Orthanc's
    ``ISqlLookupFormatter``): SQLite's GLOB is case-sensitive with ``*``/``?`` and ``[``
    classes; PostgreSQL's LIKE needs ``%``/``_`` and an escape character. Characters that
    are special to the backend but literal in DICOM are escaped, so ``%``, ``_`` and ``[``
    in a value never act as wildcards.
    """
    if _dialect() == "postgres":
        def esc(text: str) -> str:
            return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

        like = esc(pattern).replace("*", "%").replace("?", "_")
        return pw.NodeList((column, pw.SQL("LIKE"), like, pw.SQL("ESCAPE '\\'")))
    glob = "".join("[[]" if ch == "[" else ch for ch in pattern)
    return pw.Expression(column, "GLOB", glob)


def _pn_group_pattern(term: Term, group: str) -> str:
    """The pattern of one query group, for a stored group that matches it (a superset).

    PS3.5 6.2.1 makes trailing empty components insignificant, so ``doe^john^*`` matches a
    stored ``doe^john`` (Python pads the stored name with "^", see :func:`_pn_matches`).
    A tail of only "^", "*" and "?" therefore becomes one "*": it matched past the end of
    the stored name, or some of its tail. The literal start stays, so an index serves it.
    """
    if term.op is not Op.WILDCARD:
        return group
    head = group.rstrip("^*?")
    return group if head == group else head + "*"


def _framed_pn_sql(column: Any, term: Term) -> Any | None:
    # framed PN columns hold "=group1=group2=" (values.pn_framed): a value without "=" may
    # match any group. A value with groups is matched group by group in Python only.
    if "=" in term.value or len(term.value) > _PATTERN_LIMIT:
        return None
    return wildcard_sql(column, "*=" + _pn_group_pattern(term, term.value) + "=*")


def _pn_groups_sql(columns: Sequence[Any], term: Term) -> Any | None:
    """A name term on a key kept one column per group (:attr:`Key.groups`), a superset of
    :func:`_pn_matches`: a value without "=" in any group, a value with "=" in each of the
    groups it gives (PS3.5 6.2.1). Equalities and wildcards with a literal start read a
    range of an index."""
    if len(term.value) > _PATTERN_LIMIT:
        return None

    def one(column: Any, group: str) -> Any:
        if term.op is not Op.WILDCARD:
            return column == group
        return wildcard_sql(column, _pn_group_pattern(term, group))

    if "=" not in term.value:
        if not term.value:  # "^": no non-empty group equals it (Python skips empty ones)
            return pw.SQL("1 = 0")
        return _or([one(column, term.value) for column in columns])
    conds = [one(column, group)
             for column, group in zip(columns, term.value.split("="), strict=False) if group]
    return functools.reduce(operator.and_, conds) if conds else None


_PATTERN_LIMIT = 10000  # longer patterns are matched in Python only (SQLite caps GLOB)


_IN_CHUNK = 500  # values per IN (...): well below every backend's parameter limit


def _terms_sql(column: Any, terms: Sequence[Term]) -> Any:
    """OR of the terms: equalities as IN lists (a C.2.2.2.2 list of thousands of UIDs
    stays one flat expression), the rest OR'ed flat, never nested."""
    equal = [t.value for t in terms if t.op is Op.EQ]
    conds = [column.in_(equal[i:i + _IN_CHUNK]) for i in range(0, len(equal), _IN_CHUNK)]
    conds += [_term_sql(column, t) for t in terms if t.op is not Op.EQ]
    return _or(conds)


def _term_sql(column: Any, term: Term) -> Any:
    if term.op is Op.RANGE:
        cond = column != ""
        if term.value:
            cond &= column >= term.value
        if term.upper:
            cond &= column <= term.upper
        return cond
    if term.op is Op.WILDCARD:
        if len(term.value) > _PATTERN_LIMIT:
            return column == column  # no filter: Python matches it
        return wildcard_sql(column, term.value)
    return column == term.value


def _constraint_sql(c: Constraint, query: Query, indexed: bool = True) -> Any | None:
    key = c.key
    if key is None or c.kind is Kind.SEQUENCE:
        return None
    model = _LEVEL_MODEL[key.level]
    if key.computed in ("modalities", "sop_classes"):
        return _exists_sql(c, key)
    if key.groups is not None:
        return _groups_sql(c, query, model, key.groups, indexed)
    if key.column is None or c.vr in NUMERIC_VRS:
        return None
    column = getattr(model, key.column)
    if c.kind is Kind.EMPTY:
        return column == ""
    if c.vr != "PN":
        return _terms_sql(column, c.terms)
    if not query.fold_pn or not key.column.endswith("_folded"):
        return None
    conds = [_framed_pn_sql(column, term) for term in c.terms]
    return None if any(cond is None for cond in conds) else _or(conds)


def _groups_sql(
    c: Constraint,
    query: Query,
    model: type[models.BaseModel],
    names: Sequence[str],
    indexed: bool,
) -> Any | None:
    """A PN key kept one folded column per group.

    ``indexed``: as ``id IN (SELECT id ... WHERE ...)``, which SQLite plans over the three
    group indexes (it does so for the OR only in a subquery of its own), then reads the
    rows below through their parent's index and sorts them by id. Otherwise as a plain
    filter on the joined row, read in id order without a sort (see :func:`page_select`).
    """
    columns = [getattr(model, name) for name in names]
    if c.kind is Kind.EMPTY:  # PS3.4 C.2.2.2.7: folding keeps an empty name empty
        cond = functools.reduce(operator.and_, [column == "" for column in columns])
    elif not query.fold_pn:
        return None  # exact matching: the folded columns cannot narrow it
    else:
        conds = [_pn_groups_sql(columns, term) for term in c.terms]
        if any(cond is None for cond in conds):
            return None
        cond = _or(conds)
    return model.id.in_(model.select(model.id).where(cond)) if indexed else cond


def _or(conds: list[Any]) -> Any:
    """One flat, parenthesised OR (nested binary ORs overflow SQLite's parser)."""
    return conds[0] if len(conds) == 1 else pw.NodeList(conds, " OR ", parens=True)


def _exists_sql(c: Constraint, key: Key) -> Any | None:
    """ModalitiesInStudy / SOPClassesInStudy: a study matches if any of its series (or
    instances) does, through an indexed EXISTS rather than the stored list."""
    if c.kind is not Kind.TERMS:
        return None
    model: type[models.BaseModel]
    if key.computed == "modalities":
        model, column = models.Series, models.Series.modality
        link = models.Series.study == models.Study.id
    else:
        model, column = models.Instance, models.Instance.sop_class_uid
        link = models.Instance.study == models.Study.id
    cond = _terms_sql(column, c.terms)
    return pw.fn.EXISTS(model.select(pw.SQL("1")).where(link & cond))


def sql_conditions(query: Query, indexed: bool = True) -> list[Any]:
    """The SQL filters of ``query``: a superset of the matches, never fewer.

    ``indexed`` lets a name be looked up through its group indexes (see
    :func:`page_select`)."""
    out = []
    for c in query.constraints:
        cond = _constraint_sql(c, query, indexed)
        if cond is not None:
            out.append(cond)
    return out


def select_rows(query: Query, page_size: int = 500) -> Iterator[Row]:
    """Yield the candidate rows of ``query`` page by page.

    Each page is its own short read: no transaction stays open while the caller sends
    responses, and a cancelled query stops reading. Rows are plain tuples (building peewee
    models for every level of every row cost more than the query); a page's rows share
    their parents' :class:`Entity`, so a study's JSON is decoded once for all its images.
    """
    names = {lv: _entity_columns(lv) for lv in query.levels}
    last = 0
    while True:
        page = list(page_select(query, last, page_size))
        if not page:
            return
        last = page[-1][0]
        entities: dict[tuple[Level, int], Entity] = {}  # the page's rows share parents
        for values in page:
            rows: dict[Level, Any] = {}
            at = 0
            for lv in reversed(query.levels):  # the query level's columns come first
                part = values[at:at + len(names[lv])]
                at += len(names[lv])
                entity = entities.get((lv, part[0]))
                if entity is None:
                    entity = entities[lv, part[0]] = Entity(dict(zip(names[lv], part,
                                                                     strict=True)))
                rows[lv] = entity
            yield Row(rows)
        if len(page) < page_size:
            return  # the last page: no need to ask again


@functools.cache
def _entity_columns(level: Level) -> tuple[str, ...]:
    """The columns a query reads of a level: id, attrs, and its computed keys' counters."""
    computed = (k.computed for k in KEYS.values() if k.level == level and k.computed)
    return ("id", "attrs", *dict.fromkeys(c for c in computed if c))


def page_select(
    query: Query, after: int = 0, page_size: int = 500, *, indexed: bool | None = None
) -> Any:
    """The SELECT of one page of candidates: rows of the query's level with an id above
    ``after``, joined to their parents, filtered by :func:`sql_conditions`, in id order,
    as tuples of :func:`_entity_columns` from the query level up.

    ``indexed`` (default: for the first page only, ``after == 0``) looks a name up through
    its group indexes. That plan reads every matching row and sorts it by id, for each
    page: a name matching few rows is answered at once, but one matching M rows would cost
    M per page. So a query whose first page comes back full reads on in id order, as a
    query without an indexed key does: at most one pass over the level's rows.

    Public so that the benchmark can show its plan (``EXPLAIN QUERY PLAN``) for each query.
    """
    base = _LEVEL_MODEL[query.level]
    columns = [getattr(_LEVEL_MODEL[lv], name)
               for lv in reversed(query.levels) for name in _entity_columns(lv)]
    select = base.select(*columns)
    child = base
    for lv in reversed(query.levels[:-1]):
        parent = _LEVEL_MODEL[lv]
        fk = {models.Study: models.Study.patient, models.Series: models.Series.study,
              models.Instance: models.Instance.series}[child]
        select = select.join(parent, on=(fk == parent.id))
        child = parent
    conds = sql_conditions(query, after == 0 if indexed is None else indexed)
    return (select.where(base.id > after, *conds).order_by(base.id).limit(page_size)
            .tuples())


# ---------------------------------------------------------------------------------------
# Responses
