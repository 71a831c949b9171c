"""Routing's benchmark (issue 16): ingest with three routes active against none, and how
fast the outbox drains to each of the three peers against a C-MOVE of the same instances.

Three DCMTK ``storescp --ignore`` peers (the C-MOVE destination of bench/run.py, each on
its own port), minipacs with ``storage.durability: full`` on SQLite:

1. no routes: ``storescu`` sends the set over one association (the ingest rate);
2. the same set (fresh UIDs) with three routes, one per peer, every instance matching:
   the ingest rate, and the drain rate per peer (its instances / seconds from the start of
   the ingest until it has received the last one, so it includes the wait behind ingest);
3. one C-MOVE of the set's studies to one peer (``movescu``): the rate routing must reach;
4. a backlog: the peers stopped, a second set stored (``--backlog``), the peers started
   again: how fast the outbox drains to each (all at once) when it does not wait for the
   ingest, from their start (with their start-up and the senders' wait before the next
   attempt) and from each peer's first instance to its last (the sending alone); then a
   C-MOVE of the same backlog, for the like-for-like rate.

Usage::

    TCP_NODELAY=1 .venv/bin/python bench/routing.py [--count 2000] [--size 64] [--routes 3]
        [--backlog N] [--connections N] [--profile DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run as bench  # noqa: E402
from profile_ingest import _cpu_seconds  # noqa: E402

PEERS = ("ROUTEA", "ROUTEB", "ROUTEC")


class Peer(bench.Destination):
    """A ``storescp --ignore -v`` peer called ``aet`` (``--fork`` with ``connections`` > 1:
    one process per association, so it takes several at once)."""

    def __init__(self, log_dir: Path, aet: str, connections: int = 1) -> None:
        super().__init__(log_dir)
        self.aet = aet
        self.connections = connections
        self.log = log_dir / f"storescp-{aet}.log"

    def start(self) -> None:
        cmd = ["storescp", "--ignore", "-v", "-aet", self.aet, str(self.port)]
        if self.connections > 1:
            cmd.insert(1, "--fork")
        with open(self.log, "wb") as log:
            self.proc = bench.spawn(cmd, log)
        bench.wait_until(lambda: bench.echo_ok(self.aet, self.port), self.proc,
                         f"storescp {self.aet}", self.log)


class RoutedMinipacs(bench.Minipacs):
    """minipacs whose configuration adds the peers and, with ``routes``, one route each."""

    def __init__(self, log_dir: Path, config_dir: Path, peers: list[Peer], routes: bool,
                 move_to: Peer) -> None:
        super().__init__(log_dir, config_dir, dest_port=move_to.port)
        text = self.config.read_text()
        for peer in peers:
            text += (f"  - ae_title: {peer.aet}\n    host: {bench.HOST}\n    port: {peer.port}\n"
                     f"    connections: {peer.connections}\n")
        if routes:
            text += "routes:\n" + "".join(
                f"  - {{name: to-{p.aet.lower()}, to: [{p.aet}]}}\n" for p in peers)
            text += ("routing:\n  retry_seconds: 0.5\n  retry_max_seconds: 0.5\n"
                     "  max_attempts: 100000\n")
        self.config.write_text(text)


def received(peer: Peer, offset: int) -> int:
    return peer.received_since(offset)


def warm(server: bench.Minipacs) -> None:
    """Read every stored file once: the drain would otherwise open them cold (written long
    before, their inodes and pages maybe evicted) and the C-MOVE after it warm."""
    for path in (server.data_dir / "files").rglob("*"):
        if path.is_file():
            path.read_bytes()


def _machine() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / tick, sum(values) / tick


class Usage:
    """CPU used from its making to :meth:`report`: the server's, and the machine's."""

    def __init__(self, server: bench.Minipacs) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid
        self.server = sum(_cpu_seconds(self.pid))
        self.busy, self.total = _machine()
        self.wall = time.perf_counter()

    def report(self, instances: int) -> str:
        server = sum(_cpu_seconds(self.pid)) - self.server
        busy, total = _machine()
        wall = time.perf_counter() - self.wall
        cores = (total - self.total) / wall
        return (f"server CPU {1e6 * server / instances:.0f} us per instance; machine"
                f" {(busy - self.busy) / wall:.2f} of {cores:.0f} cores busy")


def profiler(server: bench.Minipacs, folder: Path | None,
             name: str) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``server`` (every thread, without pausing it) into
    ``folder/name.txt``; ``None`` without ``--profile``. py-spy is not a dependency:
    ``.venv/bin/pip install py-spy``."""
    if folder is None:
        return None
    assert server.proc is not None
    folder.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                            str(server.proc.pid), "--threads", "--nonblocking", "--rate",
                            "200", "--format", "raw", "-o", str(folder / f"{name}.txt")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches (no server to poll: it has no ready signal)
    return spy


def stop_profiler(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
        spy.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="pixels per side (64: 8 kB)")
    parser.add_argument("--routes", type=int, default=3, choices=(1, 2, 3),
                        help="how many of the three peers get a route")
    parser.add_argument("--backlog", type=int, default=0,
                        help="instances stored while the peers are down (default: --count)")
    parser.add_argument("--connections", type=int, default=1,
                        help="peers[].connections of each peer (storescp --fork when > 1)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a folder: py-spy profiles of the server while the backlog"
                        " drains (drain.txt) and during its C-MOVE (move.txt), raw format")
    args = parser.parse_args(argv)
    args.backlog = args.backlog or args.count
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="routing-", dir=bench.WORK_ROOT))
    try:
        logs = work / "logs"
        logs.mkdir()
        peers = [Peer(logs, aet, args.connections) for aet in PEERS[:args.routes]]
        for peer in peers:
            peer.start()
        move_to = bench.Destination(logs)
        move_to.start()
        results: dict[str, float] = {}
        routed = f"{args.routes} route(s)"
        for label, routes in (("no routes", False), (routed, True)):
            data = bench.generate(work / f"data-{routes}", label, args.count, args.size,
                                  patients=4, studies_per_patient=2, series_per_study=2,
                                  seed=7 if routes else 8)
            server = RoutedMinipacs(logs, work, peers, routes, move_to)
            server.start(work / f"minipacs-{routes}", label.replace(" ", "-"))
            offsets = [p.log_size() for p in peers]
            assert server.proc is not None
            cpu_before = sum(_cpu_seconds(server.proc.pid))
            start = time.perf_counter()
            cell = bench.send(server, data, 1, logs, label.replace(" ", "-"))
            results[f"ingest, {label}"] = cell.rate
            print(f"ingest, {label}: {cell.rate:.0f} inst/s"
                  + (f" PROBLEMS {cell.problems}" if cell.problems else ""), flush=True)
            if routes:
                pending = {p.aet: (p, offset) for p, offset in zip(peers, offsets, strict=True)}
                deadline = start + 600
                while pending and time.perf_counter() < deadline:
                    for aet, (peer, offset) in list(pending.items()):
                        if received(peer, offset) >= args.count:
                            seconds = time.perf_counter() - start
                            results[f"drained to {aet}"] = args.count / seconds
                            print(f"drained to {aet}: {args.count / seconds:.0f} inst/s"
                                  f" ({seconds:.1f} s from the ingest's start)", flush=True)
                            del pending[aet]
                    time.sleep(0.05)
                for aet in pending:
                    print(f"drained to {aet}: NOT DONE in 600 s", flush=True)
            cpu = sum(_cpu_seconds(server.proc.pid)) - cpu_before
            print(f"server CPU, {label}: {1000 * cpu / args.count:.2f} ms per instance"
                  + (" (ingest and routing)" if routes else " (ingest)"), flush=True)
            if routes:  # a backlog: the peers down while a second set comes in, then up
                for peer in peers:
                    peer.stop()
                backlog = bench.generate(work / "data-backlog", "backlog", args.backlog,
                                         args.size, patients=4, studies_per_patient=2,
                                         series_per_study=2, seed=9)
                bench.send(server, backlog, 1, logs, "backlog")
                warm(server)  # both rates below read files as warm as each other
                spy = profiler(server, args.profile, "drain")
                usage = Usage(server)
                start = time.perf_counter()  # their start-up counts against the drain
                for peer in peers:  # each a new log: what the sender sends from now on
                    peer.start()
                first: dict[str, float] = {}
                pending = {p.aet: p for p in peers}
                while pending and time.perf_counter() < start + 600:
                    for aet, peer in list(pending.items()):
                        got = received(peer, 0)
                        if got and aet not in first:
                            first[aet] = time.perf_counter()
                        if got >= args.backlog:
                            now = time.perf_counter()
                            seconds, sending = now - start, now - first[aet]
                            print(f"backlog of {args.backlog} drained to {aet}:"
                                  f" {args.backlog / seconds:.0f} inst/s ({seconds:.1f} s, with"
                                  f" the peer's start-up and up to 0.5 s before the next"
                                  f" attempt); {(args.backlog - 1) / sending:.0f} inst/s"
                                  f" from its first instance to its last ({sending:.2f} s)",
                                  flush=True)
                            del pending[aet]
                    time.sleep(0.02)
                print(f"while it drained: {usage.report(args.backlog)}", flush=True)
                stop_profiler(spy)
                spy = profiler(server, args.profile, "move")
                usage = Usage(server)
                move = bench.retrieve(server, backlog, "C-MOVE", move_to, logs)
                print(f"during the C-MOVE: {usage.report(args.backlog)}", flush=True)
                stop_profiler(spy)
                print(f"C-MOVE of the backlog's {args.backlog} instances: {move.rate:.0f} inst/s"
                      + (f" PROBLEMS {move.problems}" if move.problems else ""), flush=True)
            if not routes:
                move = bench.retrieve(server, data, "C-MOVE", move_to, logs)
                results["C-MOVE"] = move.rate
                print(f"C-MOVE of the same instances: {move.rate:.0f} inst/s"
                      + (f" PROBLEMS {move.problems}" if move.problems else ""), flush=True)
            server.stop()
        for peer in peers:
            peer.stop()
        move_to.stop()
        return 0
    finally:
        bench.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
