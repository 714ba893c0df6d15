"""A stand-in for aus-server's bundle endpoint, for tests: stdlib
http.server in a thread on loopback, speaking the protocol ausd expects.

    GET <path>?wait=N&since=V   Basic auth; If-None-Match; X-Aus-Workload;
                        X-Aus-Enforcing; Accept-Encoding
    200 + ETag          when the ETag differs (or is absent), or as soon as
                        the bundle changes during the wait: the delta from V
                        when one was published with the bundle (X-Aus-Delta-From),
                        else the bundle; gzip-compressed when ``gzip`` is set
                        and the client takes it
    304                 nothing changed within the wait (capped at 60 s)
    401                 bad credentials; ``fail`` forces any other status

Every request is recorded (headers, wait, when it came and went).
"""

from __future__ import annotations

import base64
import copy
import gzip as gzip_module
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATH = "/v1/orgs/1/bundle"


def bundle(version: int, members: dict[str, list[str]], *, rules=None,
           groups=("DEV", "OPS"), destinations=("10.0.0.0/8",)) -> dict:
    """A format 1 bundle: DEV may reach ``destinations`` on 80/tcp, OPS on 22/tcp."""
    return {
        "format": 1, "org": "1", "version": version,
        "generated_at": "2026-11-28T15:00:00Z",
        "policy": {
            "user_groups": [{"name": g, "external_id": f"id-{g.lower()}", "sid": None}
                            for g in groups],
            "ip_lists": {"lab": list(destinations)}, "services": {},
            "rules": rules if rules is not None else [
                {"name": "dev-web", "sources": ["DEV"], "destinations": ["lab"],
                 "services": ["80/tcp"]},
                {"name": "ops-ssh", "sources": ["OPS"], "destinations": ["lab"],
                 "services": ["22/tcp"]},
            ][: len(groups)],
        },
        "members": members,
    }


@dataclass
class Seen:
    path: str
    wait: int | None
    headers: dict
    started: float
    status: int = 0
    ended: float = 0.0
    since: int | None = None
    delta: bool = False       # answered with a delta


@dataclass
class BundleServer:
    credentials: tuple[str, str] = ("key1", "s3cret")
    host: str = "127.0.0.1"
    port: int = 0
    tls: ssl.SSLContext | None = None
    path: str = PATH
    requests: list[Seen] = field(default_factory=list)
    fail: int | None = None                  # answer every request with this status
    gzip: bool = False                       # compress 200 answers for clients that take it
    gzip_body: bytes | None = None           # send these bytes as the gzip body instead

    def __post_init__(self):
        self._cond = threading.Condition()
        self._body = b""
        self._etag: str | None = None
        self._deltas: dict[int, bytes] = {}
        self._serial = 0
        self._closed = False
        self._httpd: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()

    # -- content --------------------------------------------------------------
    def publish(self, doc: dict | bytes, deltas: dict[int, dict | bytes] | None = None) -> str:
        """Serve a new bundle (a dict, or raw bytes as they are), and
        ``deltas`` (from version -> delta) to requests with that since=;
        wakes every waiting long poll. Returns its ETag."""
        body = doc if isinstance(doc, bytes) else json.dumps(copy.deepcopy(doc)).encode()
        with self._cond:
            self._serial += 1
            self._body = body
            self._deltas = {v: d if isinstance(d, bytes) else json.dumps(d).encode()
                            for v, d in (deltas or {}).items()}
            self._etag = f'"b{self._serial}"'
            self._cond.notify_all()
            return self._etag

    @property
    def etag(self) -> str | None:
        return self._etag

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path}"

    # -- life -----------------------------------------------------------------
    def start(self) -> "BundleServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):   # quiet
                pass

            def setup(self):
                super().setup()
                server._conns.add(self.connection)

            def finish(self):
                server._conns.discard(self.connection)
                super().finish()

            def do_GET(self):
                server._handle(self)

            def do_POST(self):
                server._post(self)

        class Httpd(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

        self._closed = False
        self._httpd = Httpd((self.host, self.port), Handler)
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and end every open connection (like a crash)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        for conn in list(self._conns):   # kept-alive connections end too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- one request ----------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        query = parse_qs(parts.query)
        wait = int(query["wait"][0]) if "wait" in query else None
        since = int(query["since"][0]) if "since" in query else None
        seen = Seen(parts.path, wait, {k.lower(): v for k, v in h.headers.items()},
                    time.monotonic(), since=since)
        self.requests.append(seen)
        status, body, etag = self._answer(h, parts.path, wait)
        seen.status, seen.ended = status, time.monotonic()
        if self._closed:
            h.close_connection = True
            return
        headers = {"Content-Type": "application/json"}
        if status == 200 and since in self._deltas:
            body = self._deltas[since]
            headers = {"Content-Type": "application/vnd.aus.bundle-delta+json",
                       "X-Aus-Delta-From": str(since)}
        if status == 200 and self.gzip and "gzip" in h.headers.get("Accept-Encoding", ""):
            body = self.gzip_body if self.gzip_body is not None else gzip_module.compress(body)
            headers["Content-Encoding"] = "gzip"
        seen.delta = "X-Aus-Delta-From" in headers
        h.send_response(status)
        if etag:
            h.send_header("ETag", etag)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        """The bundle endpoint takes no POST (see flow_receiver.FlowReceiver)."""
        h.send_response(405)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _answer(self, h, path: str, wait: int | None) -> tuple[int, bytes, str | None]:
        if self.fail is not None:
            return self.fail, json.dumps({"error": f"forced {self.fail}"}).encode(), None
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        if h.headers.get("Authorization") != f"Basic {token}":
            return 401, b'{"error": "bad API key or secret"}', None
        if path != self.path:
            return 404, b'{"error": "unknown org"}', None
        known = h.headers.get("If-None-Match")
        deadline = time.monotonic() + min(wait or 0, 60)
        with self._cond:
            while self._etag is None or known == self._etag:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return 304, b"", self._etag
                self._cond.wait(left)
            return 200, self._body, self._etag


def self_signed(tmp_path, host: str = "127.0.0.1"):
    """A self-signed certificate for ``host`` (an IP): (cert path, key path).
    Made with the ``cryptography`` package, or the openssl command."""
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if not shutil.which("openssl"):
            raise
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                        "-subj", "/CN=aus test policy server",
                        "-addext", f"subjectAltName=IP:{host}",
                        "-keyout", str(key_path), "-out", str(cert_path)],
                       check=True, capture_output=True)
        return cert_path, key_path
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aus test policy server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
