"""A running minipacs with its HTTP listener: the DICOM server and :class:`web.WebServer`
on free loopback ports, sharing one archive, as ``minipacs serve`` runs them."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from scp.__main__ import web_server
from tests.conftest import Running
from web import WebServer


@dataclass
class WebRunning:
    """A server started by a test, with its web listener."""

    dicom: Running
    web: WebServer

    @property
    def url(self) -> str:
        """The DICOMweb root: ``http://127.0.0.1:PORT/dicom-web``."""
        return self.web.url

    @property
    def root(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return self.web.root_url

    @property
    def archive(self) -> Any:
        return self.dicom.archive


@pytest.fixture
def start_web(start_server: Callable[..., Running]) -> Iterator[Callable[..., WebRunning]]:
    """Start a server and its web listener (``start_web(**config_overrides)``, keys such as
    ``"web.users"``); both are stopped at the end of the test."""
    started: list[WebServer] = []

    def start(**overrides: Any) -> WebRunning:
        overrides = {"web.port": 0, "web.bind": "127.0.0.1", **overrides}
        running = start_server(**overrides)
        cfg = running.config
        web = web_server(cfg, running.archive, running.server.audit)  # as serve does
        started.append(web)
        web.start()
        return WebRunning(running, web)

    yield start
    for web in started:  # before start_server's teardown closes the archive
        web.stop(grace=5)


@pytest.fixture
def web(start_web: Callable[..., WebRunning]) -> WebRunning:
    """A running server and web listener with the default configuration."""
    return start_web()


# -- Debian's Chromium, driven by Playwright -------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [  # without the background-networking flags a closed network refuses Chromium
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 45_000


def require(present: bool, message: str) -> None:
    """Skip saying why, or fail when ``CI`` is set: a missing part is never a pass."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def chromium_page(tmp_path: Path) -> Iterator[Page]:
    """A page of Debian's Chromium, headless, driven by Playwright (its own browser download
    cannot work here: ``executable_path``), in a fresh profile."""
    require(CHROMIUM.exists(), f"{CHROMIUM} is missing: install the Debian package chromium"
                               " (make test does it when run as root)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS, headless=True, viewport={"width": 1920, "height": 1080})
        try:
            context.set_default_timeout(TIMEOUT_MS)
            yield context.new_page()
        finally:
            context.close()
