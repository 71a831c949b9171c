"""The OHIF viewer's static files at /viewer/, configured for our own DICOMweb root."""

from __future__ import annotations

from starlette.routing import BaseRoute

from .config import WebConfig


def routes(config: WebConfig) -> list[BaseRoute]:
    return []
