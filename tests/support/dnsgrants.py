"""Stand-ins for the compiler's DNS grants (aus.core.compiler.DnsGrants),
for testing the forwarder and the answer analysis on their own: the same
shape (a grant has ``pattern``, ``rule``, ``services``; the grants have
``lookup(qname)`` and ``__bool__``), matching done the plain way."""

from __future__ import annotations

from typing import NamedTuple


class Pattern(NamedTuple):
    name: str           # without "*."
    wildcard: bool

    def matches(self, qname: str) -> bool:
        q = qname.lower().rstrip(".")
        return q.endswith("." + self.name) if self.wildcard else q == self.name


class Grant(NamedTuple):
    pattern: Pattern
    rule: int
    services: frozenset


def grant(text: str, rule: int, *services) -> Grant:
    """grant("*.example.net", 3, ("tcp", 443)): services become
    (proto, port, rule) triples, as a rule's portset stamps its id."""
    wildcard = text.startswith("*.")
    return Grant(Pattern(text[2:] if wildcard else text, wildcard), rule,
                 frozenset((proto, port, rule) for proto, port in services))


class Grants:
    def __init__(self, *grants: Grant):
        self.grants = tuple(grants)

    def lookup(self, qname: str) -> tuple[Grant, ...]:
        return tuple(g for g in self.grants if g.pattern.matches(qname))

    def __bool__(self) -> bool:
        return bool(self.grants)
