"""C-STORE data sets that pynetdicom spools to a file (scp/engine/reactor.py): the spool
holds the data set alone, and the handler hands it to storage as it is (a
``storage.Spooled`` of the whole file), without a File Meta group written only to be read
back: stored byte for byte, and no spool file left behind."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from scp import status
from scp.engine import reactor
from storage import Spooled
from tests.conftest import STORE_LOCKS, Running, associate, client_ae, record_returns
from tests.factory import file_parts, make_ds, save


def _stored(running: Running) -> list[bytes]:
    files = running.data_dir / "files"
    return [file_parts(p)[0] for p in files.rglob("*") if p.is_file() and p.name not in STORE_LOCKS]


def test_the_spool_holds_the_data_set_alone() -> None:
    """What dimse_messages.py ``decode_msg`` writes (a preamble and a prefix, then
    write_file_meta_info, then every fragment of the data set), with the engine's
    replacement of write_file_meta_info in between: the data set only."""
    with tempfile.NamedTemporaryFile(mode="wb", suffix=".spool", delete=False) as fp:
        fp.write(b"\x00" * 128)
        fp.write(b"DICM")
        reactor._start_spool(fp, reactor._no_file_meta(
            sop_class_uid="1.2", sop_instance_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2"))
        fp.write(b"\x08\x00\x16\x00")
        fp.file.flush()
        fp.write(b"\x02\x00\x00\x001.")
        fp.file.flush()
    path = Path(fp.name)
    try:
        assert path.read_bytes() == b"\x08\x00\x16\x00\x02\x00\x00\x001."
    finally:
        path.unlink()


@pytest.mark.parametrize(("rows", "fast_receiver"), [
    (1600, True),  # 5 MB: beyond what scp/engine/receiver.py keeps in memory
    (64, False),  # small, and spooled because the fast receiver is off (as over TLS)
])
def test_a_spooled_c_store_is_stored_byte_for_byte(
        start_server: Callable[..., Running], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, rows: int, fast_receiver: bool) -> None:
    monkeypatch.setattr(reactor, "RECEIVE_C_STORE", fast_receiver)
    handed: list[Spooled | None] = record_returns(monkeypatch, reactor, "spooled")
    running = start_server()
    ds = make_ds(Rows=rows, Columns=rows, BitsAllocated=16, BitsStored=16, HighBit=15,
                 PixelData=bytes(range(256)) * (rows * rows * 2 // 256))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = save(ds, tmp_path / "in.dcm")
    sent, _ = file_parts(path)

    ae = client_ae(storage=False)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = associate(running, ae)
    rsp = assoc.send_c_store(path)  # the file's data set, as it is
    assoc.release()

    assert rsp.Status == status.SUCCESS
    [given] = handed
    assert given is not None  # spooled by pynetdicom, not read by the fast receiver
    assert (given.offset, given.length) == (0, len(sent))
    assert _stored(running) == [sent]
    assert not given.path.exists()  # pynetdicom removed it once the handler returned
