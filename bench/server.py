"""Benchmarks of aus-server, on SQLite and on PostgreSQL.

    python -m bench.server                 the full suite
    python -m bench.server --tiny          a seconds-long smoke run
    python -m bench.server --db sqlite     one database only

1. SCIM request rate for what Entra ID sends most (filter lookups, member
   PATCH), closed-loop with a fixed number of connections, against the rate
   of ServiceProviderConfig (auth and HTTP only, no database) measured in
   the same run. Target: >= 500 requests/s.
2. Initial sync as Entra ID runs it: for every user a filter lookup then a
   POST; for every group a lookup, a POST, then member PATCHes. Target for
   100,000 users and 10,000 groups: <= 5 minutes.
3. Fan-out: N daemons long-poll the bundle; one rule change; the time
   until every daemon holds the new bundle, against one daemon alone.
   Target for 1,000 daemons: <= 2 s.

The load runs in a separate process from the server, over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.support.postgres import PostgresServer

from .common import percentile
from .httpload import Connection

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
GROUP_SCHEMAS = ["urn:ietf:params:scim:schemas:core:2.0:Group",
                 "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"]
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@dataclass
class Sizes:
    rate_users: int
    rate_groups: int
    rate_seconds: float
    connections: int
    sync_users: int
    sync_groups: int
    groups_per_user: int
    members_per_patch: int
    daemons: int
    workers: int


FULL = Sizes(rate_users=20_000, rate_groups=2_000, rate_seconds=10, connections=16,
             sync_users=100_000, sync_groups=10_000, groups_per_user=3, members_per_patch=50,
             daemons=1000, workers=2)
TINY = Sizes(rate_users=200, rate_groups=20, rate_seconds=1.5, connections=4,
             sync_users=300, sync_groups=30, groups_per_user=2, members_per_patch=20,
             daemons=20, workers=1)


# --------------------------------------------------------------------------
# The server under test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db_url: str, workers: int):
        self.db_url = db_url
        self.workers = workers
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        cli = [sys.executable, "-m", "aus.server.cli"]
        self.token = subprocess.run(cli + ["api-key", "create", "--org", "1", "--db", db_url],
                                    check=True, capture_output=True, text=True).stdout.strip()
        self.argv = cli + ["serve", "--listen", f"127.0.0.1:{self.port}", "--db", db_url,
                           "--workers", str(workers), "--log-level", "warning"]

    def __enter__(self) -> "Server":
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError("aus-server exited: " + self.log.read().decode()[-2000:])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                time.sleep(0.5 * self.workers)   # let every worker finish its start-up
                return self
            time.sleep(0.1)
        raise RuntimeError("aus-server did not listen within 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)   # the server we started and its workers
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def database(kind: str):
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="aus-bench-db-") as d:
            yield f"sqlite:///{d}/aus-server.db"
        return
    pg = PostgresServer().start()
    try:
        yield pg.url(pg.new_database())
    finally:
        pg.stop()


# --------------------------------------------------------------------------
# Load generation (in a child process, so the client never shares a GIL
# with the server)


def _conn(base: str, token: str) -> Connection:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return Connection(host, int(port), {"Authorization": f"Bearer {token}",
                                        "Content-Type": "application/scim+json"})


def _user_doc(i: int) -> dict:
    name = f"user{i:06d}@contoso.example"
    return {"schemas": [USER_SCHEMA, ENTERPRISE], "externalId": str(uuid.UUID(int=i)),
            "userName": name, "active": True, "displayName": f"User {i}",
            "emails": [{"primary": True, "type": "work", "value": name}],
            "name": {"formatted": f"User {i}", "familyName": f"{i}", "givenName": "User"},
            ENTERPRISE: {"department": f"dept{i % 50}"}}


def _group_doc(i: int) -> dict:
    return {"schemas": GROUP_SCHEMAS, "externalId": str(uuid.UUID(int=10**9 + i)),
            "displayName": f"group{i:05d}", "members": []}


async def _run_closed_loop(base, token, connections, seconds, make_request) -> dict:
    """``connections`` workers issue requests back to back for ``seconds``."""
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(seed: int):
        nonlocal errors
        rnd = random.Random(seed)
        conn = _conn(base, token)
        try:
            while time.perf_counter() < stop:
                method, url, body = make_request(rnd)
                t = time.perf_counter()
                r = await conn.request(method, url, json=body)
                lat.append(time.perf_counter() - t)
                if r.status >= 300:
                    errors += 1
                    if errors <= 3:
                        print(f"  {method} {url}: {r.status} {r.text[:200]}", file=sys.stderr)
        finally:
            await conn.close()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - t0
    return {"requests": len(lat), "rate": len(lat) / elapsed, "errors": errors,
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}


def _rate_job(args) -> dict:
    base, token, connections, seconds, kind, ids = args

    def make(rnd: random.Random):
        if kind == "baseline":
            return "GET", "/scim/orgs/1/ServiceProviderConfig", None
        if kind == "user lookup":
            i = rnd.randrange(ids["users"])
            return "GET", f'/scim/orgs/1/Users?filter=userName eq "user{i:06d}@contoso.example"', None
        if kind == "group lookup":
            i = rnd.randrange(ids["groups"])
            return ("GET", f'/scim/orgs/1/Groups?filter=displayName eq "group{i:05d}"'
                           "&excludedAttributes=members", None)
        if kind == "member patch":
            g = rnd.choice(ids["group_ids"])
            u = rnd.choice(ids["user_ids"])
            op = rnd.choice(["Add", "Remove"])
            body = {"schemas": [PATCH_SCHEMA], "Operations": [
                {"op": op, "path": "members", "value": [{"value": u}]}]}
            return "PATCH", f"/scim/orgs/1/Groups/{g}", body
        raise ValueError(kind)

    return asyncio.run(_run_closed_loop(base, token, connections, seconds, make))


async def _populate(base, token, connections, users: int, groups: int, per_user: int,
                    per_patch: int, with_lookups: bool) -> dict:
    """Create users and groups through SCIM the way Entra ID does."""
    counts = {"requests": 0, "errors": 0}
    user_ids: list[str | None] = [None] * users
    group_ids: list[str | None] = [None] * groups
    pool = [_conn(base, token) for _ in range(connections)]
    free: asyncio.Queue = asyncio.Queue()
    for c in pool:
        free.put_nowait(c)
    try:
        async def call(method, url, body=None):
            conn = await free.get()
            try:
                r = await conn.request(method, url, json=body)
            finally:
                free.put_nowait(conn)
            counts["requests"] += 1
            if r.status >= 300:
                counts["errors"] += 1
                if counts["errors"] <= 3:
                    print(f"  {method} {url}: {r.status} {r.text[:200]}", file=sys.stderr)
            return r

        async def make_users(ix: range):
            for i in ix:
                doc = _user_doc(i)
                if with_lookups:
                    await call("GET", f'/scim/orgs/1/Users?filter=userName eq "{doc["userName"]}"')
                r = await call("POST", "/scim/orgs/1/Users", doc)
                if r.status == 201:
                    user_ids[i] = r.json()["id"]

        async def make_groups(ix: range):
            for i in ix:
                doc = _group_doc(i)
                if with_lookups:
                    await call("GET", f'/scim/orgs/1/Groups?filter=displayName eq "{doc["displayName"]}"'
                                      "&excludedAttributes=members")
                r = await call("POST", "/scim/orgs/1/Groups", doc)
                if r.status == 201:
                    group_ids[i] = r.json()["id"]

        def split(n: int):
            step = -(-n // connections)
            return [range(k, min(n, k + step)) for k in range(0, n, step)]

        t0 = time.perf_counter()
        await asyncio.gather(*(make_users(r) for r in split(users)))
        t_users = time.perf_counter() - t0
        await asyncio.gather(*(make_groups(r) for r in split(groups)))
        # Each user joins `per_user` groups; each group's members arrive in
        # PATCHes of `per_patch` values, as Entra batches them.
        members: dict[int, list[str]] = {g: [] for g in range(groups)}
        rnd = random.Random(1)
        for u in range(users):
            for g in rnd.sample(range(groups), min(per_user, groups)):
                if user_ids[u]:
                    members[g].append(user_ids[u])
        patches = [(g, vals[k:k + per_patch]) for g, vals in members.items()
                   for k in range(0, len(vals), per_patch)]

        async def add_members(chunk):
            for g, vals in chunk:
                await call("PATCH", f"/scim/orgs/1/Groups/{group_ids[g]}", {
                    "schemas": [PATCH_SCHEMA],
                    "Operations": [{"op": "Add", "path": "members",
                                    "value": [{"value": v} for v in vals]}]})
        step = -(-len(patches) // connections) if patches else 1
        await asyncio.gather(*(add_members(patches[k:k + step]) for k in range(0, len(patches), step)))
        total = time.perf_counter() - t0
    finally:
        for c in pool:
            await c.close()
    return {"users": users, "groups": groups, "memberships": sum(len(v) for v in members.values()),
            "patches": len(patches), "seconds": total, "user_seconds": t_users, **counts,
            "user_ids": [u for u in user_ids if u], "group_ids": [g for g in group_ids if g]}


def _populate_job(args) -> dict:
    return asyncio.run(_populate(*args))


async def _fanout(base: str, token: str, daemons: int, group_id: str) -> dict:
    """``daemons`` connections long-poll the bundle as ausd does; then one
    rule change; when did each receive the new bundle?"""
    admin = _conn(base, token)
    first = await admin.request("GET", "/api/orgs/1/bundle")
    etag = first.headers["etag"]
    got: list[float] = []
    arrived = 0
    all_waiting = asyncio.Event()

    async def daemon(i: int):
        nonlocal arrived
        conn = _conn(base, token)
        try:
            await conn._open()
            arrived += 1
            if arrived == daemons:
                all_waiting.set()
            r = await conn.request("GET", "/api/orgs/1/bundle?wait=60", headers={
                "If-None-Match": etag, "X-Aus-Workload": f"bench-{i}", "X-Aus-Enforcing": "1"})
            if r.status == 200 and r.headers["etag"] != etag:
                got.append(time.perf_counter())
        finally:
            await conn.close()

    tasks = [asyncio.create_task(daemon(i)) for i in range(daemons)]
    await all_waiting.wait()
    await asyncio.sleep(1.0 + daemons / 500)   # every poll has reached the server
    r = await admin.request("POST", "/api/orgs/1/rules", json={
        "name": f"fanout-{uuid.uuid4().hex[:6]}", "sources": [group_id],
        "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status == 201, r.text
    t0 = time.perf_counter()     # the rule is in the draft: provisioning publishes it
    r = await admin.request("POST", "/api/orgs/1/provision", json={"note": "fan-out"})
    assert r.status == 200, r.text
    await asyncio.gather(*tasks)
    await admin.close()
    delays = [g - t0 for g in got]
    return {"daemons": daemons, "received": len(got),
            "p50_s": percentile(delays, 50) if delays else None,
            "p99_s": percentile(delays, 99) if delays else None,
            "max_s": max(delays) if delays else None}


def _fanout_job(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    return asyncio.run(_fanout(*args))


def _in_child(fn, args):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, (args,))


# --------------------------------------------------------------------------


def bench_db(kind: str, sz: Sizes) -> dict:
    out: dict = {"db": kind}
    workers = 1 if kind == "sqlite" else sz.workers   # SQLite serves one worker
    out["workers"] = workers
    with database(kind) as url, Server(url, workers) as srv:
        print(f"[{kind}] initial sync: {sz.sync_users} users, {sz.sync_groups} groups", file=sys.stderr)
        sync = _in_child(_populate_job, (srv.base, srv.token, sz.connections, sz.sync_users,
                                         sz.sync_groups, sz.groups_per_user, sz.members_per_patch, True))
        ids = {"users": sz.sync_users, "groups": sz.sync_groups,
               "user_ids": sync.pop("user_ids"), "group_ids": sync.pop("group_ids")}
        out["sync"] = sync
        rates = {}
        for kind_ in ("baseline", "user lookup", "group lookup", "member patch"):
            print(f"[{kind}] rate: {kind_}", file=sys.stderr)
            rates[kind_] = _in_child(_rate_job, (srv.base, srv.token, sz.connections,
                                                 sz.rate_seconds, kind_, ids))
        out["rates"] = rates
        print(f"[{kind}] fan-out: 1 and {sz.daemons} daemons", file=sys.stderr)
        gid = ids["group_ids"][0]
        out["fanout_one"] = _in_child(_fanout_job, (srv.base, srv.token, 1, gid))
        out["fanout"] = _in_child(_fanout_job, (srv.base, srv.token, sz.daemons, gid))
    return out


def markdown(results: list[dict], sz: Sizes, tiny: bool) -> str:
    from .run import machine

    lines = ["# aus-server benchmark results", "", f"Machine: {machine()}", "",
             f"Sizes: {'TINY smoke run, figures mean nothing' if tiny else 'full'} (initial sync "
             f"{sz.sync_users:,} users, {sz.sync_groups:,} groups); "
             f"server workers: SQLite 1 (its limit), PostgreSQL {sz.workers}; client connections "
             f"{sz.connections}.", ""]
    lines += ["## SCIM request rate", "",
              "| database | request | requests/s | ratio to baseline | p50 ms | p99 ms | errors |",
              "|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in results:
        base = r["rates"]["baseline"]["rate"]
        for k, v in r["rates"].items():
            lines.append(f"| {r['db']} | {k} | {v['rate']:.0f} | {v['rate'] / base:.2f} | "
                         f"{v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['errors']} |")
            if k in ("user lookup", "group lookup", "member patch"):
                verdicts.append((f"{r['db']}: {k} >= 500 req/s", v["rate"] >= 500 and v["errors"] == 0,
                                 f"{v['rate']:.0f}"))
    lines += ["", "Baseline: GET ServiceProviderConfig (authentication and HTTP, no database).", "",
              "## Initial sync", "",
              "| database | users | groups | memberships | requests | errors | users phase s | total s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["sync"]
        lines.append(f"| {r['db']} | {s['users']} | {s['groups']} | {s['memberships']} | {s['requests']} | "
                     f"{s['errors']} | {s['user_seconds']:.1f} | {s['seconds']:.1f} |")
        # The target is for 100,000 users and 10,000 groups; a smaller run
        # is judged by its rate, scaled to that size.
        scale = 100_000 / s["users"]
        at_full = s["seconds"] * scale
        label = f"{r['db']}: initial sync <= 300 s" + ("" if scale == 1 else f" (scaled x{scale:g})")
        verdicts.append((label, at_full <= 300 and s["errors"] == 0,
                         f"{at_full:.0f} s" + ("" if scale == 1 else f" (measured {s['seconds']:.0f} s)")))
    lines += ["", "## Bundle fan-out", "",
              "| database | daemons | received | p50 s | p99 s | max s |", "|---|---|---|---|---|---|"]
    for r in results:
        for f in (r["fanout_one"], r["fanout"]):
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {r['db']} | {f['daemons']} | {f['received']} | {fmt(f['p50_s'])} | "
                         f"{fmt(f['p99_s'])} | {fmt(f['max_s'])} |")
        f = r["fanout"]
        verdicts.append((f"{r['db']}: {f['daemons']} daemons <= 2 s",
                         f["received"] == f["daemons"] and f["max_s"] is not None and f["max_s"] <= 2,
                         "-" if f["max_s"] is None else f"{f['max_s']:.2f} s"))
    lines += ["", "## Verdicts", "", "| target | met | figure |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if ok else 'NO'} | {fig} |" for t, ok, fig in verdicts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.server")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--out", default="BENCHMARKS-server-results.md")
    p.add_argument("--json")
    p.add_argument("--users", type=int, help="initial sync users (default 100,000)")
    p.add_argument("--groups", type=int, help="initial sync groups (default 10,000)")
    args = p.parse_args(argv)
    sz = TINY if args.tiny else FULL
    if args.users or args.groups:
        sz = dataclasses.replace(sz, sync_users=args.users or sz.sync_users,
                                 sync_groups=args.groups or sz.sync_groups)
    results = [bench_db(kind, sz) for kind in args.db.split(",")]
    text = markdown(results, sz, args.tiny)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
