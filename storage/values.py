"""Value normalisation shared by the index writer and the query matcher.

Stored values and query values pass through the same functions, so that matching compares
like with like: padding the VR allows is removed (PS3.5 6.2), dates and times are put into a
fixed-width form that sorts as it compares (PS3.4 C.2.2.2.5), and person names are folded for
case- and accent-insensitive matching when configured.
"""

from __future__ import annotations

import calendar
import datetime
import functools
import re
import unicodedata
from typing import Any

# PS3.5 6.2: for these VRs only trailing spaces are insignificant; for the other string VRs
# leading spaces are insignificant too.
_TRAILING_ONLY = frozenset({"ST", "LT", "UT", "UC", "UR"})
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
"""VRs whose values are bytes: never matched, bulk data when long (PS3.5 Table 6.2-1)."""
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX = 64
"""Most characters of a UID (PS3.5 9.1)."""


def is_uid(text: str) -> bool:
    """Whether ``text`` is a UID: digits in dot-separated components, at most 64 characters
    (PS3.5 9.1; a component with a leading zero is allowed, as stored UIDs have them)."""
    return len(text) <= UID_MAX and _UID_RE.fullmatch(text) is not None


_DA_RE = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM_RE = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")


# pydicom 3.0 decodes ISO 2022 IR 58 (GB 2312) text but leaves its escape sequence in the
# decoded string; an ESC is never a character of a DICOM text value, so it is removed here.
_IR58_ESCAPE = "\x1b$)A"


def clean_text(value: str) -> str:
    """Remove what a decoder left of ISO 2022 escape sequences (see ``_IR58_ESCAPE``)."""
    return value.replace(_IR58_ESCAPE, "") if "\x1b" in value else value


def strip(vr: str, value: str) -> str:
    """Remove the padding that ``vr`` makes insignificant (PS3.5 6.2)."""
    if vr == "UI":
        return value.rstrip("\0 ")
    if vr in _TRAILING_ONLY:
        return value.rstrip(" ")
    return value.strip(" ")


_FOLDED_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC")


@functools.lru_cache(maxsize=4096)
def _accents_fold(base: str) -> bool:
    try:
        return unicodedata.name(base).startswith(_FOLDED_SCRIPTS)
    except ValueError:
        return False


def fold(text: str) -> str:
    """Fold case and accents: ``"Müller"`` and ``"MULLER"`` fold alike.

    Accents are dropped only from Latin, Greek and Cyrillic letters: a Japanese voiced
    mark (が / か) or a Hangul syllable is part of the letter, not an accent. Case is
    lowered character by character (``ß`` stays one character), and the result is NFC, so
    ``?`` still stands for exactly one character of the folded text.
    """
    out: list[str] = []
    base = ""
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.combining(ch):
            if base and _accents_fold(base):
                continue
        else:
            base = ch
        out.append(ch)
    # lowered letter by letter: str.lower() on a whole string writes a final sigma as ς,
    # so "ΑΣ*" and "ΑΣΠΡΟΣ" would fold differently
    lowered = "".join(ch.lower() for ch in out).replace("ς", "σ")
    return unicodedata.normalize("NFC", lowered)


def norm_pn(value: str) -> str:
    """Normalise a person name: trim each component, drop empty trailing ones (PS3.5 6.2.1)."""
    groups = []
    for group in value.split("="):
        parts = [p.strip(" ") for p in group.split("^")]
        while parts and not parts[-1]:
            parts.pop()
        groups.append("^".join(parts))
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def pn_framed(value: str, folded: bool) -> str:
    """Return the form of a name kept in a PN index column: ``=group1=group2=``.

    Framing every component group with ``=`` lets one SQL pattern ``*=<q>=*`` find a name
    whatever group the query value is written in.
    """
    name = norm_pn(value)
    if folded:
        name = fold(name)
    return f"={name}=" if name else ""


PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
"""A person name's component groups, in order (PS3.5 6.2.1), as DICOM JSON names them."""


def pn_groups(value: str, folded: bool) -> tuple[str, str, str]:
    """Return the three component groups of a name, as kept in a PN key's group columns.

    Each group is normalised as :func:`norm_pn` does (and folded); a missing group is
    ``""``. A fourth group and beyond are dropped, as pydicom drops them from the DICOM
    JSON that Python matching reads.
    """
    name = norm_pn(value)
    if folded:
        name = fold(name)
    groups = name.split("=")[:len(PN_GROUPS)]
    groups += [""] * (len(PN_GROUPS) - len(groups))
    return groups[0], groups[1], groups[2]


def norm_da(value: str) -> str:
    """Return a DA value as ``YYYYMMDD``, or ``""`` if it is not of that form.

    The ACR-NEMA form ``YYYY.MM.DD`` is accepted (PS3.5 6.2, retired). The calendar is not
    checked here: a stored ``20240230`` stays matchable as written (and indexed as before);
    a query value is checked with :func:`of_the_clock_and_calendar`.
    """
    m = _DA_RE.match(value.strip())
    return "".join(m.groups()) if m else ""


def norm_tm(value: str, upper: bool = False) -> str:
    """Return a TM value as ``HHMMSS.FFFFFF``, or ``""`` if it is not of that form (the
    clock is checked by :func:`of_the_clock_and_calendar`, as for :func:`norm_da`).

    Parts the value leaves out are filled with zeros, or with their largest value when
    ``upper`` is set, so that ``"1200"`` as the upper end of a range includes 12:00:59.9
    (PS3.4 C.2.2.2.5: ranges are inclusive of the whole stated precision).
    The ACR-NEMA form ``HH:MM:SS`` is accepted.
    """
    m = _TM_RE.match(value.strip())
    if not m:
        return ""
    hh, mm, ss, frac = m.groups()
    fill = "59" if upper else "00"
    frac_fill = "9" if upper else "0"
    frac = ("999999" if upper else "000000") if frac is None else frac.ljust(6, frac_fill)
    return f"{hh}{mm or fill}{ss or fill}.{frac}"


def of_the_clock_and_calendar(vr: str, normalised: str) -> bool:
    """Whether a DA or TM value as :func:`norm_da` or :func:`norm_tm` returns it is a date
    of the calendar (leap years included) or a time of the clock: HH 00-23, MM 00-59, SS
    00-60, 60 being a leap second (PS3.5 Table 6.2-1). Other VRs: ``True`` (:func:`norm_dt`
    checks its own values)."""
    if vr == "DA":
        year, month, day = int(normalised[:4]), int(normalised[4:6]), int(normalised[6:8])
        return year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
    if vr == "TM":
        hh, mm, ss = int(normalised[:2]), int(normalised[2:4]), int(normalised[4:6])
        return hh <= 23 and mm <= 59 and ss <= 60
    return True


_DT_RE = re.compile(
    r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
    r"([+-]\d{4})?$"
)


def norm_dt(value: str, upper: bool = False) -> str:
    """Return a DT value as ``YYYYMMDDHHMMSS.FFFFFF``, in UTC when it has an offset; ``""``
    if it is not a date-time.

    Parts the value leaves out are filled with their smallest value, or their largest when
    ``upper`` is set (``"2024"`` as an upper bound is the last microsecond of 2024). A value
    with a UTC offset (``&ZZXX``, PS3.5 Table 6.2-1) is moved to UTC so that values written
    in different offsets compare as instants; one without is compared as written.
    """
    m = _DT_RE.match(value.strip())
    if not m:
        return ""
    year, month, day, hour, minute, second, frac, offset = m.groups()
    try:
        y = int(year)
        mo = int(month) if month else (12 if upper else 1)
        last_day = calendar.monthrange(y, mo)[1]
        d = int(day) if day else (last_day if upper else 1)
        top = 23 if upper else 0
        edge = 59 if upper else 0
        micro = int(frac.ljust(6, "9" if upper else "0")) if frac else (999999 if upper else 0)
        sec = int(second) if second else edge
        if sec == 60:  # a leap second (PS3.5 Table 6.2-1): the last instant of its minute
            sec, micro = 59, 999999
        instant = datetime.datetime(
            y, mo, d,
            int(hour) if hour else top,
            int(minute) if minute else edge,
            sec,
            micro,
        )
        if offset:
            hours, minutes = int(offset[1:3]), int(offset[3:5])
            if hours > 14 or minutes > 59:
                return ""
            shift = datetime.timedelta(hours=hours, minutes=minutes)
            instant = instant - shift if offset[0] == "+" else instant + shift
    except (ValueError, OverflowError):
        return ""
    return instant.strftime("%Y%m%d%H%M%S.%f").rjust(21, "0")


def json_strings(element: dict[str, Any]) -> list[str]:
    """Return the values of one DICOM JSON element as strings (PN as ``a=i=p``)."""
    values = element.get("Value") or []
    if element.get("vr") == "PN":
        out = []
        for v in values:
            if isinstance(v, dict):
                groups = [v.get(g, "") for g in PN_GROUPS]
                out.append(norm_pn("=".join(groups)))
            else:
                out.append("")
        return out
    return ["" if v is None else str(v) for v in values if not isinstance(v, dict)]
