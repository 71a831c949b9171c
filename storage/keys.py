"""The table of query keys: which level each attribute lives at, and how it is matched.

One table drives parsing, SQL push-down, matching and responses (like pynetdicom's qrscp
``_ATTRIBUTES`` and pydicom's ``valuerep.VALIDATORS``): adding a key is adding an entry.

* :data:`KEYS` lists the keys with an index column or a computed value (PS3.4 Tables C.6-1
  to C.6-6 Unique and Required keys, the common Optional ones, and the computed keys).
* :data:`LEVEL_OF` places any other attribute at the level whose DICOM JSON keeps it,
  following the PS3.3 modules (Patient; General Study and Patient Study; General Series,
  General Equipment and Frame of Reference). Everything else is instance level.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword


class Level(enum.IntEnum):
    """Query/Retrieve levels, top to bottom (PS3.4 C.3)."""

    PATIENT = 0
    STUDY = 1
    SERIES = 2
    IMAGE = 3


class Model(enum.Enum):
    """Query/Retrieve information models (PS3.4 C.6.1, C.6.2)."""

    PATIENT_ROOT = "PATIENT_ROOT"
    STUDY_ROOT = "STUDY_ROOT"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is Model.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


@dataclass(frozen=True)
class Key:
    """One supported query key.

    Attributes
    ----------
    keyword : str
        The DICOM keyword.
    level : Level
        The level whose row holds it.
    unique : bool
        Whether it is the level's Unique key (PS3.4 C.3).
    column : str or None
        The index column matched in SQL; ``None`` for keys matched only in Python.
    computed : str or None
        The counter column that answers a computed key (PS3.4 C.3.2 to C.3.4).
    groups : tuple of str, optional
        For a PN key instead of ``column``: the three columns holding the folded
        Alphabetic, Ideographic and Phonetic groups (PS3.5 6.2.1), each indexed.
    """

    keyword: str
    level: Level
    unique: bool = False
    column: str | None = None
    computed: str | None = None
    groups: tuple[str, str, str] | None = None

    @property
    def tag(self) -> int:
        tag = tag_for_keyword(self.keyword)
        assert tag is not None, self.keyword
        return int(tag)

    @property
    def vr(self) -> str:
        return str(dictionary_VR(self.tag))


P, ST, SE, IM = Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE

KEYS: dict[str, Key] = {
    k.keyword: k
    for k in (
        # PATIENT (PS3.4 Table C.6-1)
        Key("PatientID", P, unique=True, column="patient_id"),
        Key("PatientName", P, groups=("patient_name_alphabetic_folded",
                                      "patient_name_ideographic_folded",
                                      "patient_name_phonetic_folded")),
        Key("IssuerOfPatientID", P, column="issuer_of_patient_id"),
        Key("PatientBirthDate", P, column="patient_birth_date"),
        Key("PatientSex", P, column="patient_sex"),
        Key("NumberOfPatientRelatedStudies", P, computed="num_studies"),
        Key("NumberOfPatientRelatedSeries", P, computed="num_series"),
        Key("NumberOfPatientRelatedInstances", P, computed="num_instances"),
        # STUDY (PS3.4 Table C.6-2 / C.6-5)
        Key("StudyInstanceUID", ST, unique=True, column="study_instance_uid"),
        Key("StudyDate", ST, column="study_date"),
        Key("StudyTime", ST, column="study_time"),
        Key("AccessionNumber", ST, column="accession_number"),
        Key("StudyID", ST, column="study_id"),
        Key("ReferringPhysicianName", ST, column="referring_physician_name_folded"),
        Key("StudyDescription", ST, column="study_description"),
        Key("NumberOfStudyRelatedSeries", ST, computed="num_series"),
        Key("NumberOfStudyRelatedInstances", ST, computed="num_instances"),
        Key("ModalitiesInStudy", ST, computed="modalities"),
        Key("SOPClassesInStudy", ST, computed="sop_classes"),
        # SERIES (PS3.4 Table C.6-3)
        Key("SeriesInstanceUID", SE, unique=True, column="series_instance_uid"),
        Key("Modality", SE, column="modality"),
        Key("SeriesNumber", SE),
        Key("SeriesDescription", SE, column="series_description"),
        Key("NumberOfSeriesRelatedInstances", SE, computed="num_instances"),
        # IMAGE (PS3.4 Table C.6-4)
        Key("SOPInstanceUID", IM, unique=True, column="sop_instance_uid"),
        Key("SOPClassUID", IM, column="sop_class_uid"),
        Key("InstanceNumber", IM),
        Key("AvailableTransferSyntaxUID", IM, computed="transfer_syntax_uid"),
    )
}

UNIQUE_KEY: dict[Level, str] = {k.level: k.keyword for k in KEYS.values() if k.unique}

_PATIENT_ATTRIBUTES = """
PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence TypeOfPatientID
PatientBirthDate PatientBirthTime PatientBirthDateInAlternativeCalendar
PatientDeathDateInAlternativeCalendar PatientAlternativeCalendar PatientSex
OtherPatientIDsSequence OtherPatientIDs OtherPatientNames PatientBirthName PatientMotherBirthName
EthnicGroup EthnicGroupCodeSequence PatientComments PatientSpeciesDescription
PatientSpeciesCodeSequence PatientBreedDescription PatientBreedCodeSequence
BreedRegistrationSequence StrainDescription StrainNomenclature StrainCodeSequence
StrainAdditionalInformation StrainStockSequence GeneticModificationsSequence
ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization PatientIdentityRemoved
DeidentificationMethod DeidentificationMethodCodeSequence QualityControlSubject
ReferencedPatientSequence ReferencedPatientPhotoSequence PatientAddress
PatientTelephoneNumbers PatientTelecomInformation CountryOfResidence RegionOfResidence
MilitaryRank BranchOfService PatientReligiousPreference PatientInsurancePlanCodeSequence
PatientPrimaryLanguageCodeSequence MedicalRecordLocator
NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries NumberOfPatientRelatedInstances
"""

_STUDY_ATTRIBUTES = """
StudyInstanceUID StudyDate StudyTime ReferringPhysicianName
ReferringPhysicianIdentificationSequence ConsultingPhysicianName
ConsultingPhysicianIdentificationSequence StudyID AccessionNumber
IssuerOfAccessionNumberSequence StudyDescription PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence RequestingServiceCodeSequence
ReferencedStudySequence ProcedureCodeSequence ReasonForPerformedProcedureCodeSequence
AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize
PatientWeight PatientSizeCodeSequence PatientBodyMassIndex MeasuredAPDimension
MeasuredLateralDimension MedicalAlerts Allergies Occupation SmokingStatus
AdditionalPatientHistory PregnancyStatus LastMenstrualDate PatientSexNeutered
AdmissionID IssuerOfAdmissionIDSequence ServiceEpisodeID IssuerOfServiceEpisodeIDSequence
ServiceEpisodeDescription PatientState OtherStudyNumbers StudyStatusID StudyPriorityID
InterpretationAuthor ReasonForVisit ReasonForVisitCodeSequence
NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances ModalitiesInStudy SOPClassesInStudy
"""

_SERIES_ATTRIBUTES = """
SeriesInstanceUID Modality SeriesNumber SeriesDescription SeriesDescriptionCodeSequence
Laterality SeriesDate SeriesTime PerformingPhysicianName
PerformingPhysicianIdentificationSequence ProtocolName OperatorsName
OperatorIdentificationSequence ReferencedPerformedProcedureStepSequence
RelatedSeriesSequence BodyPartExamined PatientPosition SmallestPixelValueInSeries
LargestPixelValueInSeries RequestAttributesSequence PerformedProcedureStepID
PerformedProcedureStepStartDate PerformedProcedureStepStartTime
PerformedProcedureStepEndDate PerformedProcedureStepEndTime
PerformedProcedureStepDescription PerformedProtocolCodeSequence
CommentsOnThePerformedProcedureStep AnatomicalOrientationType TreatmentSessionUID
FrameOfReferenceUID PositionReferenceIndicator Manufacturer InstitutionName
InstitutionAddress StationName InstitutionalDepartmentName
InstitutionalDepartmentTypeCodeSequence ManufacturerModelName DeviceSerialNumber
DeviceUID SoftwareVersions GantryID SpatialResolution DateOfLastCalibration
TimeOfLastCalibration PixelPaddingValue NumberOfSeriesRelatedInstances
"""


def _level_table() -> dict[int, Level]:
    table: dict[int, Level] = {}
    for level, words in (
        (Level.PATIENT, _PATIENT_ATTRIBUTES),
        (Level.STUDY, _STUDY_ATTRIBUTES),
        (Level.SERIES, _SERIES_ATTRIBUTES),
    ):
        for keyword in words.split():
            tag = tag_for_keyword(keyword)
            if tag is None:  # pragma: no cover - a typo in the table above
                raise ValueError(f"unknown keyword in level table: {keyword}")
            table[int(tag)] = level
    return table


LEVEL_OF: dict[int, Level] = _level_table()
"""Attribute tag -> the level whose row keeps it; tags not listed are instance level."""


def level_of(tag: int) -> Level:
    """Return the level whose row keeps the attribute ``tag`` (PS3.3 modules)."""
    return LEVEL_OF.get(int(tag), Level.IMAGE)
