"""What the index takes from one header (:class:`Parsed`), whichever reader read it:
pydicom's path (:func:`storage.parsing.extract`) or the fast path
(:func:`storage.fastparse.fast_parse`), which must give the same, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .index import InstanceRecord
from .keys import Level
from .values import norm_da, norm_pn, norm_tm, pn_framed, pn_groups

BULK_THRESHOLD = 1024
"""Binary values longer than this many bytes are bulk data: kept in the file, not the index."""

REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
"""The UIDs every stored instance must have, in the order :func:`parsed_from` takes them."""


@dataclass
class Parsed:
    """What one header gives the index."""

    record: InstanceRecord
    sop_class_uid: str
    sop_instance_uid: str
    warnings: list[str] = field(default_factory=list)


def parsed_from(uids: list[str], attrs: dict[Level, str], warnings: list[str],
                text: Callable[[str, str], str]) -> Parsed:
    """The :class:`Parsed` of one header, whichever way it was read: ``uids`` are the
    values of :data:`REQUIRED_UIDS` (checked), ``attrs`` the per-level DICOM JSON, and
    ``text(keyword, vr)`` a key's column value as :func:`storage.parsing._text` gives it."""
    sop_class_uid, sop_instance_uid, study_uid, series_uid = uids
    patient_id = text("PatientID", "LO")
    issuer = text("IssuerOfPatientID", "LO")
    patient_name = text("PatientName", "PN")
    alphabetic, ideographic, phonetic = pn_groups(patient_name, folded=True)
    referring = text("ReferringPhysicianName", "PN")
    record = InstanceRecord(
        patient={
            # PS3.4 C.6.1.1.1: PatientID is the patient's Unique key. An instance without
            # one is a patient of its own, per study, never merged with other anonymous ones.
            "patient_key": f"{issuer}\\{patient_id}" if patient_id else f"\\\\{study_uid}",
            "patient_id": patient_id,
            "issuer_of_patient_id": issuer,
            "patient_name": norm_pn(patient_name),
            "patient_name_alphabetic_folded": alphabetic,
            "patient_name_ideographic_folded": ideographic,
            "patient_name_phonetic_folded": phonetic,
            "patient_birth_date": norm_da(text("PatientBirthDate", "DA")),
            "patient_sex": text("PatientSex", "CS"),
            "attrs": attrs[Level.PATIENT],
        },
        study={
            "study_instance_uid": study_uid,
            "study_date": norm_da(text("StudyDate", "DA")),
            "study_time": norm_tm(text("StudyTime", "TM")),
            "accession_number": text("AccessionNumber", "SH"),
            "study_id": text("StudyID", "SH"),
            "referring_physician_name": norm_pn(referring),
            "referring_physician_name_folded": pn_framed(referring, folded=True),
            "study_description": text("StudyDescription", "LO"),
            "attrs": attrs[Level.STUDY],
        },
        series={
            "series_instance_uid": series_uid,
            "modality": text("Modality", "CS"),
            "series_number": text("SeriesNumber", "IS"),
            "series_description": text("SeriesDescription", "LO"),
            "attrs": attrs[Level.SERIES],
        },
        instance={
            "sop_instance_uid": sop_instance_uid,
            "sop_class_uid": sop_class_uid,
            "instance_number": text("InstanceNumber", "IS"),
            "attrs": attrs[Level.IMAGE],
        },
    )
    return Parsed(record, sop_class_uid, sop_instance_uid, warnings)


def dump_levels(out: dict[Level, dict[str, Any]]) -> dict[Level, str]:
    """The per-level DICOM JSON strings of the index (PS3.18 F.2), compact."""
    # RFC 8259 (PS3.18 F.2) has no NaN or Infinity: _element_json keeps them out, and a
    # number that slipped through would be refused here rather than written
    return {lv: json.dumps(v, separators=(",", ":"), allow_nan=False)
            for lv, v in out.items()}
