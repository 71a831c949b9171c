"""minipacs storage: the file store, the index and the query model.

The public API is :class:`Archive` (open it with :func:`open_archive`); it never imports
``scp`` or pynetdicom.
"""

import logging

from .archive import Archive, ArchiveOptions, Origin, StoreOutcome, open_archive
from .convert import DECODERS_LOGGER
from .convert import install_log_filters as install_decoder_log_filter
from .errors import (
    CannotConvert,
    DuplicateRejected,
    FailureCode,
    InstanceUnavailable,
    InvalidInstance,
    InvalidQuery,
    QueryFailed,
    SOPClassMismatch,
    StorageError,
    StorageFull,
    StoreInUse,
    StudyMismatch,
    TooManyMatches,
    TransferSyntaxNotSupported,
    failure_code,
)
from .index import DuplicatePolicy, StoredInstance, WriteResult
from .keys import Level, Model
from .parsing import Spooled
from .query import Query, Search, SearchAnswer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Archive",
    "ArchiveOptions",
    "CannotConvert",
    "DECODERS_LOGGER",
    "DuplicatePolicy",
    "DuplicateRejected",
    "FailureCode",
    "InstanceUnavailable",
    "InvalidInstance",
    "InvalidQuery",
    "Level",
    "Model",
    "Origin",
    "Query",
    "Search",
    "SearchAnswer",
    "Spooled",
    "QueryFailed",
    "SOPClassMismatch",
    "StorageError",
    "StorageFull",
    "StoreInUse",
    "StoreOutcome",
    "StoredInstance",
    "StudyMismatch",
    "TooManyMatches",
    "TransferSyntaxNotSupported",
    "WriteResult",
    "failure_code",
    "install_decoder_log_filter",
    "open_archive",
]
