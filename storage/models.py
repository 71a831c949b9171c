"""The index schema: one table per query level, on a peewee ``DatabaseProxy``.

Each row holds the attributes that are matched often as real, indexed columns, the rest of
its level's attributes as DICOM JSON (``attrs``), and the counters behind the computed query
keys (PS3.4 C.3.2 to C.3.4). PN columns used for case- and accent-insensitive matching have
``_folded`` twins: PatientName one indexed column per component group (so that a wildcard
with a literal start reads a range of one index), ReferringPhysicianName one framed column
(:func:`storage.values.pn_framed`). The backend is chosen at run time by
:func:`storage.index.connect`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import peewee as pw

SCHEMA_VERSION = 6
"""The version of the schema below; :mod:`storage.index` migrates an older index to it.

1. The first schema.
2. PatientName kept folded per component group, each indexed, instead of one framed column.
3. ``pending_removal``: the files of deleted instances, until they are removed (an older
   minipacs would take them for unindexed instances and index them again).
4. ``outbox``: the instances routing must still send, the Storage Commitment reports to
   send (:mod:`storage.outbox`).
5. The indexes of :data:`TEXT_INDEXES` made per backend (PostgreSQL's serve a wildcard),
   and ``series_study_id`` dropped (``series_study_id_modality`` begins with its column).
6. ``pseudonym_uid``: the UIDs and PatientIDs a de-identified DICOMweb answer replaced,
   mapped back to the stored ones (:mod:`storage.deidentified`).
"""

TEXT_INDEXES: tuple[tuple[str, str], ...] = (
    ("patient", "patient_id"),
    ("patient", "patient_name_alphabetic_folded"),
    ("patient", "patient_name_ideographic_folded"),
    ("patient", "patient_name_phonetic_folded"),
    ("study", "accession_number"),
)
"""(table, column) of the text columns a query may match with a wildcard that has a literal
start (PS3.4 C.2.2.2.4), each indexed by :func:`storage.index.text_indexes`, not by the model:
PostgreSQL uses an index for ``LIKE 'x%'`` only if it compares bytes (``text_pattern_ops``)
whatever the database's collation; SQLite's GLOB uses a plain one."""

database_proxy: Any = pw.DatabaseProxy()


class BaseModel(pw.Model):
    id = pw.AutoField()

    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(BaseModel):
    version = pw.IntegerField()


class Patient(BaseModel):
    # identity: IssuerOfPatientID + PatientID, or, without a PatientID, the one study
    patient_key = pw.TextField(unique=True)
    patient_id = pw.CharField(max_length=64, default="")  # indexed: TEXT_INDEXES
    issuer_of_patient_id = pw.CharField(max_length=64, default="")
    patient_name = pw.TextField(default="")
    # folded groups of the name (values.pn_groups), each indexed (TEXT_INDEXES)
    patient_name_alphabetic_folded = pw.TextField(default="")
    patient_name_ideographic_folded = pw.TextField(default="")
    patient_name_phonetic_folded = pw.TextField(default="")
    patient_birth_date = pw.CharField(max_length=8, default="", index=True)
    patient_sex = pw.CharField(max_length=16, default="")
    attrs = pw.TextField(default="{}")
    num_studies = pw.IntegerField(default=0)
    num_series = pw.IntegerField(default=0)
    num_instances = pw.IntegerField(default=0)


class Study(BaseModel):
    patient = pw.ForeignKeyField(Patient, backref="studies", on_delete="CASCADE")
    study_instance_uid = pw.CharField(max_length=64, unique=True)
    study_date = pw.CharField(max_length=8, default="", index=True)
    study_time = pw.CharField(max_length=13, default="")
    accession_number = pw.CharField(max_length=64, default="")  # indexed: TEXT_INDEXES
    study_id = pw.CharField(max_length=64, default="")
    referring_physician_name = pw.TextField(default="")
    referring_physician_name_folded = pw.TextField(default="")
    study_description = pw.TextField(default="")
    attrs = pw.TextField(default="{}")
    num_series = pw.IntegerField(default=0)
    num_instances = pw.IntegerField(default=0)
    modalities = pw.TextField(default="")
    sop_classes = pw.TextField(default="")
    created_at = pw.DateTimeField()

    if TYPE_CHECKING:
        patient_id: int
        series: Any  # backref


class Series(BaseModel):
    # indexed by (study, modality) below
    study = pw.ForeignKeyField(Study, backref="series", on_delete="CASCADE", index=False)
    series_instance_uid = pw.CharField(max_length=64, unique=True)
    modality = pw.CharField(max_length=16, default="")
    series_number = pw.CharField(max_length=12, default="")
    series_description = pw.TextField(default="")
    attrs = pw.TextField(default="{}")
    num_instances = pw.IntegerField(default=0)

    if TYPE_CHECKING:
        study_id: int

    class Meta:
        indexes = ((("study", "modality"), False),)


class Instance(BaseModel):
    series = pw.ForeignKeyField(Series, backref="instances", on_delete="CASCADE")
    study = pw.ForeignKeyField(Study, on_delete="CASCADE", index=False)
    sop_instance_uid = pw.CharField(max_length=64, unique=True)
    sop_class_uid = pw.CharField(max_length=64)
    instance_number = pw.CharField(max_length=12, default="")
    transfer_syntax_uid = pw.CharField(max_length=64)
    file_key = pw.CharField(max_length=64, unique=True)
    file_size = pw.BigIntegerField()
    content_hash = pw.CharField(max_length=64)
    received_at = pw.DateTimeField()
    attrs = pw.TextField(default="{}")

    if TYPE_CHECKING:
        study_id: int
        series_id: int

    class Meta:
        indexes = ((("study", "sop_class_uid"), False),)


class PendingRemoval(BaseModel):
    """A deleted instance's file, recorded in the transaction that deleted its row and
    removed once the file is gone (:mod:`storage.removal`)."""

    file_key = pw.CharField(max_length=64, unique=True)
    sop_instance_uid = pw.CharField(max_length=64)
    queued_at = pw.DateTimeField()


class OutboxItem(BaseModel):
    """Work for a peer that must survive a crash (:mod:`storage.outbox`): an instance a route
    must still send (``kind`` route, written in the transaction that indexed it: one row
    per peer and instance), or a Storage Commitment report to send (``kind`` commitment:
    ``sop_instance_uid`` holds the Transaction UID, ``payload`` the references)."""

    kind = pw.CharField(max_length=16, default="route")
    peer = pw.CharField(max_length=16)
    route = pw.CharField(max_length=64)
    sop_instance_uid = pw.CharField(max_length=64)
    study_instance_uid = pw.CharField(max_length=64, index=True)
    queued_at = pw.DateTimeField()
    due_at = pw.DateTimeField()
    attempts = pw.IntegerField(default=0)
    failed = pw.BooleanField(default=False)
    last_error = pw.TextField(default="")
    # a new store of the instance while a sender has it: that sender must not delete it
    generation = pw.IntegerField(default=0)
    lease_owner = pw.CharField(max_length=128, default="")
    lease_until = pw.DateTimeField(null=True)
    payload = pw.TextField(default="")

    class Meta:
        table_name = "outbox"
        indexes = ((("kind", "peer", "sop_instance_uid"), True),
                   (("kind", "peer", "failed", "due_at"), False))


class NodeBeat(BaseModel):
    """A serving process's heartbeat: its name (:func:`storage.outbox.lease_owner`) and how
    many times it has beaten. Other nodes watch the count change by their own clocks (no
    two hosts' clocks are compared); one that stops changing belongs to a dead node, whose
    outbox leases are then freed (:meth:`storage.outbox.Outbox.free_leases_of`)."""

    name = pw.CharField(max_length=128, unique=True)
    beats = pw.BigIntegerField(default=0)

    class Meta:
        table_name = "node"


class PseudonymUid(BaseModel):
    """A UID that a de-identified DICOMweb answer gave in place of a stored one
    (``replacement``, PS3.15 E.3.10) and that stored one (``original``): the way back from a
    URL a de-identified account was given (:mod:`storage.deidentified`); likewise a
    patient's pseudonymous PatientID (``replacement`` ``patient:`` and the pseudonym,
    ``original`` IssuerOfPatientID, a backslash and PatientID), for a search by it. The
    replacement is a keyed hash of the original, so a row is the same on every node and
    never changes."""

    replacement = pw.CharField(max_length=64, unique=True)
    original = pw.TextField()

    class Meta:
        table_name = "pseudonym_uid"


MODELS: tuple[type[BaseModel], ...] = (SchemaVersion, Patient, Study, Series, Instance,
                                       PendingRemoval, OutboxItem, NodeBeat, PseudonymUid)
