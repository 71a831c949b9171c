"""De-identification on the way out (PS3.15 Annex E): the standard's Table E.1-1 read from
its DocBook source, a profile of options, and keyed replacements that stay consistent
across instances, studies, runs and nodes. The stored originals never change: callers
de-identify the copy they send."""

from .profile import BURNED_IN_CLASSES, Deidentifier, Outcome, Profile, action, burned_in
from .profiles import (
    MIN_SECRET_LENGTH,
    Deidentifiers,
    DeidentifyOptions,
    option_problem,
    safe_private,
    safe_private_problem,
)
from .pseudonyms import Pseudonyms
from .table import CODES, HEADINGS, Option, Rule, Table, read_table

__all__ = [
    "BURNED_IN_CLASSES",
    "CODES",
    "HEADINGS",
    "Deidentifier",
    "Deidentifiers",
    "DeidentifyOptions",
    "MIN_SECRET_LENGTH",
    "option_problem",
    "safe_private",
    "safe_private_problem",
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
