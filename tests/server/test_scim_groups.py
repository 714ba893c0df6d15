"""Group writes under load and failure: parallel member PATCHes through a
real HTTP server, big member PATCHes, a 50,000-member group, all-or-nothing
PATCHes, the group's last-sync record, the bundle generation, pagination."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid

import httpx
import uvicorn
from sqlalchemy import func, insert, select

from aus.server.app import create_app
from aus.server.db import Group, Membership, Org, User, fold, open_database, utcnow

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


def patch(*ops):
    return {"schemas": [PATCH], "Operations": list(ops)}


def add_members(ids):
    return patch({"op": "Add", "path": "members", "value": [{"value": i} for i in ids]})


@contextlib.contextmanager
def database(url):
    engine, sessions = open_database(url)
    try:
        yield sessions
    finally:
        engine.dispose()


def bulk_users(url, org, n, prefix="user"):
    """n users written straight into the store, as the SCIM layer stores them."""
    ids = [str(uuid.uuid4()) for _ in range(n)]
    now = utcnow()
    rows = [{"id": i, "org_id": org, "user_name": f"{prefix}{k:06d}@contoso.com",
             "user_name_key": fold(f"{prefix}{k:06d}@contoso.com"), "external_id": None,
             "display_name": None, "active": True, "created_at": now, "modified_at": now,
             "version": 1, "doc": {"userName": f"{prefix}{k:06d}@contoso.com", "schemas": [CORE_USER]}}
            for k, i in enumerate(ids)]
    with database(url) as sessions, sessions.begin() as s:
        for k in range(0, n, 5000):
            s.execute(insert(User), rows[k:k + 5000])
    return ids


def new_group(server, name="Sales", members=()):
    r = server.client.post(f"{server.scim}/Groups", headers=server.bearer(), json={
        "schemas": [CORE_GROUP], "displayName": name, "members": [{"value": m} for m in members]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def member_ids(server, gid):
    r = server.client.get(f"{server.scim}/Groups/{gid}", headers=server.bearer())
    assert r.status_code == 200, r.text
    return {m["value"] for m in r.json()["members"]}


def group_row(url, gid):
    with database(url) as sessions, sessions() as s:
        g = s.get(Group, gid)
        s.expunge(g)
        return g


def generation(url, org="1"):
    with database(url) as sessions, sessions() as s:
        return s.scalar(select(Org.generation).where(Org.id == org))


@contextlib.contextmanager
def live_server(db_url):
    """The real ASGI app behind uvicorn on a loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(db_url, bundle_interval=0.05, max_wait=5)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                        limit_concurrency=1000))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


def run_threads(n, work):
    errors = []

    def wrapped(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_parallel_member_patches_lose_no_member(server):
    users = bulk_users(server.db_url, "1", 400)
    gid = new_group(server)
    statuses = []
    with live_server(server.db_url) as base:
        def adder(t):
            with httpx.Client(base_url=base, headers=server.bearer(), timeout=60) as c:
                for k in range(50):
                    r = c.patch(f"/scim/orgs/1/Groups/{gid}", json=add_members([users[t * 50 + k]]))
                    statuses.append(r.status_code)
                    assert r.status_code == 204, r.text
        run_threads(8, adder)

        # the same members added again, by every thread at once: idempotent
        def again(t):
            with httpx.Client(base_url=base, headers=server.bearer(), timeout=60) as c:
                r = c.patch(f"/scim/orgs/1/Groups/{gid}", json=add_members(users[:100]))
                assert r.status_code == 204, r.text
        run_threads(8, again)
    assert statuses == [204] * 400
    assert member_ids(server, gid) == set(users)
    with database(server.db_url) as sessions, sessions() as s:
        assert s.scalar(select(func.count()).select_from(Membership)
                        .where(Membership.group_id == gid)) == 400
    assert group_row(server.db_url, gid).version == 1 + 400 + 8


def test_parallel_creates_of_one_name_make_one_user(server):
    results = []
    with live_server(server.db_url) as base:
        def creator(t):
            with httpx.Client(base_url=base, headers=server.bearer(), timeout=60) as c:
                r = c.post("/scim/orgs/1/Users", json={"schemas": [CORE_USER],
                                                       "userName": "Same@contoso.com" if t % 2 else "same@CONTOSO.com"})
                results.append(r.status_code)
                if r.status_code == 409:
                    assert r.json()["scimType"] == "uniqueness"
        run_threads(8, creator)
    assert sorted(results) == [201] + [409] * 7


def test_big_member_patches_in_one_request(server):
    c, h = server.client, server.bearer()
    users = bulk_users(server.db_url, "1", 5000)
    gid = new_group(server)
    t0 = time.monotonic()
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=add_members(users))
    took = time.monotonic() - t0
    assert r.status_code == 204, r.text
    assert took < 20, f"adding 5000 members took {took:.1f} s"
    assert member_ids(server, gid) == set(users)
    assert group_row(server.db_url, gid).last_sync_op == "update: +5000 members"
    # remove half by value list (default Entra job), in one op
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Remove", "path": "members", "value": [{"value": u} for u in users[:2500]]}))
    assert r.status_code == 204, r.text
    assert member_ids(server, gid) == set(users[2500:])
    # a PUT with a members list replaces them
    r = c.put(f"{server.scim}/Groups/{gid}", headers=h, json={
        "schemas": [CORE_GROUP], "displayName": "Sales", "members": [{"value": u} for u in users[:10]]})
    assert r.status_code == 200 and {m["value"] for m in r.json()["members"]} == set(users[:10])
    # a PUT without members leaves them
    r = c.put(f"{server.scim}/Groups/{gid}", headers=h, json={"schemas": [CORE_GROUP],
                                                             "displayName": "Sales 2"})
    assert r.status_code == 200 and len(r.json()["members"]) == 10


def test_group_of_50000_members(server):
    c, h = server.client, server.bearer()
    users = bulk_users(server.db_url, "1", 50_000)
    gid = new_group(server, "Everyone")
    with database(server.db_url) as sessions, sessions.begin() as s:
        rows = [{"group_id": gid, "member_id": u, "member_type": "User"} for u in users]
        for k in range(0, len(rows), 10_000):
            s.execute(insert(Membership), rows[k:k + 10_000])
    t0 = time.monotonic()
    r = c.get(f"{server.scim}/Groups/{gid}", headers=h)
    took = time.monotonic() - t0
    assert r.status_code == 200
    members = r.json()["members"]
    assert len(members) == 50_000 and {m["value"] for m in members} == set(users)
    assert took < 15, f"GET of a 50,000-member group took {took:.1f} s"
    # what Entra asks for does not load members at all
    t0 = time.monotonic()
    r = c.get(f"{server.scim}/Groups", headers=h, params={
        "filter": 'displayName eq "everyone"', "excludedAttributes": "members"})
    assert r.json()["totalResults"] == 1 and "members" not in r.json()["Resources"][0]
    r = c.get(f"{server.scim}/Groups", headers=h, params={
        "filter": f'id eq "{gid}" and members eq "{users[-1]}"', "excludedAttributes": "members"})
    assert r.json()["totalResults"] == 1
    assert time.monotonic() - t0 < 2


def test_failed_patch_changes_nothing(server):
    c, h = server.client, server.bearer()
    u1, u2 = bulk_users(server.db_url, "1", 2)
    gid = new_group(server, "Before")
    gen = generation(server.db_url)
    # the 3rd op fails: the first two are undone
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Add", "path": "members", "value": [{"value": u1}]},
        {"op": "Replace", "path": "displayName", "value": "After"},
        {"op": "Add", "path": "members", "value": [{"value": u2}, {"value": "no-such-user"}]}))
    assert r.status_code == 400 and r.json()["scimType"] == "invalidValue"
    assert "no-such-user" in r.json()["detail"]
    body = c.get(f"{server.scim}/Groups/{gid}", headers=h).json()
    assert body["displayName"] == "Before" and body["members"] == [] and body["meta"]["version"] == 'W/"1"'
    assert generation(server.db_url) == gen
    # the same for a user
    r = c.post(f"{server.scim}/Users", headers=h, json={"schemas": [CORE_USER], "userName": "u@x",
                                                        "title": "old"})
    uid = r.json()["id"]
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json=patch(
        {"op": "replace", "path": "title", "value": "new"},
        {"op": "replace", "path": "displayName", "value": "New Name"},
        {"op": "replace", "path": "active", "value": "perhaps"}))
    assert r.status_code == 400
    body = c.get(f"{server.scim}/Users/{uid}", headers=h).json()
    assert body["title"] == "old" and "displayName" not in body and body["meta"]["version"] == 'W/"1"'


def test_last_sync_is_recorded_on_success_and_on_failure(server):
    c, h = server.client, server.bearer()
    (u1,) = bulk_users(server.db_url, "1", 1)
    gid = new_group(server)
    g = group_row(server.db_url, gid)
    assert (g.source, g.last_sync_op, g.last_sync_outcome) == ("scim", "create", "ok")
    created = g.last_sync_at
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=add_members([u1]))
    assert r.status_code == 204
    g = group_row(server.db_url, gid)
    assert (g.last_sync_op, g.last_sync_outcome) == ("update: +1 members", "ok")
    assert g.last_sync_at >= created
    # a failing PATCH: rolled back, yet the failure is on the group
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Remove", "path": "members", "value": [{"value": u1}]},
        {"op": "add", "path": "members", "value": [{"value": "ghost"}]}))
    assert r.status_code == 400
    g = group_row(server.db_url, gid)
    assert g.last_sync_op == "update"
    assert g.last_sync_outcome.startswith("400 members: no User or Group with id ghost")
    assert member_ids(server, gid) == {u1}
    # a request that does not even parse is recorded too
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "replace", "path": "members[", "value": "x"}))
    assert r.status_code == 400 and r.json()["scimType"] == "invalidPath"
    assert "invalid path" in group_row(server.db_url, gid).last_sync_outcome
    # a PUT that fails on uniqueness
    new_group(server, "Taken")
    r = c.put(f"{server.scim}/Groups/{gid}", headers=h, json={"schemas": [CORE_GROUP], "displayName": "taken"})
    assert r.status_code == 409
    g = group_row(server.db_url, gid)
    assert g.last_sync_op == "replace" and g.last_sync_outcome.startswith("409 ")
    # and success again
    r = c.put(f"{server.scim}/Groups/{gid}", headers=h, json={"schemas": [CORE_GROUP], "displayName": "Sales"})
    assert r.status_code == 200
    g = group_row(server.db_url, gid)
    assert (g.last_sync_op, g.last_sync_outcome) == ("replace", "ok")


def test_every_write_moves_the_bundle_generation(server):
    c, h = server.client, server.bearer()
    gens = [generation(server.db_url)]

    def step(r, status):
        assert r.status_code == status, r.text
        gens.append(generation(server.db_url))
        assert gens[-1] > gens[-2], (r.request.method, r.request.url)
        return r

    uid = step(c.post(f"{server.scim}/Users", headers=h,
                      json={"schemas": [CORE_USER], "userName": "u@x"}), 201).json()["id"]
    step(c.patch(f"{server.scim}/Users/{uid}", headers=h,
                 json=patch({"op": "replace", "path": "active", "value": False})), 200)
    step(c.put(f"{server.scim}/Users/{uid}", headers=h,
               json={"schemas": [CORE_USER], "userName": "u2@x"}), 200)
    gid = step(c.post(f"{server.scim}/Groups", headers=h,
                      json={"schemas": [CORE_GROUP], "displayName": "g"}), 201).json()["id"]
    step(c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=add_members([uid])), 204)
    step(c.put(f"{server.scim}/Groups/{gid}", headers=h,
               json={"schemas": [CORE_GROUP], "displayName": "g2"}), 200)
    step(c.delete(f"{server.scim}/Users/{uid}", headers=h), 204)
    step(c.delete(f"{server.scim}/Groups/{gid}", headers=h), 204)
    # reads, and a PATCH that changes nothing, leave it
    before = generation(server.db_url)
    uid = step(c.post(f"{server.scim}/Users", headers=h,
                      json={"schemas": [CORE_USER], "userName": "v@x", "title": "t"}), 201).json()["id"]
    before = generation(server.db_url)
    c.get(f"{server.scim}/Users", headers=h)
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h,
                json=patch({"op": "replace", "path": "title", "value": "t"}))
    assert r.status_code == 200 and r.json()["meta"]["version"] == 'W/"1"'
    assert generation(server.db_url) == before


def test_deletes_leave_no_membership_behind(server):
    c, h = server.client, server.bearer()
    u1, u2 = bulk_users(server.db_url, "1", 2)
    g1 = new_group(server, "a", members=[u1, u2])
    g2 = new_group(server, "b", members=[u1, g1])
    assert c.delete(f"{server.scim}/Users/{u1}", headers=h).status_code == 204
    assert member_ids(server, g1) == {u2} and member_ids(server, g2) == {g1}
    assert c.delete(f"{server.scim}/Groups/{g1}", headers=h).status_code == 204
    assert member_ids(server, g2) == set()
    with database(server.db_url) as sessions, sessions() as s:
        assert s.scalar(select(func.count()).select_from(Membership)) == 0


def test_pagination(server):
    c, h = server.client, server.bearer()
    names = [f"user{i:02d}@contoso.com" for i in range(25)]
    for n in reversed(names):
        assert c.post(f"{server.scim}/Users", headers=h, json={"schemas": [CORE_USER], "userName": n}).status_code == 201

    def page(**params):
        r = c.get(f"{server.scim}/Users", headers=h, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    seen = []
    for start in (1, 11, 21):
        body = page(startIndex=start, count=10)
        assert body["totalResults"] == 25 and body["startIndex"] == start
        assert body["itemsPerPage"] == len(body["Resources"]) == (10 if start < 21 else 5)
        seen += [u["userName"] for u in body["Resources"]]
    assert seen == names           # stable order, pages disjoint, nothing missed
    body = page(startIndex=26, count=10)
    assert body["totalResults"] == 25 and body["Resources"] == []
    body = page(count=0)
    assert body["totalResults"] == 25 and body["itemsPerPage"] == 0 and body["Resources"] == []
    body = page(startIndex=0, count=3)          # less than 1 is read as 1
    assert body["startIndex"] == 1 and [u["userName"] for u in body["Resources"]] == names[:3]
    body = page(count=-5)                       # negative is read as 0
    assert body["totalResults"] == 25 and body["Resources"] == []
    body = page(filter='userName sw "USER1"', startindex=2, COUNT=5)   # parameter names in any case
    assert body["totalResults"] == 10 and [u["userName"] for u in body["Resources"]] == names[11:16]
    assert len(page()["Resources"]) == 25       # default page size is 100
