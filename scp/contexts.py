"""The presentation contexts we accept, as one table.

Every Storage SOP Class pynetdicom knows, each with every transfer syntax pydicom knows
(uncompressed, deflated, big endian, the JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE,
MPEG-2/4, HEVC, SMPTE ST 2110): the bytes are stored as received, so we need no codec to
accept them. Verification, and the Query/Retrieve FIND, GET and MOVE models with the query
model each stands for.
"""

from __future__ import annotations

import copy
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
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

from .reactor import tested_pynetdicom

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

# (abstract syntax, transfer syntaxes) for everything we act as SCP for
SUPPORTED: list[tuple[str, list[str]]] = (
    [(VERIFICATION, TRANSFER_SYNTAXES)]
    + [(uid, TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES]
    + [(uid, TRANSFER_SYNTAXES) for uid in FIND_MODELS]
    + [(uid, TRANSFER_SYNTAXES) for uid in GET_MODELS]
    + [(uid, TRANSFER_SYNTAXES) for uid in MOVE_MODELS]
)

STORAGE: frozenset[str] = frozenset(STORAGE_SOP_CLASSES)
"""Storage SOP classes: accepted in both roles, so a C-GET requestor may act as their SCP
(SCP/SCU Role Selection, PS3.7 D.3.3.4) while modalities keep sending to us as SCU."""


def cheap_context_copies() -> bool:
    """Make the per-association copy of these contexts cheap (once per process); ``False``
    when this pynetdicom is not a tested version, and nothing was changed.

    pynetdicom 3.0 deep-copies the acceptor's supported contexts for every association
    (``RequestHandler._create_association``): with every Storage SOP Class times every
    transfer syntax, pydicom re-validated each UID against its regex, and the A-ASSOCIATE-AC
    left about 40 ms after the request (bench/README.md). The only mutable part of a
    ``PresentationContext`` is its transfer syntax list, and UIDs are immutable strings, so
    a deep copy is a shallow one with a list of its own. Pinned like scp/reactor.py.
    """
    if "__deepcopy__" in vars(PresentationContext):
        return True
    if not tested_pynetdicom("scp/contexts.py", "each association copies every context "
                             "the slow way (about 40 ms)"):
        return False

    def __deepcopy__(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new

    PresentationContext.__deepcopy__ = __deepcopy__  # type: ignore[attr-defined]
    return True
