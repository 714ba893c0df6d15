"""What ausd reports over its control socket: status, users, rules."""

from __future__ import annotations

import os
import time

from .. import __version__
from ..core import contract as C
from . import bpfsys, loader, mapview


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
        "policy": {"path": d.policy_source, "version": d.compiled.version,
                   "rules": len(d.compiled.rules), "error": d.policy_error,
                   "source": "server" if d.cfg.policy_url else "file",
                   "server": server(d) if d.cfg.policy_url else None},
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


def server(d) -> dict:
    """Where the policy in force came from, when it is fetched from the
    policy server: the bundle, the cache, the poller's last fetch and error."""
    b = d.bundle
    info = d.bundle_info
    poll = d.poller.status() if d.poller is not None else {}
    return {"url": d.cfg.policy_url,
            "bundle_version": b.version if b else None,
            "org": b.org if b else None,
            "generated_at": b.generated_at if b else None,
            "etag": info.get("etag") if b else None,
            "fetched_at": info.get("fetched_at") if b else None,
            "from_cache": bool(info.get("from_cache")) if b else False,
            "cache": str(d.cfg.policy_cache),
            "cache_error": info.get("cache_error"),
            "last_fetch": poll.get("last_fetch"),
            "last_error": poll.get("last_error"),
            "last_error_at": poll.get("last_error_at"),
            "failures": poll.get("failures", 0),
            "next_retry": poll.get("next_retry"),
            "state": poll.get("state"),
            "user_match": d.cfg.bundle_user_match}


def users(d) -> list[dict]:
    counters = mapview.user_counters(d.loaded.maps)
    out = []
    for uid, entry in sorted(d.kstate.users.items()):
        if not entry.managed:
            continue
        info, extra = d.groups_of(uid)
        rule_ids = sorted(d.rules_of(info, extra))
        out.append({
            "login_uid": uid,
            "user": info.name,
            # every group the rules are matched with; where each came from:
            "groups": list(dict.fromkeys(info.groups + extra)),
            "nss_groups": list(info.groups),
            "bundle_groups": list(extra),
            "bundle_version": d.bundle.version if d.bundle else None,
            "group_sids": list(info.sids),
            "groups_source": info.source,
            "groups_age": round(time.time() - info.fetched_at, 1),
            "rules": [d.compiled.rule_names[r] for r in rule_ids],
            "ruleset": entry.ruleset,
            "processes": d.sessions.processes.get(uid, 0),
            "counters": counters.get(uid, dict.fromkeys(mapview.COUNTER_FIELDS, 0)),
        })
    return out


def rules(d, login_uid: int | None) -> list[dict]:
    c = d.compiled
    ids = [r.id for r in c.rules]
    if login_uid is not None:
        wanted = d.rules_of(*d.groups_of(int(login_uid)))
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
