"""Talking to a peer of the configuration outside of a retrieve: C-ECHO and ``doctor``, in
words.

:func:`echo` is what the web page's echo button runs: a TCP connection first, so that a
closed port or an unreachable host is said as such, then an association calling the peer by
its AE title with the Verification SOP Class (PS3.4 Annex A), then the C-ECHO. Each failure
is one plain sentence: the peer's rejection with its reason (PS3.8 9.3.4, A-ASSOCIATE-RJ),
an abort, a C-ECHO status other than Success.

:func:`doctor` (``minipacs doctor PEER``) goes further, step by step, each step a
:class:`Finding` with advice when it failed:

1. the TCP connection (refused, timed out, no such host);
2. an association with Verification: a rejection's reason turned into what to change (the
   peer does not know our AE title, or answers to another one); a connection closed without
   an answer is probed with a TLS handshake, since a DICOM TLS port (PS3.15 B.9) does that to
   a plain association;
3. :data:`ECHOES` C-ECHOs on it: answers that each take about 40 ms are the stall of a peer
   that writes its answers in pieces with Nagle's algorithm on, waiting for our delayed
   acknowledgement (DCMTK without ``TCP_NODELAY=1``);
4. an association with what minipacs would propose when sending it what the archive holds
   (as a C-MOVE would: :func:`scp.retrieve.contexts_for`), and Study Root C-FIND: each
   context accepted or rejected, with the reason;
5. a Study Root C-FIND at STUDY level, cancelled after :data:`FIND_RESPONSES` responses.
"""

from __future__ import annotations

import errno
import socket
import ssl
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from . import status
from .config import Config, PeerConfig
from .retrieve import MAX_CONTEXTS, contexts_for

ECHOES = 10
"""C-ECHOs timed on one association."""
STALL_SECONDS = 0.030
"""A median C-ECHO at least this slow, over a connection that opened in a fraction of it, is
the Nagle stall (about 40 ms on Linux: the delayed acknowledgement's timer)."""
FIND_RESPONSES = 10
"""C-FIND responses taken before the doctor's C-CANCEL."""
SAMPLE_CLASSES = (str(CTImageStorage), str(MRImageStorage), str(SecondaryCaptureImageStorage))
"""Proposed when the archive holds nothing yet."""


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
            if any(getattr(a, "result", None) == 0 for a in answers):  # accepted, no context
                return result(False, f"{peer.ae_title} at {where} does not support"
                              " Verification (its presentation context was rejected)")
            return result(False, f"{peer.ae_title} at {where} did not accept an association"
                          " (it closed or aborted it, or did not answer in time)")
        answer = assoc.send_c_echo()
        code = int(answer.Status) if "Status" in answer else None
        if code is None:
            assoc.join(timeout)  # its thread records an abort once the call has returned
            return result(False, f"{peer.ae_title} at {where} gave no C-ECHO answer"
                          + (" (it aborted the association)" if assoc.is_aborted
                             else " in time"))
        if code != status.SUCCESS:
            return result(False, f"{peer.ae_title} at {where} answered C-ECHO with status"
                          f" {code:04X}")
        return result(True, f"{peer.ae_title} at {where} answered C-ECHO: Success")
    finally:
        if assoc.is_established:
            assoc.release()


# -- minipacs doctor -------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One step of :func:`doctor`: ``ok`` or not, what was seen, and what to do."""

    step: str
    ok: bool
    said: str
    advice: str = ""


@dataclass
class Diagnosis:
    """What :func:`doctor` found about ``peer``."""

    peer: PeerConfig
    findings: list[Finding] = field(default_factory=list)
    accepted: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Class UID, transfer syntax UID) of each context the peer accepted."""
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(SOP Class UID, the reason) of each context it rejected."""

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def add(self, step: str, ok: bool, said: str, advice: str = "") -> bool:
        self.findings.append(Finding(step, ok, said, advice))
        return ok


CONNECT_ADVICE = {
    errno.ECONNREFUSED: "nothing listens there: is the peer running, and is the port right?",
    errno.EHOSTUNREACH: "no route to that host: check the address, the network, a firewall",
    errno.ENETUNREACH: "no route to that network: check the address",
}


def doctor(config: Config, peer: PeerConfig,
           held: dict[tuple[str, str], int] | None = None) -> Diagnosis:
    """Diagnose ``peer`` (which has a ``host``) step by step (see the module); ``held`` is
    what the archive holds, by (SOP Class UID, transfer syntax UID): what a send would
    propose (the sample classes when empty)."""
    found = Diagnosis(peer)
    where = f"{peer.host}:{peer.port}"
    timeout = config.ae.acse_timeout or 30.0
    started = time.perf_counter()
    try:
        socket.create_connection((peer.host, peer.port), timeout=timeout).close()
    except socket.gaierror as exc:
        found.add("connect", False, f"{peer.host!r} does not resolve: {exc.strerror}",
                  "check peers[].host")
        return found
    except TimeoutError:
        found.add("connect", False, f"no answer from {where} in {timeout:.0f} s",
                  "a firewall dropping the packets, or a host that is down")
        return found
    except OSError as exc:
        found.add("connect", False, f"cannot connect to {where}: {exc.strerror or exc}",
                  CONNECT_ADVICE.get(exc.errno or 0, ""))
        return found
    connect_seconds = time.perf_counter() - started
    found.add("connect", True, f"TCP connection to {where} in {connect_seconds * 1000:.1f} ms")

    assoc, answers = _associate(config, peer, [build_context(Verification)], timeout)
    try:
        if not _established(found, config, peer, assoc, answers, timeout):
            return found
        times = []
        for _ in range(ECHOES):
            begin = time.perf_counter()
            answer = assoc.send_c_echo()
            times.append(time.perf_counter() - begin)
            code = int(answer.Status) if "Status" in answer else None
            if code != status.SUCCESS:
                found.add("C-ECHO", False, "no answer in time" if code is None else
                          f"status {code:04X}", "the peer refuses Verification")
                return found
        median = statistics.median(times)
        if median >= STALL_SECONDS and connect_seconds < median / 2:
            found.add("C-ECHO", False, f"each answer takes {median * 1000:.0f} ms (median of"
                      f" {ECHOES}), where the connection opened in"
                      f" {connect_seconds * 1000:.1f} ms",
                      "the peer writes its answers in pieces with Nagle's algorithm on, and"
                      " each waits for our delayed acknowledgement: turn Nagle off on the"
                      " peer (TCP_NODELAY; for DCMTK tools, TCP_NODELAY=1 in their"
                      " environment). A sender stalled this way stores 20 instances/s.")
        else:
            found.add("C-ECHO", True, f"Success, {median * 1000:.1f} ms each (median of"
                      f" {ECHOES})")
    finally:
        _release(assoc)

    proposed = [build_context(Verification),
                build_context(StudyRootQueryRetrieveInformationModelFind)]
    pairs = Counter(held or {(cls, str(ExplicitVRLittleEndian)): 1 for cls in SAMPLE_CLASSES})
    proposed += contexts_for(pairs, peer)[:MAX_CONTEXTS - len(proposed)]
    assoc, answers = _associate(config, peer, proposed, timeout)
    try:
        if not _established(found, config, peer, assoc, answers, timeout):
            return found
        _contexts(found, assoc, proposed)
        _find(found, assoc)
    finally:
        _release(assoc)
    return found


def _associate(config: Config, peer: PeerConfig, contexts: list[PresentationContext],
               timeout: float) -> tuple[Association, list[Any]]:
    ae = AE(ae_title=config.ae.title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = peer.max_pdu_size or config.ae.max_pdu_size
    answers: list[Any] = []
    assoc = ae.associate(peer.host, peer.port, contexts, ae_title=peer.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, lambda e: answers.append(
                             e.primitive))])
    return assoc, answers


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


REJECTION_ADVICE = {
    "Called AE title not recognised": "the peer does not answer to AE title {called!r}: set"
                                      " peers[].ae_title to the peer's own AE title",
    "Calling AE title not recognised": "the peer does not know us: add AE title {calling!r}"
                                       " (this host) to the peer's known AEs",
    "Local limit exceeded": "the peer has too many associations open: try again later, or"
                            " raise its limit",
    "Temporary congestion": "the peer is busy: try again later",
}


def _established(found: Diagnosis, config: Config, peer: PeerConfig, assoc: Association,
                 answers: list[Any], timeout: float) -> bool:
    """Whether ``assoc`` is established; if not, why (PS3.8 9.3.4), as a finding."""
    if assoc.is_established:
        return True
    where = f"{peer.host}:{peer.port}"
    if assoc.is_rejected:
        rsp = next((a for a in answers if getattr(a, "result", None) in (1, 2)), None)
        reason = rsp.reason_str if rsp is not None else "no reason given"
        advice = next((text for key, text in REJECTION_ADVICE.items() if key in reason),
                      "see the peer's log for why")
        found.add("association", False, f"{peer.ae_title} at {where} rejected it: "
                  f"{rsp.result_str if rsp is not None else 'Rejected'}, {reason}",
                  advice.format(called=peer.ae_title, calling=config.ae.title))
        return False
    if _speaks_tls(peer.host, peer.port, timeout):
        found.add("association", False, f"{where} closed the connection without a DICOM"
                  " answer, and answers a TLS handshake: it is a DICOM TLS port (PS3.15 B.9)",
                  "minipacs sends to peers without TLS: use the peer's plain DICOM port, or"
                  " put a TLS tunnel (stunnel) in between")
    elif any(getattr(a, "result", None) == 0 for a in answers):
        found.add("association", False, f"{peer.ae_title} at {where} accepted none of the"
                  " presentation contexts proposed", "the peer supports none of them")
    else:
        found.add("association", False, f"{where} closed or aborted the association without"
                  " accepting it, or did not answer in time",
                  "is it a DICOM port? (an HTTP server, for one, closes it like this)")
    return False


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether ``host``:``port`` answers a TLS handshake (an alert from it counts: a TLS
    server that wants a client certificate says so in TLS)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except ssl.SSLError as exc:
        return "ALERT" in exc.reason.upper() if exc.reason else False
    except OSError:
        return False


def _contexts(found: Diagnosis, assoc: Association,
              proposed: list[PresentationContext]) -> None:
    """Each proposed context accepted (with the syntax the peer chose) or rejected (PS3.8
    9.3.3.2: its result's reason)."""
    for cx in assoc.accepted_contexts:
        found.accepted.append((str(cx.abstract_syntax), str(cx.transfer_syntax[0])))
    for cx in assoc.rejected_contexts:
        found.rejected.append((str(cx.abstract_syntax), str(cx.status)))
    storage = [cx for cx in proposed if str(cx.abstract_syntax) not in (
        str(Verification), str(StudyRootQueryRetrieveInformationModelFind))]
    taken = {cls for cls, _ in found.accepted}
    refused = sorted({str(cx.abstract_syntax) for cx in storage} - taken)
    if refused:
        names = ", ".join(UID(cls).name for cls in refused)
        found.add("contexts", False, f"the peer takes none of the transfer syntaxes proposed"
                  f" for {len(refused)} SOP Class(es) minipacs would send: {names}",
                  "a send or C-MOVE of these instances to it fails: configure the peer to"
                  " accept them, or leave them out")
    else:
        found.add("contexts", True, f"the peer takes every SOP Class minipacs would send"
                  f" ({len({str(cx.abstract_syntax) for cx in storage})})")


def _find(found: Diagnosis, assoc: Association) -> None:
    """A STUDY-level C-FIND, cancelled after :data:`FIND_RESPONSES` responses."""
    model = str(StudyRootQueryRetrieveInformationModelFind)
    if not any(str(cx.abstract_syntax) == model for cx in assoc.accepted_contexts):
        found.add("C-FIND", True, "the peer offers no Study Root C-FIND (a storage SCP only)")
        return
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientID", "StudyDate"):
        setattr(identifier, keyword, "")
    begin = time.perf_counter()
    first = None
    responses = 0
    final: int | None = None
    message_id = 7
    for answer, _ in assoc.send_c_find(identifier, model, msg_id=message_id):
        code = int(answer.Status) if "Status" in answer else None
        if code in (status.PENDING, status.PENDING_WARNING):
            responses += 1
            first = first or time.perf_counter() - begin
            if responses == FIND_RESPONSES:
                assoc.send_c_cancel(message_id, query_model=model)
            continue
        final = code
    if final is None:
        found.add("C-FIND", False, "no final response in time", "see the peer's log")
    elif final in (status.SUCCESS, status.CANCEL):
        after = f", the first after {first * 1000:.1f} ms" if first is not None else ""
        found.add("C-FIND", True, f"{responses} response(s){after}"
                  + (" (cancelled there)" if final == status.CANCEL else ""))
    else:
        found.add("C-FIND", False, f"final status {final:04X}", "see the peer's log")
