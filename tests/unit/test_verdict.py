"""aus.core.verdict: hand-computed decisions (groups, LPM, port ranges,
IPv6, ICMP, baseline) and a randomized check against the compiler's own
rulesets through ``compiler.lookup``, the model of the kernel's lookups."""

from __future__ import annotations

import ipaddress
import random

import pytest

from aus.core import compiler
from aus.core.policy import policy_from_data
from aus.core.verdict import PROTO_NUMBERS, Evaluator, Verdict

POLICY = policy_from_data({
    "user_groups": [{"name": "DEV"}, {"name": "OPS"}, {"name": "ADMINS", "sid": "S-1-5-21-1-2-3-500"}],
    "ip_lists": {"db": ["10.1.0.0/16", "2001:db8:1::/48"]},
    "rules": [
        {"name": "dev-web", "sources": ["DEV"], "destinations": ["10.0.0.0/8"],
         "services": ["443/tcp"]},
        {"name": "dev-db", "sources": ["DEV"], "destinations": ["db"],
         "services": ["5432/tcp", "8000-8099/tcp"]},
        {"name": "ops-any", "sources": ["OPS"], "destinations": ["10.1.2.0/24", "::/0"],
         "services": ["any"]},
        {"name": "admins-ssh", "sources": ["ADMINS"], "destinations": ["0.0.0.0/0"],
         "services": ["22/tcp", "icmp"]},
    ],
}, "test policy")


@pytest.mark.parametrize("groups,dst,proto,port,want", [
    (["DEV"], "10.9.9.9", "tcp", 443, Verdict(True, "dev-web")),
    (["DEV"], "10.9.9.9", "tcp", 80, Verdict(False, "")),
    (["DEV"], "10.9.9.9", "udp", 443, Verdict(False, "")),
    # the longer prefix (the list's 10.1/16) inherits the /8's services
    (["DEV"], "10.1.5.5", "tcp", 443, Verdict(True, "dev-web")),
    (["DEV"], "10.1.5.5", "tcp", 5432, Verdict(True, "dev-db")),
    (["DEV"], "10.9.9.9", "tcp", 5432, Verdict(False, "")),
    # port range 8000-8099, edges and just outside
    (["DEV"], "10.1.0.1", "tcp", 8000, Verdict(True, "dev-db")),
    (["DEV"], "10.1.0.1", "tcp", 8099, Verdict(True, "dev-db")),
    (["DEV"], "10.1.0.1", "tcp", 8100, Verdict(False, "")),
    (["DEV"], "10.1.0.1", "tcp", 7999, Verdict(False, "")),
    # IPv6
    (["DEV"], "2001:db8:1::7", "tcp", 5432, Verdict(True, "dev-db")),
    (["DEV"], "2001:db8:2::7", "tcp", 5432, Verdict(False, "")),
    (["OPS"], "2001:db8:2::7", "udp", 53, Verdict(True, "ops-any")),
    # ::/0 does not cover IPv4 (the family is part of the kernel's key)
    (["OPS"], "192.0.2.1", "udp", 53, Verdict(False, "")),
    (["OPS"], "10.1.2.3", "other", 0, Verdict(True, "ops-any")),
    # group names: case-insensitive, a domain suffix matches the short name
    (["dev@corp.example"], "10.9.9.9", "tcp", 443, Verdict(True, "dev-web")),
    (["Dev"], "10.9.9.9", "tcp", 443, Verdict(True, "dev-web")),
    ([], "10.9.9.9", "tcp", 443, Verdict(False, "")),
    (["nobody"], "10.9.9.9", "tcp", 443, Verdict(False, "")),
    # icmp means ICMP towards IPv4
    (["ADMINS"], "192.0.2.1", "icmp", 0, Verdict(True, "admins-ssh")),
    (["ADMINS"], "192.0.2.1", "icmpv6", 0, Verdict(False, "")),
    (["ADMINS"], "192.0.2.1", "tcp", 22, Verdict(True, "admins-ssh")),
])
def test_hand_computed(groups, dst, proto, port, want):
    assert Evaluator(POLICY).decide(groups, dst, proto, port) == want


def test_sid_matches_without_the_name():
    ev = Evaluator(POLICY)
    assert ev.decide(["renamed"], "192.0.2.1", "tcp", 22) == Verdict(False, "")
    assert ev.decide(["renamed"], "192.0.2.1", "tcp", 22, sids=["S-1-5-21-1-2-3-500"]) == \
        Verdict(True, "admins-ssh")


def test_baseline_allows_every_service_and_keeps_its_name():
    ev = Evaluator(POLICY, [ipaddress.ip_network("10.9.0.0/16")])
    assert ev.decide([], "10.9.1.1", "udp", 9, ) == Verdict(True, "baseline")
    # a rule's more specific service entry decides under the baseline prefix
    assert ev.decide(["DEV"], "10.9.1.1", "tcp", 443) == Verdict(True, "dev-web")
    assert ev.decide(["DEV"], "10.9.1.1", "tcp", 444) == Verdict(True, "baseline")
    assert ev.decide([], "10.8.1.1", "udp", 9) == Verdict(False, "")


def _random_policy(rng: random.Random):
    groups = [f"g{i}" for i in range(4)]
    nets4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24",
             "0.0.0.0/0"]
    nets6 = ["2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8:1::5/128"]
    svcs = ["443/tcp", "1000-2000/tcp", "53/udp", "1-65535/udp", "icmp", "any", "22/tcp",
            "8080-8081/tcp"]
    rules = []
    for i in range(rng.randint(1, 7)):
        rules.append({"name": f"r{i}", "sources": rng.sample(groups, rng.randint(1, 2)),
                      "destinations": rng.sample(nets4 + nets6, rng.randint(1, 3)),
                      "services": rng.sample(svcs, rng.randint(1, 3))})
    return policy_from_data({"user_groups": [{"name": g} for g in groups], "rules": rules},
                            "random policy"), groups


def test_agrees_with_the_compiler_lookup_on_random_policies():
    rng = random.Random(12)
    addrs = ["10.1.2.3", "10.1.2.4", "10.1.9.9", "10.200.0.1", "192.0.2.9", "198.51.100.1",
             "2001:db8:1::5", "2001:db8:1::6", "2001:db8:2::1", "2001:dead::1"]
    checked = allowed = 0
    for _ in range(60):
        policy, groups = _random_policy(rng)
        baseline = [ipaddress.ip_network("192.0.2.0/25")] if rng.random() < 0.5 else []
        ev = Evaluator(policy, baseline)
        compiled = compiler.compile_policy(policy, baseline)
        for _ in range(80):
            user_groups = rng.sample(groups, rng.randint(0, 2))
            dst = rng.choice(addrs)
            proto = rng.choice(list(PROTO_NUMBERS))
            port = rng.choice([0, 22, 53, 443, 999, 1000, 1500, 2000, 2001, 8080, 8082, 65535])
            ruleset = compiled.ruleset(compiled.matching_rules(user_groups))
            want = compiler.lookup(ruleset, ipaddress.ip_address(dst), PROTO_NUMBERS[proto], port)
            assert ev.rule_id(user_groups, dst, proto, port) == want, (user_groups, dst, proto, port)
            checked += 1
            allowed += want is not None
    # the sample exercises both outcomes
    assert checked == 4800 and 0.1 * checked < allowed < 0.9 * checked


def test_equal_grants_mean_equal_verdicts_and_a_change_shows():
    same = policy_from_data({**POLICY.model_dump(mode="json", exclude_none=True),
                             "rules": list(reversed(POLICY.model_dump(mode="json")["rules"]))}, "reordered")
    a, b = Evaluator(POLICY), Evaluator(same)
    for groups in (["DEV"], ["OPS"], ["DEV", "OPS"], [], ["ADMINS"]):
        assert a.grants(groups) == b.grants(groups)   # rule ids differ, grants do not
    data = POLICY.model_dump(mode="json", exclude_none=True)
    data["rules"][1]["services"] = ["5432/tcp"]      # dev-db loses 8000-8099
    narrowed = Evaluator(policy_from_data(data, "narrowed"))
    assert narrowed.grants(["DEV"]) != a.grants(["DEV"])
    assert narrowed.grants(["OPS"]) == a.grants(["OPS"])
    assert narrowed.decide(["DEV"], "10.1.0.1", "tcp", 8000) == Verdict(False, "")
