"""DICOMweb for an account that sees only de-identified data (PS3.15 Annex E through
PS3.18): its searches, metadata and instances de-identified by a profile, as C-MOVE to a
de-identifying peer sends them.

- **UIDs.** A de-identified answer carries replaced UIDs (PS3.15 E.3.10), and the account
  names studies, series and instances by them in its next URLs. Every UID an answer
  replaced is kept in ``pseudonym_uid`` with the stored one
  (:func:`storage.index.remember_pseudonyms`); a UID in a path or a match is looked up
  there (:func:`originals`). One that was never answered is no UID of ours: the request
  finds nothing, as for an unknown UID, even if it is a stored one. Under Retain UIDs the
  UIDs are the stored ones.
- **Searches** (QIDO-RS) match only on what the profile leaves as it is: the entity UIDs
  and a pseudonymous PatientID (translated back, :func:`search_params`) and attributes it
  keeps (Table E.1-1 ``K``, or not listed); a match on an attribute it changes would tell
  the original value, so it is refused (:func:`check_search`). Each result is made of
  every attribute the index keeps of its patient, study, series and instance, so that
  the patient's pseudonym and date shift are those of the instances; it is then
  de-identified and cut back to the attributes the search answers, with a RetrieveURL
  that names the replaced UIDs.
- **Metadata** (WADO-RS) is the index's, de-identified alike; the pixel data's BulkDataURI
  names the replaced UIDs; a sequence holding a bulk value is left out (the value's URL
  would name a stored element by its position).
- **Burned-in annotation.** Instances whose pixels may show the patient
  (:func:`storage.deidentify.burned_in`) are left out of every answer unless
  ``deidentify.send_burned_in``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from . import index, query
from .deidentify import Deidentifier, Option
from .deidentify.profile import burned_in_reason
from .errors import InvalidQuery, NotFound
from .keys import Level
from .values import is_uid

logger = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID = 0x0020000D, 0x0020000E, 0x00080018
UID_TAGS: dict[int, Level] = {STUDY_UID: Level.STUDY, SERIES_UID: Level.SERIES,
                              SOP_UID: Level.IMAGE}
"""The UIDs that name what a DICOMweb URL names; matched and answered replaced."""
PATIENT_ID, ISSUER_OF_PATIENT_ID = 0x00100020, 0x00100021
PATIENT_PREFIX = "patient:"
"""Before a pseudonymous PatientID in ``pseudonym_uid`` (no UID starts so)."""
RETRIEVE_URL = "00081190"
PIXEL_DATA = "7FE00010"
CHARSET = "00080005"
UTF8 = "ISO_IR 192"
KEPT = (None, "K")
"""The actions (Table E.1-1a) that leave an attribute as stored: an attribute the table
does not list, or ``K``."""
_RESOURCE = {Level.STUDY: "studies", Level.SERIES: "series", Level.IMAGE: "instances"}


# -- UIDs --------------------------------------------------------------------------------


def originals(deidentifier: Deidentifier, uids: Iterable[str]) -> dict[str, str]:
    """The stored UIDs that ``uids`` (as a de-identified answer gave them) stand for, each
    known one mapped from itself: all of them as they are under Retain UIDs. Only a UID
    (PS3.5 9.1) is looked up: the table's patient rows (:func:`patient_key`) are no UID's."""
    valid = [uid for uid in uids if is_uid(uid)]
    if Option.RETAIN_UIDS in deidentifier.options:
        return {uid: uid for uid in valid}
    return index.originals_of(valid)


@dataclass
class Replaced:
    """The entity UIDs a de-identified answer gave: replacement -> stored UID, kept by the
    caller (:func:`storage.index.remember_pseudonyms`) before the answer goes."""

    pairs: dict[str, str] = field(default_factory=dict)

    def note(self, outcome_uids: dict[str, str], stored: Iterable[str]) -> None:
        for uid in stored:
            replacement = outcome_uids.get(uid)
            if replacement and replacement != uid:
                self.pairs[replacement] = uid


# -- searches ----------------------------------------------------------------------------


def _tag(name: str) -> int | None:
    """The tag a match parameter's name gives (a keyword or eight hexadecimal digits)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        return int(name, 16)
    return tag_for_keyword(name)


def _uid_tag(name: str) -> int | None:
    """The tag of a match parameter's name if it is one of :data:`UID_TAGS`."""
    tag = _tag(name)
    return tag if tag in UID_TAGS else None


def patient_key(pseudonym: str) -> str:
    """The ``pseudonym_uid`` row of a pseudonymous PatientID (:class:`Replaced`)."""
    return PATIENT_PREFIX + pseudonym


def search_params(params: query.SearchParams, deidentifier: Deidentifier
                  ) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """``params`` with the values of each UID match (a list of UIDs, PS3.18 8.3.4.1) put
    back to the stored UIDs they stand for, an unknown one left out; and, when the profile
    replaces PatientID, a PatientID match on a pseudonym its answers gave taken out and
    given back as that patient's (IssuerOfPatientID, PatientID), to be matched exactly
    (:func:`patient_constraints`: a stored ``*`` is no wildcard), with any
    IssuerOfPatientID match taken out too.

    Raises
    ------
    NotFound
        A UID match none of whose values is known, or a PatientID that is no pseudonym
        its answers gave: nothing can match.
    InvalidQuery
        A PatientID match of several values or a wildcard (it would tell the original).
    """
    pairs = list(params)
    patient: tuple[str, str] | None = None
    patients = [value.strip() for name, value in pairs if _tag(name) == PATIENT_ID
                and value.strip() and set(value.strip()) != {"*"}]  # not universal
    if patients and deidentifier.code_of(PATIENT_ID) not in KEPT:
        if len(patients) > 1 or any(c in patients[0] for c in "*?\\,"):
            raise InvalidQuery("PatientID: an account that sees de-identified data matches one"
                               " pseudonym, exactly")
        patient = originals_of_patient(patients[0])
        if patient is None:
            raise NotFound("no PatientID this account was shown")
        pairs = [(n, v) for n, v in pairs if _tag(n) not in (PATIENT_ID, ISSUER_OF_PATIENT_ID)]
    asked = {uid for name, value in pairs if _uid_tag(name) is not None and value != "*"
             for uid in value.replace("\\", ",").split(",") if uid}
    known = originals(deidentifier, asked) if asked else {}
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        if _uid_tag(name) is not None and value and value != "*":  # "*": any (C.2.2.2.3)
            kept = [known[u] for u in value.replace("\\", ",").split(",") if u in known]
            if not kept:
                raise NotFound(f"no {name} this account was shown")
            value = ",".join(kept)
        out.append((name, value))
    return out, patient


def patient_constraints(search: query.Search, patient: tuple[str, str]) -> query.Search:
    """``search`` matching also, exactly, the patient ``patient`` (IssuerOfPatientID,
    PatientID): PS3.4 C.2.2.2.1 Single Value Matching of each value as stored, whatever
    characters it holds, and Empty Value Matching (C.2.2.2.7) of an empty issuer."""
    issuer, patient_id = patient
    probe = Dataset()  # their level and key as an identifier's parsing gives them
    probe.QueryRetrieveLevel = search.query.level.name
    probe.PatientID = probe.IssuerOfPatientID = "X"
    made = {c.tag: c for c in query.parse_identifier(probe, search.query.model,
                                                     relational=True).constraints}
    exact = [dataclasses.replace(made[PATIENT_ID], terms=(query.Term(query.Op.EQ, patient_id),)),
             dataclasses.replace(made[ISSUER_OF_PATIENT_ID], kind=query.Kind.EMPTY, terms=())
             if not issuer else dataclasses.replace(
                 made[ISSUER_OF_PATIENT_ID], terms=(query.Term(query.Op.EQ, issuer),))]
    return dataclasses.replace(search, query=dataclasses.replace(
        search.query, constraints=(*search.query.constraints, *exact)))


def originals_of_patient(pseudonym: str) -> tuple[str, str] | None:
    """(IssuerOfPatientID, PatientID) of the patient whose pseudonymous PatientID a
    de-identified answer gave as ``pseudonym``, or None."""
    key = patient_key(pseudonym)
    found = index.originals_of([key]).get(key)
    if found is None:
        return None
    issuer, _, patient_id = found.partition("\\")
    return issuer, patient_id


def check_search(search: query.Search, deidentifier: Deidentifier) -> None:
    """Refuse a match on what the profile changes (it would tell the original value).

    Raises
    ------
    InvalidQuery
        A match on an attribute whose Table E.1-1 action under the profile is not ``K``
        (or that the table lists not), or on a sequence's items (PS3.18 8.3.4: 400).
    """
    for constraint in search.query.constraints:
        if constraint.tag in UID_TAGS:
            continue
        name = keyword_for_tag(constraint.tag) or f"({constraint.tag >> 16:04X},"\
                                                  f"{constraint.tag & 0xFFFF:04X})"
        if constraint.items:
            raise InvalidQuery(f"{name}: an account that sees de-identified data cannot"
                               " match inside a sequence")
        code = deidentifier.code_of(constraint.tag)
        if code not in KEPT:
            raise InvalidQuery(
                f"{name} cannot be matched by an account that sees de-identified data: the"
                f" profile {deidentifier.profile.name!r} changes it (PS3.15 Table E.1-1"
                f" action {code})")


def search(search: query.Search, retrieve_base: str, max_results: int,
           deidentifier: Deidentifier, withhold_burned_in: bool,
           release: Callable[[Replaced], None]) -> query.SearchAnswer:
    """Answer ``search`` de-identified, streamed as :func:`query.run_search` streams (its
    paging, its server maximum, a batch at a time); an instance withheld for burned-in
    annotation is no match. After each batch, before it goes, ``release`` is given the UIDs
    the batch replaced (to keep them, then give the index connection back).

    Raises
    ------
    QueryFailed
        The index could not be read (:func:`query.run_search`).
    """
    level = search.query.level
    replaced = Replaced()

    def render(row: query.Row) -> bytes | None:
        answered = json.loads(query.json_answer(
            search.query, row, everything=search.everything, when_known=search.when_known))
        answered.pop(RETRIEVE_URL, None)
        whole = _whole(row)
        whole.update(answered)
        out = _deidentified(whole, deidentifier, replaced)
        if out is None:
            return None
        result = {tag: out[tag] for tag in answered if tag in out}
        if retrieve_base:
            result[RETRIEVE_URL] = {"vr": "UR", "Value": [_url(retrieve_base, level, out)]}
        return json.dumps(dict(sorted(result.items())), ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")

    def shown(row: query.Row) -> bool:
        return not (withhold_burned_in and level is Level.IMAGE and _burned_in(_whole(row)))

    def batch_done() -> None:
        pending = Replaced(dict(replaced.pairs))
        replaced.pairs.clear()
        release(pending)

    return query.run_search(search, retrieve_base, max_results, batch_done, render, shown)


def _whole(row: query.Row) -> dict[str, Any]:
    """Every attribute the index keeps of a match's patient, study, series and instance."""
    members: dict[str, Any] = {}
    for level in row.rows:
        members.update(row.attrs(level))
    return members


def _url(base: str, level: Level, members: dict[str, Any]) -> str:
    parts = [base]
    for lv, tag in ((Level.STUDY, STUDY_UID), (Level.SERIES, SERIES_UID),
                    (Level.IMAGE, SOP_UID)):
        if lv > level:
            break
        parts.append(f"{_RESOURCE[lv]}/{_first(members, f'{tag:08X}')}")
    return "/".join(parts)


def _first(members: dict[str, Any], tag: str) -> str:
    values = (members.get(tag) or {}).get("Value") or [""]
    return str(values[0])


def _burned_in(members: dict[str, Any]) -> bool:
    return burned_in_reason(_first(members, "00280301"), _first(members, "00080016"),
                            _first(members, "00080060")) is not None


def _deidentified(members: dict[str, Any], deidentifier: Deidentifier,
                  replaced: Replaced) -> dict[str, Any] | None:
    """The DICOM JSON ``members`` (values as the index keeps them, decoded) de-identified,
    as DICOM JSON; None (logged) for one that cannot be: it is left out, never sent as it
    is. Bulk values become empty first."""
    stored = [_first(members, f"{tag:08X}") for tag in UID_TAGS]
    try:
        ds = Dataset.from_json({k: v for k, v in members.items() if k != CHARSET},
                               bulk_data_uri_handler=lambda *_: b"")
        ds.SpecificCharacterSet = UTF8  # the JSON's strings are decoded already
        outcome = deidentifier.apply(ds)
        out: dict[str, Any] = outcome.dataset.to_json_dict(2**31, lambda _: "")
    except Exception as exc:  # noqa: BLE001 - whatever the cause, it does not go out
        logger.warning("%s left out of a de-identified answer: %r", stored[-1] or stored[0],
                       exc)
        return None
    patient_id = _first(members, f"{PATIENT_ID:08X}")
    pseudonym = _first(out, f"{PATIENT_ID:08X}")
    if patient_id and pseudonym and pseudonym != patient_id:  # a search by it finds it
        replaced.pairs[patient_key(pseudonym)] = \
            f"{_first(members, f'{ISSUER_OF_PATIENT_ID:08X}')}\\{patient_id}"
    if Option.RETAIN_UIDS not in deidentifier.options and any(
            uid and outcome.uids.get(uid, uid) == uid for uid in stored):
        logger.warning("%s left out of a de-identified answer: a UID was not replaced",
                       stored)  # fail closed, as storage.archive._copy_uid
        return None
    replaced.note(outcome.uids, stored)
    out.pop(CHARSET, None)
    return out


# -- metadata ----------------------------------------------------------------------------


def metadata(objects: Sequence[dict[str, Any]], instance_url: Callable[[str, str, str], str],
             deidentifier: Deidentifier, withhold_burned_in: bool, replaced: Replaced
             ) -> bytes:
    """The DICOM JSON objects of WADO-RS metadata (:func:`storage.instances.metadata`)
    de-identified: instances withheld for burned-in annotation left out; the pixel data's
    BulkDataURI made of the replaced UIDs (``instance_url``); other bulk values left out.

    Raises
    ------
    NotFound
        Every instance was withheld or could not be de-identified.
    """
    answered: list[dict[str, Any]] = []
    for members in objects:
        if withhold_burned_in and _burned_in(members):
            continue
        pixels = members.get(PIXEL_DATA)
        out = _deidentified({k: v for k, v in members.items()
                             if k != PIXEL_DATA and not _holds_bulk(v)},
                            deidentifier, replaced)
        if out is None:
            continue
        if pixels is not None:
            url = instance_url(_first(out, f"{STUDY_UID:08X}"), _first(out, f"{SERIES_UID:08X}"),
                               _first(out, f"{SOP_UID:08X}"))
            out[PIXEL_DATA] = {"vr": pixels.get("vr", "OW"),
                               "BulkDataURI": f"{url}/bulkdata/{PIXEL_DATA}"}
        answered.append(dict(sorted(out.items())))
    if not answered:
        raise NotFound("nothing there can be shown de-identified")
    return json.dumps(answered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _holds_bulk(value: Any) -> bool:
    """Whether a DICOM JSON attribute is, or holds inside its items, a BulkDataURI."""
    if not isinstance(value, dict):
        return False
    return "BulkDataURI" in value or (value.get("vr") == "SQ"
                                      and "BulkDataURI" in json.dumps(value))
