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

from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import CannotConvert
from .pseudonyms import Pseudonyms
from .stream import BURNED_IN, MODALITY, SOP_CLASS, TEXT_VRS, Rewritten, rewrite
from .table import Option, Rule, Table

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

    ``safe_private``: (group, private creator, element byte) of the private attributes
    kept under the Retain Safe Private option, e.g. ``(0x0019, "SIEMENS MR HEADER",
    0x0C)`` for (0019,xx0C) of that creator's block (PS3.15 E.3.10).
    """

    name: str
    options: frozenset[Option] = frozenset()
    safe_private: frozenset[tuple[int, str, int]] = frozenset()

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
    ``secret`` (:mod:`.stream` does the work, on the encoded data set). Stateless between
    data sets: every replacement is a function of the value and the secret, so two
    processes (two nodes) de-identify alike."""

    def __init__(self, table: Table, profile: Profile, secret: bytes) -> None:
        self.table = table
        self.profile = profile
        self.options = profile.options
        self.safe_private = profile.safe_private
        self.pseudonyms = Pseudonyms(secret)
        self._codes: dict[int, str | None] = {}
        self._private_code = None if table.private is None else self.action_for(table.private)
        self.cleans_text = any(self.action_for(rule) == "C" and _text_vr(rule)
                               for rule in table)
        """Whether a text attribute is cleaned (its identifying values taken out): only
        then are they gathered first."""

    def apply(self, original: Dataset) -> Outcome:
        """A de-identified copy of ``original`` (which is left as it is), encoded, changed
        by :meth:`apply_encoded` and decoded again; its File Meta (if any) follows.

        Raises
        ------
        CannotConvert
            Explicit VR Big Endian (retired), which is not de-identified.
        """
        meta = getattr(original, "file_meta", None)
        syntax = UID(str(getattr(meta, "TransferSyntaxUID", "") or ExplicitVRLittleEndian))
        read_implicit, read_little = original.original_encoding  # as read, if read
        little = syntax.is_little_endian if read_little is None else read_little
        if not little:
            raise CannotConvert("cannot de-identify a big endian data set: the retired"
                                " Explicit VR Big Endian is not supported")
        implicit = (syntax == ImplicitVRLittleEndian) if read_implicit is None else read_implicit
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
        try:
            write_dataset(buffer, original)
        except (TypeError, ValueError):  # an element pydicom cannot write as read (a VR it
            for _ in original.iterall():  # did not take from the file): converted first
                pass
            buffer = DicomBytesIO()
            buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
            write_dataset(buffer, original)
        done = self.apply_encoded(buffer.getvalue(), implicit)
        ds = read_dataset(BytesIO(done.data), implicit, True)
        if meta is not None:  # only what says what the file holds: the Source AE Title
            ds.file_meta = FileMetaDataset()  # (the sender's) and private ones go
            for keyword in ("MediaStorageSOPClassUID", "TransferSyntaxUID"):
                if keyword in meta:
                    setattr(ds.file_meta, keyword, meta[keyword].value)
            if syntax.is_deflated:  # inflated by pydicom, written here without deflating
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            if "SOPInstanceUID" in ds:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        return Outcome(ds, done.uids)

    def apply_encoded(self, data: bytes | memoryview, implicit: bool,
                      withhold_burned_in: bool = False) -> Rewritten:
        """A data set as encoded (little endian, without File Meta) de-identified, encoded
        alike (:func:`.stream.rewrite`); with ``withhold_burned_in``,
        :class:`~storage.errors.Withheld` when :func:`burned_in_reason` gives a reason."""
        check = _burned_in_of_values if withhold_burned_in else None
        return rewrite(self, data, implicit, check)

    def code_of(self, tag: int) -> str | None:
        """The action for the attribute ``tag`` (its row's, :meth:`action_for`), None for
        one the table does not list; remembered per standard tag (a private one has the
        private row's: not remembered, there can be any number of them)."""
        if tag >> 16 & 1:
            return self._private_code
        try:
            return self._codes[tag]
        except KeyError:
            rule = self.table.rule(tag)
            code = self._codes[tag] = None if rule is None else self.action_for(rule)
            return code

    def action_for(self, rule: Rule) -> str:
        """:func:`action` of ``rule`` under this profile's options."""
        return action(rule, self.options)

    def method(self) -> str:
        """De-identification Method (0012,0063): the table's edition and the profile."""
        return f"PS3.15 {self.table.edition} E.1-1 {self.profile.name}"[:64]

    def codes(self) -> list[Code]:
        """De-identification Method Code Sequence (0012,0064): CID 7050, the Basic
        Profile's code and each option's."""
        return [codes.cid7050.BasicApplicationConfidentialityProfile,
                *(_OPTION_CODES[o] for o in Option if o in self.profile.options)]


def _text_vr(rule: Rule) -> bool:
    """The row covers an attribute of a text VR (or one the dictionary does not know)."""
    if rule.mask != 0xFFFFFFFF:
        return True
    try:
        return dictionary_VR(rule.value) in TEXT_VRS or dictionary_VR(rule.value) == "SQ"
    except KeyError:
        return True


def _burned_in_of_values(top: dict[int, str]) -> str | None:
    return burned_in_reason(top.get(BURNED_IN, ""), top.get(SOP_CLASS, ""),
                            top.get(MODALITY, ""))


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
    """Why ``ds`` may show the patient in its pixels (:func:`burned_in_reason`), or None."""
    return burned_in_reason(str(ds.get("BurnedInAnnotation", "") or ""),
                            str(ds.get("SOPClassUID", "") or ""),
                            str(ds.get("Modality", "") or ""))


def burned_in_reason(burned_in_annotation: str, sop_class_uid: str,
                     modality: str) -> str | None:
    """Why an instance may show the patient in its pixels (PS3.15 E.1.1 leaves pixel data
    to the Clean Pixel Data option, which minipacs does not offer), or None: Burned In
    Annotation (0028,0301) YES; or, when it is absent, a SOP Class or Modality known for
    it. NO is believed."""
    said = burned_in_annotation.strip().upper()
    if said == "YES":
        return "Burned In Annotation (0028,0301) is YES"
    if said == "NO":
        return None
    sop_class = sop_class_uid.strip("\x00 ")
    if sop_class in BURNED_IN_CLASSES:
        return (f"{BURNED_IN_CLASSES[sop_class]} without Burned In Annotation (0028,0301) "
                "NO")
    if modality.strip().upper() in BURNED_IN_MODALITIES:
        return f"Modality {modality.strip().upper()} without Burned In Annotation (0028,0301) NO"
    return None
