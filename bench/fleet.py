"""Fleet scale: 10,000 long-polling workloads on two aus-server replicas
sharing one PostgreSQL, with 100,000 users and 10,000 groups in the store.

    python -m bench.scale --only fleet          full size
    python -m bench.scale --only fleet --tiny   the same code, small

Measured:

1. one membership change (a SCIM member PATCH as Entra ID sends it) and
   one rule change (a rule created through the management API, then
   provisioned): how long until every workload holds the new version,
   and how many bytes each received for it;
2. server memory per held long-poll and how many one replica process
   holds: every workload polls one replica, whose RSS with the polls held
   is compared with its RSS idle.

The store is written directly (bulk inserts into the server's tables),
not through SCIM: the initial sync is measured by another part. The
workloads are simulated by :mod:`bench.fleet_client`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert

from aus.server.bundle import touch
from aus.server.db import Group, Membership, User, fold, open_database, utcnow
from tests.support.postgres import PostgresServer

from . import fleet_client
from .common import Part, Verdict, percentile
from .flow_ingest import _tree_cpu
from .httpload import Connection
from .server import Server

PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
ORG = "1"
DEADLINE = 2.0                 # seconds: a change reaches every workload
WIRE_BUDGET = 2048             # bytes per workload for one membership change
POLL_BUDGET = 50 * 1024        # bytes of replica memory per held poll (our bound)


@dataclass(frozen=True)
class Sizes:
    users: int
    groups: int
    policy: tuple[int, ...]    # members of each policy group (one rule each)
    groups_per_user: int       # memberships of every user in the other groups
    workloads: int
    clients: int               # load client processes
    sources: int               # 127.0.0.x source addresses
    wait: int                  # the poll's ?wait= (the server caps it at 60)


FULL = Sizes(users=100_000, groups=10_000, policy=(20_000, 10_000, 5_000, 2_000, 1_000),
             groups_per_user=2, workloads=10_000, clients=2, sources=8, wait=60)
TINY = Sizes(users=200, groups=20, policy=(40, 20, 10, 4, 2), groups_per_user=2,
             workloads=200, clients=2, sources=4, wait=5)


# --------------------------------------------------------------------------
# The store, written directly


def user_name(i: int) -> str:
    return f"user{i:06d}@contoso.example"


def seed(db_url: str, sz: Sizes) -> dict:
    """Users, groups (the first ``len(sz.policy)`` are the policy groups,
    members drawn from the first users) and memberships, in bulk."""
    import random

    rnd = random.Random(14)
    t0 = time.perf_counter()
    engine, sessions = open_database(db_url)
    now = utcnow()
    uids = [str(uuid.UUID(int=i + 1)) for i in range(sz.users)]
    gids = [str(uuid.UUID(int=10**9 + g)) for g in range(sz.groups)]
    gnames = [f"policy-{g}" if g < len(sz.policy) else f"group{g:05d}" for g in range(sz.groups)]
    members: list[dict] = []
    for g, n in enumerate(sz.policy):
        members += [{"group_id": gids[g], "member_id": uids[u], "member_type": "User"}
                    for u in rnd.sample(range(sz.users), n)]
    others = range(len(sz.policy), sz.groups)
    for u in range(sz.users):
        for g in rnd.sample(others, min(sz.groups_per_user, len(others))):
            members.append({"group_id": gids[g], "member_id": uids[u], "member_type": "User"})
    try:
        with sessions.begin() as s:
            for k in range(0, sz.users, 5000):
                s.execute(insert(User), [
                    {"id": uids[i], "org_id": ORG, "user_name": user_name(i),
                     "user_name_key": fold(user_name(i)), "external_id": str(uuid.UUID(int=i + 1)),
                     "display_name": f"User {i}", "active": True, "doc": {"userName": user_name(i)},
                     "created_at": now, "modified_at": now, "version": 1}
                    for i in range(k, min(sz.users, k + 5000))])
            s.execute(insert(Group), [
                {"id": gids[g], "org_id": ORG, "display_name": gnames[g],
                 "display_name_key": fold(gnames[g]), "external_id": gids[g], "source": "scim",
                 "doc": {}, "created_at": now, "modified_at": now, "last_sync_at": now,
                 "last_sync_op": "create", "last_sync_outcome": "ok", "version": 1}
                for g in range(sz.groups)])
            for k in range(0, len(members), 20000):
                s.execute(insert(Membership), members[k:k + 20000])
            touch(s, ORG)
    finally:
        engine.dispose()
    in_policy = set()
    for m in members[:sum(sz.policy)]:
        in_policy.add(m["member_id"])
    joiner = next(u for u in uids if u not in in_policy)
    return {"seconds": time.perf_counter() - t0, "memberships": len(members),
            "policy_group_ids": gids[:len(sz.policy)], "joiner": joiner}


# --------------------------------------------------------------------------
# Talking to the replicas


async def _call(srv: Server, method: str, path: str, body=None) -> tuple[float, float, object]:
    """One request on a fresh connection; the times just before sending
    and on the answer (monotonic), and the response."""
    conn = Connection("127.0.0.1", srv.port, {"Authorization": f"Bearer {srv.token}"})
    try:
        await conn._open()
        t0 = time.monotonic()
        r = await conn.request(method, path, json=body)
        return t0, time.monotonic(), r
    finally:
        await conn.close()


def call(srv: Server, method: str, path: str, body=None, ok=(200, 201, 204)):
    t0, t1, r = asyncio.run(_call(srv, method, path, body))
    if r.status not in ok:
        raise RuntimeError(f"{method} {path}: HTTP {r.status} {r.text[:300]}")
    return t0, t1, r


def metrics(srv: Server) -> dict[str, float]:
    """The replica's long-polls held now and its bundle build histogram."""
    _, _, r = call(srv, "GET", "/metrics")
    out = {"polls": 0.0, "build_sum": 0.0, "build_count": 0.0}
    names = {"aus_server_bundle_long_polls": "polls",
             "aus_server_bundle_build_duration_seconds_sum": "build_sum",
             "aus_server_bundle_build_duration_seconds_count": "build_count"}
    for line in r.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[names[name]] += float(line.rsplit(" ", 1)[1])
    return out


def rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
    return total


# --------------------------------------------------------------------------
# The load clients


class Clients:
    """``n`` load client processes (bench.fleet_client), each driven over a pipe."""

    def __init__(self, n: int):
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=fleet_client.serve, args=(child,), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def ask(self, cmd: str, arg=None, timeout: float = 300) -> list:
        for c in self.pipes:
            c.send((cmd, arg))
        out = []
        for c in self.pipes:
            if not c.poll(timeout):
                raise RuntimeError(f"load client did not answer {cmd!r} within {timeout:.0f} s")
            out.append(c.recv())
        return out

    def open(self, token: str, targets: list[tuple], etag: str, version: int, wait: int) -> int:
        n = len(self.pipes)
        for k, c in enumerate(self.pipes):
            c.send(("open", {"token": token, "org": ORG, "wait": wait, "etag": etag,
                             "version": version, "targets": targets[k::n]}))
        opened = 0
        for c in self.pipes:
            if not c.poll(600):
                raise RuntimeError("load clients did not connect within 600 s")
            opened += c.recv()
        return opened

    def status(self) -> dict:
        out: dict = {}
        for st in self.ask("status"):
            for k, v in st.items():
                out[k] = out.get(k, 0 if not isinstance(v, list) else []) + v
        return out

    def records(self) -> list[tuple]:
        return [r for rs in self.ask("records", 0) for r in rs]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("exit", timeout=10)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def targets(n: int, replicas: list[Server], sources: int, prefix: str) -> list[tuple]:
    """Workload i polls replica i mod len(replicas) from 127.0.0.(2 + i mod sources)."""
    return [(i, f"{prefix}-{i:05d}", f"127.0.0.{2 + i % sources}", "127.0.0.1",
             replicas[i % len(replicas)].port) for i in range(n)]


def wait_held(clients: Clients, replicas: list[Server], n: int, timeout: float) -> dict:
    """Until every workload's poll is written and the replicas hold ``n``
    polls between them; after ``timeout`` the figures as they are (a
    loaded replica may never hold them all at once: the polls whose wait
    ended are on their way back)."""
    deadline = time.monotonic() + timeout
    best: dict = {}
    while True:
        st = clients.status()
        held = [metrics(r)["polls"] for r in replicas]
        if st["polls"] < n or st["errors"]:
            raise RuntimeError(f"{n} workloads did not all connect and poll: {st}")
        if not best or sum(held) > sum(best["held"]):
            best = {"status": st, "held": held}
        if st["waiting"] == n and sum(held) >= n:
            return {"status": st, "held": held, "all": True}
        if time.monotonic() > deadline:
            return {**best, "all": False}
        time.sleep(0.5)


def wait_gone(replicas: list[Server], timeout: float) -> None:
    """Until the replicas hold no poll (polls of closed connections end at
    their wait)."""
    deadline = time.monotonic() + timeout
    while any(metrics(r)["polls"] for r in replicas) and time.monotonic() < deadline:
        time.sleep(0.5)


def arrivals(clients: Clients, n: int, after: int, base: int, timeout: float) -> list[tuple]:
    """For each workload the first record of a version above ``after``;
    waits until all ``n`` have one or ``timeout`` passes. While waiting it
    asks the clients for counts only (``base``: the count before the
    change): fetching the records is the costly part."""
    deadline = time.monotonic() + timeout
    while True:
        done = clients.status()["records"] - base >= n
        if done or time.monotonic() > deadline:
            first: dict[int, tuple] = {}
            for rec in sorted(clients.records(), key=lambda r: r[1]):
                if rec[2] > after and rec[0] not in first:
                    first[rec[0]] = rec
            if len(first) == n or time.monotonic() > deadline:
                return list(first.values())
        time.sleep(0.25)


# --------------------------------------------------------------------------
# The changes


def membership_change(replica: Server, group_id: str, user_id: str) -> tuple[float, float]:
    """Entra ID's member PATCH: one Add of one user."""
    t0, t1, _ = call(replica, "PATCH", f"/scim/orgs/{ORG}/Groups/{group_id}", {
        "schemas": [PATCH_SCHEMA],
        "Operations": [{"op": "Add", "path": "members", "value": [{"value": user_id}]}]})
    return t0, t1


def rule_change(replica: Server, group_id: str) -> tuple[float, float]:
    """A rule created in the draft, then provisioned: the times are the
    provision's (the draft alone changes no bundle)."""
    call(replica, "POST", f"/api/orgs/{ORG}/rules", {
        "name": f"fleet-{uuid.uuid4().hex[:8]}", "sources": [group_id],
        "destinations": ["10.77.0.0/16"], "services": ["443/tcp"]})
    t0, t1, _ = call(replica, "POST", f"/api/orgs/{ORG}/provision", {"note": "fleet rule change"})
    return t0, t1


def summarize(recs: list[tuple], n: int, t_sent: float, t_answer: float) -> dict:
    times = [r[1] for r in recs]
    sizes = [r[3] for r in recs]
    return {"workloads": n, "received": len(recs),
            "max_from_send_s": max(times) - t_sent if times else None,
            "max_from_answer_s": max(times) - t_answer if times else None,
            "p50_from_answer_s": percentile(times, 50) - t_answer if times else None,
            "first_from_answer_s": min(times) - t_answer if times else None,
            "answer_s": t_answer - t_sent,
            "bytes_max": max(sizes) if sizes else None,
            "bytes_median": statistics.median(sizes) if sizes else None,
            "deltas": sum(1 for r in recs if r[4]),
            "gzip": sum(1 for r in recs if r[5] == "gzip"),
            "versions": sorted({r[2] for r in recs})}


# --------------------------------------------------------------------------


def say(what: str) -> None:
    print(f"  fleet: {what}", file=sys.stderr, flush=True)


def measure(sz: Sizes, replicas: list[Server], seeded: dict, pg_pid: int) -> dict:
    a, b = replicas
    out: dict = {"seed": {k: seeded[k] for k in ("seconds", "memberships")},
                 "loadavg": [os.getloadavg()[0]]}
    policy = seeded["policy_group_ids"]

    say(f"seeded in {seeded['seconds']:.0f} s; provisioning the policy")
    # The policy: one rule per policy group, made and provisioned through the API.
    for k, gid in enumerate(policy):
        call(a, "POST", f"/api/orgs/{ORG}/rules", {
            "name": f"policy-rule-{k}", "sources": [gid],
            "destinations": [f"10.{k}.0.0/16"], "services": ["443/tcp", "22/tcp"]})
    t0, t1, _ = call(a, "POST", f"/api/orgs/{ORG}/provision", {"note": "fleet policy"})
    out["provision_s"] = t1 - t0
    _, _, r = call(a, "GET", f"/api/orgs/{ORG}/bundle")
    version, etag = int(r.headers["x-aus-version"]), r.headers["etag"]
    out["bundle_bytes"] = len(r.body)
    deadline = time.monotonic() + 30
    while call(b, "GET", f"/api/orgs/{ORG}/bundle")[2].headers["etag"] != etag:
        if time.monotonic() > deadline:
            raise RuntimeError("the second replica does not serve the provisioned bundle")
        time.sleep(0.2)

    clients = Clients(sz.clients)
    try:
        # One workload alone, on the replica that does not take the write:
        # what each change costs on the wire, and the latency unloaded.
        say("one workload alone")
        alone: dict = {}
        clients.open(a.token, targets(1, [b], 1, "fleet-alone"), etag, version, sz.wait)
        wait_held(clients, [b], 1, 30)
        for kind in ("membership", "rule"):
            before, base = metrics(a), clients.status()["records"]
            t0, t1 = membership_change(a, policy[0], seeded["joiner"]) if kind == "membership" \
                else rule_change(a, policy[1])
            recs = arrivals(clients, 1, version, base, 30)
            alone[kind] = summarize(recs, 1, t0, t1)
            after = metrics(a)
            alone[kind]["build_s"] = ((after["build_sum"] - before["build_sum"])
                                      / max(1.0, after["build_count"] - before["build_count"]))
            version = recs[0][2]
            etag = call(a, "GET", f"/api/orgs/{ORG}/bundle")[2].headers["etag"]
            if kind == "membership":   # back out, so the fleet's PATCH adds the same user
                call(a, "PATCH", f"/scim/orgs/{ORG}/Groups/{policy[0]}", {
                    "schemas": [PATCH_SCHEMA], "Operations": [
                        {"op": "Remove", "path": "members",
                         "value": [{"value": seeded["joiner"]}]}]})
                deadline = time.monotonic() + 30
                while True:
                    _, _, r = call(b, "GET", f"/api/orgs/{ORG}/bundle")
                    if int(r.headers["x-aus-version"]) > version or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                version, etag = int(r.headers["x-aus-version"]), r.headers["etag"]
                wait_held(clients, [b], 1, 30)
        out["alone"] = alone
        clients.ask("close")
        wait_gone([b], sz.wait + 10)
        _, _, r = call(a, "GET", f"/api/orgs/{ORG}/bundle")
        version, etag = int(r.headers["x-aus-version"]), r.headers["etag"]
        out["bundle_bytes_after"] = len(r.body)

        say(f"memory: {sz.workloads:,} polls on replica A")
        # Memory: every workload polls replica A alone.
        time.sleep(1.0)
        idle = rss(a.proc.pid)
        t = time.monotonic()
        clients.open(a.token, targets(sz.workloads, [a], sz.sources, "fleet-mem"), etag, version,
                     sz.wait)
        held = wait_held(clients, [a], sz.workloads, 120)
        # RSS and the polls held at that moment, together
        out["memory"] = {"idle_rss": idle, "held_rss": rss(a.proc.pid),
                         "held": metrics(a)["polls"], "most_held": held["held"][0],
                         "connect_s": time.monotonic() - t, "client": held["status"]}
        clients.ask("close")
        wait_gone([a], sz.wait + 10)

        say(f"fan-out: {sz.workloads:,} polls over both replicas")
        # Fan-out: the fleet spread over both replicas; the write goes to A.
        n = sz.workloads
        rss0 = [rss(r.proc.pid) for r in replicas]
        clients.open(a.token, targets(n, replicas, sz.sources, "fleet"), etag, version, sz.wait)
        held = wait_held(clients, replicas, n, 120)
        out["spread"] = {"held": held["held"], "all_held": held["all"], "rss_before": rss0,
                         "rss_held": [rss(r.proc.pid) for r in replicas]}
        avail = _mem_available()
        for kind in ("membership", "rule"):
            one = alone[kind]
            if not one["deltas"] and one["bytes_max"] * n > avail / 4:
                # Every workload would get the whole bundle at once: the
                # replicas would queue it n times over on this shared VM.
                out[kind] = {"skipped": f"each workload would receive the whole bundle "
                                        f"({one['bytes_max']:,} B): {one['bytes_max'] * n / 2**30:.1f} "
                                        f"GiB queued at once, over a quarter of the "
                                        f"{avail / 2**30:.1f} GiB available"}
                continue
            say(f"{kind} change to the fleet")
            before = [metrics(r) for r in replicas]
            pids = [r.proc.pid for r in replicas] + [pg_pid] + [p.pid for p in clients.procs]
            cpu0 = [_tree_cpu(p) for p in pids]
            base = clients.status()["records"]
            t0, t1 = membership_change(a, policy[0], seeded["joiner"]) if kind == "membership" \
                else rule_change(a, policy[1])
            recs = arrivals(clients, n, version, base, 120)
            cpu = [_tree_cpu(p) - c for p, c in zip(pids, cpu0)]
            out[kind] = summarize(recs, n, t0, t1)
            # CPU seconds from the change to the end of the wait for the last workload
            out[kind]["cpu_s"] = {"replicas": cpu[:2], "postgresql": cpu[2],
                                  "clients": sum(cpu[3:])}
            after = [metrics(r) for r in replicas]
            builds = sum(x["build_count"] - y["build_count"] for x, y in zip(after, before))
            out[kind]["build_s"] = sum(x["build_sum"] - y["build_sum"]
                                       for x, y in zip(after, before)) / max(1.0, builds)
            st = clients.status()
            out[kind]["lost"], out[kind]["errors"] = st["lost"], st["errors"]
            if recs:
                version = max(r[2] for r in recs)
            if kind == "membership":
                wait_held(clients, replicas, n, 60)
        clients.ask("close")
    finally:
        clients.stop()
    out["loadavg"].append(os.getloadavg()[0])
    return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run(sz: Sizes) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # the replicas inherit it
    if hard < sz.workloads + 1000:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below {sz.workloads + 1000}")
    pg = PostgresServer().start()
    try:
        url = pg.url(pg.new_database())
        a, b = Server(url, 1), Server(url, 1)   # each creates the org's key (and the org)
        say(f"seeding {sz.users:,} users, {sz.groups:,} groups")
        seeded = seed(url, sz)
        with a, b:
            return measure(sz, [a, b], seeded, pg.proc.pid)
    finally:
        pg.stop()


# --------------------------------------------------------------------------


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def report(sz: Sizes, r: dict, tiny: bool) -> Part:
    n = sz.workloads
    verdicts: list[Verdict] = []
    policy_members = sum(sz.policy)
    md = [
        f"Sizes: {sz.users:,} users, {sz.groups:,} groups ({r['seed']['memberships']:,} memberships), "
        f"{n:,} simulated workloads" + (" (tiny: figures mean nothing)" if tiny else "") + ".",
        "",
        f"Policy: {len(sz.policy)} rules, one per policy group; the policy groups have "
        f"{', '.join(f'{k:,}' for k in sz.policy)} members ({policy_members:,} in the bundle, "
        f"drawn at random from all users); every user is also in {sz.groups_per_user} of the "
        f"other {sz.groups - len(sz.policy):,} groups, which no rule names. Full bundle: "
        f"{r['bundle_bytes']:,} B uncompressed.",
        "",
        "Method. One PostgreSQL (tests.support.postgres) and two `aus-server serve` processes on "
        "it, one worker each, on two ports: two replicas. Users, groups and memberships are "
        f"bulk-inserted into the server's tables ({r['seed']['seconds']:.0f} s), not sent through "
        "SCIM (the initial sync is measured on its own); the rules are created and provisioned "
        "through the management API, so the server builds the bundle. The workloads are "
        f"simulated by `bench.fleet_client`: {sz.clients} processes of asyncio protocols, one TCP "
        f"connection per workload from 127.0.0.2-{1 + sz.sources}, each long-polling "
        f"`GET /api/orgs/1/bundle?wait={sz.wait}&since=V` with `Accept-Encoding: gzip`, "
        "`If-None-Match` and `X-Aus-Workload`, and polling again at once after every answer, as "
        "ausd does. Workload i polls replica i mod 2; the change is written to replica A. For "
        "each answer the client notes the monotonic time of its last byte, the version "
        "(`X-Aus-Version`), the bytes read from the socket for it (status line, headers, body) "
        "and whether it was a delta. Arrival is measured from just before the change request is "
        "sent and from its answer, to the last workload's last byte. Client, replicas and "
        "PostgreSQL all run on this 2-CPU VM, which other work shared during the run.",
        "",
    ]
    md += ["| change | workloads | received | answer | first | p50 | last (from answer) | "
           "last (from send) | bytes/workload max (median) | deltas | gzip | bundle build |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, key in (("membership (SCIM PATCH), one workload", ("alone", "membership")),
                       ("rule (create + provision), one workload", ("alone", "rule")),
                       ("membership (SCIM PATCH), fleet", ("membership",)),
                       ("rule (create + provision), fleet", ("rule",))):
        f = r
        for k in key:
            f = f.get(k, {})
        if "skipped" in f or not f:
            md.append(f"| {label} | {n:,} | not run: {f.get('skipped', 'failed')} |"
                      " | | | | | | | | |")
            continue
        md.append(f"| {label} | {f['workloads']:,} | {f['received']:,} | {_s(f['answer_s'])} | "
                  f"{_s(f['first_from_answer_s'])} | {_s(f['p50_from_answer_s'])} | "
                  f"{_s(f['max_from_answer_s'])} | {_s(f['max_from_send_s'])} | "
                  f"{f['bytes_max']:,} ({f['bytes_median']:,.0f}) | {f['deltas']:,} | {f['gzip']:,} | "
                  f"{f['build_s']:.2f} s |")
    md += ["", "Answer: the change request's own time (for the rule, the provision's, which "
               "builds the bundle before answering). Bundle build: the server's "
               "`aus_server_bundle_build_duration_seconds` for that change.", ""]
    for kind in ("membership", "rule"):
        c = r.get(kind, {}).get("cpu_s")
        if c:
            md += [f"CPU during the {kind} fan-out (from the change until every workload had "
                   f"it, seconds): replicas {c['replicas'][0]:.2f} + {c['replicas'][1]:.2f}, "
                   f"PostgreSQL {c['postgresql']:.2f}, load clients {c['clients']:.2f}.", ""]
    mem = r["memory"]
    per = (mem["held_rss"] - mem["idle_rss"]) / max(1, mem["held"])
    sp = r["spread"]
    md += [f"Memory: all {n:,} workloads poll replica A (connected in {mem['connect_s']:.1f} s); "
           f"it held {mem['most_held']:,.0f} at once at most, {mem['held']:,.0f} when its RSS was "
           f"read: {mem['idle_rss'] / 2**20:.0f} MiB idle, {mem['held_rss'] / 2**20:.0f} MiB with "
           f"them held, {per / 1024:.1f} KiB per held poll (polls whose 60 s wait ended are "
           "on their way back meanwhile). "
           f"Spread over both replicas: {', '.join(f'{h:,.0f}' for h in sp['held'])} held, RSS "
           + ", ".join(f"{x / 2**20:.0f} -> {y / 2**20:.0f} MiB"
                       for x, y in zip(sp["rss_before"], sp["rss_held"])) + ".",
           "", f"Provisioning the policy (build included) took {r['provision_s']:.2f} s.",
           "", f"Machine load average (1 min): {r['loadavg'][0]:.1f} when the measurement began, "
           f"{r['loadavg'][-1]:.1f} at its end ({os.cpu_count()} CPUs; above that, other work "
           "shared them)."]

    for kind, what in (("membership", "one membership change (SCIM member PATCH)"),
                       ("rule", "a rule change (management API, provisioned)")):
        f = r.get(kind, {})
        target = f"fleet: {what} reaches all {n:,} workloads within 2 s (from before sending it)"
        if "skipped" in f:
            verdicts.append(Verdict(target, "not run: " + f["skipped"], False))
        else:
            ok = f["received"] == n and f["max_from_send_s"] is not None \
                and f["max_from_send_s"] <= DEADLINE
            verdicts.append(Verdict(target, f"{_s(f['max_from_send_s'])} to the last of "
                                    f"{f['received']:,}/{n:,} ({_s(f['max_from_answer_s'])} "
                                    "from the answer)", ok))
        if kind == "membership":
            one = r["alone"]["membership"]
            src = f if "skipped" not in f else one
            figure = (f"{src['bytes_max']:,} B max, {src['bytes_median']:,.0f} B median "
                      f"({'delta' if src['deltas'] else 'full bundle'}"
                      f"{', gzip' if src['gzip'] else ''}"
                      f"{'' if src is f else '; one workload alone'})")
            verdicts.append(Verdict("fleet: at most 2 KB per workload on the wire for one "
                                    "membership change", figure,
                                    src["bytes_max"] <= WIRE_BUDGET and src is f))
    verdicts.append(Verdict(f"fleet: server memory per held long-poll (bound {POLL_BUDGET // 1024} "
                            "KiB)", f"{per / 1024:.1f} KiB", 0 < per <= POLL_BUDGET))
    verdicts.append(Verdict(f"fleet: long-polls held by one replica process (target {n:,}, "
                            "bounded memory)", f"{mem['most_held']:,.0f} held at once, RSS "
                            f"+{(mem['held_rss'] - mem['idle_rss']) / 2**20:.0f} MiB",
                            mem["most_held"] >= n and per <= POLL_BUDGET))
    return Part(f"Fleet: {n:,} long-polling workloads, two replicas, {sz.users:,} users",
                "\n".join(md), tuple(verdicts), r)


def scale_part(tiny: bool, workdir: Path) -> Part:
    sz = TINY if tiny else FULL
    return report(sz, run(sz), tiny)
