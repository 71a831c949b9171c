"""Keyed, one-way replacements for identifying values (HMAC-SHA256, RFC 2104).

The same value and the same secret give the same replacement on every node, in every run
and in every study, so a de-identified patient keeps one pseudonym, one date shift and
consistent UIDs wherever the data goes; without the secret nothing links a replacement
back to the value (PS3.15 E.3.10 wants a replaced UID "internally consistent within a set
of Instances" and not derivable from the original by anyone else).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

DATE_SHIFT_DAYS = 3650
"""Dates move back by 1 to this many days, the same for every instance of a patient."""


class Pseudonyms:
    """Replacements keyed by ``secret``; each kind of value has a purpose of its own, so a
    PatientID and a UID that happen to be equal do not get related replacements."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the de-identification secret must have at least 16 bytes")
        self._secret = secret

    def _digest(self, purpose: str, value: str) -> bytes:
        message = purpose.encode("ascii") + b"\x00" + value.encode("utf-8")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def uid(self, value: str) -> str:
        """A UID under the 2.25 root (PS3.5 B.2: a UUID as a decimal integer) derived
        from ``value``: at most 44 characters, never ``value`` itself."""
        return f"2.25.{uuid.UUID(bytes=self._digest('uid', value)[:16], version=4).int}"

    def text(self, purpose: str, value: str, length: int = 16) -> str:
        """Upper-case hexadecimal of ``length`` characters (valid in every string VR,
        CS included)."""
        return self._digest(purpose, value).hex().upper()[:length]

    def patient(self, key: str) -> tuple[str, str]:
        """(PatientID, PatientName) for the patient known by ``key``."""
        code = self.text("patient", key)
        return code, f"ANONYMOUS^{code}"

    def date_shift_days(self, key: str) -> int:
        """Days by which the dates of the patient known by ``key`` move back."""
        return 1 + int.from_bytes(self._digest("date-shift", key)[:4], "big") % DATE_SHIFT_DAYS
