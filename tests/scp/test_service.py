"""The one wrapper of the DIMSE handlers (scp/service.py), without a network: the access
check, the counts, the refusals, and every error answered with its status and logged once,
for each kind of handler pynetdicom wants."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from scp import status
from scp.activity import Activity
from scp.retrieve import Final
from scp.service import ECHO, FIND, GET, MOVE, STORE, Matches, Refused, handler
from storage import InvalidQuery, StorageFull


class Recorded(Activity):
    """An Activity that remembers its counts and whether an operation is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def count(self, event: Any, service: str, ok: bool) -> None:
        self.counts[service if ok else f"{service} failed"] += 1


class Allowed:
    def __init__(self, *services: str) -> None:
        self.services = services

    def allows(self, event: Any, service: str) -> bool:
        return service in self.services


class Dimse:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_msg(self, primitive: Any, context_id: int) -> None:
        self.sent.append(primitive)


def event(request: Any = None) -> Any:
    requestor = SimpleNamespace(ae_title="MODALITY", address="10.0.0.7")
    assoc = SimpleNamespace(requestor=requestor, dimse=Dimse())
    context = SimpleNamespace(transfer_syntax=ImplicitVRLittleEndian, context_id=1)
    return SimpleNamespace(assoc=assoc, request=request, context=context)


# -- C-ECHO, C-STORE: the handler returns the status ----------------------------------------

@handler(STORE)
def store(event: Any, archive: Any, activity: Any, access: Any) -> int | Dataset:
    return archive()


def test_an_answer_is_counted_and_returned() -> None:
    activity = Recorded()
    assert store(event(), lambda: status.SUCCESS, activity, Allowed("store")) == status.SUCCESS
    assert activity.counts == {"store": 1}


def test_a_peer_without_the_right_is_refused_0124_before_the_body() -> None:
    activity, called = Recorded(), []
    answer = store(event(), lambda: called.append(1), activity, Allowed("find"))
    assert answer.Status == status.NOT_AUTHORISED
    assert answer.ErrorComment == "store is not allowed for this AE title"
    assert not called
    assert activity.counts == {"store failed": 1}


def test_a_refusal_is_the_answer_counted_as_failed_and_not_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    activity = Recorded()

    def refuse() -> int:
        raise Refused(status.sop_class_mismatch("1.2.3", "1.2.4"))
    with caplog.at_level(logging.DEBUG):
        answer = store(event(), refuse, activity, Allowed("store"))
    assert answer.Status == status.STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert activity.counts == {"store failed": 1}
    assert not caplog.records


def test_a_storage_error_gets_its_status_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    activity = Recorded()

    def full() -> int:
        raise StorageFull("the disk is full")
    with caplog.at_level(logging.DEBUG):
        answer = store(event(), full, activity, Allowed("store"))
    assert answer.Status == status.STORE_OUT_OF_RESOURCES
    assert answer.ErrorComment == "the disk is full"
    assert activity.counts == {"store failed": 1}
    [record] = caplog.records
    assert (record.name, record.levelno) == (__name__, logging.WARNING)  # the body's module
    assert record.getMessage() == "C-STORE from MODALITY@10.0.0.7 failed: the disk is full"


def test_an_unexpected_error_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise ZeroDivisionError("oops")
    with caplog.at_level(logging.DEBUG):
        answer = store(event(), broken, Recorded(), Allowed("store"))
    assert answer.Status == status.STORE_PROCESSING_FAILURE
    assert answer.ErrorComment == "internal error: ZeroDivisionError"
    [record] = caplog.records
    assert record.getMessage() == "C-STORE from MODALITY@10.0.0.7 failed unexpectedly"
    assert record.exc_info is not None


def test_an_echo_takes_no_archive_and_fails_0110() -> None:
    @handler(ECHO)
    def echo(event: Any, activity: Any, access: Any) -> int:
        raise RuntimeError("cannot happen")
    activity = Recorded()
    assert echo(event(), activity, Allowed("echo")).Status == status.PROCESSING_FAILURE
    assert echo(event(), activity, Allowed()).Status == status.NOT_AUTHORISED
    assert activity.counts == {"echo failed": 2}


def test_the_operation_is_in_flight_while_the_body_runs() -> None:
    activity = Recorded()
    seen = []
    store(event(), lambda: seen.append(activity.wait_idle(0)) or 0, activity, Allowed("store"))
    assert seen == [False]
    assert activity.wait_idle(0)


# -- C-FIND: the handler yields ---------------------------------------------------------

@handler(FIND)
def find(event: Any, body: Any, activity: Any, access: Any) -> Matches:
    return (yield from body())


def matches(*identifiers: str, final: int | None = None,
            error: Exception | None = None) -> Any:
    def body() -> Matches:
        for name in identifiers:
            yield status.PENDING, name
        if error is not None:
            raise error
        return final
    return body


def test_matches_are_pending_and_the_find_counted() -> None:
    activity = Recorded()
    assert list(find(event(), matches("a", "b"), activity, Allowed("find"))) == [
        (status.PENDING, "a"), (status.PENDING, "b")]
    assert activity.counts == {"find": 1}


def test_a_cancelled_find_ends_with_fe00_and_is_not_counted() -> None:
    activity = Recorded()
    answers = list(find(event(), matches("a", final=status.CANCEL), activity, Allowed("find")))
    assert answers == [(status.PENDING, "a"), (status.CANCEL, None)]
    assert not activity.counts


def test_an_error_after_some_matches_ends_the_find_with_its_status(
        caplog: pytest.LogCaptureFixture) -> None:
    activity = Recorded()
    answers = list(find(event(), matches("a", error=InvalidQuery("no such level")), activity,
                        Allowed("find")))
    assert answers[0] == (status.PENDING, "a")
    assert answers[1][0].Status == status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    assert len(answers) == 2
    assert activity.counts == {"find failed": 1}
    assert "C-FIND from MODALITY@10.0.0.7 failed: no such level" in caplog.text


def test_a_find_refused_yields_its_status_only() -> None:
    activity = Recorded()
    [(answer, identifier)] = list(find(event(), matches("a"), activity, Allowed()))
    assert (answer.Status, identifier) == (status.NOT_AUTHORISED, None)
    assert activity.counts == {"find failed": 1}


# -- C-GET, C-MOVE: pynetdicom's final response, rewritten -----------------------------

def request(kind: type[Any]) -> Any:
    req = kind()
    req.MessageID = 5
    return req


def run(kind: type[Any], answers: Iterator[Any], ev: Any) -> tuple[list[Any], Any]:
    """What the handler yields, and the final response that pynetdicom then sends as it
    arrives on the socket: pynetdicom sends it after the handler's last yield (Success for
    a C-GET, no destination for a C-MOVE), then lets the handler go."""
    yielded = [next(answers) for _ in range(2 if kind is C_GET else 1)]
    rsp = kind()
    rsp.MessageIDBeingRespondedTo = 5
    rsp.Status = status.SUCCESS if kind is C_GET else status.MOVE_DESTINATION_UNKNOWN
    ev.assoc.dimse.send_msg(rsp, 1)
    assert list(answers) == []
    [sent] = ev.assoc.dimse.sent
    return yielded, sent


@handler(GET)
def get(event: Any, body: Any, activity: Any, access: Any) -> Final:
    return body()


@handler(MOVE)
def move(event: Any, body: Any, activity: Any, access: Any) -> Final:
    return body()


@pytest.mark.parametrize(("kind", "retrieve", "yielded"), [
    (C_GET, get, [1, (status.SUCCESS, None)]), (C_MOVE, move, [(None, None)])])
@pytest.mark.parametrize(("final", "counted"), [
    (Final(status.SUCCESS, completed=3), "{} "),
    (Final(status.SUBOPERATIONS_WITH_FAILURES, completed=2, failed=1, failed_uids=["1.2"]),
     "{} "),
    (Final(status.CANCEL, remaining=2, completed=1), "{} cancelled")])
def test_a_retrieve_ends_with_its_final_response(
        kind: type[Any], retrieve: Any, yielded: list[Any], final: Final, counted: str) -> None:
    ev, activity = event(request(kind)), Recorded()
    name = "get" if kind is C_GET else "move"
    answers, rsp = run(kind, retrieve(ev, lambda: final, activity, Allowed(name)), ev)
    assert answers == yielded
    assert rsp.Status == final.status
    assert rsp.NumberOfCompletedSuboperations == final.completed
    assert (rsp.Identifier is not None) == bool(final.failed)
    assert activity.counts == {counted.format(name).strip(): 1}


@pytest.mark.parametrize(("kind", "retrieve"), [(C_GET, get), (C_MOVE, move)])
@pytest.mark.parametrize(("body", "code", "comment"), [
    (None, status.NOT_AUTHORISED, "{} is not allowed for this AE title"),
    (Refused(status.MOVE_DESTINATION_UNKNOWN), status.MOVE_DESTINATION_UNKNOWN, None),
    (InvalidQuery("bad"), status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "bad"),
    (KeyError("x"), status.UNABLE_TO_PROCESS, "internal error: KeyError")])
def test_a_retrieve_refused_or_failed_ends_with_that_status(
        kind: type[Any], retrieve: Any, body: Exception | None, code: int,
        comment: str | None) -> None:
    ev, activity = event(request(kind)), Recorded()
    name = "get" if kind is C_GET else "move"

    def fail() -> Final:
        assert body is not None
        raise body
    _, rsp = run(kind, retrieve(ev, fail, activity,
                                Allowed(name) if body is not None else Allowed()), ev)
    assert rsp.Status == code
    assert rsp.ErrorComment == (comment.format(name) if comment else None)
    assert rsp.Identifier is None  # PS3.4 C.4.2.1.4.2: no sub-operation failed
    assert activity.counts == {f"{name} failed": 1}


def test_a_retrieve_dropped_by_pynetdicom_gives_the_association_back() -> None:
    ev = event(request(C_GET))
    original = ev.assoc.dimse.send_msg
    answers: Iterator[Any] = get(ev, lambda: Final(status.SUCCESS), Recorded(),
                                 Allowed("get"))
    assert next(answers) == 1
    assert ev.assoc.dimse.send_msg != original  # the final response would be rewritten
    answers.close()
    assert ev.assoc.dimse.send_msg == original
