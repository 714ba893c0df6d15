"""DNS-name destinations end to end: a real ausd with its forwarder, the
real programs on the test's cgroup, users' processes with real login UIDs
asking a real DNS server inside the test's network namespace, then
connecting to what it answered.

The names resolve to addresses of their own, each routed into the test's
namespace, where all of them are local (so every allowed connect() is
answered by the namespace's echo server, and no address was allowed by an
earlier case): 198.19.B.0/22 via the peer, a local route on its loopback.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import secrets
import signal
import subprocess
import time

import pytest
from pyroute2 import IPRoute

from tests.support import lab, netns
from tests.support.names import unique

pytestmark = pytest.mark.kernel

PORT, OTHER_PORT = 443, 8443
RACE = 1000
GRACE = 1.0
DNS_CLIENT = lab.HERE / "dns_client.py"
DNS_SERVER = "tests.support.dnsserver"
ROOT = lab.HERE.parents[1]


class Lab:
    def __init__(self, peer, block: ipaddress.IPv4Network):
        self.peer = peer
        self.block = block
        self.next = 1

    def addr(self) -> str:
        """A fresh address of the block: no answer has named it yet."""
        a = str(self.block.network_address + self.next)
        self.next += 1
        return a


@contextlib.contextmanager
def routed_block(peer):
    """198.19.B.0/22 routed into the peer's namespace, local there."""
    block = ipaddress.ip_network(f"198.19.{4 * secrets.randbelow(64)}.0/22")
    with IPRoute(netns=peer.ns, flags=0) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route("add", dst=str(block.network_address), dst_len=block.prefixlen,
                  type="local", table=255, oif=lo, scope=254)   # host scope: local
    with IPRoute() as ipr:
        ipr.route("add", dst=str(block.network_address), dst_len=block.prefixlen,
                  gateway=peer.v4)
    try:
        yield block
    finally:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.route("del", dst=str(block.network_address), dst_len=block.prefixlen,
                      gateway=peer.v4)


@contextlib.contextmanager
def dns_server(ns: str, listen: str, zone: dict, workdir):
    path = workdir / unique("zone")
    path.write_text(json.dumps(zone))
    p = subprocess.Popen([lab.PYTHON, "-m", DNS_SERVER, "--listen", listen, "--port", "53",
                          "--zone", str(path)], stdout=subprocess.PIPE, text=True,
                         cwd=str(ROOT), preexec_fn=functools.partial(netns.enter, ns))
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        p.kill()
        p.wait()
        path.unlink()


def policy(peer, groups) -> dict:
    return {
        "user_groups": [{"name": groups["dev"]}, {"name": groups["ops"]}],
        "rules": [
            {"name": "dns", "sources": [groups["dev"], groups["ops"]],
             "destinations": [f"{peer.v4}/32", f"{peer.v6}/128"],
             "services": ["53/udp", "53/tcp"]},
            {"name": "web-by-name", "sources": [groups["dev"]],
             "destinations": ["dns:allowed.test", "dns:*.wild.test", "dns:chain.test",
                              "dns:v6.test", "dns:multi.test", "dns:short.test",
                              "dns:tcp.test", "dns:later.test", "dns:silent.test",
                              "dns:*.race.test", "dns:after-kill.test"],
             "services": [f"{PORT}/tcp"]},
        ],
    }


@pytest.fixture(scope="module")
def world(tools, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dns")
    workdir.chmod(0o755)
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(lab.peer([PORT, OTHER_PORT]))
        block = stack.enter_context(routed_block(peer))
        w = Lab(peer, block)
        names = {}
        zone = {}
        for name in ("allowed.test", "other.test", "a.b.wild.test", "wild.test", "short.test",
                     "tcp.test", "later.test", "after-kill.test", "sudo.wild.test",
                     "bob.wild.test", "edge.cdn.test"):
            names[name] = w.addr()
            zone[name] = {"A": [names[name]], "ttl": 1 if name == "short.test" else 60}
        zone["chain.test"] = {"CNAME": "edge.cdn.test", "ttl": 60}
        names["multi.test"] = [w.addr() for _ in range(3)]
        zone["multi.test"] = {"A": names["multi.test"], "ttl": 60}
        zone["v6.test"] = {"AAAA": [peer.v6], "ttl": 60}
        zone["silent.test"] = {"A": [w.addr()], "silent": True}
        for i in range(RACE):
            zone[f"{i}.race.test"] = {"A": [w.addr()], "ttl": 60}
        stack.enter_context(dns_server(peer.ns, peer.v4, zone, workdir))
        stack.enter_context(dns_server(peer.ns, peer.v6, zone, workdir))
        cg = stack.enter_context(lab.cgroup())
        users, groups = stack.enter_context(lab.users({"alice": ["dev"], "bob": ["ops"]}))
        d = stack.enter_context(lab.ausd(cg, policy(peer, groups), dns_grace=GRACE,
                                         dns_timeout=1.0, metrics_interval=1.0,
                                         metrics_textfile=str(workdir / "ausd.prom")))
        d.start()
        for u in users.values():
            stack.enter_context(lab.session(d, u.uid, u.uid, u.gid))
        yield {"metrics": workdir / "ausd.prom", "lab": w, "peer": peer, "names": names, "zone": zone, "cg": cg,
               "users": users, "groups": groups, "d": d}


def client(world, user, *args, uid=None) -> dict:
    u = world["users"][user]
    p = lab.spawn([lab.PYTHON, str(DNS_CLIENT), *map(str, args)], cg=world["cg"],
                  loginuid=u.uid, uid=u.uid if uid is None else uid, gid=u.gid,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  cwd=str(ROOT))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return json.loads(out)


def resolve_connect(world, user, name, *flags, port=PORT, resolver=None, uid=None) -> dict:
    return client(world, user, "resolve-connect", resolver or world["peer"].v4, name, 1, port,
                  *flags, uid=uid)


def connect(world, user, addr, port=PORT) -> str | None:
    u = world["users"][user]
    got = lab.act(world["cg"], "tcp", addr, port, loginuid=u.uid, uid=u.uid, gid=u.gid)
    return None if got["ok"] else got["errno"]


def test_a_name_allows_its_answer_and_nothing_else(world):
    a = world["names"]["allowed.test"]
    assert connect(world, "alice", a) == "EPERM"          # before any answer
    got = resolve_connect(world, "alice", "allowed.test")
    assert got["connected"] == 1, got
    assert connect(world, "alice", a) is None
    assert connect(world, "alice", a, OTHER_PORT) == "EPERM"       # not the rule's service
    assert connect(world, "alice", world["names"]["other.test"]) == "EPERM"   # another address
    d = world["d"]
    ck = d.check(world["users"]["alice"].uid, a, "tcp", PORT)
    assert ck["allowed"] and ck["reason"] == "dns" and ck["rule"] == "web-by-name", ck
    flows = [json.loads(line) for line in d.ctl("flows", "--json").stdout.splitlines()]
    named = [f for f in flows if f["dst"] == a and f.get("dns_name")]
    assert named and named[-1]["dns_name"] == "allowed.test", flows[-5:]
    records = d.ctl_json("flows", "--records")["records"]
    mine = [r for r in records if r["dst"] == a and r["verdict"] == "allowed"]
    assert mine and mine[-1]["dns_name"] == "allowed.test", records[-5:]
    st = d.ctl_json("status")["dns"]
    assert st["enabled"] and st["entries"] >= 1 and st["forwarder"]["queries"] >= 1, st


def test_metrics_count_the_forwarder_and_the_entries(world):
    resolve_connect(world, "alice", "allowed.test")
    deadline = time.monotonic() + 10
    while True:
        text = world["metrics"].read_text() if world["metrics"].exists() else ""
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in text.splitlines() if line.startswith("ausd_dns")}
        if values.get('ausd_dns_forwarder_total{kind="queries"}', 0) >= 2 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert values.get("ausd_dns_redirecting") == 1, text
    assert values.get("ausd_dns_entries", 0) >= 1, text
    assert values.get('ausd_dns_forwarder_total{kind="queries"}', 0) >= 2, text


def test_a_name_no_rule_names_is_resolved_and_allows_nothing(world):
    got = resolve_connect(world, "alice", "other.test")
    assert got["resolved"] == 1 and got["connected"] == 0, got
    assert got["failures"][0]["errno"] == "EPERM"


def test_the_first_connect_right_after_each_answer_is_allowed(world):
    got = client(world, "alice", "resolve-connect", world["peer"].v4, "{i}.race.test",
                 RACE, PORT)
    assert got["resolved"] == RACE, got
    assert got["connected"] == RACE, got["failures"]


def test_wildcard_matches_below_the_suffix_and_not_the_suffix(world):
    assert resolve_connect(world, "alice", "a.b.wild.test")["connected"] == 1
    got = resolve_connect(world, "alice", "wild.test")
    assert got["resolved"] == 1 and got["connected"] == 0, got


def test_a_cname_chain_is_followed_inside_the_answer(world):
    got = resolve_connect(world, "alice", "chain.test")
    assert got["resolved"] == 1 and got["connected"] == 1, got
    assert connect(world, "alice", world["names"]["edge.cdn.test"]) is None


def test_aaaa_answers_allow_ipv6(world):
    peer = world["peer"]
    got = resolve_connect(world, "alice", "v6.test", "aaaa", resolver=peer.v6)
    assert got["resolved"] == 1 and got["connected"] == 1, got


def test_dns_over_tcp(world):
    got = resolve_connect(world, "alice", "tcp.test", "tcp")
    assert got["resolved"] == 1 and got["connected"] == 1, got


def test_every_address_of_an_answer_is_allowed(world):
    got = resolve_connect(world, "alice", "multi.test")
    assert got["addresses"] == 3 and got["connected"] == 1, got


def test_a_user_outside_the_rule_resolves_and_is_denied(world):
    got = resolve_connect(world, "bob", "bob.wild.test")
    assert got["resolved"] == 1 and got["connected"] == 0, got
    assert got["failures"][0]["errno"] == "EPERM"


def test_sudo_keeps_the_users_names(world):
    got = resolve_connect(world, "alice", "sudo.wild.test", uid=0)   # root, alice's login UID
    assert got["connected"] == 1, got
    assert connect(world, "alice", world["names"]["sudo.wild.test"]) is None


def test_an_answer_expires_after_ttl_and_grace_but_an_open_connection_stays(world):
    u = world["users"]["alice"]
    p = lab.spawn([lab.PYTHON, str(DNS_CLIENT), "hold", world["peer"].v4, "short.test", str(PORT)],
                  cg=world["cg"], loginuid=u.uid, uid=u.uid, gid=u.gid, stdin=subprocess.PIPE,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        first = json.loads(p.stdout.readline())
        assert first["connected"] == world["names"]["short.test"], first
        time.sleep(1 + GRACE + 1.5)   # TTL 1 s + grace, and an expiry pass
        assert connect(world, "alice", world["names"]["short.test"]) == "EPERM"
        p.stdin.write("still there\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline())["echo"] == "still there\n"
    finally:
        p.kill()
        p.wait()


def test_a_resolver_that_does_not_answer_allows_nothing(world):
    got = resolve_connect(world, "alice", "silent.test")
    assert got["resolved"] == 0 and got["connected"] == 0, got


def test_a_name_that_stops_matching_after_a_policy_change(world):
    d, peer, groups = world["d"], world["peer"], world["groups"]
    a = world["names"]["later.test"]
    assert resolve_connect(world, "alice", "later.test")["connected"] == 1
    changed = policy(peer, groups)
    changed["rules"][1]["destinations"].remove("dns:later.test")
    d.write_policy(changed)
    d.ctl("reload")
    assert connect(world, "alice", a) == "EPERM"
    assert connect(world, "alice", world["names"]["allowed.test"]) is None   # others stay
    d.write_policy(policy(peer, groups))
    d.ctl("reload")


def test_forwarder_down_names_fail_closed_and_dns_still_resolves(world):
    """Last: ausd is stopped (SIGKILL: no clean-up of its own)."""
    d = world["d"]
    before = world["names"]["allowed.test"]
    d.stop(signal.SIGKILL)
    got = resolve_connect(world, "alice", "after-kill.test")
    assert got["resolved"] == 1, got                      # DNS goes to the resolver itself
    assert got["connected"] == 0 and got["failures"][0]["errno"] == "EPERM", got
    assert connect(world, "alice", before) is None        # entries in the kernel stay
