"""The policy bundle: the one document the policy server publishes and
every ausd follows. The server builds it with :class:`BundleDocument`, the
agent validates what it receives with the same model, so the two sides
cannot drift apart::

    {"format": 1, "org": "1", "version": 42, "generated_at": "2026-11-28T15:00:00Z",
     "policy": {...the policy document, validated like the policy file...},
     "members": {"DEV": ["alice@contoso.com", "bob"]},
     "enforcement": {"default": "visibility", "workloads": {"web-1": "enforce"}}}

``members`` maps a user group of ``policy.user_groups`` to the userNames
of its immediate members. ``enforcement`` (optional) is the mode the
server sets: the org's default and the workloads set one by one, by the
name each ausd sends as ``X-Aus-Workload``; a bundle without it leaves
every workload on its own configuration. A bad document is refused as a whole with every
problem listed by path, as a :class:`~aus.core.errors.PolicyError`. See
docs/policy-server-client.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import PolicyError
from .policy import (
    SKIP_CROSS_CHECKS,
    Policy,
    Problem,
    cross_checked,
    cross_problems,
    nesting_reason,
)
from .yamlsource import describe_validation_errors, describe_value, sorted_problems

BUNDLE_FORMAT = 1
MAX_BUNDLE_BYTES = 64 << 20      # far above any real org; bounds a bad reply


def _user_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty userName, got {describe_value(value)}")
    return value.strip()


def _user_names(value: Any) -> Any:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of userNames, got {describe_value(value)}")
    return value


UserName = Annotated[str, BeforeValidator(_user_name)]
Members = Annotated[list[UserName], BeforeValidator(_user_names)]

MODES = ("enforce", "visibility")
MAX_WORKLOAD_NAME = 255     # the server's column; longer names are cut there


def _mode(value: Any) -> Any:
    if value not in MODES:
        raise ValueError(f"expected 'enforce' or 'visibility', got {describe_value(value)}")
    return value


def _workload_modes(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of workload names to modes, got "
                         f"{describe_value(value)}")
    for name in value:
        if not name.strip() or len(name) > MAX_WORKLOAD_NAME:
            raise ValueError(f"{name!r} is not a workload name (1 to {MAX_WORKLOAD_NAME} "
                             "characters, not only spaces)")
    return value


Mode = Annotated[Literal["enforce", "visibility"], BeforeValidator(_mode)]


class Enforcement(BaseModel):
    """The modes the server sets: ``workloads`` by name, else ``default``
    (absent: the server says nothing and ausd keeps its own)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Mode | None = None
    workloads: Annotated[dict[str, Mode], BeforeValidator(_workload_modes)] = Field(
        default_factory=dict)

    def mode_for(self, workload: str) -> tuple[str, str] | None:
        """The mode the server sets for ``workload`` and where it came
        from (``server:workload`` or ``server:org``); None when it sets none.
        Names compare exactly, as the server stores them."""
        if workload in self.workloads:
            return self.workloads[workload], "server:workload"
        if self.default is not None:
            return self.default, "server:org"
        return None


class BundleDocument(BaseModel):
    """The bundle as published: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1]
    org: str
    version: int
    generated_at: str
    policy: Policy
    members: dict[str, Members]
    enforcement: Enforcement | None = None

    @field_validator("org", mode="before")
    @classmethod
    def _org(cls, v: Any) -> Any:
        if not (isinstance(v, str) and v.strip()):
            raise ValueError(f"expected a non-empty string, got {describe_value(v)}")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 1 << 63):
            raise ValueError(f"expected a positive integer, got {describe_value(v)}")
        return v

    @field_validator("generated_at", mode="before")
    @classmethod
    def _generated_at(cls, v: Any) -> Any:
        try:
            if not isinstance(v, str):
                raise ValueError
            _dt.datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time, got {describe_value(v)}") from None
        return v

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        if not isinstance(v, (dict, Policy)):
            raise ValueError("the policy must be a mapping with the keys user_groups, "
                             f"ip_lists, services and rules, not {describe_value(v)}")
        return v

    @field_validator("members", mode="before")
    @classmethod
    def _members(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("expected a mapping of user group names to lists of "
                             f"userNames, got {describe_value(v)}")
        return v

    @field_validator("enforcement", mode="before")
    @classmethod
    def _enforcement(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (dict, Enforcement)):
            raise ValueError("expected a mapping with the keys default and workloads, "
                             f"not {describe_value(v)}")
        return v

    @model_validator(mode="after")
    def _members_are_declared(self, info: ValidationInfo) -> BundleDocument:
        return cross_checked(self, info, members_problems)


def members_problems(data: Any) -> list[Problem]:
    """Members under a group the policy does not declare, or listed twice
    (names compare case-insensitively). Tolerates malformed data."""
    if not isinstance(data, dict) or not isinstance(data.get("members"), dict):
        return []
    policy = data.get("policy")
    groups = policy.get("user_groups") if isinstance(policy, dict) else None
    declared = None
    if isinstance(groups, list):
        declared = {g["name"].casefold() for g in groups
                    if isinstance(g, dict) and isinstance(g.get("name"), str)}
    out: list[Problem] = []
    seen: dict[str, str] = {}
    for name in data["members"]:
        key = name.casefold()
        if declared is not None and key not in declared:
            out.append((("members", name), f"{name!r} is not a user group of the "
                        "bundle's policy (policy.user_groups)"))
        if key in seen:
            out.append((("members", name), f"{name!r} is listed twice (also as "
                        f"{seen[key]!r}; group names are compared case-insensitively)"))
        seen.setdefault(key, name)
    return out


def document_from_data(data: Any, source: str) -> BundleDocument:
    """Validate a parsed bundle document. Raises PolicyError naming
    ``source`` and listing every problem as ``path: reason``."""
    if not isinstance(data, dict):
        raise PolicyError(source, [f"a bundle is a JSON object, not {describe_value(data)}"])
    if "format" not in data:
        raise PolicyError(source, ["format: required key is missing"])
    fmt = data["format"]
    if not (isinstance(fmt, int) and not isinstance(fmt, bool) and fmt == BUNDLE_FORMAT):
        # Another format may be shaped differently: check nothing else.
        raise PolicyError(source, [
            f"format: unsupported bundle format {fmt!r}; this ausd reads format "
            f"{BUNDLE_FORMAT} (a newer policy server needs a newer ausd)"])
    items: list[tuple[tuple[Any, ...], int | None, str]] = []
    doc = None
    try:
        doc = BundleDocument.model_validate(data, context={SKIP_CROSS_CHECKS: True})
    except ValidationError as exc:
        policy = data.get("policy")
        for path, line, reason in describe_validation_errors(exc, BundleDocument,
                                                             lambda _: None):
            if path[:1] == ("policy",) and isinstance(policy, dict):
                reason = nesting_reason(policy, path[1:]) or reason
            items.append((path, line, reason))
        # Unknown keys first: a document of the wrong shape says so at once.
        items.sort(key=lambda i: not (len(i[0]) == 1 and i[2].startswith("unknown key")))
    if isinstance(data.get("policy"), dict):
        items += [(("policy", *p), None, r) for p, r in cross_problems(data["policy"])]
    items += [(p, None, r) for p, r in members_problems(data)]
    if items:
        raise PolicyError(source, sorted_problems(items))
    assert doc is not None
    return doc


# --------------------------------------------------------------------------
# The bundle in force on a workload: the document and its member index


@dataclass(frozen=True)
class Bundle:
    org: str
    version: int
    generated_at: str
    policy: Policy
    members: dict[str, tuple[str, ...]]   # declared group name -> userNames
    data: dict = field(repr=False, compare=False)   # the document, for the cache
    digest: str = ""                      # sha256 of the canonical document
    enforcement: Enforcement | None = None   # the modes the server sets
    # casefolded userName -> groups; casefolded part before '@' -> groups
    _by_name: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False,
                                                 compare=False)
    _by_local: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False,
                                                  compare=False)

    def groups_of(self, user: str | None, match: str = "exact") -> tuple[str, ...]:
        """The bundle groups a local user (its NSS name) is a member of, in
        the policy's order. ``exact``: a member's userName equals the name,
        case-insensitively. ``local-part``: also when the name equals the
        part before '@' of a UPN-style userName (so alice@a.com and
        alice@b.com both match local ``alice``)."""
        if not user:
            return ()
        key = user.casefold()
        found = self._by_name.get(key, ())
        if match == "local-part":
            extra = self._by_local.get(key, ())
            if extra:
                wanted = set(found) | set(extra)
                found = tuple(g.name for g in self.policy.user_groups if g.name in wanted)
        return found


def _index(policy: Policy, members: dict[str, tuple[str, ...]]):
    by_name: dict[str, list[str]] = {}
    by_local: dict[str, list[str]] = {}
    for group in policy.user_groups:   # policy order, so results are stable
        for user in members.get(group.name, ()):
            key = user.casefold()
            if group.name not in by_name.setdefault(key, []):
                by_name[key].append(group.name)
            if "@" in key:
                local = key.split("@", 1)[0]
                if local and group.name not in by_local.setdefault(local, []):
                    by_local[local].append(group.name)
    return ({k: tuple(v) for k, v in by_name.items()},
            {k: tuple(v) for k, v in by_local.items()})


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    # json keeps the last of duplicate keys silently, which in a policy
    # would silently drop a list or a rule.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses duplicate keys (raises ValueError)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise ValueError(f"duplicate key {exc.args[0]!r} in a JSON object") from None


def bundle_from_bytes(raw: bytes, source: str) -> Bundle:
    """Parse and validate a bundle as received. Raises PolicyError naming
    ``source`` and listing every problem as ``path: reason``."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise PolicyError(source, [
            f"the bundle is {len(raw)} bytes; at most {MAX_BUNDLE_BYTES} are accepted"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(source, [f"not valid UTF-8 (byte {exc.start})"]) from exc
    try:
        data = loads_strict(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(source, [
            f"line {exc.lineno}, column {exc.colno}: not JSON: {exc.msg}"]) from exc
    except RecursionError as exc:
        raise PolicyError(source, ["the document is nested too deeply"]) from exc
    except ValueError as exc:
        raise PolicyError(source, [str(exc)]) from exc
    return bundle_from_data(data, source)


def bundle_from_data(data: Any, source: str) -> Bundle:
    """Validate a parsed bundle document and index its members."""
    doc = document_from_data(data, source)
    members: dict[str, tuple[str, ...]] = {}
    for name, users in doc.members.items():
        declared = doc.policy.group(name)
        assert declared is not None     # members_problems refused the others
        # A group listed under another spelling takes the declared one.
        members[declared.name] = tuple(dict.fromkeys(members.get(declared.name, ())
                                                     + tuple(users)))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    by_name, by_local = _index(doc.policy, members)
    return Bundle(org=doc.org, version=doc.version, generated_at=doc.generated_at,
                  policy=doc.policy, members=members, enforcement=doc.enforcement,
                  data=data,
                  digest=hashlib.sha256(canonical).hexdigest(),
                  _by_name=by_name, _by_local=by_local)
