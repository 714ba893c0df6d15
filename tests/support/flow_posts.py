"""Flow batches as a workload sends them, posted to an in-process
aus-server (the ``server`` fixture of tests/server), for tests of what the
server does with them."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os

from sqlalchemy import select

from aus.core.flowrecord import hour_of, iso
from aus.server.auth import create_key
from aus.server.db import Flow, open_database, utcnow

NOW = utcnow()
HOUR = hour_of(NOW)


def record(**over) -> dict:
    """One wire record in the current hour; ``first``/``last`` (datetimes)
    and any field overridden."""
    first = over.pop("first", HOUR + dt.timedelta(seconds=10))
    last = over.pop("last", first + dt.timedelta(seconds=5))
    r = {"login_uid": 1000, "user": "alice", "groups": ["DEV"], "process": "curl",
         "dst": "192.0.2.10", "proto": "tcp", "port": 443, "verdict": "would_deny", "rule": "",
         "first_seen": iso(first), "last_seen": iso(last), "count": 1}
    r.update(over)
    return r


def batch(records: list[dict], workload: str = "web-1", dropped: int = 0) -> dict:
    return {"format": 1, "workload": workload, "dropped": dropped, "records": records}


def post(server, doc, *, gz: bool = True, token: str | None = None, org: str | None = None,
         raw: bytes | None = None, encoding: str | None = None):
    """POST ``doc`` (gzip-compressed unless ``gz`` is false), or the bytes
    ``raw`` as they are, to the org's flows endpoint; ``encoding`` sets
    Content-Encoding whatever the body."""
    body = raw if raw is not None else json.dumps(doc).encode()
    headers = {"Content-Type": "application/json", **server.bearer(token)}
    if gz and raw is None:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    if encoding:
        headers["Content-Encoding"] = encoding
    return server.client.post(f"/api/orgs/{org or server.org}/flows", content=body, headers=headers)


def credentials_file(path, sessions, org: str = "1"):
    """A new key of ``org`` written as ausd reads it: one line, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, create_key(sessions, org).encode() + b"\n")
    finally:
        os.close(fd)
    return path


def stored(db_url: str) -> list[Flow]:
    """Every flow row in the database, all orgs."""
    engine, sessions = open_database(db_url)
    try:
        with sessions() as s:
            return list(s.scalars(select(Flow).order_by(Flow.hour, Flow.dst, Flow.port)))
    finally:
        engine.dispose()
