"""The PATCH normalizer and applier, pure: every shape Entra ID sends
(with and without aadOptscim062020) reduces to the same canonical ops and
the same result."""

from __future__ import annotations

import pytest

from aus.server.scim.errors import ScimError
from aus.server.scim.patch import MemberOp, apply, member_ops, normalize
from aus.server.scim.resources import ENTERPRISE_USER, GROUP, USER, accept

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
CORE_USER = "urn:ietf:params:scim:schemas:core:2.0:User"


def body(*ops):
    return {"schemas": [PATCH], "Operations": list(ops)}


@pytest.fixture
def user():
    return accept(USER, {
        "schemas": [CORE_USER, ENTERPRISE_USER], "userName": "Test_User", "externalId": "e1",
        "active": True, "displayName": "Test User",
        "emails": [{"primary": True, "type": "work", "value": "test@contoso.com"},
                   {"type": "home", "value": "home@example.org"}],
        "name": {"formatted": "givenName familyName", "familyName": "familyName",
                 "givenName": "givenName"},
        ENTERPRISE_USER: {"employeeNumber": "1", "department": "Eng"},
    })


def patched(doc, *ops, kind=USER):
    return apply(kind, doc, normalize(kind, body(*ops)))


def describe(ops):
    return [(o.op, o.target.name, o.filter is not None, o.value) for o in ops]


def test_op_names_in_any_case_are_one_op():
    for name in ("Replace", "replace", "REPLACE"):
        ops = normalize(USER, body({"op": name, "path": "displayName", "value": "x"}))
        assert describe(ops) == [("replace", "displayName", False, "x")]


def test_disable_user_both_shapes(user):
    # without aadOptscim062020 Entra sends the string "False"; with it, false
    for value in ("False", "false", False):
        ops = normalize(USER, body({"op": "Replace", "path": "active", "value": value}))
        assert describe(ops) == [("replace", "active", False, False)]
        assert patched(user, {"op": "Replace", "path": "active", "value": value})["active"] is False
    assert patched(user, {"op": "replace", "path": "active", "value": "True"})["active"] is True


def test_replace_multiple_attributes_without_and_with_flag_agree(user):
    # Microsoft's "Requests to replace multiple attributes", both columns
    without = patched(
        user,
        {"op": "Replace", "path": "displayName", "value": "Pvlo"},
        {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "TestBcwqnm@test.microsoft.com"},
        {"op": "Replace", "path": "name.givenName", "value": "Gtfd"},
        {"op": "Replace", "path": "name.familyName", "value": "Pkqf"},
        {"op": "Replace", "path": "externalId", "value": "Eqpj"},
        {"op": "Replace", "path": f"{ENTERPRISE_USER}:employeeNumber", "value": "Eqpj"})
    with_flag = patched(
        user,
        {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "TestBcwqnm@test.microsoft.com"},
        {"op": "replace", "value": {"displayName": "Pvlo", "name.givenName": "Gtfd",
                                    "name.familyName": "Pkqf", "externalId": "Eqpj",
                                    f"{ENTERPRISE_USER}:employeeNumber": "Eqpj"}})
    assert without == with_flag
    assert with_flag["displayName"] == "Pvlo"
    assert with_flag["name"] == {"formatted": "givenName familyName", "familyName": "Pkqf",
                                 "givenName": "Gtfd"}
    assert with_flag["emails"][0] == {"primary": True, "type": "work",
                                      "value": "TestBcwqnm@test.microsoft.com"}
    assert with_flag["emails"][1] == {"type": "home", "value": "home@example.org"}
    assert with_flag[ENTERPRISE_USER] == {"employeeNumber": "Eqpj", "department": "Eng"}


def test_pathless_replace_is_split_per_attribute():
    ops = normalize(USER, body({"op": "replace", "value": {
        "displayName": "Bjfe", "name.givenName": "Kkom",
        f"{ENTERPRISE_USER}:manager": "m-1", "ACTIVE": "False", "id": "ignored"}}))
    assert describe(ops) == [
        ("replace", "displayName", False, "Bjfe"),
        ("replace", "name.givenName", False, "Kkom"),
        ("replace", f"{ENTERPRISE_USER}:manager", False, {"value": "m-1"}),
        ("replace", "active", False, False),
    ]


def test_manager_in_every_shape(user):
    ref = "https://scim.example/Users/m-1"
    shapes = [
        {"op": "Add", "path": "manager", "value": [{"$ref": ref, "value": "m-1"}]},   # Example 5
        {"op": "add", "path": f"{ENTERPRISE_USER}:manager", "value": "m-1"},
        {"op": "replace", "value": {f"{ENTERPRISE_USER}:manager": "m-1"}},
        {"op": "replace", "path": f"{ENTERPRISE_USER}:manager.value", "value": "m-1"},
        {"op": "replace", "path": ENTERPRISE_USER, "value": {"manager": {"value": "m-1"}}},
    ]
    for shape in shapes:
        got = patched(user, shape)[ENTERPRISE_USER]["manager"]
        assert got["value"] == "m-1", shape
    removed = patched(user, shapes[1], {"op": "remove", "path": "manager"})
    assert "manager" not in removed[ENTERPRISE_USER]


def test_single_valued_string_add_both_shapes(user):
    assert patched(user, {"op": "Add", "path": "nickName", "value": "Babs"})["nickName"] == "Babs"
    assert patched(user, {"op": "add", "path": "nickName", "value": [{"value": "Babs"}]})["nickName"] == "Babs"


def test_filtered_replace_creates_the_value_entra_means(user):
    # a user without a mobile number gets one: the filter says its type
    doc = patched(user, {"op": "Replace", "path": "phoneNumbers[type eq \"mobile\"].value",
                         "value": "+1 555 0100"})
    assert doc["phoneNumbers"] == [{"type": "mobile", "value": "+1 555 0100"}]
    # a boolean in the filter is stored as one
    doc = patched(user, {"op": "Replace", "path": "roles[primary eq \"True\"].value",
                         "value": "Reader"})
    assert doc["roles"] == [{"primary": True, "value": "Reader"}]
    with pytest.raises(ScimError) as exc:
        patched(user, {"op": "replace", "path": "emails[value co \"nowhere\"].display",
                       "value": "x"})
    assert exc.value.scim_type == "noTarget"


def test_multivalued_add_remove_and_primary(user):
    doc = patched(user, {"op": "add", "path": "emails",
                         "value": [{"type": "other", "value": "o@example.org", "primary": True}]})
    assert [e.get("primary") for e in doc["emails"]] == [False, None, True]
    doc = patched(doc, {"op": "remove", "path": "emails[type eq \"home\"]"})
    assert [e["type"] for e in doc["emails"]] == ["work", "other"]
    doc = patched(doc, {"op": "remove", "path": "emails", "value": [{"value": "o@example.org"}]})
    assert [e["type"] for e in doc["emails"]] == ["work"]
    doc = patched(doc, {"op": "remove", "path": "emails"})
    assert "emails" not in doc
    # adding the same value twice keeps one
    twice = patched(user, {"op": "add", "path": "emails", "value": [user["emails"][1]]})
    assert twice["emails"] == user["emails"]


def test_remove_sub_attribute_and_extension(user):
    doc = patched(user, {"op": "remove", "path": "name.formatted"},
                  {"op": "remove", "path": ENTERPRISE_USER})
    assert doc["name"] == {"familyName": "familyName", "givenName": "givenName"}
    assert ENTERPRISE_USER not in doc and doc["schemas"] == [CORE_USER]


def test_apply_leaves_the_input_alone(user):
    before = repr(user)
    patched(user, {"op": "replace", "path": "name.givenName", "value": "x"},
            {"op": "remove", "path": "emails"})
    assert repr(user) == before


@pytest.mark.parametrize("ops, status, scim_type, words", [
    ([{"op": "frob", "path": "title", "value": "x"}], 400, "invalidSyntax", "add, remove or replace"),
    ([{"op": "replace", "path": "nosuch", "value": "x"}], 400, "invalidPath", "no attribute"),
    ([{"op": "replace", "path": "emails[type eq ]", "value": "x"}], 400, "invalidPath", "position 16"),
    ([{"op": "replace", "path": "emails[nosuch eq 1]", "value": "x"}], 400, "invalidPath", "no sub-attribute"),
    ([{"op": "remove"}], 400, "noTarget", "needs a path"),
    ([{"op": "replace", "path": "id", "value": "x"}], 400, "mutability", "read-only"),
    ([{"op": "replace", "path": "meta.created", "value": "x"}], 400, "mutability", "read-only"),
    ([{"op": "remove", "path": "userName"}], 400, "mutability", "required"),
    ([{"op": "replace", "path": "active", "value": "maybe"}], 400, "invalidValue", "boolean"),
    ([{"op": "replace", "path": "name", "value": {"nosuch": 1}}], 400, "invalidValue", "nosuch"),
    ([{"op": "add", "path": "title"}], 400, "invalidValue", "needs a value"),
    ([{"op": "replace", "value": "x"}], 400, "invalidValue", "object value"),
])
def test_normalize_errors(ops, status, scim_type, words):
    with pytest.raises(ScimError) as exc:
        normalize(USER, body(*ops))
    assert (exc.value.status, exc.value.scim_type) == (status, scim_type)
    assert words in exc.value.detail


@pytest.mark.parametrize("raw, words", [
    ({"Operations": [{"op": "add", "path": "title", "value": "x"}]}, "schemas"),
    ({"schemas": [PATCH], "Operations": []}, "non-empty"),
    ({"schemas": [PATCH]}, "non-empty"),
    ([1, 2], "JSON object"),
])
def test_normalize_rejects_bad_messages(raw, words):
    with pytest.raises(ScimError) as exc:
        normalize(USER, raw)
    assert exc.value.scim_type == "invalidSyntax" and words in exc.value.detail


def test_result_is_validated(user):
    with pytest.raises(ScimError) as exc:
        patched(user, {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "no-at-sign"})
    assert exc.value.scim_type == "invalidValue" and "emails" in exc.value.detail


# -- group members -----------------------------------------------------------


def mops(*ops):
    return member_ops(normalize(GROUP, body(*ops)))


def test_member_add_one_op_many_values():
    # Microsoft's "Update Group [Add Members]", with several values at once
    got = mops({"op": "Add", "path": "members",
                "value": [{"$ref": None, "value": "u1"}, {"value": "u2"}, {"value": "g9", "type": "Group"}]})
    assert got == [MemberOp("add", ("u1", "u2", "g9"), (None, None, "Group"))]


def test_member_removal_both_shapes():
    # without aadOptscim062020: a value list; with it: a value filter
    assert mops({"op": "Remove", "path": "members", "value": [{"$ref": None, "value": "u1"}]}) == \
        [MemberOp("remove", ("u1",), (None,))]
    (op,) = mops({"op": "remove", "path": "members[value eq \"7f4bc1a3-285e-48ae-8202-5accb43efb0e\"]"})
    assert op.kind == "remove_where" and op.filter.value == "7f4bc1a3-285e-48ae-8202-5accb43efb0e"
    assert mops({"op": "remove", "path": "members"}) == [MemberOp("remove_all")]


def test_group_ops_split_into_document_and_members():
    group = accept(GROUP, {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group",
                    "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
        "externalId": "8aa1a0c0", "displayName": "displayName", "meta": {"resourceType": "Group"}})
    ops = normalize(GROUP, body(
        {"op": "Replace", "path": "displayName", "value": "renamed"},
        {"op": "add", "value": {"members": [{"value": "u3"}]}},
        {"op": "Add", "path": "members", "value": {"value": "u4"}}))
    assert apply(GROUP, group, ops)["displayName"] == "renamed"
    assert "members" not in apply(GROUP, group, ops)
    assert member_ops(ops) == [MemberOp("add", ("u3",), (None,)), MemberOp("add", ("u4",), (None,))]


@pytest.mark.parametrize("op, words", [
    ({"op": "add", "path": "members", "value": [{"display": "no value"}]}, "needs a \"value\""),
    ({"op": "replace", "path": "members[value eq \"u1\"].display", "value": "x"}, "whole"),
    ({"op": "replace", "path": "members[value eq \"u1\"]", "value": {"value": "u2"}}, "whole"),
])
def test_member_op_errors(op, words):
    with pytest.raises(ScimError) as exc:
        mops(op)
    assert words in exc.value.detail
