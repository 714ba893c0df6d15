"""The audit trail (SQLite and PostgreSQL): every kind of change through
the management API leaves one record, made by the key that was used (its
id and label), with the object before and after, and one log line on
``aus.audit``; a refused change leaves neither; GET audit filters and
pages by cursor, and an org never sees another org's events. SCIM
writes are directory sync, not recorded (docs/audit.md)."""

from __future__ import annotations

import logging
import threading

import pytest
from sqlalchemy import update

from aus.server.auth import create_key
from aus.server.db import ApiKey, AuditEvent, open_database
from tests.support.provision import provision
from tests.support.server_seed import seed

AUDIT_LOGGER = "aus.audit"


@pytest.fixture
def log(caplog):
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    return caplog


def _labelled_key(server, label: str, org: str = "1") -> str:
    """A new key of ``org`` with ``label`` (keys are labelled when made
    with ``aus-server api-key create --label``)."""
    engine, sessions = open_database(server.db_url)
    try:
        token = create_key(sessions, org)
        with sessions.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.id == token.partition(":")[0]).values(label=label))
    finally:
        engine.dispose()
    return token


def _key_id(token: str) -> str:
    return token.partition(":")[0]


# Every kind of change but API keys: the fixtures' own keys are recorded
# too (api_key.create, see test_scopes.py), and these tests look at the
# changes they make.
CHANGES = "rule.*,ip_list.*,group.*,policy.*,draft.*,mode.*"


def _events(server, token=None, org=None, **params) -> dict:
    params.setdefault("action", CHANGES)
    r = server.client.get(f"/api/orgs/{org or server.org}/audit", params=params,
                          auth=server.basic(token))
    assert r.status_code == 200, r.text
    return r.json()


def _only(server, action: str, token=None) -> dict:
    items = _events(server, token, action=action)["items"]
    assert len(items) == 1, items
    return items[0]


def _lines(log) -> list[str]:
    return [r.getMessage() for r in log.records
            if r.name == AUDIT_LOGGER and " action=api_key." not in r.getMessage()]


def _line(e: dict, org: str = "1") -> str:
    return (f'audit id={e["id"]} org={org} key={e["key_id"]} label="{e["key_label"]}" '
            f'action={e["action"]} target="{e["target"]}"')


def _check(e: dict, token: str, label: str, action: str, target: str) -> None:
    assert (e["action"], e["key_id"], e["key_label"], e["target"]) == (
        action, _key_id(token), label, target)
    assert e["at"].endswith("Z")


def _rule(sources, dest=("10.0.0.0/8",), services=("80/tcp",), name="dev-web"):
    return {"name": name, "sources": list(sources), "destinations": list(dest),
            "services": list(services)}


def test_rule_create_update_delete(server, log):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"], "OPS": ["carol"]})
    tok = _labelled_key(server, "alice's laptop")
    c, auth = server.client, server.basic(tok)

    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    assert r.status_code == 201
    rid = r.json()["id"]
    created = _only(server, "rule.create")
    _check(created, tok, "alice's laptop", "rule.create", rid)
    assert created["before"] is None
    assert created["after"] == {"id": rid, "name": "dev-web", "description": "",
                                "sources": [{"id": ids["DEV"], "name": "DEV"}],
                                "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]}

    r = c.put(f"{server.api}/rules/{rid}", json=_rule([ids["OPS"], ids["DEV"]], name="web",
                                                      services=["443/tcp"]), auth=auth)
    assert r.status_code == 200
    updated = _only(server, "rule.update")
    _check(updated, tok, "alice's laptop", "rule.update", rid)
    assert updated["before"] == created["after"]
    assert updated["after"] == {**created["after"], "name": "web", "services": ["443/tcp"],
                                "sources": [{"id": ids["OPS"], "name": "OPS"},
                                            {"id": ids["DEV"], "name": "DEV"}]}
    # the same body again changes nothing, and records nothing
    assert c.put(f"{server.api}/rules/{rid}", json=_rule([ids["OPS"], ids["DEV"]], name="web",
                                                         services=["443/tcp"]),
                 auth=auth).status_code == 200

    assert c.delete(f"{server.api}/rules/{rid}", auth=auth).status_code == 200
    deleted = _only(server, "rule.delete")
    _check(deleted, tok, "alice's laptop", "rule.delete", rid)
    assert deleted["before"] == updated["after"] and deleted["after"] is None

    events = _events(server)["items"]
    assert [e["action"] for e in events] == ["rule.delete", "rule.update", "rule.create"]
    assert _lines(log) == [_line(e) for e in reversed(events)]


def test_ip_list_create_update_delete_and_a_rename_carried_into_rules(server, log):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    tok = _labelled_key(server, "terraform")
    c, auth = server.client, server.basic(tok)

    lst = c.post(f"{server.api}/ip-lists", json={"name": "db", "entries": ["10.1.0.0/16"]},
                 auth=auth).json()
    created = _only(server, "ip_list.create")
    _check(created, tok, "terraform", "ip_list.create", lst["id"])
    assert created["before"] is None
    assert created["after"] == {"id": lst["id"], "name": "db", "entries": ["10.1.0.0/16"]}

    rule = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["db", "192.0.2.1"]),
                  auth=auth).json()
    log.clear()
    # Renaming the list renames it in the rule that names it: two changes.
    r = c.put(f"{server.api}/ip-lists/{lst['id']}",
              json={"name": "databases", "entries": ["10.1.0.0/16", "10.2.0.0/16"]}, auth=auth)
    assert r.status_code == 200, r.text
    updated = _only(server, "ip_list.update")
    _check(updated, tok, "terraform", "ip_list.update", lst["id"])
    assert updated["before"] == created["after"]
    assert updated["after"] == {"id": lst["id"], "name": "databases",
                                "entries": ["10.1.0.0/16", "10.2.0.0/16"]}
    carried = _only(server, "rule.update")
    _check(carried, tok, "terraform", "rule.update", rule["id"])
    assert carried["before"]["destinations"] == ["db", "192.0.2.1"]
    assert carried["after"]["destinations"] == ["databases", "192.0.2.1"]
    assert sorted(_lines(log)) == sorted([_line(updated), _line(carried)])

    c.put(f"{server.api}/rules/{rule['id']}", json=_rule([ids["DEV"]]), auth=auth)
    assert c.delete(f"{server.api}/ip-lists/{lst['id']}", auth=auth).status_code == 204
    deleted = _only(server, "ip_list.delete")
    _check(deleted, tok, "terraform", "ip_list.delete", lst["id"])
    assert deleted["before"] == updated["after"] and deleted["after"] is None
    assert _lines(log)[-1] == _line(deleted)


def test_manual_group_create_and_delete(server, log):
    tok = _labelled_key(server, "helpdesk")
    c, auth = server.client, server.basic(tok)
    r = c.post(f"{server.api}/groups", json={"display_name": "Contractors", "sid": "S-1-5-21-1-2-3-1001"},
               auth=auth)
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    created = _only(server, "group.create")
    _check(created, tok, "helpdesk", "group.create", gid)
    assert created["before"] is None
    assert created["after"] == {"id": gid, "display_name": "Contractors", "sid": "S-1-5-21-1-2-3-1001",
                                "source": "manual", "external_id": None, "rules": []}

    rule = c.post(f"{server.api}/rules", json=_rule([gid], name="contractors-web"), auth=auth).json()
    assert c.delete(f"{server.api}/groups/{gid}", auth=auth).status_code == 204
    deleted = _only(server, "group.delete")
    _check(deleted, tok, "helpdesk", "group.delete", gid)
    # the record says which rules it leaves pointing at nothing
    assert deleted["before"] == {**created["after"],
                                 "rules": [{"id": rule["id"], "name": "contractors-web"}]}
    assert deleted["after"] is None
    assert [line for line in _lines(log) if "group." in line] == [_line(created), _line(deleted)]


def test_provision_and_rollback(server, log):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    tok = _labelled_key(server, "release pipeline")
    c, auth = server.client, server.basic(tok)
    lst = c.post(f"{server.api}/ip-lists", json={"name": "web", "entries": ["10.2.0.0/16"]}, auth=auth)
    assert lst.status_code == 201
    rule = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["web"]), auth=auth).json()
    v1 = provision(c, server.api, "first rules", auth=auth)

    first = _only(server, "policy.provision")
    _check(first, tok, "release pipeline", "policy.provision", f"version {v1}")
    assert first["before"] is None
    assert first["after"] == {
        "version": v1, "note": "first rules", "rolled_back_from": None, "rules": 1, "ip_lists": 1,
        "changes": {"rules": {"added": ["dev-web"], "changed": [], "removed": []},
                    "ip_lists": {"added": ["web"], "changed": [], "removed": []}}}

    c.put(f"{server.api}/rules/{rule['id']}", json=_rule([ids["DEV"]], dest=["web"], services=["443/tcp"]),
          auth=auth)
    v2 = provision(c, server.api, "https only", auth=auth)
    second = _events(server, action="policy.provision")["items"][0]
    assert second["before"] == {k: v for k, v in first["after"].items() if k != "changes"}
    assert second["after"]["version"] == v2
    assert second["after"]["changes"]["rules"] == {"added": [], "changed": ["dev-web"], "removed": []}

    r = c.post(f"{server.api}/policy/versions/{v1}/rollback", json={"note": "undo"}, auth=auth)
    assert r.status_code == 200, r.text
    v3 = r.json()["policy_version"]
    back = _only(server, "policy.rollback")
    _check(back, tok, "release pipeline", "policy.rollback", f"version {v3}")
    assert back["before"]["version"] == v2
    assert back["after"] == {"version": v3, "note": "undo", "rolled_back_from": v1, "rules": 1,
                             "ip_lists": 1,
                             "changes": {"rules": {"added": [], "changed": ["dev-web"], "removed": []},
                                         "ip_lists": {"added": [], "changed": [], "removed": []}}}
    policy_lines = [line for line in _lines(log) if "action=policy." in line]
    assert policy_lines == [_line(first), _line(second), _line(back)]


def test_discard_keeps_the_discarded_draft(server, log):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    tok = _labelled_key(server, "console")
    c, auth = server.client, server.basic(tok)
    kept = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="kept"), auth=auth).json()
    provision(c, server.api, auth=auth)
    # nothing pending: a discard changes nothing and records nothing
    assert c.delete(f"{server.api}/draft", auth=auth).status_code == 200
    assert _events(server, action="draft.discard")["items"] == []

    lost = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="lost", services=["22/tcp"]),
                  auth=auth).json()
    assert c.delete(f"{server.api}/draft", auth=auth).status_code == 200
    e = _only(server, "draft.discard")
    _check(e, tok, "console", "draft.discard", "draft")
    rule = lambda r, svc: {"id": r["id"], "name": r["name"], "description": "",  # noqa: E731
                           "sources": [{"id": ids["DEV"], "name": "DEV"}],
                           "destinations": ["10.0.0.0/8"], "services": [svc]}
    assert e["before"] == {"rules": [rule(kept, "80/tcp"), rule(lost, "22/tcp")], "ip_lists": []}
    assert e["after"] == {"rules": [rule(kept, "80/tcp")], "ip_lists": []}
    assert _lines(log)[-1] == _line(e)


def test_mode_changes_for_a_workload_and_the_org_default(server, log):
    tok = _labelled_key(server, "ops on call")
    c, auth = server.client, server.basic(tok)

    assert c.put(f"{server.api}/workloads/web-1/mode", json={"mode": "enforce"},
                 auth=auth).status_code == 200
    assert c.put(f"{server.api}/workloads/web-1/mode", json={"mode": "enforce"},
                 auth=auth).json()["changed"] is False   # no change, no record
    assert c.put(f"{server.api}/workloads/web-1/mode", json={"mode": None},
                 auth=auth).status_code == 200
    assert c.put(f"{server.api}/mode", json={"mode": "enforce"}, auth=auth).status_code == 200

    org_default, back, first = _events(server, action="mode.set")["items"]
    _check(first, tok, "ops on call", "mode.set", "workload:web-1")
    assert first["before"] is None and first["after"] == {"workload": "web-1", "mode": "enforce"}
    _check(back, tok, "ops on call", "mode.set", "workload:web-1")
    assert back["before"] == first["after"] and back["after"] is None
    _check(org_default, tok, "ops on call", "mode.set", "org")
    # a new org starts in visibility
    assert org_default["before"] == {"workload": None, "mode": "visibility"}
    assert org_default["after"] == {"workload": None, "mode": "enforce"}
    assert _lines(log) == [_line(first), _line(back), _line(org_default)]


def test_the_record_names_the_key_that_was_used(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    a, b = _labelled_key(server, "key a"), _labelled_key(server, "key b")
    c = server.client
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="one"), auth=server.basic(a))
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="two"), auth=server.basic(b))
    items = _events(server, action="rule.create")["items"]
    assert [(e["after"]["name"], e["key_id"], e["key_label"]) for e in items] == [
        ("two", _key_id(b), "key b"), ("one", _key_id(a), "key a")]
    assert _events(server, key_id=_key_id(a))["items"] == [items[1]]


def test_concurrent_changes_of_one_rule_chain_their_records(server):
    """Each record's ``before`` is the previous record's ``after``: a write
    reads the object only once the writes before it have committed."""
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    rid = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth).json()["id"]
    results: list[int] = []

    def put(port: int) -> None:
        r = c.put(f"{server.api}/rules/{rid}", json=_rule([ids["DEV"]], services=[f"{port}/tcp"]),
                  auth=auth)
        results.append(r.status_code)

    threads = [threading.Thread(target=put, args=(8000 + i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 8
    chain = list(reversed(_events(server, target=rid)["items"]))
    assert [e["action"] for e in chain] == ["rule.create"] + ["rule.update"] * 8
    for prev, e in zip(chain, chain[1:]):
        assert e["before"] == prev["after"], (prev["id"], e["id"])
    final = c.get(f"{server.api}/rules/{rid}", auth=auth).json()
    assert chain[-1]["after"]["services"] == final["services"]


def test_a_refused_change_leaves_no_record_and_no_log_line(server, log):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    db = c.post(f"{server.api}/ip-lists", json={"name": "db", "entries": ["10.1.0.0/16"]}, auth=auth).json()
    c.post(f"{server.api}/ip-lists", json={"name": "web", "entries": ["10.2.0.0/16"]}, auth=auth)
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["db"]), auth=auth)
    before = _events(server)["items"]
    lines = _lines(log)
    assert len(before) == len(lines) == 3
    # The rename reaches the rule (recorded in the transaction) before the
    # clash of names refuses the whole change.
    r = c.put(f"{server.api}/ip-lists/{db['id']}", json={"name": "web", "entries": ["10.1.0.0/16"]},
              auth=auth)
    assert r.status_code == 409, r.text
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["db"]), auth=auth)
    assert r.status_code == 409, r.text
    assert _events(server)["items"] == before
    assert _lines(log) == lines


def test_scim_writes_are_not_recorded(server, log):
    r = server.client.post(f"{server.scim}/Groups", headers=server.bearer(),
                           json={"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                                 "displayName": "Synced", "externalId": "g-1"})
    assert r.status_code == 201, r.text
    assert _events(server)["items"] == [] and _lines(log) == []


def test_filters_and_paging(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    for i in range(5):
        c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name=f"r{i}"), auth=auth)
    lst = c.post(f"{server.api}/ip-lists", json={"name": "db", "entries": ["10.1.0.0/16"]}, auth=auth).json()
    c.put(f"{server.api}/workloads/web-1/mode", json={"mode": "enforce"}, auth=auth)

    everything = _events(server)["items"]
    assert [e["action"] for e in everything] == ["mode.set", "ip_list.create"] + ["rule.create"] * 5
    assert [e["id"] for e in everything] == sorted((e["id"] for e in everything), reverse=True)

    # pages of two, by cursor, with a filter: the same events, no gaps, no repeats
    seen, cursor = [], None
    while True:
        page = _events(server, action="rule.*", limit=2, **({"cursor": cursor} if cursor else {}))
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next"]
        if cursor is None:
            break
        # an event recorded while paging does not shift the pages
        c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name=f"late{len(seen)}"), auth=auth)
    assert seen == everything[2:]
    assert [e["action"] for e in _events(server, action="ip_list.create,mode.set")["items"]] == [
        "mode.set", "ip_list.create"]
    assert _events(server, target=lst["id"])["items"] == [everything[1]]
    assert _events(server, target="workload:web-1")["items"] == [everything[0]]
    assert _events(server, action="group.*")["items"] == []

    at = everything[-1]["at"]
    assert len(_events(server, since=at)["items"]) >= len(everything)
    assert _events(server, until="2000-01-01T00:00:00Z")["items"] == []
    assert _events(server, since="2999-01-01T00:00:00Z")["items"] == []


@pytest.mark.parametrize("params, field", [
    ({"action": "rule.*;drop"}, "action"),
    ({"action": ""}, "action"),
    ({"since": "yesterday"}, "since"),
    ({"until": "2026-12-01T00:00:00"}, "until"),
    ({"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"}, "until"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"cursor": "not-a-cursor"}, "cursor"),
    ({"verdict": "denied"}, "verdict"),
])
def test_bad_parameters_answer_400_naming_them(server, params, field):
    r = server.client.get(f"{server.api}/audit", params=params, auth=server.basic())
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["fields"][0]["field"] == field and field in err["message"]


def test_a_cursor_only_continues_its_own_query(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    for i in range(3):
        server.client.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name=f"r{i}"),
                           auth=server.basic())
    nxt = _events(server, limit=1)["next"]
    assert nxt
    r = server.client.get(f"{server.api}/audit", params={"limit": 1, "cursor": nxt,
                                                         "action": "rule.create"},
                          auth=server.basic())
    assert r.status_code == 400 and "other parameters" in r.json()["error"]["message"]


def test_an_org_never_sees_another_orgs_events(server):
    ids1 = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    ids2 = seed(server.db_url, "2", groups={"DEV": ["bob"]})
    c = server.client
    r1 = c.post("/api/orgs/1/rules", json=_rule([ids1["DEV"]], name="org1-rule"),
                auth=server.basic()).json()
    c.post("/api/orgs/2/rules", json=_rule([ids2["DEV"]], name="org2-rule"),
           auth=server.basic(server.other_token))
    c.put("/api/orgs/2/mode", json={"mode": "enforce"}, auth=server.basic(server.other_token))

    mine = _events(server)["items"]
    assert [(e["action"], e["target"]) for e in mine] == [("rule.create", r1["id"])]
    theirs = _events(server, token=server.other_token, org="2")["items"]
    assert [e["action"] for e in theirs] == ["mode.set", "rule.create"]
    assert {e["key_id"] for e in theirs} == {_key_id(server.other_token)}
    # Filters and cursors never reach across: org 2's target from org 1,
    # and org 2's cursor used on org 1.
    assert _events(server, target=theirs[1]["target"])["items"] == []
    page = _events(server, token=server.other_token, org="2", limit=1)
    assert page["next"]
    assert _events(server, cursor=page["next"], limit=1)["items"] == mine
    # Org 1's key cannot read org 2's trail at all.
    r = c.get("/api/orgs/2/audit", auth=server.basic())
    assert r.status_code == 403, r.text
    engine, sessions = open_database(server.db_url)
    try:
        with sessions() as s:
            assert {e.org_id for e in s.query(AuditEvent)} == {"1", "2"}
    finally:
        engine.dispose()
