"""ausd's DNS forwarder on loopback, between real sockets and the test DNS
server (tests.support.dnsserver). The backend is a fake of the kernel seam
(origin lookup, grants, allow): the kernel side is tested with the real
programs in tests/kernel. An answer leaves only after allow() finished,
unchanged; what no grant names passes without allow(); the forwarder answers
REFUSED to an unknown client, SERVFAIL when the resolver fails, and survives
any bytes."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import struct
import threading
import time

import dns.flags
import dns.message
import dns.rcode
import pytest

from aus.agent.dnsforward import PROTO_TCP, PROTO_UDP, DnsForwarder, Origin, addr16
from aus.core.dnsanswer import Derived
from tests.support.dnsgrants import Grants, grant
from tests.support.dnsserver import DnsServer

USER = 1000
GITHUB = grant("github.com", 1, ("tcp", 443))
EDGE = grant("*.example.net", 2, ("tcp", 443))
ZONE = {
    "github.com": {"A": ["192.0.2.1", "192.0.2.2"], "AAAA": ["2001:db8::1"], "ttl": 5},
    "www.example.org": {"CNAME": "edge7.example.net", "ttl": 30},
    "edge7.example.net": {"A": ["192.0.2.9"], "ttl": 60},
    "gitlab.com": {"A": ["192.0.2.50"], "ttl": 60},
    "big.github.com": {"A": ["192.0.2.3"], "truncate": True},
    "slow.example.net": {"A": ["192.0.2.4"], "silent": True},
}


def mapped(ip: str) -> bytes:
    return addr16(ip)


class Backend:
    """Origins by client (address, port, proto); grants per user; allow()
    records its calls and, when ``gate`` is given, waits for it."""

    def __init__(self, grants=None, gate: asyncio.Event | None = None, fail: bool = False):
        self.origins: dict[tuple[bytes, int, int], Origin] = {}
        self.user_grants = grants if grants is not None else Grants(GITHUB, EDGE)
        self.gate = gate
        self.fail = fail
        self.allowed: list[tuple[int, list[Derived]]] = []
        self.allow_started = asyncio.Event()

    def redirect(self, client: socket.socket, proto: int, server: tuple[str, int], uid: int = USER):
        host, port = client.getsockname()[:2]
        ip = ipaddress.ip_address(server[0])
        self.origins[(addr16(host), port, proto)] = Origin(uid, ip.version, addr16(server[0]), server[1])

    def origin(self, addr: bytes, port: int, proto: int):
        return self.origins.get((addr, port, proto))

    def grants(self, loginuid: int):
        return self.user_grants

    async def allow(self, loginuid: int, derived: list[Derived]) -> None:
        self.allow_started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("map full")
        self.allowed.append((loginuid, derived))


@pytest.fixture(scope="module")
def dns4():
    with DnsServer(ZONE, "127.0.0.1") as server:
        yield server


@pytest.fixture(scope="module")
def dns6():
    with DnsServer(ZONE, "::1") as server:
        yield server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def tcp_client(backend: Backend, port: int, server: tuple[str, int], host: str = "127.0.0.1",
                     uid: int = USER):
    """A TCP connection to the forwarder whose origin is in place before
    it connects (the kernel records it from the first packet, the SYN)."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
    backend.redirect(s, PROTO_TCP, server, uid)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, (host, port))
    return await asyncio.open_connection(sock=s)


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


async def ask(sock: socket.socket, port: int, query: bytes, timeout: float = 5) -> bytes:
    loop = asyncio.get_running_loop()
    host = sock.getsockname()[0]
    await loop.sock_sendto(sock, query, (host, port))
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)


def query(name: str, kind: str = "A") -> bytes:
    return dns.message.make_query(name, kind).to_wire()


def direct(server: DnsServer, wire: bytes, tcp: bool = False) -> bytes:
    """The server's answer asked directly (what the forwarder must relay)."""
    with socket.socket(socket.AF_INET6 if ":" in server.host else socket.AF_INET,
                       socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.connect((server.host, server.port))
        if tcp:
            s.sendall(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            return s.recv(size, socket.MSG_WAITALL)
        s.send(wire)
        return s.recv(65535)


def rcode(wire: bytes) -> int:
    return dns.message.from_wire(wire).rcode()


def test_an_a_answer_is_relayed_unchanged_after_its_addresses_are_allowed(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            wire = query("GitHub.com")
            got = await ask(client, fwd.port, wire)
            assert got == direct(dns4, wire)
            [(uid, derived)] = backend.allowed
            assert uid == USER and sorted(derived) == [
                Derived(4, mapped("192.0.2.1"), 5, "github.com", frozenset({1}), GITHUB.services),
                Derived(4, mapped("192.0.2.2"), 5, "github.com", frozenset({1}), GITHUB.services)]
            c = fwd.counters
            assert (c.queries, c.answers, c.allows, c.derived, c.refused, c.upstream_errors) == \
                (1, 1, 1, 2, 0, 0)
            client.close()
    run(go())


def test_aaaa_over_ipv6_to_an_ipv6_resolver_udp_and_tcp(dns6):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend) as fwd:
            client = udp_client("::1")
            backend.redirect(client, PROTO_UDP, (dns6.host, dns6.port))
            wire = query("github.com", "AAAA")
            assert await ask(client, fwd.port, wire) == direct(dns6, wire)
            aaaa = Derived(6, mapped("2001:db8::1"), 5, "github.com", frozenset({1}), GITHUB.services)
            assert backend.allowed == [(USER, [aaaa])]
            client.close()
            # and over TCP on [::1]
            reader, writer = await tcp_client(backend, fwd.port, (dns6.host, dns6.port), host="::1")
            writer.write(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            assert await reader.readexactly(size) == direct(dns6, wire, tcp=True)
            assert backend.allowed == [(USER, [aaaa])] * 2
            writer.close()
    run(go())


def test_a_cname_chain_to_a_wildcard_name(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            wire = query("www.example.org")
            assert await ask(client, fwd.port, wire) == direct(dns4, wire)
            assert backend.allowed == [(USER, [
                Derived(4, mapped("192.0.2.9"), 30, "edge7.example.net", frozenset({2}),
                        EDGE.services)])]
            client.close()
    run(go())


def test_names_no_grant_matches_pass_without_allow(dns4):
    async def go():
        for grants in (Grants(GITHUB), Grants()):           # another name; no grants at all
            backend = Backend(grants)
            async with DnsForwarder(backend) as fwd:
                client = udp_client()
                backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
                for name in ("gitlab.com", "nowhere.example"):
                    wire = query(name)
                    assert await ask(client, fwd.port, wire) == direct(dns4, wire)
                assert backend.allowed == []
                assert (fwd.counters.answers, fwd.counters.allows) == (2, 0)
                client.close()
    run(go())


def test_the_answer_waits_for_allow(dns4):
    async def go():
        gate = asyncio.Event()
        backend = Backend(gate=gate)
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            loop = asyncio.get_running_loop()
            wire = query("github.com")
            await loop.sock_sendto(client, wire, ("127.0.0.1", fwd.port))
            await asyncio.wait_for(backend.allow_started.wait(), 5)
            # the resolver has answered and allow() runs: the client has nothing
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_recv(client, 65535), 0.3)
            assert backend.allowed == []
            gate.set()
            got = await asyncio.wait_for(loop.sock_recv(client, 65535), 5)
            assert got == direct(dns4, wire)
            assert len(backend.allowed) == 1
            client.close()
    run(go())


def test_a_failed_allow_answers_servfail(dns4):
    async def go():
        backend = Backend(fail=True)
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            got = await ask(client, fwd.port, query("github.com"))
            assert rcode(got) == dns.rcode.SERVFAIL
            assert fwd.counters.allow_errors == 1
            client.close()
    run(go())


def test_tcp_pipelined_queries(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend) as fwd:
            reader, writer = await tcp_client(backend, fwd.port, (dns4.host, dns4.port))
            queries = [query("github.com"), query("www.example.org"), query("gitlab.com"),
                       query("big.github.com")]
            for q in queries:       # all sent before any answer is read
                writer.write(struct.pack("!H", len(q)) + q)
            await writer.drain()
            answers = {}
            for _ in queries:
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                a = await reader.readexactly(size)
                answers[a[:2]] = a
            for q in queries:
                assert answers[q[:2]] == direct(dns4, q, tcp=True)
            # the name that is truncated over UDP comes whole over TCP
            assert dns.message.from_wire(answers[queries[3][:2]]).answer
            assert sorted(d.addr for _, ds in backend.allowed for d in ds) == sorted(
                mapped(a) for a in ("192.0.2.1", "192.0.2.2", "192.0.2.9"))   # no grant names big.github.com
            # a query sent then the writing half closed is still answered
            writer.write(struct.pack("!H", len(queries[0])) + queries[0])
            writer.write_eof()
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            assert await reader.readexactly(size) == direct(dns4, queries[0], tcp=True)
            assert await reader.read() == b""          # then the forwarder closes
            writer.close()
    run(go())


def test_a_truncated_udp_answer_passes_unchanged(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            wire = query("big.github.com")
            got = await ask(client, fwd.port, wire)
            assert got == direct(dns4, wire)
            assert dns.message.from_wire(got).flags & dns.flags.TC
            assert backend.allowed == []
            client.close()
    run(go())


def test_unknown_origin_is_refused_and_nothing_is_asked(dns4):
    async def go():
        backend = Backend()
        before = sum(dns4.received.values())
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            wire = query("github.com")
            got = await ask(client, fwd.port, wire)
            assert rcode(got) == dns.rcode.REFUSED and got[:2] == wire[:2]
            reader, writer = await asyncio.open_connection("::1", fwd.port)
            writer.write(struct.pack("!H", len(wire)) + wire)
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            assert rcode(await reader.readexactly(size)) == dns.rcode.REFUSED
            writer.close()
            assert fwd.counters.refused == 2
            client.close()
        assert sum(dns4.received.values()) == before
        assert backend.allowed == []
    run(go())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resolver_down_or_silent_answers_servfail(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend, timeout=0.5) as fwd:
            down = ("127.0.0.1", free_port())
            client = udp_client()
            backend.redirect(client, PROTO_UDP, down)           # nothing listens: refused at once
            t0 = time.monotonic()
            assert rcode(await ask(client, fwd.port, query("github.com"))) == dns.rcode.SERVFAIL
            assert time.monotonic() - t0 < 0.5
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            wire = query("slow.example.net")                     # the resolver never answers
            assert rcode(await ask(client, fwd.port, wire)) == dns.rcode.SERVFAIL
            # over TCP: no connection, and a connection that never answers
            for server, name in ((down, "github.com"), ((dns4.host, dns4.port), "slow.example.net")):
                reader, writer = await tcp_client(backend, fwd.port, server)
                wire = query(name)
                writer.write(struct.pack("!H", len(wire)) + wire)
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                got = await reader.readexactly(size)
                assert rcode(got) == dns.rcode.SERVFAIL and got[:2] == wire[:2]
                writer.close()
            assert fwd.counters.upstream_errors == 4
            assert backend.allowed == []
            client.close()
    run(go())


class HostileResolver:
    """Answers every UDP query with its ID and then ``payload``."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop.is_set():
            try:
                q, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.sock.sendto(b"junk" if self.payload == b"wrong-id" else q[:2] + self.payload, peer)

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_hostile_bytes_from_clients_and_resolvers(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend, timeout=0.5) as fwd:
            loop = asyncio.get_running_loop()
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            answer_bit = bytearray(query("github.com"))
            answer_bit[2] |= 0x80
            for junk in (b"", b"\x00", b"\x12\x34" + b"\xff" * 10, bytes(answer_bit),
                         b"\x00" * 5000, bytes(range(256)) * 3):
                await loop.sock_sendto(client, junk, ("127.0.0.1", fwd.port))
            # a TCP client announcing an oversize frame is closed, one sending garbage too
            for junk in (struct.pack("!H", 60000) + b"x" * 100, struct.pack("!H", 3) + b"abc"):
                reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
                writer.write(junk)
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            # random datagrams and random TCP streams, some starting like a query
            # (from another user: what the resolver ignores fills their in-flight bound, not ours)
            rng = random.Random(15)
            base = query("github.com")
            other = udp_client()
            backend.redirect(other, PROTO_UDP, (dns4.host, dns4.port), uid=2000)
            for _ in range(300):
                junk = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300)))
                if rng.random() < 0.5:
                    junk = base[:rng.randrange(0, len(base))] + junk
                await loop.sock_sendto(other, junk, ("127.0.0.1", fwd.port))
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", fwd.port)
                writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 400))))
                writer.write_eof()
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
            # still serving
            wire = query("github.com")
            await loop.sock_sendto(client, wire, ("127.0.0.1", fwd.port))
            assert await asyncio.wait_for(loop.sock_recv(client, 65535), 5) == direct(dns4, wire)
            other.close()
            # resolvers that answer garbage with the right ID: relayed as they came, nothing derived
            for payload in (b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + b"\xc0\x0c" * 20,
                            b"\x81\x80" + b"\xff" * 40, b"\x81\x80\x00\x00\x00\x05\x00\x00\x00\x00"):
                bad = HostileResolver(payload)
                try:
                    backend.redirect(client, PROTO_UDP, bad.address)
                    got = await ask(client, fwd.port, wire)
                    assert got == wire[:2] + payload
                finally:
                    bad.close()
            # and a resolver answering with the wrong ID is not believed
            bad = HostileResolver(b"wrong-id")
            try:
                backend.redirect(client, PROTO_UDP, bad.address)
                assert rcode(await ask(client, fwd.port, wire)) == dns.rcode.SERVFAIL
            finally:
                bad.close()
            c = fwd.counters
            assert c.dropped >= 6 and c.parse_failures >= 1 and c.errors == 0
            assert [d.name for _, ds in backend.allowed for d in ds] == ["github.com"] * 2
            client.close()
    run(go())


def test_queries_in_flight_per_client_are_bounded(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend, timeout=1.0, max_inflight=2) as fwd:
            loop = asyncio.get_running_loop()
            client = udp_client()
            backend.redirect(client, PROTO_UDP, (dns4.host, dns4.port))
            for i in range(5):
                q = dns.message.make_query("slow.example.net", "A")
                q.id = i
                await loop.sock_sendto(client, q.to_wire(), ("127.0.0.1", fwd.port))
            answers = [await asyncio.wait_for(loop.sock_recv(client, 65535), 5) for _ in range(2)]
            assert all(rcode(a) == dns.rcode.SERVFAIL for a in answers)
            assert fwd.counters.dropped == 3
            # the bound frees again once they are answered
            wire = query("github.com")
            assert await ask(client, fwd.port, wire) == direct(dns4, wire)
            client.close()
    run(go())


def test_one_port_on_both_loopbacks_and_a_fixed_port():
    async def go():
        fwd = DnsForwarder(Backend())
        port = await fwd.start()
        try:
            for family, host, kind in ((socket.AF_INET, "127.0.0.1", socket.SOCK_DGRAM),
                                       (socket.AF_INET6, "::1", socket.SOCK_DGRAM),
                                       (socket.AF_INET, "127.0.0.1", socket.SOCK_STREAM),
                                       (socket.AF_INET6, "::1", socket.SOCK_STREAM)):
                with socket.socket(family, kind) as s, pytest.raises(OSError):
                    s.bind((host, port))            # taken by the forwarder
        finally:
            await fwd.stop()
        again = DnsForwarder(Backend(), port)
        assert await again.start() == port
        await again.stop()
    run(go())


def test_tcp_connections_per_user_are_bounded(dns4):
    async def go():
        backend = Backend()
        async with DnsForwarder(backend, max_tcp_per_user=2) as fwd:
            server = (dns4.host, dns4.port)
            held = [await tcp_client(backend, fwd.port, server) for _ in range(2)]
            reader, writer = await tcp_client(backend, fwd.port, server)
            assert await asyncio.wait_for(reader.read(), 5) == b""        # a third: closed
            writer.close()
            # another user is not held back, and the first user's connections still answer
            wire = query("github.com")
            other = await tcp_client(backend, fwd.port, server, uid=2000)
            for r, w in [other, *held]:
                w.write(struct.pack("!H", len(wire)) + wire)
                size = struct.unpack("!H", await r.readexactly(2))[0]
                assert await r.readexactly(size) == direct(dns4, wire, tcp=True)
            assert fwd.counters.dropped == 1
            for _, w in [other, *held]:
                w.close()
    run(go())


@pytest.mark.parametrize("grants,read", [(Grants(), 0), (Grants(GITHUB), 1)])
def test_a_user_without_grants_has_answers_relayed_unread(grants, read):
    async def go():
        backend = Backend(grants)
        async with DnsForwarder(backend) as fwd:
            client = udp_client()
            # a question name that points at itself: unreadable, if read
            garbage = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
            bad = HostileResolver(garbage)
            try:
                backend.redirect(client, PROTO_UDP, bad.address)
                wire = query("github.com")
                assert await ask(client, fwd.port, wire) == wire[:2] + garbage
            finally:
                bad.close()
            assert (fwd.counters.answers, fwd.counters.parse_failures) == (1, read)
            client.close()
    run(go())
