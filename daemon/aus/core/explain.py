"""Why a connection would pass or not (``ausctl explain``). Pure.

Given a compiled policy (a file's, or the one ausd enforces), a subject
(a user's directory groups and policy-server memberships, or a list of
groups) and a destination, says what the kernel decides for that user's
processes, logged in or not: allowed or denied, the deciding rule (name,
id, position in the policy) and the groups it came through. The verdict
comes from :class:`aus.core.verdict.Evaluator`: the same rulesets the
kernel holds, looked up the way the kernel looks them up.

What the kernel does beyond the rules, and this says too:

- a login UID in ``unmanaged_login_uids`` is not filtered at all;
- a user no rule names (or NSS does not know) gets the baseline only;
- in visibility mode a denied connection passes and is only reported
  (verdict ``audit``, as ``ausctl check`` says).

The destination may be a DNS name instead of an address: then the answer
is which of the subject's rules name it (``dns:NAME``, ``dns:*.SUFFIX``)
and on which services. The kernel allows the addresses of such a name
only as ausd's DNS forwarder sees them in the answers to the user's
queries, for the answer's TTL plus grace; an address may of course also
be allowed by a CIDR rule, which a name alone cannot tell.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

from . import contract as C
from .compiler import (
    CompiledPolicy,
    DnsGrant,
    Portset,
    SvcEntry,
    group_matches,
    union_portset,
)
from .dnsname import DnsPattern, is_dns_destination, parse_dns_destination
from .verdict import Evaluator

PROTOS = ("tcp", "udp", "icmp")
DNS_NOTE = ("the addresses come from DNS answers: ausd's DNS forwarder allows the "
            "addresses it sees in the answers to the user's own queries for this name, "
            "until the answer's TTL (plus grace) runs out")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_target(text: str) -> Address | DnsPattern:
    """What ``ausctl check``/``explain --to`` names: an address, or else a
    DNS name (``github.com`` or ``dns:github.com``). Raises ValueError."""
    raw = text.strip()
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        pass
    try:
        pattern = parse_dns_destination(raw if is_dns_destination(raw) else "dns:" + raw)
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither an address nor a DNS name: {exc}") from None
    if pattern.wildcard:
        raise ValueError(f"{text!r} is a pattern; give a name as an application looks it "
                         f"up (e.g. www.{pattern.name})")
    return pattern


def check_target(text: str) -> str:
    """parse_target as a validator: the text, unchanged."""
    parse_target(text)
    return text


def service_texts(portset: Iterable[SvcEntry]) -> list[str]:
    """A portset in the policy's service syntax (``443/tcp``,
    ``8000-8100/tcp``, ``icmp``, ``any``): adjacent port blocks joined,
    ICMP and ICMPv6 said once."""
    names = {C.PROTO_TCP: "tcp", C.PROTO_UDP: "udp", C.PROTO_ICMP: "icmp",
             C.PROTO_ICMPV6: "icmp"}
    ranges: dict[str, list[list[int]]] = {}
    whole: list[str] = []
    for e in sorted(portset):
        if e.plen == C.SVC_ANY_PREFIX:
            whole.append("any")
            continue
        name = names.get(e.proto, str(e.proto))
        if e.plen == C.SVC_PROTO_PREFIX:
            whole.append(name)
            continue
        lo, hi = e.port, e.port + (1 << (16 - (e.plen - C.SVC_PROTO_PREFIX))) - 1
        spans = ranges.setdefault(name, [])
        if spans and spans[-1][1] + 1 == lo:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    out = list(dict.fromkeys(whole))
    for name, spans in ranges.items():
        if name in out:
            continue
        out += [f"{lo}/{name}" if lo == hi else f"{lo}-{hi}/{name}" for lo, hi in spans]
    return out


def _covering(portset: Portset, proto: int, port: int) -> SvcEntry | None:
    """The aus_svc entry the kernel's LPM lookup finds, as compiler.lookup."""
    match = None
    for e in portset:
        if e.covers(proto, port) and (match is None or e.plen > match.plen):
            match = e
    return match


class Subject(NamedTuple):
    """Who a connection is explained for."""
    user: str | None                   # None: groups given, no user
    login_uid: int | None
    groups: tuple[str, ...]            # directory groups, or the groups given
    sids: tuple[str, ...] = ()         # the directory groups' SIDs (AD)
    bundle_groups: tuple[str, ...] = ()   # memberships from the policy server
    known: bool = True                 # NSS knows the user
    logged_in: bool = False            # the groups ausd holds for a live session
    stale: str = ""                    # why the directory's answer was not fresh

    @property
    def given(self) -> bool:
        return self.user is None and self.login_uid is None

    def all_groups(self) -> tuple[str, ...]:
        """The groups rules are matched against, as ausd joins them."""
        return self.groups + tuple(g for g in self.bundle_groups if g not in self.groups)


def standing(subject: Subject, rule_names: list[str], unmanaged: Iterable[int]) -> tuple[bool, str]:
    """(managed, what the subject gets, in words)."""
    if subject.login_uid is not None and subject.login_uid in set(unmanaged):
        return False, (f"not managed: login UID {subject.login_uid} is in "
                       "unmanaged_login_uids, its traffic is not filtered")
    if not subject.known:
        return True, "unknown to NSS: managed, baseline only"
    if not rule_names:
        return True, "managed, baseline only"
    return True, f"managed, rules {', '.join(rule_names)}"


def _via(compiled: CompiledPolicy, rule_id: int, subject: Subject) -> list[dict]:
    """The rule's sources the subject matches, and with which of its groups."""
    rule = next(r for r in compiled.rules if r.id == rule_id)
    sid_of = {name.casefold(): sid.upper() for name, sid in compiled.group_sids}
    sids = {s.upper() for s in subject.sids}
    out = []
    for src in rule.sources:
        hit = None
        for g in subject.all_groups():
            if group_matches(src, g):
                origin = "given" if subject.given else (
                    "directory" if g in subject.groups else "policy server")
                hit = {"policy_group": src, "group": g, "from": origin}
                break
        if hit is None and sid_of.get(src.casefold()) in sids:
            hit = {"policy_group": src, "group": sid_of[src.casefold()], "from": "SID"}
        if hit is not None:
            out.append(hit)
    return out


def explain(compiled: CompiledPolicy, subject: Subject, to: str, proto: str, port: int, *,
            mode: str = "enforce", unmanaged: Iterable[int] = ()) -> dict:
    """The verdict for ``subject`` connecting to ``to`` (an address, or a
    DNS name: see :func:`parse_target`) with ``proto`` (tcp, udp, icmp)
    and ``port``, as a plain dict (the stable shape of ``ausctl explain
    --json``; for a name it has ``dns`` too, else ``dns`` is None)."""
    if proto not in PROTOS:
        raise ValueError(f"protocol {proto!r}: expected one of {', '.join(PROTOS)}")
    target = parse_target(to)
    if isinstance(target, DnsPattern):
        return _explain_name(compiled, subject, target, proto, port, mode, unmanaged)
    ip = target
    lookup_proto = "icmpv6" if proto == "icmp" and ip.version == 6 else proto
    if proto == "icmp":
        port = 0
    ev = Evaluator(None, compiled=compiled)
    ids = compiled.matching_rules(subject.all_groups(), subject.sids)
    names = [r.name for r in compiled.rules if r.id in ids]   # policy order
    managed, words = standing(subject, names, unmanaged)
    out = {"subject": {"user": subject.user, "login_uid": subject.login_uid,
                       "groups": list(subject.groups),
                       "bundle_groups": list(subject.bundle_groups),
                       "known": subject.known, "logged_in": subject.logged_in,
                       "stale": subject.stale or None, "managed": managed,
                       "standing": words, "rules": names},
           "to": str(ip), "proto": proto, "port": port, "mode": mode,
           "rule": None, "rule_id": None, "rule_index": None, "via": [], "dns": None}
    if not managed:
        allowed, reason = True, "unmanaged"
    else:
        rid = ev.rule_id(subject.all_groups(), str(ip), lookup_proto, port, subject.sids)
        allowed, reason = rid is not None, "rule" if rid is not None else "no_rule"
        if rid is not None:
            out["rule_id"] = rid
            out["rule"] = compiled.rule_names[rid]
            if rid != C.RULE_BASELINE:
                out["rule_index"] = [r.id for r in compiled.rules].index(rid)
                out["via"] = _via(compiled, rid, subject)
    out["allowed"] = allowed
    out["reason"] = reason
    out["verdict"] = "allow" if allowed else ("deny" if mode == "enforce" else "audit")
    return out


def _explain_name(compiled: CompiledPolicy, subject: Subject, name: DnsPattern, proto: str,
                  port: int, mode: str, unmanaged: Iterable[int]) -> dict:
    """explain() for a DNS name: the subject's rules that name it, and
    what the kernel would decide for the addresses of an answer for it."""
    if proto == "icmp":
        port = 0
    ids = compiled.matching_rules(subject.all_groups(), subject.sids)
    names = [r.name for r in compiled.rules if r.id in ids]
    managed, words = standing(subject, names, unmanaged)
    grants: tuple[DnsGrant, ...] = compiled.dns_grants(ids).lookup(name.name) if managed else ()
    index = {r.id: i for i, r in enumerate(compiled.rules)}
    out = {"subject": {"user": subject.user, "login_uid": subject.login_uid,
                       "groups": list(subject.groups),
                       "bundle_groups": list(subject.bundle_groups),
                       "known": subject.known, "logged_in": subject.logged_in,
                       "stale": subject.stale or None, "managed": managed,
                       "standing": words, "rules": names},
           "to": name.name, "proto": proto, "port": port, "mode": mode,
           "rule": None, "rule_id": None, "rule_index": None, "via": [],
           "dns": {"name": name.name, "note": DNS_NOTE, "grants": [
               {"rule": compiled.rule_names[g.rule], "rule_id": g.rule,
                "rule_index": index[g.rule], "pattern": str(g.pattern),
                "services": service_texts(g.services),
                "via": _via(compiled, g.rule, subject)}
               for g in sorted(grants, key=lambda g: index[g.rule])]}}
    if not managed:
        allowed, reason = True, "unmanaged"
    else:
        # The forwarder writes one entry per address with the union of the
        # services of every grant that matched: the kernel's lookup in it.
        nums = ([C.PROTO_ICMP, C.PROTO_ICMPV6] if proto == "icmp"
                else [C.PROTO_TCP if proto == "tcp" else C.PROTO_UDP])
        union = union_portset(g.services for g in grants)
        hit = next((e for e in (_covering(union, n, port) for n in nums) if e), None)
        allowed, reason = hit is not None, "dns" if hit is not None else "no_rule"
        if hit is not None:
            out["rule_id"] = hit.rule
            out["rule"] = compiled.rule_names[hit.rule]
            out["rule_index"] = index[hit.rule]
            out["via"] = _via(compiled, hit.rule, subject)
    out["allowed"] = allowed
    out["reason"] = reason
    out["verdict"] = "allow" if allowed else ("deny" if mode == "enforce" else "audit")
    return out


def describe_dns(res: dict) -> list[str]:
    """The lines on a name's rules (explain and check)."""
    dns = res["dns"]
    lines = []
    for g in dns["grants"]:
        lines.append(f"  rule {g['rule']} (rules[{g['rule_index']}], id {g['rule_id']}) "
                     f"names it as {g['pattern']}: {', '.join(g['services'])}")
    if not dns["grants"] and res["reason"] != "unmanaged":
        lines.append(f"  no rule of the user's names {dns['name']}")
    lines.append(f"  {dns['note']}")
    return lines


def describe(res: dict) -> str:
    """``ausctl explain``'s human answer."""
    s = res["subject"]
    who = (f"user {s['user']} (login UID {s['login_uid']})" if s["user"]
           else f"login UID {s['login_uid']}" if s["login_uid"] is not None
           else "groups " + (", ".join(s["groups"]) or "(none)"))
    dst = f"{res['to']} {res['proto']}" + (f"/{res['port']}" if res["proto"] != "icmp" else "")
    verdict = {"allow": "ALLOWED", "deny": "DENIED",
               "audit": "DENIED (visibility mode: reported, not blocked)"}[res["verdict"]]
    dns = res.get("dns")
    lines = [f"{verdict}: {who} -> {dst}" + (" (a DNS name)" if dns else "")]
    if res["reason"] == "unmanaged":
        pass   # the standing below says it
    elif dns and res["rule"]:
        via = "; ".join(f"{v['policy_group']} (via {v['from']} group {v['group']})"
                        if v["from"] != "given" else v["policy_group"] for v in res["via"])
        lines.append(f"  the addresses DNS gives for it, by rule {res['rule']} "
                     f"(rules[{res['rule_index']}], id {res['rule_id']}), from group {via}")
    elif dns:
        lines.append(f"  no rule of the user's allows this name on {res['proto']}"
                     + (f"/{res['port']}" if res["proto"] != "icmp" else ""))
    elif res["rule"] == "baseline":
        lines.append("  by the baseline (allowed to every managed user)")
    elif res["rule"]:
        via = "; ".join(f"{v['policy_group']} (via {v['from']} group {v['group']})"
                        if v["from"] != "given" else v["policy_group"] for v in res["via"])
        lines.append(f"  by rule {res['rule']} (rules[{res['rule_index']}], id "
                     f"{res['rule_id']}), from group {via}")
    else:
        lines.append("  no rule of the user's allows it")
    if s["user"] or s["login_uid"] is not None:
        lines.append(f"  {s['standing']}"
                     + (" (logged in: the groups ausd holds)" if s["logged_in"] else ""))
        groups = ", ".join(s["groups"]) or "none"
        if s["bundle_groups"]:
            groups += "; from the policy server: " + ", ".join(s["bundle_groups"])
        lines.append(f"  groups: {groups}")
        if s["stale"]:
            lines.append(f"  the directory did not answer in full: {s['stale']}")
    else:
        lines.append("  rules of these groups: " + (", ".join(s["rules"]) or "none (baseline only)"))
    if dns:
        lines += describe_dns(res)
    return "\n".join(lines)
