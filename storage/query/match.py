"""Matching in Python: the reference. Every constraint is checked here (PS3.4 C.2.2.2),
whatever SQL already filtered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..values import (
    NUMERIC_VRS,
    fold,
    json_strings,
    norm_da,
    norm_dt,
    norm_pn,
    norm_tm,
    strip,
)
from .model import (
    Constraint,
    Kind,
    Op,
    Query,
    Row,
    Term,
    _storage_level,
)


def normalise(vr: str, value: str, fold_pn: bool) -> str:
    """Normalise a stored value the way :func:`_term` normalises a query value."""
    if vr == "PN":
        name = norm_pn(value)
        return fold(name) if fold_pn else name
    if vr == "DA":
        return norm_da(value)
    if vr == "TM":
        return norm_tm(value)
    if vr == "DT":
        return norm_dt(value)
    return strip(vr, value)


def wildcard_match(pattern: str, text: str) -> bool:
    """Whether ``text`` matches a DICOM wildcard ``pattern`` (PS3.4 C.2.2.2.4).

    ``*`` is any run of characters (also none), ``?`` exactly one character; everything else
    is literal. The pattern is cut at each ``*``: the first piece must match at the start,
    the last at the end, and each piece between at its leftmost place after the previous
    one (leftmost is always right). Pieces without ``?`` are found with ``str.find``, so no
    pattern makes the matcher backtrack.
    """
    pieces = pattern.split("*")
    if len(pieces) == 1:
        return len(text) == len(pattern) and _piece_at(pattern, text, 0)
    first, *middle, last = pieces
    if len(first) + len(last) > len(text):
        return False
    if not _piece_at(first, text, 0) or not _piece_at(last, text, len(text) - len(last)):
        return False
    pos, end = len(first), len(text) - len(last)
    for piece in middle:
        found = _find_piece(piece, text, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def _piece_at(piece: str, text: str, at: int) -> bool:
    """Whether ``piece`` (literals and ``?``) matches ``text`` at position ``at``."""
    if "?" not in piece:
        return text.startswith(piece, at)
    return all(p == "?" or p == text[at + i] for i, p in enumerate(piece))


def _find_piece(piece: str, text: str, start: int, end: int) -> int:
    """The leftmost position in ``text[start:end]`` where ``piece`` matches, or -1."""
    if "?" not in piece:
        return text.find(piece, start, end)
    # anchor on the longest literal run of the piece, then check the ``?`` around it
    run = max(piece.split("?"), key=len)
    offset = piece.find(run) if run else 0
    pos = start
    while pos + len(piece) <= end:
        if run:
            hit = text.find(run, pos + offset, end - (len(piece) - offset - len(run)))
            if hit < 0:
                return -1
            pos = hit - offset
        if _piece_at(piece, text, pos):
            return pos
        pos += 1
    return -1


def _term_matches(term: Term, vr: str, stored: str) -> bool:
    if term.op is Op.RANGE:
        # PS3.4 C.2.2.2.5: inclusive at both ends, open where a bound is missing
        return (not term.value or stored >= term.value) and (
            not term.upper or stored <= term.upper
        )
    if vr == "PN":
        return _pn_matches(term, stored)
    if term.op is Op.WILDCARD:
        return wildcard_match(term.value, stored)
    if vr in NUMERIC_VRS:
        try:
            return float(stored) == float(term.value)
        except ValueError:
            return False
    return stored == term.value


def _pn_matches(term: Term, stored: str) -> bool:
    """Match a name group by group (PS3.5 6.2.1: alphabetic=ideographic=phonetic).

    A query value without "=" matches a name if any of its groups matches; a value with
    groups matches group by group, an empty query group matching anything.
    """
    def one(q: str, s: str) -> bool:
        if term.op is not Op.WILDCARD:
            return q == s
        # trailing empty components are insignificant (PS3.5 6.2.1): "Doe^John^*" matches
        # "Doe^John", which may be written "Doe^John^^^"
        return any(wildcard_match(q, s + "^" * k) for k in range(5 - min(s.count("^"), 4)))

    groups = stored.split("=")
    if "=" not in term.value:
        return any(one(term.value, g) for g in groups if g)
    wanted = term.value.split("=")
    return all(
        not q or one(q, groups[i] if i < len(groups) else "") for i, q in enumerate(wanted)
    )


def constraint_matches(c: Constraint, stored: Sequence[str], fold_pn: bool = True) -> bool:
    """Whether the stored values of one attribute satisfy ``c`` (not for sequences).

    A stored attribute that is absent or empty matches only Universal and Empty Value
    matching: we do not treat an unknown value as a match (a choice PS3.4 C.2.2.1.2 leaves
    open, documented in the README).
    """
    # a stored DA/TM/DT that is not a date or time normalises to "": it is no value
    present = [n for v in stored if v not in ("", None) if (n := normalise(c.vr, v, fold_pn))]
    if c.kind is Kind.EMPTY:
        return not present
    if not present:
        return False
    # PS3.4 C.2.2.3: a multi-valued stored attribute matches if any of its values does
    if c.all_terms:
        return all(any(_term_matches(t, c.vr, v) for v in present) for t in c.terms)
    return any(_term_matches(t, c.vr, v) for t in c.terms for v in present)


def _item_matches(constraints: Sequence[Constraint], item: dict[str, Any], fold_pn: bool) -> bool:
    for c in constraints:
        element = item.get(f"{c.tag:08X}", {})
        if c.kind is Kind.SEQUENCE:
            sub_items = [v for v in element.get("Value", []) if isinstance(v, dict)]
            if not any(_item_matches(c.items, s, fold_pn) for s in sub_items):
                return False
        elif not constraint_matches(c, json_strings(element), fold_pn):
            return False
    return True


def row_matches(query: Query, row: Row) -> bool:
    """Check every constraint of ``query`` against one match (the residual matching)."""
    for c in query.constraints:
        if c.kind is Kind.DATETIME:
            if not _datetime_matches(c, row):
                return False
            continue
        element = row.element(c.tag, _storage_level(c.tag)) or {}
        if c.kind is Kind.SEQUENCE:
            items = [v for v in element.get("Value", []) if isinstance(v, dict)]
            if not any(_item_matches(c.items, item, query.fold_pn) for item in items):
                return False
        elif not constraint_matches(c, json_strings(element), query.fold_pn):
            return False
    return True


def _datetime_matches(c: Constraint, row: Row) -> bool:
    date_tag, time_tag = c.pair
    dates = json_strings(row.element(date_tag, _storage_level(date_tag)) or {})
    times = json_strings(row.element(time_tag, _storage_level(time_tag)) or {})
    date = norm_da(dates[0]) if dates else ""
    if not date:
        return False  # no date: nothing to place in the range
    time = (norm_tm(times[0]) if times else "") or "000000.000000"
    return _term_matches(c.terms[0], "DT", date + time)


