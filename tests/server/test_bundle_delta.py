"""Delta and gzip bundles from aus-server: a daemon naming the version it
holds (since=) gets only the changes when the server can reach the
current version from there, else the whole bundle; gzip when asked; any
replica on the same PostgreSQL serves the same delta."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import pytest

import aus.server.bundle as server_bundle
from aus.core.bundle import (
    DELTA_MEDIA_TYPE,
    apply_delta,
    bundle_from_bytes,
    bundle_from_delta,
)
from aus.server import metrics
from aus.server.auth import create_key
from aus.server.db import Membership, PolicyVersion, open_database
from tests.support.migrations import migrate, store_at
from tests.support.names import free_port
from tests.support.provision import provision
from tests.support.server_process import serving, wait_port
from tests.support.server_seed import seed

PLAIN = {"Accept-Encoding": "identity"}
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def start(db_url: str, c, api: str, auth) -> dict[str, str]:
    # Members enough that a policy change is smaller than the whole bundle.
    crowd = [f"user-{i:03d}@contoso.com" for i in range(100)]
    ids = seed(db_url, "1", groups={"DEV": ["alice", "bob"], "OPS": ["carol"], "QA": crowd},
               users=["dave", "erin"])
    r = c.post(f"{api}/rules", auth=auth, json={
        "name": "dev-web", "sources": [ids["DEV"], ids["OPS"], ids["QA"]],
        "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    ids["rule"] = r.json()["id"]
    provision(c, api, auth=auth)
    return ids


def members(c, scim: str, headers: dict, group: str, op: str, *users: str) -> None:
    r = c.patch(f"{scim}/Groups/{group}", headers=headers, json={
        "schemas": [PATCH], "Operations": [
            {"op": op, "path": "members", "value": [{"value": u} for u in users]}]})
    assert r.status_code in (200, 204), r.text


def bundle(c, api: str, auth, *, since: int | None = None, etag: str | None = None,
           wait: int = 0, headers: dict | None = None) -> httpx.Response:
    q = f"?wait={wait}" + (f"&since={since}" if since is not None else "")
    h = {**(headers or PLAIN), **({"If-None-Match": etag} if etag else {})}
    r = c.get(f"{api}/bundle{q}", auth=auth, headers=h)
    assert r.status_code == 200, r.text
    return r


def next_version(c, api: str, auth, held: httpx.Response, **kw) -> httpx.Response:
    """The answer once the bundle moved past ``held`` (a full answer)."""
    return bundle(c, api, auth, etag=held.headers["etag"], wait=5, **kw)


def test_a_membership_change_comes_as_a_delta_that_makes_the_full_bundle(server):
    c, auth, api = server.client, server.basic(), server.api
    ids = start(server.db_url, c, api, auth)
    v1 = bundle(c, api, auth)
    held = bundle_from_bytes(v1.content, "v1")
    assert v1.headers["content-type"] == "application/json"
    assert "x-aus-delta-from" not in v1.headers

    members(c, server.scim, server.bearer(), ids["DEV"], "add", ids["dave"])
    r = next_version(c, api, auth, v1, since=held.version)
    assert r.headers["content-type"] == DELTA_MEDIA_TYPE
    assert r.headers["x-aus-delta-from"] == str(held.version)
    d = r.json()
    assert (d["format"], d["org"], d["from_version"]) == ("aus.bundle-delta/1", "1", held.version)
    assert d["members"] == {"add": {"DEV": ["dave"]}, "remove": {}}
    assert "policy" not in d and "enforcement" not in d
    full = bundle(c, api, auth)
    assert r.headers["x-aus-version"] == full.headers["x-aus-version"] == str(d["version"])
    assert r.headers["etag"] == full.headers["etag"]
    # Applied to what the daemon holds, it is the full bundle, digest and all.
    made = bundle_from_delta(held, r.content, "delta")
    assert made.data == json.loads(full.content)
    assert len(r.content) < len(full.content)

    # Two more changes: since=v1 gets them composed, since=v2 only the last.
    members(c, server.scim, server.bearer(), ids["DEV"], "remove", ids["alice"])
    v3 = next_version(c, api, auth, full)
    members(c, server.scim, server.bearer(), ids["OPS"], "add", ids["erin"], ids["alice"])
    v4 = next_version(c, api, auth, v3)
    composed = bundle(c, api, auth, since=held.version)
    assert composed.json()["members"] == {"add": {"DEV": ["dave"], "OPS": ["alice", "erin"]},
                                          "remove": {"DEV": ["alice"]}}
    assert bundle_from_delta(held, composed.content, "composed").data == json.loads(v4.content)
    last = bundle(c, api, auth, since=json.loads(v3.content)["version"])
    assert last.json()["members"] == {"add": {"OPS": ["alice", "erin"]}, "remove": {}}


def test_a_rule_change_carries_the_whole_policy(server):
    c, auth, api = server.client, server.basic(), server.api
    ids = start(server.db_url, c, api, auth)
    v1 = bundle(c, api, auth)
    r = c.put(f"{api}/rules/{ids['rule']}", auth=auth, json={
        "name": "dev-web", "sources": [ids["DEV"], ids["OPS"], ids["QA"]],
        "destinations": ["10.0.0.0/8"], "services": ["443/tcp"]})
    assert r.status_code == 200, r.text
    provision(c, api, auth=auth)
    r = bundle(c, api, auth, since=json.loads(v1.content)["version"])
    assert r.headers["content-type"] == DELTA_MEDIA_TYPE
    assert r.json()["policy"]["rules"][0]["services"] == ["443/tcp"]
    made = bundle_from_delta(bundle_from_bytes(v1.content, "v1"), r.content, "delta")
    assert made.data == json.loads(bundle(c, api, auth).content)


def test_the_full_bundle_when_since_is_unknown_future_current_or_too_old(server, monkeypatch):
    monkeypatch.setattr(server_bundle, "HISTORY", 2)
    c, auth, api = server.client, server.basic(), server.api
    ids = start(server.db_url, c, api, auth)
    v = [bundle(c, api, auth)]
    for user in ("dave", "erin", "alice"):
        members(c, server.scim, server.bearer(), ids["OPS"], "add", ids[user])
        v.append(next_version(c, api, auth, v[-1]))
    versions = [json.loads(r.content)["version"] for r in v]
    now = versions[-1]
    for since in (0, versions[0], now, now + 10):
        r = bundle(c, api, auth, since=since)
        assert r.headers["content-type"] == "application/json", since
        assert "x-aus-delta-from" not in r.headers
        assert r.content == v[-1].content
    # The last HISTORY deltas are kept: the versions before them are reachable.
    for since in versions[1:3]:
        assert bundle(c, api, auth, since=since).headers["content-type"] == DELTA_MEDIA_TYPE


@pytest.mark.parametrize("since", ["-1", "x", "1.5", str(2**40)])
def test_a_bad_since_is_refused_with_a_clear_422(server, since):
    c, auth, api = server.client, server.basic(), server.api
    start(server.db_url, c, api, auth)
    r = c.get(f"{api}/bundle?since={since}", auth=auth)
    assert r.status_code == 422, r.text
    assert [f["field"] for f in r.json()["error"]["fields"]] == ["since"]


def sample(name: str, **labels) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_gzip_when_the_client_takes_it(server):
    c, auth, api = server.client, server.basic(), server.api
    ids = start(server.db_url, c, api, auth)
    plain = bundle(c, api, auth)
    assert "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Accept-Encoding"
    for accept in ("gzip", "deflate, gzip;q=0.5", "*"):
        with c.stream("GET", f"{api}/bundle", auth=auth,
                      headers={"Accept-Encoding": accept}) as r:
            raw = b"".join(r.iter_raw())
        assert r.headers["content-encoding"] == "gzip", accept
        assert gzip.decompress(raw) == plain.content
    assert "content-encoding" not in bundle(c, api, auth,
                                            headers={"Accept-Encoding": "gzip;q=0"}).headers
    members(c, server.scim, server.bearer(), ids["DEV"], "add", ids["dave"])
    next_version(c, api, auth, plain)
    since = json.loads(plain.content)["version"]
    before = {"answers": sample("aus_server_bundle_answers_total", kind="delta", encoding="gzip"),
              "bytes": sample("aus_server_bundle_sent_bytes_total", kind="delta")}
    delta = bundle(c, api, auth, since=since)
    with c.stream("GET", f"{api}/bundle?since={since}", auth=auth,
                  headers={"Accept-Encoding": "gzip"}) as r:
        raw = b"".join(r.iter_raw())
    assert r.headers["content-type"] == DELTA_MEDIA_TYPE
    assert r.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == delta.content
    # Counted by kind and encoding, with the bytes as sent.
    assert sample("aus_server_bundle_answers_total", kind="delta", encoding="gzip") == \
        before["answers"] + 1
    assert sample("aus_server_bundle_sent_bytes_total", kind="delta") == \
        before["bytes"] + len(raw) + len(delta.content)


def test_two_replicas_serve_the_same_delta(postgres):
    name = postgres.new_database()
    try:
        db = postgres.url(name)
        engine, sessions = open_database(db)
        token = create_key(sessions, "1")
        engine.dispose()
        key, _, secret = token.partition(":")
        ports = [free_port(), free_port()]
        with serving("--listen", f"127.0.0.1:{ports[0]}", "--db", db,
                     "--log-level", "WARNING") as one, \
                serving("--listen", f"127.0.0.1:{ports[1]}", "--db", db,
                        "--log-level", "WARNING") as two:
            wait_port(ports[0], one)
            wait_port(ports[1], two)
            a, b = (httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=30) for p in ports)
            with a, b:
                auth = (key, secret)
                ids = start(db, a, "/api/orgs/1", auth)
                v1 = bundle(a, "/api/orgs/1", auth)
                since = json.loads(v1.content)["version"]
                members(a, "/scim/orgs/1", {"Authorization": f"Bearer {token}"},
                        ids["DEV"], "add", ids["dave"])
                answers = []
                for client in (a, b):
                    deadline = time.monotonic() + 20
                    while True:
                        r = bundle(client, "/api/orgs/1", auth, since=since,
                                   etag=v1.headers["etag"], wait=5)
                        if r.headers["content-type"] == DELTA_MEDIA_TYPE \
                                or time.monotonic() > deadline:
                            break
                    answers.append(r)
                assert [r.headers["content-type"] for r in answers] == [DELTA_MEDIA_TYPE] * 2
                assert answers[0].content == answers[1].content
                assert answers[0].headers["etag"] == answers[1].headers["etag"]
                made = bundle_from_delta(bundle_from_bytes(v1.content, "v1"),
                                         answers[1].content, "delta from replica 2")
                assert made.data == json.loads(bundle(b, "/api/orgs/1", auth).content)
    finally:
        postgres.drop_database(name)


def test_the_upgrade_adds_the_deltas_table_and_back_down(tmp_path):
    """0010 on a store at 0009: each build after the upgrade stores its
    delta, which makes the new bundle of the old; and back down."""
    url = f"sqlite:///{tmp_path}/old.db"
    engine = store_at(url, "0009")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO orgs (id, created_at, generation) VALUES ('1', "
                             "'2026-01-01', 0)")
    engine.dispose()
    ids = seed(url, "1", groups={"DEV": ["alice"]}, users=["bob"])
    engine, sessions = open_database(url)     # upgrades to head
    try:
        with sessions.begin() as s:
            s.add(PolicyVersion(org_id="1", version=1, policy={}, spec={"ip_lists": [], "rules": [
                {"id": "r1", "name": "dev-web", "sources": [{"id": ids["DEV"]}],
                 "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]}]}))
            old = json.loads(server_bundle.rebuild(s, "1").body)
            s.add(Membership(group_id=ids["DEV"], member_id=ids["bob"], member_type="User"))
            server_bundle.touch(s, "1")
        with sessions.begin() as s:
            new = json.loads(server_bundle.rebuild(s, "1").body)
        with engine.connect() as conn:
            rows = list(conn.exec_driver_sql("SELECT from_version, version, body FROM "
                                             "bundle_deltas"))
        assert [(f, v) for f, v, _ in rows] == [(old["version"], new["version"])]
        assert apply_delta(old, json.loads(rows[0][2]), "delta") == new
        migrate(engine, "0009", down=True)
        with engine.connect() as conn:
            tables = [r[0] for r in conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")]
        assert "bundle_deltas" not in tables and "ix_users_org_modified" not in tables
        assert "bundles" in tables
    finally:
        engine.dispose()


def test_a_stored_delta_that_breaks_gets_the_full_bundle(server, caplog):
    c, auth, api = server.client, server.basic(), server.api
    ids = start(server.db_url, c, api, auth)
    v1 = bundle(c, api, auth)
    members(c, server.scim, server.bearer(), ids["DEV"], "add", ids["dave"])
    v2 = next_version(c, api, auth, v1)
    engine, _ = open_database(server.db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE bundle_deltas SET body = '{\"members\": 1'")
    finally:
        engine.dispose()
    r = bundle(c, api, auth, since=json.loads(v1.content)["version"])
    assert r.headers["content-type"] == "application/json" and r.content == v2.content
    assert "cannot be made; sending the whole bundle" in caplog.text
