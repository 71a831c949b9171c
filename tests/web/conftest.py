"""A running minipacs with its HTTP listener: the DICOM server and :class:`web.WebServer`
on free loopback ports, sharing one archive, as ``minipacs serve`` runs them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

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
        web = WebServer(cfg.web, running.archive, cfg.tls.certificate, cfg.tls.private_key,
                        audit=running.server.audit.record)  # as scp/__main__.py does
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
