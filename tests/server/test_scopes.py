"""Scoped API keys: every route of the application against a key of each
scope (403 exactly where aus.server.access.ROUTES says, with a JSON or SCIM
body naming both scopes), no route without an entry, out-of-scope bodies
refused before they are read, revoked keys refused at once (also from the
cache, also by revoked_at alone), the CLI's scopes, labels, list, revoke
and their audit records, and one log line per refused authentication with
the client's address and the key id, never the secret."""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from aus.server import access, scopes
from aus.server.app import create_app
from aus.server.auth import create_key, revoke_key
from aus.server.db import ApiKey, AuditEvent, open_database, utcnow
from tests.support.names import free_port
from tests.support.server_process import CLI, output_of, serving, wait_port

SCOPES = scopes.ALL
PARAMS = {"org_id": "1", "version": "1", "rest": "Nothing"}   # any other parameter: "x"


@pytest.fixture
def app_keys(tmp_path):
    """A served app and one key of org 1 per scope."""
    db = f"sqlite:///{tmp_path}/s.db"
    engine, sessions = open_database(db)
    keys = {s: create_key(sessions, "1", [s], label=f"{s} key") for s in SCOPES}
    engine.dispose()
    with TestClient(create_app(db, bundle_interval=0.05, max_wait=5)) as client:
        yield client, keys, db


def _routes(app) -> list[tuple[str, str]]:
    """(method, path template) of every route the application serves."""
    out = []
    for rc in iter_route_contexts(app.routes):
        methods = rc.methods or {access.ALL_METHODS}   # a mount: every method
        out += [(m, rc.path) for m in sorted(methods)]
    return out


def _url(template: str) -> str:
    return re.sub(r"\{(\w+)(:\w+)?\}", lambda m: PARAMS.get(m.group(1), "x"), template)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_has_an_entry(app_keys):
    client = app_keys[0]
    routes = _routes(client.app)
    assert len(routes) > 40
    missing = [(m, p) for m, p in routes
               if p not in access.ROUTES or not ({m, access.ALL_METHODS} & set(access.ROUTES[p]))]
    assert not missing, f"routes without a scope in aus.server.access.ROUTES: {missing}"


def test_scope_matrix(app_keys):
    """Each route, each scope: 403 exactly where the table says."""
    client, keys, _db = app_keys
    checked = 0
    for method, template in _routes(client.app):
        needed = access.needs(method, template)
        url = _url(template + ("/index.html" if template == "/console" else ""))
        method = "GET" if method == access.ALL_METHODS else method
        if needed == access.PUBLIC:
            r = client.request(method, url)
            assert r.status_code not in (401, 403), (method, url, r.status_code, r.text)
            continue
        for scope in SCOPES:
            r = client.request(method, url, headers=_bearer(keys[scope]))
            allowed = scope == scopes.ADMIN or needed in (scope, access.ANY)
            where = (method, url, scope, needed, r.status_code, r.text[:300])
            if allowed:
                assert r.status_code not in (401, 403), where
                continue
            assert r.status_code == 403, where
            checked += 1
            if method == "HEAD":
                continue   # no body
            detail = f"key has scope {scope}; this route needs {needed}"
            body = r.json()
            if template.startswith("/scim/"):
                assert r.headers["content-type"].startswith("application/scim+json"), where
                assert body["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
                assert body["status"] == "403" and detail in body["detail"], where
            else:
                assert body["detail"] == detail, where
                assert body["error"]["status"] == 403 and detail in body["error"]["message"]
    assert checked > 100   # the matrix really refused


def test_the_table_says_what_the_scopes_promise():
    """scim: SCIM alone; workload: bundle and flows alone; read: every GET
    of the management API; admin: every change."""
    for template, methods in access.ROUTES.items():
        for method, needed in methods.items():
            if template.startswith("/scim/orgs/"):
                assert needed == scopes.SCIM, (method, template)
            elif template in ("/api/orgs/{org_id}/bundle", "/api/orgs/{org_id}/flows"):
                assert needed == scopes.WORKLOAD, (method, template)
            elif template.startswith("/api/orgs/") and method == "GET":
                assert needed in (scopes.READ, access.ANY), (method, template)
            elif template.startswith("/api/orgs/") and template != "/api/orgs/{org_id}/draft/preview":
                assert needed == scopes.ADMIN, (method, template)
    assert access.needs("GET", "/api/orgs/{org_id}/audit") == scopes.READ
    assert access.needs("POST", "/api/orgs/{org_id}/a-route-not-listed") == scopes.ADMIN


def test_out_of_scope_body_is_refused_before_it_is_read(app_keys):
    """The input gate holds a body's sender to the route's scope: a flow
    batch announced far past its size cap is a 403, not a 413."""
    client, keys, _db = app_keys
    huge = {"Content-Length": str(10**9), "Content-Type": "application/json"}
    r = client.post("/api/orgs/1/flows", headers={**_bearer(keys["read"]), **huge}, content=b"{}")
    assert r.status_code == 403 and r.json()["detail"] == "key has scope read; this route needs workload"
    r = client.post("/api/orgs/1/flows", headers={**_bearer(keys["workload"]), **huge}, content=b"{}")
    assert r.status_code == 413
    r = client.post("/scim/orgs/1/Users", headers={**_bearer(keys["workload"]), **huge}, content=b"{}")
    assert r.status_code == 403 and "this route needs scim" in r.json()["detail"]
    assert r.json()["schemas"] == ["urn:ietf:params:scim:api:messages:2.0:Error"]
    # a path the table does not name is left to the router (here: its redirect)
    r = client.post("/api/orgs/1/flows/", headers=_bearer(keys["workload"]), content=b"{}",
                    follow_redirects=False)
    assert r.status_code == 307
    r = client.post("/api/orgs/1/rules", headers=_bearer(keys["read"]), json={"name": "x"})
    assert r.status_code == 403 and r.json()["detail"] == "key has scope read; this route needs admin"


def test_whoami_names_the_scopes_and_a_key_with_several_has_each(app_keys):
    client, keys, db = app_keys
    engine, sessions = open_database(db)
    both = create_key(sessions, "1", ["workload", "read"])
    engine.dispose()
    r = client.get("/api/whoami", headers=_bearer(keys["scim"]))
    assert r.status_code == 200 and r.json()["scopes"] == ["scim"]
    assert client.get("/api/whoami", headers=_bearer(both)).json()["scopes"] == ["workload", "read"]
    assert client.get("/api/orgs/1/rules", headers=_bearer(both)).status_code == 200
    assert client.get("/api/orgs/1/bundle", headers=_bearer(both)).status_code in (200, 404)
    r = client.put("/api/orgs/1/mode", headers=_bearer(both), json={"mode": "enforce"})
    assert r.status_code == 403 and r.json()["detail"] == "key has scope workload read; this route needs admin"


def test_revoked_key_is_refused_at_once_even_when_cached(app_keys):
    client, keys, db = app_keys
    engine, sessions = open_database(db)
    try:
        token = keys["read"]
        assert client.get("/api/orgs/1/rules", headers=_bearer(token)).status_code == 200
        assert client.get("/api/orgs/1/rules", headers=_bearer(token)).status_code == 200   # cached
        assert revoke_key(sessions, token.partition(":")[0], "1")
        r = client.get("/api/orgs/1/rules", headers=_bearer(token))
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        # revoked_at alone (as another tool might set it) is a revocation too
        other = keys["workload"]
        with sessions.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.id == other.partition(":")[0])
                      .values(revoked_at=utcnow()))
        assert client.get("/api/orgs/1/bundle", headers=_bearer(other)).status_code == 401
        assert client.post("/scim/orgs/1/Users", headers=_bearer(keys["scim"]),
                           json={}).status_code != 401   # the others still work
    finally:
        engine.dispose()


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), check=check, capture_output=True, text=True)


def test_cli_create_list_revoke_with_scopes_labels_and_audit(tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    plain = _cli("api-key", "create", "--org", "3", "--db", db).stdout.strip()
    entra = _cli("api-key", "create", "--org", "3", "--scope", "scim", "--label", "Entra ID",
                 "--db", db).stdout.strip()
    dash = _cli("api-key", "create", "--org", "3", "--scope", "read", "--scope", "workload",
                "--label", "dashboards", "--db", db).stdout.strip()
    assert all(t.count(":") == 1 and "\n" not in t for t in (plain, entra, dash))
    ids = [t.partition(":")[0] for t in (plain, entra, dash)]
    bad = _cli("api-key", "create", "--org", "3", "--scope", "root", "--db", db, check=False)
    assert bad.returncode == 2 and "invalid choice: 'root'" in bad.stderr
    bad = _cli("api-key", "create", "--org", "3", "--label", "a\x01b", "--db", db, check=False)
    assert bad.returncode == 2 and "control characters" in bad.stderr

    table = _cli("api-key", "list", "--org", "3", "--db", db).stdout.splitlines()
    assert table[0].split() == ["ID", "LABEL", "SCOPES", "CREATED", "REVOKED"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) == set(ids)
    assert re.search(r"\s-\s+admin\s+\d{4}-\d\d-\d\dT\S+Z\s+-$", rows[ids[0]])
    assert re.search(r"\sEntra ID\s+scim\s", rows[ids[1]])
    assert re.search(r"\sdashboards\s+workload,read\s", rows[ids[2]])
    for t in (plain, entra, dash):
        assert t.partition(":")[2] not in "\n".join(table)   # never a secret
    assert _cli("api-key", "list", "--org", "4", "--db", db).stdout.splitlines()[1:] == []

    wrong_org = _cli("api-key", "revoke", "--org", "4", ids[1], "--db", db, check=False)
    assert wrong_org.returncode == 1 and f"no API key {ids[1]!r} in org '4'" in wrong_org.stderr
    assert _cli("api-key", "revoke", "--org", "3", ids[1], "--db", db).stdout.strip() == f"revoked {ids[1]}"
    listed = json.loads(_cli("api-key", "list", "--org", "3", "--json", "--db", db).stdout)["items"]
    by_id = {k["id"]: k for k in listed}
    assert by_id[ids[1]]["revoked"] is True and by_id[ids[1]]["revoked_at"].endswith("Z")
    assert by_id[ids[2]] | {"created_at": None} == {
        "id": ids[2], "label": "dashboards", "scopes": ["workload", "read"],
        "created_at": None, "revoked_at": None, "revoked": False}

    engine, sessions = open_database(db)
    try:
        with sessions() as s:
            events = s.scalars(select(AuditEvent).where(AuditEvent.org_id == "3")
                               .order_by(AuditEvent.id)).all()
            seen = [(e.key_id, e.action, e.target) for e in events]
            revoke = events[-1]
            assert (revoke.before["revoked"], revoke.after["revoked"]) == (False, True)
            assert events[1].after["label"] == "Entra ID" and events[1].before is None
            assert "secret" not in json.dumps([e.after for e in events])
    finally:
        engine.dispose()
    assert seen == [("cli", "api_key.create", ids[0]), ("cli", "api_key.create", ids[1]),
                    ("cli", "api_key.create", ids[2]), ("cli", "api_key.revoke", ids[1])]


def _get(port: int, path: str, auth: str, source: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": auth})
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def test_refused_authentications_are_logged_with_address_and_key_id(tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    token = _cli("api-key", "create", "--org", "1", "--scope", "workload", "--db", db).stdout.strip()
    key_id, _, secret = token.partition(":")
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db, "--log-level", "WARNING") as proc:
        wait_port(port, proc)
        wrong = "Basic " + base64.b64encode(f"{key_id}:{secret}WRONG".encode()).decode()
        assert _get(port, "/api/orgs/1/rules", wrong, "127.0.0.61") == 401
        assert _get(port, "/scim/orgs/1/Users", "Bearer garbage", "127.0.0.62") == 401
        assert _get(port, "/api/orgs/1/rules", f"Bearer {token}", "127.0.0.63") == 403
        assert _get(port, "/api/orgs/1/bundle", f"Bearer {token}", "127.0.0.64") in (200, 404)
        lines = [ln for ln in output_of(proc).splitlines() if "aus.auth" in ln]
    assert len(lines) == 3, lines
    assert all(" WARNING aus.auth: authentication refused" in ln for ln in lines)
    assert "GET /api/orgs/1/rules from 127.0.0.61, key " + key_id + ": 401 invalid API key" in lines[0]
    assert "GET /scim/orgs/1/Users from 127.0.0.62, key -: 401 the credentials must have" in lines[1]
    assert (f"from 127.0.0.63, key {key_id}: 403 this API key may not use this route: "
            f"key has scope workload; this route needs read") in lines[2]
    assert not any(secret in ln for ln in lines)
