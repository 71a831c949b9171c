"""The administrator's page (web/admin.py) against a running server: the search and its
counts, the refusals of its actions, and every action clicked in Debian's headless Chromium
driven by Playwright, with the screenshots the README shows (written to the folder
``MINIPACS_SCREENSHOTS`` names, else to the test's own)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page
from pydicom.dataset import Dataset
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

import web.admin as web_admin
from tests.conftest import Running, associate, reserved_port
from tests.factory import make_ds, save, uid
from tests.test_routing import queue_of, received, storescp, wait_for
from tests.web.conftest import WebRunning
from tests.web.test_viewer import study as slices_of
from web.auth import hash_password

SHOTS = "MINIPACS_SCREENSHOTS"


class _Tables(HTMLParser):
    """The text of each cell of each row of the table with ``id``."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id = table_id
        self.depth = 0
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None
        self.in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", self.table_id) in attrs:
            self.depth = 1
        elif self.depth and tag == "tbody":
            self.in_body = True
        elif self.depth and self.in_body and tag == "tr":
            self.rows.append([])
        elif self.depth and self.in_body and tag == "td":
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if self.depth and tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None
        elif self.depth and tag == "table":
            self.depth = 0
            self.in_body = False

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def table(html: str, table_id: str) -> list[list[str]]:
    parser = _Tables(table_id)
    parser.feed(html)
    return parser.rows


def store(running: WebRunning | Running, datasets: list[Dataset]) -> None:
    assoc = associate(running.dicom if isinstance(running, WebRunning) else running)
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def three_studies() -> dict[str, list[Dataset]]:
    """Alpha: CT, 2 series, 3 instances; Beta: MR, 1 instance; Gamma: CT and MR."""
    alpha, beta, gamma = uid(), uid(), uid()
    a1, a2, g1, g2 = uid(), uid(), uid(), uid()
    common = {"StudyInstanceUID": alpha, "PatientName": "Alpha^Ann", "PatientID": "PA",
              "StudyDate": "20240105", "AccessionNumber": "ACCA"}
    mr = {"Modality": "MR", "SOPClassUID": MRImageStorage}
    return {
        "Alpha": [make_ds(SeriesInstanceUID=a1, **common), make_ds(SeriesInstanceUID=a1,
                                                                 **common),
                  make_ds(SeriesInstanceUID=a2, SeriesNumber=2, **common)],
        "Beta": [make_ds(StudyInstanceUID=beta, PatientName="Beta^Bob", PatientID="PB",
                         StudyDate="20231201", AccessionNumber="ACCB", **mr)],
        "Gamma": [make_ds(StudyInstanceUID=gamma, SeriesInstanceUID=g1, PatientName="Gamma^Gil",
                          PatientID="PG", StudyDate="20240301", AccessionNumber="ACCG"),
                  make_ds(StudyInstanceUID=gamma, SeriesInstanceUID=g2, PatientName="Gamma^Gil",
                          PatientID="PG", StudyDate="20240301", AccessionNumber="ACCG",
                          SeriesNumber=2, **mr)],
    }


def patients(html: str) -> dict[str, list[str]]:
    """The study list's rows by patient name."""
    return {row[0]: row for row in table(html, "studies") if len(row) == 8}


# -- the search, without a browser ---------------------------------------------------------


@pytest.mark.parametrize(("form", "expected"), [
    ({}, {"Alpha^Ann", "Beta^Bob", "Gamma^Gil"}),
    ({"name": "Alp"}, {"Alpha^Ann"}),  # a prefix, as a person types it
    ({"name": "*a^B*"}, {"Beta^Bob"}),  # wildcards as given (PS3.4 C.2.2.2.4)
    ({"patient_id": "PB"}, {"Beta^Bob"}),
    ({"from": "2024-01-01"}, {"Alpha^Ann", "Gamma^Gil"}),  # an open range (C.2.2.2.5)
    ({"from": "2023-01-01", "to": "2024-01-31"}, {"Alpha^Ann", "Beta^Bob"}),
    ({"from": "2024-03-01", "to": "2024-03-01"}, {"Gamma^Gil"}),
    ({"modality": "MR"}, {"Beta^Bob", "Gamma^Gil"}),
    ({"accession": "ACCA"}, {"Alpha^Ann"}),
    ({"modality": "CT", "from": "2024-02-01"}, {"Gamma^Gil"}),
])
def test_the_search_matches_each_field_and_shows_each_studys_counts(
        web: WebRunning, form: dict[str, str], expected: set[str]) -> None:
    store(web, [ds for group in three_studies().values() for ds in group])
    answer = httpx.get(web.root + "/", params=form)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["server-timing"].startswith("app;dur=")
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["content-security-policy"] == "frame-ancestors 'none'"
    rows = patients(answer.text)
    assert set(rows) == expected
    counts = {"Alpha^Ann": ("CT", "2", "3"), "Beta^Bob": ("MR", "1", "1"),
              "Gamma^Gil": ("CT\\MR", "2", "2")}
    for name, row in rows.items():
        modalities, series, instances = counts[name]
        assert (row[5].replace("MR\\CT", "CT\\MR"), row[6], row[7]) == (
            modalities, series, instances), row


def test_a_bad_search_is_said_on_the_page_with_a_400(web: WebRunning) -> None:
    answer = httpx.get(web.root + "/", params={"from": "2024-13-45"})
    assert answer.status_code == 400
    assert 'class="error"' in answer.text and "StudyDate" in answer.text


def test_the_list_pages_without_losing_the_search(web: WebRunning,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_admin, "PAGE_SIZE", 2)
    store(web, [ds for group in three_studies().values() for ds in group])
    seen: list[str] = []
    first = httpx.get(web.root + "/", params={"name": "*"})
    seen += patients(first.text)
    assert len(seen) == 2 and 'rel="prev"' not in first.text
    link = first.text.split('href="', 1)[0] and first.text.split('rel="next"')[0]
    next_url = link.rsplit('href="', 1)[1].split('"')[0].replace("&amp;", "&")
    assert "name=%2A" in next_url and "page=2" in next_url
    second = httpx.get(web.root + next_url)
    seen += patients(second.text)
    assert 'rel="prev"' in second.text and 'rel="next"' not in second.text
    assert sorted(seen) == ["Alpha^Ann", "Beta^Bob", "Gamma^Gil"]


def test_values_are_escaped(web: WebRunning) -> None:
    ds = make_ds(PatientName="<b>Bold</b>", StudyDescription="<script>alert(1)</script>")
    store(web, [ds])
    listed = httpx.get(web.root + "/").text
    assert "<script>alert" not in listed and "&lt;b&gt;Bold&lt;/b&gt;" in listed
    shown = httpx.get(f"{web.root}/admin/studies/{ds.StudyInstanceUID}").text
    assert "<script>alert" not in shown and "&lt;script&gt;alert(1)&lt;/script&gt;" in shown


def test_a_study_not_stored_is_a_404_and_a_bad_uid_a_400(web: WebRunning) -> None:
    assert httpx.get(f"{web.root}/admin/studies/{uid()}").status_code == 404
    assert httpx.get(f"{web.root}/admin/studies/1.2.x").status_code == 400


def test_every_page_answers_and_admin_leads_home(web: WebRunning) -> None:
    for path in ("/admin/upload", "/admin/peers", "/admin/queue", "/admin/status",
                 "/admin/static/admin.js", "/admin/static/admin.css"):
        assert httpx.get(web.root + path).status_code == 200, path
    home = httpx.get(web.root + "/admin/")
    assert home.status_code == 307 and home.headers["location"] == "/"


# -- the actions' refusals -----------------------------------------------------------------


def test_an_action_takes_json_from_this_site_only(web: WebRunning) -> None:
    url = web.root + "/admin/api/queue"
    body = {"action": "retry", "kind": "route"}
    form = httpx.post(url, data={"action": "retry"})  # what a form on another site posts
    assert form.status_code == 415
    forged = httpx.post(url, json=body, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 403 and "origin" in forged.text
    ours = httpx.post(url, json=body, headers={"Origin": web.root})
    assert ours.status_code == 200 and ours.json()["items"] == 0
    for site, code in (("cross-site", 403), ("same-site", 403), ("same-origin", 200),
                       ("none", 200)):  # Fetch Metadata, what browsers send now
        answer = httpx.post(url, json=body, headers={"Sec-Fetch-Site": site})
        assert answer.status_code == code, (site, answer.text)
    proxied = {"Origin": "https://pacs.example.org", "X-Forwarded-Host": "pacs.example.org"}
    assert httpx.post(url, json=body, headers=proxied).status_code == 200  # Host rewritten
    assert httpx.post(url, json=body, headers={**proxied, "Sec-Fetch-Site": "cross-site"}
                      ).status_code == 403
    for item in (0, -1, 2**63, 10**20, True):
        assert httpx.post(url, json={**body, "id": item}).status_code == 400, item
    assert httpx.post(url, content=b"{", headers={"Content-Type": "application/json"}
                      ).status_code == 400
    assert httpx.post(url, json={"action": "explode"}).status_code == 400
    assert httpx.post(url, json={**body, "id": "1"}).status_code == 400
    assert httpx.post(web.root + "/admin/api/echo", json={}).status_code == 400


def test_reading_needs_read_and_acting_read_write(start_web: Callable[..., WebRunning]
                                                  ) -> None:
    running = start_web(**{"web.anonymous_local": "none", "web.users": [
        f"reader:read:{hash_password('r-pass')}", f"admin:read-write:{hash_password('w-pass')}"]})
    assert httpx.get(running.root + "/").status_code == 401
    assert httpx.get(running.root + "/", auth=("reader", "r-pass")).status_code == 200
    url = running.root + "/admin/api/queue"
    body = {"action": "retry", "kind": "route"}
    assert httpx.post(url, json=body, auth=("reader", "r-pass")).status_code == 403
    assert httpx.post(url, json=body, auth=("admin", "w-pass")).status_code == 200


def test_the_status_page_shows_the_index_the_metrics_and_the_audit_trail(
        web: WebRunning) -> None:
    def stores(html: str) -> int:  # the process's count: other tests' stores too
        return sum(int(r[2]) for r in table(html, "metrics")
                   if r[0].startswith("DIMSE operations") and r[1] == "operation=C-STORE,"
                   " status=0000")

    before = stores(httpx.get(web.root + "/admin/status").text)
    store(web, three_studies()["Alpha"])
    wait_for("the association's last line", lambda: audit_events(web)[-1]["event"]
             == "association-released")  # written once the A-RELEASE-RP is out
    page = httpx.get(web.root + "/admin/status").text
    storage = {row[0]: row[1] for row in _storage_rows(page)}
    assert storage["Studies"] == "1" and storage["Instances"] == "3"
    assert stores(page) == before + 3
    events = [r[1] for r in table(page, "audit")]
    assert events[:5] == ["association-released", "dimse", "dimse", "dimse",
                          "association-established"], events  # newest first


def _storage_rows(html: str) -> list[list[str]]:
    """The storage table's rows: a header cell and a value cell each."""
    class Rows(_Tables):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if self.depth and self.in_body and tag == "th":
                self.cell = []
            else:
                super().handle_starttag(tag, attrs)

        def handle_endtag(self, tag: str) -> None:
            if self.depth and tag == "th" and self.cell is not None:
                self.rows[-1].append("".join(self.cell).strip())
                self.cell = None
            else:
                super().handle_endtag(tag)

    parser = Rows("storage")
    parser.feed(html)
    return parser.rows


# -- every action, clicked in a real browser -------------------------------------------------


def shots_folder(tmp_path: Path) -> Path:
    """Where the screenshots go: ``MINIPACS_SCREENSHOTS`` (the README's, docs/screenshots),
    else the test's own folder."""
    folder = Path(os.environ.get(SHOTS) or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def audit_events(running: WebRunning) -> list[dict[str, Any]]:
    path = running.dicom.config.audit_path
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_action_of_the_page_clicked_in_chromium(
        start_web: Callable[..., WebRunning], chromium_page: Page, tmp_path: Path,
        held_port: int) -> None:
    """A person searches, opens a study (its thumbnails painted), sends it to a reading
    station (DCMTK storescp), echoes the peers (one up, one down), uploads files (one not
    DICOM), retries and drops a failed routing item, deletes a series and then the study
    (each after a confirmation), and reads the status page; the archive and the receiver
    agree with what the page said at each step."""
    page = chromium_page
    page.set_viewport_size({"width": 1280, "height": 800})
    shots = shots_folder(tmp_path)
    out = tmp_path / "reader"
    with reserved_port() as reader_port:
        running = start_web(
            peers=[{"ae_title": "READER", "host": "127.0.0.1", "port": reader_port},
                   {"ae_title": "GONE", "host": "127.0.0.1", "port": held_port}],
            routes=[{"name": "to-gone", "match": {"PatientID": "ROUTED"}, "to": ["GONE"]}],
            **{"routing.retry_seconds": 600.0, "routing.max_attempts": 1})
    ct = slices_of("CT_small.dcm", "Page^Carla", 3)
    second = slices_of("CT_small.dcm", "Page^Carla", 2)
    for ds in second:  # a second series of the same study
        ds.StudyInstanceUID, ds.SeriesNumber = ct[0].StudyInstanceUID, 2
    mr = slices_of("MR_small.dcm", "Other^Dan", 1)
    store(running, [*ct, *second, *mr])
    study_uid = str(ct[0].StudyInstanceUID)
    failures: list[str] = []
    page.on("response", lambda r: failures.append(f"{r.status} {r.url}")
            if r.status >= 400 else None)

    with storescp("READER", reader_port, out):
        # search, then open the study
        page.goto(running.root + "/")
        page.get_by_label("Patient name").fill("Page")
        page.get_by_role("button", name="Search").click()
        page.wait_for_url("**/?name=Page*")
        rows = page.locator("#studies tbody tr")
        assert rows.count() == 1 and "Page^Carla" in rows.inner_text()
        assert rows.locator("td").nth(7).inner_text() == "5"
        page.goto(running.root + "/")
        page.screenshot(path=shots / "studies.png", full_page=True)
        page.get_by_role("link", name="Page^Carla").click()
        page.wait_for_url(f"**/admin/studies/{study_uid}")
        page.wait_for_function("() => [...document.querySelectorAll('img.thumb')].length == 2"
                               " && [...document.querySelectorAll('img.thumb')].every("
                               "i => i.complete && i.naturalWidth == 128)", polling=100)
        viewer = page.get_by_role("link", name="Open in viewer")
        assert viewer.get_attribute("href") == f"/viewer/viewer?StudyInstanceUIDs={study_uid}"
        page.screenshot(path=shots / "study.png", full_page=True)

        # send it to the reading station
        page.get_by_label("Send to").select_option("READER")
        page.get_by_role("button", name="Send study").click()
        result = page.locator("#result")
        result.filter(has_text="sent 5 of 5").wait_for()
        assert received(out) == {str(ds.SOPInstanceUID): 1 for ds in [*ct, *second]}
        assert any(e["event"] == "send" and e["peer"] == "READER" and e["completed"] == 5
                   and e["via"] == "web page" for e in audit_events(running))

        # echo both peers
        page.get_by_role("link", name="Peers").click()
        for title, said in (("READER", "Success"), ("GONE", "cannot connect")):
            row = page.locator(f"tr[data-peer={title}]")
            row.get_by_role("button", name="Echo").click()
            row.locator(".echo-result").filter(has_text=said).wait_for()
        page.screenshot(path=shots / "peers.png", full_page=True)

    # upload: one file stored, one refused
    upload = [save(ds, tmp_path / f"upload{n}.dcm")
              for n, ds in enumerate(slices_of("CT_small.dcm", "Upload^Una", 1))]
    (tmp_path / "notes.txt").write_text("not DICOM")
    page.get_by_role("link", name="Upload").click()
    page.locator("#files").set_input_files([*upload, tmp_path / "notes.txt"])
    page.get_by_role("button", name="Upload").click()
    page.locator("#result").filter(has_text="stored 1, failed 1").wait_for()
    page.screenshot(path=shots / "upload.png", full_page=True)
    failures = [f for f in failures if "/studies" not in f or not f.startswith("409")]
    assert running.archive.totals()["studies"] == 3

    # a routed instance fails (nobody at GONE); retry it, then drop it
    store(running, [make_ds(PatientID="ROUTED")])
    wait_for("the routing attempt to fail", lambda: queue_of(running.dicom) == {"GONE": (0, 1)})
    page.get_by_role("link", name="Queue").click()
    page.screenshot(path=shots / "queue.png", full_page=True)
    page.locator("#route-summary").get_by_role("button", name="Retry failed").click()
    page.locator("#route-entries td", has_text="due").wait_for()  # the page reloaded
    wait_for("the retry in the audit trail", lambda: any(
        e["event"] == "queue-retry" and e["items"] == 1 for e in audit_events(running)))
    assert queue_of(running.dicom) == {"GONE": (1, 0)}  # due again (GONE rests 600 s)
    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#route-entries").get_by_role("button", name="Drop").click()
    page.locator("#route-summary").filter(has_text="Nothing is waiting").wait_for()
    assert queue_of(running.dicom) == {}

    # delete one series, then the study, each after saying yes
    page.goto(f"{running.root}/admin/studies/{study_uid}")
    asked: list[str] = []

    def accept(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    page.locator(f"tr[data-series='{second[0].SeriesInstanceUID}']").get_by_role(
        "button", name="Delete series").click()
    page.locator("#instance-count").filter(has_text="3").wait_for()
    assert asked[-1] == "Delete series 2 (2 instances)? This cannot be undone."
    page.get_by_role("button", name="Delete study").click()
    page.wait_for_url(running.root + "/")
    assert asked[-1] == "Delete this study (3 instances)? This cannot be undone."
    assert "Page^Carla" not in page.locator("#studies").inner_text()
    assert running.archive.totals() == {"patients": 3, "studies": 3, "series": 3,
                                        "instances": 3}  # Dan's, Una's, the routed one

    # the status page says so
    page.get_by_role("link", name="Status").click()
    assert page.locator("#storage").inner_text().split("\n")[1].split() == ["Studies", "3"]
    page.screenshot(path=shots / "status.png")  # the top: the audit trail is long
    assert failures == [], failures


def test_echo_says_why_in_plain_words(start_web: Callable[..., WebRunning], tmp_path: Path,
                                      held_port: int) -> None:
    """Success with its time (DCMTK storescp); a closed port; a peer without a host, or
    none by that name. (A rejection's words: tests/test_doctor.py.)"""
    with reserved_port() as port:
        running = start_web(peers=[{"ae_title": "READER", "host": "127.0.0.1", "port": port},
                                   {"ae_title": "CLOSED", "host": "127.0.0.1",
                                    "port": held_port},
                                   {"ae_title": "CALLER"}])

    def echo(title: str) -> dict[str, Any]:
        answer = httpx.post(running.root + "/admin/api/echo", json={"peer": title})
        assert answer.status_code == 200
        return answer.json()  # type: ignore[no-any-return]

    with storescp("READER", port):
        up = echo("READER")
    assert up["ok"] and "answered C-ECHO: Success" in up["message"], up
    closed = echo("CLOSED")
    assert not closed["ok"] and "cannot connect to 127.0.0.1:" in closed["message"]
    assert "Connection refused" in closed["message"]
    for title in ("CALLER", "NOBODY"):
        assert echo(title) == {"ok": False, "message": f"{title!r} is not in peers, or has no"
                                                       " host"}


def test_the_audit_tail_reaches_into_the_rotated_file(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from scp.admin import PageOperations
    from scp.config import load_config

    path = tmp_path / "audit.jsonl"
    (tmp_path / "audit.jsonl.1").write_text("".join(
        json.dumps({"time": str(n), "event": "old"}) + "\n" for n in range(5)))
    path.write_text('{"time": "5", "ev' + "\n" + json.dumps({"time": "6", "event": "new"})
                    + "\n")  # a torn line, then one whole
    config = tmp_path / "c.yaml"
    config.write_text(f"audit:\n  path: {path}\n")
    operations = PageOperations(load_config(config), None)  # type: ignore[arg-type]
    assert [line["time"] for line in operations.audit_tail(3)] == ["3", "4", "6"]
    assert [line["time"] for line in operations.audit_tail(50)] == ["0", "1", "2", "3", "4",
                                                                     "6"]
    import scp.admin

    long_line = json.dumps({"time": "7", "event": "route", "instances": ["1.2.3"] * 40})
    path.write_text(json.dumps({"time": "6", "event": "new"}) + "\n" + long_line + "\n")
    monkeypatch.setattr(scp.admin, "AUDIT_TAIL_BYTES", len(long_line) + 5)
    # the current file was not read whole: nothing older goes before what was read
    assert [line["time"] for line in operations.audit_tail(50)] == ["7"]


def test_an_upload_refused_whole_says_why(start_web: Callable[..., WebRunning],
                                          chromium_page: Page, tmp_path: Path) -> None:
    running = start_web(**{"web.max_request_mb": 1})
    big = tmp_path / "big.dcm"
    big.write_bytes(bytes(2 * 1024 * 1024))
    page = chromium_page
    page.goto(running.root + "/admin/upload")
    page.locator("#files").set_input_files([big])
    page.get_by_role("button", name="Upload").click()
    said = page.locator("#result").filter(has_text="nothing stored: 413")
    said.wait_for()
    assert "max_request_mb" in said.inner_text(), said.inner_text()


@pytest.mark.parametrize("base", ["/admin", "/viewer", "/metrics", "/admin/x"])
def test_the_pages_paths_cannot_be_dicomwebs(tmp_path: Path, base: str) -> None:
    from scp.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"web:\n  base_path: {base}\n")
    with pytest.raises(ConfigError, match="is taken by the page"):
        load_config(path)
