"""Every attribute Table E.1-1 lists, checked in the output of real files and of a data set
made to carry every row of the table, under the Basic Profile and under each option alone
(PS3.15 E.1, E.3). The expectations are read from the table, row by row.

The table: tests/storage/data/part15-sample.xml, the standard's DocBook layout with rows
typed in for the tests; and the standard's own ``part15.xml`` too, when ``MINIPACS_PART15``
names it or the project's ``shared/`` folder beside the repository holds it (minipacs
carries no copy of it: README, "De-identification").
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from storage.deidentify import Deidentifier, Option, Profile, Table, action, read_table

SAMPLE = Path(__file__).parent / "data" / "part15-sample.xml"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "part15.xml"
"""Where the project's shared folder (beside the repository) would hold the standard's."""
SECRET = b"the files test's secret, 32 b..."
TABLES = [SAMPLE] + ([Path(os.environ["MINIPACS_PART15"])] if os.environ.get("MINIPACS_PART15")
                     else [SHARED] if SHARED.is_file() else [])
OPTION_SETS = [frozenset()] + [frozenset({o}) for o in Option]


def little_endian_files() -> list[Path]:
    """pydicom's test files that pydicom reads and that are little endian (Explicit VR Big
    Endian is retired and not de-identified: README)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files("*.dcm")):
            try:
                ds = dcmread(name)
                little = ds.original_encoding[1]
                for element in ds.iterall():
                    element.value  # noqa: B018 (every value decodes)
                ds.save_as(Path(os.devnull), enforce_file_format=False)
            except Exception:  # a damaged or unwritable sample of pydicom's
                continue
            if little and "truncated" not in name:  # cut short on purpose: it fails
                found.append(Path(name))
    return found


FILES = little_endian_files()


@pytest.fixture(scope="module", params=TABLES, ids=lambda p: p.name)
def table(request: pytest.FixtureRequest) -> Table:
    return read_table(request.param)


def pairs(before: Dataset, after: Dataset, table: Table, options: frozenset[Option]
          ) -> Iterator[tuple[int, object, object, bool]]:
    """(tag, value before, value after, still there) of each attribute of ``before``,
    nested ones included where the sequence was kept (not replaced by a dummy, ``D``)."""
    for element in before:
        tag = int(element.tag)
        there = tag in after
        value = after[tag].value if there else None
        yield tag, element.value, value, there
        rule = table.rule(tag)
        dummy = rule is not None and action(rule, options) in ("D", "Z/D", "X/D", "X/Z/D")
        if (element.VR == "SQ" and there and not dummy and isinstance(value, Sequence)
                and len(value) == len(element.value)):
            for old, new in zip(element.value, value, strict=True):
                yield from pairs(old, new, table, options)


def wrong(code: str, tag: int, before: object, after: object, there: bool,
          options: frozenset[Option]) -> str | None:
    """What is wrong with one attribute's outcome under ``code`` (Table E.1-1a, as
    minipacs applies the combined codes: README), or None."""
    empty = after in ("", None, b"") or (isinstance(after, Sequence) and not after)
    if code == "X":
        return f"kept {after!r}" if there else None
    if not there:
        return "removed"
    if code in ("Z", "X/Z"):
        return None if empty or after != before else f"kept {after!r}"
    if code in ("D", "Z/D", "X/D", "X/Z/D", "U"):
        if before in ("", None, b""):
            return None
        return None if not empty and after != before else f"gave {after!r}"
    if code == "K" and not isinstance(before, Sequence):
        return None if after == before else f"changed to {after!r}"
    if code == "C" and Option.RETAIN_LONG_MODIFIED_DATES in options:
        vr = _vr(tag)
        if vr in ("DA", "DT") and before:
            return None if after != before else f"date kept {after!r}"
    return None


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


@pytest.mark.parametrize("options", OPTION_SETS,
                         ids=lambda o: "+".join(sorted(x.value for x in o)) or "basic")
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_listed_attribute_of_a_real_file(table: Table, path: Path,
                                               options: frozenset[Option]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        out = Deidentifier(table, Profile("p", options), SECRET).apply(ds).dataset
    problems = []
    for tag, before, after, there in pairs(ds, out, table, options):
        if tag >> 16 & 1:
            if there:
                problems.append(f"{tag:08X} private, kept")
            continue
        rule = table.rule(tag)
        if rule is None or tag in (0x00120062, 0x00120063, 0x00120064, 0x00280303):
            continue
        why = wrong(action(rule, options), tag, before, after, there, options)
        if why:
            problems.append(f"{rule.name} {tag:08X} ({action(rule, options)}): {why}")
    assert problems == []
    assert out.PatientIdentityRemoved == "YES"
    if "PixelData" in ds:
        assert out.PixelData == ds.PixelData


def every_row(table: Table) -> Dataset:
    """A data set with an attribute for each row of ``table`` that pydicom's dictionary
    knows (a repeating group in its first group), each with a value, a sequence with an
    item holding a UID, and a private block."""
    ds = Dataset()
    for n, rule in enumerate(table):
        tag = rule.value if rule.value & 0xFFFF else rule.value | 0x3000  # (50xx,xxxx)
        vr = _vr(tag)
        if vr == "UN" or " or " in vr:
            vr = "OB" if vr == "UN" else vr.split(" or ")[-1]
        value: object = {
            "DA": "20240301", "DT": "20240301101500", "TM": "101500", "UI": f"1.2.3.{n}",
            "AS": "042Y", "IS": "7", "DS": "1.5", "PN": f"Person^Number{n}",
            "SQ": Sequence([_item(n)]), "AT": 0x00100010, "US": 7, "SS": 7, "UL": 7,
            "SL": 7, "FL": 1.5, "FD": 1.5, "SV": 7, "UV": 7,
        }.get(vr, f"VALUE{n}")
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            value = b"\x01\x02"
        ds.add_new(tag, vr, value)
    ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x10, "LO", "Doe^John")
    return ds


def _item(n: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPInstanceUID = f"1.2.3.{n}.1"
    return item


@pytest.mark.parametrize("options", OPTION_SETS,
                         ids=lambda o: "+".join(sorted(x.value for x in o)) or "basic")
def test_every_row_of_the_table(table: Table, options: frozenset[Option]) -> None:
    ds = every_row(table)
    out = Deidentifier(table, Profile("p", options), SECRET).apply(ds).dataset
    problems = []
    seen = 0
    for tag, before, after, there in pairs(ds, out, table, options):
        rule = table.rule(tag)
        if tag >> 16 & 1:
            if there:
                problems.append(f"{tag:08X} private, kept")
            continue
        if rule is None or tag in (0x00120062, 0x00120063, 0x00120064, 0x00280303):
            continue
        seen += 1
        why = wrong(action(rule, options), tag, before, after, there, options)
        if why:
            problems.append(f"{rule.name} {tag:08X} ({action(rule, options)}): {why}")
    assert problems == []
    assert seen >= len([r for r in table if _vr(r.value) != "UN"]) - 4  # the markers' rows
