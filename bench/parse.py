#!/usr/bin/env python3
"""Header parsing per stored instance: pydicom's path against the fast one.

Times ``extract(read_header(...))`` (a pydicom Dataset, then its DICOM JSON) and
``parse_header(...)`` (:mod:`storage.fastparse`, falling back to the former) on
bench/web.py's ``fresh_instances`` (64x64 CT, as STOW-RS is benchmarked), on one 512x512
CT, and on pydicom's ``CT_small.dcm`` (a modality's header: sequences, private tags), and
checks that both give the same result. Run by hand from the repository root::

    .venv/bin/python bench/parse.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from pydicom.data import get_testdata_file  # noqa: E402

from storage import fastparse  # noqa: E402
from storage.parsing import extract, parse_header, read_header, split_part10  # noqa: E402


def _bench_module(name: str) -> ModuleType:
    """bench/<name>.py by its path: ``import web`` would find the repository's web package."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def ms_per_call(fn: Callable[[bytes, str], object], data_sets: list[tuple[str, bytes]],
                rounds: int) -> float:
    """Best of five runs of ``rounds`` calls, in ms per call."""
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        for i in range(rounds):
            syntax, data = data_sets[i % len(data_sets)]
            fn(data, syntax)
        best = min(best, (time.perf_counter() - begin) / rounds * 1000)
    return best


def slow(data: bytes, syntax: str) -> object:
    return extract(read_header(data, syntax))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    web = _bench_module("web")
    run = web.bench
    small = [split_part10(raw) for raw in web.fresh_instances("parse", 20, 7)]
    ds = run._series_template("parse", 7, 0, 0, "1.2.3.4", "1.2.3.5", 512)
    web._pixels(ds, 512, 7)
    large = [split_part10(web.Template(ds).instance("1.2.3.4.5.6", 1))]
    ct_small = [split_part10(Path(get_testdata_file("CT_small.dcm")).read_bytes())]
    for name, data_sets in (("64x64 CT (fresh_instances)", small), ("512x512 CT", large),
                            ("pydicom's CT_small.dcm", ct_small)):
        for syntax, data in data_sets:
            fastparse.fast_parse(data, syntax)  # raises Declined if the fast path declines
            assert parse_header(data, syntax) == slow(data, syntax)
        before = ms_per_call(slow, data_sets, args.rounds)
        after = ms_per_call(parse_header, data_sets, args.rounds)
        print(f"{name}: extract(read_header()) {before:.3f} ms, parse_header() "
              f"{after:.3f} ms per instance ({before / after:.1f}x)")


if __name__ == "__main__":
    main()
