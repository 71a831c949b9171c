"""The retrieve data path below pynetdicom: command sets and P-DATA by hand
(scp/engine/dimse.py), and the C-STORE sender (scp/engine/sender.py) against a real
pynetdicom Storage SCP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode as encode_ds
from pynetdicom.sop_class import Verification

from scp.engine import dimse
from scp.engine.sender import (
    ABORTED,
    AssociationFailed,
    Link,
    ReceiverGone,
    StoreAssociation,
)
from tests.factory import encode, make_ds

CT = "1.2.840.10008.5.1.4.1.1.2"


def pynetdicom_command(message: Any, primitive: Any) -> bytes:
    """The command set pynetdicom 3.0 encodes for ``primitive``."""
    message.primitive_to_message(primitive)
    raw = encode_ds(message.command_set, True, True)
    assert raw is not None
    return raw


@pytest.mark.parametrize("originator", [None, ("MOVESCU", 7), ("ODD", 65535)])
def test_c_store_rq_is_pynetdicoms(originator: tuple[str, int] | None) -> None:
    primitive = C_STORE()
    primitive.MessageID = 513
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.44"  # odd length: padded
    primitive.Priority = 2
    if originator is not None:
        primitive.MoveOriginatorApplicationEntityTitle = originator[0]
        primitive.MoveOriginatorMessageID = originator[1]
    primitive.DataSet = BytesIO(b"\0\0")
    ours = dimse.c_store_rq(513, CT, "1.2.3.44", 2, *(originator or (None, None)))
    assert ours == pynetdicom_command(C_STORE_RQ(), primitive)


@pytest.mark.parametrize(("kind", "message", "field"), [
    (C_GET, C_GET_RSP, dimse.C_GET_RSP), (C_MOVE, C_MOVE_RSP, dimse.C_MOVE_RSP)])
def test_pending_response_is_pynetdicoms(kind: Any, message: Any, field: int) -> None:
    primitive = kind()
    primitive.MessageIDBeingRespondedTo = 9
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    primitive.Status = 0xFF00
    primitive.NumberOfRemainingSuboperations = 3
    primitive.NumberOfCompletedSuboperations = 70000 % 65536
    primitive.NumberOfFailedSuboperations = 1
    primitive.NumberOfWarningSuboperations = 0
    ours = dimse.retrieve_pending(field, 9, "1.2.840.10008.5.1.4.1.2.2.3", 0xFF00, 3,
                                  70000 % 65536, 1, 0)
    assert ours == pynetdicom_command(message(), primitive)


@pytest.mark.parametrize("comment", [None, "cannot be indexed: no StudyInstanceUID"])
def test_c_store_rsp_is_pynetdicoms(comment: str | None) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 300
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.44"
    primitive.Status = 0xA900 if comment else 0x0000
    if comment:
        primitive.ErrorComment = comment
    ours = dimse.c_store_rsp(300, CT, "1.2.3.44", primitive.Status, comment)
    assert ours == pynetdicom_command(C_STORE_RSP(), primitive)


def test_read_command_reads_a_pynetdicom_response() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 77
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Status = 0xA700
    primitive.ErrorComment = "disk full"
    command = dimse.read_command(pynetdicom_command(C_STORE_RSP(), primitive))
    assert command[dimse.COMMAND_FIELD] == dimse.C_STORE_RSP
    assert command[dimse.MESSAGE_ID_BEING_RESPONDED_TO] == 77
    assert command[dimse.STATUS] == 0xA700
    assert command[dimse.ERROR_COMMENT] == "disk full"
    assert command[dimse.AFFECTED_SOP_INSTANCE_UID] == "1.2.3"
    with pytest.raises(ValueError, match="truncated"):
        dimse.read_command(pynetdicom_command(C_STORE_RSP(), primitive)[:-3])


@pytest.mark.parametrize("last", [True, False])
def test_fragments_fit_the_peers_pdu_and_mark_the_last(last: bool) -> None:
    payload = bytes(range(256)) * 10  # 2,560 bytes
    pdus = list(dimse.fragments(3, dimse.DATA, payload, 1000, last=last))
    assert [len(p) - 6 for p in pdus] == [1000, 1000, 572 + 6]
    joined = b""
    controls = []
    for pdu in pdus:
        assert dimse.pdu_header(pdu[:6]) == (dimse.P_DATA_TF, len(pdu) - 6)
        for context_id, control, fragment in dimse.pdvs(pdu[6:]):
            assert context_id == 3
            controls.append(control)
            joined += bytes(fragment)
    assert joined == payload
    assert controls == [0, 0, dimse.LAST if last else 0]


def test_a_bad_pdv_is_refused() -> None:
    with pytest.raises(ValueError):
        list(dimse.pdvs(b"\x00\x00\x00\x09\x01\x00abc"))  # item longer than the PDU


# -- the sender against pynetdicom ------------------------------------------------------

class Receiver:
    """A pynetdicom Storage SCP that records what arrives, with knobs."""

    def __init__(self, max_pdu: int = 16384) -> None:
        self.received: list[tuple[str, bytes, int, int]] = []  # uid, data set, msg id, ctx
        self.status = 0x0000
        self.abort = False
        self.hold = threading.Event()
        self.hold.set()
        ae = AE(ae_title="RECEIVER")
        ae.maximum_pdu_size = max_pdu
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_supported_context(CT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Any) -> int:
        if self.abort:
            event.assoc.abort()
            return 0
        self.hold.wait(30)
        self.received.append((str(event.request.AffectedSOPInstanceUID),
                              event.encoded_dataset(include_meta=False),
                              int(event.request.MessageID), int(event.context.context_id)))
        return self.status


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver(max_pdu=4096)  # small: every data set below goes in several PDUs
    yield made
    made.hold.set()
    made.server.shutdown()


def open_to(receiver: Receiver, dimse_timeout: float = 30) -> StoreAssociation:
    return StoreAssociation.open(
        ("127.0.0.1", receiver.port), calling="SENDER", called="RECEIVER",
        contexts=[build_context(CT, [ImplicitVRLittleEndian]),
                  build_context(CT, [ExplicitVRLittleEndian])],
        max_pdu=0, connect_timeout=5, acse_timeout=5, dimse_timeout=dimse_timeout)


def test_store_sends_the_bytes_as_given_in_pdus_the_receiver_takes(
        receiver: Receiver) -> None:
    assoc = open_to(receiver)
    assert assoc.link.max_pdu == 4096
    assert sorted(syntax for _, syntax in assoc.accepted[CT]) == sorted(
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    explicit = next(cx for cx, syntax in assoc.accepted[CT] if syntax == ExplicitVRLittleEndian)
    sent = []
    for number in range(1, 4):
        ds = make_ds(SOPInstanceUID=f"1.2.3.{number}")
        ds.PixelData = bytes([number]) * 10000
        raw = encode(ds)
        assert len(raw) > 4096
        sent.append(raw)
        command = dimse.c_store_rq(number, CT, ds.SOPInstanceUID)
        halves = [raw[:1000], raw[1000:]]  # pieces need not match the PDUs
        assert assoc.link.store(explicit, command, halves, number) == (0x0000, None)
    assoc.release()
    assert [r[1] for r in receiver.received] == sent
    assert [r[2] for r in receiver.received] == [1, 2, 3]
    assert {r[3] for r in receiver.received} == {explicit}


def test_a_refusal_is_returned_as_the_receivers_status(receiver: Receiver) -> None:
    receiver.status = 0xA700
    assoc = open_to(receiver)
    raw = encode(make_ds(SOPInstanceUID="1.2.3"), ImplicitVRLittleEndian)
    implicit = next(cx for cx, syntax in assoc.accepted[CT] if syntax == ImplicitVRLittleEndian)
    code, _ = assoc.link.store(implicit, dimse.c_store_rq(1, CT, "1.2.3"), [raw], 1)
    assoc.release()
    assert code == 0xA700


def test_an_abort_ends_the_link(receiver: Receiver) -> None:
    receiver.abort = True
    assoc = open_to(receiver)
    ((context_id, _), *_) = assoc.accepted[CT]
    with pytest.raises(ReceiverGone, match=ABORTED):
        assoc.link.store(context_id, dimse.c_store_rq(1, CT, "1.2.3"),
                         [encode(make_ds(), ImplicitVRLittleEndian)], 1)
    assert assoc.link.gone == ABORTED
    with pytest.raises(ReceiverGone):  # and stays gone
        assoc.link.store(context_id, dimse.c_store_rq(2, CT, "1.2.4"), [b"x"], 2)
    assoc.release()  # aborts instead, without waiting


def test_no_response_within_the_dimse_timeout(receiver: Receiver) -> None:
    receiver.hold.clear()
    assoc = open_to(receiver, dimse_timeout=0.5)
    ((context_id, _), *_) = assoc.accepted[CT]
    with pytest.raises(ReceiverGone, match=r"no response within the DIMSE timeout \(0.5 s\)"):
        assoc.link.store(context_id, dimse.c_store_rq(1, CT, "1.2.3"),
                         [encode(make_ds(), ImplicitVRLittleEndian)], 1)
    assoc.abort()


def test_a_piece_that_fails_halfway_breaks_the_link(receiver: Receiver) -> None:
    assoc = open_to(receiver)
    ((context_id, _), *_) = assoc.accepted[CT]

    def pieces() -> Iterator[bytes]:
        yield b"\x08\x00\x16\x00"
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        assoc.link.store(context_id, dimse.c_store_rq(1, CT, "1.2.3"), pieces(), 1)
    assert assoc.link.gone is not None and "sent in part" in assoc.link.gone
    assoc.abort()


def test_a_failing_first_piece_sends_nothing(receiver: Receiver) -> None:
    assoc = open_to(receiver)
    ((context_id, _), *_) = assoc.accepted[CT]

    def pieces() -> Iterator[bytes]:
        raise OSError("no file")
        yield b""  # pragma: no cover

    with pytest.raises(OSError, match="no file"):
        assoc.link.store(context_id, dimse.c_store_rq(1, CT, "1.2.3"), pieces(), 1)
    assert assoc.link.gone is None
    raw = encode(make_ds(SOPInstanceUID="1.2.9"), ImplicitVRLittleEndian)
    implicit = next(cx for cx, syntax in assoc.accepted[CT] if syntax == ImplicitVRLittleEndian)
    assert assoc.link.store(implicit, dimse.c_store_rq(2, CT, "1.2.9"), [raw], 2)[0] == 0
    assoc.release()
    assert [r[1] for r in receiver.received] == [raw]


def test_association_failures_say_why(receiver: Receiver) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
        port = held.getsockname()[1]
        with pytest.raises(AssociationFailed, match="no answer") as refused:
            StoreAssociation.open(("127.0.0.1", port), calling="A", called="B",
                                  contexts=[build_context(CT)], max_pdu=0,
                                  connect_timeout=5, acse_timeout=5, dimse_timeout=5)
    assert "refused" in refused.value.detail.lower()
    receiver.ae.require_called_aet = True
    with pytest.raises(AssociationFailed, match="association rejected"):
        StoreAssociation.open(("127.0.0.1", receiver.port), calling="A", called="WRONG",
                              contexts=[build_context(CT)], max_pdu=0, connect_timeout=5,
                              acse_timeout=5, dimse_timeout=5)
    with pytest.raises(AssociationFailed, match="no presentation context accepted"):
        StoreAssociation.open(("127.0.0.1", receiver.port), calling="A", called="RECEIVER",
                              contexts=[build_context("1.2.840.10008.5.1.4.1.1.4")],
                              max_pdu=0, connect_timeout=5, acse_timeout=5, dimse_timeout=5)


def test_a_cancel_on_the_link_is_recorded_and_other_messages_are_handed_back() -> None:
    """On a C-GET's association the requestor may send a C-CANCEL (ours) or anything else
    (pynetdicom's: kept, unread by it, for the socket's owner)."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = Link(ours, 0, 5.0, cancel_of=5)
        cancel = dimse.command_set({
            dimse.COMMAND_FIELD: b"\xff\x0f", dimse.MESSAGE_ID_BEING_RESPONDED_TO: b"\x05\x00",
            dimse.COMMAND_DATA_SET_TYPE: b"\x01\x01"})
        theirs.sendall(dimse.p_data(1, dimse.COMMAND | dimse.LAST, cancel))
        link.poll()
        assert link.cancelled and link.gone is None and not link.leftover()
        release_rq = bytes.fromhex("05000000000400000000")
        theirs.sendall(release_rq + b"next")
        with pytest.raises(ReceiverGone):
            link.poll()
        assert link.leftover() == release_rq + b"next"


# -- the receive path (scp/engine/receiver.py) -------------------------------------------

def test_c_store_requests_are_answered_by_the_engine_as_pynetdicom_would(
        start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the engine installed, a plain C-STORE never goes through pynetdicom's Storage
    service class: the DUL thread reads it and answers; the response carries what
    pynetdicom's would (Status, Error Comment, the UIDs, the Message ID)."""
    from pynetdicom.service_class import StorageServiceClass

    from scp.engine import receiver

    answered: list[int] = []
    original = receiver.StoreReceiver._answer
    pynetdicom_scp = StorageServiceClass.SCP
    by_pynetdicom: list[int] = []

    def counted(self: Any, sock: Any, request: Any, context: Any) -> None:
        answered.append(int(request.MessageID))
        original(self, sock, request, context)

    def pynetdicoms(service: Any, request: Any, context: Any) -> None:
        by_pynetdicom.append(int(request.MessageID))
        pynetdicom_scp(service, request, context)

    monkeypatch.setattr(receiver.StoreReceiver, "_answer", counted)
    monkeypatch.setattr(StorageServiceClass, "SCP", pynetdicoms)
    running = start_server()
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    # a C-ECHO, then a C-STORE not looked at: a C-STORE that arrives while pynetdicom is
    # still taking the association in, or still finishing the C-ECHO it served (its
    # queues not yet empty), is pynetdicom's, as it should be; under load the first one
    # after the C-ECHO was (loaded CI run 68). From the second on, the engine's.
    assert assoc.send_c_echo().Status == 0x0000
    warm = make_ds()
    assert assoc.send_c_store(warm, msg_id=10).Status == 0x0000
    answered.clear()
    by_pynetdicom.clear()
    good = make_ds()
    sent: list[Any] = []
    assoc.bind(evt.EVT_DIMSE_RECV, lambda event: sent.append(event.message.command_set))
    rsp = assoc.send_c_store(good, msg_id=11)
    assert rsp.Status == 0x0000
    bad = make_ds(StudyInstanceUID=None)  # cannot be indexed: a failure with a comment
    rsp = assoc.send_c_store(bad, msg_id=12)
    assert rsp.Status >> 12 in (0xA, 0xC) and "StudyInstanceUID" in rsp.ErrorComment
    assoc.release()
    assert (answered, by_pynetdicom) == ([11, 12], [])
    first, second = sent
    assert (first.MessageIDBeingRespondedTo, first.AffectedSOPInstanceUID,
            first.AffectedSOPClassUID, first.CommandDataSetType) == (
                11, good.SOPInstanceUID, CT, 0x0101)
    assert second.MessageIDBeingRespondedTo == 12
    from storage.models import Instance

    assert {row.sop_instance_uid for row in Instance.select()} == {
        warm.SOPInstanceUID, good.SOPInstanceUID}


def test_a_peer_maximum_too_small_for_data_is_refused_not_looped() -> None:
    """A Maximum Length Received of 1 to 6 leaves no room for a byte of data (PS3.8 D.1):
    the link is unusable and must be aborted; fragmenting for it refuses, never loops."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = Link(ours, 6, 5.0)
        assert link.gone is not None and link.must_abort
        with pytest.raises(ReceiverGone):
            link.store(1, dimse.c_store_rq(1, CT, "1.2.3"), [b"data"], 1)
    with pytest.raises(ValueError):
        next(dimse.fragments(1, dimse.DATA, b"data", 6))


def test_a_pdu_over_our_maximum_is_not_read() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = Link(ours, 0, 5.0, max_receive=16384)
        theirs.sendall(bytes([dimse.P_DATA_TF, 0]) + (1 << 31).to_bytes(4, "big") + b"x" * 100)
        with pytest.raises(ReceiverGone, match="over our maximum"):
            link.response(1)
        assert link.must_abort


def test_a_pdu_begun_between_sub_operations_must_end_in_time() -> None:
    """poll() reads what has arrived; a PDU whose header stops half way is waited for no
    longer than the DIMSE timeout, then the association is to be aborted."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = Link(ours, 0, 0.3)
        theirs.sendall(b"\x04\x00\x00")  # half a header, and nothing more
        with pytest.raises(ReceiverGone, match="DIMSE timeout"):
            link.poll()
        assert link.must_abort


def test_a_link_gone_for_a_reason_of_ours_is_aborted_not_dropped(receiver: Receiver) -> None:
    """After a data set sent in part, release() tells the receiver with an A-ABORT."""
    aborted = threading.Event()
    receiver.ae.shutdown()
    receiver.server = receiver.ae.start_server(
        ("127.0.0.1", 0), block=False,
        evt_handlers=[(evt.EVT_ABORTED, lambda event: aborted.set())])
    receiver.port = int(receiver.server.server_address[1])
    assoc = open_to(receiver)
    ((context_id, _), *_) = assoc.accepted[CT]

    def pieces() -> Iterator[bytes]:
        yield b"\x08\x00\x16\x00"
        raise OSError("disk gone")

    with pytest.raises(OSError):
        assoc.link.store(context_id, dimse.c_store_rq(1, CT, "1.2.3"), pieces(), 1)
    assoc.release()
    assert aborted.wait(10), "the receiver saw no A-ABORT"


def test_a_wanted_back_link_stops_at_once() -> None:
    """The socket's owner wants it back (the server stops): poll(), send() and present()
    give up without waiting for anything."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        wanted = [False]
        link = Link(ours, 0, 30.0, wanted_back=lambda: wanted[0])
        assert link.present()
        wanted[0] = True
        assert not link.present()
        with pytest.raises(ReceiverGone, match="being closed"):
            link.poll()


def test_a_response_the_reactor_takes_from_a_waiting_sender_goes_back(
        start_server: Any) -> None:
    """pynetdicom#875: a requestor's reactor that takes a response while a ``send_*()`` has
    paused it (checkpoint cleared) puts it back at the front of the DIMSE queue for that
    sender; a response no one waits for is still dropped, as pynetdicom does."""
    from pynetdicom.dimse_primitives import C_ECHO

    running = start_server()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established
    try:
        response = C_ECHO()
        response.MessageIDBeingRespondedTo = 7
        response.AffectedSOPClassUID = Verification
        response.Status = 0x0000
        assert not response.is_valid_request
        assoc._reactor_checkpoint.clear()  # as send_c_echo() does before it sends
        assoc._serve_request(response, 1)
        assert assoc.dimse.get_msg(block=False) == (1, response)
        assoc._reactor_checkpoint.set()  # no send_*() waiting
        assoc._serve_request(response, 1)
        assert assoc.dimse.get_msg(block=False) == (None, None)
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def test_a_destination_that_listens_a_moment_later_is_reached() -> None:
    """gdcmscu --move listens for its sub-operations only after sending the C-MOVE: a
    refused connection is tried again for REFUSED_RETRY seconds (a loaded CI run saw
    gdcmscu wait forever for a move answered 'no answer')."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # bound, not listening yet: refused
        port = held.getsockname()[1]
        rejected = b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x01"  # A-ASSOCIATE-RJ

        def listen_then_reject() -> None:
            held.listen(1)
            conn, _ = held.accept()
            with conn:
                conn.recv(65536)  # the A-ASSOCIATE-RQ
                conn.sendall(rejected)

        later = threading.Timer(0.3, listen_then_reject)
        later.start()
        try:
            with pytest.raises(AssociationFailed, match="association rejected"):
                StoreAssociation.open(("127.0.0.1", port), calling="A", called="B",
                                      contexts=[build_context(CT)], max_pdu=0,
                                      connect_timeout=5, acse_timeout=5, dimse_timeout=5)
        finally:
            later.join(10)
