"""The bundle never freezes: what the bundle build would refuse is refused
when it is written (nothing committed, the org's data intact), and a build
that fails anyway (a row written into the store past the API) keeps
publishing the current memberships, says so on /policy, and is retried
with back-off instead of five times a second."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

import pytest
from sqlalchemy import text

from aus.core.bundle import bundle_from_bytes
from aus.server.bundle import RETRY_MAX, retry_delay, touch
from aus.server.db import open_database
from tests.support.migrations import store_at
from tests.support.polling import wait_until
from tests.support.provision import provision
from tests.support.server_seed import insert_rule_past_api, provision_past_api

USER = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTRA_GROUP = "urn:ietf:params:scim:schemas:extension:Microsoft:Entra:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


class Org:
    def __init__(self, server):
        self.s = server
        self.c = server.client
        self.auth = server.basic()

    def scim(self, method, path, body=None):
        return self.c.request(method, f"{self.s.scim}{path}", json=body,
                              headers={**self.s.bearer(), "Content-Type": "application/scim+json"})

    def user(self, name):
        r = self.scim("POST", "/Users", {"schemas": [USER], "userName": name, "active": True})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def group(self, name, members=(), external_id=None, sid=None):
        body = {"schemas": [GROUP], "displayName": name,
                "members": [{"value": m} for m in members]}
        if external_id is not None:
            body["externalId"] = external_id
        if sid is not None:
            body["schemas"] = [GROUP, ENTRA_GROUP]
            body[ENTRA_GROUP] = {"onPremisesSecurityIdentifier": sid}
        return self.scim("POST", "/Groups", body)

    def api(self, method, path, body=None):
        """A management request; a rule or IP-list write that succeeds is
        provisioned at once, so the bundle carries it."""
        r = self.c.request(method, f"{self.s.api}{path}", json=body, auth=self.auth)
        if method != "GET" and path.startswith(("/rules", "/ip-lists")) and r.status_code < 300:
            provision(self.c, self.s.api, auth=self.auth)
        return r

    def rule(self, name, sources, dest=("10.0.0.0/8",)):
        return self.api("POST", "/rules", {"name": name, "sources": list(sources),
                                           "destinations": list(dest), "services": ["80/tcp"]})

    def policy(self):
        r = self.api("GET", "/policy")
        assert r.status_code == 200, r.text
        return r.json()

    def bundle(self):
        r = self.api("GET", "/bundle")
        assert r.status_code == 200, r.text
        return bundle_from_bytes(r.content, "test")

    def snapshot(self):
        """Everything the org shows, to prove a refused write left nothing."""
        return (self.api("GET", "/rules").json(), self.api("GET", "/ip-lists").json(),
                self.c.get(f"{self.s.api}/groups", params={"limit": 500},
                           auth=self.auth).json()["items"],
                self.scim("GET", "/Groups").json()["Resources"], self.api("GET", "/bundle").content)


def _field(r):
    return r.json()["error"]["fields"][0]


# --------------------------------------------------------------------------
# Refused at write time


def test_a_rule_named_like_another_in_another_case_is_refused(server):
    o = Org(server)
    dev = o.group("DEV").json()["id"]
    assert o.rule("web", [dev]).status_code == 201
    other = o.rule("ssh", [dev]).json()["id"]
    before = o.snapshot()

    r = o.rule("WEB", [dev])
    assert r.status_code == 409, r.text
    assert _field(r) == {"field": "name", "message": "a rule named 'web' exists already "
                                                     "(rule names compare case-insensitively)"}
    r = o.api("PUT", f"/rules/{other}", {"name": "Web", "sources": [dev],
                                          "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status_code == 409 and _field(r)["field"] == "name", r.text
    assert o.snapshot() == before
    assert o.policy()["build"]["ok"] is True
    # A rule keeps its own name in another case.
    r = o.api("PUT", f"/rules/{other}", {"name": "SSH", "sources": [dev],
                                          "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status_code == 200, r.text
    assert [x.name for x in o.bundle().policy.rules] == ["web", "SSH"]


@pytest.mark.parametrize("name,reads_as", [("tcp", "a service literal"), ("ANY", "a service literal"),
                                           ("icmp", "a service literal"),
                                           ("10.1.2.3", "a CIDR/IP address"), ("::1", "a CIDR/IP address")])
def test_an_ip_list_named_like_a_literal_is_refused(server, name, reads_as):
    o = Org(server)
    dev = o.group("DEV").json()["id"]
    lst = o.api("POST", "/ip-lists", {"name": "dmz", "entries": ["192.0.2.0/24"]}).json()["id"]
    assert o.rule("to-dmz", [dev], dest=["dmz"]).status_code == 201
    before = o.snapshot()

    r = o.api("POST", "/ip-lists", {"name": name, "entries": ["192.0.2.0/24"]})
    assert r.status_code == 422, r.text
    assert _field(r)["field"] == "name" and f"reads as {reads_as}" in _field(r)["message"]
    # Renaming the list a rule uses would also rename the rule's destination.
    r = o.api("PUT", f"/ip-lists/{lst}", {"name": name, "entries": ["192.0.2.0/24"]})
    assert r.status_code == 422, r.text
    assert o.snapshot() == before
    assert o.policy()["build"]["ok"] is True


def test_a_second_group_with_the_same_external_id_is_refused_over_scim(server):
    o = Org(server)
    first = o.group("DEV", external_id="8f2c0c6e-aaaa").json()["id"]
    third = o.group("OPS", external_id="3d9e5a77-bbbb").json()["id"]
    assert o.rule("dev-web", [first, third]).status_code == 201
    before = o.snapshot()

    r = o.group("DEV-copy", external_id="8F2C0C6E-AAAA ")
    assert r.status_code == 409, r.text
    assert r.json()["scimType"] == "uniqueness" and first in r.json()["detail"]
    # PUT and PATCH that would give OPS the id of DEV: refused, nothing kept.
    r = o.scim("PUT", f"/Groups/{third}", {"schemas": [GROUP], "displayName": "OPS",
                                           "externalId": "8f2c0c6e-aaaa"})
    assert r.status_code == 409 and r.json()["scimType"] == "uniqueness", r.text
    r = o.scim("PATCH", f"/Groups/{third}", {"schemas": [PATCH], "Operations": [
        {"op": "replace", "path": "externalId", "value": "8f2c0c6e-aaaa"}]})
    assert r.status_code == 409 and r.json()["scimType"] == "uniqueness", r.text
    after = o.snapshot()
    # The failed operations are noted on the group (last sync), nothing else changed.
    assert after[0:2] == before[0:2] and after[4] == before[4]
    assert [g["external_id"] for g in after[2]] == [g["external_id"] for g in before[2]]
    ops = next(g for g in after[2] if g["id"] == third)
    assert ops["last_sync"]["outcome"].startswith("409 ")
    assert o.policy()["build"]["ok"] is True
    # The group keeps its own id, in another case too.
    r = o.scim("PATCH", f"/Groups/{third}", {"schemas": [PATCH], "Operations": [
        {"op": "replace", "path": "externalId", "value": "3D9E5A77-BBBB"}]})
    assert r.status_code == 204, r.text


def test_a_sid_given_twice_is_refused(server):
    o = Org(server)
    sid = "S-1-5-21-1004336348-1177238915-682003330-1104"
    dev = o.group("DEV", sid=sid)
    assert dev.status_code == 201, dev.text
    before = o.snapshot()
    r = o.api("POST", "/groups", {"display_name": "Finance", "sid": sid.lower()})
    assert r.status_code == 409 and _field(r)["field"] == "sid", r.text
    assert dev.json()["id"] in _field(r)["message"]
    r = o.group("OPS", sid=sid)
    assert r.status_code == 409 and r.json()["scimType"] == "uniqueness", r.text
    assert o.snapshot() == before


# --------------------------------------------------------------------------
# A build that fails anyway


def _wait(what, pred, timeout=10.0):
    return wait_until(pred, timeout, interval=0.02, what=what)


def test_a_build_that_fails_keeps_publishing_memberships_and_says_so(server, caplog):
    caplog.set_level(logging.ERROR, logger="aus.server.bundle")
    o = Org(server)
    alice, bob, carol = o.user("alice"), o.user("bob"), o.user("carol")
    dev = o.group("DEV", [alice, bob]).json()["id"]
    ops = o.group("OPS", [carol]).json()["id"]
    assert o.rule("dev-web", [dev]).status_code == 201
    good = o.bundle()
    assert good.members == {"DEV": ("alice", "bob")}

    insert_rule_past_api(server.db_url, "1", "DEV-WEB", ops)
    status = _wait("the failed build on /policy", lambda: (p := o.policy())["build"]["ok"] is False and p)
    build = status["build"]
    assert "duplicate rule name 'DEV-WEB'" in build["error"], build
    assert build["attempts"] >= 1 and build["since"] and build["next_attempt_at"]
    assert build["failures_total"] >= 1
    assert build["published"] == "the last good policy with the current members of its groups"
    assert any("cannot be built" in r.getMessage() and "DEV-WEB" in r.getMessage()
               for r in caplog.records)

    # Entra removes alice from DEV, then disables bob: both reach the bundle.
    t0 = time.monotonic()
    r = o.scim("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
        {"op": "remove", "path": f'members[value eq "{alice}"]'}]})
    assert r.status_code == 204, r.text
    b = _wait("alice's removal in the bundle", lambda: (b := o.bundle()).members["DEV"] == ("bob",) and b)
    assert time.monotonic() - t0 < 3
    assert b.policy == good.policy and b.version > good.version
    r = o.scim("PATCH", f"/Users/{bob}", {"schemas": [PATCH], "Operations": [
        {"op": "replace", "path": "active", "value": "False"}]})
    assert r.status_code == 200, r.text
    b = _wait("bob's disable in the bundle", lambda: (b := o.bundle()).members["DEV"] == () and b)
    assert b.policy == good.policy
    assert o.policy()["build"]["ok"] is False

    # Fixed through the API (renaming the bad rule), the policy builds again.
    rules = o.api("GET", "/rules").json()["items"]
    bad = next(x for x in rules if x["name"] == "DEV-WEB")
    r = o.api("PUT", f"/rules/{bad['id']}", {"name": "ops-ssh", "sources": [ops],
                                              "destinations": ["10.9.0.0/16"], "services": ["22/tcp"]})
    assert r.status_code == 200, r.text
    p = o.policy()
    assert p["build"]["ok"] is True and p["build"]["error"] is None and p["build"]["attempts"] == 0
    assert p["build"]["failures_total"] >= 1
    assert [x.name for x in o.bundle().policy.rules] == ["dev-web", "ops-ssh"]


def test_a_failing_build_is_retried_with_back_off(server):
    o = Org(server)
    dev = o.group("DEV", [o.user("alice")]).json()["id"]
    assert o.rule("dev-web", [dev]).status_code == 201
    insert_rule_past_api(server.db_url, "1", "Dev-Web", dev)
    # Watch the attempts without writing anything (a write retries at once).
    seen: list[tuple[float, int]] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 7.5:
        n = o.policy()["build"]["attempts"]
        if not seen or seen[-1][1] != n:
            seen.append((time.monotonic() - t0, n))
        time.sleep(0.05)
    tried = [(t, n) for t, n in seen if n]
    # Before: one attempt every 0.2 s, about 37 in this time. Now 1 s, 2 s,
    # 4 s apart: 3 or 4 attempts (the first at once).
    assert 3 <= tried[-1][1] <= 4, seen
    assert [n for _, n in tried] == list(range(tried[0][1], tried[-1][1] + 1)), seen
    gaps = [b[0] - a[0] for a, b in zip(tried, tried[1:])]
    assert len(gaps) >= 2 and all(g >= 0.8 for g in gaps), seen
    assert gaps == sorted(gaps), seen     # the waits grow


def test_retry_delays_double_up_to_five_minutes():
    assert [retry_delay(n) for n in range(1, 12)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert retry_delay(10_000) == RETRY_MAX == 300


def test_an_old_clash_does_not_block_member_writes(server):
    """A clash already in the store (from before the write-time checks):
    membership writes to the groups involved still go through, and the
    published bundle follows them."""
    o = Org(server)
    alice = o.user("alice")
    dev = o.group("DEV", [alice], external_id="ext-1").json()["id"]
    assert o.rule("dev-web", [dev]).status_code == 201
    ops = o.group("OPS", [alice]).json()["id"]
    engine, sessions = open_database(server.db_url)
    try:
        with sessions.begin() as s:   # OPS gets DEV's external id past SCIM
            s.execute(text("UPDATE groups SET external_id = 'EXT-1' WHERE id = :g"), {"g": ops})
            touch(s, "1")
    finally:
        engine.dispose()
    r = o.c.post(f"{o.s.api}/rules", auth=o.auth, json={
        "name": "ops-web", "sources": [ops], "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    # Provisioning refuses the clash; written past the API, it is in force.
    r = o.c.post(f"{o.s.api}/provision", json={}, auth=o.auth)
    assert r.status_code == 422 and "duplicate external_id 'EXT-1'" in r.text, r.text
    engine, sessions = open_database(server.db_url)
    try:
        with sessions.begin() as s:
            provision_past_api(s, "1")
            touch(s, "1")
    finally:
        engine.dispose()
    p = _wait("the failed build", lambda: (p := o.policy())["build"]["ok"] is False and p)
    assert "duplicate external_id 'EXT-1'" in p["build"]["error"]
    r = o.scim("PATCH", f"/Groups/{dev}", {"schemas": [PATCH], "Operations": [
        {"op": "remove", "path": "members"}]})
    assert r.status_code == 204, r.text
    _wait("DEV emptied in the bundle", lambda: o.bundle().members["DEV"] == ())
    assert json.loads(o.api("GET", "/bundle").content)["policy"]["rules"][0]["name"] == "dev-web"


# --------------------------------------------------------------------------
# Cost of the checks


def test_the_write_time_checks_cost_an_index_probe_at_20000_groups(server, capsys):
    """At 20,000 groups (one rule naming all of them) the checks probe an
    index; shown beside a scan of the groups and a build of the bundle,
    the two ways the same answer could be had without the key columns."""
    from statistics import median

    from sqlalchemy import insert, select

    from aus.core.policy import external_id_key
    from aus.server import policycheck
    from aus.server.bundle import _document, content_from_spec
    from aus.server.db import Group, Rule, RuleSource, fold
    from aus.server.policyversions import draft_spec

    n = 20_000
    engine, sessions = open_database(server.db_url)
    try:
        with sessions.begin() as s:
            s.execute(insert(Group), [
                {"id": f"g{i:05d}", "org_id": "1", "display_name": f"Group {i}",
                 "display_name_key": fold(f"Group {i}"), "external_id": f"EXT-{i:05d}",
                 "external_id_key": external_id_key(f"EXT-{i:05d}"), "source": "scim", "doc": {},
                 "version": 1} for i in range(n)])
            s.add(Rule(id="r1", org_id="1", name="all", destinations=["10.0.0.0/8"],
                       services=["80/tcp"], position=1))
            s.flush()
            s.execute(insert(RuleSource), [{"rule_id": "r1", "group_id": f"g{i:05d}", "position": i}
                                           for i in range(n)])
            touch(s, "1")

        def timed(fn, rounds=7):
            out = []
            for _ in range(rounds):
                with sessions.begin() as s:
                    t = time.perf_counter()
                    fn(s)
                    out.append(time.perf_counter() - t)
            return median(out) * 1000

        def naive_scan(s):
            key = external_id_key("ext-12345")
            return [g for g, e in s.execute(select(Group.id, Group.external_id)
                                            .where(Group.org_id == "1"))
                    if e and external_id_key(e) == key and g != "g00001"]

        def full_build(s):   # as a provision of the draft builds it
            _document("1", 1, dt.datetime.now(dt.timezone.utc),
                      content_from_spec(s, "1", draft_spec(s, "1")))

        probe = timed(lambda s: (policycheck.group_ids(s, "1", "g00001", external_id="ext-77777"),
                                 policycheck.rule_name(s, "1", "new", "other")))
        scan = timed(naive_scan)
        build = timed(full_build, rounds=3)
        with pytest.raises(policycheck.WriteRefused):
            with sessions.begin() as s:
                policycheck.group_ids(s, "1", "g00001", external_id="ext-12345")
        if server.db_url.startswith("sqlite"):
            with engine.connect() as conn:
                plan = " ".join(str(r) for r in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN SELECT id FROM groups WHERE org_id = '1' "
                    "AND external_id_key = 'x' AND id != 'y'"))
            assert "ix_groups_org_external_key" in plan, plan
    finally:
        engine.dispose()
    with capsys.disabled():
        print(f"\n[{server.db_url.split(':')[0]}] write-time checks at {n} groups: index probe "
              f"{probe:.2f} ms, naive scan {scan:.1f} ms, full bundle build {build:.0f} ms")
    assert probe * 5 < scan < build


def test_concurrent_writes_neither_deadlock_nor_slip_a_clash_through(server):
    """The check's lock of the org row is the one every write takes last:
    concurrent group creates all succeed (on PostgreSQL a stronger lock
    deadlocked with the rows' foreign-key locks), and of writes racing
    with one name or one externalId exactly one is kept."""
    import concurrent.futures

    o = Org(server)
    dev = o.group("DEV").json()["id"]
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        codes = list(ex.map(lambda i: o.group(f"g{i}", external_id=f"ext-{i}").status_code, range(40)))
        assert codes == [201] * 40
        clash = list(ex.map(lambda i: o.group(f"dup{i}", external_id="EXT-SAME" if i % 2 else "ext-same")
                            .status_code, range(8)))
        rules = list(ex.map(lambda i: o.rule("web" if i % 2 else "WEB", [dev]).status_code, range(8)))
    assert sorted(clash) == [201] + [409] * 7, clash
    assert sorted(rules) == [201] + [409] * 7, rules
    assert o.policy()["build"]["ok"] is True


def test_the_migration_fills_the_keys_of_rows_already_there(tmp_path):
    """0002 on a store at 0001 holding a clash: the keys are filled as the
    application computes them, the clash is kept (the build reports it),
    and nothing is refused by the upgrade itself."""
    url = f"sqlite:///{tmp_path}/old.db"
    engine = store_at(url, "0001")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('1', '2026-01-01', 0)")
        conn.exec_driver_sql("INSERT INTO bundles (org_id, version, generation, digest, body, built_at)"
                             " VALUES ('1', 3, 0, 'd', '{}', '2026-01-01')")
        for i, (name, ext) in enumerate([("WEB", "Ext-Straße"), ("web", None)]):
            conn.exec_driver_sql(
                "INSERT INTO rules (id, org_id, name, description, destinations, services, position,"
                " created_at, modified_at) VALUES (?, '1', ?, '', '[]', '[]', 0, '2026-01-01', '2026-01-01')",
                (f"r{i}", name))
            conn.exec_driver_sql(
                "INSERT INTO groups (id, org_id, display_name, display_name_key, external_id, source, doc,"
                " created_at, modified_at, version) VALUES (?, '1', ?, ?, ?, 'scim', '{}', '2026-01-01',"
                " '2026-01-01', 1)", (f"g{i}", f"G{i}", f"g{i}", ext))
    engine.dispose()
    engine, _sessions = open_database(url)     # upgrades to head
    try:
        with engine.connect() as conn:
            assert sorted(conn.exec_driver_sql("SELECT name, name_key FROM rules")) == [
                ("WEB", "web"), ("web", "web")]
            assert sorted(conn.exec_driver_sql("SELECT id, external_id_key FROM groups")) == [
                ("g0", "ext-strasse"), ("g1", None)]
            assert list(conn.exec_driver_sql(
                "SELECT version, build_attempts, build_failures_total, build_error FROM bundles")) == [
                (3, 0, 0, None)]
    finally:
        engine.dispose()
