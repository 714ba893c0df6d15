"""The per-user table of DNS-derived entries: expiry at TTL plus grace,
refresh, the union of services, the per-user cap and its overflow count,
and a policy change taking back what no longer matches."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aus.core.dnsanswer import Derived
from aus.core.dnstable import DnsTable, TableEntry, TableKey
from tests.support.dnsgrants import Grants, grant

S = 1_000_000_000
GITHUB = grant("github.com", 1, ("tcp", 443))
SSH = grant("*.github.com", 2, ("tcp", 22))


def addr(i: int) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + bytes([192, 0, 2, i])


def derived(i: int, ttl: int = 60, name: str = "github.com", g=GITHUB) -> Derived:
    return Derived(4, addr(i), ttl, name, frozenset({g.rule}), g.services)


def test_a_new_address_expires_at_ttl_plus_grace():
    t = DnsTable(max_per_user=10, grace_s=2.5)
    change = t.add(1000, [derived(1, ttl=60)], now_ns=100 * S)
    key = TableKey(1000, 4, addr(1))
    assert change.puts == {key: TableEntry(100 * S + 62_500_000_000, GITHUB.services,
                                           frozenset({1}), "github.com")}
    assert change.overflow == 0 and change.deletes == []
    assert t.name_for(1000, 4, addr(1)) == "github.com"
    assert t.name_for(1001, 4, addr(1)) is None         # per user
    assert t.expire(162 * S) == []
    assert t.expire(162_500_000_000) == [key]
    assert t.name_for(1000, 4, addr(1)) is None
    assert t.counts().entries == 0


def test_a_refresh_keeps_the_later_expiry_and_grows_the_services():
    t = DnsTable(10, 0)
    t.add(1000, [derived(1, ttl=60)], 0)
    # the same answer again, nothing changes: nothing to write
    assert t.add(1000, [derived(1, ttl=30)], 10 * S).puts == {}
    # a later expiry is written
    change = t.add(1000, [derived(1, ttl=60)], 10 * S)
    assert change.puts[TableKey(1000, 4, addr(1))].expires_ns == 70 * S
    # another name with other services on the same address: the union
    change = t.add(1000, [derived(1, ttl=5, name="ssh.github.com", g=SSH)], 20 * S)
    entry = change.puts[TableKey(1000, 4, addr(1))]
    assert entry == TableEntry(70 * S, GITHUB.services | SSH.services, frozenset({1, 2}),
                               "ssh.github.com")
    # the old expiry has no effect on the refreshed entry
    assert t.expire(60 * S) == []
    assert t.expire(70 * S) == [TableKey(1000, 4, addr(1))]


def test_an_expired_entry_answered_again_starts_afresh():
    t = DnsTable(10, 0)
    t.add(1000, [derived(1, ttl=10, name="ssh.github.com", g=SSH)], 0)
    change = t.add(1000, [derived(1, ttl=10)], 20 * S)       # not yet expire()d
    assert change.puts[TableKey(1000, 4, addr(1))] == TableEntry(
        30 * S, GITHUB.services, frozenset({1}), "github.com")


def test_the_per_user_cap_counts_overflow():
    t = DnsTable(max_per_user=2, grace_s=0)
    change = t.add(1000, [derived(1), derived(2), derived(3), derived(4)], 0)
    assert len(change.puts) == 2 and change.overflow == 2
    # another user has a cap of their own
    assert t.add(1001, [derived(3)], 0).overflow == 0
    # at the cap an address already held is still refreshed
    change = t.add(1000, [derived(1, ttl=100)], S)
    assert change.overflow == 0 and list(change.puts) == [TableKey(1000, 4, addr(1))]
    assert t.counts() == (3, 2, 2)
    assert t.entries_of(1000) == 2


def test_expired_entries_make_room_under_the_cap():
    t = DnsTable(max_per_user=2, grace_s=0)
    t.add(1000, [derived(1, ttl=10), derived(2, ttl=100)], 0)
    change = t.add(1000, [derived(3)], 50 * S)
    assert change.overflow == 0
    assert change.deletes == [TableKey(1000, 4, addr(1))]
    assert TableKey(1000, 4, addr(3)) in change.puts
    # the pruned entry is not expired a second time
    assert t.expire(60 * S) == []


def test_drop_user():
    t = DnsTable(10, 0)
    t.add(1000, [derived(1), derived(2)], 0)
    t.add(1001, [derived(1)], 0)
    assert sorted(t.drop_user(1000)) == [TableKey(1000, 4, addr(1)), TableKey(1000, 4, addr(2))]
    assert t.drop_user(1000) == []
    assert list(t.entries()) == [TableKey(1001, 4, addr(1))]
    # the heap still holds the dropped ones: expiry skips them
    assert t.expire(10**15) == [TableKey(1001, 4, addr(1))]


def test_regrant_after_a_policy_change():
    t = DnsTable(10, 0)
    t.add(1000, [derived(1), derived(2, name="api.github.com", g=SSH)], 0)
    t.add(1000, [derived(2)], 0)            # 2: allowed by both names
    # the exact rule is gone, the wildcard now allows 443 too
    wider = grant("*.github.com", 2, ("tcp", 22), ("tcp", 443))
    change = t.regrant(1000, Grants(wider))
    assert change.deletes == [TableKey(1000, 4, addr(1))]
    assert change.puts == {TableKey(1000, 4, addr(2)): TableEntry(
        60 * S, wider.services, frozenset({2}), "api.github.com")}
    assert t.name_for(1000, 4, addr(2)) == "api.github.com"
    # applying the same policy again changes nothing
    assert t.regrant(1000, Grants(wider)) == ({}, 0, [])
    assert t.regrant(1000, Grants()).deletes == [TableKey(1000, 4, addr(2))]
    assert t.counts() == (0, 0, 0)


ops = st.lists(st.tuples(st.sampled_from(["add", "expire", "drop", "regrant"]),
                         st.integers(1000, 1002),                 # login UID
                         st.lists(st.tuples(st.integers(1, 6), st.integers(0, 20)), max_size=4),
                         st.integers(0, 15)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_the_table_keeps_its_bounds(steps):
    """Whatever happens: no user above the cap, nothing expired survives
    expire(), and the changes returned replay to the table's own state."""
    t = DnsTable(max_per_user=3, grace_s=1)
    kernel: dict = {}
    now = 0
    for op, uid, items, dt in steps:
        now += dt * S
        if op == "add":
            change = t.add(uid, [derived(i, ttl) for i, ttl in items], now)
            for k in change.deletes:
                kernel.pop(k, None)
            kernel.update(change.puts)
        elif op == "expire":
            gone = t.expire(now)
            assert all(kernel[k].expires_ns <= now for k in gone)
            for k in gone:
                del kernel[k]
            assert all(e.expires_ns > now for e in t.entries().values())
        elif op == "drop":
            for k in t.drop_user(uid):
                del kernel[k]
        else:
            change = t.regrant(uid, Grants(GITHUB) if dt % 2 else Grants())
            for k in change.deletes:
                del kernel[k]
            kernel.update(change.puts)
        assert all(t.entries_of(u) <= 3 for u in (1000, 1001, 1002))
        assert kernel == t.entries()
        assert t.counts().entries == len(kernel)


def test_refreshes_do_not_grow_the_table():
    t = DnsTable(10, 0)
    for i in range(20_000):
        t.add(1000, [derived(1, ttl=60), derived(2, ttl=60)], i * S)
    assert len(t._heap) <= 4 * 2 + 1024 + 1
    assert t.expire(20_100 * S) == [TableKey(1000, 4, addr(1)), TableKey(1000, 4, addr(2))]
