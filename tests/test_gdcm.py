"""GDCM's ``gdcmscu`` (Debian package ``libgdcm-tools``) against minipacs: echo, store, find
at every level of both models, and move.

Two things about gdcmscu shape these tests:

- It reads a C-FIND response as one P-DATA-TF PDU for the command and the *next* PDU for the
  identifier (``ULConnectionManager::RunEventLoop``). minipacs once packed both PDVs in one PDU
  (PS3.8 allows it): gdcmscu then paired each response with the next one and waited for a
  last response that never came, until minipacs aborted at ``ae.network_timeout`` (issue 13).
- GDCM 3.0.21 (Debian 12) throws ``ProtocolStream as nullptr is invalid`` and aborts right
  after every A-RELEASE-RP it receives, against any SCP (DCMTK's storescp and a plain
  pynetdicom SCP alike), and prints C-FIND results only after the release: so it never
  prints them. The tests read its ``-D`` trace instead, where every PDU it received is
  logged as it comes, and accept that abort only after a release it received.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from scp.status import PENDING, SUCCESS
from tests.conftest import Running, reserved_port, unavailable
from tests.factory import hierarchy, save
from tests.test_hostile import index_rows

GDCM_ABORT_AFTER_RELEASE = "ProtocolStream as nullptr is invalid"
_RECEIVED = re.compile(r"Received ItemType #(\d+)")
_STATUS = re.compile(r"\(0000,0900\) \?\? \(US\) (\d+)")
P_DATA_TF, A_RELEASE_RP = 4, 6


Gdcmscu = Callable[..., "Trace"]


class Trace:
    """What one gdcmscu run received, read from its ``-D`` trace."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        self.text = proc.stdout  # the -D trace (stderr) and the rest, in order
        self.pdus: list[int] = []
        self.statuses: list[int] = []  # the Status of each DIMSE response, in order
        status_of_pdu: int | None = None
        for line in self.text.splitlines():
            received = _RECEIVED.search(line)
            if received:
                self.pdus.append(int(received.group(1)))
                status_of_pdu = None
                continue
            status = _STATUS.search(line)
            # gdcmscu prints a response's command twice (the PDU, then the command set)
            if status and status_of_pdu is None and self.pdus and self.pdus[-1] == P_DATA_TF:
                status_of_pdu = int(status.group(1))
                self.statuses.append(status_of_pdu)

    def assert_released(self) -> None:
        """The association ended with an A-RELEASE-RP; gdcmscu exited 0, or aborted in
        GDCM's own release bug (module docstring) and in nothing else."""
        assert self.pdus and self.pdus[-1] == A_RELEASE_RP, (
            f"gdcmscu did not receive an A-RELEASE-RP last (PDUs {self.pdus})\n{self.tail()}")
        code = self.proc.returncode
        assert code == 0 or (code == -signal.SIGABRT and GDCM_ABORT_AFTER_RELEASE in self.text), (
            f"gdcmscu exited {code}\n{self.tail()}")

    def matches(self) -> int:
        """The number of C-FIND matches: Pending responses then one Success, nothing else."""
        assert self.statuses and self.statuses[-1] == SUCCESS, (
            f"no final Success (statuses {self.statuses})\n{self.tail()}")
        assert set(self.statuses[:-1]) <= {PENDING}, self.statuses
        self.assert_released()
        return len(self.statuses) - 1

    def tail(self) -> str:
        return "\n".join(line for line in self.text.splitlines()[-40:] if line.strip())


@pytest.fixture
def gdcmscu() -> Gdcmscu:
    """Run gdcmscu with its debug trace: ``gdcmscu(running, "--find", ...)``.

    Without it the test is skipped, or fails with a clear message when ``CI`` is set.
    """
    tool = shutil.which("gdcmscu")
    if tool is None:
        unavailable("GDCM's gdcmscu is not installed: install the Debian package "
                    "'libgdcm-tools' (make test does it when run as root)")

    def run(running: Running, *args: str, files: tuple[str, ...] = ()) -> Trace:
        try:
            proc = subprocess.run(  # files come after the port (gdcmscu's usage)
                [tool, "-D", "--call", running.ae_title, *args, "127.0.0.1", str(running.port),
                 *files], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=60)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(
                exc.stdout, bytes) else (exc.stdout or "")
            raise AssertionError(f"gdcmscu {' '.join(args)} hung\n{out[-3000:]}") from None
        return Trace(proc)

    return run


@pytest.fixture
def stored(start_server: Callable[..., Running], tmp_path: Path,
           gdcmscu: Gdcmscu) -> tuple[Running, list[Dataset], int]:
    """A server holding tests/factory.hierarchy, sent by ``gdcmscu --store``; the port of
    gdcmscu's own Storage SCP for C-MOVE is a known peer, GDCMSCU."""
    # held while the server starts, or its own port 0 could be this one: its C-MOVE would
    # then go to itself, and gdcmscu could not bind its Storage SCP
    with reserved_port() as scp_port:
        # a short network timeout: a client that waits for a response we never send shows
        # up as a broken trace well inside the subprocess timeout
        running = start_server(**{
            "ae.network_timeout": 15,
            "peers": [{"ae_title": "GDCMSCU", "host": "127.0.0.1", "port": scp_port}],
        })
    datasets = hierarchy()
    folder = tmp_path / "to-send"
    folder.mkdir()
    for n, ds in enumerate(datasets):
        save(ds, folder / f"{n:03}.dcm")
    trace = gdcmscu(running, "--store", "-r", files=(str(folder),))
    trace.assert_released()
    return running, datasets, scp_port


def test_echo(server: Running, gdcmscu: Gdcmscu) -> None:
    trace = gdcmscu(server, "--echo")
    assert trace.statuses == [SUCCESS]
    trace.assert_released()


def test_store_keeps_every_instance(stored: tuple[Running, list[Dataset], int]) -> None:
    running, datasets, _ = stored
    uids = {uid for (uid,) in index_rows(running, "SELECT sop_instance_uid FROM instance")}
    assert uids == {ds.SOPInstanceUID for ds in datasets}


def _study(datasets: list[Dataset], n: int) -> tuple[str, str, int, int]:
    """The n-th study of the hierarchy: its UID, its first series' UID, its number of
    series and that series' number of instances."""
    studies = list(dict.fromkeys(ds.StudyInstanceUID for ds in datasets))
    in_study = [ds for ds in datasets if ds.StudyInstanceUID == studies[n]]
    series = list(dict.fromkeys(ds.SeriesInstanceUID for ds in in_study))
    first = [ds for ds in in_study if ds.SeriesInstanceUID == series[0]]
    return studies[n], series[0], len(series), len(first)


def test_find_at_every_level_of_both_models(
        stored: tuple[Running, list[Dataset], int], gdcmscu: Gdcmscu) -> None:
    running, datasets, _ = stored
    study, series, n_series, n_images = _study(datasets, 0)  # PID1's first study
    patients = len({ds.PatientID for ds in datasets})
    studies = len({ds.StudyInstanceUID for ds in datasets})
    cases = [
        (["--patientroot", "--patient", "--key", "0010,0020=", "--key", "0020,1200="],
         patients),
        (["--patientroot", "--patient", "--key", "0010,0020=PID1"], 1),
        (["--patientroot", "--study", "--key", "0010,0020=PID1", "--key", "0020,000d="], 2),
        (["--patientroot", "--series", "--key", "0010,0020=PID1",
          "--key", f"0020,000d={study}", "--key", "0020,000e="], n_series),
        (["--patientroot", "--image", "--key", "0010,0020=PID1", "--key", f"0020,000d={study}",
          "--key", f"0020,000e={series}", "--key", "0008,0018="], n_images),
        (["--studyroot", "--study", "--key", "0020,000d=", "--key", "0020,1208="], studies),
        (["--studyroot", "--study", "--key", "0010,0010=Doe*", "--key", "0020,000d="], 2),
        (["--studyroot", "--series", "--key", f"0020,000d={study}", "--key", "0020,000e=",
          "--key", "0008,0060="], n_series),
        (["--studyroot", "--image", "--key", f"0020,000d={study}",
          "--key", f"0020,000e={series}", "--key", "0008,0018="], n_images),
    ]
    for args, expected in cases:
        trace = gdcmscu(running, "--find", *args)
        assert trace.matches() == expected, (args, trace.tail())


def test_move_a_study_to_gdcmscu(stored: tuple[Running, list[Dataset], int],
                                 gdcmscu: Gdcmscu, tmp_path: Path) -> None:
    running, datasets, scp_port = stored
    study = _study(datasets, 2)[0]  # PID2's study: three series
    out = tmp_path / "moved"
    out.mkdir()
    trace = gdcmscu(running, "--move", "--aetitle", "GDCMSCU", "--port-scp", str(scp_port),
                    "-o", str(out), "--studyroot", "--study", "--key", f"0020,000d={study}")
    trace.assert_released()
    received = {str(dcmread(path).SOPInstanceUID) for path in out.rglob("*") if path.is_file()}
    assert received == {ds.SOPInstanceUID for ds in datasets if ds.StudyInstanceUID == study}
