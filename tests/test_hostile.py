"""Hostile input (issue 5, "Bad input"): malformed data sets, UIDs that try path traversal,
huge values, bad character sets, SOP classes that do not match the context, C-FIND
identifiers with garbage, and malformed PDUs, all through the real network.

Data sets, commands and PDUs are hand-made and sent on a raw socket by :class:`Peer`, so
every byte on the wire is the test's; pynetdicom checks afterwards that the server still
answers. Each case asserts

- the exact answer: a DIMSE status (C000, A900, C001, ...), an A-ABORT or an
  A-ASSOCIATE-RJ;
- for a refused instance, that nothing was written: no file in ``<data_dir>/files`` and no
  index row (row counts and study counters unchanged);
- that no file appeared outside ``<data_dir>`` (the data folder sits three levels below a
  folder of the test's own, which is watched as a whole, and the absolute paths the UIDs
  aim at are checked);
- that the server still answers a C-ECHO and stores a valid instance afterwards.

The connection-level cases (oversized, unknown or undecodable PDUs, stalled peers, port
probes) pin the guards of scp/engine/guards.py, which pynetdicom 3.0 needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sqlite3
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from scp import status
from scp.engine import reactor
from scp.server import Server
from tests.conftest import Running, record_returns, server_config
from tests.factory import encode, file_parts, make_ds, uid

# hostile values make pydicom warn by design
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# answers that are not a DIMSE status
AC = "A-ASSOCIATE-AC"
RJ = "A-ASSOCIATE-RJ"
ABORT = "A-ABORT"
CLOSED = "connection closed without a PDU"
SILENT = "no answer"
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: AC, 3: RJ, 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: ABORT}

ESCAPE = f"minipacs-escape-{os.getpid()}"
"""The name every path traversal aims at; no file of that name may appear anywhere."""

C000 = status.STORE_CANNOT_UNDERSTAND
A900 = status.STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS
C001 = status.UNABLE_TO_PROCESS

# --------------------------------------------------------------------------------------
# Encoding by hand: explicit VR little endian elements, implicit VR commands, PDUs
# --------------------------------------------------------------------------------------

LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT",
                      "UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def element(tag: int, vr: str, value: bytes = b"", *, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the length field."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    n = len(value) if length is None else length
    if vr in LONG_VRS:
        return tag_bytes(tag) + vr.encode() + b"\0\0" + struct.pack("<L", n) + value
    return tag_bytes(tag) + vr.encode() + struct.pack("<H", n) + value


def marker(tag: int, length: int = 0) -> bytes:
    """An item or delimiter header (no VR)."""
    return tag_bytes(tag) + struct.pack("<L", length)


def sequence(tag: int, body: bytes, *, closed: bool = True) -> bytes:
    """An undefined-length sequence holding one undefined-length item with ``body``;
    ``closed=False`` leaves out both delimiters."""
    out = element(tag, "SQ", length=UNDEFINED) + marker(ITEM, UNDEFINED) + body
    return out + marker(ITEM_END) + marker(SEQUENCE_END) if closed else out


def nested(depth: int, tag: int = 0x00091010) -> bytes:
    """``depth`` sequences, each the only element of its parent's item."""
    out = b""
    for _ in range(depth):
        out = sequence(tag, out)
    return out


def top_level(data: bytes) -> dict[int, tuple[int, int, int]]:
    """tag -> (start, value start, end) of each top-level element of an explicit VR little
    endian data set with defined lengths (what :func:`tests.factory.encode` writes)."""
    out, pos = {}, 0
    while pos < len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        vr = data[pos + 4:pos + 6].decode()
        if vr in LONG_VRS:
            (n,) = struct.unpack_from("<L", data, pos + 8)
            value = pos + 12
        else:
            (n,) = struct.unpack_from("<H", data, pos + 6)
            value = pos + 8
        out[group << 16 | elem] = (pos, value, value + n)
        pos = value + n
    return out


def insert_before(data: bytes, tag: int | None, blob: bytes) -> bytes:
    """``blob`` inserted before the top-level element ``tag`` (at the end for ``None``)."""
    at = len(data) if tag is None else top_level(data)[tag][0]
    return data[:at] + blob + data[at:]


def set_length(data: bytes, tag: int, length: int) -> bytes:
    """The length field of top-level element ``tag`` rewritten, nothing else changed."""
    start, value, _ = top_level(data)[tag]
    field = struct.pack("<L" if value - start == 12 else "<H", length)
    return data[:value - len(field)] + field + data[value:]


def replace_value(data: bytes, tag: int, value: bytes) -> bytes:
    """The value of top-level element ``tag`` replaced by ``value`` (padded, length fixed)."""
    start, _, end = top_level(data)[tag]
    vr = data[start + 4:start + 6].decode()
    return data[:start] + element(tag, vr, value) + data[end:]


def cut(data: bytes, tag: int, offset: int) -> bytes:
    """``data`` cut ``offset`` bytes after the start of top-level element ``tag``."""
    return data[:top_level(data)[tag][0] + offset]


PIXEL_DATA = 0x7FE00010


def image() -> bytes:
    """A valid CT instance, explicit VR little endian, ending with its pixel data."""
    return encode(make_ds())


def header_only() -> bytes:
    """A valid CT instance without pixel data."""
    return encode(make_ds(PixelData=None))


def cmd_element(elem: int, value: bytes) -> bytes:
    """A command element (group 0000, implicit VR little endian)."""
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HHL", 0, elem, len(value)) + value


def command(*elements: tuple[int, bytes]) -> bytes:
    """A command set: the elements and their group length."""
    body = b"".join(cmd_element(e, v) for e, v in sorted(elements))
    return cmd_element(0x0000, struct.pack("<L", len(body))) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return command((0x0002, sop_class.encode()), (0x0100, us(0x0001)), (0x0110, us(message_id)),
                   (0x0700, us(0)), (0x0800, us(0x0000)), (0x1000, sop_instance.encode()))


def c_echo_rq(message_id: int = 1) -> bytes:
    return command((0x0002, VERIFICATION.encode()), (0x0100, us(0x0030)),
                   (0x0110, us(message_id)), (0x0800, us(0x0101)))


def c_find_rq(model: str = STUDY_ROOT_FIND, message_id: int = 1) -> bytes:
    return command((0x0002, model.encode()), (0x0100, us(0x0020)), (0x0110, us(message_id)),
                   (0x0700, us(0)), (0x0800, us(0x0000)))


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def ul_item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def uid_bytes(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def associate_rq(contexts: list[tuple[str, list[str]]], *, called: str = "MINIPACS",
                 calling: str = "HOSTILE", max_pdu: int = 65536, version: int = 1) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (IDs 1, 3, 5, ...)."""
    body = (struct.pack(">HH", version, 0) + called.encode().ljust(16)
            + calling.encode().ljust(16) + bytes(32))
    body += ul_item(0x10, APPLICATION_CONTEXT.encode())
    for n, (abstract, syntaxes) in enumerate(contexts):
        sub = ul_item(0x30, uid_bytes(abstract))
        sub += b"".join(ul_item(0x40, uid_bytes(ts)) for ts in syntaxes)
        body += ul_item(0x20, bytes([2 * n + 1, 0, 0, 0]) + sub)
    user = ul_item(0x51, struct.pack(">L", max_pdu))
    user += ul_item(0x52, uid_bytes("1.2.826.0.1.3680043.8.498.1"))
    return pdu(0x01, body + ul_item(0x50, user))


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """A P-DATA-TF PDU with one PDV (control: 1 command, 2 last fragment)."""
    return pdu(0x04, struct.pack(">LBB", len(data) + 2, context_id, control) + data)


# --------------------------------------------------------------------------------------
# A raw peer
# --------------------------------------------------------------------------------------


@dataclass
class Reply:
    """The answer to one request: ``outcome`` is the final DIMSE status, or the name of what
    came instead (:data:`ABORT`, :data:`CLOSED`, :data:`SILENT`, ...)."""

    outcome: int | str
    comment: str = ""
    pending: int = 0
    abort_source: int | None = None


class Peer:
    """A DICOM upper layer peer on a raw socket that sends exactly the bytes it is given."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # no Nagle: a command and its data set go out as separate PDUs at once
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted: dict[str, int] = {}  # abstract syntax -> presentation context ID
        self.last_pdu: tuple[int, bytes] | None = None
        self.cut_off: OSError | None = None  # the server closed while we were sending

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        """Send ``data``. A server that aborts may close before all of it is sent (EPIPE,
        ECONNRESET): that is kept in :attr:`cut_off` for the test to weigh against the
        server's own verdict, and what the server sent before closing is still read."""
        if self.cut_off is not None:
            return
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.cut_off = exc

    def _exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)

    def read_pdu(self) -> tuple[int, bytes]:
        """The next PDU (type, body); EOFError when the server closed, TimeoutError."""
        pdu_type, _, length = struct.unpack(">BBL", self._exactly(6))
        self.last_pdu = (pdu_type, self._exactly(length))
        return self.last_pdu

    def answer(self, timeout: float | None = None) -> str:
        """The name of the next PDU, :data:`CLOSED` or :data:`SILENT`."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            pdu_type, _ = self.read_pdu()
        except EOFError:
            return CLOSED
        except TimeoutError:
            return SILENT
        except ConnectionResetError:
            return CLOSED
        return PDU_NAMES.get(pdu_type, f"PDU type {pdu_type:#04x}")

    def associate(self, contexts: list[tuple[str, list[str]]], called: str = "MINIPACS") -> None:
        """Associate, proposing ``contexts``; fails unless the server accepts."""
        self.send(associate_rq(contexts, called=called))
        name = self.answer()
        assert name == AC, f"association not accepted: {name}"
        assert self.last_pdu is not None
        body, pos = self.last_pdu[1], 68
        while pos < len(body):
            item_type, _, n = struct.unpack_from(">BBH", body, pos)
            if item_type == 0x21 and body[pos + 6] == 0:  # accepted presentation context
                context_id = body[pos + 4]
                self.accepted[contexts[(context_id - 1) // 2][0]] = context_id
            pos += 4 + n

    def request(self, context_id: int, cmd: bytes, data: bytes | None = None,
                fragment: int = 16000) -> None:
        """Send one DIMSE message: the command, then the data set in fragments."""
        self.send(p_data(context_id, 0x03, cmd))
        if data is not None:
            pieces = [data[i:i + fragment] for i in range(0, len(data), fragment)] or [b""]
            for i, piece in enumerate(pieces):
                self.send(p_data(context_id, 0x02 if i == len(pieces) - 1 else 0x00, piece))

    def reply(self, timeout: float | None = None) -> Reply:
        """Read responses up to the final one (Pending ones are counted)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        pending = 0
        while True:
            cmd = b""
            while True:
                try:
                    pdu_type, body = self.read_pdu()
                except (EOFError, ConnectionResetError):
                    return Reply(CLOSED, pending=pending)
                except TimeoutError:
                    return Reply(SILENT, pending=pending)
                if pdu_type != 0x04:
                    source = body[2] if pdu_type == 0x07 and len(body) == 4 else None
                    return Reply(PDU_NAMES.get(pdu_type, str(pdu_type)), pending=pending,
                                 abort_source=source)
                last, pos = False, 0
                while pos < len(body):
                    (n,) = struct.unpack_from(">L", body, pos)
                    if body[pos + 5] & 0x01:
                        cmd += body[pos + 6:pos + 4 + n]
                        last = last or bool(body[pos + 5] & 0x02)
                    pos += 4 + n
                if last:
                    break
            rsp = read_dataset(BytesIO(cmd), True, True)
            code = int(rsp.Status)
            if code in status.PENDING_CODES:
                pending += 1
                continue
            return Reply(code, str(rsp.get("ErrorComment", "")), pending)

    def release(self) -> str:
        self.send(pdu(0x05, bytes(4)))
        return self.answer()


# --------------------------------------------------------------------------------------
# The server, what it holds, and the checks every case ends with
# --------------------------------------------------------------------------------------


def running_server(root: Path, **overrides: Any) -> Running:
    """A server whose data folder is ``root/deep/er/data``: a traversal of up to three
    levels out of it still lands inside ``root``, which :func:`snapshot` watches."""
    data_dir = root / "deep" / "er" / "data"
    config = server_config(data_dir, **overrides)
    server = Server(config)
    server.start()
    return Running(server, config, data_dir)


class Shared:
    """The module's server, on one data folder; stopped while a test runs a server of its
    own (a process holds one index at a time) and started again on the same folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: Running | None = None

    def start(self) -> Running:
        if self.running is None:
            self.running = running_server(self.root, **{"ae.max_associations": 256,
                                                        "ae.acse_timeout": 5})
        return self.running

    def stop(self) -> None:
        if self.running is not None:
            self.running.server.stop(grace=5)
            self.running = None


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    holder = Shared(tmp_path_factory.mktemp("hostile"))
    yield holder
    holder.stop()


@pytest.fixture
def pacs(shared: Shared) -> Running:
    """The server the corpus shares (each case checks what changed, so they can)."""
    return shared.start()


@pytest.fixture
def own_server(shared: Shared, tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """``own_server(**config_overrides)``: a server of the test's own, stopped at the end."""
    shared.stop()
    started: list[Running] = []

    def start(**overrides: Any) -> Running:
        started.append(running_server(tmp_path, **overrides))
        return started[-1]

    yield start
    for running in started:
        running.server.stop(grace=5)


@dataclass(frozen=True)
class Snapshot:
    files: frozenset[str]
    rows: tuple[Any, ...]
    outside: frozenset[str]


_KEY_PATH = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}$")
_STORE_OWN = re.compile(r"^(tmp/[^/]+|\.[A-Za-z0-9_.-]+)$")  # temporary files, the lock files


def instance_files(files: frozenset[str]) -> list[str]:
    """The files of a :class:`Snapshot` that hold instances (named by their key)."""
    return [f for f in files if _KEY_PATH.match(f)]


def index_rows(running: Running, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of the server's SQLite index, read on a connection of our own."""
    path = running.data_dir / "index.sqlite"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def snapshot(running: Running) -> Snapshot:
    files_dir = running.data_dir / "files"
    files = frozenset(str(p.relative_to(files_dir)) for p in files_dir.rglob("*") if p.is_file())
    strays = [f for f in files if not _KEY_PATH.match(f) and not _STORE_OWN.match(f)]
    assert not strays, f"files the store did not name: {strays}"
    rows = tuple(index_rows(running, sql)[0] for sql in (
        "SELECT count(*), coalesce(sum(num_instances), 0) FROM patient",
        "SELECT count(*), coalesce(sum(num_instances), 0), coalesce(sum(num_series), 0)"
        " FROM study",
        "SELECT count(*), coalesce(sum(num_instances), 0) FROM series",
        "SELECT count(*) FROM instance",
    ))
    root = running.data_dir.parents[2]
    outside = frozenset(str(p) for p in root.rglob("*")
                        if running.data_dir not in (p, *p.parents))
    return Snapshot(files, rows, outside)


def assert_nothing_escaped(running: Running, before: Snapshot) -> None:
    """No file appeared outside the data folder, and nothing anywhere is called ESCAPE."""
    after = snapshot(running)
    assert after.outside == before.outside, f"written outside the data folder: " \
        f"{sorted(after.outside - before.outside)}"
    places = [running.data_dir.parents[2], Path("/tmp"), Path("/"), Path.cwd(),
              Path.cwd().parent]
    for place in places:
        found = [str(p) for p in place.glob(f"*{ESCAPE}*")]
        assert not found, f"path traversal wrote {found}"
    assert not list(running.data_dir.parents[2].rglob(f"*{ESCAPE}*"))


def assert_nothing_written(running: Running, before: Snapshot) -> None:
    after = snapshot(running)
    assert after.files == before.files, "a refused instance left a file: " \
        f"{sorted(after.files ^ before.files)}"
    assert after.rows == before.rows, "a refused instance changed the index"
    assert_nothing_escaped(running, before)


def small_ae() -> AE:
    ae = AE(ae_title="AFTERWARDS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT, [EXPLICIT])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [IMPLICIT])
    return ae


def stored_bytes(running: Running, sop_instance_uid: str) -> bytes:
    """The data set bytes the store holds for ``sop_instance_uid`` (its index row's file)."""
    rows = index_rows(running, "SELECT file_key FROM instance WHERE sop_instance_uid = ?",
                      sop_instance_uid)
    assert len(rows) == 1, f"{sop_instance_uid!r} has {len(rows)} index rows"
    path = running.archive.files.path(rows[0][0])
    return file_parts(path)[0]


def assert_serving(running: Running) -> None:
    """The server answers a C-ECHO and stores (and indexes) a valid instance."""
    assoc = small_ae().associate("127.0.0.1", running.port, ae_title=running.ae_title)
    assert assoc.is_established, "the server no longer accepts an association"
    try:
        assert assoc.send_c_echo().Status == status.SUCCESS
        ds = make_ds()
        assert assoc.send_c_store(ds).Status == status.SUCCESS
    finally:
        assoc.release()
    assert stored_bytes(running, ds.SOPInstanceUID) == encode(ds)


def assert_aborted(peer: Peer, answer: str, caplog: pytest.LogCaptureFixture,
                   because: str = "aborted") -> None:
    """The server aborted the association: the A-ABORT was read, or, when the server closed
    before all we sent was taken (:attr:`Peer.cut_off`) and took the A-ABORT down with the
    connection, its log says it aborted (``because`` is in its words)."""
    if answer == ABORT:
        return
    assert peer.cut_off is not None and answer == CLOSED, f"expected A-ABORT, got {answer}"
    words = [r.getMessage() for r in caplog.records if r.name.startswith("scp.")]
    assert any("aborted" in w and because in w for w in words), (
        f"sending failed ({peer.cut_off!r}) and the server did not log an abort: {words}")


def assert_refused(reply: Reply, expected: int) -> None:
    assert reply.outcome == expected, (
        f"expected {expected:#06x}, got "
        f"{reply.outcome if isinstance(reply.outcome, str) else hex(reply.outcome)}"
        f" {reply.comment!r}")
    assert reply.comment, "a failure status carries an ErrorComment with the reason"


def store_raw(running: Running, data: bytes, *, context: str = CT, syntax: str = EXPLICIT,
              sop_class: str | None = None, sop_instance: str = "1.2.826.0.1.3680043.8.498.7",
              timeout: float = 60) -> Reply:
    """One C-STORE with hand-made bytes on a fresh association (released afterwards)."""
    with Peer(running.port, timeout) as peer:
        peer.associate([(context, [syntax])], called=running.ae_title)
        peer.request(peer.accepted[context], c_store_rq(sop_class or context, sop_instance),
                     data)
        reply = peer.reply()
        if isinstance(reply.outcome, int):
            assert peer.release() == "A-RELEASE-RP"
        return reply


def find_raw(running: Running, identifier: bytes, *, syntax: str = EXPLICIT,
             timeout: float = 60) -> Reply:
    """One C-FIND (Study Root) with a hand-made identifier."""
    with Peer(running.port, timeout) as peer:
        peer.associate([(STUDY_ROOT_FIND, [syntax])], called=running.ae_title)
        peer.request(peer.accepted[STUDY_ROOT_FIND], c_find_rq(), identifier)
        reply = peer.reply()
        if isinstance(reply.outcome, int):
            assert peer.release() == "A-RELEASE-RP"
        return reply


def xfail(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


# --------------------------------------------------------------------------------------
# C-STORE: data sets that must be refused
# --------------------------------------------------------------------------------------








def _nested_after_pixel_data(depth: int) -> bytes:
    return image() + element(0x7FE10010, "SQ", length=UNDEFINED) + nested(depth)[12:]


@dataclass(frozen=True)
class StoreCase:
    build: Callable[[], bytes]
    expected: int
    context: str = CT
    syntax: str = EXPLICIT
    sop_class: str | None = None


def _store_case(case_id: str, build: Callable[[], bytes], expected: int, *,
                defect: str | None = None, **kw: Any) -> Any:
    marks = [xfail(defect)] if defect else []
    return pytest.param(StoreCase(build, expected, **kw), id=case_id, marks=marks)


REFUSED_DATA_SETS = [
    # truncated
    _store_case("truncated-inside-the-pixel-data", lambda: image()[:-10], C000),
    _store_case("truncated-before-the-uids", lambda: image()[:100], C000),
    _store_case("empty", lambda: b"", C000),
    _store_case("four-zero-bytes", lambda: bytes(4), C000),
    _store_case("truncated-after-the-pixel-data-header", lambda: cut(image(), PIXEL_DATA, 12),
                C000),
    _store_case("truncated-inside-an-element-header", lambda: cut(image(), 0x00280100, 3), C000),
    _store_case("truncated-after-a-tag", lambda: cut(image(), 0x00280100, 4), C000),
    _store_case("truncated-inside-the-pixel-data-header", lambda: cut(image(), PIXEL_DATA, 6),
                C000),
    _store_case("truncated-inside-a-value", lambda: cut(header_only(), 0x00280004, 13), C000),
    # wrong explicit lengths
    _store_case("pixel-data-length-beyond-the-end",
                lambda: set_length(image(), PIXEL_DATA, 0xFFFFFFF0), C000),
    _store_case("pixel-data-length-odd", lambda: set_length(image(), PIXEL_DATA, 31), C000),
    _store_case("length-swallows-the-uids",
                lambda: set_length(image(), 0x00081030, 0xFFF0), C000),
    _store_case("length-beyond-the-end-before-pixel-data",
                lambda: set_length(image(), 0x00280103, 0x0800), C000),
    _store_case("length-beyond-the-end-without-pixel-data",
                lambda: set_length(header_only(), 0x00280103, 0x0100), C000),
    _store_case("sequence-length-beyond-the-end", lambda: header_only() + element(
        0x00400275, "SQ", marker(ITEM, 14) + element(0x00081150, "UI", b"1.2.3"), length=1000),
        C000),
    _store_case("item-length-beyond-the-end", lambda: header_only() + element(
        0x00400275, "SQ", marker(ITEM, 1000) + element(0x00081150, "UI", b"1.2.3")),
        C000),
    # undefined-length items that never end
    _store_case("sequence-never-ends", lambda: header_only() + sequence(
        0x00400275, element(0x00081150, "UI", b"1.2.3"), closed=False), C000),
    _store_case("sequence-never-ends-before-pixel-data", lambda: insert_before(
        image(), 0x00100010,
        sequence(0x00091010, element(0x00091011, "LO", b"x"), closed=False)), C000),
    _store_case("item-never-ends-in-a-closed-sequence", lambda: header_only() + element(
        0x00400275, "SQ", length=UNDEFINED) + marker(ITEM, UNDEFINED)
        + element(0x00081150, "UI", b"1.2.3") + marker(SEQUENCE_END), C000),
    _store_case("encapsulated-pixel-data-never-ends", lambda: cut(image(), PIXEL_DATA, 0)
                + element(PIXEL_DATA, "OB", length=UNDEFINED) + marker(ITEM, 0)
                + marker(ITEM, 4) + b"abcd", C000),
    _store_case("sequences-nested-2000-deep", lambda: insert_before(
        header_only(), 0x00100010, nested(2000)), C000),
    _store_case("sequences-nested-2000-deep-after-the-pixel-data",
                lambda: _nested_after_pixel_data(2000), C000),
    _store_case("sequence-delimiter-at-top-level",
                lambda: header_only() + marker(SEQUENCE_END), C000),
    _store_case("item-delimiter-after-the-pixel-data", lambda: image() + marker(ITEM_END), C000),
    _store_case("item-delimiter-at-top-level", lambda: header_only() + marker(ITEM_END), C000),
    # garbage
    _store_case("random-bytes", lambda: bytes(range(256)) * 4, C000),
    _store_case("big-endian-bytes-on-a-little-endian-context",
                lambda: encode(make_ds(), "1.2.840.10008.1.2.2"), C000),
    _store_case("explicit-vr-bytes-on-an-implicit-vr-context", image, C000, syntax=IMPLICIT),
    _store_case("implicit-vr-bytes-on-an-explicit-vr-context",
                lambda: encode(make_ds(), IMPLICIT), C000),
    # SOP class and context
    _store_case("sop-class-uid-missing", lambda: encode(make_ds(SOPClassUID=None)), C000),
    _store_case("sop-class-uid-traversal", lambda: replace_value(
        image(), 0x00080016, f"../../../{ESCAPE}".encode()), C000),
    _store_case("data-set-mr-on-a-ct-request", lambda: encode(make_ds(SOPClassUID=MR)), A900),
    _store_case("mr-request-and-data-set-on-a-ct-context",
                lambda: encode(make_ds(SOPClassUID=MR)), A900, sop_class=MR),
    _store_case("ct-on-the-verification-context", lambda: encode(make_ds(), IMPLICIT), A900,
                context=VERIFICATION, syntax=IMPLICIT, sop_class=CT),
    _store_case("ct-on-a-c-find-context", image, A900, context=STUDY_ROOT_FIND, sop_class=CT),
]

BAD_UIDS = [
    ("parent-traversal", f"../../../../../../tmp/{ESCAPE}"),
    ("absolute-path", f"/tmp/{ESCAPE}"),
    ("dot-dot", ".."),
    ("traversal-after-digits", f"1.2.826/../../{ESCAPE}"),
    ("backslash-traversal", f"1.2.3\\..\\..\\{ESCAPE}"),
    ("65-characters", "1." + "2" * 63),
    ("10000-characters", "1.2." + "3" * 10000),
    ("letters", "1.2.abc"),
    ("nul-inside", "1.2.3\x004"),
    ("space-inside", "1.2.3 4"),
    ("newline-inside", "1.2.3\n4"),
    ("fullwidth-digit", "1.2.\uff13"),
    ("empty-component", "1..2"),
    ("minus-sign", "1.-2"),
]

UID_KEYWORDS = {"SOPInstanceUID": 0x00080018, "StudyInstanceUID": 0x0020000D,
                "SeriesInstanceUID": 0x0020000E}


@pytest.mark.parametrize("case", REFUSED_DATA_SETS)
def test_hostile_data_set_is_refused(pacs: Running, case: StoreCase) -> None:
    data = case.build()
    before = snapshot(pacs)
    reply = store_raw(pacs, data, context=case.context, syntax=case.syntax,
                      sop_class=case.sop_class)
    assert_refused(reply, case.expected)
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


@pytest.mark.parametrize("keyword", sorted(UID_KEYWORDS))
@pytest.mark.parametrize("value", [v for _, v in BAD_UIDS], ids=[i for i, _ in BAD_UIDS])
def test_uid_that_is_not_a_uid_is_refused(pacs: Running, keyword: str, value: str) -> None:
    data = replace_value(image(), UID_KEYWORDS[keyword], value.encode())
    before = snapshot(pacs)
    reply = store_raw(pacs, data, sop_instance=uid())
    assert_refused(reply, C000)
    assert keyword in reply.comment
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


@pytest.mark.parametrize("value", [
    pytest.param("1.2.3\n", id="trailing-newline"),
    pytest.param("\t1.2.3", id="leading-tab"),
    pytest.param(" 1.2.3", id="leading-space"),
])
def test_uid_with_surrounding_control_characters_is_refused(pacs: Running, value: str) -> None:
    value = value.replace("1.2.3", uid())
    data = replace_value(image(), 0x00080018, value.encode())
    before = snapshot(pacs)
    reply = store_raw(pacs, data, sop_instance=value.strip())
    assert_refused(reply, C000)
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


# --------------------------------------------------------------------------------------
# C-STORE: hostile but storable (Level 2 storage keeps what it is sent)
# --------------------------------------------------------------------------------------


def _with_charset(value: bytes, name: bytes = b"Doe^John") -> Callable[[], tuple[bytes, Dataset]]:
    """A data set whose SpecificCharacterSet is ``value`` and PatientName ``name`` (raw)."""
    def build() -> tuple[bytes, Dataset]:
        ds = make_ds()
        data = insert_before(encode(ds), 0x00080016, element(0x00080005, "CS", value))
        return replace_value(data, 0x00100010, name), ds
    return build


def _huge(syntax: str, **keywords: Any) -> Callable[[], tuple[bytes, Dataset]]:
    def build() -> tuple[bytes, Dataset]:
        ds = make_ds(**keywords)
        return encode(ds, syntax), ds
    return build


def _private_elements(count: int) -> Callable[[], tuple[bytes, Dataset]]:
    def build() -> tuple[bytes, Dataset]:
        ds = make_ds()
        blob = b"".join(element((0x0011 + 2 * (k // 4000)) << 16 | (0x1000 + k % 4000), "LO",
                                b"ab") for k in range(count))
        return insert_before(encode(ds), 0x0020000D, blob), ds
    return build


STORABLE = [
    pytest.param(_huge(IMPLICIT, StudyDescription="D" * (8 << 20)), IMPLICIT,
                 id="8-mb-study-description"),
    pytest.param(_huge(IMPLICIT, PatientID="P" * (1 << 20)), IMPLICIT, id="1-mb-patient-id"),
    pytest.param(_huge(EXPLICIT, EncapsulatedDocument=bytes(16 << 20)), EXPLICIT,
                 id="16-mb-ob-value"),
    pytest.param(_private_elements(20000), EXPLICIT, id="20000-private-elements"),
    pytest.param(_with_charset(b"ISO_IR 999"), EXPLICIT, id="unknown-character-set"),
    pytest.param(_with_charset(b"\x01\x02GARBAGE\x7f"), EXPLICIT,
                 id="character-set-with-control-characters"),
    pytest.param(_with_charset(b"ISO 2022 IR 6\\NONSENSE\\ISO 2022 IR 999"), EXPLICIT,
                 id="character-set-list-with-unknown-terms"),
    pytest.param(_with_charset(b"ISO_IR 192", b"D\xff\xfe^J\xc3"), EXPLICIT,
                 id="invalid-utf8-under-iso-ir-192"),
    pytest.param(_with_charset(b"ISO_IR 100\\" * 90 + b"ISO_IR 100"), EXPLICIT,
                 id="character-set-of-1000-bytes"),
]


@pytest.mark.parametrize(("build", "syntax"), STORABLE)
def test_hostile_but_storable_data_set_is_stored_as_sent(
        pacs: Running, build: Callable[[], tuple[bytes, Dataset]], syntax: str) -> None:
    """Level 2 storage: values beyond their VR's length, many elements and character sets
    we cannot decode are kept byte for byte (Success), indexed, and answered in C-FIND."""
    data, ds = build()
    before = snapshot(pacs)
    reply = store_raw(pacs, data, syntax=syntax, sop_instance=ds.SOPInstanceUID)
    assert reply.outcome == status.SUCCESS, reply
    assert stored_bytes(pacs, ds.SOPInstanceUID) == data
    assert_nothing_escaped(pacs, before)
    assert snapshot(pacs).rows[3][0] == before.rows[3][0] + 1
    # it is found, counted, and its name is answered whatever its character set
    assoc = small_ae().associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ds.StudyInstanceUID
    q.PatientName = ""
    q.NumberOfStudyRelatedInstances = ""
    responses = list(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    codes = [int(s.Status) for s, _ in responses]
    assert len(codes) == 2 and codes[0] in status.PENDING_CODES, codes
    assert codes[1] == status.SUCCESS
    assert int(responses[0][1].NumberOfStudyRelatedInstances) == 1
    assert_serving(pacs)


def test_traversal_in_the_command_uid_only_stores_under_the_data_sets_uid(pacs: Running) -> None:
    """The request's Affected SOP Instance UID is only a label; the data set's own UID is
    what the instance is stored and indexed under, and no path is made from either."""
    ds = make_ds()
    before = snapshot(pacs)
    reply = store_raw(pacs, encode(ds), sop_instance=f"../../../../../../tmp/{ESCAPE}")
    assert reply.outcome == status.SUCCESS
    assert stored_bytes(pacs, ds.SOPInstanceUID) == encode(ds)
    assert not index_rows(pacs, "SELECT 1 FROM instance WHERE sop_instance_uid LIKE ?",
                          f"%{ESCAPE}%")
    assert_nothing_escaped(pacs, before)
    assert_serving(pacs)


# --------------------------------------------------------------------------------------
# C-FIND identifiers with garbage
# --------------------------------------------------------------------------------------

QRL = 0x00080052


def el(tag: int, vr: str, value: bytes, syntax: str = EXPLICIT) -> bytes:
    """One element in ``syntax`` (implicit VR: 4-byte lengths, for values longer than an
    explicit short VR can hold)."""
    if syntax == EXPLICIT:
        return element(tag, vr, value)
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return tag_bytes(tag) + struct.pack("<L", len(value)) + value


def ident(*elements: bytes, level: bytes | None = b"STUDY", syntax: str = EXPLICIT) -> bytes:
    """An identifier: QueryRetrieveLevel ``level`` (none for ``None``) and ``elements``, in
    tag order."""
    parts = [*elements, *([el(QRL, "CS", level, syntax)] if level is not None else [])]
    return b"".join(sorted(parts, key=lambda e: struct.unpack_from("<HH", e)))




def _find_case(case_id: str, build: Callable[[], bytes], expected: int,
               syntax: str = EXPLICIT, defect: str | None = None) -> Any:
    return pytest.param(build, syntax, expected, id=case_id,
                        marks=[xfail(defect)] if defect else [])


GARBAGE_IDENTIFIERS = [
    _find_case("binary-garbage", lambda: bytes(range(1, 200)), A900),
    _find_case("empty", lambda: b"", A900),
    _find_case("level-with-nul-and-0xff", lambda: ident(level=b"STUDY\x00\xff"), A900),
    _find_case("unknown-level", lambda: ident(level=b"FOO"), A900),
    _find_case("patient-level-on-study-root", lambda: ident(level=b"PATIENT"), A900),
    _find_case("no-level", lambda: ident(el(0x00100020, "LO", b"PID1"), level=None), A900),
    _find_case("malformed-date-range",
               lambda: ident(el(0x00080020, "DA", b"2024-2025-2026")), A900),
    _find_case("binary-date", lambda: ident(el(0x00080020, "DA", b"\xff\xfe\x00\x01")), A900),
    _find_case("name-with-a-binary-vr", lambda: ident(el(0x00100010, "US", b"\x01\x00")),
               status.SUCCESS),
    _find_case("70000-byte-date", lambda: ident(el(0x00080020, "DA", b"2" * 70000, IMPLICIT),
                                                syntax=IMPLICIT), A900, IMPLICIT),
    _find_case("sequences-nested-2000-deep", lambda: ident(nested(2000, 0x00081032)), A900),
    _find_case("value-beyond-the-end",
               lambda: ident(el(0x00100020, "LO", b"PID1"))[:-2], A900),
    _find_case("unknown-character-set", lambda: ident(
        el(0x00080005, "CS", b"ISO_IR 999"), el(0x00100020, "LO", b"NOBODY")), status.SUCCESS),
    _find_case("4-mb-patient-id", lambda: ident(
        el(0x00100020, "LO", b"P" * (4 << 20), IMPLICIT), syntax=IMPLICIT), status.SUCCESS,
        IMPLICIT),
    _find_case("wildcard-bomb", lambda: ident(
        el(0x00081030, "LO", b"*a" * 4000 + b"*b", IMPLICIT), syntax=IMPLICIT),
        status.SUCCESS, IMPLICIT),
    _find_case("20000-uid-list", lambda: ident(
        el(0x0020000D, "UI", b"\\".join([b"1.2.3"] * 20000), IMPLICIT), syntax=IMPLICIT),
        status.SUCCESS, IMPLICIT),
    _find_case("traversal-uid", lambda: ident(
        el(0x0020000D, "UI", f"../../{ESCAPE}".encode())), status.SUCCESS),
]


@pytest.mark.parametrize(("build", "syntax", "expected"), GARBAGE_IDENTIFIERS)
def test_c_find_with_garbage_gets_a_clean_answer(pacs: Running, build: Callable[[], bytes],
                                                 syntax: str, expected: int) -> None:
    identifier = build()
    before = snapshot(pacs)
    started = time.monotonic()
    reply = find_raw(pacs, identifier, syntax=syntax)
    if expected == status.SUCCESS:
        assert reply.outcome == status.SUCCESS, reply
    else:
        assert_refused(reply, expected)
    assert time.monotonic() - started < 30, "the C-FIND took too long"
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
# retired Patient/Study Only models: pynetdicom serves them, minipacs has no model for them
PATIENT_STUDY_ONLY = {0x0020: "1.2.840.10008.5.1.4.1.2.3.1", 0x0010: "1.2.840.10008.5.1.4.1.2.3.3",
                      0x0021: "1.2.840.10008.5.1.4.1.2.3.2"}




def _q_request(field: int, sop_class: str) -> bytes:
    extra = [(0x0600, b"NOWHERE ")] if field == 0x0021 else []  # C-MOVE's Move Destination
    return command((0x0002, sop_class.encode()), (0x0100, us(field)), (0x0110, us(1)),
                   (0x0700, us(0)), (0x0800, us(0)), *extra)


@pytest.mark.parametrize(("field", "context", "sop_class"), [
    pytest.param(0x0020, STUDY_ROOT_FIND, PATIENT_STUDY_ONLY[0x0020],
                 id="c-find-patient-study-only"),
    pytest.param(0x0010, STUDY_ROOT_GET, PATIENT_STUDY_ONLY[0x0010],
                 id="c-get-patient-study-only"),
    pytest.param(0x0021, STUDY_ROOT_MOVE, PATIENT_STUDY_ONLY[0x0021],
                 id="c-move-patient-study-only"),
    pytest.param(0x0020, STUDY_ROOT_FIND, PATIENT_ROOT_FIND,
                 id="c-find-patient-root-on-study-root"),
])
def test_query_naming_another_model_than_its_context_is_refused(
        pacs: Running, field: int, context: str, sop_class: str) -> None:
    """Refused with A900 (the identifier does not match the context's SOP Class) or 0122
    (SOP Class not supported), with an ErrorComment; never pynetdicom's catch-all."""
    identifier = ident(el(0x00100020, "LO", b"PID1"), el(0x0020000D, "UI", b""))
    before = snapshot(pacs)
    with Peer(pacs.port) as peer:
        peer.associate([(context, [EXPLICIT])], called=pacs.ae_title)
        peer.request(peer.accepted[context], _q_request(field, sop_class), identifier)
        reply = peer.reply(timeout=30)
    assert reply.outcome in (A900, 0x0122), reply
    assert reply.comment
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


# --------------------------------------------------------------------------------------
# Malformed PDUs
# --------------------------------------------------------------------------------------


def _rq(**kw: Any) -> bytes:
    return associate_rq([(VERIFICATION, [IMPLICIT])], **kw)


def _rq_item_edit(find: bytes, edit: Callable[[bytearray, int], None]) -> bytes:
    """The Verification A-ASSOCIATE-RQ with ``edit`` applied where ``find`` starts."""
    raw = bytearray(_rq())
    edit(raw, raw.index(find))
    return bytes(raw)


def _set(offset: int, value: bytes) -> Callable[[bytearray, int], None]:
    def edit(raw: bytearray, at: int) -> None:
        raw[at + offset:at + offset + len(value)] = value
    return edit


def _unknown_item() -> bytes:
    body = _rq()[6:]
    at = 68 + 4 + len(APPLICATION_CONTEXT)  # after the fixed part and the application context
    return pdu(0x01, body[:at] + ul_item(0x99, b"xyz!") + body[at:])


def _rq_that_raises_in_an_action() -> bytes:
    """An A-ASSOCIATE-RQ that decodes, but whose conversion to a primitive raises inside
    pynetdicom's state machine action (AE-6): a User Identity sub-item of type 9."""
    body = struct.pack(">HH", 1, 0) + b"MINIPACS".ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
    body += ul_item(0x10, APPLICATION_CONTEXT.encode())
    body += ul_item(0x20, bytes([1, 0, 0, 0]) + ul_item(0x30, uid_bytes(VERIFICATION))
                    + ul_item(0x40, uid_bytes(IMPLICIT)))
    identity = ul_item(0x58, bytes([9, 0]) + struct.pack(">H", 3) + b"bob" + struct.pack(">H", 0))
    user = (ul_item(0x51, struct.pack(">L", 65536))
            + ul_item(0x52, uid_bytes("1.2.826.0.1.3680043.8.498.1")) + identity)
    return pdu(0x01, body + ul_item(0x50, user))


TLS_CLIENT_HELLO = (bytes.fromhex("160301002f") + bytes.fromhex("0100002b0303") + bytes(32)
                    + bytes.fromhex("000002002f0100"))



PRE_ASSOCIATION = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: minipacs\r\n\r\n", {ABORT}, id="http-request"),
    pytest.param(TLS_CLIENT_HELLO, {ABORT}, id="tls-client-hello"),
    pytest.param(pdu(0x01, b""), {ABORT}, id="associate-rq-without-body"),
    pytest.param(pdu(0x01, _rq()[6:16]), {ABORT}, id="associate-rq-of-10-bytes"),
    pytest.param(_unknown_item(), {ABORT}, id="unknown-item-type"),
    pytest.param(_rq_item_edit(bytes([0x51, 0, 0, 4]), _set(3, b"\xc8")), {ABORT},
                 id="max-length-sub-item-with-wrong-length"),
    pytest.param(_rq_item_edit(bytes([0x30, 0]), _set(2, b"\0\0")), {ABORT},
                 id="empty-abstract-syntax"),
    pytest.param(_rq(called=""), {ABORT}, id="blank-called-ae-title"),
    pytest.param(_rq()[:10] + b"\x00\xff" * 8 + _rq()[26:], {ABORT},
                 id="binary-called-ae-title"),
    pytest.param(p_data(1, 0x03, c_echo_rq()), {ABORT}, id="p-data-first"),
    pytest.param(pdu(0x05, bytes(4)), {ABORT}, id="release-rq-first"),
    pytest.param(pdu(0x02, _rq()[6:]), {ABORT}, id="associate-ac-first"),
    pytest.param(associate_rq([(VERIFICATION, [])]), {ABORT, RJ},
                 id="context-without-transfer-syntax"),
    pytest.param(pdu(0x09, b"abcd"), {ABORT}, id="unknown-pdu-type-first"),
    pytest.param(_rq_that_raises_in_an_action(), {ABORT}, id="associate-rq-that-raises"),
]


@pytest.mark.parametrize(("data", "expected"), PRE_ASSOCIATION)
def test_malformed_pdu_before_association_is_rejected(
        pacs: Running, data: bytes, expected: set[str], request: pytest.FixtureRequest) -> None:
    before = snapshot(pacs)
    with Peer(pacs.port) as peer:
        peer.send(data)
        # an answer on loopback takes milliseconds: the known defects (xfail) wait only 3 s
        answer = peer.answer(timeout=3 if request.node.get_closest_marker("xfail") else 20)
    assert answer in expected
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


def test_unsupported_protocol_version_is_rejected_with_its_reason(pacs: Running) -> None:
    before = snapshot(pacs)
    with Peer(pacs.port) as peer:
        peer.send(_rq(version=2))
        assert peer.answer() == RJ
        assert peer.last_pdu is not None
        # PS3.8 9.3.4: rejected-permanent, DICOM UL service-provider (ACSE related),
        # protocol-version-not-supported
        assert tuple(peer.last_pdu[1][1:4]) == (1, 2, 2)
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


# the contexts every association below proposes, and the IDs they get
CONTEXTS = [(VERIFICATION, [IMPLICIT]), (CT, [EXPLICIT]), (STUDY_ROOT_FIND, [EXPLICIT])]
VER_ID, CT_ID, FIND_ID = 1, 3, 5


UNDECODABLE_COMMANDS = [
    pytest.param(b"\x01\x02\x03garbage!", id="garbage"),
    pytest.param(command((0x0002, VERIFICATION.encode()), (0x0110, us(1)),
                         (0x0800, us(0x0101))), id="no-command-field"),
    pytest.param(command((0x0002, VERIFICATION.encode()), (0x0100, us(0x7777)),
                         (0x0110, us(1)), (0x0800, us(0x0101))), id="unknown-command-field"),
]

ESTABLISHED = [
    pytest.param(lambda: pdu(0x09, b"abcd"), id="unknown-pdu-type"),
    pytest.param(lambda: pdu(0xFF, bytes(64)), id="pdu-type-0xff"),
    pytest.param(_rq, id="second-associate-rq"),
    pytest.param(lambda: pdu(0x02, _rq()[6:]), id="associate-ac"),
    pytest.param(lambda: pdu(0x04, struct.pack(">L", 100) + b"\x01\x03abc"),
                 id="pdv-longer-than-its-pdu"),
    pytest.param(lambda: pdu(0x04, struct.pack(">L", 0)), id="empty-pdv-item"),
    pytest.param(lambda: p_data(VER_ID, 0x02, b"abcd"), id="data-before-command"),
    pytest.param(lambda: p_data(99, 0x03, c_echo_rq()), id="unknown-context-id"),
    pytest.param(lambda: p_data(2, 0x03, c_echo_rq()), id="even-context-id"),
    pytest.param(lambda: p_data(CT_ID, 0x03, c_store_rq("1.2.3.4.5", uid()))
                 + p_data(CT_ID, 0x02, image()), id="unknown-sop-class"),
    pytest.param(lambda: p_data(CT_ID, 0x03, c_store_rq(f"../../{ESCAPE}", uid()))
                 + p_data(CT_ID, 0x02, image()), id="traversal-sop-class-in-the-command"),
    pytest.param(lambda: p_data(CT_ID, 0x03, c_find_rq()) + p_data(CT_ID, 0x02, ident()),
                 id="c-find-on-a-storage-context"),
    pytest.param(lambda: p_data(FIND_ID, 0x03, c_find_rq(CT)) + p_data(FIND_ID, 0x02, ident()),
                 id="c-find-naming-a-storage-sop-class"),
    *[pytest.param(lambda cmd=p.values[0]: p_data(VER_ID, 0x03, cmd),
                   id=f"command-{p.id}")
      for p in UNDECODABLE_COMMANDS],
]


def established(running: Running, timeout: float = 30) -> Peer:
    peer = Peer(running.port, timeout)
    peer.associate(CONTEXTS, called=running.ae_title)
    assert peer.accepted == {VERIFICATION: VER_ID, CT: CT_ID, STUDY_ROOT_FIND: FIND_ID}
    return peer


@pytest.mark.parametrize("build", ESTABLISHED)
def test_malformed_pdu_on_an_association_is_aborted(
        pacs: Running, build: Callable[[], bytes], caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot(pacs)
    with caplog.at_level(logging.WARNING, logger="scp"), established(pacs) as peer:
        peer.send(build())
        answer = peer.answer(timeout=10)
    assert_aborted(peer, answer, caplog)
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


def _spools() -> set[Path]:
    """pynetdicom's C-STORE spool files (NamedTemporaryFile(suffix=".dcm") in $TMPDIR)."""
    return set(Path(tempfile.gettempdir()).glob("tmp*.dcm"))


def test_a_store_cut_off_leaves_no_spool_file(pacs: Running) -> None:
    """The data set of a C-STORE larger than scp/engine/receiver.py keeps in memory goes to
    a temporary file as it arrives (pynetdicom's path, scp/engine/reactor.py); one whose
    association ends before the last fragment must not stay there."""
    from scp.engine.receiver import IN_MEMORY_UP_TO

    before = snapshot(pacs)
    spools = _spools()
    with established(pacs) as peer:
        peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, uid())))
        piece = 200_000  # under the server's maximum PDU length
        fragment = p_data(CT_ID, 0x00, (image() * (piece // 400 + 1))[:piece])
        for _ in range(IN_MEMORY_UP_TO // piece + 1):  # over the limit, none the last
            peer.send(fragment)
        deadline = time.monotonic() + 10
        while not _spools() - spools and time.monotonic() < deadline:
            time.sleep(0.01)  # the server has started its spool
        assert _spools() - spools, "no spool file appeared"
    deadline = time.monotonic() + 10  # the connection is closed: the server cleans up
    while _spools() - spools and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _spools() - spools
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


def test_a_small_store_cut_off_writes_nothing(pacs: Running) -> None:
    """A C-STORE read by scp/engine/receiver.py whose association ends before its last
    fragment: nothing stored, nothing left, the server still serving."""
    before = snapshot(pacs)
    with established(pacs) as peer:
        peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, uid())))
        peer.send(p_data(CT_ID, 0x00, image()[:200]))  # not the last fragment
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


def test_a_store_in_pdus_longer_than_the_read_ahead_is_stored_whole(pacs: Running) -> None:
    """scp/engine/receiver.py reads a PDU longer than its READ_AHEAD into a buffer of its
    own as it trickles in (its header and first bytes come with the command's PDU): the
    data set stored is the one sent, byte for byte."""
    from scp.engine.receiver import READ_AHEAD

    ds = make_ds(Rows=256, Columns=512, PixelData=bytes(range(256)) * 1024)
    data = encode(ds)
    half = len(data) // 2
    assert half > READ_AHEAD
    first = p_data(CT_ID, 0x00, data[:half])
    with established(pacs) as peer:
        peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, ds.SOPInstanceUID)) + first[:1000])
        for part in (first[1000:READ_AHEAD], first[READ_AHEAD:],
                     p_data(CT_ID, 0x02, data[half:])):
            peer.send(part)
        assert peer.reply(timeout=30).outcome == status.SUCCESS
        assert peer.release() == "A-RELEASE-RP"
    assert stored_bytes(pacs, ds.SOPInstanceUID) == data
    assert_serving(pacs)


@pytest.mark.parametrize("stored_first", [True, False], ids=["after-a-store", "at-once"])
def test_the_end_of_the_stream_ends_the_association(pacs: Running, stored_first: bool) -> None:
    """A peer that closes its sending side (EOF) once associated: the server sees the end
    and closes or aborts, rather than waiting on a socket that only ever reads as the end.
    After a C-STORE answered by scp/engine/receiver.py the DUL thread waits in
    scp/engine/reactor.py (which must hand the end to pynetdicom); at once, pynetdicom's
    loop may read it first."""
    with established(pacs) as peer:
        if stored_first:
            ds = make_ds()
            peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, ds.SOPInstanceUID))
                      + p_data(CT_ID, 0x02, encode(ds)))
            assert peer.reply(timeout=30).outcome == status.SUCCESS
        peer.sock.shutdown(socket.SHUT_WR)
        assert peer.answer(timeout=10) in (ABORT, CLOSED)
    assert_serving(pacs)


def test_a_store_arriving_across_the_idle_timeout_keeps_the_association(
        own_server: Callable[..., Running], monkeypatch: pytest.MonkeyPatch) -> None:
    """A C-STORE that begins shortly before the network timeout and arrives a PDU at a
    time, never that long without one: scp/engine/receiver.py restarts the idle timer at
    every PDU, as pynetdicom does, so the association is not aborted after its Success."""
    handed = record_returns(monkeypatch, reactor, "spooled")
    running = own_server(**{"ae.network_timeout": 2, "ae.acse_timeout": 2})
    ds = make_ds()
    data = encode(ds)
    with Peer(running.port) as peer:
        peer.associate(CONTEXTS, called=running.ae_title)
        time.sleep(1.5)  # idle, within the 2 s network timeout
        peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, ds.SOPInstanceUID)))
        for i in range(0, 400, 50):  # a PDU every 0.2 s: never 2 s without one
            time.sleep(0.2)
            peer.send(p_data(CT_ID, 0x00, data[i:i + 50]))
        peer.send(p_data(CT_ID, 0x02, data[400:]))
        assert peer.reply(timeout=10).outcome == status.SUCCESS
        peer.request(VER_ID, c_echo_rq(2))
        assert peer.reply(timeout=10).outcome == status.SUCCESS  # not aborted
        assert peer.release() == "A-RELEASE-RP"
    assert handed == [None]  # the receiver's, not pynetdicom's


def test_p_data_without_pdv_is_ignored(pacs: Running) -> None:
    """A P-DATA-TF with no PDV item carries nothing: it is ignored (an A-ABORT would be
    right too) and the association stays usable."""
    before = snapshot(pacs)
    with established(pacs) as peer:
        peer.send(pdu(0x04, b""))
        peer.request(VER_ID, c_echo_rq(7))
        assert peer.reply(timeout=10).outcome == status.SUCCESS
        assert peer.release() == "A-RELEASE-RP"
    assert_nothing_written(pacs, before)
    assert_serving(pacs)




def test_pdu_larger_than_the_announced_maximum_is_aborted(
        pacs: Running, caplog: pytest.LogCaptureFixture) -> None:
    ds = make_ds(Rows=512, Columns=1024, PixelData=bytes(1 << 20))
    before = snapshot(pacs)
    with caplog.at_level(logging.WARNING, logger="scp"), established(pacs) as peer:
        peer.send(p_data(CT_ID, 0x03, c_store_rq(CT, ds.SOPInstanceUID)))
        # one PDU of 1 MiB, four times the limit: the server reads its header, aborts and
        # closes, and may do so while this is still being sent (EPIPE or ECONNRESET)
        peer.send(p_data(CT_ID, 0x02, encode(ds)))
        reply = peer.reply(timeout=30)
    assert_aborted(peer, str(reply.outcome), caplog, because="over the")
    assert_nothing_written(pacs, before)
    assert_serving(pacs)


def test_a_peer_cut_off_while_sending_still_reads_the_verdict() -> None:
    """The test peer itself: a server that aborts and closes while a large PDU is still
    being sent (EPIPE or ECONNRESET at ``sendall``) is not an error of the test; what the
    server sent before closing is still read. A stand-in server on loopback makes the
    race certain: it reads a PDU header, sends an A-ABORT and closes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def abort_after_a_header() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(6)
                conn.sendall(pdu(0x07, bytes(4)))
                # unread data in our receive buffer: the close resets the connection
        server = threading.Thread(target=abort_after_a_header)
        server.start()
        with Peer(listener.getsockname()[1], timeout=10) as peer:
            peer.send(pdu(0x04, bytes(8 << 20)))  # far more than the socket buffers hold
            server.join(10)
            assert peer.cut_off is not None
            assert peer.answer(timeout=10) in (ABORT, CLOSED)


# --------------------------------------------------------------------------------------
# Peers that stall or never associate (their own servers: they use up what they hold)
# --------------------------------------------------------------------------------------


PARTIAL_PDUS = {
    "mid-associate-rq": lambda: _rq()[:30],
    "mid-p-data": lambda: struct.pack(">BBL", 0x04, 0, 1000) + b"abc",
    # a C-STORE whose data set PDU (longer than scp/engine/receiver.py's READ_AHEAD) stops
    # after its first bytes: what the receiver read goes back to pynetdicom's guards
    "mid-long-p-data": lambda: p_data(CT_ID, 0x03, c_store_rq(CT, uid()))
    + p_data(CT_ID, 0x02, bytes(200_000))[:70_000],
}


def _stall(peer: Peer, kind: str, running: Running) -> None:
    if kind != "mid-associate-rq":
        peer.associate(CONTEXTS, called=running.ae_title)
    peer.send(PARTIAL_PDUS[kind]())


@pytest.mark.parametrize("kind", sorted(PARTIAL_PDUS))
def test_a_stalled_peer_does_not_block_others(own_server: Callable[..., Running],
                                              kind: str) -> None:
    running = own_server(**{"ae.network_timeout": 1, "ae.acse_timeout": 1})
    with Peer(running.port) as peer:
        _stall(peer, kind, running)
        before = snapshot(running)
        assert_serving(running)
        assert snapshot(running).rows[3][0] == before.rows[3][0] + 1


@pytest.mark.parametrize("kind", sorted(PARTIAL_PDUS))
def test_a_stalled_peer_is_dropped_after_the_timeout(own_server: Callable[..., Running],
                                                     kind: str) -> None:
    running = own_server(**{"ae.network_timeout": 1, "ae.acse_timeout": 1})
    with Peer(running.port) as peer:
        _stall(peer, kind, running)
        # 1 s timeouts; 4 s is ample for the server to act on them
        assert peer.answer(timeout=4) in (ABORT, CLOSED)




@pytest.mark.parametrize("probe_sends", [b"GET / HTTP/1.1\r\n\r\n", b"",
                                         _rq_that_raises_in_an_action()],
                         ids=["http-request", "connect-and-close", "associate-rq-that-raises"])
def test_connections_that_never_associate_do_not_hold_association_slots(
        own_server: Callable[..., Running], probe_sends: bytes) -> None:
    running = own_server(**{"ae.acse_timeout": 8})  # 16 slots, the default
    for _ in range(running.config.ae.max_associations):
        with Peer(running.port) as probe:
            if probe_sends:
                probe.send(probe_sends)
                assert probe.answer(timeout=10) == ABORT  # the server has seen it
    # the probes are gone: a real peer gets in (polled for 3 s, well below 8 s)
    deadline = time.monotonic() + 3
    accepted = False
    while not accepted and time.monotonic() < deadline:
        assoc = small_ae().associate("127.0.0.1", running.port, ae_title=running.ae_title)
        accepted = assoc.is_established
        if accepted:
            assoc.release()
    assert accepted, "every association is rejected after 16 probes"


def test_a_store_whose_uid_is_not_ascii_is_answered_not_cut_off(pacs: Running) -> None:
    """A C-STORE request whose Affected SOP Instance UID holds a byte no UID may (PS3.5
    9.1) is not taken by scp/engine/receiver.py: pynetdicom answers it, as it did before
    that path existed, and the association goes on."""
    with established(pacs) as peer:
        bad_uid = "1.2.3.\xe9"
        peer.send(p_data(CT_ID, 0x03, command(
            (0x0002, CT.encode()), (0x0100, us(0x0001)), (0x0110, us(1)), (0x0700, us(0)),
            (0x0800, us(0x0000)), (0x1000, bad_uid.encode("latin-1") + b"\0"))))
        peer.send(p_data(CT_ID, 0x02, image()))
        reply = peer.reply(timeout=30)
        assert isinstance(reply.outcome, int), reply  # a C-STORE response, not a cut-off
        peer.request(VER_ID, c_echo_rq(2))
        assert peer.reply(timeout=10).outcome == status.SUCCESS
        assert peer.release() == "A-RELEASE-RP"
    assert_serving(pacs)
