"""What a C-MOVE proposes to its destination (scp/retrieve.py)."""

from __future__ import annotations

from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from scp.config import PeerConfig
from scp.retrieve import MAX_CONTEXTS, proposed_contexts
from storage import StoredInstance

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"


def items(*pairs: tuple[str, str]) -> list[StoredInstance]:
    return [StoredInstance(cls, f"1.2.3.{n}", ts, "k", 1) for n, (cls, ts) in enumerate(pairs)]


def as_tuples(contexts: list) -> list[tuple[str, list[str]]]:  # type: ignore[type-arg]
    return [(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax]) for cx in contexts]


PLAIN = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def test_an_uncompressed_context_per_class_then_each_stored_syntax() -> None:
    got = as_tuples(proposed_contexts(items(
        (CT, JPEG2000Lossless), (CT, JPEG2000Lossless), (CT, ExplicitVRLittleEndian),
        (MR, RLELossless), (MR, ImplicitVRLittleEndian)), PeerConfig("D", "h")))
    assert got == [(CT, PLAIN), (MR, PLAIN), (CT, [JPEG2000Lossless]), (MR, [RLELossless])]


def test_a_peer_transfer_syntax_is_the_only_one_proposed() -> None:
    peer = PeerConfig("D", "h", transfer_syntax=ImplicitVRLittleEndian)
    got = as_tuples(proposed_contexts(items((CT, JPEG2000Lossless), (MR, RLELossless)), peer))
    assert got == [(CT, [ImplicitVRLittleEndian]), (MR, [ImplicitVRLittleEndian])]


def test_never_more_than_128_contexts() -> None:
    many = items(*[(f"1.2.840.10008.5.1.4.1.1.{n}", JPEG2000Lossless) for n in range(100)])
    got = as_tuples(proposed_contexts(many, PeerConfig("D", "h")))
    assert len(got) == MAX_CONTEXTS
    assert got[:100] == [(f"1.2.840.10008.5.1.4.1.1.{n}", PLAIN) for n in range(100)]
    too_many = items(*[(f"1.2.840.10008.5.1.4.1.1.{n}", ExplicitVRLittleEndian)
                       for n in range(200)])
    assert len(proposed_contexts(too_many, PeerConfig("D", "h"))) == MAX_CONTEXTS
