"""Every SCIM failure in the SCIM Error schema: credentials, org isolation,
malformed requests, unknown attributes, invalid filters, 404/405/409/412/
413; and the management API keeps its own error format."""

from __future__ import annotations

import pytest

from aus.server.scim import discovery, store

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"


def scim_error(r, status, scim_type=None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/scim+json")
    body = r.json()
    assert body["schemas"] == [ERROR] and body["status"] == str(status)
    assert body.get("scimType") == scim_type
    assert body["detail"]
    return body["detail"]


def new_user(server, name="alice@contoso.com", token=None, org=None):
    r = server.client.post(f"/scim/orgs/{org or server.org}/Users",
                           headers=server.bearer(token),
                           json={"schemas": [CORE_USER], "userName": name})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def new_group(server, name="Sales", token=None, org=None, members=()):
    r = server.client.post(f"/scim/orgs/{org or server.org}/Groups",
                           headers=server.bearer(token),
                           json={"schemas": [CORE_GROUP], "displayName": name,
                                 "members": [{"value": m} for m in members]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_credentials(server):
    c, url = server.client, f"{server.scim}/Users"
    detail = scim_error(c.get(url), 401)
    assert "Authorization" in detail
    assert c.get(url).headers["www-authenticate"].startswith("Bearer")
    key, secret = server.basic()
    scim_error(c.get(url, headers={"Authorization": f"Bearer {key}:{secret}x"}), 401)
    scim_error(c.get(url, headers={"Authorization": "Bearer aknothere:x"}), 401)
    scim_error(c.get(url, headers={"Authorization": "Bearer no-colon"}), 401)
    # the SCIM endpoint takes Bearer only (Entra's "Secret Token")
    assert "Bearer" in scim_error(c.get(url, auth=(key, secret)), 401)
    for path in ("/Groups", "/Users/x", "/Schemas", "/ServiceProviderConfig", "/Nope"):
        scim_error(c.get(f"{server.scim}{path}"), 401)
    scim_error(c.patch(f"{server.scim}/Groups/x", json={}), 401)


def test_key_of_another_org_sees_and_changes_nothing(server):
    c = server.client
    uid = new_user(server)
    gid = new_group(server, members=[uid])
    other = server.other_token
    # org 1's endpoint with org 2's key: 403
    for method, path in [("GET", "/Users"), ("GET", f"/Users/{uid}"), ("DELETE", f"/Users/{uid}"),
                         ("GET", f"/Groups/{gid}"), ("PATCH", f"/Groups/{gid}")]:
        r = c.request(method, f"{server.scim}{path}", headers=server.bearer(other),
                      json=None if method != "PATCH" else {
                          "schemas": [PATCH], "Operations": [{"op": "remove", "path": "members"}]})
        assert "another org" in scim_error(r, 403)
    # org 2's own endpoint: org 1's resources do not exist there
    o2 = "/scim/orgs/2"
    h2 = server.bearer(other)
    assert c.get(f"{o2}/Users", headers=h2).json()["totalResults"] == 0
    assert c.get(f"{o2}/Groups", headers=h2).json()["totalResults"] == 0
    r = c.get(f"{o2}/Users", headers=h2, params={"filter": 'userName eq "alice@contoso.com"'})
    assert r.json()["totalResults"] == 0
    scim_error(c.get(f"{o2}/Users/{uid}", headers=h2), 404)
    scim_error(c.get(f"{o2}/Groups/{gid}", headers=h2), 404)
    scim_error(c.delete(f"{o2}/Users/{uid}", headers=h2), 404)
    scim_error(c.put(f"{o2}/Groups/{gid}", headers=h2,
                     json={"schemas": [CORE_GROUP], "displayName": "x"}), 404)
    scim_error(c.patch(f"{o2}/Groups/{gid}", headers=h2, json={
        "schemas": [PATCH], "Operations": [{"op": "remove", "path": "members"}]}), 404)
    # org 1's user cannot be made a member of an org 2 group
    g2 = new_group(server, "Sales", token=other, org="2")
    detail = scim_error(c.patch(f"{o2}/Groups/{g2}", headers=h2, json={
        "schemas": [PATCH], "Operations": [{"op": "add", "path": "members",
                                            "value": [{"value": uid}]}]}), 400, "invalidValue")
    assert uid in detail
    # the same names are free in org 2 (uniqueness is per org)
    new_user(server, "ALICE@contoso.com", token=other, org="2")
    # and org 1 is untouched
    h = server.bearer()
    assert c.get(f"{server.scim}/Users/{uid}", headers=h).status_code == 200
    members = c.get(f"{server.scim}/Groups/{gid}", headers=h).json()["members"]
    assert [m["value"] for m in members] == [uid]
    assert c.get(f"{server.scim}/Users", headers=h).json()["totalResults"] == 1


@pytest.mark.parametrize("content, words", [
    (b"{bad", "malformed JSON"),
    (b"", "no body"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe\x00", "malformed JSON"),
])
def test_malformed_bodies(server, content, words):
    r = server.client.post(f"{server.scim}/Users", content=content,
                           headers={**server.bearer(), "Content-Type": "application/scim+json"})
    assert words in scim_error(r, 400, "invalidSyntax")


@pytest.mark.parametrize("body, words", [
    ({"schemas": [CORE_USER], "userName": "a", "nosuch": 1}, "unknown attribute 'nosuch'"),
    ({"schemas": [CORE_USER], "userName": "a", "name": {"nosuch": "x"}}, "nosuch"),
    ({"schemas": [CORE_USER], "userName": "a", "urn:example:ext:2.0:User": {"x": 1}}, "unknown"),
    ({"schemas": [CORE_USER], "userName": "a", "active": "maybe"}, "boolean"),
    ({"schemas": [CORE_USER], "userName": "a", "emails": [{"value": "no-at-sign"}]}, "emails"),
    ({"schemas": [CORE_USER], "userName": 5}, "string"),
    ({"schemas": [CORE_USER]}, "userName is required"),
    ({"schemas": [CORE_USER], "userName": "  "}, "userName is required"),
    ({"schemas": [CORE_GROUP], "displayName": "g"}, "schemas"),
])
def test_invalid_users_are_refused(server, body, words):
    detail = scim_error(server.client.post(f"{server.scim}/Users", json=body,
                                           headers=server.bearer()), 400, "invalidValue")
    assert words in detail
    assert server.client.get(f"{server.scim}/Users", headers=server.bearer()).json()["totalResults"] == 0


def test_invalid_groups_are_refused(server):
    c, h = server.client, server.bearer()
    for body, words in [
        ({"schemas": [CORE_GROUP]}, "displayName is required"),
        ({"schemas": [CORE_GROUP], "displayName": "g", "owner": "x"}, "unknown attribute"),
        ({"schemas": [CORE_GROUP], "displayName": "g", "members": [{"value": "nobody"}]}, "nobody"),
        ({"schemas": [CORE_GROUP], "displayName": "g", "members": [{"display": "x"}]}, "value"),
    ]:
        assert words in scim_error(c.post(f"{server.scim}/Groups", json=body, headers=h),
                                   400, "invalidValue")
    assert c.get(f"{server.scim}/Groups", headers=h).json()["totalResults"] == 0


@pytest.mark.parametrize("text, words", [
    ('userName eq', "position 12"),
    ('userName equals "x"', "expected an operator"),
    ('(userName eq "x"', "expected ')'"),
    ('nosuch eq "x"', "no attribute 'nosuch'"),
    ('emails[type eq "work"', "expected ']'"),
    ('active gt true', "cannot compare"),
    ('', "empty"),
])
def test_invalid_filters(server, text, words):
    r = server.client.get(f"{server.scim}/Users", params={"filter": text}, headers=server.bearer())
    assert words in scim_error(r, 400, "invalidFilter")


def test_bad_query_parameters(server):
    c, h = server.client, server.bearer()
    assert "integer" in scim_error(c.get(f"{server.scim}/Users", params={"count": "ten"}, headers=h),
                                   400, "invalidValue")
    assert "startIndex" in scim_error(c.get(f"{server.scim}/Users", params={"startIndex": "x"},
                                            headers=h), 400, "invalidValue")
    assert "nosuch" in scim_error(c.get(f"{server.scim}/Groups", params={"attributes": "nosuch"},
                                        headers=h), 400, "invalidValue")
    # unknown parameters (Entra may carry aadOptscim062020 from the tenant URL) are ignored
    r = c.get(f"{server.scim}/Users", params={"aadOptscim062020": "", "filter": 'userName eq "x"'},
              headers=h)
    assert r.status_code == 200


def test_not_found_and_method_not_allowed(server):
    c, h = server.client, server.bearer()
    detail = scim_error(c.get(f"{server.scim}/Users/5171a35d82074e068ce2", headers=h), 404)
    assert "5171a35d82074e068ce2" in detail
    scim_error(c.get(f"{server.scim}/Groups/nope", headers=h), 404)
    scim_error(c.patch(f"{server.scim}/Users/nope", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "title", "value": "x"}]}), 404)
    scim_error(c.put(f"{server.scim}/Users/nope", headers=h,
                     json={"schemas": [CORE_USER], "userName": "x"}), 404)
    scim_error(c.delete(f"{server.scim}/Groups/nope", headers=h), 404)
    scim_error(c.get(f"{server.scim}/Devices", headers=h), 404)
    scim_error(c.get(f"{server.scim}/Schemas/urn:nope", headers=h), 404)
    scim_error(c.get("/scim/v2/Users", headers=h), 404)
    r = c.post(f"{server.scim}/Users/some-id", headers=h, json={})
    scim_error(r, 405)
    assert r.headers["allow"] == "DELETE, GET, PATCH, PUT"
    r = c.delete(f"{server.scim}/Users", headers=h)
    scim_error(r, 405)
    assert r.headers["allow"] == "GET, POST"
    scim_error(c.put(f"{server.scim}/ServiceProviderConfig", headers=h, json={}), 405)
    # the management API keeps its own error format
    r = c.get(f"/api/orgs/{server.org}/groups")
    assert r.status_code == 401 and "schemas" not in r.json()


def test_uniqueness_conflicts(server):
    c, h = server.client, server.bearer()
    uid = new_user(server, "Alice@Contoso.com")
    bob = new_user(server, "bob@contoso.com")
    # userName differing only in case
    r = c.post(f"{server.scim}/Users", headers=h, json={"schemas": [CORE_USER], "userName": "alice@contoso.COM"})
    assert uid in scim_error(r, 409, "uniqueness")
    # rename onto a taken name, by PATCH and by PUT
    scim_error(c.patch(f"{server.scim}/Users/{bob}", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "userName",
                                            "value": "ALICE@contoso.com"}]}), 409, "uniqueness")
    scim_error(c.put(f"{server.scim}/Users/{bob}", headers=h, json={
        "schemas": [CORE_USER], "userName": "alice@CONTOSO.com"}), 409, "uniqueness")
    # a user may change the case of its own name
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "replace", "path": "userName", "value": "ALICE@contoso.com"}]})
    assert r.status_code == 200 and r.json()["userName"] == "ALICE@contoso.com"
    # groups: displayName is unique per org, case-insensitively
    g = new_group(server, "Sales EU")
    scim_error(c.post(f"{server.scim}/Groups", headers=h,
                      json={"schemas": [CORE_GROUP], "displayName": "sales eu"}), 409, "uniqueness")
    g2 = new_group(server, "Sales US")
    scim_error(c.patch(f"{server.scim}/Groups/{g2}", headers=h, json={
        "schemas": [PATCH], "Operations": [{"op": "Replace", "path": "displayName",
                                            "value": "SALES EU"}]}), 409, "uniqueness")
    assert c.get(f"{server.scim}/Groups/{g}", headers=h).json()["displayName"] == "Sales EU"


def test_group_added_by_hand_is_out_of_scims_reach(server):
    c, h = server.client, server.bearer()
    r = c.post(f"{server.api}/groups", auth=server.basic(),
               json={"display_name": "Domain Admins", "sid": "S-1-5-21-1-2-3-512"})
    assert r.status_code == 201, r.text
    manual = r.json()["id"]
    r = c.get(f"{server.scim}/Groups", headers=h, params={"filter": 'displayName eq "domain admins"'})
    assert r.json()["totalResults"] == 0
    scim_error(c.get(f"{server.scim}/Groups/{manual}", headers=h), 404)
    detail = scim_error(c.post(f"{server.scim}/Groups", headers=h,
                               json={"schemas": [CORE_GROUP], "displayName": "Domain Admins"}),
                        409, "uniqueness")
    assert "by hand" in detail


def test_if_match(server):
    c, h = server.client, server.bearer()
    uid = new_user(server)
    op = {"schemas": [PATCH], "Operations": [{"op": "replace", "path": "title", "value": "x"}]}
    scim_error(c.patch(f"{server.scim}/Users/{uid}", json=op, headers={**h, "If-Match": 'W/"7"'}), 412)
    r = c.patch(f"{server.scim}/Users/{uid}", json=op, headers={**h, "If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
    r = c.get(f"{server.scim}/Users/{uid}", headers={**h, "If-None-Match": 'W/"2"'})
    assert r.status_code == 304


def test_payload_cap(server, monkeypatch):
    monkeypatch.setattr(discovery, "MAX_PAYLOAD", 1000)
    r = server.client.post(f"{server.scim}/Users", headers=server.bearer(), json={
        "schemas": [CORE_USER], "userName": "x" * 2000})
    assert "larger than 1000 bytes" in scim_error(r, 413)


def test_tenant_url_with_trailing_slash(server):
    # Tenant URL "https://<server>/scim/orgs/1/" with "/Users" appended
    r = server.client.get(f"{server.scim}//Users", headers=server.bearer(),
                          params={"filter": 'userName eq "nobody"'})
    assert r.status_code == 200 and r.json()["totalResults"] == 0


def test_unexpected_failure_is_a_scim_500_and_changes_nothing(server, monkeypatch):
    c, h = server.client, server.bearer()
    uid = new_user(server)
    gid = new_group(server)

    def broken(*_args, **_kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "search", broken)
    detail = scim_error(c.get(f"{server.scim}/Users", headers=h), 500)
    assert "disk on fire" not in detail
    monkeypatch.setattr(store, "apply_members", broken)
    scim_error(c.patch(f"{server.scim}/Groups/{gid}", headers=h, json={
        "schemas": [PATCH], "Operations": [
            {"op": "replace", "path": "displayName", "value": "Renamed"},
            {"op": "add", "path": "members", "value": [{"value": uid}]}]}), 500)
    monkeypatch.undo()
    body = c.get(f"{server.scim}/Groups/{gid}", headers=h).json()
    assert body["displayName"] == "Sales" and body["members"] == []
    r = c.get(f"{server.api}/groups/{gid}", auth=server.basic())
    assert r.json()["last_sync"]["outcome"] == "500 internal error (RuntimeError)"
