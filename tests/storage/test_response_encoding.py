"""``encode_response`` writes exactly the bytes pydicom writes for ``build_response``.

The C-FIND SCP sends :func:`storage.query.encode_response`'s bytes (packed by hand where a
value is plain ASCII text, pydicom's writer for the rest); every other front end uses
:func:`storage.query.build_response`'s data set. These tests pin the two together, over
stored data sets with several character sets and sequences, and over arbitrary values.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom.dsutils import encode

from storage import Archive, Model
from storage.keys import KEYS
from storage.query import (
    _ASCII_VRS,
    _Out,
    _pydicom_element,
    build_response,
    encode_response,
    select_rows,
)
from tests.factory import encode as encode_instance
from tests.factory import hierarchy, make_ds, uid


def _charset_instances() -> list[Dataset]:
    out = []
    for name in sorted(get_charset_files("chr*.dcm")):
        ds = dcmread(name)
        if "PatientName" not in ds:
            continue
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(ds, keyword, uid())
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.PatientID = uid()[-12:]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _odd_instances() -> list[Dataset]:
    code = Dataset()
    code.CodeValue = "A1"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Ärger mit Code"
    ascii_code = Dataset()
    ascii_code.CodeValue = "B22"
    ascii_code.CodingSchemeDesignator = "99X"
    ascii_code.CodeMeaning = "plain"
    return [
        make_ds(ProcedureCodeSequence=Sequence([code, ascii_code]),
                OtherPatientIDs=["X1", "Y22", ""], PatientWeight=72.5, PatientAge="042Y",
                StudyDescription="a" * 63, PatientComments="line1\r\nline2 é",
                AdditionalPatientHistory="x" * 11),
        make_ds(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう",
                SpecificCharacterSet="ISO_IR 192", ReferringPhysicianName="=Dr^Who"),
        make_ds(PatientName="", StudyDate=None, StudyTime=None, AccessionNumber=None),
    ]


@pytest.fixture
def stored(new_archive: Archive) -> Archive:
    for ds in [*hierarchy(), *_charset_instances(), *_odd_instances()]:
        new_archive.store(encode_instance(ds), ExplicitVRLittleEndian)
    return new_archive


def _keys_at(level: str) -> list[str]:
    order = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
    return [kw for kw, key in KEYS.items() if order.index(key.level.name) <= order.index(level)]


def _identifier(level: str, charset: Any, extra: dict[str, Any]) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword in _keys_at(level):
        setattr(ds, keyword, "" if keyword not in ("ProcedureCodeSequence",) else [])
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PatientComments = ""
    ds.OtherPatientIDs = ""
    ds.PatientWeight = ""
    ds.PatientAge = ""
    ds.ProcedureCodeSequence = [Dataset()]
    ds.add_new(0x00091010, "LO", "")  # a private key: matched universally, returned empty
    ds.add_new(0x00720082, "SV", None)  # 64-bit VRs: a 4-byte length in Explicit VR
    ds.add_new(0x0008040C, "UV", None)
    ds.add_new(0x00080000, "UL", None)  # a retired group length: never written
    return ds


@pytest.mark.parametrize("charset", [None, "ISO_IR 100", "ISO_IR 192",
                                     ["", "ISO 2022 IR 87"], "GB18030"])
@pytest.mark.parametrize("response_charset", ["auto", "ISO_IR 192"])
@pytest.mark.parametrize("level", ["STUDY", "SERIES", "IMAGE"])
def test_encoded_responses_are_pydicoms_bytes(
    stored: Archive, charset: Any, response_charset: str, level: str
) -> None:
    parsed = stored.parse_query(_identifier(level, charset, {}), Model.PATIENT_ROOT,
                                relational=True)
    compared = 0
    for row in select_rows(parsed):
        for implicit in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = encode(build_response(parsed, row, response_charset, "MINIPACS"),
                                  implicit, True)
                got = encode_response(parsed, row, response_charset, "MINIPACS",
                                      implicit_vr=implicit)
            assert got == expected, (level, implicit, row.rows[parsed.level].id)
            compared += 1
    assert compared >= 2 * 8  # every study (or more) of the corpus was compared


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)),
                max_size=12)
_ascii = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=12)
_pn = st.fixed_dictionaries({}, optional={g: st.one_of(_ascii, _text) for g in
                                          ("Alphabetic", "Ideographic", "Phonetic")})


@st.composite
def _elements(draw: Any) -> tuple[str, list[Any] | None]:
    vr = draw(st.sampled_from(sorted(_ASCII_VRS | {"DS", "US", "SQ", "SV", "UV", "OB"})))
    if draw(st.booleans()) and vr != "SQ":
        return vr, None
    if vr == "PN":
        return vr, draw(st.lists(_pn, min_size=1, max_size=3))
    if vr == "IS":
        return vr, draw(st.lists(st.one_of(st.integers(-2**31, 2**31 - 1), _ascii),
                                 min_size=1, max_size=3))
    if vr in ("US", "UV"):
        return vr, draw(st.lists(st.integers(0, 65535), min_size=1, max_size=3))
    if vr == "SV":
        return vr, draw(st.lists(st.integers(-2**40, 2**40), min_size=1, max_size=3))
    if vr == "OB":
        return vr, None
    if vr == "DS":
        return vr, draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1,
                                 max_size=2))
    if vr == "SQ":
        return vr, [{"00080100": {"vr": "SH", "Value": [draw(_ascii)]}}]
    return vr, draw(st.lists(st.one_of(_ascii, _text), min_size=1, max_size=3))


@settings(max_examples=400, deadline=None)
@given(element=_elements(), implicit=st.booleans(),
       charset=st.sampled_from(["", "ISO_IR 100", "ISO_IR 192", "GB18030"]))
def test_each_element_is_pydicoms_bytes(
    element: tuple[str, list[Any] | None], implicit: bool, charset: str
) -> None:
    vr, value = element
    out = _Out(0x00091010 if vr != "SQ" else 0x00081032, vr, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = _pydicom_element(out.data_element(), implicit, charset)
        except Exception:  # pydicom refuses the value: not a value a response can hold
            return
        assert out.encode(implicit, charset) == expected
