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

_SAFE_PRIVATE = re.compile(r"(?P<creator>.+)/(?P<element>[0-9A-Fa-f]{2})")


def safe_private_problem(text: str) -> str | None:
    """Why ``text`` is not a safe private attribute as config names one (``CREATOR/ee``:
    its private creator, then the last two hexadecimal digits of its element, as in
    ``SIEMENS MR HEADER/0C`` for (0019,xx0C)), or None."""
    match = _SAFE_PRIVATE.fullmatch(text)
    if match is None or not match["creator"].strip():
        return (f"{text!r} is not CREATOR/ee (a private creator, \"/\", and the element's "
                "last two hexadecimal digits, e.g. \"SIEMENS MR HEADER/0C\")")
    return None


def safe_private(text: str) -> tuple[str, int]:
    """``CREATOR/ee`` as (creator, element byte); see :func:`safe_private_problem`."""
    match = _SAFE_PRIVATE.fullmatch(text)
    if match is None:
        raise ValueError(safe_private_problem(text))
    return match["creator"].strip(), int(match["element"], 16)


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
                if self._table is None:
                    self._table = read_table(self.options.table)
                made = self._made[name] = Deidentifier(
                    self._table, self.options.profiles[name], self.options.secret.encode())
            return made
