"""Activity: one association, counted open once and closed once, whatever order its
events come in (review of 87de851: a connection lost in the middle of a C-MOVE drove
``minipacs_dicom_associations_open`` below zero)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import REGISTRY
from pynetdicom import events as evt

from scp.activity import Activity


def open_now() -> float:
    return REGISTRY.get_sample_value("minipacs_dicom_associations_open") or 0.0


def _event(assoc: Any, kind: Any) -> Any:
    return SimpleNamespace(assoc=assoc, event=kind)


def test_an_operation_counted_after_the_connection_closed_does_not_reopen_it() -> None:
    activity = Activity()
    requestor = SimpleNamespace(ae_title="MOVESCU", address="127.0.0.1", port=4242)
    assoc = SimpleNamespace(requestor=requestor, acceptor=SimpleNamespace(ae_title="PACS"))
    before = open_now()
    activity.handle_established(_event(assoc, evt.EVT_ESTABLISHED))
    assert open_now() == before + 1
    activity.handle_closed(_event(assoc, evt.EVT_CONN_CLOSE))  # the connection is gone
    activity.count(_event(assoc, None), "move", ok=True)  # the move ends after it
    activity.handle_closed(_event(assoc, evt.EVT_ABORTED))  # pynetdicom's own event
    assert open_now() == before
