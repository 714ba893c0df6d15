"""DNS-name destinations in the kernel: the real programs on a test cgroup,
real processes with real login UIDs, real traffic into a test namespace.

The entries a DNS answer creates (aus_dns) are written here through
aus.agent.dnsmaps, as ausd's forwarder does; the portset they point at is
the one a rule of the policy compiled to (a rule for TEST-NET-1, which no
test reaches). The forwarder is played by sockets of this test process on
127.0.0.1 and ::1: the redirect, the origin the egress program records,
and what the client sees (getpeername(), recvfrom()) are the kernel's.
"""

import contextlib
import ctypes
import ipaddress
import json
import secrets
import select
import socket
import struct
import subprocess
import time

import pytest

from aus.agent import dnsmaps, mapview, pins
from aus.agent.dnsmaps import DnsKey, DnsOrigin, DnsValue
from aus.core import contract as C
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel

LAB_DNS = lab.HERE / "lab_dns.py"
NAMED_NET = "192.0.2.0/24"   # TEST-NET-1: the rule that names the DNS services


def dns_policy(peer, groups):
    policy = lab_policy(peer, groups, dev_services=["web", "8000-8100/tcp", "53/udp",
                                                    "53/tcp", "icmp"])
    policy["rules"].append({"name": "dns-web", "sources": [groups["dev"].upper()],
                            "destinations": [NAMED_NET], "services": ["443/tcp", "5353/udp"]})
    return policy


@pytest.fixture(scope="module")
def daemon(cg, peer, people):
    _users, groups = people
    with lab.ausd(cg, dns_policy(peer, groups)) as d:
        d.start()
        yield d


@pytest.fixture(scope="module")
def alice(daemon, people):
    u = people[0]["alice"]
    with lab.session(daemon, u.uid):
        yield u


@pytest.fixture(scope="module")
def bob(daemon, people):
    u = people[0]["bob"]
    with lab.session(daemon, u.uid):
        yield u


@pytest.fixture(scope="module")
def maps(daemon):
    with pins.pinned_maps(daemon.pin_dir) as m:
        yield m


@pytest.fixture(scope="module")
def dm(maps):
    return dnsmaps.DnsMaps(maps)


@pytest.fixture(scope="module")
def grant(maps, alice):
    """(portset, rule id) of the dns-web rule in alice's ruleset: what the
    daemon would give a DNS entry for a name that rule allows."""
    ruleset = maps[C.MAP_USERS].lookup(ctypes.c_uint32(alice.uid)).ruleset
    want = ipaddress.ip_network(NAMED_NET)
    portset = next(v.portset for k, v in maps[C.MAP_DST].items() if k.ruleset == ruleset
                   and C.network_from16(bytes(k.addr), k.prefixlen - C.DST_ID_BITS) == want)
    rules = {v.rule for k, v in maps[C.MAP_SVC].items() if k.portset == portset}
    assert len(rules) == 1
    return portset, rules.pop()


@pytest.fixture
def entries(dm):
    """Entries a test writes, removed afterwards."""
    written: list[DnsKey] = []

    def put(loginuid: int, addr: str, portset: int, rule: int, ttl: float = 60.0) -> DnsValue:
        ip = ipaddress.ip_address(addr)
        key = DnsKey(loginuid, ip.version, C.addr16(ip))
        value = DnsValue(time.monotonic_ns() + int(ttl * 1e9), portset, rule)
        dm.put({key: value})
        written.append(key)
        return value

    yield put
    dm.delete(written)


def addr_of(peer, fam: str) -> str:
    return peer.v4 if fam == "v4" else peer.v6


def tcp(cg, user, addr: str, port: int) -> dict:
    return lab.act(cg, "tcp", addr, port, loginuid=user.uid, uid=user.uid, gid=user.gid)


def reasons(maps, hook: str) -> dict:
    return mapview.reason_counters(maps)[hook]


# ---- entries from DNS answers -----------------------------------------------

@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_entry_allows_that_user_that_address_those_services(
        daemon, maps, entries, grant, peer, cg, alice, bob, fam):
    addr = addr_of(peer, fam)
    other = addr_of(peer, "v6" if fam == "v4" else "v4")
    hook = "connect4" if fam == "v4" else "connect6"
    portset, rule = grant
    assert tcp(cg, alice, addr, 443) == {"ok": False, "errno": "EPERM"}

    before_reason = reasons(maps, hook).get("dns", 0)
    before_rule = mapview.rule_counters(maps, [rule]).get(rule, {}).get("allowed_packets", 0)
    entries(alice.uid, addr, portset, rule)
    assert tcp(cg, alice, addr, 443) == {"ok": True, "errno": None}
    res = daemon.check(alice.uid, addr, "tcp", 443)
    assert res["allowed"] and res["reason"] == "dns" and res["rule"] == "dns-web"
    assert reasons(maps, hook)["dns"] == before_reason + 1
    assert mapview.rule_counters(maps, [rule])[rule]["allowed_packets"] > before_rule
    shown = [e for e in daemon.ctl_json("maps")["dns"] if e["login_uid"] == alice.uid]
    assert len(shown) == 1 and same_ip(shown[0]["address"], addr)
    assert shown[0]["rule"] == "dns-web" and shown[0]["portset"] == portset
    assert 0 < shown[0]["expires_in"] <= 60
    assert "aus_dns:" in daemon.ctl("maps").stdout

    # The entry's other service, on UDP.
    assert lab.act(cg, "udp", addr, 5353, loginuid=alice.uid, uid=alice.uid,
                   gid=alice.gid)["ok"]
    # Not another port of that address, not another address on that port,
    # not another user.
    assert tcp(cg, alice, addr, 22) == {"ok": False, "errno": "EPERM"}
    assert tcp(cg, alice, other, 443) == {"ok": False, "errno": "EPERM"}
    assert tcp(cg, bob, addr, 443) == {"ok": False, "errno": "EPERM"}
    assert daemon.check(bob.uid, addr, "tcp", 443)["allowed"] is False

    def event():
        flows = [json.loads(line) for line in
                 daemon.ctl("flows", "--json", "--limit", "500").stdout.splitlines()]
        return [f for f in flows if f["login_uid"] == alice.uid and f["dport"] == 443
                and ipaddress.ip_address(f["dst"]) == ipaddress.ip_address(addr)
                and f["verdict"] == "allow"]

    ev = lab.wait_until(event, what="the flow event of the DNS allow")[-1]
    assert ev["reason"] == "dns" and ev["rule"] == "dns-web" and ev["hook"] == hook


def test_expired_entry_denies_new_flows_but_not_an_open_connection(
        daemon, maps, entries, grant, peer, cg, alice, people):
    portset, rule = grant
    value = entries(alice.uid, peer.v4, portset, rule, ttl=4.0)
    holder = lab.spawn([lab.PYTHON, str(lab.CLIENT), "hold", peer.v4, "443"], cg=cg,
                       loginuid=alice.uid, uid=alice.uid, gid=alice.gid,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def say(line):
            holder.stdin.write(line + "\n")
            holder.stdin.flush()
            return json.loads(holder.stdout.readline())

        assert json.loads(holder.stdout.readline())["ok"]
        assert time.monotonic_ns() < value.expires_ns, "connected too late to test expiry"
        assert say("before expiry")["ok"]
        lab.wait_until(lambda: not daemon.check(alice.uid, peer.v4, "tcp", 443)["allowed"],
                       timeout=10, what="the entry to expire")
        assert tcp(cg, alice, peer.v4, 443) == {"ok": False, "errno": "EPERM"}
        assert say("after expiry")["ok"]

        # Another user's change moves users_gen: the connection keeps its
        # allow while alice's ruleset stays.
        gen = maps[C.MAP_CONFIG].lookup(ctypes.c_uint32(0)).users_gen
        carol = people[0]["carol"]
        with lab.session(daemon, carol.uid):
            assert maps[C.MAP_CONFIG].lookup(ctypes.c_uint32(0)).users_gen != gen
            assert say("after another user changed")["ok"]
    finally:
        holder.kill()
        holder.wait()


def test_cached_deny_turns_into_allow_after_put(entries, grant, peer, cg, alice):
    """The same socket connect()s twice: its first, denied decision is
    cached, and writing an entry makes the second one look again."""
    portset, rule = grant
    client = lab.spawn([lab.PYTHON, str(LAB_DNS), "retry", peer.v6, "443"], cg=cg,
                       loginuid=alice.uid, uid=alice.uid, gid=alice.gid,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(client.stdout.readline()) == {"ok": False, "errno": "EPERM"}
        entries(alice.uid, peer.v6, portset, rule)
        client.stdin.write("again\n")
        client.stdin.flush()
        assert json.loads(client.stdout.readline()) == {"ok": True, "errno": None}
    finally:
        client.kill()
        client.wait()


def test_put_and_delete_round_trip(dm, alice):
    key = DnsKey(alice.uid, 6, ipaddress.ip_address("2001:db8::53").packed)
    value = DnsValue(time.monotonic_ns() + 10**9, 12345, 7)
    gen = dm.generation()
    dm.put({key: value})
    assert dm.entries()[key] == value and dm.generation() == gen + 1
    dm.delete([key, key._replace(loginuid=alice.uid + 1)])   # absent keys pass
    assert key not in dm.entries()
    with pytest.raises(ValueError, match="16 bytes"):
        dm.put({key._replace(addr=b"\x01\x02\x03\x04"): value})


# ---- DNS redirected to the forwarder ------------------------------------------

class Forwarder:
    """The forwarder's sockets: UDP and TCP on 127.0.0.1 and ::1, one port."""

    def __init__(self):
        for _ in range(20):
            socks = []
            try:
                for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                        s = socket.socket(fam, kind)
                        socks.append(s)
                        s.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else 0))
                        if kind == socket.SOCK_STREAM:
                            s.listen(8)
            except OSError:
                for s in socks:
                    s.close()
                continue
            self.udp4, self.tcp4, self.udp6, self.tcp6 = socks
            self.port = socks[0].getsockname()[1]
            return
        raise AssertionError("no free port on both loopback addresses")

    def close(self):
        for s in (self.udp4, self.tcp4, self.udp6, self.tcp6):
            s.close()

    def idle(self) -> bool:
        """Nothing reached the forwarder."""
        ready, _, _ = select.select([self.udp4, self.tcp4, self.udp6, self.tcp6], [], [], 0)
        return not ready

    def drain(self):
        for s in (self.udp4, self.udp6):
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    s.recvfrom(512)
            s.setblocking(True)

    def query_udp(self, fam: str, timeout: float = 10.0):
        s = self.udp4 if fam == "v4" else self.udp6
        s.settimeout(timeout)
        data, source = s.recvfrom(512)
        return s, data, source

    def accept_tcp(self, fam: str, timeout: float = 10.0):
        s = self.tcp4 if fam == "v4" else self.tcp6
        s.settimeout(timeout)
        conn, source = s.accept()
        conn.settimeout(timeout)
        return conn, source


@pytest.fixture(scope="module")
def forwarder():
    f = Forwarder()
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def redirect(dm, forwarder):
    """Redirect to the test's forwarder in this namespace; off afterwards."""
    forwarder.drain()
    dm.set_forwarder(forwarder.port, dnsmaps.netns_cookie())
    try:
        yield forwarder
    finally:
        dm.set_forwarder(0, 0)


def run_dns(cg, user, *args, loginuid="same") -> subprocess.Popen:
    loginuid = user.uid if loginuid == "same" else loginuid
    return lab.spawn([lab.PYTHON, str(LAB_DNS), *map(str, args)], cg=cg, loginuid=loginuid,
                     uid=user.uid if user else None, gid=user.gid if user else None,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out)


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def addr16(host: str) -> bytes:
    return C.addr16(ipaddress.ip_address(host))


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_udp_query_reaches_the_forwarder_and_the_answer_comes_from_the_resolver(
        dm, redirect, peer, cg, alice, fam):
    resolver = addr_of(peer, fam)
    token = secrets.token_hex(4)
    client = run_dns(cg, alice, "udp", resolver, 53, f"query-{token}")
    s, data, source = redirect.query_udp(fam)
    assert data == f"query-{token}".encode()
    assert same_ip(source[0], "127.0.0.1" if fam == "v4" else "::1")
    assert dm.origin(addr16(source[0]), source[1], C.PROTO_UDP) == DnsOrigin(
        alice.uid, 4 if fam == "v4" else 6, addr16(resolver), 53)
    s.sendto(f"answer-{token}".encode(), source)
    got = result(client)
    assert got["ok"] and got["answer"] == f"answer-{token}"
    assert same_ip(got["source"][0], resolver) and got["source"][1] == 53


def test_v4_mapped_resolver_on_an_ipv6_socket(dm, redirect, peer, cg, alice):
    mapped = f"::ffff:{peer.v4}"
    client = run_dns(cg, alice, "udp", mapped, 53, "mapped")
    s, data, source = redirect.query_udp("v4")
    assert data == b"mapped"
    assert dm.origin(addr16(source[0]), source[1], C.PROTO_UDP) == DnsOrigin(
        alice.uid, 4, addr16(peer.v4), 53)
    s.sendto(b"mapped answer", source)
    got = result(client)
    assert got["answer"] == "mapped answer" and same_ip(got["source"][0], mapped)


def test_connected_udp_sees_the_resolver_as_its_peer(dm, redirect, peer, cg, alice):
    client = run_dns(cg, alice, "udp-connected", peer.v6, 53, "connected")
    s, data, source = redirect.query_udp("v6")
    assert data == b"connected"
    assert dm.origin(addr16(source[0]), source[1], C.PROTO_UDP).addr == addr16(peer.v6)
    s.sendto(b"connected answer", source)
    got = result(client)
    assert got["ok"] and got["answer"] == "connected answer"
    assert same_ip(got["peer"][0], peer.v6) and got["peer"][1] == 53
    assert same_ip(got["source"][0], peer.v6) and got["source"][1] == 53


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_tcp_query_reaches_the_forwarder_and_getpeername_shows_the_resolver(
        dm, redirect, peer, cg, alice, fam):
    resolver = addr_of(peer, fam)
    client = run_dns(cg, alice, "tcp", resolver, 53, "over tcp")
    conn, source = redirect.accept_tcp(fam)
    with conn:
        assert dm.origin(addr16(source[0]), source[1], C.PROTO_TCP) == DnsOrigin(
            alice.uid, 4 if fam == "v4" else 6, addr16(resolver), 53)
        (n,) = struct.unpack("!H", conn.recv(2))
        assert conn.recv(n) == b"over tcp"
        conn.sendall(struct.pack("!H", 10) + b"tcp answer")
        got = result(client)
    assert got["ok"] and got["answer"] == "tcp answer"
    assert same_ip(got["peer"][0], resolver) and got["peer"][1] == 53


def test_no_forwarder_listening_dns_goes_to_the_resolver(dm, forwarder, peer, cg, alice):
    with socket.socket() as s:     # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]
    dm.set_forwarder(unused, dnsmaps.netns_cookie())
    try:
        got = result(run_dns(cg, alice, "udp", peer.v4, 53, "direct"))
        assert got["answer"] == "direct" and same_ip(got["source"][0], peer.v4)   # the echo
        got = result(run_dns(cg, alice, "tcp", peer.v6, 53, "direct tcp"))
        assert got["answer"] == "direct tcp" and same_ip(got["peer"][0], peer.v6)
    finally:
        dm.set_forwarder(0, 0)


def test_another_network_namespace_is_not_redirected(dm, forwarder, peer, cg, alice):
    forwarder.drain()
    dm.set_forwarder(forwarder.port, dnsmaps.netns_cookie() ^ 1)
    try:
        got = result(run_dns(cg, alice, "udp", peer.v4, 53, "elsewhere"))
        assert got["answer"] == "elsewhere" and same_ip(got["source"][0], peer.v4)
        assert forwarder.idle()
    finally:
        dm.set_forwarder(0, 0)


def test_a_resolver_the_rules_deny_stays_denied(maps, redirect, peer, cg, bob):
    before = reasons(maps, "sendmsg4").get("no_rule", 0)
    got = result(run_dns(cg, bob, "udp", peer.v4, 53, "denied"))
    assert got["ok"] is False and got["errno"] == "EPERM"
    assert reasons(maps, "sendmsg4")["no_rule"] == before + 1
    got = result(run_dns(cg, bob, "tcp", peer.v6, 53, "denied"))
    assert got["ok"] is False and got["errno"] == "EPERM"
    got = result(run_dns(cg, bob, "udp-connected", peer.v4, 53, "denied"))
    assert got["ok"] is False and got["errno"] == "EPERM"
    assert redirect.idle()


def test_an_unmanaged_process_is_not_redirected(redirect, peer, cg):
    got = result(run_dns(cg, None, "udp", peer.v4, 53, "service", loginuid=None))
    assert got["answer"] == "service" and same_ip(got["source"][0], peer.v4)
    got = result(run_dns(cg, None, "tcp", peer.v4, 53, "service tcp", loginuid=None))
    assert got["answer"] == "service tcp" and same_ip(got["peer"][0], peer.v4)
    assert redirect.idle()


def test_a_query_sent_to_the_forwarder_directly_has_no_origin(
        dm, redirect, peer, cg, alice, bob):
    """The forwarder answers only what the kernel redirected: a client that
    sends to it directly, even from the port a redirected one used before,
    finds no origin."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        sport = s.getsockname()[1]
    client = run_dns(cg, alice, "udp", peer.v4, 53, "first", sport)
    s, _data, source = redirect.query_udp("v4")
    assert source[1] == sport and dm.origin(addr16(source[0]), sport, C.PROTO_UDP)
    s.sendto(b"first answer", source)
    assert result(client)["answer"] == "first answer"

    client = run_dns(cg, bob, "udp", "127.0.0.1", redirect.port, "direct", sport)
    s, data, source = redirect.query_udp("v4")
    assert data == b"direct" and source[1] == sport
    assert dm.origin(addr16(source[0]), sport, C.PROTO_UDP) is None
    s.sendto(b"refused", source)
    got = result(client)
    assert got["answer"] == "refused" and same_ip(got["source"][0], "127.0.0.1")
