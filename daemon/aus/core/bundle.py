"""Policy bundles from the policy server (aus-server): parsing, membership
matching and the on-disk cache of the last good bundle.

A bundle is one JSON document::

    {"format": 1, "org": "1", "version": 42, "generated_at": "2026-11-28T15:00:00Z",
     "policy": {...the policy document, validated like the policy file...},
     "members": {"DEV": ["alice@contoso.com", "bob"]}}

``members`` maps a user group of ``policy.user_groups`` to the userNames
of its immediate members. Everything is checked before a bundle is used;
a bad one is refused as a whole with every problem listed by path, as a
:class:`~aus.core.errors.PolicyError`. See docs/policy-server-client.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyError, PolicySourceError
from .policy import Policy, policy_from_data
from .yamlsource import describe_value, format_path

BUNDLE_FORMAT = 1
CACHE_FORMAT = 1
MAX_BUNDLE_BYTES = 64 << 20      # far above any real org; bounds a bad reply

_KEYS = ("format", "org", "version", "generated_at", "policy", "members")


@dataclass(frozen=True)
class Bundle:
    org: str
    version: int
    generated_at: str
    policy: Policy
    members: dict[str, tuple[str, ...]]   # declared group name -> userNames
    data: dict = field(repr=False, compare=False)   # the document, for the cache
    digest: str = ""                      # sha256 of the canonical document
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


# --------------------------------------------------------------------------
# Parsing


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
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise PolicyError(source, [f"duplicate key {exc.args[0]!r} in a JSON object"]) from exc
    except json.JSONDecodeError as exc:
        raise PolicyError(source, [
            f"line {exc.lineno}, column {exc.colno}: not JSON: {exc.msg}"]) from exc
    except RecursionError as exc:
        raise PolicyError(source, ["the document is nested too deeply"]) from exc
    return bundle_from_data(data, source)


def _problem(path: tuple, reason: str) -> str:
    where = format_path(path)
    return f"{where}: {reason}" if where else reason


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bundle_from_data(data: Any, source: str) -> Bundle:
    """Validate a parsed bundle document (see the module docstring)."""
    if not isinstance(data, dict):
        raise PolicyError(source, [
            f"a bundle is a JSON object, not {describe_value(data)}"])
    fmt = data.get("format")
    if "format" not in data:
        raise PolicyError(source, ["format: required key is missing"])
    if not _is_int(fmt) or fmt != BUNDLE_FORMAT:
        # Another format may be shaped differently: check nothing else.
        raise PolicyError(source, [
            f"format: unsupported bundle format {fmt!r}; this ausd reads format "
            f"{BUNDLE_FORMAT} (a newer policy server needs a newer ausd)"])
    problems: list[str] = []
    for key in data:
        if key not in _KEYS:
            problems.append(_problem((key,), f"unknown key {key!r} (allowed keys: "
                                     f"{', '.join(_KEYS)})"))
    for key in _KEYS:
        if key not in data:
            problems.append(_problem((key,), "required key is missing"))
    org = data.get("org")
    if "org" in data and not (isinstance(org, str) and org.strip()):
        problems.append(_problem(("org",), f"expected a non-empty string, got {describe_value(org)}"))
    version = data.get("version")
    if "version" in data and not (_is_int(version) and 1 <= version < 1 << 63):
        problems.append(_problem(("version",),
                                 f"expected a positive integer, got {describe_value(version)}"))
    generated = data.get("generated_at")
    if "generated_at" in data:
        try:
            if not isinstance(generated, str):
                raise ValueError
            _dt.datetime.fromisoformat(generated)
        except ValueError:
            problems.append(_problem(("generated_at",),
                                     f"expected an ISO 8601 time, got {describe_value(generated)}"))

    policy: Policy | None = None
    if "policy" in data:
        if not isinstance(data["policy"], dict):
            problems.append(_problem(("policy",), "the policy must be a mapping with the keys "
                                     "user_groups, ip_lists, services and rules, not "
                                     + describe_value(data["policy"])))
        else:
            try:
                policy = policy_from_data(data["policy"], source, path_prefix=("policy",))
            except PolicyError as exc:
                problems.extend(exc.problems)

    members: dict[str, tuple[str, ...]] = {}
    raw_members = data.get("members")
    if "members" in data and not isinstance(raw_members, dict):
        problems.append(_problem(("members",), f"expected a mapping of user group names to "
                                 f"lists of userNames, got {describe_value(raw_members)}"))
    elif isinstance(raw_members, dict):
        seen: dict[str, str] = {}
        for name, users in raw_members.items():
            path = ("members", name)
            declared = policy.group(name) if policy is not None else None
            if policy is not None and declared is None:
                problems.append(_problem(path, f"{name!r} is not a user group of the "
                                         "bundle's policy (policy.user_groups)"))
            key = name.casefold()
            if key in seen:
                problems.append(_problem(path, f"{name!r} is listed twice (also as "
                                         f"{seen[key]!r}; group names are compared "
                                         "case-insensitively)"))
            seen.setdefault(key, name)
            if not isinstance(users, list):
                problems.append(_problem(path, "expected a list of userNames, got "
                                         + describe_value(users)))
                continue
            good = []
            for i, user in enumerate(users):
                if not isinstance(user, str) or not user.strip():
                    problems.append(_problem(path + (i,), "expected a non-empty userName, "
                                             f"got {describe_value(user)}"))
                else:
                    good.append(user.strip())
            if declared is not None:
                members[declared.name] = tuple(dict.fromkeys(members.get(declared.name, ())
                                                             + tuple(good)))
    if problems:
        raise PolicyError(source, problems)
    assert policy is not None
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    by_name, by_local = _index(policy, members)
    return Bundle(org=org, version=version, generated_at=generated, policy=policy,
                  members=members, data=data, digest=hashlib.sha256(canonical).hexdigest(),
                  _by_name=by_name, _by_local=by_local)


# --------------------------------------------------------------------------
# The cache: the last good bundle, with where and when it came from


@dataclass(frozen=True)
class Cached:
    bundle: Bundle
    url: str
    etag: str | None
    fetched_at: float


def write_cache(path: Path, url: str, etag: str | None, bundle: Bundle,
                fetched_at: float | None = None) -> None:
    """Write the cache atomically (a temporary file, fsync, rename, fsync
    of the directory), mode 0600: it must never be seen half written, and
    it holds the org's user names. Raises PolicySourceError."""
    doc = {"cache_format": CACHE_FORMAT, "url": url, "etag": etag,
           "fetched_at": time.time() if fetched_at is None else fetched_at,
           "bundle": bundle.data}
    body = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)   # O_CREAT's mode does not apply to a leftover
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PolicySourceError(
            "cache", f"cannot write the bundle cache {path}: {exc.strerror or exc}") from exc


def read_cache(path: Path, url: str) -> Cached | None:
    """The cached bundle, or None when there is no cache. Raises
    PolicyError when the file is unreadable, invalid, or was fetched from
    another URL (another org's policy must not be enforced here)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(source, [f"cannot read the cache: {exc.strerror or exc}"]) from exc
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PolicyError(source, [f"not a bundle cache: {exc}"]) from exc
    if not isinstance(doc, dict) or doc.get("cache_format") != CACHE_FORMAT:
        raise PolicyError(source, [f"not a bundle cache of format {CACHE_FORMAT}"])
    if doc.get("url") != url:
        raise PolicyError(source, [
            f"the cached bundle came from {doc.get('url')!r}, not from the configured "
            f"{url!r}; it is not used"])
    etag = doc.get("etag")
    fetched_at = doc.get("fetched_at")
    bundle = bundle_from_data(doc.get("bundle"), source)
    return Cached(bundle, url, etag if isinstance(etag, str) else None,
                  float(fetched_at) if isinstance(fetched_at, (int, float)) else 0.0)
