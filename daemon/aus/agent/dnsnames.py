"""DNS-name destinations in ausd: the forwarder, the per-user table of
what answers allowed, and the kernel's entries, joined (docs/dns.md).

Threads. The forwarder (aus.agent.dnsforward) runs on an event loop of its
own thread, ``aus-dns``, and calls this object as its backend. The main
loop owns the policy and the maps' model: after each sync it hands over
the state it wrote (``published``) and, per user, the grants of the user's
rules (``set_grants``); both are immutable objects swapped whole, so the
forwarder reads them without a lock. The table and aus_dns change under
``lock``, from either thread.

An answer's entries name a portset in aus_svc: the union of the services
of every rule that allowed the address. A rule's own portset is always in
the maps (CompiledPolicy.dns_portsets); a union of several rules' that is
not yet there is asked of the main loop (``wanted``), which syncs it in,
and the answer waits for that (a few milliseconds, once per union). The
unions entries use stay in the maps while they do (``portsets``).

Restarts. Entries already in aus_dns when ausd starts stay there until
they expire (the kernel checks their expiry itself), and the portsets they
name are kept meanwhile: a restart takes no address away. They are not in
the table (their names are not in the kernel), so a policy change does not
regrant them; they go at their expiry.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable

from ..core.compiler import (
    NO_DNS_GRANTS,
    CompiledPolicy,
    DnsGrants,
    Portset,
    union_portset,
)
from ..core.dnsanswer import Derived
from ..core.dnstable import DnsTable, TableChange, TableKey
from ..core.errors import AusError
from ..core.state import KernelState
from .dnsforward import DnsForwarder, Origin, addr16
from .dnsmaps import DnsKey, DnsMaps, DnsValue, netns_cookie

log = logging.getLogger(__name__)

PORTSET_WAIT = 5.0      # seconds an answer waits for a new union portset
START_WAIT = 10.0       # seconds the forwarder may take to bind


class DnsNames:
    def __init__(self, maps: DnsMaps, *, port: int, max_per_user: int, grace_s: float,
                 timeout: float, wake: Callable[[], None]):
        self.maps = maps
        self.table = DnsTable(max_per_user, grace_s)
        self.lock = threading.Lock()
        self.want_port = port
        self.timeout = timeout
        self.wake = wake
        self.port = 0
        self.enabled = False            # redirecting: the policy names a DNS destination
        self._grants: dict[int, DnsGrants] = {}
        self._state = KernelState()
        # union portsets the entries name: content -> entries naming it
        self._in_use: collections.Counter[Portset] = collections.Counter()
        self._content_of: dict[TableKey, Portset] = {}
        # entries found in aus_dns at the start: key -> (expires_ns, portset content)
        self._adopted: dict[DnsKey, tuple[int, Portset]] = {}
        # unions asked of the main loop, with whoever waits for them
        self._wanted: collections.deque[tuple[frozenset[Portset], concurrent.futures.Future]] = \
            collections.deque()
        self.refused_writes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.forwarder: DnsForwarder | None = None

    # ---- life (main thread) -------------------------------------------------
    def adopt(self, state: KernelState) -> None:
        """At the start, before the first sync: keep what aus_dns holds
        until it expires (and the portsets it names); drop the rest."""
        self.published(state)
        now = time.monotonic_ns()
        stale = []
        for key, value in self.maps.entries().items():
            content = state.portsets.get(value.portset)
            if value.expires_ns <= now or content is None:
                stale.append(key)
                continue
            self._adopted[key] = (value.expires_ns, content)
            self._in_use[content] += 1
        self.maps.delete(stale)
        if self._adopted:
            log.info("DNS: %d entries kept from before the start, until they expire",
                     len(self._adopted))

    def serve(self) -> int:
        """Bind the forwarder on its thread; its port. Redirection starts
        with the first policy naming a DNS destination (``policy_changed``)."""
        self._loop = asyncio.new_event_loop()
        self.forwarder = DnsForwarder(self, self.want_port, timeout=self.timeout)
        started: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                port = self._loop.run_until_complete(self.forwarder.start())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                started.set_exception(exc)
                return
            started.set_result(port)
            self._loop.run_forever()
            self._loop.run_until_complete(self.forwarder.stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="aus-dns", daemon=True)
        self._thread.start()
        try:
            self.port = started.result(START_WAIT)
        except (OSError, concurrent.futures.TimeoutError) as exc:
            raise AusError(f"DNS forwarder on port {self.want_port}: {exc}") from exc
        return self.port

    def stop(self) -> None:
        """Stop redirecting, then stop the forwarder. The entries stay in
        aus_dns until they expire (the next ausd adopts them)."""
        try:
            self.maps.set_forwarder(0, 0)
        except AusError as exc:
            log.warning("DNS forwarder: %s", exc)
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        for _, fut in self._wanted:
            fut.cancel()

    # ---- the policy and the users (main thread) ----------------------------
    def published(self, state: KernelState) -> None:
        """The state the maps hold after a sync (portset ids)."""
        self._state = state

    def set_grants(self, grants: dict[int, DnsGrants]) -> None:
        self._grants = grants

    @property
    def grants_by_user(self) -> dict[int, DnsGrants]:
        return self._grants

    def policy_changed(self, compiled: CompiledPolicy) -> None:
        """A new policy is in the maps (and each user's grants are set):
        entries checked against the grants, and redirection on while any
        rule names a DNS destination (off, DNS goes where it was sent)."""
        grants = self._grants
        with self.lock:
            for uid in list(self.table_users()):
                self._apply(self.table.regrant(uid, grants.get(uid, NO_DNS_GRANTS)))
        enabled = bool(compiled.dns_portsets()) and self.port != 0
        if enabled != self.enabled:
            self.maps.set_forwarder(self.port if enabled else 0,
                                    netns_cookie() if enabled else 0)
            self.enabled = enabled
            log.info("DNS names: %s", f"forwarder on port {self.port}" if enabled else
                     "DNS is not redirected")

    def table_users(self) -> Iterable[int]:
        return {k.loginuid for k in self.table.entries()}

    def user_gone(self, uid: int) -> None:
        with self.lock:
            self._apply(TableChange({}, 0, self.table.drop_user(uid)))

    def expire(self, now_ns: int | None = None) -> int:
        """Delete the entries past their expiry; how many."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self.lock:
            gone = self.table.expire(now)
            self._apply(TableChange({}, 0, gone))
            old = [k for k, (exp, _) in self._adopted.items() if exp <= now]
            for k in old:
                self._in_use[self._adopted.pop(k)[1]] -= 1
            if old:
                self.maps.delete(old)
        return len(gone) + len(old)

    def portsets(self) -> frozenset[Portset]:
        """The union portsets entries name, and those answers wait for:
        the maps must keep them (Desired.dns_portsets)."""
        with self.lock:
            wanted = [p for group, _ in self._wanted for p in group]
            return frozenset([p for p, n in self._in_use.items() if n > 0] + wanted)

    def wanted(self) -> bool:
        return bool(self._wanted)

    def portsets_synced(self) -> None:
        """After the sync that wrote the wanted unions: release the answers."""
        index = self._state.portset_index()
        with self.lock:
            done, self._wanted = list(self._wanted), collections.deque()
        for group, fut in done:
            if all(p in index for p in group):
                fut.set_result(None)
            else:
                fut.set_exception(AusError("aus_svc: a DNS entry's services could not be written"))

    # ---- the forwarder's backend (its thread) -------------------------------
    def origin(self, addr: bytes, port: int, proto: int) -> Origin | None:
        o = self.maps.origin(addr, port, proto)
        return None if o is None else Origin(o.loginuid, o.family, o.addr, o.port)

    def grants(self, loginuid: int) -> DnsGrants:
        return self._grants.get(loginuid, NO_DNS_GRANTS)

    async def allow(self, loginuid: int, derived: list[Derived]) -> None:
        now = time.monotonic_ns()
        with self.lock:
            change = self.table.add(loginuid, derived, now)
            contents = {k: union_portset([v.services]) for k, v in change.puts.items()}
            index = self._state.portset_index()
            missing = frozenset(c for c in contents.values() if c not in index)
            if not missing:
                self._apply(change, contents)
                return
            fut: concurrent.futures.Future = concurrent.futures.Future()
            self._wanted.append((missing, fut))
        self.wake()
        await asyncio.wait_for(asyncio.wrap_future(fut), PORTSET_WAIT)
        with self.lock:
            self._apply(change, contents)

    # ---- inside (under lock) --------------------------------------------------
    def _apply(self, change: TableChange, contents: dict[TableKey, Portset] | None = None) -> None:
        """Write a table change to aus_dns, with each put's portset id."""
        if contents is None:
            contents = {k: union_portset([v.services]) for k, v in change.puts.items()}
        index = self._state.portset_index()
        values = {}
        for key, entry in change.puts.items():
            content = contents[key]
            pid = index.get(content)
            if pid is None:     # its union went from the maps meanwhile: ask again next answer
                self.refused_writes += 1
                continue
            values[DnsKey(*key)] = DnsValue(entry.expires_ns, pid, min(entry.rules))
            self._use(key, content)
        for key in change.deletes:
            self._use(key, None)
        if values:
            self.maps.put(values)
        if change.deletes:
            self.maps.delete([DnsKey(*k) for k in change.deletes])

    def _use(self, key: TableKey, content: Portset | None) -> None:
        old = self._content_of.pop(key, None)
        if old is not None:
            self._in_use[old] -= 1
            if self._in_use[old] <= 0:
                del self._in_use[old]
        if content is not None:
            self._content_of[key] = content
            self._in_use[content] += 1

    # ---- reading (main thread) ------------------------------------------------
    def name_for(self, loginuid: int, family: int, dst: str) -> str | None:
        """The name whose answer allowed ``dst`` (text) to this user."""
        with self.lock:
            return self.table.name_for(loginuid, family, addr16(dst))

    # ---- status ------------------------------------------------------------
    def status(self) -> dict:
        counts = self.table.counts()
        return {"enabled": self.enabled, "port": self.port, "entries": counts.entries,
                "users": counts.users, "overflow": counts.overflow,
                "adopted": len(self._adopted), "refused_writes": self.refused_writes,
                "forwarder": self.forwarder.counters.snapshot() if self.forwarder else {}}
