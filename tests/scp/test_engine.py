"""scp/engine/: the one version gate, the list of pynetdicom internals it relies on, and
the rule that no other module of scp/ reaches below pynetdicom's public API."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import logging
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from scp import engine
from scp.engine import versions

ROOT = Path(__file__).resolve().parents[2]
SCP = ROOT / "scp"


def _fake_version(monkeypatch: pytest.MonkeyPatch, name: str, version: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: version if dist == name else real(dist))


# -- (a) the installed versions are the tested ones, and pyproject.toml pins them ---------

def test_the_installed_versions_are_tested() -> None:
    """Fails when pynetdicom or pydicom is upgraded without testing scp/engine/ (then
    move TESTED and the pins of pyproject.toml together, after testing)."""
    assert engine.check_versions() == []


def test_pyproject_pins_what_the_engine_is_tested_with() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]
    for name in engine.TESTED:
        assert f"{name}{versions.pinned(name)}" in dependencies, (name, dependencies)


# -- (b) an untested version is reported, and install() refuses it -----------------------

@pytest.mark.parametrize(("installed", "problem"), [
    ({"pynetdicom": "3.1.0", "pydicom": "3.0.2"},
     "pynetdicom 3.1.0 is installed; scp/engine/ is tested with pynetdicom>=3.0.4,<3.1"),
    ({"pynetdicom": "3.0.3", "pydicom": "3.0.2"},
     "pynetdicom 3.0.3 is installed; scp/engine/ is tested with pynetdicom>=3.0.4,<3.1"),
    ({"pynetdicom": "3.0.9", "pydicom": "4.0.0"},
     "pydicom 4.0.0 is installed; scp/engine/ is tested with pydicom>=3.0.2,<3.1"),
    ({"pynetdicom": "3.0.4"},
     "pydicom none is installed; scp/engine/ is tested with pydicom>=3.0.2,<3.1"),
])
def test_check_versions_reports_an_untested_version(installed: dict[str, str],
                                                    problem: str) -> None:
    assert engine.check_versions(installed) == [problem]


def test_check_versions_accepts_the_tested_range() -> None:
    assert engine.check_versions({"pynetdicom": "3.0.4", "pydicom": "3.0.2"}) == []
    assert engine.check_versions({"pynetdicom": "3.0.9.post1", "pydicom": "3.0.5"}) == []


def test_install_refuses_an_untested_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_installed", None)
    monkeypatch.delenv(engine.ALLOW_UNTESTED, raising=False)
    _fake_version(monkeypatch, "pynetdicom", "3.2.0")
    with pytest.raises(engine.UntestedVersion) as raised:
        engine.install()
    message = str(raised.value)
    assert "pynetdicom 3.2.0 is installed; scp/engine/ is tested with pynetdicom>=3.0.4,<3.1" \
        in message
    assert "install pynetdicom>=3.0.4,<3.1 and pydicom>=3.0.2,<3.1" in message
    assert "MINIPACS_ALLOW_UNTESTED=1" in message


# -- (c) ... unless told otherwise: then a warning, and nothing installed ----------------

def test_allowed_untested_version_warns_and_installs_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    monkeypatch.setattr(engine, "_installed", None)
    monkeypatch.setenv(engine.ALLOW_UNTESTED, "1")
    _fake_version(monkeypatch, "pydicom", "3.1.0")
    installed: list[str] = []
    for module, name in (("reactor", "install"), ("responses", "install"),
                         ("contexts", "cheap_context_copies")):
        monkeypatch.setattr(importlib.import_module(f"scp.engine.{module}"), name,
                            lambda module=module: installed.append(module))
    with caplog.at_level(logging.WARNING, logger="scp.engine"):
        assert engine.install() is False
    assert installed == []
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "MINIPACS_ALLOW_UNTESTED=1: running on untested versions" in warning
    assert "pydicom 3.1.0 is installed" in warning
    assert "C-STORE data sets are held in memory" in warning


# -- (d) `minipacs serve` on an untested version: the reason, and a non-zero exit ---------

SERVE_UNDER = (
    "import importlib.metadata as m, sys\n"
    "real = m.version\n"
    "m.version = lambda name: {version!r} if name == 'pynetdicom' else real(name)\n"
    "from scp.__main__ import main\n"
    "sys.exit(main(['serve', '--port', '0', '--http-port', '0', '--data-dir', {data!r}]))\n"
)


def test_serve_refuses_an_untested_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_UNDER.format(version="3.9.0", data=str(tmp_path / "d"))],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("minipacs: pynetdicom 3.9.0 is installed; scp/engine/ is"
                                    " tested with pynetdicom>=3.0.4,<3.1"), result.stderr
    assert "MINIPACS_ALLOW_UNTESTED=1" in result.stderr


# -- (e) no module of scp/ outside scp/engine/ reaches below pynetdicom's public API -----

INTERNAL_MODULES = frozenset({"_config", "dul", "dimse", "dimse_messages", "fsm",
                              "service_class", "transport"})
"""pynetdicom's modules that are internals through and through (dimse_primitives, events,
status, sop_class, association's Association, presentation's contexts are public)."""
PATCHED_MODULES = INTERNAL_MODULES | {"association", "presentation"}
"""Modules scp/engine/ replaces attributes of: importing the module object is for that."""
GENERIC = frozenset({"time", "recv", "socket", "encode", "message", "maximum_pdu_size"})
"""Last names of PRIVATE_SYMBOLS too common to flag as attributes elsewhere (a Connection's
``recv``, a module's ``time``); their modules or owners are flagged instead."""


def _private_attributes() -> set[str]:
    names = {symbol.rsplit(":", 1)[1].rsplit(".", 1)[-1]
             for symbol, _ in engine.PRIVATE_SYMBOLS}
    return names - GENERIC


def _reaches(tree: ast.AST, attributes: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        where = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pynetdicom" and len(parts) > 1 and (
                        parts[1].startswith("_") or parts[1] in PATCHED_MODULES):
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "pynetdicom":
                continue
            if len(parts) > 1 and (parts[1].startswith("_") or parts[1] in INTERNAL_MODULES):
                found.append(f"{where}: from {node.module} import ...")
            for alias in node.names:
                if alias.name.startswith("_") or (
                        len(parts) == 1 and alias.name in PATCHED_MODULES):
                    found.append(f"{where}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and node.attr in attributes:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in ("Sta6", "Evt19"):
            found.append(f"{where}: {node.value!r}")
    return found


def _outside_the_engine() -> list[Path]:
    return sorted(p for p in SCP.rglob("*.py") if "engine" not in p.relative_to(SCP).parts)


def test_only_the_engine_touches_pynetdicom_internals() -> None:
    attributes = _private_attributes()
    problems = [f"{path.relative_to(ROOT)}:{line}"
                for path in _outside_the_engine()
                for line in _reaches(ast.parse(path.read_text(), str(path)), attributes)]
    assert not problems, ("pynetdicom internals outside scp/engine/ (add an engine function"
                          " instead):\n" + "\n".join(problems))


def test_the_static_check_finds_what_it_guards_against() -> None:
    source = ("from pynetdicom import _config, dul\n"
              "from pynetdicom.dimse import DIMSEServiceProvider\n"
              "from pynetdicom._handlers import doc_handle_find\n"
              "import pynetdicom.transport\n"
              "from pynetdicom import association\n"
              "assoc.dul.state_machine.do_action('Evt19')\n"
              "assoc._reactor_checkpoint.clear()\n"
              "from pynetdicom import AE, evt, build_context\n"
              "from pynetdicom.association import Association\n"
              "from pynetdicom.dimse_primitives import C_STORE\n"
              "ours.recv(); time.sleep(1)\n")
    found = _reaches(ast.parse(source), _private_attributes())
    for expected in ("1: from pynetdicom import _config", "1: from pynetdicom import dul",
                     "2: from pynetdicom.dimse import ...",
                     "3: from pynetdicom._handlers import ...",
                     "4: import pynetdicom.transport", "5: from pynetdicom import association",
                     "6: .dul", "6: .state_machine", "6: .do_action", "6: 'Evt19'",
                     "7: ._reactor_checkpoint"):
        assert expected in found, (expected, found)
    assert not [line for line in found if int(line.split(":")[0]) >= 8], found  # public


# -- (f) every private symbol the engine relies on exists in the installed pynetdicom -----

def _resolve(symbol: str) -> Any:
    """The object ``module:attr.path`` names; an attribute a class sets only on its
    instances counts when its source assigns ``self.<attr>``."""
    module_name, path = symbol.split(":")
    obj: Any = importlib.import_module(module_name)
    parts = path.split(".")
    for n, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        assert n == len(parts) - 1 and inspect.isclass(obj), f"{symbol}: no {part}"
        assert f"self.{part} " in inspect.getsource(obj) or (
            f"self.{part}:" in inspect.getsource(obj)), f"{symbol}: no {part}"
        return None
    return obj


@pytest.mark.parametrize(("symbol", "why"), engine.PRIVATE_SYMBOLS,
                         ids=[s for s, _ in engine.PRIVATE_SYMBOLS])
def test_every_private_symbol_exists(symbol: str, why: str) -> None:
    assert why
    _resolve(symbol)


@pytest.mark.parametrize(("symbol", "value", "why"), engine.PRIVATE_VALUES,
                         ids=[f"{s}-{v}" for s, v, _ in engine.PRIVATE_VALUES])
def test_every_private_value_is_there(symbol: str, value: str, why: str) -> None:
    obj = _resolve(symbol)
    if isinstance(obj, dict):
        assert value in obj
    else:
        assert value in inspect.getsource(obj)
