"""Association negotiation below pynetdicom's public API: rejecting a request from an
EVT_REQUESTED handler (pynetdicom's ``ACSE`` provider of the association)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("pynetdicom.acse")  # where pynetdicom says it


def reject(assoc: Any, result: int, source: int, reason: int) -> None:
    """Reject ``assoc``'s A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ of ``result``, ``source``
    and ``reason`` (PS3.8 9.3.4), as pynetdicom's own rejections do: send it, then wait
    until the DUL has sent it and end the association."""
    assoc.acse.send_reject(result, source, reason)
    assoc.kill()


def keep_quick_rejections() -> None:
    """A rejection that arrives before pynetdicom's requestor looks stays a rejection.

    ``ACSE._negotiate_as_requestor`` sends the A-ASSOCIATE-RQ, waits until the socket is
    ready, then takes a socket that is no longer connected for a failed connection and
    calls ``Association.abort()``. But the DUL thread may already have received the peer's
    A-ASSOCIATE-RJ by then: action AE-4 (PS3.8 9.2) queues the rejection for the user and
    closes the transport. So a peer that rejects at once (ours does, for an AE title not in
    ``peers``) was seen as an abort now and then, with ``is_rejected`` false and the reason
    lost: one association in a few hundred on a loaded 2-core machine. During the
    negotiation, an ``abort()`` with that rejection queued records the rejection instead,
    as pynetdicom's own path does when it reads one (``acceptor.primitive``, the log lines,
    ``is_rejected``, ``EVT_REJECTED``, the DUL stopped); no A-ABORT is sent.
    """
    from pynetdicom import evt
    from pynetdicom.acse import ACSE
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    original = ACSE._negotiate_as_requestor
    if getattr(original, "_minipacs", False):
        return

    def negotiate(self: Any) -> None:
        assoc = self.assoc
        abort = assoc.abort

        def abort_unless_rejected(*args: Any, **kwargs: Any) -> None:
            waiting = self.dul.peek_next_pdu()
            if not (isinstance(waiting, A_ASSOCIATE) and waiting.result in (0x01, 0x02)):
                abort(*args, **kwargs)
                return
            self.dul.receive_pdu(wait=False)
            self.acceptor.primitive = waiting
            logger.error("Association Rejected")
            logger.error("Result: %s, Source: %s", waiting.result_str, waiting.source_str)
            logger.error("Reason: %s", waiting.reason_str)
            assoc.is_rejected = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            self.dul.kill_dul()

        assoc.abort = abort_unless_rejected
        try:
            original(self)
        finally:
            del assoc.abort  # the class's own again

    negotiate._minipacs = True  # type: ignore[attr-defined]
    ACSE._negotiate_as_requestor = negotiate  # type: ignore[method-assign]
