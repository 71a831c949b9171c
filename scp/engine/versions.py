"""The one version gate of scp/engine/: the pynetdicom and pydicom it is tested with.

Everything in scp/engine/ leans on pynetdicom internals (see ``PRIVATE_SYMBOLS`` in
``scp/engine/__init__.py``) and on the data sets pydicom builds for them; another release
may rename or rework any of them, and a patch that no longer fits fails silently (data
sets held in memory instead of spooled, guards against hostile peers half working). So
the versions are pinned in pyproject.toml to :data:`TESTED`, and :func:`check_versions`
says when the installed ones are outside it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from collections.abc import Mapping

logger = logging.getLogger("scp.engine")

TESTED: dict[str, tuple[str, str]] = {
    "pynetdicom": ("3.0.4", "3.1"),
    "pydicom": ("3.0.2", "3.1"),
}
"""Distribution -> (lowest tested version, first version not tested): the range
``>=low,<high`` that pyproject.toml pins (tests/scp/test_engine.py keeps them equal)."""

ALLOW_UNTESTED = "MINIPACS_ALLOW_UNTESTED"
"""The environment variable that lets minipacs run on an untested version (value ``1``):
with a warning, and without anything of scp/engine/ that depends on pynetdicom's internals."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of ``version`` (``3.0.4`` of ``3.0.4.dev1``), as ints."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def pinned(name: str) -> str:
    """The version specifier of ``name`` as pyproject.toml writes it: ``>=3.0.4,<3.1``."""
    low, high = TESTED[name]
    return f">={low},<{high}"


def installed_versions() -> dict[str, str]:
    """The installed version of each distribution of :data:`TESTED` (``none`` if absent)."""
    found: dict[str, str] = {}
    for name in TESTED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "none"
    return found


def check_versions(installed: Mapping[str, str] | None = None) -> list[str]:
    """What is outside :data:`TESTED`, one line per distribution; empty when all is tested.

    ``installed`` maps distribution names to versions (default: what is installed, read
    with importlib.metadata)."""
    versions = dict(installed) if installed is not None else installed_versions()
    problems = []
    for name, (low, high) in TESTED.items():
        version = versions.get(name, "none")
        release = _release(version)
        if not release or not _release(low) <= release < _release(high):
            problems.append(f"{name} {version} is installed; scp/engine/ is tested with "
                            f"{name}{pinned(name)}")
    return problems


def tested(module: str, otherwise: str) -> bool:
    """Whether the installed versions are within :data:`TESTED`, for ``module``, which
    changes pynetdicom's internals; if not, a warning says what happens ``otherwise``."""
    problems = check_versions()
    if not problems:
        return True
    logger.warning("%s: %s was not tested with these versions and installs nothing: %s",
                   "; ".join(problems), module, otherwise)
    return False


def untested_allowed() -> bool:
    """Whether :data:`ALLOW_UNTESTED` is set to ``1``."""
    return os.environ.get(ALLOW_UNTESTED, "").strip() == "1"
