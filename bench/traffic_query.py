"""The traffic API over 10 million stored flow rows on PostgreSQL.

    python -m bench.traffic_query                  10,000,000 rows, 50 requests per view
    python -m bench.traffic_query --rows 200000    a smaller run (say so when quoting it)

Loads the rows with INSERT ... SELECT generate_series in time order, ten
chunks of three days (indexes dropped during the load and built after it;
one org, 30 days, ~10,000 users with a skewed activity, ~200 groups, ~1,000
workloads, ~5,000 destinations; 85 % allowed, 10 % would_deny, 5 % denied),
then times a real ``aus-server serve`` process over loopback:

- the API's default view: ``GET traffic`` (last 24 h, 100 rows), and its
  second page (with the cursor);
- a user filter: ``GET traffic?user=...`` (last 24 h), a different user per
  request, drawn with the same skew as the data; a workload filter;
- the console's default view: ``GET traffic/grouped`` (by group, dst, port,
  proto; the last hour, 100 rows), the same with a user filter over 24 h,
  and the grouped form over the whole default 24 h.

Target (BENCHMARKS.md): p95 <= 300 ms for the default view and a user filter.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import httpx
from sqlalchemy import text

from aus.server.auth import create_key
from aus.server.db import open_database
from tests.support.flow_seed import day_partitions
from tests.support.names import free_port
from tests.support.postgres import PostgresServer

from .common import percentile

CHUNKS = 10
USERS = 10_000
GROUPS = 200
WORKLOADS = 1_000
DESTS = 5_000
DAYS = 30
KEY = "org_id, workload, login_uid, user_name, dst, proto, port, verdict, rule, hour"

# One chunk of rows: `n` rows last seen between :t0 and :t1, in time order
# as a server receives them. The user is skewed towards low numbers (a few
# busy users, a long tail); each user has one to three groups, a usual
# workload and a usual set of destinations. A few more rows are drawn than
# kept, so the merge key's duplicates can be dropped; chunks cover disjoint
# hours, so no two chunks share a key.
LOAD_SQL = f"""
INSERT INTO flows (org_id, hour, workload, login_uid, user_name, groups, process, dst, proto,
                   port, verdict, rule, first_seen, last_seen, count)
SELECT org_id, hour, workload, login_uid, user_name, groups, process, dst, proto, port, verdict,
       rule, first_seen, last_seen, count
FROM (SELECT DISTINCT ON ({KEY}) *
      FROM (SELECT '1' AS org_id, date_trunc('hour', t - interval '5 seconds') AS hour,
                   'wl-' || ((u * 13 + (r3 * 4)::int) % {WORKLOADS}) AS workload,
                   100000 + u AS login_uid, 'user' || u AS user_name,
                   CASE u % 3
                     WHEN 0 THEN json_build_array('grp-' || (u % {GROUPS}))
                     WHEN 1 THEN json_build_array('grp-' || (u % {GROUPS}), 'grp-' || ((u * 7 + 3) % {GROUPS}))
                     ELSE json_build_array('grp-' || (u % {GROUPS}), 'grp-' || ((u * 7 + 3) % {GROUPS}),
                                           'all-staff') END AS groups,
                   (ARRAY['curl','ssh','python3','java','firefox','git'])[1 + (u + i) % 6] AS process,
                   CASE WHEN d % 10 = 0 THEN host(CAST('2001:db8:' || to_hex(d % 4096) || '::' || to_hex(d) AS inet))
                        ELSE '10.' || (d / 65536 % 256) || '.' || (d / 256 % 256) || '.' || (d % 256)
                   END AS dst,
                   CASE WHEN r2 < 0.9 THEN 'tcp' ELSE 'udp' END AS proto,
                   (ARRAY[443,443,443,80,22,5432,3306,53,8080,6443])[1 + (d + u) % 10] AS port,
                   CASE WHEN r2 < 0.85 THEN 'allowed' WHEN r2 < 0.95 THEN 'would_deny'
                        ELSE 'denied' END AS verdict,
                   CASE WHEN r2 < 0.85 THEN 'rule-' || (d % 50) ELSE '' END AS rule,
                   t - interval '5 seconds' AS first_seen, t AS last_seen,
                   1 + (r3 * 40)::int AS count
            FROM (SELECT i, u, d, r2, r3, CAST(:t0 AS timestamptz) + interval '5 seconds'
                                              + random() * (CAST(:t1 AS timestamptz) - CAST(:t0 AS timestamptz) - interval '5 seconds') AS t
                  FROM (SELECT i, floor({USERS} * power(random(), 2))::int AS u,
                               random() AS r1, random() AS r2, random() AS r3
                        FROM generate_series(1, :drawn) AS i) a,
                  LATERAL (SELECT (u * 37 + floor(r1 * r1 * 40)::int * 101) % {DESTS} AS d) b) c
            ) rows
      ORDER BY {KEY}) uniq
ORDER BY last_seen
LIMIT :n
"""


def load(engine, sessions, rows: int) -> float:
    """Fill the table with ``rows`` rows over the last 30 days; seconds
    taken. Indexes are dropped for the load and built again after it, as a
    bulk import does."""
    t0 = time.monotonic()
    with sessions() as s:
        s.execute(text("SET synchronous_commit = off"))
        s.execute(text("SET work_mem = '256MB'"))
        # Indexes that back no constraint (the primary key stays).
        indexes = s.execute(text(
            "SELECT indexname, replace(indexdef, ' ON ONLY ', ' ON ') FROM pg_indexes "
            "WHERE tablename = 'flows' AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = 'flows'::regclass)")).all()
        unique = s.scalar(text("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                               "WHERE conname = 'uq_flows_merge'"))
        for name, _ in indexes:
            s.execute(text(f'DROP INDEX "{name}"'))
        s.execute(text("ALTER TABLE flows DROP CONSTRAINT uq_flows_merge"))
        s.commit()
        # Whole hours, so chunks never share a merge key.
        end = s.scalar(text("SELECT date_trunc('hour', now()) + interval '1 hour'"))
        first = (end - dt.timedelta(days=DAYS + 1)).date()
        day_partitions(s, [first + dt.timedelta(days=d) for d in range(DAYS + 3)])
        hours = DAYS * 24
        per = hours // CHUNKS
        for k in range(CHUNKS):
            n = rows // CHUNKS + (rows % CHUNKS if k == CHUNKS - 1 else 0)
            lo = end - dt.timedelta(hours=hours - k * per)
            hi = end - dt.timedelta(hours=hours - (k + 1) * per)
            hi = min(hi, dt.datetime.now(dt.timezone.utc)) if k == CHUNKS - 1 else hi
            s.execute(text(LOAD_SQL), {"t0": lo, "t1": hi, "n": n, "drawn": int(n * 1.02) + 100})
            s.commit()
            print(f"  chunk {k + 1}/{CHUNKS} ({time.monotonic() - t0:.0f} s)", flush=True)
        s.execute(text(f"ALTER TABLE flows ADD CONSTRAINT uq_flows_merge {unique}"))
        for _, definition in indexes:
            s.execute(text(definition))
        s.commit()
        print(f"  indexes built ({time.monotonic() - t0:.0f} s)", flush=True)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE flows")
    return time.monotonic() - t0


def serve(db_url: str):
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="aus-server-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "aus.server.cli", "serve", "--listen",
                             f"127.0.0.1:{port}", "--db", db_url, "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"aus-server exited: {open(log.name).read()[-2000:]}")
        try:
            if httpx.get(base + "/", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("aus-server did not answer within 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)   # the server we started, with its workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def timed(client: httpx.Client, requests: int, make) -> tuple[list[float], int]:
    """Milliseconds per request; items in the last answer."""
    times, items = [], 0
    for i in range(requests):
        path, params = make(i)
        t0 = time.perf_counter()
        r = client.get(path, params=params)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
        items = len(r.json()["items"])
    return times, items


def explain(url: str) -> None:
    """The grouped view's plan, as the server would run it."""
    from aus.server.traffic import DEFAULT_GROUP_BY, grouped_statement, parse_filters

    engine, sessions = open_database(url)
    f = parse_filters({}, dt.datetime.now(dt.timezone.utc))
    stmt = grouped_statement("1", f, DEFAULT_GROUP_BY, "postgresql", None, 101)
    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    with sessions() as s:
        s.execute(text("SET LOCAL jit = off"))     # as the server runs it
        for (line,) in s.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql)):
            print("  " + line)
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--explain", action="store_true",
                    help="also print PostgreSQL's plan of the grouped view's query")
    args = ap.parse_args()

    pg = PostgresServer().start()
    proc = None
    try:
        name = pg.new_database()
        url = pg.url(name)
        pg.psql(f"ALTER DATABASE {name} SET work_mem = '64MB'")
        engine, sessions = open_database(url)
        token = create_key(sessions, "1")
        print(f"loading {args.rows:,} flow rows into PostgreSQL ...", flush=True)
        seconds = load(engine, sessions, args.rows)
        with sessions() as s:
            total = s.scalar(text("SELECT count(*) FROM flows"))
            day = s.scalar(text("SELECT count(*) FROM flows WHERE last_seen >= now() - interval '24 hours'"))
            last_hour = s.scalar(text("SELECT count(*) FROM flows WHERE last_seen >= now() - interval '1 hour'"))
            size = s.scalar(text(  # with its partitions, where it has some
                "SELECT pg_size_pretty(pg_total_relation_size('flows') + coalesce((SELECT "
                "sum(pg_total_relation_size(inhrelid)) FROM pg_inherits "
                "WHERE inhparent = 'flows'::regclass), 0))"))
        engine.dispose()
        print(f"load: {total:,} rows in {seconds:.0f} s ({total / seconds:,.0f} rows/s); "
              f"{day:,} rows in the last 24 h, {last_hour:,} in the last hour; table with indexes {size}")

        if args.explain:
            explain(url)
        proc, base = serve(url)
        key, _, secret = token.partition(":")
        rnd = random.Random(7)
        with httpx.Client(base_url=f"{base}/api/orgs/1", auth=(key, secret), timeout=60) as c:
            first = c.get("/traffic").json()
            cursor = first["next"]
            hour_ago = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")

            def some_user(_i):
                return f"user{int(USERS * rnd.random() ** 2)}"

            views = {
                "default view (traffic, 24 h, 100 rows)": lambda i: ("/traffic", {}),
                "second page (cursor)": lambda i: ("/traffic", {"cursor": cursor}),
                "user filter (traffic?user=, 24 h)": lambda i: ("/traffic", {"user": some_user(i)}),
                "workload filter (traffic?workload=, 24 h)": lambda i: (
                    "/traffic", {"workload": f"wl-{rnd.randrange(WORKLOADS)}"}),
                "console default: grouped, last hour": lambda i: (
                    "/traffic/grouped", {"since": hour_ago}),
                "console: grouped, user filter, 24 h": lambda i: (
                    "/traffic/grouped", {"user": some_user(i)}),
                "grouped, 24 h (group,dst,port,proto)": lambda i: ("/traffic/grouped", {}),
            }
            print(f"\n{'view':44} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  requests  items")
            for label, make in views.items():
                timed(c, 3, make)       # warm the server's pools and the cache
                times, items = timed(c, args.requests, make)
                print(f"{label:44} {percentile(times, 50):8.1f} {percentile(times, 95):8.1f} "
                      f"{max(times):8.1f}  {len(times):8}  {items:5}")
    finally:
        if proc is not None:
            stop(proc)
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
