"""The structure walk of a data set's bytes (PS3.5 7.1, 7.5, A.4): whether they are one
complete data set, and where its header ends (its top-level pixel data).

Both readers of a header run it first, so that what either reads is all there is:
pydicom's path (:mod:`storage.parsing`) and the fast path (:mod:`storage.fastparse`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR

from .errors import InvalidInstance

Buffer = bytes | memoryview
"""Data set bytes: in memory, or a view of a spooled file (:meth:`storage.Spooled.view`)."""

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
"""Pixel Data, Float Pixel Data, Double Float Pixel Data: where a header ends."""
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                      b"UR", b"UT", b"UV"})
"""Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)."""
UNDEFINED = 0xFFFFFFFF
"""Undefined Length (PS3.5 7.1.1)."""
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
"""Item, Item Delimitation Item, Sequence Delimitation Item (PS3.5 7.5)."""

MAX_DEPTH = 64
"""Most sequences nested in one another in a data set we accept (real IODs nest a few)."""

_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


@dataclass
class _Frame:
    """One open container of the structure walk: a data set (the top one or an item), a
    sequence's items, or encapsulated pixel data's fragments."""

    kind: int
    end: int  # where its bytes must end (a defined length, or its parent's end)
    until: int | None  # the delimiter that closes it (undefined length), else None
    implicit: bool | None  # None: an item whose first element tells (see check_structure)


_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                  b"LO", b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH",
                  b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
                  b"UR", b"US", b"UT", b"UV"})


def check_structure(data: Buffer, implicit: bool, little: bool, complete: bool = True) -> int:
    """Check that ``data`` is one complete data set: every element header whole, every
    value inside its container, every undefined length closed by its delimiter, no stray
    delimiter, and in an explicit VR syntax a VR on every top-level element (PS3.5 7.1,
    7.5, A.4).

    Values are not decoded; sequences and items are followed iteratively, at most
    :data:`MAX_DEPTH` deep. With ``complete`` false (the first bytes of a longer data set)
    the walk ends at the top-level pixel data or where the bytes end.

    What pydicom and other toolkits read, and devices write, is accepted: an item of an
    explicit VR sequence encoded in implicit VR (and the items of an undefined-length UN
    in explicit VR, written before CP-246), told by its first element; top-level pixel
    data whose element header is implicit in an explicit VR data set; an implicit VR
    element the dictionary calls a sequence whose value is not items (a text, as some
    anonymisers write); and a delimiter inside a defined-length item or sequence.

    Returns the offset of the top-level pixel data element (the length of ``data`` when it
    has none): what precedes it is the header.

    Raises
    ------
    InvalidInstance
        Naming the first fault and its byte offset.
    """
    order = "<" if little else ">"
    tag_of = struct.Struct(order + "HH").unpack_from
    u16 = struct.Struct(order + "H").unpack_from
    u32 = struct.Struct(order + "L").unpack_from
    size = len(data)
    stack = [_Frame(_DATASET, size, None, implicit)]
    pos = 0
    pixel_at = size
    while stack:
        frame = stack[-1]
        if pos == frame.end:
            if frame.until is not None:
                if not complete and pos == size:
                    return pixel_at
                raise InvalidInstance(
                    f"data set is truncated at byte {pos}: a sequence or item never ends")
            stack.pop()
            continue
        if pos + 8 > frame.end:
            if not complete and pos + 8 > size:
                return pixel_at
            raise InvalidInstance(f"data set is truncated at byte {pos}: element header "
                                  f"cut short")
        group, elem = tag_of(data, pos)
        tag = group << 16 | elem
        name = f"({group:04X},{elem:04X})"
        if frame.kind != _DATASET:
            # a sequence holds items and its delimiter; pixel data, fragments (PS3.5 A.4)
            if tag == SEQUENCE_END and (frame.until == SEQUENCE_END or frame.until is None):
                pos += 8
                if frame.until is not None:
                    stack.pop()
                continue  # in a defined-length sequence: a redundant delimiter
            if tag != ITEM:
                raise InvalidInstance(f"unexpected {name} at byte {pos}, where an item "
                                      f"must be")
            (length,) = u32(data, pos + 4)
            pos += 8
            item_syntax = frame.implicit if implicit else None  # explicit: ask the item
            if length == UNDEFINED and frame.kind == _SEQUENCE:
                stack.append(_Frame(_DATASET, frame.end, ITEM_END, item_syntax))
            elif length == UNDEFINED or pos + length > frame.end:
                if not complete and length != UNDEFINED and pos + length > size:
                    return pixel_at
                raise InvalidInstance(f"item at byte {pos - 8} runs past its end")
            elif frame.kind == _SEQUENCE:
                stack.append(_Frame(_DATASET, pos + length, None, item_syntax))
            else:
                pos += length
            continue
        if group == 0xFFFE:
            if tag == ITEM_END and (frame.until == ITEM_END
                                     or (frame.until is None and len(stack) > 1)):
                pos += 8
                if frame.until is not None:
                    stack.pop()
                continue  # in a defined-length item: a redundant delimiter
            raise InvalidInstance(f"unexpected delimiter {name} at byte {pos}")
        top = len(stack) == 1
        if top and tag in PIXEL_TAGS and pixel_at == size:
            pixel_at = pos
            if not complete:
                return pixel_at
        vr = bytes(data[pos + 4:pos + 6])
        if frame.implicit is None:  # an item's first element: explicit if it has a VR
            frame.implicit = vr not in _VRS
        element_implicit = frame.implicit
        if not element_implicit and not (vr.isalpha() or vr == b"  "):  # as pydicom reads
            if not (top and tag in PIXEL_TAGS):
                raise InvalidInstance(f"element {name} at byte {pos} has no VR, in an "
                                      f"explicit VR transfer syntax")
            element_implicit = True  # some writers encode the pixel data header so
        if element_implicit:
            vr = b""
            (length,) = u32(data, pos + 4)
            pos += 8
        elif vr in LONG_VRS:
            if pos + 12 > frame.end:
                if not complete and pos + 12 > size:
                    return pixel_at
                raise InvalidInstance(f"data set is truncated at byte {pos}: "
                                      f"element header cut short")
            (length,) = u32(data, pos + 8)
            pos += 12
        else:
            (length,) = u16(data, pos + 6)
            pos += 8
        sequence = vr == b"SQ" or (element_implicit and _is_sequence(tag))
        if length == UNDEFINED:
            if tag in PIXEL_TAGS or vr in (b"OB", b"OW"):
                stack.append(_Frame(_FRAGMENTS, frame.end, SEQUENCE_END, frame.implicit))
            elif sequence or vr == b"UN" or element_implicit:
                # UN of undefined length is a sequence in implicit VR (PS3.5 6.2.2)
                stack.append(_Frame(_SEQUENCE, frame.end, SEQUENCE_END,
                                    True if vr == b"UN" else frame.implicit))
            else:
                raise InvalidInstance(f"element {name} ({vr.decode()}) at byte {pos} "
                                      f"has an undefined length")
        elif pos + length > frame.end:
            if not complete and pos + length > size:
                return pixel_at
            raise InvalidInstance(
                f"value of {name} is truncated: {length} bytes announced, "
                f"{frame.end - pos} left")
        elif sequence and (vr == b"SQ" or length == 0 or bytes(data[pos:pos + 4]) in _ITEM_TAGS):
            stack.append(_Frame(_SEQUENCE, pos + length, None, frame.implicit))
        else:
            pos += length  # a value; an implicit "sequence" that holds no items is one too
        if len(stack) > 2 * MAX_DEPTH + 1:
            raise InvalidInstance(f"sequences are nested more than {MAX_DEPTH} deep")
    return pixel_at


_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000), little and big endian


def _is_sequence(tag: int) -> bool:
    """Whether an implicit VR element is a sequence, by the data dictionary."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False
