"""The one wrapper of every DIMSE handler (scp/handlers.py).

It checks that the peer may use the service (scp/access.py), keeps the request in flight
and counts it (scp/activity.py), and answers every refusal and every error with its status
(scp/status.py), logging an error once: no exception reaches pynetdicom's catch-all. A
handler says only what is its own, and refuses a request by raising :class:`Refused`.

pynetdicom wants three kinds of handler (its ``_handlers.py`` documents each); the
wrapper makes the one of its :class:`Service`'s :class:`Kind` from a body that answers
with statuses of its own:

- :attr:`Kind.ANSWER` (C-ECHO, C-STORE): the body returns the status, the handler too;
- :attr:`Kind.MATCHES` (C-FIND): the body yields ``(Pending status, identifier)`` pairs and
  returns ``None`` when the matching is done, or the status that ends it early (FE00
  Cancel); the handler yields both;
- :attr:`Kind.ACTION` (N-ACTION): the body returns the status, the handler it and no
  Action Reply;
- :attr:`Kind.RETRIEVE` (C-GET, C-MOVE): the body performs the sub-operations and returns
  their final response (:class:`scp.retrieve.Final`); the handler makes pynetdicom send
  its own final response, which :class:`scp.engine.retrieve.Responses` rewrites with it.
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import events as evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE

from . import metrics, status
from .access import Access
from .activity import Activity
from .engine.retrieve import Responses, association_gone
from .retrieve import Final

P = ParamSpec("P")

Status = int | Dataset
"""A DIMSE status: its code, or a status data set (the code and an ErrorComment)."""

Matches = Generator[tuple[Status, Any], None, Status | None]
"""The body of a C-FIND handler (:attr:`Kind.MATCHES`): Pending statuses with their
identifiers (data sets, or as scp/engine/responses.py encodes them), and the status that
ends the matching early, if any."""


AUDIT_IDENTIFIER = 64 * 1024
"""Largest identifier whose keys the audit trail records (bytes, as received)."""
AUDIT_KEYS = 32
AUDIT_VALUE = 256
"""Most keys, and characters of each, an audit line records of a query."""
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT", "US", "UL", "SS", "SL"})
"""VRs of the query keys an audit line records (no binary, no sequence)."""


class Kind(enum.Enum):
    """How pynetdicom wants a service's handler to answer."""

    ANSWER = "answer"
    ACTION = "action"
    MATCHES = "matches"
    RETRIEVE = "retrieve"


@dataclass(frozen=True)
class Service:
    """A DIMSE service, as the wrapper sees it."""

    name: str
    """Its name in ``peers[].services`` and in the counts of the association's log line."""
    label: str
    """Its name in the log lines of its failures: ``C-STORE``."""
    kind: Kind
    error_status: Callable[[Exception], Dataset]
    """The status of an error raised while performing it (scp/status.py)."""


ECHO = Service("echo", "C-ECHO", Kind.ANSWER, status.error_status)
STORE = Service("store", "C-STORE", Kind.ANSWER, status.store_error_status)
FIND = Service("find", "C-FIND", Kind.MATCHES, status.find_error_status)
GET = Service("get", "C-GET", Kind.RETRIEVE, status.find_error_status)
MOVE = Service("move", "C-MOVE", Kind.RETRIEVE, status.find_error_status)
COMMIT = Service("commit", "N-ACTION", Kind.ACTION, status.error_status)


class Refused(Exception):
    """The request is answered with ``status`` and not performed (0122, 0124, A801,
    A900, ...): counted as failed, and not logged by the wrapper (the refusal says why,
    in its ErrorComment or in a line of the code that raised it)."""

    def __init__(self, status: Status) -> None:
        super().__init__(status)
        self.status = status


def handler(service: Service) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
    """Make the decorated body the handler of ``service`` (see the module's docstring).

    The handler takes the arguments of the body: the event, then those bound to it in
    scp/server.py, of which the last two are the :class:`~scp.activity.Activity` and the
    :class:`~scp.access.Access`. Failures are logged by the logger of the body's module.
    """
    run = _RUNS[service.kind]

    def wrap(body: Callable[P, Any]) -> Callable[P, Any]:
        logger = logging.getLogger(body.__module__)

        @functools.wraps(body)
        def handle(*args: P.args, **kwargs: P.kwargs) -> Any:
            event, activity, access = args[0], args[-2], args[-1]
            request = _Request(service, cast(evt.Event, event), cast(Activity, activity),
                               cast(Access, access), logger)
            return run(request, functools.partial(body, *args, **kwargs))

        return handle

    return wrap


class _Request:
    """One request in the wrapper: the checks, counts and log lines it shares with all."""

    def __init__(self, service: Service, event: evt.Event, activity: Activity,
                 access: Access, logger: logging.Logger) -> None:
        self.service = service
        self.event = event
        self.activity = activity
        self.access = access
        self.logger = logger
        self.started = time.monotonic()

    def check_access(self) -> None:
        """0124 Refused: Not Authorised (PS3.7 C.5.x, general status) when the peer may
        not use the service (its ``peers[].services``; :meth:`Access.allows` logs why)."""
        if not self.access.allows(self.event, self.service.name):
            raise Refused(status.not_authorised(self.service.name))

    def failure(self, exc: Exception) -> Status:
        """The status that answers ``exc``: a refusal's own, or the service's status of
        the error (logged once); counted as failed."""
        self.count(ok=False)
        if isinstance(exc, Refused):
            return exc.status
        requestor = self.event.assoc.requestor
        peer = f"{requestor.ae_title}@{requestor.address}"
        if isinstance(exc, ValueError | LookupError | OSError) or type(
                exc).__module__.startswith("storage"):
            self.logger.warning("%s from %s failed: %s", self.service.label, peer, exc)
        else:
            self.logger.exception("%s from %s failed unexpectedly", self.service.label, peer)
        return self.service.error_status(exc)

    def count(self, ok: bool, cancelled: bool = False) -> None:
        name = f"{self.service.name} cancelled" if cancelled else self.service.name
        self.activity.count(self.event, name, ok=ok)

    def measured(self, answer: Status | None, final: Final | None = None,
                 aborted: bool = False) -> None:
        """Record the operation for ``/metrics`` and in the audit trail: its final status
        (``None``: Success, as pynetdicom sends it for a C-FIND; ``aborted``: cut off with
        its association), how long it took, who asked for what (a retrieve's ``final``
        counts too)."""
        try:  # never the operation's failure
            code = status.SUCCESS if answer is None else int(
                answer.Status if isinstance(answer, Dataset) else answer)
            seconds = time.monotonic() - self.started
            label = "aborted" if aborted else metrics.status_label(code)
            metrics.OPERATIONS.labels(self.service.label, label).observe(seconds)
            requestor = self.event.assoc.requestor
            counts = {} if final is None else {
                "completed": final.completed, "failed": final.failed,
                "warning": final.warning}
            self.activity.audit.record(
                "dimse", operation=self.service.label, status=label,
                calling_ae=str(requestor.ae_title).strip(), address=requestor.address,
                ms=round(seconds * 1000, 1), **self.what(), **counts)
        except Exception:
            self.logger.exception("%s: metrics or audit trail not written", self.service.label)

    def gone(self) -> bool:
        """The peer aborted or released while the operation ran (its A-ABORT or
        A-RELEASE-RQ waits for the association's thread, busy here)."""
        try:
            return association_gone(self.event.assoc)
        except AttributeError:  # not an association of pynetdicom's (unit tests)
            return False

    def _keys(self, request: Any) -> dict[str, str]:
        """A query's non-empty text keys, bounded (:data:`AUDIT_KEYS`, :data:`AUDIT_VALUE`):
        decoded again only when small and not deflated (the handler parsed it with
        storage's own checks; pynetdicom's decoder inflates a deflated one whole)."""
        raw: Any = getattr(request, "Identifier", None)
        size = len(raw.getvalue()) if hasattr(raw, "getvalue") else 0
        if not size:
            return {}
        if size > AUDIT_IDENTIFIER or self.event.context.transfer_syntax.is_deflated:
            return {"(identifier)": f"{size} bytes, not recorded"}
        try:
            identifier = self.event.identifier
            keys = {}
            for elem in identifier:
                if elem.VR in TEXT_VRS and elem.value not in (None, ""):
                    if elem.VM > 1:  # as on the wire; cut only between values
                        value = "\\".join(map(str, elem.value))
                        if len(value) > AUDIT_VALUE:
                            cut = value[:AUDIT_VALUE + 1]
                            value = (cut.rsplit("\\", 1)[0] if "\\" in cut
                                     else cut[:AUDIT_VALUE])
                    else:
                        value = str(elem.value)[:AUDIT_VALUE]
                    keys[elem.keyword or str(elem.tag)] = value
                if len(keys) == AUDIT_KEYS:
                    break
            return keys
        except Exception:  # one that cannot be decoded was refused already
            return {}

    def what(self) -> dict[str, Any]:
        """What the request named, for the audit trail: a C-STORE's SOP Class and
        Instance, a query's or retrieve's non-empty keys (and a C-MOVE's destination)."""
        request: Any = self.event.request
        if request is None:
            return {}
        if self.service is STORE:
            return {"sop_class_uid": str(request.AffectedSOPClassUID),
                    "sop_instance_uid": str(request.AffectedSOPInstanceUID),
                    **getattr(self.event, NOTED, {})}
        if self.service is ECHO or self.service is COMMIT:
            return {}
        what: dict[str, Any] = {"keys": self._keys(request),
                                "sop_class_uid": str(self.event.context.abstract_syntax)}
        if self.service is MOVE:
            what["destination"] = str(request.MoveDestination).strip()
        what.update(getattr(self.event, NOTED, {}))  # a de-identified retrieve's profile
        return what


NOTED = "minipacs_audit"
"""The attribute of a pynetdicom event (our own) holding what its handler noted for its
audit line (:func:`note`)."""


def note(event: evt.Event, **fields: Any) -> None:
    """Add ``fields`` to the audit line of ``event``'s operation (what only the handler
    learns, e.g. a stored instance's Study Instance UID)."""
    setattr(event, NOTED, {**getattr(event, NOTED, {}), **fields})


def _answer(request: _Request, body: Callable[[], Status]) -> Status:
    """:attr:`Kind.ANSWER`: the body's status, or the failure's."""
    with request.activity.operation():
        try:
            request.check_access()
            answer = body()
        except Exception as exc:
            answer = request.failure(exc)
            request.measured(answer)
            return answer
    request.count(ok=True)
    request.measured(answer)
    return answer


def _action(request: _Request, body: Callable[[], Status]) -> tuple[Status, None]:
    """:attr:`Kind.ACTION`: as :attr:`Kind.ANSWER`, with no Action Reply."""
    return _answer(request, body), None


def _matches(request: _Request, body: Callable[[], Matches]) -> Iterator[Any]:
    """:attr:`Kind.MATCHES`: the body's Pending responses, then the failure's status, or
    the status the body ended early with (a C-FIND the peer cancelled is neither done nor
    failed: it is not counted), or nothing: pynetdicom sends Success itself (PS3.4
    C.4.1.1.4)."""
    with request.activity.operation():
        try:
            request.check_access()
            final = yield from body()
            if final is not None:  # PS3.4 C.4.1.1.4 FE00 Cancel
                request.measured(final)
                yield final, None
                return
        except GeneratorExit:  # pynetdicom stopped asking: the association went away
            request.measured(None, aborted=True)
            raise
        except Exception as exc:
            failed = request.failure(exc)
            request.measured(failed)
            yield failed, None
            return
    request.count(ok=True)
    request.measured(None, aborted=request.gone())


def _retrieve(request: _Request, body: Callable[[], Final]) -> Iterator[Any]:
    """:attr:`Kind.RETRIEVE`: the sub-operations, then the final response pynetdicom makes
    for what is yielded here, rewritten on its way out with the body's :class:`Final`
    (PS3.4 C.4.2.1.4, C.4.3.1.3), or with the failure's status."""
    event = request.event
    final: Final | None = None

    def rewrite(primitive: Any) -> None:
        if final is not None:
            final.rewrite(primitive, UID(str(event.context.transfer_syntax)))

    with request.activity.operation():
        responses = Responses(event.assoc, cast(C_GET | C_MOVE, event.request), rewrite)
        try:  # finally: also when pynetdicom drops us (the association went away)
            responses.install()
            try:
                request.check_access()
                final = body()
            except Exception as exc:
                final = Final.of(request.failure(exc))
            else:
                request.count(ok=True, cancelled=final.status == status.CANCEL)
            request.measured(final.status, final)
            if isinstance(event.request, C_GET):
                yield 1  # pynetdicom wants a number first: the final response follows it
                yield status.SUCCESS, None  # rewritten with ``final`` on its way out
            else:
                yield None, None  # no destination: pynetdicom answers A801, rewritten
        finally:
            responses.restore()


_RUNS: dict[Kind, Callable[[_Request, Callable[[], Any]], Any]] = {
    Kind.ANSWER: _answer, Kind.ACTION: _action, Kind.MATCHES: _matches,
    Kind.RETRIEVE: _retrieve}
