"""Property-based fuzzing (issue 5, "Bad input"): random and mutated data sets, DIMSE
messages and PDUs, fed to a running server through the real network.

Whatever arrives, the server must

- answer or end the connection, never hang (after the peer has sent everything and shut
  its side, the server has to act within seconds);
- refuse without writing anything, or answer Success only for what it then holds byte for
  byte; every index row has its file and every file its row;
- write nothing outside its data folder;
- keep serving: a C-ECHO and a C-STORE of a valid instance work afterwards.

The exact answers to known malformed inputs are pinned by tests/test_hostile.py; here any
clean answer is accepted. Hypothesis runs derandomized with a fixed number of examples and
no example database, so every run tries the same inputs; a time guard stops each test early
on a machine far slower than expected, so the file stays bounded in time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scp import status
from tests.conftest import Running
from tests.factory import encode, file_parts, make_ds
from tests.test_hostile import (
    ABORT,
    AC,
    CLOSED,
    CONTEXTS,
    CT,
    CT_ID,
    FIND_ID,
    IMPLICIT,
    ITEM,
    RJ,
    SILENT,
    STUDY_ROOT_FIND,
    UNDEFINED,
    VER_ID,
    VERIFICATION,
    Peer,
    Reply,
    assert_nothing_escaped,
    assert_serving,
    associate_rq,
    c_echo_rq,
    c_find_rq,
    c_store_rq,
    el,
    element,
    ident,
    index_rows,
    instance_files,
    marker,
    running_server,
    sequence,
    snapshot,
)

# hostile values make pydicom warn; no server thread may die of them (pyproject.toml makes a
# thread's exception fail the test)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

BUDGET = 14.0
"""Seconds one fuzz test may spend generating examples (normally it needs far less)."""

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)


class Fuzzed:
    """The server under fuzz, a reusable association to it, and a time guard."""

    def __init__(self, running: Running) -> None:
        self.running = running
        self.peer: Peer | None = None
        self.started = time.monotonic()
        self.examples = 0

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > BUDGET

    def association(self) -> Peer:
        """An established association (a new one when the last was ended)."""
        if self.peer is None:
            self.peer = Peer(self.running.port, timeout=30)
            self.peer.associate(CONTEXTS, called=self.running.ae_title)
        return self.peer

    def drop(self) -> None:
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def restart_clock(self) -> None:
        self.drop()
        self.started = time.monotonic()
        self.examples = 0


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """One server for the module. Connections that never associate hold a slot until the
    ACSE timeout (a known defect, see tests/test_hostile.py), so many slots and a short ACSE
    timeout keep the fuzzing of pre-association PDUs from starving the rest."""
    running = running_server(tmp_path_factory.mktemp("fuzz"), **{
        "ae.max_associations": 1024, "ae.acse_timeout": 3, "ae.dimse_timeout": 10,
        "storage.durability": "relaxed"})
    holder = Fuzzed(running)
    before = snapshot(running)
    yield holder
    holder.drop()
    try:
        assert_nothing_escaped(running, before)
        assert_serving(running)
    finally:
        running.server.stop(grace=5)


@pytest.fixture
def fuzz(fuzzed: Fuzzed) -> Iterator[Fuzzed]:
    fuzzed.restart_clock()
    yield fuzzed
    fuzzed.drop()
    assert_consistent(fuzzed.running)
    assert_serving(fuzzed.running)


def stored_data_sets(running: Running) -> dict[str, bytes]:
    """file -> the data set bytes it holds, for every file of the store."""
    files = running.data_dir / "files"
    return {f: file_parts(files / f)[0] for f in instance_files(snapshot(running).files)}


def held(running: Running, data: bytes, new_files: frozenset[str]) -> bool:
    """Whether the store holds ``data``: in a new file, or (an identical resend) in one it
    already had."""
    files = running.data_dir / "files"
    if any(file_parts(files / f)[0] == data for f in new_files):
        return True
    return data in stored_data_sets(running).values()


def assert_consistent(running: Running) -> None:
    """Every index row has its file and every file its row; no temporary file is left."""
    snap = snapshot(running)
    assert not [f for f in snap.files if f.startswith("tmp/")], "temporary files left"
    keys = {row[0] for row in index_rows(running, "SELECT file_key FROM instance")}
    assert keys == {Path(f).name for f in instance_files(snap.files)}, \
        "index rows and files differ"


# --------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------

SPECIAL_LENGTHS = [0, 1, 2, 3, 0x7F, 0xFF, 0xFFFF, 0xFFFE, 0x10000, 0x7FFFFFFF, 0xFFFFFFF0,
                   UNDEFINED]


@st.composite
def mutation(draw: Any) -> tuple[Any, ...]:
    """One edit, positions as fractions of the data's length (so shrinking stays valid)."""
    where = draw(st.floats(0, 1, exclude_max=True))
    kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "length32",
                                 "length16", "repeat"]))
    if kind == "flip":
        return kind, where, draw(st.integers(0, 7))
    if kind == "set":
        return kind, where, draw(st.integers(0, 255))
    if kind == "insert":
        return kind, where, draw(st.binary(min_size=1, max_size=16))
    if kind in ("delete", "repeat"):
        return kind, where, draw(st.integers(1, 64))
    if kind in ("length32", "length16"):
        return kind, where, draw(st.sampled_from(SPECIAL_LENGTHS))
    return kind, where


def mutate(data: bytes, edits: list[tuple[Any, ...]]) -> bytes:
    raw = bytearray(data)
    for kind, where, *arg in edits:
        at = int(where * len(raw)) if raw else 0
        if kind == "flip" and raw:
            raw[at] ^= 1 << arg[0]
        elif kind == "set" and raw:
            raw[at] = arg[0]
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = arg[0]
        elif kind == "delete":
            del raw[at:at + arg[0]]
        elif kind == "repeat":
            raw[at:at] = raw[at:at + arg[0]]
        elif kind == "length32" and len(raw) >= at + 4:
            raw[at:at + 4] = struct.pack("<L", arg[0] & 0xFFFFFFFF)
        elif kind == "length16" and len(raw) >= at + 2:
            raw[at:at + 2] = struct.pack("<H", arg[0] & 0xFFFF)
    return bytes(raw)


def _image() -> bytes:
    return encode(make_ds())


def _with_sequence() -> bytes:
    ds = make_ds(PixelData=None)
    inner = element(0x00081150, "UI", CT.encode()) + element(0x00081155, "UI", b"1.2.3.4")
    return encode(ds) + sequence(0x00400275, inner)


def _encapsulated() -> bytes:
    ds = make_ds(PixelData=None)
    return (encode(ds) + element(0x7FE00010, "OB", length=UNDEFINED) + marker(ITEM, 0)
            + marker(ITEM, 8) + b"\xff\xd8\xff\xd9\0\0\0\0" + marker(0xFFFEE0DD))


BASES = {"image": _image, "sequence": _with_sequence, "encapsulated": _encapsulated}

data_sets = st.one_of(
    st.tuples(st.sampled_from(sorted(BASES)), st.lists(mutation(), min_size=1, max_size=4)),
    st.tuples(st.just("random"), st.binary(max_size=600)),
)


def build_data_set(spec: tuple[str, Any]) -> bytes:
    base, edits = spec
    if base == "random":
        return bytes(edits)
    return mutate(BASES[base](), edits)


# --------------------------------------------------------------------------------------
# C-STORE with mutated data sets
# --------------------------------------------------------------------------------------

STORE_OUTCOMES = {status.SUCCESS, status.STORE_CANNOT_UNDERSTAND,
                  status.STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS}


@settings(FUZZ, max_examples=400)
@given(spec=data_sets)
def test_mutated_data_sets_are_stored_whole_or_refused_cleanly(fuzz: Fuzzed,
                                                               spec: tuple[str, Any]) -> None:
    if fuzz.out_of_time():
        return
    data = build_data_set(spec)
    before = snapshot(fuzz.running)
    peer = fuzz.association()
    fuzz.examples += 1
    peer.request(CT_ID, c_store_rq(CT, f"1.2.826.0.1.3680043.8.498.{fuzz.examples}"), data)
    reply = peer.reply(timeout=30)
    assert reply.outcome in STORE_OUTCOMES, f"C-STORE answered {reply}"
    after = snapshot(fuzz.running)
    if reply.outcome == status.SUCCESS:
        # what was acknowledged is held byte for byte, under a file the index names
        assert held(fuzz.running, data, after.files - before.files)
    else:
        assert reply.comment
        assert (after.files, after.rows) == (before.files, before.rows)
    assert after.outside == before.outside
    assert after.rows[3][0] == len(instance_files(after.files))


# --------------------------------------------------------------------------------------
# Mutated DIMSE messages on an association
# --------------------------------------------------------------------------------------


def _messages() -> dict[str, tuple[int, bytes, bytes | None]]:
    ds = make_ds()
    query = ident(el(0x00100010, "PN", b"Doe*"), el(0x00100020, "LO", b""),
                  el(0x00201208, "IS", b""))
    return {
        "echo": (VER_ID, c_echo_rq(3), None),
        "find": (FIND_ID, c_find_rq(STUDY_ROOT_FIND, 4), query),
        "store": (CT_ID, c_store_rq(CT, ds.SOPInstanceUID, 5), encode(ds)),
    }


dimse_messages = st.tuples(
    st.sampled_from(["echo", "find", "store"]),
    st.sampled_from(["command", "data"]),
    st.lists(mutation(), min_size=1, max_size=3),
)


def _finish(peer: Peer, wait: float) -> Reply:
    """The reply, or once ``wait`` has passed, what the server does when we stop sending:
    a message the mutation left incomplete may rightly wait for more."""
    reply = peer.reply(timeout=wait)
    if reply.outcome != SILENT:
        return reply
    with contextlib.suppress(OSError):
        peer.sock.shutdown(socket.SHUT_WR)
    reply = peer.reply(timeout=20)
    assert reply.outcome in (ABORT, CLOSED), f"the server hangs after our EOF: {reply}"
    return reply


@settings(FUZZ, max_examples=150)
@given(message=dimse_messages)
def test_mutated_dimse_messages_get_an_answer_or_an_abort(
        fuzz: Fuzzed, message: tuple[str, str, list[tuple[Any, ...]]]) -> None:
    if fuzz.out_of_time():
        return
    name, part, edits = message
    context_id, command, data = _messages()[name]
    if part == "command" or data is None:
        command = mutate(command, edits)
    else:
        data = mutate(data, edits)
    before = snapshot(fuzz.running)
    peer = fuzz.association()
    peer.request(context_id, command, data)
    reply = _finish(peer, wait=0.5)
    after = snapshot(fuzz.running)
    if not isinstance(reply.outcome, int):
        fuzz.drop()
    elif name == "store" and reply.outcome == status.SUCCESS:
        assert held(fuzz.running, data, after.files - before.files)
    elif name == "store":
        assert (after.files, after.rows) == (before.files, before.rows)
    assert after.rows[3][0] == len(instance_files(after.files))


# --------------------------------------------------------------------------------------
# Random PDUs on an association, mutated A-ASSOCIATE-RQ before one
# --------------------------------------------------------------------------------------

pdus = st.tuples(
    st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x08, 0x09, 0x44, 0xFF]),
    st.binary(max_size=300),
    st.sampled_from(["exact", "shorter", "longer"]),
)


def _raw_pdu(pdu_type: int, body: bytes, length: str) -> bytes:
    n = {"exact": len(body), "shorter": max(len(body) - 3, 0), "longer": len(body) + 50}[length]
    return struct.pack(">BBL", pdu_type, 0, n) + body


@settings(FUZZ, max_examples=80)
@given(spec=pdus)
def test_random_pdus_on_an_association_never_hang_the_server(
        fuzz: Fuzzed, spec: tuple[int, bytes, str]) -> None:
    if fuzz.out_of_time():
        return
    with Peer(fuzz.running.port, timeout=30) as peer:
        peer.associate(CONTEXTS, called=fuzz.running.ae_title)
        peer.send(_raw_pdu(*spec))
        with contextlib.suppress(OSError):  # the server may have closed already
            peer.sock.shutdown(socket.SHUT_WR)  # all sent: the server has to act now
        answer = peer.answer(timeout=20)
    assert answer in (ABORT, CLOSED, "A-RELEASE-RP", "P-DATA-TF"), answer


def _associate_rq() -> bytes:
    return associate_rq([(VERIFICATION, [IMPLICIT]), (CT, ["1.2.840.10008.1.2.1", IMPLICIT]),
                         (STUDY_ROOT_FIND, [IMPLICIT])])


@st.composite
def first_pdus(draw: Any) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(min_size=1, max_size=300))
    edits = draw(st.lists(mutation(), min_size=1, max_size=4))
    rq = _associate_rq()
    # big-endian lengths in a PDU: mutate with the 16/32-bit edits as they come
    return mutate(rq, edits)


@settings(FUZZ, max_examples=100)
@given(data=first_pdus())
def test_mutated_associate_requests_get_an_answer(fuzz: Fuzzed, data: bytes) -> None:
    if fuzz.out_of_time():
        return
    with Peer(fuzz.running.port, timeout=30) as peer:
        peer.send(data)
        answer = peer.answer(timeout=0.15)
        if answer == SILENT:  # it may announce more than was sent, or be slow: stop sending
            with contextlib.suppress(OSError):  # the server may have closed already
                peer.sock.shutdown(socket.SHUT_WR)
            answer = peer.answer(timeout=20)
    assert answer in (AC, RJ, ABORT, CLOSED), answer

