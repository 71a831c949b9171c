"""The URLs of a request: the DICOMweb root it reached (for RetrieveURL and BulkDataURI) and
the UIDs its path names."""

from __future__ import annotations

from starlette.requests import Request

from storage import Archive, is_uid

from .errors import BAD_REQUEST, WebError

FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto")
DEFAULT_PORTS = {"http": 80, "https": 443}


def service_url(request: Request) -> str:
    """The DICOMweb root the request came to, for RetrieveURLs: scheme, authority and
    ``web.base_path``. A Host header without a port (dicomweb-client's POSTs send one:
    it sets Host itself, without the port) gets the port the request came in on, unless
    a proxy forwarded it (a ``Forwarded`` or ``X-Forwarded-*`` header) or the port is the
    scheme's default."""
    url = request.url
    authority = url.netloc
    server = request.scope.get("server")
    forwarded = any(name in request.headers for name in FORWARDED_HEADERS)
    if url.port is None and server and not forwarded and \
            server[1] != DEFAULT_PORTS.get(url.scheme):
        authority = f"{authority}:{server[1]}"
    return f"{url.scheme}://{authority}{request.scope.get('root_path', '')}"


def path_uid(text: str, what: str) -> str:
    """``text``, a UID from the path, or 400 when it is not one (PS3.5 9.1; PS3.18 8.6.1
    and each service's status table: a malformed request)."""
    if not is_uid(text):
        raise WebError(BAD_REQUEST, f"{what} is not a valid UID: {text[:80]!r}")
    return text


def profile_of(request: Request) -> str:
    """The de-identification profile of the account making the request
    (``web.deidentify``, :class:`web.auth.AccessMiddleware`), or "" for one that sees the
    data as stored."""
    return str(request.scope.get("minipacs.profile", ""))


def path_target(request: Request) -> tuple[str, str | None, str | None]:
    """The study, series and instance UIDs the path names (``None`` where it stops; 400
    for one that is not a UID: :func:`path_uid`). For an account that sees de-identified
    data (:func:`profile_of`), the stored UIDs that those its answers gave stand for
    (``Archive.original_uids``: 404 for one never given)."""
    params = request.path_params
    study = path_uid(params["study"], "study")
    series = path_uid(params["series"], "series") if "series" in params else None
    sop = path_uid(params["instance"], "instance") if "instance" in params else None
    profile = profile_of(request)
    if profile:
        archive: Archive = request.app.state.archive
        study, series, sop = archive.original_uids(profile, study, series, sop)
        # the audit line (web/metrics.py) says whose data the account saw, as stored
        request.scope.setdefault("minipacs.audit", {})["study"] = study
    return study, series, sop
