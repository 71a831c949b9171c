"""The Basic Application Level Confidentiality Profile and its options (PS3.15 E.1, E.3)
applied to a data set, attribute by attribute, as Table E.1-1 says.

Each attribute's action comes from its row of the table (:mod:`.table`): the Basic
Profile's code, or, when a chosen option has a code in that row, the option's (E.3: an
option keeps or cleans what the Basic Profile would remove). The actions (Table E.1-1a):

- ``X`` remove; ``Z`` empty value; ``D`` a dummy value of the VR; ``K`` keep (a sequence's
  items are still de-identified); ``C`` clean (dates shifted, text scrubbed of the data
  set's identifying values, other values replaced like ``D``); ``U`` a replacement UID,
  the same for the same UID everywhere (:mod:`.pseudonyms`).
- The combined codes let an attribute be kept empty or with a dummy where its IOD requires
  it (``Z/D``, ``X/Z``, ``X/D``, ``X/Z/D``): without the IOD's Type at hand, minipacs takes
  the action that is conformant whatever the Type (``Z`` for ``X/Z``, ``D`` for the
  others). ``X/Z/U*`` (a sequence of references) keeps the sequence and replaces the UIDs
  inside it, through their own rows.
- PatientID and PatientName (``Z``) get the patient's pseudonym instead of an empty value
  (Table E.1-1a allows a dummy for ``Z``), so the same patient stays one patient.

Attributes not in the table are kept; private attributes go unless the Retain Safe Private
option and the profile's safe list keep them. The result records what was done (E.1.1,
6): Patient Identity Removed, De-identification Method and its Code Sequence (CID 7050),
and Longitudinal Temporal Information Modified.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes

from .pseudonyms import Pseudonyms
from .table import Option, Rule, Table

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010

_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
_NUMBER_VRS = {"IS": "0", "DS": "0"}
_BINARY_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D"}
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "UI": 64}

_OPTION_CODES = {
    Option.RETAIN_SAFE_PRIVATE: codes.cid7050.RetainSafePrivateOption,
    Option.RETAIN_UIDS: codes.cid7050.RetainUidsOption,
    Option.RETAIN_DEVICE_IDENTITY: codes.cid7050.RetainDeviceIdentityOption,
    Option.RETAIN_INSTITUTION_IDENTITY: codes.cid7050.RetainInstitutionIdentityOption,
    Option.RETAIN_PATIENT_CHARACTERISTICS: codes.cid7050.RetainPatientCharacteristicsOption,
    Option.RETAIN_LONG_FULL_DATES:
        codes.cid7050.RetainLongitudinalTemporalInformationFullDatesOption,
    Option.RETAIN_LONG_MODIFIED_DATES:
        codes.cid7050.RetainLongitudinalTemporalInformationModifiedDatesOption,
    Option.CLEAN_DESCRIPTORS: codes.cid7050.CleanDescriptorsOption,
    Option.CLEAN_STRUCTURED_CONTENT: codes.cid7050.CleanStructuredContentOption,
    Option.CLEAN_GRAPHICS: codes.cid7050.CleanGraphicsOption,
}


@dataclass(frozen=True)
class Profile:
    """A named de-identification profile: the Basic Profile plus ``options``.

    ``safe_private``: (private creator, element byte) pairs kept under the Retain Safe
    Private option, e.g. ``("SIEMENS MR HEADER", 0x0C)`` for (0019,xx0C).
    """

    name: str
    options: frozenset[Option] = frozenset()
    safe_private: frozenset[tuple[str, int]] = frozenset()

    def problems(self) -> list[str]:
        """What makes the profile contradict itself (config reports them all at once)."""
        found = []
        if {Option.RETAIN_LONG_FULL_DATES, Option.RETAIN_LONG_MODIFIED_DATES} <= self.options:
            found.append(f"profile {self.name}: retain_long_full_dates and "
                         "retain_long_modified_dates exclude each other (PS3.15 E.3.6)")
        if self.safe_private and Option.RETAIN_SAFE_PRIVATE not in self.options:
            found.append(f"profile {self.name}: safe_private needs the retain_safe_private "
                         "option")
        return found


def action(rule: Rule, options: Iterable[Option]) -> str:
    """The action for ``rule`` under ``options``: an option's code replaces the Basic
    Profile's; where two chosen options differ (a device's calibration date: Retain Device
    Identity keeps it, Retain Longitudinal Modified Dates cleans it) cleaning wins, as it
    keeps less."""
    chosen = {rule.options[o] for o in options if o in rule.options}
    if not chosen:
        return rule.basic
    return "C" if "C" in chosen else chosen.pop()


@dataclass
class Outcome:
    """What :meth:`Deidentifier.apply` did to one data set."""

    dataset: Dataset
    uids: dict[str, str] = field(default_factory=dict)
    """Original UID -> replacement, for the audit trail and the caller's references."""


class Deidentifier:
    """Applies ``profile`` with the rows of ``table`` and replacements keyed by
    ``secret``. Stateless between data sets: every replacement is a function of the
    value and the secret, so two processes (two nodes) de-identify alike."""

    def __init__(self, table: Table, profile: Profile, secret: bytes) -> None:
        self.table = table
        self.profile = profile
        self.pseudonyms = Pseudonyms(secret)
        self._actions: dict[int, str] = {}

    def apply(self, original: Dataset) -> Outcome:
        """A de-identified copy of ``original`` (which is left as it is)."""
        ds = _plain_copy(original)
        key = _patient_key(original)
        run = _Run(self, key, _identifying_values(original, self))
        run.dataset(ds)
        self._mark(ds, run)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return Outcome(ds, run.uids)

    def action_for(self, rule: Rule) -> str:
        found = self._actions.get(id(rule))
        if found is None:
            found = self._actions[id(rule)] = action(rule, self.profile.options)
        return found

    def _mark(self, ds: Dataset, run: _Run) -> None:
        """PS3.15 E.1.1, 6: the attributes that say the data set was de-identified, how."""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = (
            f"PS3.15 {self.table.edition} E.1-1 {self.profile.name}")[:64]
        items = []
        for code in [codes.cid7050.BasicApplicationConfidentialityProfile,
                     *(_OPTION_CODES[o] for o in Option if o in self.profile.options)]:
            item = Dataset()
            item.CodeValue = code.value
            item.CodingSchemeDesignator = code.scheme_designator
            item.CodeMeaning = code.meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        options = self.profile.options
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if Option.RETAIN_LONG_MODIFIED_DATES in options
            else "UNMODIFIED" if Option.RETAIN_LONG_FULL_DATES in options else "REMOVED")


def _plain_copy(original: Dataset) -> Dataset:
    """A deep copy of ``original`` as a plain :class:`~pydicom.dataset.Dataset`: a data set
    read from the store (:class:`storage.convert.AsStored`) hands out converted copies of
    its elements, so values set on them would not stay."""
    ds = Dataset()
    for element in original:
        ds.add(copy.deepcopy(element))
    meta = getattr(original, "file_meta", None)
    if meta is not None:
        ds.file_meta = copy.deepcopy(meta)
    return ds


def _patient_key(ds: Dataset) -> str:
    """Who the patient is, as the index says (IssuerOfPatientID and PatientID, or the one
    study of a patient without an ID)."""
    patient_id = str(ds.get("PatientID", "") or "")
    if patient_id:
        return f"{ds.get('IssuerOfPatientID', '') or ''}\\{patient_id}"
    return f"study:{ds.get('StudyInstanceUID', '')}"


def _identifying_values(ds: Dataset, deidentifier: Deidentifier) -> list[str]:
    """The text values the profile takes out of ``ds`` (names, IDs, addresses ...): a
    cleaned text must not repeat them. The components of a name count on their own (a
    description says "John Doe", not "Doe^John"); values of fewer than 3 characters are too
    common to remove from text; private creators name a vendor, not a patient."""
    found: set[str] = set()

    def visit(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value or ():
                    visit(item)
                continue
            rule = deidentifier.table.rule(element.tag)
            if rule is None or element.VR not in _TEXT_VRS or element.tag.is_private_creator:
                continue
            if deidentifier.action_for(rule) in ("K", "C"):
                continue
            for value in _values(element):
                text = str(value)
                found.add(text)
                if element.VR == "PN":
                    found.update(re.split(r"[\^=]+", text))
    visit(ds)
    return sorted((v for v in found if len(v.strip()) >= 3), key=len, reverse=True)


def _values(element: DataElement) -> list[object]:
    value = element.value
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list) else [value]


class _Run:
    """One data set's pass: the patient's key, its shift, the UIDs replaced."""

    def __init__(self, deidentifier: Deidentifier, key: str, identifying: list[str]) -> None:
        self.d = deidentifier
        self.key = key
        self.shift = datetime.timedelta(days=deidentifier.pseudonyms.date_shift_days(key))
        self.identifying = [re.escape(v) for v in identifying]
        self.scrub = (re.compile("|".join(self.identifying), re.IGNORECASE)
                      if self.identifying else None)
        self.uids: dict[str, str] = {}

    def dataset(self, ds: Dataset) -> None:
        creators = _private_creators(ds)
        for element in list(ds):
            self.element(ds, element, creators)

    def element(self, ds: Dataset, element: DataElement, creators: dict[int, str]) -> None:
        tag = int(element.tag)
        rule = self.d.table.rule(tag)
        if tag >> 16 & 1:
            if not self._safe_private(tag, creators):
                del ds[tag]
            return
        if rule is None:
            if element.VR == "SQ":
                self.items(element)
            return
        code = self.d.action_for(rule)
        if code == "X":
            del ds[tag]
        elif code == "K" or code == "X/Z/U*":
            if element.VR == "SQ":
                self.items(element)
        elif code in ("Z", "X/Z"):
            self.empty(element)
        elif code in ("D", "Z/D", "X/D", "X/Z/D"):
            self.dummy(element)
        elif code == "U":
            self.replace_uids(element)
        elif code == "C":
            self.clean(element)
        else:  # read_table refuses any other code
            raise AssertionError(f"unknown action {code!r}")

    def items(self, element: DataElement) -> None:
        for item in element.value or ():
            self.dataset(item)

    def empty(self, element: DataElement) -> None:
        if element.tag in (PATIENT_ID, PATIENT_NAME):
            patient_id, name = self.d.pseudonyms.patient(self.key)
            element.value = patient_id if element.tag == PATIENT_ID else name
        elif element.VR == "SQ":
            element.value = Sequence([])
        else:
            element.value = None if element.VR in _BINARY_NUMBER_VRS else (
                b"" if isinstance(element.value, bytes) else "")

    def dummy(self, element: DataElement) -> None:
        """Table E.1-1a ``D``: a value of the VR, the same for the same original (a
        pseudonym rather than a constant, so that distinct values stay distinct)."""
        vr = element.VR
        if element.tag in (PATIENT_ID, PATIENT_NAME):
            self.empty(element)
        elif vr == "SQ":
            element.value = Sequence([Dataset()])
        elif vr == "UI":
            self.replace_uids(element)
        elif vr in _DUMMY:
            element.value = _DUMMY[vr]
        elif vr in _NUMBER_VRS:
            element.value = _NUMBER_VRS[vr]
        elif vr in _BINARY_NUMBER_VRS:
            element.value = 0
        elif isinstance(element.value, bytes) or vr in ("OB", "OW", "OD", "OF", "OL", "OV",
                                                         "UN"):
            element.value = b"\x00\x00"
        else:
            original = "\\".join(str(v) for v in _values(element))
            text = self.d.pseudonyms.text(f"dummy:{int(element.tag):08X}", original,
                                          16)
            element.value = f"ANON^{text}"[:_MAX_LENGTH["PN"]] if vr == "PN" else text

    def replace_uids(self, element: DataElement) -> None:
        def one(uid: object) -> str:
            text = str(uid)
            if not text:
                return text
            new = self.uids.get(text)
            if new is None:
                new = self.uids[text] = self.d.pseudonyms.uid(text)
            return new
        values = _values(element)
        if element.VR != "UI":
            self.dummy(element)
        elif len(values) > 1:
            element.value = [one(v) for v in values]
        elif values:
            element.value = one(values[0])

    def clean(self, element: DataElement) -> None:
        """Table E.1-1a ``C``: dates moved by the patient's shift (PS3.15 E.3.6, Modified
        Dates; times stay), sequences de-identified item by item, text kept without the
        data set's identifying values, anything else replaced like ``D``."""
        vr = element.VR
        if vr == "SQ":
            self.items(element)
        elif vr in ("DA", "DT"):
            if Option.RETAIN_LONG_MODIFIED_DATES in self.d.profile.options:
                shifted = [_shift(str(v), vr, self.shift) for v in _values(element)]
                element.value = shifted if len(shifted) > 1 else (shifted[0] if shifted else "")
            elif Option.RETAIN_LONG_FULL_DATES not in self.d.profile.options:
                self.dummy(element)
        elif vr == "TM":
            if not ({Option.RETAIN_LONG_MODIFIED_DATES, Option.RETAIN_LONG_FULL_DATES}
                    & self.d.profile.options):
                self.dummy(element)
        elif vr in _TEXT_VRS - {"PN"}:
            if self.scrub is not None:
                values = [self.scrub.sub("***", str(v)) for v in _values(element)]
                element.value = values if len(values) > 1 else (values[0] if values else "")
        elif vr == "UI":
            self.replace_uids(element)
        else:
            self.dummy(element)

    def _safe_private(self, tag: int, creators: dict[int, str]) -> bool:
        """PS3.15 E.3.10 Retain Safe Private: a private attribute whose (creator, element
        byte) the profile lists, and the creator elements of such blocks."""
        profile = self.d.profile
        if Option.RETAIN_SAFE_PRIVATE not in profile.options or not profile.safe_private:
            return False
        group, elem = tag >> 16, tag & 0xFFFF
        if 0x0010 <= elem <= 0x00FF:  # a private creator: kept if a safe one
            creator = creators.get(tag, "")
            return any(c == creator for c, _ in profile.safe_private)
        creator = creators.get(group << 16 | elem >> 8, "")
        return (creator, elem & 0xFF) in profile.safe_private


def _private_creators(ds: Dataset) -> dict[int, str]:
    return {int(e.tag): str(e.value).strip() for e in ds
            if e.tag.is_private and 0x0010 <= e.tag.element <= 0x00FF}


def _shift(value: str, vr: str, shift: datetime.timedelta) -> str:
    """A DA (YYYYMMDD) or the date part of a DT moved back by ``shift``; a value that is
    not a full date (a DT of a year only) is replaced by the shifted year's start."""
    digits = value.strip()
    if len(digits) >= 8 and digits[:8].isdigit():
        try:
            moved = (datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
                     - shift).strftime("%Y%m%d")
        except ValueError:
            return _DUMMY[vr]
        return moved + (digits[8:] if vr == "DT" else "")
    return _DUMMY[vr] if digits else digits


BURNED_IN_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "Video Endoscopic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": "Video Photographic Image Storage",
}
"""SOP Classes whose pixels often carry burned-in text (screen captures, ultrasound,
scanned documents, photographs) when Burned In Annotation (0028,0301) does not say."""

BURNED_IN_MODALITIES = frozenset({"US", "OT", "XC", "ES", "GM", "DOC"})


def burned_in(ds: Dataset) -> str | None:
    """Why ``ds`` may show the patient in its pixels (PS3.15 E.1.1 leaves pixel data to the
    Clean Pixel Data option, which minipacs does not offer), or None: Burned In Annotation
    YES; or, when it is absent, a SOP Class or Modality known for it. NO is believed."""
    said = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if said == "YES":
        return "Burned In Annotation (0028,0301) is YES"
    if said == "NO":
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in BURNED_IN_CLASSES:
        return (f"{BURNED_IN_CLASSES[sop_class]} without Burned In Annotation (0028,0301) "
                "NO")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in BURNED_IN_MODALITIES:
        return f"Modality {modality} without Burned In Annotation (0028,0301) NO"
    return None
