"""Storing flow records: merged on insert, removed after the retention.

A stored row is one merge key, (org, workload, login UID, user,
destination, protocol, port, verdict, rule, hour), where ``hour`` is the
UTC hour the record began in. A record whose key is stored already adds
its count to the row, widens first/last seen, and brings its groups and
process name when it is the newest. So the table grows with distinct
flows, not with connections.

One batch is one statement: its records are merged by key in Python first
(an upsert may not touch a row twice), sorted by key (concurrent batches
lock rows in one order, so they cannot deadlock), then written with
``INSERT ... ON CONFLICT DO UPDATE``: on PostgreSQL as one INSERT ... SELECT
from the batch sent as one JSON parameter, on SQLite as one prepared
statement run per row.

Retention: a UTC day is removed once its end is more than the retention
ago, so between N and N+1 days are kept. On PostgreSQL ``flows`` is
partitioned by day (``flows_pYYYYMMDD``): partitions are made ahead
(today and tomorrow) and on demand for any day a batch names, and retention
drops whole partitions. A default partition takes rows written past this
module for a day without a partition (so no insert fails); making that
day's partition later moves them into it. On SQLite the rows
are deleted in bounded chunks, each its own transaction, so writers are
never held off for long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import threading
from collections.abc import Iterable

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Integer,
    Text,
    bindparam,
    case,
    column,
    func,
    select,
)
from sqlalchemy import delete as sa_delete
from sqlalchemy import text as sa_text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from ..core.flowrecord import FlowRecord
from .db import Flow, Workload, utcnow

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 30
RETENTION_INTERVAL = 600.0        # seconds between retention runs
DELETE_CHUNK = 5000               # SQLite rows deleted per transaction
PARTITION = re.compile(r"^flows_p(\d{8})$")
_LOCK_RETENTION = 0x61757366      # advisory lock: one replica runs retention at a time

_T = Flow.__table__
MERGE_KEY = ("org_id", "workload", "login_uid", "user_name", "dst", "proto", "port",
             "verdict", "rule", "hour")
COLUMNS = MERGE_KEY + ("groups", "process", "first_seen", "last_seen", "count")


def merge_records(org_id: str, workload: str, records: Iterable[FlowRecord]) -> list[dict]:
    """The rows a batch writes: records with the same key summed, sorted by key."""
    rows: dict[tuple, dict] = {}
    for r in records:
        hour = r.first_seen.replace(minute=0, second=0, microsecond=0)   # already UTC
        key = (r.login_uid, r.user, r.dst, r.proto, r.port, r.verdict, r.rule, hour)
        row = rows.get(key)
        if row is None:
            rows[key] = {"org_id": org_id, "workload": workload, "login_uid": r.login_uid,
                         "user_name": r.user, "dst": r.dst, "proto": r.proto, "port": r.port,
                         "verdict": r.verdict, "rule": r.rule, "hour": hour,
                         "groups": list(r.groups), "process": r.process,
                         "first_seen": r.first_seen, "last_seen": r.last_seen, "count": r.count}
            continue
        row["count"] += r.count
        row["first_seen"] = min(row["first_seen"], r.first_seen)
        if r.last_seen >= row["last_seen"]:
            row["last_seen"] = r.last_seen
            row["groups"], row["process"] = list(r.groups), r.process
    return [rows[k] for k in sorted(rows, key=lambda k: (k[7], *k[:7]))]


def _update_set(stmt, least, greatest) -> dict:
    ex = stmt.excluded
    # SET expressions see the stored row as it was before this update.
    newer = ex.last_seen >= _T.c.last_seen
    return {"count": _T.c.count + ex.count,
            "first_seen": least(_T.c.first_seen, ex.first_seen),
            "last_seen": greatest(_T.c.last_seen, ex.last_seen),
            "groups": case((newer, ex.groups), else_=_T.c.groups),
            "process": case((newer, ex.process), else_=_T.c.process)}


def _sqlite_statement():
    stmt = sqlite_insert(_T)
    return stmt.on_conflict_do_update(index_elements=list(MERGE_KEY),
                                      set_=_update_set(stmt, func.min, func.max))


_RECORD_TYPES = {"org_id": Text, "workload": Text, "login_uid": BigInteger, "user_name": Text,
                 "dst": Text, "proto": Text, "port": Integer, "verdict": Text, "rule": Text,
                 "hour": DateTime(timezone=True), "groups": JSON, "process": Text,
                 "first_seen": DateTime(timezone=True), "last_seen": DateTime(timezone=True),
                 "count": BigInteger}


def _postgres_statement():
    # The rows travel as one JSON document that PostgreSQL unpacks in C
    # (json_to_recordset): per-row parameters or arrays cost far more to
    # encode on the client than the insert costs the server.
    src = func.json_to_recordset(bindparam("rows", type_=JSON)).table_valued(
        *(column(name, _RECORD_TYPES[name]) for name in COLUMNS)).render_derived(with_types=True)
    stmt = pg_insert(_T).from_select(list(COLUMNS), select(*(src.c[name] for name in COLUMNS)))
    return stmt.on_conflict_do_update(index_elements=list(MERGE_KEY),
                                      set_=_update_set(stmt, func.least, func.greatest))


def _json_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        r = dict(r)
        r["hour"], r["first_seen"], r["last_seen"] = (
            r["hour"].isoformat(), r["first_seen"].isoformat(), r["last_seen"].isoformat())
        out.append(r)
    return out


_SQLITE_UPSERT = _sqlite_statement()
_POSTGRES_UPSERT = _postgres_statement()
_W = Workload.__table__
DROPPED_MAX = (1 << 62)


def _dropped_statement(insert, org_id: str, workload: str, n: int, at: dt.datetime):
    """Add ``n`` to the workload's dropped count (its row made if it has
    not checked in yet)."""
    stmt = insert(_W).values(org_id=org_id, name=workload, flows_dropped=n, flows_dropped_at=at)
    return stmt.on_conflict_do_update(
        index_elements=["org_id", "name"],
        # held below BIGINT's top however much a workload claims
        set_={"flows_dropped": case(
                  (_W.c.flows_dropped > DROPPED_MAX - stmt.excluded.flows_dropped, DROPPED_MAX),
                  else_=_W.c.flows_dropped + stmt.excluded.flows_dropped),
              "flows_dropped_at": stmt.excluded.flows_dropped_at})


class FlowStore:
    """Writes batches and enforces retention on one engine."""

    def __init__(self, engine: Engine, retention_days: int = DEFAULT_RETENTION_DAYS):
        self.engine = engine
        self.retention_days = retention_days
        self.postgres = engine.dialect.name == "postgresql"
        self._days: set[dt.date] = set()      # partitions known to exist
        self._days_lock = threading.Lock()

    def cutoff(self, now: dt.datetime | None = None) -> dt.datetime:
        """Rows whose hour is before this are past the retention."""
        day = ((now or utcnow()) - dt.timedelta(days=self.retention_days)).date()
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)

    # ------------------------------------------------------------------
    # Writing

    def write(self, rows: list[dict], dropped: tuple[str, str, int] | None = None) -> None:
        """Upsert merged rows (from :func:`merge_records`) in one transaction,
        with ``dropped`` (org, workload, records the batch reported dropped)
        added to the workload's count in the same one: a batch retried after
        a failure is counted once."""
        bump = None
        if dropped is not None and dropped[2] > 0:
            bump = _dropped_statement(pg_insert if self.postgres else sqlite_insert,
                                      *dropped, utcnow())
        if not rows and bump is None:
            return
        if not self.postgres:
            with self.engine.begin() as conn:
                if rows:
                    conn.execute(_SQLITE_UPSERT, rows)
                if bump is not None:
                    conn.execute(bump)
            return
        params = {"rows": _json_rows(rows)}
        self.ensure_partitions({r["hour"].date() for r in rows})
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    if rows:
                        conn.execute(_POSTGRES_UPSERT, params)
                    if bump is not None:
                        conn.execute(bump)
                return
            except DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state == "23514" and attempt < 2:
                    # no partition for a row: dropped meanwhile by retention
                    # elsewhere, or made by another replica's cache's mistake
                    with self._days_lock:
                        self._days.clear()
                    self.ensure_partitions({r["hour"].date() for r in rows})
                    continue
                if state in ("40P01", "40001") and attempt < 2:
                    continue           # deadlock or serialization failure: once more
                raise

    # ------------------------------------------------------------------
    # PostgreSQL partitions

    def ensure_partitions(self, days: Iterable[dt.date]) -> None:
        with self._days_lock:
            missing = sorted(set(days) - self._days)
        for day in missing:
            self._create_partition(day)
            with self._days_lock:
                self._days.add(day)

    def _create_partition(self, day: dt.date) -> None:
        name = f"flows_p{day:%Y%m%d}"
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)
        end = start + dt.timedelta(days=1)
        bounds = f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF flows "
                                         f"{bounds}")
                return
            except DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state == "23514":
                    # The default partition holds rows of this day (written
                    # past this module): move them into the day's own.
                    self._adopt_from_default(name, start, end, bounds)
                    return
                # Two replicas creating the same partition at once: the
                # loser sees a duplicate in the catalog; the table exists.
                if state in ("42P07", "23505") and attempt < 2:
                    continue
                raise

    def _adopt_from_default(self, name: str, start: dt.datetime, end: dt.datetime,
                            bounds: str) -> None:
        with self.engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE flows_default IN ACCESS EXCLUSIVE MODE")
            conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS {name} "
                                 f"(LIKE flows INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
            conn.execute(sa_text(
                f"WITH moved AS (DELETE FROM flows_default WHERE hour >= :s AND hour < :e "
                f"RETURNING *) INSERT INTO {name} SELECT * FROM moved"), {"s": start, "e": end})
            conn.exec_driver_sql(f"ALTER TABLE flows ATTACH PARTITION {name} {bounds}")
        log.info("flows: partition %s made, its rows moved from flows_default", name)

    def partitions(self) -> dict[str, dt.date]:
        """The day partitions of ``flows``, by name."""
        with self.engine.connect() as conn:
            names = conn.execute(sa_text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'flows'::regclass")).scalars().all()
        out = {}
        for name in names:
            m = PARTITION.match(name)
            if m:
                out[name] = dt.datetime.strptime(m.group(1), "%Y%m%d").date()
        return out

    # ------------------------------------------------------------------
    # Retention

    def enforce(self, now: dt.datetime | None = None) -> int:
        """Make the coming partitions and remove what is past the
        retention; return the partitions dropped (PostgreSQL) or rows
        deleted (SQLite)."""
        now = now or utcnow()
        cutoff = self.cutoff(now)
        if not self.postgres:
            return self._delete_before(cutoff)
        today = now.astimezone(dt.timezone.utc).date()
        self.ensure_partitions([today, today + dt.timedelta(days=1)])
        dropped = 0
        with self.engine.begin() as conn:
            if not conn.execute(sa_text("SELECT pg_try_advisory_xact_lock(:k)"),
                                {"k": _LOCK_RETENTION}).scalar():
                return 0                # another replica is at it
            for name, day in sorted(self.partitions().items(), key=lambda kv: kv[1]):
                if day < cutoff.date():
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                    dropped += 1
                    with self._days_lock:
                        self._days.discard(day)
            # normally empty: rows written past this module to a day without a partition
            conn.execute(sa_text("DELETE FROM flows_default WHERE hour < :c"), {"c": cutoff})
        if dropped:
            log.info("flow retention: dropped %d day partition(s) before %s", dropped,
                     cutoff.date())
        return dropped

    def _delete_before(self, cutoff: dt.datetime) -> int:
        total = 0
        while True:
            with self.engine.begin() as conn:
                ids = select(_T.c.id).where(_T.c.hour < cutoff).limit(DELETE_CHUNK)
                n = conn.execute(sa_delete(_T).where(_T.c.id.in_(ids.scalar_subquery()))).rowcount
            total += n
            if n < DELETE_CHUNK:
                break
        if total:
            log.info("flow retention: deleted %d row(s) before %s", total, cutoff.date())
        return total


class RetentionService:
    """Runs :meth:`FlowStore.enforce` in the background: at start (not
    delaying it: a long backlog of days is deleted while requests are
    served) and every ``interval`` seconds."""

    def __init__(self, store: FlowStore, interval: float = RETENTION_INTERVAL):
        self.store = store
        self.interval = interval
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="flow-retention")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)

    async def _run_once(self) -> None:
        try:
            await asyncio.to_thread(self.store.enforce)
        except Exception:
            log.exception("flow retention failed; tried again in %.0f s", self.interval)

    async def _loop(self) -> None:
        while True:
            await self._run_once()
            await asyncio.sleep(self.interval)
