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
from typing import Iterable, NamedTuple, TypeAlias

from . import contract as C
from .compiler import DstEntry, Portset, Ruleset, SvcEntry

UNMANAGED = "unmanaged"

# The ids the maps are keyed by (all u32 in bpf/aus.h).
LoginUid: TypeAlias = int
RulesetId: TypeAlias = int
PortsetId: TypeAlias = int
RuleId: TypeAlias = int
StatsSlot: TypeAlias = int          # index in aus_user_stats; 0 counts users not in aus_users
# An aus_dst key within its ruleset: (16-byte address, prefix length of 128).
DstPrefix: TypeAlias = tuple[bytes, int]


class UserEntry(NamedTuple):
    """An aus_users value: unmanaged users have RULESET_NONE and slot 0."""
    ruleset: RulesetId
    flags: int
    slot: StatsSlot

    @property
    def managed(self) -> bool:
        return not self.flags & C.USER_UNMANAGED


# The plan's operations, one per map write.

class SvcPut(NamedTuple):
    portset: PortsetId
    entry: SvcEntry


class DstPut(NamedTuple):
    ruleset: RulesetId
    addr: bytes
    plen: int
    portset: PortsetId


class RulePut(NamedTuple):
    rule: RuleId
    name: str


class UserPut(NamedTuple):
    login_uid: LoginUid
    entry: UserEntry


class DstDel(NamedTuple):
    ruleset: RulesetId
    addr: bytes
    plen: int


class SvcDel(NamedTuple):
    portset: PortsetId
    entry: SvcEntry


@dataclass(frozen=True)
class ConfigValues:
    mode: int = C.MODE_ENFORCE
    baseline_ruleset: RulesetId = C.RULESET_NONE
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
    users: dict[LoginUid, UserEntry] = field(default_factory=dict)
    rulesets: dict[RulesetId, dict[DstPrefix, PortsetId]] = field(default_factory=dict)
    portsets: dict[PortsetId, Portset] = field(default_factory=dict)
    rules: dict[RuleId, str] = field(default_factory=dict)
    # content -> id, built once and then kept up to date by plan(), so a
    # plan costs no rebuilding of every ruleset's content
    _rs_index: dict[Ruleset, RulesetId] | None = field(default=None, compare=False, repr=False)
    _rs_contents: dict[RulesetId, Ruleset] | None = field(default=None, compare=False, repr=False)
    _ps_index: dict[Portset, PortsetId] | None = field(default=None, compare=False, repr=False)
    # ruleset id -> number of managed users on it; slots in use
    _refs: dict[RulesetId, int] | None = field(default=None, compare=False, repr=False)
    _slots: set[StatsSlot] | None = field(default=None, compare=False, repr=False)

    def ruleset_content(self, rid: RulesetId) -> Ruleset:
        return _ruleset_content(self.rulesets.get(rid, {}), self.portsets)

    def ruleset_index(self) -> dict[Ruleset, RulesetId]:
        if self._rs_index is None:
            self._rs_contents = {rid: self.ruleset_content(rid) for rid in self.rulesets}
            self._rs_index = {content: rid for rid, content in self._rs_contents.items()}
        return self._rs_index

    def ruleset_contents(self) -> dict[RulesetId, Ruleset]:
        """The index read the other way, so deleting a ruleset finds its
        content without rebuilding it from the entries."""
        self.ruleset_index()
        assert self._rs_contents is not None
        return self._rs_contents

    def portset_index(self) -> dict[Portset, PortsetId]:
        if self._ps_index is None:
            self._ps_index = {content: pid for pid, content in self.portsets.items()}
        return self._ps_index

    def ruleset_refs(self) -> dict[RulesetId, int]:
        if self._refs is None:
            refs: dict[RulesetId, int] = {}
            for user in self.users.values():
                if user.managed:
                    refs[user.ruleset] = refs.get(user.ruleset, 0) + 1
            self._refs = refs
        return self._refs

    def used_slots(self) -> set[StatsSlot]:
        if self._slots is None:
            self._slots = {user.slot for user in self.users.values() if user.slot}
        return self._slots

    def copy(self) -> KernelState:
        # Rulesets and portsets are never edited in place, so their
        # containers are shared, not copied.
        return KernelState(self.config, dict(self.users), dict(self.rulesets),
                           dict(self.portsets), dict(self.rules),
                           _rs_index=dict(self.ruleset_index()),
                           _rs_contents=dict(self.ruleset_contents()),
                           _ps_index=dict(self.portset_index()),
                           _refs=dict(self.ruleset_refs()), _slots=set(self.used_slots()))


@dataclass(frozen=True)
class Desired:
    """What the maps should hold: each login UID's ruleset content (or
    UNMANAGED), the baseline ruleset, rule names and the config values
    the daemon owns. ``dns_portsets`` are portsets kept in aus_svc even
    when no ruleset names them: the ones DNS-derived entries (aus_dns)
    point at, i.e. CompiledPolicy.dns_portsets() and any union of them
    that live entries use. Their ids: KernelState.portset_index()."""
    users: dict[LoginUid, Ruleset | str]
    baseline: Ruleset
    rules: dict[RuleId, str]
    mode: int
    events_per_sec: int
    events_burst: int
    policy_version: int
    dns_portsets: frozenset[Portset] = frozenset()


@dataclass
class Plan:
    """Map operations, in the order that keeps every step consistent."""
    svc_put: list[SvcPut] = field(default_factory=list)
    dst_put: list[DstPut] = field(default_factory=list)
    rules_put: list[RulePut] = field(default_factory=list)
    stats_reset: list[StatsSlot] = field(default_factory=list)
    users_put: list[UserPut] = field(default_factory=list)
    users_del: list[LoginUid] = field(default_factory=list)
    config_put: ConfigValues | None = None
    dst_del: list[DstDel] = field(default_factory=list)
    svc_del: list[SvcDel] = field(default_factory=list)
    rules_del: list[RuleId] = field(default_factory=list)

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


_GONE = object()


def plan(actual: KernelState, desired: Desired,
         changed: Iterable[LoginUid] | None = None) -> tuple[Plan, KernelState]:
    """The operations that turn ``actual`` into ``desired``, and the state
    after them. ``changed`` limits the comparison of users to these login
    UIDs (the others are known to be unchanged): a login costs O(1) users,
    not O(all users).

    Each step needs the ones before it: the config records the ids and
    user writes made so far, and garbage is what no user points at once
    every user is pointed."""
    planner = _Planner(actual)
    baseline = planner.ruleset_id(desired.baseline)
    planner.keep_portsets(desired.dns_portsets)
    newcomers = planner.point_users(desired, changed)
    planner.give_slots(newcomers, desired)
    planner.update_rule_names(desired.rules)
    planner.update_config(desired, baseline)
    planner.collect_garbage(baseline, full=changed is None)
    return planner.ops, planner.new


def _ruleset_content(entries: dict[DstPrefix, PortsetId],
                     portsets: dict[PortsetId, Portset]) -> Ruleset:
    return frozenset(DstEntry(addr, plen, portsets.get(pid, frozenset()))
                     for (addr, plen), pid in entries.items())


def _prefix_order(dst: DstEntry) -> tuple[int, bytes]:
    """A ruleset's entries are written shorter prefixes first: the kernel
    needs no order, but a plan is the same list every time."""
    return dst[1], dst[0]


class _Planner:
    """One plan being built: its operations so far (``ops``) and the state
    after them (``new``). Each public method is one step of :func:`plan`,
    called in the order the steps are listed there."""

    def __init__(self, actual: KernelState):
        self.actual = actual
        self.ops = Plan()
        self.new = actual.copy()
        # What exists, by content, so unchanged content keeps its id.
        self.portset_ids = self.new.portset_index()
        self.ruleset_ids = self.new.ruleset_index()
        self.ruleset_contents = self.new.ruleset_contents()
        # Ids are never reused: past the stored sequence and past any id the
        # maps hold (an apply interrupted before its config write leaves
        # entries under ids the sequence has not counted yet).
        cfg = actual.config
        self.ruleset_seq = max(cfg.ruleset_seq, max(actual.rulesets, default=0) + 1)
        self.portset_seq = max(cfg.portset_seq, max(actual.portsets, default=0) + 1)
        self.refs = self.new.ruleset_refs()
        self.used_slots = self.new.used_slots()
        self.kept: set[PortsetId] = set()       # portsets no ruleset needs to name
        self.dropped: set[RulesetId] = set()    # rulesets that lost a user
        self.freed: list[StatsSlot] = []        # slots of users gone or unmanaged

    # -- content: each distinct content once, under an id of its own --------

    def portset_id(self, content: Portset) -> PortsetId:
        pid = self.portset_ids.get(content)
        if pid is None:
            pid = self.portset_ids[content] = self.portset_seq
            self.portset_seq += 1
            self.new.portsets[pid] = content
            self.ops.svc_put.extend(SvcPut(pid, e) for e in sorted(content))
        return pid

    def keep_portsets(self, contents: Iterable[Portset]) -> None:
        """Write these portsets (if new) and keep them from garbage."""
        self.kept = {self.portset_id(content) for content in sorted(contents, key=sorted)}

    def ruleset_id(self, content: Ruleset) -> RulesetId:
        """The id of this content. New content is written whole under a new
        id (its portsets first) before any user can point at it."""
        rid = self.ruleset_ids.get(content)
        if rid is None:
            rid = self.ruleset_ids[content] = self.ruleset_seq
            self.ruleset_contents[rid] = content
            self.ruleset_seq += 1
            entries = {}
            # The planner's hottest loop (once per entry of every new
            # ruleset): a known portset is found without a method call.
            known, put, new = self.portset_ids, self.ops.dst_put.append, tuple.__new__
            for addr, plen, portset in sorted(content, key=_prefix_order):
                pid = known.get(portset)
                if pid is None:
                    pid = self.portset_id(portset)
                entries[(addr, plen)] = pid
                put(new(DstPut, (rid, addr, plen, pid)))     # DstPut(...), minus its __new__
            self.new.rulesets[rid] = entries
        return rid

    # -- users ---------------------------------------------------------------

    def _set_user(self, uid: LoginUid, old: UserEntry | None,
                  value: UserEntry | None) -> None:
        """Write a user's entry (delete it for None), and count the managed
        users on each ruleset, which tells garbage from content in use."""
        if value is None:
            self.ops.users_del.append(uid)
            del self.new.users[uid]
        else:
            self.ops.users_put.append(UserPut(uid, value))
            self.new.users[uid] = value
        if old is not None and old.managed:
            self.refs[old.ruleset] -= 1
            self.dropped.add(old.ruleset)
        if value is not None and value.managed:
            self.refs[value.ruleset] = self.refs.get(value.ruleset, 0) + 1

    def point_users(self, desired: Desired,
                    changed: Iterable[LoginUid] | None) -> list[LoginUid]:
        """Point each user whose entry changes at its ruleset, or mark it
        unmanaged, or delete it. Returns the newcomers, managed users with
        no stats slot of their own yet: give_slots() points them."""
        actual = self.actual
        check = (desired.users.keys() | actual.users.keys()) if changed is None else set(changed)
        newcomers = []
        for uid in check:
            content = desired.users.get(uid, _GONE)
            old = actual.users.get(uid)
            if content is _GONE:
                if old is not None:
                    self._set_user(uid, old, None)
                    if old.slot:
                        self.freed.append(old.slot)
                continue
            if content is UNMANAGED or content == UNMANAGED:
                value = UserEntry(C.RULESET_NONE, C.USER_UNMANAGED, 0)
                if old is not None and old.slot:
                    self.freed.append(old.slot)
            elif old is not None and old.slot and old.managed:
                # A user keeps its stats slot (and counters).
                rid = self.ruleset_id(content)
                if old.ruleset == rid and not old.flags:
                    continue        # unchanged
                value = UserEntry(rid, 0, old.slot)
            else:
                newcomers.append(uid)
                continue
            if old != value:
                self._set_user(uid, old, value)
        return newcomers

    def give_slots(self, newcomers: list[LoginUid], desired: Desired) -> None:
        """A newcomer gets the lowest free stats slot, zeroed before use.
        Slots freed in this plan stay taken until the next: their users
        still count into them until their entries are gone."""
        free_slot = 1
        for uid in sorted(newcomers):
            while free_slot in self.used_slots:
                free_slot += 1
            self.used_slots.add(free_slot)
            self.ops.stats_reset.append(free_slot)
            value = UserEntry(self.ruleset_id(desired.users[uid]), 0, free_slot)
            self._set_user(uid, self.actual.users.get(uid), value)
        self.used_slots.difference_update(self.freed)
        # Every user is written now: in login UID order.
        self.ops.users_put.sort()
        self.ops.users_del.sort()

    # -- rule names and config -----------------------------------------------

    def update_rule_names(self, rules: dict[RuleId, str]) -> None:
        if rules == self.actual.rules:
            return          # the usual case (a login): one comparison in C
        for rid, name in rules.items():
            if self.actual.rules.get(rid) != name:
                self.ops.rules_put.append(RulePut(rid, name))
                self.new.rules[rid] = name
        for rid in self.actual.rules:
            if rid not in rules:
                self.ops.rules_del.append(rid)
                del self.new.rules[rid]

    def update_config(self, desired: Desired, baseline: RulesetId) -> None:
        """Written after the users: bumping users_gen makes every socket
        drop its cached decision and look its user up again."""
        cfg = self.actual.config
        users_changed = (bool(self.ops.users_put or self.ops.users_del)
                         or baseline != cfg.baseline_ruleset)
        new_cfg = replace(cfg, mode=desired.mode, baseline_ruleset=baseline,
                          events_per_sec=desired.events_per_sec,
                          events_burst=desired.events_burst,
                          ruleset_seq=self.ruleset_seq, portset_seq=self.portset_seq,
                          policy_version=desired.policy_version,
                          users_gen=((cfg.users_gen + 1) & 0xFFFFFFFF if users_changed
                                     else cfg.users_gen))
        if new_cfg != cfg:
            self.ops.config_put = new_cfg
            self.new.config = new_cfg

    # -- garbage ---------------------------------------------------------------

    def collect_garbage(self, baseline: RulesetId, full: bool) -> None:
        """Delete the rulesets no user (and not the baseline) points at, then
        the portsets no remaining ruleset points at. A full plan looks at
        every ruleset and portset (leftovers of an interrupted apply
        included); an incremental one at those that lost a user."""
        if full:
            candidates = set(self.new.rulesets)
        else:
            candidates = self.dropped | {self.actual.config.baseline_ruleset}
        maybe_free = self._drop_rulesets(candidates, baseline)
        self._drop_portsets(set(self.new.portsets) if full else maybe_free)

    def _drop_rulesets(self, candidates: set[RulesetId], baseline: RulesetId) -> set[PortsetId]:
        """Delete the unreferenced candidates; returns the portsets they named."""
        new = self.new
        doomed = sorted(rid for rid in candidates
                        if rid in new.rulesets and rid != baseline and not self.refs.get(rid))
        named: set[PortsetId] = set()
        for rid in doomed:
            entries = new.rulesets.pop(rid)
            self.ops.dst_del.extend(DstDel(rid, addr, plen) for addr, plen in sorted(entries))
            named.update(entries.values())
            content = self.ruleset_contents.pop(rid, None)
            if content is not None and self.ruleset_ids.get(content) == rid:
                del self.ruleset_ids[content]
            self.refs.pop(rid, None)
        return named

    def _drop_portsets(self, candidates: set[PortsetId]) -> None:
        if not candidates:
            return
        new = self.new
        live = {pid for entries in new.rulesets.values() for pid in entries.values()}
        live |= self.kept
        for pid in sorted(candidates - live):
            content = new.portsets.pop(pid, None)
            if content is None:
                continue
            self.ops.svc_del.extend(SvcDel(pid, e) for e in sorted(content))
            if self.portset_ids.get(content) == pid:
                del self.portset_ids[content]


def lookup(state: KernelState, loginuid: LoginUid, addr, proto: int, port: int):
    """The decision the kernel's lookups give on this state, as
    (reason, rule id or None). Pure mirror of aus_judge() for tests."""
    from .compiler import lookup as ruleset_lookup

    if loginuid == C.LOGINUID_UNSET:
        return C.Reason.UNMANAGED, None
    user = state.users.get(loginuid)
    if user and not user.managed:
        return C.Reason.UNMANAGED, None
    rid = user.ruleset if user else state.config.baseline_ruleset
    rule = ruleset_lookup(state.ruleset_content(rid), addr, proto, port)
    if rule is not None:
        return C.Reason.RULE, rule
    return (C.Reason.NO_RULE if user else C.Reason.PENDING), None
