"""QIDO-RS (PS3.18 10.6): search parameters -> the same :class:`~storage.query.model.Query`
as a C-FIND identifier, and the search's answer as a DICOM JSON array (PS3.18 Annex F).

The parameters are written into a C-FIND identifier (a pydicom Dataset of the Study Root
model) and handed to :func:`~storage.query.parse.parse_identifier`, so that a search and a
C-FIND with the same keys are one query, matched by one engine and answered by one
pipeline (:func:`~storage.query.answer.json_answer`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

import peewee as pw
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from ..errors import InvalidQuery, QueryFailed
from ..keys import KEYS, Level, Model
from ..values import BINARY_VRS, is_uid
from .answer import json_answer
from .match import row_matches
from .model import INSTANCE_AVAILABILITY, Query, Requested, Row
from .parse import _key_level, parse_identifier
from .sql import select_rows

# PS3.18 Table 8.3.4-1: the search parameters that are not attribute matches
INCLUDEFIELD = "includefield"
LIMIT = "limit"
OFFSET = "offset"
FUZZYMATCHING = "fuzzymatching"
EMPTYVALUEMATCHING = "emptyvaluematching"
MULTIPLEVALUEMATCHING = "multiplevaluematching"
INCLUDE_ALL = "all"
ACCEPT = "accept"  # PS3.18 8.3.3.1: the Accept header as a parameter, the web's business
CHARSET = "charset"  # PS3.18 8.3.3.2: the Accept-Charset header as a parameter
ANSWER_CHARSETS = frozenset({"utf-8", "*"})
"""The charsets a search can be answered in: DICOM JSON is UTF-8 (PS3.18 F.2)."""

# PS3.18 10.6.3.3.1 Table 10.6.3-3: in every study result
STUDY_RESULT = ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
                "ModalitiesInStudy", "TimezoneOffsetFromUTC",
                "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
# PS3.18 10.6.3.3.2 Table 10.6.3-4: in every series result (StudyInstanceUID: ours, so
# that a result names its place in the hierarchy)
SERIES_RESULT = ("Modality", "TimezoneOffsetFromUTC", "SeriesDescription",
                 "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances",
                 "StudyInstanceUID")
# PS3.18 10.6.3.3.3 Table 10.6.3-5: in every instance result (Study and Series Instance
# UID: ours, as above)
INSTANCE_RESULT = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability",
                   "TimezoneOffsetFromUTC", "InstanceNumber", "Rows", "Columns",
                   "BitsAllocated", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID")
# PS3.18 Tables 10.6.3-3 to -5: Type C, "shall be present if known" (InstanceAvailability,
# the other one, is always known: storage.query.model.ONLINE)
WHEN_KNOWN = ("Rows", "Columns", "BitsAllocated", "NumberOfFrames", "TimezoneOffsetFromUTC")
TIMEZONE_OFFSET_FROM_UTC = 0x00080201
# answered at the result's level whatever level the index keeps them at: InstanceAvailability
# (a fact of the archive) and TimezoneOffsetFromUTC (SOP Common, so known for an instance)
_ANY_LEVEL = frozenset({INSTANCE_AVAILABILITY, TIMEZONE_OFFSET_FROM_UTC})

BATCH_SIZE = 100
"""Results read and rendered in one go; a larger answer streams batch by batch."""

_UINT_RE = re.compile(r"[0-9]+")
_TAG_RE = re.compile(r"[0-9A-Fa-f]{8}")
_BOOLEANS = {"true": True, "false": False}
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_CONTROL_KEYWORDS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet",
                               "RetrieveAETitle"})
# RFC 9110 5.6.1 / 12.4.2: a charset is a token, with an optional weight
_CHARSET_RE = re.compile(r"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*"
                         r"(?:;\s*[qQ]\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?))?\s*")


SearchParams = Iterable[tuple[str, str]]
"""A search's query parameters, percent-decoded, in order (a name may repeat)."""


@dataclass(frozen=True)
class Search:
    """A parsed QIDO-RS search.

    Attributes
    ----------
    query : Query
        The query, as :func:`parse_identifier` makes it of a C-FIND identifier.
    offset : int
        Matches to skip (PS3.18 8.3.4.4).
    limit : int or None
        Most results the user agent wants (None: as many as there are).
    fuzzy_ignored : bool
        ``fuzzymatching=true`` was asked, which we do not perform (PS3.18 8.3.4.2).
    everything : tuple of Level
        ``includefield=all``: every attribute kept at these levels is answered too.
    when_known : frozenset of int
        Tags left out of a result where the match has no value.
    """

    query: Query
    offset: int = 0
    limit: int | None = None
    fuzzy_ignored: bool = False
    everything: tuple[Level, ...] = ()
    when_known: frozenset[int] = field(default_factory=frozenset)


def parse_search(
    params: SearchParams,
    level: Level,
    study: str = "",
    series: str = "",
    *,
    fold_pn: bool = True,
) -> Search:
    """Turn the query parameters of a QIDO-RS search into a :class:`Search`.

    Parameters
    ----------
    params : iterable of (str, str)
        The query parameters, percent-decoded, in order (a name may repeat).
    level : Level
        STUDY for ``/studies``, SERIES for ``/series`` and ``/studies/{study}/series``,
        IMAGE for the ``instances`` resources (PS3.18 10.6.1).
    study, series : str
        The Study and Series Instance UIDs of the target resource's path, if any.
    fold_pn : bool
        Match PN case- and accent-insensitively (``query.pn_case_insensitive``).

    Raises
    ------
    InvalidQuery
        An unknown parameter or attribute, a malformed value or path UID, a key below the
        level, a value that cannot be matched (PS3.18 8.3.4: 400 Bad Request).
    """
    for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid and not is_uid(uid):
            raise InvalidQuery(f"the {name} in the path is not a valid UID: {uid[:80]!r}")
    matches: dict[tuple[int, ...], list[str]] = {}
    includes: list[tuple[int, ...]] = []
    control: dict[str, str] = {}
    everything = False
    for name, value in params:
        if name == ACCEPT:
            continue
        if name == CHARSET:
            _check_charset(value)
            continue
        if name == INCLUDEFIELD:  # PS3.18 8.3.4.3: a comma-separated list, or "all"
            for item in (v.strip() for v in value.split(",")):
                if item == INCLUDE_ALL:
                    everything = True
                elif item:
                    includes.append(_attribute_path(item))
        elif name in (LIMIT, OFFSET, FUZZYMATCHING, EMPTYVALUEMATCHING, MULTIPLEVALUEMATCHING):
            if name in control:
                raise InvalidQuery(f"{name} is given more than once")
            control[name] = value
        else:  # PS3.18 8.3.4.1 Attribute Matching
            matches.setdefault(_attribute_path(name), []).append(value)

    offset = _uint(control, OFFSET) or 0
    limit = _uint(control, LIMIT)
    fuzzy = _boolean(control, FUZZYMATCHING)
    _boolean(control, EMPTYVALUEMATCHING)  # PS3.18 8.3.4.5: always performed, as by C-FIND
    multiple = _boolean(control, MULTIPLEVALUEMATCHING)

    identifier = Dataset()
    identifier.QueryRetrieveLevel = level.name
    for tag in _result_keys(level, bool(study), bool(series), everything):
        _put(identifier, (tag,), [])
    timezone = False
    for path in includes:
        if path == (TIMEZONE_OFFSET_FROM_UTC,):
            timezone = True  # a control attribute of a C-FIND identifier: requested below
        elif path[0] in _ANY_LEVEL or _key_level(path[0], Model.STUDY_ROOT) <= level:
            # PS3.18 10.6.3.3: attributes of a lower level in includefield are not returned
            _put(identifier, path, [])
    for path, values in matches.items():
        if path[0] in _ANY_LEVEL:
            raise InvalidQuery(f"{_name(path)} cannot be matched: it is returned only")
        if _key_level(path[0], Model.STUDY_ROOT) > level:
            raise InvalidQuery(f"{_name(path)} is an attribute of a level below {level.name}:"
                               " it cannot be matched by this resource")
        if (study and path == (_tag("StudyInstanceUID"),)) or (
                series and path == (_tag("SeriesInstanceUID"),)):
            raise InvalidQuery(f"{_name(path)} is given by the path already")
        _put(identifier, path, values)
    if study:
        identifier.StudyInstanceUID = study
    if series:
        identifier.SeriesInstanceUID = series

    # Relational (PS3.4 C.4.1.2.2): /series and /instances search across levels, PS3.18
    # 10.6.1; the path's UIDs are Unique key constraints.
    query = parse_identifier(identifier, Model.STUDY_ROOT, fold_pn, relational=True,
                             multiple_values=multiple)
    if query.ignored:
        raise InvalidQuery(f"cannot be matched: {', '.join(query.ignored)}")
    # PS3.18 Tables 10.6.3-3 to -5 list TimezoneOffsetFromUTC at every level (Type C): in a
    # C-FIND identifier it is a control attribute (PS3.4 C.4.1.1.3.1), so it is asked here
    if timezone or TIMEZONE_OFFSET_FROM_UTC in _result_keys(level, bool(study), bool(series),
                                                            everything):
        query = dataclasses.replace(query, requested=(
            *query.requested, Requested(TIMEZONE_OFFSET_FROM_UTC, "SH", level)))
    known = {_tag(k) for k in WHEN_KNOWN} - {p[0] for p in (*includes, *matches)}
    return Search(query, offset, limit, fuzzy, _everything_levels(level) if everything else (),
                  frozenset(known))


@functools.lru_cache(maxsize=64)
def _result_keys(level: Level, study: bool, series: bool, everything: bool) -> tuple[int, ...]:
    """The attributes of PS3.18 Tables 10.6.3-3 to -5 every result of this resource holds:
    a study's; a series' (with its study's when the resource is all series); an
    instance's (with its series', and its study's when the resource is all instances)."""
    keys: list[str] = []
    if level is Level.STUDY or not study:
        keys += STUDY_RESULT
    if level is Level.SERIES or (level is Level.IMAGE and not series):
        keys += SERIES_RESULT
    if level is Level.IMAGE:
        keys += INSTANCE_RESULT
    if everything:  # PS3.18 8.3.4.3 "all": the level's computed keys too (PS3.4 C.3.4)
        levels = _everything_levels(level)
        keys += [k.keyword for k in KEYS.values()
                 if k.computed and _key_level(k.tag, Model.STUDY_ROOT) in levels]
    return tuple(_tag(k) for k in dict.fromkeys(keys))


def _everything_levels(level: Level) -> tuple[Level, ...]:
    # Study Root: a study holds its patient's attributes (PS3.4 C.6.2.1)
    return (Level.PATIENT, Level.STUDY) if level is Level.STUDY else (level,)


def _attribute_path(text: str) -> tuple[int, ...]:
    """PS3.18 8.3.4.1: ``attribute = attribute-id *("." attribute-id)``, each a keyword or
    eight hexadecimal digits; all but the last name a sequence."""
    path = tuple(_tag(part) for part in text.split("."))
    for tag in path[:-1]:
        if _vr(tag) != "SQ":
            raise InvalidQuery(f"{_name((tag,))} in {text!r} is not a sequence")
    return path


@functools.lru_cache(maxsize=4096)  # an unknown name raises: never cached
def _tag(name: str) -> int:
    if _TAG_RE.fullmatch(name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None or name in _CONTROL_KEYWORDS:
        raise InvalidQuery(f"unknown query parameter or attribute {name[:80]!r}")
    return int(tag)


def _name(path: tuple[int, ...]) -> str:
    return ".".join(keyword_for_tag(t) or f"{t:08X}" for t in path)


@functools.lru_cache(maxsize=4096)
def _vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"  # private or unknown: returned as stored, never matched
    return vr.split(" or ")[0]


def _put(identifier: Dataset, path: tuple[int, ...], values: list[str]) -> None:
    """Write one key into the identifier: a sequence path as one item (PS3.4 C.2.2.2.6)."""
    ds = identifier
    for tag in path[:-1]:
        if tag not in ds:
            ds.add(DataElement(tag, "SQ", []))
        if not ds[tag].value:
            ds[tag].value.append(Dataset())
        ds = ds[tag].value[0]
    tag = path[-1]
    if tag in ds and not values:
        return  # asked for already
    vr = _vr(tag)
    value = _value(tag, vr, values)
    try:
        ds.add(DataElement(tag, vr, value, validation_mode=pydicom_config.IGNORE))
    except (ValueError, TypeError, OverflowError):
        raise InvalidQuery(f"{_name(path)}: {values[0][:80]!r} is not a valid {vr} value"
                           ) from None


def _value(tag: int, vr: str, values: list[str]) -> Any:
    """A query value as the identifier holds it.

    A repeated parameter is several values; a UI value is a comma-separated list too
    (PS3.18 8.3.4.1 ``uid-list-match``; PS3.4 C.2.2.2.2); other values are split at "\\"
    as in a C-FIND identifier.
    """
    texts = [v for v in values if v != ""]
    if not texts:
        return [] if vr == "SQ" else None  # PS3.4 C.2.2.2.3 Universal Matching
    name = _name((tag,))
    if vr == "SQ":
        raise InvalidQuery(f"{name}: a sequence is matched by its item keys"
                           f" ({name}.<attribute>=<value>)")
    if vr in BINARY_VRS:
        raise InvalidQuery(f"{name}: binary values cannot be matched")
    if vr == "UI":
        uids = [u.strip() for t in texts for u in t.replace("\\", ",").split(",")]
        for uid in uids:
            if uid != "*" and not is_uid(uid):
                raise InvalidQuery(f"{name}: not a UID: {uid[:80]!r}")
        return "\\".join(uids)
    text = "\\".join(texts)
    if vr in _INT_VRS or vr in _FLOAT_VRS:
        number = int if vr in _INT_VRS else float
        try:
            return [number(t) for t in text.split("\\")]
        except ValueError:
            raise InvalidQuery(f"{name}: {text[:80]!r} is not a number") from None
    if vr == "AT":
        if not all(_TAG_RE.fullmatch(t) for t in text.split("\\")):
            raise InvalidQuery(f"{name}: {text[:80]!r} is not a tag (eight hex digits)")
        return [int(t, 16) for t in text.split("\\")]
    return text  # IS and DS numbers are checked by parse_identifier, as in C-FIND


def _check_charset(value: str) -> None:
    """PS3.18 8.3.3.2: ``charset`` stands for the Accept-Charset header field (8.8.4), a
    comma-separated list of charsets with optional weights. We answer in UTF-8 only (DICOM
    JSON, PS3.18 F.2): the list must accept ``utf-8`` or ``*``; a value that is not valid or
    not supported is 400 Bad Request (8.8.4)."""
    accepted = False
    for entry in value.split(","):
        if not entry.strip():
            continue
        match = _CHARSET_RE.fullmatch(entry)
        if match is None:
            raise InvalidQuery(f"charset: {entry.strip()[:80]!r} is not a charset"
                               " (RFC 9110 12.5.2)")
        name, weight = match.group(1).lower(), match.group(2)
        if name in ANSWER_CHARSETS and (weight is None or float(weight) > 0):
            accepted = True
    if not accepted:
        raise InvalidQuery(f"charset: search results are UTF-8 only (PS3.18 F.2), not"
                           f" {value[:80]!r}")


def _uint(control: dict[str, str], name: str) -> int | None:
    text = control.get(name)
    if text is None:
        return None
    if not _UINT_RE.fullmatch(text.strip()):
        raise InvalidQuery(f"{name} must be an unsigned integer, not {text[:80]!r}")
    # beyond sys.maxsize no index could hold that many matches: the same answer
    return min(int(text), sys.maxsize)


def _boolean(control: dict[str, str], name: str) -> bool:
    text = control.get(name)
    if text is None:
        return False
    value = _BOOLEANS.get(text.strip().lower())  # ABNF strings are case-insensitive
    if value is None:
        raise InvalidQuery(f"{name} must be true or false, not {text[:80]!r}")
    return value


# ---------------------------------------------------------------------------------------
# Answers


@dataclass
class SearchAnswer:
    """A search's answer, a JSON array: ``first`` the whole of it, or its first chunk and
    ``rest`` the others, read as they are taken; ``remaining`` the matches the server's
    maximum (``query.max_results``) left out, for the Warning of PS3.18 8.3.4.4.1."""

    first: bytes
    rest: Iterator[bytes] | None = None
    remaining: int = 0


_T = TypeVar("_T")


def run_search(
    search: Search, retrieve_base: str, max_results: int, release: Callable[[], None],
    render: Callable[[Row], bytes | None] | None = None,
    keep: Callable[[Row], bool] | None = None,
) -> SearchAnswer:
    """Answer ``search`` (PS3.18 8.3.4.4.1 paging): skip ``offset`` matches, answer at
    most ``limit`` and at most ``max_results`` (0: no maximum).

    ``render`` makes a match's result (:func:`json_answer` with its RetrieveURL by
    default; ``None``: the match is left out of the answer), ``keep`` says whether a match
    counts at all (all do by default): de-identified searches (:mod:`storage.deidentified`)
    pass their own.

    The first :data:`BATCH_SIZE` results are read here, so that a failure is answered before
    the answer starts; the rest is read batch by batch as the chunks are taken. Each batch
    is read in one go and ``release`` is called after it (a web server takes the chunks
    in whatever thread of its pool is free, and peewee keeps one connection per thread).
    When ``max_results`` cuts the answer, all of it is read here and the matches left out
    are counted.

    Raises
    ------
    QueryFailed
        The index could not be read.
    """
    rows = _matching_rows(search.query)
    if keep is not None:
        rows = filter(keep, rows)
    count = search.limit
    server_cut = bool(max_results) and (count is None or count >= max_results)
    if server_cut:
        count = max_results
    made = render or (lambda row: _render(search, row, retrieve_base))
    answered = (result for result in map(made, rows) if result is not None)
    results = answered if count is None else islice(answered, count)

    def first() -> list[bytes]:
        for _ in islice(rows, search.offset):
            pass
        return list(islice(results, count if server_cut else BATCH_SIZE))

    head = _step(first, release)
    remaining = 0
    if server_cut and len(head) == count:
        remaining = _step(lambda: sum(1 for _ in rows), release)
    if server_cut or len(head) < BATCH_SIZE:
        return SearchAnswer(b"[" + b",".join(head) + b"]", None, remaining)
    return SearchAnswer(b"[" + b",".join(head), _stream(results, release))


def _stream(results: Iterator[bytes], release: Callable[[], None]) -> Iterator[bytes]:
    while True:
        batch = _step(lambda: list(islice(results, BATCH_SIZE)), release)
        tail = b"," + b",".join(batch) if batch else b""
        if len(batch) < BATCH_SIZE:
            yield tail + b"]"
            return
        yield tail


def _step(read: Callable[[], _T], release: Callable[[], None]) -> _T:
    try:
        return read()
    except pw.DatabaseError as exc:
        raise QueryFailed(f"the index could not be read: {exc}") from exc
    finally:
        release()


def _matching_rows(query: Query) -> Iterator[Row]:
    """The matches, read page by page (:func:`select_rows`), checked in Python."""
    for row in select_rows(query):
        if row_matches(query, row):
            yield row


_UID_TAGS = {Level.STUDY: 0x0020000D, Level.SERIES: 0x0020000E, Level.IMAGE: 0x00080018}
_RESOURCE = {Level.STUDY: "studies", Level.SERIES: "series", Level.IMAGE: "instances"}


def _render(search: Search, row: Row, retrieve_base: str) -> bytes:
    return json_answer(search.query, row, everything=search.everything,
                       when_known=search.when_known,
                       retrieve_url=retrieve_url(retrieve_base, search.query.level, row))


def retrieve_url(base: str, level: Level, row: Row) -> str:
    """The WADO-RS URL of a match (PS3.18 10.4.1): ``{base}/studies/{study}``, with
    ``/series/{series}`` and ``/instances/{instance}`` below; ``""`` without a base."""
    if not base:
        return ""
    parts = [base]
    for lv in (Level.STUDY, Level.SERIES, Level.IMAGE):
        if lv > level:
            break
        element = row.element(_UID_TAGS[lv], lv) or {}
        uid = (element.get("Value") or [""])[0]
        parts.append(f"{_RESOURCE[lv]}/{uid}")
    return "/".join(parts)
