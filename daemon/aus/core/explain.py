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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

from . import contract as C
from .compiler import CompiledPolicy, group_matches
from .verdict import Evaluator

PROTOS = ("tcp", "udp", "icmp")


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
    """The verdict for ``subject`` connecting to ``to`` (an address) with
    ``proto`` (tcp, udp, icmp) and ``port``, as a plain dict (the stable
    shape of ``ausctl explain --json``)."""
    if proto not in PROTOS:
        raise ValueError(f"protocol {proto!r}: expected one of {', '.join(PROTOS)}")
    ip = ipaddress.ip_address(to)
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
           "rule": None, "rule_id": None, "rule_index": None, "via": []}
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


def describe(res: dict) -> str:
    """``ausctl explain``'s human answer."""
    s = res["subject"]
    who = (f"user {s['user']} (login UID {s['login_uid']})" if s["user"]
           else f"login UID {s['login_uid']}" if s["login_uid"] is not None
           else "groups " + (", ".join(s["groups"]) or "(none)"))
    dst = f"{res['to']} {res['proto']}" + (f"/{res['port']}" if res["proto"] != "icmp" else "")
    verdict = {"allow": "ALLOWED", "deny": "DENIED",
               "audit": "DENIED (visibility mode: reported, not blocked)"}[res["verdict"]]
    lines = [f"{verdict}: {who} -> {dst}"]
    if res["reason"] == "unmanaged":
        pass   # the standing below says it
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
    return "\n".join(lines)
