"""The enforcement mode set on the server (SQLite and PostgreSQL): the org
default and per-workload modes, their precedence in the bundle, the
Workloads view with the last hour's denials from the flows table, bad
values, org isolation, and a change waking a long poll."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time

from sqlalchemy import delete, text

from aus.core.bundle import bundle_from_bytes
from aus.server.db import EnforcementMode, Flow, Org, open_database
from tests.support.migrations import migrate, store_at
from tests.support.polling import wait_until


def _bundle(server, token=None):
    r = server.client.get(f"{server.api}/bundle", auth=server.basic(token))
    assert r.status_code == 200, r.text
    return bundle_from_bytes(r.content, "test"), r


def _put(server, path, body, token=None):
    return server.client.put(f"{server.api}{path}", auth=server.basic(token), json=body)


def _workloads(server, token=None, org=None):
    r = server.client.get(f"/api/orgs/{org or server.org}/workloads", auth=server.basic(token))
    assert r.status_code == 200, r.text
    return r.json()


def _checkin(server, name, mode=None):
    headers = {"X-Aus-Workload": name, "X-Aus-Enforcing": "1"}
    if mode:
        headers["X-Aus-Mode"] = mode
    assert server.client.get(f"{server.api}/bundle", auth=server.basic(),
                             headers=headers).status_code == 200


def test_a_new_org_starts_in_visibility_and_the_bundle_says_so(server):
    assert server.client.get(f"{server.api}/mode", auth=server.basic()).json()["mode"] == \
        "visibility"
    b, _ = _bundle(server)
    assert b.enforcement is not None and b.enforcement.default == "visibility"
    assert b.enforcement.workloads == {}
    assert b.enforcement.mode_for("any-host") == ("visibility", "server:org")


def test_an_org_from_before_modes_sets_none_and_its_bundle_carries_no_key(server):
    """Orgs that existed before the migration have no default row: their
    bundle is what it was, and every ausd keeps its own mode."""
    engine, sessions = open_database(server.db_url)
    try:
        with sessions.begin() as s:
            s.execute(delete(EnforcementMode).where(EnforcementMode.org_id == server.org))
            s.execute(text("UPDATE orgs SET generation = generation + 1 WHERE id = :o"),
                      {"o": server.org})
    finally:
        engine.dispose()
    b = wait_until(lambda: (b := _bundle(server)[0]).enforcement is None and b,
                   what="a bundle without enforcement")
    assert "enforcement" not in b.data
    assert _workloads(server)["default_mode"] is None
    _checkin(server, "old-1")
    item = wait_until(lambda: _workloads(server)["items"], what="the check-in")[0]
    assert (item["mode"], item["mode_source"]) == (None, None)


def test_workload_mode_wins_over_the_org_default_and_null_returns_to_it(server):
    _checkin(server, "web-1", "visibility")
    _checkin(server, "web-2", "visibility")
    r = _put(server, "/mode", {"mode": "enforce"})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "enforce" and r.json()["changed"] is True
    key_id = server.token.split(":")[0]
    assert r.json()["changed_by"] == key_id
    r = _put(server, "/workloads/web-1/mode", {"mode": "visibility"})
    assert r.status_code == 200, r.text
    assert (r.json()["mode"], r.json()["mode_source"]) == ("visibility", "workload")
    assert r.json()["mode_changed_by"] == key_id

    b, resp = _bundle(server)
    assert b.enforcement.default == "enforce"
    assert b.enforcement.workloads == {"web-1": "visibility"}
    assert b.enforcement.mode_for("web-1") == ("visibility", "server:workload")
    assert b.enforcement.mode_for("web-2") == ("enforce", "server:org")
    assert resp.json()["version"] == r.json()["policy_version"]

    w = wait_until(lambda: len((w := _workloads(server))["items"]) == 2
                   and all(i["applied_mode"] for i in w["items"]) and w,
                   what="the check-ins")
    assert w["default_mode"] == "enforce"
    assert [(i["name"], i["mode"], i["mode_source"], i["applied_mode"]) for i in w["items"]] == [
        ("web-1", "visibility", "workload", "visibility"),
        ("web-2", "enforce", "org", "visibility")]

    r = _put(server, "/workloads/web-1/mode", {"mode": None})
    assert r.status_code == 200 and (r.json()["mode"], r.json()["mode_source"]) == \
        ("enforce", "org")
    b, _ = _bundle(server)
    assert b.enforcement.workloads == {} and b.enforcement.mode_for("web-1") == \
        ("enforce", "server:org")


def test_a_workload_not_seen_yet_gets_its_mode_ahead_of_its_first_check_in(server):
    r = _put(server, "/workloads/db-7/mode", {"mode": "enforce"})
    assert r.status_code == 200, r.text
    item = _workloads(server)["items"][0]
    assert item["name"] == "db-7" and item["last_seen"] is None
    assert (item["mode"], item["mode_source"]) == ("enforce", "workload")
    assert _bundle(server)[0].enforcement.workloads == {"db-7": "enforce"}
    _checkin(server, "db-7", "enforce")
    item = wait_until(lambda: (i := _workloads(server)["items"][0])["last_seen"] and i,
                      what="the check-in")
    assert (item["mode"], item["mode_source"], item["applied_mode"]) == \
        ("enforce", "workload", "enforce")
    # returned to the default before it was ever seen: listed nowhere
    r = _put(server, "/workloads/ghost/mode", {"mode": "enforce"})
    assert r.status_code == 200
    r = _put(server, "/workloads/ghost/mode", {"mode": None})
    assert r.status_code == 200 and r.json()["mode_source"] == "org"
    assert [i["name"] for i in _workloads(server)["items"]] == ["db-7"]


def test_an_unchanged_mode_publishes_no_new_version(server):
    first = _put(server, "/mode", {"mode": "enforce"}).json()
    again = _put(server, "/mode", {"mode": "enforce"}).json()
    assert again["changed"] is False and again["policy_version"] == first["policy_version"]


def test_bad_values_are_refused_with_the_field_and_change_nothing(server):
    before, _ = _bundle(server)
    cases = [
        ("/mode", {"mode": "enforcing"}, "mode", "expected 'visibility' or 'enforce'"),
        ("/mode", {"mode": None}, "mode", "expected 'visibility' or 'enforce'"),
        ("/mode", {}, "mode", "required"),
        ("/mode", {"mode": "enforce", "why": "x"}, "why", "unknown key"),
        ("/mode", ["enforce"], "body", "expected a JSON object"),
        ("/workloads/web-1/mode", {"mode": 1}, "mode", "or null"),
        ("/workloads/web-1/mode", {"mode": "ENFORCE"}, "mode", "got 'ENFORCE'"),
        ("/workloads/%20%20/mode", {"mode": "enforce"}, "name", "not a workload name"),
        ("/workloads/" + "w" * 256 + "/mode", {"mode": "enforce"}, "name", "1 to 255"),
    ]
    for path, body, field, words in cases:
        r = _put(server, path, body)
        assert r.status_code == 400, (path, body, r.text)
        err = r.json()["error"]
        assert err["fields"][0]["field"] == field, (path, body, err)
        assert words in err["fields"][0]["message"], (path, body, err)
    after, _ = _bundle(server)
    assert after.version == before.version and after.enforcement == before.enforcement
    assert _workloads(server)["items"] == []


def test_the_console_reads_modes_and_counts_of_its_own_org_only(server):
    other_api = "/api/orgs/2"
    c = server.client
    assert _put(server, "/mode", {"mode": "enforce"}).status_code == 200
    assert _put(server, "/workloads/shared-name/mode", {"mode": "enforce"}).status_code == 200
    # org 2's key can neither read nor write org 1's modes
    for method, path, body in (("PUT", "/mode", {"mode": "visibility"}),
                               ("PUT", "/workloads/shared-name/mode", {"mode": "visibility"}),
                               ("GET", "/mode", None), ("GET", "/workloads", None)):
        r = c.request(method, f"{server.api}{path}", auth=server.basic(server.other_token),
                      json=body)
        assert r.status_code == 403, (method, path, r.text)
    # org 2's own setting does not touch org 1
    r = c.put(f"{other_api}/workloads/shared-name/mode", auth=server.basic(server.other_token),
              json={"mode": "visibility"})
    assert r.status_code == 200, r.text
    _seed_flows(server.db_url, "2", "shared-name", denied=50, would_deny=7)
    _seed_flows(server.db_url, "1", "shared-name", denied=3, would_deny=0)
    mine = _workloads(server)["items"]
    assert [(i["name"], i["mode"], i["denied_last_hour"], i["would_deny_last_hour"])
            for i in mine] == [("shared-name", "enforce", 3, 0)]
    theirs = _workloads(server, server.other_token, org="2")
    assert theirs["default_mode"] == "visibility"
    assert [(i["mode"], i["mode_source"], i["denied_last_hour"], i["would_deny_last_hour"])
            for i in theirs["items"]] == [("visibility", "workload", 50, 7)]
    b1, _ = _bundle(server)
    assert b1.enforcement.workloads == {"shared-name": "enforce"}


def _seed_flows(db_url, org, workload, *, denied, would_deny, ago=dt.timedelta(minutes=5),
                rows=None):
    now = dt.datetime.now(dt.timezone.utc)
    seen = now - ago
    hour = seen.replace(minute=0, second=0, microsecond=0)
    engine, sessions = open_database(db_url)
    try:
        with sessions.begin() as s:
            if s.get(Org, org) is None:
                s.add(Org(id=org, generation=0))
            for i, (verdict, n) in enumerate(rows or (("denied", denied),
                                                      ("would_deny", would_deny),
                                                      ("allowed", 1000))):
                if n:
                    s.add(Flow(org_id=org, hour=hour, workload=workload, login_uid=1000 + i,
                               user_name=f"user{i}", groups=["DEV"], process="curl",
                               dst="192.0.2.7", proto="tcp", port=443, verdict=verdict,
                               rule="", first_seen=seen, last_seen=seen, count=n))
    finally:
        engine.dispose()


def test_counts_are_the_last_hours_denied_and_would_be_denied(server):
    _checkin(server, "web-1")
    _checkin(server, "web-2")
    _seed_flows(server.db_url, "1", "web-1", denied=0, would_deny=0,
                rows=(("denied", 4), ("denied", 6), ("would_deny", 9), ("allowed", 500)))
    # older than an hour: not counted
    _seed_flows(server.db_url, "1", "web-1", denied=100, would_deny=100,
                ago=dt.timedelta(minutes=90))
    _seed_flows(server.db_url, "1", "web-2", denied=0, would_deny=2)
    items = wait_until(lambda: (w := _workloads(server)["items"])
                       and all(i["last_seen"] for i in w) and len(w) == 2 and w,
                       what="the check-ins")
    assert [(i["name"], i["denied_last_hour"], i["would_deny_last_hour"]) for i in items] == [
        ("web-1", 10, 9), ("web-2", 0, 2)]


def test_a_mode_change_wakes_a_long_poll_with_the_new_bundle(server):
    _, first = _bundle(server)
    etag = first.headers["etag"]
    got: dict = {}

    def poll():
        t = time.monotonic()
        resp = server.client.get(f"{server.api}/bundle", params={"wait": 4},
                                 auth=server.basic(),
                                 headers={"If-None-Match": etag, "X-Aus-Workload": "web-1"})
        got.update(status=resp.status_code, body=resp.content, elapsed=time.monotonic() - t)

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.5)
    r = _put(server, "/workloads/web-1/mode", {"mode": "enforce"})
    assert r.status_code == 200, r.text
    th.join(10)
    assert got["status"] == 200, got
    assert got["elapsed"] < 3.5, got["elapsed"]   # woke on the change
    b = bundle_from_bytes(got["body"], "long poll")
    assert b.enforcement.mode_for("web-1") == ("enforce", "server:workload")
    assert json.loads(got["body"])["version"] == r.json()["policy_version"]


def test_concurrent_first_settings_of_one_workload_all_succeed(server):
    """Settings of a name that has no row yet race to insert it: they
    queue on the org's lock instead of failing on the primary key."""
    results: list[int] = []

    def put(mode):
        results.append(_put(server, "/workloads/race-1/mode", {"mode": mode}).status_code)

    threads = [threading.Thread(target=put, args=(("enforce", "visibility")[i % 2],))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 8
    final = _workloads(server)["items"]
    assert [(i["name"], i["mode_source"]) for i in final] == [("race-1", "workload")]
    b, _ = _bundle(server)
    assert b.enforcement.workloads == {"race-1": final[0]["mode"]}


def test_the_upgrade_gives_existing_orgs_no_default(tmp_path):
    """0007 on a store at 0006: the org and its workloads stay as they
    were, no mode is set, and the bundle built afterwards has no
    enforcement key, so no running workload changes mode."""
    from aus.server.bundle import rebuild

    url = f"sqlite:///{tmp_path}/old.db"
    engine = store_at(url, "0006")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('1', '2026-01-01', 0)")
        conn.exec_driver_sql("INSERT INTO workloads (org_id, name, address, enforcing_version, last_seen)"
                             " VALUES ('1', 'web-1', '10.0.0.5', 3, '2026-01-01')")
    engine.dispose()
    engine, sessions = open_database(url)     # upgrades to head
    try:
        with sessions.begin() as s:
            body = json.loads(rebuild(s, "1").body)
        assert "enforcement" not in body
        with engine.connect() as conn:
            assert list(conn.exec_driver_sql("SELECT count(*) FROM enforcement_modes")) == [(0,)]
            assert list(conn.exec_driver_sql(
                "SELECT name, enforcing_version, applied_mode FROM workloads")) == [("web-1", 3, None)]
        migrate(engine, "0006", down=True)    # and back down
    finally:
        engine.dispose()
