"""The ``Accept`` header and what WADO-RS can answer to it (PS3.18 8.7: media types).

:func:`ranges` parses the header (or the ``accept`` query parameter, PS3.18 8.3.3.1) into
media ranges best first: several ranges with q-values, ``*/*`` and ``type/*``, and the
``type=`` and ``transfer-syntax=`` parameters of ``multipart/related`` quoted or not (OHIF
sends both forms). Each resource then asks for what it serves: :func:`instance_syntaxes`
(``application/dicom`` parts), :func:`pixel_choice` (frames and pixel data),
:func:`require_octet_stream` (other bulk data), :func:`require_json` (metadata) and
:func:`rendered_type` (rendered images); each raises a 406 with a reason when no range
fits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRLittleEndian
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from storage import ANY_SYNTAX, DEFAULT_SYNTAX, syntax_for

from .errors import NOT_ACCEPTABLE, WebError

MULTIPART = "multipart/related"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
DICOM_JSON = "application/dicom+json"
JSON = "application/json"
JPEG = "image/jpeg"
PNG = "image/png"

PIXEL_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": JPEG,
    "1.2.840.10008.1.2.4.51": JPEG,
    "1.2.840.10008.1.2.4.57": JPEG,
    "1.2.840.10008.1.2.4.70": JPEG,
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
"""The media type of a compressed frame in each image transfer syntax (PS3.18 Table
8.7.3-5); frames of the video syntaxes (a single stream) are not served one by one."""

_COMMA_OUTSIDE_QUOTES = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')
_MEDIA_RANGE = re.compile(r"^([a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+*-]+|\*/\*)$")


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header: ``type/subtype`` in lower case, its parameters
    (names in lower case, values unquoted, ``q`` taken out) and its quality."""

    media_type: str
    params: dict[str, str]
    q: float

    def part_type(self, default: str) -> str:
        """The media type of the parts this range accepts: ``type=`` of a multipart range
        (``default`` when absent), ``*/*`` for ``multipart/*`` and ``*/*``, else the range
        itself."""
        if self.media_type == MULTIPART:
            return self.params.get("type", default).lower()
        if self.media_type in ("multipart/*", "*/*"):
            return "*/*"
        return self.media_type

    @property
    def syntax(self) -> str:
        """Its ``transfer-syntax`` parameter (:data:`~storage.DEFAULT_SYNTAX` when absent)."""
        return self.params.get("transfer-syntax", DEFAULT_SYNTAX).strip()


def matches(pattern: str, media_type: str) -> bool:
    """Whether ``pattern`` (``*/*``, ``image/*`` or a media type) covers ``media_type``."""
    if pattern in ("*/*", media_type):
        return True
    kind, _, sub = pattern.partition("/")
    return sub == "*" and media_type.startswith(kind + "/")


def parse(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (RFC 9110 12.5.1: higher q first,
    the header's order among equals); ranges with q=0, and ranges that are not media
    ranges, are left out."""
    out: list[MediaRange] = []
    for text in _COMMA_OUTSIDE_QUOTES.split(header):
        if not text.strip() or not text.isascii():  # media ranges are ASCII (RFC 9110)
            continue
        kind, raw = parse_options_header(text.strip())
        media_type = kind.decode("latin-1").strip().lower()
        if not _MEDIA_RANGE.match(media_type):
            continue
        params = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw.items()}
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            continue
        if q > 0:
            out.append(MediaRange(media_type, params, min(q, 1.0)))
    out.sort(key=lambda r: -r.q)
    return out


def ranges(request: Request) -> list[MediaRange]:
    """What the client accepts: the ``accept`` query parameter when given (PS3.18
    8.3.3.1), else the Accept header; nothing said means ``*/*``."""
    header = request.query_params.get("accept") or request.headers.get("accept", "")
    return parse(header) if header.strip() else parse("*/*")


def _refuse(what: str, accepted: list[MediaRange]) -> WebError:
    """406 (PS3.18 10.4.3: none of the Acceptable Media Types is supported)."""
    said = ", ".join(_text(r) for r in accepted) or "nothing"
    return WebError(NOT_ACCEPTABLE, f"cannot send {what} as any of: {said}")


def _text(media: MediaRange) -> str:
    params = "".join(f"; {k}={v}" for k, v in media.params.items())
    return f"{media.media_type}{params}"


def instance_syntaxes(accepted: list[MediaRange]) -> list[str]:
    """The transfer syntaxes asked for ``application/dicom`` parts, best first: a UID,
    :data:`~storage.ANY_SYNTAX` or :data:`~storage.DEFAULT_SYNTAX` (PS3.18 8.7.3.5.2,
    8.7.8.2).

    Raises
    ------
    WebError
        406: no range allows ``multipart/related; type="application/dicom"``.
    """
    syntaxes = [r.syntax for r in accepted if matches(r.part_type(DICOM), DICOM)]
    if not syntaxes:
        raise _refuse('instances (multipart/related; type="application/dicom")', accepted)
    return syntaxes


@dataclass(frozen=True)
class PixelChoice:
    """How frames go: as stored (``stored``) or decoded, with each part's media type and
    transfer syntax."""

    stored: bool
    media_type: str
    syntax: str

    @property
    def content_type(self) -> str:
        """A part's Content-Type (PS3.18 8.7.3.3: the transfer syntax always said)."""
        return f"{self.media_type}; transfer-syntax={self.syntax}"


def pixel_choice(accepted: list[MediaRange], stored: str) -> PixelChoice:
    """How the frames of an instance stored as ``stored`` are sent (PS3.18 8.7.3.3, Table
    8.7.3-5), following the client's ranges best first:

    * ``application/octet-stream`` (also ``*/*``, ``multipart/related`` without a type):
      uncompressed, little endian (compressed frames decoded), unless ``transfer-syntax=*``
      says any syntax will do: then as stored;
    * the stored syntax's own media type (``image/jp2``, ``image/jls``, ``image/jpeg``,
      ``image/dicom-rle``, ``image/*``): as stored, when its transfer syntax is not
      another one.

    Raises
    ------
    WebError
        406: no range can be served from what is stored.
    """
    uid = UID(stored)
    own = PIXEL_MEDIA_TYPES.get(uid) if uid.is_encapsulated else OCTET_STREAM
    decodes = syntax_for(stored, ExplicitVRLittleEndian) == ExplicitVRLittleEndian
    raw = PixelChoice(True, OCTET_STREAM, ExplicitVRLittleEndian)
    for media in accepted:
        part = media.part_type(OCTET_STREAM)
        if matches(part, OCTET_STREAM):
            if media.syntax == ANY_SYNTAX and own and syntax_for(stored, ANY_SYNTAX):
                return raw if own == OCTET_STREAM else PixelChoice(True, own, stored)
            if media.syntax in (DEFAULT_SYNTAX, ExplicitVRLittleEndian, ANY_SYNTAX) and decodes:
                return raw if not uid.is_encapsulated else PixelChoice(
                    False, OCTET_STREAM, ExplicitVRLittleEndian)
        if own and own != OCTET_STREAM and matches(part, own) and media.syntax in (
                DEFAULT_SYNTAX, ANY_SYNTAX, stored):
            return PixelChoice(True, own, stored)
    raise _refuse(f"pixel data stored as {uid.name}", accepted)


def require_octet_stream(accepted: list[MediaRange]) -> None:
    """Raises a 406 unless ``multipart/related; type="application/octet-stream"`` is
    acceptable (bulk data other than pixel data, PS3.18 8.7.3.3)."""
    if not any(matches(r.part_type(OCTET_STREAM), OCTET_STREAM) for r in accepted):
        raise _refuse('bulk data (multipart/related; type="application/octet-stream")',
                      accepted)


def require_json(accepted: list[MediaRange]) -> None:
    """Raises a 406 unless DICOM JSON (``application/dicom+json``, or ``application/json``)
    is acceptable (PS3.18 8.7.3.2: metadata)."""
    if not any(matches(r.media_type, DICOM_JSON) or matches(r.media_type, JSON)
               for r in accepted):
        raise _refuse(f"metadata ({DICOM_JSON})", accepted)


def rendered_type(accepted: list[MediaRange]) -> str:
    """``image/jpeg`` or ``image/png``, whichever the client prefers (JPEG for ``*/*`` and
    ``image/*``: PS3.18 8.7.4, the default rendered media type).

    Raises
    ------
    WebError
        406: neither is acceptable.
    """
    for media in accepted:
        for served in (JPEG, PNG):
            if matches(media.media_type, served):
                return served
    raise _refuse("a rendered image (image/jpeg or image/png)", accepted)
