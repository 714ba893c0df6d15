"""What ausd reports over its control socket: status, users, rules.

Built from a :class:`Snapshot` the daemon hands over, never from its
private fields: what is reported is what the kernel was given and why.
Reading never asks the directory again (a read command must not change
what is enforced, nor hold the loop on NSS).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import __version__
from ..core import contract as C
from ..core.bundle import Bundle
from ..core.compiler import CompiledPolicy
from ..core.policy import Policy
from ..core.state import KernelState
from . import mapview, pins
from .bpfsys import Map
from .config import DaemonConfig
from .enforcement import ModeInForce
from .identity import UserInfo


class Identity(NamedTuple):
    """Why a login UID gets its rules: its NSS answer, the bundle groups
    that list it, and the rules they match."""
    info: UserInfo
    bundle_groups: tuple[str, ...]
    rule_ids: frozenset[int]


@dataclass(frozen=True)
class Snapshot:
    cfg: DaemonConfig
    started: float
    policy_source: str
    policy: Policy
    compiled: CompiledPolicy
    policy_error: str | None
    kstate: KernelState
    unmanaged: frozenset[int]
    identities: Mapping[int, Identity]
    processes: Mapping[int, int]
    bundle: Bundle | None
    mode: ModeInForce                  # what the config map holds, and why
    server: dict[str, Any] | None      # the follower's status, with a policy URL
    last_sync: dict[str, Any]
    start_stages: dict[str, float]
    layout: pins.PinLayout
    maps: dict[str, Map]
    upload: dict[str, Any] | None = None   # the flow uploader's status
    adopted: frozenset[int] = frozenset()  # rules kept from the maps, not refreshed yet


def status(s: Snapshot) -> dict:
    return {
        "daemon": {"running": True, "version": __version__, "pid": os.getpid(),
                   "uptime": round(time.time() - s.started, 1)},
        "mode": s.mode.mode,
        "mode_source": s.mode.source,
        "workload": s.server.get("workload") if s.server is not None else None,
        "cgroup": str(s.cfg.cgroup_path),
        "pin_dir": str(s.cfg.pin_dir),
        "policy": {"path": s.policy_source, "version": s.compiled.version,
                   "rules": len(s.compiled.rules), "error": s.policy_error,
                   "source": "server" if s.server is not None else "file",
                   "server": s.server},
        "users": {"active": len([u for u in s.kstate.users if u not in s.unmanaged]),
                  "unmanaged": sorted(s.unmanaged)},
        "kernel": {"rulesets": len(s.kstate.rulesets), "portsets": len(s.kstate.portsets),
                   "destinations": sum(len(r) for r in s.kstate.rulesets.values()),
                   "services": sum(len(p) for p in s.kstate.portsets.values())},
        "programs": pins.program_ids(s.layout),
        "decisions": mapview.reason_counters(s.maps),
        "events": mapview.event_stats(s.maps),
        "last_sync": s.last_sync,
        "start_stages": s.start_stages,
        "upload": s.upload,
    }


def groups_source(info: UserInfo, now: float) -> str:
    """Where a user's groups come from, and whether the directory last
    answered in full: ``nss,STALE(<age>s)`` while the last known groups are
    kept, ``nss,PARTIAL`` for an incomplete first answer."""
    if info.partial:
        return f"{info.source},PARTIAL"
    if info.stale:
        return f"{info.source},STALE({now - info.fetched_at:.0f}s)"
    return info.source


def users(s: Snapshot, viewer: int | None = None) -> list[dict]:
    """Every managed user; with ``viewer``, that login UID only."""
    counters = mapview.user_counters(s.maps)
    now = time.time()
    out = []
    for uid, entry in sorted(s.kstate.users.items()):
        if viewer is not None and uid != viewer:
            continue
        ident = s.identities.get(uid)
        if entry.managed and ident is None and uid in s.adopted:
            # rules the maps held at the start, kept until the directory answers
            out.append({"login_uid": uid, "user": None, "groups": [], "nss_groups": [],
                        "bundle_groups": [], "bundle_version": None, "group_sids": [],
                        "groups_source": "ADOPTED", "groups_stale": "not refreshed since "
                        "the start: the rules the maps held", "groups_age": None,
                        "rules": sorted({s.kstate.rules.get(e.rule, str(e.rule))
                                         for _, _, ps in s.kstate.ruleset_content(entry.ruleset)
                                         for e in ps if e.rule != C.RULE_BASELINE}),
                        "ruleset": entry.ruleset, "processes": s.processes.get(uid, 0),
                        "counters": counters.get(uid, dict.fromkeys(mapview.COUNTER_FIELDS, 0))})
            continue
        if not entry.managed or ident is None:
            continue
        info, extra, rule_ids = ident
        out.append({
            "login_uid": uid,
            "user": info.name,
            # every group the rules are matched with; where each came from:
            "groups": list(dict.fromkeys(info.groups + extra)),
            "nss_groups": list(info.groups),
            "bundle_groups": list(extra),
            "bundle_version": s.bundle.version if s.bundle else None,
            "group_sids": list(info.sids),
            "groups_source": groups_source(info, now),
            "groups_stale": info.stale or None,
            "groups_age": round(now - info.fetched_at, 1),
            "rules": [s.compiled.rule_names[r] for r in sorted(rule_ids)],
            "ruleset": entry.ruleset,
            "processes": s.processes.get(uid, 0),
            "counters": counters.get(uid, dict.fromkeys(mapview.COUNTER_FIELDS, 0)),
        })
    return out


def rules(s: Snapshot, login_uid: int | None) -> list[dict]:
    c = s.compiled
    ids = [r.id for r in c.rules]
    if login_uid is not None:
        ident = s.identities.get(login_uid)
        wanted = ident.rule_ids if ident is not None else frozenset()
        ids = [i for i in ids if i in wanted]
    counters = mapview.rule_counters(s.maps, [C.RULE_BASELINE, *ids])
    zero = dict.fromkeys(mapview.COUNTER_FIELDS, 0)
    by_name = {r.name: r for r in s.policy.rules}
    out = [{"id": C.RULE_BASELINE, "name": "baseline", "sources": ["(every managed user)"],
            "destinations": [str(n) for n in c.baseline], "services": ["any"],
            "counters": counters.get(C.RULE_BASELINE, zero)}]
    for rule in c.rules:
        if rule.id not in ids:
            continue
        src = by_name[rule.name]
        out.append({"id": rule.id, "name": src.name, "sources": list(src.sources),
                    "destinations": list(src.destinations), "services": list(src.services),
                    "counters": counters.get(rule.id, zero)})
    return out
