"""An identifier -> a :class:`~storage.query.model.Query`: the hierarchical rules of PS3.4
C.4.1.2.1 and one :class:`~storage.query.model.Constraint` per key (PS3.4 C.2.2.2)."""

from __future__ import annotations

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..errors import InvalidQuery
from ..keys import UNIQUE_KEY, Key, Level, Model, level_of
from ..values import (
    BINARY_VRS,
    NUMERIC_VRS,
    WILDCARD_VRS,
    clean_text,
    fold,
    norm_da,
    norm_dt,
    norm_pn,
    norm_tm,
    of_the_clock_and_calendar,
    strip,
)
from .model import (
    DATE_TIME_PAIRS,
    INSTANCE_AVAILABILITY,
    QUERY_RETRIEVE_LEVEL,
    RETRIEVE_AE_TITLE,
    SPECIFIC_CHARACTER_SET,
    TIMEZONE_OFFSET_FROM_UTC,
    Constraint,
    Kind,
    Op,
    Query,
    Requested,
    Term,
    _key_for,
)

# ---------------------------------------------------------------------------------------
# Parsing


def parse_identifier(
    identifier: Dataset,
    model: Model,
    fold_pn: bool = True,
    *,
    relational: bool = False,
    combined_datetime: bool = False,
    multiple_values: bool = False,
) -> Query:
    """Turn a C-FIND identifier into a :class:`Query`.

    Parameters
    ----------
    identifier : pydicom.dataset.Dataset
        The identifier as received; it is not modified.
    model : Model
        The information model of the request's SOP Class.
    fold_pn : bool
        Match PN case- and accent-insensitively (our default; PS3.4 C.2.2.2.1 leaves it to
        the implementation).
    relational : bool
        Relational queries were negotiated (PS3.4 C.4.1.2.2): the Unique keys of the levels
        above need not be given.
    combined_datetime : bool
        Combined date and time range matching was negotiated (PS3.4 C.2.2.2.5.1).
    multiple_values : bool
        Multiple value matching was negotiated (PS3.4 C.2.2.2.8): an entity matches a key
        with several values only if each of them matches one of its values. Without it,
        several values are OR'ed (our documented choice; UID lists are always OR'ed).

    Raises
    ------
    InvalidQuery
        When the identifier breaks PS3.4 C.4.1.2.1 or holds a malformed value.
    """
    try:
        raw_level = identifier.get("QueryRetrieveLevel", None)
    except Exception as exc:
        raise InvalidQuery(f"identifier cannot be decoded: {exc}") from exc
    if not raw_level:
        raise InvalidQuery("QueryRetrieveLevel (0008,0052) is missing")
    name = str(raw_level).strip().upper()
    if name not in Level.__members__:
        raise InvalidQuery(f"unknown QueryRetrieveLevel {name!r}")
    level = Level[name]
    # PS3.4 C.6.2: Study Root has no PATIENT level
    if level not in model.levels:
        raise InvalidQuery(f"level {name} is not part of the {model.value} model")

    charset = _charset_of(identifier)
    constraints: list[Constraint] = []
    requested: list[Requested] = []
    ignored: list[str] = []
    try:
        elements = list(identifier)
    except Exception as exc:
        raise InvalidQuery(f"identifier cannot be decoded: {exc}") from exc
    for elem in elements:
        tag = int(elem.tag)
        if tag in (QUERY_RETRIEVE_LEVEL, SPECIFIC_CHARACTER_SET, TIMEZONE_OFFSET_FROM_UTC):
            # control attributes of the request (PS3.4 C.4.1.1.3.1), not keys
            continue
        if tag == INSTANCE_AVAILABILITY:
            # PS3.4 C.6.1.1.3 / C.6.1.1.5, PS3.3 C.4.23.1.1: a fact of the archive (always
            # ONLINE here), answered at the query's level, never matched
            requested.append(Requested(tag, "CS", level))
            if _has_value(elem):
                ignored.append(elem.keyword)
            continue
        if tag == RETRIEVE_AE_TITLE:
            # not an attribute of the stored entities: every response names where its
            # entity can be retrieved from (PS3.4 C.4.1.1.3.2), whatever the request holds
            continue
        if (tag >> 16) == 0x0002 or (tag & 0xFFFF) == 0:
            continue  # never group lengths or file meta (PS3.4 C.4.1.1.3.2)
        key_level = _key_level(tag, model)
        key = _key_for(tag)
        if key_level > level:
            # PS3.4 C.4.1.2.1: keys below the query level are not allowed. We refuse the
            # Unique keys (a clear hierarchy error) and ignore other lower-level keys, which
            # common viewers send at STUDY level; they come back empty.
            if key is not None and key.unique:
                raise InvalidQuery(f"{key.keyword} is below the query level {name}")
            if _has_value(elem):
                ignored.append(elem.keyword or str(elem.tag))
            requested.append(Requested(tag, elem.VR, key_level))
            continue
        requested.append(_requested(elem, key_level))
        and_values = multiple_values and _vr_of(elem) != "UI"
        constraint = _constraint(elem, key_level, key, fold_pn, and_values)
        if constraint is not None:
            constraints.append(constraint)
        elif _vr_of(elem) in BINARY_VRS and _has_value(elem):
            ignored.append(elem.keyword or str(elem.tag))  # 10: reported with FF01

    if combined_datetime:
        constraints = _combine_date_time(constraints)

    # PS3.4 C.4.1.2.1: the Unique key of each level above the query level is present and
    # holds a single value (or, PS3.4 C.2.2.2.2, a list of UIDs). A relational query
    # (PS3.4 C.4.1.2.2) may leave them out.
    for upper in model.levels:
        if upper >= level or relational:
            break
        keyword = UNIQUE_KEY[upper]
        match = next((c for c in constraints if c.key and c.key.keyword == keyword), None)
        if match is not None and match.kind is Kind.EMPTY and keyword == "PatientID":
            # PatientID is Type 2 (PS3.3 C.7.1.1): a patient may have none. Our extension
            # (README, "How images are kept"): '""' (PS3.4 C.2.2.2.7 Empty Value Matching)
            # stands for that missing value, so that a hierarchical Patient Root query
            # reaches the patients without one, all of them at once. C.4.1.2.1 asks for a
            # single value; Study Root and relational queries are the standard's ways.
            continue
        if match is None or match.kind is not Kind.TERMS or any(
            t.op is not Op.EQ for t in match.terms
        ):
            hint = _NO_PATIENT_ID_HINT if keyword == "PatientID" else ""
            raise InvalidQuery(
                f"{keyword} must hold a single value for a {name} level query{hint}")

    return Query(
        model=model,
        level=level,
        constraints=tuple(constraints),
        requested=tuple(requested),
        charset=charset,
        fold_pn=fold_pn,
        ignored=tuple(ignored),
    )


_NO_PATIENT_ID_HINT = (' (for patients without a PatientID: \'""\', PS3.4 C.2.2.2.7, or a'
                       ' relational query)')


def _combine_date_time(constraints: list[Constraint]) -> list[Constraint]:
    """PS3.4 C.2.2.2.5.4: with combined matching negotiated, a date key and its time key
    that hold the same form of range are matched together: ``StudyDate=20240101-20240102``
    with ``StudyTime=2200-0600`` is 1 January 22:00 to 2 January 06:00. The date constraint
    stays too (every match satisfies it, and it can use the index)."""
    by_tag = {c.tag: c for c in constraints}
    for date_tag, time_tag in DATE_TIME_PAIRS.items():
        date, time = by_tag.get(date_tag), by_tag.get(time_tag)
        if date is None or time is None or len(date.terms) != 1 or len(time.terms) != 1:
            continue
        d, t = date.terms[0], time.terms[0]
        # only "both of which specify the same form of Range Matching" (D1-D2 with T1-T2,
        # -D with -T, D- with T-); single values are matched each on its own
        if not (d.written_range and t.written_range) or (
            bool(d.value) != bool(t.value) or bool(d.upper) != bool(t.upper)
        ):
            continue
        # a time bound without a date bound has no meaning in a combined range
        lower = d.value + t.value if d.value and t.value else d.value
        upper = d.upper + t.upper if d.upper and t.upper else (
            d.upper + "235959.999999" if d.upper else "")
        if d.value and not t.value:
            lower = d.value + "000000.000000"
        combined = Constraint(time_tag, "DT", time.level, Kind.DATETIME,
                              (Term(Op.RANGE, lower, upper),), pair=(date_tag, time_tag))
        constraints = [combined if c is time else c for c in constraints]
    return constraints


def _charset_of(identifier: Dataset) -> tuple[str, ...]:
    value = identifier.get("SpecificCharacterSet", None)
    if not value:
        return ()
    if isinstance(value, str):
        return (value.strip(),)
    return tuple(str(v).strip() for v in value)




def _key_level(tag: int, model: Model) -> Level:
    key = _key_for(tag)
    level = key.level if key else level_of(tag)
    # PS3.4 C.6.2.1: in Study Root the patient attributes are STUDY level keys
    if model is Model.STUDY_ROOT and level is Level.PATIENT:
        return Level.STUDY
    return level


def _has_value(elem: DataElement) -> bool:
    value = elem.value
    if elem.VR == "SQ":
        return bool(value) and any(len(item) for item in value)
    return value not in (None, "", b"") and not (isinstance(value, list) and not value)




def _vr_of(elem: DataElement) -> str:
    """The dictionary VR of a known key (an SCU may send PatientName as LO), else the VR
    the element came with (private keys, and the ambiguous "US or SS" kind)."""
    try:
        vr = str(dictionary_VR(elem.tag))
    except KeyError:
        return str(elem.VR)
    return str(elem.VR) if " or " in vr else vr


def _requested(elem: DataElement, level: Level) -> Requested:
    items: tuple[Requested, ...] = ()
    if elem.VR == "SQ" and elem.value:
        items = tuple(_requested(e, level) for e in elem.value[0])
    return Requested(int(elem.tag), elem.VR, level, items)


def _texts(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if elem.VR == "AT":  # as DICOM JSON stores them: "00100010"
        tags = value if isinstance(value, MultiValue | list | tuple) else [value]
        return [f"{int(t):08X}" for t in tags]
    if isinstance(value, MultiValue | list | tuple):
        return [clean_text(str(v)) for v in value]
    if isinstance(value, bytes):
        raise InvalidQuery(f"{elem.keyword or elem.tag}: binary values cannot be matched")
    return [clean_text(str(value))]


def _constraint(
    elem: DataElement, level: Level, key: Key | None, fold_pn: bool, all_values: bool = False
) -> Constraint | None:
    """Return the constraint for one element, or ``None`` for universal matching."""
    tag = int(elem.tag)
    vr = _vr_of(elem)
    if vr == "SQ":
        return _sequence_constraint(elem, level, key, fold_pn)
    if vr in BINARY_VRS:
        return None  # not matchable: returned only (and reported, see parse_identifier)
    texts = _texts(elem)
    # PS3.4 C.2.2.2.3 Universal Matching: a zero-length value
    if not texts or all(t == "" for t in texts):
        return None
    # PS3.4 C.2.2.2.7 Empty Value Matching: the value is two quotation marks
    if len(texts) == 1 and texts[0].strip() == '""':
        return Constraint(tag, vr, level, Kind.EMPTY, key=key)
    terms: list[Term] = []
    for text in texts:
        term = _term(vr, text, elem.keyword or str(elem.tag), fold_pn)
        if term is None:  # a lone "*": PS3.4 C.2.2.2.4, equivalent to Universal Matching
            if all_values:
                continue  # under AND semantics it only drops out of the list
            return None
        terms.append(term)
    if not terms:
        return None
    return Constraint(tag, vr, level, Kind.TERMS, tuple(terms), key=key,
                      all_terms=all_values and len(terms) > 1)


def _term(vr: str, text: str, name: str, fold_pn: bool) -> Term | None:
    value = strip(vr, text)
    if value and set(value) == {"*"}:
        return None
    if vr in ("DA", "TM", "DT"):
        return _date_term(vr, value, name)
    if vr == "PN":
        value = norm_pn(value)
        if fold_pn:
            value = fold(value)
    # PS3.4 C.2.2.2.4: "*" and "?" are wildcards only for these VRs
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        return Term(Op.WILDCARD, value)
    if vr in NUMERIC_VRS:
        try:
            float(value)
        except ValueError:
            raise InvalidQuery(f"{name}: {text!r} is not a number") from None
    return Term(Op.EQ, value)


def _date_term(vr: str, value: str, name: str) -> Term:
    def norm(text: str) -> str:
        return _real(vr, {"DA": norm_da, "TM": norm_tm, "DT": norm_dt}[vr](text))

    # PS3.4 C.2.2.2.5: "-" separates a range; a single DT value cannot carry a negative UTC
    # offset in a query (PS3.4 C.2.2.2.1.3), so "-" always means a range here too.
    parts = value.split("-") if "-" in value else [value]
    if len(parts) > 2:
        raise InvalidQuery(f"{name}: malformed range {value!r}")
    if len(parts) == 2:
        lower_text, upper_text = (p.strip() for p in parts)
        lower = norm(lower_text) if lower_text else ""
        upper = _upper(vr, upper_text) if upper_text else ""
        if (lower_text and not lower) or (upper_text and not upper) or not (lower or upper):
            raise InvalidQuery(f"{name}: malformed {vr} range {value!r}")
        return Term(Op.RANGE, lower, upper, written_range=True)
    single = norm(value)
    if not single:
        raise InvalidQuery(f"{name}: malformed {vr} value {value!r}")
    if vr in ("TM", "DT"):
        # A time is matched over its stated precision: "1200" is 12:00:00 to 12:00:59.999999,
        # a DT "2024" all of 2024.
        return Term(Op.RANGE, single, _upper(vr, value))
    return Term(Op.EQ, single)


def _upper(vr: str, text: str) -> str:
    """The inclusive upper end of a value's stated precision (PS3.4 C.2.2.2.5), or ``""``
    when it is not a date of the calendar or a time of the clock."""
    if vr == "TM":
        out = norm_tm(text, upper=True)
    elif vr == "DT":
        out = norm_dt(text, upper=True)
    else:
        out = norm_da(text)
    return _real(vr, out)


def _real(vr: str, normalised: str) -> str:
    """``normalised`` if it is a date of the calendar or a time of the clock, else ``""``.

    PS3.5 Table 6.2-1: a query's dates and times must be real ones, range ends included
    ("20240230", "2500": A900), where stored values are taken as written
    (:func:`storage.values.norm_da`)."""
    return normalised if normalised and of_the_clock_and_calendar(vr, normalised) else ""


def _sequence_constraint(
    elem: DataElement, level: Level, key: Key | None, fold_pn: bool
) -> Constraint | None:
    # PS3.4 C.2.2.2.6: one item whose keys are matched against each stored item
    items = elem.value
    if not items:
        return None
    if len(items) > 1:
        raise InvalidQuery(f"{elem.keyword}: a sequence key holds one item")
    sub: list[Constraint] = []
    for sub_elem in items[0]:
        c = _constraint(sub_elem, level, None, fold_pn)
        if c is not None:
            sub.append(c)
    if not sub:
        return None
    return Constraint(int(elem.tag), "SQ", level, Kind.SEQUENCE, items=tuple(sub), key=key)


# ---------------------------------------------------------------------------------------
# Matching (the reference: every constraint is checked here, whatever SQL already did)

