"""scp/engine/receiver.py's reading of a PDU longer than its READ_AHEAD, on a socket pair:
every byte read is either in the PDU returned or back in the buffer (the network paths
are in tests/test_hostile.py)."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from scp.engine import receiver

PDU = struct.pack(">BBL", 0x04, 0, 100_000) + bytes(range(256)) * 390 + bytes(160)


def test_a_long_pdu_is_read_whole_and_nothing_after_it() -> None:
    assert len(PDU) == 100_006 > receiver.READ_AHEAD
    ours, theirs = socket.socketpair()
    with ours, theirs:
        buffer = bytearray(PDU[:10])
        theirs.sendall(PDU[10:] + b"NEXT")
        assert receiver._read_whole(ours, buffer, len(PDU), time.monotonic() + 10) == PDU
        assert buffer == b""
        assert ours.recv(16) == b"NEXT"  # the next PDU's bytes are left in the socket


def test_a_long_pdu_cut_short_leaves_every_byte_read_in_the_buffer() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        buffer = bytearray(PDU[:10])
        theirs.sendall(PDU[10:70_000])
        with pytest.raises(receiver._NotOurs):
            receiver._read_whole(ours, buffer, len(PDU), time.monotonic() + 0.3)
        assert buffer == PDU[:70_000]  # for pynetdicom to read, as it came


def test_a_long_pdu_whose_peer_closes_leaves_every_byte_read_in_the_buffer() -> None:
    ours, theirs = socket.socketpair()
    with ours:
        buffer = bytearray(PDU[:10])
        theirs.sendall(PDU[10:50_000])
        theirs.close()
        with pytest.raises(receiver._NotOurs):
            receiver._read_whole(ours, buffer, len(PDU), time.monotonic() + 10)
        assert buffer == PDU[:50_000]


def test_a_pdu_longer_than_what_is_kept_in_memory_is_not_read() -> None:
    """The receiver's buffer is made at a PDU's announced length: one beyond
    IN_MEMORY_UP_TO (possible with ae.max_pdu_size 0) is pynetdicom's, and nothing is
    allocated for it here."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        header = struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0)
        theirs.sendall(header + b"abc")
        buffer = bytearray()
        started = time.monotonic()
        with pytest.raises(receiver._NotOurs):
            receiver._read_pdu(ours, buffer, started + 30, 0)
        assert time.monotonic() - started < 10  # not waiting for the rest of it
        assert buffer == header + b"abc"  # all of it, for pynetdicom to read


def test_a_read_on_a_socket_closed_under_it_ends_at_once() -> None:
    """A server stop closes an association's socket under its DUL thread: a read waiting
    for the rest of a message gives up at once instead of spinning until its deadline."""
    ours, theirs = socket.socketpair()
    with theirs:
        ours.close()
        started = time.monotonic()
        with pytest.raises(receiver._NotOurs):
            receiver._fill(ours, bytearray(), 6, started + 30)
        assert time.monotonic() - started < 10


def test_a_pdu_of_another_type_is_left_from_its_header_on() -> None:
    """An A-RELEASE-RQ (or any PDU but a P-DATA-TF) is pynetdicom's as soon as its header
    is read: the receiver does not wait for its body."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        header = struct.pack(">BBL", 0x05, 0, 4)
        theirs.sendall(header)  # its 4 bytes of body never come
        buffer = bytearray()
        started = time.monotonic()
        with pytest.raises(receiver._NotOurs):
            receiver._read_pdu(ours, buffer, started + 30, 0)
        assert time.monotonic() - started < 10
        assert buffer == header
