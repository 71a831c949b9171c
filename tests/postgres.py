"""A real, throwaway PostgreSQL server for the tests (Debian's ``postgresql`` package,
started here with ``initdb`` and ``pg_ctl`` on a loopback port): the index's own engine.

Without PostgreSQL or psycopg2 the tests that need it are skipped, or fail with a clear
message when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, unavailable


def tool(name: str) -> str | None:
    """A PostgreSQL program: on PATH, else in Debian's ``/usr/lib/postgresql/<v>/bin``."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(versions[-1]) if versions else None


def _missing(message: str) -> None:
    unavailable(message + " (make test installs the Debian package postgresql and"
                " psycopg2-binary)")


class Postgres:
    """One PostgreSQL cluster in a new folder of the system's temporary folder (the user
    ``postgres`` must reach it: pytest's own temporary folders belong to root alone);
    :meth:`stop` and :meth:`start` again keep its port and databases (an index that was
    down for a while)."""

    def __init__(self) -> None:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            _missing("psycopg2 is not installed")
        initdb, pg_ctl = tool("initdb"), tool("pg_ctl")
        if initdb is None or pg_ctl is None:
            _missing("PostgreSQL is not installed (no initdb / pg_ctl)")
        assert initdb is not None and pg_ctl is not None
        self.pg_ctl = pg_ctl
        self.root = root = Path(tempfile.mkdtemp(prefix="minipacs-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the postgres user
            self.as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(root, "postgres")
        self.data, self.port = root / "data", free_port()
        self.made = 0
        self._run(initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{cmd[0]} failed: {proc.stdout}{proc.stderr}"

    def start(self) -> None:
        """Start it and wait until it accepts connections (``pg_ctl -w``)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-l",
                  str(self.root / "log"), "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                  " -c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``pg_ctl stop -m fast``: connections are closed at once)."""
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", mode,
                        "-w", "stop"], capture_output=True, timeout=60, check=False)

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        self.made += 1
        name = f"pacs{self.made}"
        self._run(tool("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", name)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


def started_postgres() -> Iterator[Postgres]:
    """A started :class:`Postgres`, stopped and removed afterwards (a fixture's body)."""
    server = Postgres()
    try:
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)
