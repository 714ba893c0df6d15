"""Python mirror of ``bpf/aus.h``, the kernel/user contract.

This is the only module that knows the layout of the maps' keys and values,
their map types, and which program goes on which cgroup hook.
tests/kernel/test_contract.py compiles the C with bcc and compares every
struct here (size and field offsets), every constant, and every pinned
map's type and key/value sizes with what clang and the kernel built, so
the two sides cannot drift apart.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
from dataclasses import dataclass

ABI_VERSION = 3
LOGINUID_UNSET = 0xFFFFFFFF

DROP = 0
PASS = 1

MODE_ENFORCE = 0
MODE_VISIBILITY = 1
MODES = {"enforce": MODE_ENFORCE, "visibility": MODE_VISIBILITY}


class Reason(enum.IntEnum):
    NONE = 0
    RULE = 1
    UNMANAGED = 2
    NO_RULE = 3
    PENDING = 4
    INBOUND = 5
    NO_SOCKET = 6
    NOT_IP = 7
    SOURCE_ROUTE = 8
    DNS = 9


REASON_MAX = 10


class Hook(enum.IntEnum):
    EGRESS = 0
    CONNECT4 = 1
    CONNECT6 = 2
    SENDMSG4 = 3
    SENDMSG6 = 4


HOOK_MAX = 5


class EventVerdict(enum.IntEnum):
    ALLOW = 0
    DENY = 1
    AUDIT = 2


RULE_NONE = 0
RULE_BASELINE = 1
RULESET_NONE = 0

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
DNS_PORT = 53
PROTO_NAMES = {PROTO_ANY: "any", PROTO_ICMP: "icmp", PROTO_TCP: "tcp",
               PROTO_UDP: "udp", PROTO_ICMPV6: "icmpv6"}

EVENTS_BYTES = 1 << 20
COMM_LEN = 16
RULE_NAME_LEN = 64

USER_UNMANAGED = 0x1
SOCK_OUTBOUND = 0x1
SOCK_LATE = 0x2


class Stat(enum.IntEnum):
    EVENTS_SENT = 0
    EVENTS_RATE_LIMITED = 1
    EVENTS_LOST = 2


STAT_MAX = 3
REASON_SLOTS = HOOK_MAX * REASON_MAX

# Prefix lengths of the LPM keys: the id in front is always matched whole.
DST_ID_BITS = 64              # ruleset + family
DST_FULL_PREFIX = DST_ID_BITS + 128
SVC_ANY_PREFIX = 32           # every protocol
SVC_PROTO_PREFIX = 48         # every port of one protocol (proto + pad)
SVC_FULL_PREFIX = 64

# Map names, as pinned under <pin_dir>/v<ABI_VERSION>/.
MAP_CONFIG = "aus_config"
MAP_USERS = "aus_users"
MAP_DST = "aus_dst"
MAP_SVC = "aus_svc"
MAP_USER_STATS = "aus_user_stats"
MAP_RULE_STATS = "aus_rule_stats"
MAP_REASONS = "aus_reasons"
MAP_STATS = "aus_stats"
MAP_RULES = "aus_rules"
MAP_RATELIMIT = "aus_ratelimit"
MAP_SOCK = "aus_sock"
MAP_EVENTS = "aus_events"
MAP_DNS_CONF = "aus_dns_conf"
MAP_DNS = "aus_dns"
MAP_DNS_ORIGIN = "aus_dns_origin"

MAX_DNS_ORIGINS = 65536


class Config(ctypes.Structure):
    _fields_ = [
        ("mode", ctypes.c_uint32),
        ("baseline_ruleset", ctypes.c_uint32),
        ("events_per_sec", ctypes.c_uint32),
        ("events_burst", ctypes.c_uint32),
        ("ruleset_seq", ctypes.c_uint32),
        ("portset_seq", ctypes.c_uint32),
        ("policy_version", ctypes.c_uint64),
        ("users_gen", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class User(ctypes.Structure):
    _fields_ = [("ruleset", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("slot", ctypes.c_uint32)]


class DstKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("ruleset", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class DstVal(ctypes.Structure):
    _fields_ = [("portset", ctypes.c_uint32)]


class SvcKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("portset", ctypes.c_uint32),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("port", ctypes.c_uint16),   # network byte order
    ]


class SvcVal(ctypes.Structure):
    _fields_ = [("rule", ctypes.c_uint32)]


class Counters(ctypes.Structure):
    _fields_ = [
        ("allowed_packets", ctypes.c_uint64),
        ("allowed_bytes", ctypes.c_uint64),
        ("denied_packets", ctypes.c_uint64),
        ("denied_bytes", ctypes.c_uint64),
    ]


class RuleInfo(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * RULE_NAME_LEN)]


class Bucket(ctypes.Structure):
    _fields_ = [("tokens_milli", ctypes.c_uint64), ("last_ns", ctypes.c_uint64)]


class Sock(ctypes.Structure):
    _fields_ = [
        ("loginuid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN),
        ("cache_gen", ctypes.c_uint32),
        ("cache_ruleset", ctypes.c_uint32),
        ("cache_slot", ctypes.c_uint32),
        ("cache_rule", ctypes.c_uint32),
        ("cache_addr", ctypes.c_uint8 * 16),
        ("cache_port", ctypes.c_uint16),
        ("cache_proto", ctypes.c_uint8),
        ("cache_allowed", ctypes.c_uint8),
        ("cache_reason", ctypes.c_uint8),
        ("cache_managed", ctypes.c_uint8),
        ("dns_family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("cache_dns_gen", ctypes.c_uint32),
        ("dns_addr", ctypes.c_uint8 * 16),
        ("dns_port", ctypes.c_uint16),   # network byte order
        ("pad2", ctypes.c_uint8 * 2),
    ]


class DnsConf(ctypes.Structure):
    _fields_ = [
        ("port", ctypes.c_uint16),       # host byte order; 0: no forwarder
        ("pad", ctypes.c_uint16),
        ("gen", ctypes.c_uint32),
        ("netns_cookie", ctypes.c_uint64),
    ]


class DnsKey(ctypes.Structure):
    _fields_ = [
        ("loginuid", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class DnsVal(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("portset", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
    ]


class DnsClient(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),       # host byte order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class DnsOrigin(ctypes.Structure):
    _fields_ = [
        ("loginuid", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),       # host byte order
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("loginuid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("bytes", ctypes.c_uint32),
        ("verdict", ctypes.c_uint8),
        ("reason", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


# bpf_map_type values (uapi/linux/bpf.h) of the maps below.
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
MAP_TYPE_LRU_HASH = 9
MAP_TYPE_LPM_TRIE = 11
MAP_TYPE_SK_STORAGE = 24
MAP_TYPE_RINGBUF = 27


@dataclass(frozen=True)
class MapSpec:
    """One pinned map: its name, key and value mirrors (None: not read
    through bpf(2) lookups), bpf_map_type, and whether each CPU has its
    own value."""
    name: str
    key: type | None
    value: type | None
    map_type: int

    @property
    def percpu(self) -> bool:
        return self.map_type == MAP_TYPE_PERCPU_ARRAY


MAPS = {m.name: m for m in (
    MapSpec(MAP_CONFIG, ctypes.c_uint32, Config, MAP_TYPE_ARRAY),
    MapSpec(MAP_USERS, ctypes.c_uint32, User, MAP_TYPE_HASH),
    MapSpec(MAP_DST, DstKey, DstVal, MAP_TYPE_LPM_TRIE),
    MapSpec(MAP_SVC, SvcKey, SvcVal, MAP_TYPE_LPM_TRIE),
    MapSpec(MAP_USER_STATS, ctypes.c_uint32, Counters, MAP_TYPE_PERCPU_ARRAY),
    MapSpec(MAP_RULE_STATS, ctypes.c_uint32, Counters, MAP_TYPE_PERCPU_ARRAY),
    MapSpec(MAP_REASONS, ctypes.c_uint32, ctypes.c_uint64, MAP_TYPE_PERCPU_ARRAY),
    MapSpec(MAP_STATS, ctypes.c_uint32, ctypes.c_uint64, MAP_TYPE_PERCPU_ARRAY),
    MapSpec(MAP_RULES, ctypes.c_uint32, RuleInfo, MAP_TYPE_HASH),
    MapSpec(MAP_RATELIMIT, ctypes.c_uint32, Bucket, MAP_TYPE_PERCPU_ARRAY),
    MapSpec(MAP_SOCK, ctypes.c_int, Sock, MAP_TYPE_SK_STORAGE),
    MapSpec(MAP_EVENTS, None, None, MAP_TYPE_RINGBUF),   # read as a ring of Event
    MapSpec(MAP_DNS_CONF, ctypes.c_uint32, DnsConf, MAP_TYPE_ARRAY),
    MapSpec(MAP_DNS, DnsKey, DnsVal, MAP_TYPE_HASH),
    MapSpec(MAP_DNS_ORIGIN, DnsClient, DnsOrigin, MAP_TYPE_LRU_HASH),
)}

# struct name in aus.h -> mirror, for the contract test.
STRUCTS = {
    "aus_config": Config,
    "aus_user": User,
    "aus_dst_key": DstKey,
    "aus_dst_val": DstVal,
    "aus_svc_key": SvcKey,
    "aus_svc_val": SvcVal,
    "aus_counters": Counters,
    "aus_rule_info": RuleInfo,
    "aus_bucket": Bucket,
    "aus_sock": Sock,
    "aus_event": Event,
    "aus_dns_conf": DnsConf,
    "aus_dns_key": DnsKey,
    "aus_dns_val": DnsVal,
    "aus_dns_client": DnsClient,
    "aus_dns_origin": DnsOrigin,
}


def addr16(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte form the maps use: IPv6 as is, IPv4 v4-mapped."""
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def addr_from16(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip6 = ipaddress.IPv6Address(bytes(raw))
    return ip6.ipv4_mapped or ip6


def family_of16(raw: bytes, plen128: int) -> int:
    """4 for a v4-mapped prefix at least /96 long, else 6."""
    return 4 if plen128 >= 96 and bytes(raw[:12]) == _V4_MAPPED else 6


_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def addr_prefixlen(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    """Prefix length of a network in the 128-bit address space of the maps."""
    return net.prefixlen + 96 if net.version == 4 else net.prefixlen


def network_from16(raw: bytes, plen128: int):
    """Inverse of (addr16, addr_prefixlen) for a stored prefix."""
    ip6 = ipaddress.IPv6Address(bytes(raw))
    if plen128 >= 96 and ip6.ipv4_mapped is not None:
        return ipaddress.IPv4Network((ip6.ipv4_mapped, plen128 - 96))
    return ipaddress.IPv6Network((ip6, plen128))


# The programs of aus.bpf.c and the cgroup hook each is attached to, in
# attach order: the per-packet backstop first, then what shows a redirected
# DNS socket its resolver (before anything redirects), identity last, so a
# first install never has a moment with sockets judged by a half set.
# ``link`` is the pin name of its link and program.
PROG_TYPE_CGROUP_SKB = 8
PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_CGROUP_SOCK_ADDR = 18

ATTACH_CGROUP_INET_EGRESS = 1
ATTACH_CGROUP_INET_SOCK_CREATE = 2
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP6_SENDMSG = 15
ATTACH_CGROUP_UDP4_RECVMSG = 19
ATTACH_CGROUP_UDP6_RECVMSG = 20
ATTACH_CGROUP_INET4_GETPEERNAME = 29
ATTACH_CGROUP_INET6_GETPEERNAME = 30


@dataclass(frozen=True)
class Program:
    link: str
    func: str
    prog_type: int
    attach_type: int


PROGRAMS = (
    Program("egress", "aus_egress", PROG_TYPE_CGROUP_SKB, ATTACH_CGROUP_INET_EGRESS),
    Program("recvmsg4", "aus_recvmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_RECVMSG),
    Program("recvmsg6", "aus_recvmsg6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP6_RECVMSG),
    Program("getpeername4", "aus_getpeername4", PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_CGROUP_INET4_GETPEERNAME),
    Program("getpeername6", "aus_getpeername6", PROG_TYPE_CGROUP_SOCK_ADDR,
            ATTACH_CGROUP_INET6_GETPEERNAME),
    Program("connect4", "aus_connect4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT),
    Program("connect6", "aus_connect6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET6_CONNECT),
    Program("sendmsg4", "aus_sendmsg4", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_SENDMSG),
    Program("sendmsg6", "aus_sendmsg6", PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP6_SENDMSG),
    Program("sock_create", "aus_sock_create", PROG_TYPE_CGROUP_SOCK,
            ATTACH_CGROUP_INET_SOCK_CREATE),
)
