"""Who may read and who may write: the ``web`` section's access rules and credentials.

A request with credentials gets the rights of the account they name: an HTTP Basic user of
``web.users`` (RFC 7617; the password checked against its scrypt hash) or a bearer token of
``web.tokens`` (RFC 6750; the token checked against its SHA-256). A request without
credentials gets ``web.anonymous_local`` rights when it comes from this machine (a loopback
address) and ``web.anonymous_remote`` otherwise. Reading (GET, HEAD) needs ``read``;
storing (POST, STOW-RS) needs ``read-write``. Unknown or wrong credentials, or none where
some are needed, are answered 401; too few rights for the method with credentials, 403.
The viewer's static files (``/viewer/``) hold no patient data and are served to anyone.

A password's hash costs a slow key derivation (scrypt, :data:`SCRYPT_LOG_N`), so a
verified password is remembered (:class:`Accounts`, :data:`CACHE_SIZE` entries keyed by an
HMAC of the credentials): a viewer's hundreds of requests a minute cost one derivation.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import anyio
import anyio.to_thread
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import FORBIDDEN, UNAUTHORIZED

logger = logging.getLogger("minipacs.web")

NONE = "none"
READ = "read"
READ_WRITE = "read-write"
RIGHTS: tuple[str, ...] = (NONE, READ, READ_WRITE)
"""What a user, a token or an anonymous client may do: nothing, GET/HEAD, or also POST."""
ACCOUNT_RIGHTS: tuple[str, ...] = (READ, READ_WRITE)
"""The rights a user or a token may have (an account with none would be no account)."""

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PREFIX = "/viewer"
HEALTH_PATH = "/healthz"
"""The viewer's static files: served without credentials (they hold no patient data)."""
REALM = "minipacs"

SCRYPT = "scrypt"
SCRYPT_LOG_N = 15
"""The scrypt cost of a new hash: N = 2**15, with r = 8 and p = 3 OWASP's minimum
(Password Storage Cheat Sheet): 32 MiB and about a quarter of a second per derivation."""
SCRYPT_R = 8
SCRYPT_P = 3
MIN_SCRYPT_LOG_N = 14
"""A configured hash of a lower cost is refused."""
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
"""A configured hash needing more memory (128 * r * N bytes) is refused."""
MAX_SCRYPT_P = 16
SALT_BYTES = 16
KEY_BYTES = 32
MIN_KEY_BYTES = 16
TOKEN_HASH = "sha256"
TOKEN_BYTES = 32
"""Random bytes in a new bearer token (``secrets.token_urlsafe``: 43 characters)."""

CACHE_SIZE = 256
"""Verified passwords remembered (least recently used first out)."""
KDF_THREADS = 2
"""Password derivations run at once; more requests wait, so that a flood of wrong
passwords costs at most this many derivations' memory and cores."""


# -- hashes ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    """Base64 without padding, as the PHC string format writes salts and hashes."""
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@dataclass(frozen=True)
class PasswordHash:
    """A salted scrypt hash (RFC 7914), written as a PHC string:
    ``$scrypt$ln=15,r=8,p=3$<salt>$<hash>`` (base64 without padding)."""

    log_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def __str__(self) -> str:
        return (f"${SCRYPT}$ln={self.log_n},r={self.r},p={self.p}"
                f"${_b64(self.salt)}${_b64(self.key)}")

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """The hash written in ``text``.

        Raises
        ------
        ValueError
            ``text`` is not such a hash, or its cost is out of bounds (why, in one line).
        """
        parts = text.split("$")
        if len(parts) != 5 or parts[0] or parts[1] != SCRYPT:
            raise ValueError(f"must look like ${SCRYPT}$ln=..,r=..,p=..$<salt>$<hash>")
        try:
            params = dict(item.split("=", 1) for item in parts[2].split(","))
            log_n, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        except (ValueError, KeyError):
            raise ValueError("its parameters must be ln=<int>,r=<int>,p=<int>") from None
        if set(params) != {"ln", "r", "p"}:
            raise ValueError("its parameters must be ln=<int>,r=<int>,p=<int>")
        try:
            salt, key = _unb64(parts[3]), _unb64(parts[4])
        except ValueError:  # binascii.Error is one
            raise ValueError("its salt and hash must be base64") from None
        if log_n < MIN_SCRYPT_LOG_N or r < 1 or not 1 <= p <= MAX_SCRYPT_P:
            raise ValueError(f"too weak: ln must be at least {MIN_SCRYPT_LOG_N}, r at least 1"
                             f" and p between 1 and {MAX_SCRYPT_P}")
        if 128 * r * 2**log_n > MAX_SCRYPT_MEMORY:
            raise ValueError(f"needs more than {MAX_SCRYPT_MEMORY // 2**20} MiB (128 * r * 2**ln)")
        if len(salt) < SALT_BYTES or len(key) < MIN_KEY_BYTES:
            raise ValueError(f"its salt must have at least {SALT_BYTES} bytes and its hash"
                             f" at least {MIN_KEY_BYTES}")
        return cls(log_n, r, p, salt, key)

    def matches(self, password: bytes) -> bool:
        """Whether ``password`` (UTF-8) has this hash; compared in constant time."""
        derived = _scrypt(password, self.salt, self.log_n, self.r, self.p, len(self.key))
        return hmac.compare_digest(derived, self.key)


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int, size: int) -> bytes:
    n = 2**log_n
    # OpenSSL's limit: 128 * r * p bytes for B and 128 * r * (N + 2) for V (RFC 7914 5)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p,
                          maxmem=128 * r * (n + p + 2), dklen=size)


def hash_password(password: str) -> str:
    """The hash of ``password`` for ``web.users``: scrypt with a new random salt and the
    cost of :data:`SCRYPT_LOG_N`, as a PHC string."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password.encode("utf-8"), salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return str(PasswordHash(SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, salt, key))


def new_token() -> str:
    """A new random bearer token (:data:`TOKEN_BYTES` bytes, URL-safe base64)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The hash of ``token`` for ``web.tokens``: ``$sha256$<base64>``. A fast hash is
    enough for a token of :data:`TOKEN_BYTES` random bytes (nobody can guess one)."""
    return f"${TOKEN_HASH}${_b64(_token_digest(token))}"


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_token_hash(text: str) -> bytes:
    """The SHA-256 digest written in ``text`` (:func:`hash_token`).

    Raises
    ------
    ValueError
        ``text`` is not such a hash.
    """
    parts = text.split("$")
    digest = b""
    if len(parts) == 3 and not parts[0] and parts[1] == TOKEN_HASH:
        with contextlib.suppress(ValueError):  # binascii.Error is one
            digest = _unb64(parts[2])
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError(f"must look like ${TOKEN_HASH}$<43 base64 characters>")
    return digest


# -- accounts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A user or a token of the configuration, without its secret."""

    name: str
    rights: str


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a user or a token, or ``None``."""
    if not name:
        return "its name is empty"
    if ":" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "its name must have no colon and no control characters"
    return None


def parse_entry(entry: str) -> tuple[Account, str]:
    """The account of a ``web.users`` or ``web.tokens`` entry (``name:rights:hash``) and
    its hash, unparsed.

    Raises
    ------
    ValueError
        The entry is not ``name:rights:hash`` or its name or rights are wrong.
    """
    name, sep, rest = entry.partition(":")
    rights, sep2, secret = rest.partition(":")
    if not (sep and sep2):
        raise ValueError('must be "name:rights:hash"')
    if why := name_problem(name):
        raise ValueError(why)
    if rights not in ACCOUNT_RIGHTS:
        raise ValueError(f"rights must be {' or '.join(ACCOUNT_RIGHTS)}, not {rights!r}")
    return Account(name, rights), secret


def entry_problems(key: str, entries: Iterable[str]) -> list[str]:
    """What is wrong with the entries of ``key`` (``web.users`` or ``web.tokens``), one
    line each, all at once."""
    problems: list[str] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    tokens = key.endswith("tokens")
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        try:
            account, secret = parse_entry(entry)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        where = f"{where} ({account.name})"
        try:
            if tokens:
                digest = parse_token_hash(secret)
                if digest in digests:
                    problems.append(f"{where}: the same token as another entry")
                digests.add(digest)
            else:
                PasswordHash.parse(secret)
        except ValueError as exc:
            command = "new-token" if tokens else "hash-password"
            problems.append(f"{where}: not a hash from minipacs {command}: {exc}")
        if account.name in names:
            problems.append(f"{where}: the name is listed more than once")
        names.add(account.name)
    return problems


def deidentified_accounts(entries: Iterable[str]) -> dict[str, str]:
    """``web.deidentify`` (``account:PROFILE`` entries, checked by
    :func:`deidentify_problems`) as account name -> profile."""
    return {account: profile for account, _, profile in (e.rpartition(":") for e in entries)}


def deidentify_problems(entries: Iterable[str], accounts: Iterable[str]) -> list[str]:
    """What is wrong with ``web.deidentify`` (each ``account:PROFILE``, the account a
    user or a token of ``accounts``, the ``web.users`` and ``web.tokens`` entries), one line
    each. That the profile is configured is checked with the other sections."""
    names = set()
    for entry in accounts:
        with contextlib.suppress(ValueError):
            names.add(parse_entry(entry)[0].name)
    problems: list[str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        account, sep, profile = entry.rpartition(":")
        where = f"web.deidentify[{i}]"
        if not (sep and account and profile):
            problems.append(f'{where}: must be "account:PROFILE", not {entry!r}')
        elif account not in names:
            problems.append(f"{where}: {account!r} is not the name of a web.users or"
                            " web.tokens entry")
        elif account in seen:
            problems.append(f"{where}: {account!r} is listed more than once")
        seen.add(account)
    return problems


class Accounts:
    """The users and tokens of a configuration, and the passwords verified lately.

    Parameters
    ----------
    users, tokens : iterable of str
        ``web.users`` and ``web.tokens`` (checked by :func:`entry_problems` beforehand).
    cache_size : int
        How many verified passwords to remember.
    """

    def __init__(self, users: Iterable[str], tokens: Iterable[str],
                 cache_size: int = CACHE_SIZE) -> None:
        self.users: dict[str, tuple[Account, PasswordHash]] = {}
        for entry in users:
            account, secret = parse_entry(entry)
            self.users[account.name] = (account, PasswordHash.parse(secret))
        self.tokens: list[tuple[bytes, Account]] = []
        for entry in tokens:
            account, secret = parse_entry(entry)
            self.tokens.append((parse_token_hash(secret), account))
        self.kdf_runs = 0
        """Password derivations so far (each a cache miss)."""
        # an unknown user costs a derivation too (against a random hash that matches
        # nothing), so that time tells no names
        cost = next(iter(self.users.values()))[1] if self.users else PasswordHash(
            SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, b"", bytes(KEY_BYTES))
        self._decoy = PasswordHash(cost.log_n, cost.r, cost.p, secrets.token_bytes(SALT_BYTES),
                                   secrets.token_bytes(KEY_BYTES))
        self._cache_key = secrets.token_bytes(KEY_BYTES)
        self._cache: OrderedDict[bytes, Account] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _cache_slot(self, credentials: bytes) -> bytes:
        return hmac.new(self._cache_key, credentials, hashlib.sha256).digest()

    def remembered(self, credentials: bytes) -> Account | None:
        """The account of Basic ``credentials`` (``user:password``) if verified lately."""
        slot = self._cache_slot(credentials)
        with self._lock:
            account = self._cache.get(slot)
            if account is not None:
                self._cache.move_to_end(slot)
            return account

    def verify_password(self, credentials: bytes) -> Account | None:
        """The account of Basic ``credentials`` (``user:password``, RFC 7617), or ``None``
        when the user is unknown or the password wrong; one scrypt derivation (slow: run it
        in a worker thread). A match is remembered."""
        user, _, password = credentials.partition(b":")
        try:
            known = self.users.get(user.decode("utf-8"))
        except UnicodeDecodeError:
            known = None
        with self._lock:
            self.kdf_runs += 1
        if known is None:
            self._decoy.matches(password)
            return None
        account, hashed = known
        if not hashed.matches(password):
            return None
        slot = self._cache_slot(credentials)
        with self._lock:
            self._cache[slot] = account
            self._cache.move_to_end(slot)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return account

    def verify_token(self, token: str) -> Account | None:
        """The account of a bearer ``token``, or ``None``; every configured token is
        compared, each in constant time."""
        digest = _token_digest(token)
        found: Account | None = None
        for known, account in self.tokens:
            if hmac.compare_digest(digest, known):
                found = account
        return found


# -- the rules -----------------------------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (the peer's address) is this machine (an IPv4 address mapped into
    IPv6, as a dual-stack listener sees it, counts as itself)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


LOCAL_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
"""Host names of this machine that need no resolving."""


def names_this_machine(host_header: str | None) -> bool:
    """Whether the ``Host`` header (RFC 9110 7.2) names this machine: ``localhost`` or a
    loopback address, with any port. A browser page whose name an attacker re-points at
    127.0.0.1 (DNS rebinding) sends its own name: its requests then count as remote."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # an IPv6 literal: [::1]:8080
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host in LOCAL_NAMES or is_loopback(host)


def allows(rights: str, method: str) -> bool:
    """Whether ``rights`` (none, read, read-write) allow ``method``."""
    if rights == READ_WRITE:
        return True
    return rights == READ and method in READ_METHODS


def is_public(path: str) -> bool:
    """Whether ``path`` is served to anyone: the viewer's, and the health check's (a load
    balancer has no credentials; :mod:`web.health` says only up or down)."""
    return path in (PUBLIC_PREFIX, HEALTH_PATH) or path.startswith(PUBLIC_PREFIX + "/")


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base + "/")


class Refusal(Exception):
    """Credentials that name no account (answered 401)."""


class AccessRules(Protocol):
    """What :class:`AccessMiddleware` reads of the ``web`` section
    (:class:`web.config.WebConfig`, which checks its entries with :func:`entry_problems`)."""

    @property
    def users(self) -> tuple[str, ...]: ...

    @property
    def tokens(self) -> tuple[str, ...]: ...

    @property
    def anonymous_local(self) -> str: ...

    @property
    def anonymous_remote(self) -> str: ...

    @property
    def deidentify(self) -> tuple[str, ...]: ...

    @property
    def base_path(self) -> str: ...


class AccessMiddleware:
    """Refuse with 401 (no, unknown or wrong credentials) or 403 (not enough rights) before
    any endpoint runs; log each refusal at INFO with the peer and the reason. An allowed
    request carries its rights and account name in ``scope["minipacs.rights"]`` and
    ``scope["minipacs.user"]`` (empty when anonymous).

    An account of ``web.deidentify`` sees data de-identified by its profile: its request
    carries the profile's name in ``scope["minipacs.profile"]`` (empty for the others); it
    may only read, and only DICOMweb (``web.base_path``): the page and ``/metrics`` show
    what is stored as it is, so they answer it 403."""

    def __init__(self, app: ASGIApp, config: AccessRules) -> None:
        self.app = app
        self.config = config
        self.accounts = Accounts(config.users, config.tokens)
        self.profiles = deidentified_accounts(config.deidentify)
        self._kdf_limiter = anyio.CapacityLimiter(KDF_THREADS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = client[0] if client else None
        method = scope["method"]
        authorization = Headers(scope=scope).get("authorization")
        if authorization is None:
            # this machine's anonymous rights need a local peer that also calls us by a
            # local name: a rebound DNS name on a local browser's page is a remote site
            local = is_loopback(peer) and names_this_machine(Headers(scope=scope).get("host"))
            rights = self.config.anonymous_local if local else self.config.anonymous_remote
            name = ""
            if not allows(rights, method):
                why = ("credentials are required" if rights == NONE
                       else f"credentials are required: {method} needs read-write rights")
                await self._refuse(scope, receive, send, UNAUTHORIZED, why)
                return
        else:
            try:
                account = await self._authenticate(authorization)
            except Refusal as exc:
                bearer = authorization.lstrip().lower().startswith("bearer")
                await self._refuse(scope, receive, send, UNAUTHORIZED, str(exc), bearer)
                return
            rights, name = account.rights, account.name
            if not allows(rights, method):
                await self._refuse(scope, receive, send, FORBIDDEN,
                                   f"{name} may not {method}: it needs read-write rights")
                return
        profile = self.profiles.get(name, "") if name else ""
        if profile and (method not in READ_METHODS or not _under(scope["path"],
                                                                  self.config.base_path)):
            await self._refuse(scope, receive, send, FORBIDDEN,
                               f"{name} sees de-identified data ({profile}): it may only"
                               " search and retrieve through DICOMweb")
            return
        scope["minipacs.rights"] = rights
        scope["minipacs.user"] = name
        scope["minipacs.profile"] = profile
        await self.app(scope, receive, send)

    async def _authenticate(self, authorization: str) -> Account:
        """The account that the ``Authorization`` header names.

        Raises
        ------
        Refusal
            The header is malformed, of another scheme, or names no account.
        """
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":  # RFC 6750 2.1
            account = self.accounts.verify_token(value) if value else None
            if account is None:
                raise Refusal("unknown bearer token")
            return account
        if scheme.lower() != "basic":
            raise Refusal(f"unsupported authorization scheme {scheme[:20]!r}")
        try:  # RFC 7617 2: base64 of user-id ":" password
            credentials = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error is one
            credentials = b""
        if b":" not in credentials:
            raise Refusal("malformed Basic credentials")
        account = self.accounts.remembered(credentials)
        if account is None:
            account = await anyio.to_thread.run_sync(
                self.accounts.verify_password, credentials, limiter=self._kdf_limiter)
        if account is None:
            user = credentials.partition(b":")[0].decode("utf-8", "replace")
            raise Refusal(f"unknown user or wrong password (user {user[:64]!r})")
        return account

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int,
                      reason: str, bearer: bool = False) -> None:
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "unknown peer"
        logger.info("refused %s %r from %s: %d %s", scope["method"], scope["path"], peer,
                    status, reason)
        response = PlainTextResponse(reason + "\n", status)
        if status == UNAUTHORIZED:
            response.headers.append("www-authenticate", f'Basic realm="{REALM}"')
            if self.accounts.tokens:
                error = ', error="invalid_token"' if bearer else ""  # RFC 6750 3
                response.headers.append("www-authenticate", f'Bearer realm="{REALM}"{error}')
        await response(scope, receive, send)
