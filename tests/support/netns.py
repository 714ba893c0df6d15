"""Network namespaces and veth links for tests and benchmarks, made over
netlink with pyroute2 (no `ip` processes), each removed by whoever made it,
also when a later step fails.

    namespace(prefix)          a named namespace, like `ip netns add`
    veth(host_if, peer_if, ns) a veth pair, one end here and one in ``ns``
    up(ifname, addrs, ns=...)  addresses on a link, then the link up
    enter(ns)                  join ``ns`` (for a child's preexec_fn)

Processes are placed in a namespace by setns(2) between fork and exec
(``enter``), together with their cgroup and login UID in the same
preexec_fn, so nothing else (`ip netns exec`, a proxy process) sits
between the test and the process it watches.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from .names import unique

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)   # loaded here, never after a fork


@contextlib.contextmanager
def namespace(prefix: str):
    """A new network namespace named ``prefix`` + random digits, bound
    under /run/netns as `ip netns add` does; yields its name, removed
    afterwards (its links go with it once no process holds it)."""
    name = unique(prefix)
    try:
        pyroute2_netns.create(name)
        yield name
    finally:
        with contextlib.suppress(FileNotFoundError):
            pyroute2_netns.remove(name)


def _ipr(ns: str | None) -> IPRoute:
    # flags=0: open an existing namespace, never create one by a typo
    return IPRoute() if ns is None else IPRoute(netns=ns, flags=0)


@contextlib.contextmanager
def veth(host_if: str, peer_if: str, ns: str):
    """A veth pair: ``host_if`` in this namespace, ``peer_if`` created
    directly in ``ns``. The host end is deleted afterwards (the peer end
    goes with it), also when the caller's set-up failed half-way."""
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth",
                     peer={"ifname": peer_if, "net_ns_fd": ns})
        yield
    finally:
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=index)


def up(ifname: str, addrs: tuple[str, ...] | list[str] = (), *, ns: str | None = None) -> None:
    """Add ``addrs`` ("ADDR/PREFIXLEN") to link ``ifname`` (in ``ns``, or
    here), then set it up. IPv6 addresses skip duplicate address detection
    (nodad): usable at once, with nothing else on the link to clash with."""
    with _ipr(ns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no link {ifname} in namespace {ns or '(this one)'}")
        index = found[0]
        for addr in addrs:
            address, _, prefixlen = addr.partition("/")
            v6 = ":" in address
            ipr.addr("add", index=index, address=address,
                     prefixlen=int(prefixlen or (128 if v6 else 32)),
                     **({"flags": IFA_F_NODAD} if v6 else {}))
        ipr.link("set", index=index, state="up")


def addresses() -> set[str]:
    """Every address ("ADDR/PREFIXLEN") on a link in this namespace."""
    with IPRoute() as ipr:
        return {f"{a.get('address')}/{a['prefixlen']}" for a in ipr.addr("dump")}


def enter(ns: str) -> None:
    """Move the calling process into network namespace ``ns`` with
    setns(2); meant for a child between fork and exec (preexec_fn)."""
    fd = os.open(f"{NETNS_RUN_DIR}/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)
