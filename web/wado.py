"""WADO-RS (PS3.18 10.4): retrieval of instances, metadata, bulk data, frames, rendered
images (of an instance or frame, or every image of a study or series) and thumbnails.

Each endpoint checks its path (a malformed UID or frame list is a 400), asks the archive
which instances it names (404 when none) and what the client accepts (406 when we can give
none of it: :mod:`web.accept`), and answers: instances and frames as streamed
``multipart/related`` (:mod:`web.multipart_out`), metadata as DICOM JSON from the index,
images rendered by :mod:`web.rendered`. Starlette runs these synchronous endpoints, and the
streams, in its worker threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from storage import (
    Archive,
    CannotConvert,
    InstanceUnavailable,
    WebInstance,
    Withheld,
    bulk_path,
    syntax_for,
)

from . import accept
from .accept import DICOM, DICOM_JSON, OCTET_STREAM, PixelChoice
from .errors import BAD_REQUEST, NOT_ACCEPTABLE, NOT_FOUND, WebError
from .multipart_out import OK, PARTIAL_CONTENT, Part, multipart
from .rendered import Rendering, part_type, render, rendering
from .urls import path_target, profile_of, service_url

"""PS3.5 9.1: a UID is at most 64 characters, digits in dot-separated components."""
MAX_FRAME_DIGITS = 9
PIXEL_DATA = 0x7FE00010

STUDY = "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"
FRAMES = INSTANCE + "/frames/{frames}"


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _releasing(endpoint: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """``endpoint``, giving its worker thread's index connection back when it returns (as
    QIDO-RS does): Starlette has up to 40 worker threads, and a connection kept by each
    would hold its page cache for good. The streams the endpoints return read files only,
    never the index."""

    @functools.wraps(endpoint)
    def run(request: Request) -> Response:
        try:
            return endpoint(request)
        finally:
            _archive(request).release()

    return run


def _head(request: Request) -> bool:
    """A ``HEAD`` request (Starlette routes it to the ``GET`` endpoint): the checks that
    decide the status are made, no part is produced (RFC 9110 9.3.2)."""
    return request.method == "HEAD"


def _instance_url(request: Request) -> Callable[[str, str, str], str]:
    """The URL of an instance on this server, as the client reached it."""
    root = service_url(request)
    return lambda study, series, sop: f"{root}/studies/{study}/series/{series}/instances/{sop}"


def _frame_numbers(text: str) -> list[int]:
    """A frame list (PS3.18 10.4.1.1.6: comma-separated, from 1, no duplicates)."""
    parts = text.split(",")
    if not all(p.isascii() and p.isdigit() and len(p) <= MAX_FRAME_DIGITS and int(p) > 0
               for p in parts) \
            or len(set(parts)) != len(parts):
        raise WebError(BAD_REQUEST, "frames must be a comma-separated list of distinct frame"
                                    f" numbers from 1, not {text[:80]!r}")
    return [int(p) for p in parts]


def _located(request: Request, unreadable_shown: bool = False
             ) -> tuple[Archive, list[WebInstance], list[WebInstance]]:
    """The instances the path names and, of those, the ones this account may be shown: all,
    or for an account that sees de-identified data those not withheld for burned-in
    annotation (:meth:`Archive.withheld`, each file's header read; 404 when none is). A
    file that cannot be read is not shown, unless ``unreadable_shown`` (a retrieve, whose
    de-identification checks again as it reads the file)."""
    study, series, sop = path_target(request)
    archive = _archive(request)
    items = archive.locate(study, series, sop)
    if not profile_of(request):
        return archive, items, items
    shown = [item for item in items if _shown(archive, item, unreadable_shown)]
    if not shown:
        raise Withheld("nothing there is shown de-identified: its pixels may show the"
                       " patient (deidentify.send_burned_in is off)")
    return archive, items, shown


def _shown(archive: Archive, item: WebInstance, unreadable: bool = False) -> bool:
    """Whether ``item`` may be shown de-identified; one whose file cannot be read now is
    ``unreadable`` (True: left to the request's own reading of it, which fails it or
    checks again; False: not shown, the check fails closed)."""
    try:
        return archive.withheld(item) is None
    except InstanceUnavailable:
        return unreadable


def _check_shown(request: Request, archive: Archive, item: WebInstance) -> None:
    """404 (:class:`Withheld`) when ``item`` may not be shown de-identified."""
    if profile_of(request) and (reason := archive.withheld(item)):
        raise Withheld(f"{item.sop_instance_uid} is not shown de-identified: {reason}")


def _locations(request: Request, archive: Archive, items: list[WebInstance]
               ) -> Callable[[WebInstance], str]:
    """The URL of each of ``items`` as this account names it: by the UIDs its answers
    give (``Archive.replaced_uids``, kept for its next requests) when it sees
    de-identified data."""
    url = _instance_url(request)
    profile = profile_of(request)
    if not profile:
        return lambda item: url(item.study_uid, item.series_uid, item.sop_instance_uid)
    given = archive.replaced_uids(items, profile)
    return lambda item: url(given[item.study_uid], given[item.series_uid],
                            given[item.sop_instance_uid])


def retrieve(request: Request) -> Response:
    """A study, series or instance as ``multipart/related; type="application/dicom"``
    (PS3.18 10.4.1.1.1), each instance in the first transfer syntax asked for that it can
    go in (8.7.8.2): 200 when all can, 206 when some can (Table 10.4.3-1), else 406.

    For an account that sees de-identified data, each instance is a de-identified copy
    (``Archive.deidentified_file``) and those withheld for burned-in annotation are left
    out (206; 404 when that is all of them); the audit line names the profile and counts."""
    archive, items, shown = _located(request, unreadable_shown=True)
    profile = profile_of(request)
    wanted = accept.instance_syntaxes(accept.ranges(request))
    plan = [(item, syntax) for item in shown if (syntax := _first_syntax(item, wanted))]
    if not plan:
        stored = ", ".join(sorted({UID(item.transfer_syntax_uid).name for item in items}))
        asked = ", ".join(w or "the default" for w in wanted)
        raise WebError(NOT_ACCEPTABLE, f"stored as {stored}: cannot be sent in {asked}")
    present = set(archive.present([item for item, _ in plan]))
    if not present:  # PS3.18 Table 10.4.3-1: 404, nothing of the target can be sent
        raise WebError(NOT_FOUND, f"the file of {plan[0][0].sop_instance_uid}"
                                  f"{f' (and {len(plan) - 1} more)' if len(plan) > 1 else ''}"
                                  " is missing from the store (minipacs verify finds why)")
    location = _locations(request, archive, [item for item, _ in plan if item in present])
    if profile:  # the audit line's (web/metrics.py), beside the profile and the study
        request.scope.setdefault("minipacs.audit", {}).update(
            instances=0 if _head(request) else len(present), withheld=len(items) - len(shown))
    parts = (Part(f"{DICOM}; transfer-syntax={syntax}",
                  _deidentified(archive, item, syntax, profile) if profile
                  else archive.instance_bytes(item, syntax), location(item))
             for item, syntax in plan if item in present)
    # PS3.18 Table 10.4.3-1: 200 for the whole target, 206 for the instances that can go
    status = OK if len(present) == len(items) else PARTIAL_CONTENT
    return multipart(parts, DICOM, status, partial=True, head=_head(request))


def _deidentified(archive: Archive, item: WebInstance, syntax: str,
                  profile: str) -> Iterator[bytes]:
    """A part's body: ``item`` de-identified, made only when the part is sent."""
    yield archive.deidentified_file(item, syntax, profile)


def _first_syntax(item: WebInstance, wanted: list[str]) -> str | None:
    """The first of the syntaxes asked for that ``item`` can go in (PS3.18 8.7.8.2)."""
    return next(filter(None, (syntax_for(item.transfer_syntax_uid, w) for w in wanted)), None)


def metadata(request: Request) -> Response:
    """The metadata of a study, series or instance (PS3.18 10.4.1.1.2): one DICOM JSON
    object per instance, from the index alone."""
    study, series, sop = path_target(request)
    accept.require_json(accept.ranges(request))
    body = _archive(request).metadata(study, series, sop, _instance_url(request),
                                      profile_of(request))
    return Response(body, media_type=DICOM_JSON)


def _one(request: Request) -> tuple[Archive, WebInstance]:
    study, series, sop = path_target(request)
    archive = _archive(request)
    item = archive.locate(study, series, sop)[0]
    _check_shown(request, archive, item)
    return archive, item


def frames(request: Request) -> Response:
    """Frames of an instance (PS3.18 10.4.1.1.6): one part each, uncompressed or as
    stored (:func:`web.accept.pixel_choice`); a frame it does not have is a 404."""
    numbers = _frame_numbers(request.path_params["frames"])
    archive, item = _one(request)
    choice = accept.pixel_choice(accept.ranges(request), item.transfer_syntax_uid)
    with archive.open_pixels(item) as source:
        source.check_frames(numbers)
    url = str(request.url.replace(query=""))
    return multipart(_frame_parts(archive, item, numbers, choice, url), choice.media_type,
                     head=_head(request))


def _frame_parts(archive: Archive, item: WebInstance, numbers: list[int],
                 choice: PixelChoice, url: str) -> Iterator[Part]:
    with archive.open_pixels(item) as source:
        read = source.stored_frame if choice.stored else source.decoded_frame
        for number in numbers:
            yield Part(choice.content_type, _lazy(read, number), url)


def _lazy(read: Callable[[int], bytes], number: int) -> Iterator[bytes]:
    """A part's body read only when it is sent."""
    yield read(number)


def bulkdata(request: Request) -> Response:
    """A bulk value of an instance, at a BulkDataURI of its metadata (PS3.18 10.4.1.1.5):
    ``multipart/related; type="application/octet-stream"``; the pixel data as its frames
    (compressed ones each in a part of its own when sent as stored)."""
    try:
        path = bulk_path(request.path_params["path"])
    except ValueError as exc:
        raise WebError(BAD_REQUEST, f"not a bulk data path: {exc}") from exc
    if profile_of(request) and path != [PIXEL_DATA]:  # the only one its metadata names
        raise WebError(NOT_FOUND, "an account that sees de-identified data is given the"
                                  " pixel data only")
    archive, item = _one(request)
    accepted = accept.ranges(request)
    url = str(request.url.replace(query=""))
    if path == [PIXEL_DATA]:
        choice = accept.pixel_choice(accepted, item.transfer_syntax_uid)
        with archive.open_pixels(item) as source:
            source.check_frames([1])
        return multipart(_pixel_data_parts(archive, item, choice, url), choice.media_type,
                         head=_head(request))
    accept.require_octet_stream(accepted)
    with archive.open_pixels(item) as source:
        value = source.bulk_value(path)
    return multipart([Part(f"{OCTET_STREAM}; transfer-syntax={ExplicitVRLittleEndian}",
                           [value], url)], OCTET_STREAM, head=_head(request))


def _pixel_data_parts(archive: Archive, item: WebInstance, choice: PixelChoice,
                      url: str) -> Iterator[Part]:
    with archive.open_pixels(item) as source:
        numbers = range(1, source.frame_count + 1)
        if choice.stored and UID(item.transfer_syntax_uid).is_encapsulated:
            for number in numbers:
                yield Part(choice.content_type, _lazy(source.stored_frame, number), url)
        else:  # the whole value, uncompressed, a frame at a time
            yield Part(choice.content_type, map(source.decoded_frame, numbers), url)


def rendered(request: Request) -> Response:
    """An instance (its first frame) or one frame rendered as JPEG or PNG (PS3.18
    10.4.1.1.3)."""
    frame = request.path_params.get("frames")
    number = _single_frame(frame) if frame is not None else 1
    how = rendering(request, accept.rendered_type(accept.ranges(request)))
    archive, item = _one(request)
    return _render(archive, item, number, how)


def rendered_images(request: Request) -> Response:
    """A study or series rendered (PS3.18 10.4.1.1.3, Rendered Study and Rendered Series):
    ``multipart/related; type="image/jpeg"`` (or ``image/png``, :func:`web.rendered.part_type`),
    one part per instance with pixel data, in the order stored, each as its own
    ``{instance}/rendered`` gives it and with that URL as its Content-Location (8.6.1: a
    payload of more than one representation is multipart, a part each).

    A multi-frame instance is one part, its first frame, as for the instance: the parts
    stand one to one for instances (a viewer pages them, and asks
    ``{instance}/frames/{n}/rendered`` for more frames); PS3.18 Table 8.7.4-1 renders a
    whole multi-frame image only into multi-frame media types, which are not served.

    PS3.18 Table 10.4.3-1: 200 when every instance is there, 206 when some are left out:
    those without pixel data (an SR, a PDF: not images), whose file is missing, or whose
    rendering fails before the response starts; a failure once it has started ends the
    body without its closing delimiter (:mod:`web.multipart_out`). 406 when nothing has
    pixel data, 404 when nothing is stored there or no file of an image can be read.
    """
    how = rendering(request, part_type(accept.ranges(request)))
    archive, items, shown = _located(request)
    target = request.path_params.get("series") or request.path_params["study"]
    images = _images(archive, shown, f"series {target}" if "series" in request.path_params
                     else f"study {target}")
    location = _locations(request, archive, images)
    parts = (Part(how.media_type,
                  _lazy(functools.partial(_picture, archive, item, how=how), 1),
                  location(item) + "/rendered")
             for item in images)
    # PS3.18 Table 10.4.3-1: 200 for the whole target, 206 for the instances that can go
    status = OK if len(images) == len(items) else PARTIAL_CONTENT
    return multipart(parts, how.media_type, status, partial=True, head=_head(request))


def _images(archive: Archive, items: list[WebInstance], target: str) -> list[WebInstance]:
    """Those of ``items`` (the instances of ``target``, as a reason names it) that have
    pixel data to render, in a transfer syntax this installation can decode (each file's
    header read, nothing decoded): what is left out is known before the status is sent.

    Raises
    ------
    InstanceUnavailable
        None has, and some file could not be read (404: it may have been an image).
    WebError
        406: none has, and every file was read (PS3.18 10.4.3: nothing of the target
        can be given in a Rendered Media Type).
    """
    images: list[WebInstance] = []
    unreadable: InstanceUnavailable | None = None
    for item in items:
        try:
            with archive.open_pixels(item) as source:
                if source.frame_count and _decodable(item.transfer_syntax_uid):
                    images.append(item)
        except InstanceUnavailable as exc:
            unreadable = exc
    if not images and unreadable is not None:
        raise unreadable
    if not images:
        raise WebError(NOT_ACCEPTABLE, f"no instance of {target} has pixel data to render")
    return images


def _decodable(transfer_syntax_uid: str) -> bool:
    """Whether pydicom has a pixel data decoder installed for the syntax (the ``codecs``
    extra's may be missing)."""
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except NotImplementedError:
        return False


def thumbnail(request: Request) -> Response:
    """A small rendering (PS3.18 10.4.1.1.4) of a study's or series' representative image
    (:meth:`Archive.representative`), an instance or a frame: the middle frame unless a
    frame is named."""
    study, series, sop = path_target(request)
    frame = request.path_params.get("frames")
    number = _single_frame(frame) if frame is not None else None
    how = rendering(request, accept.rendered_type(accept.ranges(request)), thumbnail=True)
    archive = _archive(request)
    if sop is not None:
        item = archive.locate(study, series, sop)[0]
        _check_shown(request, archive, item)
    elif profile_of(request):  # one that is not withheld
        item = archive.representative(study, series, functools.partial(_shown, archive))
    else:
        item = archive.representative(study, series)
    return _render(archive, item, number, how)


def _single_frame(text: str) -> int:
    numbers = _frame_numbers(text)
    if len(numbers) != 1:
        raise WebError(BAD_REQUEST, "one frame is rendered at a time")
    return numbers[0]


def _render(archive: Archive, item: WebInstance, number: int | None,
            how: Rendering) -> Response:
    return Response(_picture(archive, item, number, how), media_type=how.media_type)


def _picture(archive: Archive, item: WebInstance, number: int | None,
             how: Rendering) -> bytes:
    """Frame ``number`` of ``item`` (its middle frame when ``None``) rendered as ``how``
    says.

    Raises
    ------
    CannotConvert
        406 (PS3.18 10.4.3): no pixel data (an SR, a PDF: not an image), pixel data that
        cannot be decoded, or a palette or LUT pydicom refuses. A storage error, so that
        a study or series leaves the instance out (:mod:`web.multipart_out`).
    InstanceUnavailable
        404: the file cannot be read, or has no frame ``number``.
    """
    with archive.open_pixels(item) as source:
        if source.frame_count == 0:
            raise CannotConvert(f"instance {item.sop_instance_uid} has no pixel data to"
                                f" render as {how.media_type}")
        number = number or (source.frame_count + 1) // 2
        source.check_frames([number])
        header = Dataset()
        pixels = source.pixels(number, header)
    try:
        return render(pixels, header, how)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise CannotConvert(f"cannot render {item.sop_instance_uid} as {how.media_type}:"
                            f" {exc}") from exc


ROUTES: list[BaseRoute] = [
    Route(STUDY, _releasing(retrieve)),
    Route(SERIES, _releasing(retrieve)),
    Route(INSTANCE, _releasing(retrieve)),
    Route(STUDY + "/metadata", _releasing(metadata)),
    Route(SERIES + "/metadata", _releasing(metadata)),
    Route(INSTANCE + "/metadata", _releasing(metadata)),
    Route(STUDY + "/rendered", _releasing(rendered_images)),
    Route(SERIES + "/rendered", _releasing(rendered_images)),
    Route(INSTANCE + "/rendered", _releasing(rendered)),
    Route(FRAMES + "/rendered", _releasing(rendered)),
    Route(STUDY + "/thumbnail", _releasing(thumbnail)),
    Route(SERIES + "/thumbnail", _releasing(thumbnail)),
    Route(INSTANCE + "/thumbnail", _releasing(thumbnail)),
    Route(FRAMES + "/thumbnail", _releasing(thumbnail)),
    Route(FRAMES, _releasing(frames)),
    Route(INSTANCE + "/bulkdata/{path:path}", _releasing(bulkdata)),
]
