"""Apply a :class:`~aus.core.state.Plan` to the pinned maps, and read the maps
back into a :class:`~aus.core.state.KernelState`. The thin layer between the
pure core and the kernel; the order of operations is the plan's."""

from __future__ import annotations

import ctypes
import socket

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


def config_struct(cfg: ConfigValues) -> C.Config:
    return C.Config(cfg.mode, cfg.baseline_ruleset, cfg.events_per_sec,
                    cfg.events_burst, cfg.ruleset_seq, cfg.portset_seq,
                    cfg.policy_version, cfg.users_gen, 0)


def apply(plan: Plan, maps: dict[str, Map]) -> None:
    svc, dst = maps[C.MAP_SVC], maps[C.MAP_DST]
    users, rules = maps[C.MAP_USERS], maps[C.MAP_RULES]
    for op in plan.svc_put:
        e = op.entry
        svc.update(svc_key(op.portset, e.proto, e.port, e.plen), C.SvcVal(e.rule))
    for op in plan.dst_put:
        dst.update(dst_key(op.ruleset, op.addr, op.plen), C.DstVal(op.portset))
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
    for op in plan.dst_del:
        dst.delete(dst_key(op.ruleset, op.addr, op.plen))
    for op in plan.svc_del:
        e = op.entry
        svc.delete(svc_key(op.portset, e.proto, e.port, e.plen))
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
