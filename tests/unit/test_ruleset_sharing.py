"""The compiler's fast paths give the rulesets its plain sweep gives: the
sweep over prepared, shared grants equals the sweep over grants as it was
written first, and a user's ruleset grown from their largest group's
equals the whole sweep, on random policies with nested, equal and
disjoint destinations."""

from __future__ import annotations

import ipaddress
import random

import pytest

from aus.core import compiler
from aus.core import contract as C
from aus.core.policy import policy_from_data

NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24",
        "2001:db8::/32", "2001:db8:1::/48", "127.0.0.1/32", "0.0.0.0/0", "::/0",
        "10.2.0.0/16", "198.51.100.7/32", "::ffff:10.9.0.0/112"]
SERVICES = ["80/tcp", "443/tcp", "22/tcp", "tcp", "udp", "icmp", "any", "8000-8100/tcp",
            "53/udp"]
BASELINE = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def reference_flatten(grants):
    """The sweep as it was before grants were prepared and shared."""
    by_prefix = {}
    for net, entries in grants:
        addr, plen = C.addr16(net.network_address), C.addr_prefixlen(net)
        a = int.from_bytes(addr, "big")
        fam = C.family_of16(addr, plen)
        by_prefix.setdefault((fam, a, plen), set()).update(entries)
    out, stack = [], []
    for fam, a, plen in sorted(by_prefix):
        last = a | ((1 << (128 - plen)) - 1)
        while stack and (stack[-1][0] != fam or stack[-1][2] < a):
            stack.pop()
        merged = set(by_prefix[(fam, a, plen)])
        if stack:
            merged |= stack[-1][3]
        stack.append((fam, a, last, merged))
        best = {}
        for e in merged:
            k = (e.proto, e.port, e.plen)
            if k not in best or e.rule < best[k]:
                best[k] = e.rule
        portset = frozenset(compiler.SvcEntry(p, port, pl, r) for (p, port, pl), r in best.items())
        out.append(compiler.DstEntry(a.to_bytes(16, "big"), plen, portset))
    return frozenset(out)


def reference_ruleset(c: compiler.CompiledPolicy, rule_ids) -> compiler.Ruleset:
    grants = [(net, compiler.service_entries(compiler.ServiceSpec("any", 0, 0), C.RULE_BASELINE))
              for net in c.baseline]
    by_id = {r.id: r for r in c.rules}
    for rid in sorted(rule_ids):
        grants.extend(by_id[rid].grants)
    return reference_flatten(grants)


def random_policy(rng: random.Random, groups: str = "ABCD") -> compiler.CompiledPolicy:
    rules = [{"name": f"r{i}", "sources": rng.sample(groups, rng.randint(1, 2)),
              "destinations": rng.sample(NETS, rng.randint(1, 3)),
              "services": rng.sample(SERVICES, rng.randint(1, 3))}
             for i in range(rng.randint(1, 14))]
    policy = policy_from_data({"user_groups": [{"name": g} for g in groups], "rules": rules})
    return compiler.compile_policy(policy, BASELINE)


@pytest.mark.parametrize("seed", range(40))
def test_rulesets_equal_the_plain_sweep(seed):
    rng = random.Random(seed)
    c = random_policy(rng)
    if seed % 2:
        c.warm(min_rules=1)      # every group's ruleset known first: the growing path
    for _ in range(8):
        groups = tuple(rng.sample("ABCD", rng.randint(1, 4)))
        ids = c.matching_rules(groups)
        assert c.ruleset(ids) == reference_ruleset(c, ids), (groups, sorted(ids))
    grants = [(g.destination, g.services) for r in c.rules for g in r.grants]
    assert compiler.flatten(grants) == reference_flatten(grants)


def test_a_users_own_rules_grow_the_groups_shared_ruleset():
    rules = [{"name": f"big-{i}", "sources": ["BIG"],
              "destinations": [f"10.{i >> 8}.{i & 255}.0/24"], "services": ["443/tcp"]}
             for i in range(2000)]
    rules += [{"name": f"own-{u}", "sources": [f"U{u}"], "destinations": [f"192.0.2.{u}/32"],
               "services": ["22/tcp"]} for u in range(3)]
    # U2's rule lies under one of BIG's prefixes: its services merge, the
    # whole ruleset is swept.
    rules.append({"name": "nested", "sources": ["U2"], "destinations": ["10.0.5.7/32"],
                  "services": ["80/tcp"]})
    groups = [{"name": "BIG"}] + [{"name": f"U{u}"} for u in range(3)]
    c = compiler.compile_policy(policy_from_data({"user_groups": groups, "rules": rules}),
                                BASELINE, max_rules=4096)
    assert c.warm() == 1
    big = c.matching_rules(("big",))
    shared = c.ruleset(big)
    for u in range(3):
        ids = c.matching_rules(("big", f"u{u}"))
        assert len(ids) == 2000 + (2 if u == 2 else 1)
        rs = c.ruleset(ids)
        assert rs == reference_ruleset(c, ids)
        if u < 2:
            # the group's own entries are the very objects of its ruleset
            assert len(rs - shared) == 1
            assert all(any(e is s for s in shared) for e in list(rs & shared)[:50])
    nested = [e for e in c.ruleset(c.matching_rules(("big", "u2")))
              if e.addr == C.addr16(ipaddress.ip_address("10.0.5.7"))]
    assert {s.port for s in nested[0].portset} == {80, 443}


def test_the_ruleset_cache_is_bounded_and_stays_correct(monkeypatch):
    monkeypatch.setattr(compiler, "RULESET_CACHE_ENTRIES", 40)
    rng = random.Random(7)
    c = random_policy(rng)
    for _ in range(60):
        groups = tuple(rng.sample("ABCD", rng.randint(1, 4)))
        ids = c.matching_rules(groups)
        assert c.ruleset(ids) == reference_ruleset(c, ids)
        assert c._cached_entries == sum(len(rs) for rs in c._cache.values())
        assert c._cached_entries <= 40 or len(c._cache) == 1
