"""The impact preview: flows of the last days whose verdict the draft
would change, against hand-computed cases (newly blocked, newly allowed,
unchanged; by group, user and destination; IPv6; port ranges; the
baseline; visibility-mode verdicts; the time window; truncation; org
isolation). SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

from aus.server.db import Flow, open_database
from tests.support.provision import provision
from tests.support.server_seed import seed

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _flows(db_url: str, org: str, rows: list[tuple]) -> None:
    """(user, groups, dst, proto, port, verdict, rule, count, age in hours)."""
    engine, sessions = open_database(db_url)
    try:
        with sessions.begin() as s:
            for i, (user, groups, dst, proto, port, verdict, rule, count, age) in enumerate(rows):
                seen = NOW - dt.timedelta(hours=age)
                s.add(Flow(org_id=org, hour=seen.replace(minute=0, second=0), workload="web-1",
                           login_uid=1000 + i, user_name=user, groups=groups, process="curl",
                           dst=dst, proto=proto, port=port, verdict=verdict, rule=rule,
                           first_seen=seen, last_seen=seen, count=count))
    finally:
        engine.dispose()


def _rule(name, sources, dest, services):
    return {"name": name, "sources": sources, "destinations": dest, "services": services}


def _setup(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice", "bob"], "OPS": ["carol"],
                                           "NEW": ["dave"]})
    c, auth = server.client, server.basic()
    web = c.post(f"{server.api}/rules", json=_rule("dev-web", [ids["DEV"]], ["10.0.0.0/8"],
                                                   ["443/tcp"]), auth=auth).json()
    v6 = c.post(f"{server.api}/rules", json=_rule("ops-v6", [ids["OPS"]], ["2001:db8::/32"],
                                                  ["any"]), auth=auth).json()
    rng = c.post(f"{server.api}/rules", json=_rule("dev-range", [ids["DEV"]], ["192.0.2.10"],
                                                   ["8000-8099/tcp"]), auth=auth).json()
    provision(c, server.api, auth=auth)
    # The draft: dev-web narrowed to 10.1/16, ops-v6 removed, the range cut
    # to 8000-8049, and a new rule for a group the active policy never named.
    c.put(f"{server.api}/rules/{web['id']}", json=_rule("dev-web", [ids["DEV"]], ["10.1.0.0/16"],
                                                        ["443/tcp"]), auth=auth)
    c.delete(f"{server.api}/rules/{v6['id']}", auth=auth)
    c.put(f"{server.api}/rules/{rng['id']}", json=_rule("dev-range", [ids["DEV"]], ["192.0.2.10"],
                                                        ["8000-8049/tcp"]), auth=auth)
    c.post(f"{server.api}/rules", json=_rule("new-ssh", [ids["NEW"]], ["10.5.0.0/16"], ["22/tcp"]),
           auth=auth)
    _flows(server.db_url, "1", [
        # newly blocked
        ("alice", ["DEV"], "10.2.3.4", "tcp", 443, "allowed", "dev-web", 5, 1),
        ("bob", ["DEV"], "10.2.3.4", "tcp", 443, "allowed", "dev-web", 2, 30),
        ("carol", ["OPS"], "2001:db8::1", "udp", 53, "allowed", "ops-v6", 7, 2),
        ("alice", ["DEV"], "192.0.2.10", "tcp", 8050, "allowed", "dev-range", 1, 3),
        # newly allowed: dave's groups come from the store (the active
        # policy named none of his); a visibility-mode verdict counts as denied
        ("dave", [], "10.5.1.1", "tcp", 22, "denied", "", 3, 4),
        ("dave", [], "10.5.1.2", "tcp", 22, "would_deny", "", 4, 5),
        # unchanged
        ("alice", ["DEV"], "10.1.2.3", "tcp", 443, "allowed", "dev-web", 10, 1),
        ("alice", ["DEV"], "192.0.2.10", "tcp", 8010, "allowed", "dev-range", 2, 1),
        ("alice", ["DEV"], "10.9.9.9", "tcp", 22, "denied", "", 1, 1),
        ("bob", ["DEV"], "10.2.0.1", "tcp", 443, "allowed", "baseline", 4, 1),
        # outside the window
        ("alice", ["DEV"], "10.2.0.9", "tcp", 443, "allowed", "dev-web", 100, 24 * 8),
    ])
    # Another org's flows are never part of org 1's preview.
    _flows(server.db_url, "2", [("mallory", ["DEV"], "10.2.3.4", "tcp", 443, "allowed",
                                 "dev-web", 1000, 1)])
    return ids


def test_preview_hand_computed(server):
    _setup(server)
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/draft/preview", json={"days": 7}, auth=auth)
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["days"] == 7 and p["truncated"] is False and p["skipped"] == 0
    assert p["flows"] == 15 + 7 + 17 and p["unchanged"] == 17
    assert p["draft"] == 4   # the draft's pending changes

    nb = p["newly_blocked"]
    assert nb["flows"] == 15 and nb["keys"] == 3
    assert nb["by_group"] == [{"group": "DEV", "count": 8}, {"group": "OPS", "count": 7}]
    assert nb["by_user"] == [{"user": "carol", "count": 7}, {"user": "alice", "count": 6},
                             {"user": "bob", "count": 2}]
    assert [(d["dst"], d["proto"], d["port"], d["count"], d["users"], d["rules_before"],
             d["rules_after"]) for d in nb["by_destination"]] == [
        ("10.2.3.4", "tcp", 443, 7, ["alice", "bob"], ["dev-web"], []),
        ("2001:db8::1", "udp", 53, 7, ["carol"], ["ops-v6"], []),
        ("192.0.2.10", "tcp", 8050, 1, ["alice"], ["dev-range"], [])]

    na = p["newly_allowed"]
    assert na["flows"] == 7 and na["keys"] == 2
    assert na["by_group"] == [{"group": "NEW", "count": 7}]
    assert na["by_user"] == [{"user": "dave", "count": 7}]
    assert [(d["dst"], d["count"], d["rules_before"], d["rules_after"])
            for d in na["by_destination"]] == [("10.5.1.2", 4, [], ["new-ssh"]),
                                               ("10.5.1.1", 3, [], ["new-ssh"])]

    # One day: bob's 30-hour-old flow drops out.
    p1 = c.post(f"{server.api}/draft/preview", json={"days": 1}, auth=auth).json()
    assert p1["newly_blocked"]["flows"] == 13
    assert {u["user"] for u in p1["newly_blocked"]["by_user"]} == {"alice", "carol"}
    # Without a body: 7 days.
    assert c.post(f"{server.api}/draft/preview", auth=auth).json()["flows"] == p["flows"]


def test_preview_with_the_workloads_baseline(server):
    _setup(server)
    c, auth = server.client, server.basic()
    p = c.post(f"{server.api}/draft/preview", json={"days": 7, "baseline": ["10.2.0.0/16"]},
               auth=auth).json()
    # The baseline still allows 10.2.3.4: only the IPv6 and port-range flows are blocked.
    assert p["newly_blocked"]["flows"] == 8
    assert [d["dst"] for d in p["newly_blocked"]["by_destination"]] == ["2001:db8::1", "192.0.2.10"]
    assert p["baseline"] == ["10.2.0.0/16"]


def test_preview_is_bounded_and_says_so(server, monkeypatch):
    import aus.server.preview as preview

    _setup(server)
    monkeypatch.setattr(preview, "MAX_KEYS", 2)
    p = server.client.post(f"{server.api}/draft/preview", json={"days": 7}, auth=server.basic()).json()
    assert p["truncated"] is True and p["keys_decided"] == 2 and p["skipped"] > 0
    assert p["limits"]["keys"] == 2


def test_no_draft_no_change(server):
    _setup(server)
    c, auth = server.client, server.basic()
    c.delete(f"{server.api}/draft", auth=auth)
    p = c.post(f"{server.api}/draft/preview", json={"days": 7}, auth=auth).json()
    assert p["newly_blocked"]["flows"] == p["newly_allowed"]["flows"] == 0
    assert p["unchanged"] == p["flows"] == 39 and p["draft"] == 0
    # Org 2 has flows but no policy: its preview never sees org 1's.
    p2 = c.post("/api/orgs/2/draft/preview", json={"days": 7},
                auth=server.basic(server.other_token)).json()
    assert p2["flows"] == 1000 and p2["newly_blocked"]["flows"] == 0
