"""The C-STORE sub-operations of a retrieve, written straight to the socket.

pynetdicom sends a C-STORE from a decoded ``Dataset``, re-encoded by pydicom, through two
queues and two threads per association, and hands each response back the same way: about
3 ms per instance, ten times Orthanc's 0.3 ms (bench/README.md, "Retrieve"). Here the
thread that runs the retrieve writes each sub-operation itself: the command set
(:mod:`scp.engine.dimse`) and the stored data set's bytes, in P-DATA-TF PDUs no larger
than the receiver takes, then reads PDUs until the C-STORE response arrives. pynetdicom
still negotiates the associations (its PDU and primitive classes encode and decode them)
and serves everything else.

Two kinds of :class:`Link`:

- :class:`StoreAssociation`: the association a C-MOVE opens to its destination, ours from
  the A-ASSOCIATE-RQ to the A-RELEASE-RP (PS3.8 9.3, 7.2);
- :func:`scp.engine.reactor.leased`: the association a C-GET came on, lent by its DUL
  thread for the length of the retrieve (the DUL waits, reading nothing). What arrives
  meanwhile and is not ours (an A-RELEASE-RQ, an A-ABORT, another request) is handed back
  unread to pynetdicom, which then acts on it as usual; a C-CANCEL for the retrieve is ours.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from . import dimse

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"  # PS3.7 A.2.1, the DICOM one
UNLIMITED_PDU = 1 << 20
"""The PDU size we send to a receiver whose Maximum Length Received is 0 (no limit)."""
WAIT_SLICE = 0.05
"""How often a wait for a response looks whether pynetdicom wants the socket back."""

ABORTED = "the receiver aborted the association before answering"
CLOSED = "the connection to the receiver closed before it answered"
RELEASED = "the receiver asked to release the association before answering"
INTERRUPTED = "the association is being closed (the server stops, or the peer aborted)"
HALFWAY = "a data set could not be read to its end and was sent in part; the association\
 was aborted"
PROTOCOL = "the receiver sent what it may not (an unexpected PDU or message)"
TOO_SMALL = ("the receiver's Maximum Length Received ({}) leaves no room for data (PS3.8"
             " D.1); the association was aborted")
UNBOUNDED_WAIT = 60.0
"""The wait for the rest of a PDU begun between two sub-operations, without a DIMSE
timeout."""


class ReceiverGone(Exception):
    """The link cannot carry another sub-operation; ``str(exc)`` says why."""


class AssociationFailed(Exception):
    """The association to a C-MOVE destination was not established; ``str(exc)`` is the
    short reason ("no answer", "association rejected", ...), :attr:`detail` the rest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


@dataclass
class Link:
    """A socket that carries C-STORE sub-operations, one at a time.

    ``max_pdu`` is the peer's Maximum Length Received (0: no limit); ``dimse_timeout`` the
    longest wait for a response (``None``: none); ``wanted_back`` says, while we wait,
    that the socket's owner needs it now (see :func:`scp.engine.reactor.leased`);
    ``cancel_of`` is the Message ID of the retrieve whose C-CANCEL may arrive here (a
    C-GET's requestor is its receiver).
    """

    sock: Any
    max_pdu: int
    dimse_timeout: float | None
    wanted_back: Callable[[], bool] = lambda: False
    cancel_of: int | None = None
    cancelled: bool = False
    """A C-CANCEL for :attr:`cancel_of` arrived (PS3.7 9.3.2.3)."""
    foreign: list[bytes] = field(default_factory=list)
    """PDUs read that are not ours, in order, for the socket's owner."""
    gone: str | None = None
    """Why the link is unusable, once it is."""
    _buffer: bytearray = field(default_factory=bytearray)
    _command: bytearray = field(default_factory=bytearray)
    _raw: list[bytes] = field(default_factory=list)

    max_receive: int = 0
    """Our own Maximum Length Received (0: :data:`UNLIMITED_PDU`): a longer PDU from the
    peer is a protocol error, not read (PS3.8 D.1; the guards abort such a PDU too)."""
    must_abort: bool = False
    """The association must be aborted (PS3.8 7.3): no response within the DIMSE timeout,
    a data set sent in part, a PDU over our maximum left half read, a peer maximum too
    small to carry data."""

    def __post_init__(self) -> None:
        self.fragment = self.max_pdu or UNLIMITED_PDU
        if self.fragment <= dimse.PDV_OVERHEAD:  # no room for a single byte of data
            self.gone = TOO_SMALL.format(self.max_pdu)
            self.must_abort = True

    # -- sending ------------------------------------------------------------------------

    def send(self, pdus: Sequence[bytes]) -> None:
        """Write ``pdus`` (raises :class:`ReceiverGone` when the connection is lost)."""
        self._usable()
        if self.wanted_back():
            self._lost(INTERRUPTED)
        try:
            self.sock.settimeout(self.dimse_timeout)
            self.sock.sendall(pdus[0] if len(pdus) == 1 else b"".join(pdus))
        except (OSError, ValueError) as exc:
            self._lost(CLOSED, exc)

    def store(self, context_id: int, command: bytes, data_set: Iterable[bytes | memoryview],
              message_id: int, meanwhile: Callable[[], None] | None = None,
              ) -> tuple[int, str | None]:
        """Send one C-STORE request (``command``, then the pieces of ``data_set`` as they
        are) and wait for its response: its Status and Error Comment (PS3.7 9.3.1.2).
        ``meanwhile`` runs once the request is sent, before the wait (the next file is
        read while the receiver works on this one).

        The first piece is taken before anything is sent: an exception from it leaves the
        link as it was. One from a later piece leaves a data set half sent: the link is
        gone (:attr:`gone`), the association must be aborted, and the exception is
        raised as it came.
        """
        self._usable()
        pieces = iter(data_set)
        piece = next(pieces, b"")
        head = list(dimse.fragments(context_id, dimse.COMMAND, command, self.fragment))
        while True:
            following = self._next_piece(pieces)
            self.send(head + list(dimse.fragments(context_id, dimse.DATA, piece, self.fragment,
                                                  last=following is None)))
            head = []
            if following is None:
                if meanwhile is not None:
                    meanwhile()
                return self.response(message_id)
            piece = following

    def _next_piece(self, pieces: Iterator[bytes | memoryview]) -> bytes | memoryview | None:
        try:
            return next(pieces, None)
        except Exception:
            self.gone = HALFWAY
            self.must_abort = True
            raise

    def command(self, context_id: int, command: bytes) -> None:
        """Send a message without a data set (a Pending C-GET response)."""
        self.send(list(dimse.fragments(context_id, dimse.COMMAND, command, self.fragment)))

    # -- receiving ----------------------------------------------------------------------

    def response(self, message_id: int) -> tuple[int, str | None]:
        """Wait for the C-STORE response to ``message_id``; others are dropped (logged)."""
        deadline = None if self.dimse_timeout is None else (
            time.monotonic() + self.dimse_timeout)
        while True:
            command = self._next_command(deadline)
            if command is None:
                continue
            field_ = command.get(dimse.COMMAND_FIELD)
            answered = command.get(dimse.MESSAGE_ID_BEING_RESPONDED_TO)
            if field_ == dimse.C_STORE_RSP and answered == message_id:
                comment = command.get(dimse.ERROR_COMMENT)
                return int(command.get(dimse.STATUS, -1)), (
                    str(comment) if comment is not None else None)
            if field_ == dimse.C_STORE_RSP:
                logger.warning("a C-STORE response to Message ID %s, not %d, is ignored",
                               answered, message_id)
                continue
            self._foreign_message()

    def poll(self) -> None:
        """Read, without waiting, what has arrived (a C-CANCEL between two
        sub-operations); raises :class:`ReceiverGone` as :meth:`response` does, and when
        the socket's owner wants it back."""
        self._usable()
        if self.wanted_back():
            self._lost(INTERRUPTED)
        while self._readable(0):
            # once a PDU has begun, the rest of it comes within the DIMSE timeout
            deadline = time.monotonic() + (self.dimse_timeout or UNBOUNDED_WAIT)
            if self._next_command(deadline, once=True) is not None:
                self._foreign_message()

    def present(self) -> bool:
        """Usable, and not wanted back by the socket's owner."""
        return self.gone is None and not self.wanted_back()

    def _foreign_message(self) -> None:
        self.foreign.extend(self._raw)
        self._raw = []
        self._lost(PROTOCOL)

    def _next_command(self, deadline: float | None, once: bool = False) -> (
            dict[int, int | str] | None):
        """Read PDUs until a command set is complete and return it; ``None`` when it was
        a C-CANCEL of ours (recorded), or, with ``once``, when one PDU did not finish it."""
        while True:
            raw = self._read_pdu(deadline)
            pdu_type = raw[0]
            if pdu_type != dimse.P_DATA_TF:
                self._other_pdu(pdu_type, raw)
            self._raw.append(raw)
            done: dict[int, int | str] | None = None
            try:
                for _, control, fragment in dimse.pdvs(memoryview(raw)[6:]):
                    if not control & dimse.COMMAND or done is not None:
                        self._foreign_message()  # a data set: no response we wait for has one
                    self._command += fragment
                    if control & dimse.LAST:
                        done = dimse.read_command(self._command)
                        self._command.clear()
            except ValueError as exc:
                self._lost(PROTOCOL, exc)
            if done is not None:
                if (done.get(dimse.COMMAND_FIELD) == dimse.C_CANCEL_RQ
                        and self.cancel_of is not None
                        and done.get(dimse.MESSAGE_ID_BEING_RESPONDED_TO) == self.cancel_of):
                    self.cancelled = True
                    self._raw = []
                    return None
                return done
            if once:
                return None

    def _other_pdu(self, pdu_type: int, raw: bytes) -> None:
        if pdu_type == dimse.A_ABORT:
            self.foreign.append(raw)
            self._lost(ABORTED)
        if pdu_type == dimse.A_RELEASE_RQ:
            self.foreign.append(raw)
            self._lost(RELEASED)
        self.foreign.append(raw)
        self._lost(PROTOCOL)

    def _readable(self, timeout: float) -> bool:
        if self._buffer:
            return True
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True  # TLS: decrypted bytes select does not see
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError) as exc:
            self._lost(CLOSED, exc)
        return bool(ready)

    def _fill(self, size: int, deadline: float | None) -> None:
        while len(self._buffer) < size:
            if self.wanted_back():
                self._lost(INTERRUPTED)
            wait = WAIT_SLICE if deadline is None else min(
                WAIT_SLICE, deadline - time.monotonic())
            if wait <= 0:  # PS3.7 9.1.1.1: the association is aborted
                self.must_abort = True
                self._lost(f"no response within the DIMSE timeout ({self.dimse_timeout:g} s);"
                           " the association was aborted")
            if not self._readable(wait):
                continue
            try:
                self.sock.settimeout(0)
                chunk = self.sock.recv(max(size - len(self._buffer), 65536))
            except (BlockingIOError, ssl.SSLWantReadError, InterruptedError):
                continue
            except (OSError, ValueError) as exc:
                self._lost(CLOSED, exc)
            if not chunk:
                self._lost(CLOSED)
            self._buffer += chunk

    def _read_pdu(self, deadline: float | None) -> bytes:
        self._fill(6, deadline)
        _, length = dimse.pdu_header(self._buffer[:6])
        if length > (self.max_receive or UNLIMITED_PDU):
            self.must_abort = True  # its body is not read: the stream cannot be resumed
            self._lost(f"{PROTOCOL}: a PDU of {length} bytes, over our maximum")
        self._fill(6 + length, deadline)
        raw = bytes(self._buffer[:6 + length])
        del self._buffer[:6 + length]
        return raw

    def leftover(self) -> bytes:
        """Every byte read and not ours: :attr:`foreign` PDUs, then what followed them."""
        out = b"".join(self.foreign) + bytes(self._buffer)
        self.foreign.clear()
        self._buffer.clear()
        return out

    def _usable(self) -> None:
        if self.gone is not None:
            raise ReceiverGone(self.gone)

    def _lost(self, why: str, exc: BaseException | None = None) -> Any:
        if exc is not None:
            logger.debug("link lost: %s (%r)", why, exc)
        self.gone = why
        raise ReceiverGone(why)


REFUSED_RETRY = 2.0
"""Seconds during which a destination that refuses the connection is tried again: an SCU
that is its own Move Destination may listen only once its C-MOVE request is sent (GDCM's
``gdcmscu --move`` does), and a C-MOVE answered at once would find no one there."""
REFUSED_PAUSE = 0.05
"""Seconds between two tries."""


class StoreAssociation:
    """The association a C-MOVE opens to its destination (we are its requestor and the
    C-STORE SCU), negotiated with pynetdicom's PDU classes over a socket of ours."""

    def __init__(self, sock: Any, link: Link, accepted: dict[str, list[tuple[int, str]]],
                 acse_timeout: float | None) -> None:
        self.sock = sock
        self.link = link
        self.accepted = accepted
        """SOP Class UID -> [(presentation context ID, transfer syntax UID)] accepted."""
        self.acse_timeout = acse_timeout

    @classmethod
    def open(cls, address: tuple[str, int], *, calling: str, called: str,
             contexts: list[PresentationContext], max_pdu: int,
             connect_timeout: float | None, acse_timeout: float | None,
             dimse_timeout: float | None,
             ssl_context: ssl.SSLContext | None = None) -> StoreAssociation:
        """Connect and negotiate (PS3.8 7.1); raises :class:`AssociationFailed`."""
        where = f"{called} at {address[0]}:{address[1]}"
        refused_until = time.monotonic() + min(REFUSED_RETRY, connect_timeout or REFUSED_RETRY)
        while True:
            try:
                sock = socket.create_connection(address, timeout=connect_timeout)
                break
            except ConnectionRefusedError as exc:
                if time.monotonic() >= refused_until:
                    raise AssociationFailed("no answer", f"{where}: {exc}") from exc
                time.sleep(REFUSED_PAUSE)  # a destination about to listen: try again
            except OSError as exc:
                raise AssociationFailed("no answer", f"{where}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=address[0])
            for number, cx in enumerate(contexts):
                cx.context_id = 2 * number + 1
            sock.settimeout(acse_timeout)
            sock.sendall(_associate_rq(calling, called, address, contexts, max_pdu))
            link = Link(sock, 0, acse_timeout)
            try:
                raw = link._read_pdu(None if acse_timeout is None
                                     else time.monotonic() + acse_timeout)
            except ReceiverGone as exc:
                raise AssociationFailed("no answer", f"{where}: {exc}") from exc
            if raw[0] == dimse.A_ASSOCIATE_RJ:
                rejected = A_ASSOCIATE_RJ()
                rejected.decode(raw)
                raise AssociationFailed("association rejected", f"{where}: {rejected}")
            if raw[0] != dimse.A_ASSOCIATE_AC:
                raise AssociationFailed("association aborted", f"{where}: PDU type {raw[0]}")
            ac = A_ASSOCIATE_AC()
            ac.decode(raw)
            primitive = ac.to_primitive()
        except AssociationFailed:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        except Exception as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise AssociationFailed("no answer", f"{where}: {exc}") from exc
        proposed = {cx.context_id: str(cx.abstract_syntax) for cx in contexts}
        accepted: dict[str, list[tuple[int, str]]] = {}
        for result in primitive.presentation_context_definition_results_list:
            abstract = proposed.get(result.context_id)
            if result.result == 0 and abstract is not None and result.transfer_syntax:
                accepted.setdefault(abstract, []).append(
                    (int(result.context_id or 0), str(result.transfer_syntax[0])))
        peer_max = 0
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
        assoc = cls(sock, Link(sock, peer_max, dimse_timeout, max_receive=max_pdu),
                    accepted, acse_timeout)
        if not accepted:
            assoc.abort()
            raise AssociationFailed("no presentation context accepted", where)
        return assoc

    def release(self) -> None:
        """A-RELEASE-RQ, then wait (ACSE timeout) for the A-RELEASE-RP; abort if none."""
        link = self.link
        if link.gone is not None and link.gone not in (ABORTED, CLOSED):
            self.abort()  # anything but the peer leaving: it is told, not left hanging
            return
        if link.gone is None:
            try:
                link.send([bytes.fromhex("05000000000400000000")])
                deadline = None if self.acse_timeout is None else (
                    time.monotonic() + self.acse_timeout)
                while link._read_pdu(deadline)[0] != dimse.A_RELEASE_RP:
                    pass
            except ReceiverGone:
                self.abort()
                return
        self.close()

    def abort(self) -> None:
        """A-ABORT (source: service user), then close."""
        pdu = A_ABORT_RQ()
        pdu.source = 0x00
        pdu.reason_diagnostic = 0x00
        with contextlib.suppress(OSError, ValueError):
            self.sock.settimeout(1.0)
            self.sock.sendall(pdu.encode())
        self.close()

    def close(self) -> None:
        self.link.gone = self.link.gone or "closed"
        with contextlib.suppress(OSError):
            self.sock.close()


def _associate_rq(calling: str, called: str, address: tuple[str, int],
                  contexts: list[PresentationContext], max_pdu: int) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT_NAME
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    # the presentation addresses are not in the PDU (PS3.8 9.3.2): left unset
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    primitive.user_information = [length, implementation, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())
