#!/usr/bin/env python3
"""minipacs' memory while it receives one very large instance (issue 6, target 5).

Generates one multi-frame CT instance of ``--mb`` MiB of pixel data (1024 MiB by default:
512 frames of 1024x1024, 16 bits), starts ``minipacs serve`` (the benchmark's configuration)
on an empty folder, records its idle VmRSS, sends the instance with DCMTK ``storescu`` while
sampling VmRSS every 20 ms, and prints idle, peak and growth, and whether the instance was
stored whole (C-FIND count and the stored file's size)::

    .venv/bin/python bench/memory_ingest.py            # 1 GiB
    .venv/bin/python bench/memory_ingest.py --mb 256
    .venv/bin/python bench/memory_ingest.py --count 100000   # RSS over a long ingest

With ``--count N`` it sends N small instances (64x64, 100 patients x 10 studies x 2 series)
over one association instead, sampling VmRSS every 0.5 s, and prints it at each tenth of the
run and once the server is idle again.

Not part of ``make test``; the numbers go to bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: data generation and process helpers)

MIB = 1 << 20


def rss_mib(pid: int) -> float:
    """The process' VmRSS in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def write_instance(path: Path, mib: int) -> int:
    """One multi-frame CT of ``mib`` MiB of pixel data; returns the file's size."""
    data = bench.generate(path.parent / "gen", "big", 1, 64, 1, 1, 1, seed=3)
    [source] = sorted((path.parent / "gen").rglob("*.dcm"))
    from pydicom import dcmread  # the generator's template, enlarged

    ds = dcmread(source)
    frames = mib // 2
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1024, 1024, frames
    ds.PixelData = bytes(frames * 1024 * 1024 * 2)
    ds.save_as(path, enforce_file_format=True)
    del ds
    shutil.rmtree(path.parent / "gen")
    assert data.count == 1
    return path.stat().st_size


def start_idle(work: Path, tag: str) -> tuple[bench.Minipacs, int, float]:
    """minipacs on ``work/pacs``, its pid, and its VmRSS (MiB) after a second idle."""
    bench.after_removals()
    server = bench.Minipacs(work, work)
    server.start(work / "pacs", tag)
    assert server.proc is not None
    time.sleep(1.0)
    return server, server.proc.pid, rss_mib(server.proc.pid)


def many(count: int) -> tuple[int, list[str]]:
    """RSS across the ingest of ``count`` small instances over one association: the exit
    status and the lines of the report."""
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=bench.WORK_ROOT))
    try:
        data = bench.generate(work / "in", "many", count, 64, 100, 10, 2, seed=5)
        bench.run(["sync"], 600)
        server, pid, idle = start_idle(work, "memory-many")
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append((time.perf_counter(), rss_mib(pid)))

        sampler = threading.Thread(target=sample)
        started = time.perf_counter()
        sampler.start()
        sender = subprocess.run(
            ["storescu", "-aet", bench.SCU_AET, "-aec", server.aet, "-ta", "600", "+sd", "+r",
             bench.HOST, str(server.port), *[str(p) for p in data.parts]],
            capture_output=True, text=True, env=bench.DCMTK_ENV, check=False)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        time.sleep(2.0)
        after = rss_mib(pid)
        held, how = server.count()
        server.stop()
        lines = [
            f"- {count:,} small instances over one association: storescu exit "
            f"{sender.returncode} in {elapsed:.0f} s ({count / elapsed:.0f} inst/s); "
            f"stored {held:,} ({how})",
            f"- minipacs VmRSS (MiB): idle before {idle:.1f}; at each tenth of the run "
            + ", ".join(f"{_rss_at(samples, started + elapsed * k / 10):.1f}"
                        for k in range(1, 11))
            + f"; peak {max((r for _, r in samples), default=idle):.1f}; "
            f"idle after {after:.1f} ({len(samples)} samples)",
        ]
        return (0 if sender.returncode == 0 and held == count else 1), lines
    finally:
        bench.cleanup()
        bench.remove(work)


def _rss_at(samples: list[tuple[float, float]], when: float) -> float:
    before = [rss for t, rss in samples if t <= when]
    return before[-1] if before else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="MiB of pixel data (1024)")
    parser.add_argument("--count", type=int, default=0,
                        help="send this many small instances instead (RSS over a long ingest)")
    parser.add_argument("--write-readme", action="store_true",
                        help="record the result in bench/README.md (its own block per mode)")
    args = parser.parse_args()
    began = time.perf_counter()
    machine = bench.machine_info()
    status, lines = many(args.count) if args.count else large(args.mb)
    block = "\n".join([bench.recorded("memory_ingest.py", "", time.perf_counter() - began),
                       "", *machine, "", *lines])
    print(block)
    if args.write_readme:
        mode = "memory-many" if args.count else "memory-large"
        bench.write_readme(block, f"<!-- {mode}:start -->", f"<!-- {mode}:end -->",
                           "Memory (target 5)")
        print(f"\nwritten to {bench.README}")
    return status


def large(mb: int) -> tuple[int, list[str]]:
    """RSS while one instance of ``mb`` MiB of pixel data is received: the exit status and
    the lines of the report."""
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=bench.WORK_ROOT))
    try:
        instance = work / "in" / "big.dcm"
        instance.parent.mkdir()
        size = write_instance(instance, mb)
        server, pid, idle = start_idle(work, "memory")
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append(rss_mib(pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        sender = subprocess.run(
            ["storescu", "-aet", bench.SCU_AET, "-aec", server.aet, "-ta", "600",
             bench.HOST, str(server.port), str(instance)],
            capture_output=True, text=True, env=bench.DCMTK_ENV, check=False)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        held, how = server.count()
        stored = [p.stat().st_size for p in (work / "pacs" / "files").glob("*/*/*")
                  if p.is_file()]
        server.stop()
        peak = max(samples, default=idle)
        lines = [
            f"- one instance, {size / MIB:.0f} MiB file ({mb} MiB of pixel data): storescu "
            f"exit {sender.returncode} in {elapsed:.1f} s ({size / MIB / elapsed:.0f} MiB/s)",
            f"- minipacs VmRSS: idle {idle:.1f} MiB, peak {peak:.1f} MiB, growth "
            f"{peak - idle:.1f} MiB ({len(samples)} samples)",
            f"- stored: {held} instance(s) ({how}); file sizes {stored}",
        ]
        return (0 if sender.returncode == 0 and held == 1 else 1), lines
    finally:
        bench.cleanup()
        bench.remove(work)


if __name__ == "__main__":
    sys.exit(main())
