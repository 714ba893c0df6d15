"""aus.agent.identity.judge and the Directory's staleness: a directory that
cannot answer keeps a user's last groups, a directory that answers replaces
them, shorter or not."""

from __future__ import annotations

from aus.agent.identity import (
    COMPLETE,
    PARTIAL,
    UNAVAILABLE,
    Answer,
    Directory,
    UserInfo,
    judge,
)
from aus.agent.report import groups_source

ALICE = UserInfo(1000, "alice", ("alice", "dev"), "nss", 100.0, ("S-1-5-21-9-1101",))


def test_complete_answer_replaces_even_when_shorter():
    info = judge(1000, ALICE, Answer("alice", ("alice",)), 200.0)
    assert info == UserInfo(1000, "alice", ("alice",), "nss", 200.0)
    assert not info.stale and not info.partial


def test_unavailable_keeps_the_last_groups_marked_stale():
    ans = Answer("alice", ("alice",), (), UNAVAILABLE, "SSSD initgroups UNAVAIL")
    info = judge(1000, ALICE, ans, 200.0)
    assert info.groups == ("alice", "dev") and info.sids == ALICE.sids
    assert info.stale == "SSSD initgroups UNAVAIL" and not info.partial
    assert (info.fetched_at, info.last_check) == (100.0, 200.0)
    assert groups_source(info, 230.4) == "nss,STALE(130s)"


def test_partial_answer_keeps_the_last_groups():
    ans = Answer("alice", ("alice",), (), PARTIAL, "group 42001 not resolvable (SSSD UNAVAIL)")
    info = judge(1000, ALICE, ans, 200.0)
    assert info.groups == ("alice", "dev")
    assert info.stale.startswith("group 42001") and not info.partial


def test_a_stale_user_recovers_with_the_next_complete_answer():
    stale = judge(1000, ALICE, Answer("alice", (), (), UNAVAILABLE, "down"), 200.0)
    info = judge(1000, stale, Answer("alice", ("alice", "ops")), 300.0)
    assert (info.groups, info.stale, info.fetched_at, info.last_check) == \
        (("alice", "ops"), "", 300.0, 300.0)
    assert groups_source(info, 301.0) == "nss"


def test_user_not_found_keeps_a_known_user_and_leaves_an_unknown_one_empty():
    info = judge(1000, ALICE, Answer(None), 200.0)
    assert info.groups == ALICE.groups and info.stale == "user not found"
    assert judge(1001, None, Answer(None), 200.0) == UserInfo(1001, None, (), "unknown", 200.0)
    down = Answer(None, (), (), UNAVAILABLE, "sssd is down")
    assert judge(1000, ALICE, down, 200.0).groups == ALICE.groups
    assert judge(1001, None, down, 200.0).source == "unknown"


def test_a_never_known_user_gets_the_partial_answer_marked():
    ans = Answer("bob", ("bob",), (), UNAVAILABLE, "SSSD initgroups UNAVAIL")
    info = judge(1002, None, ans, 200.0)
    assert (info.name, info.groups, info.partial) == ("bob", ("bob",), True)
    assert groups_source(info, 500.0) == "nss,PARTIAL"
    # an unknown entry (name None) is not a last known group list either
    assert judge(1002, UserInfo(1002, None, (), "unknown", 1.0), ans, 200.0).partial


def test_another_user_behind_the_same_uid_is_not_given_the_old_groups():
    ans = Answer("mallory", ("mallory",), (), UNAVAILABLE, "down")
    info = judge(1000, ALICE, ans, 200.0)
    assert (info.name, info.groups, info.partial) == ("mallory", ("mallory",), True)


def test_directory_keeps_groups_over_an_outage_and_applies_a_removal_after_it():
    now = [0.0]
    answers = {1000: Answer("alice", ("alice", "dev"))}
    d = Directory(ttl=5.0, lookup=lambda uid: answers[uid], clock=lambda: now[0])
    assert d.get(1000).groups == ("alice", "dev")
    answers[1000] = Answer("alice", ("alice",), (), UNAVAILABLE, "SSSD initgroups UNAVAIL")
    for t in range(5, 60, 5):          # an outage far longer than the ttl
        now[0] = float(t)
        assert d.due(10) == [1000]
        info = d.get(1000, refresh=True)
        assert info.groups == ("alice", "dev") and info.stale and info.fetched_at == 0.0
        assert d.due(10) == []          # asked again after the ttl, not every scan
    answers[1000] = Answer("alice", ("alice",))   # SSSD back: dev really removed
    now[0] = 60.0
    info = d.get(1000, refresh=True)
    assert (info.groups, info.stale, info.fetched_at) == (("alice",), "", 60.0)


def test_a_stale_user_does_not_hold_the_refresh_queue():
    now = [0.0]
    answers = {1: Answer("a", ("g",)), 2: Answer("b", ("g",))}
    d = Directory(ttl=5.0, lookup=lambda uid: answers[uid], clock=lambda: now[0])
    d.get(1)
    d.get(2)
    answers[1] = Answer("a", (), (), PARTIAL, "group 7 not resolvable")
    now[0] = 5.0
    assert d.due(1) == [1]
    d.get(1, refresh=True)
    assert d.due(1) == [2]             # 1 went to the back, though its groups are old
    assert COMPLETE == Answer("x").status
