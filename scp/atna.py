"""The audit trail to syslog in the IHE ATNA form: ``audit.syslog``.

Each line of the audit trail (:mod:`scp.audit`) that has a counterpart among the DICOM
audit messages of PS3.15 A.5.3 is also sent, as that message's XML (the Audit Message
Format Profile, A.5.1's schema), in an RFC 5424 syslog message: ``<85>`` (facility 10,
security; severity 5, notice), MSGID ``DICOM+RFC3881``, the XML as MSG after a UTF-8 BOM.
The transport is the URL's scheme: ``tls://host:6514`` (RFC 5425, the ATNA profile, A.6:
octet-counted frames over TLS 1.2 or later, the repository's certificate checked against
``tls.ca_certificates`` or the system's, ours from ``tls.certificate`` when set), ``tcp://``
(octet-counted frames, RFC 6587) or ``udp://host:514`` (RFC 5426, A.7: one message per
datagram).

=====================================  ==================================================
audit trail line                       DICOM audit message (PS3.15 A.5.3)
=====================================  ==================================================
``application-start``, ``-stop``       Application Activity, Application Start / Stop
``association-rejected``               Security Alert, Node Authentication, minor failure
``dimse`` C-STORE                      DICOM Instances Transferred (create), from the peer
``dimse`` C-MOVE, C-GET                DICOM Instances Transferred (read), from us
``dimse`` C-FIND                       Query
``route``, ``send``                    DICOM Instances Transferred (read), from us
``delete``, ``retention``              DICOM Study Deleted
``http`` QIDO-RS                       Query
``http`` WADO-RS                       DICOM Instances Transferred (read), from us
``http`` STOW-RS                       DICOM Instances Transferred (create), from the user
``http`` DELETE                        DICOM Study Deleted
=====================================  ==================================================

A rejection pynetdicom makes itself (too many associations) is no security event: only
minipacs's access refusals (with their ``reason``) are sent; nor is an HTTP 401 (mostly a
browser asking for credentials). A message names at most :data:`MAX_OBJECTS` studies and
patients. A C-FIND's Query object holds its identifier's matching keys (those the audit
line has) encoded again in Explicit VR Little Endian; a QIDO-RS one its path and query
string (UTF-8). An HTTP request names the study of its path (``/studies/{uid}``), if any;
STOW-RS the studies it stored.

Sending never holds up an operation: lines are queued (:data:`QUEUE_SIZE`, the oldest
dropped when full, counted in the log) and a thread of the process turns them into
messages and sends them, connecting again (after 1 s, doubling up to 30 s) when the
repository is away; a UDP datagram may be lost, as RFC 5426 allows.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian

logger = logging.getLogger(__name__)

SCHEMES = {"tls": 6514, "tcp": 601, "udp": 514}
"""The transports of ``audit.syslog`` and their default ports."""
PRI = "<85>"
"""Facility 10 (security/authorization), severity 5 (notice): PS3.15 A.6, A.7."""
MSGID = "DICOM+RFC3881"
QUEUE_SIZE = 10_000
"""Lines waiting for the repository at most; beyond, the oldest are dropped."""
RETRY_SECONDS = (1.0, 30.0)
"""First and longest wait before connecting again."""
COMPLAIN_EVERY = 60.0
MAX_OBJECTS = 50
"""Studies (and patients) one message names at most: it must fit a UDP datagram."""
CONNECT_SECONDS = 3.0
"""TCP connection and TLS handshake timeout: below :data:`CLOSE_SECONDS`, so that a
command's last lines are tried before it exits."""
CLOSE_SECONDS = 5.0

DCM = "DCM"
SOURCE = ("110153", "Source Role ID")
DESTINATION = ("110152", "Destination Role ID")
"""The RoleIDCodes of an active participant in a transfer or a query (PS3.15 A.5.3)."""
TRANSFERRED = ("110104", "DICOM Instances Transferred")
QUERY = ("110112", "Query")
STUDY_DELETED = ("110105", "DICOM Study Deleted")
"""EventIDs of the messages more than one kind of line is sent as (PS3.15 A.5.3)."""


def syslog_problem(url: str) -> str | None:
    """Why ``url`` cannot be ``audit.syslog`` (``None`` when it can, or is empty)."""
    if not url:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    usage = ("must be tls://HOST[:PORT], tcp://HOST[:PORT] or udp://HOST[:PORT] (the audit"
             f" record repository), not {url!r}")
    if (parts.scheme not in SCHEMES or not parts.hostname or port == -1 or port == 0
            or parts.path not in ("", "/") or parts.query or parts.fragment
            or parts.username or parts.password):
        return usage
    try:
        parts.hostname.encode("idna")
    except UnicodeError:
        return usage
    return None


# -- the messages (PS3.15 A.5) ---------------------------------------------------------------


def _code(parent: ET.Element, tag: str, code: str, meaning: str, system: str = DCM) -> None:
    ET.SubElement(parent, tag, {"csd-code": code, "codeSystemName": system,
                                "originalText": meaning})


def _participant(message: ET.Element, user: str, requestor: bool, address: str = "",
                 role: tuple[str, str] | None = None, alternative: str = "") -> None:
    attributes = {"UserID": user or "unknown", "UserIsRequestor": "true" if requestor else
                  "false"}
    if alternative:
        attributes["AlternativeUserID"] = alternative
    if address:
        attributes["NetworkAccessPointID"] = address
        attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(address) else "1"
    element = ET.SubElement(message, "ActiveParticipant", attributes)
    if role:
        _code(element, "RoleIDCode", *role)


def _is_ip(text: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        return True
    except OSError:
        return False


def _study(objects: list[ET.Element], uid: str, sop_class: str = "", instance: str = ""
           ) -> None:
    """A study participant object (A.5.2.3 ... the Study Instance UID as its ID)."""
    element = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _code(element, "ParticipantObjectIDTypeCode", "110180", "Study Instance UID")
    ET.SubElement(element, "ParticipantObjectName").text = uid
    if sop_class:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        cls = ET.SubElement(description, "SOPClass", {"UID": sop_class,
                                                      "NumberOfInstances": "1"})
        if instance:
            ET.SubElement(cls, "Instance", {"UID": instance})
    objects.append(element)


def _patient(objects: list[ET.Element], patient_id: str) -> None:
    element = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1"})
    _code(element, "ParticipantObjectIDTypeCode", "2", "Patient Number", "RFC-3881")
    ET.SubElement(element, "ParticipantObjectName").text = patient_id
    objects.append(element)


def _uids(value: Any) -> list[str]:
    """UIDs of a query key's value or a list (a UID list is backslash-separated)."""
    if isinstance(value, list):
        return [str(v) for v in value if v]
    return [v for v in str(value or "").split("\\") if v]


def identifier(keys: dict[str, Any]) -> bytes:
    """A C-FIND's keys (as its audit line has them: keyword, text) as an identifier in
    Explicit VR Little Endian; a key without a keyword, or that cannot be encoded, is left
    out (PS3.15 A.5.3.12: the Query's ParticipantObjectQuery)."""
    values = {str(k): str(v) for k, v in keys.items()
              if v not in (None, "") and k != "SpecificCharacterSet"}  # decided here, once
    elements = []
    if any(not v.isascii() for v in values.values()):
        elements.append(DataElement(0x00080005, "CS", "ISO_IR 192"))
    for keyword, value in values.items():
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        vr = dictionary_VR(tag)
        try:
            if vr in ("US", "UL", "SS", "SL"):
                numbers = [int(part) for part in value.split("\\")]
                elements.append(DataElement(tag, vr, numbers if len(numbers) > 1
                                            else numbers[0]))
            else:
                elements.append(DataElement(tag, vr, value))
        except ValueError:
            continue
    encodings = ["utf8"] if elements and elements[0].tag == 0x00080005 else None
    out = bytearray()
    for element in sorted(elements, key=lambda e: e.tag):
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        try:
            write_data_element(fp, element, encodings)
        except Exception:  # noqa: BLE001 - a value pydicom will not write: left out
            continue
        out += fp.getvalue()
    return bytes(out)


def _query(sop_class: str, query: bytes, detail: tuple[str, str]) -> ET.Element:
    """The Query's participant object (PS3.15 A.5.3.12): the information model's SOP
    Class UID, the query (base64), and ``detail`` (a type and its value, base64)."""
    element = ET.Element("ParticipantObjectIdentification", {
        "ParticipantObjectID": sop_class, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _code(element, "ParticipantObjectIDTypeCode", "110181", "SOP Class UID")
    ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    ET.SubElement(element, "ParticipantObjectDetail", {
        "type": detail[0], "value": base64.b64encode(detail[1].encode()).decode()})
    return element


STUDY_IN_PATH = re.compile(r"/studies/([0-9.]{1,64})(?:/|$)")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
"""The information model a QIDO-RS search is named by (PS3.18 10.6: its resources are the
Study Root model's)."""


def _http(line: dict[str, Any], me: tuple[str, bool, str]) -> tuple[Any, ...] | None:
    """The message parts of an ``http`` line of QIDO-RS, WADO-RS, STOW-RS or DELETE; ``None``
    for the rest, and for a 401 (a browser asking for credentials)."""
    service, code = str(line.get("service", "")), int(line.get("status") or 0)
    if code == 401 or service not in ("QIDO-RS", "WADO-RS", "STOW-RS", "DELETE"):
        return None
    user = (str(line.get("user") or "anonymous"), True, str(line.get("address", "")))
    outcome = "0" if code < 400 and not line.get("failed") else "4"  # STOW-RS: 202
    path = str(line.get("path", ""))
    objects: list[ET.Element] = []
    if service == "QIDO-RS":
        query = path + (f"?{line['query']}" if line.get("query") else "")
        objects.append(_query(STUDY_ROOT_FIND, query.encode(), ("QueryEncoding", "UTF-8")))
        return (QUERY, None, "E", outcome,
                [(user, SOURCE), (me, DESTINATION)], objects)
    match = STUDY_IN_PATH.search(path)
    for uid in (_uids(line.get("studies")) or ([match.group(1)] if match else []))[
            :MAX_OBJECTS]:  # STOW-RS names the studies it stored
        _study(objects, uid)
    if service == "WADO-RS":
        return (TRANSFERRED, None, "R", outcome,
                [(me, SOURCE), (user, DESTINATION)], objects)
    if service == "STOW-RS":
        return (TRANSFERRED, None, "C", outcome,
                [(user, SOURCE), (me, DESTINATION)], objects)
    return (STUDY_DELETED, None, "D", outcome, [(user, None), (me, None)],
            objects)


def message(line: dict[str, Any], ae_title: str, host: str) -> bytes | None:
    """The DICOM audit message (XML, UTF-8) of an audit trail ``line``; ``None`` for a line
    without a counterpart (see the module's table)."""
    event, status = line.get("event", ""), str(line.get("status", ""))
    operation = line.get("operation", "")
    failed = (status not in ("0000", "") and not status.startswith(("B", "FF", "FE"))
              or bool(line.get("failed")))  # a retrieve some of whose instances failed
    me = (ae_title, False, host)
    peer = (str(line.get("calling_ae", "")), True, str(line.get("address", "")))
    action, outcome = "E", "4" if failed else "0"
    objects: list[ET.Element] = []
    participants: list[tuple[tuple[str, bool, str], tuple[str, str] | None]] = []
    if event in ("application-start", "application-stop"):
        event_id, type_code = ("110100", "Application Activity"), (
            ("110120", "Application Start") if event == "application-start"
            else ("110121", "Application Stop"))
        participants = [(me, ("110150", "Application"))]
        outcome = "0"
    elif event == "association-rejected" and line.get("reason"):  # minipacs's access refusal
        event_id, type_code = ("110113", "Security Alert"), ("110126", "Node Authentication")
        participants = [(me, None), (peer, None)]
        outcome = "4"
        node = ET.Element("ParticipantObjectIdentification", {
            "ParticipantObjectID": peer[2] or "unknown", "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})
        _code(node, "ParticipantObjectIDTypeCode", "110182", "Node ID")
        ET.SubElement(node, "ParticipantObjectName").text = peer[0] or "unknown"
        if line.get("reason"):
            ET.SubElement(node, "ParticipantObjectDetail", {
                "type": "Alert Description",
                "value": base64.b64encode(str(line["reason"]).encode()).decode()})
        objects.append(node)
    elif event == "dimse" and operation == "C-STORE":
        event_id, type_code, action = TRANSFERRED, None, "C"
        participants = [(peer, SOURCE), (me, DESTINATION)]
        if line.get("study_instance_uid"):
            _study(objects, str(line["study_instance_uid"]), str(line.get("sop_class_uid", "")),
                   str(line.get("sop_instance_uid", "")))
        if line.get("patient_id"):
            _patient(objects, str(line["patient_id"]))
    elif event == "dimse" and operation in ("C-MOVE", "C-GET"):
        event_id, type_code, action = TRANSFERRED, None, "R"
        destination = str(line.get("destination") or peer[0])
        asked = operation == "C-GET" or destination == peer[0]  # the destination asked
        participants = [(me, SOURCE),
                        ((destination, asked, peer[2] if operation == "C-GET" else ""),
                         DESTINATION)]
        if not asked:
            participants.append((peer, None))  # who asked, when not the destination
        keys = line.get("keys") or {}
        for uid in _uids(keys.get("StudyInstanceUID"))[:MAX_OBJECTS]:
            _study(objects, uid)
        for patient_id in _uids(keys.get("PatientID"))[:1]:
            _patient(objects, patient_id)
    elif event == "dimse" and operation == "C-FIND":
        event_id, type_code = QUERY, None
        participants = [(peer, SOURCE), (me, DESTINATION)]
        objects.append(_query(str(line.get("sop_class_uid") or "unknown"),
                              identifier(line.get("keys") or {}),
                              ("TransferSyntax", str(ExplicitVRLittleEndian))))
    elif event in ("route", "send"):  # C-STORE of ours: routing, minipacs send, the page
        event_id, type_code, action = TRANSFERRED, None, "R"
        page = line.get("via") == "web page"  # its address is the browser's
        address = str(line.get("address", ""))
        peer_host = (address.rsplit(":", 1)[0] if address.count(":") == 1  # HOST:PORT
                     else address)
        # routing: minipacs itself started the transfer; else who ran the command or
        # clicked the page's button (below) did
        participants = [((ae_title, not line.get("via"), host), SOURCE),
                        ((str(line.get("peer", "")), False, "" if page else peer_host),
                         DESTINATION)]
        if line.get("via"):  # someone asked: the command's user, the page's account
            participants.append(((str(line.get("user", "")), True, address if page else ""),
                                 None))
        failed = bool(line.get("failed")) or line.get("ok") is False or (
            status not in ("", "0000") and not status.startswith("B"))
        outcome = "4" if failed else "0"
        selection = line.get("selection") or {}
        for uid in (_uids(line.get("studies")) or _uids(line.get("study"))
                    or _uids(selection.get("study_uids")))[:MAX_OBJECTS]:
            _study(objects, uid)
        for patient_id in _uids(selection.get("patient_ids"))[:MAX_OBJECTS]:
            _patient(objects, patient_id)
    elif event == "http":
        built = _http(line, me)
        if built is None:
            return None
        event_id, type_code, action, outcome, participants, objects = built
    elif event in ("delete", "retention"):
        event_id, type_code, action = STUDY_DELETED, None, "D"
        outcome = "4" if line.get("error") or line.get("files_left") else "0"
        deleter = (str(line.get("user", "")), True, "")
        participants = [(deleter, None), (me, None)]
        studies = _uids(line.get("study_instance_uid")) or _uids(line.get("study_uids"))
        for uid in studies[:MAX_OBJECTS]:
            _study(objects, uid)
        for patient_id in (_uids(line.get("patient_id")) or _uids(line.get("patient_ids")))[
                :MAX_OBJECTS]:
            _patient(objects, patient_id)
    else:
        return None
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": str(line.get("time", "")),
        "EventOutcomeIndicator": outcome})
    _code(identification, "EventID", *event_id)
    if type_code:
        _code(identification, "EventTypeCode", *type_code)
    for (user, requestor, address), role in participants:
        _participant(root, user, requestor, address, role,
                     alternative=str(os.getpid()) if user == ae_title else "")
    source = ET.SubElement(root, "AuditSourceIdentification",
                           {"AuditSourceID": f"{ae_title}@{host}"})
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
    root.extend(objects)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def frame(xml: bytes, host: str, when: str, octet_counted: bool) -> bytes:
    """An RFC 5424 SYSLOG-MSG holding ``xml``, octet-counted (RFC 5425, RFC 6587) when sent
    on a stream."""
    header = f"{PRI}1 {when or '-'} {host or '-'} minipacs {os.getpid()} {MSGID} - "
    text = header.encode("ascii") + b"\xef\xbb\xbf" + xml
    return f"{len(text)} ".encode("ascii") + text if octet_counted else text


# -- the sender ------------------------------------------------------------------------------


class SyslogForwarder:
    """Sends audit trail lines to an audit record repository (see the module)."""

    def __init__(self, url: str, ae_title: str, certificate: str = "", private_key: str = "",
                 ca_certificates: str = "") -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.address = (parts.hostname or "", parts.port or SCHEMES[parts.scheme])
        self.ae_title = ae_title
        self.host = socket.gethostname()
        self._tls = (certificate, private_key, ca_certificates)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._dropped = 0
        self._complained = self._drops_said = -COMPLAIN_EVERY
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def put(self, line: dict[str, Any]) -> None:
        """Queue ``line`` (never blocks: the oldest waiting line goes when full)."""
        while True:
            try:
                self._queue.put_nowait(line)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self._dropped += 1
                except queue.Empty:
                    pass

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop; lines left unsent
        are logged."""
        self.put({"event": "(stop)"})
        self._thread.join(timeout)
        self._stop.set()
        if self._thread.is_alive():
            left = self._queue.qsize()
            logger.error("audit syslog: %d audit line(s) not sent to %s://%s:%d (the"
                         " repository did not take them in %.0f s)", left, self.scheme,
                         self.address[0], self.address[1], timeout)
            sock = self._sock
            if sock is not None:  # wakes the sender; it closes the socket itself
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(1.0)
        elif self._dropped:
            self._report_drops(force=True)

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._disconnect()  # the sender's own socket, closed by its own thread

    def _work(self) -> None:
        pending: bytes | None = None
        wait = RETRY_SECONDS[0]
        while not self._stop.is_set():
            if pending is None:
                line = self._queue.get()
                if line is None or line.get("event") == "(stop)":
                    return
                try:
                    xml = message(line, self.ae_title, self.host)
                except Exception:  # noqa: BLE001 - a line we cannot render is skipped
                    logger.exception("audit syslog: a line could not be rendered")
                    continue
                if xml is None:
                    continue
                pending = frame(xml, self.host, str(line.get("time", "")),
                                octet_counted=self.scheme != "udp")
            try:
                self._send(pending)
                pending, wait = None, RETRY_SECONDS[0]
            except Exception as exc:  # noqa: BLE001 - the thread must live on
                self._disconnect()
                if self.scheme == "udp" or not isinstance(exc, OSError):
                    # a datagram is sent or not (RFC 5426); a name that cannot be encoded
                    # never will be: this message goes, the next ones are tried
                    self._complain(f"a message to {self.scheme}://{self.address[0]}:"
                                   f"{self.address[1]} is lost: {exc}")
                    pending = None
                    if not isinstance(exc, OSError) and self._stop.wait(wait):
                        return
                    continue
                self._complain(f"cannot send to {self.scheme}://{self.address[0]}:"
                               f"{self.address[1]}: {exc}; trying again in {wait:.0f} s")
                if self._stop.wait(wait):
                    return
                wait = min(wait * 2, RETRY_SECONDS[1])
            if self._dropped:
                self._report_drops()

    def _report_drops(self, force: bool = False) -> None:
        """Log the lines dropped from the full queue (once a minute at most), then count
        anew."""
        now = time.monotonic()
        if force or now - self._drops_said >= COMPLAIN_EVERY:
            self._drops_said = now
            logger.error("audit syslog: %d audit line(s) dropped: the repository could not"
                         " keep up", self._dropped)
            self._dropped = 0

    def _send(self, data: bytes) -> None:
        if self.scheme == "udp":
            with socket.socket(socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET,
                               socket.SOCK_DGRAM) as udp:
                udp.sendto(data, self.address)
            return
        if self._sock is not None and select.select([self._sock], [], [], 0)[0]:
            self._disconnect()  # the repository sends nothing: readable means it closed
        if self._sock is None:
            raw = socket.create_connection(self.address, timeout=CONNECT_SECONDS)
            if self.scheme == "tls":
                certificate, key, cas = self._tls
                context = ssl.create_default_context(cafile=cas or None)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                if certificate:
                    context.load_cert_chain(certificate, key or None)
                raw = context.wrap_socket(raw, server_hostname=self.address[0])
            self._sock = raw
        self._sock.sendall(data)

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _complain(self, what: str) -> None:
        now = time.monotonic()
        if now - self._complained >= COMPLAIN_EVERY:
            self._complained = now
            logger.error("audit syslog: %s", what)
