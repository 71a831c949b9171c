"""QIDO-RS (PS3.18 10.6): the search resources."""

from __future__ import annotations

from starlette.routing import BaseRoute

ROUTES: list[BaseRoute] = []
