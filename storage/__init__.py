"""minipacs storage: the file store, the index and the query model.

The public API is :class:`Archive` (open it with :func:`open_archive`); it never imports
``scp`` or pynetdicom.
"""

import logging

from .archive import (
    Archive,
    ArchiveOptions,
    Commitment,
    Health,
    Origin,
    PendingStore,
    StoreOutcome,
    open_archive,
)
from .convert import DECODERS_LOGGER
from .convert import install_log_filters as install_decoder_log_filter
from .deidentify import (
    MIN_SECRET_LENGTH,
    DeidentifyOptions,
    Option,
    Profile,
    option_problem,
    safe_private,
    safe_private_problem,
)
from .errors import (
    CannotConvert,
    DuplicateRejected,
    FailureCode,
    InstanceUnavailable,
    InvalidInstance,
    InvalidQuery,
    NotFound,
    QueryFailed,
    SOPClassMismatch,
    StorageError,
    StorageFull,
    StoreInUse,
    StudyMismatch,
    TooManyMatches,
    TransferSyntaxNotSupported,
    WarningCode,
    Withheld,
    failure_code,
)
from .exporting import Exported
from .files import SERVER_LOCK, server_lock
from .index import DuplicatePolicy, StoredInstance, WriteResult
from .instances import (
    ANY_SYNTAX,
    DEFAULT_SYNTAX,
    NotAsWritten,
    PixelSource,
    WebInstance,
    bulk_path,
    syntax_for,
)
from .keys import KEYS as QUERY_KEYS
from .keys import Key as QueryKey
from .keys import Level, Model
from .objects import S3Options, endpoint_problem, files_url_problem, is_object_url
from .outbox import COMMITMENT, ROUTE, PeerQueue, Route, lease_owner, match_key_problem
from .outbox import HEARTBEAT_SECONDS as NODE_HEARTBEAT_SECONDS
from .outbox import Entry as OutboxEntry
from .parsing import Spooled, read_identifier
from .query import Query, Search, SearchAnswer, response_charset_problem
from .removal import Deletion, StudyPart
from .retention import AGE_BY, Doomed, RetentionRules, protect_problem
from .selection import Selection
from .values import is_uid

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AGE_BY",
    "Doomed",
    "RetentionRules",
    "NotAsWritten",
    "ANY_SYNTAX",
    "Archive",
    "ArchiveOptions",
    "COMMITMENT",
    "CannotConvert",
    "Commitment",
    "DECODERS_LOGGER",
    "DEFAULT_SYNTAX",
    "Deletion",
    "DeidentifyOptions",
    "DuplicatePolicy",
    "Exported",
    "DuplicateRejected",
    "FailureCode",
    "Health",
    "InstanceUnavailable",
    "InvalidInstance",
    "InvalidQuery",
    "Level",
    "MIN_SECRET_LENGTH",
    "Option",
    "Profile",
    "QUERY_KEYS",
    "QueryKey",
    "Model",
    "NODE_HEARTBEAT_SECONDS",
    "NotFound",
    "Origin",
    "OutboxEntry",
    "PeerQueue",
    "PixelSource",
    "Query",
    "SERVER_LOCK",
    "Search",
    "SearchAnswer",
    "Selection",
    "Spooled",
    "QueryFailed",
    "ROUTE",
    "Route",
    "S3Options",
    "SOPClassMismatch",
    "StorageError",
    "StorageFull",
    "StoreInUse",
    "PendingStore",
    "StoreOutcome",
    "StoredInstance",
    "StudyPart",
    "StudyMismatch",
    "TooManyMatches",
    "TransferSyntaxNotSupported",
    "WarningCode",
    "WebInstance",
    "Withheld",
    "WriteResult",
    "bulk_path",
    "endpoint_problem",
    "failure_code",
    "files_url_problem",
    "install_decoder_log_filter",
    "is_object_url",
    "is_uid",
    "lease_owner",
    "match_key_problem",
    "protect_problem",
    "open_archive",
    "option_problem",
    "read_identifier",
    "server_lock",
    "response_charset_problem",
    "safe_private",
    "safe_private_problem",
    "syntax_for",
]
