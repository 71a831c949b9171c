"""``minipacs conformance-statement``: the DICOM Conformance Statement (PS3.2, its Annex A
structure) written from what the code does, never by hand.

The tables come from the objects the server runs with: the presentation contexts, roles,
PDU size, association limit and implementation identifiers of the AE that
:func:`scp.server.build_ae` builds for the configuration; the C-FIND keys of storage's key
table (:data:`storage.QUERY_KEYS`); the extended negotiation the C-FIND handler accepts
(:data:`scp.handlers.SUPPORTED_EXTENSIONS`); the statuses of :mod:`scp.status`; the DICOMweb
routes of :mod:`web`. ``tests/test_conformance.py`` negotiates every context the statement
lists, and some it does not, with a live server, so the two cannot drift apart.

:func:`statement` builds a list of blocks (headings, paragraphs, tables);
:func:`to_markdown` and :func:`to_html` write them out.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.charset import python_encoding
from pydicom.uid import UID
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from starlette.routing import BaseRoute, Mount, Route

from storage import QUERY_KEYS, Level
from web import delete as web_delete
from web import qido, stow, wado

from . import status
from .config import Config
from .contexts import (
    FIND_MODELS,
    GET_MODELS,
    MOVE_MODELS,
    STORAGE,
    STORAGE_COMMITMENT,
    VERIFICATION,
)
from .handlers import SUPPORTED_EXTENSIONS
from .server import build_ae

DOCTOR_FIND = str(StudyRootQueryRetrieveInformationModelFind)
"""The one query model minipacs uses as an SCU: ``minipacs doctor``'s C-FIND."""
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM Application Context Name (PS3.7 A.2.1)."""
PRESENTATION_TITLE = "Acceptable presentation contexts"
SYNTAX_SET_TITLE = "Transfer syntax sets"


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


Block = Heading | Paragraph | Table


def _name(uid: str) -> str:
    return str(UID(uid).name)


def _yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def statement(config: Config, version: str) -> list[Block]:
    """The conformance statement of minipacs ``version`` serving as ``config`` says."""
    ae = build_ae(config)
    contexts = list(ae.supported_contexts)
    syntax_sets: dict[tuple[str, ...], str] = {}
    for cx in contexts:
        syntaxes = tuple(str(ts) for ts in cx.transfer_syntax)
        syntax_sets.setdefault(syntaxes, chr(ord("A") + len(syntax_sets)))
    title = config.ae.title
    storage_classes = sorted((str(cx.abstract_syntax) for cx in contexts
                              if str(cx.abstract_syntax) in STORAGE), key=_name)
    today = datetime.date.today().isoformat()

    blocks: list[Block] = [
        Heading(1, f"DICOM Conformance Statement: minipacs {version}"),
        Paragraph(f"Written by `minipacs conformance-statement` on {today} from the code of"
                  f" minipacs {version} and its configuration (AE title {title}), following"
                  " the structure of PS3.2 Annex A."),
        Heading(2, "1 Conformance Statement Overview"),
        Paragraph("minipacs is a picture archive: it stores what modalities send (Storage"
                  " SCP), answers queries (Query/Retrieve C-FIND SCP), sends studies back"
                  " (C-MOVE and C-GET SCP, Storage SCU), confirms storage (Storage"
                  " Commitment Push Model SCP) and forwards what it stores to other AEs"
                  " (Storage SCU). It serves the same archive over DICOMweb (section 8)."),
        Table("Network services", ("SOP Classes", "User of Service (SCU)",
                                   "Provider of Service (SCP)"), (
            (f"Storage: {len(storage_classes)} SOP Classes (section 4.2.1.1)", "Yes", "Yes"),
            *((_name(uid), "Yes (`minipacs doctor`)" if uid == DOCTOR_FIND else "No", "Yes")
              for uid in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS)),
            (_name(STORAGE_COMMITMENT), "No", "Yes"),
            (_name(VERIFICATION), "Yes", "Yes"),
        )),
        Paragraph("No Media Storage Application Profile is supported."),
        Heading(2, "3 Introduction"),
        Paragraph("For those who integrate minipacs with modalities, viewers and other"
                  " archives. minipacs follows PS3.4 Annexes A, B, C and J, PS3.7 and PS3.18;"
                  " the sections below say where it chooses among the standard's options."),
        Heading(2, "4 Networking"),
        Heading(3, "4.1 Implementation Model"),
        Paragraph(f"One Application Entity, {title}, serves all DICOM network services."
                  " It listens for associations; each runs in its own thread. A stored"
                  " instance is written to the file store byte for byte, then indexed; it is"
                  " acknowledged only after both. C-FIND is answered from the index; C-MOVE"
                  " opens an association to the destination and sends C-STORE"
                  " sub-operations; C-GET sends them on the same association. Routing rules"
                  " and Storage Commitment reports are queued in the index and sent by"
                  " background workers on associations of their own."),
        Heading(3, f"4.2 AE Specifications: {title}"),
        Heading(4, "4.2.1.1 SOP Classes"),
        Table("SOP Classes", ("SOP Class", "UID", "SCU", "SCP"), tuple(
            (_name(uid), uid, _yes(uid in STORAGE or uid in (VERIFICATION, DOCTOR_FIND)),
             "Yes")
            for uid in (VERIFICATION, *storage_classes, *FIND_MODELS, *MOVE_MODELS,
                        *GET_MODELS, STORAGE_COMMITMENT))),
        Heading(4, "4.2.1.2 Association Policies"),
        Table("Association parameters", ("Parameter", "Value"), (
            ("Application Context Name", APPLICATION_CONTEXT),
            ("Maximum PDU size received", f"{ae.maximum_pdu_size} bytes"
             if ae.maximum_pdu_size else "unlimited (0)"),
            ("Maximum number of simultaneous associations accepted",
             str(ae.maximum_associations)),
            ("Asynchronous operations window", "not supported (one operation at a time)"),
            ("Implementation Class UID", str(ae.implementation_class_uid)),
            ("Implementation Version Name", str(ae.implementation_version_name or "")),
        )),
        Heading(4, "4.2.1.3 Association Initiation Policy"),
        Paragraph("Storage SCU (C-MOVE sub-operations, `minipacs send`, routing): one"
                  " association per operation or batch (routing: up to the peer's"
                  " `peers[].connections` at once per server process), proposing for each"
                  " SOP Class Explicit"
                  " and Implicit VR Little Endian (or only the peer's configured"
                  " `transfer_syntax`) and each stored transfer syntax; an instance goes as"
                  " stored when its syntax is accepted, else converted. At most 128 contexts."),
        Paragraph(f"Storage Commitment: the N-EVENT-REPORT goes on a new association to the"
                  f" requester, proposing {_name(STORAGE_COMMITMENT)} with SCP/SCU Role"
                  " Selection (minipacs as SCP) and the uncompressed transfer syntaxes."),
        Paragraph("Verification SCU: the administrator's page's echo and `minipacs doctor`;"
                  " the doctor also proposes what a send would, with Study Root C-FIND as SCU"
                  " for one STUDY-level query it cancels after 10 responses."),
        Heading(4, "4.2.1.4 Association Acceptance Policy"),
        Paragraph("Associations are accepted from AEs listed in `peers` (any AE when"
                  " `security.allow_unknown_peers` is true), limited to their `services`; the"
                  " Called AE Title is checked when `security.require_called_ae_title` is"
                  " true. Each acceptable context below is accepted with the first of the"
                  " proposed transfer syntaxes that is in its set."),
        Table(PRESENTATION_TITLE, ("Abstract Syntax", "UID", "Transfer syntax set",
                                   "Role", "Extended negotiation"), tuple(
            (_name(str(cx.abstract_syntax)), str(cx.abstract_syntax),
             syntax_sets[tuple(str(ts) for ts in cx.transfer_syntax)],
             "SCP; SCU by role selection" if cx.scu_role else "SCP",
             ", ".join(SUPPORTED_EXTENSIONS.values()) if str(cx.abstract_syntax)
             in FIND_MODELS else "None")
            for cx in contexts)),
        Table(SYNTAX_SET_TITLE, ("Set", "Transfer Syntax", "UID"), tuple(
            (letter, _name(ts), ts) for syntaxes, letter in syntax_sets.items()
            for ts in syntaxes)),
        *_sop_specific(),
        Heading(3, "4.3 Network Interfaces"),
        Paragraph("TCP/IP (IPv4 and IPv6, as `ae.bind` says). DICOM TLS (PS3.15 B.9, the"
                  " BCP 195 profile, TLS 1.2 or later) on its own port when `tls.enabled`."),
        Heading(3, "4.4 Configuration"),
        Table("This configuration", ("Parameter", "Value"), (
            ("AE Title", title),
            ("Port", str(config.ae.port)),
            ("TLS port", str(config.tls.port) if config.tls.enabled else "none"),
            ("ACSE timeout", f"{config.ae.acse_timeout} s"),
            ("DIMSE timeout", f"{config.ae.dimse_timeout} s"),
            ("Network timeout", f"{config.ae.network_timeout} s"),
            ("Peers known", ", ".join(p.ae_title for p in config.peers) or "none"),
        )),
        Heading(2, "5 Media Interchange"),
        Paragraph("Not supported."),
        Heading(2, "6 Support of Character Sets"),
        Paragraph("Stored instances keep their Specific Character Set. Queries are matched"
                  " on decoded values; responses are encoded in `query.response_charset`"
                  " (`auto`: the stored values' own). These character sets are decoded: "
                  + ", ".join(sorted(k for k in python_encoding if k)) + "."),
        Heading(2, "7 Security"),
        Paragraph("Access by AE title (`peers`, their `services` and `network`),"
                  " DICOM TLS with client certificates, and an audit trail of every"
                  " association and operation as JSON lines, sent also to an audit record"
                  " repository when `audit.syslog` names one: the Audit Trail Message"
                  " Format Profile (PS3.15 A.5) over the Syslog-TLS (A.6) or Syslog-UDP"
                  " (A.7) Transmission Profile, or syslog over TCP"
                  + (f" (configured: {config.audit.syslog})" if config.audit.syslog else "")
                  + ". DICOMweb: HTTP Basic users and bearer tokens with read or read-write"
                  " rights."),
        Heading(2, "8 DICOMweb (PS3.18)"),
        Table("DICOMweb resources", ("Method", "Resource (under web.base_path)"), tuple(
            _routes([*qido.ROUTES, *wado.ROUTES, *stow.ROUTES, *web_delete.ROUTES]))),
    ]
    return blocks


def _routes(routes: Iterable[BaseRoute]) -> list[tuple[str, str]]:
    rows = []
    for route in routes:
        if isinstance(route, Route):
            methods = sorted(m for m in (route.methods or ()) if m != "HEAD")
            rows.append((", ".join(methods), route.path))
        elif isinstance(route, Mount):
            rows.extend(_routes(route.routes))
    return rows


def _sop_specific() -> list[Block]:
    """PS3.2 A.4.2.1.4.x: what each SCP does, its keys and its statuses."""
    levels = [level for level in Level]
    return [
        Heading(4, "Storage SCP (PS3.4 Annex B)"),
        Paragraph("Level 2 (Full) storage: every instance is kept as received, all elements,"
                  " no coercion; an instance sent again under the same SOP Instance UID"
                  " replaces the stored one or is refused, as `storage.on_duplicate` says."),
        Table("Storage statuses", ("Status", "Code", "Meaning"), (
            ("Success", f"{status.SUCCESS:04X}", "stored and indexed"),
            ("Warning", f"{status.STORE_ELEMENTS_DISCARDED:04X}",
             "other content is already stored under this UID and kept"),
            ("Failure", f"{status.DUPLICATE_SOP_INSTANCE:04X}", "duplicate refused"),
            ("Failure", f"{status.STORE_OUT_OF_RESOURCES:04X}",
             "out of resources (disk, size limit)"),
            ("Failure", f"{status.STORE_DATASET_DOES_NOT_MATCH_SOP_CLASS:04X}",
             "data set does not match the SOP Class"),
            ("Failure", f"{status.STORE_CANNOT_UNDERSTAND:04X}", "cannot understand"),
            ("Failure", f"{status.STORE_PROCESSING_FAILURE:04X}", "processing failure"),
        )),
        Heading(4, "Query/Retrieve SCP (PS3.4 Annex C)"),
        Paragraph("Patient Root and Study Root, levels " + ", ".join(
            level.name for level in levels) + ". Matching: single value, list of UIDs,"
                  " universal, wildcard, range, sequence (PS3.4 C.2.2.2); person names"
                  " case-insensitively when `query.pn_case_insensitive`. These keys are"
                  " matched and returned; any other attribute of the level is returned"
                  " from the stored data set."),
        Table("Query keys", ("Level", "Attribute", "Tag", "VR", "Kind"), tuple(
            (key.level.name, key.keyword,
             f"({key.tag >> 16:04X},{key.tag & 0xFFFF:04X})", key.vr,
             "Unique" if key.unique else "computed" if key.computed else "matched")
            for key in QUERY_KEYS.values())),
        Table("Query/Retrieve statuses", ("Status", "Code", "Meaning"), (
            ("Pending", f"{status.PENDING:04X}", "a match"),
            ("Pending", f"{status.PENDING_WARNING:04X}", "a match; an optional key not"
                                                          " supported"),
            ("Success", f"{status.SUCCESS:04X}", "done"),
            ("Cancel", f"{status.CANCEL:04X}", "cancelled by C-CANCEL"),
            ("Failure", f"{status.FIND_OUT_OF_RESOURCES:04X}", "out of resources"),
            ("Failure", f"{status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS:04X}",
             "identifier does not match the SOP Class"),
            ("Failure", f"{status.UNABLE_TO_PROCESS:04X}", "unable to process"),
            ("Failure", f"{status.MOVE_DESTINATION_UNKNOWN:04X}",
             "C-MOVE: the destination is not a peer with a host"),
            ("Failure", f"{status.MOVE_UNABLE_TO_PERFORM_SUBOPERATIONS:04X}",
             "C-MOVE, C-GET: no sub-operation could be performed"),
            ("Warning", f"{status.SUBOPERATIONS_WITH_FAILURES:04X}",
             "C-MOVE, C-GET: some sub-operations failed"),
            ("Failure", f"{status.NOT_AUTHORISED:04X}", "the peer may not use this service"),
        )),
        Heading(4, "Storage Commitment Push Model SCP (PS3.4 Annex J)"),
        Paragraph("N-ACTION (Request Storage Commitment) is answered Success once recorded;"
                  " the N-EVENT-REPORT follows on a new association (section 4.2.1.3): each"
                  " instance committed only if it is stored under that SOP Class and its"
                  " file still hashes as indexed; failures with reason"
                  f" {status.NO_SUCH_OBJECT_INSTANCE:04X} (no such instance),"
                  f" {status.CLASS_INSTANCE_CONFLICT:04X} (class/instance conflict) or"
                  f" {status.PROCESSING_FAILURE:04X} (processing failure)."),
    ]


# -- writing it out ------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    """The statement as Markdown (GitHub's tables)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            out.append(block.text)
        else:
            out.append(f"**{block.title}**\n")
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out.extend("| " + " | ".join(_cell(c) for c in row) + " |" for row in block.rows)
        out.append("")
    return "\n".join(out)


def to_html(blocks: list[Block]) -> str:
    """The statement as one HTML page."""
    esc = html.escape
    title = next((b.text for b in blocks if isinstance(b, Heading)), "Conformance Statement")
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>",
           "<style>body{font:14px/1.4 system-ui,sans-serif;max-width:70em;margin:2em auto}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccd;"
           "padding:.2em .6em;text-align:left}th{background:#f2f4f8}</style>",
           "</head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{esc(block.text)}</p>")
        else:
            out.append(f"<table><caption>{esc(block.title)}</caption><thead><tr>"
                       + "".join(f"<th>{esc(h)}</th>" for h in block.header)
                       + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                       for row in block.rows)
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
