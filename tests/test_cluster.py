"""Several nodes, one index, one store: three ``minipacs serve`` processes on one PostgreSQL
and one S3 bucket (SeaweedFS), behind HAProxy running ``deploy/haproxy.cfg``, every engine
real and started here on loopback.

- Four senders store through the balancer into the same two studies while one node is
  killed with SIGKILL: every acknowledged instance is there, once, with its object, every
  counter is exact, and the other nodes kept serving (the senders finish through them).
- The same instances sent to two nodes at once end as one instance each.
- ``verify`` and ``reindex --missing`` run beside the serving cluster; a whole ``reindex``
  is refused, also after PostgreSQL restarted under the nodes.
- A route on every node sends each instance once; when the node sending is killed, the
  others take its leased items over once its heartbeat stops.
- Storage Commitment asked of another node than the one stored to: one report.
- STOW-RS, QIDO-RS, WADO-RS, C-MOVE and DELETE through the balancer.
(The index or the object store down for a while under a node: tests/web/test_health.py.)
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom import events as evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from scp import status
from scp.nodes import DEAD_AFTER_SECONDS
from storage import ArchiveOptions, S3Options, index, open_archive
from storage.models import SCHEMA_VERSION, Instance, Series, Study
from tests.conftest import client_ae, free_port, reserved_port, unavailable
from tests.factory import make_ds, uid
from tests.objects import BUCKET, Weed
from tests.postgres import Postgres, started_postgres
from tests.test_cli import REPO, minipacs_command, wait_until_echo
from tests.test_commitment import MODALITY, Modality
from tests.test_retrieve import c_get

SENDERS = 4
PER_SENDER = 120
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    yield from started_postgres()


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.path.exists(p)), None)
    if found is None:
        unavailable("HAProxy is not installed (make test installs the Debian package haproxy)")
    assert found is not None
    return found


@dataclass
class Node:
    """One ``minipacs serve`` process."""

    name: str
    config: Path
    data_dir: Path
    port: int
    web_port: int
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        log = open(self.data_dir.parent / f"{self.name}.log", "a")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*minipacs_command(), "serve", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        log.close()

    def wait(self) -> None:
        assert self.process is not None
        wait_until_echo(self.port, self.process, timeout=60)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Cluster:
    nodes: list[Node]
    index_url: str
    files_url: str
    weed: Weed
    port: int  # the balancer's DICOM port
    web_port: int  # the balancer's HTTP port
    root: Path

    def archive_options(self) -> ArchiveOptions:
        return ArchiveOptions(files_path=self.root / "reader", index_url=self.index_url,
                              files_url=self.files_url, s3=S3Options(
                                  self.weed.endpoint, "us-east-1", "minipacs", "minipacs"))


def node_config(root: Path, name: str, index_url: str, files_url: str, weed: Weed,
                **more: Any) -> Node:
    data_dir = root / name
    data_dir.mkdir(parents=True)
    node = Node(name, root / f"{name}.yaml", data_dir, free_port(), free_port())
    config: dict[str, Any] = {
        "ae": {"title": "MINIPACS", "port": node.port, "bind": "127.0.0.1"},
        "storage": {"data_dir": str(data_dir), "index_url": index_url,
                    "files_url": files_url, "s3_endpoint": weed.endpoint,
                    "s3_region": "us-east-1", "s3_access_key_id": "minipacs",
                    "s3_secret_access_key": "minipacs"},
        "web": {"port": node.web_port, "bind": "127.0.0.1", "viewer": False},
        **more,
    }
    node.config.write_text(yaml.safe_dump(config))
    return node


def balancer_config(nodes: list[Node], port: int, web_port: int) -> str:
    """``deploy/haproxy.cfg`` with the nodes' loopback ports and the balancer's put in."""
    text = (REPO / "deploy" / "haproxy.cfg").read_text()
    text, binds = re.subn(r"^(\s+bind) :11112$", rf"\1 127.0.0.1:{port}", text, flags=re.M)
    text, web_binds = re.subn(r"^(\s+bind) :8080$", rf"\1 127.0.0.1:{web_port}", text,
                              flags=re.M)
    assert (binds, web_binds) == (1, 1), "deploy/haproxy.cfg no longer has the two binds"
    for i, node in enumerate(nodes, start=1):
        text, dicom = re.subn(rf"^(\s+server node{i}) \S+:11112 check port 8080$",
                              rf"\1 127.0.0.1:{node.port} check port {node.web_port}",
                              text, flags=re.M)
        text, web = re.subn(rf"^(\s+server node{i}) \S+:8080 check$",
                            rf"\1 127.0.0.1:{node.web_port} check", text, flags=re.M)
        assert (dicom, web) == (1, 1), f"deploy/haproxy.cfg has no server lines for node{i}"
    return text


def wait_for(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def start_cluster(postgres: Postgres, weed: Weed, tmp_path: Path
                  ) -> Iterator[Callable[..., Cluster]]:
    """``start_cluster(**config)``: three nodes, started at once on a new, empty database
    and prefix, behind HAProxy; ``config``'s sections go into each node's file."""
    nodes: list[Node] = []
    balancer: subprocess.Popen[str] | None = None

    def start(**more: Any) -> Cluster:
        nonlocal balancer
        index_url = postgres.new_database()
        files_url = f"s3://{BUCKET}/{uuid.uuid4().hex}"
        nodes.extend(node_config(tmp_path, f"node{i}", index_url, files_url, weed, **more)
                     for i in (1, 2, 3))
        port, web_port = free_port(), free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(balancer_config(nodes, port, web_port))
        for node in nodes:  # all at once: the first ones create the schema together
            node.start()
        for node in nodes:
            node.wait()
        log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115
        balancer = subprocess.Popen([haproxy_binary(), "-db", "-f", str(config)], stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
        log.close()
        wait_for("the balancer's health checks to pass",
                 lambda: balancer is not None and balancer.poll() is None
                 and healthy(web_port) and echo(port))
        return Cluster(nodes, index_url, files_url, weed, port, web_port, tmp_path)

    try:
        yield start
    finally:
        if balancer is not None:
            balancer.terminate()
            balancer.wait(timeout=30)
        for node in nodes:
            node.stop()


@pytest.fixture
def cluster(start_cluster: Callable[..., Cluster]) -> Cluster:
    """Three nodes with the default configuration behind HAProxy."""
    return start_cluster()


def echo(port: int) -> bool:
    ae = client_ae(storage=False)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    if not assoc.is_established:
        return False
    ok = getattr(assoc.send_c_echo(), "Status", None) == status.SUCCESS
    assoc.release()
    return ok


class Sender(threading.Thread):
    """A modality: stores its instances through ``port``, each until it is acknowledged
    (Success); an association that breaks is opened again and the unacknowledged instance
    sent again, as a modality's queue does. Any answer but Success is recorded."""

    def __init__(self, port: int, datasets: list[Dataset]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.queue = collections.deque(datasets)
        self.acknowledged: list[str] = []
        self.refused: list[int] = []
        self.broken = 0

    def run(self) -> None:
        ae = client_ae()
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
        assoc = None
        deadline = time.monotonic() + TIMEOUT
        while self.queue and time.monotonic() < deadline:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", self.port, ae_title="MINIPACS")
                if not assoc.is_established:
                    time.sleep(0.05)  # polling: the balancer is taking the dead node out
                    continue
            try:
                rsp = assoc.send_c_store(self.queue[0])
            except Exception:  # noqa: BLE001 - the connection went away mid-request
                rsp = None
            code = getattr(rsp, "Status", None)
            if code is None:  # no answer: the node died under it; send it again
                self.broken += 1
                assoc = None
                continue
            if code == status.SUCCESS:
                self.acknowledged.append(str(self.queue.popleft().SOPInstanceUID))
            else:
                self.refused.append(int(code))
                self.queue.popleft()
        if assoc is not None and assoc.is_established:
            assoc.release()


def test_a_node_killed_mid_ingest_loses_nothing_and_the_others_keep_serving(
        cluster: Cluster) -> None:
    studies = [uid(), uid()]
    senders = []
    for _ in range(SENDERS):
        series = {study: uid() for study in studies}
        datasets = [make_ds(StudyInstanceUID=studies[i % 2], PatientID="CLUSTER",
                            SeriesInstanceUID=series[studies[i % 2]])
                    for i in range(PER_SENDER)]
        senders.append(Sender(cluster.port, datasets))
    for sender in senders:
        sender.start()
    wait_for("the stores to get going",
             lambda: sum(len(s.acknowledged) for s in senders) >= 60)
    victim = cluster.nodes[1]
    victim.kill()
    for sender in senders:
        sender.join(timeout=TIMEOUT + 30)
    assert [s.refused for s in senders] == [[]] * SENDERS
    assert all(not s.queue for s in senders), "a sender could not finish through the others"
    assert [n.alive for n in cluster.nodes] == [True, False, True]
    acknowledged = {u for s in senders for u in s.acknowledged}
    assert len(acknowledged) == SENDERS * PER_SENDER

    # what the index holds: each instance once, the counters exact, every object there
    archive = open_archive(cluster.archive_options())
    try:
        rows = list(Instance.select(Instance.sop_instance_uid, Instance.file_key))
        assert sorted(r.sop_instance_uid for r in rows) == sorted(acknowledged)
        per_study = {s.study_instance_uid: (s.num_series, s.num_instances)
                     for s in Study.select()}
        assert per_study == {study: (SENDERS, SENDERS * PER_SENDER // 2) for study in studies}
        assert {r.num_instances for r in Series.select()} == {PER_SENDER // 2}
        objects = set(archive.files.keys())
        assert {r.file_key for r in rows} <= objects
        # the nodes, started at once on an empty database, made one schema
        assert [v for (v,) in archive.database.execute_sql(
            "SELECT version FROM schema_version").fetchall()] == [SCHEMA_VERSION]
    finally:
        archive.close()
        index.disconnect()

    # the others kept serving: a C-GET through the balancer, byte for byte
    received, responses = c_get_through(cluster, studies[0])
    assert int(responses[-1].Status) == status.SUCCESS
    assert len(received) == SENDERS * PER_SENDER // 2

    # verify beside the serving cluster: nothing wrong (the killed node's objects in flight,
    # if any, are too young to be taken for strays)
    proc = subprocess.run([*minipacs_command(), "verify", "--config",
                           str(cluster.nodes[0].config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # reindex would empty the index under the serving nodes: refused, whichever node asks
    proc = subprocess.run([*minipacs_command(), "reindex", "--config",
                           str(cluster.nodes[1].config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "stop every node first" in proc.stderr, proc.stderr
    # reindex --missing keeps the index: it runs beside them (nothing to add here: every
    # object is named, and the killed node's leftovers, if any, are too young to take)
    proc = subprocess.run([*minipacs_command(), "reindex", "--missing", "--config",
                           str(cluster.nodes[2].config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "indexed 0 files" in proc.stdout, proc.stdout + proc.stderr
    assert echo(cluster.port)


@dataclass
class Through:
    """The balancer, as :func:`tests.test_retrieve.c_get` reads a server."""

    port: int
    ae_title: str = "MINIPACS"


def c_get_through(cluster: Cluster, study: str) -> tuple[list[bytes], list[Dataset]]:
    return c_get(Through(cluster.port), StudyRootQueryRetrieveInformationModelGet,
                 QueryRetrieveLevel="STUDY", StudyInstanceUID=study)


def test_the_same_instances_sent_to_two_nodes_at_once_are_stored_once(
        cluster: Cluster) -> None:
    study = uid()
    datasets = [make_ds(StudyInstanceUID=study) for _ in range(40)]
    first, third = cluster.nodes[0], cluster.nodes[2]
    senders = [Sender(first.port, list(datasets)), Sender(third.port, list(datasets))]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(timeout=TIMEOUT + 30)
    assert [(len(s.acknowledged), s.refused) for s in senders] == [(40, []), (40, [])]
    archive = open_archive(cluster.archive_options())
    try:
        rows = list(Instance.select(Instance.sop_instance_uid, Instance.file_key))
        assert sorted(r.sop_instance_uid for r in rows) == sorted(
            str(ds.SOPInstanceUID) for ds in datasets)
        assert Study.get().num_instances == 40
        # the loser of each race removed its object: one object per instance
        assert set(archive.files.keys()) == {r.file_key for r in rows}
        for row in rows:
            with archive.files.open(row.file_key) as fp:
                assert dcmread(fp).SOPInstanceUID == row.sop_instance_uid
    finally:
        archive.close()
        index.disconnect()


class Peer:
    """A routing destination (pynetdicom): counts the C-STOREs it receives, by SOP Instance
    UID; while :attr:`gate` is clear it holds each one unanswered (up to a minute)."""

    def __init__(self) -> None:
        self.received: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.gate.set()
        ae = AE(ae_title="ARCHIVE2")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 32
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = int(self.server.server_address[1])

    def on_store(self, event: Any) -> int:
        with self.lock:
            self.received[str(event.request.AffectedSOPInstanceUID)] += 1
        self.gate.wait(60)
        return 0x0000

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()


def lease_holders(url: str) -> set[int]:
    """The process IDs of the nodes holding outbox leases (owners ``host:pid:tag:N``)."""
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT DISTINCT lease_owner FROM outbox WHERE lease_owner <> ''")
            return {int(owner.split(":")[1]) for (owner,) in cursor.fetchall()}
    finally:
        connection.close()


def outbox_size(url: str) -> int:
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM outbox")
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


def test_routing_sends_each_item_once_and_a_dead_nodes_items_are_taken_over(
        start_cluster: Callable[..., Cluster]) -> None:
    peer = Peer()
    try:
        cluster = start_cluster(
            peers=[{"ae_title": "ARCHIVE2", "host": "127.0.0.1", "port": peer.port}],
            routes=[{"name": "everything", "to": ["ARCHIVE2"]}])
        # every node polls the one outbox: each item goes once, by one of them
        first = [make_ds() for _ in range(60)]
        sender = Sender(cluster.port, first)
        sender.run()
        assert (len(sender.acknowledged), sender.refused) == (60, [])
        wait_for("the first instances to be routed", lambda: peer.count() == 60)
        wait_for("the outbox to empty", lambda: outbox_size(cluster.index_url) == 0)
        assert set(peer.received.values()) == {1}

        # the peer holds what it gets; the node sending it is killed; another sends it all
        peer.gate.clear()
        second = [make_ds() for _ in range(150)]
        sender = Sender(cluster.port, second)
        sender.run()
        assert (len(sender.acknowledged), sender.refused) == (150, [])
        wait_for("a node to be sending", lambda: peer.count() > 60)
        holders = lease_holders(cluster.index_url)
        victim = next(n for n in cluster.nodes
                      if n.process is not None and n.process.pid in holders)
        victim.kill()
        peer.gate.set()
        wait_for("every instance to reach the peer despite the kill",
                 lambda: peer.count() == 210, timeout=DEAD_AFTER_SECONDS * 3 + 60)
        assert {str(ds.SOPInstanceUID) for ds in first + second} == set(peer.received)
        wait_for("the outbox to empty", lambda: outbox_size(cluster.index_url) == 0)
        assert sum(1 for n in cluster.nodes if n.alive) == 2
    finally:
        peer.close()


def test_storage_commitment_asked_of_another_node_than_the_one_stored_to(
        start_cluster: Callable[..., Cluster]) -> None:
    with reserved_port() as port:
        cluster = start_cluster(peers=[{"ae_title": MODALITY, "host": "127.0.0.1",
                                        "port": port}])
    modality = Modality(port)
    modality.listen()
    try:
        stored = [make_ds(Modality="CT", SOPClassUID=CTImageStorage) for _ in range(5)]
        sender = Sender(cluster.nodes[0].port, stored)
        sender.run()
        assert (len(sender.acknowledged), sender.refused) == (5, [])
        transaction = uid()
        asked = [(CTImageStorage, str(ds.SOPInstanceUID)) for ds in stored]
        rsp = modality.request(Through(cluster.nodes[2].port),
                               transaction, [*asked, (CTImageStorage, uid())])
        assert rsp.Status == status.SUCCESS
        event_type, info, sender_title = modality.reports.get(timeout=60)
        assert (event_type, sender_title) == (status.COMMITMENT_FAILURES_EXIST, "MINIPACS")
        assert info.TransactionUID == transaction
        assert sorted(str(i.ReferencedSOPInstanceUID) for i in info.ReferencedSOPSequence) \
            == sorted(uid for _, uid in asked)
        assert len(info.FailedSOPSequence) == 1
        wait_for("the report to be settled", lambda: outbox_size(cluster.index_url) == 0)
        assert modality.reports.empty()  # one report, from one node
    finally:
        modality.close()



def test_reindex_is_refused_while_nodes_serve_even_after_the_index_restarted(
        postgres: Postgres, start_cluster: Callable[..., Cluster]) -> None:
    """The servers' shared advisory lock goes with their connections when PostgreSQL
    restarts; their heartbeats come back, and reindex looks at those too."""
    cluster = start_cluster()
    stored = make_ds()
    sender = Sender(cluster.port, [stored])
    sender.run()
    assert sender.acknowledged == [str(stored.SOPInstanceUID)]
    postgres.stop()
    postgres.start()
    wait_for("the nodes to be healthy again", lambda: healthy(cluster.web_port))
    proc = subprocess.run([*minipacs_command(), "reindex", "--config",
                           str(cluster.nodes[0].config)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "stop every node first" in proc.stderr, proc.stderr
    sender = Sender(cluster.port, [make_ds()])
    sender.run()
    assert len(sender.acknowledged) == 1  # and they store on
    assert outbox_size(cluster.index_url) == 0
    connection = psycopg2.connect(cluster.index_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM instance")
            assert cursor.fetchone()[0] == 2  # nothing was emptied
    finally:
        connection.close()


def test_dicomweb_c_move_and_delete_work_through_any_node(
        start_cluster: Callable[..., Cluster]) -> None:
    """STOW-RS, QIDO-RS and WADO-RS through the balancer (each request to any node); a
    C-MOVE through it to a peer; a DELETE through it; every node then answers the same."""
    from tests.web.test_stow import CONTENT_TYPE, body, part10

    peer = Peer()
    try:
        cluster = start_cluster(
            peers=[{"ae_title": "ARCHIVE2", "host": "127.0.0.1", "port": peer.port}])
        study = uid()
        datasets = [make_ds(StudyInstanceUID=study) for _ in range(6)]
        root = f"http://127.0.0.1:{cluster.web_port}/dicom-web"
        with httpx.Client(timeout=60) as client:
            rsp = client.post(f"{root}/studies", content=body(*map(part10, datasets)),
                              headers={"Content-Type": CONTENT_TYPE})
            assert rsp.status_code == 200, rsp.text
            for _ in range(3):  # round robin: each node answers in turn
                found = client.get(f"{root}/studies", params={"StudyInstanceUID": study})
                assert found.json()[0]["00201208"]["Value"] == [6]
            one = datasets[2]
            rsp = client.get(f"{root}/studies/{study}/series/{one.SeriesInstanceUID}"
                             f"/instances/{one.SOPInstanceUID}",
                             headers={"Accept": 'multipart/related; type="application/dicom"'})
            assert rsp.status_code == 200 and str(one.SOPInstanceUID).encode() in rsp.content

            moved = c_move_through(cluster, study, "ARCHIVE2")
            assert int(moved.Status) == status.SUCCESS
            assert sorted(peer.received) == sorted(str(ds.SOPInstanceUID) for ds in datasets)

            assert client.delete(f"{root}/studies/{study}").status_code in (200, 204)
            for node in cluster.nodes:  # gone everywhere, whichever node deleted it
                rsp = client.get(f"http://127.0.0.1:{node.web_port}/dicom-web/studies",
                                 params={"StudyInstanceUID": study})
                assert rsp.status_code == 204 or rsp.json() == []
    finally:
        peer.close()


def c_move_through(cluster: Cluster, study: str, destination: str) -> Dataset:
    """A STUDY-level C-MOVE through the balancer; its final response."""
    ae = AE(ae_title="MOVESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", cluster.port, ae_title="MINIPACS")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        responses = [rsp for rsp, _ in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    return responses[-1]
