"""Flow ingest into PostgreSQL: gzip batches from simulated workloads.

    python -m bench.flow_ingest                    100 workloads, 20 s, one server process
    python -m bench.flow_ingest --workers 2        two replicas on one database
    python -m bench.flow_ingest --tiny             a seconds-long smoke run

A real ``aus-server serve`` (one process, or ``--workers`` replicas sharing
the listening socket and the database) on a throwaway PostgreSQL
(tests.support.postgres). The load runs in a separate process: every
simulated workload keeps one batch in flight, as ausd does, and posts
gzip ``FlowBatch`` bodies built before the clock starts, so the client
costs little beside the server.

Key distribution: each workload has its users (login UIDs), each user
reaches destinations drawn from a Zipf-like law over a shared pool and a
few ports, with mostly ``allowed`` verdicts. A batch is one aggregation
window: distinct keys, each seen a few times. Later windows repeat
popular keys (merged into stored rows) and bring rarer ones (inserted),
and windows move through the current hour so both happen throughout.

Every workload posts back to back (a closed loop), so the server is
saturated throughout and the batch latency printed is mostly time spent
waiting for a turn; ausd posts one batch per window, far less often.

Beside the rates it prints the CPU the server and PostgreSQL used in the
measured window, per 1,000 records: on a machine shared with other work
that figure holds where the rate does not.

Target: at least 20,000 records/s on a 2-CPU VM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import itertools
import json
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import dataclass

from sqlalchemy import create_engine, text

from aus.core.flowrecord import hour_of, iso
from tests.support.postgres import PostgresServer

from .common import percentile
from .httpload import Connection, Response
from .server import Server

TARGET = 20_000


@dataclass
class Sizes:
    workloads: int
    batch: int            # records per batch (one window)
    windows: int          # distinct batches built per workload, then cycled
    seconds: float
    warmup: float
    users: int            # per workload
    destinations: int     # shared pool


FULL = Sizes(workloads=100, batch=1000, windows=6, seconds=20, warmup=3, users=25,
             destinations=2000)
TINY = Sizes(workloads=10, batch=200, windows=2, seconds=2, warmup=0.5, users=5,
             destinations=100)


# --------------------------------------------------------------------------
# Batches


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def build_batches(sizes: Sizes, seed: int = 7) -> list[list[bytes]]:
    """For each workload, ``windows`` gzip bodies of ``batch`` records."""
    rnd = random.Random(seed)
    dests = [f"10.{i // 250 % 250}.{i % 250}.{1 + i // 62500}" for i in range(sizes.destinations)]
    cum = list(itertools.accumulate(_zipf_weights(sizes.destinations)))
    ports = [(443, "tcp", 40), (80, "tcp", 10), (53, "udp", 20), (22, "tcp", 5), (5432, "tcp", 3),
             (0, "icmp", 1), (8443, "tcp", 3)]
    port_cum = list(itertools.accumulate(p[2] for p in ports))
    hour = hour_of(dt.datetime.now(dt.timezone.utc))
    out = []
    for w in range(sizes.workloads):
        users = [(10000 + w * 100 + u, f"user{w:03d}-{u:02d}@example.com",
                  [f"G{(w + u) % 12}", f"G{u % 5 + 20}"]) for u in range(sizes.users)]
        bodies = []
        for win in range(sizes.windows):
            start = hour + dt.timedelta(seconds=(win * 97 + w * 13) % 3300)
            seen: dict[tuple, dict] = {}
            while len(seen) < sizes.batch:
                uid, name, groups = rnd.choice(users)
                dst = rnd.choices(dests, cum_weights=cum)[0]
                port, proto, _ = rnd.choices(ports, cum_weights=port_cum)[0]
                verdict = rnd.choices(("allowed", "denied", "would_deny"), cum_weights=(90, 93, 100))[0]
                rule = f"rule-{port}" if verdict == "allowed" else ""
                key = (uid, dst, port, proto, verdict)
                if key in seen:
                    continue
                first = start + dt.timedelta(seconds=rnd.randrange(60))
                seen[key] = {"login_uid": uid, "user": name, "groups": groups, "process": "curl",
                             "dst": dst, "proto": proto, "port": port, "verdict": verdict,
                             "rule": rule, "first_seen": iso(first),
                             "last_seen": iso(first + dt.timedelta(seconds=rnd.randrange(30))),
                             "count": rnd.randint(1, 20)}
            doc = {"format": 1, "workload": f"bench-{w:03d}", "dropped": 0,
                   "records": list(seen.values())}
            bodies.append(gzip.compress(json.dumps(doc).encode(), 6))
        out.append(bodies)
    return out


# --------------------------------------------------------------------------
# Load


class RawConnection(Connection):
    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        for attempt in (0, 1):
            if self._w is None:
                await self._open()
            try:
                h = {**self.base_headers, **headers, "Content-Length": str(len(body))}
                head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
                self._w.write(head.encode() + b"\r\n" + body)
                line = await self._r.readline()
                if not line:
                    raise ConnectionError("closed by the server")
                status = int(line.split()[1])
                out: dict[str, str] = {}
                while (ln := await self._r.readline()) not in (b"\r\n", b""):
                    k, _, v = ln.decode("latin-1").partition(":")
                    out[k.strip().lower()] = v.strip()
                data = await self._r.readexactly(int(out.get("content-length", "0")))
                return Response(status, out, data)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")


async def _load(port: int, token: str, bodies: list[list[bytes]], seconds: float,
                warmup: float) -> dict:
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
               "Authorization": f"Bearer {token}"}
    lat: list[float] = []
    counted = {"records": 0, "rows": 0, "batches": 0, "errors": 0}
    t_start = time.perf_counter()
    t_count = t_start + warmup
    t_stop = t_count + seconds

    async def workload(i: int):
        conn = RawConnection("127.0.0.1", port)
        n = 0
        try:
            while (now := time.perf_counter()) < t_stop:
                body = bodies[i][n % len(bodies[i])]
                n += 1
                r = await conn.post("/api/orgs/1/flows", body, headers)
                done = time.perf_counter()
                if r.status != 200:
                    counted["errors"] += 1
                    if counted["errors"] <= 3:
                        print(f"  batch refused: {r.status} {r.text[:300]}", file=sys.stderr)
                    continue
                if now >= t_count and done <= t_stop:
                    a = r.json()
                    counted["records"] += a["accepted"]
                    counted["rows"] += a["rows"]
                    counted["batches"] += 1
                    lat.append(done - now)
        finally:
            await conn.close()

    await asyncio.gather(*(workload(i) for i in range(len(bodies))))
    return {**counted, "seconds": seconds, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000}


def _tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        stats[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo.extend(children.get(pid, ()))
    return total


def _load_job(args) -> dict:
    return asyncio.run(_load(*args))


def run(sizes: Sizes, workers: int) -> dict:
    t = time.perf_counter()
    bodies = build_batches(sizes)
    built = time.perf_counter() - t
    per_batch = sum(len(b) for bs in bodies for b in bs) / sum(len(bs) for bs in bodies)
    print(f"built {sizes.workloads} x {sizes.windows} batches of {sizes.batch} records "
          f"({per_batch / 1024:.1f} KiB gzip each) in {built:.1f} s")
    pg = PostgresServer().start()
    try:
        url = pg.url(pg.new_database())
        return _run(sizes, workers, bodies, pg, url)
    finally:
        pg.stop()


def _run(sizes: Sizes, workers: int, bodies, pg: PostgresServer, url: str) -> dict:
    with Server(url, workers) as server:
        ctx = mp.get_context("spawn")
        load_before = os.getloadavg()[0]
        with ctx.Pool(1) as pool:
            job = pool.apply_async(_load_job, ((server.port, server.token, bodies, sizes.seconds,
                                                sizes.warmup),))
            # CPU of the server and of PostgreSQL over the measured window
            time.sleep(sizes.warmup + 1.0)
            t0 = time.perf_counter()
            cpu0 = (_tree_cpu(server.proc.pid), _tree_cpu(pg.proc.pid))
            time.sleep(max(0.1, sizes.seconds - 2.0))
            cpu1 = (_tree_cpu(server.proc.pid), _tree_cpu(pg.proc.pid))
            window = time.perf_counter() - t0
            result = job.get()
        result["loadavg"] = (load_before, os.getloadavg()[0])
        result["cpu"] = ((cpu1[0] - cpu0[0]) / window, (cpu1[1] - cpu0[1]) / window)
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect() as c:
                result["table_rows"] = c.execute(text("SELECT count(*) FROM flows")).scalar()
                result["stored_count"] = c.execute(
                    text("SELECT coalesce(sum(count), 0) FROM flows")).scalar()
                result["partitions"] = c.execute(text(
                    "SELECT count(*) FROM pg_inherits WHERE inhparent = 'flows'::regclass")).scalar()
        finally:
            engine.dispose()
    result["workers"] = workers
    return result


def report(sizes: Sizes, r: dict) -> bool:
    rate = r["records"] / r["seconds"]
    ok = rate >= TARGET
    print()
    print(f"Flow ingest into PostgreSQL: {sizes.workloads} workloads, gzip batches of "
          f"{sizes.batch} records, {r['workers']} server process(es), {sizes.seconds:g} s measured")
    print(f"  records/s            {rate:10,.0f}   (target >= {TARGET:,}: "
          f"{'met' if ok else 'NOT met'})")
    print(f"  batches/s            {r['batches'] / r['seconds']:10,.1f}")
    print(f"  batch latency p50    {r['p50_ms']:10.1f} ms")
    print(f"  batch latency p99    {r['p99_ms']:10.1f} ms")
    print(f"  rows written/merged  {r['rows']:10,}   (per batch, after in-batch merge)")
    print(f"  rows in the table    {r['table_rows']:10,}   ({r['partitions']} partitions: days and the default)")
    print(f"  refused batches      {r['errors']:10,}")
    rate_cpu = r["records"] / r["seconds"]
    srv, db = r["cpu"]
    print(f"  CPU used             {srv:10.2f} server + {db:.2f} PostgreSQL (cores, measured window)")
    per = (srv + db) / rate_cpu * 1000 if rate_cpu else 0.0
    print(f"  CPU per 1,000 recs   {per * 1000:10.1f} ms  (server + PostgreSQL; 2 CPUs to themselves "
          f"would take {2 / per * 1000 if per else 0:,.0f} records/s)")
    print(f"  machine load average {r['loadavg'][0]:10.1f} before, {r['loadavg'][1]:.1f} after "
          f"({os.cpu_count()} CPUs; above the CPU count, other work shares them)")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flow_ingest", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--workers", type=int, default=1, help="server processes (default 1)")
    p.add_argument("--seconds", type=float, help="measured seconds")
    p.add_argument("--batch", type=int, help="records per batch")
    args = p.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    if args.seconds:
        sizes.seconds = args.seconds
    if args.batch:
        sizes.batch = args.batch
    result = run(sizes, args.workers)
    ok = report(sizes, result)
    if result["errors"] or not result["records"] or not result["table_rows"]:
        return 1                      # broken, whatever the rate
    return 0 if ok or args.tiny else 1


if __name__ == "__main__":
    sys.exit(main())
