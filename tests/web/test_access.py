"""Access to the HTTP face (issue 14, "Access"): anonymous rights by where a request comes
from, HTTP Basic users with scrypt-hashed passwords, bearer tokens, the 401/403 rules, CORS
for listed origins only, HTTPS with the DICOM TLS certificate, and the commands that make
the hashes.

"From another host" means a peer address that is not loopback: the server binds this
machine's own outward address and the client connects to it, so the server sees that
address as the peer."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from scp.config import ConfigError, load_config
from tests.test_cli import minipacs_command
from tests.web.conftest import WebRunning
from web import WebConfig
from web.auth import (
    SCRYPT_LOG_N,
    SCRYPT_P,
    SCRYPT_R,
    AccessMiddleware,
    Accounts,
    PasswordHash,
    hash_password,
    hash_token,
    is_loopback,
    new_token,
)

ORIGIN = "https://viewer.example.org"
STRANGER_ORIGIN = "https://elsewhere.example.com"
REFUSED = (401, 403)
BASIC_CHALLENGE = 'Basic realm="minipacs"'
BEARER_CHALLENGE = 'Bearer realm="minipacs"'
TEST_NET = ("198.51.100.1", 9)
"""A documentation address (RFC 5737): connecting a UDP socket to it sends nothing, but
picks this machine's outward address."""
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=x'


@dataclass(frozen=True)
class Credentials:
    """A read user, a read-write user and a read token, with their config entries."""

    reader: tuple[str, str]
    writer: tuple[str, str]
    token: str
    users: list[str]
    tokens: list[str]


@pytest.fixture(scope="module")
def credentials() -> Credentials:
    """Made once per module: each password hash costs a quarter of a second."""
    reader, writer, token = ("alice", "alice's pw"), ("bob", "bob: the pw"), new_token()
    return Credentials(
        reader, writer, token,
        users=[f"alice:read:{hash_password(reader[1])}",
               f"bob:read-write:{hash_password(writer[1])}"],
        tokens=[f"carol:read:{hash_token(token)}"])


def outward_address() -> str:
    """A non-loopback IPv4 address of this machine (the source of its route outwards).

    Without one the test is skipped, or fails with a clear message when ``CI`` is set.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(TEST_NET)
            address = str(sock.getsockname()[0])
        except OSError:
            address = ""
    if not address or is_loopback(address):
        message = ("this machine has no non-loopback IPv4 address (no route outwards), so"
                   " a request from another host cannot be made")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return address


@pytest.fixture
def remote(start_web: Callable[..., WebRunning], credentials: Credentials) -> WebRunning:
    """A server bound to this machine's outward address with the default access rules and
    the users and token of :func:`credentials`; its ``url`` names that address."""
    return start_web(**{"web.bind": outward_address(), "web.users": credentials.users,
                        "web.tokens": credentials.tokens})


def stow(url: str, **kwargs: Any) -> httpx.Response:
    """A STOW-RS request (an empty multipart body: access is judged before it is read)."""
    return httpx.post(f"{url}/studies", content=b"--x--\r\n",
                      headers={"Content-Type": STOW_TYPE, **kwargs.pop("headers", {})},
                      **kwargs)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the hashes --------------------------------------------------------------------------


def test_a_password_hash_is_salted_scrypt_described_in_the_string() -> None:
    first, second = hash_password("same"), hash_password("same")
    assert first.startswith(f"$scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}$")
    assert first != second  # a new salt each time
    parsed = PasswordHash.parse(first)
    assert str(parsed) == first
    assert parsed.matches(b"same")
    assert not parsed.matches(b"Same")


def test_a_verified_password_is_remembered_and_a_wrong_one_is_not(
        credentials: Credentials) -> None:
    accounts = Accounts(credentials.users, credentials.tokens)
    user, password = credentials.reader
    good, bad = f"{user}:{password}".encode(), f"{user}:nope".encode()
    assert accounts.remembered(good) is None
    account = accounts.verify_password(good)
    assert account is not None and (account.name, account.rights) == ("alice", "read")
    assert accounts.remembered(good) == account
    assert accounts.verify_password(bad) is None
    assert accounts.remembered(bad) is None
    assert accounts.verify_password(b"mallory:x") is None  # costs a derivation all the same
    assert accounts.kdf_runs == 3
    assert accounts.verify_token(credentials.token) is not None
    assert accounts.verify_token(credentials.token + "x") is None


def test_the_middleware_derives_a_password_once_for_many_requests(
        credentials: Credentials) -> None:
    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(scope["minipacs.user"])(scope, receive, send)

    config = WebConfig(anonymous_local="none", users=tuple(credentials.users))
    middleware = AccessMiddleware(endpoint, config)

    async def requests() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/dicom-web/studies", auth=credentials.reader)
                    for _ in range(20)]

    responses = asyncio.run(requests())
    assert [r.status_code for r in responses] == [200] * 20
    assert responses[-1].text == "alice"
    assert middleware.accounts.kdf_runs == 1


def test_bad_entries_are_config_errors_all_at_once(credentials: Credentials) -> None:
    good = credentials.users[0]
    hashed = good.split(":", 2)[2]
    weak = hashed.replace(f"ln={SCRYPT_LOG_N}", "ln=10")
    with pytest.raises(ConfigError) as caught:
        load_config(None, {
            "web.users": ["no colons", f"eve:write:{hashed}", "mallory:read:plain-text",
                          f"weak:read:{weak}", good, good, f":read:{hashed}"],
            "web.tokens": ["ci:read:abc", f"ci2:read-write:{hash_token('t')}",
                           f"ci3:read:{hash_token('t')}"]})
    assert caught.value.problems == [
        'web.users[0]: must be "name:rights:hash"',
        "web.users[1]: rights must be read or read-write, not 'write'",
        "web.users[2] (mallory): not a hash from minipacs hash-password: must look like"
        " $scrypt$ln=..,r=..,p=..$<salt>$<hash>",
        "web.users[3] (weak): not a hash from minipacs hash-password: too weak: ln must be"
        " at least 14, r at least 1 and p between 1 and 16",
        "web.users[5] (alice): the name is listed more than once",
        "web.users[6]: its name is empty",
        "web.tokens[0] (ci): not a hash from minipacs new-token: must look like"
        " $sha256$<43 base64 characters>",
        "web.tokens[2] (ci3): the same token as another entry",
    ]


# -- from this machine -------------------------------------------------------------------


def test_this_machine_reads_and_writes_without_credentials_by_default(
        web: WebRunning) -> None:
    assert web.web.config.bind == "127.0.0.1"
    assert httpx.get(f"{web.url}/studies").status_code not in REFUSED
    assert stow(web.url).status_code not in REFUSED


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:{port}", "127.0.0.1:{port}",
                                  "127.0.0.2", "[::1]:{port}"])
def test_this_machine_by_a_local_name_is_local(web: WebRunning, host: str) -> None:
    headers = {"Host": host.format(port=web.web.port)}
    assert httpx.get(f"{web.url}/studies", headers=headers).status_code not in REFUSED


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}",
                                  "127.0.0.1.attacker.example", "localhost.attacker.example",
                                  "10.0.0.1", ""])
def test_a_rebound_name_on_this_machine_is_remote(web: WebRunning, host: str) -> None:
    """DNS rebinding: a page whose name an attacker points at 127.0.0.1 reaches us from a
    local browser, with its own name in Host; it gets web.anonymous_remote (none)."""
    headers = {"Host": host.format(port=web.web.port)}
    assert httpx.get(f"{web.url}/studies", headers=headers).status_code == 401
    assert stow(web.url, headers=headers).status_code == 401


def test_anonymous_local_none_asks_for_credentials(start_web: Callable[..., WebRunning],
                                                    credentials: Credentials) -> None:
    running = start_web(**{"web.anonymous_local": "none", "web.users": credentials.users})
    refused = httpx.get(f"{running.url}/studies")
    assert refused.status_code == 401
    assert refused.headers.get_list("www-authenticate") == [BASIC_CHALLENGE]
    assert refused.text == "credentials are required\n"
    assert httpx.get(f"{running.url}/studies", auth=credentials.reader).status_code \
        not in REFUSED


def test_anonymous_read_may_not_store(start_web: Callable[..., WebRunning]) -> None:
    running = start_web(**{"web.anonymous_local": "read"})
    assert httpx.get(f"{running.url}/studies").status_code not in REFUSED
    refused = stow(running.url)
    assert refused.status_code == 401  # no credentials: authenticating could help
    assert "POST needs read-write rights" in refused.text


def test_credentials_give_their_own_rights_even_from_this_machine(
        start_web: Callable[..., WebRunning], credentials: Credentials) -> None:
    running = start_web(**{"web.users": credentials.users})  # anonymous_local: read-write
    assert stow(running.url, auth=credentials.reader).status_code == 403
    assert httpx.get(f"{running.url}/studies", auth=(credentials.reader[0], "wrong")) \
        .status_code == 401


# -- from another host -------------------------------------------------------------------


def test_another_host_without_credentials_gets_nothing(remote: WebRunning,
                                                        caplog: Any) -> None:
    assert not is_loopback(remote.web.config.bind)
    with caplog.at_level(logging.INFO, logger="minipacs.web"):
        for response in (httpx.get(f"{remote.url}/studies"), stow(remote.url),
                         httpx.head(f"{remote.url}/studies/1.2.3/series")):
            assert response.status_code == 401
            assert response.headers.get_list("www-authenticate") == [BASIC_CHALLENGE,
                                                                      BEARER_CHALLENGE]
    refusals = [r.getMessage() for r in caplog.records if r.name == "minipacs.web"]
    assert len(refusals) == 3
    assert refusals[0].startswith(f"refused GET '/dicom-web/studies' from"
                                  f" {remote.web.config.bind}:")
    assert refusals[0].endswith(": 401 credentials are required")


def test_another_host_cannot_pass_for_this_machine(remote: WebRunning) -> None:
    """uvicorn takes X-Forwarded-For from a loopback proxy only."""
    response = httpx.get(f"{remote.url}/studies", headers={"X-Forwarded-For": "127.0.0.1"})
    assert response.status_code == 401


def test_a_read_user_reads_and_may_not_store(remote: WebRunning,
                                             credentials: Credentials) -> None:
    assert httpx.get(f"{remote.url}/studies", auth=credentials.reader).status_code \
        not in REFUSED
    refused = stow(remote.url, auth=credentials.reader)
    assert refused.status_code == 403
    assert refused.text == "alice may not POST: it needs read-write rights\n"


def test_a_read_write_user_stores(remote: WebRunning, credentials: Credentials) -> None:
    assert stow(remote.url, auth=credentials.writer).status_code not in REFUSED
    assert httpx.get(f"{remote.url}/studies", auth=credentials.writer).status_code \
        not in REFUSED


def test_wrong_credentials_are_401_and_no_password_is_logged(
        remote: WebRunning, credentials: Credentials, caplog: Any) -> None:
    malformed = base64.b64encode(b"no colon").decode()
    with caplog.at_level(logging.INFO, logger="minipacs.web"):
        for kwargs in ({"auth": (credentials.reader[0], "secret-guess")},
                       {"auth": ("mallory", "secret-guess")},
                       {"headers": {"Authorization": f"Basic {malformed}"}},
                       {"headers": {"Authorization": "Basic %%%"}},
                       {"headers": {"Authorization": "Digest username=alice"}}):
            response = httpx.get(f"{remote.url}/studies", **kwargs)
            assert response.status_code == 401, kwargs
            assert BASIC_CHALLENGE in response.headers.get_list("www-authenticate")
    assert "unknown user or wrong password (user 'alice')" in caplog.text
    assert "malformed Basic credentials" in caplog.text
    assert "unsupported authorization scheme 'Digest'" in caplog.text
    assert "secret-guess" not in caplog.text


def test_a_bearer_token_has_its_rights(remote: WebRunning, credentials: Credentials) -> None:
    assert httpx.get(f"{remote.url}/studies", headers=bearer(credentials.token)) \
        .status_code not in REFUSED
    assert stow(remote.url, headers=bearer(credentials.token)).status_code == 403
    refused = httpx.get(f"{remote.url}/studies", headers=bearer(new_token()))
    assert refused.status_code == 401
    assert refused.headers.get_list("www-authenticate") == [
        BASIC_CHALLENGE, f'{BEARER_CHALLENGE}, error="invalid_token"']


def test_the_viewer_files_need_no_credentials(remote: WebRunning) -> None:
    for path in ("/viewer", "/viewer/", "/viewer/index.html"):
        assert httpx.get(f"{remote.root}{path}").status_code not in REFUSED, path
    assert httpx.get(f"{remote.root}/viewerx").status_code == 401
    assert httpx.get(f"{remote.root}/").status_code == 401


# -- CORS --------------------------------------------------------------------------------


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url, headers={"Origin": origin,
                                       "Access-Control-Request-Method": "GET",
                                       "Access-Control-Request-Headers": "authorization"})


def test_cors_answers_listed_origins_only(start_web: Callable[..., WebRunning]) -> None:
    running = start_web(**{"web.cors_origins": [ORIGIN], "web.anonymous_local": "none"})
    url = f"{running.url}/studies"
    allowed = preflight(url, ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "GET" in allowed.headers["access-control-allow-methods"]
    other = preflight(url, STRANGER_ORIGIN)
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    # a refused request still lets the listed origin's page read why
    refused = httpx.get(url, headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    stranger = httpx.get(url, headers={"Origin": STRANGER_ORIGIN})
    assert stranger.status_code == 401
    assert "access-control-allow-origin" not in stranger.headers


def test_no_cors_without_listed_origins(web: WebRunning) -> None:
    response = preflight(f"{web.url}/studies", ORIGIN)
    assert "access-control-allow-origin" not in response.headers
    response = httpx.get(f"{web.url}/studies", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


# -- HTTPS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl (as
    tests/test_tls.py makes its PKI); it is its own CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("https")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   cwd=folder, check=True, capture_output=True, timeout=60)
    return folder / "cert.pem", folder / "key.pem"


def test_https_with_the_tls_certificate(start_web: Callable[..., WebRunning],
                                        certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    running = start_web(**{"web.https": True, "tls.certificate": str(cert),
                           "tls.private_key": str(key)})
    assert running.url.startswith("https://127.0.0.1:")
    trusted = ssl.create_default_context(cafile=str(cert))
    assert httpx.get(f"{running.url}/studies", verify=trusted).status_code not in REFUSED
    with pytest.raises(httpx.ConnectError):  # a client that does not trust it
        httpx.get(f"{running.url}/studies", verify=ssl.create_default_context())
    with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
        httpx.get(f"http://127.0.0.1:{running.web.port}/dicom-web/studies")


# -- the commands ------------------------------------------------------------------------


def run_minipacs(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*minipacs_command(), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_hash_password_and_new_token_make_working_entries(
        start_web: Callable[..., WebRunning]) -> None:
    hashed = run_minipacs("hash-password", stdin="correct horse\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.count("\n") == 1
    assert hashed.stdout.startswith("$scrypt$")
    made = run_minipacs("new-token", "pipeline", "read-write")
    assert made.returncode == 0, made.stderr
    token, line = made.stdout.splitlines()
    entry = json.loads(line)
    assert entry.startswith("pipeline:read-write:$sha256$")
    running = start_web(**{"web.anonymous_local": "none",
                           "web.users": [f"dave:read:{hashed.stdout.strip()}"],
                           "web.tokens": [entry]})
    url = f"{running.url}/studies"
    assert httpx.get(url, auth=("dave", "correct horse")).status_code not in REFUSED
    assert httpx.get(url, auth=("dave", "correct horse\n")).status_code == 401
    assert stow(running.url, headers=bearer(token)).status_code not in REFUSED


def test_hash_password_refuses_an_empty_password() -> None:
    done = run_minipacs("hash-password", stdin="\n")
    assert done.returncode == 2
    assert done.stdout == ""
    assert "the password is empty" in done.stderr
