"""`ausctl explain` against the real ausd and kernel: for a logged-in user,
for a user not logged in (who then logs in) and for an unmanaged login
UID, explain gives the verdict and the rule that `ausctl check` reads from
the kernel's maps, and that a real connection into the lab's namespace
gets. And `ausctl reload` of a refused policy exits 1 with the file and
line while the policy in force keeps enforcing."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel


def explain(d: lab.Ausd, *args: str) -> dict:
    p = d.ctl("explain", *args, "--json", check=False)
    assert p.returncode in (0, 3), p.stderr
    res = json.loads(p.stdout)
    assert (p.returncode == 0) == res["allowed"]
    return res


def connect(cg, user: lab.User, to: str, port: int) -> bool:
    got = lab.act(cg, "tcp", to, port, loginuid=user.uid, uid=user.uid, gid=user.gid)
    assert got["ok"] or got["errno"] == "EPERM", got
    return got["ok"]


def agree(d: lab.Ausd, cg, user: lab.User, to: str, port: int) -> dict:
    """explain --user, check and a real connection: one verdict, one rule."""
    ex = explain(d, "--user", user.name, "--to", to, "--proto", "tcp", "--port", str(port))
    ck = d.check(user.uid, to, "tcp", port)
    seen = connect(cg, user, to, port)
    assert ex["allowed"] == ck["allowed"] == seen, (ex, ck, seen)
    assert ex["verdict"] == ck["verdict"]
    assert (ex["rule"], ex["rule_id"]) == (ck["rule"], ck["rule_id"]), (ex, ck)
    return ex


def test_a_logged_in_user_allowed_and_denied(daemon, peer, cg, people):
    users, groups = people
    alice = users["alice"]
    with lab.session(daemon, alice.uid):
        for to in (peer.v4, peer.v6):
            ok = agree(daemon, cg, alice, to, 80)
            assert ok["allowed"] and ok["rule"] == "dev-web" and ok["rule_index"] == 0
            assert ok["via"] == [{"policy_group": groups["dev"].upper(),
                                  "group": groups["dev"], "from": "directory"}]
            assert ok["subject"]["logged_in"] is True
            assert ok["subject"]["standing"] == "managed, rules dev-web"
            no = agree(daemon, cg, alice, to, 443)
            assert not no["allowed"] and no["verdict"] == "deny" and no["reason"] == "no_rule"
        human = daemon.ctl("explain", "--user", alice.name, "--to", peer.v4, "--proto", "tcp",
                           "--port", "80").stdout
        assert human.startswith(f"ALLOWED: user {alice.name} (login UID {alice.uid}) -> "
                                f"{peer.v4} tcp/80\n  by rule dev-web (rules[0], id ")
        assert f"from group {groups['dev'].upper()} (via directory group {groups['dev']})" in human


def test_a_user_not_logged_in_is_explained_as_at_login(daemon, peer, cg, people):
    users, groups = people
    bob = users["bob"]
    assert bob.uid not in [u["login_uid"] for u in daemon.ctl_json("users")["users"]]
    before = {port: explain(daemon, "--user", bob.name, "--to", peer.v4, "--proto", "tcp",
                            "--port", str(port)) for port in (22, 80)}
    assert before[22]["allowed"] and before[22]["rule"] == "ops-ssh"
    assert before[22]["subject"]["logged_in"] is False
    assert not before[80]["allowed"]
    with lab.session(daemon, bob.uid):
        for port in (22, 80):
            now = agree(daemon, cg, bob, peer.v4, port)
            assert (now["allowed"], now["rule"], now["rule_id"]) == \
                (before[port]["allowed"], before[port]["rule"], before[port]["rule_id"])


def test_groups_a_policy_file_and_an_unmanaged_login_uid(daemon, peer, cg, people):
    users, groups = people
    dave = users["dave"]
    res = explain(daemon, "--groups", f"{groups['ops']},nobody-here", "--to", peer.v4,
                  "--proto", "tcp", "--port", "22")
    assert res["rule"] == "ops-ssh" and res["subject"]["rules"] == ["ops-ssh"]
    # the same file, offline: the same verdicts and rule names
    for port in (22, 80, 443):
        live = explain(daemon, "--user", dave.name, "--to", peer.v6, "--proto", "tcp",
                       "--port", str(port))
        offline = explain(daemon, "--user", dave.name, "--to", peer.v6, "--proto", "tcp",
                          "--port", str(port), "--policy", str(daemon.policy_path))
        assert (live["allowed"], live["rule"]) == (offline["allowed"], offline["rule"])
        assert offline["policy"] == {"source": str(daemon.policy_path), "version": None}
    # login UID 0 is unmanaged (the default): not filtered, as the kernel says
    root = explain(daemon, "--user", "root", "--to", peer.v4, "--proto", "tcp", "--port", "443")
    assert root["allowed"] and root["reason"] == "unmanaged"
    assert root["subject"]["standing"].startswith("not managed: login UID 0")
    ck = daemon.check(0, peer.v4, "tcp", 443)
    assert ck["allowed"] and ck["reason"] == "unmanaged"
    assert lab.act(cg, "tcp", peer.v4, 443, loginuid=0)["ok"]


def test_only_root_may_explain_against_the_live_policy(daemon, peer, people):
    carol = people[0]["carol"]
    p = lab.spawn([*daemon.ausctl_cmd, "--config", str(daemon.config_path), "explain",
                   "--user", carol.name, "--to", peer.v4, "--proto", "tcp", "--port", "80"],
                  uid=carol.uid, gid=carol.gid, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "explain: only root may see what another user's rules allow" in err
    assert "--policy FILE" in err


def test_a_refused_reload_exits_1_with_file_and_line_and_the_old_policy_stays(
        daemon, peer, cg, people):
    users, groups = people
    alice = users["alice"]
    version = daemon.ctl_json("status")["policy"]["version"]
    good = lab_policy(peer, groups)
    bad = dict(good, rules=[dict(good["rules"][0], services=["web", "80/tpc"]),
                            good["rules"][1]])
    try:
        daemon.write_policy(bad)
        text = daemon.policy_path.read_text()
        line = text.splitlines().index("  - 80/tpc") + 1
        p = daemon.ctl("reload", check=False)
        assert p.returncode == 1
        assert p.stderr.splitlines() == [
            f"ausctl reload: {daemon.policy_path}: policy refused:",
            f"  line {line}: rules[0].services[1]: '80/tpc': unknown protocol 'tpc'; "
            "ports go with tcp or udp"]
        # policy check finds the same, offline
        c = daemon.ctl("policy", "check", str(daemon.policy_path), "--json", check=False)
        assert c.returncode == 1
        assert [(e["line"], e["path"]) for e in json.loads(c.stdout)["errors"]] == \
            [(line, "rules[0].services[1]")]
        # the policy in force still enforces, and explain still reads it
        status = daemon.ctl_json("status")["policy"]
        assert status["version"] == version and "80/tpc" in status["error"]
        with lab.session(daemon, alice.uid):
            assert agree(daemon, cg, alice, peer.v4, 80)["rule"] == "dev-web"
            assert not agree(daemon, cg, alice, peer.v4, 443)["allowed"]
    finally:
        daemon.write_policy(yaml.safe_dump(good, sort_keys=False))
        p = daemon.ctl("reload", "--json")
    assert json.loads(p.stdout)["version"] >= version
    assert daemon.ctl_json("status")["policy"]["error"] is None


def test_a_policy_with_dns_names_loads_and_explain_and_check_take_a_name(
        daemon, peer, cg, people):
    """ausd compiles names next to CIDRs (the CIDR rules enforce as
    before); explain and check answer for a name from the policy in force."""
    users, groups = people
    alice, bob = users["alice"], users["bob"]
    good = lab_policy(peer, groups)
    named = dict(good, ip_lists=dict(good["ip_lists"], github=[
        "dns:github.com", "dns:*.githubusercontent.com"]))
    named["rules"] = [*good["rules"], {
        "name": "dev-github", "sources": [groups["dev"].upper()],
        "destinations": ["github", "dns:pypi.org"], "services": ["443/tcp"]}]
    try:
        daemon.write_policy(named)
        daemon.ctl("reload")
        assert daemon.ctl_json("status")["policy"]["error"] is None
        with lab.session(daemon, alice.uid):
            # the addresses of the lab still go by the CIDR rules
            assert agree(daemon, cg, alice, peer.v4, 80)["rule"] == "dev-web"
            assert not agree(daemon, cg, alice, peer.v4, 443)["allowed"]
            ex = explain(daemon, "--user", alice.name, "--to", "Raw.GitHubUserContent.com",
                         "--proto", "tcp", "--port", "443")
            assert (ex["allowed"], ex["reason"], ex["rule"], ex["to"]) == \
                (True, "dns", "dev-github", "raw.githubusercontent.com")
            assert [g["pattern"] for g in ex["dns"]["grants"]] == ["dns:*.githubusercontent.com"]
            assert ex["subject"]["logged_in"] is True
            ck = daemon.check(alice.uid, "pypi.org", "tcp", 443)
            assert (ck["allowed"], ck["reason"], ck["rule"], ck["rule_id"]) == \
                (True, "dns", "dev-github", ex["rule_id"])
            assert ck["dns"]["grants"][0]["pattern"] == "dns:pypi.org"
            human = daemon.ctl("check", "--login-uid", str(alice.uid), "--to", "github.com",
                               "--proto", "tcp", "--port", "22", check=False)
            assert human.returncode == 3
            assert human.stdout.splitlines()[0] == \
                f"DENY: login UID {alice.uid} -> github.com tcp/22 (no_rule)"
            assert "names it as dns:github.com: 443/tcp" in human.stdout
        # a user outside the rule's groups: no rule names it
        no = explain(daemon, "--user", bob.name, "--to", "github.com", "--proto", "tcp",
                     "--port", "443")
        assert (no["allowed"], no["dns"]["grants"]) == (False, [])
    finally:
        daemon.write_policy(yaml.safe_dump(good, sort_keys=False))
        daemon.ctl("reload", "--json")
    assert daemon.ctl_json("status")["policy"]["error"] is None


def test_visibility_mode_denied_is_reported_not_blocked(peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.cgroup() as cg, lab.ausd(cg, lab_policy(peer, groups), mode="visibility") as d:
        d.start()
        with lab.session(d, alice.uid):
            ex = explain(d, "--user", alice.name, "--to", peer.v4, "--proto", "tcp",
                         "--port", "443")
            ck = d.check(alice.uid, peer.v4, "tcp", 443)
            assert (ex["allowed"], ex["verdict"]) == (ck["allowed"], ck["verdict"]) == \
                (False, "audit")
            assert connect(cg, alice, peer.v4, 443)   # passes, only reported
            human = d.ctl("explain", "--user", alice.name, "--to", peer.v4, "--proto", "tcp",
                          "--port", "443", check=False)
            assert human.returncode == 3
            assert human.stdout.startswith("DENIED (visibility mode: reported, not blocked)")
