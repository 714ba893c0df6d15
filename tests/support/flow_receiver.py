"""A stand-in for aus-server's flows endpoint, for tests: the bundle
server of bundle_server.py that also takes ``POST <org>/flows``.

    POST /v1/orgs/1/flows   Basic auth (the bundle's credentials), a gzip
                            (or identity) FlowBatch, validated with the real
                            model (aus.core.flowrecord)
    200 {"accepted": N, "rows": N}
    400 {"error": {"status", "message", "fields": [{"field", "message"}]}}
                            a batch that does not validate (aus-server's form)
    ``answer``: force 400, 413, 429 (with ``retry_after``), 503, or "hang"
    (read the request, never answer until released or stopped)

``blackhole()`` goes further: the port stops accepting connections at
all (a listening socket whose accept queue is kept full, so new SYNs
are dropped and connect() hangs); ``restore()`` serves again on the
same port. Every POST is recorded as a Post.
"""

from __future__ import annotations

import base64
import gzip
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from aus.core.flowrecord import FlowBatch
from tests.support.bundle_server import BundleServer

FLOWS_PATH = "/v1/orgs/1/flows"


def _error(status, message: str, fields: list[dict] | None = None) -> bytes:
    """An error body as aus-server writes it."""
    return json.dumps({"error": {"status": status, "message": message,
                                 "fields": fields or []}}).encode()


@dataclass
class Post:
    path: str
    headers: dict
    status: int
    batch: dict | None       # the decoded document, when it was valid JSON
    at: float


@dataclass
class FlowReceiver(BundleServer):
    answer: int | str = 200
    retry_after: str | None = None
    posts: list[Post] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        self._release = threading.Event()
        self._hole: list[socket.socket] = []

    # -- what arrived ----------------------------------------------------------
    def accepted(self) -> list[dict]:
        """Every record of every batch answered 200, in arrival order."""
        return [r for p in list(self.posts) if p.status == 200 for r in p.batch["records"]]

    def dropped_told(self) -> int:
        return sum(p.batch["dropped"] for p in list(self.posts) if p.status == 200)

    def release(self) -> None:
        """End the hung requests (they get no answer) and stop hanging."""
        self.answer = 200
        self._release.set()

    # -- a black hole on the same port -----------------------------------------
    def blackhole(self) -> None:
        self.stop()
        hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind((self.host, self.port))
        hole.listen(0)
        self._hole = [hole]
        for _ in range(4):   # fill the accept queue: later SYNs are dropped
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.settimeout(0.3)
            try:
                c.connect((self.host, self.port))
            except OSError:
                c.close()
                break
            self._hole.append(c)

    def restore(self) -> None:
        for s in self._hole:
            s.close()
        self._hole = []
        self.start()

    def stop(self) -> None:
        self._release.set()
        super().stop()
        self._release = threading.Event()

    # -- one POST ----------------------------------------------------------------
    def _post(self, h) -> None:
        path = h.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in h.headers.items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if 0 < length <= 16 << 20 else b""
        status, body, doc = self._judge(h, path, headers, raw)
        if status == "hang":
            self.posts.append(Post(path, headers, 0, doc, time.monotonic()))
            self._release.wait()
            h.close_connection = True
            return
        self.posts.append(Post(path, headers, status, doc, time.monotonic()))
        h.send_response(status)
        if status == 429 and self.retry_after is not None:
            h.send_header("Retry-After", self.retry_after)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _judge(self, h, path, headers, raw) -> tuple[int | str, bytes, dict | None]:
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        if headers.get("authorization") != f"Basic {token}":
            return 401, _error(401, "bad API key or secret"), None
        if path != FLOWS_PATH:
            return 404, _error(404, "unknown org"), None
        try:
            text = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
            doc = json.loads(text)
        except (OSError, EOFError, ValueError):
            return 400, _error(400, "not gzip JSON"), None
        if self.answer != 200:
            return self.answer, _error(self.answer, f"forced {self.answer}"), doc
        try:
            batch = FlowBatch.model_validate(doc)
        except ValidationError as exc:
            fields = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]}
                      for e in exc.errors()]
            return 400, _error(400, "malformed batch", fields), doc
        n = len(batch.records)
        return 200, json.dumps({"accepted": n, "rows": n}).encode(), doc
