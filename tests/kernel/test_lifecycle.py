"""The daemon's life: visibility mode, SIGKILL, restart and upgrade without
a gap, a second daemon on the same pins."""

import json
import os
import signal
import subprocess
import time

import pytest

from aus.agent import bpfsys, pins
from aus.core import contract as C
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel


def link_and_prog_ids(pin_dir):
    layout = pins.PinLayout(pin_dir)
    out = {}
    for hook in C.PROGRAMS:
        fd = bpfsys.obj_get(str(layout.link(hook.link)))
        try:
            info = bpfsys.link_info(fd)
        finally:
            os.close(fd)
        out[hook.link] = (info["id"], info["prog_id"])
    return out


def test_visibility_mode_reports_but_never_drops(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups), mode="visibility") as d:
        d.start()
        with lab.session(d, alice.uid):
            got = lab.act(cg, "tcp", peer.v4, 443, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)
            assert got == {"ok": True, "errno": None}
            res = d.check(alice.uid, peer.v4, "tcp", 443)
            assert res["allowed"] is False and res["verdict"] == "audit"
            assert lab.act(cg, "udp", peer.v6, 5353, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)["ok"]
            counters = d.counters()["users"][alice.uid]
            assert counters["denied_packets"] >= 2 and counters["denied_bytes"] > 0

            def audit_flow():
                flows = [json.loads(l) for l in d.ctl("flows", "--json").stdout.splitlines()]
                return [f for f in flows if f["verdict"] == "audit" and f["dport"] == 443
                        and f["login_uid"] == alice.uid]
            assert lab.wait_until(audit_flow, what="an audit flow event")


def test_sigkill_leaves_enforcement_in_place(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        with lab.session(d, alice.uid):
            d.stop(signal.SIGKILL)
            assert d.proc.returncode == -signal.SIGKILL
            assert lab.act(cg, "tcp", peer.v4, 80, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)["ok"]
            got = lab.act(cg, "tcp", peer.v4, 443, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)
            assert got["errno"] == "EPERM"
            # ausctl reads the pins with no daemon.
            assert d.check(alice.uid, peer.v4, "tcp", 443)["allowed"] is False
            assert d.check(alice.uid, peer.v4, "tcp", 80)["allowed"] is True
            status = d.ctl_json("status")
            assert status["daemon"]["running"] is False and status["installed"] is True
            maps = d.ctl_json("maps")
            assert alice.uid in [u["login_uid"] for u in maps["users"]]


def test_restart_adopts_pins_with_no_gap(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        with lab.session(d, alice.uid):
            before = link_and_prog_ids(d.pin_dir)
            prober = lab.spawn([lab.PYTHON, str(lab.CLIENT), "probe", peer.v4, "80", "443"],
                               cg=cg, loginuid=alice.uid, uid=alice.uid, gid=alice.gid,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert prober.stdout.readline().strip() == "started"
                time.sleep(0.5)
                assert d.stop(signal.SIGTERM) == 0
                time.sleep(0.5)           # no daemon at all for a while
                # a new build (the build pin names another): compiles anew,
                # swaps programs in place
                for mark in pins.PinLayout(d.pin_dir).maps_dir.glob("build_*"):
                    mark.unlink()
                d.start()
                time.sleep(0.5)
                prober.stdin.close()
                counts = json.loads(prober.stdout.readline())
            finally:
                prober.kill()
                prober.wait()
            after = link_and_prog_ids(d.pin_dir)
            log = d.read_log()
    assert counts["allowed_fail"] == 0 and counts["denied_ok"] == 0, counts
    assert counts["allowed_ok"] > 20 and counts["denied_fail"] > 20, counts
    for hook, (link_id, prog_id) in before.items():
        assert after[hook][0] == link_id, f"{hook}: the link was replaced, not updated"
        assert after[hook][1] != prog_id, f"{hook}: the program was not replaced"
    assert "replaced in place" in log


def test_second_ausd_on_the_same_pins_refuses(cg, peer, people):
    users, groups = people
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        p = subprocess.run([lab.PYTHON, "-m", "aus.agent.ausd", "--config", str(d.config_path)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1
        assert "another ausd is already running on" in p.stderr
        assert d.proc.poll() is None
        assert d.ctl_json("status")["daemon"]["running"]


def test_bad_policy_at_start_is_refused_clearly(cg, peer, people):
    with lab.ausd(cg, "rules:\n  - name: x\n    sources: [NOPE]\n") as d:
        p = subprocess.run([lab.PYTHON, "-m", "aus.agent.ausd", "--config", str(d.config_path)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1
        assert str(d.policy_path) in p.stderr and "line 3" in p.stderr and "NOPE" in p.stderr
        assert not pins.is_installed(d.pin_dir)


def test_flow_events_are_rate_limited(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups), events_per_second=5, events_burst=5) as d:
        d.start()
        with lab.session(d, alice.uid):
            got = lab.act(cg, "flood", peer.v4, 5353, 3000, loginuid=alice.uid,
                          uid=alice.uid, gid=alice.gid)
            assert got["refused"] == 3000
            events = d.ctl_json("maps")["events"]
            # Every denial was counted, but only about burst + rate * time
            # events per CPU reached the ring buffer.
            assert d.counters()["users"][alice.uid]["denied_packets"] >= 3000
            assert events["events_rate_limited"] >= 2900
            assert events["events_sent"] <= 60
            assert events["events_lost"] == 0
            assert d.ctl_json("status")["daemon"]["running"]


def test_sighup_reloads_the_policy(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        d.start()
        with lab.session(d, alice.uid):
            assert d.check(alice.uid, peer.v4, "tcp", 443)["allowed"] is False
            version = d.ctl_json("status")["policy"]["version"]
            d.write_policy(lab_policy(peer, groups, dev_services=["443/tcp"]))
            d.proc.send_signal(signal.SIGHUP)
            lab.wait_until(lambda: d.ctl_json("status")["policy"]["version"] > version,
                           what="the reload")
            assert lab.act(cg, "tcp", peer.v4, 443, loginuid=alice.uid, uid=alice.uid,
                           gid=alice.gid)["ok"]
            assert d.check(alice.uid, peer.v4, "tcp", 443)["rule"] == "dev-web"
            assert d.check(alice.uid, peer.v4, "tcp", 80)["allowed"] is False


def test_sockets_older_than_ausd_are_judged_by_their_owner(cg, peer, people):
    """Connections made before ausd first started have no stamp: their
    packets are judged by the socket owner's UID when that UID is a
    logged-in managed user, and pass otherwise (a service's socket)."""
    users, groups = people
    alice, carol = users["alice"], users["carol"]

    def hold(user, loginuid):
        p = lab.spawn([lab.PYTHON, str(lab.CLIENT), "hold", peer.v4, "443"],
                      cg=cg, loginuid=loginuid, uid=user.uid, gid=user.gid,
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(p.stdout.readline())["ok"]
        return p

    def say(p, line):
        p.stdin.write(line + "\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    with lab.ausd(cg, lab_policy(peer, groups)) as d:
        mine = hold(alice, alice.uid)
        service = hold(carol, None)
        try:
            assert say(mine, "before")["ok"] and say(service, "before")["ok"]
            d.start()
            with lab.session(d, alice.uid):
                got = say(mine, "after")
                assert got["ok"] is False, got
                assert d.check(alice.uid, peer.v4, "tcp", 443)["allowed"] is False
                assert say(service, "after")["ok"]
        finally:
            for p in (mine, service):
                p.kill()
                p.wait()
