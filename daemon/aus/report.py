"""What ausd reports over its control socket: status, users, rules."""

from __future__ import annotations

import os
import time

from . import __version__, bpfsys, contract as C, loader, mapview


def status(d) -> dict:
    maps = d.loaded.maps
    programs = []
    for hook in loader.HOOKS:
        path = d.loaded.layout.prog(hook.link)
        try:
            fd = bpfsys.obj_get(str(path))
        except Exception:  # noqa: BLE001 - reported as missing
            programs.append({"hook": hook.link, "attached": False})
            continue
        try:
            info = bpfsys.prog_info(fd, hook.link)
        finally:
            os.close(fd)
        programs.append({"hook": hook.link, "attached": d.loaded.layout.link(hook.link).exists(),
                         "prog_id": info["id"], "tag": info["tag"]})
    return {
        "daemon": {"running": True, "version": __version__, "pid": os.getpid(),
                   "uptime": round(time.time() - d.started, 1)},
        "mode": d.cfg.mode,
        "cgroup": str(d.cfg.cgroup_path),
        "pin_dir": str(d.cfg.pin_dir),
        "policy": {"path": str(d.cfg.policy), "version": d.compiled.version,
                   "rules": len(d.compiled.rules), "error": d.policy_error},
        "users": {"active": len([u for u in d.kstate.users if u not in d.unmanaged]),
                  "unmanaged": sorted(d.unmanaged)},
        "kernel": {"rulesets": len(d.kstate.rulesets), "portsets": len(d.kstate.portsets),
                   "destinations": sum(len(r) for r in d.kstate.rulesets.values()),
                   "services": sum(len(p) for p in d.kstate.portsets.values())},
        "programs": programs,
        "decisions": mapview.reason_counters(maps),
        "events": mapview.event_stats(maps),
        "last_sync": d.last_sync,
        "start_stages": d.start_stages,
    }


def users(d) -> list[dict]:
    counters = mapview.user_counters(d.loaded.maps)
    out = []
    for uid, (ruleset, flags, _slot) in sorted(d.kstate.users.items()):
        if flags & C.USER_UNMANAGED:
            continue
        info = d.directory.get(uid)
        rule_ids = sorted(d.compiled.matching_rules(info.groups, info.sids))
        out.append({
            "login_uid": uid,
            "user": info.name,
            "groups": list(info.groups),
            "group_sids": list(info.sids),
            "groups_source": info.source,
            "groups_age": round(time.time() - info.fetched_at, 1),
            "rules": [d.compiled.rule_names[r] for r in rule_ids],
            "ruleset": ruleset,
            "processes": d.sessions.processes.get(uid, 0),
            "counters": counters.get(uid, dict.fromkeys(mapview.COUNTER_FIELDS, 0)),
        })
    return out


def rules(d, login_uid: int | None) -> list[dict]:
    c = d.compiled
    ids = [r.id for r in c.rules]
    if login_uid is not None:
        info = d.directory.get(int(login_uid))
        wanted = c.matching_rules(info.groups, info.sids)
        ids = [i for i in ids if i in wanted]
    counters = mapview.rule_counters(d.loaded.maps, [C.RULE_BASELINE, *ids])
    zero = dict.fromkeys(mapview.COUNTER_FIELDS, 0)
    by_id = {r.id: r for r in c.rules}
    out = [{"id": C.RULE_BASELINE, "name": "baseline", "sources": ["(every managed user)"],
            "destinations": [str(n) for n in c.baseline], "services": ["any"],
            "counters": counters.get(C.RULE_BASELINE, zero)}]
    for rid in ids:
        rule = d.policy.rules[[r.name for r in d.policy.rules].index(by_id[rid].name)]
        out.append({"id": rid, "name": rule.name, "sources": list(rule.sources),
                    "destinations": list(rule.destinations), "services": list(rule.services),
                    "counters": counters.get(rid, zero)})
    return out
