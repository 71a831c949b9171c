"""Storage Commitment Push Model SCP (issue 16, item 5; PS3.4 Annex J) with pynetdicom as
the modality: its N-ACTION is answered, then the N-EVENT-REPORT comes on a new association
to it (SCP/SCU Role Selection), listing each instance as committed only when it is stored
under that SOP Class and its file verifies, else failed with the standard's Failure Reason;
a report the modality cannot take yet is sent again, after a restart too; bad requests are
refused with the N-ACTION statuses of PS3.7."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import events as evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from scp import status
from scp.commitment import SOP_CLASS, SOP_INSTANCE
from storage import index
from tests.conftest import Running, reserved_port
from tests.factory import encode, make_ds, uid
from tests.test_cli import minipacs_command

MODALITY = "MODALITY"


class Modality:
    """A modality: it asks for commitment and listens for the reports."""

    def __init__(self, port: int, answers_role_selection: bool = True) -> None:
        self.port = port
        self.reports: queue.Queue[tuple[int, Dataset, str]] = queue.Queue()
        self.ae = AE(ae_title=MODALITY)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        self.ae.add_requested_context(SOP_CLASS)
        if answers_role_selection:  # accepts the archive proposing to be the SCP
            self.ae.add_supported_context(SOP_CLASS, scu_role=True, scp_role=True)
        else:  # ignores the role selection, as many modalities do
            self.ae.add_supported_context(SOP_CLASS)
        self.server: Any = None

    def listen(self) -> None:
        def on_report(event: Any) -> tuple[int, None]:
            self.reports.put((int(event.event_type), event.event_information,
                              str(event.assoc.requestor.ae_title).strip()))
            return status.SUCCESS, None
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def request(self, running: Running, transaction: str, refs: list[tuple[str, str]],
                title: str = MODALITY, action: int = 1,
                instance: str = SOP_INSTANCE) -> Dataset:
        """Send the N-ACTION; its response status data set."""
        ae = AE(ae_title=title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(SOP_CLASS)
        assoc = ae.associate("127.0.0.1", running.port, ae_title=running.ae_title)
        assert assoc.is_established
        ds = Dataset()
        if transaction:
            ds.TransactionUID = transaction
        ds.ReferencedSOPSequence = []
        for sop_class, sop_instance in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            ds.ReferencedSOPSequence.append(item)
        try:
            rsp, _ = assoc.send_n_action(ds, action, SOP_CLASS, instance)
        finally:
            assoc.release()
        return rsp

    def report(self, running: Running, timeout: float = 60) -> tuple[int, Dataset, str]:
        """The one report: once it came, and minipacs took it as delivered (its outbox
        row is gone), no other comes."""
        got = self.reports.get(timeout=timeout)
        deadline = time.monotonic() + timeout
        while running.archive.outbox.entries(kind="commitment"):
            assert time.monotonic() < deadline, "the report was not settled"
            time.sleep(0.05)  # poll interval
        assert self.reports.empty()
        return got


@contextlib.contextmanager
def modality_and_server(start_server: Callable[..., Running], **overrides: Any
                        ) -> Iterator[tuple[Modality, Running]]:
    with reserved_port() as port:
        running = start_server(peers=[{"ae_title": MODALITY, "host": "127.0.0.1",
                                       "port": port}], **overrides)
    modality = Modality(port)
    try:
        yield modality, running
    finally:
        modality.close()


def refs(items: Dataset | list[Dataset]) -> list[tuple[str, str, int | None]]:
    return sorted((str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID),
                   int(i.FailureReason) if "FailureReason" in i else None) for i in items)


def test_committed_and_failed_instances_are_reported(
        start_server: Callable[..., Running]) -> None:
    with modality_and_server(start_server) as (modality, running):
        modality.listen()
        stored = [make_ds(Modality="CT", SOPClassUID=CTImageStorage) for _ in range(4)]
        for ds in stored:
            running.archive.store(encode(ds), ExplicitVRLittleEndian)
        good, damaged, other_class = stored[0:2], stored[2], stored[3]
        _, key = index.lookup(str(damaged.SOPInstanceUID)) or ("", "")
        path = running.archive.files.path(key)
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF  # a bit flipped on the disk
        path.write_bytes(bytes(raw))
        unknown = uid()
        asked = [(CTImageStorage, str(ds.SOPInstanceUID)) for ds in [*good, damaged]] + [
            (MRImageStorage, str(other_class.SOPInstanceUID)), (CTImageStorage, unknown)]
        transaction = uid()
        rsp = modality.request(running, transaction, asked)
        assert rsp.Status == status.SUCCESS
        event_type, info, sender = modality.report(running)
    assert (event_type, sender) == (status.COMMITMENT_FAILURES_EXIST, running.ae_title)
    assert info.TransactionUID == transaction
    assert info.RetrieveAETitle == running.ae_title
    assert refs(info.ReferencedSOPSequence) == sorted(
        (CTImageStorage, str(ds.SOPInstanceUID), None) for ds in good)
    assert refs(info.FailedSOPSequence) == sorted([
        (CTImageStorage, str(damaged.SOPInstanceUID), status.PROCESSING_FAILURE),
        (MRImageStorage, str(other_class.SOPInstanceUID), status.CLASS_INSTANCE_CONFLICT),
        (CTImageStorage, unknown, status.NO_SUCH_OBJECT_INSTANCE)])


def test_all_committed_is_event_type_1(start_server: Callable[..., Running]) -> None:
    with modality_and_server(start_server) as (modality, running):
        modality.listen()
        stored = [make_ds(Modality="CT", SOPClassUID=CTImageStorage) for _ in range(3)]
        for ds in stored:
            running.archive.store(encode(ds), ExplicitVRLittleEndian)
        transaction = uid()
        assert modality.request(running, transaction, [
            (CTImageStorage, str(ds.SOPInstanceUID)) for ds in stored]).Status == 0
        event_type, info, _ = modality.report(running)
    assert event_type == status.COMMITMENT_SUCCESSFUL
    assert "FailedSOPSequence" not in info
    assert len(info.ReferencedSOPSequence) == 3


def test_a_modality_that_ignores_role_selection_gets_its_report(
        start_server: Callable[..., Running]) -> None:
    with reserved_port() as port:
        running = start_server(peers=[{"ae_title": MODALITY, "host": "127.0.0.1",
                                       "port": port}])
    modality = Modality(port, answers_role_selection=False)
    try:
        modality.listen()
        ds = make_ds(Modality="CT", SOPClassUID=CTImageStorage)
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
        assert modality.request(running, uid(), [
            (CTImageStorage, str(ds.SOPInstanceUID))]).Status == status.SUCCESS
        event_type, _, _ = modality.report(running)
    finally:
        modality.close()
    assert event_type == status.COMMITMENT_SUCCESSFUL


def test_a_report_waits_for_the_modality_across_a_restart(
        start_server: Callable[..., Running], tmp_path: Path) -> None:
    overrides = {"routing.retry_seconds": 0.2, "routing.retry_max_seconds": 0.5}
    with modality_and_server(start_server, **overrides) as (modality, running):
        ds = make_ds(Modality="CT", SOPClassUID=CTImageStorage)
        running.archive.store(encode(ds), ExplicitVRLittleEndian)
        transaction = uid()
        # the modality is not listening yet: the request is still answered Success
        assert modality.request(running, transaction,
                                [(CTImageStorage, str(ds.SOPInstanceUID))]).Status == 0
        deadline = time.monotonic() + 30
        while not any(e.attempts for e in running.archive.outbox.entries(
                kind="commitment")):
            assert time.monotonic() < deadline, "no attempt to report"
            time.sleep(0.05)  # poll interval
        shown = subprocess.run([*minipacs_command(), "queue", "--commitments", "--data-dir",
                                str(running.data_dir)], capture_output=True, text=True,
                               timeout=120, env=dict(os.environ))
        assert f"{MODALITY}: 1 waiting, 0 failed" in shown.stdout, shown
        running.server.stop(grace=5)
        again = start_server(data_dir=running.data_dir, peers=[
            {"ae_title": MODALITY, "host": "127.0.0.1", "port": modality.port}], **overrides)
        modality.listen()
        event_type, info, _ = modality.report(again)
    assert (event_type, info.TransactionUID) == (status.COMMITMENT_SUCCESSFUL, transaction)


def test_requests_that_cannot_be_committed_are_refused(
        start_server: Callable[..., Running]) -> None:
    with modality_and_server(start_server) as (modality, running):
        ct = (CTImageStorage, uid())
        cases = [
            (dict(transaction=uid(), refs=[ct], title="STRANGER"), status.PROCESSING_FAILURE,
             "not in peers with a host"),
            (dict(transaction=uid(), refs=[ct], action=2), status.NO_SUCH_ACTION, "Action"),
            (dict(transaction=uid(), refs=[ct], instance=uid()),
             status.NO_SUCH_OBJECT_INSTANCE, "SOP Instance"),
            (dict(transaction="", refs=[ct]), status.INVALID_ARGUMENT_VALUE, "Transaction"),
            (dict(transaction=uid(), refs=[]), status.INVALID_ARGUMENT_VALUE, "Referenced"),
        ]
        for kwargs, code, comment in cases:
            rsp = modality.request(running, **kwargs)  # type: ignore[arg-type]
            assert rsp.Status == code, (kwargs, rsp)
            assert comment in rsp.ErrorComment, rsp.ErrorComment
        assert running.archive.outbox.entries(kind="commitment") == []


def test_a_peer_without_commit_in_its_services_is_refused(
        start_server: Callable[..., Running]) -> None:
    with reserved_port() as port:
        running = start_server(peers=[{"ae_title": MODALITY, "host": "127.0.0.1",
                                       "port": port, "services": ["store"]}])
    rsp = Modality(port).request(running, uid(), [(CTImageStorage, uid())])
    assert rsp.Status == status.NOT_AUTHORISED
