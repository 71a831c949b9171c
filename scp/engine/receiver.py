"""C-STORE requests read off the socket by the DUL thread itself, without pynetdicom's
per-PDU path.

pynetdicom receives a C-STORE through its state machine, its DIMSE assembler and two
queues, and answers through the same: about 1 ms of Python per instance, before any
storing (bench/README.md, "The ceiling of pynetdicom"). Here, when the DUL thread of an
association we accepted wakes up to a readable socket (:func:`scp.engine.reactor`'s
``wait_dul``), :meth:`StoreReceiver.serve` reads the next message itself, whole PDUs at a
time, and keeps it only if it is a well-formed C-STORE request on an accepted context:
then it calls the EVT_C_STORE handler as pynetdicom would (a :class:`pynetdicom.events.Event`
with the request primitive and its context) and writes the C-STORE response (its command
set encoded by hand, :mod:`scp.engine.dimse`). Anything else (another request, a release
or abort, a malformed or oversized PDU, a data set larger than :data:`IN_MEMORY_UP_TO`, a
stall in the middle of a message, a request whose SOP Class is not its context's) is given
back unread (:func:`scp.engine.reactor._unread`)
and pynetdicom, with the guards of scp/engine/guards.py, deals with it as usual, the
message included.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from io import BytesIO
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from . import dimse
from .sockets import ack_now

logger = logging.getLogger(__name__)

IN_MEMORY_UP_TO = 4 * 1024 * 1024
"""Data sets up to this size are taken here; a larger one goes to pynetdicom, which spools
it to a file as it arrives."""
HANDLER_FAILED = 0xC211
"""pynetdicom's status when the EVT_C_STORE handler raises (PS3.7 C.5: Cxxx failure)."""

PDU_MARGIN = 12
"""A P-DATA-TF's bytes beyond its data set fragment: the PDV item's length, context and
control (PS3.8 9.3.5.1), and the command's PDV when both share the PDU (at most a few
hundred bytes, not counted: the limit is approximate either way)."""
READ_AHEAD = 65536
"""Bytes asked of the socket at a time for a PDU up to this size (the next PDU's first
bytes may come with them); a longer PDU is read into a buffer of its own."""


class _NotOurs(Exception):
    """The message is not one this path takes: give every byte read back."""


class StoreReceiver:
    """The C-STORE requests of one association we accepted (see the module's docstring).

    ``unread`` puts bytes back in front of what pynetdicom reads next; ``network_timeout``
    bounds the wait for the rest of a message once its first bytes are there (a stall
    then goes to pynetdicom's guards, with everything read so far).
    """

    def __init__(self, assoc: Any, unread: Any, network_timeout: float | None) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.unread = unread
        self.network_timeout = network_timeout or 60.0
        self._contexts: dict[int, Any] | None = None

    def contexts(self) -> dict[int, Any]:
        """The accepted contexts on which the peer may send us C-STORE requests."""
        if self._contexts is None:
            self._contexts = {int(cx.context_id): cx for cx in self.assoc.accepted_contexts
                              if cx.as_scp}
        return self._contexts

    def ready(self) -> bool:
        """Whether this path may read now: data transfer, no message half received by
        pynetdicom, nothing of its own waiting to be read or sent."""
        dul = self.dul
        peer_max = int(self.assoc.requestor.maximum_length or 0)
        if 0 < peer_max <= dimse.PDV_OVERHEAD:
            return False  # no response could carry a byte: pynetdicom's to refuse
        return (self.assoc.is_established
                and dul.state_machine.current_state == "Sta6"
                and self.assoc.dimse.message is None
                and not dul.to_provider_queue.qsize() and not dul.event_queue.qsize()
                and not dul.to_user_queue.qsize())

    def serve(self, sock: Any) -> bool:
        """Take C-STORE requests from ``sock`` (readable) while they come back to back.

        Returns whether the caller may wait for the next one here: every request read was
        answered and nothing is left to read (not so when a message, bytes of one, or the
        end of the stream went back to pynetdicom, or the association is no longer one this
        path reads)."""
        while self.ready():
            raws: list[bytes | bytearray] = []
            buffer = bytearray()
            try:
                request, context = self._read(sock, raws, buffer)
            except _NotOurs:
                self.unread(b"".join(raws) + bytes(buffer))
                return False
            except Exception:  # a fault of ours: pynetdicom gets the message, as it came
                logger.exception("C-STORE fast path: a message is handed to pynetdicom")
                self.unread(b"".join(raws) + bytes(buffer))
                return False
            try:
                self._answer(sock, request, context)
            except Exception:  # a fault of ours after the message was taken: say so
                logger.exception("C-STORE response not made; the association is aborted")
                self.assoc.abort(block=False)
                return False
            if buffer:  # the next message began in the same read
                self.unread(bytes(buffer))
                return False
            if not _readable(sock, 0):
                return True
        return False

    # -- reading -------------------------------------------------------------------------

    def _read(self, sock: Any, raws: list[bytes | bytearray],
              buffer: bytearray) -> tuple[C_STORE, Any]:
        deadline = time.monotonic() + self.network_timeout
        maximum = int(self.assoc.acceptor.maximum_length or 0)
        command = bytearray()
        fragments: list[memoryview] = []  # of the data set, views of ``raws``
        size = 0
        context_id: int | None = None
        command_done: dict[int, int | str] | None = None
        while True:
            raw = _read_pdu(sock, buffer, deadline, maximum)
            raws.append(raw)
            self.dul._idle_timer.restart()  # as pynetdicom does at every PDU it reads
            try:
                items = list(dimse.pdvs(memoryview(raw)[6:]))
            except ValueError:
                raise _NotOurs from None
            for cx_id, control, fragment in items:
                if context_id is None:
                    context_id = cx_id
                if cx_id != context_id:
                    raise _NotOurs
                if command_done is None:
                    if not control & dimse.COMMAND:
                        raise _NotOurs  # a data set before its command: pynetdicom's to judge
                    command += fragment
                    if control & dimse.LAST:
                        command_done = self._check_command(command, context_id)
                    continue
                if control & dimse.COMMAND:
                    raise _NotOurs
                fragments.append(fragment)
                size += len(fragment)
                if size > IN_MEMORY_UP_TO:
                    raise _NotOurs
                if control & dimse.LAST:
                    context = self.contexts()[context_id]
                    return _primitive(command_done, b"".join(fragments)), context

    def _check_command(self, command: bytearray, context_id: int) -> dict[int, int | str]:
        try:
            fields = dimse.read_command(command)
        except ValueError:
            raise _NotOurs from None
        uids = (fields.get(dimse.AFFECTED_SOP_CLASS_UID),
                fields.get(dimse.AFFECTED_SOP_INSTANCE_UID))
        if not all(isinstance(uid, str) and uid.isascii() for uid in uids):
            raise _NotOurs  # bytes no UID has (PS3.5 9.1): pynetdicom's to judge
        if (fields.get(dimse.COMMAND_FIELD) != dimse.C_STORE_RQ
                or fields.get(dimse.COMMAND_DATA_SET_TYPE) == dimse.NO_DATA_SET
                or context_id not in self.contexts()
                or fields.get(dimse.AFFECTED_SOP_CLASS_UID) != str(
                    self.contexts()[context_id].abstract_syntax)
                or not isinstance(fields.get(dimse.MESSAGE_ID), int)
                or not fields.get(dimse.AFFECTED_SOP_CLASS_UID)
                or not fields.get(dimse.AFFECTED_SOP_INSTANCE_UID)):
            raise _NotOurs
        return fields

    # -- answering -----------------------------------------------------------------------

    def _answer(self, sock: Any, request: C_STORE, context: Any) -> None:
        try:
            result = evt.trigger(self.assoc, evt.EVT_C_STORE,
                                 {"request": request, "context": context.as_tuple})
        except Exception:
            logger.exception("Exception in handler bound to 'evt.EVT_C_STORE'")
            result = HANDLER_FAILED
        code, comment = _status(result)
        command = dimse.c_store_rsp(int(request.MessageID or 0),
                                    str(request.AffectedSOPClassUID),
                                    str(request.AffectedSOPInstanceUID), code, comment)
        peer_max = int(self.assoc.requestor.maximum_length or 0) or (1 << 20)
        pdus = list(dimse.fragments(int(context.context_id), dimse.COMMAND, command, peer_max))
        try:
            sock.sendall(b"".join(pdus))
        except OSError as exc:  # the peer is gone: pynetdicom notices on its next read
            logger.debug("C-STORE response not sent: %r", exc)
        self.dul._idle_timer.restart()


def _status(result: Any) -> tuple[int, str | None]:
    """The Status and Error Comment of what a C-STORE handler returned (an int, or a
    Dataset with Status and perhaps ErrorComment: pynetdicom's contract)."""
    if isinstance(result, Dataset):
        code = result.get("Status")
        comment = result.get("ErrorComment")
        return (int(code) if code is not None else HANDLER_FAILED,
                str(comment) if comment else None)
    try:
        return int(result), None
    except (TypeError, ValueError):
        return HANDLER_FAILED, None


def _primitive(fields: dict[int, int | str], data: bytes) -> C_STORE:
    request = C_STORE()
    request.MessageID = int(fields[dimse.MESSAGE_ID])
    request.AffectedSOPClassUID = str(fields[dimse.AFFECTED_SOP_CLASS_UID])
    request.AffectedSOPInstanceUID = str(fields[dimse.AFFECTED_SOP_INSTANCE_UID])
    request.Priority = int(fields.get(dimse.PRIORITY, 0))
    originator = fields.get(dimse.MOVE_ORIGINATOR_AE_TITLE)
    if originator:
        request.MoveOriginatorApplicationEntityTitle = str(originator)
    originator_id = fields.get(dimse.MOVE_ORIGINATOR_MESSAGE_ID)
    if isinstance(originator_id, int):
        request.MoveOriginatorMessageID = originator_id
    request.DataSet = BytesIO(data)  # shares ``data`` until written to
    return request


def _readable(sock: Any, timeout: float) -> bool:
    try:
        ready, _, _ = select.select([sock], [], [], timeout)
    except (OSError, ValueError):
        return False
    return bool(ready)


def _read_pdu(sock: Any, buffer: bytearray, deadline: float, maximum: int) -> bytes | bytearray:
    """One whole P-DATA-TF PDU, or :class:`_NotOurs` (what was read stays in ``buffer``):
    another PDU type, a stall past ``deadline``, a closed connection, a PDU longer than
    ``maximum`` (our Maximum Length Received; 0 = none).

    A PDU longer than :data:`READ_AHEAD` is read into a buffer of its own, straight from
    the socket (a CT image's 256 KiB PDUs are not copied through ``buffer`` twice), made
    at the PDU's announced length: one that would carry more than :data:`IN_MEMORY_UP_TO`
    is pynetdicom's, unread."""
    _fill(sock, buffer, 6, deadline)
    kind, _, length = struct.unpack_from(">BBI", buffer)
    if kind != dimse.P_DATA_TF or (maximum and length > maximum + 6):
        raise _NotOurs  # pynetdicom's (and its guards') from its header on
    if 6 + length > READ_AHEAD:
        if length > IN_MEMORY_UP_TO + PDU_MARGIN:
            raise _NotOurs  # more than this path keeps (ae.max_pdu_size 0 sets no maximum)
        return _read_whole(sock, buffer, 6 + length, deadline)
    _fill(sock, buffer, 6 + length, deadline)
    with memoryview(buffer) as view:
        raw = bytes(view[:6 + length])
    del buffer[:6 + length]
    return raw


def _read_whole(sock: Any, buffer: bytearray, size: int, deadline: float) -> bytearray:
    """The next ``size`` bytes, the first of them in ``buffer``, the rest read from
    ``sock`` into the result itself; :class:`_NotOurs` as :func:`_fill` (then everything
    read is in ``buffer``)."""
    raw = bytearray(size)
    have = min(len(buffer), size)
    raw[:have] = buffer[:have]
    del buffer[:have]
    with memoryview(raw) as view:
        try:
            while have < size:
                have += _receive(sock, deadline, functools.partial(
                    sock.recv_into, view[have:], size - have, socket.MSG_DONTWAIT))
        except _NotOurs:
            buffer[:0] = view[:have]
            raise
    return raw


def _fill(sock: Any, buffer: bytearray, size: int, deadline: float) -> None:
    while len(buffer) < size:
        buffer += _receive(sock, deadline, functools.partial(
            sock.recv, max(size - len(buffer), READ_AHEAD), socket.MSG_DONTWAIT))


_Got = TypeVar("_Got", bytes, int)


def _receive(sock: Any, deadline: float, read: Callable[[], _Got]) -> _Got:
    """What ``read`` (a non-blocking read of ``sock``) gives once ``sock`` is readable:
    bytes, or a count of bytes; :class:`_NotOurs` past ``deadline``, on an error, or at the
    end of the stream (pynetdicom reads the end too)."""
    while True:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise _NotOurs
        try:
            ready, _, _ = select.select([sock], [], [], min(wait, 0.5))
        except (OSError, ValueError):  # closed under us (a server stop): not a spin
            raise _NotOurs from None
        if not ready:
            continue
        try:
            got = read()
        except (BlockingIOError, InterruptedError):
            continue
        except OSError:
            raise _NotOurs from None
        if not got:
            raise _NotOurs
        ack_now(sock)
        return got

