"""bench.scale part ``sync``: Entra ID's initial sync at full tenant size,
and the member PATCH rate.

1. Member PATCH rate on SQLite (one server worker, SQLite's limit) and
   on PostgreSQL: closed loop, 16 connections, each request one member
   added to or removed from a group (what Entra ID sends for a single
   membership change). Target on SQLite: >= 500/s; PostgreSQL reported.
2. The initial sync of 100,000 users and 10,000 groups into PostgreSQL,
   measured at that size (never scaled), in Entra ID's request shapes:
   per user a ``userName eq`` lookup, then a POST; per group a
   ``displayName eq`` lookup (``excludedAttributes=members``), a POST
   with no members, then its members in PATCHes of at most 50 values.
   Target: <= 300 s.

Memberships (:func:`membership_plan`): 3 per user on average, in the
shape of a real directory: a few policy groups of 20,000 members
(everyone in a region or a division), some of 1,000 (departments), many
of 100 (teams), and the rest of about 10 (projects, shared mailboxes).
At full size that is 300,000 memberships in 13,445 PATCHes.

The server's own CPU time (every worker) is reported per request: on a
shared machine the rate moves with the neighbours, CPU per request less.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import common
from .server import (
    PATCH_SCHEMA,
    Server,
    _conn,
    _group_doc,
    _in_child,
    _rate_job,
    _user_doc,
    database,
)

CONNECTIONS = 16
PATCH_BATCH = 50
SYNC_TARGET_S = 300.0
PATCH_TARGET = 500.0


@dataclass(frozen=True)
class Sizes:
    sync_users: int
    sync_groups: int
    pg_workers: int
    rate_users: int          # the population the SQLite PATCH rate runs on
    rate_groups: int
    rate_seconds: float
    # (groups, members each), largest first; the remaining groups share
    # what is left of users * per_user
    tiers: tuple[tuple[int, int], ...]
    per_user: int = 3


FULL = Sizes(sync_users=100_000, sync_groups=10_000, pg_workers=2,
             rate_users=10_000, rate_groups=1_000, rate_seconds=20,
             tiers=((5, 20_000), (50, 1_000), (500, 100)))
TINY = Sizes(sync_users=600, sync_groups=60, pg_workers=2,
             rate_users=300, rate_groups=30, rate_seconds=2,
             tiers=((1, 120), (3, 60), (6, 30)))


def membership_plan(users: int, groups: int, tiers, per_user: int, seed: int = 1) -> list[list[int]]:
    """For each group, the user indexes that are its members: the tiers'
    groups first (each a random sample of users), then the remaining
    groups share the remaining ``users * per_user`` memberships evenly."""
    rnd = random.Random(seed)
    plan: list[list[int]] = []
    budget = users * per_user
    for count, size in tiers:
        for _ in range(count):
            if len(plan) < groups:
                plan.append(sorted(rnd.sample(range(users), min(size, users))))
                budget -= len(plan[-1])
    rest = groups - len(plan)
    if rest > 0:
        # users dealt round-robin over the remaining groups, a fresh
        # shuffle per round: every group within one member of the others
        small: list[set[int]] = [set() for _ in range(rest)]
        order: list[int] = []
        for k in range(max(0, budget)):
            if k % users == 0:
                order = list(range(users))
                rnd.shuffle(order)
            small[k % rest].add(order[k % users])
        plan += [sorted(m) for m in small]
    return plan


# --------------------------------------------------------------------------
# The server's CPU time (the process and its workers), from /proc


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants now."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue
        todo += _children(p)
    return total


# --------------------------------------------------------------------------
# The sync (in a child process: the client never shares the server's GIL)


async def _sync(base: str, token: str, users: int, groups: int, plan: list[list[int]],
                connections: int, batch: int) -> dict:
    counts = {"requests": 0, "errors": 0, "lookups": 0, "posts": 0, "patches": 0}
    user_ids: list[str | None] = [None] * users
    group_ids: list[str | None] = [None] * groups

    async def call(conn, method, url, body=None, kind="posts"):
        r = await conn.request(method, url, json=body)
        counts["requests"] += 1
        counts[kind] += 1
        if r.status >= 300:
            counts["errors"] += 1
            if counts["errors"] <= 3:
                print(f"  {method} {url}: {r.status} {r.text[:200]}", file=sys.stderr)
        return r

    async def run_queue(items, job):
        queue: asyncio.Queue = asyncio.Queue()
        for it in items:
            queue.put_nowait(it)

        async def worker():
            conn = _conn(base, token)
            try:
                while not queue.empty():
                    await job(conn, queue.get_nowait())
            finally:
                await conn.close()
        await asyncio.gather(*(worker() for _ in range(connections)))

    async def one_user(conn, i):
        doc = _user_doc(i)
        await call(conn, "GET", f'/scim/orgs/1/Users?filter=userName eq "{doc["userName"]}"',
                   kind="lookups")
        r = await call(conn, "POST", "/scim/orgs/1/Users", doc)
        if r.status == 201:
            user_ids[i] = r.json()["id"]

    async def one_group(conn, g):
        doc = _group_doc(g)
        await call(conn, "GET", f'/scim/orgs/1/Groups?filter=displayName eq "{doc["displayName"]}"'
                                "&excludedAttributes=members", kind="lookups")
        r = await call(conn, "POST", "/scim/orgs/1/Groups", doc)
        if r.status != 201:
            return
        gid = group_ids[g] = r.json()["id"]
        members = [user_ids[u] for u in plan[g] if user_ids[u]]
        for k in range(0, len(members), batch):
            await call(conn, "PATCH", f"/scim/orgs/1/Groups/{gid}", {
                "schemas": [PATCH_SCHEMA],
                "Operations": [{"op": "Add", "path": "members",
                                "value": [{"value": v} for v in members[k:k + batch]]}]},
                kind="patches")

    t0 = time.perf_counter()
    await run_queue(range(users), one_user)
    t_users = time.perf_counter() - t0
    order = list(range(groups))
    random.Random(2).shuffle(order)       # large and small groups mixed, as Entra meets them
    await run_queue(order, one_group)
    total = time.perf_counter() - t0
    return {"users": users, "groups": groups, "memberships": sum(len(p) for p in plan),
            "seconds": total, "user_seconds": t_users, "group_seconds": total - t_users,
            **counts, "user_ids": [u for u in user_ids if u],
            "group_ids": [g for g in group_ids if g]}


def _sync_job(args) -> dict:
    return asyncio.run(_sync(*args))


def run_sync(srv: Server, users: int, groups: int, tiers, per_user: int) -> tuple[dict, dict]:
    """The sync against ``srv``; (figures, ids for later runs)."""
    plan = membership_plan(users, groups, tiers, per_user)
    cpu0 = tree_cpu(srv.proc.pid)
    out = _in_child(_sync_job, (srv.base, srv.token, users, groups, plan, CONNECTIONS, PATCH_BATCH))
    out["server_cpu_s"] = tree_cpu(srv.proc.pid) - cpu0
    ids = {"users": users, "groups": groups, "user_ids": out.pop("user_ids"),
           "group_ids": out.pop("group_ids")}
    sizes = sorted((len(p) for p in plan), reverse=True)
    out["largest_group"] = sizes[0] if sizes else 0
    out["smallest_group"] = sizes[-1] if sizes else 0
    return out, ids


def run_rate(srv: Server, kind: str, ids: dict, seconds: float) -> dict:
    cpu0 = tree_cpu(srv.proc.pid)
    r = _in_child(_rate_job, (srv.base, srv.token, CONNECTIONS, seconds, kind, ids))
    r["server_cpu_ms"] = (tree_cpu(srv.proc.pid) - cpu0) * 1000 / max(1, r["requests"])
    return r


def measure(sz: Sizes) -> dict:
    raw: dict = {}
    print(f"[sync] SQLite: {sz.rate_users} users, {sz.rate_groups} groups, then member PATCH rate",
          file=sys.stderr, flush=True)
    with database("sqlite") as url, Server(url, 1) as srv:
        pop, ids = run_sync(srv, sz.rate_users, sz.rate_groups,
                            ((1, min(sz.rate_users, 2_000)),), sz.per_user)
        raw["sqlite_population"] = pop
        run_rate(srv, "member patch", ids, sz.rate_seconds / 4)   # warm: caches, pool, statements
        raw["sqlite_baseline"] = run_rate(srv, "baseline", ids, sz.rate_seconds / 4)
        raw["sqlite_patch"] = run_rate(srv, "member patch", ids, sz.rate_seconds)
        print(f"[sync] SQLite member PATCH: {raw['sqlite_patch']}", file=sys.stderr, flush=True)
    print(f"[sync] PostgreSQL, {sz.pg_workers} workers: initial sync of {sz.sync_users} users, "
          f"{sz.sync_groups} groups", file=sys.stderr, flush=True)
    with database("postgresql") as url, Server(url, sz.pg_workers) as srv:
        raw["pg_sync"], ids = run_sync(srv, sz.sync_users, sz.sync_groups, sz.tiers, sz.per_user)
        print(f"[sync] PostgreSQL: {raw['pg_sync']}", file=sys.stderr, flush=True)
        raw["pg_baseline"] = run_rate(srv, "baseline", ids, sz.rate_seconds / 4)
        raw["pg_patch"] = run_rate(srv, "member patch", ids, sz.rate_seconds)
    raw["pg_workers"] = sz.pg_workers
    return raw


def report(raw: dict, sz: Sizes, tiny: bool) -> common.Part:
    s = raw["pg_sync"]
    sp, pp = raw["sqlite_patch"], raw["pg_patch"]
    lines = [
        f"Initial sync into PostgreSQL with {raw['pg_workers']} server workers (the machine's "
        f"2 CPUs, shared with the load client and PostgreSQL); member PATCH rate on SQLite "
        f"(one worker) and on PostgreSQL. Load: {CONNECTIONS} keep-alive connections from "
        "one client process over loopback."
        + (" TINY run: sizes are a smoke test, figures mean nothing." if tiny else ""), "",
        "| initial sync | users | groups | memberships | group sizes | lookups | POSTs | "
        "member PATCHes | errors | users phase s | groups phase s | total s | requests/s | "
        "server CPU ms/request |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| PostgreSQL | {s['users']:,} | {s['groups']:,} | {s['memberships']:,} | "
        f"{s['smallest_group']:,}-{s['largest_group']:,} | {s['lookups']:,} | {s['posts']:,} | "
        f"{s['patches']:,} | {s['errors']} | {s['user_seconds']:.1f} | {s['group_seconds']:.1f} | "
        f"{s['seconds']:.1f} | {s['requests'] / s['seconds']:.0f} | "
        f"{s['server_cpu_s'] * 1000 / max(1, s['requests']):.2f} |", "",
        "| rate | database | population | requests/s | p50 ms | p99 ms | errors | "
        "server CPU ms/request |",
        "|---|---|---|---|---|---|---|---|"]
    for label, db, pop, r in (
            ("baseline (ServiceProviderConfig)", "SQLite", raw["sqlite_population"],
             raw["sqlite_baseline"]),
            ("member PATCH (one member)", "SQLite", raw["sqlite_population"], sp),
            ("baseline (ServiceProviderConfig)", "PostgreSQL", s, raw["pg_baseline"]),
            ("member PATCH (one member)", "PostgreSQL", s, pp)):
        lines.append(f"| {label} | {db} | {pop['users']:,} users, {pop['groups']:,} groups | "
                     f"{r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
                     f"{r['server_cpu_ms']:.2f} |")
    lines += ["", "Memberships: 3 per user on average; groups of "
              + ", ".join(f"{n:,} x {m:,}" for n, m in sz.tiers)
              + ", the remaining groups sharing the rest evenly (sizes "
              f"{s['smallest_group']:,} to {s['largest_group']:,}); PATCHes of at most "
              f"{PATCH_BATCH} values, each group's one after another."]
    size = f"{s['users']:,} users, {s['groups']:,} groups"
    verdicts = (
        common.Verdict(f"initial sync of {size} on PostgreSQL <= {SYNC_TARGET_S:.0f} s "
                       f"(measured at that size)",
                       f"{s['seconds']:.0f} s, {s['errors']} errors",
                       s["seconds"] <= SYNC_TARGET_S and s["errors"] == 0),
        common.Verdict(f"member PATCH on SQLite >= {PATCH_TARGET:.0f}/s",
                       f"{sp['rate']:.0f}/s (PostgreSQL {pp['rate']:.0f}/s)",
                       sp["rate"] >= PATCH_TARGET and sp["errors"] == 0),
    )
    return common.Part("Initial sync and member PATCH (SCIM, Entra ID's shapes)",
                       "\n".join(lines), verdicts, raw)


def scale_part(tiny: bool, workdir: Path) -> common.Part:
    sz = TINY if tiny else FULL
    return report(measure(sz), sz, tiny)
