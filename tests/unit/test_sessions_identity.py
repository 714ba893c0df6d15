"""aus.agent.sessions (active login UIDs) and aus.agent.identity (cached NSS groups),
with injected clocks and lookups."""

from __future__ import annotations

import os

import pytest

from aus.agent.identity import Directory, UserInfo
from aus.agent.sessions import Sessions, all_pids, read_loginuid, scan_loginuids
from aus.core import contract as C


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


# ---------------------------------------------------------------------------
# Sessions


def test_session_grace_expires_on_scan():
    clock = Clock()
    s = Sessions(grace=10.0, clock=clock)
    s.open(1000)
    assert s.active(set()) == {1000}
    clock.advance(9.9)
    s.update_scan({})
    assert s.active(set()) == {1000}          # still in grace, no process yet
    clock.advance(0.1)
    s.update_scan({})
    assert s.active(set()) == set()           # grace over, no process
    assert 1000 not in s.opened_at


def test_session_reopen_restarts_grace():
    clock = Clock()
    s = Sessions(grace=10.0, clock=clock)
    s.open(1000)
    clock.advance(8)
    s.open(1000)
    clock.advance(8)
    s.update_scan({})
    assert s.active(set()) == {1000}
    clock.advance(2)
    s.update_scan({})
    assert s.active(set()) == set()


def test_session_close_ends_grace_at_once():
    clock = Clock()
    s = Sessions(grace=10.0, clock=clock)
    s.open(1000)
    s.open(1001)
    s.close(1000)
    assert s.active(set()) == {1001}
    s.close(4242)                             # unknown: no error
    assert s.active(set()) == {1001}


def test_processes_keep_entry_after_close_and_grace():
    clock = Clock()
    s = Sessions(grace=10.0, clock=clock)
    s.open(1000)
    s.update_scan({1000: 3})
    s.close(1000)
    assert s.active(set()) == {1000}          # processes outlive the session
    clock.advance(60)
    s.update_scan({1000: 1})
    assert s.active(set()) == {1000}
    s.update_scan({1000: 0})
    assert s.active(set()) == set()
    s.update_scan({1002: 2})                  # found by scan only (began while down)
    assert s.active(set()) == {1002}
    s.update_scan({})
    assert s.active(set()) == set()


def test_update_scan_copies_counts():
    s = Sessions(clock=Clock())
    counts = {1000: 1}
    s.update_scan(counts)
    counts[1001] = 1
    assert s.active(set()) == {1000}


def test_unmanaged_and_unset_excluded():
    s = Sessions(grace=10.0, clock=Clock())
    s.open(0)
    s.open(C.LOGINUID_UNSET)
    s.update_scan({0: 5, 1000: 1, 4294967295: 7, 1001: 2})
    assert s.active({0}) == {1000, 1001}
    assert s.active({0, 1001}) == {1000}
    assert s.active(set()) == {0, 1000, 1001}
    assert 4294967295 not in s.active(set())


# ---------------------------------------------------------------------------
# scan_loginuids


def _free_pids(n: int) -> list[int]:
    out, pid = [], 4_000_000
    while len(out) < n:
        if not os.path.exists(f"/proc/{pid}"):
            out.append(pid)
        pid += 7
    return out


def test_scan_of_missing_pids_is_empty():
    pids = _free_pids(5)
    assert scan_loginuids(pids) == {}
    assert scan_loginuids([]) == {}
    assert read_loginuid(pids[0]) is None


def test_scan_of_own_pid():
    with open("/proc/self/loginuid", "rb") as f:
        mine = int(f.read())
    expect = {} if mine == C.LOGINUID_UNSET else {mine: 1}
    assert scan_loginuids([os.getpid()]) == expect
    assert scan_loginuids([os.getpid(), os.getpid()]) == (
        {} if mine == C.LOGINUID_UNSET else {mine: 2})
    assert read_loginuid(os.getpid()) == mine


def test_all_pids_lists_running_processes():
    pids = all_pids()
    assert os.getpid() in pids and os.getppid() in pids and 1 in pids
    assert len(pids) == len(set(pids))


def test_scan_of_all_processes_counts_only_set_uids():
    counts = scan_loginuids()
    assert C.LOGINUID_UNSET not in counts
    assert all(isinstance(u, int) and n > 0 for u, n in counts.items())


# ---------------------------------------------------------------------------
# Directory


class FakeNSS:
    def __init__(self):
        self.answers: dict[int, object] = {}
        self.calls: list[int] = []

    def __call__(self, uid: int):
        self.calls.append(uid)
        a = self.answers.get(uid, (None, ()))
        if isinstance(a, BaseException):
            raise a
        return a


@pytest.fixture
def nss():
    return FakeNSS()


def test_directory_caches_for_ttl(nss):
    clock = Clock()
    nss.answers[1000] = ("alice", ("dev", "users"))
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    info = d.get(1000)
    assert info == UserInfo(1000, "alice", ("dev", "users"), "nss", 1000.0)
    nss.answers[1000] = ("alice", ("ops",))
    clock.advance(29.9)
    assert d.get(1000).groups == ("dev", "users")
    assert nss.calls == [1000]
    assert not d.expired(1000)
    clock.advance(0.1)
    assert d.expired(1000)
    info = d.get(1000)
    assert info.groups == ("ops",) and info.fetched_at == 1030.0
    assert nss.calls == [1000, 1000]
    assert not d.expired(1000)


def test_directory_refresh_bypasses_cache(nss):
    clock = Clock()
    nss.answers[1000] = ("alice", ("dev",))
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    d.get(1000)
    nss.answers[1000] = ("alice", ("dev", "ops"))
    clock.advance(1)
    assert d.get(1000, refresh=True).groups == ("dev", "ops")
    assert nss.calls == [1000, 1000]


def test_directory_keeps_stale_groups_on_oserror(nss):
    clock = Clock()
    nss.answers[1000] = ("alice", ("dev",))
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    d.get(1000)
    nss.answers[1000] = OSError("sssd unreachable")
    clock.advance(31)
    info = d.get(1000)
    assert info.name == "alice" and info.groups == ("dev",)
    assert (info.source, info.stale) == ("nss", "sssd unreachable")
    assert info.fetched_at == 1000.0 and info.last_check == 1031.0
    assert not d.expired(1000)                # retried after the ttl, not every scan
    clock.advance(30)
    assert d.expired(1000)
    assert d.get(1000).groups == ("dev",)     # still stale, still kept
    assert len(nss.calls) == 3
    # the directory comes back
    nss.answers[1000] = ("alice", ("ops",))
    clock.advance(30)
    info = d.get(1000)
    assert (info.groups, info.source, info.fetched_at, info.stale) == (("ops",), "nss", 1091.0, "")


def test_directory_keeps_stale_groups_when_user_not_found(nss):
    clock = Clock()
    nss.answers[1000] = ("alice", ("dev",))
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    d.get(1000)
    nss.answers[1000] = (None, ())
    info = d.get(1000, refresh=True)
    assert info.name == "alice" and info.groups == ("dev",)
    assert (info.source, info.stale) == ("nss", "user not found")
    assert info.fetched_at == 1000.0


def test_directory_unknown_user_has_no_groups(nss):
    clock = Clock()
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    info = d.get(2000)
    assert info == UserInfo(2000, None, (), "unknown", 1000.0)
    # an error for a never-known user: still unknown, no groups
    nss.answers[2001] = OSError("boom")
    info = d.get(2001)
    assert (info.name, info.groups, info.source) == (None, (), "unknown")
    # an unknown user that later appears is picked up after the ttl
    nss.answers[2000] = ("bob", ("qa",))
    assert d.get(2000).groups == ()
    clock.advance(30)
    info = d.get(2000)
    assert (info.name, info.groups, info.source) == ("bob", ("qa",), "nss")


def test_directory_forget(nss):
    clock = Clock()
    nss.answers[1000] = ("alice", ("dev",))
    d = Directory(ttl=30.0, lookup=nss, clock=clock)
    d.get(1000)
    d.forget(1000)
    d.forget(1234)                            # unknown: no error
    assert d.expired(1000)
    nss.answers[1000] = OSError("down")
    # forgotten: no last known groups to fall back on
    assert d.get(1000).groups == ()


def test_directory_due_lists_the_oldest_expired_first():
    now = [1000.0]
    d = Directory(ttl=10, lookup=lambda uid: (f"u{uid}", ("g",)), clock=lambda: now[0])
    for uid in (1, 2, 3):
        d.get(uid)
        now[0] += 1
    assert d.due(10) == []
    now[0] = 1011.5          # 1 and 2 are older than 10 s, 3 is not
    assert d.due(10) == [1, 2]
    assert d.due(1) == [1]
    d.get(1, refresh=True)   # refreshed: to the back of the line
    assert d.due(10) == [2]


def test_directory_keeps_group_sids_and_their_staleness():
    answers = {1: ("alice", ("dev",), ("S-1-5-21-1-2-3-1104",))}
    now = [0.0]

    def lookup(uid):
        if uid not in answers:
            raise OSError("sssd is down")
        return answers[uid]

    d = Directory(ttl=5, lookup=lookup, clock=lambda: now[0])
    assert d.get(1).sids == ("S-1-5-21-1-2-3-1104",)
    del answers[1]
    now[0] = 10
    stale = d.get(1)
    assert stale.sids == ("S-1-5-21-1-2-3-1104",) and stale.stale == "sssd is down"
