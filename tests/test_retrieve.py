"""C-GET: what a query finds comes back over the same association, byte for byte, with
counts, failures and cancel as PS3.4 C.4.3 says (C-MOVE: tests/test_move.py)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom import events as evt
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
)

from scp import status
from tests.conftest import Running, hold, hold_second_read_until_cancelled
from tests.factory import LEVEL_CASE_IDS, encode, hierarchy, retrieve_levels


@pytest.fixture
def stored(server: Running) -> list[Dataset]:
    datasets = hierarchy()
    for ds in datasets:
        server.archive.store(encode(ds), ExplicitVRLittleEndian)
    return datasets


class Retrieved(Protocol):
    """Where :func:`c_get` retrieves from: a server, or a balancer in front of several."""

    @property
    def port(self) -> int: ...

    @property
    def ae_title(self) -> str: ...


def c_get(running: Retrieved, model: Any, refuse: frozenset[str] = frozenset(),
          pdus: list[tuple[str, ...]] | None = None, abort_at: int = 0,
          requests: list[str] | None = None, syntax: str = ExplicitVRLittleEndian,
          **keys: Any) -> tuple[list[bytes], list[Dataset]]:
    """A C-GET with pynetdicom acting as the Storage SCP of the sub-operations: the data
    sets received (as encoded bytes) and every C-GET response. The instances named in
    ``refuse`` are answered A700 (Refused: Out of Resources); ``pdus`` gets what arrived,
    PDU by PDU (see :func:`received_pdu`); with ``abort_at``, the association is aborted
    at that C-STORE request instead of answering it; ``requests`` gets the SOP Instance
    UID of each C-STORE request; ``syntax`` is the one transfer syntax proposed for the
    storage SOP Classes."""
    received: list[bytes] = []

    def on_store(event: Any) -> int:
        if requests is not None:
            requests.append(str(event.request.AffectedSOPInstanceUID))
        if abort_at and len(received) + 1 >= abort_at:
            event.assoc.abort()
            # pynetdicom does not wake its own send_c_get, waiting for the next response,
            # when it aborts (only when the peer does): it would wait its DIMSE timeout
            event.assoc.dimse.msg_queue.put((None, None))
            return 0x0000
        if str(event.request.AffectedSOPInstanceUID) in refuse:
            return STORE_REFUSED
        received.append(event.encoded_dataset(include_meta=False))
        return 0x0000

    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    if pdus is not None:
        handlers.append((evt.EVT_PDU_RECV, received_pdu, [pdus]))

    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    classes = sorted({str(ds.SOPClassUID) for ds in hierarchy()})
    for uid in classes:
        ae.add_requested_context(uid, syntax)
    roles = [build_role(uid, scp_role=True) for uid in classes]
    assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title,
                         ext_neg=roles, evt_handlers=handlers)
    assert assoc.is_established
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    responses = [rsp for rsp, _ in assoc.send_c_get(q, model)]
    assoc.release()
    return received, responses


STORE_REFUSED = 0xA700  # PS3.4 B.2.3, Refused: Out of Resources


def received_pdu(event: Any, pdus: list[tuple[str, ...]]) -> None:
    """EVT_PDU_RECV: each PDU as ("P-DATA", "command" or "data", ...) with one word per
    presentation data value (PS3.8 E.2, message control header bit 0), or its type name."""
    pdu = event.pdu
    if pdu.pdu_type == 0x04:
        pdus.append(("P-DATA", *("command" if pdv.presentation_data_value[0] & 1 else "data"
                                 for pdv in pdu.presentation_data_value_items)))
    else:
        pdus.append((type(pdu).__name__,))


def after_last_command(pdus: list[tuple[str, ...]]) -> list[str]:
    """What arrived after the last command (the final C-GET response) in ``pdus``."""
    flat = [kind for pdu in pdus for kind in (pdu[1:] if pdu[0] == "P-DATA" else pdu)]
    last = max(i for i, kind in enumerate(flat) if kind == "command")
    return flat[last + 1:]


def test_get_a_study_byte_for_byte(server: Running, stored: list[Dataset]) -> None:
    study = stored[0].StudyInstanceUID
    received, responses = c_get(server, StudyRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="STUDY", StudyInstanceUID=study)
    wanted = [ds for ds in stored if ds.StudyInstanceUID == study]
    assert sorted(received) == sorted(encode(ds) for ds in wanted)  # the stored bytes
    final = responses[-1]
    assert final.Status == status.SUCCESS
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(wanted), 0)
    pending = [r for r in responses if r.Status == status.PENDING]
    assert [r.NumberOfRemainingSuboperations for r in pending] == list(
        range(len(wanted) - 1, -1, -1))


@pytest.mark.parametrize("case", range(len(LEVEL_CASE_IDS)), ids=LEVEL_CASE_IDS)
def test_get_every_level_byte_for_byte(server: Running, stored: list[Dataset], case: int) -> None:
    root, keys, named = retrieve_levels(stored)[case]
    model = (PatientRootQueryRetrieveInformationModelGet if root == "patient"
             else StudyRootQueryRetrieveInformationModelGet)
    wanted = [ds for ds in stored if named(ds)]
    received, responses = c_get(server, model, **keys)
    assert sorted(received) == sorted(encode(ds) for ds in wanted)
    assert responses[-1].Status == status.SUCCESS
    assert responses[-1].NumberOfCompletedSuboperations == len(wanted)


def test_get_at_patient_level_and_missing_files(server: Running, stored: list[Dataset]) -> None:
    wanted = [ds for ds in stored if ds.PatientID == "PID2"]
    # lose one file: its sub-operation fails and is listed, the others still go
    from storage.models import Instance

    lost = Instance.get(Instance.sop_instance_uid == wanted[0].SOPInstanceUID)
    server.archive.files.path(lost.file_key).unlink()
    received, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="PATIENT", PatientID="PID2")
    assert len(received) == len(wanted) - 1
    final = responses[-1]
    assert final.Status == 0xB000  # PS3.4 C.4.3.1.4: sub-operations complete, one failure
    assert final.NumberOfFailedSuboperations == 1
    assert final.NumberOfCompletedSuboperations == len(wanted) - 1


def test_get_with_an_invalid_identifier(server: Running, stored: list[Dataset]) -> None:
    received, responses = c_get(server, StudyRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="SERIES", SeriesInstanceUID="1.2")
    assert received == []
    assert responses[-1].Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert responses[-1].get("NumberOfFailedSuboperations", 0) == 0  # none was attempted


def test_getscu(server: Running, stored: list[Dataset], dcmtk: Callable[..., Any],
                tmp_path: Path) -> None:
    study = stored[0].StudyInstanceUID
    out = tmp_path / "got"
    out.mkdir()
    dcmtk("getscu", "-S", "-aec", server.ae_title, "-od", str(out), "-k",
          "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
          "127.0.0.1", str(server.port))
    got = {dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == {ds.SOPInstanceUID for ds in stored if ds.StudyInstanceUID == study}


def test_get_cancel(server: Running, stored: list[Dataset]) -> None:
    """C-CANCEL stops the sub-operations after the current instance (FE00)."""
    hold_second_read_until_cancelled(server)
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    classes = sorted({str(ds.SOPClassUID) for ds in stored})
    for uid in classes:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         ext_neg=[build_role(uid, scp_role=True) for uid in classes],
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = "PID1"
    codes = []
    for rsp, _ in assoc.send_c_get(q, PatientRootQueryRetrieveInformationModelGet, msg_id=9):
        codes.append(int(rsp.Status))
        if len(codes) == 1:
            cx = assoc._get_valid_context(PatientRootQueryRetrieveInformationModelGet, "", "scu")
            assoc.send_c_cancel(9, cx.context_id)
    assoc.release()
    assert codes[-1] == status.CANCEL
    assert codes.count(status.PENDING) < len([ds for ds in stored if ds.PatientID == "PID1"])


def test_get_to_an_implicit_only_requestor_rewrites_the_stored_bytes(
        server: Running, stored: list[Dataset]) -> None:
    """Stored as Explicit VR Little Endian, sent to a requestor that took only Implicit VR
    (DCMTK's getscu by default): the same values in Implicit VR, rewritten on the bytes
    (Archive.stored_as_implicit), never decoded by pydicom."""
    from tests.factory import encode

    def no_decoding(*_: Any) -> Any:
        raise AssertionError("the instance was decoded")

    server.archive.read_instance = no_decoding  # type: ignore[method-assign]
    wanted = [ds for ds in stored if ds.PatientID == "PID1"]
    received, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet,
                                syntax=ImplicitVRLittleEndian, QueryRetrieveLevel="PATIENT",
                                PatientID="PID1")
    assert responses[-1].Status == status.SUCCESS
    assert sorted(received) == sorted(encode(ds, ImplicitVRLittleEndian) for ds in wanted)


def test_get_converts_for_what_the_requestor_accepted(server: Running, caplog: Any) -> None:
    """A compressed instance comes back decoded when the C-GET SCU proposed only an
    uncompressed syntax for its SOP Class; an instance whose SOP Class it did not propose at
    all fails its sub-operation, logged, and the others still go."""
    import logging

    import numpy as np
    from pydicom.data import get_testdata_file

    from tests.factory import file_parts, make_ds

    original = dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    raw, syntax = file_parts(get_testdata_file("SC_rgb_rle.dcm"))
    server.archive.store(raw, syntax)
    other = make_ds(StudyInstanceUID=original.StudyInstanceUID,
                    SOPClassUID="1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose: not proposed
    server.archive.store(encode(other), ExplicitVRLittleEndian)

    got: list[Dataset] = []

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(original.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         ext_neg=[build_role(original.SOPClassUID, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = original.StudyInstanceUID
    with caplog.at_level(logging.ERROR):
        responses = [rsp for rsp, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    final = responses[-1]
    assert final.Status == 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (1, 1)
    assert [str(ds.SOPInstanceUID) for ds in got] == [original.SOPInstanceUID]
    assert got[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got[0].pixel_array, original.pixel_array)
    assert f"C-GET sub-operation failed for SOP Instance {other.SOPInstanceUID}" in caplog.text
    assert "accepted nothing" in caplog.text


def test_get_pending_responses_at_a_bounded_rate(server: Running, stored: list[Dataset],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from scp import retrieve

    monkeypatch.setattr(retrieve, "PENDING_EVERY_SUBOPERATION_UP_TO", 3)
    monkeypatch.setattr(retrieve, "PENDING_INTERVAL", 3600.0)
    wanted = [ds for ds in stored if ds.PatientID == "PID2"]
    received, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet,
                                QueryRetrieveLevel="PATIENT", PatientID="PID2")
    assert len(received) == len(wanted) > 3
    assert [int(r.Status) for r in responses] == [status.PENDING, status.SUCCESS]
    assert responses[-1].NumberOfCompletedSuboperations == len(wanted)


def test_a_j2k_file_pydicom_cannot_decode_in_place_is_converted(server: Running,
                                                                caplog: Any) -> None:
    """pydicom 3.0's decompress() fails on this file with "output array is read-only"
    (its sign correction writes into GDCM's immutable output): decoded another way, it
    reaches a C-GET SCU that takes only Explicit VR Little Endian, pixel for pixel."""
    import logging

    import numpy as np
    from pydicom.data import get_testdata_file

    from tests.factory import file_parts

    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    original = dcmread(path)
    server.archive.store(*file_parts(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        received, responses = c_get(server, StudyRootQueryRetrieveInformationModelGet,
                                    QueryRetrieveLevel="STUDY",
                                    StudyInstanceUID=original.StudyInstanceUID)
    assert responses[-1].Status == status.SUCCESS, caplog.text
    assert len(received) == 1 and not caplog.records
    got = decode(io.BytesIO(received[0]), False, True)  # Explicit VR Little Endian
    got.file_meta = FileMetaDataset()
    got.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(got.pixel_array, original.pixel_array)  # signed, -2000 and up
    assert got.pixel_array.min() < 0


def test_each_failed_sub_operation_is_one_log_line(server: Running, stored: list[Dataset],
                                                   caplog: Any) -> None:
    """A missing file, an instance the requestor cannot take, one it refuses: one ERROR
    line each, ours, naming the instance and why, at every level."""
    import logging

    from storage.models import Instance
    from tests.factory import make_ds

    wanted = [ds for ds in stored if ds.PatientID == "PID2"]
    missing, refused = wanted[0].SOPInstanceUID, wanted[1].SOPInstanceUID
    lost = Instance.get(Instance.sop_instance_uid == missing)
    server.archive.files.path(lost.file_key).unlink()
    dose = make_ds(PatientID="PID2", PatientName="Smith^Anna",
                   StudyInstanceUID=wanted[0].StudyInstanceUID,
                   SOPClassUID="1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose: not proposed
    server.archive.store(encode(dose), ExplicitVRLittleEndian)
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        received, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet,
                                    refuse=frozenset({refused}),
                                    QueryRetrieveLevel="PATIENT", PatientID="PID2")
    final = responses[-1]
    assert final.Status == status.SUBOPERATIONS_WITH_FAILURES
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (
        len(wanted) - 2, 3)
    assert len(received) == len(wanted) - 2
    lines = sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    reasons = {missing: "file of", refused: "the receiver answered A700 (Refused: Out of",
               dose.SOPInstanceUID: "stored as Explicit VR Little Endian; the receiver"
                                    " accepted nothing"}
    assert len(lines) == 3, lines
    for uid, reason in reasons.items():
        start = f"C-GET sub-operation failed for SOP Instance {uid}: {reason}"
        assert [line for line in lines if line.startswith(start)], (start, lines)


@pytest.mark.parametrize("case", ["success", "failures", "refused"])
def test_nothing_follows_the_final_get_response_but_its_data_set(
        server: Running, stored: list[Dataset], case: str) -> None:
    """What the requestor receives after the final C-GET response: its Identifier only
    when a sub-operation failed (PS3.4 C.4.3.1.3.2: "If no C-STORE sub-operation failed
    ... no Data Set shall be sent"), then the A-RELEASE-RP; no late C-STORE request or
    second response. DCMTK's getscu never reads that data set (see test_getscu_*)."""
    from storage.models import Instance

    wanted = [ds for ds in stored if ds.PatientID == "PID2"]
    keys: dict[str, Any] = {"QueryRetrieveLevel": "PATIENT", "PatientID": "PID2"}
    if case == "failures":
        lost = Instance.get(Instance.sop_instance_uid == wanted[0].SOPInstanceUID)
        server.archive.files.path(lost.file_key).unlink()
    if case == "refused":  # A900, before any sub-operation
        keys = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": "1.2"}
    pdus: list[tuple[str, ...]] = []
    _, responses = c_get(server, PatientRootQueryRetrieveInformationModelGet, pdus=pdus,
                         **keys)
    expected = {"success": (status.SUCCESS, []),
                "failures": (status.SUBOPERATIONS_WITH_FAILURES, ["data"]),
                "refused": (status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, [])}[case]
    assert (responses[-1].Status, after_last_command(pdus)) == (
        expected[0], [*expected[1], "A_RELEASE_RP"])


GETSCU_RELEASE_FAILED = "E: Association Release Failed: 0006:0316 DUL P-Data PDU arrived"
"""What DCMTK's getscu prints when it releases an association whose final C-GET response
carried a data set (3.6.7, and its master of May 2026 reads the same): DcmSCU::
handleCGETSession (dcmnet/libsrc/scu.cc) reads a C-GET response's command but never its
data set (sendMOVERequest reads a C-MOVE response's), so that P-DATA-TF is the next PDU it
reads, where it waits for the A-RELEASE-RP; it aborts the association, and exits 0."""


def test_getscu_releases_cleanly_after_a_refused_get(server: Running, stored: list[Dataset],
                                                     dcmtk: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk("getscu", "-S", "-aec", server.ae_title, "-od", str(out), "-k",
                   "QueryRetrieveLevel=SERIES", "-k", "SeriesInstanceUID=1.2",
                   "127.0.0.1", str(server.port))
    assert "DataSetDoesNotMatchSOPClass" in result.stderr  # A900
    assert "Release Failed" not in result.stderr and "Abort" not in result.stdout + result.stderr
    assert list(out.iterdir()) == []


def test_getscu_after_failed_sub_operations(server: Running, stored: list[Dataset],
                                            dcmtk: Callable[..., Any], tmp_path: Path) -> None:
    """B000 with the failed instance listed, as PS3.4 C.4.3.1.3.2 requires: getscu gets
    the others and exits 0; the only error it may print is its own about the release
    (GETSCU_RELEASE_FAILED), and test_nothing_follows_the_final_get_response_but_its_data_set
    shows that nothing but the list follows the final response."""
    from storage.models import Instance

    study = stored[0].StudyInstanceUID
    wanted = [ds for ds in stored if ds.StudyInstanceUID == study]
    lost = Instance.get(Instance.sop_instance_uid == wanted[0].SOPInstanceUID)
    server.archive.files.path(lost.file_key).unlink()
    out = tmp_path / "got"
    out.mkdir()
    result = dcmtk("getscu", "-v", "-S", "-aec", server.ae_title, "-od", str(out), "-k",
                   "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                   "127.0.0.1", str(server.port))
    got = {dcmread(p).SOPInstanceUID for p in out.iterdir()}
    assert got == {ds.SOPInstanceUID for ds in wanted[1:]}
    assert "Number of Failed Suboperations    : 1" in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("E: ")]
    assert errors in ([], [GETSCU_RELEASE_FAILED]), result.stderr


def test_a_requestor_that_aborts_mid_get(server: Running, stored: list[Dataset],
                                         caplog: Any) -> None:
    """The instance in flight when the C-GET SCU aborts is one line of ours (pynetdicom
    logged "C-STORE sub-operation failed." and "'Dataset' object has no attribute
    'Status'"); pynetdicom then stops asking for instances, and the others are the first
    one named and the rest counted on one line."""
    from tests.test_move import gone_lines

    wanted = [ds for ds in stored if ds.PatientID == "PID1"]
    requests: list[str] = []
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        received, _ = c_get(server, PatientRootQueryRetrieveInformationModelGet, abort_at=2,
                            requests=requests, QueryRetrieveLevel="PATIENT", PatientID="PID1")
        # the handler ends when pynetdicom drops it, after the client saw the abort
        assert server.server.activity.wait_idle(30)
    assert len(received) == 1 and len(requests) == 2
    gone_lines(caplog, "C-GET", requests,
               "the receiver aborted the association before answering", len(wanted) - 3)


def _python(code: str) -> str:
    """What ``code`` prints, run by this interpreter in a new process (a fresh logging
    set-up: this one's servers have installed their filters)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    return result.stdout + result.stderr


FILTERS = ("import logging; print([type(f).__module__ for n in ('pynetdicom.association',"
           " 'pynetdicom.service_class', 'pydicom.pixels.decoders.base')"
           " for f in logging.getLogger(n).filters])")


def test_importing_the_server_configures_no_logging() -> None:
    """The log filters are installed when a server starts (Server.start), not when a
    module is imported."""
    assert _python("import scp.server, scp.handlers, scp.retrieve, storage.convert; "
                   + FILTERS).strip() == "[]"
    installed = _python("from scp.engine import retrieve; from storage import convert; "
                        "retrieve.install(); convert.install_log_filters(); " + FILTERS)
    assert installed.strip() == "['scp.engine.retrieve', 'storage.convert']"


def test_decoder_tracebacks_show_with_logging_level_debug() -> None:
    """pydicom sets its logger to WARNING when imported: ``logging.level: DEBUG`` opens
    the decoders logger, whose tracebacks storage/convert.py demotes to DEBUG."""
    code = ("import logging; from scp.logs import setup_logging; setup_logging({!r});"
            " from storage import convert;"
            " print(logging.getLogger(convert.DECODERS_LOGGER).getEffectiveLevel())")
    assert _python(code.format("DEBUG")).strip() == str(logging.DEBUG)
    assert _python(code.format("INFO")).strip() == str(logging.WARNING)


def test_no_pynetdicom_log_filter_for_an_untested_pynetdicom() -> None:
    """The filter knows pynetdicom 3.0's texts and loggers: with another version (allowed)
    nothing of scp/engine/ is installed, and a warning says what that means."""
    out = _python("import importlib.metadata as m, logging; logging.basicConfig();"
                  " real = m.version; m.version = lambda n: '2.1.1' if n == 'pynetdicom'"
                  " else real(n); from scp import engine;"
                  " print(engine.install(allow_untested=True)); " + FILTERS)
    assert out.splitlines()[:2] == ["False", "[]"], out
    assert "pynetdicom logs \"Unknown Move Destination\" before the final response" in out




def test_a_cancel_taken_in_before_the_sub_operations_is_not_lost(
        server: Running, stored: list[Dataset], monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-CANCEL that pynetdicom read while the query ran (before the association's socket
    was lent to the retrieve) still cancels it: FE00, nothing sent (PS3.4 C.4.3.3.1)."""
    import threading

    started, proceed = hold(monkeypatch, server.archive, "retrieve")
    received: list[str] = []
    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    model = PatientRootQueryRetrieveInformationModelGet
    ae.add_requested_context(model)
    classes = sorted({str(ds.SOPClassUID) for ds in hierarchy()})
    for uid in classes:
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    handlers = [(evt.EVT_C_STORE, lambda event: received.append("one") or 0x0000)]
    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.ae_title,
                         ext_neg=[build_role(uid, scp_role=True) for uid in classes],
                         evt_handlers=handlers)
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = "PID1"
    responses: list[Any] = []
    getting = threading.Thread(target=lambda: responses.extend(
        rsp for rsp, _ in assoc.send_c_get(q, model, msg_id=7)), daemon=True)
    getting.start()
    assert started.wait(30)
    context_id = next(cx.context_id for cx in assoc.accepted_contexts
                      if cx.abstract_syntax == model)
    assoc.send_c_cancel(7, context_id)
    theirs = next(a for a in server.server.ae.active_associations
                  if a.requestor.ae_title == "GETSCU")
    deadline = time.monotonic() + 30  # pynetdicom's DUL has read the C-CANCEL
    while not theirs.dimse.cancel_req and time.monotonic() < deadline:
        time.sleep(0.01)
    assert theirs.dimse.cancel_req
    proceed.set()
    getting.join(30)
    assoc.release()
    assert [int(r.Status) for r in responses] == [status.CANCEL]
    assert received == []
