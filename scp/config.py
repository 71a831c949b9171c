"""The configuration: one typed, frozen object loaded from ``config.yaml``.

Every key has its default here, in the dataclasses; ``config.yaml`` repeats them with
comments and the README lists them (a test keeps the three in step). Unknown sections and
keys are errors, and :func:`load_config` reports every problem at once in one
:class:`ConfigError`. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from storage import (
    AGE_BY,
    MIN_SECRET_LENGTH,
    ArchiveOptions,
    DeidentifyOptions,
    DuplicatePolicy,
    Option,
    Profile,
    RetentionRules,
    Route,
    S3Options,
    endpoint_problem,
    files_url_problem,
    is_object_url,
    match_key_problem,
    option_problem,
    protect_problem,
    response_charset_problem,
    safe_private,
    safe_private_problem,
)
from web.config import CHOICES as WEB_CHOICES
from web.config import WebConfig
from web.config import check as check_web

from .atna import syslog_problem

MAX_WORKERS = 64
"""Most server processes ``ae.workers`` may ask for."""


COMMAND_LINE = "the command line"
"""What :class:`ConfigError` calls the source of problems with overrides named by a flag."""


class ConfigError(Exception):
    """Every problem found in a configuration, one per line.

    Parameters
    ----------
    problems : list of str
        One line per problem, each starting with what it is about (``ae.port: ...``, or
        ``--port: ...`` for a flag).
    source : str
        Where they were found: the file's name, ``"configuration"`` for the built-ins, or
        several sources joined by ``" and "`` (then ``plural``).
    plural : bool
        ``source`` names more than one source.
    """

    def __init__(self, problems: list[str], source: str = "configuration",
                 plural: bool = False) -> None:
        self.problems = problems
        self.source = source
        listing = "\n  - ".join(problems)
        verb = "have" if plural else "has"
        super().__init__(f"{source} {verb} {len(problems)} problem(s):\n  - {listing}")


@dataclass(frozen=True)
class AEConfig:
    """``ae``: how the server presents itself on the network."""

    title: str = "MINIPACS"
    port: int = 11112
    bind: str = "0.0.0.0"
    max_associations: int = 16
    workers: int = 1
    max_pdu_size: int = 262144
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0


@dataclass(frozen=True)
class StorageConfig:
    """``storage``: where and how instances are kept."""

    data_dir: Path = Path("data")
    index_url: str = ""
    files_url: str = ""
    files_previous_url: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    on_duplicate: str = "replace"
    durability: str = "full"
    max_instance_mb: int = 2048
    min_free_disk_mb: int = 200


@dataclass(frozen=True)
class QueryConfig:
    """``query``: C-FIND behaviour."""

    pn_case_insensitive: bool = True
    max_results: int = 0
    response_charset: str = "auto"


@dataclass(frozen=True)
class LoggingConfig:
    """``logging``: what the server writes to its log (standard error)."""

    level: str = "INFO"
    json: bool = False


@dataclass(frozen=True)
class AuditConfig:
    """``audit``: the audit trail (:mod:`scp.audit`), one JSON object per line for every
    association, DIMSE operation, HTTP request, delete and send."""

    enabled: bool = True
    path: str = ""
    max_mb: int = 100
    backups: int = 10
    syslog: str = ""


SERVICES: tuple[str, ...] = ("echo", "find", "get", "move", "store", "commit")
"""What a peer may be allowed to do (``peers[].services``)."""


@dataclass(frozen=True)
class PeerConfig:
    """One entry of ``peers``: a remote AE we know, by its AE title.

    It may use the ``services`` listed, from any address or only from ``network``. A C-MOVE
    may name it as its Move Destination when it has a ``host``; we then open an
    association to ``host``:``port`` calling it ``ae_title``.
    """

    ae_title: str = ""
    host: str = ""
    port: int = 104
    network: str = ""
    services: tuple[str, ...] = SERVICES
    max_pdu_size: int = 0
    transfer_syntax: str = ""
    connections: int = 1
    deidentify: str = ""


MAX_CONNECTIONS = 8
"""Most associations routing may hold to one peer at once (``peers[].connections``)."""


@dataclass(frozen=True)
class TLSConfig:
    """``tls``: a DICOM TLS listener (PS3.15 B.9, the BCP 195 profile) beside the plain one."""

    enabled: bool = False
    port: int = 2762
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_cert: bool = True
    only: bool = False


TLS_FILES: tuple[str, ...] = ("certificate", "private_key", "ca_certificates")


@dataclass(frozen=True)
class SecurityConfig:
    """``security``: who may associate with us."""

    allow_unknown_peers: bool = True
    require_called_ae_title: bool = False


PEER_REQUIRED: tuple[str, ...] = ("ae_title",)


@dataclass(frozen=True)
class RouteConfig:
    """One entry of ``routes``: every stored instance that matches ``match`` is sent to
    each peer of ``to`` (:mod:`storage.outbox`, :mod:`scp.routing`)."""

    name: str = ""
    match: dict[str, str] = field(default_factory=dict)
    to: tuple[str, ...] = ()
    stable_seconds: float = 0.0


ROUTE_REQUIRED: tuple[str, ...] = ("name", "to")


@dataclass(frozen=True)
class DeidentifyConfig:
    """``deidentify``: what the de-identification ``profiles`` read (PS3.15 Annex E,
    :mod:`storage.deidentify`)."""

    table: str = ""
    secret: str = field(default="", repr=False)
    send_burned_in: bool = False


@dataclass(frozen=True)
class ProfileConfig:
    """One entry of ``profiles``: the Basic Application Level Confidentiality Profile with
    ``options`` (Table E.1-1's option columns), and the private attributes the Retain Safe
    Private option keeps."""

    name: str = ""
    options: tuple[str, ...] = ()
    safe_private: tuple[str, ...] = ()


PROFILE_REQUIRED: tuple[str, ...] = ("name",)

REQUIRED: dict[str, tuple[str, ...]] = {"peers": PEER_REQUIRED, "routes": ROUTE_REQUIRED,
                                        "profiles": PROFILE_REQUIRED}
"""The keys an entry of each list section must have."""


@dataclass(frozen=True)
class RoutingConfig:
    """``routing``: how the senders of ``routes`` retry."""

    retry_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    max_attempts: int = 20

# what ``peers[].transfer_syntax`` may name: syntaxes we can always produce from any stored
# instance whose pixel data can be decoded
PEER_TRANSFER_SYNTAXES: tuple[str, ...] = (
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
)


@dataclass(frozen=True)
class RetentionConfig:
    """``retention``: which studies the server deletes by itself (:mod:`scp.retention`)."""

    max_age_days: int = 0
    age_by: str = "received"
    max_disk_percent: float = 0.0
    protect: tuple[str, ...] = ()
    interval_minutes: float = 60.0

    def rules(self) -> RetentionRules:
        """The rules, as storage reads them (each ``protect`` a query string's pairs)."""
        return RetentionRules(self.max_age_days, self.age_by, self.max_disk_percent,
                              tuple(search_pairs(p) for p in self.protect))


MAX_RETENTION_DAYS = 36_500
MAX_INTERVAL_MINUTES = 525_600
"""Upper bounds of ``retention.max_age_days`` (a century) and ``interval_minutes`` (a year)."""


def profile_of(entry: ProfileConfig) -> Profile:
    """A ``profiles`` entry as :class:`storage.Profile` (checked when the config loads)."""
    return Profile(entry.name, frozenset(Option(o) for o in entry.options),
                   frozenset(safe_private(s) for s in entry.safe_private))


def search_pairs(text: str) -> tuple[tuple[str, str], ...]:
    """A query string's (key, value) pairs: split on ``&`` and the first ``=``, each side
    percent-decoded, ``+`` kept (a PatientID may hold one)."""
    return tuple((urllib.parse.unquote(key), urllib.parse.unquote(value))
                 for key, _, value in (part.partition("=") for part in text.split("&"))
                 if key)


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    ae: AEConfig = field(default_factory=AEConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    web: WebConfig = field(default_factory=WebConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    deidentify: DeidentifyConfig = field(default_factory=DeidentifyConfig)
    peers: tuple[PeerConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    profiles: tuple[ProfileConfig, ...] = ()

    def peer(self, ae_title: str) -> PeerConfig | None:
        """The peer called ``ae_title`` (leading and trailing spaces ignored, PS3.5 AE), if
        configured."""
        wanted = ae_title.strip(" ")
        return next((p for p in self.peers if p.ae_title.strip(" ") == wanted), None)

    def destination(self, ae_title: str) -> PeerConfig | None:
        """The peer called ``ae_title`` if a C-MOVE may send to it (it has a host)."""
        peer = self.peer(ae_title)
        return peer if peer is not None and peer.host else None

    @property
    def audit_path(self) -> Path:
        """The audit trail's file: ``audit.path``, by default ``<data_dir>/audit.jsonl``."""
        return Path(self.audit.path) if self.audit.path else (
            self.storage.data_dir / "audit.jsonl")

    @property
    def files_path(self) -> Path:
        """The file store's folder: ``storage.files_url`` when it is one, by default
        ``<data_dir>/files``; with an object store, the node's local folder beside it (its
        locks and the spool of large objects)."""
        url = self.storage.files_url
        if url and not is_object_url(url):
            return Path(url)
        return self.storage.data_dir / "files"

    @property
    def index_url(self) -> str:
        """The index URL; by default a SQLite file ``<data_dir>/index.sqlite``."""
        if self.storage.index_url:
            return self.storage.index_url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite').resolve()}"

    @property
    def shared_index(self) -> bool:
        """Whether other nodes may share the index (PostgreSQL): then the server beats a
        heartbeat there, and frees the leases of nodes that stopped (:mod:`scp.nodes`). A
        SQLite index is one machine's: its workers share one supervisor, which stops them
        all when one dies, and a process's leases are freed by its host's next start."""
        return not self.index_url.startswith("sqlite")

    def archive_options(self) -> ArchiveOptions:
        """The storage package's view of this configuration."""
        return ArchiveOptions(
            files_path=self.files_path,
            index_url=self.index_url,
            files_url=self.storage.files_url if is_object_url(self.storage.files_url) else "",
            files_previous_url=self.storage.files_previous_url,
            s3=S3Options(self.storage.s3_endpoint, self.storage.s3_region,
                         self.storage.s3_access_key_id, self.storage.s3_secret_access_key),
            on_duplicate=DuplicatePolicy(self.storage.on_duplicate),
            durable=self.storage.durability == "full",
            fold_pn=self.query.pn_case_insensitive,
            max_results=self.query.max_results,
            response_charset=self.query.response_charset,
            retrieve_ae_title=self.ae.title,
            max_instance_bytes=self.storage.max_instance_mb * 1024 * 1024,
            min_free_bytes=self.storage.min_free_disk_mb * 1024 * 1024,
            routes=tuple(Route(r.name, tuple(r.match.items()),
                               tuple(dict.fromkeys(t.strip(" ") for t in r.to)),
                               r.stable_seconds) for r in self.routes),
            deidentify=self.deidentify_options(),
        )

    def deidentify_options(self) -> DeidentifyOptions | None:
        """``deidentify`` and ``profiles`` as storage reads them; None without a profile."""
        if not self.profiles:
            return None
        return DeidentifyOptions(
            Path(self.deidentify.table), self.deidentify.secret,
            {p.name: profile_of(p) for p in self.profiles}, self.deidentify.send_burned_in)


SECTIONS: dict[str, type] = {
    "ae": AEConfig,
    "storage": StorageConfig,
    "query": QueryConfig,
    "logging": LoggingConfig,
    "audit": AuditConfig,
    "security": SecurityConfig,
    "tls": TLSConfig,
    "web": WebConfig,
    "routing": RoutingConfig,
    "retention": RetentionConfig,
    "deidentify": DeidentifyConfig,
}

LIST_SECTIONS: dict[str, type] = {
    "peers": PeerConfig,
    "routes": RouteConfig,
    "profiles": ProfileConfig,
}
"""Sections that hold a list of mappings, each one entry."""

CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("storage", "on_duplicate"): tuple(p.value for p in DuplicatePolicy),
    ("storage", "durability"): ("full", "relaxed"),
    ("logging", "level"): ("DEBUG", "INFO", "WARNING", "ERROR"),
    ("retention", "age_by"): AGE_BY,
    **{("web", key): choices for key, choices in WEB_CHOICES.items()},
}


def validate_ae_title(value: str) -> str | None:
    """Return why ``value`` is not a valid AE title, or ``None`` (PS3.5 Table 6.2-1 AE)."""
    if not value.strip(" "):
        return "must not be empty"
    if len(value) > 16:
        return "must be at most 16 characters"
    if not value.isascii() or any(c in value for c in "\\") or any(ord(c) < 32 for c in value):
        return "must be ASCII without backslash or control characters"
    return None


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
) -> Config:
    """Load and check a configuration file.

    Parameters
    ----------
    path : str or Path, optional
        A YAML file; ``None`` gives the built-in defaults.
    overrides : dict, optional
        ``{"ae.port": 4242, ...}`` applied over the file (the command line's flags).
    flags : dict, optional
        The command-line flag that gave each override, by key (``{"ae.port": "--port"}``):
        a problem with that key is reported under the flag, not the file.

    Raises
    ------
    ConfigError
        Listing every problem found: those of flags first, each named by its flag; then
        those of the file (named by the file too when flags have problems as well).
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    source = "configuration"
    if path is not None:
        path = Path(path)
        source = str(path)
        base = path.resolve().parent
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError([f"cannot read: {exc.strerror or exc}"], source) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(["the top level must be a mapping of sections"], source)
        raw = loaded
    problems: list[str] = []
    for dotted, value in (overrides or {}).items():
        if "." not in dotted:  # a whole section, e.g. "peers"
            raw[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        if raw.get(section) is None:
            raw[section] = {}
        if isinstance(raw[section], dict):  # else the section's own problem is reported
            raw[section][key] = value

    sections: dict[str, Any] = {}
    known = [*SECTIONS, *LIST_SECTIONS]
    for name in raw:
        if name not in known:
            problems.append(f"unknown section {name!r} (known: {', '.join(known)})")
    for name, cls in SECTIONS.items():
        sections[name] = _section(name, cls, raw.get(name), base, problems)
    for name, cls in LIST_SECTIONS.items():
        sections[name] = _list_section(name, cls, raw.get(name), base, problems)
    tls, ae = sections["tls"], sections["ae"]
    if tls.enabled and not tls.only and tls.port == ae.port and ae.port != 0:
        problems.append(f"tls.port: {tls.port} is ae.port too; give the TLS listener its own")
    web = sections["web"]
    if web.enabled and web.port == ae.port and ae.port != 0 and not tls.only:
        problems.append(f"web.port: {web.port} is ae.port too; give the web listener its own")
    if web.enabled and web.https and not (tls.certificate and tls.private_key):
        problems.append("web.https: needs tls.certificate and tls.private_key")
    _check_routes(sections["routes"], sections["peers"], problems)
    _check_deidentify(sections["deidentify"], sections["profiles"], sections["peers"],
                      web, problems)
    storage = sections["storage"]
    if storage.files_previous_url and _same_store(storage.files_previous_url, storage.files_url,
                                                  storage.data_dir):
        problems.append("storage.files_previous_url: is the store of storage.files_url itself"
                        " (the files move from the first to the second)")
    if sections["retention"].max_disk_percent and is_object_url(sections["storage"].files_url):
        # the disk minipacs can measure is the node's own, which deleting frees nothing of
        problems.append("retention.max_disk_percent: does not apply to an object store"
                        " (storage.files_url s3://...): set it to 0, use max_age_days")
    if ae.workers > 1 and sections["storage"].index_url.startswith(("postgres",)):
        # only SQLite's BEGIN IMMEDIATE serialises the index writes of several processes
        problems.append("ae.workers: more than 1 needs the SQLite index (storage.index_url"
                        " empty or sqlite:///...)")
    if problems:
        raise _blame(problems, source if path is not None else None, flags or {})
    return Config(**sections)


def files_store(url: str, data_dir: Path) -> str:
    """``storage.files_url`` as one string per store: ``s3://bucket/prefix`` without a
    trailing slash, or a folder's absolute path (``""`` is ``<data_dir>/files``)."""
    if is_object_url(url):
        return url.rstrip("/")
    return str(Path(url) if url else Path(data_dir) / "files")


def _same_store(first: str, second: str, data_dir: Path) -> bool:
    return files_store(first, data_dir) == files_store(second, data_dir)


def _blame(problems: list[str], source: str | None, flags: dict[str, str]) -> ConfigError:
    """One :class:`ConfigError` for ``problems``, each put under the flag or the file
    (``source``; ``None`` for the built-ins) it comes from."""
    by_flag: list[str] = []
    others: list[str] = []
    for problem in problems:
        key, _, why = problem.partition(": ")
        if key in flags:
            by_flag.append(f"{flags[key]}: {why}")
        else:
            others.append(problem)
    if not by_flag:
        return ConfigError(others, source or "configuration")
    if not others:
        return ConfigError(by_flag, COMMAND_LINE)
    if source is None:  # pragma: no cover - the built-in defaults have no problems
        return ConfigError(by_flag + others, f"{COMMAND_LINE} and the defaults", plural=True)
    return ConfigError(by_flag + [f"{source}: {p}" for p in others],
                       f"{COMMAND_LINE} and {source}", plural=True)


def _list_section(
    name: str, cls: type, raw: Any, base: Path, problems: list[str]
) -> tuple[Any, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{name}: must be a list")
        return ()
    entries = tuple(
        _section(f"{name}[{i}]", cls, item, base, problems) for i, item in enumerate(raw)
    )
    seen: set[str] = set()
    for entry in entries:
        key = entry.ae_title.strip(" ") if name == "peers" else entry.name
        if key and key in seen:
            what = "AE title" if name == "peers" else "name"
            problems.append(f"{name}: {what} {key!r} is listed more than once")
        seen.add(key)
    return entries


def _check_routes(routes: tuple[RouteConfig, ...], peers: tuple[PeerConfig, ...],
                  problems: list[str]) -> None:
    """Each route's peers are peers we can send to."""
    reachable = {p.ae_title.strip(" ") for p in peers if p.host}
    for i, route in enumerate(routes):
        for title in route.to:
            if title.strip(" ") not in reachable:
                problems.append(f"routes[{i}].to: {title!r} is not in peers with a host")


def _section(name: str, cls: type, raw: Any, base: Path, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: must be a mapping")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            problems.append(f"unknown key {name}.{key} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            default = getattr(cls(), f.name)
            if isinstance(default, Path) and not default.is_absolute():
                values[f.name] = (base / default).resolve()
            continue
        value = _convert(f"{name}.{f.name}", hints[f.name], raw[f.name], base, problems)
        if value is not None:
            values[f.name] = value
    if name == "tls":  # file names resolve against the config's folder, as paths do
        for key in TLS_FILES:
            if values.get(key):
                values[key] = str((base / Path(values[key]).expanduser()).resolve())
    if name == "audit" and values.get("path"):  # relative to the configuration's folder
        values["path"] = str((base / Path(values["path"]).expanduser()).resolve())
    if name == "deidentify" and values.get("table"):  # likewise
        values["table"] = str((base / Path(values["table"]).expanduser()).resolve())
    for key in ("files_url", "files_previous_url"):  # folders: against the config's folder
        url = values.get(key)
        if name == "storage" and url and not is_object_url(url) and "://" not in url:
            values[key] = str((base / Path(url).expanduser()).resolve())
    url = values.get("index_url")
    if isinstance(url, str) and url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        values["index_url"] = f"sqlite:///{(base / url[len('sqlite:///'):]).resolve()}"
    _check(name, values, problems)
    try:
        return cls(**values)
    except TypeError as exc:  # pragma: no cover - every field has a default
        problems.append(f"{name}: {exc}")
        return cls()


def _convert(dotted: str, hint: Any, value: Any, base: Path, problems: list[str]) -> Any:
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{dotted}: must be true or false, not {value!r}")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        problems.append(f"{dotted}: must be a whole number, not {value!r}")
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{dotted}: must be a number, not {value!r}")
    elif hint is str:
        if isinstance(value, str):
            return value
        problems.append(f"{dotted}: must be a string, not {value!r}")
    elif typing.get_origin(hint) is dict:  # dict[str, str]: a YAML mapping of strings
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items()):
            return dict(value)
        problems.append(f"{dotted}: must be a mapping of strings to strings, not {value!r}")
    elif typing.get_origin(hint) is tuple:  # tuple[str, ...]: a YAML list of strings
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        problems.append(f"{dotted}: must be a list of strings, not {value!r}")
    elif hint is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() else (base / p).resolve()
        problems.append(f"{dotted}: must be a path, not {value!r}")
    else:  # pragma: no cover - a field type the loader does not know
        problems.append(f"{dotted}: unsupported type {hint}")
    return None


def _check_listener(section: str, values: dict[str, Any], problems: list[str]) -> None:
    """``port`` and ``bind`` of a listener's section (``ae``, ``web``, ``tls``)."""
    port = values.get("port")
    if port is not None and not 0 <= port <= 65535:
        problems.append(f"{section}.port: must be between 0 and 65535, not {port}")
    bind = values.get("bind")
    if bind is not None:
        try:
            ipaddress.ip_address(bind)
        except ValueError:
            problems.append(f"{section}.bind: must be an IP address, not {bind!r}")


def _check(section: str, values: dict[str, Any], problems: list[str]) -> None:
    for (sec, key), choices in CHOICES.items():
        if sec == section and key in values and values[key] not in choices:
            allowed = ", ".join(choices)
            problems.append(f"{sec}.{key}: must be one of {allowed}, not {values[key]!r}")
    if section == "ae":
        title = values.get("title")
        if title is not None and (why := validate_ae_title(title)):
            problems.append(f"ae.title: {why}")
        _check_listener("ae", values, problems)
        for key in ("max_associations", "max_pdu_size"):
            if key in values and values[key] < 0:
                problems.append(f"ae.{key}: must not be negative")
        if values.get("max_associations") == 0:
            problems.append("ae.max_associations: must be at least 1")
        workers = values.get("workers")
        if workers is not None and not 1 <= workers <= MAX_WORKERS:
            problems.append(f"ae.workers: must be between 1 and {MAX_WORKERS}, not {workers}")
        for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
            if key in values and values[key] <= 0:
                problems.append(f"ae.{key}: must be a positive number of seconds")
    if section == "audit":
        if values.get("max_mb", 1) < 1:
            problems.append("audit.max_mb: must be at least 1")
        if values.get("backups", 1) < 1:
            problems.append("audit.backups: must be at least 1")
        why = syslog_problem(values.get("syslog", ""))
        if why:
            problems.append(f"audit.syslog: {why}")
        elif values.get("syslog") and values.get("enabled") is False:
            problems.append("audit.syslog: needs audit.enabled (the lines it sends are the"
                            " audit trail's)")
    if section == "storage" and (why := endpoint_problem(values.get("s3_endpoint", ""))):
        problems.append(f"storage.s3_endpoint: {why}")
    for key in ("files_url", "files_previous_url"):
        if section == "storage" and values.get(key):
            why = files_url_problem(values[key])
            if why:
                problems.append(f"storage.{key}: {why}")
    if section == "query" and values.get("max_results", 0) < 0:
        problems.append("query.max_results: must not be negative (0 = no limit)")
    if section == "query" and "response_charset" in values:
        why = response_charset_problem(values["response_charset"])
        if why:
            problems.append(f"query.response_charset: {why}, not {values['response_charset']!r}")
    if section.startswith("peers["):
        _check_peer(section, values, problems)
    if section == "retention":
        if not 0 <= values.get("max_age_days", 0) <= MAX_RETENTION_DAYS:
            problems.append(f"retention.max_age_days: must be from 0 (no age rule) to"
                            f" {MAX_RETENTION_DAYS}")
        if not 0 <= values.get("max_disk_percent", 0) < 100:
            problems.append("retention.max_disk_percent: must be from 0 (no disk rule) to"
                            " less than 100")
        if not 0 < values.get("interval_minutes", 1) <= MAX_INTERVAL_MINUTES:
            problems.append(f"retention.interval_minutes: must be more than 0, at most"
                            f" {MAX_INTERVAL_MINUTES}")
        for search in values.get("protect", ()):
            why = protect_problem(search_pairs(search)) if search_pairs(search) else \
                "it is empty"
            if why:
                problems.append(f"retention.protect: {search!r}: {why} (a study-level"
                                " QIDO-RS search such as ModalitiesInStudy=MG or"
                                " PatientID=VIP*&StudyDate=-20151231)")
    if section.startswith("routes["):
        _check_route(section, values, problems)
    if section.startswith("profiles["):
        _check_profile(section, values, problems)
    if section == "routing":
        for key in ("retry_seconds", "retry_max_seconds"):
            if key in values and values[key] <= 0:
                problems.append(f"routing.{key}: must be a positive number of seconds")
        if values.get("max_attempts", 1) < 1:
            problems.append("routing.max_attempts: must be at least 1")
    if section == "tls":
        _check_tls(values, problems)
    if section == "web":
        _check_listener("web", values, problems)
        check_web(values, problems)
    if section == "storage":
        for key in ("max_instance_mb", "min_free_disk_mb"):
            if values.get(key, 0) < 0:
                problems.append(f"storage.{key}: must not be negative (0 = no limit)")
        url = values.get("index_url")
        if url and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            problems.append(
                "storage.index_url: must start with sqlite:/// or postgresql:// (or be empty)"
            )


def _check_peer(section: str, values: dict[str, Any], problems: list[str]) -> None:
    for key in PEER_REQUIRED:
        if not str(values.get(key, "")).strip(" "):
            problems.append(f"{section}.{key}: is required")
    title = values.get("ae_title")
    if title and (why := validate_ae_title(title)):
        problems.append(f"{section}.ae_title: {why}")
    port = values.get("port")
    if port is not None and not 1 <= port <= 65535:
        problems.append(f"{section}.port: must be between 1 and 65535, not {port}")
    if values.get("max_pdu_size", 0) < 0:
        problems.append(f"{section}.max_pdu_size: must not be negative (0 = ae.max_pdu_size)")
    connections = values.get("connections", 1)
    if not 1 <= connections <= MAX_CONNECTIONS:
        problems.append(f"{section}.connections: must be between 1 and {MAX_CONNECTIONS},"
                        f" not {connections}")
    network = values.get("network")
    if network:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(f"{section}.network: must be an address or network such as"
                            f" 10.1.2.0/24, not {network!r}")
    unknown = [v for v in values.get("services", ()) if v not in SERVICES]
    if unknown:
        problems.append(f"{section}.services: unknown {', '.join(map(repr, unknown))}"
                        f" (known: {', '.join(SERVICES)})")
    syntax = values.get("transfer_syntax")
    if syntax and syntax not in PEER_TRANSFER_SYNTAXES:
        allowed = ", ".join(PEER_TRANSFER_SYNTAXES)
        problems.append(
            f"{section}.transfer_syntax: must be empty (as stored) or one of {allowed},"
            f" not {syntax!r}"
        )


def _check_route(section: str, values: dict[str, Any], problems: list[str]) -> None:
    for key in ROUTE_REQUIRED:
        if not values.get(key):
            problems.append(f"{section}.{key}: is required")
    name = values.get("name", "")
    if name and (len(name) > 64 or not name.isprintable()):
        problems.append(f"{section}.name: must be at most 64 printable characters")
    for keyword in values.get("match", {}):
        if why := match_key_problem(keyword):
            problems.append(f"{section}.match: {why}")
    if values.get("stable_seconds", 0) < 0:
        problems.append(f"{section}.stable_seconds: must not be negative")


def _check_profile(section: str, values: dict[str, Any], problems: list[str]) -> None:
    for key in PROFILE_REQUIRED:
        if not values.get(key):
            problems.append(f"{section}.{key}: is required")
    name = values.get("name", "")
    if name and (len(name) > 64 or not name.isprintable() or "/" in name):
        problems.append(f"{section}.name: must be at most 64 printable characters, no \"/\"")
    wrong = False
    for option in values.get("options", ()):
        if why := option_problem(option):
            problems.append(f"{section}.options: {why}")
            wrong = True
    for text in values.get("safe_private", ()):
        if why := safe_private_problem(text):
            problems.append(f"{section}.safe_private: {why}")
            wrong = True
    if not wrong and name:
        entry = ProfileConfig(**{k: v for k, v in values.items()
                                 if k in ("name", "options", "safe_private")})
        problems.extend(f"{section}: {why}" for why in profile_of(entry).problems())


def _check_deidentify(settings: DeidentifyConfig, profiles: tuple[ProfileConfig, ...],
                      peers: tuple[PeerConfig, ...], web: WebConfig,
                      problems: list[str]) -> None:
    """A profile needs the standard's table and the secret (PS3.15 E.3.10: replacements
    nobody without the key can link back); a peer and a web account name a profile there
    is."""
    names = {p.name for p in profiles}
    for i, peer in enumerate(peers):
        if peer.deidentify and peer.deidentify not in names:
            problems.append(f"peers[{i}].deidentify: {peer.deidentify!r} is not the name of"
                            " a profiles entry")
    for i, entry in enumerate(web.deidentify):
        account, sep, profile = entry.rpartition(":")
        if sep and account and profile and profile not in names:  # else web.config says
            problems.append(f"web.deidentify[{i}]: {profile!r} is not the name of a profiles"
                            " entry")
    if not profiles:
        return
    if not settings.table:
        problems.append("deidentify.table: is required when profiles are configured: the"
                        " path of PS3.15's DocBook source, part15.xml (README:"
                        " De-identification)")
    elif not Path(settings.table).is_file():
        problems.append(f"deidentify.table: {settings.table} is not a file")
    if len(settings.secret) < MIN_SECRET_LENGTH:
        problems.append(f"deidentify.secret: must have at least {MIN_SECRET_LENGTH}"
                        " characters when profiles are configured")


def _check_tls(values: dict[str, Any], problems: list[str]) -> None:
    _check_listener("tls", values, problems)
    if not values.get("enabled", False):
        if values.get("only"):
            problems.append("tls.only: needs tls.enabled (else nothing would listen)")
        return
    missing = [k for k in ("certificate", "private_key") if not values.get(k)]
    if values.get("require_client_cert", True) and not values.get("ca_certificates"):
        missing.append("ca_certificates")
    for key in missing:
        problems.append(f"tls.{key}: is required when tls.enabled is true")
    if missing:
        return
    from .tls import server_context  # ssl is only needed when TLS is on

    try:
        server_context(TLSConfig(**values))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        problems.append(f"tls: the certificate, key or CA file cannot be used: {exc}")
