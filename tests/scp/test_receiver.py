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
