"""STOW-RS (PS3.18 10.5) against a real server: dicomweb-client and raw HTTP bodies in,
C-FIND and C-MOVE out; the response module, the HTTP statuses of PS3.18 Table 10.5.3-1, and
bodies that are cut short, too large, stalled or not DICOM."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import shutil
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage

from scp import status
from tests.conftest import associate, find
from tests.factory import encode, make_ds, uid
from tests.test_hostile import index_rows
from tests.test_move import STUDY_ROOT, Peer, c_move, start_peer  # noqa: F401  (a fixture)
from tests.web.conftest import WebRunning
from web.multipart import PartReader

BOUNDARY = "minipacs-test-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
DICOM_JSON = "application/dicom+json"

# PS3.18 Table I.2-2 / PS3.4 B.2.3 / PS3.7 C codes, as a client reads them
CANNOT_UNDERSTAND = 0xC000
STUDY_DOES_NOT_MATCH = 0xA901
DUPLICATE_SOP_INSTANCE = 0x0111
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
ELEMENTS_DISCARDED = 0xB006  # PS3.18 Table I.2-1
OUT_OF_RESOURCES = 0xA700


# -- helpers --------------------------------------------------------------------------------

def part10(ds: Dataset) -> bytes:
    """``ds`` as a DICOM Part 10 file (preamble, File Meta, Explicit VR Little Endian)."""
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def body(*parts: bytes, close: bool = True, part_type: str = "application/dicom") -> bytes:
    """A multipart/related body of ``parts`` (RFC 2046 5.1.1); without its closing
    delimiter when ``close`` is false."""
    out = b"".join(f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
                   for p in parts)
    return out + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def post(web: WebRunning, content: Any, path: str = "/studies", **headers: str) -> httpx.Response:
    headers.setdefault("Content-Type", CONTENT_TYPE)
    return httpx.post(f"{web.url}{path}", content=content, headers=headers, timeout=60)


def stored(web: WebRunning) -> set[str]:
    """SOP Instance UIDs in the index."""
    return {row[0] for row in index_rows(web.dicom, "SELECT sop_instance_uid FROM instance")}


def spooled(web: WebRunning) -> list[Path]:
    """STOW-RS spool files left in the store's temporary folder."""
    return sorted(web.archive.spool_folder().glob("web-*"))


def items(answer: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    """A sequence of a DICOM JSON answer (``tag`` as 8 hex digits)."""
    return list(answer.get(tag, {}).get("Value", []))


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value", [])
    return values[0] if values else None


REFERENCED = "00081199"  # ReferencedSOPSequence
FAILED = "00081198"  # FailedSOPSequence
RETRIEVE_URL = "00081190"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SOP_CLASS = "00081150"  # ReferencedSOPClassUID
SOP_INSTANCE = "00081155"  # ReferencedSOPInstanceUID


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {answer!r}"
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection inside the body"
        rest += chunk
    return head + b"\r\n\r\n" + rest


def one_study(count: int, **keywords: Any) -> list[Dataset]:
    study = uid()
    series = [uid(), uid()]
    return [make_ds(StudyInstanceUID=study, SeriesInstanceUID=series[i % 2], **keywords)
            for i in range(count)]


# -- dicomweb-client: STOW-RS in, C-FIND and C-MOVE out ---------------------------------------

def test_dicomweb_client_stores_then_c_find_counts_and_c_move_gives_the_bytes_back(
        start_web: Callable[..., WebRunning],
        start_peer: Callable[..., Peer]) -> None:  # noqa: F811  (the fixture imported above)
    peer = start_peer()
    web = start_web(peers=[peer.entry()])
    first, second = one_study(3), one_study(2, SOPClassUID=MRImageStorage, Modality="MR")
    client = DICOMwebClient(url=web.url)

    answer = client.store_instances(first + second)

    assert "FailedSOPSequence" not in answer
    assert answer.RetrieveURL in ("", None)  # two studies: no one study to name (Type 2)
    sent = {ds.SOPInstanceUID: ds for ds in first + second}
    assert sorted(item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence) == \
        sorted(sent)
    for item in answer.ReferencedSOPSequence:
        ds = sent[item.ReferencedSOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (f"{web.url}/studies/{ds.StudyInstanceUID}/series/"
                                    f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
        assert "WarningReason" not in item

    for study in (first, second):  # the counters C-STORE keeps, kept by STOW-RS too
        matches, final = find(web.dicom, QueryRetrieveLevel="STUDY",
                              StudyInstanceUID=study[0].StudyInstanceUID,
                              NumberOfStudyRelatedInstances="", NumberOfStudyRelatedSeries="")
        assert final == status.SUCCESS
        assert [(int(m.NumberOfStudyRelatedInstances), int(m.NumberOfStudyRelatedSeries))
                for m in matches] == [(len(study), 2)]

    responses = c_move(web.dicom, STUDY_ROOT, peer.ae_title, QueryRetrieveLevel="STUDY",
                       StudyInstanceUID=first[0].StudyInstanceUID)
    assert responses[-1].Status == status.SUCCESS
    assert sorted(peer.received) == sorted((encode(ds), ExplicitVRLittleEndian) for ds in first)


def test_a_study_target_fails_the_instances_of_other_studies(web: WebRunning) -> None:
    """PS3.18 Table 10.5.1-1: ``/studies/{study}`` takes that study's instances only; the
    others fail (A901) and are not stored, and the answer is 202 (Table 10.5.3-1)."""
    mine, other = one_study(2), make_ds()
    study = mine[0].StudyInstanceUID
    client = DICOMwebClient(url=web.url)

    answer = client.store_instances([mine[0], other, mine[1]], study_instance_uid=study)

    assert answer.RetrieveURL == f"{web.url}/studies/{study}"
    assert [i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence] == \
        [mine[0].SOPInstanceUID, mine[1].SOPInstanceUID]
    [failed] = answer.FailedSOPSequence
    assert (failed.ReferencedSOPClassUID, failed.ReferencedSOPInstanceUID,
            failed.FailureReason) == (CTImageStorage, other.SOPInstanceUID, STUDY_DOES_NOT_MATCH)
    assert stored(web) == {ds.SOPInstanceUID for ds in mine}

    response = post(web, body(part10(make_ds())), path=f"/studies/{study}")
    assert response.status_code == 409  # none stored (PS3.18 Table 10.5.3-1)
    assert response.headers["content-type"] == DICOM_JSON
    [failed_item] = items(response.json(), FAILED)
    assert value(failed_item, FAILURE_REASON) == STUDY_DOES_NOT_MATCH
    assert REFERENCED not in response.json()
    assert len(stored(web)) == 2


# -- raw bodies -----------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", [
    f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    f"multipart/related; type=application/dicom; boundary={BOUNDARY}",  # OHIF's form
    f'Multipart/Related; boundary="{BOUNDARY}"; type="application/dicom"',
])
def test_quoted_and_unquoted_type_are_both_taken(web: WebRunning, content_type: str) -> None:
    ds = make_ds()
    response = post(web, body(part10(ds)), **{"Content-Type": content_type})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == DICOM_JSON
    answer = response.json()
    assert value(answer, RETRIEVE_URL) == f"{web.url}/studies/{ds.StudyInstanceUID}"
    [item] = items(answer, REFERENCED)
    assert (value(item, SOP_CLASS), value(item, SOP_INSTANCE)) == (CTImageStorage,
                                                                   ds.SOPInstanceUID)
    assert stored(web) == {ds.SOPInstanceUID}


def test_a_non_dicom_part_fails_alone_and_the_others_are_stored(web: WebRunning) -> None:
    good = [make_ds(), make_ds()]
    content = (body(part10(good[0]), close=False) + body(b"this is not DICOM", close=False)
               + body(b"{}", close=False, part_type="application/json")
               + body(part10(good[1])))
    response = post(web, content)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert [value(i, SOP_INSTANCE) for i in items(answer, REFERENCED)] == \
        [ds.SOPInstanceUID for ds in good]
    failed = items(answer, FAILED)
    assert [(value(i, SOP_CLASS), value(i, SOP_INSTANCE), value(i, FAILURE_REASON))
            for i in failed] == [(None, None, CANNOT_UNDERSTAND)] * 2
    assert stored(web) == {ds.SOPInstanceUID for ds in good}


def test_a_damaged_instance_is_named_in_its_failure(web: WebRunning) -> None:
    """A Part 10 file whose data set is cut short fails C000, named by its UIDs."""
    ds = make_ds()
    response = post(web, body(part10(ds)[:-10]))
    assert response.status_code == 409
    [item] = items(response.json(), FAILED)
    assert (value(item, SOP_INSTANCE), value(item, FAILURE_REASON)) == (ds.SOPInstanceUID,
                                                                        CANNOT_UNDERSTAND)
    assert stored(web) == set()


def test_a_transfer_syntax_c_store_would_not_accept_fails_c122(web: WebRunning) -> None:
    ds = make_ds()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.1"  # private, unknown
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    response = post(web, body(out.getvalue()))
    assert response.status_code == 409
    [item] = items(response.json(), FAILED)
    assert (value(item, SOP_INSTANCE), value(item, FAILURE_REASON)) == (
        ds.SOPInstanceUID, TRANSFER_SYNTAX_NOT_SUPPORTED)
    assert stored(web) == set()


def test_a_body_without_its_closing_boundary_stores_the_parts_before_the_cut(
        web: WebRunning) -> None:
    first, cut = make_ds(), make_ds()
    content = body(part10(first), close=False) + body(part10(cut), close=False)[:-200]
    response = post(web, content)
    assert response.status_code == 202, response.text
    assert "ends inside part 2" in response.headers["warning"]
    answer = response.json()
    assert [value(i, SOP_INSTANCE) for i in items(answer, REFERENCED)] == [first.SOPInstanceUID]
    assert [value(i, FAILURE_REASON) for i in items(answer, FAILED)] == [CANNOT_UNDERSTAND]
    assert stored(web) == {first.SOPInstanceUID}

    response = post(web, body(part10(make_ds()), close=False)[:-50])
    assert response.status_code == 400
    assert response.text.strip() == ("the body ends inside part 1: no closing boundary;"
                                     " nothing stored")
    assert stored(web) == {first.SOPInstanceUID}


@pytest.mark.parametrize("content", [b"", f"--{BOUNDARY}--\r\n".encode(), b"garbage\r\n"],
                         ids=["empty", "no-part", "not-multipart"])
def test_a_body_without_parts_is_400(web: WebRunning, content: bytes) -> None:
    response = post(web, content)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.count("\n") == 1 and response.text.strip()


def test_malformed_part_headers_are_400_and_the_parts_before_stay_stored(web: WebRunning) -> None:
    first = make_ds()
    headers = "".join(f"X-Header-{i}: {i}\r\n" for i in range(9))  # python-multipart's limit: 8
    content = body(part10(first), close=False) + (
        f"--{BOUNDARY}\r\n{headers}\r\n").encode() + part10(make_ds()) + b"\r\n"
    response = post(web, content)
    assert response.status_code == 400
    assert response.text.strip() == (f"malformed multipart body in part 2 (RFC 2046 5.1.1,"
                                     f" boundary '{BOUNDARY}'): Maximum header count exceeded;"
                                     " 1 instance before it stored")
    assert stored(web) == {first.SOPInstanceUID}


def test_a_client_that_leaves_mid_part_stores_the_parts_before_and_leaves_no_spool(
        web: WebRunning) -> None:
    first, cut = make_ds(), make_ds(PixelData=bytes(3 * 1024 * 1024), Rows=1024, Columns=1536)
    content = body(part10(first), part10(cut))
    sent = content[:len(content) - 1024 * 1024]  # the second part (spooled: > 1 MB) cut
    with socket.create_connection(("127.0.0.1", web.web.port)) as sock:
        sock.sendall((f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type:"
                      f" {CONTENT_TYPE}\r\nContent-Length: {len(content)}\r\n\r\n").encode())
        sock.sendall(sent)
        wait_for(lambda: first.SOPInstanceUID in stored(web), "the first part to be stored")
        wait_for(lambda: bool(spooled(web)), "the cut part to be spooled")
    wait_for(lambda: not spooled(web), "the cut part's spool file to be removed")
    assert stored(web) == {first.SOPInstanceUID}


def test_a_client_that_stalls_gets_408_and_its_part_is_dropped(web: WebRunning) -> None:
    """All the client ever sends goes out in one ``send`` (part 2, spooled past a 64 KB
    in-memory limit, fits the socket's buffer): a pause of the client, however long, cannot
    make the timeout fire anywhere but where the body stops, in part 2."""
    web.web.app.state.stow_idle_timeout = 0.5
    web.web.app.state.stow_in_memory_up_to = 64 * 1024
    first, cut = make_ds(), make_ds(PixelData=bytes(256 * 1024), Rows=256, Columns=512)
    content = body(part10(first), part10(cut))
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type:"
            f" {CONTENT_TYPE}\r\nContent-Length: {len(content)}\r\n\r\n").encode()
    sent = head + content[:len(content) - 4096]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * len(sent))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", web.web.port))
        assert sock.send(sent) == len(sent)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"no body bytes for 0.5 s in part 2; that part is not stored" in answer
    assert stored(web) == {first.SOPInstanceUID}
    assert spooled(web) == []


def test_a_declared_length_over_the_limit_is_413_before_anything_is_read(
        start_web: Callable[..., WebRunning]) -> None:
    web = start_web(**{"web.max_request_mb": 1})
    content = body(part10(make_ds()), part10(make_ds(PixelData=bytes(1024 * 1024),
                                                     Rows=512, Columns=1024)))
    response = post(web, content)
    assert response.status_code == 413
    assert response.text.strip() == (f"a body of {len(content) / 2**20:.1f} MB exceeds"
                                     " web.max_request_mb (1 MB); nothing stored")
    assert stored(web) == set()


def test_a_chunked_body_over_the_limit_is_413_and_the_part_that_crosses_it_is_not_stored(
        start_web: Callable[..., WebRunning]) -> None:
    web = start_web(**{"web.max_request_mb": 1})
    first, big = make_ds(), make_ds(PixelData=bytes(1024 * 1024), Rows=512, Columns=1024)
    content = body(part10(first), part10(big), part10(make_ds()))

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer coding
        for at in range(0, len(content), 64 * 1024):
            yield content[at:at + 64 * 1024]

    response = post(web, chunks())
    assert response.status_code == 413
    assert response.text.strip() == ("the body exceeds web.max_request_mb (1 MB) in part 2;"
                                     " 1 instance before it stored")
    assert stored(web) == {first.SOPInstanceUID}
    wait_for(lambda: not spooled(web), "no spool file left")


@pytest.mark.parametrize(("content_type", "code", "reason"), [
    (None, 415, "STOW-RS takes multipart/related; type=\"application/dicom\", not 'no Content-Type'"),
    ("application/dicom", 415, "STOW-RS takes multipart/related; type=\"application/dicom\", not 'application/dicom'"),
    (f"multipart/form-data; boundary={BOUNDARY}", 415, "STOW-RS takes multipart/related"),
    (f"multipart/related; boundary={BOUNDARY}", 415, "not type='nothing'"),
    (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415,
     "(metadata and bulk data parts are not supported)"),
    ('multipart/related; type="application/dicom"', 400, "the Content-Type names no boundary"),
    (f'multipart/related; type="application/dicom"; boundary={"b" * 300}', 400,
     "unusable multipart boundary: Boundary length 300 exceeds maximum of 256"),
])
def test_a_wrong_content_type_is_refused_with_a_reason(web: WebRunning, content_type: str | None,
                                                       code: int, reason: str) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(f"{web.url}/studies", content=body(part10(make_ds())),
                          headers=headers)
    assert response.status_code == code
    assert reason in response.text
    assert stored(web) == set()


def test_accept_chooses_the_answer_type(web: WebRunning) -> None:
    response = post(web, body(part10(make_ds())), Accept="application/json")
    assert (response.status_code, response.headers["content-type"]) == (200, "application/json")
    response = post(web, body(part10(make_ds())),
                    Accept="application/dicom+xml, application/dicom+json;q=0.5")
    assert (response.status_code, response.headers["content-type"]) == (200, DICOM_JSON)
    ds = make_ds()
    response = post(web, body(part10(ds)), Accept="application/dicom+xml")
    assert response.status_code == 406  # refused before the body is read
    assert ds.SOPInstanceUID not in stored(web)


def test_a_bad_study_uid_in_the_path_is_400(web: WebRunning) -> None:
    response = post(web, body(part10(make_ds())), path="/studies/1.2.abc")
    assert response.status_code == 400
    assert response.text.strip() == "study is not a valid UID: '1.2.abc'"


def duplicate_pair() -> tuple[Dataset, Dataset]:
    """An instance, and another with its SOP Instance UID but other content."""
    ds = make_ds()
    changed = make_ds(SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID=ds.StudyInstanceUID,
                      SeriesInstanceUID=ds.SeriesInstanceUID, PatientName="Other^Name")
    return ds, changed


def test_a_duplicate_is_refused_0111_under_on_duplicate_reject(
        start_web: Callable[..., WebRunning]) -> None:
    """``storage.on_duplicate: reject``: 409 with 0111 (PS3.7 C); the same bytes again are a
    resend, a plain success."""
    ds, changed = duplicate_pair()
    web = start_web(**{"storage.on_duplicate": "reject"})
    assert post(web, body(part10(ds))).status_code == 200
    assert post(web, body(part10(ds))).status_code == 200
    response = post(web, body(part10(changed)))
    assert response.status_code == 409
    [item] = items(response.json(), FAILED)
    assert (value(item, SOP_CLASS), value(item, SOP_INSTANCE), value(item, FAILURE_REASON)) == (
        CTImageStorage, ds.SOPInstanceUID, DUPLICATE_SOP_INSTANCE)
    matches, _ = find(web.dicom, QueryRetrieveLevel="STUDY", StudyInstanceUID=ds.StudyInstanceUID,
                      PatientName="", NumberOfStudyRelatedInstances="")
    assert [(str(m.PatientName), int(m.NumberOfStudyRelatedInstances)) for m in matches] == [
        ("Doe^John", 1)]


def test_a_duplicate_kept_under_on_duplicate_keep_is_the_same_warning_over_both_faces(
        start_web: Callable[..., WebRunning]) -> None:
    """``storage.on_duplicate: keep``: the stored instance stays, and both front ends say
    so with one Warning, B006 Elements Discarded (PS3.4 B.2.3 / PS3.18 Table I.2-1): STOW-RS
    as the WarningReason of the sent instance, status 202; C-STORE as its status, with an
    ErrorComment. An identical resend stays a plain success."""
    ds, changed = duplicate_pair()
    web = start_web(**{"storage.on_duplicate": "keep"})
    assert post(web, body(part10(ds))).status_code == 200
    assert post(web, body(part10(ds))).status_code == 200  # an identical resend
    response = post(web, body(part10(changed)))
    assert response.status_code == 202
    [item] = items(response.json(), REFERENCED)
    assert (value(item, SOP_INSTANCE), value(item, WARNING_REASON)) == (ds.SOPInstanceUID,
                                                                        ELEMENTS_DISCARDED)
    assoc = associate(web.dicom)
    try:
        changed.PatientName = "Third^Name"
        rsp = assoc.send_c_store(changed)
    finally:
        assoc.release()
    assert (rsp.Status, rsp.ErrorComment) == (ELEMENTS_DISCARDED, "other content is stored"
                                              " under this UID; it is kept")
    matches, _ = find(web.dicom, QueryRetrieveLevel="STUDY", StudyInstanceUID=ds.StudyInstanceUID,
                      PatientName="", NumberOfStudyRelatedInstances="")
    assert [(str(m.PatientName), int(m.NumberOfStudyRelatedInstances)) for m in matches] == [
        ("Doe^John", 1)]


def test_a_large_part_is_stored_in_bounded_memory(web: WebRunning) -> None:
    """A 50 MB part goes through a spool file: the memory Python allocates meanwhile (the
    server runs in this process) stays a small fraction of it."""
    size = 50 * 1024 * 1024
    ds = make_ds(Rows=5120, Columns=5120, PixelData=None)
    head = part10(ds) + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little")
    block = bytes(1024 * 1024)

    def chunks() -> Iterator[bytes]:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
        for _ in range(size // len(block)):
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    tracemalloc.start()
    try:
        response = post(web, chunks())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    assert peak < size / 5, f"peak {peak / 2**20:.1f} MB of Python memory for a 50 MB part"
    [(file_size,)] = index_rows(web.dicom, "SELECT file_size FROM instance")
    assert file_size > size
    assert spooled(web) == []


def big_part_body(web: WebRunning, size: int, before: bytes, after: bytes,
                  seen: list[int]) -> Iterator[bytes]:
    """A body of the parts ``before``, one Part 10 file of ``size`` bytes of pixel data sent
    256 KB at a time, and the parts ``after``; while the big part is sent, ``seen`` gets
    the size of the largest spool file in the store's temporary folder (the server runs in
    this process) at each step."""
    ds = make_ds(Rows=size // 2048, Columns=1024, PixelData=None)
    if before:  # (an empty chunk would end a chunked body)
        yield before
    yield (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part10(ds)
           + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
    block = bytes(256 * 1024)
    for _ in range(size // len(block)):
        yield block
        seen.append(max((path.stat().st_size for path in spooled(web)), default=0))
    yield b"\r\n" + after


def test_a_part_over_max_instance_mb_is_refused_a700_without_being_spooled_whole(
        start_web: Callable[..., WebRunning]) -> None:
    """``storage.max_instance_mb``: a part is dropped as soon as it passes the limit (A700);
    its spool file never grows past it, is removed, and the parts after it are stored."""
    web = start_web(**{"storage.max_instance_mb": 1})
    small = [make_ds(), make_ds()]
    seen: list[int] = []
    content = big_part_body(web, 20 * 1024 * 1024, body(part10(small[0]), close=False),
                            body(part10(small[1])), seen)
    response = post(web, content)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert [value(i, SOP_INSTANCE) for i in items(answer, REFERENCED)] == \
        [ds.SOPInstanceUID for ds in small]
    assert [value(i, FAILURE_REASON) for i in items(answer, FAILED)] == [OUT_OF_RESOURCES]
    assert stored(web) == {ds.SOPInstanceUID for ds in small}
    assert max(seen) < 2 * 1024 * 1024, f"a spool of {max(seen) / 2**20:.1f} MB"
    assert spooled(web) == []


def test_a_part_whose_spool_would_cross_min_free_disk_mb_is_refused_a700_as_it_arrives(
        start_web: Callable[..., WebRunning], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """``storage.min_free_disk_mb`` binds a spool file as it grows (the reservation of the
    stores in flight): with a floor above the disk's free space, the part is refused when it
    would first be spooled, not once it has been spooled whole."""
    floor_mb = shutil.disk_usage(tmp_path).free // 2**20 + 1024  # never met
    web = start_web(**{"storage.min_free_disk_mb": floor_mb})
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="minipacs.web.stow"):
        response = post(web, big_part_body(web, 8 * 1024 * 1024, b"",
                                           f"--{BOUNDARY}--\r\n".encode(), seen))
    assert response.status_code == 409, response.text
    assert [value(i, FAILURE_REASON) for i in items(response.json(), FAILED)] == \
        [OUT_OF_RESOURCES]
    assert "part 1 refused (A700): cannot spool part 1: disk almost full" in caplog.text
    assert max(seen) == 0, f"a spool of {max(seen) / 2**20:.1f} MB"
    assert spooled(web) == []


def index_fds(web: WebRunning) -> int:
    """File descriptors this process (the server runs in it) holds on the SQLite index."""
    index = Path(web.archive.options.index_url.removeprefix("sqlite:///")).resolve()
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            count += Path(os.readlink(fd)) == index
    return count


def test_stow_requests_give_their_index_connections_back(web: WebRunning) -> None:
    """Each worker thread that stored a part gives its index connection back to the pool
    (storage/index.py) after each chunk, as QIDO-RS does after each batch: the connections
    open are at most as many as the requests served at once, however many threads the
    threadpool has used, and each one is taken again rather than opened anew."""
    before = index_fds(web)
    at_once = 3
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        answers = list(pool.map(lambda _: post(web, body(part10(make_ds()), part10(make_ds()))),
                                range(24)))
    assert [response.status_code for response in answers] == [200] * 24
    assert index_fds(web) <= before + at_once


def test_the_body_is_parsed_and_spooled_off_the_event_loop(
        start_web: Callable[..., WebRunning]) -> None:
    """The multipart parser and its spool writes block: they run in worker threads, never
    on the event loop's thread (which a 400 MB upload otherwise keeps from the other
    requests). Every thread the server starts is watched with a profile function."""
    feed = PartReader.feed.__code__
    feeders: set[int] = set()

    def watch(frame: FrameType, event: str, _: object) -> None:
        if event == "call" and frame.f_code is feed:
            feeders.add(threading.get_ident())

    threading.setprofile(watch)  # type: ignore[arg-type]  (threads started from now on)
    try:
        web = start_web()
        response = post(web, body(part10(make_ds()), part10(make_ds(
            PixelData=bytes(2 * 1024 * 1024), Rows=1024, Columns=1024))))
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    [loop] = [t for t in threading.enumerate() if t.name == "minipacs-web"]
    assert response.status_code == 200, response.text
    assert feeders, "the parser was never called"
    assert loop.ident not in feeders


def test_dicomweb_client_sees_409_as_an_error(web: WebRunning) -> None:
    client = DICOMwebClient(url=web.url)
    with pytest.raises(requests.HTTPError, match="409"):
        client.store_instances([make_ds()], study_instance_uid=uid())
