"""aus.core.compiler: port blocks, service entries, flattening, lookups, group
matching, stable rule ids, and a randomized differential check of whole
compiled policies against a naive reference."""

from __future__ import annotations

import ipaddress
import random

import pytest

from aus.core import compiler
from aus.core import contract as C
from aus.core.compiler import SvcEntry, flatten, lookup, port_blocks, service_entries
from aus.core.policy import (
    Policy,
    ServiceSpec,
    parse_network,
    parse_service,
    policy_from_text,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

TCP, UDP, ICMP, ICMP6, ANY = C.PROTO_TCP, C.PROTO_UDP, C.PROTO_ICMP, C.PROTO_ICMPV6, C.PROTO_ANY


def entries(rule: int, *services: str) -> list[SvcEntry]:
    return [e for s in services for e in service_entries(parse_service(s), rule)]


def grant(cidr: str, rule: int, *services: str):
    return (net(cidr), entries(rule, *services))


# ---------------------------------------------------------------------------
# port_blocks


def _port_pairs() -> list[tuple[int, int]]:
    pairs = [(1, 1), (0, 0), (0, 65535), (1, 65535), (0, 65534), (8000, 8100),
             (65535, 65535), (65534, 65535), (1, 1024), (1024, 1024), (1023, 1025),
             (32767, 32768), (0, 1), (2, 65533), (4096, 8191), (4095, 8192)]
    rnd = random.Random(20261128)
    for _ in range(300):
        kind = rnd.random()
        if kind < 0.4:
            lo = rnd.randint(0, 65535)
            hi = rnd.randint(lo, 65535)
        elif kind < 0.7:  # short ranges
            lo = rnd.randint(0, 65535)
            hi = min(65535, lo + rnd.randint(0, 300))
        else:  # ranges with power-of-two-ish edges
            b = rnd.randint(0, 15)
            lo = max(0, (rnd.randint(0, 65535) >> b << b) + rnd.choice((-1, 0, 1)))
            hi = min(65535, lo + (1 << rnd.randint(0, 16)) + rnd.choice((-2, -1, 0)))
            hi = max(lo, hi)
        pairs.append((lo, hi))
    return pairs


PORT_PAIRS = _port_pairs()


def test_port_blocks_properties():
    assert len(PORT_PAIRS) > 300
    for lo, hi in PORT_PAIRS:
        blocks = port_blocks(lo, hi)
        assert 1 <= len(blocks) <= 32, (lo, hi, blocks)
        expect_start = lo
        sizes = []
        for start, bits in blocks:
            assert 0 <= bits <= 16, (lo, hi, blocks)
            size = 1 << (16 - bits)
            assert start % size == 0, f"block {start}/{bits} not aligned for {lo}-{hi}"
            # contiguous, so disjoint and without gaps
            assert start == expect_start, (lo, hi, blocks)
            expect_start = start + size
            sizes.append((start, size))
        # union is exactly [lo, hi]
        assert blocks[0][0] == lo
        assert expect_start - 1 == hi, (lo, hi, blocks)
        # minimal: no two neighbouring equal blocks could be merged into one
        for (s1, z1), (s2, z2) in zip(sizes, sizes[1:]):
            assert not (z1 == z2 and s1 % (2 * z1) == 0), (lo, hi, blocks)


def test_port_blocks_edges():
    assert port_blocks(1, 1) == [(1, 16)]
    assert port_blocks(65535, 65535) == [(65535, 16)]
    assert port_blocks(0, 65535) == [(0, 0)]
    assert len(port_blocks(1, 65535)) == 16
    # 8000-8063 (64 ports), 8064-8095 (32), 8096-8099 (4), 8100
    assert port_blocks(8000, 8100) == [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]
    assert port_blocks(5, 4) == []


# ---------------------------------------------------------------------------
# service_entries


def _covered_ports(es, proto):
    return {p for p in range(65536) if any(e.covers(proto, p) for e in es)}


def test_service_tcp_single_port():
    assert service_entries(parse_service("443/tcp"), 7) == [SvcEntry(TCP, 443, 64, 7)]
    es = service_entries(parse_service("443/tcp"), 7)
    assert es[0].covers(TCP, 443)
    assert not es[0].covers(TCP, 442) and not es[0].covers(TCP, 444)
    assert not es[0].covers(UDP, 443)


def test_service_tcp_range():
    es = service_entries(parse_service("8000-8100/tcp"), 3)
    assert {e.proto for e in es} == {TCP}
    assert {e.rule for e in es} == {3}
    assert all(C.SVC_PROTO_PREFIX < e.plen <= C.SVC_FULL_PREFIX for e in es)
    assert _covered_ports(es, TCP) == set(range(8000, 8101))
    assert _covered_ports(es, UDP) == set()


def test_service_tcp_all_ports():
    want = [SvcEntry(TCP, 0, C.SVC_PROTO_PREFIX, 4)]
    assert service_entries(ServiceSpec("tcp", 0, 65535), 4) == want
    assert service_entries(parse_service("tcp"), 4) == want
    assert service_entries(parse_service("TCP"), 4) == want
    # 1-65535 is not "all ports": port 0 stays out
    es = service_entries(parse_service("1-65535/tcp"), 4)
    assert _covered_ports(es, TCP) == set(range(1, 65536))


def test_service_udp():
    assert service_entries(parse_service("53/udp"), 2) == [SvcEntry(UDP, 53, 64, 2)]
    assert service_entries(parse_service("udp"), 2) == [SvcEntry(UDP, 0, 48, 2)]
    es = service_entries(parse_service("5000-5003/udp"), 2)
    assert _covered_ports(es, UDP) == {5000, 5001, 5002, 5003}
    assert _covered_ports(es, TCP) == set()


def test_service_icmp():
    es = service_entries(parse_service("icmp"), 9)
    assert sorted(es) == [SvcEntry(ICMP, 0, 48, 9), SvcEntry(ICMP6, 0, 48, 9)]
    assert es[0].covers(ICMP, 0) and not es[0].covers(TCP, 0)


def test_service_any():
    es = service_entries(parse_service("any"), 5)
    assert es == [SvcEntry(ANY, 0, C.SVC_ANY_PREFIX, 5)]
    assert all(es[0].covers(p, port) for p in (TCP, UDP, ICMP, ICMP6, 47, 132)
               for port in (0, 1, 65535))


# ---------------------------------------------------------------------------
# flatten + lookup


def test_more_specific_prefix_inherits_services():
    rs = flatten([grant("10.0.0.0/8", 2, "80/tcp"), grant("10.1.0.0/16", 3, "22/tcp")])
    assert lookup(rs, ip("10.1.2.3"), TCP, 80) == 2
    assert lookup(rs, ip("10.1.2.3"), TCP, 22) == 3
    assert lookup(rs, ip("10.2.0.1"), TCP, 22) is None
    assert lookup(rs, ip("10.2.0.1"), TCP, 80) == 2
    assert lookup(rs, ip("10.1.2.3"), TCP, 443) is None
    assert lookup(rs, ip("10.1.2.3"), UDP, 80) is None
    assert lookup(rs, ip("11.0.0.1"), TCP, 80) is None
    # the /16 entry itself carries both services (the kernel sees only it)
    by_key = {(e.addr, e.plen): e.portset for e in rs}
    inner = by_key[(C.addr16(ip("10.1.0.0")), 96 + 16)]
    assert inner == {SvcEntry(TCP, 80, 64, 2), SvcEntry(TCP, 22, 64, 3)}
    outer = by_key[(C.addr16(ip("10.0.0.0")), 96 + 8)]
    assert outer == {SvcEntry(TCP, 80, 64, 2)}


def test_ruleset_entries_name_the_kernel_key_and_portset():
    # An IPv4 prefix is stored v4-mapped, its length counted in 128 bits,
    # as the aus_dst key takes it; an IPv6 prefix as written.
    rs = flatten([grant("10.0.0.0/8", 2, "80/tcp"), grant("2001:db8::/32", 3, "22/tcp")])
    assert all(isinstance(d, compiler.DstEntry) for d in rs)
    by_plen = {d.plen: d for d in rs}
    assert sorted(by_plen) == [32, 96 + 8]
    v4, v6 = by_plen[96 + 8], by_plen[32]
    assert v4.addr == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 0])
    assert v4.portset == {SvcEntry(TCP, 80, 64, 2)}
    assert v6.addr == ip("2001:db8::").packed and v6.portset == {SvcEntry(TCP, 22, 64, 3)}


def test_inheritance_through_several_levels():
    rs = flatten([grant("10.1.2.0/24", 4, "443/tcp"), grant("10.0.0.0/8", 2, "80/tcp"),
                  grant("10.1.0.0/16", 3, "22/tcp"), grant("0.0.0.0/0", 5, "53/udp")])
    a = ip("10.1.2.200")
    assert [lookup(rs, a, TCP, 80), lookup(rs, a, TCP, 22), lookup(rs, a, TCP, 443),
            lookup(rs, a, UDP, 53)] == [2, 3, 4, 5]
    b = ip("10.1.3.1")
    assert [lookup(rs, b, TCP, 80), lookup(rs, b, TCP, 22), lookup(rs, b, TCP, 443),
            lookup(rs, b, UDP, 53)] == [2, 3, None, 5]
    assert lookup(rs, ip("192.0.2.1"), UDP, 53) == 5
    assert lookup(rs, ip("192.0.2.1"), TCP, 80) is None


def test_siblings_and_cousins_inherit_only_from_containing_prefixes():
    rs = flatten([grant("10.0.0.0/8", 2, "80/tcp"), grant("10.1.0.0/16", 3, "22/tcp"),
                  grant("10.1.128.0/17", 4, "25/tcp"), grant("10.2.0.0/16", 5, "53/udp"),
                  grant("11.0.0.0/8", 6, "443/tcp"), grant("10.1.2.0/24", 7, "123/udp")])
    by_key = {(ipaddress.IPv6Address(d.addr).ipv4_mapped, d.plen - 96): {e.rule for e in d.portset}
              for d in rs}
    assert by_key == {
        (ip("10.0.0.0"), 8): {2},
        (ip("10.1.0.0"), 16): {2, 3},
        (ip("10.1.2.0"), 24): {2, 3, 7},
        (ip("10.1.128.0"), 17): {2, 3, 4},
        (ip("10.2.0.0"), 16): {2, 5},
        (ip("11.0.0.0"), 8): {6},
    }
    assert lookup(rs, ip("10.1.200.1"), UDP, 123) is None
    assert lookup(rs, ip("10.1.2.1"), TCP, 25) is None
    assert lookup(rs, ip("10.2.0.1"), TCP, 22) is None
    assert lookup(rs, ip("11.1.1.1"), TCP, 80) is None


def test_v4_and_v6_kept_apart():
    v4_all = flatten([grant("0.0.0.0/0", 2, "any")])
    assert lookup(v4_all, ip("192.0.2.1"), TCP, 80) == 2
    assert lookup(v4_all, ip("::1"), TCP, 80) is None
    assert lookup(v4_all, ip("2001:db8::1"), UDP, 53) is None

    v6_all = flatten([grant("::/0", 3, "any")])
    assert lookup(v6_all, ip("2001:db8::1"), TCP, 443) == 3
    assert lookup(v6_all, ip("::1"), UDP, 53) == 3
    # Observed (and documented in bpf/aus.h): the family is part of the dst
    # key, so an IPv6 ::/0 does NOT cover IPv4 destinations, neither plain
    # ones nor v4-mapped IPv6 ones (::ffff:a.b.c.d is judged as IPv4).
    assert lookup(v6_all, ip("192.0.2.1"), TCP, 443) is None
    assert lookup(v6_all, ip("::ffff:192.0.2.1"), TCP, 443) is None
    # ... and an IPv4 rule covers the v4-mapped form of its addresses.
    assert lookup(v4_all, ip("::ffff:192.0.2.1"), TCP, 443) == 2
    # Observed: an IPv6-written v4-mapped prefix (/96 or longer under
    # ::ffff:0:0/96) is stored as IPv4, so it covers the IPv4 addresses.
    mapped = flatten([grant("::ffff:10.0.0.0/104", 4, "22/tcp")])
    assert lookup(mapped, ip("10.1.2.3"), TCP, 22) == 4
    assert lookup(mapped, ip("11.1.2.3"), TCP, 22) is None

    # Flattening does not leak services across families either.
    both = flatten([grant("0.0.0.0/0", 2, "80/tcp"), grant("::/0", 3, "53/udp"),
                    grant("10.0.0.0/8", 4, "22/tcp"), grant("2001:db8::/32", 5, "443/tcp")])
    assert lookup(both, ip("10.0.0.1"), UDP, 53) is None
    assert lookup(both, ip("10.0.0.1"), TCP, 80) == 2
    assert lookup(both, ip("10.0.0.1"), TCP, 22) == 4
    assert lookup(both, ip("2001:db8::5"), TCP, 80) is None
    assert lookup(both, ip("2001:db8::5"), UDP, 53) == 3
    assert lookup(both, ip("2001:db8::5"), TCP, 443) == 5
    assert lookup(both, ip("2001:db9::5"), TCP, 443) is None


def test_short_ipv6_prefix_does_not_cover_ipv4_entries():
    # ::/8 contains ::ffff:0:0/96 as bits, but in the kernel the family
    # differs, so the IPv4 entry must not inherit its services.
    rs = flatten([grant("::/8", 2, "22/tcp"), grant("10.0.0.0/8", 3, "80/tcp")])
    assert lookup(rs, ip("10.0.0.1"), TCP, 22) is None
    assert lookup(rs, ip("10.0.0.1"), TCP, 80) == 3
    assert lookup(rs, ip("::1"), TCP, 22) == 2


def test_overlapping_rules_same_key_keep_lowest_id():
    rs = flatten([grant("10.0.0.0/8", 5, "80/tcp"), grant("10.0.0.0/8", 3, "80/tcp"),
                  grant("10.0.0.0/8", 4, "80/tcp", "443/tcp")])
    assert lookup(rs, ip("10.9.9.9"), TCP, 80) == 3
    assert lookup(rs, ip("10.9.9.9"), TCP, 443) == 4
    # one entry per key: no duplicate (proto, port, plen) in a portset
    ((_, _, ps),) = rs
    keys = [(e.proto, e.port, e.plen) for e in ps]
    assert len(keys) == len(set(keys))
    # also when the lower id comes from an inherited (shorter) prefix
    rs = flatten([grant("10.0.0.0/8", 4, "80/tcp"), grant("10.1.0.0/16", 7, "80/tcp")])
    assert lookup(rs, ip("10.1.0.1"), TCP, 80) == 4
    rs = flatten([grant("10.0.0.0/8", 7, "80/tcp"), grant("10.1.0.0/16", 4, "80/tcp")])
    assert lookup(rs, ip("10.1.0.1"), TCP, 80) == 4
    assert lookup(rs, ip("10.2.0.1"), TCP, 80) == 7


def test_most_specific_service_entry_decides_the_rule():
    rs = flatten([grant("10.0.0.0/8", 2, "8000-8100/tcp"), grant("10.0.0.0/8", 3, "8080/tcp"),
                  grant("10.0.0.0/8", 4, "tcp"), grant("10.0.0.0/8", 5, "any")])
    a = ip("10.0.0.1")
    assert lookup(rs, a, TCP, 8080) == 3
    assert lookup(rs, a, TCP, 8000) == 2
    assert lookup(rs, a, TCP, 8100) == 2
    assert lookup(rs, a, TCP, 8101) == 4
    assert lookup(rs, a, TCP, 7999) == 4
    assert lookup(rs, a, UDP, 53) == 5
    assert lookup(rs, a, ICMP, 0) == 5
    # the more specific entry wins even when it is inherited
    rs = flatten([grant("10.0.0.0/8", 6, "8080/tcp"), grant("10.1.0.0/16", 2, "8000-8100/tcp")])
    assert lookup(rs, ip("10.1.0.1"), TCP, 8080) == 6
    assert lookup(rs, ip("10.1.0.1"), TCP, 8081) == 2


def test_lookup_empty_and_icmp():
    assert lookup(frozenset(), ip("10.0.0.1"), TCP, 80) is None
    rs = flatten([grant("192.0.2.0/24", 2, "icmp"), grant("2001:db8::/32", 2, "icmp")])
    assert lookup(rs, ip("192.0.2.9"), ICMP, 0) == 2
    assert lookup(rs, ip("2001:db8::9"), ICMP6, 0) == 2
    assert lookup(rs, ip("192.0.2.9"), TCP, 0) is None


def test_icmp_is_per_family():
    """icmp is ICMP towards IPv4 and ICMPv6 towards IPv6, never crossed."""
    policy = policy_from_text(
        "user_groups: [{name: G}]\n"
        "rules:\n"
        "  - {name: p, sources: [G], destinations: ['192.0.2.0/24', '2001:db8::/32'],"
        " services: [icmp]}\n")
    cp = compiler.compile_policy(policy, [])
    rs = cp.ruleset(cp.matching_rules(["G"]))
    assert lookup(rs, ip("192.0.2.9"), ICMP, 0) == 2
    assert lookup(rs, ip("2001:db8::9"), ICMP6, 0) == 2
    assert lookup(rs, ip("192.0.2.9"), ICMP6, 0) is None
    assert lookup(rs, ip("2001:db8::9"), ICMP, 0) is None


# ---------------------------------------------------------------------------
# group matching


def test_group_matches():
    gm = compiler.group_matches
    assert gm("DEV", "dev")
    assert gm("DEV", "Dev")
    assert gm("DEV", "DEV")
    assert gm("DEV", "dev@corp.example")
    assert gm("dev", "DEV@CORP.EXAMPLE")
    assert gm("dev@corp.example", "dev@corp.example")
    assert gm("dev@corp.example", "DEV@Corp.Example")
    assert not gm("dev@corp.example", "dev")
    assert not gm("dev@corp.example", "dev@other.example")
    assert not gm("DEVOPS", "dev")
    assert not gm("DEV", "devops")
    assert not gm("DEV", "devops@corp.example")
    assert not gm("DEV", "corp.example@dev")
    assert not gm("dev", "")


def test_matching_rules_uses_group_matches():
    pol = Policy.model_validate({
        "user_groups": [{"name": "DEV"}, {"name": "ops@corp.example"}],
        "rules": [
            {"name": "r-dev", "sources": ["DEV"], "destinations": ["10.0.0.0/8"],
             "services": ["22/tcp"]},
            {"name": "r-ops", "sources": ["ops@corp.example"],
             "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]},
        ]})
    cp = compiler.compile_policy(pol, [])
    ids = {r.name: r.id for r in cp.rules}
    assert cp.matching_rules(["dev@corp.example"]) == {ids["r-dev"]}
    assert cp.matching_rules(["OPS@CORP.EXAMPLE", "x"]) == {ids["r-ops"]}
    assert cp.matching_rules(["ops"]) == frozenset()
    assert cp.matching_rules([]) == frozenset()
    assert cp.matching_rules(["Dev", "ops@corp.example"]) == {ids["r-dev"], ids["r-ops"]}


# ---------------------------------------------------------------------------
# assign_rule_ids


def test_rule_ids_fresh_and_stable():
    ids = compiler.assign_rule_ids(["a", "b", "c"], {}, 4096)
    assert ids == {"a": 2, "b": 3, "c": 4}
    # reload, same names in another order: same ids
    assert compiler.assign_rule_ids(["c", "a", "b"], ids, 4096) == ids
    # a new rule gets the next free id, the others keep theirs
    ids2 = compiler.assign_rule_ids(["new", "a", "b", "c"], ids, 4096)
    assert ids2 == {"a": 2, "b": 3, "c": 4, "new": 5}


def test_rule_ids_rename_and_reuse():
    existing = {"a": 2, "b": 3, "c": 4, "d": 5}
    # "a" removed (frees 2), "c" renamed to "c2": the renamed rule is a new
    # name, so it does not keep 4; it takes the lowest free id (2).
    ids = compiler.assign_rule_ids(["b", "c2", "d"], existing, 4096)
    assert ids["b"] == 3 and ids["d"] == 5
    assert ids["c2"] == 2
    assert ids["c2"] != existing["c"]
    # freed ids (4 now) are reused by new names, lowest first
    ids3 = compiler.assign_rule_ids(["b", "c2", "d", "x", "y"], ids, 4096)
    assert ids3 == {"b": 3, "c2": 2, "d": 5, "x": 4, "y": 6}
    # ids never collide
    assert len(set(ids3.values())) == len(ids3)
    # unknown names in existing (rules gone) do not matter
    assert compiler.assign_rule_ids(["q"], {"gone": 2}, 4096) == {"q": 2}


def test_rule_ids_max_rules():
    # ids 2 .. max_rules-1 are usable: max_rules - 2 rules
    assert compiler.assign_rule_ids(["a", "b", "c"], {}, 5) == {"a": 2, "b": 3, "c": 4}
    with pytest.raises(ValueError, match=r"max_rules \(3\)"):
        compiler.assign_rule_ids(["a", "b", "c", "d"], {}, 5)
    # kept ids take room too
    assert compiler.assign_rule_ids(["x", "a", "b"], {"x": 3}, 5) == {"x": 3, "a": 2, "b": 4}
    with pytest.raises(ValueError):
        compiler.assign_rule_ids(["x", "a", "b", "c"], {"x": 3}, 5)


def test_compile_policy_keeps_ids_and_flattens():
    pol = Policy.model_validate({
        "user_groups": [{"name": "G"}],
        "ip_lists": {"lan": ["10.0.0.0/8", "2001:db8::/32"]},
        "services": {"web": ["80/tcp", "443/tcp"]},
        "rules": [
            {"name": "one", "sources": ["G"], "destinations": ["lan"], "services": ["web"]},
            {"name": "two", "sources": ["G"], "destinations": ["10.1.0.0/16"],
             "services": ["22/tcp", "icmp"]},
        ]})
    cp = compiler.compile_policy(pol, [net("127.0.0.0/8"), net("::1/128")],
                                 rule_ids={"two": 7}, version=3)
    assert {r.name: r.id for r in cp.rules} == {"one": 2, "two": 7}
    assert cp.rule_names == {1: "baseline", 2: "one", 7: "two"}
    assert cp.version == 3
    rs = cp.ruleset(cp.matching_rules(["g"]))
    assert lookup(rs, ip("10.1.2.3"), TCP, 443) == 2
    assert lookup(rs, ip("10.1.2.3"), TCP, 22) == 7
    assert lookup(rs, ip("10.1.2.3"), ICMP, 0) == 7
    assert lookup(rs, ip("2001:db8::1"), TCP, 80) == 2
    assert lookup(rs, ip("2001:db8::1"), TCP, 22) is None
    assert lookup(rs, ip("127.0.0.1"), UDP, 9) == C.RULE_BASELINE
    assert lookup(rs, ip("::1"), 132, 0) == C.RULE_BASELINE
    base = cp.baseline_ruleset()
    assert lookup(base, ip("127.0.0.1"), TCP, 1) == C.RULE_BASELINE
    assert lookup(base, ip("10.1.2.3"), TCP, 443) is None
    # memoized: same object for the same rule set
    assert cp.ruleset(cp.matching_rules(["G"])) is rs


def test_compiled_grants_use_the_policys_parsed_networks():
    pol = Policy.model_validate({
        "user_groups": [{"name": "G"}],
        "ip_lists": {"lan": ["10.0.0.0/8", "2001:db8::/32"]},
        "rules": [{"name": "one", "sources": ["G"], "destinations": ["lan", "192.0.2.0/24"],
                   "services": ["22/tcp"]}]})
    (rule,) = compiler.compile_policy(pol, []).rules
    held = pol.destinations_of(pol.rules[0])
    assert [g.destination for g in rule.grants] == held
    # the very objects the policy parsed at validation: no parsing of text here
    assert all(g.destination is n for g, n in zip(rule.grants, held, strict=True))
    assert all(g.services == (SvcEntry(TCP, 22, 64, rule.id),) for g in rule.grants)


# ---------------------------------------------------------------------------
# Randomized differential test against a naive reference


GROUPS = ["g0", "g1", "g2", "g3", "g4", "g5"]
BASELINE = [net("127.0.0.0/8"), net("::1/128")]
V4_BASES = [ip("10.0.0.0"), ip("10.1.2.3"), ip("192.168.1.77"), ip("172.16.5.4")]
V6_BASES = [ip("2001:db8::"), ip("2001:db8:1:2::99"), ip("fd00::1"), ip("2a00:1450::200e")]
PORT_POOL = [1, 22, 53, 80, 443, 1024, 8080, 65535]


def _rand_net(rnd: random.Random):
    if rnd.random() < 0.55:
        base = rnd.choice(V4_BASES) if rnd.random() < 0.7 else ipaddress.IPv4Address(rnd.getrandbits(32))
        plen = rnd.choice([0, 8, 16, 24, 32, rnd.randint(0, 32), rnd.randint(20, 32)])
        return ipaddress.IPv4Network((base, plen), strict=False)
    if rnd.random() < 0.7:
        base = rnd.choice(V6_BASES)
    else:
        # random global-ish address, never inside ::ffff:0:0/96
        base = ipaddress.IPv6Address((0x2 << 124) | rnd.getrandbits(124))
    plen = rnd.choice([0, 16, 32, 48, 64, 128, rnd.randint(0, 128), rnd.randint(100, 128)])
    return ipaddress.IPv6Network((base, plen), strict=False)


def _rand_service(rnd: random.Random) -> str:
    k = rnd.random()
    proto = rnd.choice(["tcp", "udp"])
    if k < 0.35:
        port = rnd.choice(PORT_POOL) if rnd.random() < 0.6 else rnd.randint(1, 65535)
        return f"{port}/{proto}"
    if k < 0.65:
        lo = rnd.choice(PORT_POOL) if rnd.random() < 0.4 else rnd.randint(1, 65535)
        hi = min(65535, lo + rnd.choice([0, 1, 7, 100, 1000, rnd.randint(0, 65535)]))
        return f"{lo}-{hi}/{proto}"
    if k < 0.78:
        return proto
    if k < 0.9:
        return "icmp"
    return "any"


def _rand_policy(rnd: random.Random) -> Policy:
    rules = []
    for i in range(rnd.randint(1, 20)):
        rules.append({
            "name": f"r{i}",
            "sources": rnd.sample(GROUPS, rnd.randint(1, 2)),
            "destinations": [str(_rand_net(rnd)) for _ in range(rnd.randint(1, 3))],
            "services": [_rand_service(rnd) for _ in range(rnd.randint(1, 3))],
        })
    return Policy.model_validate({"user_groups": [{"name": g} for g in GROUPS],
                                  "rules": rules})


def _covers(spec: ServiceSpec, family: int, proto: int, port: int) -> bool:
    if spec.proto == "any":
        return True
    if spec.proto == "icmp":
        return proto == (ICMP if family == 4 else ICMP6)
    want = TCP if spec.proto == "tcp" else UDP
    return proto == want and spec.lo <= port <= spec.hi


def _specificity(spec: ServiceSpec, port: int) -> int:
    """The prefix length of the aus_svc entry that would match."""
    if spec.proto == "any":
        return C.SVC_ANY_PREFIX
    if spec.proto == "icmp" or (spec.lo, spec.hi) == (0, 65535):
        return C.SVC_PROTO_PREFIX
    for start, bits in port_blocks(spec.lo, spec.hi):
        if start <= port < start + (1 << (16 - bits)):
            return C.SVC_PROTO_PREFIX + bits
    raise AssertionError("port not covered")


def _reference(rules, addr, proto, port):
    """rules: [(id, [networks], [specs])]. Returns (allowing ids, expected id)."""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped            # judged as IPv4 (docs/policy-format.md)
    allowing = {}
    for rid, nets, specs in rules:
        if not any(n.version == addr.version and addr in n for n in nets):
            continue
        for s in specs:
            if _covers(s, addr.version, proto, port):
                spec_len = _specificity(s, port)
                allowing[rid] = max(allowing.get(rid, 0), spec_len)
    if not allowing:
        return set(), None
    best = max(allowing.values())
    return set(allowing), min(r for r, sl in allowing.items() if sl == best)


def _probe_addrs(rnd: random.Random, nets):
    out = []
    for n in nets:
        first, last = int(n.network_address), int(n.broadcast_address)
        top = (1 << n.max_prefixlen) - 1
        for v in (first, last, first - 1, last + 1, rnd.randint(first, last)):
            if 0 <= v <= top:
                out.append(ipaddress.IPv6Address(v) if n.version == 6
                           else ipaddress.IPv4Address(v))
    out += [ipaddress.IPv4Address(rnd.getrandbits(32)) for _ in range(5)]
    out += [ipaddress.IPv6Address(rnd.getrandbits(128)) for _ in range(3)]
    out += [ip("127.0.0.1"), ip("::1"), ip("::2"), ip("128.0.0.0")]
    # v4-mapped forms of some IPv4 probes
    out += [ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)
            for a in out[:] if a.version == 4 and rnd.random() < 0.3]
    return out


def _probe_services(rnd: random.Random, specs, family):
    out = [(ICMP if family == 4 else ICMP6, 0), (47, 0), (ANY, 0)]
    for s in specs:
        if s.proto in ("tcp", "udp"):
            p = TCP if s.proto == "tcp" else UDP
            q = UDP if p == TCP else TCP
            for port in (s.lo, s.hi, s.lo - 1, s.hi + 1, rnd.randint(s.lo, s.hi)):
                if 0 <= port <= 65535:
                    out.append((p, port))
                    if rnd.random() < 0.2:
                        out.append((q, port))
    for _ in range(4):
        out.append((rnd.choice([TCP, UDP]), rnd.choice(PORT_POOL + [0, rnd.randint(0, 65535)])))
    return out


def _resolve(entries, named, parse):
    """Reference: names expanded, each text parsed, first-seen order kept."""
    out = []
    for entry in entries:
        for text in named.get(entry, [entry]):
            value = parse(text)
            if value not in out:
                out.append(value)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_differential_random_policies(seed):
    rnd = random.Random(1000 + seed)
    pol = _rand_policy(rnd)
    cp = compiler.compile_policy(pol, BASELINE)
    ids = {r.name: r.id for r in cp.rules}
    ref_rules = [(ids[r.name], _resolve(r.destinations, pol.ip_lists, parse_network),
                  _resolve(r.services, pol.services, parse_service)) for r in pol.rules]
    all_nets = [n for _, nets, _ in ref_rules for n in nets]
    all_specs = [s for _, _, specs in ref_rules for s in specs]
    checked = allowed_seen = 0
    for _ in range(5):
        dir_groups = [rnd.choice([g, g.upper(), f"{g}@corp.example"])
                      for g in rnd.sample(GROUPS, rnd.randint(0, 3))]
        dir_groups += ["unrelated"]
        user_ids = cp.matching_rules(dir_groups)
        keys = {g.split("@")[0].lower() for g in dir_groups}
        expect_ids = {rid for rid, r in zip((ids[r.name] for r in pol.rules), pol.rules)
                      if any(s.lower() in keys for s in r.sources)}
        assert user_ids == expect_ids
        mine = [(C.RULE_BASELINE, BASELINE, [ServiceSpec("any", 0, 0)])] + \
            [r for r in ref_rules if r[0] in user_ids]
        rs = cp.ruleset(user_ids)
        addrs = _probe_addrs(rnd, rnd.sample(all_nets, min(len(all_nets), 12)))
        for addr in addrs:
            fam = 4 if addr.version == 4 or addr.ipv4_mapped is not None else 6
            for proto, port in _probe_services(rnd, rnd.sample(all_specs, min(4, len(all_specs))),
                                               fam):
                got = lookup(rs, addr, proto, port)
                allowing, want = _reference(mine, addr, proto, port)
                ctx = (seed, str(addr), proto, port, sorted(user_ids))
                assert (got is not None) == bool(allowing), ctx
                if got is not None:
                    assert got in allowing, ctx
                    assert got == want, ctx
                    allowed_seen += 1
                checked += 1
    assert checked > 500
    assert allowed_seen > 0


def test_policy_group_matches_by_sid():
    """A policy group given with an AD SID matches a directory group with
    that SID whatever its name (SSSD may name it dev@corp.example or by a
    renamed group); the name still matches too."""
    policy = policy_from_text(
        "user_groups:\n"
        "  - {name: DEV, sid: S-1-5-21-1-2-3-1104}\n"
        "  - {name: OPS}\n"
        "rules:\n"
        "  - {name: dev-web, sources: [DEV], destinations: ['192.0.2.0/24'], services: ['80/tcp']}\n"
        "  - {name: ops-ssh, sources: [OPS], destinations: ['192.0.2.0/24'], services: ['22/tcp']}\n")
    cp = compiler.compile_policy(policy, [])
    by_sid = cp.matching_rules(["developers-renamed"], ["s-1-5-21-1-2-3-1104"])
    assert [cp.rule_names[r] for r in by_sid] == ["dev-web"]
    assert cp.matching_rules(["developers-renamed"], ["S-1-5-21-1-2-3-9999"]) == frozenset()
    assert [cp.rule_names[r] for r in cp.matching_rules(["dev@corp.example"])] == ["dev-web"]
    both = cp.matching_rules(["ops"], ["S-1-5-21-1-2-3-1104"])
    assert sorted(cp.rule_names[r] for r in both) == ["dev-web", "ops-ssh"]


# ---------------------------------------------------------------------------
# DNS-name destinations

DNS_POLICY = """\
user_groups: [{name: DEV}, {name: OPS}]
ip_lists:
  github: [dns:github.com, "dns:*.githubusercontent.com", 140.82.112.0/20]
rules:
  - name: dev-github
    sources: [DEV]
    destinations: [github]
    services: ["443/tcp", "8000-8003/tcp", icmp]
  - name: ops-ssh
    sources: [OPS]
    destinations: [dns:*.github.com, dns:GITHUB.com]
    services: ["22/tcp"]
  - name: cidr-only
    sources: [DEV, OPS]
    destinations: [10.0.0.0/8]
    services: ["53/udp"]
"""


def _dns_compiled():
    return compiler.compile_policy(policy_from_text(DNS_POLICY), [net("127.0.0.0/8")])


def test_dns_grants_carry_the_rules_services_as_they_compile_for_a_cidr():
    c = _dns_compiled()
    dev, ops = (c.matching_rules([g]) for g in ("DEV", "OPS"))
    grants = c.dns_grants(dev)
    rid = c.rules[0].id
    (hit,) = grants.lookup("GitHub.com.")
    assert (str(hit.pattern), hit.rule) == ("dns:github.com", rid)
    # the rule's own portset, rule id stamped; ICMP and ICMPv6 both (family unknown)
    assert hit.services == frozenset(entries(rid, "443/tcp", "8000-8003/tcp", "icmp"))
    assert {e.proto for e in hit.services} == {TCP, ICMP, ICMP6}
    # the same services a CIDR destination of that rule compiles to, for IPv4
    v4 = lookup(c.ruleset(dev), ip("140.82.112.1"), TCP, 8002)
    assert v4 == rid and any(e.covers(TCP, 8002) for e in hit.services)
    # the CIDR part of the list still compiles to the ruleset, the names do not
    assert {(d.addr, d.plen) for d in c.ruleset(dev)} == {
        (C.addr16(ip("127.0.0.0")), 104), (C.addr16(ip("140.82.112.0")), 116),
        (C.addr16(ip("10.0.0.0")), 104)}
    assert [str(p) for p in grants.patterns()] == ["dns:*.githubusercontent.com",
                                                  "dns:github.com"]
    assert not c.dns_grants(ops).lookup("raw.githubusercontent.com")


def test_dns_grants_lookup_exact_wildcards_at_any_depth_and_several_rules():
    c = _dns_compiled()
    both = c.matching_rules(["DEV", "OPS"])
    grants = c.dns_grants(both)
    dev_id, ops_id = c.rules[0].id, c.rules[1].id

    def hits(q):
        return [(str(g.pattern), g.rule) for g in grants.lookup(q)]

    assert hits("github.com") == [("dns:github.com", dev_id), ("dns:github.com", ops_id)]
    assert hits("api.github.com") == [("dns:*.github.com", ops_id)]
    assert hits("a.b.c.githubusercontent.com.") == [("dns:*.githubusercontent.com", dev_id)]
    assert hits("githubusercontent.com") == []           # the suffix itself is not matched
    assert hits("notgithub.com") == []
    assert hits("") == [] and hits(".") == []
    ssh = next(g for g in grants.lookup("github.com") if g.rule == ops_id).services
    assert ssh == frozenset(entries(ops_id, "22/tcp"))


def test_dns_grants_are_cached_per_rule_set_and_compare_by_content():
    c = _dns_compiled()
    dev = c.matching_rules(["DEV"])
    assert c.dns_grants(dev) is c.dns_grants(frozenset(dev))
    again = _dns_compiled().dns_grants(dev)
    assert again == c.dns_grants(dev) and hash(again) == hash(c.dns_grants(dev))
    none = c.dns_grants(frozenset({c.rules[2].id}))      # a rule of CIDRs only
    assert not none and len(none) == 0 and none.lookup("github.com") == ()
    assert not c.dns_grants(frozenset())
    assert bool(c.dns_grants(dev)) and len(c.dns_grants(dev)) == 2


def test_dns_portsets_are_every_grants_portset():
    c = _dns_compiled()
    dev_id, ops_id = c.rules[0].id, c.rules[1].id
    assert c.dns_portsets() == {
        frozenset(entries(dev_id, "443/tcp", "8000-8003/tcp", "icmp")),
        frozenset(entries(ops_id, "22/tcp"))}
    plain = compiler.compile_policy(policy_from_text(
        "user_groups: [{name: X}]\nrules:\n  - {name: r, sources: [X], destinations: "
        "[10.0.0.0/8], services: [tcp]}\n"), [])
    assert plain.dns_portsets() == frozenset()
    assert not plain.dns_grants(plain.matching_rules(["X"]))


def test_dns_lookup_walks_only_the_names_suffixes():
    """Many wildcard patterns: a lookup finds exactly the ones that are
    suffixes of the name (checked against matching every pattern)."""
    rnd = random.Random(15)
    words = ["a", "b", "cdn", "x1", "example", "org", "com", "net"]
    patterns = set()
    for _ in range(300):
        labels = [rnd.choice(words) for _ in range(rnd.randint(2, 4))]
        patterns.add(("dns:*." if rnd.random() < 0.5 else "dns:") + ".".join(labels))
    from aus.core.dnsname import parse_dns_destination
    grants = compiler.DnsGrants(
        compiler.DnsGrant(parse_dns_destination(p), 2 + i % 7, frozenset())
        for i, p in enumerate(sorted(patterns)))
    for _ in range(500):
        q = ".".join(rnd.choice(words) for _ in range(rnd.randint(1, 6)))
        want = {g for g in grants if g.pattern.matches(q)}
        got = grants.lookup(q.upper() + rnd.choice(["", "."]))
        assert set(got) == want and len(got) == len(want)
