"""PATCH (RFC 7644 §3.5.2): every shape Entra ID sends, reduced to one
canonical form, then applied. Both steps are pure (no database).

:func:`normalize` turns a request body into a list of :class:`Op`, each
with one resolved target:

- op names in any case ("Replace", "Add", "Remove");
- path-less ``add``/``replace`` with an object value, including Entra's
  dotted keys (``"name.givenName"``) and URN-qualified keys
  (``"urn:...:enterprise:2.0:User:manager"``), split into one op per
  attribute;
- values in the type of their attribute: ``"False"`` -> ``false``, a
  manager as a bare id or as a one-element list -> ``{"value": id}``;
- ``members`` removal by ``"path": "members[value eq \\"id\\"]"`` or by
  ``"path": "members", "value": [{"value": "id"}, ...]``.

:func:`apply` applies the non-member ops to a stored resource document;
a group's member ops (:func:`member_ops`) are applied in SQL by
``store.py``, in bulk.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from scim2_models import PatchOp

from .errors import (
    INVALID_PATH,
    INVALID_SYNTAX,
    INVALID_VALUE,
    MUTABILITY,
    NO_TARGET,
    ScimError,
    bad_request,
)
from .filter import And, AttrPath, Compare, FilterError, Node, evaluate, parse_path
from .resources import (
    GROUP,
    PATCH_OP,
    AttrDef,
    Kind,
    Resolved,
    canon_single,
    canon_value,
    finish,
)

OPS = ("add", "remove", "replace")
_SKIPPED_KEYS = {"id", "meta", "schemas"}


@dataclass(frozen=True)
class Op:
    """One canonical operation. ``target.sub`` is the sub-attribute the op
    reaches (after ``filter`` when there is one); ``target.attr`` None means
    the whole extension ``target.schema``."""

    op: str
    target: Resolved
    filter: Node | None = None
    value: Any = None
    has_value: bool = False

    @property
    def is_members(self) -> bool:
        return self.target.schema is None and self.target.attr is not None \
            and self.target.attr.name == "members"


def _path_error(message: str, path: AttrPath | None = None) -> ScimError:
    return ScimError(400, message, INVALID_PATH)


def _get_ci(obj: dict, name: str) -> Any:
    for k, v in obj.items():
        if k.casefold() == name.casefold():
            return v
    return None


def normalize(kind: Kind, body: Any) -> list[Op]:
    """The canonical ops of a PatchOp request body; 400 on anything wrong."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object (a PatchOp message)", INVALID_SYNTAX)
    schemas = _get_ci(body, "schemas")
    if not isinstance(schemas, list) or PATCH_OP.casefold() not in {
            str(s).casefold() for s in schemas}:
        raise bad_request(f"schemas must be [\"{PATCH_OP}\"]", INVALID_SYNTAX)
    raw_ops = _get_ci(body, "Operations")
    if not isinstance(raw_ops, list) or not raw_ops:
        raise bad_request("Operations must be a non-empty list", INVALID_SYNTAX)
    ops: list[Op] = []
    envelope = []
    for i, raw in enumerate(raw_ops):
        where = f"Operations[{i}]"
        if not isinstance(raw, dict):
            raise bad_request(f"{where}: expected an object", INVALID_SYNTAX)
        name = _get_ci(raw, "op")
        if not isinstance(name, str) or name.lower() not in OPS:
            raise bad_request(f"{where}: op must be add, remove or replace, not {name!r}",
                              INVALID_SYNTAX)
        name = name.lower()
        path_text = _get_ci(raw, "path")
        has_value = any(k.casefold() == "value" for k in raw)
        value = _get_ci(raw, "value")
        if path_text is not None and not isinstance(path_text, str):
            raise _path_error(f"{where}: path must be a string")
        if path_text is None or not path_text.strip():
            if name == "remove":
                raise ScimError(400, f"{where}: remove needs a path", NO_TARGET)
            if not isinstance(value, dict):
                raise bad_request(f"{where}: {name} without a path needs an object value")
            new = _expand(kind, name, value, where)
        else:
            new = _with_path(kind, name, path_text, value, has_value, where)
        ops.extend(new)
        envelope.extend({"op": o.op, "path": _path_text(o), **({"value": o.value}
                         if o.has_value and not o.is_members else {})} for o in new)
    _check_envelope(kind, envelope)
    return ops


def _path_text(op: Op) -> str:
    """The op's path as scim2-models reads it: qualified where an
    extension attribute was named bare (Entra sends "manager")."""
    t = op.target
    if t.attr is None:
        return t.schema
    head = f"{t.schema}:{t.attr.name}" if t.schema else t.attr.name
    return f"{head}.{t.sub.name}" if t.sub else head


_checked: dict[tuple, bool] = {}


def _check_envelope(kind: Kind, ops: list[dict]) -> None:
    # scim2-models checks the message and each path against the schema;
    # member values are left out (thousands of them, checked in bulk later).
    # An envelope without values (member PATCHes) is checked once per shape.
    key = None
    if all("value" not in o for o in ops):
        key = (kind.name, tuple((o["op"], o["path"]) for o in ops))
        if key in _checked:
            return
    try:
        PatchOp[kind.model].model_validate({"schemas": [PATCH_OP], "Operations": ops})
    except ValidationError as exc:
        err = exc.errors()[0]
        kind_ = str(err.get("type", ""))
        scim_type = {"scim_invalidPath": INVALID_PATH, "scim_mutability": MUTABILITY,
                     "scim_noTarget": NO_TARGET}.get(kind_, INVALID_VALUE)
        raise ScimError(400, err.get("msg", "invalid PATCH operation"), scim_type) from None
    if key is not None and len(_checked) < 1000:
        _checked[key] = True


def _resolve(kind: Kind, path: AttrPath) -> Resolved:
    return kind.resolve(path, error=lambda m, p: _path_error(m))


def _with_path(kind: Kind, op: str, text: str, value: Any, has_value: bool,
               where: str) -> list[Op]:
    pp = parse_path(text)
    target = _resolve(kind, pp.attr)
    if target.attr is None and op != "remove":       # a whole extension
        if not isinstance(value, dict):
            raise bad_request(f"{where}: expected an object of {target.schema} attributes")
        return _expand(kind, op, {target.schema: value}, where)
    flt = pp.filter
    if flt is not None:
        attr = target.attr
        if attr is None or not attr.multi or attr.type != "complex":
            raise _path_error(f"{where}: {target.name} is not multi-valued; "
                              f"'[...]' does not apply")
        _resolve_filter(kind, attr, flt)
        if pp.sub:
            sub = attr.sub(pp.sub)
            if sub is None:
                raise _path_error(f"{where}: {attr.name!r} has no sub-attribute {pp.sub!r}")
            target = Resolved(target.schema, attr, sub)
    _check_mutable(target, op, where)
    if op == "remove":
        if has_value and value is not None and target.attr is not None and target.attr.multi \
                and flt is None and target.sub is None:
            return [Op(op, target, None, canon_value(target.attr, value, where), True)]
        return [Op(op, target, flt)]
    if not has_value or value is None:
        raise bad_request(f"{where}: {op} needs a value")
    return [Op(op, target, flt, _canon_for(target, flt, value, where), True)]


def _resolve_filter(kind: Kind, within: AttrDef, node: Node) -> None:
    """Fails on a value filter naming a sub-attribute ``within`` lacks."""
    from .filter import Match, Not, Or, Present
    if isinstance(node, (And, Or)):
        _resolve_filter(kind, within, node.left)
        _resolve_filter(kind, within, node.right)
    elif isinstance(node, Not):
        _resolve_filter(kind, within, node.expr)
    elif isinstance(node, Match):
        raise _path_error("a value filter cannot contain another")
    elif isinstance(node, (Compare, Present)):
        kind.resolve(node.attr, within=within, error=lambda m, p: _path_error(m))


def _check_mutable(target: Resolved, op: str, where: str) -> None:
    for d in (target.attr, target.sub):
        if d is not None and d.mutability == "readOnly":
            raise ScimError(400, f"{where}: {target.name} is read-only", MUTABILITY)
    if target.attr is not None and target.attr.name in ("userName", "displayName") \
            and target.schema is None and op == "remove" and target.sub is None:
        raise ScimError(400, f"{where}: {target.attr.name} is required; it cannot be removed",
                        MUTABILITY)


def _canon_for(target: Resolved, flt: Node | None, value: Any, where: str) -> Any:
    attr = target.attr
    if target.sub is not None:
        return canon_single(target.sub, _unwrap(target.sub, value), where)
    if attr.multi and flt is not None:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        return canon_single(attr, value, where)
    if not attr.multi and attr.type != "complex":
        value = _unwrap(attr, value)
    return canon_value(attr, value, where)


def _unwrap(attr: AttrDef, value: Any) -> Any:
    """A simple single value sent as ``[{"value": x}]`` or ``[x]``."""
    if attr.type != "complex" and isinstance(value, list) and len(value) == 1:
        value = value[0]
        if isinstance(value, dict) and {k.casefold() for k in value} == {"value"}:
            value = next(iter(value.values()))
    return value


def _expand(kind: Kind, op: str, value: dict, where: str) -> list[Op]:
    """A path-less add/replace: one op per attribute named in ``value``."""
    out: list[Op] = []
    for key, v in value.items():
        low = key.casefold()
        if low in _SKIPPED_KEYS:
            continue
        ext = kind.extension(key)
        if ext is not None:
            urn, table = ext
            if not isinstance(v, dict):
                raise bad_request(f"{where}: {urn} must be an object")
            for k2, v2 in v.items():
                attr = table.get(k2.casefold())
                if attr is None:
                    raise _path_error(f"{where}: {urn} has no attribute {k2!r}")
                out.append(_keyed(op, Resolved(urn, attr), v2, f"{where}: {urn}:{attr.name}"))
            continue
        try:
            path = parse_path(key)
        except FilterError:
            raise _path_error(f"{where}: {key!r} is not an attribute name") from None
        if path.filter is not None:
            raise _path_error(f"{where}: {key!r}: a value filter belongs in path")
        target = _resolve(kind, path.attr)
        if target.attr is None:
            if not isinstance(v, dict):
                raise bad_request(f"{where}: {target.schema} must be an object")
            for k2, v2 in v.items():
                attr = kind.extension(target.schema)[1].get(k2.casefold())
                if attr is None:
                    raise _path_error(f"{where}: {target.schema} has no attribute {k2!r}")
                out.append(_keyed(op, Resolved(target.schema, attr), v2, where))
            continue
        out.append(_keyed(op, target, v, f"{where}: {target.name}"))
    return out


def _keyed(op: str, target: Resolved, value: Any, where: str) -> Op:
    _check_mutable(target, op, where)
    if value is None:
        # {"title": null} in a path-less replace: unassign (RFC 7643 §2.5)
        return Op("remove", target)
    return Op(op, target, None, _canon_for(target, None, value, where), True)


# --------------------------------------------------------------------------
# Applying ops to a document


def _container(doc: dict, target: Resolved, create: bool) -> dict | None:
    if target.schema is None:
        return doc
    c = doc.get(target.schema)
    if c is None and create:
        c = doc[target.schema] = {}
    return c


def _is_primary(v: Any) -> bool:
    return isinstance(v, dict) and v.get("primary") is True


def _one_primary(values: list) -> list:
    """RFC 7643 §2.4: at most one value is primary; the last one set wins."""
    seen = False
    for v in reversed(values):
        if _is_primary(v):
            if seen:
                v["primary"] = False
            seen = True
    return values


def _equal_filter_fields(node: Node) -> dict[str, Any] | None:
    """``type eq "work" [and ...]`` -> {"type": "work"}: what a new value
    must carry so the filter selects it; None for any other filter."""
    if isinstance(node, Compare) and node.op == "eq" and node.attr.uri is None \
            and node.attr.sub is None and node.value is not None:
        return {node.attr.name: node.value}
    if isinstance(node, And):
        left, right = _equal_filter_fields(node.left), _equal_filter_fields(node.right)
        if left is not None and right is not None:
            return {**left, **right}
    return None


def _canonical_fields(attr: AttrDef, fields: dict[str, Any]) -> dict[str, Any]:
    """The filter's values under canonical names and in their types
    (``roles[primary eq "True"]`` makes ``"primary": true``)."""
    out = {}
    for k, v in fields.items():
        sub = attr.sub(k)
        if sub is None:
            raise _path_error(f"{attr.name!r} has no sub-attribute {k!r}")
        out[sub.name] = canon_single(sub, v, f"{attr.name}.{sub.name}")
    return out


def apply(kind: Kind, doc: dict, ops: list[Op]) -> dict:
    """The resource document after ``ops`` (member ops excluded); the
    result is validated like a POST body. ``doc`` is not modified."""
    doc = copy.deepcopy(doc)
    for op in ops:
        if op.is_members and kind is GROUP:
            continue
        _apply_one(doc, op)
    return finish(kind, doc)


def _case_exact(within: AttrDef):
    def f(path: AttrPath) -> bool:
        sub = within.sub(path.name)
        return bool(sub and sub.case_exact)
    return f


def _apply_one(doc: dict, op: Op) -> None:
    t = op.target
    if t.attr is None:                               # remove a whole extension
        doc.pop(t.schema, None)
        return
    c = _container(doc, t, op.op != "remove")
    if c is None:
        return
    attr = t.attr
    name = attr.name
    if attr.multi:
        _apply_multi(c, op)
        return
    if t.sub is not None:                            # name.givenName
        if op.op == "remove":
            inner = c.get(name)
            if isinstance(inner, dict):
                inner.pop(t.sub.name, None)
                if not inner:
                    del c[name]
            return
        inner = c.get(name)
        if not isinstance(inner, dict) or _new_reference(inner, {t.sub.name: op.value}):
            inner = c[name] = {}
        inner[t.sub.name] = op.value
        return
    if op.op == "remove":
        c.pop(name, None)
        return
    old = c.get(name)
    if attr.type == "complex" and isinstance(old, dict) and not _new_reference(old, op.value):
        c[name] = {**old, **op.value}                # sub-attributes not named stay
    else:
        c[name] = op.value


def _new_reference(old: dict, new: dict) -> bool:
    """Whether ``new`` points a reference (manager) at another resource:
    then the old ``$ref`` and display name describe the wrong one."""
    return "value" in new and "value" in old and new["value"] != old["value"]


def _apply_multi(c: dict, op: Op) -> None:
    t = op.target
    attr = t.attr
    name = attr.name
    values = c.get(name)
    values = [dict(v) if isinstance(v, dict) else v for v in values] \
        if isinstance(values, list) else []
    if op.filter is None:
        if t.sub is not None:
            if op.op != "remove":
                raise _path_error(f"{attr.name}.{t.sub.name}: name the values to change "
                                  f"with a filter, e.g. {attr.name}[type eq \"work\"]."
                                  f"{t.sub.name}")
            values = [{k: v for k, v in e.items() if k != t.sub.name} for e in values]
            values = [e for e in values if e]
        elif op.op == "remove":
            if op.has_value:
                drop = op.value if isinstance(op.value, list) else [op.value]
                values = [e for e in values if not any(_same(e, d) for d in drop)]
            else:
                values = []
        elif op.op == "replace":
            values = list(op.value)
        else:                                        # add
            for new in op.value:
                if not any(_same(e, new, exact=True) for e in values):
                    values.append(new)
        if values:
            c[name] = _one_primary(values)
        else:
            c.pop(name, None)
        return
    case_exact = _case_exact(attr)
    hits = [i for i, e in enumerate(values)
            if isinstance(e, dict) and evaluate(op.filter, e, case_exact)]
    if op.op == "remove":
        if t.sub is None:
            values = [e for i, e in enumerate(values) if i not in hits]
        else:
            for i in hits:
                values[i].pop(t.sub.name, None)
            values = [e for e in values if e]
    else:
        if not hits:
            fields = _equal_filter_fields(op.filter)
            if fields is None:
                raise ScimError(400, f"no value of {name} matches the filter of the path",
                                NO_TARGET)
            # Entra replaces emails[type eq "work"].value of a user that has
            # no work e-mail yet: the value is created, as the filter reads
            values.append(_canonical_fields(attr, fields))
            hits = [len(values) - 1]
        for i in hits:
            if t.sub is not None:
                values[i][t.sub.name] = op.value
            else:
                values[i].update(op.value)
    if values:
        c[name] = _one_primary(values)
    else:
        c.pop(name, None)


def _same(a: Any, b: Any, exact: bool = False) -> bool:
    """Whether value ``a`` is the one ``b`` names: by ``value`` (and
    ``type`` when both have one), or whole when neither has a ``value``."""
    if isinstance(a, dict) and isinstance(b, dict):
        if exact:
            return a == b
        if "value" in b:
            if a.get("value") != b["value"]:
                return False
            return "type" not in b or "type" not in a or a["type"] == b["type"]
        return a == b
    return a == b


# --------------------------------------------------------------------------
# Group members


@dataclass(frozen=True)
class MemberOp:
    """``add``/``remove``/``replace`` member ids, ``remove_all``, or
    ``remove_where`` a value filter (``members[value eq "id"]``)."""

    kind: str
    ids: tuple[str, ...] = ()
    types: tuple[str | None, ...] = ()
    filter: Node | None = None


def member_ops(ops: list[Op]) -> list[MemberOp]:
    out = []
    for op in ops:
        if not op.is_members:
            continue
        if op.target.sub is not None and op.op != "remove":
            raise ScimError(400, "members are added and removed whole; their "
                                 "sub-attributes cannot be changed", MUTABILITY)
        if op.op == "remove":
            if op.filter is not None:
                out.append(MemberOp("remove_where", filter=op.filter))
            elif op.has_value:
                ids, types = member_values(op.value)
                out.append(MemberOp("remove", ids, types))
            else:
                out.append(MemberOp("remove_all"))
            continue
        if op.filter is not None:
            raise ScimError(400, "members are added and removed whole; a filtered "
                                 "path cannot change one", MUTABILITY)
        ids, types = member_values(op.value)
        out.append(MemberOp(op.op, ids, types))
    return out


def member_values(values: Any) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    if not isinstance(values, list):
        values = [values]
    ids: list[str] = []
    types: list[str | None] = []
    for i, v in enumerate(values):
        if not isinstance(v, dict) or not isinstance(v.get("value"), str) or not v["value"]:
            raise bad_request(f"members[{i}]: each member needs a \"value\" (the id of a "
                              f"User or Group)")
        ids.append(v["value"])
        t = v.get("type")
        types.append(t if isinstance(t, str) else None)
    return tuple(ids), tuple(types)


def summary(ops: list[Op], mops: list[MemberOp]) -> str:
    """What a group PATCH does, for ``last_sync_op``: "update: displayName,
    +3 -1 members"."""
    parts = sorted({o.target.name for o in ops if not o.is_members})
    added = sum(len(set(m.ids)) for m in mops if m.kind in ("add", "replace"))
    removed = sum(len(set(m.ids)) if m.kind == "remove" else 1
                  for m in mops if m.kind in ("remove", "remove_where"))
    counts = []
    if any(m.kind == "replace" for m in mops):
        counts.append(f"={added}")
    elif added:
        counts.append(f"+{added}")
    if any(m.kind == "remove_all" for m in mops):
        counts.append("-all")
    elif removed:
        counts.append(f"-{removed}")
    if counts:
        parts.append(" ".join(counts) + " members")
    text = "update: " + ", ".join(parts) if parts else "update"
    return text if len(text) <= 64 else text[:63] + "…"
