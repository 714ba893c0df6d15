"""The User and Group resources: their schemas, what a request may carry,
and how a stored row is shown.

scim2-models is the source of the schemas: its pydantic models validate
every resource we accept (``User[EnterpriseUser]``, ``Group[EntraGroup]``)
and its ``to_schema()`` gives the attribute definitions, which serve both
the ``/Schemas`` documents and the registry below (canonical names, types,
``caseExact``, mutability) that filters, PATCH paths and ``attributes=``
resolve against, case-insensitively.

What is stored (``doc``) is the request's data under canonical attribute
names, values exactly as sent: scim2-models validates but is not the
storage form, since its dump rewrites some values (e-mail domains in lower
case). Only types are settled: ``"False"`` becomes ``false``.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, ValidationError
from scim2_models import (
    URN,
    CaseExact,
    EnterpriseUser,
    Extension,
)
from scim2_models import (
    Group as ScimGroup,
)
from scim2_models import (
    User as ScimUser,
)

from ...core.policy import external_id_key, normalize_sid
from ..db import fold
from .errors import INVALID_VALUE, bad_request
from .filter import AttrPath

USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
ENTERPRISE_USER = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
ENTRA_GROUP = "urn:ietf:params:scim:schemas:extension:Microsoft:Entra:2.0:Group"
# Entra ID puts this in the "schemas" of every group it creates; it names
# no attributes of its own.
MS_GROUP_SCHEMA = "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
LIST_RESPONSE = "urn:ietf:params:scim:api:messages:2.0:ListResponse"

_SID = re.compile(r"^S-1-\d+(-\d+)+$", re.IGNORECASE)


class EntraGroup(Extension):
    """The group attributes of Microsoft's own Entra SCIM schema that matter
    here. An administrator who adds ``onPremisesSecurityIdentifier`` to the
    group mapping makes the AD SID reach the bundle (``groups.sid``)."""

    __schema__ = URN(ENTRA_GROUP)

    description: str | None = None
    mail_nickname: str | None = None
    on_premises_sam_account_name: str | None = Field(
        None, serialization_alias="onPremisesSAMAccountName",
        validation_alias="onPremisesSAMAccountName")
    on_premises_security_identifier: Annotated[str | None, CaseExact.false] = None
    """The group's SID in on-premises Active Directory (S-1-5-21-...)."""
    security_identifier: str | None = None
    """Entra ID's own SID of the group (S-1-12-1-...), not an AD SID."""


USER_MODEL = ScimUser[EnterpriseUser]
GROUP_MODEL = ScimGroup[EntraGroup]


# --------------------------------------------------------------------------
# Attribute registry


@dataclass
class AttrDef:
    name: str
    type: str
    multi: bool = False
    case_exact: bool = False
    mutability: str = "readWrite"
    returned: str = "default"
    uniqueness: str = "none"
    required: bool = False
    subs: dict[str, AttrDef] = field(default_factory=dict)   # casefolded name ->

    def sub(self, name: str) -> AttrDef | None:
        return self.subs.get(name.casefold())


def _attr_from_schema(a: dict) -> AttrDef:
    return AttrDef(
        name=a["name"], type=a["type"], multi=bool(a.get("multiValued")),
        case_exact=bool(a.get("caseExact")), mutability=a.get("mutability", "readWrite"),
        returned=a.get("returned", "default"), uniqueness=a.get("uniqueness", "none"),
        required=bool(a.get("required")),
        subs={s["name"].casefold(): _attr_from_schema(s) for s in a.get("subAttributes") or []})


def _attrs(defs: list[AttrDef]) -> dict[str, AttrDef]:
    return {d.name.casefold(): d for d in defs}


_META = AttrDef("meta", "complex", mutability="readOnly", subs=_attrs([
    AttrDef("resourceType", "string", case_exact=True, mutability="readOnly"),
    AttrDef("created", "dateTime", mutability="readOnly"),
    AttrDef("lastModified", "dateTime", mutability="readOnly"),
    AttrDef("location", "reference", case_exact=True, mutability="readOnly"),
    AttrDef("version", "string", case_exact=True, mutability="readOnly"),
]))
_COMMON = [
    AttrDef("id", "string", case_exact=True, mutability="readOnly", returned="always",
            uniqueness="server"),
    AttrDef("externalId", "string", case_exact=True),
    _META,
]


@dataclass(frozen=True)
class Resolved:
    """An attribute path matched against a resource's schemas."""

    schema: str | None          # extension URN, or None for core/common
    attr: AttrDef | None        # None: the whole extension ``schema``
    sub: AttrDef | None = None

    @property
    def name(self) -> str:
        if self.attr is None:
            return self.schema or ""
        head = f"{self.schema}:{self.attr.name}" if self.schema else self.attr.name
        return f"{head}.{self.sub.name}" if self.sub else head

    @property
    def case_exact(self) -> bool:
        d = self.sub or self.attr
        return bool(d and d.case_exact)

    @property
    def type(self) -> str:
        d = self.sub or self.attr
        return d.type if d else "complex"


class Kind:
    """A resource type: User or Group."""

    def __init__(self, name: str, endpoint: str, schema: str, model, core_schema: dict,
                 extensions: list[dict], description: str, tweaks: dict[str, dict]):
        self.name = name
        self.endpoint = endpoint
        self.schema = schema
        self.model = model
        self.description = description
        for doc in [core_schema, *extensions]:
            for a in doc["attributes"]:
                a.update(tweaks.get(f"{doc['id']}:{a['name']}", {}))
        self.schema_docs = [core_schema, *extensions]
        self.core: dict[str, AttrDef] = {
            **_attrs(_COMMON),
            **{a["name"].casefold(): _attr_from_schema(a) for a in core_schema["attributes"]}}
        self.extensions: dict[str, tuple[str, dict[str, AttrDef]]] = {
            doc["id"].casefold(): (doc["id"], {a["name"].casefold(): _attr_from_schema(a)
                                               for a in doc["attributes"]})
            for doc in extensions}

    def extension(self, uri: str) -> tuple[str, dict[str, AttrDef]] | None:
        return self.extensions.get(uri.casefold())

    def resolve(self, path: AttrPath, within: AttrDef | None = None,
                error=None) -> Resolved:
        """Match ``path`` against the schemas; ``within`` resolves a path
        relative to one value of a multi-valued attribute (inside ``[...]``).
        Unknown names raise ``error(message, path)``."""
        def fail(message: str):
            raise (error or _unknown)(message, path)

        if within is not None:
            if path.uri:
                fail(f"{str(path)!r}: a value filter names sub-attributes of "
                     f"{within.name!r}, not schema URNs")
            sub = within.sub(path.name)
            if sub is None or path.sub:
                fail(f"{within.name!r} has no sub-attribute {str(path)!r}")
            return Resolved(None, within, sub)
        schema = None
        table = self.core
        if path.uri:
            if path.uri.casefold() == self.schema.casefold():
                pass
            elif (ext := self.extension(path.uri)) is not None:
                schema, table = ext
            elif (ext := self.extension(f"{path.uri}:{path.name}")) is not None and not path.sub:
                return Resolved(ext[0], None)
            else:
                fail(f"unknown schema {path.uri!r} for a {self.name}")
        attr = table.get(path.name.casefold())
        if attr is None and not path.uri:
            for urn, ext_table in self.extensions.values():
                if (attr := ext_table.get(path.name.casefold())) is not None:
                    schema = urn
                    break
        if attr is None:
            fail(f"a {self.name} has no attribute {str(path)!r}")
        sub = None
        if path.sub:
            sub = attr.sub(path.sub)
            if sub is None:
                fail(f"{attr.name!r} has no sub-attribute {path.sub!r}")
        return Resolved(schema, attr, sub)


def _unknown(message: str, path: AttrPath):
    return bad_request(message, INVALID_VALUE)


def _schema_dump(model) -> dict:
    return model.to_schema().model_dump(exclude_none=True)


def _build_kinds() -> tuple[Kind, Kind]:
    user_core = _schema_dump(ScimUser)
    user_core["description"] = "User Account"
    group_core = _schema_dump(ScimGroup)
    group_core["description"] = "Group"
    enterprise = _schema_dump(EnterpriseUser)
    enterprise["description"] = "Enterprise User"
    entra_group = _schema_dump(EntraGroup)
    entra_group["description"] = "Microsoft Entra ID group attributes"
    user = Kind("User", "/Users", USER_SCHEMA, USER_MODEL, user_core, [enterprise],
                "User Account", tweaks={
                    f"{USER_SCHEMA}:userName": {"required": True, "uniqueness": "server"},
                    # direct memberships, filterable (groups.value eq "..."), shown on request
                    f"{USER_SCHEMA}:groups": {"returned": "request"},
                })
    group = Kind("Group", "/Groups", GROUP_SCHEMA, GROUP_MODEL, group_core, [entra_group],
                 "Group", tweaks={
                     f"{GROUP_SCHEMA}:displayName": {"required": True, "uniqueness": "server"},
                 })
    return user, group


USER, GROUP = _build_kinds()


# --------------------------------------------------------------------------
# Accepting a resource


def strip_nulls(value: Any) -> Any:
    """RFC 7643 §2.5: null is the same as unassigned."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value if v is not None]
    return value


def as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"    # Entra sends "False" without aadOptscim062020
    raise bad_request(f"{where}: expected a boolean, got {value!r}")


def canon_value(attr: AttrDef, value: Any, where: str) -> Any:
    """``value`` for ``attr`` under canonical sub-attribute names, with its
    type settled; raises 400 on an unknown sub-attribute or a wrong type."""
    if attr.multi:
        if not isinstance(value, list):
            value = [value]
        return [canon_single(attr, v, f"{where}[{i}]") for i, v in enumerate(value)
                if v is not None]
    if isinstance(value, list) and attr.type == "complex" and len(value) == 1:
        value = value[0]          # Entra sends manager as a one-element list
    return canon_single(attr, value, where)


def canon_single(attr: AttrDef, value: Any, where: str) -> Any:
    t = attr.type
    if t == "complex":
        if isinstance(value, str) and attr.sub("value") is not None:
            return {"value": value}   # manager: "id" (Entra, aadOptscim062020)
        if not isinstance(value, dict):
            raise bad_request(f"{where}: expected an object, got {_show(value)}")
        out = {}
        for k, v in value.items():
            if v is None:
                continue
            sub = attr.sub(k)
            if sub is None:
                raise bad_request(f"{where}: unknown sub-attribute {k!r} of {attr.name!r}")
            out[sub.name] = canon_single(sub, v, f"{where}.{sub.name}")
        return out
    if t == "boolean":
        return as_bool(value, where)
    if t in ("string", "reference", "binary", "dateTime"):
        if not isinstance(value, str):
            raise bad_request(f"{where}: expected a string, got {_show(value)}")
        return value
    if t == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{where}: expected an integer, got {_show(value)}")
        return value
    if t == "decimal":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"{where}: expected a number, got {_show(value)}")
        return value
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


# Attributes a client may send but that the server sets or never keeps.
_IGNORED = {"id", "meta", "groups", "password"}


def accept(kind: Kind, payload: Any) -> dict:
    """The stored form of a POST or PUT body: canonical names, values as
    sent, validated by scim2-models. Raises ScimError 400."""
    if not isinstance(payload, dict):
        raise bad_request("the body must be a JSON object", "invalidSyntax")
    payload = strip_nulls(payload)
    doc: dict[str, Any] = {}
    for key, value in payload.items():
        low = key.casefold()
        if low == "schemas":
            _check_schemas(kind, value)
            continue
        if low in _IGNORED and kind.core.get(low) is not None:
            continue
        ext = kind.extension(key)
        if ext is not None:
            urn, table = ext
            if not isinstance(value, dict):
                raise bad_request(f"{urn}: expected an object")
            target = doc.setdefault(urn, {})
            for k, v in value.items():
                attr = table.get(k.casefold())
                if attr is None:
                    raise bad_request(f"unknown attribute {k!r} of {urn}")
                target[attr.name] = canon_value(attr, v, f"{urn}:{attr.name}")
            continue
        if low.startswith("urn:") and ":" in key:
            # "urn:...:User:department": an extension attribute written flat
            uri, name = key.rsplit(":", 1)
            ext = kind.extension(uri)
            if ext is None:
                raise bad_request(f"unknown schema in attribute {key!r}")
            urn, table = ext
            attr = table.get(name.casefold())
            if attr is None:
                raise bad_request(f"unknown attribute {key!r}")
            doc.setdefault(urn, {})[attr.name] = canon_value(attr, value, key)
            continue
        attr = kind.core.get(low)
        if attr is None:
            raise bad_request(f"unknown attribute {key!r} for a {kind.name}")
        if attr.mutability == "readOnly":
            continue
        doc[attr.name] = canon_value(attr, value, attr.name)
    return finish(kind, doc)


def _check_schemas(kind: Kind, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("schemas: expected a list of schema URIs")
    if kind.schema.casefold() not in {s.casefold() for s in value}:
        raise bad_request(f"schemas: {kind.schema} is missing; this endpoint takes "
                          f"{kind.name} resources")


def finish(kind: Kind, doc: dict) -> dict:
    """Drop empty parts, set ``schemas``, check required attributes and
    validate with scim2-models; returns the doc to store."""
    for urn, _table in kind.extensions.values():
        if urn in doc and not doc[urn]:
            del doc[urn]
    for k in [k for k, v in doc.items() if v == [] or v == {}]:
        del doc[k]
    required = "userName" if kind is USER else "displayName"
    value = doc.get(required)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{required} is required and must not be empty")
    doc["schemas"] = [kind.schema] + [urn for urn, _ in kind.extensions.values() if urn in doc]
    validate(kind, doc)
    if kind is GROUP:
        sid = doc.get(ENTRA_GROUP, {}).get("onPremisesSecurityIdentifier")
        if sid is not None and not _SID.match(sid):
            raise bad_request(f"{ENTRA_GROUP}:onPremisesSecurityIdentifier: {sid!r} "
                              f"is not a SID (S-1-5-21-...)")
    return doc


def validate(kind: Kind, doc: dict) -> None:
    # Without a request context: scim2-models would otherwise require a
    # manager's "$ref", which Entra ID does not send.
    try:
        kind.model.model_validate(doc)
    except ValidationError as exc:
        raise bad_request(_pydantic_detail(exc)) from None


def _pydantic_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown attribute"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def user_columns(doc: dict) -> dict:
    name = doc["userName"]
    return {"user_name": name, "user_name_key": fold(name),
            "external_id": doc.get("externalId"), "display_name": doc.get("displayName"),
            "active": doc.get("active", True)}


def group_columns(doc: dict) -> dict:
    name = doc["displayName"]
    sid = doc.get(ENTRA_GROUP, {}).get("onPremisesSecurityIdentifier")
    ext = doc.get("externalId")
    return {"display_name": name, "display_name_key": fold(name),
            "external_id": ext, "external_id_key": (external_id_key(ext) or None) if ext else None,
            "sid": _sid_column(sid)}


def _sid_column(sid: str | None) -> str | None:
    """The SID as the policy spells it. One that does not read as a SID is
    kept upper-cased, as received."""
    if not sid:
        return None
    try:
        return normalize_sid(sid)
    except ValueError:
        return sid.upper()


# --------------------------------------------------------------------------
# Showing a resource


def iso(ts: dt.datetime) -> str:
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def etag(version: int) -> str:
    return f'W/"{version}"'


def render(kind: Kind, row, base: str, members: list[dict] | None = None,
           groups: list[dict] | None = None) -> dict:
    """The SCIM representation of a stored ``User`` or ``Group`` row;
    ``base`` is the tenant URL (``https://host/scim/orgs/1``)."""
    doc = row.doc or {}
    out: dict[str, Any] = {"schemas": doc.get("schemas") or [kind.schema], "id": row.id}
    for k, v in doc.items():
        if k != "schemas":
            out[k] = v
    if members is not None:
        out["members"] = members
    if groups is not None:
        out["groups"] = groups
    out["meta"] = {
        "resourceType": kind.name,
        "created": iso(row.created_at),
        "lastModified": iso(row.modified_at),
        "location": f"{base}{kind.endpoint}/{row.id}",
        "version": etag(row.version),
    }
    return out


class Projection:
    """``attributes`` / ``excludedAttributes`` (RFC 7644 §3.4.2.5)."""

    def __init__(self, kind: Kind, attributes: str | None, excluded: str | None):
        self.kind = kind
        self.include = self._parse(attributes, "attributes")
        self.exclude = self._parse(excluded, "excludedAttributes")

    def _parse(self, text: str | None, param: str) -> list[Resolved] | None:
        if text is None or not text.strip():
            return None
        out = []
        from .filter import FilterError, split_attr_path
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                path = split_attr_path(part, 0, part, INVALID_VALUE)
            except FilterError:
                raise bad_request(f"{param}: {part!r} is not an attribute path") from None
            out.append(self.kind.resolve(
                path, error=lambda m, p: bad_request(f"{param}: {m}")))
        return out

    def wants(self, name: str) -> bool:
        """Whether the top-level core attribute ``name`` is in the output
        (``members``, ``groups``: loaded only when wanted)."""
        attr = self.kind.core[name.casefold()]
        if self.include is not None:
            return any(r.schema is None and r.attr is attr for r in self.include)
        if self.exclude is not None and any(
                r.schema is None and r.attr is attr and r.sub is None for r in self.exclude):
            return False
        return attr.returned != "request"

    def apply(self, res: dict) -> dict:
        if self.include is None and self.exclude is None:
            return res
        if self.include is not None:
            out = {"schemas": res["schemas"], "id": res["id"]}
            for r in self.include:
                _copy(res, out, r)
            return out
        out = dict(res)
        for r in self.exclude:
            if r.attr is not None and r.attr.returned == "always":
                continue
            _drop(out, r)
        return out


def _copy(src: dict, dst: dict, r: Resolved) -> None:
    """Copy the part of ``src`` that ``r`` names into ``dst``; never
    shares a container that is later written to."""
    if r.attr is None:
        if r.schema in src:
            dst[r.schema] = src[r.schema]
        return
    s = src.get(r.schema) if r.schema else src
    if not isinstance(s, dict) or r.attr.name not in s:
        return
    if r.schema:
        d = dst[r.schema] = dict(dst.get(r.schema) or {})
    else:
        d = dst
    value = s[r.attr.name]
    if r.sub is None:
        d[r.attr.name] = value
    elif isinstance(value, list):
        prev = d.get(r.attr.name)
        picked = [{r.sub.name: v[r.sub.name]} if isinstance(v, dict) and r.sub.name in v else {}
                  for v in value]
        if isinstance(prev, list) and len(prev) == len(picked):
            picked = [{**a, **b} for a, b in zip(prev, picked)]
        d[r.attr.name] = picked
    elif isinstance(value, dict) and r.sub.name in value:
        d[r.attr.name] = {**(d.get(r.attr.name) or {}), r.sub.name: value[r.sub.name]}


def _drop(doc: dict, r: Resolved) -> None:
    """Remove what ``r`` names from the shallow copy ``doc``, copying
    each container it changes."""
    if r.attr is None:
        doc.pop(r.schema, None)
        return
    if r.schema:
        if not isinstance(doc.get(r.schema), dict):
            return
        c = doc[r.schema] = dict(doc[r.schema])
    else:
        c = doc
    if r.attr.name not in c:
        return
    if r.sub is None:
        del c[r.attr.name]
        return
    value = c[r.attr.name]
    if isinstance(value, list):
        c[r.attr.name] = [{k: v for k, v in e.items() if k != r.sub.name}
                          for e in value if isinstance(e, dict)]
    elif isinstance(value, dict):
        c[r.attr.name] = {k: v for k, v in value.items() if k != r.sub.name}
