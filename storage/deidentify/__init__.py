"""De-identification on the way out (PS3.15 Annex E): the standard's Table E.1-1 read from
its DocBook source, a profile of options, and keyed replacements that stay consistent
across instances, studies, runs and nodes. The stored originals never change: callers
de-identify the copy they send."""

from .profile import BURNED_IN_CLASSES, Deidentifier, Outcome, Profile, action, burned_in
from .pseudonyms import Pseudonyms
from .table import CODES, HEADINGS, Option, Rule, Table, read_table

__all__ = [
    "BURNED_IN_CLASSES",
    "CODES",
    "HEADINGS",
    "Deidentifier",
    "Option",
    "Outcome",
    "Profile",
    "Pseudonyms",
    "Rule",
    "Table",
    "action",
    "burned_in",
    "read_table",
]
