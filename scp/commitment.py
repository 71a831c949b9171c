"""Storage Commitment Push Model SCP (PS3.4 Annex J, SOP Class 1.2.840.10008.1.20.1).

A modality asks with an N-ACTION (Action Type 1, its Transaction UID and the SOP Instances
it wants committed) whether it may delete its own copies. The request is answered Success
once it is recorded in the outbox (:meth:`storage.outbox.Outbox.add_commitment`), so that a
crash before the report loses nothing; :class:`Reporter` then checks each instance
(:meth:`storage.Archive.commitment`: stored under that SOP Class, and its file read and
hashed now) and sends the N-EVENT-REPORT on a new association to the requester, a peer with
a host (PS3.4 J.3.3: we propose the SOP Class with SCP/SCU Role Selection, as its SCP):
Event Type 1 when every instance is committed, 2 with a Failed SOP Sequence otherwise, each
failure with its Failure Reason (scp/status.py). A report the requester does not take is
sent again, as routing retries (``routing.retry_seconds`` doubling up to
``routing.retry_max_seconds``, given up after ``routing.max_attempts``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.dimse_primitives import N_ACTION

from storage import COMMITMENT, Archive, Commitment, OutboxEntry
from storage import lease_owner as new_lease_owner

from . import status
from .audit import Audit
from .config import Config, PeerConfig
from .contexts import STORAGE_COMMITMENT
from .routing import LEASE_SECONDS, POLL_SECONDS, delay, put_off
from .service import Refused
from .status import with_comment

logger = logging.getLogger(__name__)

SOP_CLASS = STORAGE_COMMITMENT
"""Storage Commitment Push Model SOP Class (PS3.4 J.3.1)."""
SOP_INSTANCE = "1.2.840.10008.1.20.1.1"
"""Its well-known SOP Instance (PS3.4 J.3.5)."""
REQUEST_COMMITMENT = 1
"""The Action Type ID of a request (PS3.4 J.3.2.1)."""
MAX_REFERENCES = 200_000
"""Most instances one request may name (more: 0213 Resource limitation)."""
TRANSFER_SYNTAXES = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
IDLE_POLL_SECONDS = 60.0
"""How often the reporter looks at the index when it knows of no report to send (a request
to this process wakes it at once; one to another process is that process's to report)."""


def parse_request(event: Any) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP Class UID, SOP Instance UID) pairs of an N-ACTION
    (PS3.4 J.3.2.1.1, Table J.3-1).

    Raises
    ------
    Refused
        0112 No Such Object Instance (not the well-known instance), 0123 No Such Action
        (not Action Type 1), 0115 Invalid Argument Value (no Transaction UID, no
        references, a reference without its UIDs), 0213 Resource Limitation (more than
        :data:`MAX_REFERENCES`), each with an ErrorComment.
    """
    request = event.request
    assert isinstance(request, N_ACTION)
    if str(request.RequestedSOPInstanceUID) != SOP_INSTANCE:
        raise Refused(with_comment(status.NO_SUCH_OBJECT_INSTANCE,
                                   f"the SOP Instance must be {SOP_INSTANCE}"))
    if request.ActionTypeID != REQUEST_COMMITMENT:
        raise Refused(with_comment(status.NO_SUCH_ACTION,
                                   f"Action Type {request.ActionTypeID} is not 1"))
    try:
        info = event.action_information
        transaction = str(info.get("TransactionUID", "") or "").strip()
        items = list(info.get("ReferencedSOPSequence", []) or [])
        references = [(str(item.ReferencedSOPClassUID).strip(),
                       str(item.ReferencedSOPInstanceUID).strip()) for item in items]
    except Exception as exc:  # noqa: BLE001 - undecodable, or an item without its UIDs
        raise Refused(with_comment(status.INVALID_ARGUMENT_VALUE,
                                   f"the Action Information cannot be read: {exc}")) from exc
    if not transaction or len(transaction) > 64:
        raise Refused(with_comment(status.INVALID_ARGUMENT_VALUE, "no valid Transaction UID"))
    if len(references) > MAX_REFERENCES:
        raise Refused(with_comment(status.RESOURCE_LIMITATION,
                                   f"more than {MAX_REFERENCES} instances in one request"))
    if not references or not all(cls and uid for cls, uid in references):
        raise Refused(with_comment(
            status.INVALID_ARGUMENT_VALUE,
            "Referenced SOP Sequence: one item or more, each with both UIDs"))
    return transaction, references


def requester(config: Config, event: Any) -> PeerConfig:
    """The peer the report goes to: the requester, a ``peers`` entry with a host.

    Raises
    ------
    Refused
        0110 Processing Failure: no report could be sent to it.
    """
    title = str(event.assoc.requestor.ae_title).strip(" ")
    peer = config.destination(title)
    if peer is None:
        raise Refused(with_comment(
            status.PROCESSING_FAILURE,
            f"{title} is not in peers with a host: no report could be sent"))
    return peer


def report(transaction: str, results: list[tuple[str, str, Commitment]],
           retrieve_ae_title: str) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.RetrieveAETitle = retrieve_ae_title
    committed, failed = [], []
    for sop_class, uid, result in results:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        if result is Commitment.COMMITTED:
            committed.append(item)
        else:
            item.FailureReason = status.failure_reason(result)
            failed.append(item)
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
        return status.COMMITMENT_FAILURES_EXIST, ds
    return status.COMMITMENT_SUCCESSFUL, ds


class Reporter:
    """The thread that sends the Storage Commitment reports of one server process."""

    def __init__(self, config: Config, archive: Archive, audit: Audit) -> None:
        self.config = config
        self.archive = archive
        self.audit = audit
        self.owner = new_lease_owner()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable: dict[str, tuple[int, float]] = {}  # peer: (failures, until)
        self.ae = AE(ae_title=config.ae.title)
        self.ae.acse_timeout = config.ae.acse_timeout
        self.ae.dimse_timeout = config.ae.dimse_timeout
        self.ae.network_timeout = config.ae.network_timeout
        self.ae.connection_timeout = config.ae.acse_timeout
        self.ae.add_requested_context(SOP_CLASS, TRANSFER_SYNTAXES)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="minipacs-commitment")
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the report being sent (see :meth:`join`)."""
        self._stop.set()
        self.archive.outbox.notify(COMMITMENT)

    def join(self, deadline: float) -> None:
        """Wait for the thread until ``deadline`` (``time.monotonic()``)."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _resting(self) -> list[str]:
        """The peers not to be tried again yet (their association failed lately)."""
        now = time.monotonic()
        return [peer for peer, (_, until) in self._unreachable.items() if until > now]

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            entries: list[OutboxEntry] = []
            try:
                entries = self.archive.outbox.claim(None, self.owner, 1, LEASE_SECONDS,
                                                    kind=COMMITMENT, exclude=self._resting())
                if not entries:
                    # reports put off: look again soon; none at all: wait to be woken by
                    # a request (this process takes its own), with a rare look for others
                    waiting = bool(self.archive.outbox.entries(limit=1, kind=COMMITMENT))
                    self.archive.release()
                    seen = self.archive.outbox.wait(
                        seen, POLL_SECONDS if waiting else IDLE_POLL_SECONDS, COMMITMENT)
                    continue
                self._send(entries[0])
            except Exception as exc:  # noqa: BLE001 - e.g. the index is down
                logger.exception("storage commitment report failed; trying again")
                self._put_off(entries, f"an unexpected error: {exc}")
                self._stop.wait(self.config.routing.retry_seconds)
            finally:
                with contextlib.suppress(Exception):
                    self.archive.release()

    def _put_off(self, entries: list[OutboxEntry], error: str) -> None:
        put_off(self.archive, self.owner, self.config.routing, entries, error)

    def _send(self, entry: OutboxEntry) -> None:
        """Check the request's instances now, send the report, settle the entry."""
        transaction = entry.sop_instance_uid
        peer = self.config.destination(entry.peer)
        if peer is None:
            self._put_off([entry], f"{entry.peer} is not in peers with a host")
            return
        references = [(str(c), str(u)) for c, u in json.loads(entry.payload)]
        event_type, info = report(transaction, self.archive.commitment(references),
                                  self.config.ae.title)
        failed = len(info.get("FailedSOPSequence", []))
        started = time.monotonic()
        error, reached = self._deliver(peer, event_type, info)
        if reached:
            self._unreachable.pop(entry.peer, None)
        else:  # not tried again before the delay a routed peer would wait
            failures = self._unreachable.get(entry.peer, (0, 0.0))[0] + 1
            self._unreachable[entry.peer] = (
                failures, time.monotonic() + delay(self.config.routing, failures))
        if error is None:
            self.archive.outbox.sent([entry], self.owner)
        else:
            logger.error("storage commitment report %s to %s: %s", transaction,
                         peer.ae_title, error)
            self._put_off([entry], error)
        self.audit.record("storage-commitment", user="storage-commitment",
                          peer=peer.ae_title, address=f"{peer.host}:{peer.port}",
                          transaction_uid=transaction, committed=len(references) - failed,
                          failed=failed, reported=error is None, error=error or "",
                          ms=round((time.monotonic() - started) * 1000, 1))
        if error is None:
            logger.info("storage commitment %s reported to %s: %d committed, %d failed",
                        transaction, peer.ae_title, len(references) - failed, failed)

    def _deliver(self, peer: PeerConfig, event_type: int,
                 info: Dataset) -> tuple[str | None, bool]:
        """Send the N-EVENT-REPORT on a new association: ``None`` or why it did not go,
        and whether an association was established."""
        assoc = self.ae.associate(peer.host, peer.port, ae_title=peer.ae_title,
                                  ext_neg=[build_role(SOP_CLASS, scp_role=True)])
        if not assoc.is_established:
            return f"no association with {peer.ae_title} at {peer.host}:{peer.port}", False
        try:
            if not any(str(c.abstract_syntax) == SOP_CLASS for c in assoc.accepted_contexts):
                return f"{peer.ae_title} did not accept the Storage Commitment SOP Class", True
            # PS3.7 D.3.3.4: an acceptor that answered the role selection must let us be
            # the SCP; one that did not answer it (many do not) is sent the report anyway
            roles = assoc.acceptor.role_selection.get(UID(SOP_CLASS))
            if roles is not None and not roles.scp_role:
                return (f"{peer.ae_title} refused us the SCP role of Storage Commitment"
                        " (SCP/SCU Role Selection)"), True
            rsp, _ = assoc.send_n_event_report(info, event_type, SOP_CLASS, SOP_INSTANCE)
            code = int(rsp.get("Status", -1)) if rsp is not None else -1
            if code != status.SUCCESS:
                return ("no answer to the N-EVENT-REPORT" if code < 0
                        else f"the N-EVENT-REPORT was answered {code:04X}"), True
            return None, True
        finally:
            if assoc.is_established:
                assoc.release()


__all__ = ["REQUEST_COMMITMENT", "SOP_CLASS", "SOP_INSTANCE", "Reporter", "parse_request",
           "report", "requester"]
