"""Cheap per-association copies of the presentation contexts we accept (scp/contexts.py)."""

from __future__ import annotations

import copy
from typing import Any

from pynetdicom.presentation import PresentationContext

from .versions import tested


def cheap_context_copies() -> bool:
    """Make the per-association copy of these contexts cheap (once per process); ``False``
    when the installed versions are not tested ones, and nothing was changed.

    pynetdicom 3.0 deep-copies the acceptor's supported contexts for every association
    (``RequestHandler._create_association``): with every Storage SOP Class times every
    transfer syntax, pydicom re-validated each UID against its regex, and the A-ASSOCIATE-AC
    left about 40 ms after the request (bench/README.md). The only mutable part of a
    ``PresentationContext`` is its transfer syntax list, and UIDs are immutable strings, so
    a deep copy is a shallow one with a list of its own. Pinned like scp/engine/reactor.py.
    """
    if "__deepcopy__" in vars(PresentationContext):
        return True
    if not tested("scp/engine/contexts.py", "each association copies every context the slow"
                  " way (about 40 ms)"):
        return False

    def __deepcopy__(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
        new = copy.copy(self)
        new._transfer_syntax = list(self._transfer_syntax)
        return new

    PresentationContext.__deepcopy__ = __deepcopy__  # type: ignore[attr-defined]
    return True
