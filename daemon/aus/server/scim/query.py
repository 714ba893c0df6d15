"""Filters compiled to SQL: the attributes Entra ID queries by are columns
with indexes; the rest of a resource is reached in its JSON ``doc``.

- ``userName`` and a group's ``displayName`` (caseExact false) compare on
  their casefolded ``*_key`` columns, so ``eq`` is one unique-index probe.
- ``id``, ``externalId``, ``displayName`` (users), ``active`` and
  ``meta.created``/``meta.lastModified`` are columns.
- ``members`` of a group and ``groups`` of a user are ``memberships`` rows
  (``members eq "u"``, ``members[value eq "u"]``, ``members.type eq "Group"``).
- Anything else (``emails[type eq "work"].value``, ``name.familyName``,
  the enterprise extension) is read from ``doc`` with the engine's JSON
  functions (SQLite ``json_extract``/``json_each``, PostgreSQL ``#>>``/
  ``json_array_elements``): still one SQL statement, not a scan in Python.

Every leaf is written so it is never NULL, which keeps ``not (...)``
true for resources that lack the attribute, as the in-memory evaluator has it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, false, func, literal, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from ..db import Group, Membership, User, fold
from .errors import INVALID_FILTER, ScimError
from .filter import And, Match, Node, Not, Or, Present
from .resources import GROUP, USER, Kind, Resolved


def _fail(message: str, node: Any = None) -> ScimError:
    pos = getattr(node, "pos", None)
    where = f" (at position {pos + 1})" if pos is not None else ""
    return ScimError(400, f"invalid filter: {message}{where}", INVALID_FILTER)


def _like(value: str, op: str) -> str:
    esc = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return {"co": f"%{esc}%", "sw": f"{esc}%", "ew": f"%{esc}"}[op]


def _datetime(value: Any, node) -> dt.datetime:
    if isinstance(value, str):
        try:
            d = dt.datetime.fromisoformat(value)
            return d if d.tzinfo else d.replace(tzinfo=dt.UTC)
        except ValueError:
            pass
    raise _fail(f"{value!r} is not a dateTime (e.g. \"2024-05-01T12:00:00Z\")", node)


def _bool(value: Any, node) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _fail(f"{value!r} is not a boolean", node)


def text_cmp(expr, op: str, value: Any, case_exact: bool, nullable: bool = True,
             node=None) -> ColumnElement:
    """A never-NULL comparison of the string expression ``expr``."""
    if value is None:
        if op == "eq":
            return expr.is_(None)
        if op == "ne":
            return expr.isnot(None)
        raise _fail(f"'{op}' cannot compare with null", node)
    if isinstance(value, bool):
        value = "true" if value else "false"
    value = str(value)
    if case_exact:
        lhs, rhs = expr, literal(value)
    else:
        lhs, rhs = func.lower(expr), func.lower(literal(value))
    if op == "ne":
        cmp = lhs != rhs
        return or_(expr.is_(None), cmp) if nullable else cmp
    if op in ("co", "sw", "ew"):
        pat = literal(_like(value, op))
        cmp = lhs.like(pat if case_exact else func.lower(pat), escape="\\")
    else:
        cmp = _ordered(lhs, op, rhs)
    return and_(expr.isnot(None), cmp) if nullable else cmp


def _ordered(lhs, op: str, rhs) -> ColumnElement:
    if op == "eq":
        return lhs == rhs
    if op == "ne":
        return lhs != rhs
    if op == "gt":
        return lhs > rhs
    if op == "ge":
        return lhs >= rhs
    if op == "lt":
        return lhs < rhs
    return lhs <= rhs


def key_cmp(col, op: str, value: Any, node=None) -> ColumnElement:
    """Comparison on a casefolded ``*_key`` column (never NULL)."""
    if not isinstance(value, str):
        if value is None and op == "eq":
            return false()
        if value is None and op == "ne":
            return true()
        raise _fail(f"{value!r} is not a string", node)
    v = fold(value)
    if op in ("co", "sw", "ew"):
        return col.like(_like(v, op), escape="\\")
    return _ordered(col, op, v)


def bool_cmp(expr, op: str, value: Any, nullable: bool, node=None) -> ColumnElement:
    if value is None:
        return text_cmp(expr, op, None, True, node=node)
    b = _bool(value, node)
    if op == "eq":
        return and_(expr.isnot(None), expr == b) if nullable else expr == b
    if op == "ne":
        return or_(expr.is_(None), expr != b) if nullable else expr != b
    raise _fail(f"'{op}' does not apply to a boolean", node)


def time_cmp(col, op: str, value: Any, node=None) -> ColumnElement:
    if op in ("co", "sw", "ew"):
        raise _fail(f"'{op}' does not apply to a dateTime", node)
    if value is None:
        return false() if op == "eq" else true()
    return _ordered(col, op, _datetime(value, node))


class Compiler:
    """Compiles a filter AST for ``kind`` on the given SQL dialect."""

    def __init__(self, kind: Kind, dialect: str):
        self.kind = kind
        self.pg = dialect == "postgresql"
        self.model = User if kind is USER else Group

    def compile(self, node: Node) -> ColumnElement:
        return self._node(node)

    # -- structure
    def _node(self, node: Node) -> ColumnElement:
        if isinstance(node, And):
            return and_(self._node(node.left), self._node(node.right))
        if isinstance(node, Or):
            return or_(self._node(node.left), self._node(node.right))
        if isinstance(node, Not):
            return not_(self._node(node.expr))
        if isinstance(node, Match):
            return self._match(node)
        r = self.kind.resolve(node.attr, error=lambda m, p: _fail(m, node))
        return self._leaf(r, node)

    def _resolve_in(self, within, node) -> Resolved:
        return self.kind.resolve(node.attr, within=within, error=lambda m, p: _fail(m, node))

    def _inner(self, node: Node, leaf: Callable[[Resolved, Node], ColumnElement],
               within) -> ColumnElement:
        """A filter inside ``attr[...]``, each leaf compiled by ``leaf``."""
        if isinstance(node, And):
            return and_(self._inner(node.left, leaf, within), self._inner(node.right, leaf, within))
        if isinstance(node, Or):
            return or_(self._inner(node.left, leaf, within), self._inner(node.right, leaf, within))
        if isinstance(node, Not):
            return not_(self._inner(node.expr, leaf, within))
        if isinstance(node, Match):
            raise _fail("a value filter cannot contain another", node)
        return leaf(self._resolve_in(within, node), node)

    # -- leaves
    def _leaf(self, r: Resolved, node: Node) -> ColumnElement:
        if r.attr is None:
            if isinstance(node, Present):
                return self._json_scalar([r.schema]).isnot(None)
            raise _fail(f"{r.name} is a schema, not an attribute", node)
        if r.schema is None:
            col = self._column_leaf(r, node)
            if col is not None:
                return col
        return self._json_leaf(r, node)

    def _column_leaf(self, r: Resolved, node: Node) -> ColumnElement | None:
        m = self.model
        name = r.attr.name
        op = "pr" if isinstance(node, Present) else node.op
        value = None if isinstance(node, Present) else node.value
        if name == "id":
            return true() if op == "pr" else text_cmp(m.id, op, value, True, False, node)
        if name == "externalId":
            if op == "pr":
                return and_(m.external_id.isnot(None), m.external_id != "")
            return text_cmp(m.external_id, op, value, True, True, node)
        if m is User and name == "userName":
            return true() if op == "pr" else key_cmp(User.user_name_key, op, value, node)
        if m is Group and name == "displayName":
            return true() if op == "pr" else key_cmp(Group.display_name_key, op, value, node)
        if m is User and name == "displayName":
            if op == "pr":
                return and_(User.display_name.isnot(None), User.display_name != "")
            return text_cmp(User.display_name, op, value, False, True, node)
        if m is User and name == "active":
            return true() if op == "pr" else bool_cmp(User.active, op, value, False, node)
        if name == "meta":
            sub = r.sub.name if r.sub else None
            col = {"created": m.created_at, "lastModified": m.modified_at}.get(sub)
            if col is not None:
                return true() if op == "pr" else time_cmp(col, op, value, node)
            if sub == "resourceType":
                if op == "pr":
                    return true()
                return true() if _py_cmp(self.kind.name, op, value) else false()
            raise _fail(f"filtering on meta.{sub or ''} is not supported", node)
        if (m is Group and name == "members") or (m is User and name == "groups"):
            return self._membership_exists(
                lambda mem: self._member_leaf(r, node, mem))
        return None

    # memberships: a group's "members", a user's "groups"
    def _membership_exists(self, cond: Callable[[Any], ColumnElement]) -> ColumnElement:
        mem = Membership.__table__.alias("mem")
        if self.model is Group:
            link = mem.c.group_id == Group.id
        else:
            # a user's groups: only groups of the user's org
            link = and_(mem.c.member_id == User.id,
                        mem.c.group_id.in_(select(Group.id).where(Group.org_id == User.org_id)))
        return select(literal(1)).select_from(mem).where(link, cond(mem)).exists()

    def _member_leaf(self, r: Resolved, node: Node, mem) -> ColumnElement:
        sub = r.sub.name if r.sub else "value"
        target = mem.c.member_id if self.model is Group else mem.c.group_id
        if isinstance(node, Present):
            return true()
        if sub == "value":
            return text_cmp(target, node.op, node.value, True, False, node)
        if sub == "type" and self.model is Group:
            return text_cmp(mem.c.member_type, node.op, node.value, False, False, node)
        raise _fail(f"filtering on {r.attr.name}.{sub} is not supported; "
                    f"use {r.attr.name}.value", node)

    def _match(self, node: Match) -> ColumnElement:
        r = self.kind.resolve(node.attr, error=lambda m, p: _fail(m, node))
        if r.attr is None or r.attr.type != "complex" or not r.attr.multi:
            raise _fail(f"{r.name} is not a multi-valued complex attribute; "
                        f"'[...]' does not apply", node)
        within = r.attr
        if r.schema is None and ((self.model is Group and within.name == "members")
                                 or (self.model is User and within.name == "groups")):
            return self._membership_exists(
                lambda mem: self._inner(node.filter,
                                        lambda rr, n: self._member_leaf(rr, n, mem), within))
        elems, field = self._elements([r.schema, within.name] if r.schema else [within.name])
        cond = self._inner(node.filter, lambda rr, n: self._elem_leaf(field, rr, n), within)
        return select(literal(1)).select_from(elems).where(cond).exists()

    # -- JSON
    def _json_scalar(self, keys: list[str], as_bool: bool = False):
        path = self.model.doc[tuple(keys)]
        return path.as_boolean() if as_bool else path.as_string()

    def _elements(self, keys: list[str]):
        """The values of a multi-valued attribute as rows, and a function
        giving one sub-attribute of such a row as SQL."""
        if self.pg:
            elems = func.json_array_elements(self.model.doc[tuple(keys)]).table_valued("value")

            def field(name: str, as_bool: bool = False):
                expr = elems.c.value.op("->>")(literal(name))
                return (expr == "true") if as_bool else expr
        else:
            jpath = "$" + "".join(f'."{k}"' for k in keys)
            elems = func.json_each(self.model.doc, jpath).table_valued("value")

            def field(name: str, as_bool: bool = False):
                expr = func.json_extract(elems.c.value, f'$."{name}"')
                return (expr == 1) if as_bool else expr
        return elems, field

    def _elem_leaf(self, field, r: Resolved, node: Node) -> ColumnElement:
        d = r.sub
        if isinstance(node, Present):
            expr = field(d.name)
            return and_(expr.isnot(None), expr != "") if d.type == "string" else expr.isnot(None)
        if d.type == "boolean":
            expr = field(d.name)
            if node.value is None:
                return text_cmp(expr, node.op, None, True, node=node)
            want = _bool(node.value, node)
            hit = field(d.name, as_bool=True)
            if node.op == "eq":
                return and_(expr.isnot(None), hit if want else not_(hit))
            if node.op == "ne":
                return or_(expr.is_(None), not_(hit) if want else hit)
            raise _fail(f"'{node.op}' does not apply to a boolean", node)
        if d.type == "complex":
            raise _fail(f"{r.name} is complex; compare one of its sub-attributes", node)
        return text_cmp(field(d.name), node.op, node.value, d.case_exact, True, node)

    def _json_leaf(self, r: Resolved, node: Node) -> ColumnElement:
        attr = r.attr
        base = [r.schema] if r.schema else []
        if attr.multi:
            if attr.type != "complex":
                raise _fail(f"filtering on the multi-valued {attr.name} is not supported", node)
            sub = r.sub or attr.sub("value")
            if sub is None:
                raise _fail(f"{r.name} is complex; name one of its sub-attributes", node)
            elems, field = self._elements(base + [attr.name])
            if isinstance(node, Present) and r.sub is None:
                return select(literal(1)).select_from(elems).exists()
            cond = self._elem_leaf(field, Resolved(r.schema, attr, sub), node)
            return select(literal(1)).select_from(elems).where(cond).exists()
        d = r.sub or attr
        keys = base + [attr.name] + ([r.sub.name] if r.sub else [])
        if d.type == "complex":
            if isinstance(node, Present):
                return self._json_scalar(keys).isnot(None)
            if d.sub("value") is None:
                raise _fail(f"{r.name} is complex; compare one of its sub-attributes", node)
            d = d.sub("value")
            keys = keys + ["value"]
        expr = self._json_scalar(keys)
        if isinstance(node, Present):
            return and_(expr.isnot(None), expr != "") if d.type == "string" else expr.isnot(None)
        if d.type == "boolean":
            if node.value is None:
                return text_cmp(expr, node.op, None, True, node=node)
            want = _bool(node.value, node)
            hit = self._json_scalar(keys, as_bool=True)
            if node.op == "eq":
                return and_(expr.isnot(None), hit == want)
            if node.op == "ne":
                return or_(expr.is_(None), hit != want)
            raise _fail(f"'{node.op}' does not apply to a boolean", node)
        return text_cmp(expr, node.op, node.value, d.case_exact, True, node)


def _py_cmp(actual: str, op: str, value: Any) -> bool:
    from .filter import compare
    return compare(actual, op, value, True)


def compile_filter(kind: Kind, node: Node, dialect: str) -> ColumnElement:
    return Compiler(kind, dialect).compile(node)


def member_condition(node: Node, dialect: str, table) -> ColumnElement:
    """A ``members[...]`` value filter on the rows of ``memberships``."""
    c = Compiler(GROUP, dialect)
    return c._inner(node, lambda r, n: c._member_leaf(r, n, table), GROUP.core["members"])
