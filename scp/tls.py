"""DICOM TLS: the SSL context of our TLS listener (PS3.15 B.9, BCP 195 TLS profile).

TLS 1.2 or newer only; for TLS 1.2 the four ECDHE AES-GCM cipher suites BCP 195 (RFC 9325)
recommends; TLS 1.3 with its own suites. With ``tls.require_client_cert`` the peer must
present a certificate signed by one of ``tls.ca_certificates``.
"""

from __future__ import annotations

import ssl
from typing import Any, Protocol

BCP195_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
])


class _HandshakeInTheAssociation(ssl.SSLContext):
    """An SSL context whose server sockets do their handshake later, with a time limit.

    pynetdicom wraps each accepted socket in its accept loop (``AssociationServer.
    get_request``) with ``do_handshake_on_connect=True`` and no timeout: one client that
    connects and sends nothing would hold the TLS listener, and a stop, forever. Wrapped
    here without the handshake, the socket makes it on its first read, in the
    association's own thread (OpenSSL's SSL_read completes a pending server handshake),
    and every read and write is bounded by ``timeout`` (``ae.acse_timeout``).
    """

    timeout: float = 30.0

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        sock.settimeout(self.timeout)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


class TLSFiles(Protocol):
    """The files and the client-certificate rule a context is made of, as
    ``scp.config.TLSConfig`` holds them. A protocol rather than that class so that this
    module does not import scp/config.py, which imports this one to check the files when
    the configuration is loaded."""

    @property
    def certificate(self) -> str: ...
    @property
    def private_key(self) -> str: ...
    @property
    def ca_certificates(self) -> str: ...
    @property
    def require_client_cert(self) -> bool: ...


def _no_password() -> str:
    raise ValueError("tls.private_key is encrypted: give an unencrypted key file")


def server_context(tls: TLSFiles, timeout: float = 30.0) -> ssl.SSLContext:
    """The SSL context of the TLS listener.

    Raises
    ------
    OSError, ValueError
        A file is missing or unusable, or the key is encrypted (ssl.SSLError is an
        OSError).
    """
    ctx = _HandshakeInTheAssociation(ssl.PROTOCOL_TLS_SERVER)
    ctx.timeout = timeout
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.load_cert_chain(tls.certificate, tls.private_key, password=_no_password)
    if tls.ca_certificates:
        ctx.load_verify_locations(cafile=tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx
