"""Logging of the command line and of the worker processes it starts: one configuration,
set up once per process (a library module never configures logging itself)."""

from __future__ import annotations

import datetime
import json
import logging
import sys

from storage import DECODERS_LOGGER


class JsonLines(logging.Formatter):
    """``logging.json: true``: each record one JSON object (time, level, logger, process,
    message, and the traceback when there is one), for a log collector."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname, "logger": record.name,
                "process": record.process, "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup_logging(level: str, process_ids: bool = False, json_lines: bool = False) -> None:
    """Log to standard error at ``level`` (pynetdicom's chatter, and pydicom's tracebacks
    of decoders that failed while converting for a retrieve, only at DEBUG); with
    ``process_ids`` (``ae.workers`` > 1) each line names the process that wrote it; with
    ``json_lines`` each line is a JSON object (:class:`JsonLines`)."""
    who = "%(name)s[%(process)d]" if process_ids else "%(name)s"
    logging.basicConfig(
        level=getattr(logging, level),
        format=f"%(asctime)s %(levelname)s {who}: %(message)s",
        stream=sys.stderr,
    )
    if json_lines:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())
    if level != "DEBUG":  # pynetdicom narrates every message at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("uvicorn").setLevel(logging.WARNING)  # ours names the URL
    else:  # the decoders' tracebacks (storage/convert.py); pydicom sets WARNING on import
        logging.getLogger(DECODERS_LOGGER).setLevel(logging.DEBUG)
