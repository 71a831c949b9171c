"""DICOMweb for a de-identified account against the same requests as stored (issue 18).

One minipacs (SQLite) with its web listener holds ``--studies`` studies of one synthetic
CT each and one series of ``--series-size`` CTs; the same requests are made anonymously
(as stored) and with the bearer token of a ``web.deidentify`` account, alternating, each
timed with httpx on loopback:

- QIDO-RS ``/studies?limit=N`` (every study);
- WADO-RS metadata of the big series;
- WADO-RS retrieve of the big series (``multipart/related``, each instance a Part 10 file).

The table: ``--table PATH``, the standard's ``part15.xml`` (the default,
tests/storage/data/part15-sample.xml, has 27 rows: the figures are then not the
standard's). The profile: ``retain_long_modified_dates`` and ``clean_descriptors``.

Usage::

    TCP_NODELAY=1 .venv/bin/python bench/deidentify_web.py [--table part15.xml]
        [--studies 200] [--series-size 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

from scp.__main__ import web_server  # noqa: E402
from scp.config import load_config  # noqa: E402
from scp.server import Server  # noqa: E402
from web.auth import hash_token, new_token  # noqa: E402

SAMPLE_TABLE = BENCH_DIR.parent / "tests" / "storage" / "data" / "part15-sample.xml"
SECRET = "a benchmark's secret of some length"
OPTIONS = ["retain_long_modified_dates", "clean_descriptors"]


def ct(study: str, series: str, n: int, patient: str) -> bytes:
    """A 512x512 16-bit CT, encoded (Explicit VR Little Endian, no File Meta)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = "20240105", "101500", "20240105"
    ds.AccessionNumber, ds.Modality, ds.Manufacturer = f"ACC{patient}", "CT", "ACME"
    ds.InstitutionName, ds.ReferringPhysicianName = "General Hospital", "Welby^Marcus"
    ds.StudyDescription, ds.SeriesDescription = "CT CHEST", "AXIAL 1.0"
    ds.PatientName, ds.PatientID = f"Doe^Patient{patient}", f"PID{patient}"
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "19600101", "O", "064Y"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, n
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, n], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = bytes(512 * 512 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def timed(client: httpx.Client, url: str, headers: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    answer = client.get(url, headers=headers)
    answer.raise_for_status()
    return time.perf_counter() - started, len(answer.content)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=SAMPLE_TABLE)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--series-size", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    token = new_token()
    with tempfile.TemporaryDirectory(prefix="minipacs-bench-") as tmp:
        config = load_config(None, {
            "ae.port": 0, "ae.bind": "127.0.0.1", "storage.data_dir": tmp,
            "web.port": 0, "web.bind": "127.0.0.1",
            "web.tokens": [f"research:read:{hash_token(token)}"],
            "web.deidentify": ["research:research"],
            "deidentify.table": str(args.table.resolve()), "deidentify.secret": SECRET,
            "profiles": [{"name": "research", "options": OPTIONS}]})
        server = Server(config)
        server.start()
        web = web_server(config, server.archive, server.audit)
        web.start()
        try:
            for n in range(args.studies):
                server.archive.store(ct(generate_uid(), generate_uid(), 1, str(n)),
                                     ExplicitVRLittleEndian)
            study, series = generate_uid(), generate_uid()
            for n in range(args.series_size):
                server.archive.store(ct(study, series, n + 1, "BIG"), ExplicitVRLittleEndian)
            report(web.url, token, study, series, args)
        finally:
            web.stop(grace=5)
            server.stop(grace=5)
    return 0


def report(url: str, token: str, study: str, series: str, args: argparse.Namespace) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    total = args.studies + 1
    with httpx.Client(timeout=600) as client:
        # the de-identified account learns the big series' UIDs from a search
        found = client.get(f"{url}/studies?PatientID=PIDBIG").json()
        assert found and found[0]["0020000D"]["Value"] == [study]
        [pseudo] = [s for s in client.get(f"{url}/studies?limit={total}", headers=bearer).json()
                    if s["00201208"]["Value"] == [args.series_size]]
        pseudo_study = pseudo["0020000D"]["Value"][0]
        pseudo_series = client.get(f"{url}/studies/{pseudo_study}/series",
                                   headers=bearer).json()[0]["0020000E"]["Value"][0]
        cases = {
            f"QIDO-RS /studies ({total} results)": (
                f"{url}/studies?limit={total}", f"{url}/studies?limit={total}"),
            f"metadata of a {args.series_size}-instance series": (
                f"{url}/studies/{study}/series/{series}/metadata",
                f"{url}/studies/{pseudo_study}/series/{pseudo_series}/metadata"),
            f"retrieve of a {args.series_size}-instance series (513 kB each)": (
                f"{url}/studies/{study}/series/{series}",
                f"{url}/studies/{pseudo_study}/series/{pseudo_series}"),
        }
        print(f"table {args.table.name}, {args.rounds} rounds, median (min) seconds")
        print("| request | as stored | de-identified | ratio |")
        print("|---|---|---|---|")
        for name, (plain_url, deid_url) in cases.items():
            plain, deid = [], []
            for _ in range(args.rounds):
                plain.append(timed(client, plain_url, {})[0])
                deid.append(timed(client, deid_url, bearer)[0])
            p, d = statistics.median(plain), statistics.median(deid)
            print(f"| {name} | {p:.3f} ({min(plain):.3f}) | {d:.3f} ({min(deid):.3f})"
                  f" | {d / p:.1f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
