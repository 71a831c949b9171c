"""Retention's choice of studies (storage.retention): the age rule, by arrival or by
StudyDate, the disk rule, and ``protect``."""

from __future__ import annotations

import datetime
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive, RetentionRules, Selection
from storage.models import Study
from storage.retention import STUDY_DATE, plan
from tests.factory import encode, make_ds, uid

NOW = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def study(archive: Archive, days_ago: float, count: int = 2, **keywords: Any) -> str:
    """A study of ``count`` instances, received ``days_ago``."""
    study_uid = uid()
    for _ in range(count):
        archive.store(encode(make_ds(StudyInstanceUID=study_uid, **keywords)),
                      ExplicitVRLittleEndian)
    Study.update(created_at=NOW - datetime.timedelta(days=days_ago)).where(
        Study.study_instance_uid == study_uid).execute()
    return study_uid


def chosen(archive: Archive, rules: RetentionRules) -> list[str]:
    return [d.study_instance_uid for d in archive.plan_retention(rules)]


def test_the_age_rule_by_arrival_and_by_study_date_and_protect(
        new_archive: Archive) -> None:
    archive = new_archive
    old = study(archive, 40, Modality="CT")
    old_mammo = study(archive, 50, Modality="MG")
    recent = study(archive, 5, Modality="CT", StudyDate="19990101")
    undated = study(archive, 60, Modality="CT", StudyDate=None)
    assert chosen(archive, RetentionRules(max_age_days=30)) == [undated, old_mammo, old]
    protect = ((("ModalitiesInStudy", "MG"),),)
    assert chosen(archive, RetentionRules(max_age_days=30, protect=protect)) == [undated, old]
    by_date = RetentionRules(max_age_days=365, age_by=STUDY_DATE, protect=protect)
    # make_ds's StudyDate is 2024-01-02: all but the undated one and the protected one
    assert set(chosen(archive, by_date)) == {old, recent}
    assert chosen(archive, RetentionRules()) == []
    [doomed] = archive.plan_retention(RetentionRules(max_age_days=45,
                                                     protect=protect))
    assert (doomed.study_instance_uid, doomed.instances) == (undated, 2)
    assert doomed.bytes > 0 and "max_age_days 45" in doomed.reason


def test_the_disk_rule_takes_the_oldest_until_enough(new_archive: Archive) -> None:
    archive = new_archive
    uids = [study(archive, days, count=3) for days in (30, 20, 10, 5)]
    sizes = {d.study_instance_uid: d.bytes for d in
             archive.plan_retention(RetentionRules(max_age_days=1))}
    total = 1_000_000
    allowed = total // 2
    rules = RetentionRules(max_disk_percent=50.0)
    # 1.5 studies too many: the two oldest go
    used = allowed + sizes[uids[0]] + sizes[uids[1]] // 2
    assert [d.study_instance_uid for d in plan(rules, set(), used, total, NOW)] == uids[:2]
    # under the limit: none
    assert plan(rules, set(), allowed - 1, total, NOW) == []
    # the age rule's studies count towards the disk's; protected studies are skipped (the
    # studies' sizes differ by a few bytes: make_ds numbers its instances)
    protected = {Study.get(Study.study_instance_uid == uids[1]).id}
    both = RetentionRules(max_age_days=25, max_disk_percent=50.0)
    used = allowed + sizes[uids[0]] + sizes[uids[2]] - 1
    assert [d.study_instance_uid for d in plan(both, protected, used, total, NOW)] == [
        uids[0], uids[2]]




def test_what_arrives_after_the_choice_stays_and_protect_is_asked_again(
        new_archive: Archive) -> None:
    archive = new_archive
    grows = study(archive, 40, Modality="CT")
    turns_mammo = study(archive, 40, Modality="CT")
    rules = RetentionRules(max_age_days=30, protect=((("ModalitiesInStudy", "MG"),),))
    chosen = {d.study_instance_uid: d for d in archive.plan_retention(rules)}
    assert set(chosen) == {grows, turns_mammo}
    late = make_ds(StudyInstanceUID=grows, Modality="CT")
    archive.store(encode(late), ExplicitVRLittleEndian)
    archive.store(encode(make_ds(StudyInstanceUID=turns_mammo, Modality="MG")),
                  ExplicitVRLittleEndian)
    deletion = archive.delete_retained(chosen[grows], rules)
    assert deletion is not None and deletion.instances == 2
    assert [i.sop_instance_uid for i in archive.selected(Selection(study_uids=(grows,)))] \
        == [late.SOPInstanceUID]
    assert archive.delete_retained(chosen[turns_mammo], rules) is None  # protected now
    assert archive.totals()["instances"] == 4


def test_placeholder_study_dates_are_no_dates(new_archive: Archive) -> None:
    archive = new_archive
    for date in ("00000000", "18991231"):
        study(archive, 1, StudyDate=date)
    dated = study(archive, 1, StudyDate="19500101")
    rules = RetentionRules(max_age_days=365, age_by=STUDY_DATE)
    assert [d.study_instance_uid for d in archive.plan_retention(rules)] == [dated]


def test_the_disk_rule_deletes_nothing_when_the_archive_is_not_what_fills_the_disk(
        new_archive: Archive, caplog: Any) -> None:
    study(new_archive, 10)
    study(new_archive, 5)
    total = 100 * 2**30
    with caplog.at_level("ERROR", logger="storage.retention"):
        assert plan(RetentionRules(max_disk_percent=90.0), set(), 99 * 2**30, total, NOW) == []
    assert "hold too little to bring it under" in caplog.text
