"""The query model: identifier -> constraints -> SQL + residual matching -> responses.

Parsing (:func:`parse_identifier`) checks the identifier against the hierarchical rules of
PS3.4 C.4.1.2.1 and turns every key into a :class:`Constraint` made of OR'ed :class:`Term`
objects, one kind per matching rule of PS3.4 C.2.2.2. Execution pushes into SQL what the
index columns can answer (:func:`sql_conditions`), as a filter that may let extra rows
through but never drops a match, then checks every constraint again in Python
(:func:`row_matches`) and builds the response identifiers (:func:`build_response`).
Nothing here knows the network: DICOMweb or the command line can reuse all of it.
"""

from __future__ import annotations

import enum
import functools
import json
import operator
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import peewee as pw
from pydicom.charset import convert_encodings, decode_bytes, encode_string, python_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from . import models
from .errors import InvalidQuery
from .keys import KEYS, UNIQUE_KEY, Key, Level, Model, level_of
from .values import (
    NUMERIC_VRS,
    PN_GROUPS,
    WILDCARD_VRS,
    clean_text,
    fold,
    json_strings,
    norm_da,
    norm_dt,
    norm_pn,
    norm_tm,
    of_the_clock_and_calendar,
    strip,
)

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
TIMEZONE_OFFSET_FROM_UTC = 0x00080201
RETRIEVE_AE_TITLE = 0x00080054
UTF8 = "ISO_IR 192"


class Op(enum.Enum):
    """How one term of a constraint compares a stored value."""

    EQ = "eq"  # PS3.4 C.2.2.2.1 Single Value Matching (and each item of C.2.2.2.2 UID lists)
    WILDCARD = "wildcard"  # PS3.4 C.2.2.2.4 Wild Card Matching
    RANGE = "range"  # PS3.4 C.2.2.2.5 Range Matching (and TM single values, see parse)


@dataclass(frozen=True)
class Term:
    """One alternative of a constraint; values are normalised for the key's VR."""

    op: Op
    value: str = ""
    upper: str = ""  # RANGE only: inclusive upper bound, "" = open
    written_range: bool = False  # RANGE written with "-" (not a single value's precision)


class Kind(enum.Enum):
    TERMS = "terms"  # any of the terms matches
    EMPTY = "empty"  # PS3.4 C.2.2.2.7 Empty Value Matching
    SEQUENCE = "sequence"  # PS3.4 C.2.2.2.6 Sequence Matching
    DATETIME = "datetime"  # PS3.4 C.2.2.2.5.1 combined date and time range matching


# Date and time attributes matched as one date-time when combined matching is negotiated.
DATE_TIME_PAIRS: dict[int, int] = {
    0x00080020: 0x00080030,  # StudyDate, StudyTime
    0x00080021: 0x00080031,  # SeriesDate, SeriesTime
    0x00080022: 0x00080032,  # AcquisitionDate, AcquisitionTime
    0x00080023: 0x00080033,  # ContentDate, ContentTime
    0x00100030: 0x00100032,  # PatientBirthDate, PatientBirthTime
    0x00400244: 0x00400245,  # PerformedProcedureStepStartDate, ...StartTime
    0x00080012: 0x00080013,  # InstanceCreationDate, InstanceCreationTime
}


@dataclass(frozen=True)
class Constraint:
    """A non-universal key of the identifier, ready to match."""

    tag: int
    vr: str
    level: Level
    kind: Kind
    terms: tuple[Term, ...] = ()
    items: tuple[Constraint, ...] = ()
    key: Key | None = None
    pair: tuple[int, int] = (0, 0)  # DATETIME: the (date, time) tags matched together
    all_terms: bool = False  # PS3.4 C.2.2.2.8 Multiple Value Matching, when negotiated

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) or f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"


@dataclass(frozen=True)
class Requested:
    """A key to return: its tag, VR (as the SCU sent it), level and, for a sequence, the
    item keys asked for, themselves perhaps sequences (empty: the whole sequence)."""

    tag: int
    vr: str
    level: Level
    items: tuple[Requested, ...] = ()


@dataclass(frozen=True)
class Query:
    """A parsed, validated C-FIND identifier."""

    model: Model
    level: Level
    constraints: tuple[Constraint, ...]
    requested: tuple[Requested, ...]
    charset: tuple[str, ...] = ()
    fold_pn: bool = True
    ignored: tuple[str, ...] = field(default=())  # keys with a value we cannot match

    @property
    def levels(self) -> tuple[Level, ...]:
        """The levels whose rows a response needs, top down to the query level."""
        return tuple(lv for lv in Level if lv <= self.level)


# ---------------------------------------------------------------------------------------
# Parsing


def parse_identifier(
    identifier: Dataset,
    model: Model,
    fold_pn: bool = True,
    *,
    relational: bool = False,
    combined_datetime: bool = False,
    multiple_values: bool = False,
) -> Query:
    """Turn a C-FIND identifier into a :class:`Query`.

    Parameters
    ----------
    identifier : pydicom.dataset.Dataset
        The identifier as received; it is not modified.
    model : Model
        The information model of the request's SOP Class.
    fold_pn : bool
        Match PN case- and accent-insensitively (our default; PS3.4 C.2.2.2.1 leaves it to
        the implementation).
    relational : bool
        Relational queries were negotiated (PS3.4 C.4.1.2.2): the Unique keys of the levels
        above need not be given.
    combined_datetime : bool
        Combined date and time range matching was negotiated (PS3.4 C.2.2.2.5.1).
    multiple_values : bool
        Multiple value matching was negotiated (PS3.4 C.2.2.2.8): an entity matches a key
        with several values only if each of them matches one of its values. Without it,
        several values are OR'ed (our documented choice; UID lists are always OR'ed).

    Raises
    ------
    InvalidQuery
        When the identifier breaks PS3.4 C.4.1.2.1 or holds a malformed value.
    """
    try:
        raw_level = identifier.get("QueryRetrieveLevel", None)
    except Exception as exc:
        raise InvalidQuery(f"identifier cannot be decoded: {exc}") from exc
    if not raw_level:
        raise InvalidQuery("QueryRetrieveLevel (0008,0052) is missing")
    name = str(raw_level).strip().upper()
    if name not in Level.__members__:
        raise InvalidQuery(f"unknown QueryRetrieveLevel {name!r}")
    level = Level[name]
    # PS3.4 C.6.2: Study Root has no PATIENT level
    if level not in model.levels:
        raise InvalidQuery(f"level {name} is not part of the {model.value} model")

    charset = _charset_of(identifier)
    constraints: list[Constraint] = []
    requested: list[Requested] = []
    ignored: list[str] = []
    try:
        elements = list(identifier)
    except Exception as exc:
        raise InvalidQuery(f"identifier cannot be decoded: {exc}") from exc
    for elem in elements:
        tag = int(elem.tag)
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, TIMEZONE_OFFSET_FROM_UTC):
            # control attributes of the request (PS3.4 C.4.1.1.3.1), not keys
            continue
        if tag == RETRIEVE_AE_TITLE:
            # not an attribute of the stored entities: every response names where its
            # entity can be retrieved from (PS3.4 C.4.1.1.3.2), whatever the request holds
            continue
        if (tag >> 16) == 0x0002 or (tag & 0xFFFF) == 0:
            continue  # never group lengths or file meta (PS3.4 C.4.1.1.3.2)
        key_level = _key_level(tag, model)
        key = _key_for(tag)
        if key_level > level:
            # PS3.4 C.4.1.2.1: keys below the query level are not allowed. We refuse the
            # Unique keys (a clear hierarchy error) and ignore other lower-level keys, which
            # common viewers send at STUDY level; they come back empty.
            if key is not None and key.unique:
                raise InvalidQuery(f"{key.keyword} is below the query level {name}")
            if _has_value(elem):
                ignored.append(elem.keyword or str(elem.tag))
            requested.append(Requested(tag, elem.VR, key_level))
            continue
        requested.append(_requested(elem, key_level))
        and_values = multiple_values and _vr_of(elem) != "UI"
        constraint = _constraint(elem, key_level, key, fold_pn, and_values)
        if constraint is not None:
            constraints.append(constraint)
        elif _vr_of(elem) in _UNMATCHABLE_VRS and _has_value(elem):
            ignored.append(elem.keyword or str(elem.tag))  # 10: reported with FF01

    if combined_datetime:
        constraints = _combine_date_time(constraints)

    # PS3.4 C.4.1.2.1: the Unique key of each level above the query level is present and
    # holds a single value (or, PS3.4 C.2.2.2.2, a list of UIDs). A relational query
    # (PS3.4 C.4.1.2.2) may leave them out.
    for upper in model.levels:
        if upper >= level or relational:
            break
        keyword = UNIQUE_KEY[upper]
        match = next((c for c in constraints if c.key and c.key.keyword == keyword), None)
        if match is not None and match.kind is Kind.EMPTY and keyword == "PatientID":
            # PatientID is Type 2 (PS3.3 C.7.1.1): a patient may have none. Our extension
            # (README, "How images are kept"): '""' (PS3.4 C.2.2.2.7 Empty Value Matching)
            # stands for that missing value, so that a hierarchical Patient Root query
            # reaches the patients without one, all of them at once. C.4.1.2.1 asks for a
            # single value; Study Root and relational queries are the standard's ways.
            continue
        if match is None or match.kind is not Kind.TERMS or any(
            t.op is not Op.EQ for t in match.terms
        ):
            hint = _NO_PATIENT_ID_HINT if keyword == "PatientID" else ""
            raise InvalidQuery(
                f"{keyword} must hold a single value for a {name} level query{hint}")

    return Query(
        model=model,
        level=level,
        constraints=tuple(constraints),
        requested=tuple(requested),
        charset=charset,
        fold_pn=fold_pn,
        ignored=tuple(ignored),
    )


_NO_PATIENT_ID_HINT = (' (for patients without a PatientID: \'""\', PS3.4 C.2.2.2.7, or a'
                       ' relational query)')


def _combine_date_time(constraints: list[Constraint]) -> list[Constraint]:
    """PS3.4 C.2.2.2.5.4: with combined matching negotiated, a date key and its time key
    that hold the same form of range are matched together: ``StudyDate=20240101-20240102``
    with ``StudyTime=2200-0600`` is 1 January 22:00 to 2 January 06:00. The date constraint
    stays too (every match satisfies it, and it can use the index)."""
    by_tag = {c.tag: c for c in constraints}
    for date_tag, time_tag in DATE_TIME_PAIRS.items():
        date, time = by_tag.get(date_tag), by_tag.get(time_tag)
        if date is None or time is None or len(date.terms) != 1 or len(time.terms) != 1:
            continue
        d, t = date.terms[0], time.terms[0]
        # only "both of which specify the same form of Range Matching" (D1-D2 with T1-T2,
        # -D with -T, D- with T-); single values are matched each on its own
        if not (d.written_range and t.written_range) or (
            bool(d.value) != bool(t.value) or bool(d.upper) != bool(t.upper)
        ):
            continue
        # a time bound without a date bound has no meaning in a combined range
        lower = d.value + t.value if d.value and t.value else d.value
        upper = d.upper + t.upper if d.upper and t.upper else (
            d.upper + "235959.999999" if d.upper else "")
        if d.value and not t.value:
            lower = d.value + "000000.000000"
        combined = Constraint(time_tag, "DT", time.level, Kind.DATETIME,
                              (Term(Op.RANGE, lower, upper),), pair=(date_tag, time_tag))
        constraints = [combined if c is time else c for c in constraints]
    return constraints


def _charset_of(identifier: Dataset) -> tuple[str, ...]:
    value = identifier.get("SpecificCharacterSet", None)
    if not value:
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(str(v).strip() for v in value)


@functools.lru_cache(maxsize=1024)
def _key_for(tag: int) -> Key | None:
    keyword = keyword_for_tag(tag)
    return KEYS.get(keyword) if keyword else None


def _key_level(tag: int, model: Model) -> Level:
    key = _key_for(tag)
    level = key.level if key else level_of(tag)
    # PS3.4 C.6.2.1: in Study Root the patient attributes are STUDY level keys
    if model is Model.STUDY_ROOT and level is Level.PATIENT:
        return Level.STUDY
    return level


def _has_value(elem: DataElement) -> bool:
    value = elem.value
    if elem.VR == "SQ":
        return bool(value) and any(len(item) for item in value)
    return value not in (None, "", b"") and not (isinstance(value, list) and not value)


_UNMATCHABLE_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def _vr_of(elem: DataElement) -> str:
    """The dictionary VR of a known key (an SCU may send PatientName as LO), else the VR
    the element came with (private keys, and the ambiguous "US or SS" kind)."""
    try:
        vr = str(dictionary_VR(elem.tag))
    except KeyError:
        return str(elem.VR)
    return str(elem.VR) if " or " in vr else vr


def _requested(elem: DataElement, level: Level) -> Requested:
    items: tuple[Requested, ...] = ()
    if elem.VR == "SQ" and elem.value:
        items = tuple(_requested(e, level) for e in elem.value[0])
    return Requested(int(elem.tag), elem.VR, level, items)


def _texts(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if elem.VR == "AT":  # as DICOM JSON stores them: "00100010"
        tags = value if isinstance(value, MultiValue | list | tuple) else [value]
        return [f"{int(t):08X}" for t in tags]
    if isinstance(value, MultiValue | list | tuple):
        return [clean_text(str(v)) for v in value]
    if isinstance(value, bytes):
        raise InvalidQuery(f"{elem.keyword or elem.tag}: binary values cannot be matched")
    return [clean_text(str(value))]


def _constraint(
    elem: DataElement, level: Level, key: Key | None, fold_pn: bool, all_values: bool = False
) -> Constraint | None:
    """Return the constraint for one element, or ``None`` for universal matching."""
    tag = int(elem.tag)
    vr = _vr_of(elem)
    if vr == "SQ":
        return _sequence_constraint(elem, level, key, fold_pn)
    if vr in _UNMATCHABLE_VRS:
        return None  # not matchable: returned only (and reported, see parse_identifier)
    texts = _texts(elem)
    # PS3.4 C.2.2.2.3 Universal Matching: a zero-length value
    if not texts or all(t == "" for t in texts):
        return None
    # PS3.4 C.2.2.2.7 Empty Value Matching: the value is two quotation marks
    if len(texts) == 1 and texts[0].strip() == '""':
        return Constraint(tag, vr, level, Kind.EMPTY, key=key)
    terms: list[Term] = []
    for text in texts:
        term = _term(vr, text, elem.keyword or str(elem.tag), fold_pn)
        if term is None:  # a lone "*": PS3.4 C.2.2.2.4, equivalent to Universal Matching
            if all_values:
                continue  # under AND semantics it only drops out of the list
            return None
        terms.append(term)
    if not terms:
        return None
    return Constraint(tag, vr, level, Kind.TERMS, tuple(terms), key=key,
                      all_terms=all_values and len(terms) > 1)


def _term(vr: str, text: str, name: str, fold_pn: bool) -> Term | None:
    value = strip(vr, text)
    if value and set(value) == {"*"}:
        return None
    if vr in ("DA", "TM", "DT"):
        return _date_term(vr, value, name)
    if vr == "PN":
        value = norm_pn(value)
        if fold_pn:
            value = fold(value)
    # PS3.4 C.2.2.2.4: "*" and "?" are wildcards only for these VRs
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return Term(Op.WILDCARD, value)
    if vr in NUMERIC_VRS:
        try:
            float(value)
        except ValueError:
            raise InvalidQuery(f"{name}: {text!r} is not a number") from None
    return Term(Op.EQ, value)


def _date_term(vr: str, value: str, name: str) -> Term:
    def norm(text: str) -> str:
        return _real(vr, {"DA": norm_da, "TM": norm_tm, "DT": norm_dt}[vr](text))

    # PS3.4 C.2.2.2.5: "-" separates a range; a single DT value cannot carry a negative UTC
    # offset in a query (PS3.4 C.2.2.2.1.3), so "-" always means a range here too.
    parts = value.split("-") if "-" in value else [value]
    if len(parts) > 2:
        raise InvalidQuery(f"{name}: malformed range {value!r}")
    if len(parts) == 2:
        lower_text, upper_text = (p.strip() for p in parts)
        lower = norm(lower_text) if lower_text else ""
        upper = _upper(vr, upper_text) if upper_text else ""
        if (lower_text and not lower) or (upper_text and not upper) or not (lower or upper):
            raise InvalidQuery(f"{name}: malformed {vr} range {value!r}")
        return Term(Op.RANGE, lower, upper, written_range=True)
    single = norm(value)
    if not single:
        raise InvalidQuery(f"{name}: malformed {vr} value {value!r}")
    if vr in ("TM", "DT"):
        # A time is matched over its stated precision: "1200" is 12:00:00 to 12:00:59.999999,
        # a DT "2024" all of 2024.
        return Term(Op.RANGE, single, _upper(vr, value))
    return Term(Op.EQ, single)


def _upper(vr: str, text: str) -> str:
    """The inclusive upper end of a value's stated precision (PS3.4 C.2.2.2.5), or ``""``
    when it is not a date of the calendar or a time of the clock."""
    if vr == "TM":
        out = norm_tm(text, upper=True)
    elif vr == "DT":
        out = norm_dt(text, upper=True)
    else:
        out = norm_da(text)
    return _real(vr, out)


def _real(vr: str, normalised: str) -> str:
    """``normalised`` if it is a date of the calendar or a time of the clock, else ``""``.

    PS3.5 Table 6.2-1: a query's dates and times must be real ones, range ends included
    ("20240230", "2500": A900), where stored values are taken as written
    (:func:`storage.values.norm_da`)."""
    return normalised if normalised and of_the_clock_and_calendar(vr, normalised) else ""


def _sequence_constraint(
    elem: DataElement, level: Level, key: Key | None, fold_pn: bool
) -> Constraint | None:
    # PS3.4 C.2.2.2.6: one item whose keys are matched against each stored item
    items = elem.value
    if not items:
        return None
    if len(items) > 1:
        raise InvalidQuery(f"{elem.keyword}: a sequence key holds one item")
    sub: list[Constraint] = []
    for sub_elem in items[0]:
        c = _constraint(sub_elem, level, None, fold_pn)
        if c is not None:
            sub.append(c)
    if not sub:
        return None
    return Constraint(int(elem.tag), "SQ", level, Kind.SEQUENCE, items=tuple(sub), key=key)


# ---------------------------------------------------------------------------------------
# Matching (the reference: every constraint is checked here, whatever SQL already did)


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


# ---------------------------------------------------------------------------------------
# Rows: the level rows of one match, and their values


_LEVEL_MODEL: dict[Level, type[models.BaseModel]] = {
    Level.PATIENT: models.Patient,
    Level.STUDY: models.Study,
    Level.SERIES: models.Series,
    Level.IMAGE: models.Instance,
}


class Entity:
    """One index row of one level, as a query reads it: its ``id``, its DICOM JSON
    (``attrs``, decoded once, on first use) and the counters of its computed keys."""

    id: int
    attrs: str

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)  # id, attrs, counters (_entity_columns)
        self.decoded: dict[str, Any] | None = None


class Row:
    """The rows of one match, one per level down to the query level."""

    def __init__(self, rows: dict[Level, Any]) -> None:
        self.rows = rows

    def attrs(self, level: Level) -> dict[str, Any]:
        entity = self.rows[level]
        if entity.decoded is None:
            entity.decoded = json.loads(entity.attrs or "{}")
        return cast(dict[str, Any], entity.decoded)

    def element(self, tag: int, level: Level) -> dict[str, Any] | None:
        """The DICOM JSON of ``tag`` at ``level`` (computed keys included)."""
        key = _key_for(tag)
        if key is not None and key.computed:
            return _computed_json(key, self.rows[key.level])
        return self.attrs(level).get(f"{tag:08X}")


def _computed_json(key: Key, row: Any) -> dict[str, Any]:
    value = getattr(row, key.computed or "")
    if isinstance(value, int):
        return {"vr": "IS", "Value": [value]}
    values = [v for v in str(value).split("\\") if v]
    return {"vr": key.vr, "Value": values} if values else {"vr": key.vr}


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


def _storage_level(tag: int) -> Level:
    """The level whose row keeps the attribute (Study Root patient keys: the patient row)."""
    key = _key_for(tag)
    return key.level if key else level_of(tag)


# ---------------------------------------------------------------------------------------
# SQL push-down


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


AUTO = "auto"


def build_response(
    query: Query, row: Row, charset: str = AUTO, retrieve_ae_title: str = ""
) -> Dataset:
    """The response identifier of one match (PS3.4 C.4.1.1.3.2).

    It holds exactly the requested keys (zero-length where the match has no value),
    QueryRetrieveLevel, RetrieveAETitle (0008,0054) naming ``retrieve_ae_title`` (the AE a
    C-MOVE or C-GET of the entity goes to) when given, and SpecificCharacterSet naming
    the encoding of its values: ``charset`` "auto" answers in the query's character set
    when it can, another value (``query.response_charset``) in that set when it can; else
    ISO_IR 192.
    """
    elements, specific_charset = _response_elements(query, row, charset, retrieve_ae_title)
    ds = Dataset()
    for element in elements.values():
        ds.add(element.data_element())
    ds.SpecificCharacterSet = specific_charset
    return ds


def encode_response(
    query: Query,
    row: Row,
    charset: str = AUTO,
    retrieve_ae_title: str = "",
    *,
    implicit_vr: bool = False,
) -> bytes:
    """:func:`build_response`, encoded in Implicit (or Explicit) VR Little Endian.

    The same bytes as pydicom's writer gives for :func:`build_response`'s data set (pinned
    by tests/storage/test_response_encoding.py), made faster: elements whose value is plain
    ASCII text (most of every response) are packed here; every other one (sequences,
    binary VRs, DS, text outside ASCII) is written by pydicom on its own. Streaming
    responses is bound by this (issue 6, bench/README.md "Scale").
    """
    elements, specific_charset = _response_elements(query, row, charset, retrieve_ae_title)
    charset_value = (None if not specific_charset
                     else [specific_charset] if isinstance(specific_charset, str)
                     else list(specific_charset))
    elements[SPECIFIC_CHARACTER_SET] = _Out(SPECIFIC_CHARACTER_SET, "CS", charset_value)
    out = []
    for tag in sorted(elements):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # pydicom never writes retired group lengths (PS3.5 7.2)
        out.append(elements[tag].encode(implicit_vr, specific_charset))
    return b"".join(out)


@dataclass
class _Out:
    """One element of a response, as DICOM JSON, before it is encoded."""

    tag: int
    vr: str
    value: list[Any] | None  # None: zero length
    value_key: str = "Value"

    def data_element(self) -> DataElement:
        if self.value is None:
            return DataElement(self.tag, self.vr, [] if self.vr == "SQ" else None)
        return DataElement.from_json(Dataset, f"{self.tag:08X}", self.vr, self.value,
                                     self.value_key)

    def encode(self, implicit_vr: bool, specific_charset: str | list[str]) -> bytes:
        value = _ascii_value(self.vr, self.value) if self.value_key == "Value" else None
        if value is None or (not implicit_vr and len(value) > 0xFFFE
                             and self.vr not in _LONG_VRS):
            return _pydicom_element(self.data_element(), implicit_vr, specific_charset)
        group, elem = self.tag >> 16, self.tag & 0xFFFF
        if implicit_vr:
            return struct.pack("<HHL", group, elem, len(value)) + value
        vr = self.vr.encode("ascii")
        if self.vr in _LONG_VRS:
            return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


_LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)  # PS3.5 Table 7.1-1
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                        "TM", "UC", "UI", "UR", "UT"})
_SINGLE_VALUED = frozenset({"LT", "ST", "UR", "UT"})


def _ascii_value(vr: str, values: list[Any] | None) -> bytes | None:
    """The value bytes of a text element whose every value is ASCII, padded as pydicom
    pads them (PS3.5 6.2: UI with NUL, the rest with a space); ``None`` for anything else,
    which pydicom then writes."""
    if values is None:
        return b""
    if vr not in _ASCII_VRS or (vr in _SINGLE_VALUED and len(values) != 1):
        return None
    texts = []
    for value in values:
        if vr == "PN":
            if not isinstance(value, dict):
                return None
            # as pydicom's JSON reader joins the groups: up to the last one present
            last = max((i for i, g in enumerate(PN_GROUPS) if g in value), default=0)
            groups = [value.get(g, "") for g in PN_GROUPS[:last + 1]]
            if not all(isinstance(g, str) for g in groups):
                return None
            # and as its PersonName writes them: empty trailing groups dropped
            parts = "=".join(groups).split("=")
            while parts and not parts[-1]:
                parts.pop()
            if len(parts) > len(PN_GROUPS):
                return None
            value = "=".join(parts)
        elif vr == "IS":
            if type(value) is not int:
                return None
            value = str(value)
        elif not isinstance(value, str):
            return None
        elif vr == "UI":
            value = value.strip()  # as pydicom's UID does
        if "\\" in value:
            return None  # pydicom splits it into values, and treats each one apart
        texts.append(value)
    text = "\\".join(texts)
    if not text.isascii():
        return None
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def _pydicom_element(element: DataElement, implicit_vr: bool,
                     specific_charset: str | list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit_vr
    write_data_element(fp, element, specific_charset or None)
    return fp.getvalue()


def _response_elements(
    query: Query, row: Row, charset: str, retrieve_ae_title: str
) -> tuple[dict[int, _Out], str | list[str]]:
    """The elements of a response by tag (SpecificCharacterSet apart), and the
    SpecificCharacterSet that can encode them."""
    elements = {QUERY_RETRIEVE_LEVEL: _Out(QUERY_RETRIEVE_LEVEL, "CS", [query.level.name])}
    if retrieve_ae_title:
        elements[RETRIEVE_AE_TITLE] = _Out(RETRIEVE_AE_TITLE, "AE", [retrieve_ae_title])
    texts: list[str] = []
    sequences = {c.tag: c for c in query.constraints if c.kind is Kind.SEQUENCE}
    for req in query.requested:
        element = None
        if req.level <= query.level:
            element = row.element(req.tag, _storage_level(req.tag))
        if element and req.tag in sequences:
            element = _matching_items(element, sequences[req.tag], query.fold_pn)
        elements[req.tag] = _element(req, element, texts)
    elements.pop(SPECIFIC_CHARACTER_SET, None)
    wanted = query.charset if charset == AUTO else (charset,)
    return elements, response_charset(wanted, texts)


def _element(req: Requested, element: dict[str, Any] | None, texts: list[str]) -> _Out:
    if not element or ("Value" not in element and "InlineBinary" not in element):
        vr = req.vr if req.vr not in ("UN", "") else _dictionary_vr(req.tag)
        return _Out(req.tag, vr, None)
    vr = element.get("vr", req.vr)
    value: Any = element.get("Value", element.get("InlineBinary"))
    if vr == "SQ" and req.items:
        value = [_requested_only(item, req.items) for item in value if isinstance(item, dict)]
    value_key = "Value" if "Value" in element else "InlineBinary"
    texts.extend(_all_text(value))
    return _Out(req.tag, vr, value, value_key)


def _matching_items(element: dict[str, Any], c: Constraint, fold_pn: bool) -> dict[str, Any]:
    """PS3.4 C.2.2.2.6: "a sequence of matching Items" is returned, not every stored item."""
    items = [i for i in element.get("Value", []) if isinstance(i, dict)]
    return {**element, "Value": [i for i in items if _item_matches(c.items, i, fold_pn)]}


def _requested_only(item: dict[str, Any], wanted: tuple[Requested, ...]) -> dict[str, Any]:
    """An item holding only the requested item keys, nested sequences filtered alike."""
    out: dict[str, Any] = {}
    for req in wanted:
        key = f"{req.tag:08X}"
        if key not in item:
            continue
        element = item[key]
        if req.items and element.get("vr") == "SQ":
            sub = [_requested_only(i, req.items) for i in element.get("Value", [])
                   if isinstance(i, dict)]
            element = {**element, "Value": sub}
        out[key] = element
    return out


def _dictionary_vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


def _all_text(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _all_text(v)
    elif isinstance(value, list):
        for v in value:
            yield from _all_text(v)


_ASCII_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
# sets pydicom 3.0 cannot encode correctly (it writes IR 58 without its escape sequence)
_NOT_ECHOED = frozenset({"ISO 2022 IR 58"})


def response_charset(query_charset: Sequence[str], texts: Sequence[str]) -> str | list[str]:
    """The SpecificCharacterSet of a response (PS3.5 6.1; PS3.4 C.4.1.1.3.2).

    The query's own character set when pydicom knows it and it can encode every value of
    the response (with ISO 2022 code extensions, every character by one of the sets), else
    ISO_IR 192 (UTF-8), so that no character is lost and the declared set is always true of
    the bytes. The default repertoire (empty, ISO_IR 6) only covers ASCII.
    """
    known = bool(query_charset) and all(
        term in python_encoding and term not in _NOT_ECHOED for term in query_charset
    )
    echo: str | list[str] = (
        list(query_charset) if len(query_charset) > 1 else (query_charset or ("",))[0]
    )
    if all(t.isascii() for t in texts):
        return echo if known else UTF8
    if known and all(_pydicom_keeps(t, tuple(query_charset)) for t in texts if not t.isascii()):
        return echo
    return UTF8


@functools.lru_cache(maxsize=4096)
def _pydicom_keeps(text: str, charset: tuple[str, ...]) -> bool:
    """Whether pydicom, encoding ``text`` in ``charset`` as it will for the response, keeps
    every character and writes bytes that ``charset`` allows.

    pydicom's own encoder decides (its choices differ from Python's codecs: it tries the
    first set first, writes JIS X 0208 only through ESC $ B, JIS X 0201 single-byte only).
    Each PN component is checked on its own, as escape sequences end at delimiters. A value
    outside ASCII under a default first set (``""``, ISO_IR 6) needs an escape sequence.
    """
    encodings = convert_encodings(list(charset))
    ascii_first = charset[0] in _ASCII_TERMS
    for piece in re.split(r"[\^=]", text):
        if piece.isascii():
            continue
        try:  # on failure pydicom warns (once) and replaces: the round trip shows it
            raw = encode_string(piece, encodings)
            back = decode_bytes(raw, encodings, set())
        except (UnicodeError, LookupError, ValueError):
            return False
        if back != piece or (ascii_first and b"\x1b" not in raw):
            return False
    return True


def response_charset_problem(value: str) -> str | None:
    """Why ``value`` cannot be ``query.response_charset`` (None if it can)."""
    if value == AUTO or (value in python_encoding and value not in _NOT_ECHOED
                         and not value.startswith("ISO 2022")):
        return None
    return ("must be auto or a single-byte or stand-alone character set pydicom knows "
            "(ISO_IR 100, ISO_IR 192, GB18030, ...)")


__all__ = [
    "Constraint",
    "Kind",
    "Op",
    "Query",
    "Requested",
    "Row",
    "Term",
    "build_response",
    "encode_response",
    "constraint_matches",
    "parse_identifier",
    "row_matches",
    "select_rows",
    "sql_conditions",
    "wildcard_sql",
]
