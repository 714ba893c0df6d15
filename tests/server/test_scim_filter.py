"""SCIM filter and PATCH path parsing, in-memory evaluation and SQL
compilation, without a database."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from aus.server.scim.errors import ScimError
from aus.server.scim.filter import (
    And,
    AttrPath,
    Compare,
    FilterError,
    Match,
    Not,
    Or,
    PatchPath,
    Present,
    evaluate,
    parse_filter,
    parse_path,
)
from aus.server.scim.query import compile_filter
from aus.server.scim.resources import GROUP, USER

ENT = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"


def _strip(node):
    """The AST without positions, for comparisons."""
    if isinstance(node, Compare):
        return ("cmp", str(node.attr), node.op, node.value)
    if isinstance(node, Present):
        return ("pr", str(node.attr))
    if isinstance(node, And):
        return ("and", _strip(node.left), _strip(node.right))
    if isinstance(node, Or):
        return ("or", _strip(node.left), _strip(node.right))
    if isinstance(node, Not):
        return ("not", _strip(node.expr))
    if isinstance(node, Match):
        return ("match", str(node.attr), _strip(node.filter))
    raise AssertionError(node)


@pytest.mark.parametrize("text, tree", [
    # What Entra ID sends
    ('userName eq "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee"',
     ("cmp", "userName", "eq", "Test_User_00aa00aa-bb11-cc22-dd33-44ee44ee44ee")),
    ('displayName eq "displayName"', ("cmp", "displayName", "eq", "displayName")),
    ('externalId eq jyoung', ("cmp", "externalId", "eq", "jyoung")),
    ('id eq "g1" and members eq "u1"',
     ("and", ("cmp", "id", "eq", "g1"), ("cmp", "members", "eq", "u1"))),
    ('id eq "u1" and manager eq "m1"',
     ("and", ("cmp", "id", "eq", "u1"), ("cmp", "manager", "eq", "m1"))),
    ('emails[type eq "work"].value eq "a@contoso.com"',
     ("match", "emails", ("and", ("cmp", "type", "eq", "work"), ("cmp", "value", "eq", "a@contoso.com")))),
    # RFC 7644 §3.4.2.2 examples
    ('title pr', ("pr", "title")),
    ('meta.lastModified gt "2011-05-13T04:42:34Z"',
     ("cmp", "meta.lastModified", "gt", "2011-05-13T04:42:34Z")),
    ('title pr and userType eq "Employee"',
     ("and", ("pr", "title"), ("cmp", "userType", "eq", "Employee"))),
    ('title pr or userType eq "Intern"',
     ("or", ("pr", "title"), ("cmp", "userType", "eq", "Intern"))),
    ('userType eq "Employee" and (emails co "example.com" or emails.value co "example.org")',
     ("and", ("cmp", "userType", "eq", "Employee"),
      ("or", ("cmp", "emails", "co", "example.com"), ("cmp", "emails.value", "co", "example.org")))),
    ('userType ne "Employee" and not (emails co "example.com" or emails.value co "example.org")',
     ("and", ("cmp", "userType", "ne", "Employee"),
      ("not", ("or", ("cmp", "emails", "co", "example.com"), ("cmp", "emails.value", "co", "example.org"))))),
    ('emails[type eq "work" and value co "@example.com"] or ims[type eq "xmpp" and value co "@foo.com"]',
     ("or", ("match", "emails", ("and", ("cmp", "type", "eq", "work"), ("cmp", "value", "co", "@example.com"))),
      ("match", "ims", ("and", ("cmp", "type", "eq", "xmpp"), ("cmp", "value", "co", "@foo.com"))))),
    (f'{ENT}:employeeNumber eq "42"', ("cmp", f"{ENT}:employeeNumber", "eq", "42")),
    # keywords and operators in any case; and binds tighter than or
    ('userName EQ "a" OR userName Eq "b" AND active eq TRUE',
     ("or", ("cmp", "userName", "eq", "a"),
      ("and", ("cmp", "userName", "eq", "b"), ("cmp", "active", "eq", True)))),
    ('not(active eq false)', ("not", ("cmp", "active", "eq", False))),
    ('x eq null', ("cmp", "x", "eq", None)),
    ('x gt 1.5e2', ("cmp", "x", "gt", 150.0)),
    ('userName eq "quote \\" and \\\\ backslash"', ("cmp", "userName", "eq", 'quote " and \\ backslash')),
])
def test_parse(text, tree):
    assert _strip(parse_filter(text)) == tree


@pytest.mark.parametrize("text, pos, words", [
    ('userName eq', 12, "expected a value"),
    ('userName zz "x"', 10, "expected an operator"),
    ('(userName eq "x"', 17, "expected ')'"),
    ('userName eq "x")', 16, "unbalanced ')'"),
    ('userName eq "x', 13, "unterminated string"),
    ("userName eq 'x'", 13, "quoted with"),
    ('emails[type eq "work"', 22, "expected ']'"),
    ('emails[type[x eq 1] eq 1]', 12, "cannot contain another"),
    ('userName co true', 13, "compares strings"),
    ('userName gt null', 13, "cannot compare"),
    ('and eq "x"', 1, "expected an attribute name"),
    ('userName eq "x" foo', 17, "expected 'and', 'or' or the end"),
    ('userName eq "x" and', 20, "expected an attribute name"),
    ('not userName eq "x"', 5, "expected '('"),
    ('name.givenName.x eq "x"', 1, "deeper than"),
    ('userName eq "x" # y', 17, "unexpected character"),
    ('', 1, "empty"),
])
def test_parse_errors_say_what_and_where(text, pos, words):
    with pytest.raises(FilterError) as exc:
        parse_filter(text)
    err = exc.value
    assert err.status == 400 and err.scim_type == "invalidFilter"
    assert f"position {pos}:" in err.detail and words in err.detail
    assert err.pos == pos - 1


@pytest.mark.parametrize("text, want", [
    ('members[value eq "7f4bc1a3"]', PatchPath(AttrPath(None, "members"), "f", None)),
    ('emails[type eq "work"].value', PatchPath(AttrPath(None, "emails"), "f", "value")),
    ('name.familyName', PatchPath(AttrPath(None, "name", "familyName"))),
    (f'{ENT}:employeeNumber', PatchPath(AttrPath(ENT, "employeeNumber"))),
    (f'{ENT}:manager.value', PatchPath(AttrPath(ENT, "manager", "value"))),
])
def test_parse_path(text, want):
    got = parse_path(text)
    assert (got.attr.uri, got.attr.name, got.attr.sub, got.sub) == \
        (want.attr.uri, want.attr.name, want.attr.sub, want.sub)
    assert (got.filter is not None) == (want.filter is not None)


@pytest.mark.parametrize("text", ['members[value eq "x"] junk', 'members[value eq ]', '', '[x]',
                                  'emails[type eq "work"].value.x'])
def test_parse_path_errors_are_invalid_path(text):
    with pytest.raises(FilterError) as exc:
        parse_path(text)
    assert exc.value.scim_type == "invalidPath" and exc.value.status == 400


def test_evaluate_on_values():
    work = {"type": "work", "value": "Bjensen@Example.com", "primary": True}
    home = {"type": "home", "value": "babs@jensen.org"}
    user = {"userName": "bjensen", "emails": [work, home], "name": {"familyName": "Jensen"},
            "meta": {"lastModified": "2011-05-13T04:42:34Z"}, "title": ""}
    ok = lambda f, obj=user: evaluate(parse_filter(f), obj)
    # strings compare case-insensitively unless the attribute is caseExact
    assert ok('userName eq "BJensen"') and ok('USERNAME sw "bj"') and ok('userName ew "SEN"')
    assert not evaluate(parse_filter('userName eq "BJensen"'), user, lambda a: True)
    assert ok('emails[type eq "WORK" and primary eq true]')
    assert ok('emails.value co "jensen.org"') and ok('emails co "EXAMPLE"')
    assert not ok('emails[type eq "other"]')
    assert ok('name.familyName eq "jensen"') and ok('NAME.FAMILYNAME eq "jensen"')
    assert ok('meta.lastModified gt "2011-05-13T04:42:33Z"')
    assert not ok('meta.lastModified gt "2011-05-13T04:42:34.000Z"')
    assert ok('title pr') is False and ok('nickName pr') is False and ok('userName pr')
    assert ok('not (title eq "boss")') and ok('title ne "boss"')
    assert ok('primary eq true', work) and ok('primary ne true', home)
    assert ok('type eq "work" or type eq "home"', home)


def _sql(kind, text, dialect):
    expr = compile_filter(kind, parse_filter(text), dialect)
    d = postgresql.dialect() if dialect == "postgresql" else sqlite.dialect()
    sql = str(expr.compile(dialect=d, compile_kwargs={"literal_binds": True}))
    return sql.replace("%%", "%") if dialect == "postgresql" else sql   # psycopg's escaping


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_entra_lookups_compile_to_indexed_columns(dialect):
    # userName compares on its casefolded key column: one unique-index probe
    assert _sql(USER, 'userName eq "Test_User@Contoso.COM"', dialect) == \
        "users.user_name_key = 'test_user@contoso.com'"
    assert _sql(GROUP, 'displayName eq "Sales EU"', dialect) == "groups.display_name_key = 'sales eu'"
    assert _sql(USER, 'externalId eq "0a21f0f2"', dialect) == \
        "users.external_id IS NOT NULL AND users.external_id = '0a21f0f2'"
    sql = _sql(GROUP, 'id eq "g1" and members eq "u1"', dialect)
    assert sql.startswith("groups.id = 'g1' AND (EXISTS (SELECT 1")
    assert "mem.group_id = groups.id" in sql and "mem.member_id = 'u1'" in sql
    # LIKE patterns escape the value's own wildcards
    assert "LIKE '%\\%\\_x%' ESCAPE" in _sql(USER, 'userName co "%_X"', dialect)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_other_attributes_compile_to_json_functions(dialect):
    sql = _sql(USER, 'emails[type eq "work"].value eq "a@b.c"', dialect)
    if dialect == "sqlite":
        assert "json_each(users.doc" in sql and "json_extract" in sql
    else:
        assert "json_array_elements(" in sql and "->>" in sql
    assert "EXISTS" in _sql(USER, 'emails.value co "@contoso"', dialect)
    assert "lower(" in _sql(USER, f'{ENT}:department eq "Sales"', dialect)


@pytest.mark.parametrize("text, words", [
    ('nosuch eq "x"', "has no attribute 'nosuch'"),
    ('name.nosuch eq "x"', "has no sub-attribute"),
    ('urn:example:foo:bar eq "x"', "unknown schema"),
    ('active gt true', "cannot compare"),
    ('active eq "maybe"', "not a boolean"),
    ('meta.created gt "yesterday"', "not a dateTime"),
    ('userName[value eq "x"]', "not a multi-valued"),
    ('members.display eq "x"', "not supported"),
])
def test_compile_errors_are_invalid_filter(text, words):
    kind = GROUP if text.startswith("members") else USER
    with pytest.raises(ScimError) as exc:
        compile_filter(kind, parse_filter(text), "sqlite")
    assert exc.value.scim_type == "invalidFilter" and words in exc.value.detail

