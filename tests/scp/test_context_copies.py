"""scp/engine/contexts.py cheap_context_copies: a context's deep copy is equal to it and has its own
transfer syntax list (what pynetdicom may change while it negotiates an association)."""

from __future__ import annotations

import copy

from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.presentation import build_context

from scp.engine.contexts import cheap_context_copies


def test_a_copy_is_equal_and_independent() -> None:
    cheap_context_copies()
    original = build_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    original.context_id = 3
    original.scu_role = True
    copied = copy.deepcopy([original])[0]
    assert copied == original and copied is not original
    assert (copied.context_id, copied.scu_role, copied.scp_role) == (3, True, None)
    copied.add_transfer_syntax(JPEGBaseline8Bit)
    copied.context_id = 5
    assert original.transfer_syntax == [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert original.context_id == 3
