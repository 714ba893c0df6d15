"""Replays of what Microsoft Entra ID's provisioning service sends, with
the bodies of Microsoft's "Develop and plan provisioning for a SCIM
endpoint" and "Known issues ... SCIM 2.0 protocol compliance" pages, on
SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from aus.server.db import Group, open_database

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"
MS_GROUP = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
ENTRA_GROUP = "urn:ietf:params:scim:schemas:extension:Microsoft:Entra:2.0:Group"
LIST = "urn:ietf:params:scim:api:messages:2.0:ListResponse"
ERROR = "urn:ietf:params:scim:api:messages:2.0:Error"
SCIM_JSON = "application/scim+json"

CREATE_USER = {
    "schemas": [CORE_USER, ENTERPRISE],
    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
    "userName": "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee",
    "active": True,
    "emails": [{"primary": True, "type": "work",
                "value": "Test_User_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"}],
    "meta": {"resourceType": "User"},
    "name": {"formatted": "givenName familyName", "familyName": "familyName",
             "givenName": "givenName"},
    "roles": [],
}

CREATE_GROUP = {
    "schemas": [CORE_GROUP, MS_GROUP],
    "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
    "displayName": "displayName",
    "meta": {"resourceType": "Group"},
}


def patch(*ops):
    return {"schemas": [PATCH], "Operations": list(ops)}


def scim_list(r, total):
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(SCIM_JSON)
    body = r.json()
    assert body["schemas"] == [LIST] and body["totalResults"] == total
    assert body["startIndex"] == 1 and body["itemsPerPage"] == len(body["Resources"])
    return body["Resources"]


def user_named(c, server, name):
    r = c.get(f"{server.scim}/Users", params={"filter": f'userName eq "{name}"'},
              headers=server.bearer())
    return scim_list(r, 1)[0]


def test_test_connection_finds_no_random_user(server):
    # Entra's "Test Connection": a filter on a random GUID answers an empty list
    r = server.client.get(f"{server.scim}/Users",
                          params={"filter": f'userName eq "{uuid.uuid4()}"'},
                          headers=server.bearer())
    assert scim_list(r, 0) == []


def test_user_lifecycle(server):
    c, h = server.client, server.bearer()
    # Get User by query, zero results; then Create User
    r = c.get(f"{server.scim}/Users", params={"filter": 'userName eq "non-existent user"'}, headers=h)
    assert scim_list(r, 0) == []
    r = c.post(f"{server.scim}/Users", json=CREATE_USER, headers={**h, "Content-Type": SCIM_JSON})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith(SCIM_JSON)
    user = r.json()
    uid = user["id"]
    assert user["userName"] == CREATE_USER["userName"] and user["externalId"] == CREATE_USER["externalId"]
    assert user["active"] is True and user["emails"] == CREATE_USER["emails"]
    assert user["name"] == CREATE_USER["name"]
    assert user["schemas"] == [CORE_USER]
    meta = user["meta"]
    assert meta["resourceType"] == "User" and meta["created"] == meta["lastModified"]
    assert meta["location"].endswith(f"/scim/orgs/1/Users/{uid}") and r.headers["location"] == meta["location"]
    assert meta["version"] == r.headers["etag"] == 'W/"1"'

    # Get User; Get User by query (case-insensitive userName)
    got = c.get(f"{server.scim}/Users/{uid}", headers=h)
    assert got.status_code == 200 and got.json() == user
    assert user_named(c, server, CREATE_USER["userName"].upper())["id"] == uid
    r = c.get(f"{server.scim}/Users", params={"filter": f'externalId eq "{CREATE_USER["externalId"]}"'}, headers=h)
    assert scim_list(r, 1)[0]["id"] == uid
    # users are also queried by their work e-mail
    r = c.get(f"{server.scim}/Users", headers=h, params={
        "filter": 'emails[type eq "work"].value eq "TEST_USER_11bb11bb-cc22-dd33-ee44-55ff55ff55ff@testuser.com"'})
    assert scim_list(r, 1)[0]["id"] == uid

    # Update User [Multi-valued properties]
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json=patch(
        {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "updatedEmail@microsoft.com"},
        {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["emails"] == [{"primary": True, "type": "work", "value": "updatedEmail@microsoft.com"}]
    assert body["name"]["familyName"] == "updatedFamilyName" and body["name"]["givenName"] == "givenName"
    assert body["meta"]["version"] == 'W/"2"'

    # Update User [Single-valued properties]
    new_name = "5b50642d-79fc-4410-9e90-4c077cdd1a59@testuser.com"
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h,
                json=patch({"op": "Replace", "path": "userName", "value": new_name}))
    assert r.status_code == 200 and r.json()["userName"] == new_name
    assert user_named(c, server, new_name)["id"] == uid

    # Disable User: "False" (default Entra job), then false (aadOptscim062020)
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h,
                json=patch({"op": "Replace", "path": "active", "value": "False"}))
    assert r.status_code == 200 and r.json()["active"] is False
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h,
                json={"Operations": [{"op": "Replace", "path": "active", "value": True}], "schemas": [PATCH]})
    assert r.json()["active"] is True
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h,
                json=patch({"op": "replace", "path": "active", "value": False}))
    assert r.json()["active"] is False
    # a disabled user is still returned (only a DELETE removes it)
    assert user_named(c, server, new_name)["active"] is False
    r = c.get(f"{server.scim}/Users", params={"filter": "active eq false"}, headers=h)
    assert [u["id"] for u in scim_list(r, 1)] == [uid]

    # Path-less replace with dotted keys (aadOptscim062020)
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json=patch(
        {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "TestMhvaes@test.microsoft.com"},
        {"op": "replace", "value": {"displayName": "Bjfe", "name.givenName": "Kkom",
                                    "name.familyName": "Unua",
                                    f"{ENTERPRISE}:employeeNumber": "Aklq"}}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["displayName"] == "Bjfe" and body["name"]["givenName"] == "Kkom"
    assert body["name"]["familyName"] == "Unua" and body[ENTERPRISE] == {"employeeNumber": "Aklq"}
    assert body["schemas"] == [CORE_USER, ENTERPRISE]
    assert body["emails"][0]["value"] == "TestMhvaes@test.microsoft.com"

    # Delete User; then it is gone
    assert c.delete(f"{server.scim}/Users/{uid}", headers=h).status_code == 204
    r = c.get(f"{server.scim}/Users/{uid}", headers=h)
    assert r.status_code == 404 and r.json()["schemas"] == [ERROR] and r.json()["status"] == "404"
    assert c.delete(f"{server.scim}/Users/{uid}", headers=h).status_code == 404


def test_manager_reference_as_entra_checks_and_sets_it(server):
    c, h = server.client, server.bearer()
    boss = c.post(f"{server.scim}/Users", headers=h, json={
        "schemas": [CORE_USER], "userName": "boss@contoso.com"}).json()["id"]
    uid = c.post(f"{server.scim}/Users", headers=h, json=CREATE_USER).json()["id"]
    # Entra first checks the current value: id eq ... and manager eq ...
    query = {"filter": f'id eq "{uid}" and manager eq "{boss}"', "attributes": "id"}
    assert scim_list(c.get(f"{server.scim}/Users", params=query, headers=h), 0) == []
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json=patch({
        "op": "Add", "path": "manager",
        "value": [{"$ref": f"http://example/scim/Users/{boss}", "value": boss}]}))
    assert r.status_code == 200, r.text
    assert r.json()[ENTERPRISE]["manager"]["value"] == boss
    (found,) = scim_list(c.get(f"{server.scim}/Users", params=query, headers=h), 1)
    assert found == {"schemas": [CORE_USER, ENTERPRISE], "id": uid}
    # aadOptscim062020: the manager as a bare id in a path-less replace
    r = c.patch(f"{server.scim}/Users/{uid}", headers=h, json=patch(
        {"op": "replace", "value": {f"{ENTERPRISE}:manager": uid}}))
    assert r.json()[ENTERPRISE]["manager"] == {"value": uid}


def test_create_user_of_the_older_sample_with_nulls(server):
    # "Example 2. Provision a user": nulls for unassigned attributes, and a
    # schema URI with a typo besides the core one
    r = server.client.post(f"{server.scim}/Users", headers=server.bearer(), json={
        "schemas": [CORE_USER, "urn:ietf:params:scim:schemas:extension:enterprise:2.0User"],
        "externalId": "jyoung", "userName": "jyoung@testuser.com", "active": True,
        "addresses": None, "displayName": "Joy Young",
        "emails": [{"type": "work", "value": "jyoung@Contoso.com", "primary": True}],
        "meta": {"resourceType": "User"}, "name": {"familyName": "Young", "givenName": "Joy"},
        "phoneNumbers": None, "preferredLanguage": None, "title": None, "department": None,
        "manager": None})
    assert r.status_code == 201, r.text
    body = r.json()
    # stored as sent: the e-mail domain keeps its capital
    assert body["emails"][0]["value"] == "jyoung@Contoso.com"
    assert "addresses" not in body and "title" not in body
    r = server.client.get(f"{server.scim}/Users", params={"filter": "externalId eq jyoung"},
                          headers=server.bearer())
    assert scim_list(r, 1)[0]["displayName"] == "Joy Young"


def test_group_lifecycle(server):
    c, h = server.client, server.bearer()
    users = [c.post(f"{server.scim}/Users", headers=h, json={
        "schemas": [CORE_USER], "userName": f"member{i}@contoso.com"}).json()["id"] for i in range(4)]

    # Get Group by displayName (none yet); Create Group with Microsoft's schema URI
    r = c.get(f"{server.scim}/Groups", params={"excludedAttributes": "members",
                                               "filter": 'displayName eq "displayName"'}, headers=h)
    assert scim_list(r, 0) == []
    r = c.post(f"{server.scim}/Groups", json=CREATE_GROUP, headers=h)
    assert r.status_code == 201, r.text
    group = r.json()
    gid = group["id"]
    assert group["displayName"] == "displayName" and group["externalId"] == CREATE_GROUP["externalId"]
    assert group["members"] == [] and group["schemas"] == [CORE_GROUP]
    assert group["meta"]["resourceType"] == "Group"

    # Get Group, excludedAttributes=members
    r = c.get(f"{server.scim}/Groups/{gid}", params={"excludedAttributes": "members"}, headers=h)
    assert r.status_code == 200 and "members" not in r.json() and r.json()["displayName"] == "displayName"
    # Get Group by displayName, in another case
    r = c.get(f"{server.scim}/Groups", params={"excludedAttributes": "members",
                                               "filter": 'displayName eq "DISPLAYNAME"'}, headers=h)
    (found,) = scim_list(r, 1)
    assert found["id"] == gid and "members" not in found

    # Update Group [Non-member attributes]: 204, no body
    renamed = "1879db59-3bdf-4490-ad68-ab880a269474updatedDisplayName"
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Replace", "path": "displayName", "value": renamed}))
    assert r.status_code == 204 and r.content == b""
    assert c.get(f"{server.scim}/Groups/{gid}", headers=h).json()["displayName"] == renamed

    # Update Group [Add Members], Microsoft's body, then several in one op
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Add", "path": "members", "value": [{"$ref": None, "value": users[0]}]}))
    assert r.status_code == 204, r.text
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Add", "path": "members",
         "value": [{"value": users[1]}, {"value": users[2]}, {"value": users[3]}, {"value": users[0]}]}))
    assert r.status_code == 204, r.text
    members = c.get(f"{server.scim}/Groups/{gid}", headers=h).json()["members"]
    assert sorted(m["value"] for m in members) == sorted(users)
    assert all(m["type"] == "User" and m["$ref"].endswith(f"/Users/{m['value']}") for m in members)
    assert {m["display"] for m in members} == {f"member{i}@contoso.com" for i in range(4)}

    # Entra asks whether a user is a member before it adds or removes one
    def is_member(uid):
        q = {"filter": f'id eq "{gid}" and members eq "{uid}"', "excludedAttributes": "members"}
        r = c.get(f"{server.scim}/Groups", params=q, headers=h)
        assert r.status_code == 200
        found = r.json()["Resources"]
        assert all("members" not in g for g in found)
        return [g["id"] for g in found] == [gid]
    assert is_member(users[0])

    # Update Group [Remove Members]: default job (value list) ...
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "Remove", "path": "members", "value": [{"$ref": None, "value": users[0]}]}))
    assert r.status_code == 204, r.text
    assert not is_member(users[0]) and is_member(users[1])
    # ... and aadOptscim062020 (value filter in the path)
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "remove", "path": f"members[value eq \"{users[1]}\"]"}))
    assert r.status_code == 204, r.text
    members = c.get(f"{server.scim}/Groups/{gid}", headers=h).json()["members"]
    assert sorted(m["value"] for m in members) == sorted(users[2:])
    # removing a member that is not there is no error
    r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
        {"op": "remove", "path": f"members[value eq \"{users[1]}\"]"}))
    assert r.status_code == 204

    # Delete Group
    assert c.delete(f"{server.scim}/Groups/{gid}", headers=h).status_code == 204
    assert c.get(f"{server.scim}/Groups/{gid}", headers=h).status_code == 404
    r = c.get(f"{server.scim}/Groups", params={"filter": f'displayName eq "{renamed}"'}, headers=h)
    assert scim_list(r, 0) == []


def test_nested_group_is_kept_and_reported_as_such(server):
    c, h = server.client, server.bearer()
    uid = c.post(f"{server.scim}/Users", headers=h, json={"schemas": [CORE_USER], "userName": "u@x"}).json()["id"]
    inner = c.post(f"{server.scim}/Groups", headers=h, json={**CREATE_GROUP, "displayName": "inner"}).json()["id"]
    outer = c.post(f"{server.scim}/Groups", headers=h, json={
        "schemas": [CORE_GROUP], "displayName": "outer",
        "members": [{"value": inner}, {"value": uid}]}).json()["id"]
    members = c.get(f"{server.scim}/Groups/{outer}", headers=h).json()["members"]
    assert {(m["value"], m["type"]) for m in members} == {(inner, "Group"), (uid, "User")}
    assert next(m for m in members if m["type"] == "Group")["$ref"].endswith(f"/Groups/{inner}")
    r = c.get(f"{server.scim}/Groups", headers=h, params={
        "filter": 'members[type eq "Group"]', "attributes": "displayName"})
    assert [g["displayName"] for g in scim_list(r, 1)] == ["outer"]
    # a user's direct groups, on request
    r = c.get(f"{server.scim}/Users/{uid}", params={"attributes": "groups"}, headers=h)
    assert [(g["value"], g["display"]) for g in r.json()["groups"]] == [(outer, "outer")]
    assert "groups" not in c.get(f"{server.scim}/Users/{uid}", headers=h).json()
    # deleting the inner group takes it out of the outer one
    assert c.delete(f"{server.scim}/Groups/{inner}", headers=h).status_code == 204
    members = c.get(f"{server.scim}/Groups/{outer}", headers=h).json()["members"]
    assert [m["value"] for m in members] == [uid]


def test_ad_sid_from_entras_group_extension(server):
    c, h = server.client, server.bearer()
    sid = "S-1-5-21-1004336348-1177238915-682003330-1104"
    r = c.post(f"{server.scim}/Groups", headers=h, json={
        **CREATE_GROUP, "schemas": [CORE_GROUP, MS_GROUP, ENTRA_GROUP],
        ENTRA_GROUP: {"onPremisesSecurityIdentifier": sid, "onPremisesSAMAccountName": "dev"}})
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    assert r.json()[ENTRA_GROUP]["onPremisesSecurityIdentifier"] == sid
    engine, sessions = open_database(server.db_url)
    try:
        with sessions() as s:
            assert s.scalar(select(Group.sid).where(Group.id == gid)) == sid
        # a later PATCH that removes it clears the column
        r = c.patch(f"{server.scim}/Groups/{gid}", headers=h, json=patch(
            {"op": "remove", "path": f"{ENTRA_GROUP}:onPremisesSecurityIdentifier"}))
        assert r.status_code == 204, r.text
        with sessions() as s:
            assert s.scalar(select(Group.sid).where(Group.id == gid)) is None
    finally:
        engine.dispose()
    r = c.post(f"{server.scim}/Groups", headers=h, json={
        "schemas": [CORE_GROUP], "displayName": "bad sid",
        ENTRA_GROUP: {"onPremisesSecurityIdentifier": "not-a-sid"}})
    assert r.status_code == 400 and "not a SID" in r.json()["detail"]
