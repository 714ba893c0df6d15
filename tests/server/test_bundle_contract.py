"""The bundle contract: what aus-server publishes is what ausd accepts,
through one model (aus.core.bundle.BundleDocument) on both sides."""

from __future__ import annotations

import json
import uuid

from aus.core.bundle import bundle_from_bytes, document_from_data
from aus.server.bundle import rebuild, touch
from aus.server.db import Bundle, Rule, RuleSource, open_database
from tests.support.provision import provision
from tests.support.server_seed import provision_past_api, seed


def test_published_bundle_round_trips_through_the_agent(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice@contoso.com", "bob"], "OPS": ["carol"]},
               external_ids={"DEV": "ext-dev"})
    c, auth = server.client, server.basic()
    fin = c.post(f"{server.api}/groups", auth=auth,
                 json={"display_name": "Finance", "sid": " s-1-5-21-1-2-3-1104 "})
    assert fin.status_code == 201, fin.text
    assert c.post(f"{server.api}/ip-lists", auth=auth,
                  json={"name": "dmz", "entries": ["192.0.2.0/24", "2001:db8::/64"]}).status_code == 201
    for rule in ({"name": "dev-web", "sources": [ids["DEV"]], "destinations": ["10.0.0.0/8"],
                  "services": ["80/tcp"]},
                 {"name": "ops-dmz", "sources": [ids["OPS"], fin.json()["id"]],
                  "destinations": ["dmz", "198.51.100.7"],
                  "services": ["443/tcp", "8000-8100/udp", "icmp"]}):
        r = c.post(f"{server.api}/rules", json=rule, auth=auth)
        assert r.status_code == 201, r.text
    provision(c, server.api, auth=auth)
    resp = c.get(f"{server.api}/bundle", auth=auth)
    assert resp.status_code == 200
    body = resp.content

    # The agent's parser takes the server's bytes as they are.
    b = bundle_from_bytes(body, "bundle of org 1")
    assert (b.org, b.version) == ("1", resp.json()["version"])
    assert [(r.name, r.sources, r.destinations, r.services) for r in b.policy.rules] == [
        ("dev-web", ["DEV"], ["10.0.0.0/8"], ["80/tcp"]),
        ("ops-dmz", ["OPS", "Finance"], ["dmz", "198.51.100.7"],
         ["443/tcp", "8000-8100/udp", "icmp"])]
    assert b.policy.ip_lists == {"dmz": ["192.0.2.0/24", "2001:db8::/64"]}
    assert b.policy.group("finance").sid == "S-1-5-21-1-2-3-1104"
    assert b.policy.group("DEV").external_id == "ext-dev"
    assert b.members == {"DEV": ("alice@contoso.com", "bob"), "Finance": (), "OPS": ("carol",)}
    assert b.groups_of("carol") == ("OPS",)
    assert b.groups_of("alice", "local-part") == ("DEV",)

    # One model on both sides: the document the agent validated, written
    # out by that model, is the server's body byte for byte.
    doc = document_from_data(json.loads(body), "bundle of org 1")
    again = json.dumps(doc.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
    assert again.encode() == body


def test_the_server_publishes_nothing_the_agent_would_refuse(server):
    """Data that reached the store without the API's checks (an older
    server, a hand edit) is refused by the same model before publication,
    with the daemon's path and reason; the policy in force stays, and the
    failure is kept on the bundle row."""
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/rules", auth=auth, json={
        "name": "dev-web", "sources": [ids["DEV"]], "destinations": ["10.0.0.0/8"],
        "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    provision(c, server.api, auth=auth)
    in_force = json.loads(c.get(f"{server.api}/bundle", auth=auth).content)
    engine, sessions = open_database(server.db_url)
    try:
        with sessions.begin() as s:
            rid = str(uuid.uuid4())
            s.add(Rule(id=rid, org_id="1", name="bad-port", destinations=["10.0.0.0/8"],
                       services=["80/tcpp"], position=9))
            s.add(RuleSource(rule_id=rid, group_id=ids["DEV"], position=0))
            s.flush()
            provision_past_api(s, "1")
            touch(s, "1")
        with sessions.begin() as s:
            rebuild(s, "1")
        with sessions() as s:
            row = s.get(Bundle, "1")
            assert row.build_error == ("policy.rules[1].services[0]: '80/tcpp': unknown protocol "
                                       "'tcpp'; ports go with tcp or udp")
            assert json.loads(row.body)["policy"] == in_force["policy"]
    finally:
        engine.dispose()


def test_the_enforcement_modes_round_trip_through_the_agent(server):
    """The modes set through the API reach the agent's model as set, and
    the body is what that model writes out, byte for byte."""
    c, auth = server.client, server.basic()
    assert c.put(f"{server.api}/mode", auth=auth, json={"mode": "enforce"}).status_code == 200
    for name, mode in (("web-1", "visibility"), ("db.example.com", "enforce")):
        r = c.put(f"{server.api}/workloads/{name}/mode", auth=auth, json={"mode": mode})
        assert r.status_code == 200, r.text
    body = c.get(f"{server.api}/bundle", auth=auth).content
    assert json.loads(body)["enforcement"] == {
        "default": "enforce", "workloads": {"db.example.com": "enforce", "web-1": "visibility"}}
    b = bundle_from_bytes(body, "bundle of org 1")
    assert b.enforcement.mode_for("web-1") == ("visibility", "server:workload")
    assert b.enforcement.mode_for("web-2") == ("enforce", "server:org")
    doc = document_from_data(json.loads(body), "bundle of org 1")
    again = json.dumps(doc.model_dump(mode="json", exclude_none=True), separators=(",", ":"))
    assert again.encode() == body
