"""DIMSE statuses: named codes, and the one place storage outcomes and errors become them.

Codes are from PS3.4 B.2.3 (Storage), C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE), C.4.3.1.4
(C-GET) and PS3.7 Annex C (general).
Failure statuses carry an ErrorComment (0000,0902) saying why, so that the sender's log
shows the reason and not only a number.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from storage import (
    Commitment,
    FailureCode,
    InvalidQuery,
    QueryFailed,
    StorageError,
    StoreOutcome,
    TooManyMatches,
    WarningCode,
    failure_code,
)

logger = logging.getLogger(__name__)

SUCCESS = 0x0000

# PS3.7 Annex C, general statuses
DUPLICATE_SOP_INSTANCE = int(FailureCode.DUPLICATE_SOP_INSTANCE)
PROCESSING_FAILURE = 0x0110  # a fault of ours, in a service without codes of its own
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
NOT_AUTHORISED = 0x0124  # Refused: Not Authorised

# PS3.7 10.1.4.1.10, N-ACTION; PS3.4 Table J.3-2, a Storage Commitment report's Failure
# Reason (0008,1197) for an instance not committed
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
RESOURCE_LIMITATION = 0x0213

# PS3.4 J.3.3.1, N-EVENT-REPORT Event Type ID of a Storage Commitment report
COMMITMENT_SUCCESSFUL = 1
COMMITMENT_FAILURES_EXIST = 2

# PS3.4 B.2.3, Storage: which storage error gets which code is storage's FailureCode, which
# outcome gets a Warning status storage's WarningCode
STORE_ELEMENTS_DISCARDED = int(WarningCode.ELEMENTS_DISCARDED)
STORE_OUT_OF_RESOURCES = int(FailureCode.OUT_OF_RESOURCES)
STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS = int(FailureCode.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
STORE_CANNOT_UNDERSTAND = int(FailureCode.CANNOT_UNDERSTAND)
STORE_PROCESSING_FAILURE = int(FailureCode.PROCESSING_FAILURE)  # a fault of ours, still Cxxx

# PS3.4 C.4.1.1.4, C-FIND (C-GET, PS3.4 C.4.3.1.4, uses the same failure codes)
PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # some optional keys were not matched
CANCEL = 0xFE00
FIND_OUT_OF_RESOURCES = 0xA700
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC001
PENDING_CODES = frozenset({PENDING, PENDING_WARNING})

# PS3.4 C.4.2.1.5, C-MOVE (and C.4.3.1.4, C-GET)
SUBOPERATIONS_WITH_FAILURES = 0xB000  # warning: sub-operations complete, some failed
MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801

_ERROR_COMMENT_MAX = 64  # LO

_WARNING_COMMENTS = {
    WarningCode.ELEMENTS_DISCARDED: "other content is stored under this UID; it is kept",
}
"""The ErrorComment (0000,0902) of each Warning status (PS3.7 C.4)."""


def trim_comment(comment: str) -> str:
    """``comment`` made a valid ErrorComment (LO: 64 characters, no backslash, ASCII)."""
    text = comment.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return text[:_ERROR_COMMENT_MAX]


def with_comment(code: int, comment: str) -> Dataset:
    """A status data set: ``Status`` plus an ErrorComment trimmed to fit its VR."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = trim_comment(comment)
    return ds


def not_authorised(service: str) -> Dataset:
    """0124 Refused: Not Authorised, for a service the peer may not use."""
    return with_comment(NOT_AUTHORISED, f"{service} is not allowed for this AE title")


def sop_class_mismatch(command: str, context: str) -> Dataset:
    """A900: the request names SOP Class ``command`` on a presentation context for
    ``context`` (PS3.4 B.2.3 / C.4.1.1.4, "does not match SOP Class")."""
    return with_comment(STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                        f"SOP Class {command} is not the context's {context}")


def sop_class_not_supported(sop_class: str) -> Dataset:
    """0122 Refused: SOP Class not supported (PS3.7 C.5.1)."""
    return with_comment(SOP_CLASS_NOT_SUPPORTED, f"SOP Class {sop_class} is not supported")


def store_status(outcome: StoreOutcome) -> int | Dataset:
    """The status of a stored instance (PS3.4 B.2.3): Success (stored, replaced, an
    identical resend), or the Warning storage names (:attr:`StoreOutcome.warning_code`, the
    Warning Reason STOW-RS answers too) with an ErrorComment saying why."""
    code = outcome.warning_code
    if code is None:
        return SUCCESS
    return with_comment(int(code), _WARNING_COMMENTS[code])


def store_error_status(exc: Exception) -> Dataset:
    """Map an error raised while storing to its PS3.4 B.2.3 / PS3.7 status: the error's
    ``failure_code`` (storage's :class:`~storage.FailureCode`), with its text as comment."""
    comment = str(exc) if isinstance(exc, StorageError) else \
        f"internal error: {type(exc).__name__}"
    return with_comment(int(failure_code(exc)), comment)


def failure_reason(result: Commitment) -> int:
    """The Failure Reason (0008,1197) of an instance not committed (PS3.4 J.3.3.1.1,
    Table J.3-2): not held (0112), held under another SOP Class (0119), held but its file
    does not verify (0110 Processing failure)."""
    return {Commitment.NO_SUCH_INSTANCE: NO_SUCH_OBJECT_INSTANCE,
            Commitment.CLASS_CONFLICT: CLASS_INSTANCE_CONFLICT}.get(result, PROCESSING_FAILURE)


def error_status(exc: Exception) -> Dataset:
    """Map an error raised while performing a service without failure codes of its own
    (C-ECHO, PS3.7 9.1.5.1.4) to 0110 Processing Failure (PS3.7 Annex C, general status)."""
    return with_comment(PROCESSING_FAILURE, f"internal error: {type(exc).__name__}")


def find_error_status(exc: Exception) -> Dataset:
    """Map an error raised while answering a C-FIND (PS3.4 C.4.1.1.4) or before a C-GET's
    sub-operations (PS3.4 C.4.3.1.4: the same A900 and Cxxx codes) to its status."""
    if isinstance(exc, InvalidQuery):
        return with_comment(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, str(exc))
    if isinstance(exc, TooManyMatches):
        return with_comment(FIND_OUT_OF_RESOURCES, str(exc))
    if isinstance(exc, QueryFailed):
        return with_comment(UNABLE_TO_PROCESS, str(exc))
    return with_comment(UNABLE_TO_PROCESS, f"internal error: {type(exc).__name__}")

