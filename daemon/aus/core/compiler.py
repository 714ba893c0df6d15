"""Compile a policy into the immutable rulesets the kernel looks up. Pure.

A user's ruleset is the set of rules whose sources contain one of the
user's groups, plus the baseline. Its compiled form is what goes into the
two LPM tries (see bpf/aus.h):

* ``aus_dst``: for each destination prefix, the portset that holds every
  service allowed to addresses under that prefix. Rules are *flattened*:
  a prefix inherits the services of every shorter prefix containing it, so
  the longest match alone decides, with no loop over rules in the kernel.
* ``aus_svc``: a portset's (protocol, port block) entries, each naming the
  rule that allows it (the lowest rule id when several do). A port
  range becomes a few aligned power-of-two blocks.

Users with the same matching rules share one ruleset, so the kernel holds
one copy per distinct group combination, not per user.

DNS-name destinations (``dns:NAME``) compile to DnsGrant tuples
instead: no prefix is known until a DNS answer names one. ausd's DNS
forwarder asks :meth:`CompiledPolicy.dns_grants` which of a user's rules
match an answer's name and writes the answer's addresses, with those
rules' portsets, into the kernel (see docs/dns.md).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, NamedTuple, TypeAlias

from . import contract as C
from .dnsname import DnsPattern, normalize_qname
from .policy import Policy, ServiceSpec

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_PROTOS = {"tcp": (C.PROTO_TCP,), "udp": (C.PROTO_UDP,),
           "icmp": (C.PROTO_ICMP, C.PROTO_ICMPV6), "any": (C.PROTO_ANY,)}


class SvcEntry(NamedTuple):
    """One aus_svc entry of a portset: ``port`` is the block start (host
    order) and ``plen`` the key prefix length (32, 48, or 48 + k). A
    tuple: hashed and compared in C, which a 10,000-rule ruleset's
    portsets do hundreds of thousands of times."""
    proto: int
    port: int
    plen: int
    rule: int

    def covers(self, proto: int, port: int) -> bool:
        if self.plen == C.SVC_ANY_PREFIX:
            return True
        if proto != self.proto:
            return False
        bits = self.plen - C.SVC_PROTO_PREFIX
        return bits == 0 or (port >> (16 - bits)) == (self.port >> (16 - bits))


# A portset: the aus_svc entries sharing one portset id.
Portset: TypeAlias = frozenset[SvcEntry]


class DstEntry(NamedTuple):
    """One aus_dst entry of a ruleset: a destination prefix (the 16-byte
    address of bpf/aus.h, v4 mapped; its length counted in those 128 bits)
    and the services allowed under it."""
    addr: bytes
    plen: int
    portset: Portset


# A ruleset: its aus_dst entries. Content, not ids: equal rulesets are one.
Ruleset: TypeAlias = frozenset[DstEntry]


class Grant(NamedTuple):
    """What one rule allows towards one destination."""
    destination: Network
    services: tuple[SvcEntry, ...]


class DnsGrant(NamedTuple):
    """What one rule allows towards the addresses DNS gives for a name:
    ``services`` is that rule's portset (its services as they compile
    for a CIDR, rule id stamped; ICMP and ICMPv6 both, as the address
    family is only known from the answer)."""
    pattern: DnsPattern
    rule: int
    services: Portset


class DnsGrants:
    """The DNS grants of one set of rules, looked up by queried name.
    Immutable; equal (and hashing equal) when the grants are."""

    __slots__ = ("_grants", "_exact", "_wild", "_hash")

    def __init__(self, grants: Iterable[DnsGrant] = ()):
        self._grants = tuple(sorted(set(grants), key=lambda g: (g.rule, str(g.pattern))))
        exact: dict[str, list[DnsGrant]] = {}
        wild: dict[str, list[DnsGrant]] = {}
        for g in self._grants:
            (wild if g.pattern.wildcard else exact).setdefault(g.pattern.name, []).append(g)
        self._exact = {k: tuple(v) for k, v in exact.items()}
        self._wild = {k: tuple(v) for k, v in wild.items()}
        self._hash = hash(self._grants)

    def lookup(self, qname: str) -> tuple[DnsGrant, ...]:
        """Every grant whose pattern matches ``qname`` (any case, trailing
        dot or not): the exact name's, then the wildcards' from the
        longest suffix. O(labels)."""
        name = normalize_qname(qname)
        out = self._exact.get(name, ())
        if self._wild:
            dot = name.find(".")
            while dot >= 0:
                hit = self._wild.get(name[dot + 1:])
                if hit:
                    out += hit
                dot = name.find(".", dot + 1)
        return out

    def patterns(self) -> tuple[DnsPattern, ...]:
        """The distinct patterns, in their text's order."""
        return tuple(sorted({g.pattern for g in self._grants}, key=str))

    def __iter__(self):
        return iter(self._grants)

    def __len__(self) -> int:
        return len(self._grants)

    def __bool__(self) -> bool:
        return bool(self._grants)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DnsGrants) and self._grants == other._grants

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"DnsGrants({list(self._grants)!r})"


NO_DNS_GRANTS = DnsGrants()


def port_blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """Split [lo, hi] into aligned blocks: [(start, prefix bits of 16)]."""
    blocks = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size //= 2
        bits = 16 - (size.bit_length() - 1)
        blocks.append((lo, bits))
        lo += size
    return blocks


@lru_cache(maxsize=4096)
def _service_keys(spec: ServiceSpec) -> tuple[tuple[int, int, int], ...]:
    """A service's aus_svc keys (proto, block start, prefix length): the
    same for every rule that names it, so computed once."""
    out = []
    for proto in _PROTOS[spec.proto]:
        if proto == C.PROTO_ANY:
            out.append((proto, 0, C.SVC_ANY_PREFIX))
        elif spec.proto == "icmp" or (spec.lo, spec.hi) == (0, 65535):
            out.append((proto, 0, C.SVC_PROTO_PREFIX))
        else:
            for start, bits in port_blocks(spec.lo, spec.hi):
                out.append((proto, start, C.SVC_PROTO_PREFIX + bits))
    return tuple(out)


def service_entries(spec: ServiceSpec, rule: int) -> list[SvcEntry]:
    new = tuple.__new__     # SvcEntry(...) without its Python-level __new__
    return [new(SvcEntry, (proto, port, plen, rule)) for proto, port, plen in _service_keys(spec)]


def _dedupe(entries: Iterable[SvcEntry]) -> Portset:
    """Keep one rule per (proto, port, plen): the lowest id, so the same
    rule is credited every time."""
    entries = entries if isinstance(entries, (set, frozenset)) else set(entries)
    if len({e[:3] for e in entries}) == len(entries):
        return frozenset(entries)        # one rule per key already (the usual case)
    best: dict[tuple[int, int, int], int] = {}
    for e in entries:
        k = (e.proto, e.port, e.plen)
        if k not in best or e.rule < best[k]:
            best[k] = e.rule
    return frozenset(SvcEntry(p, port, plen, r) for (p, port, plen), r in best.items())


def union_portset(portsets: Iterable[Portset]) -> Portset:
    """One portset holding every service of these (e.g. the grants of
    every rule that allowed one DNS-derived address): each key once,
    credited to the lowest rule id."""
    return _dedupe(e for portset in portsets for e in portset)


def _key(net: Network) -> tuple[bytes, int]:
    return C.addr16(net.network_address), C.addr_prefixlen(net)


def _family(addr: int, plen: int) -> int:
    return C.family_of16(addr.to_bytes(16, "big"), plen)


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    """Prefix containment within one family: in the kernel the family is
    part of the key, so ::/0 does not cover the v4-mapped IPv4 space."""
    (oaddr, oplen), (iaddr, iplen) = outer, inner
    if oplen > iplen or _family(oaddr, oplen) != _family(iaddr, iplen):
        return False
    shift = 128 - oplen
    return (oaddr >> shift) == (iaddr >> shift) if oplen else True


# A grant ready for the sweep: its prefix as (family, address as an int,
# length), its services deduplicated, and its aus_dst entry for when no
# other grant touches that prefix (then the entry is this very object).
PrefixKey: TypeAlias = tuple[int, int, int]
Part: TypeAlias = tuple[PrefixKey, Portset, DstEntry]


def prepare(net: Network, entries: Iterable[SvcEntry]) -> Part:
    addr, plen = _key(net)
    a = int.from_bytes(addr, "big")
    portset = _dedupe(entries)
    return (_family(a, plen), a, plen), portset, DstEntry(addr, plen, portset)


def flatten(grants: Iterable[tuple[Network, Iterable[SvcEntry]]]) -> Ruleset:
    """Turn (destination, services) grants into LPM entries in which the
    longest matching prefix carries every service any containing prefix
    grants."""
    return flatten_parts([prepare(net, entries) for net, entries in grants])


def flatten_parts(parts: Iterable[Part]) -> Ruleset:
    """:func:`flatten` of prepared grants.

    One sweep in address order: prefixes either nest or are disjoint, so
    the prefixes containing the current one form a stack, and the top of
    the stack already carries everything above it. O(P log P). A prefix
    that one grant alone gives, under no other, reuses that grant's entry:
    a ruleset of 10,000 rules is mostly such entries, shared with every
    other ruleset holding those rules.
    """
    by_prefix: dict[PrefixKey, list[Part]] = {}
    for part in parts:
        got = by_prefix.get(part[0])
        if got is None:
            by_prefix[part[0]] = [part]
        else:
            got.append(part)
    out = []
    stack: list[tuple[int, int, int, frozenset[SvcEntry] | set[SvcEntry]]] = []
    for key in sorted(by_prefix):
        fam, a, plen = key
        last = a | ((1 << (128 - plen)) - 1)
        while stack and (stack[-1][0] != fam or stack[-1][2] < a):
            stack.pop()
        here = by_prefix[key]
        if not stack and len(here) == 1:
            merged = here[0][1]
            out.append(here[0][2])
        else:
            merged = set().union(*(p[1] for p in here))
            if stack:
                merged |= stack[-1][3]
            portset = _dedupe(merged)
            out.append(DstEntry(here[0][2].addr, plen, portset))
        stack.append((fam, a, last, merged))
    return frozenset(out)


def _touches(key: PrefixKey, found: set[PrefixKey], ordered: list[PrefixKey]) -> bool:
    """Whether ``key`` equals, lies under or contains a prefix of ``found``
    (``ordered`` is found sorted). Within one family, as in the sweep."""
    fam, a, plen = key
    if key in found:
        return True
    for shorter in range(96 if fam == 4 else 0, plen):   # the prefixes containing key
        host = 128 - shorter
        if (fam, a >> host << host if shorter else 0, shorter) in found:
            return True
    i = bisect.bisect_left(ordered, key)       # the first prefix at or after key's start
    if i < len(ordered):
        nfam, na, _ = ordered[i]
        if nfam == fam and na <= a | ((1 << (128 - plen)) - 1):
            return True
    return False


def group_matches(policy_group: str, directory_group: str) -> bool:
    """``DEV`` matches ``dev`` and ``dev@corp.example``; case never matters."""
    want = policy_group.casefold()
    have = directory_group.casefold()
    return have == want or ("@" not in want and have.split("@", 1)[0] == want)


class _Prepared(dict):
    """Rule id -> its prepared grants, made on first use."""

    def __init__(self, rules: dict[int, CompiledRule]):
        super().__init__()
        self.rules = rules

    def __missing__(self, rid: int) -> tuple[Part, ...]:
        parts = self[rid] = tuple(prepare(g.destination, g.services)
                                  for g in self.rules[rid].grants)
        return parts


# The DNS grants kept per set of rule ids (the distinct group combinations
# of the users logged in, usually).
DNS_GRANTS_CACHE = 4096

# The compiled rulesets kept for the next login, at most this many aus_dst
# entries in all (the least recently used go first).
RULESET_CACHE_ENTRIES = 1_000_000


@dataclass(frozen=True)
class CompiledRule:
    id: int
    name: str
    sources: tuple[str, ...]                     # policy group names
    grants: tuple[Grant, ...]
    dns: tuple[DnsGrant, ...] = ()


def assign_rule_ids(names: list[str], existing: dict[str, int],
                    max_rules: int) -> dict[str, int]:
    """Stable ids: a rule keeps its id across reloads while its name stays,
    so its counters do; new rules get the lowest free ids from 2."""
    ids = {n: existing[n] for n in names if n in existing and existing[n] < max_rules}
    used = set(ids.values())
    nxt = C.RULE_BASELINE + 1
    for n in names:
        if n in ids:
            continue
        while nxt in used:
            nxt += 1
        if nxt >= max_rules:
            raise ValueError(f"the policy has more rules than max_rules ({max_rules - 2})")
        ids[n] = nxt
        used.add(nxt)
    return ids


@dataclass
class CompiledPolicy:
    """A policy ready to be turned into rulesets, user by user."""
    rules: tuple[CompiledRule, ...]
    baseline: tuple[Network, ...]
    version: int = 0
    group_sids: tuple[tuple[str, str], ...] = ()   # (policy group name, SID)
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cached_entries: int = field(default=0, repr=False)
    _matches: dict = field(default_factory=dict, repr=False)
    _index: dict | None = field(default=None, repr=False)
    _parts: dict | None = field(default=None, repr=False)
    _names: dict | None = field(default=None, repr=False)
    _largest: dict = field(default_factory=dict, repr=False)   # rule ids -> largest group's
    _keys: dict = field(default_factory=dict, repr=False)      # rule ids -> their prefixes
    _dns: OrderedDict = field(default_factory=OrderedDict, repr=False)  # rule ids -> DnsGrants
    _dns_by_rule: dict | None = field(default=None, repr=False)

    @property
    def rule_names(self) -> dict[int, str]:
        """Rule id -> name, the baseline's included. Built once: every
        sync compares it with the maps' names. Do not modify."""
        if self._names is None:
            names = {C.RULE_BASELINE: "baseline"}
            names.update({r.id: r.name for r in self.rules})
            self._names = names
        return self._names

    def matching_rules(self, groups: Iterable[str], sids: Iterable[str] = ()) -> frozenset[int]:
        """Rules whose sources match any of these directory groups, by name
        (see group_matches) or by SID (a policy group given with ``sid``).
        Memoized per group list: users share group lists."""
        key = (tuple(groups), tuple(sids))
        hit = self._matches.get(key)
        if hit is None:
            index = self._source_index()
            parts: list[frozenset[int]] = []
            for sid in key[1]:
                parts.append(index.get(("sid", sid.upper()), frozenset()))
            for g in key[0]:
                name = g.casefold()
                parts.append(index.get(name, frozenset()))
                short = name.split("@", 1)[0]
                if short != name:
                    parts.append(index.get(("short", short), frozenset()))
            hit = self._matches[key] = frozenset().union(*parts)
            largest = max(parts, key=len, default=hit)
            if largest and largest != hit:
                self._largest[hit] = largest
        return hit

    def _source_index(self) -> dict:
        """casefolded source -> rule ids; a source without '@' is also
        reachable as ("short", name), for directory names with a domain."""
        if self._index is None:
            index: dict = {}
            sid_of = {name.casefold(): sid.upper() for name, sid in self.group_sids}
            for r in self.rules:
                for src in r.sources:
                    name = src.casefold()
                    index.setdefault(name, set()).add(r.id)
                    if "@" not in name:
                        index.setdefault(("short", name), set()).add(r.id)
                    if name in sid_of:
                        index.setdefault(("sid", sid_of[name]), set()).add(r.id)
            self._index = {k: frozenset(v) for k, v in index.items()}
        return self._index

    def ruleset(self, rule_ids: frozenset[int]) -> Ruleset:
        """The compiled ruleset of a set of rules (memoized: many users share).

        A user's rules are the union of their groups' rules. When the
        largest group's ruleset is known (or worth knowing: its other
        users share it) and the rest touch none of its prefixes, the
        user's ruleset is that one plus the rest's entries: a login with
        10,000 rules of one group and a few of its own sweeps the few."""
        cache = self._cache
        rs = cache.get(rule_ids)
        if rs is not None:
            cache.move_to_end(rule_ids)
            return rs
        base = self._largest.get(rule_ids)
        if base is not None:
            rs = self._extended(base, rule_ids - base)
        if rs is None:
            parts = self._prepared()
            rs = flatten_parts(
                [part for rid in (C.RULE_BASELINE, *rule_ids) for part in parts[rid]])
        cache[rule_ids] = rs
        # Bounded: every combination of groups that ever logged in would
        # otherwise stay, each with its own set of up to 10,000 entries.
        self._cached_entries += len(rs)
        while self._cached_entries > RULESET_CACHE_ENTRIES and len(cache) > 1:
            self._cached_entries -= len(cache.popitem(last=False)[1])
        return rs

    def _extended(self, base: frozenset[int], extra: frozenset[int]) -> Ruleset | None:
        """ruleset(base | extra) from ruleset(base), or None when a prefix
        of extra equals, contains or lies under one of base's (then the
        services must be merged: the caller sweeps everything)."""
        prepared = self._prepared()
        parts = [part for rid in extra for part in prepared[rid]]
        keys = self._keys.get(base)
        if keys is None:
            found = {part[0] for rid in (C.RULE_BASELINE, *base) for part in prepared[rid]}
            keys = self._keys[base] = (found, sorted(found))
        found, ordered = keys
        for key, _, _ in parts:
            if _touches(key, found, ordered):
                return None
        return self.ruleset(base) | flatten_parts(parts)

    def _prepared(self) -> dict[int, tuple[Part, ...]]:
        """Each rule's grants prepared for flatten_parts (the baseline's
        under RULE_BASELINE), once per policy and rule, when a ruleset
        first needs the rule: a login then costs a sweep over shared
        objects, not a rebuild of 10,000 grants."""
        if self._parts is None:
            anyway = service_entries(ServiceSpec("any", 0, 0), C.RULE_BASELINE)
            self._parts = _Prepared({r.id: r for r in self.rules})
            self._parts[C.RULE_BASELINE] = tuple(prepare(net, anyway) for net in self.baseline)
        return self._parts

    def dns_grants(self, rule_ids: frozenset[int]) -> DnsGrants:
        """The DNS grants of a set of rules (a user's matching rules),
        memoized per set like the rulesets."""
        cache = self._dns
        hit = cache.get(rule_ids)
        if hit is not None:
            cache.move_to_end(rule_ids)
            return hit
        by_id = self._dns_rules()
        grants = [g for rid in rule_ids for g in by_id.get(rid, ())]
        hit = cache[rule_ids] = DnsGrants(grants) if grants else NO_DNS_GRANTS
        if len(cache) > DNS_GRANTS_CACHE:
            cache.popitem(last=False)
        return hit

    def _dns_rules(self) -> dict[int, tuple[DnsGrant, ...]]:
        if self._dns_by_rule is None:
            self._dns_by_rule = {r.id: r.dns for r in self.rules if r.dns}
        return self._dns_by_rule

    def dns_portsets(self) -> frozenset[Portset]:
        """Every portset a DNS grant uses: the maps keep them in aus_svc
        even when no ruleset points at them, so the forwarder's entries
        can name them."""
        return frozenset(g.services for r in self.rules for g in r.dns)

    def baseline_ruleset(self) -> Ruleset:
        return self.ruleset(frozenset())

    def warm(self, min_rules: int = 1000) -> int:
        """Compile now the ruleset of every source with at least
        ``min_rules`` rules, so that the first login of such a group (or
        of a user with a few rules of their own on top) does not sweep
        them all. Returns how many were compiled."""
        big = {ids for ids in self._source_index().values() if len(ids) >= min_rules}
        for ids in big:
            self.ruleset(ids)
        return len(big)


def compile_policy(policy: Policy, baseline: Iterable[Network], *,
                   rule_ids: dict[str, int] | None = None,
                   max_rules: int = 4096, version: int = 0) -> CompiledPolicy:
    ids = assign_rule_ids([r.name for r in policy.rules], rule_ids or {}, max_rules)
    rules = []
    for r in policy.rules:
        rid = ids[r.name]
        entries = tuple(e for spec in policy.services_of(r)
                        for e in service_entries(spec, rid))
        # icmp means ICMP towards IPv4 and ICMPv6 towards IPv6.
        other = {4: C.PROTO_ICMPV6, 6: C.PROTO_ICMP}
        grants = tuple(Grant(net, tuple(e for e in entries if e.proto != other[net.version]))
                       for net in policy.destinations_of(r))
        patterns = policy.dns_of(r)
        portset = _dedupe(entries) if patterns else frozenset()
        dns = tuple(DnsGrant(p, rid, portset) for p in patterns)
        rules.append(CompiledRule(rid, r.name, tuple(r.sources), grants, dns))
    sids = tuple((g.name, g.sid) for g in policy.user_groups if g.sid)
    return CompiledPolicy(tuple(rules), tuple(baseline), version, sids)


def lookup(ruleset: Ruleset, addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
           proto: int, port: int) -> int | None:
    """What the two LPM lookups give for a destination: the rule id, or None.
    The kernel's two lookups (aus.bpf.c) modelled in Python, so that tests can
    check a compiled ruleset without a kernel."""
    a = int.from_bytes(C.addr16(addr), "big")
    best: DstEntry | None = None
    for dst in ruleset:
        if _contains((int.from_bytes(dst.addr, "big"), dst.plen), (a, 128)):
            if best is None or dst.plen > best.plen:
                best = dst
    if best is None:
        return None
    match = None
    for e in best.portset:
        if e.covers(proto, port) and (match is None or e.plen > match.plen):
            match = e
    return match.rule if match else None
