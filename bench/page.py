#!/usr/bin/env python3
"""The administrator's page over 10,000 studies (issue 16: the study list in under 200 ms of
server time).

The index is ``bench/scale.py``'s kept archive of 1,000,000 bulk instances: 10,000 studies
of 2,000 patients, 2 series of 50 instances each (built by ``scale.populate`` when missing,
a few minutes; kept under ``bench/work/scale/``). ``minipacs serve`` runs on it as
``make run`` would, its HTTP listener on loopback, and each page is asked for ``--reps``
times over one keep-alive connection (``httpx``). Server time is what the page's
``Server-Timing`` header says (from the request's start in the endpoint to the rendered
HTML); the client's time adds HTTP, the middlewares and the access check.

Run from the repository root::

    TCP_NODELAY=1 .venv/bin/python bench/page.py                  # 30 reps of each page
    TCP_NODELAY=1 .venv/bin/python bench/page.py --write-readme   # and record it

See bench/README.md, section "The page".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import run as bench  # noqa: E402
import scale  # noqa: E402

INSTANCES = 1_000_000
TARGET_MS = 200.0
README_START = "<!-- page:start -->"
README_END = "<!-- page:end -->"


@dataclass
class Page:
    """One page asked for: its path, and what each answer must hold."""

    label: str
    path: str
    rows: int | None = None
    """Study rows the list must show (``None``: not a study list)."""
    server: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)


def _in_2020(k: int) -> bool:
    """Whether study ``k`` is dated in 2020 (``bench/run.py``'s ``_series_template``)."""
    p, s = k // scale.STUDIES_PER_PATIENT, k % scale.STUDIES_PER_PATIENT
    return (datetime.date(2020, 1, 1) + datetime.timedelta(days=37 * p + 11 * s)).year == 2020


def pages() -> list[Page]:
    middle = scale.study_uid(5_000)
    in_2020 = sum(1 for k in range(INSTANCES // scale.INSTANCES_PER_STUDY) if _in_2020(k))
    return [
        Page("every study, first page", "/", 50),
        Page("every study, page 100 (offset 4,950)", "/?page=100", 50),
        Page("patient name prefix SCALE^P0001 (50 studies)", "/?name=SCALE%5EP0001", 50),
        Page("patient ID (5 studies)", "/?patient_id=SCALE01000", 5),
        Page(f"date range, one year of 2020 ({in_2020} studies)",
             "/?from=2020-01-01&to=2020-12-31", min(in_2020, 50)),
        Page("modality CT (all of them), first page", "/?modality=CT", 50),
        Page("accession number (1 study)", "/?accession=SC00005000", 1),
        Page("one study with its 2 series", f"/admin/studies/{middle}"),
        Page("status (counts, disk, metrics, audit)", "/admin/status"),
        Page("queue", "/admin/queue"),
    ]


class PageServer(scale.ScaleMinipacs):
    """minipacs on the kept archive, with its HTTP listener on a port we choose."""

    def __init__(self, log_dir: Path, config_dir: Path) -> None:
        super().__init__(log_dir, config_dir)
        self.http_port = bench.free_port()

    def command(self) -> list[str | Path]:
        command = super().command()
        command[command.index("--http-port") + 1] = str(self.http_port)
        return command


def measure(server: PageServer, reps: int) -> list[Page]:
    asked = pages()
    with httpx.Client(base_url=f"http://{bench.HOST}:{server.http_port}", timeout=60) as http:
        deadline = time.monotonic() + 60
        while True:  # the HTTP listener starts beside the DICOM one: poll until it answers
            try:
                if http.get("/admin/static/admin.css").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the HTTP listener did not answer")
            time.sleep(0.05)  # polling a starting process
        for page in asked:
            http.get(page.path)  # warm: the first read of the index's pages
        for _ in range(reps):
            for page in asked:  # interleaved, so that drift falls on each alike
                start = time.perf_counter()
                answer = http.get(page.path)
                page.client.append(time.perf_counter() - start)
                if answer.status_code != 200:
                    raise RuntimeError(f"{page.path}: {answer.status_code} {answer.text[:200]}")
                timing = answer.headers["server-timing"]
                page.server.append(float(timing.split("dur=")[1]) / 1000)
                if page.rows is not None:
                    shown = answer.text.count('<a href="/admin/studies/')
                    if shown != page.rows:
                        raise RuntimeError(f"{page.path}: {shown} rows, not {page.rows}")
    return asked


def _ms(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(values) * 1000:.1f} / {p95 * 1000:.1f}"


def report(asked: list[Page], reps: int, seconds: float) -> str:
    worst = max(max(p.server) for p in asked) * 1000
    lines = [
        f"`bench/page.py` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC,"
        f" {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" {INSTANCES:,} instances in 10,000 studies, SQLite, {reps} reps of each page"
        f" ({seconds:.0f} s in all). Times in ms, median / p95.",
        "",
        "| page | server (Server-Timing) | client (HTTP round trip) |",
        "|---|---|---|",
        *(f"| {p.label} | {_ms(p.server)} | {_ms(p.client)} |" for p in asked),
        "",
        f"Slowest server time of any request: {worst:.1f} ms (target: study list under"
        f" {TARGET_MS:.0f} ms): {'met' if worst < TARGET_MS else 'NOT met'}.",
    ]
    return "\n".join(lines)


def write_readme(block: str) -> None:
    readme = Path(__file__).resolve().parent / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    readme.write_text(text[:start + len(README_START)] + "\n" + block + "\n" + text[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="requests of each page (30)")
    parser.add_argument("--repopulate", action="store_true", help="rebuild the kept index")
    parser.add_argument("--write-readme", action="store_true",
                        help="record the table in bench/README.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_dir = scale.populated(INSTANCES, args.repopulate)
    with tempfile.TemporaryDirectory(prefix="minipacs-page-") as work:
        server = PageServer(Path(work), Path(work))
        server.start(data_dir, "page")
        try:
            asked = measure(server, args.reps)
        finally:
            server.stop()
    block = report(asked, args.reps, time.perf_counter() - started)
    print(block)
    if args.write_readme:
        write_readme(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
