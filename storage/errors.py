"""Typed errors raised by the storage package.

The network face (``scp/status.py``) is the only place that turns these into DIMSE
statuses; nothing in ``storage`` knows a status code.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the archive raises on purpose."""


class InvalidInstance(StorageError):
    """The data set cannot be parsed or lacks what indexing needs.

    PS3.4 B.2.3: answered with an "Error: Cannot understand" status.
    """


class SOPClassMismatch(InvalidInstance):
    """The data set's SOP Class UID differs from the one the request declared.

    PS3.4 B.2.3: answered with "Error: Data Set does not match SOP Class" (A900).
    """


class DuplicateRejected(StorageError):
    """A different instance with this SOP Instance UID is stored and the policy is ``reject``.

    PS3.7 C: answered with the DIMSE status "Duplicate SOP Instance" (0111).
    """


class StorageFull(StorageError):
    """The file store or the index could not be written (disk full, read-only, I/O error).

    PS3.4 B.2.3: answered with "Refused: Out of Resources" (A7xx).
    """


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
