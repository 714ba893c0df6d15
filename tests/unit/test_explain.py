"""aus.core.explain: the deciding rule and the group it came through, for
directory groups, policy-server memberships and SIDs; the kernel's
reference lookup (compiler.lookup) agrees on every verdict; unmanaged
login UIDs, unknown users and visibility mode are said as the kernel
treats them."""

from __future__ import annotations

import ipaddress

import pytest

from aus.agent import subjects
from aus.core import compiler
from aus.core import contract as C
from aus.core.errors import AusError
from aus.core.explain import Subject, describe, explain
from aus.core.policy import policy_from_data

POLICY = policy_from_data({
    "user_groups": [{"name": "DEV"}, {"name": "ops", "sid": "S-1-5-21-1-2-3-1104"},
                    {"name": "cloud"}],
    "ip_lists": {"lab": ["198.18.0.0/15", "2001:db8::/32"]},
    "rules": [
        {"name": "dev-web", "sources": ["DEV"], "destinations": ["lab"],
         "services": ["80/tcp", "8000-8100/tcp"]},
        {"name": "ops-all", "sources": ["ops", "cloud"], "destinations": ["198.18.1.0/24"],
         "services": ["tcp", "icmp"]},
    ],
})
BASELINE = [ipaddress.ip_network("127.0.0.0/8")]


@pytest.fixture
def compiled():
    # ids as a long-running ausd may have them: not in policy order
    return compiler.compile_policy(POLICY, BASELINE, rule_ids={"ops-all": 2, "dev-web": 7})


def user(groups=(), bundle=(), sids=(), uid=1000, known=True) -> Subject:
    return Subject("alice" if known else None, uid, tuple(groups), tuple(sids), tuple(bundle),
                   known=known)


def test_the_rule_its_position_its_id_and_the_group_it_came_through(compiled):
    r = explain(compiled, user(["staff", "dev@corp.example"]), "198.18.7.7", "tcp", 8050)
    assert (r["allowed"], r["verdict"], r["reason"]) == (True, "allow", "rule")
    assert (r["rule"], r["rule_index"], r["rule_id"]) == ("dev-web", 0, 7)
    assert r["via"] == [{"policy_group": "DEV", "group": "dev@corp.example", "from": "directory"}]
    assert r["subject"]["rules"] == ["dev-web"]
    assert r["subject"]["standing"] == "managed, rules dev-web"
    assert describe(r).splitlines()[1] == \
        "  by rule dev-web (rules[0], id 7), from group DEV (via directory group dev@corp.example)"


def test_policy_server_memberships_and_sids(compiled):
    r = explain(compiled, user(["staff"], bundle=["cloud"]), "198.18.1.9", "tcp", 22)
    assert (r["rule"], r["rule_index"], r["rule_id"]) == ("ops-all", 1, 2)
    assert r["via"] == [{"policy_group": "cloud", "group": "cloud", "from": "policy server"}]
    r = explain(compiled, user(["Domain Users"], sids=["s-1-5-21-1-2-3-1104"]),
                "198.18.1.9", "icmp", 0)
    assert r["rule"] == "ops-all"
    assert r["via"] == [{"policy_group": "ops", "group": "S-1-5-21-1-2-3-1104", "from": "SID"}]
    # icmp towards IPv6 is ICMPv6: ops-all has no IPv6 destination, dev-web no icmp
    assert not explain(compiled, user(["ops", "dev"]), "2001:db8::1", "icmp", 0)["allowed"]


def test_denied_baseline_unmanaged_unknown_and_visibility(compiled):
    no = explain(compiled, user(["dev"]), "198.18.7.7", "tcp", 443)
    assert (no["allowed"], no["verdict"], no["reason"], no["rule"]) == \
        (False, "deny", "no_rule", None)
    base = explain(compiled, user([]), "127.0.0.1", "udp", 53)
    assert (base["rule"], base["rule_id"], base["rule_index"]) == \
        ("baseline", C.RULE_BASELINE, None)
    assert base["subject"]["standing"] == "managed, baseline only"
    root = explain(compiled, user([], uid=0), "198.18.7.7", "tcp", 443, unmanaged=[0])
    assert (root["allowed"], root["reason"], root["subject"]["managed"]) == \
        (True, "unmanaged", False)
    unknown = explain(compiled, user([], known=False, uid=4242), "198.18.7.7", "tcp", 80)
    assert not unknown["allowed"]
    assert unknown["subject"]["standing"] == "unknown to NSS: managed, baseline only"
    seen = explain(compiled, user(["dev"]), "198.18.7.7", "tcp", 443, mode="visibility")
    assert (seen["allowed"], seen["verdict"]) == (False, "audit")
    assert describe(seen).startswith("DENIED (visibility mode: reported, not blocked)")


@pytest.mark.parametrize("groups", [[], ["dev"], ["ops"], ["dev", "cloud"]])
def test_every_verdict_agrees_with_the_kernel_model(compiled, groups):
    ids = compiled.matching_rules(tuple(groups), ())
    ruleset = compiled.ruleset(ids)
    for to in ("198.18.0.1", "198.18.1.1", "198.19.255.255", "127.0.0.1", "10.0.0.1",
               "2001:db8::5", "::1"):
        for proto, port in (("tcp", 80), ("tcp", 8100), ("tcp", 8101), ("udp", 80),
                            ("icmp", 0)):
            ip = ipaddress.ip_address(to)
            number = {"tcp": C.PROTO_TCP, "udp": C.PROTO_UDP}.get(
                proto, C.PROTO_ICMP if ip.version == 4 else C.PROTO_ICMPV6)
            want = compiler.lookup(ruleset, ip, number, port)
            got = explain(compiled, user(groups), to, proto, port)
            assert got["rule_id"] == want, (groups, to, proto, port)


def test_groups_given_and_users_looked_up():
    s = subjects.of_groups(" DEV, ops,,DEV ")
    assert s.groups == ("DEV", "ops") and s.given
    root = subjects.of_user("root", lookup=lambda uid: ("root", ("root", "wheel")))
    assert (root.user, root.login_uid, root.groups, root.logged_in) == \
        ("root", 0, ("root", "wheel"), False)
    with pytest.raises(AusError, match="no such user"):
        subjects.of_user("no-such-user-anywhere")
    ghost = subjects.of_user("4242000", lookup=lambda uid: (None,))
    assert (ghost.login_uid, ghost.known) == (4242000, False)


# ---------------------------------------------------------------------------
# DNS names

DNS_POLICY = policy_from_data({
    "user_groups": [{"name": "DEV"}, {"name": "ops"}],
    "ip_lists": {"github": ["dns:github.com", "dns:*.githubusercontent.com",
                            "140.82.112.0/20"]},
    "rules": [
        {"name": "dev-github", "sources": ["DEV"], "destinations": ["github"],
         "services": ["443/tcp", "8000-8003/tcp", "8004/tcp", "icmp"]},
        {"name": "ops-ssh", "sources": ["ops"], "destinations": ["dns:*.github.com",
                                                                 "dns:github.com"],
         "services": ["22/tcp", "443/tcp"]},
    ],
})


@pytest.fixture
def dns_compiled():
    return compiler.compile_policy(DNS_POLICY, BASELINE, rule_ids={"ops-ssh": 2, "dev-github": 5})


def test_a_name_is_explained_by_the_rules_that_name_it(dns_compiled):
    r = explain(dns_compiled, user(["dev", "ops"]), "GitHub.com.", "tcp", 443)
    assert (r["allowed"], r["verdict"], r["reason"]) == (True, "allow", "dns")
    # both rules allow 443 for it: the kernel's entry credits the lowest id
    assert (r["to"], r["rule"], r["rule_id"], r["rule_index"]) == ("github.com", "ops-ssh", 2, 1)
    assert r["via"] == [{"policy_group": "ops", "group": "ops", "from": "directory"}]
    assert [(g["rule"], g["pattern"], g["services"]) for g in r["dns"]["grants"]] == [
        ("dev-github", "dns:github.com", ["icmp", "443/tcp", "8000-8004/tcp"]),
        ("ops-ssh", "dns:github.com", ["22/tcp", "443/tcp"])]
    text = describe(r)
    assert text.splitlines()[0] == "ALLOWED: user alice (login UID 1000) -> github.com tcp/443 " \
                                   "(a DNS name)"
    assert "rule dev-github (rules[0], id 5) names it as dns:github.com: icmp, 443/tcp, " \
           "8000-8004/tcp" in text
    assert "the addresses come from DNS answers" in text


def test_a_name_under_a_wildcard_and_the_services_that_decide(dns_compiled):
    ok = explain(dns_compiled, user(["dev"]), "objects.githubusercontent.com", "tcp", 8002)
    assert (ok["allowed"], ok["rule"], ok["dns"]["grants"][0]["pattern"]) == \
        (True, "dev-github", "dns:*.githubusercontent.com")
    assert explain(dns_compiled, user(["dev"]), "x.githubusercontent.com", "icmp", 0)["allowed"]
    # the suffix itself is not under its wildcard
    bare = explain(dns_compiled, user(["dev"]), "githubusercontent.com", "tcp", 443)
    assert (bare["allowed"], bare["reason"], bare["dns"]["grants"]) == (False, "no_rule", [])
    assert "no rule of the user's names githubusercontent.com" in describe(bare)
    # named, but not on this service
    no = explain(dns_compiled, user(["ops"]), "api.github.com", "udp", 53)
    assert (no["allowed"], no["verdict"], no["rule"]) == (False, "deny", None)
    assert [g["pattern"] for g in no["dns"]["grants"]] == ["dns:*.github.com"]
    assert "no rule of the user's allows this name on udp/53" in describe(no)
    # a user outside the rule's groups: denied, whatever others may
    assert not explain(dns_compiled, user(["staff"]), "github.com", "tcp", 443)["allowed"]
    # visibility mode and unmanaged login UIDs as for addresses
    assert explain(dns_compiled, user(["staff"]), "github.com", "tcp", 443,
                   mode="visibility")["verdict"] == "audit"
    root = explain(dns_compiled, user([], uid=0), "github.com", "tcp", 443, unmanaged=[0])
    assert (root["allowed"], root["reason"]) == (True, "unmanaged")


@pytest.mark.parametrize("groups", [[], ["dev"], ["ops"], ["dev", "ops"]])
def test_a_names_verdict_is_the_kernels_lookup_in_the_union_of_its_grants(dns_compiled, groups):
    ids = dns_compiled.matching_rules(tuple(groups), ())
    for name in ("github.com", "api.github.com", "a.githubusercontent.com", "example.org"):
        grants = dns_compiled.dns_grants(ids).lookup(name)
        union = compiler.union_portset(g.services for g in grants)
        # the forwarder's entry: the union portset in a ruleset of its own
        ruleset = compiler.flatten([(ipaddress.ip_network("192.0.2.1/32"), union)]) \
            if union else frozenset()
        for proto, number, port in (("tcp", C.PROTO_TCP, 443), ("tcp", C.PROTO_TCP, 22),
                                    ("tcp", C.PROTO_TCP, 8004), ("udp", C.PROTO_UDP, 443),
                                    ("icmp", C.PROTO_ICMP, 0)):
            want = compiler.lookup(ruleset, ipaddress.ip_address("192.0.2.1"), number, port)
            got = explain(dns_compiled, user(groups), name, proto, port)
            assert got["rule_id"] == want, (groups, name, proto, port)


def test_what_is_taken_as_a_name():
    from aus.core.dnsname import DnsPattern
    from aus.core.explain import parse_target

    assert parse_target(" 10.0.0.1 ") == ipaddress.ip_address("10.0.0.1")
    assert parse_target("2001:db8::1") == ipaddress.ip_address("2001:db8::1")
    assert parse_target("GitHub.com") == DnsPattern("github.com", False)
    assert parse_target("dns:bücher.example.") == DnsPattern("xn--bcher-kva.example", False)
    for bad, fragment in (("*.github.com", "is a pattern; give a name"),
                          ("dns:*.github.com", "is a pattern"),
                          ("a..b", "empty label"), ("10.0.0.0/8", "neither an address"),
                          ("", "neither an address nor a DNS name")):
        with pytest.raises(ValueError, match=fragment):
            parse_target(bad)


def test_address_answers_carry_no_dns_part(compiled):
    assert explain(compiled, user(["dev"]), "198.18.7.7", "tcp", 80)["dns"] is None
