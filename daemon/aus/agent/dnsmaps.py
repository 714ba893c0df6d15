"""The kernel side of DNS-name destinations: the only code that touches
aus_dns, aus_dns_origin and aus_dns_conf (see bpf/aus.h).

- ``aus_dns`` holds, per login UID and address, the services that DNS
  answers released to that user allow there, until ``expires_ns``
  (CLOCK_MONOTONIC, the clock of :func:`time.monotonic_ns`).
- ``aus_dns_origin`` says, for a client address and port the forwarder
  sees, whose query it is and which resolver the application chose.
- ``aus_dns_conf`` holds the forwarder's port and network namespace (0:
  nothing is redirected) and the DNS generation: :meth:`DnsMaps.put` bumps
  it, so a socket that cached a deny for an address looks again.

One :class:`DnsMaps` per daemon: writes to aus_dns_conf read, change and
write the whole value, serialized by a lock.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from ..core import contract as C
from .bpfsys import Map

# Not in Python 3.11's socket module (Linux 5.14+, asm-generic/socket.h).
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)

# Keys and values packed for batch writes: native order, the ctypes
# mirrors' layout (no padding in either).
_KEY = struct.Struct("=II16s")
_VALUE = struct.Struct("=QII")
assert _KEY.size == ctypes.sizeof(C.DnsKey) and _VALUE.size == ctypes.sizeof(C.DnsVal)


class DnsKey(NamedTuple):
    loginuid: int
    family: int       # 4 or 6
    addr: bytes       # 16 bytes, v4-mapped for IPv4


class DnsValue(NamedTuple):
    expires_ns: int   # time.monotonic_ns() deadline
    portset: int      # an aus_svc portset id
    rule: int         # reported in flow events and counted


class DnsOrigin(NamedTuple):
    loginuid: int
    family: int       # 4 or 6
    addr: bytes       # the resolver the application chose, 16 bytes
    port: int         # its port, host order


def netns_cookie(sock: socket.socket | None = None) -> int:
    """The network namespace cookie of ``sock`` (default: this process's
    namespace), as the programs see it with bpf_get_netns_cookie()."""
    if sock is not None:
        return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return netns_cookie(s)


def _addr16(addr: bytes) -> bytes:
    if len(addr) == 4:
        return b"\x00" * 10 + b"\xff\xff" + bytes(addr)
    if len(addr) != 16:
        raise ValueError(f"an address is 4 or 16 bytes, not {len(addr)}")
    return bytes(addr)


def _pack_key(key: DnsKey) -> bytes:
    if key.family not in (4, 6):
        raise ValueError(f"DNS entry family must be 4 or 6, got {key.family}")
    if len(key.addr) != 16:
        raise ValueError(f"DNS entry address must be 16 bytes (v4-mapped for IPv4), "
                         f"got {len(key.addr)}")
    return _KEY.pack(key.loginuid, key.family, bytes(key.addr))


class DnsMaps:
    """The DNS maps among ``maps`` (what the loader opened, by name)."""

    def __init__(self, maps: Mapping[str, Map]):
        self._dns = maps[C.MAP_DNS]
        self._origin = maps[C.MAP_DNS_ORIGIN]
        self._conf = maps[C.MAP_DNS_CONF]
        self._lock = threading.Lock()

    def put(self, entries: Mapping[DnsKey, DnsValue]) -> None:
        """Write (or refresh) entries in one system call, then bump the DNS
        generation so that sockets that cached a deny look again. A full map
        raises BpfError (E2BIG); what was written before it stays, visible."""
        if not entries:
            return
        keys = b"".join([_pack_key(k) for k in entries])
        values = b"".join([_VALUE.pack(v.expires_ns, v.portset, v.rule)
                           for v in entries.values()])
        try:
            self._dns.update_batch(keys, values, len(entries))
        finally:
            self._bump()

    def delete(self, keys: Iterable[DnsKey]) -> None:
        """Remove entries (absent ones pass). Open connections they allowed
        keep going: a deletion only stops new ones."""
        packed = [_pack_key(k) for k in keys]
        self._dns.delete_batch(b"".join(packed), len(packed))

    def entries(self) -> dict[DnsKey, DnsValue]:
        return {DnsKey(k.loginuid, k.family, bytes(k.addr)):
                DnsValue(v.expires_ns, v.portset, v.rule)
                for k, v in self._dns.items()}

    def origin(self, addr: bytes, port: int, proto: int) -> DnsOrigin | None:
        """Whose query comes from ``addr``:``port`` (the client as the
        forwarder sees it; 16 bytes v4-mapped, or 4 for IPv4) over
        ``proto`` (C.PROTO_UDP or C.PROTO_TCP), and where it was going."""
        key = C.DnsClient()
        ctypes.memmove(key.addr, _addr16(addr), 16)
        key.port = port
        key.proto = proto
        v = self._origin.lookup(key)
        if v is None:
            return None
        return DnsOrigin(v.loginuid, v.family, bytes(v.addr), v.port)

    def set_forwarder(self, port: int, netns_cookie: int) -> None:
        """Redirect managed users' DNS to 127.0.0.1/::1 ``port`` in the
        namespace ``netns_cookie`` (while a socket listens there); port 0
        stops redirecting."""
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"forwarder port must be 0..65535, got {port}")
        with self._lock:
            cur = self._read()
            self._conf.update(ctypes.c_uint32(0),
                              C.DnsConf(port, 0, cur.gen, netns_cookie if port else 0))

    def forwarder(self) -> tuple[int, int]:
        """(port, netns cookie) as the programs see them."""
        cur = self._read()
        return cur.port, cur.netns_cookie

    def generation(self) -> int:
        return self._read().gen

    def _read(self) -> C.DnsConf:
        cur = self._conf.lookup(ctypes.c_uint32(0))
        return cur if cur is not None else C.DnsConf()

    def _bump(self) -> None:
        with self._lock:
            cur = self._read()
            cur.gen = (cur.gen + 1) & 0xFFFFFFFF
            self._conf.update(ctypes.c_uint32(0), cur)
