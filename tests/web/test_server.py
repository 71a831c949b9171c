"""The HTTP listener itself: it starts beside the DICOM one, answers, and refuses what the
access rules refuse."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.test_cli import minipacs_command, wait_until_echo
from tests.web.conftest import WebRunning
from web import WebListenError, WebServer
from web.server import raise_file_limit


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


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_starts_http_beside_dicom_and_sigterm_stops_both(tmp_path: Path, workers: int) -> None:
    """``minipacs serve`` answers HTTP on ``--http-port``, names the DICOMweb root in its log,
    and stops both listeners on SIGTERM (exit 0); with ``ae.workers`` > 1 the supervisor
    serves HTTP."""
    config = tmp_path / "config.yaml"
    config.write_text(f"ae:\n  title: WEBTEST\n  bind: 127.0.0.1\n  workers: {workers}\n"
                      "storage:\n  durability: relaxed\n")
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*minipacs_command(), "serve", "--config", str(config), "--port", str(port),
         "--http-port", str(http_port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        start_new_session=True)
    try:
        wait_until_echo(port, proc)
        deadline = time.monotonic() + 30
        while True:  # poll until the HTTP listener answers
            assert proc.poll() is None, "minipacs exited early"
            try:
                answered = httpx.get(f"http://127.0.0.1:{http_port}/dicom-web/nothing")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "no HTTP answer within 30 s"
                time.sleep(0.05)  # poll interval, not a wait for readiness
        assert answered.status_code == 404
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"DICOMweb at http://127.0.0.1:{http_port}/dicom-web" in out
    assert "DICOMweb stopped" in out
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{http_port}/dicom-web/nothing", timeout=2)


def test_accepted_connections_have_nagle_off(web: WebRunning) -> None:
    """Kept-alive requests are not held ~40 ms by Nagle's algorithm waiting for the client's
    delayed ACK: every accepted connection has TCP_NODELAY (asyncio sets it only on sockets
    it creates, and ours is made by WebServer.start)."""
    with httpx.Client() as client:
        client.get(f"{web.url}/nothing")
        server = web.web._server
        assert server is not None
        connections = list(server.server_state.connections)
        assert connections, "uvicorn holds no connection for the kept-alive client"
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_a_client_that_never_finishes_its_headers_is_closed(
        start_web: Callable[..., WebRunning]) -> None:
    """uvicorn waits forever for a request's headers; a stalled client (or one sending a
    byte at a time, slowloris) would hold its connection, and with enough of them the
    process's file descriptors, which the DICOM listener needs too. Each connection gets
    HEADER_TIMEOUT for its request line and headers, the first and the next."""
    running = start_web()
    web = WebServer(running.dicom.config.web, running.archive, header_timeout=0.5)
    web.start()
    try:
        with socket.create_connection(("127.0.0.1", web.port), timeout=20) as stalled:
            stalled.sendall(b"GET /dicom-web/studies HTTP/1.1\r\nHo")
            assert stalled.recv(1024) == b""  # closed by the server, no answer
        with socket.create_connection(("127.0.0.1", web.port), timeout=20) as kept:
            kept.sendall(b"GET /dicom-web/nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"\n"):
                chunk = kept.recv(4096)
                assert chunk, "closed before the first answer"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 404")
            kept.sendall(b"GET /dicom-web/nothing HTTP/1.1\r\nHo")  # the next one stalls
            while chunk := kept.recv(4096):
                pass  # read until the server closes it
    finally:
        web.stop(grace=5)


def test_the_file_limit_is_raised_towards_its_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_file_limit(4096)
        expected = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == expected
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
