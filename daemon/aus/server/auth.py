"""API keys: ``<key id>:<secret>``, scoped to one org.

Only a salted scrypt hash of the secret is stored. Checking scrypt costs
tens of milliseconds on purpose, so a verified token is remembered for
:data:`CACHE_SECONDS` under its SHA-256 (never the token itself).

An unknown key id costs the same scrypt (against a dummy hash) and gets
the same answer as a wrong secret or a revoked key, so answers and timing
tell nothing about which key ids exist. Checks that need scrypt are
limited per source address (:mod:`.ratelimit`); a token in the cache
passes without one, from any address.

Revoking a key bumps the revocation generation in the database; every
process reads it at most :data:`REVOCATION_CHECK_SECONDS` apart and drops
its cache when it changed, and the process that revoked the key drops its
own at once. A revoked key is refused like a wrong secret, cached or not.

A verified key carries its scopes (:mod:`.scopes`); what each route needs
is decided in :mod:`.access`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
import threading
import time
from typing import NamedTuple

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import AusError
from . import audit, enforcement, scopes
from .db import ApiKey, AuthState, Org, utcnow
from .ratelimit import FailureLimiter

CACHE_SECONDS = 60.0
REVOCATION_CHECK_SECONDS = 2.0
BAD_CREDENTIALS = "invalid API key: unknown or revoked key id, or wrong secret"
_SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)


class Key(NamedTuple):
    """A verified API key: its id, its org and what it may do."""
    id: str
    org_id: str
    scopes: tuple[str, ...]


class AuthError(AusError):
    """Missing, malformed, unknown, revoked or wrong credentials (401), a
    key of another org (403), or too many failed checks (429, with
    ``retry_after`` seconds)."""

    def __init__(self, message: str, status: int = 401, retry_after: int | None = None):
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8", "surrogatepass"), salt=salt, **_SCRYPT)


# Checked against for unknown key ids, so they cost what a known one does.
_DUMMY_SALT = secrets.token_bytes(16)
_dummy_hash: bytes | None = None


def _dummy() -> bytes:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _hash(secrets.token_urlsafe(32), _DUMMY_SALT)
    return _dummy_hash


def ensure_org(session: Session, org_id: str) -> Org:
    org = session.get(Org, org_id)
    if org is None:
        org = Org(id=org_id, generation=0)
        session.add(org)
        session.flush()
        enforcement.new_org(session, org_id)
    return org


def key_view(key: ApiKey) -> dict:
    """A key as listed and audited: never its secret or hash."""
    def iso(t):  # noqa: ANN001, ANN202 - a datetime or None
        return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None
    return {"id": key.id, "label": key.label or "", "scopes": list(scopes.parse(key.scopes)),
            "created_at": iso(key.created_at), "revoked_at": iso(key.revoked_at),
            "revoked": bool(key.revoked or key.revoked_at)}


def create_key(sessions: sessionmaker, org_id: str, scope_names=scopes.DEFAULT,  # noqa: ANN001
               label: str = "", who: audit.Actor | str | None = audit.CLI) -> str:
    """Create a key for ``org_id`` (created too if new) with ``scope_names``
    and ``label``; return the token, which is shown once and never stored.
    The creation is audited as made by ``who``."""
    wanted = scopes.parse(" ".join(scope_names))
    unknown = sorted(set(scope_names) - set(scopes.ALL))
    if unknown or not wanted:
        raise AusError(f"unknown scope {', '.join(map(repr, unknown)) or '(none given)'}; "
                       f"the scopes are {', '.join(scopes.ALL)}")
    key_id = "ak" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    with sessions.begin() as s:
        ensure_org(s, org_id)
        key = ApiKey(id=key_id, org_id=org_id, salt=salt, secret_hash=_hash(secret, salt),
                     scopes=scopes.render(wanted), label=label, created_at=utcnow())
        s.add(key)
        s.flush()
        audit.record(s, org_id, who, "api_key.create", key_id, after=key_view(key))
    return f"{key_id}:{secret}"


def list_keys(sessions: sessionmaker, org_id: str) -> list[dict]:
    """The org's keys, oldest first, revoked ones included."""
    with sessions() as s:
        rows = s.scalars(select(ApiKey).where(ApiKey.org_id == org_id)
                         .order_by(ApiKey.created_at, ApiKey.id)).all()
        return [key_view(k) for k in rows]


def revoke_key(sessions: sessionmaker, key_id: str, org_id: str | None = None,
               who: audit.Actor | str | None = audit.CLI) -> bool:
    """Revoke ``key_id`` (of ``org_id``, when given), bump the revocation
    generation and audit it, in one transaction; False if there is no such
    key. Revoking a revoked key changes nothing and is not audited again."""
    with sessions.begin() as s:
        key = s.get(ApiKey, key_id)
        if key is None or (org_id is not None and key.org_id != org_id):
            return False
        if key.revoked and key.revoked_at is not None:
            return True
        before = key_view(key)
        key.revoked = True
        key.revoked_at = key.revoked_at or utcnow()
        bumped = s.execute(update(AuthState).where(AuthState.id == 1)
                           .values(revocations=AuthState.revocations + 1)).rowcount
        if not bumped:
            s.add(AuthState(id=1, revocations=1))
        s.flush()
        audit.record(s, key.org_id, who, "api_key.revoke", key_id,
                     before=before, after=key_view(key))
    Verifier.forget_everywhere()   # this process: at once; others: at their next generation read
    return True


def _read_generation(s: Session) -> int:
    return s.execute(select(AuthState.revocations).where(AuthState.id == 1)).scalar() or 0


class Verifier:
    """Checks tokens against the store, with a short-lived cache that a
    revocation anywhere invalidates."""

    _instances: list["Verifier"] = []

    def __init__(self, sessions: sessionmaker, limiter: FailureLimiter | None = None):
        self.sessions = sessions
        self.limiter = limiter or FailureLimiter()
        # digest -> (key, expires, revocation generation)
        self._cache: dict[bytes, tuple[Key, float, int]] = {}
        self._lock = threading.Lock()
        self._generation = -1
        self._generation_read_at = float("-inf")
        self._flights: dict[bytes, list] = {}    # digest -> [lock, waiters]
        Verifier._instances.append(self)

    @classmethod
    def forget_everywhere(cls) -> None:
        for v in cls._instances:
            with v._lock:
                v._cache.clear()

    def _lookup(self, digest: bytes) -> Key | None:
        now = time.monotonic()
        with self._lock:
            if now - self._generation_read_at > REVOCATION_CHECK_SECONDS:
                return None   # a revocation may have happened: ask the store
            hit = self._cache.get(digest)
            if hit and hit[1] > now and hit[2] == self._generation:
                return hit[0]
        return None

    def _note_generation(self, generation: int, read_at: float) -> None:
        with self._lock:
            if generation > self._generation:   # it only grows; an older read changes nothing
                self._cache.clear()
                self._generation = generation
            self._generation_read_at = max(self._generation_read_at, read_at)

    def _refresh_generation(self) -> None:
        read_at = time.monotonic()
        if read_at - self._generation_read_at <= REVOCATION_CHECK_SECONDS:
            return
        with self.sessions() as s:
            s.connection(execution_options={"read_only": True})
            generation = _read_generation(s)
        self._note_generation(generation, read_at)

    def cached(self, token: str) -> Key | None:
        """The key if this token was verified recently and no revocation
        check is due; no I/O, so the event loop may call it."""
        return self._lookup(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())

    def verify(self, token: str, source: str | None = None) -> Key:
        """Return the key of a valid token, else AuthError.
        ``source`` (the client address) is what failed checks are limited by."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        self._refresh_generation()
        hit = self._lookup(digest)
        if hit:
            return hit
        # One check per token at a time: a client opening many connections
        # at once with a token not yet cached waits for the first check's
        # answer instead of running (and being limited for) a hash each.
        with self._lock:
            flight = self._flights.setdefault(digest, [threading.Lock(), 0])
            flight[1] += 1
        try:
            with flight[0]:
                return self._lookup(digest) or self._check(token, digest, source)
        finally:
            with self._lock:
                flight[1] -= 1
                if not flight[1]:
                    del self._flights[digest]

    def _check(self, token: str, digest: bytes, source: str | None) -> Key:
        key_id, sep, secret = token.partition(":")
        if not sep or not key_id or not secret:
            raise AuthError("the credentials must have the form <api_key>:<secret>")
        source = source or "-"
        wait = self.limiter.take(source)
        if wait:
            raise AuthError(f"too many failed authentication attempts from {source}; "
                            f"retry in {max(1, math.ceil(wait))} s", 429,
                            retry_after=max(1, math.ceil(wait)))   # never too early
        read_at = time.monotonic()
        with self.sessions() as s:
            s.connection(execution_options={"read_only": True})   # no SQLite write lock
            generation = _read_generation(s)
            key = s.get(ApiKey, key_id[:64])
            found = (key.org_id, key.salt, key.secret_hash, key.revoked or key.revoked_at is not None,
                     scopes.parse(key.scopes)) if key else None
        self._note_generation(generation, read_at)
        if found is None:
            hmac.compare_digest(_hash(secret, _DUMMY_SALT), _dummy())
            raise AuthError(BAD_CREDENTIALS)
        org_id, salt, want, revoked, granted = found
        if not hmac.compare_digest(_hash(secret, salt), want) or revoked:
            raise AuthError(BAD_CREDENTIALS)
        self.limiter.give_back(source)
        verified = Key(key_id, org_id, granted)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            if generation == self._generation:
                self._cache[digest] = (verified, time.monotonic() + CACHE_SECONDS, generation)
        return verified

    def for_org(self, token: str, org_id: str | None, *, cached_only: bool = False,
                source: str | None = None) -> Key | None:
        """Verify ``token`` and that it belongs to ``org_id`` (any org when
        None); return the key. With ``cached_only``, return None when the
        cache cannot tell."""
        key = self.cached(token) if cached_only else self.verify(token, source)
        if key is not None and org_id is not None and key.org_id != org_id:
            raise AuthError(f"this API key belongs to another org, not org {org_id!r}", 403)
        return key


def client_address(request) -> str:  # noqa: ANN001 - a Starlette Request
    """The address failed checks are counted against."""
    return request.client.host if request.client else "-"


def token_from_header(value: str | None, *, basic: bool, bearer: bool) -> str:
    """The ``<key>:<secret>`` carried by an Authorization header."""
    if not value:
        raise AuthError("missing Authorization header")
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if bearer and scheme == "bearer" and rest:
        return rest
    if basic and scheme == "basic" and rest:
        try:
            return base64.b64decode(rest.encode("ascii"), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeError, ValueError):
            raise AuthError("malformed Basic credentials: not base64 of UTF-8 text") from None
    wanted = " or ".join(n for n, ok in (("Bearer", bearer), ("Basic", basic)) if ok)
    raise AuthError(f"unsupported Authorization scheme; use {wanted}")
