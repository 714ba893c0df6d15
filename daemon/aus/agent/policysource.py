"""ausd's client of the policy server: credentials, one long-poll request,
the retry schedule, and the thread that keeps polling.

Protocol (aus-server)::

    GET <url>?wait=<seconds>&since=<bundle version held>   (since: left out
                                                             when none is held)
    Authorization: Basic base64(<api_key>:<secret>)
    If-None-Match: <etag last received>       (left out on the first fetch)
    Accept-Encoding: gzip
    X-Aus-Workload: <hostname>
    X-Aus-Enforcing: <bundle version in force, 0 if none>
    X-Aus-Mode: <enforce | visibility: the mode in force>
    Accept: application/json

    200 + ETag: the bundle (now if the ETag differs, or as soon as it
                changes during the wait); with X-Aus-Delta-From: V and
                Content-Type application/vnd.aus.bundle-delta+json, the
                changes from version V instead, applied to the bundle held
                and checked against the digest they carry. A delta that
                does not apply is refused and the whole bundle fetched at
                once (since and If-None-Match left out).
    304:        nothing changed within the wait
    401/403/404, 5xx, connection errors: retried with capped exponential
                backoff and jitter; the bundle in force stays

HTTP through the standard library (http.client, ssl): no HTTP client
library on every workload for one long poll. The poller thread never
touches the daemon's state: it hands every bundle (or refusal) to
``deliver``, which queues it for the main loop.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import random
import socket
import ssl
import stat
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from .. import __version__
from ..core.bundle import MAX_BUNDLE_BYTES, Bundle, bundle_from_bytes, bundle_from_delta
from ..core.errors import ConfigError, PolicyError, PolicySourceError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
FIRST_CONNECT_TIMEOUT = 3.0   # at start, before READY: do not hold logins up
READ_GRACE = 15.0          # beyond the wait, before a silent server is given up
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0
QUICK_304_PAUSE = 1.0      # a server answering long polls at once must not spin us
ACK_TIMEOUT = 10.0         # how long a delivered bundle may take to be applied


# --------------------------------------------------------------------------
# Credentials


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    """(api_key, secret) from a file holding one line ``<api_key>:<secret>``.

    The file must be a regular file that neither its group nor others can
    read: the secret opens the org's policy; and owned by root (or by the
    user ausd runs as) and writable by its owner only, since whoever can
    change it can point ausd at another org's key. Raises ConfigError
    (never with the secret in the message)."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"policy_credentials {source}: cannot open: "
                          f"{exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"policy_credentials {source}: not a regular file")
        if st.st_mode & 0o044:
            raise ConfigError(
                f"policy_credentials {source}: readable by its group or by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); the secret must be readable "
                f"by its owner only: chmod 600 {source}")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"policy_credentials {source}: owned by uid {st.st_uid}, not root; "
                f"chown root:root {source}")
        if st.st_mode & 0o022:
            raise ConfigError(
                f"policy_credentials {source}: writable by its group or by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {source}")
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
            if len(raw) > 65536:
                raise ConfigError(f"policy_credentials {source}: too large for one line")
    except OSError as exc:
        raise ConfigError(f"policy_credentials {source}: cannot read: "
                          f"{exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"policy_credentials {source}: not valid UTF-8") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ConfigError(f"policy_credentials {source}: expected one line "
                          f"<api_key>:<secret>, found {len(lines)} lines")
    key, sep, secret = lines[0].partition(":")
    if not sep or not key.strip() or not secret.strip():
        raise ConfigError(f"policy_credentials {source}: expected one line "
                          "<api_key>:<secret> with both parts non-empty")
    return key.strip(), secret.strip()


# --------------------------------------------------------------------------
# Retry schedule


class Backoff:
    """Capped exponential backoff with jitter: the n-th consecutive
    failure waits a random time in [base/2, base], base = lo * 2**n capped
    at hi, and never less than lo. Spreads a fleet of workloads that lost
    the server at the same moment."""

    def __init__(self, lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX,
                 rand: Callable[[], float] = random.random):
        self.lo, self.hi, self.rand = lo, hi, rand
        self.failures = 0

    def next(self) -> float:
        base = min(self.hi, self.lo * (2 ** min(self.failures, 32)))
        self.failures += 1
        return max(self.lo, base / 2 + self.rand() * base / 2)

    def reset(self) -> None:
        self.failures = 0


# --------------------------------------------------------------------------
# One request


@dataclass(frozen=True)
class Reply:
    status: int            # 200 or 304
    etag: str | None
    body: bytes = b""      # decompressed
    delta_from: int | None = None   # a delta from this version, else the whole bundle
    wire_bytes: int = 0    # the body as it came over the wire


def inflate(body: bytes, encoding: str | None, where: str, limit: int = MAX_BUNDLE_BYTES) -> bytes:
    """A reply body decoded per its Content-Encoding, never more than
    ``limit`` bytes of it (a small gzip body can inflate to gigabytes)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise PolicySourceError("protocol", f"{where}: the reply has Content-Encoding "
                                f"{encoding[:32]!r}; ausd takes gzip or identity", 200)
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise PolicySourceError("protocol", f"{where}: the gzip reply is broken: {exc}",
                                200) from None
    if len(out) > limit:
        raise PolicySourceError("protocol", f"{where}: the gzip reply inflates to more than "
                                f"{limit} bytes; refused", 200)
    if not d.eof:
        raise PolicySourceError("protocol", f"{where}: the gzip reply is cut short", 200)
    return out


@dataclass(frozen=True)
class Answer:
    """A server's reply as it came: status, headers (lower-case names), body."""
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


_STATUS_TEXT = {
    401: ("auth", "the policy server refused the credentials (HTTP 401): check the "
                  "API key and secret in policy_credentials"),
    403: ("forbidden", "the policy server refused access (HTTP 403): the API key does "
                       "not belong to the organisation in the URL"),
    404: ("not_found", "the policy server does not know this URL (HTTP 404): check the "
                       "organisation in the policy URL"),
}


class Client:
    """Makes the long-poll requests; keeps one connection alive between
    them. ``interrupt`` ends a request in flight from another thread."""

    def __init__(self, url: str, credentials: tuple[str, str], *,
                 ca: str | os.PathLike | None = None, workload: str | None = None):
        parts = urlsplit(url)
        self.url = url
        self.https = parts.scheme.lower() == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.target = (parts.path or "/") + (f"?{parts.query}&" if parts.query else "?")
        self.workload = workload or socket.gethostname()
        self.mode: str | None = None    # the mode in force, set by the daemon
        self.set_credentials(credentials)
        self.context: ssl.SSLContext | None = None
        if self.https:
            try:
                self.context = ssl.create_default_context(
                    cafile=os.fspath(ca) if ca is not None else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"policy_ca {ca}: cannot load the CA certificates: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from exc
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()
        self._cancel = threading.Event()   # set by fetch's caller to interrupt

    def set_credentials(self, credentials: tuple[str, str]) -> None:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self._auth = f"Basic {token}"

    # -- cancellation ---------------------------------------------------------
    def interrupt(self) -> None:
        """End the request in flight: call after setting the ``cancel``
        event its fetch was given (which then raises PolicySourceError kind
        "interrupted")."""
        with self._lock:
            conn = self._conn
            if conn is not None and conn.sock is not None:
                try:
                    # The plain socket's shutdown: SSLSocket.shutdown would
                    # also drop its SSL object under the reading thread.
                    socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- the request ----------------------------------------------------------
    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._conn is not None:
                return self._conn, True
            if self.https:
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self.context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            self._conn = conn
            return conn, False

    def exchange(self, method: str, target: str, headers: dict[str, str],
                 body: bytes | None = None, *, read_timeout: float, limit: int,
                 cancel: threading.Event | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 retry_stale: bool = True) -> Answer:
        """One request on the kept-alive connection, with the credentials,
        the workload name and the user agent added. Returns the server's
        answer whatever its status; raises PolicySourceError for network
        and TLS failures and for a reply larger than ``limit``. Setting
        ``cancel`` and calling ``interrupt`` ends it early. ``retry_stale``:
        send again once when a reused connection turns out closed (only for
        requests that may safely be repeated)."""
        self._cancel = cancel or threading.Event()
        headers = {"Authorization": self._auth, "X-Aus-Workload": self.workload,
                   "User-Agent": f"ausd/{__version__}", **headers}
        for attempt in (0, 1):
            conn, reused = self._connection(connect_timeout)
            try:
                return self._once(conn, method, target, headers, body, read_timeout, limit)
            except PolicySourceError:
                self.close()
                raise
            except (http.client.RemoteDisconnected, ConnectionResetError,
                    BrokenPipeError) as exc:
                self.close()
                if self._cancel.is_set():
                    raise self._interrupted() from exc
                if reused and attempt == 0 and retry_stale:
                    continue   # the server closed an idle kept-alive connection
                raise self._network_error(exc) from exc
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.close()
                if self._cancel.is_set():
                    raise self._interrupted() from exc
                raise self._network_error(exc) from exc
        raise AssertionError("unreachable")

    def _once(self, conn: http.client.HTTPConnection, method: str, target: str,
              headers: dict[str, str], body: bytes | None, read_timeout: float,
              limit: int) -> Answer:
        if conn.sock is None:
            conn.connect()
        with self._lock:
            if self._cancel.is_set():
                raise self._interrupted()
        conn.sock.settimeout(read_timeout)
        conn.request(method, target, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(limit + 1)
        if len(data) > limit or not resp.isclosed():
            raise PolicySourceError("protocol", f"{self.url}: the reply is larger than "
                                    f"{limit} bytes", resp.status)
        if resp.will_close:
            self.close()
        return Answer(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()},
                      data)

    def fetch(self, etag: str | None, enforcing: int, wait: int,
              cancel: threading.Event | None = None,
              connect_timeout: float = CONNECT_TIMEOUT, since: int | None = None) -> Reply:
        """One long-poll GET. Returns a Reply for 200 and 304; raises
        PolicySourceError for everything else. ``since``: the version held,
        so the server may answer with a delta. Setting ``cancel`` and
        calling ``interrupt`` ends it early."""
        headers = {"Accept": "application/json, application/vnd.aus.bundle-delta+json",
                   "Accept-Encoding": "gzip", "X-Aus-Enforcing": str(enforcing)}
        if etag is not None:
            headers["If-None-Match"] = etag
        if self.mode is not None:
            headers["X-Aus-Mode"] = self.mode
        query = f"wait={wait}" + (f"&since={since}" if since is not None else "")
        ans = self.exchange("GET", f"{self.target}{query}", headers,
                            read_timeout=wait + READ_GRACE, limit=MAX_BUNDLE_BYTES,
                            cancel=cancel, connect_timeout=connect_timeout)
        new_etag = ans.headers.get("etag")
        if ans.status == 200:
            if not new_etag:
                raise PolicySourceError("protocol", f"{self.url}: the server's 200 reply "
                                        "has no ETag header", 200)
            body = inflate(ans.body, ans.headers.get("content-encoding"), self.url)
            delta_from = ans.headers.get("x-aus-delta-from")
            if delta_from is not None:
                try:
                    delta_from = int(delta_from)
                except ValueError:
                    raise PolicySourceError("protocol", f"{self.url}: X-Aus-Delta-From "
                                            f"{delta_from[:40]!r} is not a version", 200) from None
            return Reply(200, new_etag, body, delta_from, len(ans.body))
        if ans.status == 304:
            return Reply(304, new_etag or etag)
        raise http_error(ans, "the policy server")

    def _interrupted(self) -> PolicySourceError:
        return PolicySourceError("interrupted", f"{self.url}: request interrupted")

    def _network_error(self, exc: BaseException) -> PolicySourceError:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PolicySourceError("tls", f"TLS with {where}: the server's certificate "
                                     f"is not trusted: {exc.verify_message} (policy_ca "
                                     "names the CA to trust)")
        if isinstance(exc, ssl.SSLError):
            return PolicySourceError("tls", f"TLS with {where}: {exc.reason or exc}")
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return PolicySourceError("network", f"no reply from {where} in time")
        if isinstance(exc, socket.gaierror):
            return PolicySourceError("network", f"cannot resolve {self.host}: {exc.strerror}")
        if isinstance(exc, http.client.HTTPException):
            return PolicySourceError("network", f"{where} closed the connection or sent "
                                     f"a broken reply ({type(exc).__name__})")
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return PolicySourceError("network", f"cannot reach {where}: {text}")


def http_error(ans: Answer, who: str) -> PolicySourceError:
    """The PolicySourceError for a reply that is not a success: its kind
    from the status, the server's own reason appended."""
    detail = server_reason(ans.body)
    if ans.status in _STATUS_TEXT:
        kind, text = _STATUS_TEXT[ans.status]
    elif 500 <= ans.status < 600:
        kind, text = "server", f"{who} failed (HTTP {ans.status} {ans.reason})"
    else:
        kind, text = "protocol", f"unexpected reply from {who} (HTTP {ans.status} {ans.reason})"
    return PolicySourceError(kind, text + (f": {detail}" if detail else ""), ans.status)


def server_reason(body: bytes) -> str:
    """The server's short reason: {"error": {"message": ...}} (aus-server),
    {"error"|"detail"|"message": "..."}, or the text itself."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        doc = doc["error"]
    if isinstance(doc, dict):
        for key in ("message", "error", "detail"):
            if isinstance(doc.get(key), str):
                text = doc[key]
                break
    text = " ".join(text.split())
    return text[:200]


def server_fields(body: bytes, limit: int = 5) -> str:
    """The fields the server named as bad, joined: ``records[3].port,
    dropped (and 2 more)``; "" when it named none. aus-server answers
    {"error": {"message": ..., "fields": [{"field": ..., "message": ...}]}};
    a top-level "fields" list and plain strings in it are read too."""
    try:
        doc = json.loads(body[:64 << 10].decode("utf-8", "replace"))
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    fields = doc["error"].get("fields") if isinstance(doc.get("error"), dict) else None
    if not isinstance(fields, list):
        fields = doc.get("fields")
    if not isinstance(fields, list):
        return ""
    names = []
    for f in fields:
        name = f.get("field") if isinstance(f, dict) else f
        if isinstance(name, str) and name:
            names.append(" ".join(name.split())[:100])
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------
# The long-poll loop


@dataclass(frozen=True)
class Fetched:
    """A new valid bundle, for the main loop to apply."""
    bundle: Bundle
    etag: str
    fetched_at: float
    delta_from: int | None = None   # it came as a delta from this version
    wire_bytes: int = 0             # what the reply's body took on the wire


@dataclass(frozen=True)
class Refused:
    """A bundle the server sent that failed validation."""
    error: PolicyError
    etag: str
    fetched_at: float


class Poller:
    """Long-polls the server in its own thread and hands each new bundle
    (or refusal) to ``deliver``. It owns only its transport state (etag,
    retry schedule, last error), which ``status`` returns as a snapshot.
    The main loop answers each delivery with ``acknowledge(version in
    force)``; the next request waits for it, so that X-Aus-Enforcing tells
    the server what is really enforced."""

    def __init__(self, client: Client, deliver: Callable[[Fetched | Refused], None], *,
                 wait: int = 30, etag: str | None = None, enforcing: int = 0,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.time,
                 held: Bundle | None = None):
        self.client = client
        # The bundle the daemon holds (set by its main loop): deltas apply to it.
        self.held = held
        self._full_next = False     # a delta was refused: fetch the whole bundle
        self.deliver = deliver
        self.wait = wait
        self.enforcing = enforcing
        self.backoff = backoff or Backoff()
        self.clock = clock
        self._etag = etag
        self._kick = threading.Event()
        self._stop = threading.Event()
        self._acked = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_ok: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._error_key: tuple | None = None
        self._retry_at: float | None = None
        self._errors = 0     # failed fetches since the start (metrics)
        self._delta_refusals = 0
        self._last_delta_refused: str | None = None

    # -- control (any thread) -------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="aus-policy", daemon=True)
        self._thread.start()

    def acknowledge(self, enforcing: int) -> None:
        """A delivery was handled; ``enforcing`` is the bundle version in
        force now (0: none)."""
        self.enforcing = enforcing
        self._acked.set()

    def kick(self) -> None:
        """Fetch now: end the long poll or the retry pause in progress."""
        self._kick.set()
        self.client.interrupt()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._kick.set()
        self._acked.set()
        self.client.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()

    def status(self) -> dict:
        with self._lock:
            return {"url": self.client.url, "etag": self._etag,
                    "last_fetch": self._last_ok, "last_error": self._last_error,
                    "last_error_at": self._last_error_at,
                    "failures": self.backoff.failures,
                    "errors": self._errors,
                    "next_retry": self._retry_at,
                    "delta_refusals": self._delta_refusals,
                    "last_delta_refused": self._last_delta_refused,
                    "state": "error" if self._error_key else
                             ("ok" if self._last_ok is not None else "starting")}

    # -- the thread -------------------------------------------------------------
    def run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()

    def poll_once(self, first: bool = False) -> None:
        """One request and what follows it (a retry pause after a failure).
        ``first``: the quick attempt at start: no wait, a short connect
        timeout, no pause."""
        wait = 0 if first or self._kick.is_set() else self.wait
        self._kick.clear()
        started = time.monotonic()
        held, full = self.held, self._full_next
        since = held.version if held is not None and not full else None
        try:
            reply = self.client.fetch(
                None if full else self._etag, self.enforcing, wait, cancel=self._kick,
                connect_timeout=FIRST_CONNECT_TIMEOUT if first else CONNECT_TIMEOUT,
                since=since)
        except PolicySourceError as exc:
            if self._stop.is_set() or (exc.kind == "interrupted" and self._kick.is_set()):
                return
            delay = self._failed(exc)
            if first:
                return
            self._kick.wait(delay)   # a kick or stop ends the pause early
            with self._lock:
                self._retry_at = None
            return
        now = self.clock()
        self._succeeded(now)
        if reply.status == 200 and reply.delta_from is not None:
            try:
                bundle = self._apply_delta(held, reply)
            except PolicyError as exc:
                # The policy in force stays; the whole bundle comes at once.
                with self._lock:
                    self._delta_refusals += 1
                    self._last_delta_refused = str(exc)
                    self._full_next = True
                if full:   # a delta not asked for: back off, as from any bad reply
                    self._kick.wait(self._failed(PolicySourceError("protocol", str(exc))))
                    return
                log.error("%s; refused, fetching the whole bundle", exc)
                self._kick.set()
                return
            with self._lock:
                self._etag = reply.etag
            self._acked.clear()
            log.debug("bundle version %d received as a delta from %d (ETag %s)",
                      bundle.version, reply.delta_from, reply.etag)
            self.deliver(Fetched(bundle, reply.etag, now, reply.delta_from, reply.wire_bytes))
            if not first and not self._acked.wait(ACK_TIMEOUT):
                log.warning("bundle ETag %s not handled within %d s; polling on",
                            reply.etag, int(ACK_TIMEOUT))
        elif reply.status == 200:
            with self._lock:
                self._etag = reply.etag
                self._full_next = False
            source = f"bundle from {self.client.url} (ETag {reply.etag})"
            self._acked.clear()
            try:
                bundle = bundle_from_bytes(reply.body, source)
            except PolicyError as exc:
                self.deliver(Refused(exc, reply.etag, now))
            else:
                log.debug("bundle version %d received (ETag %s)", bundle.version, reply.etag)
                self.deliver(Fetched(bundle, reply.etag, now, None, reply.wire_bytes))
            if not first and not self._acked.wait(ACK_TIMEOUT):
                log.warning("bundle ETag %s not handled within %d s; polling on",
                            reply.etag, int(ACK_TIMEOUT))
        elif wait and time.monotonic() - started < QUICK_304_PAUSE:
            self._kick.wait(QUICK_304_PAUSE)

    def _apply_delta(self, held: Bundle | None, reply: Reply) -> Bundle:
        """The bundle a delta reply makes of the one held. Raises
        PolicyError with the reason when it does not apply."""
        source = (f"delta from version {reply.delta_from} from {self.client.url} "
                  f"(ETag {reply.etag})")
        if held is None or reply.delta_from != held.version or self._full_next:
            have = f"version {held.version}" if held is not None else "no bundle"
            raise PolicyError(source, [f"the delta starts from version {reply.delta_from}; "
                                       f"ausd holds {have}"])
        return bundle_from_delta(held, reply.body, source)

    def _failed(self, exc: PolicySourceError) -> float:
        delay = self.backoff.next()
        key = (exc.kind, exc.status, str(exc))
        with self._lock:
            changed = key != self._error_key
            self._error_key = key
            self._errors += 1
            self._last_error = str(exc)
            self._last_error_at = self.clock()
            self._retry_at = self._last_error_at + delay
        if changed:   # once per state change, not per retry
            log.warning("policy server: %s; the policy in force stays; retrying with "
                        "backoff up to %d s", exc, int(self.backoff.hi))
        else:
            log.debug("policy server: %s; retry in %.1f s", exc, delay)
        return delay

    def _succeeded(self, now: float) -> None:
        with self._lock:
            recovered = self._error_key is not None
            self._error_key = None
            self._last_error = None
            self._last_ok = now
        self.backoff.reset()
        if recovered:
            log.info("policy server %s reachable again", self.client.url)


def load_client(url: str, credentials_path: Path, ca: Path | None) -> Client:
    """A Client for the configured server (reads the credentials file)."""
    return Client(url, read_credentials(credentials_path), ca=ca)
