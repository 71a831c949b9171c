"""Rendered images and thumbnails (PS3.18 10.4.1.1.3, 8.3.5: the rendering parameters).

A frame's pixels (pydicom's ``pixel_array``) become an 8-bit picture: greyscale through the
Modality LUT or rescale (PS3.3 C.11.1) and the stored VOI window or VOI LUT (C.11.2: the
first one; ``window=`` replaces it; without any, the frame's own range), MONOCHROME1
inverted; PALETTE COLOR through its palette; RGB (colour JPEG already converted by pydicom)
as it is, scaled to 8 bits. Pillow resizes it into the ``viewport`` and writes JPEG or PNG.
A study or series goes as ``multipart/related`` of such pictures (:func:`part_type`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from starlette.requests import Request

from .accept import JPEG, PNG, MediaRange, matches
from .errors import BAD_REQUEST, NOT_ACCEPTABLE, WebError

MAX_8BIT = 255
DEFAULT_QUALITY = 90
"""JPEG quality when the request gives none (``quality=``, 1 to 100)."""
THUMBNAIL_SIZE = 128
"""Largest width and height of a thumbnail when the request gives no ``viewport``."""
MAX_VIEWPORT = 4096
"""Largest width or height a ``viewport`` may ask for."""
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
"""PS3.3 C.11.2.1.3: VOI LUT Function values (``window=center,width,function``)."""


@dataclass(frozen=True)
class Rendering:
    """What a request asks of a rendered image (PS3.18 8.3.5.1)."""

    media_type: str
    quality: int = DEFAULT_QUALITY
    viewport: tuple[int, int] | None = None
    window: tuple[float, float, str] | None = None


def rendering(request: Request, media_type: str, thumbnail: bool = False) -> Rendering:
    """The rendering parameters of ``request``: ``quality`` (8.3.5.1.2), ``viewport``
    (8.3.5.1.3: ``vw,vh``; a source region is not supported) and ``window`` (8.3.5.1.4:
    ``center,width[,function]``).

    Raises
    ------
    WebError
        400 with the parameter's problem.
    """
    params = request.query_params
    quality = DEFAULT_QUALITY
    if "quality" in params:
        text = params["quality"]
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
            raise WebError(BAD_REQUEST, f"quality must be an integer from 1 to 100, not {text!r}")
        quality = int(text)
    viewport = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    if "viewport" in params:
        viewport = _viewport(params["viewport"])
    window = _window(params["window"]) if "window" in params else None
    return Rendering(media_type, quality, viewport, window)


def part_type(accepted: list[MediaRange]) -> str:
    """The media type of the parts of a rendered study or series (PS3.18 8.7.4, 8.6.1.2:
    a payload of several representations is ``multipart/related``, one per part):
    ``image/jpeg`` or ``image/png``, whichever the client prefers.

    ``multipart/related; type=image/png`` (``type`` quoted or not), ``multipart/related``
    without a type (JPEG, the default rendered media type), ``multipart/*`` and ``*/*``
    are served, and so are ``image/jpeg``, ``image/png`` and ``image/*`` on their own:
    dicomweb-client sends those for a series, as clients send ``application/dicom`` for
    a study, meaning the parts.

    Raises
    ------
    WebError
        406: no range allows JPEG or PNG parts.
    """
    for media in accepted:
        part = media.part_type(JPEG)
        for served in (JPEG, PNG):
            if matches(part, served):
                return served
    said = ", ".join(media.media_type + "".join(f"; {k}={v}" for k, v in media.params.items())
                     for media in accepted) or "nothing"
    raise WebError(NOT_ACCEPTABLE, "cannot send rendered images (multipart/related;"
                                   f' type="image/jpeg" or "image/png") as any of: {said}')


def _viewport(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
        raise WebError(BAD_REQUEST, f"viewport must be vw,vh (a source region is not"
                                    f" supported), not {text!r}")
    width, height = (int(p) for p in parts)
    if not (1 <= width <= MAX_VIEWPORT and 1 <= height <= MAX_VIEWPORT):
        raise WebError(BAD_REQUEST, f"viewport sizes must be from 1 to {MAX_VIEWPORT}")
    return width, height


def _window(text: str) -> tuple[float, float, str]:
    parts = [p.strip() for p in text.split(",")]
    function = parts[2].upper() if len(parts) == 3 else "LINEAR"
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        center = width = math.nan
    if len(parts) not in (2, 3) or not (math.isfinite(center) and math.isfinite(width)) \
            or width <= 0 or function not in VOI_FUNCTIONS:
        raise WebError(BAD_REQUEST, "window must be center,width[,function] with a width"
                                    f" above 0 and a function of {', '.join(VOI_FUNCTIONS)},"
                                    f" not {text!r}")
    return center, width, function


def render(pixels: np.ndarray, header: Dataset, how: Rendering) -> bytes:
    """``pixels`` (one frame) with ``header`` (its group 0028: Image Pixel, Modality LUT,
    VOI LUT modules) as a JPEG or PNG, as ``how`` says."""
    image = Image.fromarray(_eight_bits(pixels, header, how.window))
    if how.viewport:
        image.thumbnail(how.viewport, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if how.media_type == JPEG:
        image.save(out, format="JPEG", quality=how.quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _eight_bits(pixels: np.ndarray, header: Dataset,
                window: tuple[float, float, str] | None) -> np.ndarray:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, header)
    if pixels.ndim == 3:  # RGB (pydicom converts YBR), or a palette's output
        bits = pixels.dtype.itemsize * 8
        if photometric != "PALETTE COLOR":
            bits = int(header.get("BitsStored") or bits)
        return _stretch(pixels.astype(np.float64), 0, 2 ** bits - 1)
    grey = _grey(pixels, header, window)
    return MAX_8BIT - grey if photometric == "MONOCHROME1" else grey


def _grey(pixels: np.ndarray, header: Dataset,
          window: tuple[float, float, str] | None) -> np.ndarray:
    """Modality LUT, then the VOI (PS3.3 C.11.2.1.2: the first window, or the VOI LUT),
    stretched to 0..255 over the VOI's output range; the frame's range without a VOI."""
    values = apply_modality_lut(pixels, header).astype(np.float64)
    voi = header
    if window is not None:
        voi = Dataset()
        voi.update(header)
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = window
        if "VOILUTSequence" in voi:
            del voi.VOILUTSequence
    has_window = "WindowCenter" in voi and "WindowWidth" in voi
    if has_window or "VOILUTSequence" in voi:
        try:
            shown = apply_voi_lut(values, voi, prefer_lut=window is None)
            if "VOILUTSequence" in voi and window is None:
                return _stretch(shown, float(shown.min()), float(shown.max()))
            low, high = apply_voi_lut(np.array([-np.inf, np.inf]), voi, prefer_lut=False)
            return _stretch(shown, float(low), float(high))
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            pass  # a window pydicom refuses (width 0, ...): the frame's own range
    return _stretch(values, float(values.min()), float(values.max()))


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` from ``low``..``high`` to 0..255 (all 0 when the range is empty)."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (MAX_8BIT / (high - low))
    return np.clip(np.rint(scaled), 0, MAX_8BIT).astype(np.uint8)
