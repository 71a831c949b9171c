"""The query model's types: a parsed :class:`Query` of :class:`Constraint` objects made of
:class:`Term` objects (PS3.4 C.2.2.2), what it asks back (:class:`Requested`), and the
:class:`Row` of one match as the index gives it."""

from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.datadict import keyword_for_tag

from ..keys import KEYS, Key, Level, Model, level_of

QUERY_RETRIEVE_LEVEL = 0x00080052
SPECIFIC_CHARACTER_SET = 0x00080005
TIMEZONE_OFFSET_FROM_UTC = 0x00080201
RETRIEVE_AE_TITLE = 0x00080054
INSTANCE_AVAILABILITY = 0x00080056
ONLINE = "ONLINE"
"""PS3.3 C.4.23.1.1: every instance here is on the archive's own disk, retrievable at once."""
UTF8 = "ISO_IR 192"

AUTO = "auto"
"""``query.response_charset``: answer in the query's own character set when it can."""




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


@functools.lru_cache(maxsize=1024)
def _key_for(tag: int) -> Key | None:
    keyword = keyword_for_tag(tag)
    return KEYS.get(keyword) if keyword else None


def _storage_level(tag: int) -> Level:
    """The level whose row keeps the attribute (Study Root patient keys: the patient row)."""
    key = _key_for(tag)
    return key.level if key else level_of(tag)


# ---------------------------------------------------------------------------------------
# SQL push-down


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


