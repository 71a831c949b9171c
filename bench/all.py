#!/usr/bin/env python3
"""Every benchmark of issue 6, one after the other: what ``make bench`` runs.

1. ``bench/run.py``: minipacs, Orthanc and DCMTK storescp side by side: ingest (small and CT,
   1 and 4 associations, and a sender with Nagle's algorithm on), C-FIND, C-MOVE and C-GET
   (targets 1 and 2);
2. ``bench/scale.py``: ingest, C-FIND, query plans, startup and RSS with 0 to 1,000,000
   instances already indexed (targets 3, 4 and 6);
3. ``bench/memory_ingest.py``: RSS while one very large instance arrives, and across a long
   ingest (target 5).

::

    .venv/bin/python bench/all.py                   # full: about half an hour
    .venv/bin/python bench/all.py --quick           # a few minutes
    .venv/bin/python bench/all.py --write-readme    # and record every block in bench/README.md
    .venv/bin/python bench/all.py --only scale,memory
    .venv/bin/python bench/all.py --quick --no-retrieve   # other options go to run.py

Each part runs as its own process; one that fails (or reports an anomaly) does not stop the
others, and the exit status is 1 if any did. Options meant for run.py are checked before
anything runs. Ctrl-C or SIGTERM reaches the running part, which stops its servers and
removes its work folder; the parts after it do not run.

``--write-readme`` records whatever the parts measured, a quick or a failed run included:
read its "Anomalies" lines before committing the README.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PARTS = ("run", "scale", "memory")

sys.path.insert(0, str(BENCH))
import run as bench  # noqa: E402  (bench/run.py: its parser checks run.py's options)


def commands(quick: bool, write: bool, run_args: Sequence[str]) -> dict[str, list[list[str]]]:
    """The commands of each part, for a full or a quick run."""
    py = sys.executable
    record = ["--write-readme"] if write else []
    fast = ["--quick"] if quick else []
    return {
        "run": [[py, str(BENCH / "run.py"), *fast, *record, *run_args]],
        "scale": [[py, str(BENCH / "scale.py"), *fast, *record]],
        "memory": [
            [py, str(BENCH / "memory_ingest.py"), "--mb", "256" if quick else "1024", *record],
            [py, str(BENCH / "memory_ingest.py"), "--count", "10000" if quick else "100000",
             *record],
        ],
    }


def run_part(cmd: Sequence[str], env: dict[str, str]) -> int:
    """Run one part to its end. Ctrl-C reaches it directly (one process group); SIGTERM is
    passed on. Either way the part is waited for, so that it cleans up, then the signal
    ends this run too."""
    proc = subprocess.Popen(cmd, env=env)
    got: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        got.append(signum)
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                got.append(signal.SIGINT)  # the part had it too: let it finish cleaning up
    finally:
        signal.signal(signal.SIGTERM, previous)
    if got:
        raise SystemExit(128 + got[0])
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true",
                        help="run.py and scale.py --quick; a 256 MiB instance; 10,000 small")
    parser.add_argument("--write-readme", action="store_true",
                        help="record every part's results in bench/README.md")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts to run, of " + ",".join(PARTS))
    args, run_args = parser.parse_known_args(argv)
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    if not only or set(only) - set(PARTS):
        parser.error(f"--only: choose from {PARTS}")
    if run_args and "run" not in only:
        parser.error(f"{' '.join(run_args)}: not an option of all.py, and run.py does not run")
    if "run" in only:
        bench.parse_args([*(["--quick"] if args.quick else []), *run_args])  # exits on an error
    env = {**os.environ, "TCP_NODELAY": "1"}
    plan = commands(args.quick, args.write_readme, run_args)
    outcome: list[str] = []
    failed = False
    for part in PARTS:
        if part not in only:
            continue
        for cmd in plan[part]:
            shown = " ".join(Path(c).name if c == sys.executable else c for c in cmd)
            print(f"\n=== {shown}", flush=True)
            start = time.perf_counter()
            code = run_part(cmd, env)
            minutes = (time.perf_counter() - start) / 60
            failed |= code != 0
            outcome.append(f"{'ok    ' if code == 0 else 'FAILED'} {minutes:5.1f} min  {shown}"
                           + ("" if code == 0 else f" (exit {code})"))
    print("\n=== summary")
    print("\n".join(outcome))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
