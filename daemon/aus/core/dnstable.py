"""Per-user bookkeeping of DNS-derived entries, independent of the kernel. Pure.

One entry per (login UID, family, address) a DNS answer allowed that user.
It carries the expiry (the answer's TTL plus a grace period, on the clock of
``time.monotonic_ns()``, which is the kernel's ``bpf_ktime_get_ns()``), the
union of the services and rule ids of every name that allowed the address,
the names themselves (to check them again after a policy change) and the
latest one (for flow records). A new answer for an address refreshes it: the
later expiry wins and the services grow; they shrink only when the entry
expires or the policy changes (``regrant``).

Each user holds at most ``max_per_user`` entries. An answer beyond that adds
nothing (the connect is denied) and is counted as overflow; entries already
expired are dropped first to make room. Every method returns what the kernel
map must change; applying it is the caller's business.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import NamedTuple

from .dnsanswer import Derived, Grants


class TableKey(NamedTuple):
    loginuid: int
    family: int     # 4 or 6
    addr: bytes     # 16 bytes, IPv4 v4-mapped


class TableEntry(NamedTuple):
    expires_ns: int
    services: frozenset
    rules: frozenset[int]
    name: str       # the name of the latest answer that allowed it


class TableChange(NamedTuple):
    puts: dict[TableKey, TableEntry]   # to write (new or changed)
    overflow: int                      # addresses refused by the per-user cap
    deletes: list[TableKey]            # to delete


class TableCounts(NamedTuple):
    entries: int
    users: int
    overflow: int       # since the table was made


class _Entry(NamedTuple):
    value: TableEntry
    names: frozenset[str]     # every name that allowed it, for regrant


class DnsTable:
    def __init__(self, max_per_user: int, grace_s: float):
        if max_per_user < 0 or grace_s < 0:
            raise ValueError("max_per_user and grace_s must not be negative")
        self.max_per_user = max_per_user
        self.grace_ns = int(grace_s * 1_000_000_000)
        self._users: dict[int, dict[TableKey, _Entry]] = {}
        self._heap: list[tuple[int, TableKey]] = []   # (expires_ns, key), stale ones skipped
        self._overflow = 0
        self._entries = 0

    # ---- changes ---------------------------------------------------------
    def add(self, loginuid: int, derived: Iterable[Derived], now_ns: int) -> TableChange:
        """Record what one answer allowed ``loginuid``."""
        mine = self._users.setdefault(loginuid, {})
        puts: dict[TableKey, TableEntry] = {}
        deletes: list[TableKey] = []
        overflow = 0
        for d in derived:
            key = TableKey(loginuid, d.family, bytes(d.addr))
            expires = now_ns + max(d.ttl, 0) * 1_000_000_000 + self.grace_ns
            old = mine.get(key)
            if old is None and len(mine) >= self.max_per_user:
                deletes += self._prune(mine, now_ns)
            if old is None and len(mine) >= self.max_per_user:
                overflow += 1
                continue
            if old is not None and old.value.expires_ns > now_ns:
                value = TableEntry(max(expires, old.value.expires_ns),
                                   old.value.services | d.services,
                                   old.value.rules | d.rules, d.name)
                names = old.names | {d.name}
            else:
                value = TableEntry(expires, frozenset(d.services), frozenset(d.rules), d.name)
                names = frozenset({d.name})
            mine[key] = _Entry(value, names)
            if old is None:
                self._entries += 1
            if old is None or value.expires_ns != old.value.expires_ns:
                heapq.heappush(self._heap, (value.expires_ns, key))
            if old is None or value != old.value:
                puts[key] = value
        if not mine:
            del self._users[loginuid]
        self._overflow += overflow
        self._size_heap()
        return TableChange(puts, overflow, [k for k in deletes if k not in puts])

    def expire(self, now_ns: int) -> list[TableKey]:
        """Remove every entry whose expiry has passed; their keys."""
        gone = []
        while self._heap and self._heap[0][0] <= now_ns:
            expires, key = heapq.heappop(self._heap)
            mine = self._users.get(key.loginuid)
            entry = mine.get(key) if mine else None
            if entry is None or entry.value.expires_ns != expires:
                continue        # refreshed or removed since
            del mine[key]
            self._entries -= 1
            if not mine:
                del self._users[key.loginuid]
            gone.append(key)
        self._size_heap()
        return gone

    def drop_user(self, loginuid: int) -> list[TableKey]:
        """Forget every entry of a user (logged out, removed); their keys."""
        gone = list(self._users.pop(loginuid, {}))
        self._entries -= len(gone)
        return gone

    def regrant(self, loginuid: int, grants: Grants) -> TableChange:
        """After a policy change: an entry none of whose names matches any
        more is deleted, the others take the services and rules their
        names have now."""
        mine = self._users.get(loginuid, {})
        puts: dict[TableKey, TableEntry] = {}
        deletes: list[TableKey] = []
        for key, entry in list(mine.items()):
            names, rules, services = set(), set(), set()
            for name in entry.names:
                matched = grants.lookup(name)
                if matched:
                    names.add(name)
                for g in matched:
                    rules.add(g.rule)
                    services.update(g.services)
            if not names:
                del mine[key]
                self._entries -= 1
                deletes.append(key)
                continue
            shown = entry.value.name if entry.value.name in names else min(names)
            value = TableEntry(entry.value.expires_ns, frozenset(services), frozenset(rules), shown)
            mine[key] = _Entry(value, frozenset(names))
            if value != entry.value:
                puts[key] = value
        if loginuid in self._users and not mine:
            del self._users[loginuid]
        return TableChange(puts, 0, deletes)

    # ---- reading ---------------------------------------------------------
    def name_for(self, loginuid: int, family: int, addr: bytes) -> str | None:
        entry = self._users.get(loginuid, {}).get(TableKey(loginuid, family, bytes(addr)))
        return None if entry is None else entry.value.name

    def get(self, key: TableKey) -> TableEntry | None:
        entry = self._users.get(key.loginuid, {}).get(key)
        return None if entry is None else entry.value

    def entries(self) -> dict[TableKey, TableEntry]:
        return {k: e.value for mine in self._users.values() for k, e in mine.items()}

    def entries_of(self, loginuid: int) -> int:
        return len(self._users.get(loginuid, {}))

    def counts(self) -> TableCounts:
        return TableCounts(self._entries, len(self._users), self._overflow)

    # ---- inside ----------------------------------------------------------
    def _prune(self, mine: dict[TableKey, _Entry], now_ns: int) -> list[TableKey]:
        """Drop one user's expired entries (to make room under the cap)."""
        gone = [k for k, e in mine.items() if e.value.expires_ns <= now_ns]
        for k in gone:
            del mine[k]
        self._entries -= len(gone)
        return gone

    def _size_heap(self) -> None:
        """Refreshes leave stale heap items behind; past four per entry,
        rebuild the heap from the entries (amortised O(1) per refresh)."""
        if len(self._heap) > 4 * self._entries + 1024:
            self._heap = [(e.value.expires_ns, k) for m in self._users.values() for k, e in m.items()]
            heapq.heapify(self._heap)
