"""What one DNS answer allows: the addresses of names a user's rules name. Pure.

ausd's forwarder hands every answer it relays for a managed user to
``read_answer`` with that user's DNS grants. The answer's question name
starts a CNAME chain that is followed inside the answer section only (never
through another query), at most ``MAX_CHAIN`` links, a loop refused. The
A/AAAA records of the chain's last name are its addresses. When any name of
the chain (the question name or a CNAME target) matches a grant, each address
is derived with the union of the rules and services of every matching name,
shown under the first matching name of the chain, and valid for the shortest
TTL along the chain (the whole answer is only as fresh as its oldest link).

Records of names outside the chain are ignored, so an answer cannot smuggle
addresses for a name it was not asked about. No address is allowed for
longer than ``MAX_TTL``. An answer that does not parse (hostile or cut
bytes) derives nothing; the forwarder still relays it as it came. The
resolver that produced the answer is trusted: see docs/dns.md.

The forwarder reads answers with ``read_answer``/``derive``, which walk the
header, the question and the answer section on the bytes themselves, with
the bounds and compression rules of dnspython's reader, and build no
message: about ten times faster than ``dns.message.from_wire``.
``derive_message`` does the same on a message dnspython parsed; the tests
hold the two to the same result on random and corrupted answers.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype

MAX_CHAIN = 16          # CNAME links followed inside one answer
MAX_TTL = 86_400        # seconds: no answer allows an address for longer
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


class AnswerUnreadable(ValueError):
    """Bytes that are not a DNS message (raised by read_answer only)."""


def qname_text(name: dns.name.Name) -> str:
    """A wire name as the grants compare names: lowercase, no final dot."""
    return name.to_text(omit_final_dot=True).lower()


def may_derive(wire: bytes) -> bool:
    """From the 12-byte header alone: could this answer derive anything?
    Only a response to a standard query with NOERROR and at least one
    answer record can; everything else is relayed without parsing."""
    # QR set, opcode QUERY (0), RCODE NOERROR (0), ANCOUNT > 0
    return len(wire) >= 12 and wire[2] & 0xF8 == 0x80 and wire[3] & 0x0F == 0 \
        and (wire[6] or wire[7]) != 0


def parse(wire: bytes) -> dns.message.Message | None:
    """The message, or None when the bytes are not one (never raises:
    the bytes come from the network)."""
    try:
        return dns.message.from_wire(wire, ignore_trailing=True)
    except dns.exception.DNSException:
        return None
    except Exception:  # noqa: BLE001 - a parser bug on hostile bytes still derives nothing
        return None


# One answer record as the analysis needs it: (owner, type, ttl, value),
# names as qname_text gives them, value the CNAME target's name or the
# A/AAAA address bytes.
_Record = tuple[str, int, int, object]
_ADDRESS_SIZE = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 16}
_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_HEAD = struct.Struct("!HHIH")
# Labels made only of these bytes read as they are; anything else is spelt
# the way dnspython spells it (escapes), so such a name never equals a
# policy name and a label holding a dot never reads as two labels.
_PLAIN = re.compile(rb"[A-Za-z0-9_*-]+")


class _Unreadable(Exception):
    pass


def _ttl(raw: int) -> int:
    """RFC 2181: a TTL with the top bit set counts as 0; and no answer
    allows an address for longer than MAX_TTL."""
    return 0 if raw > 0x7FFFFFFF else min(raw, MAX_TTL)


def _name(wire: bytes, pos: int, seen: dict[int, str] | None = None) -> tuple[str, int]:
    """The name at ``pos`` (qname_text's spelling) and the offset after it.

    The rules of dnspython's reader: a compression pointer must point
    strictly before the segment it leaves, and what it points to must end
    before that segment (so every jump goes backwards and no loop is
    possible); labels of 64 and more are refused; at most 255 bytes.
    ``seen`` holds names already read in this message by their offset: a
    name that is one pointer to one of them is not read again."""
    if seen is not None and pos + 1 < len(wire) and wire[pos] >= 0xC0:
        known = seen.get(((wire[pos] & 0x3F) << 8) | wire[pos + 1])
        if known is not None:
            return known, pos + 2
    start = pos
    labels = []
    size = 1
    after = None
    limit = len(wire)           # where the current segment must end
    lowest = pos                # every pointer must point below this
    while True:
        if pos >= limit:
            raise _Unreadable("name runs past its bounds")
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n >= 0xC0:
            if pos + 1 >= limit:
                raise _Unreadable("cut compression pointer")
            target = ((n & 0x3F) << 8) | wire[pos + 1]
            if target >= lowest:
                raise _Unreadable("compression pointer not backwards")
            if after is None:
                after = pos + 2
            limit = lowest
            lowest = pos = target
            continue
        if n >= 0x40:
            raise _Unreadable("unknown label type")
        end = pos + 1 + n
        if end > limit:
            raise _Unreadable("label runs past its bounds")
        labels.append(wire[pos + 1:end])
        size += n + 1
        if size > 255:
            raise _Unreadable("name longer than 255 bytes")
        pos = end
    if labels and all(_PLAIN.fullmatch(label) for label in labels):
        text = b".".join(labels).decode("ascii").lower()
    else:
        text = qname_text(dns.name.Name(labels + [b""]))
    if seen is not None:
        seen[start] = text
    return text, pos if after is None else after


def _walk(wire: bytes) -> tuple[str, list[_Record]]:
    """The question name and the answer section's CNAME, A and AAAA records
    of class IN, read straight off the wire (bytes only, no message built;
    the authority and additional sections are not read). Raises
    _Unreadable for bytes that are not that and AnswerError when there is
    not exactly one IN question."""
    try:
        _, _, qdcount, ancount, _, _ = _HEADER.unpack_from(wire, 0)
        if qdcount != 1:
            raise AnswerError("not exactly one question")
        seen: dict[int, str] = {}
        qname, pos = _name(wire, _HEADER.size, seen)
        _, qclass = _QUESTION_TAIL.unpack_from(wire, pos)
        pos += _QUESTION_TAIL.size
        if qclass != dns.rdataclass.IN:
            raise AnswerError("not an IN question")
        records: list[_Record] = []
        for _ in range(ancount):
            owner, pos = _name(wire, pos, seen)
            rtype, rclass, ttl, rdlen = _RECORD_HEAD.unpack_from(wire, pos)
            pos += _RECORD_HEAD.size
            end = pos + rdlen
            if end > len(wire):
                raise _Unreadable("record data runs past the message")
            if rclass != dns.rdataclass.IN:
                pass
            elif rtype == dns.rdatatype.CNAME:
                target, after = _name(wire[:end], pos, seen)
                if after != end:
                    raise _Unreadable("CNAME data longer than its name")
                records.append((owner, rtype, ttl, target))
            elif rtype in _ADDRESS_SIZE:
                if rdlen != _ADDRESS_SIZE[rtype]:
                    raise _Unreadable(f"address record of {rdlen} bytes")
                records.append((owner, rtype, ttl, wire[pos:end]))
            pos = end
        return qname, records
    except struct.error:
        raise _Unreadable("message cut short") from None


def _records_of(message: dns.message.Message) -> tuple[str, list[_Record]]:
    if len(message.question) != 1 or message.question[0].rdclass != dns.rdataclass.IN:
        raise AnswerError("not exactly one IN question")
    records: list[_Record] = []
    for rrset in message.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        owner = qname_text(rrset.name)
        for rd in rrset:
            if rrset.rdtype == dns.rdatatype.CNAME:
                records.append((owner, rrset.rdtype, rrset.ttl, qname_text(rd.target)))
            elif rrset.rdtype in _ADDRESS_SIZE:
                records.append((owner, rrset.rdtype, rrset.ttl,
                                ipaddress.ip_address(rd.address).packed))
    return qname_text(message.question[0].name), records


def _follow(start: str, records: list[_Record]) -> tuple[str, list[str], list[AnswerAddress]]:
    """The CNAME chain from ``start`` through ``records`` and the addresses
    at its end (see chain)."""
    records = [(owner, rtype, _ttl(ttl), value) for owner, rtype, ttl, value in records]
    links: dict[str, tuple[str, int]] = {}
    for owner, rtype, ttl, value in records:
        if rtype == dns.rdatatype.CNAME:
            old = links.get(owner)
            if old is not None and old[0] != value:
                raise AnswerError(f"{owner} has more than one CNAME")
            links[owner] = (value, ttl if old is None else min(ttl, old[1]))
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
    ends = [r for r in records if r[0] == last and r[1] != dns.rdatatype.CNAME]
    # RFC 2181 5.2: one TTL per RRset; where the records differ, the lowest
    rrset_ttl: dict[int, int] = {}
    for _, rtype, rr_ttl, _ in ends:
        rrset_ttl[rtype] = min(rr_ttl, rrset_ttl.get(rtype, rr_ttl))
    addresses = []
    for _, rtype, _, value in ends:
        if rtype == dns.rdatatype.A:
            family, addr = FAMILY_V4, _V4_MAPPED + value
        else:
            family, addr = FAMILY_V6, value
        rr_ttl = rrset_ttl[rtype]
        addresses.append(AnswerAddress(last, family, addr,
                                       rr_ttl if ttl is None else min(ttl, rr_ttl)))
    return start, names, addresses


def chain(message: dns.message.Message) -> tuple[str, list[str], list[AnswerAddress]]:
    """(question name, the CNAME chain from it, the chain's addresses).

    The chain lists the question name first. TTLs of the addresses are
    already the shortest along the chain. Raises AnswerError for a loop or a
    chain longer than MAX_CHAIN, and when the message has no single IN
    question."""
    return _follow(*_records_of(message))


def _grant(names: list[str], addresses: list[AnswerAddress], grants: Grants) -> list[Derived]:
    if not addresses:
        return []
    shown = None
    rules: set[int] = set()
    services: set = set()
    for name in names:
        if "\\" in name:
            continue        # escaped bytes: no policy name has them, and "\." is no label boundary
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


def derive_message(message: dns.message.Message, grants: Grants) -> list[Derived]:
    """The addresses ``message`` allows under ``grants`` (see the module)."""
    if not message.flags & dns.flags.QR or message.opcode() != dns.opcode.QUERY \
            or message.rcode() != dns.rcode.NOERROR:
        return []
    try:
        _, names, addresses = chain(message)
    except AnswerError:
        return []
    return _grant(names, addresses, grants)


def read_answer(wire: bytes, grants: Grants) -> list[Derived]:
    """The addresses the answer ``wire`` allows under ``grants``, read
    straight off the wire: what derive_message finds on the parsed message,
    several times faster. Raises AnswerUnreadable for bytes that are not a
    DNS message (and nothing else, whatever the bytes)."""
    if not may_derive(wire):
        return []
    try:
        _, names, addresses = _follow(*_walk(wire))
    except AnswerError:
        return []
    except _Unreadable as exc:
        raise AnswerUnreadable(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a reader bug on hostile bytes still derives nothing
        raise AnswerUnreadable(f"{type(exc).__name__}: {exc}") from None
    return _grant(names, addresses, grants)


def derive(wire: bytes, grants: Grants) -> list[Derived]:
    """read_answer, with bytes that are not an answer deriving nothing.
    Never raises on any bytes."""
    try:
        return read_answer(wire, grants)
    except AnswerUnreadable:
        return []


def _unique(addresses: Iterable[AnswerAddress]) -> list[AnswerAddress]:
    """One per (family, address), the shortest TTL kept."""
    seen: dict[tuple[int, bytes], AnswerAddress] = {}
    for a in addresses:
        old = seen.get((a.family, a.addr))
        if old is None or a.ttl < old.ttl:
            seen[(a.family, a.addr)] = a
    return list(seen.values())
