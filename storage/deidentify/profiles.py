"""The site's de-identification settings (config ``deidentify`` and ``profiles``) as the
archive uses them: the table read once, a :class:`~.profile.Deidentifier` per profile."""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StorageError
from .profile import Deidentifier, Profile
from .table import Option, Table, read_table

MIN_SECRET_LENGTH = 16
"""Fewest characters of ``deidentify.secret`` (the HMAC key of every replacement)."""

_SAFE_PRIVATE = re.compile(r"\((?P<group>[0-9A-Fa-f]{4}),xx(?P<element>[0-9A-Fa-f]{2})\)\s+"
                           r"(?P<creator>\S.*)")


def safe_private_problem(text: str) -> str | None:
    """Why ``text`` is not a safe private attribute as config names one, the way PS3.15
    Table E.3.10-1 lists them: ``(gggg,xxee) CREATOR``, its odd group, the last two
    hexadecimal digits of its element and its private creator, as in
    ``(0019,xx0C) SIEMENS MR HEADER``; or None."""
    match = _SAFE_PRIVATE.fullmatch(text.strip())
    if match is None:
        return (f"{text!r} is not (gggg,xxee) CREATOR (an odd group, \"xx\" and the element's "
                "last two hexadecimal digits, then its private creator, e.g. \"(0019,xx0C) "
                "SIEMENS MR HEADER\")")
    if not int(match["group"], 16) & 1 or int(match["group"], 16) < 0x0009:
        return f"{text!r}: {match['group']} is not a private group (odd, 0009 or above)"
    return None


def safe_private(text: str) -> tuple[int, str, int]:
    """``(gggg,xxee) CREATOR`` as (group, creator, element byte); see
    :func:`safe_private_problem`."""
    match = _SAFE_PRIVATE.fullmatch(text.strip())
    if match is None or safe_private_problem(text):
        raise ValueError(safe_private_problem(text))
    return int(match["group"], 16), match["creator"].strip(), int(match["element"], 16)


def option_problem(name: str) -> str | None:
    """Why ``name`` is not an option of Table E.1-1 (:class:`~.table.Option`), or None."""
    known = [o.value for o in Option]
    return None if name in known else f"unknown option {name!r} (known: {', '.join(known)})"


@dataclass(frozen=True)
class DeidentifyOptions:
    """``deidentify`` and ``profiles``: the standard's table (``part15.xml``), the secret
    that keys every replacement, the profiles by name, and whether instances with burned-in
    annotation may go out de-identified all the same."""

    table: Path
    secret: str = field(repr=False)
    profiles: Mapping[str, Profile]
    send_burned_in: bool = False


class Deidentifiers:
    """The profiles of :class:`DeidentifyOptions`, each made once (the table is read at
    the first use, by one thread)."""

    def __init__(self, options: DeidentifyOptions | None) -> None:
        self.options = options
        self._lock = threading.Lock()
        self._table: Table | None = None
        self._unreadable: StorageError | None = None
        self._made: dict[str, Deidentifier] = {}

    @property
    def send_burned_in(self) -> bool:
        return self.options is not None and self.options.send_burned_in

    def prepare(self) -> None:
        """Read the table and make every profile now (a server, before it listens: the
        first de-identified retrieve would otherwise wait ~0.3 s for the table).

        Raises
        ------
        StorageError
            The table cannot be read (the message says why).
        """
        if self.options is not None:
            for name in self.options.profiles:
                self.get(name)

    def get(self, name: str) -> Deidentifier:
        """The de-identifier of profile ``name``.

        Raises
        ------
        StorageError
            No such profile, or the table cannot be read (the message says why).
        """
        if self.options is None or name not in self.options.profiles:
            known = ", ".join(self.options.profiles) if self.options else ""
            raise StorageError(f"no de-identification profile {name!r} (profiles: "
                               f"{known or 'none configured'})")
        with self._lock:
            made = self._made.get(name)
            if made is None:
                if self._unreadable is not None:  # said once: not read again per instance
                    raise StorageError(str(self._unreadable))
                if self._table is None:
                    try:
                        self._table = read_table(self.options.table)
                    except StorageError as exc:
                        self._unreadable = exc
                        raise
                made = self._made[name] = Deidentifier(
                    self._table, self.options.profiles[name], self.options.secret.encode())
            return made
