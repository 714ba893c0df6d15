"""What one DNS answer allows: the addresses of names a user's rules name. Pure.

ausd's forwarder hands every answer it relays for a managed user to
``derive`` together with that user's DNS grants. The answer's question name
starts a CNAME chain that is followed inside the answer section only (never
through another query), at most ``MAX_CHAIN`` links, a loop refused. The
A/AAAA records of the chain's last name are its addresses. When any name of
the chain (the question name or a CNAME target) matches a grant, each address
is derived with the union of the rules and services of every matching name,
shown under the first matching name of the chain, and valid for the shortest
TTL along the chain (the whole answer is only as fresh as its oldest link).

Records of names outside the chain are ignored, so an answer cannot smuggle
addresses for a name it was not asked about. An answer that does not parse
(hostile or cut bytes) derives nothing; the forwarder still relays it as it
came. The resolver that produced the answer is trusted: see docs/dns.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype

MAX_CHAIN = 16          # CNAME links followed inside one answer
FAMILY_V4 = 4
FAMILY_V6 = 6
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


class Grant(Protocol):
    """What derive reads of a grant (aus.core.compiler.DnsGrant)."""
    rule: int
    services: frozenset


class Grants(Protocol):
    """A user's DNS grants (aus.core.compiler.DnsGrants)."""

    def lookup(self, qname: str) -> tuple[Grant, ...]: ...


class AnswerAddress(NamedTuple):
    name: str       # the owner of the record: the chain's last name
    family: int     # 4 or 6
    addr: bytes     # 16 bytes, IPv4 v4-mapped
    ttl: int


class Derived(NamedTuple):
    family: int
    addr: bytes
    ttl: int
    name: str               # the first name of the chain that a grant matched
    rules: frozenset[int]
    services: frozenset     # union of the matching grants' services


class AnswerError(ValueError):
    """An answer whose CNAME chain cannot be followed (a loop, too long)."""


def qname_text(name: dns.name.Name) -> str:
    """A wire name as the grants compare names: lowercase, no final dot."""
    return name.to_text(omit_final_dot=True).lower()


def may_derive(wire: bytes) -> bool:
    """From the 12-byte header alone: could this answer derive anything?
    Only a response to a standard query with NOERROR and at least one
    answer record can; everything else is relayed without parsing."""
    if len(wire) < 12:
        return False
    flags = int.from_bytes(wire[2:4], "big")
    ancount = int.from_bytes(wire[6:8], "big")
    return bool(flags & dns.flags.QR) and (flags >> 11) & 0xF == 0 \
        and flags & 0xF == dns.rcode.NOERROR and ancount > 0


def parse(wire: bytes) -> dns.message.Message | None:
    """The message, or None when the bytes are not one (never raises:
    the bytes come from the network)."""
    try:
        return dns.message.from_wire(wire, ignore_trailing=True)
    except dns.exception.DNSException:
        return None
    except Exception:  # noqa: BLE001 - a parser bug on hostile bytes still derives nothing
        return None


def chain(message: dns.message.Message) -> tuple[str, list[str], list[AnswerAddress]]:
    """(question name, the CNAME chain from it, the chain's addresses).

    The chain lists the question name first. TTLs of the addresses are
    already the shortest along the chain. Raises AnswerError for a loop or a
    chain longer than MAX_CHAIN, and when the message has no single IN
    question."""
    if len(message.question) != 1 or message.question[0].rdclass != dns.rdataclass.IN:
        raise AnswerError("not exactly one IN question")
    start = message.question[0].name
    links: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    for rrset in message.answer:
        if rrset.rdclass == dns.rdataclass.IN and rrset.rdtype == dns.rdatatype.CNAME:
            if rrset.name in links or len(rrset) != 1:
                raise AnswerError(f"{rrset.name} has more than one CNAME")
            links[rrset.name] = (next(iter(rrset)).target, rrset.ttl)
    names = [start]
    ttl = None
    while names[-1] in links:
        target, link_ttl = links[names[-1]]
        if target in names:
            raise AnswerError(f"CNAME loop at {target}")
        if len(names) > MAX_CHAIN:
            raise AnswerError(f"CNAME chain longer than {MAX_CHAIN}")
        names.append(target)
        ttl = link_ttl if ttl is None else min(ttl, link_ttl)
    last = names[-1]
    addresses = []
    for rrset in message.answer:
        if rrset.name != last or rrset.rdclass != dns.rdataclass.IN:
            continue
        if rrset.rdtype == dns.rdatatype.A:
            family, mapped = FAMILY_V4, True
        elif rrset.rdtype == dns.rdatatype.AAAA:
            family, mapped = FAMILY_V6, False
        else:
            continue
        rr_ttl = rrset.ttl if ttl is None else min(ttl, rrset.ttl)
        for rd in rrset:
            raw = ipaddress.ip_address(rd.address).packed
            addresses.append(AnswerAddress(qname_text(last), family,
                                           _V4_MAPPED + raw if mapped else raw, rr_ttl))
    return qname_text(start), [qname_text(n) for n in names], addresses


def derive_message(message: dns.message.Message, grants: Grants) -> list[Derived]:
    """The addresses ``message`` allows under ``grants`` (see the module)."""
    if not message.flags & dns.flags.QR or message.rcode() != dns.rcode.NOERROR:
        return []
    try:
        _, names, addresses = chain(message)
    except AnswerError:
        return []
    if not addresses:
        return []
    shown = None
    rules: set[int] = set()
    services: set = set()
    for name in names:
        matched = grants.lookup(name)
        if matched and shown is None:
            shown = name
        for g in matched:
            rules.add(g.rule)
            services.update(g.services)
    if shown is None:
        return []
    rules_f, services_f = frozenset(rules), frozenset(services)
    return [Derived(a.family, a.addr, a.ttl, shown, rules_f, services_f)
            for a in _unique(addresses)]


def derive(wire: bytes, grants: Grants) -> list[Derived]:
    """derive_message on raw answer bytes; bytes that do not parse derive
    nothing. Never raises on any bytes."""
    if not may_derive(wire):
        return []
    message = parse(wire)
    return [] if message is None else derive_message(message, grants)


def _unique(addresses: Iterable[AnswerAddress]) -> list[AnswerAddress]:
    """One per (family, address), the shortest TTL kept."""
    seen: dict[tuple[int, bytes], AnswerAddress] = {}
    for a in addresses:
        old = seen.get((a.family, a.addr))
        if old is None or a.ttl < old.ttl:
            seen[(a.family, a.addr)] = a
    return list(seen.values())
