"""The policy: who (directory user groups) may reach what (destinations,
services). Model (pydantic v2, frozen, unknown keys refused) and YAML loader.

A policy file::

    user_groups:
      - name: DEV
        sid: S-1-5-21-1-2-3-1104        # optional, AD SID
        external_id: 8f2c0c6e-...       # optional, Entra ID object ID
    ip_lists:
      internet: ["0.0.0.0/0", "::/0"]
    services:
      web: ["80/tcp", "443/tcp"]
    rules:
      - name: dev-web
        sources: [DEV]
        destinations: [internet]
        services: [web, "8000-8100/tcp", "53/udp", icmp]

Every problem found is reported at once, each with its line and path, as a
:class:`~aus.core.errors.PolicyError`. See docs/policy-format.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Annotated, Any, NamedTuple, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import contract as C
from .dnsname import PREFIX as PREFIX_DNS
from .dnsname import DnsPattern, is_dns_destination, parse_dns_destination
from .errors import PolicyError
from .yamlsource import (
    YamlSourceError,
    describe_validation_errors,
    format_path,
    load_yaml_with_lines,
    locate,
    located_problems,
    render_located,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RULE_NAME_MAX = C.RULE_NAME_LEN - 1   # the kernel keeps it NUL-terminated
_RULE_NAME_RE = re.compile(r"[A-Za-z0-9_.:@-]+\Z")
_SID_RE = re.compile(r"S-1-\d+(-\d+)+\Z", re.IGNORECASE)
_PORTS_RE = re.compile(r"(\d+)(?:-(\d+))?\Z")

SERVICE_GRAMMAR = "PORT/PROTO, LO-HI/PROTO (PROTO tcp or udp), tcp, udp, icmp or any"

# Context key that makes Policy validation skip its cross-reference checks;
# a loader runs them itself on the raw data (cross_problems) so that they
# are reported together with every structural problem.
SKIP_CROSS_CHECKS = "aus.core.policy.skip_cross_checks"
M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------
# Literals


class ServiceSpec(NamedTuple):
    """A resolved service.

    ``proto`` is "tcp", "udp", "icmp" (ICMP for IPv4, ICMPv6 for IPv6) or
    "any" (every protocol and port). ``lo``/``hi`` is the inclusive port
    range: 0-65535 for all ports of tcp/udp, 0-0 for icmp and any.
    """

    proto: str
    lo: int
    hi: int


def parse_service(text: str) -> ServiceSpec:
    """Parse a service literal: ``443/tcp``, ``8000-8100/udp``, ``tcp``,
    ``udp``, ``icmp`` or ``any`` (protocol names in any case).

    Raises ValueError with a message naming the problem.
    """
    if not isinstance(text, str):
        raise ValueError(f"a service must be a string, not {type(text).__name__}")
    return _parse_service(text)


# A policy names the same few services and addresses many times, and
# validation, the cross checks and the compiler each read them: parse once.
@lru_cache(maxsize=65536)
def _parse_service(text: str) -> ServiceSpec:
    raw = text.strip()
    lowered = raw.lower()
    if not raw:
        raise ValueError(f"empty service; expected {SERVICE_GRAMMAR}")
    if lowered in ("tcp", "udp"):
        return ServiceSpec(lowered, 0, 65535)
    if lowered in ("icmp", "any"):
        return ServiceSpec(lowered, 0, 0)
    if lowered in ("icmpv6", "icmp6", "ipv6-icmp"):
        raise ValueError(
            f"{text!r} is not a service: write 'icmp', which covers ICMP for "
            "IPv4 and ICMPv6 for IPv6 destinations"
        )
    if "/" not in lowered:
        raise ValueError(f"{text!r} is not a service literal; expected {SERVICE_GRAMMAR}")
    ports, proto = lowered.split("/", 1)
    if proto not in ("tcp", "udp"):
        if proto in ("icmp", "any"):
            raise ValueError(
                f"{text!r}: {proto} has no ports; write '{proto}' alone"
            )
        raise ValueError(
            f"{text!r}: unknown protocol {proto!r}; ports go with tcp or udp"
        )
    m = _PORTS_RE.match(ports)
    if not m:
        raise ValueError(
            f"{text!r}: {ports!r} is not a port or a LO-HI port range"
        )
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    for port in (lo, hi):
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is outside 1..65535")
    if lo > hi:
        raise ValueError(f"{text!r}: range start {lo} is above its end {hi}")
    return ServiceSpec(proto, lo, hi)


def parse_network(text: str) -> Network:
    """Parse a CIDR (``10.0.0.0/8``, ``2001:db8::/32``) or a single address
    (taken as /32 or /128). Host bits set under the prefix are refused.

    Raises ValueError with a message naming the problem.
    """
    if not isinstance(text, str):
        raise ValueError(f"an address must be a string, not {type(text).__name__}")
    return _parse_network(text)


@lru_cache(maxsize=65536)
def _parse_network(text: str) -> Network:
    raw = text.strip()
    if not raw:
        raise ValueError("empty address")
    if "%" in raw:
        raise ValueError(f"{text!r}: scoped IPv6 addresses (%zone) are not supported")
    if "/" in raw:
        addr, prefix = raw.split("/", 1)
        if not prefix.isdigit() or not prefix.isascii():
            raise ValueError(
                f"{text!r} is not a valid CIDR: the prefix length must be a number"
            )
        try:
            return ipaddress.ip_network(raw, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                network = ipaddress.ip_network(raw, strict=False)
                raise ValueError(
                    f"{text!r} has host bits set: the network is {network}; "
                    f"write {network}, or {addr}/{network.max_prefixlen} "
                    "for the single address"
                ) from None
            raise ValueError(f"{text!r} is not a valid CIDR") from None
    try:
        return ipaddress.ip_network(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError(f"{text!r} is not a valid IP address or CIDR") from None


def _is_network(text: Any) -> bool:
    try:
        parse_network(text)
    except ValueError:
        return False
    return True


def _is_service(text: Any) -> bool:
    try:
        parse_service(text)
    except ValueError:
        return False
    return True


def _looks_like_network(text: str) -> bool:
    """Whether a failed destination was meant as an address (to show the
    parser's reason instead of 'unknown name')."""
    return "/" in text or ":" in text or re.fullmatch(r"[\d.]+", text) is not None


def _looks_like_service(text: str) -> bool:
    return "/" in text or text[:1].isdigit() or text.strip().lower() in (
        "icmpv6", "icmp6", "ipv6-icmp")


def _check_cidr(value: str) -> str:
    parse_network(value)
    return value


def _check_destination(value: str) -> str:
    try:
        parse_destination(value)
    except ValueError as exc:
        hint = dns_hint(value)
        if hint:
            raise ValueError(f"{exc}{hint}") from None
        raise
    return value


def dns_hint(text: str) -> str:
    """For a bare host name where an address or list was expected: how to
    write it as a DNS name."""
    if not isinstance(text, str) or is_dns_destination(text) or "." not in text:
        return ""
    try:
        pattern = parse_dns_destination(PREFIX_DNS + text.strip())
    except ValueError:
        return ""
    return f"; for the DNS name write {str(pattern)!r}"


def parse_destination(text: str) -> Network | DnsPattern:
    """A destination literal: a CIDR or address (:func:`parse_network`),
    or a DNS name (``dns:NAME``, ``dns:*.SUFFIX``, see aus.core.dnsname).
    Raises ValueError with a message naming the problem."""
    if is_dns_destination(text):
        return parse_dns_destination(text)
    return parse_network(text)


def _network_only(text: str) -> Network | None:
    return None if is_dns_destination(text) else parse_network(text)


def _dns_only(text: str) -> DnsPattern | None:
    return parse_dns_destination(text) if is_dns_destination(text) else None


def _check_service(value: str) -> str:
    parse_service(value)
    return value


def check_rule_name(name: str, what: str = "rule") -> str:
    """A rule's name (also an IP list's, on the policy server): 1 to
    RULE_NAME_MAX characters of ``A-Za-z0-9_.:@-``, so it fits the kernel's
    aus_rules entry and reads the same in every log. Raises ValueError."""
    if not name:
        raise ValueError(f"a {what} needs a non-empty name")
    if len(name) > RULE_NAME_MAX:
        raise ValueError(
            f"{what} name is {len(name)} characters long; at most {RULE_NAME_MAX} are allowed"
        )
    if not _RULE_NAME_RE.match(name):
        bad = sorted({c for c in name if not _RULE_NAME_RE.match(c)})
        raise ValueError(
            f"{what} name {name!r} contains {''.join(bad)!r}; "
            "use only letters, digits and _ . : @ -"
        )
    return name


def check_group_name(name: str) -> str:
    """A user group's name, as the directory gives it: anything but blank.
    Raises ValueError."""
    if not name.strip():
        raise ValueError("a user group needs a non-empty name")
    return name


def normalize_sid(text: str) -> str:
    """A Windows SID (``S-1-5-21-...``), stripped, with a capital S: the
    one spelling the policy, the server and the daemon compare. Raises
    ValueError."""
    sid = text.strip()
    if not _SID_RE.match(sid):
        raise ValueError(
            f"{text!r} is not a SID; expected S-1-<authority>-<sub>[-<sub>...], "
            "e.g. S-1-5-21-1004336348-1177238915-682003330-1104"
        )
    return "S" + sid[1:]


def name_key(name: str) -> str:
    """The key under which rule names (and user group names) are unique:
    they compare case-insensitively."""
    return name.casefold()


def sid_key(sid: str) -> str:
    """The key under which SIDs are unique."""
    return sid.strip().upper()


def external_id_key(external_id: str) -> str:
    """The key under which user groups' external ids are unique."""
    return external_id.strip().casefold()


def reserved_name_problem(name: str, what: str) -> str | None:
    """Why ``name`` cannot name an ip list or a service (it reads as an
    address or a service literal, so a rule naming it would be ambiguous),
    or None."""
    if _is_network(name):
        return f"the {what} name {name!r} reads as a CIDR/IP address; choose a name that does not"
    if is_dns_destination(name):
        return f"the {what} name {name!r} reads as a DNS name (dns:); choose a name that does not"
    if _is_service(name):
        return f"the {what} name {name!r} reads as a service literal; choose a name that does not"
    return None


CidrStr = Annotated[str, AfterValidator(_check_cidr)]
DestinationStr = Annotated[str, AfterValidator(_check_destination)]
ServiceStr = Annotated[str, AfterValidator(_check_service)]


# --------------------------------------------------------------------------
# Model


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserGroup(_Frozen):
    """A directory user group, by the name the directory gives it."""

    name: str
    sid: str | None = None
    external_id: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_group_name(v)

    @field_validator("sid")
    @classmethod
    def _sid(cls, v: str | None) -> str | None:
        return v if v is None else normalize_sid(v)

    @field_validator("external_id")
    @classmethod
    def _external_id(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("external_id must not be empty (leave it out instead)")
        return v


class Rule(_Frozen):
    """Allow ``sources`` (user group names) to reach ``destinations`` (ip
    list names, CIDRs, addresses, ``dns:`` names) on ``services`` (service
    names, literals)."""

    name: str
    sources: list[str]
    destinations: list[str]
    services: list[str]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_rule_name(v)

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a rule needs at least one source (a user group)")
        return v

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a rule needs at least one destination (an ip list, a CIDR or a dns: name)")
        return v

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("a rule needs at least one service")
        return v


class Policy(_Frozen):
    """A whole policy. Cross references are checked on construction."""

    user_groups: list[UserGroup] = Field(default_factory=list)
    ip_lists: dict[str, list[DestinationStr]] = Field(default_factory=dict)
    services: dict[str, list[ServiceStr]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    _groups_by_key: dict[str, UserGroup] = PrivateAttr(default_factory=dict)
    # Every destination and service the policy names (a list name or a
    # literal) -> its parsed values, filled once at validation, so that
    # compiling never parses text again. Not part of the document.
    _networks: dict[str, tuple[Network, ...]] = PrivateAttr(default_factory=dict)
    _dns: dict[str, tuple[DnsPattern, ...]] = PrivateAttr(default_factory=dict)
    _service_specs: dict[str, tuple[ServiceSpec, ...]] = PrivateAttr(default_factory=dict)

    @field_validator("ip_lists", "services", mode="before")
    @classmethod
    def _null_is_empty_mapping(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("user_groups", "rules", mode="before")
    @classmethod
    def _null_is_empty_list(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Policy:
        return cross_checked(self, info, cross_problems)

    def model_post_init(self, __context: Any) -> None:
        index: dict[str, UserGroup] = {}
        for group in self.user_groups:
            index.setdefault(group.name.casefold(), group)
        self._groups_by_key = index
        destinations = [r.destinations for r in self.rules]
        self._networks = _parse_references(self.ip_lists, destinations, _network_only)
        self._dns = _parse_references(self.ip_lists, destinations, _dns_only)
        self._service_specs = _parse_references(
            self.services, [r.services for r in self.rules], parse_service)

    # -- queries -------------------------------------------------------------

    def group(self, name: str) -> UserGroup | None:
        """The declared user group called ``name``, compared case-insensitively."""
        return self._groups_by_key.get(name.casefold())

    def destinations_of(self, rule: Rule) -> list[Network]:
        """The rule's destinations as networks: lists expanded, duplicates
        removed, first-seen order kept. DNS names are left out (dns_of)."""
        return _expand(rule.destinations, self._networks, _network_only)

    def dns_of(self, rule: Rule) -> list[DnsPattern]:
        """The rule's DNS-name destinations, inline and from its ip lists:
        duplicates removed, first-seen order kept."""
        return _expand(rule.destinations, self._dns, _dns_only)

    def services_of(self, rule: Rule) -> list[ServiceSpec]:
        """The rule's services: names expanded, duplicates removed,
        first-seen order kept."""
        return _expand(rule.services, self._service_specs, parse_service)


_Parsed = TypeVar("_Parsed")


def _parse_references(named: dict[str, list[str]], references: Sequence[list[str]],
                      parse: Callable[[str], _Parsed | None]) -> dict[str, tuple[_Parsed, ...]]:
    """Each name of ``named``, and each other entry of ``references`` (a
    literal), -> its parsed values; a name wins over a literal spelled the
    same. What ``parse`` gives None for is of another kind (a DNS name
    among networks), and is left out. What does not parse is left out
    too: validation reports it (this runs before the cross checks)."""
    out: dict[str, tuple[_Parsed, ...]] = {}
    for name, texts in named.items():
        values = []
        for text in texts:
            try:
                value = parse(text)
            except ValueError:
                continue
            if value is not None:
                values.append(value)
        out[name] = tuple(values)
    for entries in references:
        for entry in entries:
            if entry not in out:
                try:
                    value = parse(entry)
                except ValueError:
                    continue
                out[entry] = () if value is None else (value,)
    return out


def _expand(entries: list[str], parsed: dict[str, tuple[_Parsed, ...]],
            parse: Callable[[str], _Parsed | None]) -> list[_Parsed]:
    """Entries (names or literals) -> their values, duplicates removed,
    first-seen order kept. A rule from elsewhere may name what this policy
    never parsed: that is parsed here (and raises ValueError if it is bad)."""
    out: list[_Parsed] = []
    seen: set[_Parsed] = set()
    for entry in entries:
        values = parsed.get(entry)
        if values is None:
            value = parse(entry)
            values = () if value is None else (value,)
        for value in values:
            if value not in seen:
                seen.add(value)
                out.append(value)
    return out


# --------------------------------------------------------------------------
# Cross-reference checks (on raw, possibly malformed data)


Problem = tuple[tuple[Any, ...], str]


def cross_checked(model: M, info: ValidationInfo,
                  find: Callable[[Any], list[Problem]]) -> M:
    """The tail of a model's own validation: the problems ``find`` sees in
    its data refuse it, unless the loader runs them itself on the raw data
    (context SKIP_CROSS_CHECKS) to report them with every other problem."""
    if info.context and info.context.get(SKIP_CROSS_CHECKS):
        return model
    problems = find(model.model_dump())
    if problems:
        raise ValueError("; ".join(f"{format_path(p)}: {reason}" for p, reason in problems))
    return model


def _suggest(word: str, names: list[str]) -> str:
    folded: dict[str, str] = {}
    for name in names:
        folded.setdefault(name.casefold(), name)
    close = difflib.get_close_matches(word.casefold(), list(folded), n=1, cutoff=0.6)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


def cross_problems(data: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Problems that involve more than one value: uniqueness, references,
    names that clash with literals, empty lists. Tolerates malformed data
    (the structural problems are pydantic's to report)."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    if not isinstance(data, dict):
        return problems

    # user groups: unique names (case-insensitive), unique SIDs and IDs.
    groups = data.get("user_groups")
    group_keys: dict[str, int] | None = None
    if isinstance(groups, list) or groups is None:
        group_keys = {}
        sids: dict[str, int] = {}
        ext_ids: dict[str, int] = {}
        for i, g in enumerate(groups or []):
            if not isinstance(g, dict):
                continue
            name = g.get("name")
            if isinstance(name, str) and name.strip():
                key = name.casefold()
                if key in group_keys:
                    problems.append(((
                        "user_groups", i, "name"),
                        f"duplicate user group {name!r} (already declared as "
                        f"user_groups[{group_keys[key]}]; names are compared "
                        "case-insensitively)"))
                else:
                    group_keys[key] = i
            sid = g.get("sid")
            if isinstance(sid, str) and _SID_RE.match(sid.strip()):
                key = sid_key(sid)
                if key in sids:
                    problems.append((
                        ("user_groups", i, "sid"),
                        f"duplicate SID {sid!r} (already given to user_groups[{sids[key]}])"))
                else:
                    sids[key] = i
            ext = g.get("external_id")
            if isinstance(ext, str) and ext.strip():
                key = external_id_key(ext)
                if key in ext_ids:
                    problems.append((
                        ("user_groups", i, "external_id"),
                        f"duplicate external_id {ext!r} (already given to "
                        f"user_groups[{ext_ids[key]}])"))
                else:
                    ext_ids[key] = i

    # ip lists and services: names must not read as literals; not empty.
    names: dict[str, list[str] | None] = {}
    for section, what in (("ip_lists", "ip list"), ("services", "service")):
        table = data.get(section)
        if table is None:
            names[section] = []
            continue
        if not isinstance(table, dict):
            names[section] = None
            continue
        names[section] = [k for k in table if isinstance(k, str)]
        for key, values in table.items():
            if not isinstance(key, str):
                continue
            if not key.strip():
                problems.append(((section, key), f"{what} names must not be empty"))
            elif (reason := reserved_name_problem(key, what)) is not None:
                problems.append(((section, key), reason))
            if isinstance(values, list) and not values:
                problems.append(((section, key),
                                 f"{what} {key!r} is empty; give it at least one "
                                 + ("CIDR" if section == "ip_lists" else "service")))

    # rules: unique names; references resolve.
    rules = data.get("rules")
    if not isinstance(rules, list):
        return problems
    rule_names: dict[str, int] = {}
    ip_names = names["ip_lists"]
    svc_names = names["services"]
    group_list = [g.get("name") for g in (groups or []) if isinstance(g, dict)] \
        if isinstance(groups, list) else []
    group_list = [n for n in group_list if isinstance(n, str)]
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            continue
        name = rule.get("name")
        if isinstance(name, str) and name:
            key = name_key(name)
            if key in rule_names:
                problems.append((("rules", i, "name"),
                                 f"duplicate rule name {name!r} (already used by "
                                 f"rules[{rule_names[key]}]; names are compared "
                                 "case-insensitively)"))
            else:
                rule_names[key] = i
        sources = rule.get("sources")
        if group_keys is not None and isinstance(sources, list):
            for j, src in enumerate(sources):
                if isinstance(src, str) and src.casefold() not in group_keys:
                    problems.append((("rules", i, "sources", j),
                                     f"{src!r} is not a declared user group"
                                     + _suggest(src, group_list)))
        dests = rule.get("destinations")
        if ip_names is not None and isinstance(dests, list):
            for j, dst in enumerate(dests):
                if not isinstance(dst, str) or dst in ip_names:
                    continue
                try:
                    parse_destination(dst)
                except ValueError as exc:
                    if _looks_like_network(dst) or is_dns_destination(dst):
                        reason = str(exc)
                    else:
                        reason = (f"{dst!r} is neither an ip_list name nor a CIDR"
                                  + (dns_hint(dst) or _suggest(dst, ip_names)))
                    problems.append((("rules", i, "destinations", j), reason))
        svcs = rule.get("services")
        if svc_names is not None and isinstance(svcs, list):
            for j, svc in enumerate(svcs):
                if not isinstance(svc, str) or svc in svc_names:
                    continue
                try:
                    parse_service(svc)
                except ValueError as exc:
                    if _looks_like_service(svc):
                        reason = str(exc)
                    else:
                        reason = (f"{svc!r} is neither a service name nor a service "
                                  f"literal ({SERVICE_GRAMMAR})" + _suggest(svc, svc_names))
                    problems.append((("rules", i, "services", j), reason))
    return problems


# --------------------------------------------------------------------------
# Loading


def _describe_top(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def nesting_reason(data: dict[str, Any], path: tuple[Any, ...]) -> str | None:
    """A clearer reason when an ip list or service entry names another list
    (lists do not nest)."""
    if len(path) != 3 or path[0] not in ("ip_lists", "services"):
        return None
    table = data.get(path[0])
    try:
        value = table[path[1]][path[2]]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(value, str) or value not in table:
        return None
    if path[0] == "ip_lists":
        return (f"{value!r} is an ip list name; an ip list holds CIDRs, "
                "addresses and dns: names only (lists do not nest)")
    return (f"{value!r} is a service name; a service holds service literals "
            "only (services do not nest)")


def policy_from_text(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy. Raises PolicyError listing every problem
    as ``line N: path: reason``. Empty text is the empty policy."""
    try:
        data, line_of = load_yaml_with_lines(text, source)
    except YamlSourceError as exc:
        raise PolicyError(source, exc.problems, [locate(p) for p in exc.problems]) from exc
    return policy_from_data(data, source, line_of=line_of)


def policy_from_data(
    data: Any,
    source: str = "<policy>",
    *,
    line_of: Callable[[Sequence[Any]], int | None] | None = None,
    path_prefix: tuple[Any, ...] = (),
) -> Policy:
    """Validate an already parsed policy document (from YAML, or the
    ``policy`` of a bundle). Raises PolicyError listing every problem as
    ``[line N: ]path: reason``; ``path_prefix`` is put in front of every
    path (``("policy",)`` inside a bundle). None is the empty policy."""
    lines = line_of or (lambda path: None)
    if data is None:
        return empty_policy()
    if not isinstance(data, dict):
        top = (lines(()), format_path(path_prefix),
               "the policy must be a mapping with the keys user_groups, "
               f"ip_lists, services and rules, not {_describe_top(data)}")
        raise PolicyError(source, [render_located(*top)], [top])
    items: list[tuple[tuple[Any, ...], int | None, str]] = []
    policy: Policy | None = None
    try:
        policy = Policy.model_validate(data, context={SKIP_CROSS_CHECKS: True})
    except ValidationError as exc:
        for path, line, reason in describe_validation_errors(exc, Policy, lines):
            items.append((path_prefix + path, line, nesting_reason(data, path) or reason))
    for path, reason in cross_problems(data):
        items.append((path_prefix + path, lines(path), reason))
    if items:
        located = located_problems(items)
        raise PolicyError(source, [render_located(*p) for p in located], located)
    assert policy is not None
    return policy


def load_policy(path: str | os.PathLike) -> Policy:
    """Read and validate a policy file. Raises PolicyError with the path as
    ``source`` (unreadable file, invalid YAML, invalid policy)."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise PolicyError(source, [f"cannot read the policy: {reason}"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise PolicyError(source, [
            f"line {line}: not valid UTF-8 (byte {exc.start})"
        ], [(line, "", f"not valid UTF-8 (byte {exc.start})")]) from exc
    return policy_from_text(text, source)


def empty_policy() -> Policy:
    """The policy with no groups, lists, services or rules."""
    return Policy()
