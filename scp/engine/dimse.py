"""DIMSE command sets and P-DATA-TF PDUs, encoded and read by hand, for the retrieve data path
(:mod:`scp.engine.sender`).

pynetdicom builds a command set as a pydicom ``Dataset`` and encodes it with pydicom's writer,
then wraps each fragment in a ``P_DATA_TF`` object: about 0.2 ms of Python per C-STORE
sub-operation, as much as the whole sub-operation may take at Orthanc's rate. A command set
is a handful of group 0000 elements in Implicit VR Little Endian (PS3.7 6.3.1), so it is
written here directly, from the same element order and values pynetdicom 3.0's
``C_STORE_RQ`` and ``C_GET_RSP`` / ``C_MOVE_RSP`` messages produce (tests/scp/test_dimse.py
compares the bytes with theirs), and read back into a dict of the elements we use.

A P-DATA-TF PDU (PS3.8 9.3.5) is a 6-byte header and presentation data value items, each a
4-byte length, the presentation context ID and the message control header: bit 0 set for a
command fragment, bit 1 for the last fragment of the command or data set (PS3.8 E.2).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

# PS3.8 9.3.1: PDU types
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# PS3.8 E.2: message control header
DATA = 0x00
COMMAND = 0x01
LAST = 0x02

# PS3.7 E.1-1: Command Field
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
C_CANCEL_RQ = 0x0FFF

# PS3.7 E.1-1: Command Data Set Type
DATA_SET_PRESENT = 0x0001  # as pynetdicom sends it; any value but 0101H means present
NO_DATA_SET = 0x0101

# group 0000 element numbers (PS3.7 E.1-1)
COMMAND_GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS_UID = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_BEING_RESPONDED_TO = 0x0120
PRIORITY = 0x0700
COMMAND_DATA_SET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE_UID = 0x1000
MOVE_ORIGINATOR_AE_TITLE = 0x1030
MOVE_ORIGINATOR_MESSAGE_ID = 0x1031
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023

_US = frozenset({COMMAND_FIELD, MESSAGE_ID, MESSAGE_ID_BEING_RESPONDED_TO, PRIORITY,
                 COMMAND_DATA_SET_TYPE, STATUS, MOVE_ORIGINATOR_MESSAGE_ID, REMAINING,
                 COMPLETED, FAILED, WARNING, 0x0200, 0x0210, 0x1005})
"""Elements of group 0000 with VR US (the others we read are UI, AE, LO or UL)."""

_ELEMENT = struct.Struct("<HHI")
_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
PDU_HEADER_LENGTH = _PDU_HEADER.size
PDV_OVERHEAD = _PDV_HEADER.size  # the item length, the context ID and the control header


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw  # PS3.5 6.2: UI padded with NUL


def _text(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw  # PS3.5 6.2: AE, LO padded with a space


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def command_set(elements: dict[int, bytes]) -> bytes:
    """A command set from ``{element number: encoded value}``, in element order, with its
    Command Group Length first (PS3.7 6.3.1, Implicit VR Little Endian)."""
    body = b"".join(_ELEMENT.pack(0, number, len(value)) + value
                    for number, value in sorted(elements.items()))
    return _ELEMENT.pack(0, COMMAND_GROUP_LENGTH, 4) + struct.pack("<I", len(body)) + body


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 0,
               move_originator: str | None = None,
               move_originator_message_id: int | None = None) -> bytes:
    """The command set of a C-STORE request (PS3.7 9.3.1.1); the Move Originator elements
    when it is a C-MOVE sub-operation."""
    elements = {
        AFFECTED_SOP_CLASS_UID: _uid(sop_class_uid),
        COMMAND_FIELD: _us(C_STORE_RQ),
        MESSAGE_ID: _us(message_id),
        PRIORITY: _us(priority),
        COMMAND_DATA_SET_TYPE: _us(DATA_SET_PRESENT),
        AFFECTED_SOP_INSTANCE_UID: _uid(sop_instance_uid),
    }
    if move_originator is not None:
        elements[MOVE_ORIGINATOR_AE_TITLE] = _text(move_originator)
    if move_originator_message_id is not None:
        elements[MOVE_ORIGINATOR_MESSAGE_ID] = _us(move_originator_message_id)
    return command_set(elements)


def c_store_rsp(message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int,
                error_comment: str | None = None) -> bytes:
    """The command set of a C-STORE response (PS3.7 9.3.1.2), without a data set; an Error
    Comment is cut to its 64 characters (LO)."""
    elements = {
        AFFECTED_SOP_CLASS_UID: _uid(sop_class_uid),
        COMMAND_FIELD: _us(C_STORE_RSP),
        MESSAGE_ID_BEING_RESPONDED_TO: _us(message_id),
        COMMAND_DATA_SET_TYPE: _us(NO_DATA_SET),
        STATUS: _us(status),
        AFFECTED_SOP_INSTANCE_UID: _uid(sop_instance_uid),
    }
    if error_comment:
        elements[ERROR_COMMENT] = _text(error_comment[:64])
    return command_set(elements)


def retrieve_pending(command_field: int, message_id: int, sop_class_uid: str, status: int,
                     remaining: int, completed: int, failed: int, warning: int) -> bytes:
    """The command set of a Pending C-GET or C-MOVE response (PS3.7 9.3.3.2, 9.3.4.2),
    without a data set."""
    return command_set({
        AFFECTED_SOP_CLASS_UID: _uid(sop_class_uid),
        COMMAND_FIELD: _us(command_field),
        MESSAGE_ID_BEING_RESPONDED_TO: _us(message_id),
        COMMAND_DATA_SET_TYPE: _us(NO_DATA_SET),
        STATUS: _us(status),
        REMAINING: _us(remaining),
        COMPLETED: _us(completed),
        FAILED: _us(failed),
        WARNING: _us(warning),
    })


def read_command(raw: bytes | bytearray | memoryview) -> dict[int, int | str]:
    """The elements of a command set: US values as ``int``, the others (UI, AE, LO) as
    ``str`` without padding; UL values (the group length) are skipped.

    Raises
    ------
    ValueError
        The bytes are not a group 0000 command set (truncated, another group).
    """
    out: dict[int, int | str] = {}
    view = memoryview(raw)
    at, end = 0, len(view)
    while at < end:
        if end - at < 8:
            raise ValueError("truncated command set")
        group, number, length = _ELEMENT.unpack_from(view, at)
        at += 8
        if group != 0:
            raise ValueError(f"not a command set element: ({group:04X},{number:04X})")
        if at + length > end:
            raise ValueError(f"truncated command set: (0000,{number:04X}) of length {length}")
        value = view[at:at + length]
        at += length
        if number in _US:
            if length != 2:
                raise ValueError(f"(0000,{number:04X}) US of length {length}")
            out[number] = value[0] | value[1] << 8
        elif number != COMMAND_GROUP_LENGTH:
            out[number] = bytes(value).decode("ascii", "replace").rstrip("\0 ")
    return out


def p_data(context_id: int, control: int, payload: bytes | bytearray | memoryview) -> bytes:
    """One P-DATA-TF PDU of one presentation data value."""
    length = len(payload) + 2
    return _PDU_HEADER.pack(P_DATA_TF, 0, length + 4) + _PDV_HEADER.pack(
        length, context_id, control) + payload


def fragments(context_id: int, control: int, payload: bytes | bytearray | memoryview,
              max_pdu: int, last: bool = True) -> Iterator[bytes]:
    """``payload`` (a command set, ``control`` = :data:`COMMAND`, or a data set,
    :data:`DATA`) as P-DATA-TF PDUs whose variable field is at most ``max_pdu`` bytes, the
    peer's Maximum Length Received (PS3.8 D.1), the last one marked :data:`LAST` unless
    more of the same message follows (``last`` false)."""
    size = max_pdu - PDV_OVERHEAD
    if size <= 0:
        raise ValueError(f"a Maximum Length Received of {max_pdu} leaves no room for data")
    view = memoryview(payload)
    total = len(view)
    start = 0
    while True:
        stop = min(start + size, total)
        final = stop == total
        yield p_data(context_id, control | (LAST if final and last else 0), view[start:stop])
        if final:
            return
        start = stop


def pdu_header(raw: bytes | bytearray) -> tuple[int, int]:
    """The type and length of a PDU, from its first 6 bytes."""
    pdu_type, _, length = _PDU_HEADER.unpack(raw)
    return pdu_type, length


def pdvs(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF PDU's variable field: (context ID,
    message control header, fragment).

    Raises
    ------
    ValueError
        An item's length runs past the PDU or is too short to hold its header.
    """
    view = memoryview(body)
    at, end = 0, len(view)
    while at < end:
        if end - at < PDV_OVERHEAD:
            raise ValueError("truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(view, at)
        if length < 2 or at + 4 + length > end:
            raise ValueError(f"presentation data value item of length {length}")
        yield context_id, control, view[at + PDV_OVERHEAD:at + 4 + length]
        at += 4 + length
