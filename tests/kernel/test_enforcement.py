"""Enforcement on the real kernel: the real programs on a test cgroup, real
processes with real login UIDs, real traffic into a network namespace.

Each case asserts what the process saw, what the kernel counted, and that
`ausctl check` gives the same verdict from the same maps.
"""

import json
import os
import select
import subprocess
import time

import pytest

from aus.core.contract import LOGINUID_UNSET
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def alice(daemon, people):
    u = people[0]["alice"]
    with lab.session(daemon, u.uid) as s:
        yield u, s


@pytest.fixture(scope="module")
def bob(daemon, people):
    u = people[0]["bob"]
    with lab.session(daemon, u.uid) as s:
        yield u, s


def denied_count(d, uid):
    return d.counters()["users"].get(uid, {}).get("denied_packets", 0)


def assert_agrees(d, loginuid, to, proto, port, seen_ok):
    res = d.check(loginuid, to, proto, port)
    assert res["allowed"] == seen_ok, (res, seen_ok)
    return res


def test_session_open_reports_groups_and_rules(alice):
    user, reply = alice
    assert reply["login_uid"] == user.uid
    assert reply["managed"] is True
    assert reply["rules"] == ["dev-web"]
    assert set(reply["groups"]) >= set(user.groups)


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_tcp_allowed_and_denied_by_port(daemon, peer, cg, alice, fam):
    user, _ = alice
    addr = peer.v4 if fam == "v4" else peer.v6
    before = daemon.counters()
    ok = lab.act(cg, "tcp", addr, 80, loginuid=user.uid, uid=user.uid, gid=user.gid)
    assert ok == {"ok": True, "errno": None}
    res = assert_agrees(daemon, user.uid, addr, "tcp", 80, True)
    assert res["rule"] == "dev-web"

    no = lab.act(cg, "tcp", addr, 443, loginuid=user.uid, uid=user.uid, gid=user.gid)
    assert no == {"ok": False, "errno": "EPERM"}
    assert_agrees(daemon, user.uid, addr, "tcp", 443, False)

    after = daemon.counters()
    rid = res["rule_id"]
    assert after["rules"][rid]["allowed_packets"] > before["rules"].get(rid, {}).get("allowed_packets", 0)
    assert after["users"][user.uid]["denied_packets"] == \
        before["users"].get(user.uid, {}).get("denied_packets", 0) + 1


def test_port_range_edges(daemon, peer, cg, alice):
    user, _ = alice
    for port, want in [(7999, False), (8000, True), (8050, True), (8100, True), (8101, False)]:
        got = lab.act(cg, "tcp", peer.v4, port, loginuid=user.uid, uid=user.uid, gid=user.gid)
        assert got["ok"] is want, (port, got)
        if not want:
            assert got["errno"] == "EPERM"
        assert_agrees(daemon, user.uid, peer.v4, "tcp", port, want)


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_udp_sendto(daemon, peer, cg, alice, fam):
    user, _ = alice
    addr = peer.v4 if fam == "v4" else peer.v6
    assert lab.act(cg, "udp", addr, 53, loginuid=user.uid, uid=user.uid, gid=user.gid)["ok"]
    assert_agrees(daemon, user.uid, addr, "udp", 53, True)
    before = denied_count(daemon, user.uid)
    got = lab.act(cg, "udp", addr, 5353, loginuid=user.uid, uid=user.uid, gid=user.gid)
    assert got == {"ok": False, "errno": "EPERM"}
    assert_agrees(daemon, user.uid, addr, "udp", 5353, False)
    assert denied_count(daemon, user.uid) == before + 1


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_ping_follows_icmp_rule(daemon, peer, cg, alice, bob, fam):
    addr = peer.v4 if fam == "v4" else peer.v6
    a, _ = alice
    b, _ = bob
    assert lab.act(cg, "ping", addr, loginuid=a.uid, uid=a.uid, gid=a.gid)["ok"]
    assert_agrees(daemon, a.uid, addr, "icmp", 0, True)
    before = denied_count(daemon, b.uid)
    assert not lab.act(cg, "ping", addr, loginuid=b.uid, uid=b.uid, gid=b.gid)["ok"]
    assert_agrees(daemon, b.uid, addr, "icmp", 0, False)
    assert denied_count(daemon, b.uid) > before


def test_two_users_different_verdicts_same_destination(daemon, peer, cg, alice, bob):
    a, _ = alice
    b, _ = bob
    assert lab.act(cg, "tcp", peer.v4, 22, loginuid=b.uid, uid=b.uid, gid=b.gid)["ok"]
    assert lab.act(cg, "tcp", peer.v4, 22, loginuid=a.uid, uid=a.uid, gid=a.gid)["errno"] == "EPERM"
    assert lab.act(cg, "tcp", peer.v4, 80, loginuid=b.uid, uid=b.uid, gid=b.gid)["errno"] == "EPERM"
    assert_agrees(daemon, b.uid, peer.v4, "tcp", 22, True)
    assert_agrees(daemon, a.uid, peer.v4, "tcp", 22, False)


def test_sudo_keeps_the_login_uid_policy(daemon, peer, cg, alice):
    """uid 0 with alice's login UID (what sudo leaves) is held to alice."""
    user, _ = alice
    assert lab.act(cg, "tcp", peer.v4, 80, loginuid=user.uid)["ok"]
    got = lab.act(cg, "tcp", peer.v4, 22, loginuid=user.uid)
    assert got == {"ok": False, "errno": "EPERM"}
    assert_agrees(daemon, user.uid, peer.v4, "tcp", 22, False)


def test_unset_and_unmanaged_login_uids_are_not_filtered(daemon, peer, cg, people):
    carol = people[0]["carol"]
    # A service (login UID unset) running as carol's uid: not filtered.
    assert lab.act(cg, "tcp", peer.v4, 443, loginuid=None, uid=carol.uid, gid=carol.gid)["ok"]
    assert_agrees(daemon, LOGINUID_UNSET, peer.v4, "tcp", 443, True)
    # Login UID 0 is unmanaged by default, even for another uid.
    assert lab.act(cg, "tcp", peer.v4, 443, loginuid=0, uid=carol.uid, gid=carol.gid)["ok"]
    res = assert_agrees(daemon, 0, peer.v4, "tcp", 443, True)
    assert res["reason"] == "unmanaged"


def test_user_without_matching_groups_gets_only_the_baseline(daemon, peer, cg, people):
    carol = people[0]["carol"]
    with lab.session(daemon, carol.uid) as reply:
        assert reply["rules"] == []
        got = lab.act(cg, "tcp", peer.v4, 80, loginuid=carol.uid, uid=carol.uid, gid=carol.gid)
        assert got["errno"] == "EPERM"
        assert_agrees(daemon, carol.uid, peer.v4, "tcp", 80, False)
        # The baseline (loopback) stays open: the daemon's socket is unix,
        # so check with a loopback UDP echo of our own.
        res = daemon.check(carol.uid, "127.0.0.1", "tcp", 80)
        assert res["allowed"] and res["rule"] == "baseline"


def test_login_uid_not_yet_known_fails_closed(daemon, peer, cg):
    """No session, no process: a managed login UID gets the baseline only."""
    stranger = 3999999
    got = lab.act(cg, "tcp", peer.v4, 80, loginuid=stranger)
    assert got == {"ok": False, "errno": "EPERM"}
    # The /proc scan may have seen the process by now (then it is a user
    # with no groups); either way nothing but the baseline is open.
    res = assert_agrees(daemon, stranger, peer.v4, "tcp", 80, False)
    assert res["reason"] in ("pending", "no_rule")
    res = daemon.check(stranger + 1, peer.v4, "tcp", 80)
    assert res["allowed"] is False and res["reason"] == "pending"
    assert daemon.check(stranger + 1, "127.0.0.1", "tcp", 80)["rule"] == "baseline"


def test_member_of_two_groups_gets_both(daemon, peer, cg, people):
    dave = people[0]["dave"]
    with lab.session(daemon, dave.uid) as reply:
        assert sorted(reply["rules"]) == ["dev-web", "ops-ssh"]
        for port in (22, 80, 8050):
            assert lab.act(cg, "tcp", peer.v4, port, loginuid=dave.uid, uid=dave.uid, gid=dave.gid)["ok"]
            assert_agrees(daemon, dave.uid, peer.v4, "tcp", port, True)


def test_flow_events_report_denials_and_new_flows(daemon, peer, cg, alice):
    user, _ = alice
    lab.act(cg, "tcp", peer.v4, 443, loginuid=user.uid, uid=user.uid, gid=user.gid)
    lab.act(cg, "tcp", peer.v6, 80, loginuid=user.uid, uid=user.uid, gid=user.gid)

    def find():
        flows = [json.loads(l) for l in daemon.ctl("flows", "--json", "--limit", "500").stdout.splitlines()]
        deny = [f for f in flows if f["login_uid"] == user.uid and f["dst"] == peer.v4
                and f["dport"] == 443 and f["verdict"] == "deny"]
        allow = [f for f in flows if f["login_uid"] == user.uid and f["dst"] == peer.v6
                 and f["dport"] == 80 and f["verdict"] == "allow"]
        return (deny, allow) if deny and allow else None

    deny, allow = lab.wait_until(find, what="flow events")
    assert deny[-1]["uid"] == user.uid and deny[-1]["comm"].startswith("python")
    assert deny[-1]["hook"] == "connect4" and deny[-1]["reason"] == "no_rule"
    assert deny[-1]["proto"] == "tcp" and deny[-1]["rule"] is None
    assert allow[-1]["rule"] == "dev-web" and allow[-1]["hook"] == "connect6"


def test_users_and_rules_commands(daemon, alice):
    user, _ = alice
    users = daemon.ctl_json("users")["users"]
    me = [u for u in users if u["login_uid"] == user.uid]
    assert me and me[0]["user"] == user.name and me[0]["rules"] == ["dev-web"]
    assert me[0]["counters"]["allowed_packets"] > 0
    rules = daemon.ctl_json("rules", "--login-uid", str(user.uid))["rules"]
    assert [r["name"] for r in rules] == ["baseline", "dev-web"]
    status = daemon.ctl_json("status")
    assert status["daemon"]["running"] and status["mode"] == "enforce"
    assert all(p["attached"] for p in status["programs"])


def test_bad_policy_is_refused_and_old_stays(daemon, peer, cg, alice, people):
    user, _ = alice
    good = daemon.policy_path.read_text()
    try:
        daemon.write_policy(good.replace("dev-web", "dev web"))
        p = daemon.ctl("reload", check=False)
        assert p.returncode == 1
        assert "policy.yaml" in p.stderr and "line" in p.stderr and "dev web" in p.stderr
        assert lab.act(cg, "tcp", peer.v4, 80, loginuid=user.uid, uid=user.uid, gid=user.gid)["ok"]
        assert daemon.ctl_json("status")["policy"]["error"]
    finally:
        daemon.write_policy(good)
        daemon.ctl("reload")
    assert daemon.ctl_json("status")["policy"]["error"] is None


def test_reload_withdraws_permission_from_an_open_connection(daemon, peer, cg, people):
    users, groups = people
    u = users["alice"]
    with lab.session(daemon, u.uid):
        holder = lab.spawn([lab.PYTHON, str(lab.CLIENT), "hold", peer.v4, "80"],
                           cg=cg, loginuid=u.uid, uid=u.uid, gid=u.gid,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            def say(line):
                holder.stdin.write(line + "\n")
                holder.stdin.flush()
                return json.loads(holder.stdout.readline())

            assert json.loads(holder.stdout.readline())["ok"]
            assert say("before")["ok"]
            daemon.write_policy(lab_policy(peer, groups, dev_services=["8000-8100/tcp"]))
            assert daemon.ctl_json("reload")["version"] >= 2
            assert daemon.check(u.uid, peer.v4, "tcp", 80)["allowed"] is False
            before = denied_count(daemon, u.uid)
            got = say("after")
            assert got["ok"] is False and got["errno"] in ("TimeoutError", "EPERM")
            assert denied_count(daemon, u.uid) > before
            assert lab.act(cg, "tcp", peer.v4, 80, loginuid=u.uid, uid=u.uid, gid=u.gid)["errno"] == "EPERM"
            assert lab.act(cg, "tcp", peer.v4, 8050, loginuid=u.uid, uid=u.uid, gid=u.gid)["ok"]
        finally:
            holder.kill()
            holder.wait()
            daemon.write_policy(lab_policy(peer, groups))
            daemon.ctl("reload")
    assert daemon.check(u.uid, peer.v4, "tcp", 80)["allowed"]


def test_entry_goes_when_no_process_is_left(daemon, people):
    carol = people[0]["carol"]
    with lab.session(daemon, carol.uid):
        assert carol.uid in [u["login_uid"] for u in daemon.ctl_json("users")["users"]]
        p = lab.spawn([lab.PYTHON, "-m", "aus.cli.ausctl", "--config", str(daemon.config_path),
                       "session", "close"], loginuid=carol.uid)
        assert p.wait(timeout=30) == 0
        # The session's holder process is still there: the entry stays.
        time.sleep(0.5)
        assert carol.uid in [u["login_uid"] for u in daemon.ctl_json("users")["users"]]
    lab.wait_until(lambda: carol.uid not in [u["login_uid"] for u in daemon.ctl_json("users")["users"]],
                   what="the entry to go")
    maps = daemon.ctl_json("maps")
    assert carol.uid not in [u["login_uid"] for u in maps["users"]]


def test_only_root_may_change_ausd(daemon, people):
    carol = people[0]["carol"]
    p = lab.spawn([lab.PYTHON, "-m", "aus.cli.ausctl", "--config", str(daemon.config_path), "reload"],
                  uid=carol.uid, gid=carol.gid, stderr=subprocess.PIPE, text=True)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 1 and "only root" in err
    p = lab.spawn([lab.PYTHON, "-m", "aus.cli.ausctl", "--config", str(daemon.config_path), "status", "--json"],
                  uid=carol.uid, gid=carol.gid, stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and json.loads(out)["daemon"]["running"]


def test_flows_follow_streams_new_events(daemon, peer, cg, alice):
    user, _ = alice
    follower = subprocess.Popen([lab.PYTHON, "-m", "aus.cli.ausctl", "--config", str(daemon.config_path),
                                 "flows", "--follow", "--json", "--limit", "0"],
                                stdout=subprocess.PIPE)
    try:
        # The follower subscribes once its interpreter is up: connect again
        # each second until one of the refused calls reaches it. Events of
        # earlier tests still in the ring may stream first.
        deadline = time.monotonic() + 20
        streamed, pending = [], b""
        while not any(f["dport"] == 8101 for f in streamed):
            assert time.monotonic() < deadline, \
                f"no flow event to port 8101 streamed within 20 s: {streamed}"
            lab.act(cg, "tcp", peer.v4, 8101, loginuid=user.uid, uid=user.uid, gid=user.gid)
            wait = 1.0
            while select.select([follower.stdout], [], [], wait)[0]:
                chunk = os.read(follower.stdout.fileno(), 65536)   # unbuffered: select sees all
                assert chunk, "ausctl flows --follow ended"
                *lines, pending = (pending + chunk).split(b"\n")
                streamed += [json.loads(line) for line in lines]
                wait = 0.05
        flow = next(f for f in streamed if f["dport"] == 8101)
        assert flow["login_uid"] == user.uid
        assert flow["verdict"] == "deny" and flow["hook"] == "connect4"
    finally:
        follower.kill()
        follower.wait()
