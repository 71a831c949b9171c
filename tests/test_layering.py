"""The layering of DESIGN.md, read from the source: scp/ and web/ reach storage through its
façade (``from storage import ...``) only, and no package imports itself in a circle.

Both checks read the files with :mod:`ast`, so a lazy import inside a function or one under
``if TYPE_CHECKING:`` counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scp", "storage", "web")
"""The packages whose imports of each other (and of themselves) are checked for cycles."""
FRONT_ENDS = ("scp", "web")
"""The packages that may know storage's façade only."""

PENDING_FACADE_EXCEPTIONS: set[tuple[str, str]] = set()
"""(file, storage submodule) pairs that still reach behind the façade, each to be removed
by the owner of scp/engine/ once it imports from ``storage`` (which already exports what
these use: ``read_identifier``, ``Query``). A new entry is not a
fix: export the name from storage/__init__.py instead. The test below fails when an entry
is no longer needed, so that it is removed with the import."""

PENDING_CYCLES: set[frozenset[str]] = set()
"""Import cycles known and not yet broken, each the set of modules in one cycle (all of
them, so that a module joining it fails the test). Empty: never add one, break the cycle
instead (move what both modules need into a third, as storage/structure.py and
storage/parsed.py hold what storage/parsing.py and storage/fastparse.py share)."""


def storage_submodules() -> frozenset[str]:
    """The names of storage's modules and subpackages (``query``, ``parsing``, ...)."""
    return frozenset(m.name for m in pkgutil.iter_modules([str(ROOT / "storage")]))


# -- reading imports ----------------------------------------------------------------------

def module_name(path: Path) -> str:
    """``scp/engine/reactor.py`` -> ``scp.engine.reactor``; ``storage/__init__.py`` -> ``storage``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_names(tree: ast.AST, module: str, package: bool) -> Iterator[tuple[int, str]]:
    """Every name an import of ``tree`` (the source of ``module``) brings in, absolute:
    ``import a.b`` gives ``a.b``; ``from .x import y`` in ``p.m`` gives ``p.x.y``. Whether
    the last part is a module or an attribute is for the caller to decide."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                if not package:
                    parts.pop()  # a module's relative imports start from its package
                base = parts[:len(parts) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}" if alias.name != "*" else source


def sources(*packages: str) -> list[Path]:
    return sorted(p for name in packages for p in (ROOT / name).rglob("*.py"))


# -- (a) scp/ and web/ know storage's façade only -----------------------------------------

def behind_the_facade(tree: ast.AST, submodules: frozenset[str]) -> list[tuple[int, str]]:
    """(line, ``storage.<submodule>``) for every import of ``tree`` that reaches a module of
    storage rather than its façade: ``import storage.x`` and ``from storage.x import y`` (any
    ``x``, even one not written yet), and ``from storage import x`` when ``x`` is one of
    ``submodules``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            dotted = [node.module]
            if node.module == "storage":
                dotted += [f"storage.{a.name}" for a in node.names if a.name in submodules]
        else:
            continue
        for name in dotted:
            parts = name.split(".")
            if parts[0] == "storage" and len(parts) > 1:
                found.append((node.lineno, f"storage.{parts[1]}"))
    return sorted(found)


def facade_violations() -> set[tuple[str, str, int]]:
    submodules = storage_submodules()
    return {(str(path.relative_to(ROOT)), name, line)
            for path in sources(*FRONT_ENDS)
            for line, name in behind_the_facade(ast.parse(path.read_text(), str(path)),
                                                submodules)}


def test_front_ends_import_storage_through_its_facade_only() -> None:
    found = facade_violations()
    new = sorted(v for v in found if v[:2] not in PENDING_FACADE_EXCEPTIONS)
    assert not new, (
        "scp/ and web/ may import `from storage import ...` only (export the name from"
        " storage/__init__.py):\n" + "\n".join(f"{p}:{line}: {n}" for p, n, line in new))


def test_the_pending_facade_exceptions_are_all_still_needed() -> None:
    still = {v[:2] for v in facade_violations()}
    stale = sorted(PENDING_FACADE_EXCEPTIONS - still)
    assert not stale, f"remove from PENDING_FACADE_EXCEPTIONS, now imported through the façade: {stale}"


def test_the_facade_check_finds_what_it_guards_against() -> None:
    submodules = storage_submodules()
    assert {"archive", "errors", "parsing", "query"} <= submodules, submodules
    source = ("import storage.errors\n"
              "from storage.query import response_charset_problem\n"
              "from storage import parsing, Archive\n"
              "def lazy():\n"
              "    from storage.errors import StoreInUse\n"
              "from storage.query.answers import x\n"
              "import storage.not_yet_written\n"
              "from storage import Archive, StoreInUse, open_archive\n"
              "import storage\n"
              "from storage_extra.query import x\n")
    assert behind_the_facade(ast.parse(source), submodules) == [
        (1, "storage.errors"), (2, "storage.query"), (3, "storage.parsing"),
        (5, "storage.errors"), (6, "storage.query"), (7, "storage.not_yet_written")]


# -- (b) no import cycles inside or between scp, storage and web ---------------------------

def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """module -> the modules of ``files`` it imports, at any depth of its source."""
    paths = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for _, name in imported_names(tree, module, is_package(path)):
            # ``from p import m`` names the module p.m; ``from p.m import f`` the module p.m
            target = name if name in paths else name.rpartition(".")[0]
            if target in paths and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def components(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module: the modules that import
    each other in a circle, directly or not (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = frozenset(stack[stack.index(node):])
            del stack[stack.index(node):]
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found, key=min)


def shortest_cycle(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """A shortest cycle through the first module of ``component``, from it back to it."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [start, node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return path[::-1]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{sorted(component)} is no cycle")  # pragma: no cover


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    return [shortest_cycle(graph, c) for c in components(graph)]


def test_no_import_cycles() -> None:
    graph = import_graph(sources(*PACKAGES))
    found = [shortest_cycle(graph, c) for c in components(graph) if c not in PENDING_CYCLES]
    assert not found, "import cycles (lazy and TYPE_CHECKING imports count):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found)


def test_the_pending_cycles_are_all_still_there() -> None:
    stale = PENDING_CYCLES - set(components(import_graph(sources(*PACKAGES))))
    assert not stale, f"remove from PENDING_CYCLES, no longer a cycle: {sorted(map(sorted, stale))}"


@pytest.mark.parametrize(("files", "expected"), [
    ({"p/__init__.py": "", "p/a.py": "from .b import f\n",
      "p/b.py": "def f():\n    from .a import g\n"}, [["p.a", "p.b", "p.a"]]),
    ({"p/__init__.py": "", "p/a.py": "import typing\nif typing.TYPE_CHECKING:\n"
      "    from p.c import C\n", "p/b.py": "from . import a\n", "p/c.py": "from p import b\n"},
     [["p.a", "p.c", "p.b", "p.a"]]),
    ({"p/__init__.py": "from .a import x\n", "p/a.py": "from .q import y\n",
      "p/q/__init__.py": "from ..a import x\n"}, [["p.a", "p.q", "p.a"]]),
    ({"p/__init__.py": "from .a import x\n", "p/a.py": "from . import b\n",
      "p/b.py": "from .c import z\n", "p/c.py": "import os\n"}, []),
])
def test_the_cycle_check_finds_what_it_guards_against(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str],
        expected: list[list[str]]) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert cycles(import_graph(sorted(tmp_path.rglob("*.py")))) == expected
