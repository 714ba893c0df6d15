"""Desired versus actual map state, and the plan between them. Pure.

The kernel state is modelled as immutable *rulesets* (a ruleset id owns
its aus_dst entries) and immutable *portsets* (a portset id owns its
aus_svc entries), plus the aus_users entries that point at rulesets. A
change never edits a ruleset in use: new content gets a new id, is written
whole, and then each affected user's single aus_users value is replaced,
which the kernel does atomically. Only then are unreferenced rulesets and
portsets deleted. So a packet sees a user's old rule set or the new one,
never a mix.

:func:`plan` is a plain function of (actual, desired); applying its
result twice is a no-op (puts are upserts, deletes of absent keys pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import contract as C
from .compiler import Portset, Ruleset, SvcEntry

UNMANAGED = "unmanaged"


@dataclass(frozen=True)
class ConfigValues:
    mode: int = C.MODE_ENFORCE
    baseline_ruleset: int = C.RULESET_NONE
    events_per_sec: int = 1000
    events_burst: int = 2000
    ruleset_seq: int = 1
    portset_seq: int = 1
    policy_version: int = 0
    users_gen: int = 0


@dataclass
class KernelState:
    """What the maps hold (as read at adoption, then as written)."""
    config: ConfigValues = field(default_factory=ConfigValues)
    # login UID -> (ruleset, flags, stats slot)
    users: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    rulesets: dict[int, dict[tuple[bytes, int], int]] = field(default_factory=dict)
    portsets: dict[int, Portset] = field(default_factory=dict)
    rules: dict[int, str] = field(default_factory=dict)

    def ruleset_content(self, rid: int) -> Ruleset:
        return frozenset((addr, plen, self.portsets.get(pid, frozenset()))
                         for (addr, plen), pid in self.rulesets.get(rid, {}).items())

    def copy(self) -> "KernelState":
        return KernelState(self.config, dict(self.users),
                           {k: dict(v) for k, v in self.rulesets.items()},
                           dict(self.portsets), dict(self.rules))


@dataclass(frozen=True)
class Desired:
    """What the maps should hold: each login UID's ruleset content (or
    UNMANAGED), the baseline ruleset, rule names and the config values
    the daemon owns."""
    users: dict[int, Ruleset | str]
    baseline: Ruleset
    rules: dict[int, str]
    mode: int
    events_per_sec: int
    events_burst: int
    policy_version: int


@dataclass
class Plan:
    """Map operations, in the order that keeps every step consistent."""
    svc_put: list[tuple[int, SvcEntry]] = field(default_factory=list)
    dst_put: list[tuple[int, bytes, int, int]] = field(default_factory=list)
    rules_put: list[tuple[int, str]] = field(default_factory=list)
    stats_reset: list[int] = field(default_factory=list)
    users_put: list[tuple[int, int, int, int]] = field(default_factory=list)
    users_del: list[int] = field(default_factory=list)
    config_put: ConfigValues | None = None
    dst_del: list[tuple[int, bytes, int]] = field(default_factory=list)
    svc_del: list[tuple[int, SvcEntry]] = field(default_factory=list)
    rules_del: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.svc_put, self.dst_put, self.rules_put, self.stats_reset,
                    self.config_put, self.users_put, self.users_del, self.dst_del,
                    self.svc_del, self.rules_del))

    def summary(self) -> dict[str, int]:
        return {"svc_put": len(self.svc_put), "dst_put": len(self.dst_put),
                "users_put": len(self.users_put), "users_del": len(self.users_del),
                "dst_del": len(self.dst_del), "svc_del": len(self.svc_del),
                "rules_put": len(self.rules_put), "rules_del": len(self.rules_del),
                "stats_reset": len(self.stats_reset),
                "config": int(self.config_put is not None)}


def plan(actual: KernelState, desired: Desired) -> tuple[Plan, KernelState]:
    """The operations that turn ``actual`` into ``desired``, and the state
    after them."""
    p = Plan()
    new = actual.copy()
    cfg = actual.config

    # Index what exists by content, so unchanged content keeps its id.
    portset_ids = {content: pid for pid, content in actual.portsets.items()}
    ruleset_ids = {actual.ruleset_content(rid): rid for rid in actual.rulesets}
    # Ids are never reused: past the stored sequence and past any id the
    # maps hold (an apply interrupted before its config write leaves
    # entries under ids the sequence has not counted yet).
    ruleset_seq = max([cfg.ruleset_seq, *(rid + 1 for rid in actual.rulesets)])
    portset_seq = max([cfg.portset_seq, *(pid + 1 for pid in actual.portsets)])

    def portset_id(content: Portset) -> int:
        nonlocal portset_seq
        pid = portset_ids.get(content)
        if pid is None:
            pid = portset_ids[content] = portset_seq
            portset_seq += 1
            new.portsets[pid] = content
            p.svc_put.extend((pid, e) for e in sorted(content))
        return pid

    def ruleset_id(content: Ruleset) -> int:
        nonlocal ruleset_seq
        rid = ruleset_ids.get(content)
        if rid is None:
            rid = ruleset_ids[content] = ruleset_seq
            ruleset_seq += 1
            entries = {}
            for addr, plen, portset in sorted(content, key=lambda e: (e[1], e[0])):
                pid = portset_id(portset)
                entries[(addr, plen)] = pid
                p.dst_put.append((rid, addr, plen, pid))
            new.rulesets[rid] = entries
        return rid

    baseline_id = ruleset_id(desired.baseline)
    # Stats slots: a user keeps its slot; a new user gets the lowest free
    # one (0 counts users not in the map yet), zeroed before it is used.
    kept = {uid: v[2] for uid, v in actual.users.items()
            if uid in desired.users and desired.users[uid] != UNMANAGED and v[2]}
    # Slots of users about to go stay taken in this plan: they still count
    # into them until their entry is deleted.
    used = {v[2] for v in actual.users.values() if v[2]}
    free_slot = 1
    want_users: dict[int, tuple[int, int, int]] = {}
    for uid, content in sorted(desired.users.items()):
        if content == UNMANAGED:
            want_users[uid] = (C.RULESET_NONE, C.USER_UNMANAGED, 0)
            continue
        slot = kept.get(uid)
        if slot is None:
            while free_slot in used:
                free_slot += 1
            slot = free_slot
            used.add(slot)
            p.stats_reset.append(slot)
        want_users[uid] = (ruleset_id(content), 0, slot)

    for rid, name in desired.rules.items():
        if actual.rules.get(rid) != name:
            p.rules_put.append((rid, name))
            new.rules[rid] = name
    for rid in actual.rules:
        if rid not in desired.rules:
            p.rules_del.append(rid)
            del new.rules[rid]

    for uid, value in sorted(want_users.items()):
        if actual.users.get(uid) != value:
            p.users_put.append((uid, *value))
            new.users[uid] = value
    for uid in sorted(actual.users):
        if uid not in want_users:
            p.users_del.append(uid)
            del new.users[uid]

    # Written after the users: bumping users_gen makes every socket drop
    # its cached decision and look its user up again.
    users_changed = bool(p.users_put or p.users_del) or baseline_id != cfg.baseline_ruleset
    new_cfg = replace(cfg, mode=desired.mode, baseline_ruleset=baseline_id,
                      events_per_sec=desired.events_per_sec,
                      events_burst=desired.events_burst,
                      ruleset_seq=ruleset_seq, portset_seq=portset_seq,
                      policy_version=desired.policy_version,
                      users_gen=(cfg.users_gen + 1) & 0xFFFFFFFF if users_changed else cfg.users_gen)
    if new_cfg != cfg:
        p.config_put = new_cfg
        new.config = new_cfg

    # Garbage: rulesets no user (and not the baseline) points at, then
    # portsets no remaining ruleset points at.
    live_rulesets = {v[0] for v in new.users.values()} | {baseline_id}
    for rid in sorted(new.rulesets):
        if rid not in live_rulesets:
            for (addr, plen) in sorted(new.rulesets[rid]):
                p.dst_del.append((rid, addr, plen))
            del new.rulesets[rid]
    live_portsets = {pid for entries in new.rulesets.values() for pid in entries.values()}
    for pid in sorted(new.portsets):
        if pid not in live_portsets:
            p.svc_del.extend((pid, e) for e in sorted(new.portsets[pid]))
            del new.portsets[pid]
    return p, new


def lookup(state: KernelState, loginuid: int, addr, proto: int, port: int):
    """The decision the kernel's lookups give on this state, as
    (reason, rule id or None). Pure mirror of aus_judge() for tests."""
    from .compiler import lookup as ruleset_lookup

    if loginuid == C.LOGINUID_UNSET:
        return C.Reason.UNMANAGED, None
    user = state.users.get(loginuid)
    if user and user[1] & C.USER_UNMANAGED:
        return C.Reason.UNMANAGED, None
    rid = user[0] if user else state.config.baseline_ruleset
    rule = ruleset_lookup(state.ruleset_content(rid), addr, proto, port)
    if rule is not None:
        return C.Reason.RULE, rule
    return (C.Reason.NO_RULE if user else C.Reason.PENDING), None
