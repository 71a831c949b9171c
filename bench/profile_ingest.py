#!/usr/bin/env python3
"""Profile minipacs while DCMTK ``storescu`` sends it instances: where does the time go?

Starts ``minipacs serve`` (the benchmark's configuration: durability full, SQLite) on an
empty folder, attaches ``py-spy`` to it, sends a generated set with ``storescu`` (one
association, or ``--parallel`` associations), and prints the instances/s and the functions
with the most samples, by own time and by inclusive time, over all of the server's
threads (idle time, a thread asleep or blocked, is left out: what remains is CPU)::

    .venv/bin/python bench/profile_ingest.py --count 2000            # small, 1 association
    .venv/bin/python bench/profile_ingest.py --size 512 --count 300  # CT
    .venv/bin/python bench/profile_ingest.py --no-profile            # rate only
    .venv/bin/python bench/profile_ingest.py --receiver orthanc      # another receiver

Every run also prints the CPU time per instance of the server (user and system, its
threads and worker processes) and of the ``storescu`` processes.

Needs DCMTK and py-spy (``pip install py-spy``). Not part of ``make test``; the top entries
it prints are what bench/README.md records before and after each ingest change.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: data generation and process helpers)


def parse_collapsed(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """Total samples, samples per function as the innermost frame (own time), and samples
    per function anywhere in the stack (inclusive time), from py-spy's raw format."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return total, own, inclusive


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines merged per function."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})"


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time so far of a process, its threads and its live child
    processes (``ae.workers``), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    user, system = int(fields[11]) / tick, int(fields[12]) / tick
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread has ended meanwhile
            continue
        for child in children:
            try:
                child_user, child_system = _cpu_seconds(int(child))
            except FileNotFoundError:
                continue
            user, system = user + child_user, system + child_system
    return user, system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="rows and columns (64 or 512)")
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 4))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--nagle", action="store_true",
                        help="storescu without TCP_NODELAY=1 (Debian's DCMTK default)")
    parser.add_argument("--idle", action="store_true",
                        help="count threads that wait too (where the wall-clock time goes)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the work folder")
    parser.add_argument("--receiver", choices=("minipacs", "orthanc", "storescp"),
                        default="minipacs",
                        help="another receiver, for its rate and CPU (implies --no-profile)")
    parser.add_argument("--workers", type=int, default=1,
                        help="minipacs's ae.workers (more than 1 implies --no-profile)")
    args = parser.parse_args()
    if args.receiver != "minipacs" or args.workers > 1:
        args.no_profile = True

    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="profile-", dir=bench.WORK_ROOT))
    try:
        data = bench.generate(work / "data", "p", args.count, args.size, 2, 2, 2, seed=7)
        bench.after_removals()
        server: bench.Receiver
        if args.receiver == "orthanc":
            server = bench.Orthanc(work)
        elif args.receiver == "storescp":
            server = bench.Storescp(work)
        else:
            server = bench.Minipacs(work, work, workers=args.workers)
        server.start(work / "pacs", "profile")
        assert server.proc is not None
        spy = None
        raw = work / "profile.txt"
        if not args.no_profile:
            spy = subprocess.Popen(
                [shutil.which("py-spy") or str(bench.VENV_BIN / "py-spy"), "record",
                 "--pid", str(server.proc.pid), "--format", "raw", "--output", str(raw),
                 "--rate", str(args.rate), "--nonblocking", *(["--idle"] if args.idle else [])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.0)  # py-spy attaches
        parts = data.parts if args.parallel == 4 else [data.root]
        sender_env = dict(bench.DCMTK_ENV)
        if args.nagle:
            sender_env.pop("TCP_NODELAY", None)
        cpu_before = _cpu_seconds(server.proc.pid)
        started = time.perf_counter()
        senders = [subprocess.Popen(
            ["storescu", "-aet", bench.SCU_AET, "-aec", server.aet, "-ta", "300", "+sd", "+r",
             bench.HOST, str(server.port), str(part)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=sender_env)
            for part in parts]
        waited = [os.wait4(s.pid, 0) for s in senders]
        elapsed = time.perf_counter() - started
        user, system = (after - before for after, before
                        in zip(_cpu_seconds(server.proc.pid), cpu_before, strict=True))
        sender_cpu = sum(usage.ru_utime + usage.ru_stime for _, _, usage in waited)
        codes = [os.waitstatus_to_exitcode(status) for _, status, _ in waited]
        for sender, code in zip(senders, codes, strict=True):
            sender.returncode = code
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(60)
        held, how = server.count()
        server.stop()
        nagle = ", sender with Nagle on" if args.nagle else ""
        print(f"{args.count} instances of {args.size}x{args.size}, {args.parallel} "
              f"association(s){nagle}: {elapsed:.2f} s, {args.count / elapsed:.0f} inst/s; "
              f"storescu exit {codes}; server holds {held} ({how})")
        print(f"CPU per instance: server {1000 * user / args.count:.3f} ms user + "
              f"{1000 * system / args.count:.3f} ms system, storescu "
              f"{1000 * sender_cpu / args.count:.3f} ms; wall {1000 * elapsed / args.count:.3f} "
              f"ms" + (" (the server's includes py-spy's sampling)" if spy else ""))
        if spy is not None and raw.exists():
            total, own, inclusive = parse_collapsed(raw)
            what = "server threads" if args.idle else "non-idle server threads"
            print(f"\n{total} samples at {args.rate}/s of {what} "
                  f"({total / args.rate / elapsed:.2f} threads on average)")
            for title, counter in (("own time", own), ("inclusive time", inclusive)):
                print(f"\ntop {args.top} by {title}:")
                for name, count in counter.most_common(args.top):
                    print(f"{100 * count / total:6.1f}%  {name}")
        return 0 if not any(codes) and held == args.count else 1
    finally:
        bench.cleanup()
        if not args.keep:
            bench.remove(work)


if __name__ == "__main__":
    sys.exit(main())
