"""aus_host, the hash of single-address destinations that spares a
decision the LPM trie's walk, holds exactly the full-length entries of
aus_dst, through a policy change that removes one, and a destination
given as a wider prefix is still found through the trie. Real ausd, real
programs, real connections into the lab's namespace."""

from __future__ import annotations

import ipaddress

import pytest

from aus.agent import pins
from aus.core import contract as C
from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel


def entries(d: lab.Ausd) -> tuple[set, set]:
    """(full-length aus_dst entries, aus_host entries) as (ruleset, address, portset)."""
    with pins.pinned_maps(d.pin_dir) as maps:
        full = {(k.ruleset, bytes(k.addr), v.portset) for k, v in maps[C.MAP_DST].items()
                if k.prefixlen == C.DST_FULL_PREFIX}
        host = {(k.ruleset, bytes(k.addr), v.portset) for k, v in maps[C.MAP_HOST].items()}
    return full, host


def policy(peer, groups, *, with_v4: bool) -> dict:
    p = lab_policy(peer, groups)
    v6_prefix = ipaddress.ip_network(f"{peer.v6}/64", strict=False)
    p["ip_lists"]["lab"] = ([f"{peer.v4}/32"] if with_v4 else []) + [str(v6_prefix)]
    return p


def test_host_entries_mirror_the_tries_single_addresses(cg, peer, people):
    users, groups = people
    alice = users["alice"]

    def tcp(to, port):
        return lab.act(cg, "tcp", to, port, loginuid=alice.uid, uid=alice.uid, gid=alice.gid)

    with lab.ausd(cg, policy(peer, groups, with_v4=True)) as d:
        d.start()
        with lab.session(d, alice.uid):
            full, host = entries(d)
            v4 = C.addr16(ipaddress.ip_address(peer.v4))
            assert host == full and any(addr == v4 for _r, addr, _p in host), (full, host)
            # the /32 from the hash, the address inside the /64 from the trie
            for to in (peer.v4, peer.v6):
                assert tcp(to, 80)["ok"], to
                assert tcp(to, 443) == {"ok": False, "errno": "EPERM"}, to
            d.write_policy(policy(peer, groups, with_v4=False))
            d.ctl("reload")
            full, host = entries(d)
            assert host == full and not any(addr == v4 for _r, addr, _p in host), (full, host)
            assert tcp(peer.v4, 80) == {"ok": False, "errno": "EPERM"}
            assert tcp(peer.v6, 80)["ok"]
