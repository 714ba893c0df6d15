"""ausd logs, at start and at each reload, what every login UID with
processes gets: managed with its policy groups and rules, or not managed."""

import contextlib
import signal

import pytest

from tests.support import lab

pytestmark = pytest.mark.kernel


def policy(groups, *, dev_rules=("dev-web",)):
    dev = groups["dev"].upper()
    rules = [{"name": name, "sources": [dev], "destinations": ["lab"], "services": [svc]}
             for name, svc in (("dev-web", "80/tcp"), ("dev-ssh", "22/tcp"))
             if name in dev_rules]
    rules.append({"name": "ops-ssh", "sources": [groups["ops"]], "destinations": ["lab"],
                  "services": ["22/tcp"]})
    return {"user_groups": [{"name": dev}, {"name": groups["ops"]}],
            "ip_lists": {"lab": ["198.18.0.0/15"]}, "rules": rules}


@contextlib.contextmanager
def holders(*people):
    """One process per user carrying its login UID, as a login shell would."""
    procs = []
    try:
        for u in people:
            procs.append(lab.spawn(["sleep", "600"], loginuid=u.uid, uid=u.uid, gid=u.gid))
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def report_after(d, marker: str, expected: list[str]) -> str:
    """The log from the last ``marker`` on, once it holds every expected line."""
    def found():
        log = d.read_log()
        at = log.rfind(marker)
        tail = log[at:] if at >= 0 else ""
        return tail if all(e in tail for e in expected) else None
    try:
        return lab.wait_until(found, timeout=20, what=f"{expected} after {marker!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; ausd's log:\n{d.read_log()[-4000:]}") from None


def test_start_and_reload_log_every_login_uid(cg, people):
    users, groups = people
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    dev = groups["dev"].upper()
    with holders(alice, bob, carol), \
            lab.ausd(cg, policy(groups), mode="visibility",
                     unmanaged_login_uids=[0, bob.uid]) as d:
        d.start()
        log = report_after(d, "ready: mode visibility", [
            "login UIDs with processes now:",
            "(mode visibility: nothing is blocked; what would be denied is reported)",
            f"login UID {alice.uid} ({alice.name}): managed, groups {dev}, 1 rule (dev-web)\n",
            f"login UID {carol.uid} ({carol.name}): managed, no policy group, baseline only\n",
            f"login UID {bob.uid} ({bob.name}): not managed (unmanaged_login_uids): "
            "never filtered\n",
        ])
        # bob is in ops, but unmanaged: his groups are never looked up.
        assert f"login UID {bob.uid} ({bob.name}): managed" not in log

        d.write_policy(policy(groups, dev_rules=("dev-web", "dev-ssh")))
        d.proc.send_signal(signal.SIGHUP)
        log = report_after(d, "SIGHUP: reloading the policy", [
            "loaded: version 2, 3 rules",
            f"login UID {alice.uid} ({alice.name}): managed, groups {dev}, 2 rules (",
            f"login UID {carol.uid} ({carol.name}): managed, no policy group, baseline only\n",
            f"login UID {bob.uid} ({bob.name}): not managed (unmanaged_login_uids): "
            "never filtered\n",
        ])
        alice_line = next(line for line in log.splitlines()
                          if f"login UID {alice.uid} (" in line)
        assert "dev-web" in alice_line and "dev-ssh" in alice_line, alice_line
        assert "ops-ssh" not in alice_line


def test_a_refused_reload_logs_no_report(cg, people):
    users, groups = people
    alice = users["alice"]
    with holders(alice), lab.ausd(cg, policy(groups)) as d:
        d.start()
        report_after(d, "ready: mode enforce", [
            "(mode enforce: traffic no rule allows is denied)",
            f"login UID {alice.uid} ({alice.name}): managed"])
        d.write_policy("rules:\n  - name: x\n    sources: [NOPE]\n")
        d.proc.send_signal(signal.SIGHUP)
        tail = report_after(d, "SIGHUP: reloading the policy", ["the policy in force stays"])
        assert "login UIDs with processes now" not in tail
