"""De-identified C-MOVE against plain C-MOVE (issue 18: at least 0.8x).

One minipacs (SQLite, ``storage.durability: full``) holds a set of synthetic CT
instances; DCMTK ``movescu`` moves all of its studies to a DCMTK ``storescp --ignore``
(bench/run.py's destination) over and over, the server restarted between rounds with
the destination either plain or with ``peers[].deidentify`` naming a profile (the order
alternating). Each de-identified instance is read whole, de-identified by
:mod:`storage.deidentify` and encoded again; a plain one goes as stored, byte for byte.

The table: ``--table PATH``, the standard's ``part15.xml`` (the default,
tests/storage/data/part15-sample.xml, has 27 rows: the figures are then not the
standard's). The profile: ``retain_long_modified_dates`` and ``clean_descriptors`` (a
research profile: every date shifted, descriptions scrubbed).

Usage::

    TCP_NODELAY=1 .venv/bin/python bench/deidentify.py [--table part15.xml]
        [--count 1000] [--size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run as bench  # noqa: E402
from routing import Usage  # noqa: E402

SAMPLE_TABLE = BENCH_DIR.parent / "tests" / "storage" / "data" / "part15-sample.xml"
SECRET = "a benchmark's secret of some length"
OPTIONS = ("retain_long_modified_dates", "clean_descriptors")


class Server(bench.Minipacs):
    """minipacs whose move destination gets de-identified copies when ``deidentified``."""

    def __init__(self, log_dir: Path, config_dir: Path, dest_port: int) -> None:
        super().__init__(log_dir, config_dir, dest_port=dest_port)
        self.dest_port = dest_port
        self.plain = self.config.read_text()

    def configure(self, table: Path, deidentified: bool) -> None:
        text = self.plain
        if deidentified:
            text = text.replace(f"    port: {self.dest_port}\n",
                                f"    port: {self.dest_port}\n    deidentify: bench\n")
            text += (f"deidentify:\n  table: {table}\n  secret: \"{SECRET}\"\n"
                     f"profiles:\n  - name: bench\n    options: [{', '.join(OPTIONS)}]\n")
        self.config.write_text(text)

    def restart(self, tag: str) -> None:
        """Stop, then start again on the same data folder (:meth:`start` wants a new one)."""
        self.stop()
        self.port = bench.free_port()
        self.log = self.log_dir / f"{self.name}-{tag}.log"
        with open(self.log, "wb") as log:
            self.proc = bench.spawn(self.command(), log)
        bench.wait_until(self.ready, self.proc, self.name, self.log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=SAMPLE_TABLE,
                        help="PS3.15's part15.xml (default: the tests' 27-row sample)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="pixels per side (64: 8 kB)")
    parser.add_argument("--rounds", type=int, default=3, help="C-MOVEs of each kind")
    args = parser.parse_args(argv)
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="deidentify-", dir=bench.WORK_ROOT))
    try:
        logs = work / "logs"
        logs.mkdir()
        destination = bench.Destination(logs)
        destination.start()
        data = bench.generate(work / "data", "set", args.count, args.size, patients=4,
                              studies_per_patient=2, series_per_study=2, seed=11)
        server = Server(logs, work, dest_port=destination.port)
        server.start(work / "minipacs", "ingest")
        cell = bench.send(server, data, 1, logs, "ingest")
        each = data.total_bytes / args.count / 1024
        print(f"{args.count} instances of {args.size}x{args.size} ({each:.0f} kB each) stored"
              f" at {cell.rate:.0f} inst/s; table {args.table}", flush=True)
        rates: dict[bool, list[float]] = {False: [], True: []}
        for n in range(args.rounds * 2):
            deidentified = (n % 2 == 1) if (n // 2) % 2 == 0 else (n % 2 == 0)
            server.configure(args.table, deidentified)
            label = "de-identified" if deidentified else "plain"
            server.restart(f"{label}-{n}")
            usage = Usage(server)
            move = bench.retrieve(server, data, "C-MOVE", destination, logs)
            rates[deidentified].append(move.rate)
            print(f"round {n + 1}: C-MOVE {label}: {move.rate:.0f} inst/s ({move.seconds:.2f} s;"
                  f" {usage.report(args.count)})"
                  + (f" PROBLEMS {move.problems}" if move.problems else ""), flush=True)
        plain, deid = sorted(rates[False]), sorted(rates[True])
        median_plain, median_deid = plain[len(plain) // 2], deid[len(deid) // 2]
        print(f"median: plain {median_plain:.0f} inst/s, de-identified {median_deid:.0f}"
              f" inst/s: {median_deid / median_plain:.2f}x (target >= 0.8x)", flush=True)
        server.stop()
        destination.stop()
        return 0
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
