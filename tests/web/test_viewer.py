"""The OHIF viewer served at /viewer/: the build's files rewritten for that path and the
configuration minipacs generates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.web.conftest import WebRunning

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
