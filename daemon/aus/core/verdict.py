"""What a policy decides for one flow, as the kernel decides it. Pure.

The policy is compiled with the compiler ausd runs (``compiler``), the
user's rules are those whose sources match the user's groups, and the
destination goes through the same two longest-prefix-match lookups as in
the kernel (``aus_dst`` for the address, then ``aus_svc`` for protocol and
port), here on dictionaries keyed by prefix: one probe per prefix length
present instead of a scan of the ruleset. ``compiler.lookup`` is the
reference this is tested against.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

from . import contract as C
from .compiler import CompiledPolicy, DstEntry, Network, Ruleset, compile_policy
from .policy import Policy

# Flow-record protocol names (aus.core.flowrecord.PROTOS) as the kernel
# sees them; "other" matches only rules allowing every protocol.
PROTO_NUMBERS = {"tcp": C.PROTO_TCP, "udp": C.PROTO_UDP, "icmp": C.PROTO_ICMP,
                 "icmpv6": C.PROTO_ICMPV6, "other": 255}


class Verdict(NamedTuple):
    allowed: bool
    rule: str        # the deciding rule's name, "baseline", or "" when none allowed it


class _Lpm:
    """One ruleset's aus_dst trie as {(family, plen, prefix bits): entry}."""

    def __init__(self, ruleset: Ruleset):
        self.entries: dict[tuple[int, int, int], DstEntry] = {}
        for e in ruleset:
            a = int.from_bytes(e.addr, "big")
            fam = C.family_of16(e.addr, e.plen)
            self.entries[(fam, e.plen, a >> (128 - e.plen) if e.plen else 0)] = e
        self.plens = sorted({k[1] for k in self.entries}, reverse=True)

    def match(self, raw: bytes) -> DstEntry | None:
        a = int.from_bytes(raw, "big")
        fam = C.family_of16(raw, 128)
        for plen in self.plens:
            hit = self.entries.get((fam, plen, a >> (128 - plen) if plen else 0))
            if hit is not None:
                return hit
        return None


class Evaluator:
    """Decides flows against one policy (and the workload's baseline).
    Compiled rulesets and their lookup tables are memoized: flows of users
    with the same groups share them."""

    def __init__(self, policy: Policy | None, baseline: Iterable[Network] = (), *,
                 compiled: CompiledPolicy | None = None):
        # ``compiled``: a policy compiled already (ausd's, with the rule
        # ids the kernel has), instead of compiling ``policy`` here.
        self.compiled: CompiledPolicy = compiled if compiled is not None \
            else compile_policy(policy, baseline)
        self._names = self.compiled.rule_names
        self._lpm: dict[frozenset[int], _Lpm] = {}
        self._grants: dict[frozenset[int], frozenset] = {}

    def grants(self, groups: Iterable[str], sids: Iterable[str] = ()) -> frozenset:
        """What the user's rules grant, without rule ids: two policies that
        grant a user the same give every flow of that user the same
        allowed/denied (with the same baseline), so a comparison can skip
        compiling either. Memoized per rule set."""
        ids = self.compiled.matching_rules(tuple(groups), tuple(sids))
        sig = self._grants.get(ids)
        if sig is None:
            by_id = {r.id: r for r in self.compiled.rules}
            sig = self._grants[ids] = frozenset(
                (net, tuple(sorted((e.proto, e.port, e.plen) for e in entries)))
                for rid in ids for net, entries in by_id[rid].grants)
        return sig

    def rule_id(self, groups: Iterable[str], dst: str, proto: str | int, port: int,
                sids: Iterable[str] = ()) -> int | None:
        ids = self.compiled.matching_rules(tuple(groups), tuple(sids))
        lpm = self._lpm.get(ids)
        if lpm is None:
            lpm = self._lpm[ids] = _Lpm(self.compiled.ruleset(ids))
        entry = lpm.match(C.addr16(ipaddress.ip_address(dst)))
        if entry is None:
            return None
        number = PROTO_NUMBERS[proto] if isinstance(proto, str) else proto
        best = None
        for e in entry.portset:
            if e.covers(number, port) and (best is None or e.plen > best.plen):
                best = e
        return best.rule if best is not None else None

    def decide(self, groups: Iterable[str], dst: str, proto: str | int, port: int,
               sids: Iterable[str] = ()) -> Verdict:
        """Allowed or not, and by which rule, for a user in ``groups``
        connecting to ``dst`` (an address) with ``proto`` and ``port``."""
        rid = self.rule_id(groups, dst, proto, port, sids)
        return Verdict(False, "") if rid is None else Verdict(True, self._names[rid])
