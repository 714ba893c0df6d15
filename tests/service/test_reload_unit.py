"""`systemctl reload ausd` under a real systemd reports what ausd did with
the policy: ExecReload is `ausctl reload`, which waits for ausd's answer
over the control socket. A refused policy fails the reload, with the
file and line in the unit's journal, and the policy in force stays (same
process, same version); a good one succeeds; SIGHUP still reloads."""

from __future__ import annotations

import yaml

from tests.support.polling import wait_until

from .ausd_unit import cursor, ensure_running, state, wait_log
from .conftest import POLICY


def write_policy(m, policy: dict) -> None:
    m.write("/etc/aus/policy.yaml", yaml.safe_dump(policy, sort_keys=False))


def test_reload_fails_on_a_refused_policy_and_succeeds_on_a_good_one(box):
    m = box.m
    pid = ensure_running(box)["MainPID"]
    before = m.ausctl_json("status")["policy"]
    bad = dict(POLICY, services={"web": ["80/tpc"]})
    good = dict(POLICY, rules=[*POLICY["rules"], {
        "name": "staff-ssh", "sources": ["staff"], "destinations": ["lab"],
        "services": ["22/tcp"]}])
    try:
        since = cursor(m)
        write_policy(m, bad)
        line = m.run("grep", "-n", "80/tpc", "/etc/aus/policy.yaml").stdout.split(":", 1)[0]
        r = m.systemctl("reload", "ausd", check=False)
        assert r.returncode != 0, r
        assert "ausd.service failed" in r.stderr or "control process" in r.stderr, r.stderr
        log = wait_log(m, since, "ausctl reload: /etc/aus/policy.yaml: policy refused:")
        assert f"line {line}: services.web[0]: '80/tpc': unknown protocol 'tpc'" in log, log
        # the same process goes on with the policy in force
        s = state(m)
        assert (s["ActiveState"], s["SubState"], s["MainPID"]) == ("active", "running", pid), s
        now = m.ausctl_json("status")["policy"]
        assert (now["version"], now["rules"]) == (before["version"], before["rules"])
        assert "80/tpc" in now["error"]

        write_policy(m, good)
        r = m.systemctl("reload", "ausd", check=False)
        assert r.returncode == 0, r.stderr
        now = m.ausctl_json("status")["policy"]
        assert (now["version"], now["rules"], now["error"]) == (before["version"] + 1, 2, None)
        assert state(m)["MainPID"] == pid

        # SIGHUP reloads too (it cannot report a refusal: see ausd's log)
        since = cursor(m)
        write_policy(m, POLICY)
        m.systemctl("kill", "--signal=HUP", "ausd")
        wait_log(m, since, "SIGHUP: reloading the policy")
        wait_until(lambda: m.ausctl_json("status")["policy"]["rules"] == 1, 15,
                   interval=0.2, what="the policy of SIGHUP")
    finally:
        write_policy(m, POLICY)
        m.systemctl("reload", "ausd", check=False)
