"""Talking to a peer of the configuration outside of a retrieve: C-ECHO, in words.

:func:`echo` is what the web page's echo button (and the command line) runs: a TCP
connection first, so that a closed port or an unreachable host is said as such, then an
association calling the peer by its AE title with the Verification SOP Class (PS3.4 Annex
A), then the C-ECHO. Each failure is one plain sentence: the peer's rejection with its
reason (PS3.8 9.3.4, A-ASSOCIATE-RJ), an abort, a C-ECHO status other than Success.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from . import status
from .config import Config, PeerConfig


@dataclass(frozen=True)
class EchoResult:
    """What a C-ECHO to a peer gave: ``ok`` when it answered Success; ``message`` says
    what happened in words; ``seconds`` from the TCP connection to the answer."""

    ok: bool
    message: str
    seconds: float


def echo(config: Config, peer: PeerConfig) -> EchoResult:
    """A C-ECHO from our AE title to ``peer`` (which has a ``host``), diagnosed."""
    started = time.monotonic()
    where = f"{peer.host}:{peer.port}"
    timeout = config.ae.acse_timeout or 30.0

    def result(ok: bool, message: str) -> EchoResult:
        return EchoResult(ok, message, time.monotonic() - started)

    try:  # a closed port or a wrong host is said before any DICOM
        socket.create_connection((peer.host, peer.port), timeout=timeout).close()
    except OSError as exc:
        return result(False, f"cannot connect to {where}: {exc.strerror or exc}"
                      " (is the peer running, is the port right, is a firewall in the way?)")
    ae = AE(ae_title=config.ae.title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = config.ae.dimse_timeout or timeout
    ae.network_timeout = timeout
    answers: list[Any] = []
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(
                             e.primitive))])
    try:
        if assoc.is_rejected:  # PS3.8 9.3.4: why, in the peer's own terms
            rsp = next((a for a in answers if getattr(a, "result", None) in (1, 2)), None)
            why = (f"{rsp.result_str}, by the {rsp.source_str}: {rsp.reason_str}"
                   if rsp is not None else "no reason given")
            hint = (" (does the peer know our AE title"
                    f" {config.ae.title!r}, and is its own AE title {peer.ae_title!r}?)")
            return result(False, f"{peer.ae_title} at {where} rejected the association: "
                          f"{why}{hint}")
        if not assoc.is_established:
            return result(False, f"{peer.ae_title} at {where} did not accept an association"
                          " with Verification (aborted, or no answer in time)")
        answer = assoc.send_c_echo()
        code = int(answer.Status) if "Status" in answer else None
        if code is None:
            return result(False, f"{peer.ae_title} at {where} gave no C-ECHO answer in time")
        if code != status.SUCCESS:
            return result(False, f"{peer.ae_title} at {where} answered C-ECHO with status"
                          f" {code:04X}")
        return result(True, f"{peer.ae_title} at {where} answered C-ECHO: Success")
    finally:
        if assoc.is_established:
            assoc.release()
