"""ausd's DNS forwarder: relays a managed user's DNS and allows what it names.

The kernel redirects a managed user's DNS (UDP and TCP to port 53, any
resolver the user may reach) to this forwarder on 127.0.0.1:PORT and
[::1]:PORT, and records, per client source address and port, the login UID
and the resolver the application chose (the "origin"). For each query the
forwarder looks the origin up through its backend, relays the query bytes
unchanged to that resolver, and for an answer that names something the
user's grants match, awaits ``backend.allow()`` (the entries are in the
kernel) before it sends the answer, unchanged, to the client: the first
connect() after the answer already finds its address allowed.

- A client with no origin (not redirected: someone sent to the forwarder
  directly) gets REFUSED.
- No answer within ``timeout`` (or the resolver refuses the connection):
  SERVFAIL.
- Truncated UDP answers (TC) pass unchanged; the client retries over TCP.
  What a truncated answer carries is still derived (some stub resolvers use
  it as it is).
- An answer that does not parse is relayed as it came and allows nothing.
- At most ``max_inflight`` queries per user at a time over UDP (every
  redirected client comes from a loopback address, so the login UID is the
  client), as many per TCP connection (which then stops reading),
  ``MAX_TCP_PER_USER`` connections per user and ``MAX_TCP_CLIENTS`` in
  all; queries longer than
  ``MAX_QUERY`` bytes or shorter than a header are dropped, and no bytes a
  client or resolver sends can stop the forwarder: a failure ends that one
  query, counted in ``errors``.

The forwarder runs as ausd, whose login UID is unset, so its own queries to
the resolvers are never redirected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol

import dns.flags
import dns.message
import dns.rcode

from ..core import dnsanswer
from ..core.dnsanswer import Derived, Grants

log = logging.getLogger(__name__)

PROTO_TCP = 6
PROTO_UDP = 17
MAX_QUERY = 4096            # bytes; a DNS question is far shorter
HEADER = 12
TCP_IDLE_S = 30.0           # a client TCP connection with no query for this long is closed
MAX_TCP_CLIENTS = 256       # TCP connections in all
MAX_TCP_PER_USER = 32       # ... and of one user


class Origin(NamedTuple):
    """Whom a redirected query belongs to and where it was going
    (aus.agent.dnsmaps.DnsOrigin has the same fields)."""
    loginuid: int
    family: int         # 4 or 6
    addr: bytes         # 16 bytes, IPv4 v4-mapped
    port: int


class Backend(Protocol):
    """What the forwarder needs of ausd. ``origin`` and ``grants`` are
    called on the event loop for every query and must not block (a map
    lookup, a cached object); ``allow`` returns once the entries are in the
    kernel, and raises when they could not be written."""

    def origin(self, addr: bytes, port: int, proto: int) -> Origin | None:
        """The origin the kernel recorded for a client socket (source
        address v4-mapped, source port, PROTO_UDP or PROTO_TCP)."""

    def grants(self, loginuid: int) -> Grants:
        """The user's DNS grants (aus.core.compiler.DnsGrants); falsy when
        the user's rules name no DNS destination."""

    def allow(self, loginuid: int, derived: list[Derived]) -> Awaitable[None]:
        """Write what an answer allows the user (aus.core.dnstable, then
        aus.agent.dnsmaps)."""


@dataclass
class ForwarderCounters:
    queries: int = 0          # queries received (UDP and TCP)
    answers: int = 0          # answers relayed from a resolver
    derived: int = 0          # entries handed to allow()
    allows: int = 0           # allow() calls
    refused: int = 0          # REFUSED: no origin for the client
    upstream_errors: int = 0  # SERVFAIL sent: resolver silent, refused or unreachable
    parse_failures: int = 0   # answers that did not parse (relayed, nothing derived)
    dropped: int = 0          # queries dropped: malformed, oversize, over the in-flight bound
    allow_errors: int = 0     # allow() failed: SERVFAIL sent instead of the answer
    errors: int = 0           # a query ended by an unexpected failure (logged)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


@functools.lru_cache(maxsize=1024)
def addr16(host: str) -> bytes:
    """A socket address's host as the maps hold it (IPv4 v4-mapped)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def upstream_address(origin: Origin) -> tuple[int, tuple]:
    """(socket family, sockaddr) of the resolver an origin names."""
    return _sockaddr(origin.addr, origin.port)


@functools.lru_cache(maxsize=1024)
def _sockaddr(addr: bytes, port: int) -> tuple[int, tuple]:
    ip = ipaddress.IPv6Address(addr)
    if ip.ipv4_mapped is not None:
        return socket.AF_INET, (str(ip.ipv4_mapped), port)
    return socket.AF_INET6, (str(ip), port, 0, 0)


def error_answer(query: bytes, rcode: int) -> bytes | None:
    """An answer with ``rcode`` to ``query`` (its ID and question), or None
    when the query does not parse (then it gets no answer)."""
    try:
        q = dns.message.from_wire(query, ignore_trailing=True)
        r = dns.message.make_response(q)
        r.set_rcode(rcode)
        r.flags |= dns.flags.RA
        return r.to_wire()
    except Exception:  # noqa: BLE001 - hostile query bytes: no answer
        return None


class DnsForwarder:
    """The forwarder on ``hosts`` (loopback v4 and v6), one ``port`` for UDP
    and TCP on all (0: any free one; ``start()`` returns it, ``.port``
    keeps it). ``counters`` for metrics. Runs on the caller's event loop
    until ``stop()``; also an async context manager."""

    def __init__(self, backend: Backend, port: int = 0, *, hosts: tuple[str, ...] = ("127.0.0.1", "::1"),
                 timeout: float = 5.0, max_inflight: int = 64,
                 max_tcp_per_user: int = MAX_TCP_PER_USER):
        self.backend = backend
        self.hosts = hosts
        self.timeout = timeout
        self.max_inflight = max_inflight
        self.max_tcp_per_user = max_tcp_per_user
        self.counters = ForwarderCounters()
        self._want_port = port
        self.port = 0
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task] = set()
        # UDP queries waiting for their resolver, oldest first, by deadline
        # (one timeout for all: insertion order is deadline order)
        self._udp_pending: dict[_UdpQuery, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._inflight: dict[int, int] = {}      # login UID -> UDP queries in flight
        self._tcp_clients = 0
        self._tcp_users: dict[int, int] = {}     # login UID -> TCP connections

    # ---- life ------------------------------------------------------------
    async def start(self) -> int:
        """Bind UDP and TCP on every host, one port for all; the port.
        A host without IPv6 (no ::1) is served on IPv4 alone: the kernel
        then redirects no IPv6 socket, whose DNS goes where it was sent."""
        for attempt in range(20):
            try:
                await self._bind(self._want_port)
                return self.port
            except OSError as exc:
                await self.stop()
                if self._want_port or exc.errno != errno.EADDRINUSE or attempt == 19:
                    raise
        raise AssertionError("unreachable")

    async def _bind(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        for host in self.hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno == errno.EAFNOSUPPORT:
                    log.warning("no IPv6: the DNS forwarder listens on IPv4 only")
                    continue
                raise
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                    log.warning("no %s: the DNS forwarder listens on IPv4 only", host)
                    continue
                raise
            port = port or sock.getsockname()[1]
            self._udp.append(_UdpListener(self, sock, loop))
            tsock = socket.socket(family, socket.SOCK_STREAM)
            try:
                tsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    tsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                tsock.bind((host, port))
            except OSError:
                tsock.close()
                raise
            self._tcp.append(await asyncio.start_server(self._tcp_client, sock=tsock, backlog=128))
        self.port = port

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for q in list(self._udp_pending):
            q.close()
        self._udp_pending.clear()
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._udp, self._tcp = [], []

    async def __aenter__(self) -> DnsForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- one answer --------------------------------------------------------
    def _derive(self, loginuid: int, answer: bytes) -> list[Derived]:
        """What ``answer`` allows ``loginuid`` (nothing, without reading it,
        for a user with no DNS grants or an answer without records)."""
        self.counters.answers += 1
        grants = self.backend.grants(loginuid)
        if not grants or not dnsanswer.may_derive(answer):
            return []
        try:
            return dnsanswer.read_answer(answer, grants)
        except dnsanswer.AnswerUnreadable:
            self.counters.parse_failures += 1
            return []

    async def _allow(self, loginuid: int, query: bytes, answer: bytes,
                     derived: list[Derived]) -> bytes | None:
        """``answer`` once ``derived`` is allowed; SERVFAIL when allow()
        fails, since the addresses would not be reachable."""
        self.counters.allows += 1
        self.counters.derived += len(derived)
        try:
            await self.backend.allow(loginuid, derived)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.allow_errors += 1
            log.exception("allowing %d DNS-derived addresses for login UID %d failed",
                          len(derived), loginuid)
            return error_answer(query, dns.rcode.SERVFAIL)
        return answer

    # ---- UDP -------------------------------------------------------------
    # Callbacks, not a task per query: a query is a socket, a reader and a
    # timer until its answer comes; only an answer that allows something
    # becomes a task (it awaits allow()).
    def _udp_query(self, transport: _UdpListener, query: bytes, peer: tuple) -> None:
        self.counters.queries += 1
        if not HEADER <= len(query) <= MAX_QUERY or query[2] & 0x80:
            self.counters.dropped += 1          # too short, too long, or itself an answer
            return
        origin = self.backend.origin(addr16(peer[0]), peer[1], PROTO_UDP)
        if origin is None:
            self.counters.refused += 1
            answer = error_answer(query, dns.rcode.REFUSED)
            if answer is not None:
                transport.sendto(answer, peer)
            return
        # bounded per user: every redirected client's source is a loopback address
        uid = origin.loginuid
        if self._inflight.get(uid, 0) >= self.max_inflight:
            self.counters.dropped += 1
            return
        self._inflight[uid] = self._inflight.get(uid, 0) + 1
        pending = _UdpQuery(self, transport, query, peer, origin)
        loop = asyncio.get_running_loop()
        self._udp_pending[pending] = loop.time() + self.timeout
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every(), self._sweep)
        pending.start()

    def _udp_answered(self, q: _UdpQuery, answer: bytes | None) -> None:
        """The resolver answered ``q`` (None: it did not, or refused)."""
        self._udp_pending.pop(q, None)
        try:
            if answer is None:
                self.counters.upstream_errors += 1
                self._udp_reply(q, error_answer(q.query, dns.rcode.SERVFAIL))
                return
            derived = self._derive(q.origin.loginuid, answer)
            if not derived:
                self._udp_reply(q, answer)
                return
            self._spawn(self._udp_allow(q, answer, derived))
        except Exception:
            self.counters.errors += 1
            log.exception("DNS query from %s port %s failed", q.peer[0], q.peer[1])
            self._udp_reply(q, None)

    def _sweep_every(self) -> float:
        return min(0.25, self.timeout / 4)

    def _sweep(self) -> None:
        """Every query past its deadline fails (SERVFAIL): one timer for
        all, not one per query."""
        now = asyncio.get_running_loop().time()
        late = []
        for q, deadline in self._udp_pending.items():
            if deadline > now:
                break
            late.append(q)
        for q in late:
            q.done(None)
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every(), self._sweep) \
            if self._udp_pending else None

    async def _udp_allow(self, q: _UdpQuery, answer: bytes, derived: list[Derived]) -> None:
        reply = None
        try:
            reply = await self._allow(q.origin.loginuid, q.query, answer, derived)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.errors += 1
            log.exception("DNS query from %s port %s failed", q.peer[0], q.peer[1])
        finally:
            self._udp_reply(q, reply)

    def _udp_reply(self, q: _UdpQuery, reply: bytes | None) -> None:
        """Send ``reply`` (if any) and free the query's in-flight slot."""
        uid = q.origin.loginuid
        left = self._inflight.get(uid, 1) - 1
        if left > 0:
            self._inflight[uid] = left
        else:
            self._inflight.pop(uid, None)
        if reply is not None and not q.transport.is_closing():
            q.transport.sendto(reply, q.peer)

    # ---- TCP -------------------------------------------------------------
    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._tcp_clients += 1
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        relay: asyncio.Task | None = None
        uid = None
        try:
            if self._tcp_clients > MAX_TCP_CLIENTS:
                self.counters.dropped += 1
                return
            peer = writer.get_extra_info("peername")
            origin = self.backend.origin(addr16(peer[0]), peer[1], PROTO_TCP)
            if origin is not None:
                if self._tcp_users.get(origin.loginuid, 0) >= self.max_tcp_per_user:
                    self.counters.dropped += 1
                    return
                uid = origin.loginuid
                self._tcp_users[uid] = self._tcp_users.get(uid, 0) + 1
            pending: dict[bytes, list[tuple[asyncio.TimerHandle, bytes]]] = {}
            slots = asyncio.Semaphore(self.max_inflight)
            while True:
                query = await self._read_frame(reader, TCP_IDLE_S, MAX_QUERY)
                if query is None:       # EOF: the answers still owed go out first
                    if relay is not None and not relay.done():
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._drain(slots), self.timeout + 1)
                    return
                self.counters.queries += 1
                if query[2] & 0x80:
                    self.counters.dropped += 1
                    return
                if origin is None:
                    self.counters.refused += 1
                    self._tcp_send(writer, error_answer(query, dns.rcode.REFUSED))
                    continue
                if relay is not None and relay.done():      # the resolver closed: connect again
                    upstream[1].close()
                    upstream = relay = None
                if upstream is None:
                    upstream = await self._tcp_connect(origin)
                    if upstream is not None:
                        relay = asyncio.get_running_loop().create_task(
                            self._tcp_relay(origin, upstream[0], writer, pending, slots))
                if upstream is None:
                    self.counters.upstream_errors += 1
                    self._tcp_send(writer, error_answer(query, dns.rcode.SERVFAIL))
                    continue
                await slots.acquire()
                timer = asyncio.get_running_loop().call_later(
                    self.timeout, self._tcp_timeout, writer, pending, slots, query)
                pending.setdefault(query[:2], []).append((timer, query))
                upstream[1].write(struct.pack("!H", len(query)) + query)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            self.counters.errors += 1
            log.exception("DNS over TCP client failed")
        finally:
            self._tcp_clients -= 1
            if uid is not None:
                left = self._tcp_users[uid] - 1
                if left:
                    self._tcp_users[uid] = left
                else:
                    del self._tcp_users[uid]
            self._tasks.discard(task)
            if relay is not None:
                relay.cancel()
                with contextlib.suppress(BaseException):
                    await relay
            if upstream is not None:
                upstream[1].close()
            writer.close()

    async def _drain(self, slots: asyncio.Semaphore) -> None:
        """Wait until every query of a connection is answered."""
        for _ in range(self.max_inflight):
            await slots.acquire()

    async def _read_frame(self, reader: asyncio.StreamReader, timeout: float | None,
                          limit: int) -> bytes | None:
        """One length-framed message, or None at EOF, idle timeout or a
        frame out of bounds (the connection is then closed)."""
        try:
            head = await asyncio.wait_for(reader.readexactly(2), timeout)
            size = struct.unpack("!H", head)[0]
            if not HEADER <= size <= limit:
                self.counters.dropped += 1
                return None
            return await asyncio.wait_for(reader.readexactly(size), timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            return None

    async def _tcp_connect(self, origin: Origin):
        family, address = upstream_address(origin)
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(address[0], address[1], family=family), self.timeout)
        except (OSError, asyncio.TimeoutError):
            return None

    async def _tcp_relay(self, origin: Origin, upstream: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, pending: dict, slots: asyncio.Semaphore) -> None:
        """Answers from the resolver, each released in turn to the client."""
        try:
            while True:
                answer = await self._read_frame(upstream, None, 65535)
                if answer is None:
                    break
                waiting = pending.get(answer[:2])
                if not waiting:
                    continue            # late (already SERVFAIL) or never asked
                timer, query = waiting.pop(0)
                timer.cancel()
                if not waiting:
                    del pending[answer[:2]]
                try:
                    derived = self._derive(origin.loginuid, answer)
                    if derived:
                        answer = await self._allow(origin.loginuid, query, answer, derived)
                    self._tcp_send(writer, answer)
                finally:
                    slots.release()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters.errors += 1
            log.exception("DNS over TCP relay failed")
        # the resolver closed: whatever it still owes fails now
        for waiting in list(pending.values()):
            for timer, query in waiting:
                timer.cancel()
                self.counters.upstream_errors += 1
                slots.release()
                self._tcp_send(writer, error_answer(query, dns.rcode.SERVFAIL))
        pending.clear()

    def _tcp_timeout(self, writer, pending: dict, slots: asyncio.Semaphore, query: bytes) -> None:
        waiting = pending.get(query[:2])
        if not waiting:
            return
        waiting[:] = [w for w in waiting if w[1] is not query]
        if not waiting:
            del pending[query[:2]]
        slots.release()
        self.counters.upstream_errors += 1
        self._tcp_send(writer, error_answer(query, dns.rcode.SERVFAIL))

    def _tcp_send(self, writer: asyncio.StreamWriter, message: bytes | None) -> None:
        if message is not None and not writer.is_closing():
            writer.write(struct.pack("!H", len(message)) + message)


class _UdpQuery:
    """One UDP query on its way to the resolver: from a fresh socket (a
    random source port per query), connected so that the kernel passes only
    the resolver's datagrams, the answer matched by its ID."""

    __slots__ = ("fwd", "transport", "query", "peer", "origin", "sock")

    def __init__(self, fwd: DnsForwarder, transport, query: bytes, peer: tuple, origin: Origin):
        self.fwd, self.transport, self.query, self.peer, self.origin = fwd, transport, query, peer, origin
        self.sock: socket.socket | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        family, address = upstream_address(self.origin)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(address)
            sock.send(self.query)
            loop.add_reader(sock.fileno(), self.readable)
        except OSError:
            sock.close()
            loop.call_soon(self.fwd._udp_answered, self, None)
            return
        self.sock = sock

    def readable(self) -> None:
        while self.sock is not None:
            try:
                answer = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:             # ICMP unreachable: nothing listens there
                self.done(None)
                return
            if len(answer) >= HEADER and answer[:2] == self.query[:2] and answer[2] & 0x80:
                self.done(answer)

    def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def done(self, answer: bytes | None) -> None:
        if self.sock is None:
            return
        self.close()
        self.fwd._udp_answered(self, answer)


class _UdpListener:
    """A listening UDP socket, read until empty on each wakeup (under load
    one pass of the event loop takes many queries); answers are sent at
    once, and one the socket cannot take now is dropped (the client asks
    again), as a resolver does."""

    BATCH = 64      # datagrams read per wakeup, so that other work gets its turn

    def __init__(self, forwarder: DnsForwarder, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.forwarder = forwarder
        self.sock = sock
        self.loop = loop
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        for _ in range(self.BATCH):
            try:
                data, peer = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # an ICMP error for an earlier answer
                log.debug("DNS socket error: %s", exc)
                continue
            try:
                self.forwarder._udp_query(self, data, peer)
            except Exception:
                self.forwarder.counters.errors += 1
                log.exception("DNS datagram from %s failed", peer)

    def sendto(self, data: bytes, peer: tuple) -> None:
        try:
            self.sock.sendto(data, peer)
        except OSError as exc:
            log.debug("DNS answer to %s not sent: %s", peer, exc)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
