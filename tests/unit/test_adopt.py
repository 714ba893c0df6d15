"""A restart adopts what the maps hold: each logged-in user keeps its
ruleset until a complete directory answer recomputes it; an answer that is
not complete changes nothing. The daemon's logic on plain data: the maps
are a KernelState planned into, the directory a function."""

from __future__ import annotations

import yaml

from aus.agent.ausd import Daemon
from aus.agent.config import DaemonConfig
from aus.agent.identity import UNAVAILABLE, Answer
from aus.cli import ausctl
from aus.core.state import plan

POLICY = {"user_groups": [{"name": "dev"}, {"name": "ops"}],
          "rules": [{"name": "dev-web", "sources": ["dev"], "destinations": ["10.1.0.0/16"],
                     "services": ["80/tcp"]},
                    {"name": "ops-ssh", "sources": ["ops"], "destinations": ["10.2.0.0/16"],
                     "services": ["22/tcp"]}]}


def daemon(tmp_path, kstate=None) -> Daemon:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    d = Daemon(DaemonConfig(policy=path, pin_dir=tmp_path / "pins",
                            socket=tmp_path / "ausd.sock"))
    d.policy, _ = d._read_policy()
    d.compiled = d._compile(d.policy, 1)
    if kstate is not None:
        d.kstate = kstate
    d.syncs = []

    def sync(why, changed=None):
        p, d.kstate = plan(d.kstate, d.desired(), changed)
        d.syncs.append((why, changed))
    d.sync = sync
    return d


def rules(d, uid):
    content = d.kstate.ruleset_content(d.kstate.users[uid].ruleset)
    return sorted({d.compiled.rule_names[e.rule] for _, _, ps in content for e in ps} - {"baseline"})


def test_restart_keeps_the_rules_in_the_maps_until_the_directory_answers(tmp_path):
    # before the restart: alice (2001) in dev, in the maps
    first = daemon(tmp_path)
    first.sessions.update_scan({2001: 1})
    first.want[2001] = first._content(2001, first.directory.take(2001, Answer("alice", ("dev",))))
    first.sync("start")
    assert rules(first, 2001) == ["dev-web"]

    # restart: alice still logged in, bob (2002) logged in while ausd was down
    d = daemon(tmp_path, first.kstate)
    d.sessions.update_scan({2001: 1, 2002: 1})
    d.adopt()
    d.sync("start")
    assert set(d.adopted) == {2001} and 2002 not in d.kstate.users      # bob: fail closed
    assert rules(d, 2001) == ["dev-web"] and d.lookups.busy(2001) and d.lookups.busy(2002)
    assert d.directory_status()["adopted_not_refreshed"] == 1
    assert ausctl._directory_line(d.directory_status()).startswith(
        "directory: 1 of 1 users still on the rules the maps held at the start (refreshing); "
        "lookups 2 queued")

    # the directory cannot answer: alice keeps what the maps hold
    d._answered(2001, Answer(None, status=UNAVAILABLE, detail="SSSD UNAVAIL"))
    d.take_answers()
    assert rules(d, 2001) == ["dev-web"] and 2001 in d.adopted and 2001 not in d.identities

    # a policy change meanwhile recomputes nobody it has no groups for
    d.rebuild_want()
    d.sync("reload")
    assert rules(d, 2001) == ["dev-web"]

    # it answers: alice moved to ops while ausd was down; bob is in dev
    d._answered(2001, Answer("alice", ("ops",)))
    d._answered(2002, Answer("bob", ("dev",)))
    d.take_answers()
    assert rules(d, 2001) == ["ops-ssh"] and rules(d, 2002) == ["dev-web"]
    assert not d.adopted and d.syncs[-1] == ("directory", {2001, 2002})
    st = d.directory_status()
    assert st["adopted_at_start"] == 1 and st["refresh_done"] is not None
    assert "all 1 users adopted at the start refreshed in" in ausctl._directory_line(st)


def test_answers_are_applied_in_batches(tmp_path):
    d = daemon(tmp_path)
    d.sessions.update_scan({u: 1 for u in range(3000, 3100)})
    for u in range(3000, 3100):
        d._answered(u, Answer(f"u{u}", ("dev",)))
    assert d.take_answers(limit=32) == 68
    assert len([u for u in d.kstate.users if u >= 3000]) == 32
    while d.take_answers(limit=32):
        pass
    assert all(rules(d, u) == ["dev-web"] for u in range(3000, 3100))
