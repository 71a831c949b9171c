"""The audit trail in the IHE ATNA form (scp/atna.py, ``audit.syslog``): a running server's
messages received by an audit record repository over TLS (RFC 5425, with client and server
certificates), TCP and UDP, each an RFC 5424 syslog message whose XML is validated against
the schema of DICOM PS3.15 A.5.1 (tests/data/dicom-audit-message.rnc, the standard's RELAX
NG Compact text, read with rnc2rng and checked with lxml)."""

from __future__ import annotations

import base64
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import rnc2rng
from lxml import etree
from pydicom.filereader import read_dataset
from pynetdicom import AE

from scp.atna import identifier, message
from scp.config import ConfigError, load_config
from tests.conftest import Running, associate, find
from tests.factory import make_ds
from tests.test_tls import Pki, pki, tls_server  # noqa: F401 - pki is a fixture

SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rnc"
SYSLOG = re.compile(rb"<85>1 (\S+) (\S+) minipacs (\d+) DICOM\+RFC3881 - \xef\xbb\xbf(.*)",
                    re.DOTALL)
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def schema() -> etree.RelaxNG:
    # the standard's text has "##" documentation comments where RELAX NG Compact allows
    # none (after a pattern); as plain comments they change nothing
    text = SCHEMA.read_text().replace("##", "#")
    return etree.RelaxNG(etree.fromstring(rnc2rng.dumps(rnc2rng.loads(text)).encode()))


class Repository:
    """An audit record repository for the test: syslog over TLS or TCP (octet-counted
    frames) or UDP (a message per datagram) on a free loopback port."""

    def __init__(self, scheme: str, context: ssl.SSLContext | None = None,
                 up: bool = True, hang_up: bool = False) -> None:
        self.scheme = scheme
        self.context = context
        self.hang_up = hang_up  # close each connection after its first message
        self.hung_up = threading.Event()
        self.messages: list[bytes] = []
        self._changed = threading.Condition()
        kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.bind(("127.0.0.1", 0))  # the port is ours from now on
        self.port = self.sock.getsockname()[1]
        if up:
            self.up()

    def up(self) -> None:
        """Take connections (until then a connection is refused: the port is bound, not
        listening)."""
        if self.scheme != "udp":
            self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def _add(self, data: bytes) -> None:
        with self._changed:
            self.messages.append(data)
            self._changed.notify_all()

    def _serve(self) -> None:
        try:
            while True:
                if self.scheme == "udp":
                    self._add(self.sock.recv(65536))
                    continue
                conn, _ = self.sock.accept()
                if self.context is not None:
                    conn = self.context.wrap_socket(conn, server_side=True)
                threading.Thread(target=self._frames, args=(conn,), daemon=True).start()
        except OSError:
            return  # closed

    def _frames(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                digits = b""
                while (char := reader.read(1)) not in (b" ", b""):
                    digits += char
                if not digits:
                    return
                self._add(reader.read(int(digits)))
                if self.hang_up:
                    break
        if self.hang_up:  # closed now (the file object held the socket open until here)
            self.hung_up.set()

    def wait_for(self, count: int) -> list[bytes]:
        deadline = time.monotonic() + TIMEOUT
        with self._changed:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.messages)} of {count} messages came"
                self._changed.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def repositories() -> Iterator[list[Repository]]:
    made: list[Repository] = []
    yield made
    for repository in made:
        repository.close()


def events(messages: list[bytes], schema: etree.RelaxNG) -> list[tuple[str, str, Any]]:
    """(EventID code, EventTypeCode code or "", the XML) of each message, each checked:
    the syslog header of PS3.15 A.6/A.7, the XML valid against the schema."""
    out = []
    for data in messages:
        match = SYSLOG.fullmatch(data)
        assert match, data[:200]
        xml = etree.fromstring(match.group(4))
        assert schema.validate(xml), (schema.error_log.last_error, match.group(4))
        event_id = xml.find("EventIdentification/EventID").get("csd-code")
        type_code = xml.find("EventIdentification/EventTypeCode")
        out.append((event_id, "" if type_code is None else type_code.get("csd-code"), xml))
    return out


def test_the_schema_refuses_what_the_standard_does(schema: etree.RelaxNG) -> None:
    line = {"time": "2026-12-06T01:02:03.456Z", "event": "application-start"}
    good = etree.fromstring(message(line, "MINIPACS", "pacs"))
    assert schema.validate(good)
    code = good.find("EventIdentification/EventID")
    del code.attrib["originalText"]  # a coded value without its meaning
    assert not schema.validate(good)


def test_a_tls_repository_gets_every_operation_valid(
        start_server: Callable[..., Running], pki: Pki, schema: etree.RelaxNG,  # noqa: F811
        repositories: list[Repository]) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.verify_mode = ssl.CERT_REQUIRED  # ATNA: both sides show a certificate
    repository = Repository("tls", context)
    repositories.append(repository)
    running = tls_server(start_server, pki, peers=[{"ae_title": "PYTEST"}],
                         **{"security.allow_unknown_peers": False,
                            "audit.syslog": repository.url})
    stored = [make_ds(), make_ds()]
    assoc = associate(running)
    try:
        for ds in stored:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    find(running, QueryRetrieveLevel="STUDY", PatientID="PID1")
    stranger = AE(ae_title="STRANGER")
    stranger.add_requested_context("1.2.840.10008.1.1")
    assert stranger.associate("127.0.0.1", running.port, ae_title="MINIPACS").is_rejected
    running.server.stop()  # application stop; the queue sent before the server is gone

    got = events(repository.wait_for(6), schema)
    assert [(e, t) for e, t, _ in got] == [
        ("110100", "110120"),  # Application Activity: start
        ("110104", ""), ("110104", ""),  # DICOM Instances Transferred
        ("110112", ""),  # Query
        ("110113", "110126"),  # Security Alert: Node Authentication
        ("110100", "110121"),  # Application Activity: stop
    ]
    for (_, _, xml), ds in zip(got[1:3], stored, strict=True):
        assert xml.find("EventIdentification").get("EventActionCode") == "C"
        source, destination = xml.findall("ActiveParticipant")
        assert (source.get("UserID"), source.get("UserIsRequestor")) == ("PYTEST", "true")
        assert source.find("RoleIDCode").get("csd-code") == "110153"
        assert destination.get("UserID") == "MINIPACS"
        study = xml.find("ParticipantObjectIdentification")
        assert study.get("ParticipantObjectID") == ds.StudyInstanceUID
        assert study.find("ParticipantObjectDescription/SOPClass/Instance").get(
            "UID") == ds.SOPInstanceUID
    query = got[3][2].find("ParticipantObjectIdentification")
    assert query.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root
    alert = got[4][2]
    assert alert.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert [p.get("UserID") for p in alert.findall("ActiveParticipant")] == [
        "MINIPACS", "STRANGER"]


def test_a_repository_that_comes_late_gets_what_waited(
        start_server: Callable[..., Running], schema: etree.RelaxNG,
        repositories: list[Repository]) -> None:
    repository = Repository("tcp", up=False)  # its port bound, refusing connections
    repositories.append(repository)
    running = start_server(**{"audit.syslog": repository.url})
    assoc = associate(running)
    try:
        assert assoc.send_c_store(make_ds()).Status == 0
    finally:
        assoc.release()
    repository.up()  # the sender connects again
    got = events(repository.wait_for(2), schema)
    assert [(e, t) for e, t, _ in got] == [("110100", "110120"), ("110104", "")]


def test_udp_sends_a_message_per_datagram(
        start_server: Callable[..., Running], schema: etree.RelaxNG,
        repositories: list[Repository]) -> None:
    repository = Repository("udp")
    repositories.append(repository)
    running = start_server(**{"audit.syslog": repository.url})
    running.server.stop()
    got = events(repository.wait_for(2), schema)
    assert [(e, t) for e, t, _ in got] == [("110100", "110120"), ("110100", "110121")]


def test_bad_syslog_urls_are_said_at_load(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("audit:\n  syslog: syslog://somewhere\n")
    with pytest.raises(ConfigError, match=r"audit.syslog: must be tls://HOST\[:PORT\]"):
        load_config(config)
    for good in ("tls://repo.example", "udp://10.0.0.1:514", "tcp://[::1]:601", ""):
        config.write_text(f"audit:\n  syslog: '{good}'\n")
        assert load_config(config).audit.syslog == good
    for bad in ("tcp://a..b:601", "udp://host:0", "tls://user@host", "tcp://host/x?y"):
        config.write_text(f"audit:\n  syslog: '{bad}'\n")
        with pytest.raises(ConfigError, match="audit.syslog: must be"):
            load_config(config)
    config.write_text("audit:\n  enabled: false\n  syslog: udp://repo\n")
    with pytest.raises(ConfigError, match="audit.syslog: needs audit.enabled"):
        load_config(config)


TIME = "2026-12-06T01:02:03.456Z"


def test_the_messages_name_what_the_standard_asks(schema: etree.RelaxNG) -> None:
    def xml(line: dict[str, Any]) -> Any:
        data = message({"time": TIME, **line}, "MINIPACS", "pacs")
        assert data is not None, line
        parsed = etree.fromstring(data)
        assert schema.validate(parsed), schema.error_log.last_error
        return parsed

    deleted = xml({"event": "delete", "user": "root", "study_uids": ["1.2", "1.3"],
                   "patient_ids": ["P1"], "studies": 2, "patients": 1})
    assert [o.get("ParticipantObjectID") for o in deleted.findall(
        "ParticipantObjectIdentification")] == ["1.2", "1.3", "P1"]
    get = xml({"event": "dimse", "operation": "C-GET", "status": "B000", "failed": 2,
               "calling_ae": "WS", "address": "10.0.0.9",
               "keys": {"StudyInstanceUID": "1.2"}})
    assert get.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert [(p.get("UserID"), p.get("UserIsRequestor")) for p in get.findall(
        "ActiveParticipant")] == [("MINIPACS", "false"), ("WS", "true")]
    move = xml({"event": "dimse", "operation": "C-MOVE", "status": "0000",
                "calling_ae": "WS", "address": "10.0.0.9", "destination": "WS", "keys": {}})
    assert [p.get("UserID") for p in move.findall("ActiveParticipant")] == ["MINIPACS", "WS"]
    query = xml({"event": "dimse", "operation": "C-FIND", "status": "0000",
                 "calling_ae": "WS", "address": "10.0.0.9", "keys": {"PatientID": "P"},
                 "sop_class_uid": "1.2.840.10008.5.1.4.1.2.2.1"})
    assert [p.find("RoleIDCode").get("csd-code") for p in query.findall(
        "ActiveParticipant")] == ["110153", "110152"]
    # PS3.15 A.5.3.12: the query itself, as an identifier, with its transfer syntax
    found = query.find("ParticipantObjectIdentification")
    asked = read_dataset(BytesIO(base64.b64decode(found.find("ParticipantObjectQuery").text)),
                         is_implicit_VR=False, is_little_endian=True)
    assert asked.PatientID == "P"
    detail = found.find("ParticipantObjectDetail")
    assert (detail.get("type"), base64.b64decode(detail.get("value"))) == (
        "TransferSyntax", b"1.2.840.10008.1.2.1")
    many = identifier({"SpecificCharacterSet": "ISO_IR 100",  # the query's: replaced
                       "PatientName": "Müller^*", "StudyDate": "20200101-20201231",
                       "ModalitiesInStudy": "CT\\MR", "NumberOfStudyRelatedSeries": "2",
                       "(0009,0010)": "private", "(identifier)": "900 bytes, not recorded"})
    decoded = read_dataset(BytesIO(many), is_implicit_VR=False, is_little_endian=True)
    assert (decoded.SpecificCharacterSet, str(decoded.PatientName), decoded.StudyDate,
            list(decoded.ModalitiesInStudy)) == (
        "ISO_IR 192", "Müller^*", "20200101-20201231", ["CT", "MR"])
    assert [e.keyword for e in decoded] == [  # the keys without a keyword left out
        "SpecificCharacterSet", "StudyDate", "ModalitiesInStudy", "PatientName",
        "NumberOfStudyRelatedSeries"]
    assert decoded.NumberOfStudyRelatedSeries == 2
    routed = xml({"event": "route", "user": "routing", "peer": "AI", "address": "10.0.0.7:104",
                  "status": "0000", "failed": 0, "studies": ["1.2"], "instances": ["1.2.3"]})
    assert routed.find("EventIdentification").get("EventActionCode") == "R"
    assert [(p.get("UserID"), p.get("UserIsRequestor"), p.get("NetworkAccessPointID"),
             p.find("RoleIDCode").get("csd-code"))
            for p in routed.findall("ActiveParticipant")] == [
        ("MINIPACS", "true", "pacs", "110153"), ("AI", "false", "10.0.0.7", "110152")]
    assert routed.find("AuditSourceIdentification").get("AuditSourceID") == "MINIPACS@pacs"
    assert [o.get("ParticipantObjectID") for o in routed.findall(
        "ParticipantObjectIdentification")] == ["1.2"]
    sent = xml({"event": "send", "user": "alice", "via": "web page", "address": "10.0.0.5",
                "peer": "WS", "study": "1.4", "ok": False, "completed": 0, "failed": 3})
    assert sent.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert [(p.get("UserID"), p.get("UserIsRequestor"), p.get("NetworkAccessPointID"))
            for p in sent.findall("ActiveParticipant")] == [
        ("MINIPACS", "false", "pacs"), ("WS", "false", None), ("alice", "true", "10.0.0.5")]
    assert sent.find("AuditSourceIdentification").get("AuditSourceID") == "MINIPACS@pacs"
    partly = xml({**{"event": "http", "user": None, "address": "10.0.0.8"},
                  "service": "STOW-RS", "method": "POST", "status": 202,
                  "path": "/dicom-web/studies", "studies": ["1.2.7"], "stored": 1,
                  "failed": 1})  # PS3.18: 202, some instances failed
    assert partly.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert partly.find("ParticipantObjectIdentification").get(
        "ParticipantObjectID") == "1.2.7"
    http = {"event": "http", "user": None, "address": "10.0.0.8", "status": 200}
    qido = xml({**http, "service": "QIDO-RS", "method": "GET", "path": "/dicom-web/studies",
                "query": "PatientID=P1"})
    found = qido.find("ParticipantObjectIdentification")
    assert base64.b64decode(found.find("ParticipantObjectQuery").text) == (
        b"/dicom-web/studies?PatientID=P1")
    assert [p.get("UserID") for p in qido.findall("ActiveParticipant")] == [
        "anonymous", "MINIPACS"]
    for service, method, code, action in (("WADO-RS", "GET", 200, "R"),
                                          ("STOW-RS", "POST", 409, "C"),
                                          ("DELETE", "DELETE", 200, "D")):
        done = xml({**http, "service": service, "method": method, "status": code,
                    "path": "/dicom-web/studies/1.2.5/series/1.2.6"})
        assert done.find("EventIdentification").get("EventActionCode") == action
        assert done.find("EventIdentification").get("EventOutcomeIndicator") == (
            "4" if code >= 400 else "0")
        assert done.find("ParticipantObjectIdentification").get(
            "ParticipantObjectID") == "1.2.5"
    # pynetdicom's own rejection (too many associations) is not a security event, nor a
    # browser asking for credentials, nor the page's own requests
    assert message({"time": TIME, "event": "association-rejected", "calling_ae": "X"},
                   "MINIPACS", "pacs") is None
    for line in ({**http, "service": "WADO-RS", "status": 401, "path": "/dicom-web/studies"},
                 {**http, "service": "page", "path": "/"}):
        assert message({"time": TIME, **line}, "MINIPACS", "pacs") is None


def test_a_message_that_cannot_go_is_dropped_and_the_next_go(
        repositories: list[Repository], caplog: pytest.LogCaptureFixture) -> None:
    from scp.atna import SyslogForwarder

    repository = Repository("udp")
    repositories.append(repository)
    forwarder = SyslogForwarder(repository.url, "MINIPACS")
    too_big = {"time": TIME, "event": "association-rejected", "calling_ae": "X",
               "address": "127.0.0.1", "reason": "x" * 70_000}  # beyond a datagram
    forwarder.put(too_big)
    forwarder.put({"time": TIME, "event": "application-stop"})
    assert len(repository.wait_for(1)) == 1
    forwarder.close()
    assert "is lost" in caplog.text


def test_a_name_that_cannot_be_encoded_leaves_the_sender_alive(
        caplog: pytest.LogCaptureFixture) -> None:
    from scp.atna import SyslogForwarder, syslog_problem

    assert syslog_problem("tcp://a..b:601") is not None  # refused at load
    forwarder = SyslogForwarder("tcp://a..b:601", "MINIPACS")  # had it got through
    forwarder.put({"time": TIME, "event": "application-start"})
    deadline = time.monotonic() + TIMEOUT
    while "is lost" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    assert forwarder._thread.is_alive()
    forwarder.close(timeout=1)


def test_a_connection_the_repository_closed_is_noticed_before_the_next_message(
        repositories: list[Repository], schema: etree.RelaxNG) -> None:
    from scp.atna import SyslogForwarder

    repository = Repository("tcp", hang_up=True)
    repositories.append(repository)
    forwarder = SyslogForwarder(repository.url, "MINIPACS")
    forwarder.put({"time": TIME, "event": "application-start"})
    repository.wait_for(1)
    assert repository.hung_up.wait(TIMEOUT)
    forwarder.put({"time": TIME, "event": "application-stop"})
    got = events(repository.wait_for(2), schema)
    assert [t for _, t, _ in got] == ["110120", "110121"]
    forwarder.close()
