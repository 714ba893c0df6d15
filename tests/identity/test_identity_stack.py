"""A directory user's login through a real identity stack: OpenLDAP slapd,
SSSD, NSS (`sss`), PAM (pam_loginuid + pam_exec of the aus hook) driven by
pamtester, the real ausd and real traffic. Two directories: rfc2307
(memberUid) and rfc2307bis (member DNs, nested groups, AD-style objectSids).

The whole stack lives in a private mount namespace for its whole life, so
it runs as one script, tests/identity/scenario.py, under
`unshare -m --propagation private`; it prints one JSON object with what each
case saw, and the tests here assert on it. Each test shows the scenario's
stderr (its progress and the ausd, sssd and hook logs) when it fails.

Needs root and the packages of scripts/identity-packages.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import netns

pytestmark = pytest.mark.kernel

HERE = Path(__file__).resolve().parent
TIMEOUT = 300
TOOLS = ["unshare", "mount", "getent", "id", "slapd", "slapadd", "slappasswd",
         "ldapsearch", "ldapmodify", "sssd", "sss_cache", "pamtester"]
ALICE, BOB = 41001, 41002
CAROL, DAVE = 43001, 43002          # the rfc2307bis directory (SSSD domain `nest`)
DOMAIN_SID = "S-1-5-21-3623811015-3361044348-30300820"
SIDS = {"inner": f"{DOMAIN_SID}-1101", "outer": f"{DOMAIN_SID}-1102",
        "dbadm": f"{DOMAIN_SID}-1103", "support": f"{DOMAIN_SID}-1104"}
EPERM = {"ok": False, "errno": "EPERM"}
OK = {"ok": True, "errno": None}


@dataclass
class Run:
    rc: int
    data: dict
    stderr: str
    seconds: float
    host_before: dict
    host_after: dict


def host_config_digest() -> dict:
    """Hashes of the host's /etc/nsswitch.conf and every file (and link) of
    /etc/pam.d: the scenario must not change them."""
    out = {"/etc/nsswitch.conf": hashlib.sha256(Path("/etc/nsswitch.conf").read_bytes()).hexdigest()}
    for root, dirs, files in os.walk("/etc/pam.d"):
        for name in sorted(files + dirs):
            p = Path(root) / name
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def run() -> Run:
    missing = [t for t in TOOLS if not shutil.which(t)]
    assert not missing, f"missing tools: {missing} (run scripts/identity-packages.sh)"
    work = tempfile.mkdtemp(prefix="aus-identity-")
    before = host_config_digest()
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, str(HERE / "scenario.py"), work]
    env = dict(os.environ, AUS_OUTER_MNT_NS=os.readlink("/proc/self/ns/mnt"))
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            p.terminate()   # the scenario unwinds and cleans up on SIGTERM
            try:
                out, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            err = f"(scenario timed out after {TIMEOUT}s)\n{err}"
        seconds = time.monotonic() - t
        try:
            data = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        except json.JSONDecodeError:
            data = {}
            err = f"(unparsable stdout: {out[-2000:]!r})\n{err}"
        yield Run(p.returncode, data, err, seconds, before, host_config_digest())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def case(run: Run, name: str) -> dict:
    """A case's observations; the scenario's stderr goes to this test's
    captured stderr, which pytest shows when the test fails."""
    print(f"----- scenario stderr -----\n{run.stderr}", file=sys.stderr)
    assert run.rc == 0, f"scenario exited {run.rc}"
    assert "setup_error" not in run.data, run.data.get("setup_error")
    assert "terminated" not in run.data, run.data["terminated"]
    obs = run.data["cases"].get(name)
    assert obs is not None, f"case {name} did not run"
    assert "error" not in obs, obs["error"]
    print(f"----- observations of {name} -----\n{json.dumps(obs, indent=1, sort_keys=True)}",
          file=sys.stderr)
    return obs


def test_stack_is_built_in_a_private_mount_namespace(run):
    print(f"----- scenario stderr -----\n{run.stderr}", file=sys.stderr)
    assert run.rc == 0 and "setup_error" not in run.data, run.data.get("setup_error")
    setup = run.data["setup"]
    assert sorted(setup["mounts"]) == sorted(["/etc/nsswitch.conf", "/etc/sssd", "/etc/pam.d",
                                              "/var/lib/sss", "/var/log/sssd", "/run"])
    assert setup["getent"]["alice"].startswith(f"alice:*:{ALICE}:")
    assert "(dev)" in setup["id"]["alice"] and "(ops)" in setup["id"]["bob"]
    assert setup["getent"]["carol"].startswith(f"carol:*:{CAROL}:")
    # rfc2307bis: carol is in inner only, and inner in outer
    assert "(inner)" in setup["id"]["carol"] and "(outer)" in setup["id"]["carol"]
    assert "(outer)" not in setup["id"]["dave"]
    # SSSD reports the objectSids of the rfc2307bis groups, none for rfc2307
    assert setup["sids_by_name"] == SIDS
    print(f"scenario {run.data['total_s']}s, whole run {run.seconds:.1f}s")


def test_login_through_pam_puts_the_users_rules_in_the_kernel(run):
    obs = case(run, "login")
    bad = obs["wrong_password"]
    assert bad["rc"] != 0 and "Authentication failure" in bad["stderr"], bad
    assert "opened a session" not in bad["stdout"], bad
    assert bad["hook_log"] == [] and not bad["in_maps_after"], bad
    pam = obs["pam"]
    assert pam["rc"] == 0, pam
    assert "successfully authenticated" in pam["stdout"] and "opened a session" in pam["stdout"]
    assert any(f"session open: login UID {ALICE} (alice)" in l for l in pam["hook_log"]), pam["hook_log"]
    entry = obs["users_entry"]
    assert entry is not None and obs["listed_after_s"] <= 2.0, obs
    assert entry["login_uid"] == ALICE and entry["user"] == "alice"
    assert "dev" in entry["groups"] and entry["groups_source"] == "nss"
    assert entry["rules"] == ["dev-web"]
    assert obs["tcp80_v4"] == OK
    assert obs["tcp80_v6"] == OK
    assert obs["tcp22_v4"] == EPERM
    # uid 0 with her login UID (what sudo leaves) is held to her rules
    assert obs["sudo_tcp22_v4"] == EPERM
    assert obs["sudo_tcp80_v4"] == OK


def test_two_users_get_their_own_rules_at_the_same_time(run):
    obs = case(run, "two_users")
    assert obs["pam"]["rc"] == 0, obs["pam"]
    entry = obs["users_entry"]
    assert entry and entry["user"] == "bob" and "ops" in entry["groups"] and entry["rules"] == ["ops-ssh"]
    assert obs["both_listed"] == [ALICE, BOB]
    t = obs["traffic"]
    assert t["alice_80"] == OK and t["alice_22"] == EPERM
    assert t["bob_22"] == OK and t["bob_80"] == EPERM


def test_nested_group_membership_gives_the_outer_groups_rules(run):
    obs = case(run, "nested_group")
    for who in ("carol", "dave"):
        assert obs[who]["pam"]["rc"] == 0 and "opened a session" in obs[who]["pam"]["stdout"], obs[who]
    # in the directory, carol is not a member of outer; inner (a group) is
    assert obs["ldap_carol_groups"] == ["carol", "dbadm", "inner"]
    assert obs["ldap_outer_members"] == ["cn=inner,ou=groups,dc=nest,dc=test"]
    entry = obs["carol_entry"]
    assert entry["user"] == "carol" and entry["groups_source"] == "nss"
    assert {"inner", "outer"} <= set(entry["groups"])
    assert "outer-https" in entry["rules"]
    t = obs["traffic"]
    assert t["carol_443_v4"] == OK and t["carol_443_v6"] == OK
    assert t["carol_22"] == EPERM and t["carol_80"] == EPERM
    assert t["dave_443"] == EPERM
    assert "outer" not in obs["dave_entry"]["groups"] and obs["dave_entry"]["rules"] == []
    # `ausctl users` (the table) lists outer among carol's groups
    header = obs["ausctl_users"]["header"].split()
    assert header[:5] == ["LOGIN_UID", "USER", "GROUPS", "SOURCE", "RULES"], header
    [row] = obs["ausctl_users"]["carol"]
    cells = row.split()
    assert cells[0] == str(CAROL) and "outer" in cells[2].split(","), row
    assert "outer-https" in cells[4].split(","), row


def test_policy_group_given_only_by_sid_matches(run):
    """The policy's DB-ADMINS carries dbadm's SID and no name the directory
    knows: only the SID can match."""
    obs = case(run, "sid_group")
    carol = obs["carol_entry"]
    assert SIDS["dbadm"] in carol["group_sids"]
    assert "db-admins" not in [g.casefold() for g in carol["groups"]]
    assert "db-by-sid" in carol["rules"]
    t = obs["traffic"]
    assert t["carol_5432_v4"] == OK and t["carol_5432_v6"] == OK
    # dave's groups have SIDs too, not that one
    dave = obs["dave_entry"]
    assert dave["group_sids"] == [SIDS["support"]] and dave["rules"] == []
    assert t["dave_5432"] == EPERM and t["dave_443"] == EPERM and t["dave_22"] == EPERM
    assert obs["check_carol"]["allowed"] and obs["check_carol"]["rule"] == "db-by-sid"
    assert not obs["check_dave"]["allowed"] and obs["check_dave"]["reason"] == "no_rule"


def test_nested_group_change_in_ldap_moves_the_rule_without_a_new_login(run):
    obs = case(run, "nested_change")
    assert obs["ldapmodify"]["rc"] == 0, obs["ldapmodify"]
    assert obs["sss_cache"]["rc"] == 0, obs["sss_cache"]
    assert obs["flipped"], f"no flip within 15 s: last {obs['last']}"
    # outer now holds support instead of inner: carol loses 443, dave gains it
    assert obs["last"] == {"carol_443": EPERM, "carol_5432": OK, "dave_443": OK}
    assert "(outer)" not in obs["id"]["carol"] and "(outer)" in obs["id"]["dave"]
    assert obs["carol_entry"]["rules"] == ["db-by-sid"]
    assert "outer" not in obs["carol_entry"]["groups"]
    assert obs["dave_entry"]["rules"] == ["outer-https"]
    assert SIDS["outer"] in obs["dave_entry"]["group_sids"]
    assert obs["shells_alive"], "the change must apply without a new login"
    print(f"nested group change propagated in {obs['seconds']} s")


def test_group_change_in_ldap_reaches_a_logged_in_user(run):
    obs = case(run, "group_change")
    assert obs["before"] == {"tcp80": OK, "tcp22": EPERM}
    assert obs["ldapmodify"]["rc"] == 0, obs["ldapmodify"]
    assert obs["sss_cache"]["rc"] == 0, obs["sss_cache"]
    assert obs["flipped"], f"no flip within 15 s: last {obs['last']}"
    assert obs["seconds_since_ldapmodify"] <= 15.0
    assert obs["last"] == {"tcp22": OK, "tcp80": EPERM}
    assert "(ops)" in obs["id_alice"] and "(dev)" not in obs["id_alice"]
    entry = obs["users_entry"]
    assert "ops" in entry["groups"] and "dev" not in entry["groups"]
    assert entry["rules"] == ["ops-ssh"]
    assert obs["shell_alive"], "the change must apply without a new login"
    assert obs["bob_unchanged"] == {"tcp22": OK, "tcp80": EPERM}
    print(f"group change propagated in {obs['seconds_since_ldapmodify']} s "
          f"({obs['seconds_since_sss_cache']} s after sss_cache -E)")


def test_logout_removes_the_user_and_fails_closed(run):
    obs = case(run, "logout")
    assert obs["in_maps_before"]
    # close_session from a process without her login UID: ausd cannot tell
    # whose session it is, and the hook must not fail the PAM call
    assert obs["pam_no_loginuid"]["rc"] == 0
    assert any("failed" in l for l in obs["pam_no_loginuid"]["hook_log"])
    pam = obs["pam"]
    assert pam["rc"] == 0 and "closed" in pam["stdout"], pam
    assert any(f"session close: login UID {ALICE}" in l for l in pam["hook_log"]), pam["hook_log"]
    assert obs["gone_from_maps"] and obs["gone_after_s"] <= 5.0, obs
    assert ALICE not in obs["users_listed"]
    assert obs["check_after"]["allowed"] is False and obs["check_after"]["reason"] == "pending"
    assert obs["leftover_tcp80"] == EPERM
    assert obs["bob_still_22"] == OK


def test_sssd_down_keeps_the_last_known_groups(run):
    obs = case(run, "sssd_down")
    assert obs["sssd_exit"] is not None
    # NSS really fails (fast cache flushed), so ausd's refreshes fail ...
    assert obs["getent_bob_after_flush"] != 0 and obs["id_bob_after_flush"] != 0
    assert obs["stale_seen_after_s"] is not None, obs["groups_sources_seen"]
    # ... and bob keeps his rules for groups_ttl * 3 seconds and more
    assert obs["ok_while_stale_s"] >= obs["required_s"], obs
    assert obs["probes"] > 0 and obs["probes_ok"] == obs["probes"], obs["failures"]
    assert obs["bob_tcp80"] == EPERM
    entry = obs["bob_entry_after"]
    assert entry["rules"] == ["ops-ssh"] and "ops" in entry["groups"]
    assert entry["groups_source"].startswith("nss,STALE(") and entry["groups_stale"]


def test_sssd_stopped_keeps_verdicts_and_a_later_removal_still_applies(run):
    obs = case(run, "sssd_stopped")
    assert obs["before"] == {"bob_22": OK, "dave_443": OK}
    # the failure ausd must see through: NSS knows bob, glibc's group list
    # has lost ops
    assert obs["getent_bob_stopped"] == 0 and "(ops)" not in obs["id_bob_stopped"], obs
    # SSSD's module itself knows bob still, and says it cannot give his groups
    assert obs["sss_module_stopped"] == "SUCCESS bob UNAVAIL", obs["sss_module_stopped"]
    assert obs["watched_s"] >= obs["required_s"]
    assert obs["probes"] >= 5 and obs["probes_ok"] == obs["probes"], obs["failures"]
    assert obs["bob_tcp80"] == EPERM
    entry = obs["bob_entry_stopped"]
    assert entry["rules"] == ["ops-ssh"] and "ops" in entry["groups"], entry
    assert entry["groups_source"].startswith("nss,STALE(") and "UNAVAIL" in entry["groups_stale"], entry
    [row] = obs["ausctl_users_bob"]
    assert row.split()[3].startswith("nss,STALE("), row
    back = obs["bob_entry_back"]
    assert back["groups_source"] == "nss" and back["groups_stale"] is None, back
    # a real removal, sssd up: dave leaves support, hence outer
    assert obs["ldapmodify"]["rc"] == 0, obs["ldapmodify"]
    assert obs["removal_flipped"], f"no flip within 15 s: {obs['removal_last']}"
    assert obs["removal_last"] == {"dave_443": EPERM, "bob_22": OK}
    assert "(support)" not in obs["id_dave"] and "(outer)" not in obs["id_dave"]
    assert obs["dave_entry"]["rules"] == [] and obs["dave_entry"]["groups_source"] == "nss"
    print(f"sssd stopped {obs['watched_s']} s, {obs['probes']} probes ok; "
          f"removal applied in {obs['removal_s']} s")


def test_ausd_down_login_still_works_and_stays_enforced(run):
    obs = case(run, "ausd_down")
    assert obs["ausd_exit"] == 0
    pam = obs["pam"]
    assert pam["rc"] == 0 and "opened a session" in pam["stdout"], pam
    assert pam["seconds"] <= 3.5, pam
    assert any("failed" in l for l in pam["hook_log"]), pam["hook_log"]
    assert ALICE not in obs["maps_users"] and BOB in obs["maps_users"]
    # not in the maps: baseline only, even for the port her group (ops) has
    assert obs["tcp80"] == EPERM
    assert obs["tcp22"] == EPERM
    assert obs["check_22"]["reason"] == "pending"
    # the pinned programs and maps keep enforcing for bob
    assert obs["bob_tcp22"] == OK and obs["bob_tcp80"] == EPERM


def test_nothing_is_left_behind(run):
    print(f"----- scenario stderr -----\n{run.stderr}", file=sys.stderr)
    made = run.data.get("setup", {}).get("made")
    assert made, "the scenario recorded nothing it made"
    assert run.host_after == run.host_before, "host /etc/nsswitch.conf or /etc/pam.d changed"
    assert not Path(made["cgroup"]).exists()
    assert not Path(made["pin_dir"]).exists()
    assert not Path(made["ausd_workdir"]).exists()
    namespaces = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for ns in ("mnt", "net"):
            try:
                namespaces.add(os.readlink(f"/proc/{pid}/ns/{ns}"))
            except OSError:
                pass
    assert made["mnt_ns"] not in namespaces, "a process still lives in the scenario's mount namespace"
    assert made["netns_id"] not in namespaces, "a process still lives in the peer's network namespace"
    host_v4 = run.data["setup"]["peer"]["host_v4"]
    assert not any(a.startswith(f"{host_v4}/") for a in netns.addresses()), \
        "the veth pair is still there"
    for what, pids in run.data["pids"].items():
        for pid in pids:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            assert comm not in ("slapd", "sssd", "sleep", "python", "ausd"), (what, pid, comm)
