"""Association negotiation below pynetdicom's public API: rejecting a request from an
EVT_REQUESTED handler (pynetdicom's ``ACSE`` provider of the association)."""

from __future__ import annotations

from typing import Any


def reject(assoc: Any, result: int, source: int, reason: int) -> None:
    """Reject ``assoc``'s A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ of ``result``, ``source``
    and ``reason`` (PS3.8 9.3.4), as pynetdicom's own rejections do: send it, then wait
    until the DUL has sent it and end the association."""
    assoc.acse.send_reject(result, source, reason)
    assoc.kill()
