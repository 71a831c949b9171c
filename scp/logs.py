"""Logging of the command line and of the worker processes it starts: one configuration,
set up once per process (a library module never configures logging itself)."""

from __future__ import annotations

import logging
import sys

from storage import DECODERS_LOGGER


def setup_logging(level: str, process_ids: bool = False) -> None:
    """Log to standard error at ``level`` (pynetdicom's chatter, and pydicom's tracebacks
    of decoders that failed while converting for a retrieve, only at DEBUG); with
    ``process_ids`` (``ae.workers`` > 1) each line names the process that wrote it."""
    who = "%(name)s[%(process)d]" if process_ids else "%(name)s"
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {who}: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":  # pynetdicom narrates every message at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("uvicorn").setLevel(logging.WARNING)  # ours names the URL
    else:  # the decoders' tracebacks (storage/convert.py); pydicom sets WARNING on import
        logging.getLogger(DECODERS_LOGGER).setLevel(logging.DEBUG)
