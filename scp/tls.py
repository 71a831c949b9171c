"""DICOM TLS: the SSL context of our TLS listener (PS3.15 B.9, BCP 195 TLS profile).

TLS 1.2 or newer only; for TLS 1.2 the four ECDHE AES-GCM cipher suites BCP 195 (RFC 9325)
recommends; TLS 1.3 with its own suites. With ``tls.require_client_cert`` the peer must
present a certificate signed by one of ``tls.ca_certificates``.
"""

from __future__ import annotations

import ssl

from .config import TLSConfig

BCP195_TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
])


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The SSL context of the TLS listener.

    Raises
    ------
    OSError, ValueError
        A file is missing or unusable (ssl.SSLError is an OSError).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_TLS12_CIPHERS)
    ctx.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        ctx.load_verify_locations(cafile=tls.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx
