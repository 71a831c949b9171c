"""``minipacs conformance-statement`` (scp/conformance.py) held against a live association
negotiation: every presentation context the statement lists is accepted, with each transfer
syntax of its set; what it does not list is rejected; its association parameters, roles and
extended negotiation are what the server answers. The statement cannot drift from the code."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from pynetdicom import AE, build_context, build_role
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

from scp import conformance
from scp.__main__ import version
from tests.conftest import Running
from tests.test_cli import minipacs_command

MAX_CONTEXTS = 128
NOT_LISTED = ["1.2.840.10008.5.1.4.31",  # Modality Worklist Information Model - FIND
              "1.2.840.10008.5.1.4.34.6.1",  # UPS Push
              "1.2.840.10008.5.1.1.9",  # Basic Grayscale Print Management Meta
              "1.2.826.0.1.3680043.8.498.424242"]  # a private class of nobody's


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each table of the Markdown statement, by its bold title: its rows' cells."""
    found: dict[str, list[list[str]]] = {}
    title = ""
    for line in markdown.splitlines():
        bold = re.fullmatch(r"\*\*(.+)\*\*", line)
        if bold:
            title = bold.group(1)
            found[title] = []
        elif line.startswith("| ") and title and not line.startswith("|---"):
            found[title].append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return {name: rows[1:] for name, rows in found.items()}  # without the header


@pytest.fixture
def written(server: Running) -> dict[str, list[list[str]]]:
    return tables(conformance.to_markdown(conformance.statement(server.config, version())))


def listed_contexts(written: dict[str, list[list[str]]]) -> list[tuple[str, str, str]]:
    """(abstract syntax, transfer syntax, role) of every pair the statement lists."""
    sets: dict[str, list[str]] = {}
    for letter, _, uid in written[conformance.SYNTAX_SET_TITLE]:
        sets.setdefault(letter, []).append(uid)
    return [(uid, syntax, role) for _, uid, letter, role, _ in
            written[conformance.PRESENTATION_TITLE] for syntax in sets[letter]]


def requestor(contexts: list[tuple[str, str]]) -> AE:
    ae = AE(ae_title="CONFORM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for abstract, syntax in contexts:
        ae.add_requested_context(abstract, syntax)
    return ae


def test_every_listed_context_is_accepted_with_each_syntax_of_its_set(
        server: Running, written: dict[str, list[list[str]]]) -> None:
    pairs = [(abstract, syntax) for abstract, syntax, _ in listed_contexts(written)]
    assert len(pairs) > 1000  # 170-odd classes, each with every syntax pydicom knows
    for start in range(0, len(pairs), MAX_CONTEXTS):
        batch = pairs[start:start + MAX_CONTEXTS]
        assoc = requestor(batch).associate("127.0.0.1", server.port, ae_title="MINIPACS")
        assert assoc.is_established
        try:
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                        for cx in assoc.accepted_contexts}
            assert accepted == set(batch), set(batch) - accepted
        finally:
            assoc.release()


def test_what_is_not_listed_is_rejected(server: Running,
                                        written: dict[str, list[list[str]]]) -> None:
    listed = {uid for _, uid, *_ in written[conformance.PRESENTATION_TITLE]}
    assert not listed & set(NOT_LISTED)
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert ct in listed
    asked = [(uid, "1.2.840.10008.1.2.1") for uid in NOT_LISTED]
    asked.append((ct, "1.2.826.0.1.3680043.8.498.1.2.3"))  # a transfer syntax of nobody's
    asked.append(("1.2.840.10008.1.1", "1.2.840.10008.1.2"))  # one accepted, to associate
    assoc = requestor(asked).associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [
            "1.2.840.10008.1.1"]
        assert sorted(str(cx.abstract_syntax) for cx in assoc.rejected_contexts) == sorted(
            [*NOT_LISTED, ct])
    finally:
        assoc.release()


def test_the_association_parameters_are_what_the_server_answers(
        server: Running, written: dict[str, list[list[str]]]) -> None:
    said = dict(written["Association parameters"])
    ae = requestor([("1.2.840.10008.1.1", "1.2.840.10008.1.2")])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        assert said["Maximum PDU size received"] == f"{acceptor.maximum_length} bytes"
        assert said["Implementation Class UID"] == acceptor.implementation_class_uid
        assert said["Implementation Version Name"] == acceptor.implementation_version_name
        assert said["Application Context Name"] == "1.2.840.10008.3.1.1.1"
    finally:
        assoc.release()
    limit = int(said["Maximum number of simultaneous associations accepted"])
    assert limit == server.config.ae.max_associations


def test_roles_and_extended_negotiation_are_as_listed(
        server: Running, written: dict[str, list[list[str]]]) -> None:
    rows = {uid: (role, extended) for _, uid, _, role, extended in
            written[conformance.PRESENTATION_TITLE]}
    ct, find = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.2.2.1"
    assert rows[ct][0] == "SCP; SCU by role selection"
    assert rows[find][1] == ", ".join(
        ["relational queries", "combined date-time matching", "empty value matching",
         "multiple value matching"])
    asked = SOPClassExtendedNegotiation()
    asked.sop_class_uid = find
    asked.service_class_application_information = bytes([1] * 7)
    ae = AE(ae_title="CONFORM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts = [build_context(ct), build_context(find)]
    assoc = ae.associate("127.0.0.1", server.port, contexts, ae_title="MINIPACS",
                         ext_neg=[build_role(ct, scp_role=True, scu_role=False), asked])
    assert assoc.is_established
    try:
        storage = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ct)
        assert storage.as_scp and not storage.as_scu  # we may be the SCP: C-GET's role
        # bytes 0, 1, 5, 6 of PS3.4 Table C.5-1, as the table says; fuzzy, timezone and
        # enhanced multi-frame (2, 3, 4) not
        assert assoc.acceptor.sop_class_extended[find] == bytes([1, 1, 0, 0, 0, 1, 1])
    finally:
        assoc.release()


class _HtmlTables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, list[list[str]]] = {}
        self.title: str | None = None
        self.text: list[str] | None = None
        self.caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "caption":
            self.caption, self.text = True, []
        elif tag == "tr" and self.title is not None:
            self.found[self.title].append([])
        elif tag in ("td", "th"):
            self.text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption" and self.text is not None:
            self.title = "".join(self.text)
            self.found[self.title] = []
            self.caption, self.text = False, None
        elif tag in ("td", "th") and self.text is not None and self.title is not None:
            self.found[self.title][-1].append("".join(self.text).strip())
            self.text = None

    def handle_data(self, data: str) -> None:
        if self.text is not None:
            self.text.append(data)


def test_the_html_holds_the_same_tables_and_the_command_writes_both(
        server: Running, written: dict[str, list[list[str]]], tmp_path: Path) -> None:
    page = conformance.to_html(conformance.statement(server.config, version()))
    parser = _HtmlTables()
    parser.feed(page)
    assert {name: rows[1:] for name, rows in parser.found.items()} == {
        name: [[cell.replace("\\|", "|") for cell in row] for row in rows]
        for name, rows in written.items()}
    out = tmp_path / "conformance.html"
    done = subprocess.run([*minipacs_command(), "conformance-statement", "--format", "html",
                           "--output", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert out.read_text().startswith("<!doctype html>")
    markdown = subprocess.run([*minipacs_command(), "conformance-statement"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert markdown.returncode == 0
    assert markdown.stdout.startswith("# DICOM Conformance Statement: minipacs ")
    assert f"| Maximum PDU size received | {server.config.ae.max_pdu_size} bytes |" in \
        markdown.stdout


def test_the_statement_is_about_the_configuration(start_server: Callable[..., Running]
                                                 ) -> None:
    running = start_server(**{"ae.title": "ARCHIVE7", "ae.max_pdu_size": 65536})
    written = tables(conformance.to_markdown(conformance.statement(running.config, "x")))
    assert dict(written["This configuration"])["AE Title"] == "ARCHIVE7"
    assert dict(written["Association parameters"])["Maximum PDU size received"] == \
        "65536 bytes"
