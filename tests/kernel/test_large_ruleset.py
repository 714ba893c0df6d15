"""A user whose group carries 10,000 rules logs in: `ausctl session open`
(what the PAM hook runs, with its default timeout) succeeds, and at once
the connection the last of those rules allows goes through in the kernel,
while a port no rule names stays refused. Real programs on a test cgroup,
a real user with a real login UID, traffic into a test namespace."""

import pytest

from tests.support import lab

pytestmark = pytest.mark.kernel

RULES = 10_000
PORT = 8050          # the last rule's; the peer also serves 443, which no rule gives it


@pytest.fixture(scope="module")
def heavy():
    with lab.users({"heavy": ["big"], "light": ["small"]}) as (users, groups):
        yield users, groups


def policy(big: str, small: str, peer) -> dict:
    rules = [{"name": f"bulk-{i}", "sources": [big],
              "destinations": [f"10.{(i >> 8) & 255}.{i & 255}.0/24"],
              "services": ["443/tcp", "8000-8100/udp"]} for i in range(RULES - 1)]
    rules.append({"name": "last", "sources": [big, small],
                  "destinations": [f"{peer.v4}/32"], "services": [f"{PORT}/tcp"]})
    return {"user_groups": [{"name": big}, {"name": small}], "rules": rules}


def test_10000_rules_in_the_kernel_when_session_open_returns(cg, peer, heavy):
    users, groups = heavy
    u, light = users["heavy"], users["light"]
    with lab.ausd(cg, policy(groups["big"], groups["small"], peer), max_rules=16384,
                  log_level="info") as d:
        d.start(timeout=180)
        # The light user (one rule) first: the big ruleset is not yet
        # known to anyone when the heavy user logs in.
        with lab.session(d, light.uid, light.uid, light.gid) as reply:
            assert reply["rules"] == ["last"]
        with lab.session(d, u.uid, u.uid, u.gid) as reply:   # asserts ausctl exited 0
            assert reply["managed"] is True and reply["login_uid"] == u.uid
            assert len(reply["rules"]) == RULES and "last" in reply["rules"]
            ok = lab.act(cg, "tcp", peer.v4, PORT, loginuid=u.uid, uid=u.uid, gid=u.gid)
            assert ok == {"ok": True, "errno": None}
            no = lab.act(cg, "tcp", peer.v4, 443, loginuid=u.uid, uid=u.uid, gid=u.gid)
            assert no == {"ok": False, "errno": "EPERM"}
            res = d.check(u.uid, peer.v4, "tcp", PORT)
            assert res["allowed"] and res["rule"] == "last"
            assert d.check(u.uid, "10.39.14.9", "tcp", 443)["rule"] == "bulk-9998"
        # The session-opened log line names a few rules and counts the rest.
        line = next(ln for ln in d.read_log().splitlines()
                    if f"session opened: login UID {u.uid}" in ln)
        assert f"and {RULES - 20} more" in line and len(line) < 2000
