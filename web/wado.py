"""WADO-RS (PS3.18 10.4): retrieval of instances, metadata, bulk data, frames, rendered."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
