"""The impact preview: which flows of the last days would change verdict
if the draft were provisioned.

Both policies are decided with the evaluator of ``aus.core.verdict`` (the
compiler ausd runs, and the kernel's lookups): the policy in force is the
one the current bundle carries, the draft's is built as a provision would
build it. Flows are read from the ``flows`` table grouped by (groups,
destination, protocol, port, user, rule), and each distinct (groups,
destination, protocol, port) is decided once; past ``MAX_KEYS`` distinct
keys or ``MAX_ROWS`` groups the answer says it is truncated. A key whose
groups get the same grants from both policies is unchanged without
compiling either (most keys, for a draft that changes a few rules).

A user's groups are those the flow recorded plus, for the groups either
policy names, the user's current memberships in the store: a provisioned
draft puts those in the bundle, where ausd finds them by userName.

The preview compares policy verdicts (allowed or not), so a ``would_deny``
flow of visibility mode counts like a ``denied`` one. The server does not
know each workload's baseline: a flow the baseline allowed (rule
``baseline``) is allowed under any policy; the request may name baseline
networks to decide the rest exactly as such a workload would.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections import Counter
from collections.abc import Iterable

from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import Session

from ..core.bundle import loads_strict
from ..core.compiler import Network
from ..core.policy import policy_from_data
from ..core.verdict import Evaluator, Verdict
from .bundle import active_spec
from .db import Bundle, Flow, Group, Membership, User, flows_seen_since, fold, utcnow
from .policyversions import draft_spec, spec_policy

MAX_DAYS = 90
MAX_KEYS = 20_000      # distinct (groups, destination, protocol, port) decided
MAX_ROWS = 200_000     # grouped flow rows read
TOP = 50               # entries per breakdown
_SAME = Verdict(False, "")   # stands for both sides of a flow whose grants did not change


def _policy_in_force(s: Session, org_id: str):
    body = s.scalar(select(Bundle.body).where(Bundle.org_id == org_id))
    if body:
        return policy_from_data(loads_strict(body)["policy"], f"the bundle of org {org_id}")
    return spec_policy(s, org_id, active_spec(s, org_id))


def _memberships(s: Session, org_id: str, names: set[str]) -> dict[str, set[str]]:
    """casefolded userName -> the named groups (of ``names``) it is an
    active member of."""
    keys = sorted({fold(n) for n in names})
    out: dict[str, set[str]] = {}
    for i in range(0, len(keys), 900):
        rows = s.execute(select(User.user_name, Group.display_name)
                         .join(Membership, Membership.member_id == User.id)
                         .join(Group, Group.id == Membership.group_id)
                         .where(Group.org_id == org_id, Group.display_name_key.in_(keys[i:i + 900]),
                                User.active.is_(True))).all()
        for user, group in rows:
            out.setdefault(user.casefold(), set()).add(group)
    return out


class _Side:
    def __init__(self):
        self.flows = 0
        self.keys: set = set()
        self.by_group: Counter = Counter()
        self.by_user: Counter = Counter()
        self.by_destination: dict[tuple, dict] = {}

    def add(self, key, groups: Iterable[str], user: str, n: int, before: Verdict,
            after: Verdict) -> None:
        self.flows += n
        self.keys.add(key)
        for g in groups:
            self.by_group[g] += n
        self.by_user[user] += n
        _, dst, proto, port = key
        d = self.by_destination.setdefault((dst, proto, port), {
            "dst": dst, "proto": proto, "port": port, "count": 0, "users": set(),
            "rules_before": set(), "rules_after": set()})
        d["count"] += n
        d["users"].add(user)
        if before.rule:
            d["rules_before"].add(before.rule)
        if after.rule:
            d["rules_after"].add(after.rule)

    def view(self) -> dict:
        dests = sorted(self.by_destination.values(), key=lambda d: (-d["count"], d["dst"],
                                                                    d["proto"], d["port"]))
        return {
            "flows": self.flows, "keys": len(self.keys),
            "by_group": [{"group": g, "count": c} for g, c in _top(self.by_group)],
            "by_user": [{"user": u, "count": c} for u, c in _top(self.by_user)],
            "by_destination": [{**d, "users": sorted(d["users"]),
                                "rules_before": sorted(d["rules_before"]),
                                "rules_after": sorted(d["rules_after"])} for d in dests[:TOP]],
            "more": {"groups": max(0, len(self.by_group) - TOP),
                     "users": max(0, len(self.by_user) - TOP),
                     "destinations": max(0, len(dests) - TOP)},
        }


def _top(c: Counter) -> list:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]


def preview(s: Session, org_id: str, days: int, baseline: list[Network] | None = None,
            now: dt.datetime | None = None) -> dict:
    """Raises PolicyError when the draft would not build (the caller says
    so like a refused provision)."""
    now = now or utcnow()
    since = now - dt.timedelta(days=days)
    draft = spec_policy(s, org_id, draft_spec(s, org_id))
    active = _policy_in_force(s, org_id)
    base = list(baseline or ())
    before_ev, after_ev = Evaluator(active, base), Evaluator(draft, base)
    named = {g.name for p in (active, draft) for g in p.user_groups}
    member_of = _memberships(s, org_id, named)

    groups_text = cast(Flow.groups, Text)
    total = func.sum(Flow.count)
    rows = s.execute(
        select(groups_text, Flow.dst, Flow.proto, Flow.port, Flow.user_name, Flow.rule, total)
        .where(Flow.org_id == org_id, *flows_seen_since(since))
        .group_by(groups_text, Flow.dst, Flow.proto, Flow.port, Flow.user_name, Flow.rule)
        .order_by(total.desc()).limit(MAX_ROWS + 1)).all()
    truncated = len(rows) > MAX_ROWS
    rows = rows[:MAX_ROWS]

    decided: dict[tuple, tuple[Verdict, Verdict]] = {}
    blocked, allowed = _Side(), _Side()
    unchanged = skipped = considered = 0
    for gtext, dst, proto, port, user, rule, n in rows:
        n = int(n or 0)
        recorded = json.loads(gtext) if isinstance(gtext, str) else list(gtext or [])
        groups = tuple(sorted(set(recorded) | member_of.get((user or "").casefold(), set())))
        key = (groups, dst, proto, port)
        if rule == "baseline":
            considered += n
            unchanged += n
            continue
        pair = decided.get(key)
        if pair is None:
            if len(decided) >= MAX_KEYS:
                truncated = True
                skipped += n
                continue
            try:
                ipaddress.ip_address(dst)
                if before_ev.grants(groups) == after_ev.grants(groups):
                    pair = decided[key] = (_SAME, _SAME)   # same grants: same verdict
                else:
                    pair = decided[key] = (before_ev.decide(groups, dst, proto, port),
                                           after_ev.decide(groups, dst, proto, port))
            except (ValueError, KeyError):   # not an address or protocol the kernel sees
                skipped += n
                continue
        considered += n
        before, after = pair
        if before.allowed and not after.allowed:
            blocked.add(key, groups, user, n, before, after)
        elif after.allowed and not before.allowed:
            allowed.add(key, groups, user, n, before, after)
        else:
            unchanged += n
    return {
        "days": days, "since": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "baseline": [str(b) for b in base],
        "flows": considered, "unchanged": unchanged,
        "keys_decided": len(decided), "truncated": truncated, "skipped": skipped,
        "limits": {"keys": MAX_KEYS, "rows": MAX_ROWS},
        "newly_blocked": blocked.view(), "newly_allowed": allowed.view(),
    }


def parse_baseline(entries: list[str]) -> list[Network]:
    return [ipaddress.ip_network(e, strict=False) for e in entries]
