"""The impact preview's cost, on SQLite.

    python -m bench.preview                 100,000 flow rows
    python -m bench.preview --flows 5000    a seconds-long run

1. The verdict evaluator (aus.core.verdict: hash probes per prefix
   length) against compiler.lookup (a scan of the ruleset, the reference
   it is tested against), deciding the same flows in the same run: the
   ratio is the speed-up.
2. POST draft/preview's work (aus.server.preview.preview) over a flows
   table of N rows with about N/5 distinct (groups, destination, protocol,
   port) keys, 200 rules, 20 groups, for a draft that removes or narrows
   10% and 50% of the rules: wall time, and flow rows per second.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import random
import statistics
import tempfile
import time
import uuid

from sqlalchemy import insert

from aus.core import compiler
from aus.core.policy import policy_from_data
from aus.core.verdict import PROTO_NUMBERS, Evaluator

GROUPS = [f"G{i}" for i in range(20)]
SERVICES = ["443/tcp", "22/tcp", "8000-8099/tcp", "53/udp", "icmp", "any", "5432/tcp"]


def make_rules(rng: random.Random, n: int) -> list[dict]:
    rules = []
    for i in range(n):
        dests = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/{rng.choice([16, 24])}"
                 if rng.random() < 0.8 else f"2001:db8:{rng.randrange(65536):x}::/48"
                 for _ in range(rng.randint(1, 3))]
        rules.append({"name": f"r{i}", "sources": rng.sample(GROUPS, rng.randint(1, 2)),
                      "destinations": sorted({str(ipaddress.ip_network(d, strict=False)) for d in dests}),
                      "services": rng.sample(SERVICES, rng.randint(1, 2))})
    return rules


def flows(rng: random.Random, rules: list[dict], n: int) -> list[tuple]:
    """(groups, dst, proto, port): mostly towards some rule's destination."""
    out = []
    for _ in range(n):
        net = ipaddress.ip_network(rng.choice(rng.choice(rules)["destinations"]))
        host = net.network_address + rng.randrange(min(net.num_addresses, 1 << 16))
        proto = rng.choice(["tcp", "tcp", "udp", "icmp" if net.version == 4 else "icmpv6"])
        port = 0 if proto.startswith("icmp") else rng.choice([22, 53, 443, 5432, 8050, 9000])
        out.append((tuple(rng.sample(GROUPS, rng.randint(0, 3))), str(host), proto, port))
    return out


def bench_evaluator(rng: random.Random, rules: list[dict], n: int) -> dict:
    policy = policy_from_data({"user_groups": [{"name": g} for g in GROUPS], "rules": rules}, "bench")
    sample = flows(rng, rules, n)
    ev = Evaluator(policy)
    compiled = compiler.compile_policy(policy, [])
    for groups, *_ in sample:   # compile every ruleset once for both sides
        ev.rule_id(groups, "10.0.0.1", "tcp", 1)
        compiled.ruleset(compiled.matching_rules(groups))

    def run_ev():
        return [ev.rule_id(g, d, p, port) for g, d, p, port in sample]

    def run_ref():
        return [compiler.lookup(compiled.ruleset(compiled.matching_rules(g)), ipaddress.ip_address(d),
                                PROTO_NUMBERS[p], port) for g, d, p, port in sample]

    t_ev, t_ref = [], []
    for _ in range(3):
        t = time.perf_counter()
        a = run_ev()
        t_ev.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = run_ref()
        t_ref.append(time.perf_counter() - t)
        assert a == b, "the evaluator and compiler.lookup disagree"
    ev_s, ref_s = statistics.median(t_ev), statistics.median(t_ref)
    return {"flows": n, "evaluator_per_s": n / ev_s, "lookup_per_s": n / ref_s,
            "speedup": ref_s / ev_s, "allowed": sum(x is not None for x in a)}


def bench_preview(rng: random.Random, rules: list[dict], n: int, changed: float) -> dict:
    from aus.server.db import Flow, Group, Org, Rule, RuleSource, open_database, utcnow
    from aus.server.policyversions import provision
    from aus.server.preview import preview

    tmp = tempfile.mkdtemp(prefix="aus-bench-preview-")
    engine, sessions = open_database(f"sqlite:///{tmp}/bench.db")
    now = utcnow()
    with sessions.begin() as s:
        s.add(Org(id="1", generation=0))
        s.flush()
        gid = {}
        for g in GROUPS:
            gid[g] = str(uuid.uuid4())
            s.add(Group(id=gid[g], org_id="1", display_name=g, display_name_key=g.casefold(),
                        source="manual", doc={}))
        s.flush()
        for pos, r in enumerate(rules):
            rid = str(uuid.uuid4())
            s.add(Rule(id=rid, org_id="1", name=r["name"], destinations=r["destinations"],
                       services=r["services"], position=pos))
            s.flush()
            for i, g in enumerate(r["sources"]):
                s.add(RuleSource(rule_id=rid, group_id=gid[g], position=i))
    with sessions.begin() as s:
        provision(s, "1", None, "bench")
    # The draft: ``changed`` of the rules gone or narrowed to one service.
    step = max(1, round(1 / changed))
    with sessions.begin() as s:
        for i, r in enumerate(s.query(Rule).order_by(Rule.position).all()):
            if i % step == 0:
                s.delete(r)
            elif i % step == 1:
                r.services = r.services[:1] if len(r.services) > 1 else ["1/tcp"]
    keys = flows(rng, rules, max(1, n // 5))
    rows = []
    for i in range(n):
        groups, dst, proto, port = keys[i % len(keys)]
        rows.append({"org_id": "1", "hour": now.replace(minute=0, second=0, microsecond=0),
                     "workload": f"w{i % 7}", "login_uid": 1000 + i, "user_name": f"u{i % 997}",
                     "groups": list(groups), "process": "p", "dst": dst, "proto": proto, "port": port,
                     "verdict": "allowed", "rule": "", "first_seen": now, "last_seen": now,
                     "count": 1 + i % 5})
    with sessions.begin() as s:
        for i in range(0, len(rows), 5000):
            s.execute(insert(Flow), rows[i:i + 5000])
    times, out = [], None
    for _ in range(3):
        with sessions() as s:
            t = time.perf_counter()
            out = preview(s, "1", 7, now=now + dt.timedelta(seconds=1))
            times.append(time.perf_counter() - t)
    engine.dispose()
    wall = statistics.median(times)
    return {"rows": n, "keys": out["keys_decided"], "wall_s": wall, "rows_per_s": n / wall,
            "changed": changed,
            "newly_blocked": out["newly_blocked"]["flows"], "truncated": out["truncated"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=100_000)
    ap.add_argument("--rules", type=int, default=200)
    args = ap.parse_args(argv)
    rng = random.Random(7)
    rules = make_rules(rng, args.rules)
    e = bench_evaluator(rng, rules, min(args.flows, 20_000))
    print(f"## Verdict evaluator ({args.rules} rules, {len(GROUPS)} groups, {e['flows']} flows, "
          f"{e['allowed']} allowed)")
    print(f"evaluator {e['evaluator_per_s']:,.0f} decisions/s, compiler.lookup "
          f"{e['lookup_per_s']:,.0f}/s: {e['speedup']:.1f}x")
    print(f"## Impact preview (SQLite, {args.flows:,} flow rows, {args.rules} rules)")
    for changed in (0.1, 0.5):
        p = bench_preview(random.Random(11), rules, args.flows, changed)
        print(f"draft changing {changed:.0%} of the rules: {p['wall_s']:.2f} s "
              f"({p['rows_per_s']:,.0f} rows/s, {p['keys']:,} distinct keys), "
              f"{p['newly_blocked']:,} flows newly blocked, truncated: {p['truncated']}")


if __name__ == "__main__":
    main()
