#!/usr/bin/env python3
"""What a native header parse would leave of a small instance's ingest (issue 15).

Alternates, round by round on one generated set, three receivers fed by DCMTK ``storescu``
as ``bench/run.py`` feeds them:

- ``minipacs``: as shipped;
- ``minipacs, parse free``: the same server, whose header parse
  (``storage.archive.parse_header``) is replaced by a lookup of results computed before it
  starts, from the very files ``storescu`` sends: the rate minipacs would reach if the
  parse cost nothing (a native parser costs more than nothing, so this is a ceiling). A
  lookup that misses (a data set not sent as stored) is parsed as usual and counted: the
  line says so;
- ``orthanc``: Orthanc 1.10.1, as in ``bench/run.py`` (skipped when not installed).

Prints each receiver's rates, their median, and its server CPU time (user + system, worker
processes included) per instance::

    TCP_NODELAY=1 .venv/bin/python bench/parse_free.py [--count 2000] [--parallel 1|4]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run as bench  # noqa: E402
from profile_ingest import _cpu_seconds  # noqa: E402

MISSES_PREFIX = "parse_free: lookups missed: "


class ParseFree(bench.Minipacs):
    """minipacs served by this script's ``--serve`` mode: the header parse is a lookup."""

    def __init__(self, log_dir: Path, config_dir: Path, data: Path) -> None:
        super().__init__(log_dir, config_dir)
        self.data = data

    def command(self) -> list[str | Path]:
        """``minipacs serve ...`` through ``--serve DATA``."""
        return [sys.executable, Path(__file__), "--serve", self.data, *super().command()[1:]]

    def misses(self) -> int:
        """Lookups that missed (read from the log once the server stopped)."""
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith(MISSES_PREFIX):
                return int(line[len(MISSES_PREFIX):])
        raise RuntimeError(f"no '{MISSES_PREFIX}' line in {self.log}")


def serve_parse_free(data: Path, argv: list[str]) -> int:
    """Parse every Part 10 file under ``data``, then run ``minipacs`` with ``argv``, its
    header parse a lookup of those results by the data set's bytes."""
    import atexit

    sys.path.remove(str(BENCH_DIR))  # bench/web.py is not the web package
    sys.modules.pop("web", None)
    from scp.__main__ import main as minipacs_main
    from storage import archive, parsing

    parse = archive.parse_header
    known: dict[bytes, Any] = {}
    for path in sorted(data.rglob("*")):
        if path.is_file():
            syntax, spooled = parsing.Spooled.part10(path)
            with open(path, "rb") as f:
                f.seek(spooled.offset)
                data_set = f.read(spooled.length)
            known[data_set] = parse(data_set, syntax)
    missed = [0]

    def lookup(data_set: Any, syntax: str) -> Any:
        parsed = known.get(bytes(data_set))
        if parsed is None:
            missed[0] += 1
            return parse(data_set, syntax)
        return copy.deepcopy(parsed)  # the archive adds to it (warnings, the file's key)

    archive.parse_header = lookup  # type: ignore[assignment]
    atexit.register(lambda: print(f"{MISSES_PREFIX}{missed[0]}", file=sys.stderr, flush=True))
    return minipacs_main(argv)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        return serve_parse_free(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="64x64 instances (2000)")
    parser.add_argument("--parallel", type=int, choices=(1, 4), default=1)
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (5)")
    args = parser.parse_args()
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="parse-free-", dir=bench.WORK_ROOT))
    try:
        data = bench.generate(work / "data", "free", args.count, 64, 10, 10, 2, seed=13)
        bench.after_removals()
        names = ["minipacs", "minipacs, parse free"]
        if shutil.which("Orthanc"):
            names.append("orthanc")
        rates: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        missed = 0
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else names[::-1]:
                receiver: bench.Receiver = (
                    bench.Orthanc(work) if name == "orthanc"
                    else ParseFree(work, work, data.root) if "free" in name
                    else bench.Minipacs(work, work))
                receiver.start(work / f"{name.split(',')[0]}-{len(rates[name])}-"
                               f"{'free' if 'free' in name else 'asis'}", str(round_))
                assert receiver.proc is not None
                before = sum(_cpu_seconds(receiver.proc.pid))
                cell = bench.send(receiver, data, args.parallel, work, f"{round_}")
                used = sum(_cpu_seconds(receiver.proc.pid)) - before
                receiver.stop()
                if cell.problems:
                    raise RuntimeError(f"{name}, round {round_}: {cell.problems}")
                if isinstance(receiver, ParseFree):
                    missed += receiver.misses()
                rates[name].append(args.count / cell.seconds)
                cpu[name].append(1000 * used / args.count)
        print(f"{args.count} instances of 64x64, {args.parallel} association(s), "
              f"{args.rounds} alternated rounds:")
        for name in names:
            print(f"  {name}: median {statistics.median(rates[name]):,.0f} inst/s ("
                  + ", ".join(f"{r:,.0f}" for r in rates[name]) + "); server CPU median "
                  f"{statistics.median(cpu[name]):.2f} ms per instance ("
                  + ", ".join(f"{c:.2f}" for c in cpu[name]) + ")")
        print(f"  parse-free lookups that missed (parsed as usual): {missed}")
        return 0
    finally:
        bench.cleanup()
        bench.remove(work)


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    sys.exit(main())
