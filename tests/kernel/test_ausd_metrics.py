"""ausd's Prometheus metrics from the real daemon on a test cgroup: a managed
user's allowed and denied connections move the decision counters of the
right hook and reason and the per-rule counters; active users, map fill,
policy version and age, flow events and the login-latency histogram are
what the maps and the daemon hold; a stalled scraper holds up no login;
the textfile is written atomically and parses; a port already taken
costs the listener, never the daemon."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aus.agent import mapview, pins
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel

MAX_USERS = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(r.read().decode())


def val(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def managed_in_map(d: lab.Ausd) -> tuple[int, int]:
    """(managed entries, all entries) of the pinned aus_users map."""
    with pins.pinned_maps(d.pin_dir) as maps:
        users = mapview.dump(maps)["users"]
    return sum(not u["unmanaged"] for u in users), len(users)


def test_metrics_follow_the_kernel(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    port = free_port()
    with lab.ausd(cg, lab_policy(peer, groups), metrics_listen=f"127.0.0.1:{port}",
                  max_users=MAX_USERS) as d:
        d.start()
        before = scrape(port)
        assert val(before, "ausd_info", version=d.ctl_json("status")["daemon"]["version"]) == 1
        assert val(before, "ausd_login_latency_seconds_count") == 0
        assert val(before, "ausd_mode", mode="enforce") == 1
        assert val(before, "ausd_mode", mode="visibility") == 0
        assert not any(k[0].startswith("ausd_bundle_") for k in before)   # a policy file

        with lab.session(d, alice.uid):
            ok = lab.act(cg, "tcp", peer.v4, 80, loginuid=alice.uid, uid=alice.uid,
                         gid=alice.gid)
            denied = lab.act(cg, "tcp", peer.v4, 443, loginuid=alice.uid, uid=alice.uid,
                             gid=alice.gid)
            assert ok["ok"] and denied["errno"] == "EPERM"
            after = scrape(port)

            def moved(reason: str) -> float:
                return (val(after, "ausd_decisions_total", hook="connect4", reason=reason)
                        - val(before, "ausd_decisions_total", hook="connect4", reason=reason))
            assert moved("no_rule") == 1
            assert moved("rule") >= 1
            assert moved("unmanaged") == 0
            assert val(after, "ausd_decisions_total", hook="egress", reason="rule") > \
                val(before, "ausd_decisions_total", hook="egress", reason="rule")

            rule_id = str(d.check(alice.uid, peer.v4, "tcp", 80)["rule_id"])
            allowed = val(after, "ausd_rule_packets_total", rule_id=rule_id, rule="dev-web",
                          verdict="allowed")
            assert allowed >= 1
            assert val(after, "ausd_rule_bytes_total", rule_id=rule_id, rule="dev-web",
                       verdict="allowed") > 0
            none = dict(rule_id="0", rule="(none)", verdict="denied")
            assert val(after, "ausd_rule_packets_total", **none) - \
                val(before, "ausd_rule_packets_total", **none) == 1
            assert val(after, "ausd_flow_events_sent_total") >= 2
            assert val(after, "ausd_flow_events_lost_total") == 0
            assert val(after, "ausd_flow_events_rate_limited_total") == 0

            # One session opened: one login timed, in some bucket below +Inf.
            assert val(after, "ausd_login_latency_seconds_count") == 1
            assert 0 < val(after, "ausd_login_latency_seconds_sum") < 10
            assert val(after, "ausd_login_latency_seconds_bucket", le="+Inf") == 1

            # Users and map fill: what the pinned maps hold at the time of
            # a scrape (other logins on the host come and go: retry).
            def consistent():
                m = scrape(port)
                managed, entries = managed_in_map(d)
                return m if (val(m, "ausd_active_users"), val(
                    m, "ausd_map_entries", map="aus_users")) == (managed, entries) else None
            m = lab.wait_until(consistent, timeout=10, what="metrics matching the maps")
            assert val(m, "ausd_active_users") >= 1
            assert val(m, "ausd_map_max_entries", map="aus_users") == MAX_USERS
            assert val(m, "ausd_map_fill_ratio", map="aus_users") == pytest.approx(
                val(m, "ausd_map_entries", map="aus_users") / MAX_USERS)
            for name in ("aus_dst", "aus_svc", "aus_rules"):
                assert 0 < val(m, "ausd_map_entries", map=name) <= \
                    val(m, "ausd_map_max_entries", map=name)
            rules = d.ctl_json("rules")["rules"]
            assert val(m, "ausd_map_entries", map="aus_rules") >= len(rules) - 1

        # Policy version and age: a reload with a new policy resets the age.
        version = d.ctl_json("status")["policy"]["version"]
        assert val(after, "ausd_policy_version") == version
        assert val(after, "ausd_policy_refused") == 0
        applied = val(after, "ausd_policy_applied_timestamp_seconds")
        policy = lab_policy(peer, groups)
        policy["rules"][1]["services"] = ["22/tcp", "8022/tcp"]
        d.write_policy(policy)
        d.ctl("reload")
        m = scrape(port)
        assert val(m, "ausd_policy_version") == version + 1
        assert val(m, "ausd_policy_applied_timestamp_seconds") > applied
        assert 0 <= val(m, "ausd_policy_age_seconds") < 30
        d.write_policy("rules: [")
        assert d.ctl("reload", check=False).returncode != 0
        m = scrape(port)
        assert val(m, "ausd_policy_refused") == 1 and val(m, "ausd_policy_version") == version + 1

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        assert err.value.code == 404
    with pytest.raises(OSError):     # the listener went with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_textfile_and_a_taken_port(cg, peer, people):
    _users, groups = people
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aus-test-prom-")))
        taken = stack.enter_context(socket.socket())
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        prom = tmp / "ausd.prom"
        d = stack.enter_context(lab.ausd(
            cg, lab_policy(peer, groups), metrics_listen=f"127.0.0.1:{port}",
            metrics_textfile=str(prom), metrics_interval=1.0))
        d.start()     # READY although the port is taken
        assert f"cannot listen on 127.0.0.1:{port}" in d.read_log()
        text = lab.wait_until(lambda: prom.exists() and prom.read_text(), timeout=10,
                              what="the textfile")
        m = parse(text)
        assert val(m, "ausd_policy_version") == d.ctl_json("status")["policy"]["version"]
        assert ("ausd_decisions_total", (("hook", "connect4"), ("reason", "rule"))) in m
        assert prom.stat().st_mode & 0o777 == 0o644
        first = prom.stat().st_ino
        # Rewritten whole (a new inode by rename), leaving no temporary file.
        lab.wait_until(lambda: prom.stat().st_ino != first, timeout=10,
                       what="the textfile rewritten")
        lab.wait_until(lambda: sorted(p.name for p in tmp.iterdir()) == ["ausd.prom"],
                       timeout=10, what="no temporary file left")
        assert parse(prom.read_text())
        assert d.proc.poll() is None


def test_a_stalled_scraper_holds_up_no_login(cg, peer, people):
    users, groups = people
    alice = users["alice"]
    port = free_port()
    with lab.ausd(cg, lab_policy(peer, groups), metrics_listen=f"127.0.0.1:{port}") as d:
        d.start()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stall:
            stall.sendall(b"GET /metrics HTTP/1.1\r\n")    # and never the rest
            with lab.session(d, alice.uid) as s:
                assert s["managed"] and s["rules"] == ["dev-web"]
                assert lab.act(cg, "tcp", peer.v4, 80, loginuid=alice.uid, uid=alice.uid,
                               gid=alice.gid)["ok"]
            assert d.ctl_json("status")["policy"]["version"] >= 1
            # All of that while the listener still waited for the stalled request.
            stall.setblocking(False)
            with pytest.raises(BlockingIOError):
                stall.recv(1)
            # The listener drops the client after its timeout and serves again.
            stall.settimeout(30)
            assert stall.recv(4096) == b""
        m = scrape(port)
        assert val(m, "ausd_login_latency_seconds_count") == 1
