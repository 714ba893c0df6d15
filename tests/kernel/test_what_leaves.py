"""What leaves the host is what is judged: source routes and raw sockets.

A process of a managed user running as root (the user's sudo) in the test
cgroup tries to reach a denied host behind an allowed one: IPv4 loose
source routes and IPv6 segment routing headers on TCP sockets, hand-made
TCP segments on IPPROTO_RAW sockets, and an IPPROTO_TCP raw socket
connected to an allowed address. A capture in the destination namespace
counts what arrived; the same actions without a login UID show that the
capture sees them when nothing stops them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import subprocess

import pytest

from aus.agent import mapview, pins
from aus.core.contract import LOGINUID_UNSET
from tests.support import lab, netns
from tests.support.capture import Capture
from tests.support.names import unique

pytestmark = pytest.mark.kernel

RAW = lab.HERE / "lab_raw.py"
SYN, ACK, PSH = 0x02, 0x10, 0x08


class Net:
    """The destination namespace: `ok` addresses are allowed, `hop`
    addresses (same link) are not."""
    ns: str
    peer_if: str
    host4: str
    ok4: str
    hop4: str
    host6: str
    ok6: str
    hop6: str


@pytest.fixture(scope="module")
def net(tools):
    host_if, peer_if = unique("ausv"), unique("ausp")
    a = secrets.randbelow(200) + 20
    b = secrets.randbelow(30) * 8
    n = Net()
    n.peer_if = peer_if
    n.host4, n.ok4, n.hop4 = (f"198.18.{a}.{b + i}" for i in (1, 2, 3))
    n.host6, n.ok6, n.hop6 = (str(ipaddress.IPv6Address(f"2001:db8:{a:x}:{b:x}::{i}"))
                              for i in (1, 2, 3))
    with contextlib.ExitStack() as stack:
        n.ns = stack.enter_context(netns.namespace("aust"))
        stack.enter_context(netns.veth(host_if, peer_if, n.ns))
        netns.up(host_if, [f"{n.host4}/29", f"{n.host6}/64"])
        netns.up(peer_if, [f"{n.ok4}/29", f"{n.hop4}/29", f"{n.ok6}/64", f"{n.hop6}/64"],
                 ns=n.ns)
        netns.up("lo", ns=n.ns)
        proc = subprocess.Popen([lab.PYTHON, str(lab.PEER), "80,443,5353"],
                                stdout=subprocess.PIPE, text=True,
                                preexec_fn=lambda: netns.enter(n.ns))
        stack.callback(lab._stop, proc)
        assert proc.stdout.readline().strip() == "ready"
        yield n


@pytest.fixture(scope="module")
def daemon(cg, net):
    with lab.users({"alice": ["dev"]}) as (users, groups):
        policy = {
            "user_groups": [{"name": groups["dev"]}],
            "ip_lists": {"ok": [f"{net.ok4}/32", f"{net.ok6}/128"]},
            "rules": [{"name": "dev-web", "sources": [groups["dev"]], "destinations": ["ok"],
                       "services": ["80/tcp", "53/udp"]}],
        }
        with lab.ausd(cg, policy) as d:
            d.start()
            alice = users["alice"]
            with lab.session(d, alice.uid):
                yield d, alice


def raw(cg, loginuid, *args) -> dict:
    """One lab_raw.py action as root with ``loginuid`` in the test cgroup."""
    p = lab.spawn([lab.PYTHON, str(RAW), *map(str, args)], cg=cg, loginuid=loginuid,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, f"lab_raw.py {args} failed: {err}"
    return json.loads(out)


def reasons(d) -> dict:
    with pins.pinned_maps(d.pin_dir) as maps:
        return mapview.reason_counters(maps)["egress"]


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_source_route_to_a_denied_first_hop_never_reaches_it(daemon, cg, net, fam):
    d, alice = daemon
    action, ok, hop = ("lsrr", net.ok4, net.hop4) if fam == "v4" else ("srh", net.ok6, net.hop6)
    # Without a login UID nothing judges it: the SYNs go to the first hop.
    with Capture(net.ns, net.peer_if) as free:
        raw(cg, LOGINUID_UNSET, action, ok, hop, 80)
    assert free.count(dst=hop, proto=6, dport=80, flags=SYN, routed=True) >= 1, free.packets

    before = reasons(d).get("source_route", 0)
    with Capture(net.ns, net.peer_if) as cap:
        got = raw(cg, alice.uid, action, ok, hop, 80)
    # The SYNs are dropped after connect() was allowed: TCP retransmits
    # until the caller's timeout.
    assert got == {"ok": False, "errno": "ETIMEDOUT"}
    assert cap.count(dst=hop) == 0, cap.packets
    assert cap.count(dst=ok) == 0, cap.packets
    assert reasons(d).get("source_route", 0) > before


def test_ipv6_extension_headers_are_walked_to_the_transport_header(daemon, cg, net):
    """Destination options are no route: the packets behind them are
    judged by their ports and pass where a rule allows them."""
    d, alice = daemon
    before = reasons(d).get("source_route", 0)
    with Capture(net.ns, net.peer_if) as cap:
        got = raw(cg, alice.uid, "dstopts", net.ok6, 80)
    assert got == {"udp": {"ok": False, "errno": "EPERM"}, "tcp": {"ok": True, "errno": None}}
    assert cap.count(dst=net.ok6, proto=6, dport=80, flags=SYN, routed=True) >= 1, cap.packets
    with Capture(net.ns, net.peer_if) as cap:
        got = raw(cg, alice.uid, "dstopts", net.ok6, 53)
    assert got["udp"] == {"ok": True, "errno": None}
    assert cap.count(dst=net.ok6, proto=17, dport=53, routed=True) == 1, cap.packets
    assert reasons(d).get("source_route", 0) == before


@pytest.mark.parametrize("flags", [ACK | PSH, SYN | ACK], ids=["ack-psh", "syn-ack"])
def test_raw_segment_that_is_no_syn_is_judged_not_counted_inbound(daemon, cg, net, flags):
    d, alice = daemon
    with Capture(net.ns, net.peer_if) as free:
        assert raw(cg, LOGINUID_UNSET, "hdrincl", net.host4, net.hop4, 80, flags)["ok"]
    assert free.count(dst=net.hop4, proto=6, dport=80, flags=flags) == 1, free.packets

    before = reasons(d)
    with Capture(net.ns, net.peer_if) as cap:
        got = raw(cg, alice.uid, "hdrincl", net.host4, net.hop4, 80, flags)
    assert got == {"ok": False, "errno": "EPERM"}
    assert cap.count(dst=net.hop4) == 0, cap.packets
    after = reasons(d)
    assert after.get("inbound", 0) == before.get("inbound", 0)
    assert after.get("no_rule", 0) > before.get("no_rule", 0)


def test_raw_tcp_socket_is_judged_by_each_packet_not_its_connected_address(daemon, cg, net):
    d, alice = daemon
    with Capture(net.ns, net.peer_if) as cap:
        got = raw(cg, alice.uid, "rawtcp", net.ok4, 80, 443, 5353)
    assert got["syn 80"]["ok"] is True
    assert cap.count(dst=net.ok4, proto=6, dport=80, flags=SYN) == 1, cap.packets
    assert got["syn 443"] == {"ok": False, "errno": "EPERM"}
    assert got["syn 5353"] == {"ok": False, "errno": "EPERM"}
    assert got["udp 5353"] == {"ok": False, "errno": "EPERM"}
    assert cap.count(dst=net.ok4, dport=443) == 0, cap.packets
    assert cap.count(dst=net.ok4, dport=5353) == 0, cap.packets


@pytest.mark.parametrize("fam", ["v4", "v6"])
def test_allowed_traffic_still_passes(daemon, cg, net, fam):
    d, alice = daemon
    ok = net.ok4 if fam == "v4" else net.ok6
    with Capture(net.ns, net.peer_if) as cap:
        got = lab.act(cg, "tcp", ok, 80, loginuid=alice.uid)
    assert got == {"ok": True, "errno": None}
    assert cap.count(dst=ok, proto=6, dport=80, flags=SYN) >= 1, cap.packets
    assert lab.act(cg, "tcp", ok, 443, loginuid=alice.uid) == {"ok": False, "errno": "EPERM"}
    assert lab.act(cg, "tcp", net.hop4 if fam == "v4" else net.hop6, 80,
                   loginuid=alice.uid) == {"ok": False, "errno": "EPERM"}

