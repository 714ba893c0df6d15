"""Apply a :class:`~aus.core.state.Plan` to the pinned maps, and read the maps
back into a :class:`~aus.core.state.KernelState`. The thin layer between the
pure core and the kernel; the order of operations is the plan's."""

from __future__ import annotations

import ctypes
import socket
import struct

from ..core import contract as C
from ..core.compiler import SvcEntry
from ..core.state import ConfigValues, KernelState, Plan, UserEntry
from .bpfsys import Map


def _u32(v: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(v)


def dst_key(ruleset: int, addr: bytes, plen128: int) -> C.DstKey:
    k = C.DstKey()
    k.prefixlen = C.DST_ID_BITS + plen128
    k.ruleset = ruleset
    k.family = C.family_of16(addr, plen128)
    ctypes.memmove(k.addr, addr, 16)
    return k


def svc_key(portset: int, proto: int, port: int, plen: int) -> C.SvcKey:
    k = C.SvcKey()
    k.prefixlen = plen
    k.portset = portset
    k.proto = proto
    k.pad = 0
    k.port = socket.htons(port)
    return k


# The same keys and values packed as bytes, for batch writes (native byte
# order, no padding: the ctypes structures' layout; the port in network order).
_DST_KEY = struct.Struct("=III16s")
_SVC_KEY = struct.Struct("=IIBBH")
_U32 = struct.Struct("=I")
assert _DST_KEY.size == ctypes.sizeof(C.DstKey) and _SVC_KEY.size == ctypes.sizeof(C.SvcKey)


def _put_svc(svc: Map, ops) -> None:
    keys = b"".join([_SVC_KEY.pack(e.plen, op.portset, e.proto, 0, socket.htons(e.port))
                     for op in ops for e in (op.entry,)])
    svc.update_batch(keys, b"".join([_U32.pack(op.entry.rule) for op in ops]), len(ops))


def _put_dst(dst: Map, ops) -> None:
    bits = C.DST_ID_BITS
    keys = b"".join([_DST_KEY.pack(bits + op.plen, op.ruleset, C.family_of16(op.addr, op.plen),
                                   op.addr) for op in ops])
    dst.update_batch(keys, b"".join([_U32.pack(op.portset) for op in ops]), len(ops))


def _del_svc(svc: Map, ops) -> None:
    keys = b"".join([_SVC_KEY.pack(e.plen, op.portset, e.proto, 0, socket.htons(e.port))
                     for op in ops for e in (op.entry,)])
    svc.delete_batch(keys, len(ops))


def _del_dst(dst: Map, ops) -> None:
    bits = C.DST_ID_BITS
    keys = b"".join([_DST_KEY.pack(bits + op.plen, op.ruleset, C.family_of16(op.addr, op.plen),
                                   op.addr) for op in ops])
    dst.delete_batch(keys, len(ops))


def config_struct(cfg: ConfigValues) -> C.Config:
    return C.Config(cfg.mode, cfg.baseline_ruleset, cfg.events_per_sec,
                    cfg.events_burst, cfg.ruleset_seq, cfg.portset_seq,
                    cfg.policy_version, cfg.users_gen, 0)


def apply(plan: Plan, maps: dict[str, Map]) -> None:
    svc, dst = maps[C.MAP_SVC], maps[C.MAP_DST]
    users, rules = maps[C.MAP_USERS], maps[C.MAP_RULES]
    # A new ruleset can hold 10,000 entries: written in one call per map.
    _put_svc(svc, plan.svc_put)
    _put_dst(dst, plan.dst_put)
    for op in plan.rules_put:
        # A new name for an id: its counters start from zero.
        maps[C.MAP_RULE_STATS].update(_u32(op.rule), C.Counters())
        rules.update(_u32(op.rule), C.RuleInfo(op.name.encode()[:C.RULE_NAME_LEN - 1]))
    for slot in plan.stats_reset:
        maps[C.MAP_USER_STATS].update(_u32(slot), C.Counters())
    for uid, user in plan.users_put:
        users.update(_u32(uid), C.User(user.ruleset, user.flags, user.slot))
    for uid in plan.users_del:
        users.delete(_u32(uid))
    if plan.config_put is not None:
        maps[C.MAP_CONFIG].update(_u32(0), config_struct(plan.config_put))
    _del_dst(dst, plan.dst_del)
    _del_svc(svc, plan.svc_del)
    for rid in plan.rules_del:
        rules.delete(_u32(rid))


def read_state(maps: dict[str, Map]) -> KernelState:
    """Rebuild the model of the maps from their contents (adoption)."""
    st = KernelState()
    raw = maps[C.MAP_CONFIG].lookup(_u32(0))
    if raw is not None and raw.ruleset_seq:
        st.config = ConfigValues(raw.mode, raw.baseline_ruleset, raw.events_per_sec,
                                 raw.events_burst, raw.ruleset_seq, raw.portset_seq,
                                 raw.policy_version, raw.users_gen)
    for k, v in maps[C.MAP_USERS].items():
        st.users[k.value] = UserEntry(v.ruleset, v.flags, v.slot)
    for k, v in maps[C.MAP_DST].items():
        st.rulesets.setdefault(k.ruleset, {})[
            (bytes(k.addr), k.prefixlen - C.DST_ID_BITS)] = v.portset
    portsets: dict[int, set[SvcEntry]] = {}
    for k, v in maps[C.MAP_SVC].items():
        portsets.setdefault(k.portset, set()).add(
            SvcEntry(k.proto, socket.ntohs(k.port), k.prefixlen, v.rule))
    st.portsets = {pid: frozenset(s) for pid, s in portsets.items()}
    for k, v in maps[C.MAP_RULES].items():
        st.rules[k.value] = v.name.decode(errors="replace")
    return st
