"""The ``web`` section of the configuration: the HTTP listener (DICOMweb, the viewer).

The command line's loader (``scp/config.py``) reads it like every other section; it lives
here so that ``web`` needs nothing of ``scp``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .auth import RIGHTS, deidentify_problems, entry_problems


@dataclass(frozen=True)
class WebConfig:
    """``web``: the HTTP listener beside the DICOM one (PS3.18 DICOMweb, the OHIF viewer)."""

    enabled: bool = True
    port: int = 8080
    bind: str = "127.0.0.1"
    base_path: str = "/dicom-web"
    https: bool = False
    cors_origins: tuple[str, ...] = ()
    anonymous_local: str = "read-write"
    anonymous_remote: str = "none"
    users: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    deidentify: tuple[str, ...] = ()
    max_request_mb: int = 2048
    viewer: bool = True
    viewer_dir: Path = field(default=Path("viewer/dist"))


RESERVED_PATHS: tuple[str, ...] = ("viewer", "admin", "metrics")
"""The first path segments the listener keeps for itself: web.base_path may not be one."""

CHOICES: dict[str, tuple[str, ...]] = {
    "anonymous_local": RIGHTS,
    "anonymous_remote": RIGHTS,
}


def check(values: dict[str, Any], problems: list[str]) -> None:
    """Append to ``problems`` what is wrong with the ``web`` section's ``values`` (those
    the file gives; the others are the defaults above) that is particular to it: the
    loader (``scp/config.py``) checks :data:`CHOICES`, ``port`` and ``bind`` as it does
    for every section."""
    base = values.get("base_path")
    if base is not None and (not base.startswith("/") or base.endswith("/") or " " in base):
        problems.append("web.base_path: must start with / and not end with one (e.g."
                        f" /dicom-web), not {base!r}")
    elif base is not None and base.split("/")[1] in RESERVED_PATHS:
        problems.append(f"web.base_path: {base!r} is taken by the page (/"
                        + ", /".join(RESERVED_PATHS) + ")")
    if values.get("max_request_mb", 1) < 0:
        problems.append("web.max_request_mb: must not be negative (0 = no limit)")
    for key in ("users", "tokens"):  # name:rights:hash, each hash of the right form
        problems.extend(entry_problems(f"web.{key}", values.get(key, ())))
    problems.extend(deidentify_problems(values.get("deidentify", ()),
                                        [*values.get("users", ()), *values.get("tokens", ())]))
    for origin in values.get("cors_origins", ()):
        if origin != "*" and not origin.startswith(("http://", "https://")):
            problems.append(f"web.cors_origins: {origin!r} is not an origin such as"
                            " https://viewer.example.org")
