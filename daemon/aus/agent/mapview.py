"""Decoded views of the pinned maps: counters, a full dump, and ``check``.

Everything here reads maps opened by :mod:`.pins` (the maps the programs
read), so it works while ausd is down, and :func:`check` takes its verdict
from the same lookups the kernel makes (an LPM lookup from user space is
the kernel's own longest-prefix match).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time

from ..core import contract as C
from .mapsync import dst_key, svc_key

COUNTER_FIELDS = ["allowed_packets", "allowed_bytes", "denied_packets", "denied_bytes"]
PROTOS = {"tcp": C.PROTO_TCP, "udp": C.PROTO_UDP, "icmp": C.PROTO_ICMP,
          "icmpv6": C.PROTO_ICMPV6}


def _sum(values, fields: list[str]) -> dict[str, int]:
    """A per-CPU value summed over the CPUs, field by field."""
    return {f: sum(getattr(v, f) for v in values) for f in fields}


def config(maps) -> dict:
    c = maps[C.MAP_CONFIG].lookup(ctypes.c_uint32(0))
    mode = {v: k for k, v in C.MODES.items()}.get(c.mode, str(c.mode))
    return {"mode": mode, "baseline_ruleset": c.baseline_ruleset,
            "events_per_sec": c.events_per_sec, "events_burst": c.events_burst,
            "policy_version": c.policy_version}


def user_counters(maps) -> dict[int, dict[str, int]]:
    """Counters per login UID in aus_users (through its stats slot), plus
    slot 0 under LOGINUID_UNSET: managed users not in the map yet."""
    stats = maps[C.MAP_USER_STATS]
    out = {}
    slots = {k.value: v.slot for k, v in maps[C.MAP_USERS].items()
             if not v.flags & C.USER_UNMANAGED}
    slots[C.LOGINUID_UNSET] = 0
    for uid, slot in slots.items():
        v = stats.lookup(ctypes.c_uint32(slot))
        if v is not None:
            out[uid] = _sum(v, COUNTER_FIELDS)
    return out


def rule_counters(maps, rule_ids) -> dict[int, dict[str, int]]:
    out = {}
    m = maps[C.MAP_RULE_STATS]
    for rid in rule_ids:
        v = m.lookup(ctypes.c_uint32(rid))
        if v is not None:
            out[rid] = _sum(v, COUNTER_FIELDS)
    return out


def reason_counters(maps) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    m = maps[C.MAP_REASONS]
    for hook in C.Hook:
        row = {}
        for reason in C.Reason:
            v = m.lookup(ctypes.c_uint32(hook * C.REASON_MAX + reason))
            n = sum(x.value for x in v) if v else 0
            if n:
                row[reason.name.lower()] = n
        out[hook.name.lower()] = row
    return out


def event_stats(maps) -> dict[str, int]:
    m = maps[C.MAP_STATS]
    return {s.name.lower(): sum(x.value for x in m.lookup(ctypes.c_uint32(s)) or [])
            for s in C.Stat}


def rule_names(maps) -> dict[int, str]:
    return {k.value: v.name.decode(errors="replace") for k, v in maps[C.MAP_RULES].items()}


def _ports(e_port: int, plen: int) -> str:
    if plen == C.SVC_ANY_PREFIX or plen == C.SVC_PROTO_PREFIX:
        return "*"
    size = 1 << (16 - (plen - C.SVC_PROTO_PREFIX))
    return str(e_port) if size == 1 else f"{e_port}-{e_port + size - 1}"


def dump(maps) -> dict:
    """Every map, decoded; the stable shape of ``ausctl maps --json``."""
    names = rule_names(maps)
    users = [{"login_uid": k.value, "ruleset": v.ruleset, "slot": v.slot,
              "unmanaged": bool(v.flags & C.USER_UNMANAGED)}
             for k, v in maps[C.MAP_USERS].items()]
    dst = []
    for k, v in maps[C.MAP_DST].items():
        net = C.network_from16(bytes(k.addr), k.prefixlen - C.DST_ID_BITS)
        dst.append({"ruleset": k.ruleset, "destination": str(net), "portset": v.portset})
    svc = []
    for k, v in maps[C.MAP_SVC].items():
        proto = "any" if k.prefixlen == C.SVC_ANY_PREFIX else C.PROTO_NAMES.get(k.proto, str(k.proto))
        svc.append({"portset": k.portset, "proto": proto,
                    "ports": _ports(socket.ntohs(k.port), k.prefixlen),
                    "rule_id": v.rule, "rule": names.get(v.rule)})
    now = time.monotonic_ns()
    dns = [{"login_uid": k.loginuid, "address": str(C.addr_from16(bytes(k.addr))),
            "portset": v.portset, "rule_id": v.rule, "rule": names.get(v.rule),
            "expires_in": round((v.expires_ns - now) / 1e9, 3)}
           for k, v in maps[C.MAP_DNS].items()] if C.MAP_DNS in maps else []
    counters = user_counters(maps)
    return {
        "config": config(maps),
        "users": sorted(users, key=lambda u: u["login_uid"]),
        "destinations": sorted(dst, key=lambda d: (d["ruleset"], d["destination"])),
        "services": sorted(svc, key=lambda s: (s["portset"], s["proto"], s["ports"])),
        "rules": [{"id": k, "name": v} for k, v in sorted(names.items())],
        # addresses DNS answers gave users; expires_in < 0: expired, only
        # connections opened before still use it
        "dns": sorted(dns, key=lambda e: (e["login_uid"], e["address"])),
        "user_counters": [{"login_uid": None if k == C.LOGINUID_UNSET else k, **v}
                          for k, v in sorted(counters.items())],
        "rule_counters": [{"rule_id": k, "rule": names.get(k), **v}
                          for k, v in sorted(rule_counters(maps, [0, *names]).items())],
        "reasons": reason_counters(maps),
        "events": event_stats(maps),
    }


def check(maps, login_uid: int, addr: str, proto: str, port: int) -> dict:
    """The kernel's verdict for a connection, by the kernel's own lookups."""
    ip = ipaddress.ip_address(addr)
    pnum = PROTOS[proto]
    if pnum == C.PROTO_ICMP and ip.version == 6:
        pnum = C.PROTO_ICMPV6
    if pnum in (C.PROTO_ICMP, C.PROTO_ICMPV6):
        port = 0
    cfg = config(maps)
    out = {"login_uid": login_uid, "to": str(ip), "proto": proto, "port": port,
           "mode": cfg["mode"], "ruleset": None, "rule_id": None, "rule": None}

    def verdict(allowed: bool, reason: C.Reason) -> dict:
        out["allowed"] = allowed
        out["verdict"] = "allow" if allowed else (
            "deny" if cfg["mode"] == "enforce" else "audit")
        out["reason"] = reason.name.lower()
        return out

    if login_uid == C.LOGINUID_UNSET:
        return verdict(True, C.Reason.UNMANAGED)
    user = maps[C.MAP_USERS].lookup(ctypes.c_uint32(login_uid))
    if user is not None and user.flags & C.USER_UNMANAGED:
        return verdict(True, C.Reason.UNMANAGED)
    ruleset = user.ruleset if user is not None else cfg["baseline_ruleset"]
    out["ruleset"] = ruleset
    miss = C.Reason.NO_RULE if user is not None else C.Reason.PENDING
    reason = C.Reason.RULE
    dv = maps[C.MAP_DST].lookup(dst_key(ruleset, C.addr16(ip), 128))
    sv = None if dv is None else maps[C.MAP_SVC].lookup(
        svc_key(dv.portset, pnum, port, C.SVC_FULL_PREFIX))
    if sv is None:
        # What a DNS answer allowed this user there, as aus_lookup() sees it.
        reason = C.Reason.DNS
        sv = _dns_service(maps, login_uid, ip, pnum, port)
    if sv is None:
        return verdict(False, miss)
    out["rule_id"] = sv.rule
    out["rule"] = rule_names(maps).get(sv.rule)
    return verdict(True, reason)


def _dns_service(maps, login_uid: int, ip, pnum: int, port: int):
    key = C.DnsKey(login_uid, ip.version)
    ctypes.memmove(key.addr, C.addr16(ip), 16)
    v = maps[C.MAP_DNS].lookup(key) if C.MAP_DNS in maps else None
    if v is None or v.expires_ns <= time.monotonic_ns():
        return None
    return maps[C.MAP_SVC].lookup(svc_key(v.portset, pnum, port, C.SVC_FULL_PREFIX))
