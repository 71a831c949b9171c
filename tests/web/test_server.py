"""The HTTP listener itself: it starts beside the DICOM one, answers, and refuses what the
access rules refuse."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import pytest

from tests.web.conftest import WebRunning
from web import WebListenError, WebServer


def test_unknown_path_is_404_with_a_reason(web: WebRunning) -> None:
    response = httpx.get(f"{web.url}/nothing-here")
    assert response.status_code == 404
    assert response.text.strip()
    assert "\n" not in response.text.strip()


def test_a_port_in_use_is_a_clear_error(start_web: Callable[..., WebRunning]) -> None:
    running = start_web()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        config = running.dicom.config.web.__class__(port=port, bind="127.0.0.1")
        with pytest.raises(WebListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            WebServer(config, running.archive).start()
