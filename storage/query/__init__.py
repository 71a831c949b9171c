"""The query model: identifier -> constraints -> SQL + residual matching -> responses.

Parsing (:mod:`.parse`, :func:`parse_identifier`) checks the identifier against the
hierarchical rules of PS3.4 C.4.1.2.1 and turns every key into a :class:`Constraint` made of
OR'ed :class:`Term` objects, one kind per matching rule of PS3.4 C.2.2.2. Execution pushes
into SQL what the index columns can answer (:mod:`.sql`, :func:`sql_conditions`), as a filter
that may let extra rows through but never drops a match, then checks every constraint again
in Python (:mod:`.match`, :func:`row_matches`) and builds the responses (:mod:`.answer`).
Nothing here knows the network: DICOMweb or the command line can reuse all of it.
"""

from ..keys import Level
from .answer import (
    _ASCII_VRS,
    _Out,
    _pydicom_element,
    answer_elements,
    build_response,
    encode_response,
    json_answer,
    response_charset,
    response_charset_problem,
)
from .match import constraint_matches, normalise, row_matches, wildcard_match
from .model import AUTO, UTF8, Constraint, Entity, Kind, Op, Query, Requested, Row, Term
from .parse import parse_identifier
from .qido import (
    BATCH_SIZE,
    Search,
    SearchAnswer,
    SearchParams,
    parse_search,
    retrieve_url,
    run_search,
)
from .sql import page_select, select_rows, sql_conditions, wildcard_sql

__all__ = [
    "AUTO",
    "BATCH_SIZE",
    "UTF8",
    "Constraint",
    "Entity",
    "Kind",
    "Level",
    "Op",
    "Query",
    "Requested",
    "Row",
    "Search",
    "SearchAnswer",
    "SearchParams",
    "Term",
    "_ASCII_VRS",
    "_Out",
    "_pydicom_element",
    "answer_elements",
    "build_response",
    "constraint_matches",
    "encode_response",
    "json_answer",
    "normalise",
    "page_select",
    "parse_identifier",
    "parse_search",
    "response_charset",
    "response_charset_problem",
    "retrieve_url",
    "row_matches",
    "run_search",
    "select_rows",
    "sql_conditions",
    "wildcard_match",
    "wildcard_sql",
]
