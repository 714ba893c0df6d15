"""API keys: ``<key id>:<secret>``, scoped to one org.

Only a salted scrypt hash of the secret is stored. Checking scrypt costs
tens of milliseconds on purpose, so a verified token is remembered for
:data:`CACHE_SECONDS` under its SHA-256 (never the token itself); revoking a
key reaches other replicas within that time, this one at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import AusError
from .db import ApiKey, Org

CACHE_SECONDS = 60.0
_SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)


class AuthError(AusError):
    """Missing, malformed, unknown, revoked or wrong credentials (401), or a
    key of another org (403)."""

    def __init__(self, message: str, status: int = 401):
        self.status = status
        super().__init__(message)


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def ensure_org(session: Session, org_id: str) -> Org:
    org = session.get(Org, org_id)
    if org is None:
        org = Org(id=org_id, generation=0)
        session.add(org)
        session.flush()
    return org


def create_key(sessions: sessionmaker, org_id: str) -> str:
    """Create a key for ``org_id`` (created too if new); return the token,
    which is shown once and never stored."""
    key_id = "ak" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    with sessions.begin() as s:
        ensure_org(s, org_id)
        s.add(ApiKey(id=key_id, org_id=org_id, salt=salt, secret_hash=_hash(secret, salt)))
    return f"{key_id}:{secret}"


def revoke_key(sessions: sessionmaker, key_id: str) -> bool:
    with sessions.begin() as s:
        key = s.get(ApiKey, key_id)
        if key is None:
            return False
        key.revoked = True
    Verifier.forget_everywhere()
    return True


class Verifier:
    """Checks tokens against the store, with a short-lived cache."""

    _instances: list["Verifier"] = []

    def __init__(self, sessions: sessionmaker):
        self.sessions = sessions
        self._cache: dict[bytes, tuple[str, str, float]] = {}
        self._lock = threading.Lock()
        Verifier._instances.append(self)

    @classmethod
    def forget_everywhere(cls) -> None:
        for v in cls._instances:
            with v._lock:
                v._cache.clear()

    def cached(self, token: str) -> tuple[str, str] | None:
        """``(key id, org id)`` if this token was verified recently; no I/O,
        so the event loop may call it directly."""
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            hit = self._cache.get(digest)
        if hit and hit[2] > time.monotonic():
            return hit[0], hit[1]
        return None

    def verify(self, token: str) -> tuple[str, str]:
        """Return ``(key id, org id)`` for a valid token, else AuthError."""
        hit = self.cached(token)
        if hit:
            return hit
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        key_id, sep, secret = token.partition(":")
        if not sep or not key_id or not secret:
            raise AuthError("the credentials must have the form <api_key>:<secret>")
        with self.sessions() as s:
            s.connection(execution_options={"read_only": True})   # no SQLite write lock
            key = s.get(ApiKey, key_id)
            found = (key.org_id, key.salt, key.secret_hash, key.revoked) if key else None
        if found is None or found[3]:
            raise AuthError("unknown or revoked API key")
        org_id, salt, want, _ = found
        if not hmac.compare_digest(_hash(secret, salt), want):
            raise AuthError("wrong secret for this API key")
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (key_id, org_id, now + CACHE_SECONDS)
        return key_id, org_id

    def for_org(self, token: str, org_id: str, *, cached_only: bool = False) -> str | None:
        """Verify ``token`` and that it belongs to ``org_id``; return the key
        id. With ``cached_only``, return None when the cache cannot tell."""
        if cached_only:
            hit = self.cached(token)
            if hit is None:
                return None
            key_id, key_org = hit
        else:
            key_id, key_org = self.verify(token)
        if key_org != org_id:
            raise AuthError(f"this API key belongs to another org, not org {org_id!r}", 403)
        return key_id


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
            return base64.b64decode(rest, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError("malformed Basic credentials") from None
    wanted = " or ".join(n for n, ok in (("Bearer", bearer), ("Basic", basic)) if ok)
    raise AuthError(f"unsupported Authorization scheme; use {wanted}")
