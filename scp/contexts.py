"""The presentation contexts we accept, as one table.

Every Storage SOP Class pynetdicom knows, each with every transfer syntax pydicom knows
(uncompressed, deflated, big endian, the JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE,
MPEG-2/4, HEVC, SMPTE ST 2110): the bytes are stored as received, so we need no codec to
accept them. Verification, the Query/Retrieve FIND, GET and MOVE models with the query
model each stands for, and the Storage Commitment Push Model.
"""

from __future__ import annotations

from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from storage import Model

TRANSFER_SYNTAXES: list[str] = [str(uid) for uid in AllTransferSyntaxes]

STORAGE_SOP_CLASSES: list[str] = sorted(
    {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
)

FIND_MODELS: dict[str, Model] = {
    str(StudyRootQueryRetrieveInformationModelFind): Model.STUDY_ROOT,
    str(PatientRootQueryRetrieveInformationModelFind): Model.PATIENT_ROOT,
}

GET_MODELS: dict[str, Model] = {
    str(StudyRootQueryRetrieveInformationModelGet): Model.STUDY_ROOT,
    str(PatientRootQueryRetrieveInformationModelGet): Model.PATIENT_ROOT,
}

MOVE_MODELS: dict[str, Model] = {
    str(StudyRootQueryRetrieveInformationModelMove): Model.STUDY_ROOT,
    str(PatientRootQueryRetrieveInformationModelMove): Model.PATIENT_ROOT,
}

VERIFICATION: str = str(Verification)

STORAGE_COMMITMENT: str = "1.2.840.10008.1.20.1"
"""Storage Commitment Push Model SOP Class (PS3.4 Annex J; scp/commitment.py)."""
UNCOMPRESSED: list[str] = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian),
                           str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian)]
"""What a service without pixel data is accepted in."""

# (abstract syntax, transfer syntaxes) for everything we act as SCP for
SUPPORTED: list[tuple[str, list[str]]] = (
    [(VERIFICATION, TRANSFER_SYNTAXES)]
    + [(uid, TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]
    + [(uid, TRANSFER_SYNTAXES) for uid in FIND_MODELS]
    + [(uid, TRANSFER_SYNTAXES) for uid in GET_MODELS]
    + [(uid, TRANSFER_SYNTAXES) for uid in MOVE_MODELS]
    + [(STORAGE_COMMITMENT, UNCOMPRESSED)]
)

STORAGE: frozenset[str] = frozenset(STORAGE_SOP_CLASSES)
"""Storage SOP classes: accepted in both roles, so a C-GET requestor may act as their SCP
(SCP/SCU Role Selection, PS3.7 D.3.3.4) while modalities keep sending to us as SCU."""

