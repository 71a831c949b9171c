"""The documents against the repository: every path README.md and CONTRIBUTING.md name is in
the clone, the Makefile installs only when pyproject.toml changed, and the README's C-MOVE
quick start creates the folder storescp writes to before starting it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "CONTRIBUTING.md")

# the repository's top-level entries: a path that starts with one of these names is a path
# into the clone. The folders are listed too, so that a renamed or deleted one still counts.
TOP_LEVEL = {"scp", "storage", "tests", "bench", ".ci"} | {
    entry.name for entry in ROOT.iterdir()
    if not entry.name.startswith(".") and not entry.name.endswith(".egg-info")
    and entry.name not in ("data", "build", "dist")
}

MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
PATH_LIKE = re.compile(r"(?:\.{1,2}/)*[\w.-]+(?:/[\w.-]+)*/?")
# a file named in plain text or in a code block: a top-level folder, then a name with an
# extension (`tests/test_gdcm.py`, `bench/README.md`), or a path climbing out (`../x/y.md`)
PLAIN_PATH = re.compile(
    r"(?<![\w./<>$-])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*|[\w.-]+/(?:[\w.-]+/)*[\w-]+\."
    r"(?:py|md|yaml|yml|toml|txt|json|cfg|ini|sh))(?![\w/])")


def _text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def markdown_links(text: str) -> list[str]:
    """The targets of ``[text](target)`` links, outside code blocks and spans."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return MARKDOWN_LINK.findall(prose)


def named_paths(text: str) -> list[str]:
    """The repository paths a document names: whole inline code spans that look like a path
    starting with a top-level entry of the clone (or climbing out of it with ``../``), and
    files under a top-level folder named anywhere else, code blocks included."""
    found: list[str] = []
    for span in INLINE_CODE.findall(text):
        span = span.strip()
        if PATH_LIKE.fullmatch(span) and (_first_part(span) in TOP_LEVEL
                                          or span.startswith("../")):
            found.append(span)
    for match in PLAIN_PATH.finditer(INLINE_CODE.sub(" ", text)):
        path = match.group(1)
        if _first_part(path) in TOP_LEVEL or path.startswith("../"):
            found.append(path)
    return found


def _first_part(path: str) -> str:
    return path.removeprefix("./").split("/", 1)[0]


def _problem(document: str, target: str) -> str | None:
    """Why ``target``, named in ``document``, is not a file or folder of the clone."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
        return None  # a URL or an anchor of the same page
    path = target.split("#", 1)[0].split("?", 1)[0]
    if path.startswith("/"):
        return f"{target}: an absolute path, not one in the repository"
    resolved = ((ROOT / document).parent / path).resolve()
    if not resolved.is_relative_to(ROOT):
        return f"{target}: points outside the repository ({resolved})"
    if not resolved.exists():
        return f"{target}: no such file or folder in the repository"
    if path.endswith("/") and not resolved.is_dir():
        return f"{target}: not a folder"
    return None


@pytest.mark.parametrize("document", DOCUMENTS)
def test_markdown_links_resolve_inside_the_repository(document: str) -> None:
    problems = [p for target in markdown_links(_text(document))
                if (p := _problem(document, target)) is not None]
    assert not problems, f"{document}:\n" + "\n".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_named_paths_exist_in_the_repository(document: str) -> None:
    paths = named_paths(_text(document))
    assert paths, f"{document} names no repository path: the pattern no longer finds them"
    problems = [p for target in sorted(set(paths))
                if (p := _problem(document, target)) is not None]
    assert not problems, f"{document}:\n" + "\n".join(problems)


def test_the_path_finders_find_what_they_guard_against() -> None:
    """The patterns above catch the references a document has had and must not have again."""
    text = ("See `../shared/DESIGN.md` and [the design](../shared/DESIGN.md); gdcmscu's tests "
            "are in tests/test_gdcm.py, see `bench/README.md` and `scp/responses.py`.\n"
            "```sh\n.venv/bin/python bench/profile_ingest.py --count 2000\n```\n")
    assert markdown_links(text) == ["../shared/DESIGN.md"]
    assert set(named_paths(text)) == {"../shared/DESIGN.md", "bench/README.md",
                                      "scp/responses.py", "tests/test_gdcm.py",
                                      "bench/profile_ingest.py"}
    assert _problem("README.md", "../shared/DESIGN.md") is not None
    assert _problem("README.md", "tests/no_such_test.py") is not None
    assert _problem("README.md", "tests/test_docs.py") is None
    assert _problem("README.md", "https://github.com/pydicom/pynetdicom") is None


# --- the Makefile's install stamps -------------------------------------------------------

STAMPS = {"install": ".venv/.installed-run", "install-test": ".venv/.installed-test"}


@pytest.fixture
def make_dir(tmp_path: Path) -> Path:
    """A folder with a copy of the Makefile, a pyproject.toml, a fake ``.venv/bin/python``
    and both install stamps, every file one hour old."""
    if shutil.which("make") is None:
        if os.environ.get("CI"):
            pytest.fail("make is not installed")
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'fake'\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 1\n")  # never run: make -q runs no recipe
    python.chmod(0o755)
    for stamp in STAMPS.values():
        (tmp_path / stamp).touch()
    hour_ago = _now(tmp_path) - 3600
    for path in (python, tmp_path / "pyproject.toml", *(tmp_path / s for s in STAMPS.values())):
        os.utime(path, (hour_ago, hour_ago))
    return tmp_path


def _now(folder: Path) -> float:
    probe = folder / ".now"
    probe.touch()
    return probe.stat().st_mtime


def _age(path: Path, seconds_ago: float) -> None:
    when = _now(path.parent) - seconds_ago
    os.utime(path, (when, when))


def _make(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-C", str(folder), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def make_q(folder: Path, target: str) -> int:
    """``make -q target``: 0 when it is up to date (nothing would be installed)."""
    result = _make(folder, "-q", target)
    assert result.returncode in (0, 1), result.stderr  # 2: make itself failed
    return result.returncode


@pytest.mark.parametrize("target", STAMPS)
def test_make_installs_nothing_when_the_stamp_is_newer_than_pyproject(
        make_dir: Path, target: str) -> None:
    _age(make_dir / "pyproject.toml", 600)
    for stamp in STAMPS.values():
        _age(make_dir / stamp, 60)
    assert make_q(make_dir, target) == 0


@pytest.mark.parametrize("target", STAMPS)
def test_make_installs_again_when_pyproject_changed(make_dir: Path, target: str) -> None:
    for stamp in STAMPS.values():
        _age(make_dir / stamp, 600)
    _age(make_dir / "pyproject.toml", 60)
    assert make_q(make_dir, target) != 0


@pytest.mark.parametrize("target", STAMPS)
def test_make_installs_when_the_stamp_is_missing(make_dir: Path, target: str) -> None:
    _age(make_dir / "pyproject.toml", 600)
    (make_dir / STAMPS[target]).unlink()
    assert make_q(make_dir, target) != 0


@pytest.mark.parametrize("target", ["run", "test"])
def test_make_run_and_test_install_through_the_stamps(make_dir: Path, target: str) -> None:
    """What ``make -n run`` / ``make -n test`` would do (nothing is run): no pip install
    while the stamps are newer than pyproject.toml, one once it has changed."""
    dry = _make(make_dir, "-n", target)
    assert dry.returncode == 0, dry.stderr
    assert "pip install" not in dry.stdout
    for stamp in STAMPS.values():
        _age(make_dir / stamp, 600)
    _age(make_dir / "pyproject.toml", 60)
    dry = _make(make_dir, "-n", target)
    assert dry.returncode == 0, dry.stderr
    assert "pip install" in dry.stdout


# --- the README's C-MOVE quick start -----------------------------------------------------

def code_blocks(text: str) -> list[list[str]]:
    """The lines of each fenced code block."""
    return [block.splitlines()[1:-1] for block in FENCE.findall(text)]


def test_quick_start_creates_the_storescp_folder_before_starting_storescp() -> None:
    """storescp does not create its ``-od`` folder: the README's C-MOVE example must."""
    starts = [(block, i, match.group(1))
              for block in code_blocks(_text("README.md"))
              for i, line in enumerate(block)
              if line.lstrip().startswith("storescp ")
              and (match := re.search(r"\s-od\s+(\S+)", line))]
    assert starts, "the README has no storescp ... -od FOLDER line in a code block"
    for block, i, folder in starts:
        made = [line for line in block[:i]
                if re.match(rf"\s*mkdir\s+-p\s+{re.escape(folder)}(\s|$)", line)]
        assert made, f"no `mkdir -p {folder}` before `{block[i].strip()}` in the README"


@pytest.mark.parametrize("package", ["scp", "storage"])
def test_the_module_tables_of_contributing_name_existing_modules(package: str) -> None:
    """CONTRIBUTING.md's table under "### <package>/" lists modules by file name."""
    text = _text("CONTRIBUTING.md")
    section = re.search(rf"^### {package}/.*?(?=^#)", text, re.MULTILINE | re.DOTALL)
    assert section, f"CONTRIBUTING.md has no section '### {package}/'"
    listed = re.findall(r"^\| `([\w.]+\.py)` \|", section.group(0), re.MULTILINE)
    assert listed, f"no module table under '### {package}/'"
    missing = [name for name in listed if not (ROOT / package / name).is_file()]
    assert not missing, f"CONTRIBUTING.md lists {missing}, not in {package}/"
