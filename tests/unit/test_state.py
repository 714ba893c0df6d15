"""aus.core.state: the planner from actual to desired map state, its model of
the kernel lookups, and the order mapsync applies a plan in."""

from __future__ import annotations

import ipaddress
import random

import pytest

from aus.agent import mapsync
from aus.core import compiler, state
from aus.core import contract as C
from aus.core.compiler import flatten, service_entries
from aus.core.policy import parse_service
from aus.core.state import UNMANAGED, Desired, KernelState, Plan, UserEntry, plan

ip = ipaddress.ip_address
net = ipaddress.ip_network
TCP, UDP, ICMP = C.PROTO_TCP, C.PROTO_UDP, C.PROTO_ICMP


def rs(*grants):
    """rs(("10.0.0.0/8", rule, "80/tcp", ...), ...) -> compiled ruleset."""
    return flatten([(net(cidr), [e for s in svcs for e in service_entries(parse_service(s), rule)])
                    for cidr, rule, *svcs in grants])


BASE = rs(("127.0.0.0/8", 1, "any"), ("::1/128", 1, "any"))
A = rs(("10.0.0.0/8", 2, "80/tcp"))
B = rs(("10.0.0.0/8", 2, "80/tcp"), ("192.0.2.0/24", 2, "80/tcp"))
CC = rs(("10.0.0.0/8", 3, "22/tcp"), ("10.1.0.0/16", 4, "8000-8100/tcp", "icmp"))
RULES = {1: "baseline", 2: "web", 3: "ssh", 4: "alt"}


def desired(users, baseline=BASE, rules=None, mode=C.MODE_ENFORCE, eps=1000, burst=2000,
            version=1, dns=()) -> Desired:
    return Desired(users=dict(users), baseline=baseline,
                   rules=dict(RULES if rules is None else rules), mode=mode,
                   events_per_sec=eps, events_burst=burst, policy_version=version,
                   dns_portsets=frozenset(dns))


# ---------------------------------------------------------------------------
# Helpers: apply a plan op by op, checking that every step is consistent.

ORDER = ("svc_put", "dst_put", "rules_put", "stats_reset", "users_put", "users_del",
         "config_put", "dst_del", "svc_del", "rules_del")


def _ops(p: Plan):
    for name in ORDER:
        val = getattr(p, name)
        if name == "config_put":
            if val is not None:
                yield name, val
        else:
            for item in val:
                yield name, item


class Maps:
    """A dict model of the maps, fed one plan operation at a time."""

    def __init__(self, st: KernelState):
        self.config = st.config
        self.users = dict(st.users)
        self.dst = {(rid, a, pl): pid for rid, es in st.rulesets.items()
                    for (a, pl), pid in es.items()}
        self.svc = {(pid, e.proto, e.port, e.plen): e.rule
                    for pid, es in st.portsets.items() for e in es}
        self.rules = dict(st.rules)

    def referenced_rulesets(self):
        return ({u.ruleset for u in self.users.values() if u.managed}
                | {self.config.baseline_ruleset})

    def referenced_portsets(self):
        return set(self.dst.values())

    def content(self, rid):
        out = []
        for (r, a, pl), pid in self.dst.items():
            if r == rid:
                ps = frozenset(compiler.SvcEntry(proto, port, plen, rule)
                               for (p2, proto, port, plen), rule in self.svc.items()
                               if p2 == pid)
                out.append(compiler.DstEntry(a, pl, ps))
        return frozenset(out)

    def as_state(self) -> KernelState:
        st = KernelState(config=self.config, users=dict(self.users), rules=dict(self.rules))
        for (rid, a, pl), pid in self.dst.items():
            st.rulesets.setdefault(rid, {})[(a, pl)] = pid
        ps: dict[int, set] = {}
        for (pid, proto, port, plen), rule in self.svc.items():
            ps.setdefault(pid, set()).add(compiler.SvcEntry(proto, port, plen, rule))
        st.portsets = {pid: frozenset(s) for pid, s in ps.items()}
        return st

    def apply(self, p: Plan, want: Desired):
        """Apply in mapsync order; assert no op touches what a user (or the
        baseline) can see, and every pointer written targets complete content."""
        for name, item in _ops(p):
            if name == "svc_put":
                pid, e = item.portset, item.entry
                assert pid not in self.referenced_portsets(), f"svc_put into live portset {pid}"
                self.svc[(pid, e.proto, e.port, e.plen)] = e.rule
            elif name == "dst_put":
                rid = item.ruleset
                assert rid not in self.referenced_rulesets(), f"dst_put into live ruleset {rid}"
                self.dst[(rid, item.addr, item.plen)] = item.portset
            elif name == "rules_put":
                self.rules[item.rule] = item.name
            elif name == "config_put":
                assert self.content(item.baseline_ruleset) == want.baseline
                self.config = item
            elif name == "stats_reset":
                live = {u.slot for u in self.users.values() if u.slot}
                assert item not in live, f"stats slot {item} reset while a user counts in it"
            elif name == "users_put":
                uid, user = item
                rid, slot = user.ruleset, user.slot
                if not user.managed:
                    assert want.users[uid] == UNMANAGED and rid == C.RULESET_NONE and slot == 0
                else:
                    assert self.content(rid) == want.users[uid], f"user {uid} -> incomplete {rid}"
                    others = {v.slot for u, v in self.users.items() if u != uid}
                    assert slot >= 1 and slot not in others, f"user {uid}: slot {slot} shared"
                self.users[uid] = user
            elif name == "users_del":
                del self.users[item]
            elif name == "dst_del":
                rid = item.ruleset
                assert rid not in self.referenced_rulesets(), f"dst_del in live ruleset {rid}"
                del self.dst[(rid, item.addr, item.plen)]
            elif name == "svc_del":
                pid, e = item.portset, item.entry
                assert pid not in self.referenced_portsets(), f"svc_del in live portset {pid}"
                del self.svc[(pid, e.proto, e.port, e.plen)]
            elif name == "rules_del":
                del self.rules[item]


def pointed(p: Plan) -> list[tuple[int, int, int]]:
    """(login UID, ruleset, flags) of each user the plan writes."""
    return [(op.login_uid, op.entry.ruleset, op.entry.flags) for op in p.users_put]


def _nonempty(st: KernelState) -> KernelState:
    st = st.copy()
    st.rulesets = {k: v for k, v in st.rulesets.items() if v}
    st.portsets = {k: v for k, v in st.portsets.items() if v}
    return st


def step(actual: KernelState, want: Desired) -> tuple[Plan, KernelState]:
    """plan(), then the checks every plan must pass."""
    p, new = plan(actual, want)
    maps = Maps(actual)
    maps.apply(p, want)
    got, exp = maps.as_state(), _nonempty(new)
    assert got.users == exp.users
    assert got.rulesets == exp.rulesets
    assert got.portsets == exp.portsets
    assert got.rules == exp.rules
    assert got.config == new.config
    # the planner's new state describes the desired content
    assert new.ruleset_content(new.config.baseline_ruleset) == want.baseline
    for uid, content in want.users.items():
        user = new.users[uid]
        if content == UNMANAGED:
            assert (user.ruleset, user.flags) == (C.RULESET_NONE, C.USER_UNMANAGED)
        else:
            assert user.flags == 0 and new.ruleset_content(user.ruleset) == content
    assert set(new.users) == set(want.users)
    assert new.rules == want.rules
    cfg = new.config
    assert (cfg.mode, cfg.events_per_sec, cfg.events_burst, cfg.policy_version) == (
        want.mode, want.events_per_sec, want.events_burst, want.policy_version)
    # new content only under fresh ids; in-use rulesets are never written
    for op in p.dst_put:
        assert op.ruleset not in actual.rulesets
        assert op.ruleset >= actual.config.ruleset_seq
    for op in p.svc_put:
        assert op.portset not in actual.portsets
        assert op.portset >= actual.config.portset_seq
    assert all(rid < cfg.ruleset_seq for rid in new.rulesets)
    assert all(pid < cfg.portset_seq for pid in new.portsets)
    # nothing unreferenced is left behind
    live = {u.ruleset for u in new.users.values() if u.managed} | {cfg.baseline_ruleset}
    assert set(new.rulesets) == live
    kept = {new.portset_index()[content] for content in want.dns_portsets}
    assert set(new.portsets) == {pid for es in new.rulesets.values() for pid in es.values()} | kept
    # idempotent
    again, same = plan(new, want)
    assert not again, again.summary()
    assert same.users == new.users and same.rulesets == new.rulesets
    return p, new


# ---------------------------------------------------------------------------


def test_from_empty_state():
    want = desired({1000: A, 1001: CC, 1002: A})
    p, new = step(KernelState(), want)
    assert p.svc_put and p.dst_put and p.users_put
    assert not (p.users_del or p.dst_del or p.svc_del or p.rules_del)
    assert p.config_put is not None
    assert p.config_put == new.config
    assert p.config_put.baseline_ruleset == 1     # the baseline is written first
    assert p.config_put.ruleset_seq == 4           # baseline, A, CC
    # the puts come in dependency order: every portset a dst entry names is
    # put before (svc_put precedes dst_put), every ruleset a user names too
    put_portsets = {op.portset for op in p.svc_put}
    assert {op.portset for op in p.dst_put} <= put_portsets
    assert {op.entry.ruleset for op in p.users_put} <= {op.ruleset for op in p.dst_put}
    users = {op.login_uid: op.entry.ruleset for op in p.users_put}
    assert users[1000] == users[1002] != users[1001]
    assert sorted(users) == [1000, 1001, 1002]
    assert p.rules_put == sorted(RULES.items())
    assert p.summary()["config"] == 1 and p.summary()["users_put"] == 3
    # a second plan on the new state is empty
    assert not plan(new, want)[0]


def test_plan_operations_name_their_map_writes():
    p, new = plan(KernelState(), desired({1000: A}))
    a = new.users[1000].ruleset
    assert new.users[1000] == UserEntry(ruleset=a, flags=0, slot=1) and new.users[1000].managed
    assert p.users_put == [state.UserPut(login_uid=1000, entry=new.users[1000])]
    assert p.stats_reset == [1]
    ten = C.addr16(ip("10.0.0.0"))
    (put,) = [op for op in p.dst_put if op.ruleset == a]
    assert (put.addr, put.plen) == (ten, 96 + 8)
    web = state.SvcPut(portset=put.portset, entry=compiler.SvcEntry(TCP, 80, 64, 2))
    assert web in p.svc_put
    assert p.rules_put[:2] == [state.RulePut(rule=1, name="baseline"),
                               state.RulePut(rule=2, name="web")]
    gone, _ = plan(new, desired({}))
    assert gone.users_del == [1000]
    assert gone.dst_del == [state.DstDel(ruleset=a, addr=ten, plen=96 + 8)]
    assert gone.svc_del == [state.SvcDel(portset=web.portset, entry=web.entry)]


def test_mapsync_applies_in_plan_order():
    class FakeMap:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def update(self, k, v):
            self.log.append((self.name, "put"))

        def update_batch(self, keys, values, count):
            self.log.extend([(self.name, "put")] * count)

        def delete_batch(self, keys, count):
            self.log.extend([(self.name, "del")] * count)

        def delete(self, k):
            self.log.append((self.name, "del"))

    log: list = []
    maps = {n: FakeMap(n, log) for n in C.MAPS}
    p, new = plan(KernelState(), desired({1000: A, 1001: CC}))
    mapsync.apply(p, maps)
    # Each rule name written starts its counters from zero, just before.
    names = [n for n, _ in log]
    for i, n in enumerate(names):
        if n == C.MAP_RULES:
            assert names[i - 1] == C.MAP_RULE_STATS
    log[:] = [e for e in log if e[0] != C.MAP_RULE_STATS]
    seen = [n for i, (n, _) in enumerate(log) if i == 0 or log[i - 1][0] != n]
    # New users' stats slots are zeroed before the users point at them;
    # the config (users_gen) follows the users.
    assert seen == [C.MAP_SVC, C.MAP_DST, C.MAP_RULES, C.MAP_USER_STATS, C.MAP_USERS,
                    C.MAP_CONFIG]
    log.clear()
    p, _ = plan(new, desired({}, rules={1: "baseline"}))
    mapsync.apply(p, maps)
    seen = [n for i, (n, _) in enumerate(log) if i == 0 or log[i - 1][0] != n]
    assert seen == [C.MAP_USERS, C.MAP_CONFIG, C.MAP_DST, C.MAP_SVC, C.MAP_RULES]
    assert {op for n, op in log if n != C.MAP_CONFIG} == {"del"}


def test_identical_content_shares_rulesets_and_portsets():
    p, new = step(KernelState(), desired({1000: B, 1001: B, 1002: A}))
    r = {op.login_uid: op.entry.ruleset for op in p.users_put}
    assert r[1000] == r[1001]
    # B's two prefixes carry the same services: one portset for both, and A
    # (same services again) reuses it too
    b_pids = set(new.rulesets[r[1000]].values())
    a_pids = set(new.rulesets[r[1002]].values())
    assert len(b_pids) == 1 and b_pids == a_pids
    assert len(p.svc_put) == len(set(p.svc_put))
    # two portsets in all: the baseline's and the web one
    assert len({op.portset for op in p.svc_put}) == 2
    # a user whose content equals the baseline shares the baseline ruleset
    p2, new2 = step(new, desired({1000: B, 1001: B, 1002: A, 1003: BASE}))
    assert pointed(p2) == [(1003, new.config.baseline_ruleset, 0)]
    assert not p2.dst_put and not p2.svc_put


def test_user_change_gets_new_ruleset_and_gc_when_unreferenced():
    _, s0 = step(KernelState(), desired({1000: A, 1001: A}))
    rid_a = s0.users[1000].ruleset

    # 1000 moves to new content: new id; A stays (1001 uses it)
    p1, s1 = step(s0, desired({1000: CC, 1001: A}))
    rid_c = s1.users[1000].ruleset
    assert rid_c not in s0.rulesets and rid_c != rid_a
    assert {op.ruleset for op in p1.dst_put} == {rid_c}
    assert pointed(p1) == [(1000, rid_c, 0)]
    assert not p1.dst_del
    assert (s1.users[1001].ruleset, s1.users[1001].flags) == (rid_a, 0)
    assert s1.rulesets[rid_a] == s0.rulesets[rid_a]

    # 1001 moves to existing content: shared, nothing written but users
    p2, s2 = step(s1, desired({1000: CC, 1001: CC}))
    assert not p2.dst_put and not p2.svc_put
    assert pointed(p2) == [(1001, rid_c, 0)]
    # A is now unreferenced: all its dst entries go, and so does its
    # portset (nothing else holds tcp/80)
    assert sorted(p2.dst_del) == sorted((rid_a, a, pl) for (a, pl) in s1.rulesets[rid_a])
    assert rid_a not in s2.rulesets
    a_pid = next(iter(s1.rulesets[rid_a].values()))
    assert p2.svc_del == [(a_pid, e) for e in sorted(s1.portsets[a_pid])]

    # A again: a brand-new id, never the old one
    p3, s3 = step(s2, desired({1000: CC, 1001: A}))
    new_a = s3.users[1001].ruleset
    assert new_a != rid_a and new_a > rid_c
    assert s3.config.ruleset_seq > s2.config.ruleset_seq


def test_removing_users_collects_garbage_but_not_the_baseline():
    _, s0 = step(KernelState(), desired({1000: A, 1001: CC, 1002: BASE}))
    base = s0.config.baseline_ruleset
    assert (s0.users[1002].ruleset, s0.users[1002].flags) == (base, 0)
    rid_c = s0.users[1001].ruleset

    p1, s1 = step(s0, desired({1000: A, 1002: BASE}))
    assert p1.users_del == [1001]
    assert {op.ruleset for op in p1.dst_del} == {rid_c}
    assert rid_c not in s1.rulesets
    # only users_gen moves, so sockets drop their cached decisions
    assert p1.config_put is not None
    assert p1.config_put.users_gen == s0.config.users_gen + 1
    assert (p1.config_put.baseline_ruleset, p1.config_put.ruleset_seq) == \
        (s0.config.baseline_ruleset, s0.config.ruleset_seq)

    p2, s2 = step(s1, desired({}))
    assert p2.users_del == [1000, 1002]
    assert base in s2.rulesets and s2.config.baseline_ruleset == base
    assert all(op.ruleset != base for op in p2.dst_del)
    assert s2.rulesets == {base: s0.rulesets[base]}
    assert set(s2.portsets) == set(s0.rulesets[base].values())

    # a new baseline content: the old one goes once nothing points at it
    new_base = rs(("127.0.0.0/8", 1, "any"))
    p3, s3 = step(s2, desired({}, baseline=new_base))
    assert p3.config_put is not None and p3.config_put.baseline_ruleset not in (base, 0)
    assert {op.ruleset for op in p3.dst_del} == {base}
    # ... but it stays while a user still uses that content
    _, s4 = step(s3, desired({1000: BASE}, baseline=new_base))
    p5, s5 = step(s4, desired({1000: BASE}, baseline=BASE))
    assert s5.config.baseline_ruleset == s5.users[1000].ruleset
    assert not p5.dst_put


def test_unmanaged_users():
    p, s = step(KernelState(), desired({1000: UNMANAGED, 1001: A}))
    assert (1000, UserEntry(C.RULESET_NONE, C.USER_UNMANAGED, 0)) in p.users_put
    assert s.users[1000] == UserEntry(ruleset=0, flags=C.USER_UNMANAGED, slot=0)
    assert not s.users[1000].managed and s.users[1001].managed
    assert state.lookup(s, 1000, ip("203.0.113.1"), TCP, 1) == (C.Reason.UNMANAGED, None)
    rid_a = s.users[1001].ruleset
    p2, s2 = step(s, desired({1000: UNMANAGED, 1001: UNMANAGED}))
    assert pointed(p2) == [(1001, C.RULESET_NONE, C.USER_UNMANAGED)]
    assert {op.ruleset for op in p2.dst_del} == {rid_a}
    assert state.lookup(s2, 1001, ip("10.0.0.1"), TCP, 80) == (C.Reason.UNMANAGED, None)
    # and back to managed
    p3, s3 = step(s2, desired({1000: A, 1001: UNMANAGED}))
    assert p3.users_put[0].login_uid == 1000 and p3.users_put[0].entry.flags == 0
    assert state.lookup(s3, 1000, ip("10.0.0.1"), TCP, 80) == (C.Reason.RULE, 2)
    assert state.lookup(s3, 1000, ip("10.0.0.1"), TCP, 81) == (C.Reason.NO_RULE, None)


def test_state_lookup_reasons():
    user = rs(("127.0.0.0/8", 1, "any"), ("10.0.0.0/8", 2, "80/tcp"))
    _, s = step(KernelState(), desired({1000: user}))
    assert state.lookup(s, C.LOGINUID_UNSET, ip("10.0.0.1"), TCP, 80) == (C.Reason.UNMANAGED, None)
    assert state.lookup(s, 1000, ip("10.0.0.1"), TCP, 80) == (C.Reason.RULE, 2)
    assert state.lookup(s, 1000, ip("127.0.0.1"), UDP, 5) == (C.Reason.RULE, C.RULE_BASELINE)
    assert state.lookup(s, 1000, ip("192.0.2.1"), TCP, 80) == (C.Reason.NO_RULE, None)
    # not in aus_users yet: the baseline, and PENDING when it does not allow
    assert state.lookup(s, 4242, ip("127.0.0.1"), TCP, 80) == (C.Reason.RULE, C.RULE_BASELINE)
    assert state.lookup(s, 4242, ip("::1"), ICMP, 0) == (C.Reason.RULE, C.RULE_BASELINE)
    assert state.lookup(s, 4242, ip("10.0.0.1"), TCP, 80) == (C.Reason.PENDING, None)


def test_rule_names_and_config_changes():
    _, s0 = step(KernelState(), desired({}, rules={1: "baseline", 2: "a", 3: "b"}))
    assert s0.rules == {1: "baseline", 2: "a", 3: "b"}
    p1, s1 = step(s0, desired({}, rules={1: "baseline", 2: "a2", 4: "c"}))
    assert p1.rules_put == [(2, "a2"), (4, "c")]
    assert p1.rules_del == [3]
    assert not (p1.dst_put or p1.svc_put or p1.users_put or p1.config_put)
    p2, s2 = step(s1, desired({}, rules={1: "baseline", 2: "a2", 4: "c"},
                              mode=C.MODE_VISIBILITY, version=7))
    assert p2.config_put is not None
    assert (p2.config_put.mode, p2.config_put.policy_version) == (C.MODE_VISIBILITY, 7)
    assert p2.config_put.ruleset_seq == s1.config.ruleset_seq
    assert p2.summary() == {"svc_put": 0, "dst_put": 0, "users_put": 0, "users_del": 0,
                            "dst_del": 0, "svc_del": 0, "rules_put": 0, "rules_del": 0,
                            "stats_reset": 0, "config": 1}


# ---------------------------------------------------------------------------
# Random sequences of desired states


NETS = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32",
        "192.0.2.0/24", "::/0", "2001:db8::/32", "2001:db8:1::/48", "2001:db8:1::7/128"]
SERVICES = ["80/tcp", "443/tcp", "22/tcp", "8000-8100/tcp", "53/udp", "1-1024/udp",
            "tcp", "udp", "icmp", "any"]
PROBES = [ip(a) for a in ("10.1.2.3", "10.1.2.4", "10.1.3.1", "10.2.0.0", "11.0.0.0",
                          "192.0.2.255", "192.0.3.0", "127.0.0.1", "2001:db8:1::7",
                          "2001:db8:1::8", "2001:db8:2::", "2001:db9::", "::1",
                          "::ffff:10.1.2.3")]
SVC_PROBES = [(TCP, 80), (TCP, 443), (TCP, 22), (TCP, 8000), (TCP, 8100), (TCP, 8101),
              (UDP, 53), (UDP, 1024), (UDP, 1025), (ICMP, 0), (C.PROTO_ICMPV6, 0), (47, 0)]


def _random_content(rnd: random.Random):
    grants = []
    for _ in range(rnd.randint(0, 5)):
        grants.append((rnd.choice(NETS), rnd.randint(2, 6),
                       *rnd.sample(SERVICES, rnd.randint(1, 3))))
    return rs(*grants)


@pytest.mark.parametrize("seed", range(6))
def test_random_sequence_of_desired_states(seed):
    rnd = random.Random(77 + seed)
    pool = [_random_content(rnd) for _ in range(7)] + [BASE, frozenset()]
    baselines = [BASE, rs(("127.0.0.0/8", 1, "any")), frozenset()]
    uids = list(range(1000, 1010))
    actual = KernelState()
    rulesets_ever: dict[int, frozenset] = {}
    portsets_ever: dict[int, frozenset] = {}
    version = 0
    for _ in range(30):
        version += rnd.choice([0, 1])
        users = {}
        for uid in rnd.sample(uids, rnd.randint(0, len(uids))):
            users[uid] = UNMANAGED if rnd.random() < 0.1 else rnd.choice(pool)
        names = {1: "baseline"}
        names.update({rid: rnd.choice(["a", "b", "c"]) + str(rid)
                      for rid in rnd.sample(range(2, 7), rnd.randint(0, 5))})
        # DNS portsets: some of their own, some a ruleset's too
        dns_pool = [frozenset(service_entries(parse_service(svc), rule))
                    for rule, svc in ((5, "443/tcp"), (6, "22/tcp"), (2, "80/tcp"), (1, "any"))]
        want = desired(users, baseline=rnd.choice(baselines), rules=names,
                       mode=rnd.choice([C.MODE_ENFORCE, C.MODE_VISIBILITY]),
                       version=version, dns=rnd.sample(dns_pool, rnd.randint(0, 4)))
        _, new = step(actual, want)

        # sequence numbers only grow; an id once used never gets other content
        assert new.config.ruleset_seq >= actual.config.ruleset_seq
        assert new.config.portset_seq >= actual.config.portset_seq
        for rid in new.rulesets:
            content = new.ruleset_content(rid)
            assert rulesets_ever.setdefault(rid, content) == content
        for pid, content in new.portsets.items():
            assert portsets_ever.setdefault(pid, content) == content

        # the model's lookups agree with the compiled content
        for uid in uids + [C.LOGINUID_UNSET]:
            content = want.users.get(uid)
            for addr in PROBES:
                for proto, port in SVC_PROBES:
                    got = state.lookup(new, uid, addr, proto, port)
                    if uid == C.LOGINUID_UNSET or content == UNMANAGED:
                        assert got == (C.Reason.UNMANAGED, None)
                        continue
                    rule = compiler.lookup(want.baseline if content is None else content,
                                           addr, proto, port)
                    if rule is not None:
                        assert got == (C.Reason.RULE, rule)
                    elif content is None:
                        assert got == (C.Reason.PENDING, None)
                    else:
                        assert got == (C.Reason.NO_RULE, None)
        actual = new
    assert len(rulesets_ever) > 5


# ---------------------------------------------------------------------------
# Adoption after an interrupted apply


def test_plan_after_interrupted_apply_does_not_reuse_ids():
    _, s0 = step(KernelState(), desired({1000: A}))
    # The daemon starts to give 1001 the content CC: svc and dst puts land,
    # then it dies before config_put / users_put.
    p1, _ = plan(s0, desired({1000: A, 1001: CC}))
    maps = Maps(s0)
    for op in p1.svc_put:
        e = op.entry
        maps.svc[(op.portset, e.proto, e.port, e.plen)] = e.rule
    for op in p1.dst_put:
        maps.dst[(op.ruleset, op.addr, op.plen)] = op.portset
    adopted = maps.as_state()      # what mapsync.read_state() gives on restart
    assert adopted.config == s0.config
    assert set(adopted.rulesets) - set(s0.rulesets)   # the partial ruleset

    # Meanwhile 1001's groups changed: 1001 now gets D only.
    D = rs(("192.0.2.0/24", 5, "443/tcp"))
    want = desired({1000: A, 1001: D})
    p2, _ = plan(adopted, want)
    # new content must go under ids the maps do not hold yet
    assert not {op.ruleset for op in p2.dst_put} & set(adopted.rulesets)
    assert not {op.portset for op in p2.svc_put} & set(adopted.portsets)
    # and the kernel then decides as the policy says
    maps.apply(p2, want)
    kernel = maps.as_state()
    assert state.lookup(kernel, 1001, ip("192.0.2.1"), TCP, 22) == (C.Reason.NO_RULE, None)
    assert state.lookup(kernel, 1001, ip("10.2.0.0"), TCP, 443) == (C.Reason.NO_RULE, None)


def test_stats_slots_are_kept_and_reused_only_after_release():
    p0, s0 = step(KernelState(), desired({1000: A, 1001: CC}))
    slots = {uid: v.slot for uid, v in s0.users.items()}
    assert sorted(slots.values()) == [1, 2] and sorted(p0.stats_reset) == [1, 2]
    # a new ruleset for 1000 keeps its slot (and its counters)
    p1, s1 = step(s0, desired({1000: CC, 1001: CC}))
    assert s1.users[1000].slot == slots[1000] and not p1.stats_reset
    # 1001 leaves while 1002 arrives: 1002 must not take 1001's slot yet
    p2, s2 = step(s1, desired({1000: CC, 1002: A}))
    assert s2.users[1002].slot not in slots.values()
    assert p2.stats_reset == [s2.users[1002].slot]
    # once released, the slot is free for the next newcomer (zeroed first)
    p3, s3 = step(s2, desired({1000: CC, 1002: A, 1003: A}))
    assert s3.users[1003].slot == slots[1001] and p3.stats_reset == [slots[1001]]


@pytest.mark.parametrize("seed", range(8))
def test_incremental_plan_matches_full_plan(seed):
    """plan(..., changed=uids) for the users that changed gives the maps
    the same users, contents and slots as a full plan, and its operations
    pass the same step-by-step checks."""
    rnd = random.Random(seed)
    contents = [A, B, CC, BASE, rs(("198.51.100.0/24", 3, "53/udp")), UNMANAGED]
    want = {uid: rnd.choice(contents) for uid in range(1000, 1012)}
    # kept for DNS entries: one of its own, one that A's prefix uses too
    dns = [frozenset(service_entries(parse_service("443/tcp"), 5)),
           frozenset(service_entries(parse_service("80/tcp"), 2))]
    _, inc = step(KernelState(), desired(want, dns=dns))
    full = inc
    for _ in range(40):
        changed = set(rnd.sample(range(1000, 1016), rnd.randint(1, 4)))
        for uid in changed:
            if rnd.random() < 0.3:
                want.pop(uid, None)
            else:
                want[uid] = rnd.choice(contents)
        d = desired(want, dns=dns)
        p_inc, inc_new = plan(inc, d, changed=changed)
        maps = Maps(inc)
        maps.apply(p_inc, d)
        assert maps.as_state().users == _nonempty(inc_new).users
        _, full = step(full, d)
        # same content per user, same slots
        for uid in want:
            assert inc_new.ruleset_content(inc_new.users[uid].ruleset) == \
                full.ruleset_content(full.users[uid].ruleset)
        assert {u: (v.flags, v.slot) for u, v in inc_new.users.items()} == \
            {u: (v.flags, v.slot) for u, v in full.users.items()}
        # nothing referenced is ever collected; nothing unreferenced lingers
        live = {v.ruleset for v in inc_new.users.values() if v.managed} \
            | {inc_new.config.baseline_ruleset}
        assert set(inc_new.rulesets) == live
        assert {inc_new.portsets.get(inc_new.portset_index().get(c)) for c in dns} == set(dns)
        assert plan(inc_new, d)[0].users_put == []
        inc = inc_new


def ps(rule, *svcs):
    """A portset: these services of one rule."""
    return frozenset(e for s in svcs for e in service_entries(parse_service(s), rule))


def test_dns_portsets_are_written_and_kept_without_a_ruleset():
    web, ssh = ps(5, "443/tcp"), ps(6, "22/tcp", "icmp")
    p0, s0 = step(KernelState(), desired({1000: A}, dns=[web, ssh]))
    ids = s0.portset_index()
    assert {op.portset for op in p0.svc_put} >= {ids[web], ids[ssh]}
    assert sorted(op.entry for op in p0.svc_put if op.portset == ids[ssh]) == sorted(ssh)
    # users come and go: a login's incremental plan keeps them, and so does a full one
    p1, s1 = plan(s0, desired({1000: A, 1001: CC}, dns=[web, ssh]), changed=[1001])
    assert ids[web] in s1.portsets and ids[ssh] in s1.portsets and not p1.svc_del
    _, s2 = step(s1, desired({}, dns=[web, ssh]))
    assert s2.portsets[ids[web]] == web and s2.portsets[ids[ssh]] == ssh
    # a policy without that name: its portset goes, the other stays under its id
    p3, s3 = step(s2, desired({}, dns=[ssh]))
    assert {op.portset for op in p3.svc_del} == {ids[web]}
    assert s3.portset_index()[ssh] == ids[ssh]


def test_a_dns_portset_a_ruleset_also_uses_is_one_portset_and_outlives_it():
    tcp80 = ps(2, "80/tcp")             # A's one portset
    _, s0 = step(KernelState(), desired({1000: A}, dns=[tcp80]))
    pid = s0.portset_index()[tcp80]
    assert set(s0.rulesets[s0.users[1000].ruleset].values()) == {pid}
    # the only user of A logs out (an incremental plan): A goes, the portset stays
    p1, s1 = plan(s0, desired({}, dns=[tcp80]), changed=[1000])
    assert p1.dst_del and not p1.svc_del
    assert s1.portsets[pid] == tcp80
    # without the DNS grant the next full plan collects it
    p2, s2 = step(s1, desired({}))
    assert {op.portset for op in p2.svc_del} == {pid} and pid not in s2.portsets
