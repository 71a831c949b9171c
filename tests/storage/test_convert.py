"""Retrieve-side reads: an instance read back for sending re-encodes to exactly the stored
bytes (whatever pynetdicom reads of it), and is converted only when the receiver did not
accept its stored transfer syntax."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from pynetdicom.dsutils import encode as pynetdicom_encode

from storage import Archive, CannotConvert, convert
from storage.convert import to_accepted
from storage.index import StoredInstance
from storage.models import Instance
from tests.factory import encode, file_parts, make_ds


@pytest.fixture
def archive(new_archive: Archive) -> Archive:
    return new_archive


def item(uid: str) -> StoredInstance:
    row = Instance.get(Instance.sop_instance_uid == uid)
    return StoredInstance(row.sop_class_uid, row.sop_instance_uid, row.transfer_syntax_uid,
                          row.file_key, row.file_size)


def sent_bytes(ds: Dataset, syntax: str) -> bytes:
    """What pynetdicom puts on the wire for ``ds`` in ``syntax``, after reading the UIDs
    it reads in send_c_store."""
    assert ds.SOPClassUID and ds.SOPInstanceUID
    ts = ds.file_meta.TransferSyntaxUID
    assert str(ts) == syntax
    out = pynetdicom_encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    assert out is not None
    return out


@pytest.mark.parametrize("case", ["un-vrs", "implicit", "big-endian", "sequence",
                                  "compressed", "space-padded-uid"])
def test_read_back_for_sending_gives_the_stored_bytes(archive: Archive, case: str) -> None:
    if case == "un-vrs":  # a file whose known elements are stored with VR UN
        raw, syntax = file_parts(get_testdata_file("rtdose_rle.dcm"))
    elif case == "compressed":
        raw, syntax = file_parts(get_testdata_file("JPEG2000.dcm"))
    elif case == "implicit":
        syntax = ImplicitVRLittleEndian
        raw = encode(make_ds(), syntax)
    elif case == "big-endian":
        syntax = ExplicitVRBigEndian
        raw = encode(make_ds(Rows=2, Columns=2, BitsAllocated=16, BitsStored=16, HighBit=15,
                             PixelData=b"\x01\x02\x03\x04\x05\x06\x07\x08"), syntax)
    elif case == "sequence":
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-1", "SRT", "odd"
        syntax = ExplicitVRLittleEndian
        raw = encode(make_ds(ProcedureCodeSequence=[inner]), syntax)
    else:
        syntax = ExplicitVRLittleEndian
        ds = make_ds(SOPInstanceUID="1.2.826.0.1.3680043.8.498.123")  # odd length
        raw = encode(ds, syntax)
        nul = b"1.2.826.0.1.3680043.8.498.123\x00"
        assert raw.count(nul) == 1
        raw = raw.replace(nul, b"1.2.826.0.1.3680043.8.498.123 ")  # padded with a space
    outcome = archive.store(raw, str(syntax))
    ds = archive.read_instance(item(outcome.sop_instance_uid), [str(syntax)])
    assert sent_bytes(ds, str(syntax)) == raw


def test_compressed_to_an_uncompressed_receiver_is_decoded(archive: Archive) -> None:
    original = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, YBR
    raw, syntax = file_parts(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    archive.store(raw, syntax)
    ds = archive.read_instance(item(original.SOPInstanceUID), [ImplicitVRLittleEndian])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # pynetdicom goes implicit
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, original.pixel_array)


@pytest.mark.parametrize(("stored", "accepted"), [
    (ExplicitVRLittleEndian, [ImplicitVRLittleEndian]),  # pynetdicom re-encodes it
    (ImplicitVRLittleEndian, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
])
def test_native_little_endian_is_never_touched(archive: Archive, stored: str,
                                               accepted: list[str]) -> None:
    ds = make_ds()
    archive.store(encode(ds, stored), stored)
    got = archive.read_instance(item(ds.SOPInstanceUID), accepted)
    assert str(got.file_meta.TransferSyntaxUID) == stored


@pytest.mark.parametrize(("name", "accepted", "message"), [
    ("JPEG2000.dcm", [RLELossless], "we do not compress into another syntax"),
    ("JPEG2000.dcm", [], "accepted nothing"),
    (None, [ExplicitVRLittleEndian], "Big Endian"),
    (None, [JPEG2000Lossless], "we do not compress"),
])
def test_impossible_conversions_are_clear_errors(archive: Archive, name: str | None,
                                                 accepted: list[str], message: str) -> None:
    if name is None:
        ds = make_ds()
        archive.store(encode(ds, ExplicitVRBigEndian), ExplicitVRBigEndian)
        uid = ds.SOPInstanceUID
    else:
        raw, syntax = file_parts(get_testdata_file(name))
        archive.store(raw, syntax)
        uid = dcmread(get_testdata_file(name)).SOPInstanceUID
    with pytest.raises(CannotConvert, match=message):
        archive.read_instance(item(uid), accepted)


def test_a_j2k_file_pydicom_cannot_decode_in_place(archive: Archive) -> None:
    """pydicom 3.0.2's decompress() raises "output array is read-only" on this file: its
    codestream is unsigned, Pixel Representation says signed, and pydicom's sign
    correction writes into the immutable bytes GDCM returned. Decoded frame by frame it
    converts, with the corrected (negative) values."""
    path = get_testdata_file("J2K_pixelrep_mismatch.dcm")
    original = dcmread(path)
    raw, syntax = file_parts(path)
    archive.store(raw, syntax)
    ds = archive.read_instance(item(original.SOPInstanceUID), [ImplicitVRLittleEndian])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelRepresentation == 1
    assert np.array_equal(ds.pixel_array, original.pixel_array)
    assert ds.pixel_array.min() == -2000


def _j2k(pixel_data: bytes | None = None) -> Dataset:
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    if pixel_data is not None:
        ds.PixelData = encapsulate([pixel_data])
    return ds


@pytest.fixture
def quiet_decoders() -> None:
    """What the server installs when it starts (scp/server.py)."""
    convert.install_log_filters()


def test_a_decoder_failure_says_why_on_one_line(caplog: pytest.LogCaptureFixture,
                                                quiet_decoders: None) -> None:
    """Not a guess about the codecs extra: each plugin's reason, on one line, and none of
    pydicom's per-plugin tracebacks in the log (its decoders logger is at WARNING, as
    pydicom sets it)."""
    with caplog.at_level(logging.DEBUG), pytest.raises(CannotConvert) as info:
        to_accepted(_j2k(b"not a JPEG 2000 codestream" * 4), [ImplicitVRLittleEndian])
    message = str(info.value)
    assert message.startswith(
        "cannot convert from JPEG 2000 Image Compression to Implicit VR Little Endian: the"
        " decoder failed: Unable to decode as exceptions were raised by all available"
        " plugins: ")
    assert "pylibjpeg: No matching JPEG 2000 format found" in message
    assert "\n" not in message and "installed?" not in message
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_decoder_tracebacks_are_kept_at_debug(caplog: pytest.LogCaptureFixture,
                                              quiet_decoders: None) -> None:
    """pydicom's per-plugin tracebacks, logged at ERROR while we decode, are there at DEBUG
    when its decoders logger is enabled for DEBUG (``logging.level: DEBUG``), and at no
    higher level."""
    with caplog.at_level(logging.DEBUG, logger=convert.DECODERS_LOGGER), pytest.raises(
            CannotConvert):
        to_accepted(_j2k(b"not a JPEG 2000 codestream" * 4), [ImplicitVRLittleEndian])
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) >= 2, caplog.text  # GDCM, pylibjpeg (and Pillow when present)
    assert {(r.name, r.levelno, r.levelname) for r in tracebacks} == {
        (convert.DECODERS_LOGGER, logging.DEBUG, "DEBUG")}
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG], caplog.text


def test_tracebacks_of_decoding_for_others_pass(caplog: pytest.LogCaptureFixture,
                                                quiet_decoders: None) -> None:
    """pydicom decoding outside a conversion of ours logs its plugins' tracebacks at ERROR
    as it always did: the filter touches only ours."""
    ds = _j2k(b"not a JPEG 2000 codestream" * 4)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="all available"):
        ds.decompress(generate_instance_uid=False)
    assert [r.levelno for r in caplog.records if r.exc_info][:1] == [logging.ERROR]


def test_no_decoder_available_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg-openjpeg"]

    monkeypatch.setattr(convert, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(CannotConvert, match=(
            r"cannot convert from JPEG 2000 Image Compression to Explicit VR Little Endian:"
            r" no decoder available for JPEG 2000 Image Compression \(the codecs extra"
            r" installs them; missing: pylibjpeg - requires pylibjpeg-openjpeg\)")):
        to_accepted(_j2k(), [ExplicitVRLittleEndian])


def test_a_syntax_pydicom_cannot_decode_says_so() -> None:
    ds = _j2k()
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(CannotConvert, match="pydicom has no decoder for MPEG2 Main Profile"):
        to_accepted(ds, [ExplicitVRLittleEndian])


def _explicit_native_files() -> list[str]:
    """pydicom's own test files (those installed with it: nothing is downloaded) in
    Explicit VR Little Endian."""
    from pathlib import Path

    folder = Path(get_testdata_file("CT_small.dcm")).parent
    found = []
    for path in sorted(str(p) for p in folder.glob("*.dcm")):
        try:
            ds = dcmread(path, stop_before_pixels=False)
        except Exception:
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax == ExplicitVRLittleEndian:
            found.append(path)
    return found


def test_explicit_to_implicit_keeps_every_value() -> None:
    """Every Explicit VR Little Endian file pydicom ships (sequences with defined and
    undefined lengths, private elements, pixel data): the bytes made by
    explicit_to_implicit, read back as Implicit VR, are the same data set, and pydicom
    writes them as it writes the original."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    from storage.convert import explicit_to_implicit
    from tests.factory import file_parts

    files = [f for f in _explicit_native_files() if "truncated" not in f]
    assert len(files) >= 14
    for path in files:
        data, _ = file_parts(path)
        ours = explicit_to_implicit(data)
        original = read_dataset(DicomBytesIO(data), is_implicit_VR=False, is_little_endian=True)
        again = read_dataset(DicomBytesIO(ours), is_implicit_VR=True, is_little_endian=True)
        assert pynetdicom_encode(again, True, True) == pynetdicom_encode(original, True, True), path


@pytest.mark.parametrize("bad", [
    b"\x08\x00\x16\x00", b"\x08\x00\x16\x00ui\x02\x001\x00",
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",  # encapsulated
    b"\x08\x00\x16\x00UI\x08\x001.2",  # runs past the end
    file_parts(get_testdata_file("MR_truncated.dcm"))[0],  # pixel data cut short
    b"\x08\x00\x16\x00XX\x02\x00ab",  # not a VR
    b"\xfe\xff\x00\xe0\x00\x00\x00\x00",  # an item outside any sequence
    # an element straight inside a sequence of undefined length, not in an item
    b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\x08\x00\x16\x00UI\x02\x001\x00"
    b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",
])
def test_explicit_to_implicit_refuses_what_it_cannot_carry(bad: bytes) -> None:
    """Bytes that are not a valid data set, or hold what Implicit VR cannot carry."""
    from storage.convert import explicit_to_implicit

    with pytest.raises(CannotConvert):
        explicit_to_implicit(bad)


def test_explicit_to_implicit_leaves_group_lengths_out() -> None:
    """A group length counts explicit headers, which shrink: it is left out (retired)."""
    from storage.convert import explicit_to_implicit

    sequence = (b"\x08\x00\x15\x11SQ\x00\x00\x10\x00\x00\x00"  # (0008,1115), 16 bytes
                b"\xfe\xff\x00\xe0\x08\x00\x00\x00"  # an item of 8 bytes
                b"\x08\x00\x50\x11UI\x00\x00")  # (0008,1150), empty
    data = b"\x08\x00\x00\x00UL\x04\x00" + len(sequence).to_bytes(4, "little") + sequence
    assert explicit_to_implicit(data) == (
        b"\x08\x00\x15\x11\x10\x00\x00\x00"
        b"\xfe\xff\x00\xe0\x08\x00\x00\x00"
        b"\x08\x00\x50\x11\x00\x00\x00\x00")
