"""Typed errors raised by the storage package.

Each error that can refuse a stored instance carries its ``failure_code``: the code of
PS3.4 B.2.3 (C-STORE status), PS3.7 C (general statuses) and PS3.18 Table I.2-2 (STOW-RS
Failure Reason (0008,1197)), which use the same numbers. Those codes are protocol-neutral
facts about the error, as :class:`WarningCode` is about a stored instance's warning;
building a DIMSE status from them is ``scp/status.py``'s job, and building a Store
Instances Response is ``web/stow.py``'s.
"""

from __future__ import annotations

import enum


class FailureCode(enum.IntEnum):
    """Why an instance was not stored: a DIMSE C-STORE status (PS3.4 B.2.3, PS3.7 C) and a
    STOW-RS Failure Reason (0008,1197) (PS3.18 Table I.2-2) alike."""

    DUPLICATE_SOP_INSTANCE = 0x0111
    """PS3.7 C: Failure, Duplicate SOP Instance."""
    OUT_OF_RESOURCES = 0xA700
    """PS3.4 B.2.3 / PS3.18 Table I.2-2 A7xx: Refused, Out of Resources."""
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """PS3.4 B.2.3 / PS3.18 Table I.2-2 A9xx: Error, Data Set does not match SOP Class."""
    STUDY_DOES_NOT_MATCH = 0xA901
    """An A9xx code of ours (PS3.18 Table I.2-2 allows additional codes): the data set is of
    another study than the STOW-RS request's target (PS3.18 Table 10.5.1-1, "Study"; Table
    10.5.3-1 calls a "Study Instance UID mismatch" a conflict). Azure's DICOM service uses
    the same code."""
    CANNOT_UNDERSTAND = 0xC000
    """PS3.4 B.2.3 / PS3.18 Table I.2-2 Cxxx: Error, Cannot understand."""
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    """PS3.18 Table I.2-2: Referenced Transfer Syntax not supported."""
    PROCESSING_FAILURE = 0xC001
    """A fault of ours while storing: still a Cxxx "Error: Cannot understand" code."""


class WarningCode(enum.IntEnum):
    """Why a stored instance carries a warning: a DIMSE C-STORE Warning status (PS3.4
    B.2.3) and a STOW-RS Warning Reason (0008,1196) (PS3.18 Table I.2-1) alike."""

    ELEMENTS_DISCARDED = 0xB006
    """PS3.4 B.2.3 / PS3.18 Table I.2-1: Elements Discarded. What a duplicate kept under
    ``storage.on_duplicate: keep`` is answered with: the operation completed (PS3.7 C.4:
    Warning), but what was sent is not what is stored (PS3.4 B.2.2: a Success would say the
    sent SOP Instance was stored), its differing elements discarded for the stored ones."""


class StorageError(Exception):
    """Base class of every error the archive raises on purpose."""

    failure_code: FailureCode = FailureCode.PROCESSING_FAILURE
    """What refuses an instance for this reason: see the module docstring."""


class InvalidInstance(StorageError):
    """The data set cannot be parsed or lacks what indexing needs.

    PS3.4 B.2.3: answered with an "Error: Cannot understand" status.
    """

    failure_code = FailureCode.CANNOT_UNDERSTAND


class SOPClassMismatch(InvalidInstance):
    """The data set's SOP Class UID differs from the one the request declared.

    PS3.4 B.2.3: answered with "Error: Data Set does not match SOP Class" (A900).
    """

    failure_code = FailureCode.DATA_SET_DOES_NOT_MATCH_SOP_CLASS


class StudyMismatch(InvalidInstance):
    """The data set's Study Instance UID differs from the one the request names (a STOW-RS
    request to ``/studies/{study}``, PS3.18 Table 10.5.1-1): the instance is not stored.

    Failure Reason :attr:`FailureCode.STUDY_DOES_NOT_MATCH` (A901).
    """

    failure_code = FailureCode.STUDY_DOES_NOT_MATCH


class TransferSyntaxNotSupported(InvalidInstance):
    """A Part 10 file in a transfer syntax that C-STORE would not accept either (one pydicom
    does not know; over DIMSE, association negotiation refuses it before any data set).

    Failure Reason :attr:`FailureCode.TRANSFER_SYNTAX_NOT_SUPPORTED` (C122).
    """

    failure_code = FailureCode.TRANSFER_SYNTAX_NOT_SUPPORTED


class DuplicateRejected(StorageError):
    """A different instance with this SOP Instance UID is stored and the policy is ``reject``.

    PS3.7 C: answered with the DIMSE status "Duplicate SOP Instance" (0111).
    """

    failure_code = FailureCode.DUPLICATE_SOP_INSTANCE


class StorageFull(StorageError):
    """The file store or the index could not be written (disk full, read-only, I/O error).

    PS3.4 B.2.3: answered with "Refused: Out of Resources" (A7xx).
    """

    failure_code = FailureCode.OUT_OF_RESOURCES


class InvalidQuery(StorageError):
    """A query identifier that breaks the rules of PS3.4 C.4.1.2 or C.2.2.2.

    Answered with "Identifier does not match SOP Class" (A900) and an ErrorComment.
    """


class TooManyMatches(StorageError):
    """A query matched more than ``query.max_results`` entities; the first ones were sent.

    Answered with "Refused: Out of Resources" (A700) after those matches.
    """


class InstanceUnavailable(StorageError):
    """A stored instance's file is missing or unreadable; its retrieve sub-operation fails."""


class Withheld(StorageError):
    """A stored instance that does not go out de-identified: its pixels may show the
    patient (:func:`storage.deidentify.burned_in`); the message says why. Its retrieve
    sub-operation fails, an export lists it."""


class NotFound(InstanceUnavailable):
    """What a WADO-RS request names is not stored: no such study, series, instance, frame
    or bulk value (PS3.18 10.4.3: 404, the Target Resource does not exist)."""


class QueryFailed(StorageError):
    """A valid query that could not be carried out (the index could not be read).

    Answered with "Unable to process" (C001).
    """


class CannotConvert(StorageError):
    """A stored instance cannot be sent in any transfer syntax the receiver accepted (its
    pixel data cannot be decoded here, or the conversion is not one we make); its retrieve
    sub-operation fails and the others go on."""


class StoreInUse(StorageError):
    """Another process (a server, verify, reindex or import) has the file store open."""


def failure_code(exc: BaseException) -> FailureCode:
    """The code of an error raised while storing: a storage error's ``failure_code``, and
    :attr:`FailureCode.PROCESSING_FAILURE` for anything else (a fault of ours)."""
    return exc.failure_code if isinstance(exc, StorageError) else FailureCode.PROCESSING_FAILURE
