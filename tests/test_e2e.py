"""End to end over the network: a real server on a loopback port, real SQLite, pynetdicom
and DCMTK clients."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import _config as pynetdicom_config
from pynetdicom import build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from scp import status
from tests.conftest import Running, associate, client_ae, find, hold
from tests.factory import (
    encode,
    expected_table,
    file_parts,
    hierarchy,
    make_ds,
    save,
    study_counts,
    uid,
    values,
)

STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate",
              "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
              "ModalitiesInStudy", "SOPClassesInStudy")


def storable_testdata() -> list[tuple[Path, Dataset]]:
    """pydicom's bundled files that are storable composite instances."""
    from pynetdicom import AllStoragePresentationContexts

    storage = {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    out = []
    for name in get_testdata_files():
        try:
            ds = dcmread(name, stop_before_pixels=True)
        except Exception:
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            continue
        if all(ds.get(k) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")) \
                and str(ds.get("SOPClassUID", "")) in storage:
            out.append((Path(name), ds))
    return out


@contextlib.contextmanager
def raw_sending() -> Iterator[None]:
    """Make pynetdicom send files as they are on disk instead of decoding them first."""
    before = pynetdicom_config.STORE_SEND_CHUNKED_DATASET
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = before


def send_files(running: Running, files: list[tuple[Path, Dataset]]) -> list[int]:
    """Send files as they are (no decoding) with pynetdicom; contexts per file, in batches."""
    statuses: list[int] = []
    batch: list[tuple[Path, Dataset]] = []
    contexts: dict[tuple[str, str], Any] = {}

    def flush() -> None:
        if not batch:
            return
        ae = client_ae(storage=False)
        ae.requested_contexts = list(contexts.values())
        assoc = associate(running, ae)
        with raw_sending():
            for path, _ in batch:
                rsp = assoc.send_c_store(path)
                statuses.append(int(rsp.Status))
        assoc.release()
        batch.clear()
        contexts.clear()

    for path, ds in files:
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if pair not in contexts and len(contexts) == 120:
            flush()
        contexts.setdefault(pair, build_context(*pair))
        batch.append((path, ds))
    flush()
    return statuses


def findscu_study(dcmtk: Callable[..., Any], running: Running, out: Path,
                  *extra: str) -> list[Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = ["-S", "-aec", running.ae_title, "-X", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", *(a for k in STUDY_KEYS for a in ("-k", k)), *extra,
            "127.0.0.1", str(running.port)]
    dcmtk("findscu", *args)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_store_and_query_with_pynetdicom_and_dcmtk(server: Running, dcmtk: Callable[..., Any],
                                                   tmp_path: Path) -> None:
    # every storable file pydicom ships, sent byte for byte with pynetdicom
    files = storable_testdata()
    assert len(files) > 100
    statuses = send_files(server, files)
    # refused, not stored: the two files pydicom ships cut short (pixel data, a sequence),
    # and one whose data set is implicit VR under an explicit VR transfer syntax (JPEG
    # Baseline), which pydicom reads by guessing
    refused = {"MR_truncated.dcm", "rtplan_truncated.dcm", "SC_rgb_jpeg.dcm"}
    expected_statuses = [status.STORE_CANNOT_UNDERSTAND if path.name in refused
                         else status.SUCCESS for path, _ in files]
    assert statuses == expected_statuses
    files = [(path, ds) for path, ds in files if path.name not in refused]

    # a synthetic hierarchy sent with DCMTK storescu
    synthetic = hierarchy()
    paths = [str(save(ds, tmp_path / "in" / f"{i}.dcm")) for i, ds in enumerate(synthetic)]
    dcmtk("storescu", "-aec", server.ae_title, "127.0.0.1", str(server.port), *paths)

    everything = [ds for _, ds in files] + synthetic
    expected = expected_table(everything)

    # what was kept is the sender's data set byte for byte, whatever its transfer syntax
    from storage.models import Instance

    last_sent = {str(ds.SOPInstanceUID): path for path, ds in files}
    syntaxes = set()
    for row in Instance.select():
        if row.sop_instance_uid in last_sent:
            stored = server.data_dir / "files" / row.file_key[:2] / row.file_key[2:4] / row.file_key
            assert file_parts(stored) == file_parts(last_sent[row.sop_instance_uid])
            syntaxes.add(row.transfer_syntax_uid)
    assert len(syntaxes) >= 8  # implicit, explicit, big endian, deflated, JPEG, JPEG-LS, J2K, RLE

    matches, final = find(server, QueryRetrieveLevel="STUDY", **{k: "" for k in STUDY_KEYS})
    assert final == status.SUCCESS
    assert len(matches) == len(expected)  # one response per study, not per instance
    assert {m.StudyInstanceUID: study_counts(m) for m in matches} == expected
    for m in matches:
        assert m.QueryRetrieveLevel == "STUDY"
        assert "SpecificCharacterSet" in m
        assert {e.keyword for e in m} == {*STUDY_KEYS, "QueryRetrieveLevel", "SpecificCharacterSet",
                                          "RetrieveAETitle"}
        assert m.RetrieveAETitle == server.ae_title  # PS3.4 C.4.1.1.3.2: where to retrieve from

    responses = findscu_study(dcmtk, server, tmp_path / "rsp")
    assert {r.StudyInstanceUID: study_counts(r) for r in responses} == expected

    # matching through findscu: a modality, a name with a wildcard, a date range
    ct = findscu_study(dcmtk, server, tmp_path / "ct", "-k", "ModalitiesInStudy=CT",
                       "-k", "PatientName=doe*", "-k", "StudyDate=20240101-20241231")
    doe = {ds.StudyInstanceUID for ds in synthetic if ds.PatientName == "Doe^John"}
    assert {r.StudyInstanceUID for r in ct} == doe
    # every modality of a matched study comes back, not only the one asked for
    assert set().union(*(values(r.ModalitiesInStudy) for r in ct)) == {"CT", "MR", "OT"}


def test_latin1_names_come_back_intact(server: Running, dcmtk: Callable[..., Any],
                                       tmp_path: Path) -> None:
    ds = make_ds(PatientName="Müller^Jürgen", SpecificCharacterSet="ISO_IR 100")
    assoc = associate(server)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    [match], final = find(server, QueryRetrieveLevel="STUDY", PatientName="MULLER*",
                          SpecificCharacterSet="ISO_IR 192")
    assert match.PatientName == "Müller^Jürgen"
    [rsp] = findscu_study(dcmtk, server, tmp_path / "rsp", "-k", "PatientName=Mul*")
    assert rsp.PatientName == "Müller^Jürgen"


def test_four_associations_store_into_one_study_at_once(
        server: Running, dcmtk: Callable[..., Any], tmp_path: Path) -> None:
    """Four DCMTK ``storescu`` at once, into two series of one study: every instance
    stored, the counters exact. (Four pynetdicom clients in this process, as this test had,
    lose a response now and then to pynetdicom's own reactor: pydicom/pynetdicom#875.)"""
    study = uid()
    series = [uid(), uid()]
    per_association = 25
    datasets: list[list[Dataset]] = [
        [make_ds(StudyInstanceUID=study, SeriesInstanceUID=series[(t + i) % 2],
                 Modality="CT" if (t + i) % 2 == 0 else "MR",
                 SOPClassUID=CTImageStorage if (t + i) % 2 == 0 else MRImageStorage)
         for i in range(per_association)]
        for t in range(4)
    ]
    # the first instance of each series is stored first so the series' modality is known
    first = [datasets[0][0], datasets[0][1]]
    assoc = associate(server)
    for ds in first:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()

    commands = [["-aec", server.ae_title, "127.0.0.1", str(server.port),
                 *[str(save(ds, tmp_path / f"a{t}" / f"{i}.dcm"))
                   for i, ds in enumerate(datasets[t])]] for t in range(4)]
    outputs: list[str] = []
    errors: list[BaseException] = []

    def send(args: list[str]) -> None:
        try:
            proc = dcmtk("storescu", "-v", *args)
            outputs.append(proc.stdout + proc.stderr)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(args,)) for args in commands]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors
    assert [out.count("Received Store Response (Success)") for out in outputs] == \
        [per_association] * 4
    matches, _ = find(server, QueryRetrieveLevel="STUDY", StudyInstanceUID=study,
                      NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="",
                      ModalitiesInStudy="", SOPClassesInStudy="")
    assert [study_counts(m) for m in matches] == [
        (2, 4 * per_association, {"CT", "MR"}, {CTImageStorage, MRImageStorage})]


def test_duplicate_policy_reject_over_the_network(start_server: Callable[..., Running]) -> None:
    running = start_server(**{"storage.on_duplicate": "reject"})
    ds = make_ds()
    other = make_ds(SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=ds.StudyInstanceUID,
                    SeriesInstanceUID=ds.SeriesInstanceUID, SeriesDescription="changed")
    assoc = associate(running)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assert assoc.send_c_store(ds).Status == status.SUCCESS  # an identical resend
    rsp = assoc.send_c_store(other)
    assert rsp.Status == status.DUPLICATE_SOP_INSTANCE
    assoc.release()
    [match], _ = find(running, QueryRetrieveLevel="STUDY", NumberOfStudyRelatedInstances="")
    assert int(match.NumberOfStudyRelatedInstances) == 1


def _raw_file(tmp_path: Path, name: str, meta_sop_class: str, sop_instance: str,
              data: bytes) -> Path:
    """A file whose File Meta is valid and whose data set is ``data`` (sent undecoded)."""
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(data)
    return path


@pytest.mark.parametrize(("case", "expected"), [
    ("garbage", status.STORE_CANNOT_UNDERSTAND),
    ("truncated", status.STORE_CANNOT_UNDERSTAND),
    ("no_study_uid", status.STORE_CANNOT_UNDERSTAND),
    ("sop_class_mismatch", status.STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS),
])
def test_bad_input_gets_a_failure_and_the_server_keeps_serving(
        server: Running, tmp_path: Path, case: str, expected: int) -> None:
    ds = make_ds(PatientComments="x" * 400)
    if case == "garbage":
        path = _raw_file(tmp_path, "g.dcm", CTImageStorage, ds.SOPInstanceUID,
                         bytes(range(256)) * 4)
    elif case == "truncated":
        path = _raw_file(tmp_path, "t.dcm", CTImageStorage, ds.SOPInstanceUID, encode(ds)[:350])
    elif case == "no_study_uid":
        path = _raw_file(tmp_path, "n.dcm", CTImageStorage, ds.SOPInstanceUID,
                         encode(make_ds(SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=None)))
    else:
        path = _raw_file(tmp_path, "m.dcm", MRImageStorage, ds.SOPInstanceUID, encode(ds))
    ae = client_ae(storage=False)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = associate(server, ae)
    with raw_sending():
        rsp = assoc.send_c_store(path)
    assert rsp.Status == expected
    assert rsp.ErrorComment  # the reason travels to the sender
    assert assoc.send_c_echo().Status == status.SUCCESS  # the same association still works
    # and a good instance still goes in
    assert assoc.send_c_store(make_ds()).Status == status.SUCCESS
    assoc.release()
    matches, _ = find(server, QueryRetrieveLevel="STUDY", NumberOfStudyRelatedInstances="")
    assert [int(m.NumberOfStudyRelatedInstances) for m in matches] == [1]


@pytest.mark.parametrize(("keys", "model", "comment"), [
    ({"PatientName": "x"}, StudyRootQueryRetrieveInformationModelFind, "QueryRetrieveLevel"),
    ({"QueryRetrieveLevel": "PATIENT"}, StudyRootQueryRetrieveInformationModelFind,
     "not part of the STUDY_ROOT"),
    ({"QueryRetrieveLevel": "STUDY", "SeriesInstanceUID": "1.2"},
     StudyRootQueryRetrieveInformationModelFind, "below the query level"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
     PatientRootQueryRetrieveInformationModelFind, "PatientID must hold a single value"),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "2024-2025-2026"},
     StudyRootQueryRetrieveInformationModelFind, "malformed range"),
    # PS3.5 Table 6.2-1: a DA is a date of the calendar, a TM a time of the clock
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20241345"},
     StudyRootQueryRetrieveInformationModelFind, "malformed DA value '20241345'"),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20240230"},
     StudyRootQueryRetrieveInformationModelFind, "malformed DA value '20240230'"),
    ({"QueryRetrieveLevel": "STUDY", "StudyDate": "20240101-20240230"},
     StudyRootQueryRetrieveInformationModelFind, "malformed DA range"),
    ({"QueryRetrieveLevel": "STUDY", "StudyTime": "2500"},
     StudyRootQueryRetrieveInformationModelFind, "malformed TM value"),
])
def test_invalid_identifier_gets_a900_with_a_comment(server: Running, keys: dict[str, str],
                                                     model: Any, comment: str) -> None:
    q = Dataset()
    for k, v in keys.items():
        setattr(q, k, v)
    assoc = associate(server)
    [(rsp, identifier)] = list(assoc.send_c_find(q, model))
    assert rsp.Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert comment in rsp.ErrorComment
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()


def test_unsupported_lower_level_keys_give_pending_warning(server: Running) -> None:
    assoc = associate(server)
    assert assoc.send_c_store(make_ds()).Status == status.SUCCESS
    assoc.release()
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.Modality = "CT"
    q.InstitutionName = ""
    assoc = associate(server)
    codes = [int(s.Status) for s, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()
    assert codes == [status.PENDING_WARNING, status.SUCCESS]


def _fill(running: Running, level: str, n: int) -> Dataset:
    """Store ``n`` entities of ``level`` (each its own patient, study, series or instance
    under one parent) and return a query that matches them all."""
    study, series = uid(), uid()
    for i in range(n):
        keys: dict[str, Any] = {"PatientID": f"P{i:04d}"}
        if level in ("SERIES", "IMAGE"):
            keys = {"PatientID": "P", "StudyInstanceUID": study}
        if level == "IMAGE":
            keys["SeriesInstanceUID"] = series
        running.archive.store(encode(make_ds(**keys)), ExplicitVRLittleEndian)
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.PatientID = "P" if level in ("SERIES", "IMAGE") else ""
    if level in ("SERIES", "IMAGE"):
        q.StudyInstanceUID = study
        q.SeriesInstanceUID = series if level == "IMAGE" else ""
    if level == "IMAGE":
        q.SOPInstanceUID = ""
    return q


def _hold_after_first_match(running: Running) -> None:
    """Make the server's C-FIND pause after its first match until a C-CANCEL has arrived,
    so the test does not race the client (a poll with a deadline, not a fixed sleep)."""
    original = running.archive._matches  # behind find and find_encoded

    def matches(parsed: Any, cancelled: Any) -> Iterator[Any]:
        rows = original(parsed, cancelled)
        yield next(rows)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                assoc.dimse.cancel_req for assoc in running.server.ae.active_associations):
            time.sleep(0.005)
        yield from rows

    running.archive._matches = matches  # type: ignore[method-assign]


@pytest.mark.parametrize(("level", "model"), [
    ("PATIENT", PatientRootQueryRetrieveInformationModelFind),
    ("STUDY", StudyRootQueryRetrieveInformationModelFind),
    ("SERIES", PatientRootQueryRetrieveInformationModelFind),
    ("IMAGE", StudyRootQueryRetrieveInformationModelFind),
])
def test_c_cancel_stops_the_stream(start_server: Callable[..., Running],
                                   dcmtk: Callable[..., Any], level: str, model: Any) -> None:
    server = start_server(**{"storage.durability": "relaxed"})
    q = _fill(server, level, 300)
    _hold_after_first_match(server)
    assoc = associate(server)
    responses = assoc.send_c_find(q, model, msg_id=7)
    codes = []
    for rsp, _ in responses:
        codes.append(int(rsp.Status))
        if len(codes) == 1:
            cx = assoc._get_valid_context(model, "", "scu")
            assoc.send_c_cancel(7, cx.context_id)
    assert codes[0] == status.PENDING
    assert codes[-1] == status.CANCEL
    assert len(codes) < 300
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    if level != "STUDY":
        return
    # DCMTK's findscu --cancel sends C-CANCEL after the first response
    proc = dcmtk("findscu", "-v", "-S", "-aec", server.ae_title, "--cancel", "1", "-k",
                 "QueryRetrieveLevel=STUDY", "-k", "PatientID", "127.0.0.1", str(server.port))
    log = proc.stdout + proc.stderr
    assert "Received Final Find Response (Cancel" in log, log[-2000:]
    assert log.count("(Pending)") < 300


def test_restart_on_the_same_data_gives_the_same_answers(
        start_server: Callable[..., Running], tmp_path: Path) -> None:
    first = start_server(tmp_path / "same")
    datasets = hierarchy()
    assoc = associate(first)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    keys = {"QueryRetrieveLevel": "STUDY", **{k: "" for k in STUDY_KEYS}}
    before, _ = find(first, **keys)
    first.server.stop(grace=5)
    second = start_server(tmp_path / "same")
    after, final = find(second, **keys)
    assert final == status.SUCCESS
    assert [m.to_json_dict() for m in after] == [m.to_json_dict() for m in before]
    assert {m.StudyInstanceUID: study_counts(m) for m in after} == expected_table(datasets)


def test_unwritable_file_store_answers_out_of_resources(server: Running) -> None:
    # a regular file where the store's temporary folder should be: every write fails
    tmp = server.data_dir / "files" / "tmp"
    tmp.rmdir()
    tmp.write_text("in the way")
    assoc = associate(server)
    rsp = assoc.send_c_store(make_ds())
    assert rsp.Status == status.STORE_OUT_OF_RESOURCES
    assert "cannot write" in rsp.ErrorComment
    assert assoc.send_c_echo().Status == status.SUCCESS
    assoc.release()
    matches, final = find(server, QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    assert (matches, final) == ([], status.SUCCESS)


def test_stop_lets_a_store_in_flight_finish_and_refuses_new_associations(
        server: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = hold(monkeypatch, server.archive, "store")
    result: list[int] = []
    assoc = associate(server)
    sender = threading.Thread(target=lambda: result.append(int(assoc.send_c_store(make_ds()).Status)))
    sender.start()
    assert entered.wait(30)
    port = server.port
    stopper = threading.Thread(target=server.server.stop, kwargs={"grace": 30})
    stopper.start()
    deadline = time.monotonic() + 30
    refused = False
    ae = client_ae(storage=False)
    ae.acse_timeout = ae.network_timeout = 2
    while time.monotonic() < deadline and not refused:  # poll until the listener is gone
        probe = ae.associate("127.0.0.1", port, ae_title=server.ae_title)
        refused = not probe.is_established
        if probe.is_established:
            probe.release()
    assert refused, "new associations are still accepted while stopping"
    assert stopper.is_alive()  # still waiting for the store in flight
    release.set()
    sender.join(30)
    stopper.join(30)
    assert result == [status.SUCCESS]
    assert not stopper.is_alive()


def test_accepted_connections_have_nagle_off(server: Running) -> None:
    import socket

    assoc = associate(server)
    [acceptor] = server.server.ae.active_associations
    sock = acceptor.dul.socket.socket  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assoc.release()


def test_a_stored_date_not_of_the_calendar_is_kept_as_written(server: Running) -> None:
    """Only query values are checked against the calendar: a stored StudyDate 20240230 is
    indexed as written, found by a range around it, and is not an empty value."""
    ds = make_ds(StudyDate="20240230")
    assoc = associate(server)
    assert assoc.send_c_store(ds).Status == status.SUCCESS
    assoc.release()
    matches, final = find(server, QueryRetrieveLevel="STUDY", StudyDate="20240201-20240301",
                          StudyInstanceUID="")
    assert final == status.SUCCESS
    assert [m.StudyInstanceUID for m in matches] == [ds.StudyInstanceUID]
    matches, final = find(server, QueryRetrieveLevel="STUDY", StudyDate='""',
                          StudyInstanceUID="")
    assert final == status.SUCCESS
    assert matches == []
