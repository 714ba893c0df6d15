"""Python mirror of ``bpf/aus.h``, the kernel/user contract.

This is the only module that knows the layout of the maps' keys and values.
tests/kernel/test_contract.py compiles the C with bcc and compares every
struct here (size and field offsets) and every constant with what clang
built, so the two sides cannot drift apart.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress

ABI_VERSION = 1
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


REASON_MAX = 8


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
DST_FULL_PREFIX = 64 + 128
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
ALL_MAPS = (MAP_CONFIG, MAP_USERS, MAP_DST, MAP_SVC, MAP_USER_STATS,
            MAP_RULE_STATS, MAP_REASONS, MAP_STATS, MAP_RULES,
            MAP_RATELIMIT, MAP_SOCK, MAP_EVENTS)


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
        ("pad", ctypes.c_uint8 * 2),
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
