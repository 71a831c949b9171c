"""PS3.15 Table E.1-1, "Application Level Confidentiality Profile Attributes", read from the
standard's own DocBook source (``part15.xml``).

minipacs carries no copy of the table: it reads the edition the site supplies (the file
NEMA publishes at ``https://dicom.nema.org/medical/dicom/current/source/docbook/part15/part15.xml``),
so the actions are the standard's, row for row, and a newer edition is a new file, not a
code change. The reader checks the table's column headings and every action code, and
refuses a layout it does not know rather than guess.
"""

from __future__ import annotations

import enum
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StorageError

DOCBOOK = "{http://docbook.org/ns/docbook}"
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"
TABLE_ID = "table_E.1-1"


class Option(enum.Enum):
    """The options of the Basic Application Level Confidentiality Profile that the table
    has a column for (PS3.15 E.3), by their column; the value is the option's name in
    config and in the CID 7050 code pydicom names it by."""

    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    RETAIN_UIDS = "retain_uids"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_LONG_FULL_DATES = "retain_long_full_dates"
    RETAIN_LONG_MODIFIED_DATES = "retain_long_modified_dates"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"


HEADINGS: tuple[tuple[str, Option | None], ...] = (
    ("Attribute Name", None),
    ("Tag", None),
    ("Retd.", None),
    ("In Std. Comp. IOD", None),
    ("Basic Prof.", None),
    ("Rtn. Safe Priv. Opt.", Option.RETAIN_SAFE_PRIVATE),
    ("Rtn. UIDs Opt.", Option.RETAIN_UIDS),
    ("Rtn. Dev. Id. Opt.", Option.RETAIN_DEVICE_IDENTITY),
    ("Rtn. Inst. Id. Opt.", Option.RETAIN_INSTITUTION_IDENTITY),
    ("Rtn. Pat. Chars. Opt.", Option.RETAIN_PATIENT_CHARACTERISTICS),
    ("Rtn. Long. Full Dates Opt.", Option.RETAIN_LONG_FULL_DATES),
    ("Rtn. Long. Modif. Dates Opt.", Option.RETAIN_LONG_MODIFIED_DATES),
    ("Clean Desc. Opt.", Option.CLEAN_DESCRIPTORS),
    ("Clean Struct. Cont. Opt.", Option.CLEAN_STRUCTURED_CONTENT),
    ("Clean Graph. Opt.", Option.CLEAN_GRAPHICS),
)
"""The table's columns, in order, by the start of their heading (E.1-1 as of 2024c)."""

CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
"""The action codes of PS3.15 Table E.1-1a; anything else in a cell is refused."""

_TAG = re.compile(r"\(([0-9A-Fx]{4}),([0-9A-Fx]{4})\)", re.IGNORECASE)
_PRIVATE = re.compile(r"\(gggg,eeee\) where gggg is odd", re.IGNORECASE)


@dataclass(frozen=True)
class Rule:
    """One row: the attributes it covers (``tag & mask == value``; a repeating group such
    as Overlay Data (60xx,3000) has x digits masked out) and its action codes."""

    name: str
    tag: str
    value: int
    mask: int
    basic: str
    options: Mapping[Option, str] = field(default_factory=dict)
    retired: bool = False

    def covers(self, tag: int) -> bool:
        return tag & self.mask == self.value


@dataclass(frozen=True)
class Table:
    """The rows of Table E.1-1 of one edition, looked up by tag."""

    edition: str
    sha256: str
    rules: tuple[Rule, ...]
    private: Rule | None
    """The "(gggg,eeee) where gggg is odd" row: every private attribute."""
    _exact: Mapping[int, Rule] = field(default_factory=dict, repr=False)
    _masked: tuple[Rule, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, edition: str, sha256: str, rules: tuple[Rule, ...],
           private: Rule | None) -> Table:
        exact = {r.value: r for r in rules if r.mask == 0xFFFFFFFF}
        masked = tuple(r for r in rules if r.mask != 0xFFFFFFFF)
        return cls(edition, sha256, rules, private, exact, masked)

    def rule(self, tag: int) -> Rule | None:
        """The row that covers ``tag``, if any (private attributes: :attr:`private`)."""
        if tag >> 16 & 1:  # an odd group: private (PS3.5 7.8.1)
            return self.private
        found = self._exact.get(tag)
        if found is not None:
            return found
        for rule in self._masked:
            if rule.covers(tag):
                return rule
        return None

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)


def _text(element: ET.Element | None) -> str:
    text = "".join(element.itertext()) if element is not None else ""
    return re.sub(r"\s+", " ", text.replace("\u200b", "").replace("\u00a0", " ")).strip()


def _mask(digits: str) -> tuple[int, int]:
    value = int("".join("0" if d in "xX" else d for d in digits), 16)
    mask = int("".join("0" if d in "xX" else "F" for d in digits), 16)
    return value, mask


def read_table(path: Path) -> Table:
    """Table E.1-1 from ``path``, the DocBook source of PS3.15.

    Raises
    ------
    StorageError
        The file is missing, is not PS3.15's DocBook, or its table is not laid out as
        :data:`HEADINGS` and :data:`CODES` say (a cell spanning columns, an unknown code):
        the message names the row and the column.
    """
    try:
        raw = path.read_bytes()
        root = ET.fromstring(raw)
    except (OSError, ET.ParseError) as exc:
        raise StorageError(f"PS3.15 table: cannot read {path}: {exc}") from exc
    subtitle = _text(root.find(f"{DOCBOOK}subtitle"))
    edition = re.search(r"PS3\.15 (\d{4}[a-z]?)", subtitle)
    table = next((t for t in root.iter(f"{DOCBOOK}table") if t.get(XML_ID) == TABLE_ID), None)
    if table is None:
        raise StorageError(f"PS3.15 table: {path} has no table {TABLE_ID} (is it part15.xml?)")
    head = table.find(f"{DOCBOOK}thead")
    headings = [_text(th) for th in head.iter(f"{DOCBOOK}th")] if head is not None else []
    if len(headings) != len(HEADINGS) or not all(
            got.startswith(want) for got, (want, _) in zip(headings, HEADINGS, strict=True)):
        raise StorageError(f"PS3.15 table: {path}: unknown columns {headings}")
    rules: list[Rule] = []
    private: Rule | None = None
    body = table.find(f"{DOCBOOK}tbody")
    for n, tr in enumerate(body.findall(f"{DOCBOOK}tr") if body is not None else [], 1):
        cells = tr.findall(f"{DOCBOOK}td")
        texts = [_text(td) for td in cells]
        if len(cells) != len(HEADINGS) or any(
                td.get("colspan", "1") != "1" or td.get("rowspan", "1") != "1" for td in cells):
            raise StorageError(f"PS3.15 table: {path}: row {n} {texts[:2]} is not one cell "
                               "per column")
        name, tag, retired, _, basic, *option_codes = texts
        for code, (heading, _) in zip([basic, *option_codes], HEADINGS[4:], strict=True):
            if code and code not in CODES:
                raise StorageError(f"PS3.15 table: {path}: row {n} {name} {tag}: unknown "
                                   f"action {code!r} under {heading!r}")
        if not basic:
            raise StorageError(f"PS3.15 table: {path}: row {n} {name} {tag} has no "
                               "Basic Profile action")
        options = {option: code for (_, option), code
                   in zip(HEADINGS[5:], option_codes, strict=True) if code and option}
        if _PRIVATE.fullmatch(tag):
            private = Rule(name, tag, 0x00010000, 0x00010000, basic, options)
            continue
        match = _TAG.fullmatch(tag)
        if match is None:
            raise StorageError(f"PS3.15 table: {path}: row {n} {name}: unknown tag {tag!r}")
        value, mask = _mask(match[1] + match[2])
        rules.append(Rule(name, tag.upper().replace("X", "x"), value, mask, basic, options,
                          retired == "Y"))
    if not rules:
        raise StorageError(f"PS3.15 table: {path}: table {TABLE_ID} has no rows")
    return Table.of(edition[1] if edition else "unknown", hashlib.sha256(raw).hexdigest(),
                    tuple(rules), private)
