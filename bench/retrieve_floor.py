#!/usr/bin/env python3
"""The floor of a retrieve's sender on this machine: do-nothing senders, one receiver.

Issue 15 asks for the floor of each design before building it. A C-MOVE or C-GET is, per
instance, one C-STORE sub-operation and its response; here senders that do nothing else
(no query, no index, no Pending responses) send the same instances, one association each,
to DCMTK ``storescp --ignore`` (receives, stores nothing), as bench/run.py's C-MOVE does:

- ``pynetdicom``: ``AE.associate`` and ``send_c_store(Dataset)`` (datasets read once before
  timing), with minipacs's reactor wake-ups on the association, the design minipacs used
  for retrieves until issue 15;
- ``engine, in memory``: :class:`scp.engine.sender.StoreAssociation`, each data set's
  bytes read once before timing;
- ``engine, from files``: the same, each data set read from its file as it goes (open,
  read, skip the File Meta group), which is what a retrieve does.

    TCP_NODELAY=1 .venv/bin/python bench/retrieve_floor.py [--count 3000] [--ct 300]
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import run as bench  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402
from pynetdicom import AE, build_context, evt  # noqa: E402

from scp.engine import dimse, reactor  # noqa: E402
from scp.engine.retrieve import only_the_sender_reads  # noqa: E402
from scp.engine.sender import StoreAssociation  # noqa: E402
from scp.engine.sockets import disable_nagle  # noqa: E402

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DEST = "FLOORDEST"


def data_set_offset(raw: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, the prefix and the
    File Meta group, whose length its first element gives."""
    (group_length,) = struct.unpack_from("<I", raw, 132 + 8)
    return 132 + 12 + group_length


def files_of(data: bench.DataSet) -> list[Path]:
    return sorted(p for part in data.parts for p in part.iterdir())


def pynetdicom_sender(port: int, paths: list[Path]) -> float:
    datasets = [dcmread(p) for p in paths]
    ae = AE(ae_title=bench.SCU_AET)
    ae.add_requested_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])
    ae.maximum_pdu_size = 0
    start = time.perf_counter()
    assoc = ae.associate(bench.HOST, port, ae_title=DEST, evt_handlers=[
        (evt.EVT_CONN_OPEN, disable_nagle), (evt.EVT_CONN_OPEN, reactor.handle_conn_open),
        (evt.EVT_CONN_CLOSE, reactor.handle_conn_close)])
    assert assoc.is_established
    only_the_sender_reads(assoc)  # as scp/retrieve.py did: else the reactor may take a response
    for ds in datasets:
        rsp = assoc.send_c_store(ds)
        assert rsp.Status == 0, rsp
    assoc.release()
    return time.perf_counter() - start


def engine_sender(port: int, paths: list[Path], from_files: bool) -> float:
    blobs = [] if from_files else [p.read_bytes() for p in paths]
    start = time.perf_counter()
    assoc = StoreAssociation.open(
        (bench.HOST, port), calling=bench.SCU_AET, called=DEST,
        contexts=[build_context(CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])], max_pdu=0,
        connect_timeout=5, acse_timeout=5, dimse_timeout=30)
    ((context_id, _),) = assoc.accepted[CT_IMAGE_STORAGE]
    for number, path in enumerate(paths, start=1):
        if from_files:
            with open(path, "rb") as fp:
                raw = fp.read()
        else:
            raw = blobs[number - 1]
        offset = data_set_offset(raw)
        uid = f"1.2.3.{number}"  # storescp --ignore looks at nothing
        command = dimse.c_store_rq(number, CT_IMAGE_STORAGE, uid)
        status, _ = assoc.link.store(context_id, command, [memoryview(raw)[offset:]], number)
        assert status == 0, hex(status)
    assoc.release()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="small instances (3000)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances (300)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    args = parser.parse_args()
    bench.WORK_ROOT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="retrieve-floor-", dir=bench.WORK_ROOT))
    port = bench.free_port()
    receiver = subprocess.Popen(["storescp", "--ignore", "-aet", DEST, str(port)],
                                env=bench.DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
    try:
        reactor.install()
        bench.wait_until(lambda: bench.echo_ok(DEST, port), receiver, "storescp",
                         work / "none.log")
        sets = {
            "small 64x64": files_of(bench.generate(work / "small", "s", args.count, 64, 10,
                                                   10, 2, seed=11)),
            "CT 512x512": files_of(bench.generate(work / "ct", "c", args.ct, 512, 2, 2, 2,
                                                  seed=12)),
        }
        senders: dict[str, Callable[[list[Path]], float]] = {
            "pynetdicom send_c_store(Dataset)": lambda paths: pynetdicom_sender(port, paths),
            "engine, in memory": lambda paths: engine_sender(port, paths, False),
            "engine, from files": lambda paths: engine_sender(port, paths, True),
        }
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):  # alternated: the machine's drift falls on all
            for set_name, paths in sets.items():
                for name, sender in senders.items():
                    rates.setdefault((set_name, name), []).append(len(paths) / sender(paths))
        print(f"do-nothing senders to storescp --ignore, one association, {args.rounds}"
              " rounds (inst/s):")
        for (set_name, name), values in rates.items():
            print(f"  {set_name:12} {name:34} " + ", ".join(f"{r:,.0f}" for r in values))
        return 0
    finally:
        receiver.terminate()
        receiver.wait()
        bench.remove(work)


if __name__ == "__main__":
    sys.exit(main())
