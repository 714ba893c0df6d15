"""Hostile and careless input to aus-server: each request once answered
500 (often after committing) or grew the server; now each is refused with a
4xx that says what and where, and the org's data is what it was."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time

import pytest

from aus.server.auth import create_key
from aus.server.db import open_database
from aus.server.intake import API_LIMIT, MAX_DEPTH, SCIM_LIMIT
from tests.support.server_process import serving, wait_port
from tests.support.server_state import (
    SCIM_ERROR,
    fingerprint,
    integrity_problems,
    scim_listing,
)

CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


@pytest.fixture
def org(server):
    """Org 1 with a user in a group and a rule; yields a checker that the
    data is unchanged and still readable."""
    c = server.client
    r = c.post(f"{server.scim}/Users", headers=server.bearer(),
               json={"schemas": [CORE_USER], "userName": "alice@contoso.com", "title": "dev"})
    assert r.status_code == 201, r.text
    uid = r.json()["id"]
    r = c.post(f"{server.scim}/Groups", headers=server.bearer(),
               json={"schemas": [CORE_GROUP], "displayName": "devs", "members": [{"value": uid}]})
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    r = c.post(f"{server.api}/rules", auth=server.basic(), json={
        "name": "web", "sources": [gid], "destinations": ["10.0.0.0/8"], "services": ["80/tcp"]})
    assert r.status_code == 201, r.text
    engine, _ = open_database(server.db_url)
    before = fingerprint(engine, server.org)

    def intact():
        assert fingerprint(engine, server.org) == before
        users = scim_listing(c, server.org, server.token, "Users")
        groups = scim_listing(c, server.org, server.token, "Groups")
        assert [u["userName"] for u in users] == ["alice@contoso.com"]
        assert [(g["displayName"], [m["value"] for m in g["members"]]) for g in groups] == \
            [("devs", [uid])]
        assert integrity_problems(server.db_url) == []

    try:
        yield {"user": uid, "group": gid, "intact": intact}
    finally:
        engine.dispose()


def scim_error(r, status, scim_type=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["schemas"] == [SCIM_ERROR] and body["status"] == str(status)
    assert body.get("scimType") == scim_type, body
    return body["detail"]


def api_error(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_unpaired_surrogate_and_nul_refused_at_the_boundary(server, org):
    c, h = server.client, {**server.bearer(), "Content-Type": "application/scim+json"}
    body = '{"schemas": ["%s"], "userName": "bob@contoso.com", "title": "\\udfff"}' % CORE_USER
    detail = scim_error(c.post(f"{server.scim}/Users", headers=h, content=body), 400, "invalidValue")
    assert "surrogate" in detail and "$.title" in detail
    body = '{"schemas": ["%s"], "userName": "bob\\u0000@contoso.com"}' % CORE_USER
    assert "NUL" in scim_error(c.post(f"{server.scim}/Users", headers=h, content=body), 400,
                               "invalidValue")
    patch = ('{"schemas": ["%s"], "Operations": [{"op": "replace", "path": "title", '
             '"value": "\\ud800x"}]}' % PATCH)
    scim_error(c.patch(f"{server.scim}/Users/{org['user']}", headers=h, content=patch), 400,
               "invalidValue")
    # the same in a filter, and in the management API
    scim_error(c.get(f"{server.scim}/Users", headers=h,
                     params={"filter": 'title eq "\\udfff"'}), 400, "invalidFilter")
    scim_error(c.get(f"{server.scim}/Users?filter=title%20eq%20%22a%00%22", headers=h), 400,
               "invalidValue")
    rule = '{"name": "x\\udfff", "sources": [], "destinations": [], "services": []}'
    assert "surrogate" in api_error(c.post(f"{server.api}/rules", auth=server.basic(),
                                           content=rule), 400)
    org["intact"]()


def test_attributes_projection_keeps_etag_and_location(server, org):
    c, h = server.client, server.bearer()
    r = c.post(f"{server.scim}/Users?attributes=meta.created", headers=h,
               json={"schemas": [CORE_USER], "userName": "carol@contoso.com"})
    assert r.status_code == 201, r.text
    assert "version" not in r.json().get("meta", {})
    assert r.headers["ETag"] == 'W/"1"' and r.headers["Location"].endswith(r.json()["id"])
    carol = r.json()["id"]
    r = c.patch(f"{server.scim}/Users/{carol}?attributes=meta.created", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "title", "value": "x"}]})
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"', r.text
    r = c.get(f"{server.scim}/Users/{carol}?attributes=userName", headers=h)
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"'
    r = c.patch(f"{server.scim}/Groups/{org['group']}?attributes=displayName", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members",
                                            "value": [{"value": carol}]}]})
    assert r.status_code == 200 and r.headers["ETag"] == 'W/"2"', r.text
    assert r.json()["displayName"] == "devs" and "meta" not in r.json()


def test_bad_authorization_headers_answer_401(server, org):
    c = server.client
    for value in ("Basic \xe9".encode("latin-1"), b"Bearer \xff\xfe", b"Basic @@@"):
        api_error(c.get(f"{server.api}/rules", headers={"Authorization": value}), 401)
        api_error(c.post(f"{server.api}/rules", headers={"Authorization": value}, json={}), 401)
        scim_error(c.get(f"{server.scim}/Users", headers={"Authorization": value}), 401)
    org["intact"]()


def test_numbers_in_headers_and_queries_are_bounded(server, org):
    c = server.client
    r = c.get(f"{server.api}/bundle", auth=server.basic(),
              headers={"X-Aus-Workload": "huge", "X-Aus-Enforcing": "9" * 30})
    assert r.status_code == 422, r.text
    r = c.get(f"{server.api}/bundle", auth=server.basic(),
              headers={"X-Aus-Workload": "fine", "X-Aus-Enforcing": "1"})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5          # check-ins are written in batches
    while time.monotonic() < deadline:
        names = [w["name"] for w in c.get(f"{server.api}/workloads",
                                           auth=server.basic()).json()["items"]]
        if names:
            break
        time.sleep(0.05)
    assert names == ["fine"]
    for q in ("offset=" + "9" * 20, "offset=-1", "limit=" + "9" * 4301):
        api_error(c.get(f"{server.api}/groups?{q}", auth=server.basic()), 422)
    h = server.bearer()
    for q in ("startIndex=1e30", "count=01x", "startIndex=%2B1", "count=%D9%A3", "startIndex=1.0"):
        assert "must be an integer" in scim_error(c.get(f"{server.scim}/Users?{q}", headers=h),
                                                  400, "invalidValue")
    # out of range is clamped as RFC 7644 §3.4.2.4 says; leading zeros are still digits
    for q, start, items in (("startIndex=" + "9" * 4301, 2**62, 0),
                            ("startIndex=" + str(2**64), 2**62, 0),
                            ("startIndex=-5&count=01", 1, 1), ("count=-3", 1, 0),
                            ("count=" + "9" * 30, 1, 1)):
        r = c.get(f"{server.scim}/Users?{q}", headers=h)
        assert r.status_code == 200, (q, r.text)
        assert (r.json()["startIndex"], r.json()["itemsPerPage"]) == (start, items), q
    org["intact"]()


def test_filters_are_bounded(server, org):
    c, h = server.client, server.bearer()
    cases = {
        "(" * 400 + 'userName eq "a"' + ")" * 400: "nest deeper",
        "not (" * 20 + "title pr" + ")" * 20: "nest deeper",
        " and ".join(["title pr"] * 1100): "longer than",
        " or ".join(['title eq "x"'] * 101): "more than 100",
        "title eq 01": "leading zeros",
        "title eq " + "9" * 4301: "more than 18 digits",
        "title eq " + "9" * 30: "more than 18 digits",
        "title eq 1e999": "out of range",
    }
    for flt, what in cases.items():
        assert what in scim_error(c.get(f"{server.scim}/Users", headers=h,
                                        params={"filter": flt}), 400, "invalidFilter"), flt[:80]
    # within the bounds a filter still works
    ok = " or ".join(['title eq "dev"'] * 100)
    r = c.get(f"{server.scim}/Users", headers=h, params={"filter": ok})
    assert r.status_code == 200 and r.json()["totalResults"] == 1
    r = c.get(f"{server.scim}/Users", headers=h,
              params={"filter": "(" * 16 + 'title eq "dev"' + ")" * 16})
    assert r.status_code == 200 and r.json()["totalResults"] == 1
    path = "members[" + " or ".join(['value eq "x"'] * 200) + "]"
    r = c.patch(f"{server.scim}/Groups/{org['group']}", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "remove", "path": path}]})
    assert "more than 100" in scim_error(r, 400, "invalidPath")
    org["intact"]()


def test_json_bodies_are_bounded(server, org):
    c, h = server.client, {**server.bearer(), "Content-Type": "application/scim+json"}
    deep = "[" * 100_000
    scim_error(c.post(f"{server.scim}/Users", headers=h, content=deep), 400, "invalidSyntax")
    api_error(c.post(f"{server.api}/rules", auth=server.basic(), content=deep), 400)
    nested = json.dumps({"schemas": [CORE_USER], "userName": "d@x",
                         "x": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))})
    assert "deeper" in scim_error(c.post(f"{server.scim}/Users", headers=h, content=nested),
                                  400, "invalidSyntax")
    for value in ("NaN", "Infinity", "-Infinity", "1e999", "9" * 4301, "9" * 19):
        body = '{"schemas": ["%s"], "userName": "e@x", "n": %s}' % (CORE_USER, value)
        scim_error(c.post(f"{server.scim}/Users", headers=h, content=body), 400, "invalidValue")
        rule = '{"name": "r", "sources": [], "destinations": [], "services": [], "n": %s}' % value
        api_error(c.post(f"{server.api}/rules", auth=server.basic(), content=rule), 400)
    # plain malformed JSON is still the handler's to explain
    scim_error(c.post(f"{server.scim}/Users", headers=h, content="{"), 400, "invalidSyntax")
    org["intact"]()


def test_bodies_are_capped_per_route(server, org):
    c = server.client
    big = b'"' + b"a" * (API_LIMIT + 1) + b'"'
    assert "larger than" in api_error(
        c.post(f"{server.api}/rules", auth=server.basic(), content=big), 413)

    def chunked():                      # no Content-Length: counted as it streams
        yield b"{"
        for _ in range(API_LIMIT // 65536 + 2):
            yield b" " * 65536
    api_error(c.post(f"{server.api}/rules", auth=server.basic(), content=chunked()), 413)
    r = c.post(f"{server.scim}/Users", headers={**server.bearer(), "Content-Length": str(SCIM_LIMIT + 1)},
               content=b"x" * (SCIM_LIMIT + 1))
    scim_error(r, 413)
    # a route without credentials takes no large body
    r = c.post("/api/whatever", content=b"x" * 100_000)
    assert r.status_code == 413
    org["intact"]()


def test_credentials_checked_before_the_body(server, org):
    c = server.client
    read = []

    def body():
        read.append(1)
        yield b"{}"
    assert "Authorization" in api_error(c.post(f"{server.api}/rules", content=body()), 401)
    scim_error(c.post(f"{server.scim}/Users", content=body()), 401)
    api_error(c.post(f"{server.api}/rules", auth=server.basic(server.other_token),
                     content=body()), 403)
    assert read == []
    org["intact"]()


# --------------------------------------------------------------------------
# A real server process: an unauthenticated 120 MB upload costs it nothing


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _upload(port: int, path: str, auth: str | None, size: int) -> tuple[int, int]:
    """POST ``size`` bytes; returns (status, bytes the server let us send
    before it answered)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
               f"Content-Length: {size}\r\n"
        if auth:
            head += f"Authorization: {auth}\r\n"
        s.sendall((head + "\r\n").encode())
        chunk = b" " * (1 << 20)
        s.settimeout(0.5)
        reply = b""
        while sent < size:
            with contextlib.suppress(TimeoutError):
                reply += s.recv(65536)
            if reply:
                break
            try:
                sent += s.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        s.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while b"\r\n\r\n" not in reply:
                more = s.recv(65536)
                if not more:
                    break
                reply += more
    return int(reply.split(b" ", 2)[1]), sent


def test_unauthenticated_large_upload_does_not_grow_the_server(tmp_path):
    db = f"sqlite:///{tmp_path}/aus-server.db"
    engine, sessions = open_database(db)
    token = create_key(sessions, "1")
    engine.dispose()
    port = _free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--db", db) as proc:
        wait_port(port, proc)
        basic = "Basic " + base64.b64encode(token.encode()).decode()
        # warm the process up along each path, scrypt's working memory included
        # (an unknown key id costs a hash like a wrong secret)
        for auth in (None, "Bearer ak0:x", basic):
            _upload(port, "/api/orgs/1/rules", auth, 10)
        before = _rss(proc.pid)
        status, sent = _upload(port, "/api/orgs/1/rules", None, 120 * 1024 * 1024)
        assert status == 401
        status_chunked, _ = _upload(port, "/scim/orgs/1/Users", "Bearer ak0:x", 120 * 1024 * 1024)
        assert status_chunked == 401
        status_auth, _ = _upload(port, "/api/orgs/1/rules", basic, 120 * 1024 * 1024)
        assert status_auth == 413
        grown = _rss(proc.pid) - before
        assert grown < 20 * 1024 * 1024, f"the server grew by {grown / 2**20:.0f} MiB"
        assert sent < 120 * 1024 * 1024
        assert proc.poll() is None
