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


# --------------------------------------------------------------------------
# Deltas: the changes from one bundle version to another
#
#     {"format": "aus.bundle-delta/1", "org": "1", "from_version": 41, "version": 42,
#      "generated_at": "...", "digest": "<sha256 of the canonical bundle 42>",
#      "members": {"add": {"DEV": ["carol"]}, "remove": {"DEV": ["bob"]}, "drop": ["OPS"]},
#      "policy": {...the whole policy of 42, only when it changed...},
#      "enforcement": {...of 42, only when it changed; null: 42 has none...}}
#
# Applying one: ``drop`` takes groups out of ``members`` first, then
# ``remove`` takes users out, then ``add`` puts users in (creating the
# group's entry, possibly empty); every list stays sorted, as the server
# builds them. The result is validated as a whole bundle and must hash to
# ``digest``, so a delta applied to the wrong base never goes unnoticed.

DELTA_FORMAT = "aus.bundle-delta/1"
DELTA_MEDIA_TYPE = "application/vnd.aus.bundle-delta+json"


def canonical_digest(data: Any) -> str:
    """sha256 hex of a bundle document in canonical JSON (sorted keys, no
    spaces): what the server puts in a delta's ``digest``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _member_changes(old: dict[str, list[str]], new: dict[str, list[str]]) -> dict:
    add: dict[str, list[str]] = {}
    remove: dict[str, list[str]] = {}
    drop = sorted(g for g in old if g not in new)
    for group, users in new.items():
        before = old.get(group)
        if before is None:
            add[group] = sorted(users)
            continue
        if before is users or before == users:
            continue
        was, now = set(before), set(users)
        if now - was:
            add[group] = sorted(now - was)
        if was - now:
            remove[group] = sorted(was - now)
    out: dict = {"add": dict(sorted(add.items())), "remove": dict(sorted(remove.items()))}
    if drop:
        out["drop"] = drop
    return out


def diff_documents(old: dict, new: dict, digest: str | None = None) -> dict:
    """The delta that turns bundle document ``old`` into ``new`` (both as
    published: valid, members sorted). ``digest``: of ``new``, when the
    caller has it already."""
    delta: dict = {"format": DELTA_FORMAT, "org": new["org"],
                   "from_version": old["version"], "version": new["version"],
                   "generated_at": new["generated_at"],
                   "digest": digest or canonical_digest(new),
                   "members": _member_changes(old["members"], new["members"])}
    if old["policy"] != new["policy"]:
        delta["policy"] = new["policy"]
    if old.get("enforcement") != new.get("enforcement"):
        delta["enforcement"] = new.get("enforcement")
    return delta


def compose_deltas(first: dict, then: dict) -> dict:
    """One delta with the effect of ``first`` then ``then`` (both valid,
    ``then`` starting where ``first`` ends)."""
    a, b = first["members"], then["members"]
    a_drop, b_drop = set(a.get("drop", ())), set(b.get("drop", ()))
    groups = set(a["add"]) | set(a["remove"]) | set(b["add"]) | set(b["remove"]) \
        | a_drop | b_drop
    add: dict[str, list[str]] = {}
    remove: dict[str, list[str]] = {}
    for g in groups:
        a_add, a_rem = set(a["add"].get(g, ())), set(a["remove"].get(g, ()))
        b_add, b_rem = set(b["add"].get(g, ())), set(b["remove"].get(g, ()))
        if g in b_drop:       # whatever ``first`` did is gone; ``then`` starts afresh
            if g in b["add"]:
                add[g] = sorted(b_add)
        elif g in a_drop:     # ``first`` started the group afresh; ``then`` edits it
            if g in a["add"] or g in b["add"]:
                add[g] = sorted((a_add - b_rem) | b_add)
        else:
            plus, minus = (a_add - b_rem) | (b_add - a_rem), (a_rem - b_add) | (b_rem - a_add)
            if plus or g in a["add"] or g in b["add"]:
                add[g] = sorted(plus)
            if minus:
                remove[g] = sorted(minus)
    members: dict = {"add": dict(sorted(add.items())), "remove": dict(sorted(remove.items()))}
    if a_drop | b_drop:
        members["drop"] = sorted(a_drop | b_drop)
    out = {**then, "from_version": first["from_version"], "members": members}
    out.pop("policy", None)
    out.pop("enforcement", None)
    for key in ("policy", "enforcement"):
        if key in then:
            out[key] = then[key]
        elif key in first:
            out[key] = first[key]
    return out


def _group_lists(value: Any, where: str, problems: list[str]) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping of group names to lists of userNames, "
                        f"got {describe_value(value)}")
        return {}
    for group, users in value.items():
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            problems.append(f"{where}.{group}: expected a list of userNames, got "
                            f"{describe_value(users)}")
    return value


def delta_problems(delta: Any) -> list[str]:
    """What is wrong with a delta's shape, as ``path: reason``."""
    if not isinstance(delta, dict):
        return [f"a delta is a JSON object, not {describe_value(delta)}"]
    if delta.get("format") != DELTA_FORMAT:
        return [f"format: expected {DELTA_FORMAT!r}, got {describe_value(delta.get('format'))}"]
    problems: list[str] = []
    known = {"format", "org", "from_version", "version", "generated_at", "digest",
             "members", "policy", "enforcement"}
    problems += [f"{k}: unknown key" for k in delta if k not in known]
    for key in ("from_version", "version"):
        v = delta.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            problems.append(f"{key}: expected a non-negative integer, got {describe_value(v)}")
    if not isinstance(delta.get("org"), str):
        problems.append(f"org: expected a string, got {describe_value(delta.get('org'))}")
    digest = delta.get("digest")
    if not (isinstance(digest, str) and len(digest) == 64
            and all(c in "0123456789abcdef" for c in digest)):
        problems.append(f"digest: expected a sha256 in hex, got {describe_value(digest)}")
    members = delta.get("members")
    if not isinstance(members, dict):
        problems.append(f"members: expected a mapping with add and remove, got "
                        f"{describe_value(members)}")
    else:
        problems += [f"members.{k}: unknown key" for k in members
                     if k not in ("add", "remove", "drop")]
        for key in ("add", "remove"):
            _group_lists(members.get(key), f"members.{key}", problems)
        drop = members.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(g, str) for g in drop):
            problems.append(f"members.drop: expected a list of group names, got "
                            f"{describe_value(drop)}")
    if "policy" in delta and not isinstance(delta["policy"], dict):
        problems.append(f"policy: expected a mapping, got {describe_value(delta['policy'])}")
    if delta.get("enforcement") is not None and not isinstance(delta["enforcement"], dict):
        problems.append(f"enforcement: expected a mapping or null, got "
                        f"{describe_value(delta['enforcement'])}")
    return problems


def apply_delta(base: dict, delta: Any, source: str) -> dict:
    """The bundle document ``delta`` makes of ``base`` (the document in
    force; left unchanged). Raises PolicyError naming ``source`` when the
    delta is malformed or does not start from ``base``. The result still
    has to be validated (:func:`bundle_from_delta` does both)."""
    problems = delta_problems(delta)
    if problems:
        raise PolicyError(source, problems)
    if delta["org"] != base.get("org"):
        raise PolicyError(source, [f"org: the delta is for org {delta['org']!r}, the bundle "
                                   f"in force is of org {base.get('org')!r}"])
    if delta["from_version"] != base.get("version"):
        raise PolicyError(source, [f"from_version: the delta starts from version "
                                   f"{delta['from_version']}, the bundle in force is version "
                                   f"{base.get('version')}"])
    if delta["version"] <= delta["from_version"]:
        raise PolicyError(source, [f"version: {delta['version']} is not above from_version "
                                   f"{delta['from_version']}"])
    m = delta["members"]
    members = dict(base["members"])
    for g in m.get("drop", ()):
        members.pop(g, None)
    for g, users in m["remove"].items():
        if g in members:
            gone = set(users)
            members[g] = [u for u in members[g] if u not in gone]
    for g, users in m["add"].items():
        members[g] = sorted(set(members.get(g, ())) | set(users))
    out = {**base, "version": delta["version"], "generated_at": delta["generated_at"],
           "members": dict(sorted(members.items()))}
    if "policy" in delta:
        out["policy"] = delta["policy"]
    if "enforcement" in delta:
        if delta["enforcement"] is None:
            out.pop("enforcement", None)
        else:
            out["enforcement"] = delta["enforcement"]
    return out


def bundle_from_delta(base: Bundle, raw: bytes, source: str) -> Bundle:
    """The bundle a delta (as received) makes of ``base``, validated like
    a full bundle and checked against the delta's digest. Raises
    PolicyError naming ``source`` with the reason."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise PolicyError(source, [
            f"the delta is {len(raw)} bytes; at most {MAX_BUNDLE_BYTES} are accepted"])
    try:
        delta = loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError(source, [f"not valid UTF-8 (byte {exc.start})"]) from exc
    except RecursionError as exc:
        raise PolicyError(source, ["the document is nested too deeply"]) from exc
    except ValueError as exc:
        raise PolicyError(source, [f"not JSON: {exc}"]) from exc
    bundle = bundle_from_data(apply_delta(base.data, delta, source), source)
    if bundle.digest != delta["digest"]:
        raise PolicyError(source, [
            f"digest: the bundle the delta makes hashes to {bundle.digest}, the server "
            f"says {delta['digest']}: the delta does not fit the bundle in force"])
    return bundle
