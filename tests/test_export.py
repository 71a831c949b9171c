"""``minipacs export``: a File-set with a DICOMDIR, as stored or de-identified by a profile
(PS3.15 Annex E; the table is tests/storage/data/part15-sample.xml), through the installed
command, read back by pydicom and checked by DCMTK."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

from tests.factory import make_ds, save
from tests.test_cli import minipacs_command

SAMPLE = Path(__file__).parent / "storage" / "data" / "part15-sample.xml"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def study() -> list[Dataset]:
    """Three CT instances of Doe^John in two series, each with a private block and a
    description that names him, and an ultrasound image whose pixels may show him."""
    study_uid = generate_uid()
    series = [generate_uid(), generate_uid()]
    out = []
    for n in range(3):
        ds = make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=series[n % 2],
                     SeriesNumber=n % 2 + 1, InstanceNumber=n + 1, PatientID="PID-4711",
                     PatientName="Doe^John", StudyDescription="CT for John Doe",
                     StudyDate="20240102", BurnedInAnnotation="NO")
        block = ds.private_block(0x0029, "ACME 1.0", create=True)
        block.add_new(0x10, "LO", "Doe^John")
        out.append(ds)
    out.append(make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=generate_uid(),
                       SOPClassUID=US_IMAGE, Modality="US", PatientID="PID-4711",
                       PatientName="Doe^John", StudyDate="20240102", SeriesNumber=3,
                       InstanceNumber=1))
    return out


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Callable[..., subprocess.CompletedProcess[str]],
                                     list[Dataset], Path]:
    """A data folder holding :func:`study`, a config with profile ``research``, and a way
    to run ``minipacs`` commands with both."""
    datasets = study()
    for n, ds in enumerate(datasets):
        save(ds, tmp_path / "incoming" / f"{n}.dcm")
    config = tmp_path / "minipacs.yaml"
    config.write_text(yaml.safe_dump({
        "storage": {"data_dir": str(tmp_path / "data")},
        "deidentify": {"table": str(SAMPLE), "secret": "a site secret of some length"},
        "profiles": [{"name": "research",
                      "options": ["retain_long_modified_dates", "clean_descriptors"]}],
    }))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*minipacs_command(), *args, "--config", str(config)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    imported = run("import", str(tmp_path / "incoming"))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    return run, datasets, tmp_path


def file_set(folder: Path) -> list[Dataset]:
    """The instances of the File-set in ``folder``, as its DICOMDIR lists them."""
    fs = FileSet(dcmread(folder / "DICOMDIR"))
    return [instance.load() for instance in fs]


def test_export_de_identifies_and_withholds_burned_in_pixels(
        stored: tuple[Callable[..., subprocess.CompletedProcess[str]], list[Dataset], Path],
        dcmtk: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    run, datasets, tmp_path = stored
    study_uid = str(datasets[0].StudyInstanceUID)
    done = run("export", str(tmp_path / "out"), "--study", study_uid, "--deidentify", "research")
    assert done.returncode == 1, done.stdout + done.stderr  # one withheld
    assert "exported 3 of 4 instance(s)" in done.stdout
    assert "de-identified by profile research: 1 withheld, 0 failed" in done.stdout
    assert (f"withheld: {datasets[3].SOPInstanceUID}: Ultrasound Image Storage without Burned"
            " In Annotation (0028,0301) NO") in done.stdout

    exported = file_set(tmp_path / "out")
    assert len(exported) == 3
    originals = {str(ds.SOPInstanceUID) for ds in datasets}
    for ds in exported:
        assert str(ds.SOPInstanceUID).startswith("2.25.")
        assert str(ds.SOPInstanceUID) not in originals
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethod == "PS3.15 2099z E.1-1 research"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert not [e.tag for e in ds if e.tag.is_private]
        assert "Doe" not in str(ds.StudyDescription) and "John" not in str(ds.StudyDescription)
        assert ds.PixelData == datasets[0].PixelData
    assert len({str(ds.PatientID) for ds in exported}) == 1
    assert len({str(ds.StudyInstanceUID) for ds in exported}) == 1
    assert len({str(ds.SeriesInstanceUID) for ds in exported}) == 2
    assert len({str(ds.StudyDate) for ds in exported}) == 1
    assert exported[0].StudyDate != "20240102"
    for path in (tmp_path / "out").rglob("*"):  # nothing of him left in any byte
        if path.is_file():
            raw = path.read_bytes()
            assert b"Doe" not in raw and b"PID-4711" not in raw, path
            dcmtk("dcmftest", str(path))
    assert "DirectoryRecordSequence" in dcmtk("dcmdump", str(tmp_path / "out" / "DICOMDIR")).stdout

    # another run: the same pseudonym, UIDs and dates (the secret keys them, nothing else)
    again = run("export", str(tmp_path / "again"), "--study", study_uid, "--deidentify",
                "research")
    assert again.returncode == 1
    assert sorted((str(d.PatientID), str(d.SOPInstanceUID), str(d.StudyDate))
                  for d in file_set(tmp_path / "again")) == sorted(
        (str(d.PatientID), str(d.SOPInstanceUID), str(d.StudyDate)) for d in exported)

    # the audit trail says what left under which profile, by whom
    lines = [json.loads(line) for line in
             (tmp_path / "data" / "audit.jsonl").read_text().splitlines()]
    [first, _] = [line for line in lines if line["event"] == "export"]
    assert first["profile"] == "research"
    assert first["directory"] == str(tmp_path / "out")
    assert sorted(first["instances"]) == sorted(str(ds.SOPInstanceUID) for ds in datasets[:3])
    assert first["withheld"] == [str(datasets[3].SOPInstanceUID)]
    assert first["user"] and first["via"] == "minipacs export"

    # the originals did not change
    checked = run("verify")
    assert checked.returncode == 0 and "0 problem(s)" in checked.stdout, checked.stdout


def test_export_as_stored_keeps_the_instances(
        stored: tuple[Callable[..., subprocess.CompletedProcess[str]], list[Dataset], Path]
) -> None:
    run, datasets, tmp_path = stored
    done = run("export", str(tmp_path / "out"), "--patient", "PID-4711")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exported 4 of 4 instance(s)" in done.stdout
    exported = {str(ds.SOPInstanceUID): ds for ds in file_set(tmp_path / "out")}
    assert set(exported) == {str(ds.SOPInstanceUID) for ds in datasets}
    for ds in datasets:
        assert exported[str(ds.SOPInstanceUID)].PatientName == "Doe^John"
        assert exported[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--study", "1.2.3", "--deidentify", "nobody"), 2, "no profile 'nobody' in profiles"),
    ((), 2, "export needs --patient"),
    (("--study", "1.2.3"), 1, "nothing selected is stored"),
])
def test_export_refuses_what_it_cannot_do(
        stored: tuple[Callable[..., subprocess.CompletedProcess[str]], list[Dataset], Path],
        args: tuple[str, ...], code: int, message: str) -> None:
    run, _, tmp_path = stored
    done = run("export", str(tmp_path / "out"), *args)
    assert done.returncode == code
    assert message in done.stdout + done.stderr


def test_export_into_a_folder_that_holds_files_is_refused(
        stored: tuple[Callable[..., subprocess.CompletedProcess[str]], list[Dataset], Path]
) -> None:
    run, _, tmp_path = stored
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    done = run("export", str(tmp_path / "out"), "--patient", "PID-4711")
    assert done.returncode == 1
    assert "is not an empty folder" in done.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_instance_that_cannot_be_de_identified_fails_alone(
        stored: tuple[Callable[..., subprocess.CompletedProcess[str]], list[Dataset], Path]
) -> None:
    """A big endian instance (the retired Explicit VR Big Endian) is listed as not
    exported; the others are written and audited."""
    from pydicom.data import get_testdata_file

    run, datasets, tmp_path = stored
    big = dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    big.BurnedInAnnotation = "NO"
    save(big, tmp_path / "big" / "big.dcm")
    assert run("import", str(tmp_path / "big")).returncode == 0
    done = run("export", str(tmp_path / "out"), "--patient", "PID-4711", "--patient",
               str(big.PatientID), "--deidentify", "research")
    assert done.returncode == 1
    assert "exported 3 of 5 instance(s)" in done.stdout, done.stdout + done.stderr
    assert (f"not exported: {big.SOPInstanceUID}: cannot de-identify a big endian data set"
            in done.stdout)
    assert len(file_set(tmp_path / "out")) == 3
