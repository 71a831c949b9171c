"""``minipacs`` with its PostgreSQL index behind a connection pool: an experiment for
``bench/scale.py --minipacs-wrapper bench/pg_pool_wrapper.py`` (issue 17).

minipacs opens a new PostgreSQL connection for each HTTP request and association and
closes it after (``Archive.release``); SQLite has a pool (``sqlite+pool``). This runs the
same server with peewee's ``PooledPostgresqlDatabase`` in place of its PostgreSQL class
(reconnecting as that one does), to measure what a pool would save a QIDO-RS search.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as bench/pg_pool_wrapper.py: bench/ is first on the path, and its web.py is not the
# web package
_bench = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p not in (_bench, "")]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playhouse.pool import PooledPostgresqlDatabase  # noqa: E402
from playhouse.shortcuts import ReconnectMixin  # noqa: E402

import storage.index as index_module  # noqa: E402

_plain = getattr(index_module, "ReconnectingPostgresqlDatabase", None)


class PooledReconnecting(ReconnectMixin, PooledPostgresqlDatabase):
    reconnect_errors = getattr(_plain, "reconnect_errors", ())

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("max_connections", index_module.POOL_SIZE)
        kwargs.setdefault("stale_timeout", index_module.POOL_STALE_SECONDS)
        super().__init__(*args, **kwargs)


if _plain is None:
    sys.exit("storage.index has no ReconnectingPostgresqlDatabase to replace")
index_module.ReconnectingPostgresqlDatabase = PooledReconnecting  # type: ignore[misc]

from scp.__main__ import main  # noqa: E402

sys.exit(main())
