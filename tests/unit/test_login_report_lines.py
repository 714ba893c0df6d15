"""The login report's lines from plain data (the kernel test runs it in ausd)."""

from __future__ import annotations

from aus.agent import loginreport
from aus.agent.identity import UserInfo
from aus.agent.report import Identity

DECLARED = [("DEV", None), ("OPS", "S-1-5-21-1-2-3-1104")]
RULES = {1: "dns", 2: "dev-web", 3: "ops-admin"}


def ident(uid, name, groups, rules, *, sids=(), extra=(), stale=""):
    return Identity(UserInfo(uid, name, tuple(groups), "nss", 0.0, tuple(sids), stale=stale),
                    tuple(extra), frozenset(rules))


def test_managed_unmanaged_unknown_and_stale():
    identities = {
        1000: ident(1000, "alice", ["alice", "dev@corp.example"], [1, 2],
                    sids=["S-1-5-21-1-2-3-1104"]),
        1001: ident(1001, "bob", ["bob"], []),
        1002: ident(1002, None, [], []),
        1003: ident(1003, "carol", [], [3], extra=["OPS"], stale="SSSD unavailable"),
    }
    out = loginreport.lines({0: 12, 1000: 3, 1001: 1, 1002: 1, 1003: 1, 1004: 0}, [0],
                            identities, {0: "root"}, DECLARED, RULES, "visibility")
    assert out == [
        "login UIDs with processes now: 5 (mode visibility: nothing is blocked; "
        "what would be denied is reported)",
        "login UID 0 (root): not managed (unmanaged_login_uids): never filtered",
        "login UID 1000 (alice): managed, groups DEV,OPS, 2 rules (dns, dev-web)",
        "login UID 1001 (bob): managed, no policy group, baseline only",
        "login UID 1002 (unknown to NSS): managed, no policy group, baseline only",
        "login UID 1003 (carol): managed, groups OPS, 1 rule (ops-admin) "
        "(last known groups kept: SSSD unavailable)",
    ]


def test_many_rules_and_many_users_are_cut_short():
    many = {i: f"r{i}" for i in range(1, 8)}
    identities = {uid: ident(uid, f"u{uid}", ["DEV"], many) for uid in range(2000, 2100)}
    out = loginreport.lines({u: 1 for u in identities}, [0], identities, {}, DECLARED,
                            many, "enforce")
    assert out[0] == ("login UIDs with processes now: 100 (mode enforce: traffic no rule "
                      "allows is denied)")
    assert out[1] == "login UID 2000 (u2000): managed, groups DEV, 7 rules"
    assert len(out) == 1 + loginreport.MAX_LINES + 1
    assert out[-1] == "... and 50 more login UIDs (ausctl users lists the managed ones)"
