"""Nodes watching each other's heartbeats in the index (scp/nodes.py): a node whose count
stands still for DEAD_AFTER_SECONDS of the watcher's clock loses its outbox leases to the
others; one that beats, or stopped cleanly, keeps them or has none."""

from __future__ import annotations

import datetime
import time

from scp.nodes import DEAD_AFTER_SECONDS, HEARTBEAT_SECONDS, Heartbeat
from storage import Archive
from storage.models import NodeBeat, OutboxItem


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def leased(owner: str, uid: str) -> OutboxItem:
    now = datetime.datetime.now()
    return OutboxItem.create(peer="PEER", route="r", sop_instance_uid=uid,
                             study_instance_uid="1.2", queued_at=now, due_at=now,
                             lease_owner=owner,
                             lease_until=now + datetime.timedelta(seconds=600))


def owners() -> dict[str, str]:
    return {row.sop_instance_uid: row.lease_owner for row in OutboxItem.select()}


def test_a_node_that_stops_beating_loses_its_leases_to_the_others(
        new_archive: Archive) -> None:
    clock = Clock()
    watcher = Heartbeat(new_archive, "host-a:10:aa", clock)
    dead = Heartbeat(new_archive, "host-b:20:bb", clock)
    leased("host-b:20:bb:1", "1.1")
    leased("host-b:20:bb", "1.2")
    leased("host-b:200:bb:1", "1.3")  # another process, whose name only begins alike
    leased("host-a:10:aa:1", "1.4")
    dead.tick()
    watcher.tick()
    ticks = int(DEAD_AFTER_SECONDS / HEARTBEAT_SECONDS)
    for _ in range(ticks - 1):  # the watcher beats on; the other's count stands still
        clock.now += HEARTBEAT_SECONDS
        watcher.tick()
    assert owners()["1.1"] == "host-b:20:bb:1"  # not yet
    clock.now += HEARTBEAT_SECONDS
    watcher.tick()
    assert owners() == {"1.1": "", "1.2": "", "1.3": "host-b:200:bb:1",
                        "1.4": "host-a:10:aa:1"}
    assert [row.name for row in NodeBeat.select()] == ["host-a:10:aa"]


def test_a_node_that_beats_keeps_its_leases(new_archive: Archive) -> None:
    clock = Clock()
    watcher = Heartbeat(new_archive, "host-a:10:aa", clock)
    slow = Heartbeat(new_archive, "host-b:20:bb", clock)
    leased("host-b:20:bb:1", "1.1")
    for n in range(30):
        if n % 8 == 0:  # beats now and then: every 16 s
            slow.tick()
        watcher.tick()
        clock.now += HEARTBEAT_SECONDS
    assert owners() == {"1.1": "host-b:20:bb:1"}
    # a watcher that saw count 4, but it beat in between: nothing freed
    slow.tick()
    assert new_archive.outbox.free_leases_of("host-b:20:bb", 4) is None
    assert owners() == {"1.1": "host-b:20:bb:1"}


def test_a_node_that_stops_cleanly_leaves_no_heartbeat_and_no_lease(
        new_archive: Archive) -> None:
    node = Heartbeat(new_archive, "host-a:10:aa")
    leased("host-a:10:aa:1", "1.1")  # a sender that did not finish in time
    leased("host-b:20:bb:1", "1.2")
    node.start()
    node.request_stop()
    node.join(deadline=time.monotonic() + 30)
    assert NodeBeat.select().count() == 0
    assert owners() == {"1.1": "", "1.2": "host-b:20:bb:1"}


def test_a_watcher_that_was_held_up_itself_does_not_take_the_others_for_dead(
        new_archive: Archive) -> None:
    clock = Clock()
    watcher = Heartbeat(new_archive, "host-a:10:aa", clock)
    other = Heartbeat(new_archive, "host-b:20:bb", clock)
    leased("host-b:20:bb:1", "1.1")
    other.tick()
    watcher.tick()
    clock.now += DEAD_AFTER_SECONDS * 2  # the watcher's own index was busy all along
    watcher.tick()
    assert owners() == {"1.1": "host-b:20:bb:1"}
    for _ in range(int(DEAD_AFTER_SECONDS / HEARTBEAT_SECONDS) + 1):  # then it stands still
        clock.now += HEARTBEAT_SECONDS
        watcher.tick()
    assert owners() == {"1.1": ""}
