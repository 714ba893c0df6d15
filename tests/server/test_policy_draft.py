"""The policy lifecycle: rule and IP-list writes go into the draft, which
no workload sees until provisioned; the draft's diff, discard, provision
(note and key), versions, diff between versions, rollback, the migration
of a store whose policy was in force, and org isolation. SQLite and
PostgreSQL."""

from __future__ import annotations

import time

from tests.support.migrations import store_at
from tests.support.provision import provision
from tests.support.server_seed import seed


def _rule(sources, dest=("10.0.0.0/8",), services=("80/tcp",), name="dev-web"):
    return {"name": name, "sources": list(sources), "destinations": list(dest),
            "services": list(services)}


def _bundle(server, token=None, org=None):
    api = f"/api/orgs/{org}" if org else server.api
    return server.client.get(f"{api}/bundle", auth=server.basic(token)).json()


def test_writes_go_to_the_draft_until_provisioned(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    v0 = c.get(f"{server.api}/policy", auth=auth).json()["version"]
    assert c.get(f"{server.api}/policy", auth=auth).json()["draft"] == {"pending": False}

    r = c.post(f"{server.api}/ip-lists", json={"name": "db", "entries": ["10.1.0.0/16"]}, auth=auth)
    assert r.status_code == 201 and r.json()["draft"] is True and r.json()["policy_version"] == v0
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["db"]), auth=auth)
    assert r.status_code == 201 and r.json()["draft"] is True and r.json()["policy_version"] == v0
    rid = r.json()["id"]
    # The management view shows the draft; the bundle does not carry it.
    assert [x["name"] for x in c.get(f"{server.api}/rules", auth=auth).json()["items"]] == ["dev-web"]
    bundle = _bundle(server)
    assert bundle["version"] == v0 and bundle["policy"]["rules"] == []
    assert c.get(f"{server.api}/policy", auth=auth).json()["draft"] == {"pending": True}
    # A long-poll is not woken by a draft write.
    etag = c.get(f"{server.api}/bundle", auth=auth).headers["etag"]
    r = c.get(f"{server.api}/bundle", params={"wait": 0.5}, headers={"If-None-Match": etag}, auth=auth)
    assert r.status_code == 304

    draft = c.get(f"{server.api}/draft", auth=auth).json()
    assert draft["pending"] is True and draft["active_version"] == 0 and draft["changes"] == 2
    assert [x["name"] for x in draft["rules"]["added"]] == ["dev-web"]
    assert draft["rules"]["added"][0]["sources"] == [
        {"id": ids["DEV"], "name": "DEV", "current_name": "DEV"}]
    assert draft["ip_lists"]["added"] == [{"id": draft["ip_lists"]["added"][0]["id"], "name": "db",
                                          "entries": ["10.1.0.0/16"]}]
    assert draft["rules"]["changed"] == draft["rules"]["removed"] == []

    v1 = provision(c, server.api, "first rules", auth=auth)
    assert v1 > v0
    bundle = _bundle(server)
    assert bundle["version"] == v1
    assert bundle["policy"]["rules"] == [{"name": "dev-web", "sources": ["DEV"],
                                          "destinations": ["db"], "services": ["80/tcp"]}]
    assert bundle["policy"]["ip_lists"] == {"db": ["10.1.0.0/16"]}
    assert bundle["members"] == {"DEV": ["alice"]}
    assert c.get(f"{server.api}/draft", auth=auth).json()["pending"] is False
    assert c.get(f"{server.api}/policy", auth=auth).json() | {"etag": None} == {
        "version": v1, "etag": None, "draft": {"pending": False},
        "build": c.get(f"{server.api}/policy", auth=auth).json()["build"]}
    versions = c.get(f"{server.api}/policy/versions", auth=auth).json()
    assert versions["total"] == 1 and versions["active_version"] == v1
    (item,) = versions["items"]
    assert item["version"] == v1 and item["note"] == "first rules"
    assert item["key_id"] == server.basic()[0] and item["rules"] == 1 and item["ip_lists"] == 1
    assert item["created_at"].endswith("Z") and item["rolled_back_from"] is None

    # Nothing pending: nothing to provision.
    r = c.post(f"{server.api}/provision", json={"note": "again"}, auth=auth)
    assert r.status_code == 409 and "no pending changes" in r.json()["error"]["message"]
    # Deleting goes to the draft too.
    assert c.delete(f"{server.api}/rules/{rid}", auth=auth).json()["draft"] is True
    assert _bundle(server)["policy"]["rules"][0]["name"] == "dev-web"
    assert c.get(f"{server.api}/draft", auth=auth).json()["rules"]["removed"][0]["name"] == "dev-web"


def test_write_time_checks_still_refuse_what_could_never_compile(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], dest=["nolist"]), auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "destinations[0]"
    assert c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth).status_code == 201
    r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="DEV-WEB"), auth=auth)
    assert r.status_code == 409
    r = c.post(f"{server.api}/ip-lists", json={"name": "tcp", "entries": ["10.0.0.1"]}, auth=auth)
    assert r.status_code == 422
    assert c.get(f"{server.api}/draft", auth=auth).json()["changes"] == 1


def test_diff_of_changes_and_discard(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"], "OPS": ["carol"]})
    c, auth = server.client, server.basic()
    lst = c.post(f"{server.api}/ip-lists", json={"name": "web", "entries": ["10.2.0.0/16"]},
                 auth=auth).json()
    a = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="a"), auth=auth).json()
    b = c.post(f"{server.api}/rules", json=_rule([ids["OPS"]], name="b"), auth=auth).json()
    v1 = provision(c, server.api, auth=auth)

    assert c.put(f"{server.api}/rules/{a['id']}", json=_rule([ids["DEV"], ids["OPS"]], name="a2",
                                                            services=["443/tcp"]),
                 auth=auth).status_code == 200
    c.delete(f"{server.api}/rules/{b['id']}", auth=auth)
    c.put(f"{server.api}/ip-lists/{lst['id']}", json={"name": "web", "entries": ["10.3.0.0/16"]},
          auth=auth)
    c.post(f"{server.api}/rules", json=_rule([ids["OPS"]], dest=["web"], name="c"), auth=auth)
    d = c.get(f"{server.api}/draft", auth=auth).json()
    assert d["active_version"] == v1 and d["changes"] == 4
    (changed,) = d["rules"]["changed"]
    assert changed["before"]["name"] == "a" and changed["after"]["name"] == "a2"
    assert changed["before"]["services"] == ["80/tcp"] and changed["after"]["services"] == ["443/tcp"]
    assert [s["name"] for s in changed["after"]["sources"]] == ["DEV", "OPS"]
    assert [r["name"] for r in d["rules"]["removed"]] == ["b"]
    assert [r["name"] for r in d["rules"]["added"]] == ["c"]
    assert d["ip_lists"]["changed"] == [{"before": {"id": lst["id"], "name": "web", "entries": ["10.2.0.0/16"]},
                                         "after": {"id": lst["id"], "name": "web", "entries": ["10.3.0.0/16"]}}]

    r = c.delete(f"{server.api}/draft", auth=auth)
    assert r.status_code == 200 and r.json()["pending"] is False and r.json()["changes"] == 0
    rules = c.get(f"{server.api}/rules", auth=auth).json()["items"]
    assert [(x["id"], x["name"], x["services"]) for x in rules] == [
        (a["id"], "a", ["80/tcp"]), (b["id"], "b", ["80/tcp"])]
    assert [s["id"] for s in rules[0]["sources"]] == [ids["DEV"]]
    assert c.get(f"{server.api}/ip-lists", auth=auth).json()["items"] == [
        {"id": lst["id"], "name": "web", "entries": ["10.2.0.0/16"]}]
    # The restored rows are editable as before.
    assert c.put(f"{server.api}/rules/{a['id']}", json=_rule([ids["DEV"]], name="a"),
                 auth=auth).status_code == 200
    assert _bundle(server)["version"] == v1


def test_versions_diff_and_rollback(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"], "OPS": ["carol"]})
    c, auth = server.client, server.basic()
    a = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="a"), auth=auth).json()
    v1 = provision(c, server.api, "v1", auth=auth)
    c.put(f"{server.api}/rules/{a['id']}", json=_rule([ids["DEV"]], name="a", services=["22/tcp"]),
          auth=auth)
    c.post(f"{server.api}/rules", json=_rule([ids["OPS"]], name="b"), auth=auth)
    v2 = provision(c, server.api, "v2", auth=auth)
    assert v2 > v1

    got = c.get(f"{server.api}/policy/versions/{v1}", auth=auth).json()
    assert got["note"] == "v1" and [r["name"] for r in got["spec"]["rules"]] == ["a"]
    assert got["policy"]["rules"] == [{"name": "a", "sources": ["DEV"],
                                       "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]}]
    assert c.get(f"{server.api}/policy/versions/999", auth=auth).status_code == 404
    d = c.get(f"{server.api}/policy/diff", params={"from": v1, "to": v2}, auth=auth).json()
    assert [r["name"] for r in d["rules"]["added"]] == ["b"] and d["rules"]["removed"] == []
    assert d["rules"]["changed"][0]["after"]["services"] == ["22/tcp"]
    back = c.get(f"{server.api}/policy/diff", params={"from": v2, "to": v1}, auth=auth).json()
    assert [r["name"] for r in back["rules"]["removed"]] == ["b"]
    first = c.get(f"{server.api}/policy/diff", params={"from": 0, "to": v1}, auth=auth).json()
    assert [r["name"] for r in first["rules"]["added"]] == ["a"]

    # Refused while the draft has pending changes; nothing is lost.
    c.post(f"{server.api}/rules", json=_rule([ids["OPS"]], name="pending"), auth=auth)
    r = c.post(f"{server.api}/policy/versions/{v1}/rollback", json={"note": "undo"}, auth=auth)
    assert r.status_code == 409 and "pending" in r.json()["error"]["message"]
    assert "pending" in [x["name"] for x in c.get(f"{server.api}/rules", auth=auth).json()["items"]]
    c.delete(f"{server.api}/draft", auth=auth)
    r = c.post(f"{server.api}/policy/versions/{v2}/rollback", json={}, auth=auth)
    assert r.status_code == 409 and "in force" in r.json()["error"]["message"]
    assert c.post(f"{server.api}/policy/versions/12345/rollback", json={},
                  auth=auth).status_code == 404

    r = c.post(f"{server.api}/policy/versions/{v1}/rollback", json={"note": "undo v2"}, auth=auth)
    assert r.status_code == 200, r.text
    v3 = r.json()["policy_version"]
    assert v3 > v2 and r.json()["rolled_back_from"] == v1 and r.json()["note"] == "undo v2"
    bundle = _bundle(server)
    assert bundle["version"] == v3
    assert [(x["name"], x["services"]) for x in bundle["policy"]["rules"]] == [("a", ["80/tcp"])]
    # The draft is the rolled-back version: nothing pending.
    assert c.get(f"{server.api}/draft", auth=auth).json()["pending"] is False
    assert [x["name"] for x in c.get(f"{server.api}/rules", auth=auth).json()["items"]] == ["a"]
    items = c.get(f"{server.api}/policy/versions", auth=auth).json()["items"]
    assert [(i["version"], i["note"]) for i in items] == [(v3, "undo v2"), (v2, "v2"), (v1, "v1")]
    assert all(i["key_id"] == server.basic()[0] for i in items)
    # Every version stays as it was provisioned.
    assert c.get(f"{server.api}/policy/versions/{v2}", auth=auth).json()["note"] == "v2"
    page = c.get(f"{server.api}/policy/versions", params={"offset": 1, "limit": 1}, auth=auth).json()
    assert page["total"] == 3 and [i["version"] for i in page["items"]] == [v2]


def test_membership_changes_take_effect_without_a_provision(server):
    c, auth = server.client, server.basic()
    ids = {}
    for name in ("alice", "bob"):
        r = c.post(f"{server.scim}/Users", headers=server.bearer(), json={
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name})
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    r = c.post(f"{server.scim}/Groups", headers=server.bearer(), json={
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "DEV",
        "members": [{"value": ids["alice"]}]})
    assert r.status_code == 201, r.text
    ids["DEV"] = r.json()["id"]
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]]), auth=auth)
    v1 = provision(c, server.api, auth=auth)
    scim = c.patch(f"{server.scim}/Groups/{ids['DEV']}", headers=server.bearer(), json={
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "add", "path": "members", "value": [{"value": ids["bob"]}]},
                       {"op": "replace", "path": "displayName", "value": "Developers"}]})
    assert scim.status_code in (200, 204), scim.text
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        bundle = _bundle(server)
        if bundle["members"].get("Developers") == ["alice", "bob"]:
            break
        time.sleep(0.05)
    assert bundle["members"] == {"Developers": ["alice", "bob"]}
    # The renamed group is the rule's source, by id, without a new version.
    assert bundle["policy"]["rules"][0]["sources"] == ["Developers"]
    assert bundle["version"] > v1
    versions = c.get(f"{server.api}/policy/versions", auth=auth).json()
    assert versions["active_version"] == v1 and versions["total"] == 1
    assert c.get(f"{server.api}/draft", auth=auth).json()["pending"] is False


def test_an_org_never_sees_or_provisions_another_orgs_draft(server):
    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    ids2 = seed(server.db_url, "2", groups={"OPS2": ["zed"]})
    c, auth, auth2 = server.client, server.basic(), server.basic(server.other_token)
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="org1-rule"), auth=auth)
    v1 = provision(c, server.api, "org 1", auth=auth)
    c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name="org1-draft"), auth=auth)
    for method, path, body in [("GET", "/draft", None), ("DELETE", "/draft", None),
                               ("POST", "/provision", {"note": "x"}),
                               ("POST", "/draft/preview", {"days": 1}),
                               ("GET", "/policy/versions", None),
                               ("GET", f"/policy/versions/{v1}", None),
                               ("GET", "/policy/diff?from=0&to=1", None),
                               ("POST", f"/policy/versions/{v1}/rollback", {})]:
        r = c.request(method, f"{server.api}{path}", json=body, auth=auth2)
        assert r.status_code == 403, (method, path, r.status_code)
    o2 = "/api/orgs/2"
    assert c.get(f"{o2}/draft", auth=auth2).json()["changes"] == 0
    r = c.post(f"{o2}/provision", json={"note": "steal"}, auth=auth2)
    assert r.status_code == 409
    assert c.get(f"{o2}/policy/versions", auth=auth2).json()["items"] == []
    assert c.get(f"{o2}/policy/versions/{v1}", auth=auth2).status_code == 404
    assert c.post(f"{o2}/policy/versions/{v1}/rollback", json={}, auth=auth2).status_code == 404
    # Org 2's own provision publishes org 2's rules only.
    c.post(f"{o2}/rules", json=_rule([ids2["OPS2"]], name="org2-rule"), auth=auth2)
    provision(c, o2, auth=auth2)
    assert [r["name"] for r in _bundle(server, server.other_token, "2")["policy"]["rules"]] == ["org2-rule"]
    assert [r["name"] for r in _bundle(server)["policy"]["rules"]] == ["org1-rule"]
    assert c.get(f"{server.api}/draft", auth=auth).json()["changes"] == 1


def test_bad_bodies_name_the_field(server):
    c, auth = server.client, server.basic()
    r = c.post(f"{server.api}/provision", json={"note": 5}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "note"
    r = c.post(f"{server.api}/provision", json={"note": "x" * 2001}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "note"
    r = c.post(f"{server.api}/draft/preview", json={"days": 0}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "days"
    r = c.post(f"{server.api}/draft/preview", json={"days": 1, "baseline": ["10.0.0.300/8"]}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "baseline"
    r = c.get(f"{server.api}/policy/diff", params={"from": "x", "to": 1}, auth=auth)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "from"


def test_an_org_from_before_versions_keeps_its_policy_in_force(tmp_path):
    """0006 on a store at 0005 whose org has rules, an IP list and a
    published bundle: the tables become version 1 of its history (numbered
    as the bundle), the bundle is unchanged, and nothing is pending."""
    import json

    from fastapi.testclient import TestClient

    import aus.server.db as db
    from aus.server.app import create_app
    from aus.server.auth import create_key

    url = f"sqlite:///{tmp_path}/old.db"
    policy = {"user_groups": [{"name": "DEV"}], "ip_lists": {"db": ["10.1.0.0/16"]}, "services": {},
              "rules": [{"name": "dev-db", "sources": ["DEV"], "destinations": ["db"],
                         "services": ["5432/tcp"]}]}
    engine = store_at(url, "0005")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('1', '2026-01-01', 4)")
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('2', '2026-01-01', 0)")
        conn.exec_driver_sql(
            "INSERT INTO groups (id, org_id, display_name, display_name_key, source, doc, created_at,"
            " modified_at, version) VALUES ('g1', '1', 'DEV', 'dev', 'scim', '{}', '2026-01-01',"
            " '2026-01-01', 1)")
        conn.exec_driver_sql(
            "INSERT INTO ip_lists (id, org_id, name, entries, modified_at) VALUES"
            " ('l1', '1', 'db', '[\"10.1.0.0/16\"]', '2026-01-01')")
        conn.exec_driver_sql(
            "INSERT INTO rules (id, org_id, name, name_key, description, destinations, services,"
            " position, created_at, modified_at) VALUES ('r1', '1', 'dev-db', 'dev-db', 'the db',"
            " '[\"db\"]', '[\"5432/tcp\"]', 1, '2026-01-01', '2026-01-01')")
        conn.exec_driver_sql("INSERT INTO rule_sources (rule_id, group_id, position) VALUES ('r1', 'g1', 0)")
        body = json.dumps({"format": 1, "org": "1", "version": 7, "generated_at": "2026-01-01T00:00:00Z",
                           "policy": policy, "members": {"DEV": []}}, separators=(",", ":"))
        conn.exec_driver_sql("INSERT INTO bundles (org_id, version, generation, digest, body, built_at,"
                             " build_attempts, build_failures_total) VALUES ('1', 7, 4, 'd', ?,"
                             " '2026-01-01', 0, 0)", (body,))
    engine.dispose()

    _engine, sessions = db.open_database(url)   # upgrades to head
    token = create_key(sessions, "1")
    _engine.dispose()
    with TestClient(create_app(url, bundle_interval=0.05)) as c:
        auth = tuple(token.split(":", 1))
        versions = c.get("/api/orgs/1/policy/versions", auth=auth).json()
        assert versions["active_version"] == 7 and versions["total"] == 1
        v = c.get("/api/orgs/1/policy/versions/7", auth=auth).json()
        assert v["key_id"] is None and "history began" in v["note"]
        assert v["policy"] == policy
        assert v["spec"] == {"rules": [{"id": "r1", "name": "dev-db", "description": "the db",
                                        "sources": [{"id": "g1", "name": "DEV"}],
                                        "destinations": ["db"], "services": ["5432/tcp"]}],
                             "ip_lists": [{"id": "l1", "name": "db", "entries": ["10.1.0.0/16"]}]}
        assert c.get("/api/orgs/1/draft", auth=auth).json()["pending"] is False
        bundle = c.get("/api/orgs/1/bundle", auth=auth).json()
        assert bundle["policy"] == policy and bundle["version"] == 7


def test_concurrent_edits_and_provisions_neither_deadlock_nor_lose_a_rule(server):
    """Writers racing with provisions and SCIM group creates: every
    provision publishes or finds nothing pending, versions never repeat,
    and the last provision carries every rule."""
    import concurrent.futures

    ids = seed(server.db_url, "1", groups={"DEV": ["alice"]})
    c, auth = server.client, server.basic()

    def edit_and_provision(i):
        r = c.post(f"{server.api}/rules", json=_rule([ids["DEV"]], name=f"r{i}"), auth=auth)
        assert r.status_code == 201, r.text
        g = c.post(f"{server.scim}/Groups", headers=server.bearer(), json={
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": f"g{i}"})
        assert g.status_code == 201, g.text
        p = c.post(f"{server.api}/provision", json={"note": f"n{i}"}, auth=auth)
        assert p.status_code in (200, 409), p.text
        return p.json().get("policy_version")

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        versions = [v for v in ex.map(edit_and_provision, range(12)) if v is not None]
    assert versions and len(set(versions)) == len(versions)
    listed = c.get(f"{server.api}/policy/versions", auth=auth).json()
    assert sorted(i["version"] for i in listed["items"]) == sorted(versions)
    assert c.get(f"{server.api}/draft", auth=auth).json()["pending"] is False
    rules = {r["name"] for r in _bundle(server)["policy"]["rules"]}
    assert rules == {f"r{i}" for i in range(12)}
