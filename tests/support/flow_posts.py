"""Flow batches as a workload sends them, posted to an in-process
aus-server (the ``server`` fixture of tests/server), for tests of what the
server does with them."""

from __future__ import annotations

import datetime as dt
import gzip
import json

from sqlalchemy import select

from aus.core.flowrecord import hour_of, iso
from aus.server.db import Flow, open_database, utcnow

HOUR = hour_of(utcnow())


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


def post(server, doc, *, token: str | None = None, org: str | None = None):
    """POST ``doc`` gzip-compressed to the org's flows endpoint."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
               **server.bearer(token)}
    return server.client.post(f"/api/orgs/{org or server.org}/flows",
                              content=gzip.compress(json.dumps(doc).encode()), headers=headers)


def stored(db_url: str) -> list[Flow]:
    """Every flow row in the database, all orgs."""
    engine, sessions = open_database(db_url)
    try:
        with sessions() as s:
            return list(s.scalars(select(Flow).order_by(Flow.hour, Flow.dst, Flow.port)))
    finally:
        engine.dispose()
