"""The TLS certificate and key of ``aus-server serve``: checked before
anything listens, and re-read on SIGHUP into the context the server
already serves with, so new connections get a renewed certificate without
a restart (established ones keep theirs).

A pair is read from its files once, into memory, and loaded into a
scratch context first; only a pair that loads there is loaded into the
live context, from the same bytes. OpenSSL replaces the certificate before
it checks the key against it, so loading an unchecked pair into the live
context could leave it half-replaced (new certificate, old key) and every
handshake failing. A refused pair leaves the live context as it was.

A renewal must keep the key type (RSA or ECDSA): OpenSSL keeps one
certificate per key type in a context, so a new ECDSA pair would sit next
to the old RSA one instead of replacing it. Changing it needs a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from typing import Iterator

from ..core.errors import AusError

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class TlsError(AusError):
    """A certificate or key that cannot be read or does not load."""


@dataclass(frozen=True)
class TlsFiles:
    cert: str     # PEM: the certificate, then its chain
    key: str      # PEM: the unencrypted private key


@dataclass(frozen=True)
class TlsPair:
    """What the files held when they were read, and checked to load."""
    files: TlsFiles
    cert: bytes
    key: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the leaf certificate (as ``openssl x509 -fingerprint
        -sha256`` prints it), to tell in the log which one is served."""
        der = ssl.PEM_cert_to_DER_cert(_PEM_CERT.search(self.cert).group().decode("ascii"))
        return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1024 * 1024)
    except OSError as exc:
        raise TlsError(f"cannot read the TLS {what} {path}: {exc.strerror}") from exc


class _Encrypted(Exception):
    pass


def _no_password() -> bytes:
    # Never let OpenSSL prompt on a terminal: an encrypted key is refused.
    raise _Encrypted


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path that reads ``data``, for APIs that take file names only."""
    fd = os.memfd_create("aus-server-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _load(ctx: ssl.SSLContext, pair: TlsPair) -> None:
    with _memory_file(pair.cert) as cert, _memory_file(pair.key) as key:
        ctx.load_cert_chain(cert, key, password=_no_password)


def check(files: TlsFiles) -> TlsPair:
    """Read the pair and load it into a scratch context; TlsError naming
    the files and what is wrong unless it loads."""
    cert, key = _read(files.cert, "certificate"), _read(files.key, "key")
    pair = TlsPair(files, cert, key)
    if not _PEM_CERT.search(cert):
        raise TlsError(f"the TLS certificate {files.cert} holds no PEM certificate")
    try:
        _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pair)
        pair.fingerprint   # noqa: B018 - a PEM block that is not base64 DER fails here
    except ssl.SSLError as exc:
        raise TlsError(f"the TLS certificate {files.cert} and key {files.key} do not load: "
                       f"{exc.reason or exc}") from exc
    except _Encrypted:
        raise TlsError(f"the TLS key {files.key} is encrypted; aus-server needs it "
                       f"unencrypted (readable by its user only)") from None
    except ValueError as exc:
        raise TlsError(f"the TLS certificate {files.cert} is not valid PEM: {exc}") from exc
    return pair


def reload(ctx: ssl.SSLContext, files: TlsFiles) -> TlsPair:
    """Load the pair in ``files`` into the live ``ctx`` if it loads on its
    own; otherwise TlsError, and ``ctx`` serves what it served."""
    pair = check(files)
    try:
        _load(ctx, pair)
    except ssl.SSLError as exc:   # the same bytes loaded a moment ago; kept for the message
        raise TlsError(f"the TLS certificate {files.cert} and key {files.key} do not load: "
                       f"{exc.reason or exc}") from exc
    return pair
