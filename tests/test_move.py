"""C-MOVE: what a query finds goes to a configured peer, byte for byte when the peer takes
the stored transfer syntax, decoded when it does not, with counts, failures and cancel as
PS3.4 C.4.2 says. The peers are real Storage SCPs on loopback: pynetdicom and DCMTK's
storescp."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom import events as evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp import status
from tests.conftest import (
    Running,
    dcmtk_tool,
    free_port,
    hold_second_read_until_cancelled,
    reserved_port,
)
from tests.factory import (
    LEVEL_CASE_IDS,
    ROOT,
    encode,
    file_parts,
    hierarchy,
    make_ds,
    retrieve_levels,
)
from tests.test_cli import minipacs_command

PATIENT_ROOT = PatientRootQueryRetrieveInformationModelMove
STUDY_ROOT = StudyRootQueryRetrieveInformationModelMove


@dataclass
class Peer:
    """A pynetdicom Storage SCP started by a test: what it received, as sent."""

    ae_title: str
    port: int
    received: list[tuple[bytes, str]] = field(default_factory=list)  # (data set, syntax)
    originators: list[tuple[str | None, int | None]] = field(
        default_factory=list)  # Move Originator AE title and Message ID of each request
    datasets: list[Dataset] = field(default_factory=list)
    associations: int = 0
    abort_after: int = 0  # abort the association at this C-STORE (0 = never)
    refuse: set[str] = field(default_factory=set)  # answered A700 (Refused: Out of Resources)
    refuse_anonymously: bool = False  # ... in a response without Affected SOP Instance UID
    hold: threading.Event | None = None  # each C-STORE is answered only once this is set
    arrived: threading.Event | None = None  # set at each C-STORE request
    responses: list[Dataset] = field(default_factory=list)  # command sets of C-STORE-RSPs
    requests: list[str] = field(default_factory=list)  # SOP Instance UID of each C-STORE-RQ

    def entry(self) -> dict[str, Any]:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


@pytest.fixture
def start_peer() -> Iterator[Callable[..., Peer]]:
    servers: list[Any] = []
    peers: list[Peer] = []

    def start(ae_title: str = "DEST", syntaxes: list[str] | None = None,
              require_called_aet: bool = False) -> Peer:
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called_aet
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes or ALL_SYNTAXES)
        peer = Peer(ae_title, 0)
        peers.append(peer)

        def on_store(event: Any) -> int:
            syntax = str(event.context.transfer_syntax)
            req = event.request
            peer.requests.append(str(req.AffectedSOPInstanceUID))
            title, number = req.MoveOriginatorApplicationEntityTitle, req.MoveOriginatorMessageID
            peer.originators.append((str(title).strip() if title else None,  # None: absent
                                     int(number) if number is not None else None))
            if peer.abort_after and len(peer.received) + 1 >= peer.abort_after:
                event.assoc.abort()
                return 0x0000
            if peer.arrived is not None:
                peer.arrived.set()
            if peer.hold is not None:
                peer.hold.wait(30)
            if str(req.AffectedSOPInstanceUID) in peer.refuse:
                if peer.refuse_anonymously:  # PS3.7 Table 9.1-1: "U" in a response
                    refusal = Dataset()
                    refusal.Status = 0xA700
                    refusal.AffectedSOPInstanceUID = None  # pynetdicom then leaves it out
                    return refusal  # type: ignore[return-value]
                return 0xA700
            peer.received.append((event.encoded_dataset(include_meta=False), syntax))
            ds = event.dataset
            ds.file_meta = event.file_meta
            peer.datasets.append(ds)
            return 0x0000

        def on_accepted(event: Any) -> None:
            peer.associations += 1

        def on_sent(event: Any) -> None:
            command = event.message.command_set
            if command.CommandField == 0x8001:  # C-STORE-RSP
                peer.responses.append(command)

        server = ae.start_server(("127.0.0.1", 0), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store),
                                               (evt.EVT_ACCEPTED, on_accepted),
                                               (evt.EVT_DIMSE_SENT, on_sent)])
        servers.append(server)
        peer.port = int(server.server_address[1])
        return peer

    yield start
    for peer in peers:
        if peer.hold is not None:
            peer.hold.set()
    for server in servers:
        server.shutdown()


ALL_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
                "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5",
                "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.81"]


@pytest.fixture
def stored_and_peer(start_server: Callable[..., Running],
                    start_peer: Callable[..., Peer]) -> tuple[Running, Peer, list[Dataset]]:
    peer = start_peer()
    running = start_server(peers=[peer.entry()])
    datasets = hierarchy()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    return running, peer, datasets


def c_move(running: Running, model: Any, destination: str, msg_id: int = 1,
           on_response: Callable[[Any, Any], None] | None = None,
           **keys: Any) -> list[Dataset]:
    """A C-MOVE with pynetdicom: every response (status data set, identifier merged)."""
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    responses = []
    for rsp, identifier in assoc.send_c_move(q, destination, model, msg_id=msg_id):
        if identifier is not None:
            for elem in identifier:
                rsp.add(elem)
        responses.append(rsp)
        if on_response is not None:
            on_response(assoc, rsp)
    assoc.release()
    return responses


@pytest.mark.parametrize("case", range(len(LEVEL_CASE_IDS)), ids=LEVEL_CASE_IDS)
def test_move_every_level_byte_for_byte(stored_and_peer: Any, case: int) -> None:
    running, peer, datasets = stored_and_peer
    root, keys, named = retrieve_levels(datasets)[case]
    model = PATIENT_ROOT if root == "patient" else STUDY_ROOT
    wanted = [ds for ds in datasets if named(ds)]
    assert wanted
    responses = c_move(running, model, peer.ae_title, **keys)
    assert sorted(peer.received) == sorted((encode(ds), ExplicitVRLittleEndian) for ds in wanted)
    final = responses[-1]
    assert final.Status == status.SUCCESS
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations,
            final.NumberOfWarningSuboperations) == (len(wanted), 0, 0)
    assert peer.associations == 1
    # PS3.7 9.3.1.1: the sub-operations name who asked for the move, and its message ID
    assert set(peer.originators) == {("MOVESCU", 1)}
    pending = [r for r in responses if r.Status == status.PENDING]
    assert [r.NumberOfRemainingSuboperations for r in pending] == list(
        range(len(wanted) - 1, -1, -1))
    assert [r.NumberOfCompletedSuboperations for r in pending] == list(range(1, len(wanted) + 1))


def test_move_matching_nothing_is_success_with_no_sub_operations(stored_and_peer: Any) -> None:
    running, peer, _ = stored_and_peer
    responses = c_move(running, STUDY_ROOT, peer.ae_title,
                       QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2.3.4.5.6")
    assert [int(r.Status) for r in responses] == [status.SUCCESS]
    assert peer.received == []


def test_unknown_destination_is_a801(stored_and_peer: Any, caplog: Any) -> None:
    running, peer, datasets = stored_and_peer
    with caplog.at_level(logging.WARNING):
        responses = c_move(running, STUDY_ROOT, "NOBODY", QueryRetrieveLevel="STUDY",
                           StudyInstanceUID=datasets[0].StudyInstanceUID)
    assert [int(r.Status) for r in responses] == [status.MOVE_DESTINATION_UNKNOWN]
    assert peer.received == []
    assert "'NOBODY' is not in peers" in caplog.text


def test_invalid_identifier_is_a900_without_reaching_the_destination(stored_and_peer: Any) -> None:
    running, peer, _ = stored_and_peer
    responses = c_move(running, STUDY_ROOT, peer.ae_title,
                       QueryRetrieveLevel="SERIES", SeriesInstanceUID="1.2.3")
    assert [int(r.Status) for r in responses] == [status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS]
    assert "StudyInstanceUID" in responses[0].ErrorComment
    assert peer.associations == 0


def test_destination_down_is_a702_with_the_reason(start_server: Callable[..., Running],
                                                 caplog: Any, held_port: int) -> None:
    # held for the whole test: nothing listens there, not even this server (port 0)
    running = start_server(peers=[{"ae_title": "DOWN", "host": "127.0.0.1",
                                   "port": held_port}])
    datasets = hierarchy()[:3]
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    with caplog.at_level(logging.ERROR):
        responses = c_move(running, STUDY_ROOT, "DOWN", QueryRetrieveLevel="STUDY",
                           StudyInstanceUID=datasets[0].StudyInstanceUID)
    final = responses[-1]
    assert len(responses) == 1
    # PS3.4 C.4.2.1.5: Refused: Out of Resources - Unable to perform sub-operations
    assert final.Status == status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS
    assert final.NumberOfFailedSuboperations == 3
    assert final.ErrorComment.startswith("no answer: DOWN at 127.0.0.1")
    assert "C-MOVE to DOWN: no answer" in caplog.text
    assert "Connection refused" in caplog.text  # pynetdicom's own line says why


def test_destination_that_rejects_is_a702(start_server: Callable[..., Running],
                                          start_peer: Callable[..., Peer]) -> None:
    picky = start_peer("PICKY", require_called_aet=True)
    # configured under another AE title: the peer rejects being called by it
    running = start_server(peers=[{**picky.entry(), "ae_title": "WRONGNAME"}])
    ds = hierarchy()[0]
    running.archive.store(encode(ds), ExplicitVRLittleEndian)
    responses = c_move(running, STUDY_ROOT, "WRONGNAME", QueryRetrieveLevel="STUDY",
                       StudyInstanceUID=ds.StudyInstanceUID)
    assert len(responses) == 1
    assert responses[0].Status == status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS
    assert responses[0].ErrorComment.startswith("association rejected: WRONGNAME at")
    assert picky.received == []


def test_missing_file_is_counted_listed_and_logged(stored_and_peer: Any, caplog: Any) -> None:
    running, peer, datasets = stored_and_peer
    wanted = [ds for ds in datasets if ds.PatientID == "PID2"]
    from storage.models import Instance

    lost = Instance.get(Instance.sop_instance_uid == wanted[1].SOPInstanceUID)
    running.archive.files.path(lost.file_key).unlink()
    with caplog.at_level(logging.WARNING):
        responses = c_move(running, PATIENT_ROOT, peer.ae_title,
                           QueryRetrieveLevel="PATIENT", PatientID="PID2")
    final = responses[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES  # PS3.4 C.4.2.1.5 B000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(wanted) - 1, 1)
    assert list(final.FailedSOPInstanceUIDList) == [wanted[1].SOPInstanceUID] or (
        final.FailedSOPInstanceUIDList == wanted[1].SOPInstanceUID)
    assert len(peer.received) == len(wanted) - 1
    assert_failure_lines(
        caplog, f"C-MOVE sub-operation failed for SOP Instance {wanted[1].SOPInstanceUID}: file of")


def assert_failure_lines(caplog: Any, *starts: str) -> None:
    """The WARNING and ERROR lines logged are one per item of ``starts``, each beginning
    with it."""
    lines = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert len(lines) == len(starts), lines
    for line, start in zip(lines, sorted(starts), strict=True):
        assert line.startswith(start), (line, start)


def test_a_refused_sub_operation_is_one_log_line(stored_and_peer: Any, caplog: Any) -> None:
    running, peer, datasets = stored_and_peer
    study = [ds for ds in datasets if ds.StudyInstanceUID == datasets[0].StudyInstanceUID]
    peer.refuse = {study[1].SOPInstanceUID}
    with caplog.at_level(logging.WARNING):
        final = c_move(running, STUDY_ROOT, peer.ae_title, QueryRetrieveLevel="STUDY",
                       StudyInstanceUID=study[0].StudyInstanceUID)[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(study) - 1, 1)
    assert final.FailedSOPInstanceUIDList == study[1].SOPInstanceUID
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"C-MOVE sub-operation failed for SOP Instance {study[1].SOPInstanceUID}: the"
        " receiver answered A700 (Refused: Out of Resources)"]


def test_a_refusal_without_its_instance_uid_names_the_instance(stored_and_peer: Any,
                                                              caplog: Any) -> None:
    """A C-STORE response need not carry its Affected SOP Instance UID (PS3.7 Table 9.1-1,
    "U"): the line names the instance of the request it answers, by Message ID."""
    running, peer, datasets = stored_and_peer
    study = [ds for ds in datasets if ds.StudyInstanceUID == datasets[0].StudyInstanceUID]
    peer.refuse = {study[1].SOPInstanceUID}
    peer.refuse_anonymously = True
    with caplog.at_level(logging.WARNING):
        final = c_move(running, STUDY_ROOT, peer.ae_title, QueryRetrieveLevel="STUDY",
                       StudyInstanceUID=study[0].StudyInstanceUID)[-1]
    refusals = [rsp for rsp in peer.responses if rsp.Status == 0xA700]
    assert len(refusals) == 1 and "AffectedSOPInstanceUID" not in refusals[0]
    assert final.FailedSOPInstanceUIDList == study[1].SOPInstanceUID
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"C-MOVE sub-operation failed for SOP Instance {study[1].SOPInstanceUID}: the"
        " receiver answered A700 (Refused: Out of Resources)"]


RECEIVER_GONE = "the receiver is gone (it released or aborted the association)"


def gone_lines(caplog: Any, service: str, sent: list[str], first: str, more: int) -> None:
    """The WARNING and ERROR lines of a retrieve whose receiver left: the sub-operations
    in ``sent`` succeeded but the last, whose line ends with ``first``; the next one is
    the receiver being gone, and ``more`` others are one line; none of pynetdicom's."""
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 3, lines
    assert lines[0] == f"{service} sub-operation failed for SOP Instance {sent[-1]}: {first}"
    named = re.fullmatch(rf"{service} sub-operation failed for SOP Instance ([0-9.]+):"
                         rf" {re.escape(RECEIVER_GONE)}", lines[1])
    assert named and named[1] not in sent, lines[1]
    assert lines[2] == f"{service}: {more} more sub-operations failed: {RECEIVER_GONE}"


def test_a_receiver_that_does_not_answer_fails_after_the_dimse_timeout(
        start_server: Callable[..., Running], start_peer: Callable[..., Peer],
        caplog: Any) -> None:
    """No C-STORE response within ae.dimse_timeout: pynetdicom aborts the association
    (its own lines about it are dropped); that sub-operation is one line saying so, the
    others fail because the receiver is gone: the first named, the rest counted."""
    mute = start_peer("MUTE")
    mute.hold = threading.Event()  # set when the test ends
    running = start_server(peers=[mute.entry()], **{"ae.dimse_timeout": 0.5})
    study = [ds for ds in hierarchy() if ds.PatientID == "PID1"][:6]
    for ds in study:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        final = c_move(running, STUDY_ROOT, "MUTE", QueryRetrieveLevel="STUDY",
                       StudyInstanceUID=study[0].StudyInstanceUID)[-1]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 6)
    assert len(mute.requests) == 1
    gone_lines(caplog, "C-MOVE", mute.requests, "no response within the DIMSE timeout"
               " (0.5 s); the association was aborted", 4)


def test_a_requestor_that_aborts_mid_move(start_server: Callable[..., Running],
                                          start_peer: Callable[..., Peer],
                                          caplog: Any) -> None:
    """A C-MOVE whose requestor aborted stops after the sub-operation in flight (its
    association's socket, lent to the move, shows the A-ABORT between two
    sub-operations): the instances not sent are accounted for, the first named, the
    others counted; pynetdicom then takes the A-ABORT in."""
    slow = start_peer("SLOW")
    slow.hold = threading.Event()
    arrived = threading.Event()
    slow.arrived = arrived
    running = start_server(peers=[slow.entry()])
    study = [ds for ds in hierarchy() if ds.PatientID == "PID1"][:6]
    for ds in study:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    ours = next(a for a in running.server.ae.active_associations
                if a.requestor.ae_title == "MOVESCU")
    abort_taken_in = threading.Event()  # its A-ABORT is where pynetdicom looks for it
    ours.bind(evt.EVT_FSM_TRANSITION,
              lambda event: abort_taken_in.set() if event.action == "AA-3" else None)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study[0].StudyInstanceUID
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        assoc.send_c_move(q, "SLOW", STUDY_ROOT)  # the request goes at once
        assert arrived.wait(30)  # the first sub-operation waits for its response
        # the A-ABORT written on the requestor's socket by hand, its DUL left as it is:
        # pynetdicom's own abort (send_abort, abort()) puts the DUL in Sta13, which closes
        # the socket as soon as nothing is left to read (dul.py _is_transport_event), and
        # the server's final response, sent before it reads the A-ABORT back from the
        # lease, could then meet a closed connection: an A-P-ABORT, not AA-3 (loaded CI
        # runs of 2026-12-05 and -06; reproduced 1 in 16 runs beside four busy loops)
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x00, 0x00
        assoc.dul.socket.socket.sendall(abort.encode())
        slow.hold.set()
        assert running.server.activity.wait_idle(30)
        assert abort_taken_in.wait(30)
        assoc.kill()
    assert len(slow.received) == 1
    # the server's lines (the requestor's pynetdicom, its DUL not told of the A-ABORT, may
    # warn of the final response it was not waiting for)
    lines = [r.getMessage() for r in caplog.records
             if r.levelno >= logging.WARNING and r.name.startswith("scp")]
    not_sent = "not sent: the requestor is gone (it released or aborted the association)"
    assert len(lines) == 2, lines
    named = re.fullmatch(rf"C-MOVE sub-operation failed for SOP Instance ([0-9.]+):"
                         rf" {re.escape(not_sent)}", lines[0])
    assert named and named[1] in {ds.SOPInstanceUID for ds in study} - set(slow.requests)
    assert lines[1] == f"C-MOVE: 4 more sub-operations failed: {not_sent}"


def test_cancel_stops_after_the_current_instance(stored_and_peer: Any) -> None:
    running, peer, datasets = stored_and_peer
    wanted = [ds for ds in datasets if ds.PatientID == "PID1"]
    hold_second_read_until_cancelled(running)

    def cancel_once(assoc: Any, rsp: Any) -> None:
        if rsp.Status == status.PENDING and rsp.NumberOfCompletedSuboperations == 1:
            cx = assoc._get_valid_context(PATIENT_ROOT, "", "scu")
            assoc.send_c_cancel(7, cx.context_id)

    responses = c_move(running, PATIENT_ROOT, peer.ae_title, msg_id=7, on_response=cancel_once,
                       QueryRetrieveLevel="PATIENT", PatientID="PID1")
    final = responses[-1]
    assert final.Status == status.CANCEL
    done = final.NumberOfCompletedSuboperations
    assert 1 <= done < len(wanted)
    assert final.NumberOfRemainingSuboperations == len(wanted) - done
    assert len(peer.received) == done


# -- transfer syntaxes ---------------------------------------------------------------------

# JPEG 2000, RLE (one and 15 frames), JPEG lossless, JPEG baseline (YBR), JPEG-LS: all
# decoded by the codecs extra; each file a different SOP Instance
COMPRESSED = ["JPEG2000.dcm", "MR_small_RLE.dcm", "rtdose_rle.dcm", "SC_rgb_jpeg_gdcm.dcm",
              "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm"]
JPEG2000 = "1.2.840.10008.1.2.4.91"


@pytest.fixture
def compressed(start_server: Callable[..., Running], start_peer: Callable[..., Peer]) -> Any:
    plain = start_peer("PLAIN", [ImplicitVRLittleEndian])
    anything = start_peer("ANY")
    only_j2k = start_peer("J2KONLY", [JPEG2000])
    running = start_server(peers=[plain.entry(), anything.entry(), only_j2k.entry()])
    originals = []
    for n, name in enumerate(COMPRESSED):
        ds = dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = f"{ROOT}90.{n}"  # two of the files share one
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or f"{ROOT}91"
        running.archive.store(encode(ds), str(ds.file_meta.TransferSyntaxUID))
        originals.append(ds)
    return running, plain, anything, only_j2k, originals


def _move_all(running: Running, destination: str, originals: list[Dataset]) -> Dataset:
    uids = [str(ds.StudyInstanceUID) for ds in originals]
    return c_move(running, STUDY_ROOT, destination, QueryRetrieveLevel="STUDY",
                  StudyInstanceUID=list(dict.fromkeys(uids)))[-1]


def test_compressed_to_a_peer_taking_only_uncompressed_arrives_decoded(compressed: Any) -> None:
    running, plain, _, _, originals = compressed
    final = _move_all(running, "PLAIN", originals)
    assert final.Status == status.SUCCESS, final
    assert final.NumberOfCompletedSuboperations == len(originals)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in plain.datasets}
    assert {s for _, s in plain.received} == {ImplicitVRLittleEndian}
    for original in originals:
        got = by_uid[str(original.SOPInstanceUID)]
        # pixel-identical to pydicom's own decode of the stored file
        assert np.array_equal(got.pixel_array, original.pixel_array), original.filename
        assert got.PhotometricInterpretation == ("RGB" if original.SamplesPerPixel == 3
                                                 else original.PhotometricInterpretation)


def test_compressed_to_a_peer_taking_it_arrives_as_stored(compressed: Any) -> None:
    running, _, anything, _, originals = compressed
    final = _move_all(running, "ANY", originals)
    assert final.Status == status.SUCCESS
    sent = {(encode(ds), str(ds.file_meta.TransferSyntaxUID)) for ds in originals}
    assert sent == set(anything.received)  # every one as stored, byte for byte


def test_undecodable_pixel_data_fails_that_sub_operation_only(
        compressed: Any, caplog: Any) -> None:
    running, plain, _, _, originals = compressed
    broken = dcmread(get_testdata_file("JPEG2000.dcm"))
    syntax = str(broken.file_meta.TransferSyntaxUID)
    broken.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    broken.PixelData = encapsulate([b"not a JPEG 2000 codestream" * 4])
    running.archive.store(encode(broken), syntax)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        final = c_move(running, STUDY_ROOT, "PLAIN", QueryRetrieveLevel="IMAGE",
                       StudyInstanceUID=broken.StudyInstanceUID,
                       SeriesInstanceUID=broken.SeriesInstanceUID,
                       SOPInstanceUID=[broken.SOPInstanceUID, originals[0].SOPInstanceUID])[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert final.FailedSOPInstanceUIDList == broken.SOPInstanceUID
    # the reason, not a guess: the codecs are installed, the data is not JPEG 2000
    assert_failure_lines(
        caplog, f"C-MOVE sub-operation failed for SOP Instance {broken.SOPInstanceUID}: cannot"
        " convert from JPEG 2000 Image Compression to Implicit VR Little Endian: the decoder"
        " failed: Unable to decode")
    assert "installed?" not in caplog.text
    assert [str(ds.SOPInstanceUID) for ds in plain.datasets] == [originals[0].SOPInstanceUID]


def test_no_possible_conversion_fails_that_sub_operation_only(compressed: Any,
                                                              caplog: Any) -> None:
    running, _, _, only_j2k, originals = compressed
    with caplog.at_level(logging.ERROR):
        final = _move_all(running, "J2KONLY", originals)
    j2k = [ds for ds in originals if ds.file_meta.TransferSyntaxUID == JPEG2000]
    assert j2k
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert final.NumberOfCompletedSuboperations == len(j2k)
    assert final.NumberOfFailedSuboperations == len(originals) - len(j2k)
    assert "we do not compress into another syntax" in caplog.text


# -- DCMTK movescu to DCMTK storescp -----------------------------------------------------

def test_movescu_to_storescp(start_server: Callable[..., Running], dcmtk: Callable[..., Any],
                             tmp_path: Path) -> None:
    out = tmp_path / "storescp"
    out.mkdir()
    with reserved_port() as port:  # not the server's own port 0
        running = start_server(peers=[{"ae_title": "STORESCP", "host": "127.0.0.1",
                                       "port": port}])
    datasets = hierarchy()
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    proc = subprocess.Popen([dcmtk_tool("storescp") or "storescp", "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30  # poll until storescp answers an echo
        while dcmtk("echoscu", "-aec", "STORESCP", "127.0.0.1", str(port),
                    check=False).returncode != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "storescp did not start"
            time.sleep(0.05)
        study = datasets[0].StudyInstanceUID
        result = dcmtk("movescu", "-v", "-S", "-aec", running.ae_title, "-aem", "STORESCP",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                       "127.0.0.1", str(running.port))
        wanted = {ds.SOPInstanceUID: ds for ds in datasets if ds.StudyInstanceUID == study}
        files = list(out.iterdir())
        assert len(files) == len(wanted), result.stdout + result.stderr
        for path in files:
            raw, syntax = file_parts(path)
            uid = str(dcmread(path).SOPInstanceUID)
            assert (raw, syntax) == (encode(wanted[uid]), ExplicitVRLittleEndian)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- retrieves beside stores and queries ---------------------------------------------------

def test_moves_run_while_others_store_and_query(stored_and_peer: Any) -> None:
    from tests.conftest import associate, find

    running, peer, datasets = stored_and_peer
    errors: list[BaseException] = []
    stored_codes: list[int] = []

    def storer() -> None:
        try:
            assoc = associate(running)
            for _ in range(40):
                ds = make_ds(PatientID="BUSY")
                stored_codes.append(int(assoc.send_c_store(ds).Status))
            assoc.release()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def querier() -> None:
        try:
            for _ in range(10):
                matches, final = find(running, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
                assert final == status.SUCCESS and len(matches) >= 5
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=storer), threading.Thread(target=querier)]
    for t in threads:
        t.start()
    finals = [c_move(running, PATIENT_ROOT, peer.ae_title, QueryRetrieveLevel="PATIENT",
                     PatientID="PID1")[-1] for _ in range(3)]
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert stored_codes == [status.SUCCESS] * 40
    wanted = len([ds for ds in datasets if ds.PatientID == "PID1"])
    assert [(f.Status, f.NumberOfCompletedSuboperations) for f in finals] == [
        (status.SUCCESS, wanted)] * 3


def test_large_retrieves_get_pending_responses_at_a_bounded_rate(
        stored_and_peer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to PENDING_EVERY_SUBOPERATION_UP_TO instances: a Pending after each (tested above);
    more: at most one per PENDING_INTERVAL. Here the limits are made small."""
    from scp import retrieve

    running, peer, datasets = stored_and_peer
    monkeypatch.setattr(retrieve, "PENDING_EVERY_SUBOPERATION_UP_TO", 3)
    monkeypatch.setattr(retrieve, "PENDING_INTERVAL", 3600.0)
    wanted = [ds for ds in datasets if ds.PatientID == "PID1"]
    assert len(wanted) > 3
    responses = c_move(running, PATIENT_ROOT, peer.ae_title, QueryRetrieveLevel="PATIENT",
                       PatientID="PID1")
    assert [int(r.Status) for r in responses] == [status.PENDING, status.SUCCESS]
    assert responses[0].NumberOfCompletedSuboperations == 1
    assert responses[-1].NumberOfCompletedSuboperations == len(wanted)
    assert len(peer.received) == len(wanted)


def test_the_association_to_the_destination_has_nagle_off(
        stored_and_peer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else every C-STORE sub-operation waits for a delayed acknowledgement (~45 ms)."""
    from scp.engine.sender import StoreAssociation

    running, peer, datasets = stored_and_peer
    seen: list[int] = []
    original = StoreAssociation.release

    def release(self: Any) -> None:
        seen.append(self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        original(self)

    monkeypatch.setattr(StoreAssociation, "release", release)
    final = c_move(running, STUDY_ROOT, peer.ae_title, QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=datasets[0].StudyInstanceUID)[-1]
    assert final.Status == status.SUCCESS
    assert seen and all(seen)


def test_a_peer_transfer_syntax_is_what_it_gets(start_server: Callable[..., Running],
                                                 start_peer: Callable[..., Peer]) -> None:
    """peers[].transfer_syntax: every instance in that syntax, decoded when needed, even
    when the peer would take others."""
    anything = start_peer("IMPLICIT")
    running = start_server(peers=[{**anything.entry(), "transfer_syntax": ImplicitVRLittleEndian}])
    ds = hierarchy()[0]
    running.archive.store(encode(ds), ExplicitVRLittleEndian)
    j2k = dcmread(get_testdata_file("JPEG2000.dcm"))
    j2k.StudyInstanceUID = ds.StudyInstanceUID
    running.archive.store(encode(j2k), str(j2k.file_meta.TransferSyntaxUID))
    final = c_move(running, STUDY_ROOT, "IMPLICIT", QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=ds.StudyInstanceUID)[-1]
    assert (final.Status, final.NumberOfCompletedSuboperations) == (status.SUCCESS, 2)
    assert {syntax for _, syntax in anything.received} == {ImplicitVRLittleEndian}
    assert (encode(ds, ImplicitVRLittleEndian), ImplicitVRLittleEndian) in anything.received


def test_a_damaged_file_fails_only_its_sub_operation(stored_and_peer: Any, caplog: Any) -> None:
    """A deflated file whose stream is corrupt (zlib.error from pydicom), like a missing one:
    counted, listed, logged; the others go."""
    import zlib

    from storage.models import Instance

    running, peer, datasets = stored_and_peer
    study = [ds for ds in datasets if ds.PatientID == "PID2"]
    broken = make_ds(StudyInstanceUID=study[0].StudyInstanceUID, PatientID="PID2")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = packer.compress(encode(broken)) + packer.flush()
    running.archive.store(deflated, "1.2.840.10008.1.2.1.99")
    row = Instance.get(Instance.sop_instance_uid == broken.SOPInstanceUID)
    path = running.data_dir / "files" / row.file_key[:2] / row.file_key[2:4] / row.file_key
    raw = bytearray(path.read_bytes())
    start = len(raw) - len(deflated)  # the stream follows our File Meta header
    raw[start + 10:start + 70] = bytes(range(60))  # scramble the deflate stream
    path.write_bytes(bytes(raw))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        final = c_move(running, PATIENT_ROOT, peer.ae_title, QueryRetrieveLevel="PATIENT",
                       PatientID="PID2")[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(study), 1)
    assert final.FailedSOPInstanceUIDList == broken.SOPInstanceUID
    assert_failure_lines(
        caplog, f"C-MOVE sub-operation failed for SOP Instance {broken.SOPInstanceUID}: file of")


def test_files_are_not_read_once_the_destination_is_gone(start_server: Callable[..., Running],
                                                         start_peer: Callable[..., Peer],
                                                         caplog: Any) -> None:
    quitter = start_peer("QUITTER")
    quitter.abort_after = 2
    running = start_server(peers=[quitter.entry()])
    datasets = [ds for ds in hierarchy() if ds.PatientID == "PID1"]
    for ds in datasets:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    reads: list[str] = []
    original = running.archive.stored_data_set

    def counted(item: Any) -> Any:
        reads.append(item.sop_instance_uid)
        return original(item)

    running.archive.stored_data_set = counted  # type: ignore[method-assign]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):  # pynetdicom's lines, had they passed, at any level
        final = c_move(running, PATIENT_ROOT, "QUITTER", QueryRetrieveLevel="PATIENT",
                       PatientID="PID1")[-1]
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == len(datasets) - 1
    # the one sent, the one the peer aborted on and the one read ahead while that one
    # awaited its response (scp/retrieve.py reads one file ahead); not the other seven
    assert len(datasets) == 10 and len(reads) == 3
    # one line for the instance in flight, then one for the first instance after it and
    # one for the seven others
    gone_lines(caplog, "C-MOVE", reads[:2],
               "the receiver aborted the association before answering", 7)


def test_every_retrieve_is_in_the_association_log_line(stored_and_peer: Any, caplog: Any) -> None:
    running, peer, datasets = stored_and_peer
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = datasets[0].StudyInstanceUID
    with caplog.at_level(logging.INFO, logger="minipacs.association"):
        for destination in (peer.ae_title, "NOBODY"):
            list(assoc.send_c_move(q, destination, STUDY_ROOT))
        assoc.release()
        deadline = time.monotonic() + 30  # the line is written by the server's thread
        while "association from MOVESCU" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "1 move, 1 move failed" in caplog.text


def test_a_move_whose_association_cannot_be_lent_goes_through_pynetdicom(
        stored_and_peer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an untested pynetdicom the requesting association's socket cannot be lent
    (scp/engine/reactor.py installs nothing): the Pending responses go through pynetdicom,
    and the move still completes."""
    import contextlib

    from scp import retrieve

    @contextlib.contextmanager
    def not_lent(*_: Any, **__: Any) -> Iterator[None]:
        yield None

    monkeypatch.setattr(retrieve, "leased", not_lent)
    running, peer, datasets = stored_and_peer
    wanted = [ds for ds in datasets if ds.PatientID == "PID1"]
    responses = c_move(running, PATIENT_ROOT, peer.ae_title, QueryRetrieveLevel="PATIENT",
                       PatientID="PID1")
    assert [int(r.Status) for r in responses] == [status.PENDING] * len(wanted) + [
        status.SUCCESS]
    assert [r.NumberOfCompletedSuboperations for r in responses] == list(
        range(1, len(wanted) + 1)) + [len(wanted)]
    assert len(peer.received) == len(wanted)


def test_a_server_that_stops_does_not_wait_for_a_move_to_end(
        start_server: Callable[..., Running], start_peer: Callable[..., Peer]) -> None:
    """Server.stop aborts what is still running after its grace period: a C-MOVE whose
    destination holds its response gives up at once (scp/engine/sender.py Link.wanted_back),
    rather than when the destination answers or the DIMSE timeout passes."""
    slow = start_peer("SLOW")
    slow.hold = threading.Event()
    arrived = threading.Event()
    slow.arrived = arrived
    running = start_server(peers=[slow.entry()])
    study = [ds for ds in hierarchy() if ds.PatientID == "PID1"]
    for ds in study:
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
    def move() -> None:
        with contextlib.suppress(Exception):  # its association is aborted by the stop
            c_move(running, STUDY_ROOT, "SLOW", QueryRetrieveLevel="STUDY",
                   StudyInstanceUID=study[0].StudyInstanceUID)

    moving = threading.Thread(target=move, daemon=True)
    moving.start()
    assert arrived.wait(30)  # the first sub-operation waits for its response
    stopped = threading.Event()
    threading.Thread(target=lambda: (running.server.stop(grace=0.5), stopped.set()),
                     daemon=True).start()
    try:
        assert stopped.wait(20), "the server waited for the destination to answer"
    finally:
        slow.hold.set()
        moving.join(30)
    assert len(slow.received) <= 1


def test_minipacs_send_a_study_and_a_series_to_a_peer_as_stored(
        stored_and_peer: Any, tmp_path: Path) -> None:
    """``minipacs send PEER`` (issue 16, item 2), in another process while the server runs:
    the selected instances reach the peer byte for byte in their stored syntax."""
    running, peer, datasets = stored_and_peer
    config = tmp_path / "send.yaml"
    config.write_text(f"peers:\n  - ae_title: {peer.ae_title}\n    host: 127.0.0.1\n"
                      f"    port: {peer.port}\n  - ae_title: NOWHERE\n    host: 127.0.0.1\n"
                      f"    port: {free_port()}\n")

    def send(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*minipacs_command(), "send", *args, "--config", str(config), "--data-dir",
             str(running.data_dir)], capture_output=True, text=True, timeout=120,
            cwd=tmp_path)

    study = datasets[0].StudyInstanceUID
    other_series = next(ds.SeriesInstanceUID for ds in datasets if ds.PatientID == "PID2")
    wanted = [ds for ds in datasets
              if ds.StudyInstanceUID == study or ds.SeriesInstanceUID == other_series]
    where = f"{peer.ae_title} at 127.0.0.1:{peer.port}"

    dry = send(peer.ae_title, "--study", study, "--series", other_series, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would send {len(wanted)} instance(s) to {where}" in dry.stdout
    assert peer.received == []

    done = send(peer.ae_title, "--study", study, "--series", other_series)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"sent {len(wanted)} of {len(wanted)} instance(s) to {where}: 0 with a warning,"
            " 0 failed") in done.stdout
    assert sorted(peer.received) == sorted((encode(ds), ExplicitVRLittleEndian)
                                           for ds in wanted)
    assert peer.originators == [(None, None)] * len(wanted)  # PS3.7 9.3.1.1: a C-MOVE's

    nowhere = send("NOWHERE", "--study", study)  # nobody listens there
    assert nowhere.returncode == 1
    assert "sent 0 of 6 instance(s) to NOWHERE" in nowhere.stdout and "6 failed" in nowhere.stdout
    unknown = send("STRANGER", "--study", study)
    assert unknown.returncode == 2 and "'STRANGER' is not in peers" in unknown.stderr
    assert send(peer.ae_title, "--study", "1.2.3.4").returncode == 1
    assert send(peer.ae_title).returncode == 2
