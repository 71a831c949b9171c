"""Retention: which studies the rules of ``retention`` delete (issue 16, item 4).

Two rules, each off by default: studies older than ``max_age_days`` (by when the study first
arrived, or by its StudyDate; a study without a StudyDate is never old by date), and, while
the file store's disk is fuller than ``max_disk_percent``, the oldest studies (by arrival)
until enough bytes would be freed. A study that a ``protect`` search matches (a study-level
QIDO-RS query, matched as C-FIND matches) is never chosen. :func:`plan` only chooses; the
archive deletes each chosen study as ``minipacs delete`` does (:mod:`storage.removal`),
what was listed and nothing stored since.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import peewee as pw

from . import query
from .errors import InvalidQuery
from .models import Instance, Patient, Study

EARLIEST_STUDY_DATE = "19000101"
"""A StudyDate before this (``00000000``, ``18991230``: the placeholders of anonymised or
converted data) is taken for no date: never old by date."""

logger = logging.getLogger(__name__)

RECEIVED = "received"
STUDY_DATE = "study_date"
AGE_BY = (RECEIVED, STUDY_DATE)
"""What a study's age is counted from."""


@dataclass(frozen=True)
class RetentionRules:
    """The ``retention`` section, as storage reads it.

    Attributes
    ----------
    max_age_days : int
        Studies older than this go (0: no age rule).
    age_by : str
        :data:`RECEIVED` (when the study's first instance was stored) or
        :data:`STUDY_DATE`.
    max_disk_percent : float
        While the file store's disk is fuller than this, the oldest studies go (0: no disk
        rule).
    protect : tuple of queries
        Study-level QIDO-RS searches, each as (key, value) pairs; a study any of them
        matches is kept.
    """

    max_age_days: int = 0
    age_by: str = RECEIVED
    max_disk_percent: float = 0.0
    protect: tuple[tuple[tuple[str, str], ...], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.max_age_days or self.max_disk_percent)


@dataclass(frozen=True)
class Doomed:
    """A study a rule chose, and why."""

    study_instance_uid: str
    patient_id: str
    study_date: str
    received: datetime.datetime
    instances: int
    bytes: int
    reason: str
    file_keys: frozenset[str] = frozenset()
    """Its instances' files when it was chosen: only those are deleted."""


def plan(rules: RetentionRules, protected: Collection[int], used: int, total: int,
         now: datetime.datetime) -> list[Doomed]:
    """The studies ``rules`` delete now: those too old, then, while the disk (``used`` of
    ``total`` bytes) is fuller than allowed, the oldest others, never one of the study rows
    ``protected``. Oldest first."""
    chosen: dict[int, Doomed] = {}
    if rules.max_age_days:
        limit = now - datetime.timedelta(days=rules.max_age_days)
        if rules.age_by == STUDY_DATE:
            where = ((Study.study_date >= EARLIEST_STUDY_DATE)
                     & (Study.study_date < limit.strftime("%Y%m%d")))
            why = f"StudyDate before {limit:%Y-%m-%d} (max_age_days {rules.max_age_days})"
        else:
            where = Study.created_at < limit
            why = f"received before {limit:%Y-%m-%d %H:%M} UTC (max_age_days" \
                  f" {rules.max_age_days})"
        for row in _studies(where):
            if row["id"] not in protected:
                chosen[row["id"]] = _doomed(row, why)
    if rules.max_disk_percent and total:
        allowed = int(total * rules.max_disk_percent / 100)
        excess = used - allowed - sum(d.bytes for d in chosen.values())
        if excess > 0:
            chosen.update(_to_free(excess, protected, chosen, used, total, rules))
    return sorted(chosen.values(), key=lambda d: d.received)


def _to_free(excess: int, protected: Collection[int], chosen: dict[int, Doomed], used: int,
             total: int, rules: RetentionRules) -> dict[int, Doomed]:
    """The oldest studies whose files hold ``excess`` bytes; none when all of them would
    not (what fills the disk is not the archive: deleting it all would not help)."""
    why = f"the disk is {100 * used / total:.1f} % full (max_disk_percent" \
          f" {rules.max_disk_percent:g})"
    out: dict[int, Doomed] = {}
    for row in _studies(Study.id > 0):
        if excess <= 0:
            return out
        if row["id"] in protected or row["id"] in chosen:
            continue
        doomed = _doomed(row, why)
        out[row["id"]] = doomed
        excess -= doomed.bytes
    if excess > 0:
        logger.error("retention: the disk is %.1f %% full, above max_disk_percent %g, but the"
                     " studies retention may delete hold too little to bring it under: none"
                     " is deleted for the disk (what fills it?)", 100 * used / total,
                     rules.max_disk_percent)
        return {}
    return out


def protect_problem(search: tuple[tuple[str, str], ...]) -> str | None:
    """Why ``search`` cannot be a ``retention.protect`` search, or ``None``: not a valid
    study-level QIDO-RS search, one that matches every study, or one with paging."""
    try:
        parsed = query.parse_search(search, query.Level.STUDY)
    except InvalidQuery as exc:
        return str(exc)
    if parsed.offset or parsed.limit is not None:
        return "limit and offset have no place in it"
    if not parsed.query.constraints:
        return "it matches every study"
    return None


def _studies(where: Any) -> list[dict[str, Any]]:
    """The studies ``where`` selects, oldest received first, with their bytes."""
    size = (Instance.select(pw.fn.COALESCE(pw.fn.SUM(Instance.file_size), 0))
            .where(Instance.study == Study.id))
    query: Any = (Study.select(Study.id, Study.study_instance_uid, Study.study_date,
                               Study.created_at, Study.num_instances, Patient.patient_id,
                               size.alias("bytes"))
                  .join(Patient).where(where).order_by(Study.created_at, Study.id).dicts())
    return list(query)


def _doomed(row: dict[str, Any], reason: str) -> Doomed:
    received = row["created_at"]
    if isinstance(received, str):  # SQLite: the text stored
        received = Study.created_at.python_value(received)
    return Doomed(row["study_instance_uid"], row["patient_id"], row["study_date"], received,
                  int(row["num_instances"]), int(row["bytes"] or 0), reason)


__all__ = ["AGE_BY", "EARLIEST_STUDY_DATE", "RECEIVED", "STUDY_DATE", "Doomed",
           "RetentionRules", "plan", "protect_problem"]
