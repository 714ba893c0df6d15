"""Flow records: the kernel's flow events folded per window.

Every decoded event (see flows.decode) joins the record of its key,
(login UID, destination, protocol, port, verdict, rule), in the current
window: the first event makes the record, later ones raise its count and
last seen and name the process of the latest event. A window holds at
most ``cap`` distinct records; an event whose key finds the window full
is not kept and counted as dropped (distinct keys, so ``dropped`` is the
number of records lost). When the window is due, :meth:`Aggregator.step`
starts the next one and builds the closed window's records a slice per
call, so a full window never holds the daemon's loop for long. Plain
data and a clock: no syscalls, no daemon state; the daemon calls it from
its main loop. docs/flow-records.md says
what a count means.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..core.compiler import group_matches
from ..core.flowrecord import MAX_GROUPS, PROTOS, FlowRecord

log = logging.getLogger(__name__)

# flows.decode's verdict names -> the record's.
VERDICTS = {"allow": "allowed", "deny": "denied", "audit": "would_deny"}
EVENT_VERDICTS = {v: k for k, v in VERDICTS.items()}
PORTED = ("tcp", "udp")
MAX_LOGIN_UID = 4294967294
STEP = 1000    # records built per pass of the loop while a window closes

Key = tuple[int, str, str, int, str, str]
# Who a login UID is: (user name, policy groups). Called once per new record.
Who = Callable[[int], tuple[str, tuple[str, ...]]]


def key_of(ev: dict) -> Key | None:
    """The record key of a decoded event; None for one no record can hold
    (an unknown verdict, the unset login UID)."""
    verdict = VERDICTS.get(ev["verdict"])
    uid = ev["login_uid"]
    if verdict is None or not 0 <= uid <= MAX_LOGIN_UID:
        return None
    proto = ev["proto"] if ev["proto"] in PROTOS else "other"
    port = ev["dport"] if proto in PORTED else 0
    return (uid, ev["dst"], proto, port, verdict, ev["rule"] or "")


def printable(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, control characters as '?'
    (a process may name itself anything)."""
    if len(text) <= limit and text.isprintable():
        return text
    return "".join(c if ord(c) >= 32 else "?" for c in text[:limit])


def policy_groups(declared: Iterable[tuple[str, str | None]], groups: Iterable[str],
                  sids: Iterable[str] = ()) -> tuple[str, ...]:
    """The policy's user groups (name, SID) a user belongs to, matched as
    the compiler matches rule sources: by name (case-insensitive, with or
    without a domain) or by SID."""
    groups, have_sids = tuple(groups), {s.upper() for s in sids}
    out = [name for name, sid in declared
           if (sid and sid.upper() in have_sids) or any(group_matches(name, g) for g in groups)]
    return tuple(dict.fromkeys(out))[:MAX_GROUPS]


@dataclass
class _Open:
    """A record of the window still open."""
    first: float
    last: float
    count: int
    user: str
    groups: tuple[str, ...]
    process: str
    dns_name: str = ""      # the DNS name whose answer allowed it, if one did


def _utc(t: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).replace(microsecond=0)


class Aggregator:
    """One window of records at a time, at most ``cap`` of them."""

    def __init__(self, window: float, cap: int, who: Who,
                 clock: Callable[[], float]):
        self.window = window
        self.cap = cap
        self.who = who
        self.clock = clock                 # monotonic seconds
        self.records: dict[Key, _Open] = {}
        self._overflow: set[int] = set()   # hashes of keys that found the window full
        self.dropped = 0                   # records lost this window
        self.closes_at = clock() + window
        self._closing: tuple | None = None   # a window being closed, see step()
        # Since the start, for status:
        self.windows_closed = 0
        self.records_closed = 0
        self.dropped_total = 0

    def add(self, ev: dict) -> None:
        key = key_of(ev)
        if key is None:
            return
        rec = self.records.get(key)
        t = ev["time"]
        if rec is not None:
            rec.count += 1
            if t >= rec.last:
                rec.last, rec.process = t, ev["comm"]
                rec.dns_name = ev.get("dns_name") or rec.dns_name
            rec.first = min(rec.first, t)
            return
        if len(self.records) >= self.cap:
            # Distinct keys counted exactly while the set is no bigger than
            # the window; past that every further event counts one.
            h = hash(key)
            if h not in self._overflow:
                if len(self._overflow) < self.cap:
                    self._overflow.add(h)
                self.dropped += 1
            return
        user, groups = self.who(key[0])
        self.records[key] = _Open(t, t, 1, user, groups, ev["comm"], ev.get("dns_name") or "")

    def timeout(self) -> float:
        """Seconds until the window closes; 0 while a close is under way."""
        return 0.0 if self._closing is not None else max(0.0, self.closes_at - self.clock())

    def step(self, budget: int = STEP) -> tuple[list[FlowRecord], int] | None:
        """Work toward a window close, ``budget`` records at most (so a
        full window does not hold the loop): the closed window's records
        and the number dropped by the cap once all are built, else None."""
        if self._closing is None:
            if self.clock() < self.closes_at:
                return None
            self._begin()
        items, out, dropped, size = self._closing
        out.extend(self.record(key, r) for key, r in itertools.islice(items, budget))
        if len(out) < size:
            return None
        self._closing = None
        self.windows_closed += 1
        self.records_closed += len(out)
        self.dropped_total += dropped
        return out, dropped

    def close(self) -> tuple[list[FlowRecord], int]:
        """Close the window now (or finish the close under way), whole."""
        if self._closing is None:
            self._begin()
        return self.step(budget=self._closing[3])

    def _begin(self) -> None:
        # The next window starts now: one window from the close, not from
        # the due time (a late close must not make a burst of short windows).
        records, dropped = self.records, self.dropped
        self.records, self._overflow, self.dropped = {}, set(), 0
        self.closes_at = self.clock() + self.window
        self._closing = (iter(records.items()), [], dropped, len(records))

    @staticmethod
    def record(key: Key, r: _Open) -> FlowRecord:
        """Built without validation (a window of 10,000 records would hold
        the main loop for a fifth of a second): every field is valid by
        construction, from key_of, printable and the policy's own names;
        the unit tests validate what this builds against the wire model."""
        uid, dst, proto, port, verdict, rule = key
        return FlowRecord.model_construct(
            login_uid=uid, user=printable(r.user, 256),
            groups=[printable(g, 256) for g in r.groups[:MAX_GROUPS]],
            process=printable(r.process, 64), dst=dst, proto=proto, port=port,
            verdict=verdict, rule=printable(rule, 64), first_seen=_utc(r.first),
            last_seen=_utc(max(r.first, r.last)), count=r.count, dns_name=r.dns_name)

    def current(self) -> list[FlowRecord]:
        """The open window's records so far (for ausctl flows --records)."""
        return [self.record(key, r) for key, r in self.records.items()]

    def status(self) -> dict:
        return {"window_seconds": self.window, "cap": self.cap,
                "records_open": len(self.records), "dropped_open": self.dropped,
                "windows_closed": self.windows_closed, "records_closed": self.records_closed,
                "dropped": self.dropped_total}


# ---- filters (ausctl flows) ----------------------------------------------

def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR or a single address; ValueError saying what is wrong."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text[:64]!r} is not an address or CIDR") from None


@dataclass(frozen=True)
class Filter:
    """What ``flows`` selects; None: any. ``since`` is a Unix time."""
    user: str | None = None
    verdict: str | None = None          # allowed, denied, would_deny
    to: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None
    since: float | None = None

    @classmethod
    def of(cls, args: dict) -> Filter:
        to = args.get("to")
        return cls(user=args.get("user"), verdict=args.get("verdict"),
                   to=parse_network(to) if to is not None else None,
                   port=args.get("port"), since=args.get("since"))

    def _dst(self, dst: str) -> bool:
        if self.to is None:
            return True
        addr = ipaddress.ip_address(dst)
        if addr.version == 6 and addr.ipv4_mapped is not None and self.to.version == 4:
            addr = addr.ipv4_mapped
        return addr.version == self.to.version and addr in self.to

    def event(self, ev: dict) -> bool:
        """A decoded event (with its ``user``)."""
        return ((self.user is None or ev.get("user") == self.user)
                and (self.verdict is None or VERDICTS.get(ev["verdict"]) == self.verdict)
                and (self.port is None or ev["dport"] == self.port)
                and (self.since is None or ev["time"] >= self.since)
                and self._dst(ev["dst"]))

    def record(self, r: FlowRecord) -> bool:
        return ((self.user is None or r.user == self.user)
                and (self.verdict is None or r.verdict == self.verdict)
                and (self.port is None or r.port == self.port)
                and (self.since is None or r.last_seen.timestamp() >= self.since)
                and self._dst(r.dst))
