"""ServiceProviderConfig, ResourceTypes and Schemas (RFC 7644 §4)."""

from __future__ import annotations

ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ENTRA_GROUP = "urn:ietf:params:scim:schemas:extension:Microsoft:Entra:2.0:Group"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"
CORE_GROUP = "urn:ietf:params:scim:schemas:core:2.0:Group"


def get(server, path):
    r = server.client.get(f"{server.scim}{path}", headers=server.bearer())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/scim+json")
    return r.json()


def test_service_provider_config(server):
    doc = get(server, "/ServiceProviderConfig")
    assert doc["schemas"] == ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"]
    assert doc["patch"] == {"supported": True} and doc["filter"]["supported"] is True
    assert doc["filter"]["maxResults"] == 1000 and doc["etag"] == {"supported": True}
    assert doc["bulk"]["supported"] is False and doc["sort"] == {"supported": False}
    assert doc["changePassword"] == {"supported": False}
    (scheme,) = doc["authenticationSchemes"]
    assert scheme["type"] == "oauthbearertoken" and scheme["primary"] is True
    assert doc["meta"]["location"].endswith("/scim/orgs/1/ServiceProviderConfig")


def test_resource_types(server):
    body = get(server, "/ResourceTypes")
    assert body["totalResults"] == 2
    by_id = {r["id"]: r for r in body["Resources"]}
    assert by_id["User"]["endpoint"] == "/Users" and by_id["User"]["schema"] == CORE_USER
    assert by_id["User"]["schemaExtensions"] == [{"schema": ENTERPRISE, "required": False}]
    assert by_id["Group"]["endpoint"] == "/Groups" and by_id["Group"]["schema"] == CORE_GROUP
    assert by_id["Group"]["schemaExtensions"] == [{"schema": ENTRA_GROUP, "required": False}]
    assert get(server, "/ResourceTypes/user")["id"] == "User"


def test_schemas_describe_what_is_accepted(server):
    body = get(server, "/Schemas")
    ids = [s["id"] for s in body["Resources"]]
    assert ids == [CORE_USER, ENTERPRISE, CORE_GROUP, ENTRA_GROUP]
    assert body["totalResults"] == 4
    user = get(server, f"/Schemas/{CORE_USER}")
    attrs = {a["name"]: a for a in user["attributes"]}
    assert attrs["userName"]["uniqueness"] == "server" and attrs["userName"]["required"] is True
    assert attrs["userName"]["caseExact"] is False
    assert attrs["groups"]["mutability"] == "readOnly" and attrs["groups"]["returned"] == "request"
    emails = {a["name"]: a for a in attrs["emails"]["subAttributes"]}
    assert set(emails) == {"value", "display", "type", "primary"}
    group = get(server, f"/Schemas/{CORE_GROUP}")
    attrs = {a["name"]: a for a in group["attributes"]}
    assert attrs["displayName"]["uniqueness"] == "server"
    assert {a["name"] for a in attrs["members"]["subAttributes"]} == {"value", "$ref", "type", "display"}
    ext = get(server, f"/Schemas/{ENTERPRISE}")
    assert "manager" in {a["name"] for a in ext["attributes"]}
    entra = get(server, f"/Schemas/{ENTRA_GROUP}")
    assert "onPremisesSecurityIdentifier" in {a["name"] for a in entra["attributes"]}
    assert entra["meta"]["location"].endswith(f"/Schemas/{ENTRA_GROUP}")
