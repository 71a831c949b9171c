"""STOW-RS (PS3.18 10.5): storing multipart/related bodies of DICOM instances."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
