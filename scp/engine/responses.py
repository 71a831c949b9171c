"""Send C-FIND responses without pynetdicom's per-response encoding work.

Streaming many matches was bound by the association thread (profile in bench/README.md,
"Scale"): for every pending response pynetdicom 3.0 encodes the identifier with pydicom's
writer, builds the command set as a pydicom data set and encodes it twice (once for its
group length, once to send), renders the identifier for a log line nobody reads below
DEBUG, and sends command and identifier as two P-DATA-TF PDUs. Here:

- the handler yields :class:`PreEncoded` identifiers, which :mod:`storage.query` encoded
  for the presentation context (:meth:`storage.Archive.find_encoded`); pynetdicom's
  ``encode`` passes them through (:func:`_encode`);
- the C-FIND-RSP command set is packed by :func:`command_set` (PS3.7 9.3.2.2, Implicit VR
  Little Endian as PS3.7 6.3.1 requires), and command and identifier go out as one
  P-DATA-TF PDU each, queued together. PS3.8 9.3.5 would let one PDU carry both PDVs, but
  GDCM's ``gdcmscu`` (``ULConnectionManager::RunEventLoop``) takes a PDU whose last PDV
  ends the command as the whole command, then reads the *next* PDU as the identifier: with
  both in one PDU it pairs each response with the next one and waits forever for the last
  (issue 13). One PDU per PDV is what pynetdicom, DCMTK and Orthanc send;
- identifier decoding and pretty-printing for the log (of requests and responses) and
  pynetdicom's per-message logging handlers are turned off unless the ``pynetdicom`` logger
  is at DEBUG.

A response that is not a plain C-FIND response (an error comment, an offending element),
or an association with EVT_DIMSE_SENT handlers bound, goes through pynetdicom unchanged.

Pinned, like scp/engine/reactor.py, to pynetdicom 3.0 (``service_class.encode`` as used by
``_c_find_scp``, ``DIMSEServiceProvider.send_msg``); with another version nothing is
installed.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config
from pynetdicom import dimse as _dimse
from pynetdicom import events as evt
from pynetdicom import service_class as _service_class
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.pdu_primitives import P_DATA

from storage import Archive, Query, read_identifier

from .reactor import wait_until
from .versions import tested

C_FIND_RSP = 0x8020
"""CommandField of a C-FIND-RSP (PS3.7 Table E.1-1)."""
DATA_SET_PRESENT = 0x0001
NO_DATA_SET = 0x0101
"""CommandDataSetType: 0x0101 means no data set, any other value one (PS3.7 E.1-1);
0x0001 is what pynetdicom writes."""
FIRST_RESPONSE_WAIT = 0.002
"""Longest wait, in seconds, for the DUL to take a query's first response."""
MAX_QUEUED = 64
"""Most PDUs queued for the DUL before the query waits for the peer: two per C-FIND
response (command, identifier), so 32 responses."""
_FIRST_STEP = 0.0001  # the first response is taken within a GIL switch or two
_DRAIN_STEP = 0.001  # a slow peer: no need to look 10,000 times a second
_PLAIN_STATUSES = frozenset({0x0000, 0xFF00, 0xFF01})
_LAST_COMMAND_FRAGMENT = b"\x03"
_LAST_DATA_SET_FRAGMENT = b"\x02"
_PDV_OVERHEAD = 6  # item length (4), presentation context ID, message control header

_installed = False
_original_encode: Callable[..., Any] = _service_class.encode
_original_send_msg: Callable[..., None] = _dimse.DIMSEServiceProvider.send_msg


class PreEncoded(bytes):
    """A response identifier already encoded in Implicit or Explicit VR Little Endian."""

    implicit_vr: bool

    def __new__(cls, data: bytes, implicit_vr: bool) -> PreEncoded:
        obj = super().__new__(cls, data)
        obj.implicit_vr = implicit_vr
        return obj


def identifiers(
    archive: Archive, query: Query, cancelled: Callable[[], bool], assoc: Any,
    transfer_syntax_uid: str,
) -> Iterator[Dataset | PreEncoded]:
    """The response identifiers of ``query`` for a context of ``transfer_syntax_uid``:
    pre-encoded for the two Little Endian transfer syntaxes, data sets otherwise (and while
    pynetdicom renders every response identifier for its DEBUG log, which needs data sets).

    Once the first one is queued, the DUL thread of ``assoc`` is given the time to take
    it (at most :data:`FIRST_RESPONSE_WAIT`): else it waits for the GIL while this thread
    builds the next responses, and the first match reaches the peer milliseconds late
    (bench/README.md, "Scale"). After that, at most :data:`MAX_QUEUED` PDUs (half as many
    responses) wait in the DUL's queue: a slow peer slows the query down instead of filling
    memory, and a C-CANCEL still stops it before the last rows are read.
    """
    if (not _installed or _pynetdicom_config.LOG_RESPONSE_IDENTIFIERS
            or transfer_syntax_uid not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian)):
        yield from archive.find(query, cancelled=cancelled)
        return
    implicit = transfer_syntax_uid == ImplicitVRLittleEndian
    queue = assoc.dul.to_provider_queue
    matches = archive.find_encoded(query, cancelled, implicit_vr=implicit)
    for n, data in enumerate(matches):
        yield PreEncoded(data, implicit)
        if n == 0:
            wait_until(lambda: queue.empty(), FIRST_RESPONSE_WAIT, _FIRST_STEP)
        elif queue.qsize() > MAX_QUEUED:
            wait_until(lambda: queue.qsize() <= MAX_QUEUED // 2 or not assoc.is_established,
                        assoc.network_timeout or None, _DRAIN_STEP)


def command_set(sop_class_uid: str, message_id: int, status: int, has_data_set: bool) -> bytes:
    """The command set of a C-FIND-RSP (PS3.7 Table 9.3-2) in Implicit VR Little Endian,
    as pynetdicom encodes it (tests/scp/test_responses.py)."""
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    data_set_type = DATA_SET_PRESENT if has_data_set else NO_DATA_SET
    elements = (
        (0x0002, uid),
        (0x0100, struct.pack("<H", C_FIND_RSP)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", data_set_type)),
        (0x0900, struct.pack("<H", status)),
    )
    body = b"".join(struct.pack("<HHL", 0x0000, elem, len(value)) + value
                    for elem, value in elements)
    return struct.pack("<HHLL", 0x0000, 0x0000, 4, len(body)) + body


def _encode(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    """pynetdicom's ``encode``, passing :class:`PreEncoded` identifiers through."""
    if isinstance(ds, PreEncoded):
        if ds.implicit_vr == is_implicit_vr and is_little_endian and not deflated:
            return bytes(ds)
        syntax = ImplicitVRLittleEndian if ds.implicit_vr else ExplicitVRLittleEndian
        ds = read_identifier(bytes(ds), syntax)
    return _original_encode(ds, is_implicit_vr, is_little_endian, deflated)


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg`` with plain C-FIND responses packed here."""
    identifier = getattr(primitive, "Identifier", None)
    data = identifier.getvalue() if identifier is not None else b""
    command = _plain_find_response(self, primitive, data)
    if command is None or (identifier is not None and not data):
        _original_send_msg(self, primitive, context_id)
        return
    limit = self.maximum_pdu_size
    if limit and _PDV_OVERHEAD + max(len(command), len(data)) > limit:
        _original_send_msg(self, primitive, context_id)  # fragments it
        return
    # One PDU for the command, one for the identifier: never both PDVs in one PDU, which
    # GDCM misreads (module docstring).
    self.dul.send_pdu(_p_data(context_id, _LAST_COMMAND_FRAGMENT + command))
    if data:
        self.dul.send_pdu(_p_data(context_id, _LAST_DATA_SET_FRAGMENT + data))


def _p_data(context_id: int, pdv: bytes) -> P_DATA:
    """A P-DATA request of one presentation data value (header byte and fragment)."""
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, pdv))
    return pdata


def _plain_find_response(dimse: Any, primitive: Any, data: bytes) -> bytes | None:
    """The command set of ``primitive`` if it is a C-FIND response we may pack here."""
    if (not isinstance(primitive, C_FIND) or primitive.MessageIDBeingRespondedTo is None
            or primitive.Status not in _PLAIN_STATUSES or primitive.ErrorComment
            or primitive.OffendingElement or not primitive.AffectedSOPClassUID
            or dimse.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
        return None
    return command_set(str(primitive.AffectedSOPClassUID), primitive.MessageIDBeingRespondedTo,
                       primitive.Status, bool(data))


def install() -> bool:
    """Put :func:`_encode` and :func:`_send_msg` into pynetdicom (once); ``False`` when this
    the installed versions are not tested ones and nothing was changed."""
    global _installed
    if _installed:
        return True
    if not tested("scp/engine/responses.py", "C-FIND responses are encoded by pynetdicom"):
        return False
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        _pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False  # decoded and rendered for INFO
        _pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
        _pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    _service_class.encode = _encode
    _dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    _installed = True
    return True
