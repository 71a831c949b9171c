"""DICOM TLS (PS3.15 B.9, BCP 195): a TLS listener beside the plain one, client certificates
checked against our CA list. The certificates are made at test time with the openssl
command: a throwaway CA, a server and a client certificate it signs, and a stranger's."""

from __future__ import annotations

import logging
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from scp import status
from scp.config import ConfigError, load_config
from tests.conftest import Running
from tests.factory import make_ds


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    d = tmp_path_factory.mktemp("pki")
    key = ["-newkey", "rsa:2048", "-nodes"]
    _openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=minipacs test CA", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=minipacs test {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    _openssl("req", "-x509", *key, "-keyout", "stranger.key", "-out", "stranger.pem",
             "-days", "2", "-subj", "/CN=stranger", cwd=d)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
               d / "client.key", d / "stranger.pem", d / "stranger.key")


def tls_server(start_server: Callable[..., Running], pki: Pki, **extra: Any) -> Running:
    return start_server(**{"tls.enabled": True, "tls.port": 0,
                           "tls.certificate": str(pki.server_cert),
                           "tls.private_key": str(pki.server_key),
                           "tls.ca_certificates": str(pki.ca), **extra})


def client_context(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def tls_associate(running: Running, ctx: ssl.SSLContext) -> Any:
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", running.server.tls_port, ae_title=running.ae_title,
                        tls_args=(ctx, "localhost"))


def test_tls_beside_plain(start_server: Callable[..., Running], pki: Pki) -> None:
    running = tls_server(start_server, pki)
    assoc = tls_associate(running, client_context(pki, pki.client_cert, pki.client_key))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == status.SUCCESS
    ds = make_ds(SOPClassUID=CTImageStorage)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    tls_version = assoc.dul.socket.socket.version()
    assoc.release()
    assert tls_version in ("TLSv1.2", "TLSv1.3")
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(Verification)
    assoc = plain.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established and assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


@pytest.mark.parametrize("who", ["no certificate", "stranger"])
def test_client_certificate_is_required(start_server: Callable[..., Running], pki: Pki,
                                        who: str, caplog: Any) -> None:
    running = tls_server(start_server, pki)
    cert, key = (None, None) if who == "no certificate" else (pki.stranger_cert, pki.stranger_key)
    with caplog.at_level(logging.ERROR, logger="pynetdicom.dul"):
        assoc = tls_associate(running, client_context(pki, cert, key))
        assert not assoc.is_established
        deadline = time.monotonic() + 30  # the server's thread logs the refusal
        while "[SSL: " not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "[SSL: " in caplog.text  # e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE


def test_client_certificate_may_be_optional(start_server: Callable[..., Running],
                                            pki: Pki) -> None:
    running = tls_server(start_server, pki, **{"tls.require_client_cert": False})
    assoc = tls_associate(running, client_context(pki, None, None))
    assert assoc.is_established
    assoc.release()


def test_old_tls_versions_are_refused(start_server: Callable[..., Running], pki: Pki) -> None:
    running = tls_server(start_server, pki)
    ctx = client_context(pki, pki.client_cert, pki.client_key)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    try:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):  # pragma: no cover - this OpenSSL has no TLS 1.1
        pytest.fail("cannot make a TLS 1.1 client context here")
    assert not tls_associate(running, ctx).is_established


def test_dcmtk_echoscu_over_tls(start_server: Callable[..., Running], pki: Pki,
                                dcmtk: Callable[..., Any]) -> None:
    running = tls_server(start_server, pki)
    result = dcmtk("echoscu", "-v", "+tls", str(pki.client_key), str(pki.client_cert),
                   "+cf", str(pki.ca), "-aec", running.ae_title, "127.0.0.1",
                   str(running.server.tls_port))
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


def test_tls_config_problems(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tls: {enabled: true}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p.split(":")[0] for p in info.value.problems} == {
        "tls.certificate", "tls.private_key", "tls.ca_certificates"}
    path.write_text(f"tls: {{enabled: true, certificate: {pki.server_cert},"
                    f" private_key: {pki.client_key}, ca_certificates: {pki.ca}}}\n")
    with pytest.raises(ConfigError, match="cannot be used"):
        load_config(path)  # the key does not belong to the certificate
    (tmp_path / "certs").mkdir()
    for p in (pki.server_cert, pki.server_key, pki.ca):
        shutil.copy(p, tmp_path / "certs" / p.name)
    path.write_text("tls: {enabled: true, certificate: certs/server.pem,"
                    " private_key: certs/server.key, ca_certificates: certs/ca.pem}\n")
    config = load_config(path)  # relative to the config file's folder
    assert config.tls.certificate == str(tmp_path / "certs" / "server.pem")


def test_a_silent_client_holds_up_no_one(start_server: Callable[..., Running], pki: Pki) -> None:
    """A TCP connection to the TLS port that never starts the handshake: other TLS clients
    are served, and the server stops at once."""
    import socket

    running = tls_server(start_server, pki, **{"ae.acse_timeout": 5.0})
    with socket.create_connection(("127.0.0.1", running.server.tls_port)):
        started = time.monotonic()
        assoc = tls_associate(running, client_context(pki, pki.client_cert, pki.client_key))
        assert assoc.is_established and assoc.send_c_echo().Status == status.SUCCESS
        assoc.release()
        assert time.monotonic() - started < 4  # not after the silent one's timeout
        started = time.monotonic()
        running.server.stop(grace=1)
        assert time.monotonic() - started < 4


def test_tls_only_starts_no_plain_listener(start_server: Callable[..., Running], pki: Pki) -> None:
    import socket

    running = tls_server(start_server, pki, **{"tls.only": True})
    assert running.server._server is None
    assoc = tls_associate(running, client_context(pki, pki.client_cert, pki.client_key))
    assert assoc.is_established
    assoc.release()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", running.config.ae.port or 1),
                                                          timeout=5):
        pass


def test_a_busy_tls_port_leaves_nothing_listening(start_server: Callable[..., Running],
                                                  pki: Pki) -> None:
    import socket

    from scp.server import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            tls_server(start_server, pki, **{"tls.port": port})


def test_more_tls_config_problems(tmp_path: Path, pki: Pki) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:secret",
             "-out", str(encrypted), cwd=tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(f"tls: {{enabled: true, certificate: {pki.server_cert},"
                    f" private_key: {encrypted}, ca_certificates: {pki.ca}}}\n")
    with pytest.raises(ConfigError, match="encrypted"):
        load_config(path)
    path.write_text(f"ae: {{port: 4000}}\ntls: {{enabled: true, port: 4000, certificate:"
                    f" {pki.server_cert}, private_key: {pki.server_key}, ca_certificates:"
                    f" {pki.ca}}}\n")
    with pytest.raises(ConfigError, match="is ae.port too"):
        load_config(path)
    path.write_text("tls: {only: true}\n")
    with pytest.raises(ConfigError, match="tls.only: needs tls.enabled"):
        load_config(path)


def test_doctor_says_a_tls_port_is_one(start_server: Callable[..., Running], pki: Pki) -> None:
    """A plain association to a DICOM TLS port is closed without an answer; the doctor
    probes with a TLS handshake and says so, with what to do (scp/peers.py)."""
    from scp.config import PeerConfig
    from scp.peers import doctor

    running = tls_server(start_server, pki, **{"tls.only": True})
    found = doctor(running.config, PeerConfig(ae_title="MINIPACS", host="127.0.0.1",
                                              port=running.server.tls_port))
    assert [f.step for f in found.findings] == ["connect", "association"]
    association = found.findings[-1]
    assert not association.ok
    assert association.said.endswith("answers a TLS handshake: it is a DICOM TLS port"
                                     " (PS3.15 B.9)")
    assert association.advice.startswith("minipacs sends to peers without TLS")
