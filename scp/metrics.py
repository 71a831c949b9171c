"""What the DICOM listener counts for ``/metrics`` (Prometheus, ``prometheus_client``).

The metrics live in ``prometheus_client``'s default registry, which the HTTP listener
exports (:mod:`web.metrics`) without importing ``scp``. With ``ae.workers`` > 1 each worker
writes them to ``PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets before it starts
them (:func:`multiprocess_dir`, ``<data_dir>/.metrics``) and its HTTP listener reads.

Calling AE titles are labels only when ``peers`` names them; any other is ``other``, so
that a peer cannot create series at will.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

OTHER = "other"
"""The calling AE title label of a peer not in ``peers``."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
"""Seconds: a small C-STORE takes about 2 ms, a C-MOVE of a study minutes."""

ASSOCIATIONS_OPEN = Gauge(
    "minipacs_dicom_associations_open", "DICOM associations open now",
    multiprocess_mode="livesum")
ASSOCIATIONS = Counter(
    "minipacs_dicom_associations", "DICOM associations established, by calling AE title",
    ["calling_ae"])
REJECTED = Counter(
    "minipacs_dicom_associations_rejected",
    "DICOM association requests rejected (A-ASSOCIATE-RJ), by calling AE title",
    ["calling_ae"])
OPERATIONS = Histogram(
    "minipacs_dimse_operation_seconds",
    "DIMSE operations answered, by operation and final status (hex, PS3.7 Annex C),"
    " with how long each took", ["operation", "status"], buckets=LATENCY_BUCKETS)
BYTES = Counter(
    "minipacs_dimse_bytes",
    "Data set bytes received by C-STORE (direction=in) and sent by the C-STORE"
    " sub-operations of C-GET and C-MOVE (direction=out)", ["operation", "direction"])
ROUTED = Counter(
    "minipacs_dicom_routed_instances",
    "Instances routing sent to a peer (outcome=sent) or could not send (outcome=failed:"
    " each failed attempt)", ["peer", "outcome"])


def count_bytes(operation: str, direction: str, size: int) -> None:
    """Add to :data:`BYTES`; a failure (the workers' metric files on a full disk) is
    logged, never the operation's."""
    try:
        BYTES.labels(operation, direction).inc(size)
    except Exception:
        logger.exception("the %s bytes of %s not counted", direction, operation)


def calling_ae(title: str, known: Callable[[str], bool]) -> str:
    """The label of a calling AE title: itself when ``peers`` names it, else ``other``."""
    title = title.strip()
    return title if title and known(title) else OTHER


def status_label(code: int) -> str:
    """A status code as its label: four hex digits, as PS3.7 writes them."""
    return f"{code & 0xFFFF:04X}"


@contextmanager
def multiprocess_dir(folder: Path) -> Iterator[str]:
    """``folder`` emptied for the workers' metrics, in ``PROMETHEUS_MULTIPROC_DIR`` while
    the block runs (workers started meanwhile inherit it), removed afterwards (what a
    killed supervisor left goes at the next start)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        yield str(folder)
    finally:
        if before is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)
