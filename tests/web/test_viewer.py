"""The OHIF viewer served at /viewer/: the build's files rewritten for that path, the
configuration minipacs generates, and the real viewer (``make viewer``) in Debian's headless
Chromium, driven by Playwright, listing what was stored by C-STORE and painting a study from
our own QIDO-RS and WADO-RS."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from storage import Model
from tests.conftest import associate, find
from tests.factory import encode, save, uid
from tests.web.conftest import WebRunning, require
from web.auth import hash_token, new_token

ROOT = Path(__file__).resolve().parents[2]
VIEWER_DIST = ROOT / "viewer" / "dist"


# -- the files, with a build of our own made like OHIF's ----------------------------------

INDEX = ('<!doctype html><html><head><script>window.PUBLIC_URL="/"</script>'
         '<link rel="manifest" href="/manifest.json"><link rel="icon" href="/assets/favicon.ico">'
         '<meta name="msapplication-TileImage" content="/assets/tile.png">'
         '<script src="/app-config.js"></script><script src="https://cdn.example/x.js"></script>'
         '<script>window.PUBLIC_URL="/"</script><script defer src="/app.bundle.1.js"></script>'
         '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div>'
         '</body></html>')
BUNDLE = ('(() => {\n__webpack_require__.p = "/";\n})();\n'
          "window.browserImportFunction('/dicom-microscopy-viewer/viewer.min.js');\n")


@pytest.fixture
def build(tmp_path: Path) -> Path:
    """A folder laid out like OHIF's ``dist/``, with the root-relative references it has."""
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(INDEX)
    (dist / "app.bundle.1.js").write_text(BUNDLE)
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a1.woff2)}body{background:url(//x/y)}")
    (dist / "manifest.json").write_text('{"icons": [{"src": "/assets/a.png"}], "start_url": "./"}')
    (dist / "app-config.js").write_text("window.config = {name: 'the build own'};")
    (dist / "assets" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n-not-rewritten: src=\"/x\"")
    (tmp_path / "secret.txt").write_text("outside the viewer")
    return dist


def test_the_build_is_served_under_viewer_with_its_root_references_moved_there(
        start_web: Callable[..., WebRunning], build: Path) -> None:
    running = start_web(**{"web.viewer_dir": str(build)})
    with httpx.Client(base_url=running.root) as http:
        index = http.get("/viewer/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert index.text.count('window.PUBLIC_URL="/viewer/"') == 2
        for name in ("/manifest.json", "/assets/favicon.ico", "/assets/tile.png",
                     "/app-config.js", "/app.bundle.1.js", "/app.bundle.css"):
            assert f'"/viewer{name}"' in index.text and f'"{name}"' not in index.text
        assert 'src="https://cdn.example/x.js"' in index.text

        bundle = http.get("/viewer/app.bundle.1.js")
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert bundle.text == BUNDLE.replace('= "/"', '= "/viewer/"').replace(
            "('/dicom-", "('/viewer/dicom-")
        css = http.get("/viewer/app.bundle.css").text
        assert "url(/viewer/a1.woff2)" in css and "url(//x/y)" in css
        assert http.get("/viewer/manifest.json").json()["icons"] == [{"src": "/viewer/assets/a.png"}]
        png = http.get("/viewer/assets/a.png")
        assert png.content == (build / "assets" / "a.png").read_bytes()

        # a browser's copy stays good until the file changes
        again = http.get("/viewer/app.bundle.1.js",
                         headers={"If-None-Match": bundle.headers["etag"]})
        assert again.status_code == 304
        assert http.head("/viewer/app.bundle.1.js").status_code == 200

        assert http.get("/viewer").status_code == 307
        assert http.get("/viewer").headers["location"] == "/viewer/"


def test_app_config_points_at_our_own_dicomweb_root(
        start_web: Callable[..., WebRunning], build: Path) -> None:
    running = start_web(**{"web.viewer_dir": str(build), "web.base_path": "/dicomweb"})
    config = httpx.get(f"{running.root}/viewer/app-config.js")
    assert config.status_code == 200
    assert config.headers["content-type"].startswith("text/javascript")
    assert "the build own" not in config.text
    assert "routerBasename: '/viewer'" in config.text
    for key in ("qidoRoot", "wadoRoot", "wadoUriRoot"):
        assert f'{key}: window.location.origin + "/dicomweb",' in config.text
    assert "@ohif/extension-default.dataSourcesModule.dicomweb" in config.text


@pytest.mark.parametrize("path", ["viewer", "viewer?StudyInstanceUIDs=1.2.3",
                                  "segmentation/dicomweb", "local.html"])
def test_ohif_routes_get_the_index(start_web: Callable[..., WebRunning], build: Path,
                                   path: str) -> None:
    """Any path that is not a file is one of OHIF's routes, reloaded or bookmarked: the SPA
    gets its index (a file name only when a browser navigates to it)."""
    running = start_web(**{"web.viewer_dir": str(build)})
    page = httpx.get(f"{running.root}/viewer/{path}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert 'window.PUBLIC_URL="/viewer/"' in page.text


@pytest.mark.parametrize("path", ["/viewer/missing.bundle.js", "/viewer/assets/nope.png",
                                  "/viewer/..%2fsecret.txt", "/viewer/%2e%2e/secret.txt"])
def test_a_missing_file_is_404_with_a_reason_never_the_index(
        start_web: Callable[..., WebRunning], build: Path, path: str) -> None:
    running = start_web(**{"web.viewer_dir": str(build)})
    answer = httpx.get(running.root + path)
    assert answer.status_code == 404, answer.text
    assert "outside the viewer" not in answer.text
    assert answer.text.strip() and "\n" not in answer.text.strip()


def test_without_a_viewer_every_path_says_run_make_viewer(
        start_web: Callable[..., WebRunning], tmp_path: Path) -> None:
    running = start_web(**{"web.viewer_dir": str(tmp_path / "nothing")})
    for path in ("/viewer/", "/viewer/app-config.js", "/viewer/viewer"):
        answer = httpx.get(running.root + path)
        assert answer.status_code == 404
        assert answer.text.strip().endswith("run make viewer"), answer.text
        assert "\n" not in answer.text.strip()


def test_viewer_false_serves_no_viewer(start_web: Callable[..., WebRunning],
                                       build: Path) -> None:
    running = start_web(**{"web.viewer_dir": str(build), "web.viewer": False})
    assert httpx.get(f"{running.root}/viewer/").status_code == 404


def test_only_get_and_head(start_web: Callable[..., WebRunning], build: Path) -> None:
    running = start_web(**{"web.viewer_dir": str(build)})
    assert httpx.post(f"{running.root}/viewer/", content=b"x").status_code == 405


# -- the real viewer in a real browser ------------------------------------------------------


def study(sample: str, patient: str, count: int) -> list[Dataset]:
    """``count`` slices of one series of one new study, copies of pydicom's ``sample`` (real,
    non-uniform pixels) with new UIDs and their own positions."""
    study_uid, series_uid = uid(), uid()
    slices = []
    for number in range(1, count + 1):
        ds = dcmread(get_testdata_file(sample))
        ds.PatientName, ds.PatientID = patient, patient.replace("^", "")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
        ds.StudyDescription = f"viewer test {patient}"
        ds.InstanceNumber = number
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 2.5 * number]
        slices.append(ds)
    return slices


@pytest.fixture
def viewer_dist() -> Path:
    """The OHIF build ``make viewer`` fetched."""
    require((VIEWER_DIST / "index.html").is_file(),
            f"the OHIF viewer is not in {VIEWER_DIST}: run make viewer (make test does)")
    return VIEWER_DIST


def test_ohif_lists_the_studies_with_their_instance_counts_and_paints_one(
        start_web: Callable[..., WebRunning], viewer_dist: Path, chromium_page: Page) -> None:
    """A person opens /viewer/, sees each stored study with its number of instances (OHIF
    shows NumberOfStudyRelatedInstances from QIDO-RS), selects one (its series' thumbnail
    comes from WADO-RS /thumbnail), opens it, and its first image is painted from WADO-RS
    frames: a viewport canvas whose pixels are not uniform. No DICOMweb request fails."""
    page = chromium_page
    running = start_web(**{"web.viewer_dir": str(viewer_dist)})
    studies = {"Viewer, Alpha": study("CT_small.dcm", "Viewer^Alpha", 3),
               "Viewer, Beta": study("MR_small.dcm", "Viewer^Beta", 2)}
    assoc = associate(running.dicom)
    try:
        for slices in studies.values():
            for ds in slices:
                assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()

    failed = failed_requests(page)
    with explained(failed):
        open_study_list(page, running)
        headers = page.locator("thead th")
        headers.first.wait_for()
        labels = headers.evaluate_all(
            "ths => ths.map(th => th.querySelector('[aria-label^=\"Sort \"]')"
            "?.getAttribute('aria-label') ?? '')")
        assert "Sort Instances" in labels, f"no Instances column in the study list: {labels}"
        column = labels.index("Sort Instances")
        for patient, slices in studies.items():
            row = page.locator("tbody tr", has_text=patient)
            row.wait_for()
            assert row.locator("td").nth(column).inner_text().strip() == str(len(slices)), \
                f"{patient}: {row.inner_text()!r}"

        # select the CT study: the preview shows its series with a thumbnail (/thumbnail)
        page.locator("tbody tr", has_text="Viewer, Alpha").click()
        page.wait_for_function(
            "() => [...document.images].some(i => i.src.startsWith('blob:') && i.complete"
            " && i.naturalWidth > 0)", polling=250)

        # open it as a person does: launch the basic viewer
        page.get_by_role("button", name="Basic Viewer").click()
        page.wait_for_url("**/viewer/viewer?*")
        assert studies["Viewer, Alpha"][0].StudyInstanceUID in page.url

        wait_until_painted(page)
        shot = page.locator("canvas.cornerstone-canvas").first.screenshot()
    grey = Image.open(io.BytesIO(shot)).convert("L")
    assert len(grey.getcolors(256) or ()) > 32, "the painted viewport is (nearly) uniform"
    assert_no_dicomweb_failure(failed, running)


def test_ohif_upload_stores_files_by_stow_rs(
        start_web: Callable[..., WebRunning], viewer_dist: Path, chromium_page: Page,
        tmp_path: Path) -> None:
    """The study list's Upload button (``dicomUploadEnabled``) sends the chosen files with
    STOW-RS; C-FIND then finds the study with its instances."""
    running = start_web(**{"web.viewer_dir": str(viewer_dist)})
    slices = study("CT_small.dcm", "Upload^Gamma", 2)
    files = [save(ds, tmp_path / "upload" / f"{n}.dcm") for n, ds in enumerate(slices)]
    page = chromium_page
    failed = failed_requests(page)
    stored: list[int] = []  # the status of each STOW-RS response
    page.on("response", lambda r: r.request.method == "POST" and r.url.startswith(
        f"{running.url}/studies") and stored.append(r.status))
    with explained(failed):
        open_study_list(page, running)
        page.get_by_role("button", name="Upload").click()
        page.locator("input[type=file]").first.set_input_files(files)
        page.get_by_text(f"{len(files)} files completed").wait_for()
        # OHIF counts a file completed once its upload is sent (XHR upload progress), not
        # when the response came: wait for the responses before asking C-FIND
        while len(stored) < len(files):
            page.wait_for_event("response")
    assert_no_dicomweb_failure(failed, running)
    assert stored == [200] * len(files)
    matches, final = find(running.dicom, QueryRetrieveLevel="STUDY",
                          StudyInstanceUID=slices[0].StudyInstanceUID,
                          NumberOfStudyRelatedInstances="")
    assert final == 0 and len(matches) == 1
    assert int(matches[0].NumberOfStudyRelatedInstances) == len(files)


SAMPLE_TABLE = ROOT / "tests" / "storage" / "data" / "part15-sample.xml"


def test_a_de_identified_study_opens_in_ohif_with_its_series(
        start_web: Callable[..., WebRunning], viewer_dist: Path, chromium_page: Page) -> None:
    """Issue 18: a study of two series, de-identified (PS3.15 Annex E, the sample table) and
    stored back as a new study, is listed under the patient's pseudonym with all its
    instances and series, and its first image paints: replaced UIDs, references and all,
    still make one study."""
    page = chromium_page
    running = start_web(**{
        "web.viewer_dir": str(viewer_dist), "deidentify.table": str(SAMPLE_TABLE),
        "deidentify.secret": "the viewer test's secret........",
        "profiles": [{"name": "research", "options": ["retain_long_modified_dates"]}]})
    ct = two_series_study(running)
    archive = running.archive
    copies = set()
    for item in archive.retrieve(archive.parse_query(
            _study_query(str(ct[0].StudyInstanceUID)), Model.STUDY_ROOT)):
        chunks, new_uid = archive.deidentified_data_set(item, "research")
        archive.store(b"".join(chunks), item.transfer_syntax_uid)
        copies.add(new_uid)
    assert len(copies) == 5
    [copy] = [r for r in archive.find(archive.parse_query(_study_query(""), Model.STUDY_ROOT))
              if str(r.StudyInstanceUID) != ct[0].StudyInstanceUID]
    assert str(copy.PatientName).startswith("ANONYMOUS^")
    assert (int(copy.NumberOfStudyRelatedSeries), int(copy.NumberOfStudyRelatedInstances)) == (
        2, 5)

    assert str(copy.StudyInstanceUID) in open_pseudonymous_study(page, running)


def two_series_study(running: WebRunning) -> list[Dataset]:
    """Three CTs and two MRs of Doe^Jane in one study, stored (the CTs returned)."""
    ct, mr = study("CT_small.dcm", "Doe^Jane", 3), study("MR_small.dcm", "Doe^Jane", 2)
    for ds in mr:  # one study, two series
        ds.StudyInstanceUID = ct[0].StudyInstanceUID
    for ds in ct + mr:
        ds.BurnedInAnnotation = "NO"
        running.archive.store(encode(ds), str(ds.file_meta.TransferSyntaxUID))
    return ct


def open_pseudonymous_study(page: Page, running: WebRunning) -> str:
    """Open the study listed under an ``ANONYMOUS^`` pseudonym (and no "Doe") in the
    Basic Viewer, wait until its image is painted, and give the viewer's URL; every
    DICOMweb request on the way must be answered."""
    failed = failed_requests(page)
    with explained(failed):
        open_study_list(page, running)
        row = page.locator("tbody tr", has_text="ANONYMOUS")
        row.wait_for()
        assert "Doe" not in row.inner_text()
        row.click()
        page.get_by_role("button", name="Basic Viewer").click()
        page.wait_for_url("**/viewer/viewer?*")
        wait_until_painted(page)
    assert_no_dicomweb_failure(failed, running)
    return page.url


def test_an_account_that_sees_de_identified_data_opens_its_study_in_ohif(
        start_web: Callable[..., WebRunning], viewer_dist: Path, chromium_page: Page) -> None:
    """Issue 18: the viewer, with the bearer token of a ``web.deidentify`` account on every
    request (as a proxy in front of it would add), lists the study under the patient's
    pseudonym, opens it by its replaced UID and paints its image: every QIDO-RS, metadata,
    frame and thumbnail request it makes is answered de-identified."""
    page = chromium_page
    token = new_token()
    running = start_web(**{
        "web.viewer_dir": str(viewer_dist), "deidentify.table": str(SAMPLE_TABLE),
        "deidentify.secret": "the viewer test's secret........",
        "profiles": [{"name": "research", "options": ["retain_long_modified_dates"]}],
        "web.tokens": [f"lab:read:{hash_token(token)}"], "web.deidentify": ["lab:research"],
        "web.anonymous_local": "none"})
    stored = str(two_series_study(running)[0].StudyInstanceUID)
    page.set_extra_http_headers({"Authorization": f"Bearer {token}"})
    url = open_pseudonymous_study(page, running)
    assert "StudyInstanceUIDs=2.25." in url and stored not in url


def _study_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    for keyword in ("PatientName", "NumberOfStudyRelatedSeries",
                    "NumberOfStudyRelatedInstances"):
        setattr(q, keyword, "")
    return q


def wait_until_painted(page: Page) -> None:
    """Until a viewport canvas holds an image: many grey levels, not a blank one."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('canvas.cornerstone-canvas')].some(c => {
             if (!c.width || !c.height) return false;
             const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             const levels = new Set();
             for (let i = 0; i < data.length; i += 4 * 7) levels.add(data[i]);
             return levels.size > 32;
           })""", polling=250)


def failed_requests(page: Page) -> list[str]:
    """What ``page`` asks for from now on and does not get: method, URL, Accept header, and
    the status or the browser's reason (a list that fills as the page runs)."""
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(
        f"{r.method} {r.url} Accept: {r.headers.get('accept')} -> {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and failed.append(
        f"{r.request.method} {r.url} Accept: {r.request.headers.get('accept')} -> {r.status}"))
    return failed


@contextlib.contextmanager
def explained(failed: list[str]) -> Iterator[None]:
    """A failed check or a browser wait that timed out, with the page's failed requests."""
    try:
        yield
    except (AssertionError, PlaywrightError) as exc:
        raise AssertionError(f"{exc}\nthe browser's failed requests:\n  "
                             + "\n  ".join(failed or ["none"])) from exc


def assert_no_dicomweb_failure(failed: list[str], running: WebRunning) -> None:
    # a request the page gave up itself (a thumbnail no longer shown) is not a failure
    dicomweb = [line for line in failed if running.url in line and "ERR_ABORTED" not in line]
    assert not dicomweb, "DICOMweb requests failed:\n  " + "\n  ".join(dicomweb)


def open_study_list(page: Page, running: WebRunning) -> None:
    """Open the viewer's study list in ``page`` and confirm OHIF's investigational-use
    notice, as a person does once."""
    page.goto(f"{running.root}/viewer/")
    page.get_by_role("button", name="Confirm and hide").click()
