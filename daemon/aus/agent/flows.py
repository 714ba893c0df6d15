"""Flow events from the kernel's ring buffer, decoded for people and JSON."""

from __future__ import annotations

import ctypes
import time

from ..core import contract as C


def _mono_to_wall(ts_ns: int) -> float:
    # bpf_ktime_get_ns() is CLOCK_MONOTONIC.
    return time.time() - (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - ts_ns) / 1e9


# Names looked up once: decode runs for every event (thousands a second).
_HOOKS = {int(h): h.name.lower() for h in C.Hook if h < C.HOOK_MAX}
_VERDICTS = {int(v): v.name.lower() for v in C.EventVerdict}
_REASONS = {int(r): r.name.lower() for r in C.Reason if r < C.REASON_MAX}
_ADDRS: dict[bytes, str] = {}
_ADDRS_MAX = 4096


def _addr(raw: bytes) -> str:
    text = _ADDRS.get(raw)
    if text is None:
        if len(_ADDRS) >= _ADDRS_MAX:
            _ADDRS.clear()
        text = _ADDRS[raw] = str(C.addr_from16(raw))
    return text


def decode(raw: bytes, rule_names: dict[int, str]) -> dict:
    ev = C.Event.from_buffer_copy(raw[:ctypes.sizeof(C.Event)])
    proto = C.PROTO_NAMES.get(ev.proto, str(ev.proto))
    return {
        "time": round(_mono_to_wall(ev.ts_ns), 6),
        "login_uid": ev.loginuid,
        "uid": ev.uid,
        "pid": ev.pid,
        "comm": ev.comm.decode(errors="replace"),
        "hook": _HOOKS.get(ev.hook) or str(ev.hook),
        "verdict": _VERDICTS.get(ev.verdict) or str(ev.verdict),
        "reason": _REASONS.get(ev.reason) or str(ev.reason),
        "rule_id": ev.rule,
        "rule": rule_names.get(ev.rule) if ev.rule else None,
        "family": ev.family,
        "proto": proto,
        "src": _addr(bytes(ev.saddr)),
        "sport": ev.sport,
        "dst": _addr(bytes(ev.daddr)),
        "dport": ev.dport,
        "bytes": ev.bytes,
    }


def format_line(f: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(f["time"]))
    dst = f"[{f['dst']}]" if ":" in f["dst"] else f["dst"]
    port = f":{f['dport']}" if f["proto"] in ("tcp", "udp") else ""
    rule = f" rule={f['rule']}" if f["rule"] else ""
    if f.get("dns_name"):
        rule += f" name={f['dns_name']}"
    user = f" user={f['user']}" if f.get("user") else ""
    return (f"{when} {f['verdict'].upper():5} login_uid={f['login_uid']}{user} uid={f['uid']} "
            f"pid={f['pid']} comm={f['comm']} {f['proto']} -> {dst}{port} "
            f"({f['hook']}, {f['reason']}){rule}")
