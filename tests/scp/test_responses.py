"""C-FIND responses packed by scp/engine/responses.py: the same command set pynetdicom writes, one
P-DATA-TF PDU for the command and one for the identifier when they fit (never both in one
PDU: GDCM cannot read that), pynetdicom's own path when they do not, and the same
identifiers over every transfer syntax a C-FIND context accepts."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import _config as _pynetdicom_config
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

from scp import status
from scp.engine import responses
from tests.conftest import Running, associate, client_ae
from tests.factory import hierarchy


def pynetdicom_command_set(sop_class: str, message_id: int, code: int, data: bytes | None) -> bytes:
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = code
    rsp.Identifier = BytesIO(data) if data is not None else None
    msg = C_FIND_RSP()
    msg.primitive_to_message(rsp)
    first = next(iter(msg.encode_msg(1, 0)))
    return bytes(first.presentation_data_value_list[0][1][1:])


@pytest.mark.parametrize("sop_class", [FIND, "1.2.840.10008.5.1.4.1.2.1.1", "1.2.3"])
@pytest.mark.parametrize(("code", "data"), [(0xFF00, b"\x08\x00"), (0xFF01, b"xx"),
                                            (0x0000, None), (0xFE00, None)])
@pytest.mark.parametrize("message_id", [1, 7, 65535])
def test_command_set_is_the_one_pynetdicom_writes(
        sop_class: str, code: int, data: bytes | None, message_id: int) -> None:
    assert responses.command_set(sop_class, message_id, code, data is not None) == \
        pynetdicom_command_set(sop_class, message_id, code, data)


def _query() -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "StudyDate",
                    "NumberOfStudyRelatedInstances", "ModalitiesInStudy",
                    "StudyDescription"):
        setattr(q, keyword, "")
    return q


def _stored(running: Running) -> None:
    assoc = associate(running)
    for ds in hierarchy():
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    # the server ends its side after our release returns: wait until it has, so that a
    # test that looks at the server's associations next sees only its own
    deadline = time.monotonic() + 30
    while running.server.ae.active_associations:
        assert time.monotonic() < deadline, "the storing association did not end"
        time.sleep(0.01)  # poll interval, not a wait for readiness


def _answers(running: Running, ae: AE, syntax: str,
             max_pdu: int = 16382) -> tuple[list[Dataset], list[int]]:
    """The identifiers of a STUDY query over a ``syntax`` context, and the number of PDVs
    in each P-DATA-TF PDU the client received."""
    pdvs: list[int] = []

    def count(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            pdvs.append(len(event.pdu.presentation_data_value_items))

    ae.requested_contexts = []
    ae.add_requested_context(FIND, [syntax])
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title,
                         max_pdu=max_pdu, evt_handlers=[(evt.EVT_PDU_RECV, count)])
    assert assoc.is_established
    out = []
    for rsp, identifier in assoc.send_c_find(_query(), FIND):
        if rsp.Status in (status.PENDING, status.PENDING_WARNING):
            out.append(identifier)
        else:
            assert rsp.Status == status.SUCCESS
    assoc.release()
    return out, pdvs


def _as_tuples(answers: list[Dataset]) -> list[list[tuple[str, str]]]:
    return sorted([[(e.keyword, str(e.value)) for e in ds] for ds in answers])


def test_responses_are_one_pdv_per_pdu_and_the_same_over_every_syntax(server: Running) -> None:
    _stored(server)
    ae = client_ae(storage=False)
    reference, pdvs = _answers(server, ae, ExplicitVRLittleEndian)
    assert len(reference) == 5  # the studies of tests/factory.hierarchy
    # command and identifier of each pending response in a PDU of its own, then the final
    # Success: GDCM's gdcmscu reads the PDU after a command as its identifier (issue 13)
    assert pdvs == [1] * (2 * 5 + 1)
    for syntax in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        answers, _ = _answers(server, ae, syntax)
        assert _as_tuples(answers) == _as_tuples(reference), syntax


def test_a_response_larger_than_the_peers_pdu_is_fragmented(server: Running) -> None:
    _stored(server)
    ae = client_ae(storage=False)
    reference, _ = _answers(server, ae, ExplicitVRLittleEndian)
    # smaller than one command set and identifier
    answers, pdvs = _answers(server, ae, ExplicitVRLittleEndian, max_pdu=128)
    assert _as_tuples(answers) == _as_tuples(reference)
    assert len(pdvs) > 2 * len(answers)  # pynetdicom's fragmenting path, one PDV per PDU
    assert set(pdvs) == {1}


def test_pynetdicom_debug_logging_gets_data_sets(
        server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """At DEBUG pynetdicom renders every response identifier, which needs a data set."""
    _stored(server)
    ae = client_ae(storage=False)
    reference, _ = _answers(server, ae, ExplicitVRLittleEndian)
    monkeypatch.setattr(_pynetdicom_config, "LOG_RESPONSE_IDENTIFIERS", True)
    answers, _ = _answers(server, ae, ImplicitVRLittleEndian)
    assert _as_tuples(answers) == _as_tuples(reference)


class _FakeArchive:
    def __init__(self, count: int) -> None:
        self.count = count

    def find_encoded(self, query: Any, cancelled: Any, implicit_vr: bool) -> Iterator[bytes]:
        for n in range(self.count):
            yield b"%04d" % n


def test_a_slow_peer_holds_the_query_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """No more than MAX_QUEUED PDUs (two per response: command, identifier) wait for the
    DUL: the query waits for the peer."""
    monkeypatch.setattr(responses, "MAX_QUEUED", 4)
    monkeypatch.setattr(responses, "_installed", True)
    pending: queue.Queue[bytes] = queue.Queue()
    assoc = SimpleNamespace(dul=SimpleNamespace(to_provider_queue=pending),
                            is_established=True, network_timeout=30)
    most = 0
    drained = threading.Event()

    def slow_peer() -> None:
        while not drained.is_set():
            with contextlib.suppress(queue.Empty):
                pending.get(timeout=0.01)
                time.sleep(0.002)

    peer = threading.Thread(target=slow_peer)
    peer.start()
    try:
        got = 0
        for identifier in responses.identifiers(_FakeArchive(40), Any, lambda: False, assoc,
                                                ExplicitVRLittleEndian):
            # what our send_msg does with it: a command PDU and an identifier PDU
            pending.put(b"command")
            pending.put(bytes(identifier))
            most = max(most, pending.qsize())
            got += 1
    finally:
        drained.set()
        peer.join()
    assert got == 40
    assert most <= 4 + 2


def test_pynetdicom_sends_when_dimse_sent_handlers_are_bound(server: Running) -> None:
    _stored(server)
    seen: list[str] = []
    ae = client_ae(storage=False)
    ae.requested_contexts = []
    ae.add_requested_context(FIND, [ExplicitVRLittleEndian])
    pdvs: list[int] = []

    def count(event: Any) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            pdvs.append(len(event.pdu.presentation_data_value_items))

    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         evt_handlers=[(evt.EVT_PDU_RECV, count)])
    assert assoc.is_established
    (theirs,) = server.server.ae.active_associations
    theirs.bind(evt.EVT_DIMSE_SENT, lambda event: seen.append(type(event.message).__name__))
    codes = [int(rsp.Status) for rsp, _ in assoc.send_c_find(_query(), FIND)]
    assoc.release()
    assert codes == [status.PENDING] * 5 + [status.SUCCESS]
    assert seen == ["C_FIND_RSP"] * 6  # the observer saw every response
    assert pdvs == [1] * 11  # command and identifier each in a PDU of its own
