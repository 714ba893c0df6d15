"""Flow rows written straight into the ``flows`` table, for tests of what
reads them (the traffic API, the console's Traffic page)."""

from __future__ import annotations

import datetime as dt
import itertools

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from aus.core.flowrecord import hour_of
from aus.server.db import Flow, open_database

UTC = dt.timezone.utc
_unique = itertools.count(1)


def flow(org: str, *, user: str = "alice", uid: int = 1000, groups: list[str] | None = None,
         workload: str = "web-1", process: str = "curl", dst: str = "192.0.2.10",
         proto: str = "tcp", port: int = 443, verdict: str = "allowed", rule: str = "",
         last_seen: dt.datetime, span: dt.timedelta = dt.timedelta(seconds=5),
         count: int = 1) -> Flow:
    """One merged row, its hour taken from ``first_seen`` as ingest does."""
    first = last_seen - span
    return Flow(org_id=org, hour=hour_of(first), workload=workload, login_uid=uid,
                user_name=user, groups=list(groups if groups is not None else ["DEV"]),
                process=process, dst=dst, proto=proto, port=port, verdict=verdict, rule=rule,
                first_seen=first, last_seen=last_seen, count=count)


def day_partitions(s, days) -> None:
    """Where ``flows`` is partitioned by hour (PostgreSQL: one partition
    per UTC day, ``flows_pYYYYMMDD``, as the server makes them), the
    partitions of ``days``; nothing elsewhere."""
    if s.get_bind().dialect.name != "postgresql" or not s.scalar(text(
            "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'flows'::regclass")):
        return
    for day in sorted(set(days)):
        nxt = day + dt.timedelta(days=1)
        # The server makes today's partition too; CREATE ... IF NOT EXISTS
        # is not atomic against it, and the loser sees a duplicate.
        try:
            with s.begin_nested():
                s.execute(text(f"CREATE TABLE IF NOT EXISTS flows_p{day:%Y%m%d} PARTITION OF "
                               f"flows FOR VALUES FROM ('{day}T00:00:00Z') TO ('{nxt}T00:00:00Z')"))
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) not in ("42P07", "23505"):
                raise


def insert(db_url: str, rows: list[Flow]) -> list[int]:
    """Store the rows in one transaction; their ids, in order."""
    engine, sessions = open_database(db_url)
    try:
        with sessions.begin() as s:
            day_partitions(s, {r.hour.astimezone(UTC).date() for r in rows})
            s.add_all(rows)
            s.flush()
            return [r.id for r in rows]
    finally:
        engine.dispose()
