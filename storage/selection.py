"""What ``delete`` and ``send`` act on: every instance of some patients (by PatientID),
studies, series and instances (by UID), as one selection (their union)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .index import StoredInstance
from .models import Instance, Patient, Series, Study


@dataclass(frozen=True)
class Selection:
    """What to act on: every instance of these patients (by PatientID, any issuer), studies,
    series and instances."""

    patient_ids: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    instance_uids: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    """Every study a study-level QIDO-RS search with these parameters matches (PS3.18
    10.6.1.2: ``StudyDate=20200101-20201231``, ``ModalitiesInStudy=CT``, ...), matched as
    C-FIND matches; :meth:`storage.Archive` resolves it into :attr:`study_ids`."""
    study_ids: tuple[int, ...] | None = None
    """The index rows of the studies :attr:`query` matched (``None``: not resolved yet)."""

    def __bool__(self) -> bool:
        return bool(self.patient_ids or self.study_uids or self.series_uids
                    or self.instance_uids or self.query)


def condition(selection: Selection) -> Any:
    """The peewee condition on :class:`~storage.models.Instance` rows the selection names
    (the selection must not be empty)."""
    conditions: list[Any] = []
    if selection.instance_uids:
        conditions.append(Instance.sop_instance_uid.in_(list(selection.instance_uids)))
    if selection.series_uids:
        conditions.append(Instance.series.in_(
            Series.select(Series.id).where(Series.series_instance_uid.in_(
                list(selection.series_uids)))))
    if selection.study_uids:
        conditions.append(Instance.study.in_(
            Study.select(Study.id).where(Study.study_instance_uid.in_(
                list(selection.study_uids)))))
    if selection.patient_ids:
        conditions.append(Instance.study.in_(
            Study.select(Study.id).join(Patient).where(Patient.patient_id.in_(
                list(selection.patient_ids)))))
    if selection.query:
        if selection.study_ids is None:
            raise ValueError("the selection's query is not resolved (Archive does it)")
        conditions.append(Instance.study.in_(list(selection.study_ids)))
    where = conditions[0]
    for other in conditions[1:]:
        where = where | other
    return where


def instances(selection: Selection) -> list[StoredInstance]:
    """The selected instances as a retrieve sends them, in the order they were stored
    (index rows only: no file is opened)."""
    if not selection:
        return []
    rows: Any = (Instance.select(Instance.sop_class_uid, Instance.sop_instance_uid,
                                 Instance.transfer_syntax_uid, Instance.file_key,
                                 Instance.file_size)
                 .where(condition(selection)).order_by(Instance.id).tuples())
    return [StoredInstance(*row) for row in rows]


def rows(selection: Selection) -> Iterator[tuple[str, str, int, int]]:
    """``(file_key, SOP Instance UID, study id, series id)`` of every selected instance."""
    query: Any = (Instance.select(Instance.file_key, Instance.sop_instance_uid, Instance.study,
                                  Instance.series)
                  .where(condition(selection)).order_by(Instance.id).tuples())
    yield from query
