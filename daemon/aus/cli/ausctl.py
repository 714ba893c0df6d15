"""ausctl: inspect and steer ausd.

Human tables on stdout, errors on stderr, ``--json`` on every command
with a stable shape. ``maps`` and ``check`` read the pinned maps directly
and work while ausd is down; ``status`` falls back to them.

Exit codes: 0 success (for ``check`` and ``explain``: allowed), 1 error
(for ``policy check``: the file is refused; for ``reload``: the policy
was refused and the one in force stays), 2 usage, 3 ``check`` and
``explain``: the connection would be denied (or only reported, in
visibility mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import time

from .. import __version__
from ..agent import control, flows, mapview, pins, subjects
from ..agent.commands import MAX_FLOWS
from ..agent.config import DEFAULT_CONFIG_PATH, DaemonConfig, load_config
from ..agent.flowrecords import parse_network
from ..core import contract as C
from ..core import explain, filecheck
from ..core.compiler import compile_policy
from ..core.errors import AusError, ControlError, PolicyError
from ..core.flowrecord import VERDICTS
from ..core.policy import load_policy

DEFAULT_CONFIG = str(DEFAULT_CONFIG_PATH)
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DENIED = 0, 1, 2, 3


def _table(rows: list[list], headers: list[str]) -> str:
    cells = [headers] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _out(args, obj, human) -> None:
    if args.json:
        print(json.dumps(obj, indent=2, sort_keys=True))
    else:
        print(human(obj))


def _ago(t: float | None) -> str:
    if t is None:
        return "never"
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{at} ({max(0, round(time.time() - t))} s ago)"


def _server_lines(srv: dict) -> list[str]:
    """The policy server part of ``status``: the bundle in force and the
    state of the long poll."""
    pad = " " * 11
    if srv["bundle_version"] is None:
        head = "no bundle yet: enforcing the baseline only (fail closed)"
    else:
        head = (f"bundle version {srv['bundle_version']} of org {srv['org']} "
                f"(generated {srv['generated_at']}), ETag {srv['etag']}")
        head += (f", from the cache {srv['cache']} (fetched {_ago(srv['fetched_at'])})"
                 if srv["from_cache"] else f", fetched {_ago(srv['fetched_at'])}")
    lines = [pad + head, f"{pad}server: {srv['state']}, last answer {_ago(srv['last_fetch'])}"]
    up = srv.get("last_update")
    if up:
        how = (f"a delta from version {up['from_version']}" if up["kind"] == "delta"
               else "the full bundle")
        lines.append(f"{pad}last update: {how} to version {up['version']}, "
                     f"{up['wire_bytes']} bytes on the wire")
    if srv.get("last_delta_refused"):
        lines.append(f"{pad}last refused delta ({srv['delta_refusals']} in all): "
                     f"{srv['last_delta_refused']}")
    if srv["last_error"]:
        lines.append(f"{pad}last error: {srv['last_error']} "
                     f"({srv['failures']} failures in a row)")
    if srv["cache_error"]:
        lines.append(f"{pad}cache: {srv['cache_error']}")
    return lines


def _upload_lines(up: dict) -> list[str]:
    """The flow upload part of ``status``: what waits, what went, what was lost."""
    pad = " " * 11
    sp, dr = up["spooled"], up["dropped"]
    disk = (f"{sp['disk']} on disk ({sp['disk_bytes']} of {sp['disk_max_bytes']} bytes)"
            if sp["dir"] else "no disk spool")
    lines = [f"upload:    {up['state']} to {up['url']}, last success {_ago(up['last_success'])}",
             f"{pad}{up['batches_sent']} batches ({up['records_sent']} records) sent; spooled "
             f"{sp['memory']} in memory (of {sp['memory_max']}; {sp['queued']} queued), {disk}",
             f"{pad}dropped: {dr['spool']} spool full, {dr['refused']} refused, "
             f"{dr['corrupt']} corrupt files, {dr['window']} window cap; "
             f"{dr['unreported']} not yet reported"]
    if up["last_error"]:
        nxt = up["next_retry"]
        lines.append(f"{pad}last error: {up['last_error']} ({up['failures']} failures in a "
                     f"row; next retry {'in %d s' % max(0, round(nxt - time.time())) if nxt else 'now'})")
    if up["last_refusal"]:
        lines.append(f"{pad}last refusal: {up['last_refusal']} ({up['batches_refused']} batches)")
    if sp["disk_error"]:
        lines.append(f"{pad}spool: {sp['disk_error']}")
    return lines


def _counts(c: dict) -> str:
    return (f"{c['allowed_packets']}/{c['allowed_bytes']}B "
            f"{c['denied_packets']}/{c['denied_bytes']}B")


# ---- commands -------------------------------------------------------------

def cmd_status(args, cfg: DaemonConfig) -> int:
    try:
        st = control.request(cfg.socket, "status")
        st.pop("ok", None)
    except ControlError as exc:
        with pins.pinned_maps(cfg.pin_dir) as maps:
            st = {"daemon": {"running": False, "error": str(exc)},
                  "pin_dir": str(cfg.pin_dir),
                  "installed": pins.is_installed(cfg.pin_dir),
                  "kernel_config": mapview.config(maps),
                  "decisions": mapview.reason_counters(maps),
                  "events": mapview.event_stats(maps)}

    def human(s):
        d = s["daemon"]
        lines = [f"ausd:      {'running, pid ' + str(d['pid']) if d['running'] else 'not running (' + d['error'] + ')'}"]
        if d["running"]:
            p = s["policy"]
            source = s.get("mode_source")
            if source and s.get("workload"):
                source += f", workload {s['workload']}"
            lines += [f"mode:      {s['mode']}" + (f" (from {source})" if source else ""),
                      f"cgroup:    {s['cgroup']}",
                      f"policy:    {p['path']} version {p['version']}, {p['rules']} rules"]
            if p.get("server"):
                lines += _server_lines(p["server"])
            if p["error"]:
                lines.append(f"           last {'bundle' if p.get('server') else 'reload'} "
                             f"refused: {p['error']}")
            if s.get("upload"):
                lines += _upload_lines(s["upload"])
            if s.get("directory"):
                lines.append(_directory_line(s["directory"]))
            if s.get("dns"):
                lines.append(_dns_line(s["dns"]))
            lines += [f"users:     {s['users']['active']} active",
                      f"kernel:    {s['kernel']['rulesets']} rulesets, "
                      f"{s['kernel']['destinations']} destinations, {s['kernel']['services']} services",
                      "programs:  " + ", ".join(
                          f"{p['hook']}#{p.get('prog_id', '-')}" for p in s["programs"])]
        else:
            k = s["kernel_config"]
            lines += [f"enforcing: {'yes' if s['installed'] else 'no'} (pinned under {s['pin_dir']})",
                      f"mode:      {k['mode']}, policy version {k['policy_version']}"]
        denied = sum(v for row in s["decisions"].values() for r, v in row.items()
                     if r in ("no_rule", "pending"))
        lines.append(f"decisions: {denied} denials counted; events {s['events']}")
        if s.get("flow_records"):
            lines.append(_records_line(s["flow_records"]))
        return "\n".join(lines)

    _out(args, st, human)
    return EXIT_OK


def _directory_line(d: dict) -> str:
    """Refresh progress: users still on the rules the maps held at the
    start, and the lookup pool's queue."""
    if d["adopted_not_refreshed"]:
        head = (f"{d['adopted_not_refreshed']} of {d['adopted_at_start']} users still on "
                "the rules the maps held at the start (refreshing)")
    elif d["adopted_at_start"] and d["refresh_done"]:
        head = (f"all {d['adopted_at_start']} users adopted at the start refreshed in "
                f"{d['refresh_done'] - d['refresh_started']:.1f} s")
    else:
        head = "every user's rules come from a directory answer"
    return (f"directory: {head}; lookups {d['queued']} queued, {d['running']} running, "
            f"{d['answered']} answered, {d['timed_out']} over {d['timeout_seconds']:g} s")


def _dns_line(d: dict) -> str:
    """DNS-name destinations: the forwarder and what answers allowed."""
    if not d["enabled"]:
        why = "no rule names a DNS destination" if d["port"] else "the forwarder is not listening"
        return f"dns:       {why} (DNS is not redirected)"
    f = d.get("forwarder") or {}
    line = (f"dns:       forwarder on port {d['port']}: {f.get('queries', 0)} queries, "
            f"{f.get('refused', 0)} refused, {f.get('upstream_errors', 0)} resolver failures; "
            f"{d['entries']} addresses allowed to {d['users']} users, "
            f"{d['overflow']} over the per-user cap")
    if d["adopted"]:
        line += f", {d['adopted']} kept from before the start"
    return line


def _records_line(r: dict) -> str:
    line = (f"records:   {r['records_open']} in the current window (of {r['cap']}, "
            f"{r['window_seconds']:g} s), {r['windows_closed']} windows closed, "
            f"{r['records_closed']} records, {r['dropped']} dropped by the cap")
    ex = r.get("export")
    if ex:
        where = ex.get("path") or ex.get("socket")
        line += f"; export to {ex['kind']} {where}: {ex['failures']} failures"
        if ex["last_error"]:
            line += f" (last: {ex['last_error']})"
    return line


def _groups_cell(u: dict) -> str:
    """NSS groups as they are; bundle groups marked: the source stays visible."""
    nss = u.get("nss_groups", u["groups"])
    return ",".join([*nss, *(f"{g}(bundle)" for g in u.get("bundle_groups", ()))])


def _source_cell(u: dict) -> str:
    if u.get("bundle_groups"):
        return f"{u['groups_source']}+bundle v{u['bundle_version']}"
    return u["groups_source"]


def cmd_users(args, cfg) -> int:
    users = control.request(cfg.socket, "users")["users"]
    _out(args, {"users": users}, lambda o: _table(
        [[u["login_uid"], u["user"], _groups_cell(u), _source_cell(u),
          ",".join(u["rules"]), u["processes"], _counts(u["counters"])] for u in o["users"]],
        ["LOGIN_UID", "USER", "GROUPS", "SOURCE", "RULES", "PROCS",
         "ALLOWED pkts/bytes DENIED pkts/bytes"]))
    return EXIT_OK


def cmd_rules(args, cfg) -> int:
    kw = {"login_uid": args.login_uid} if args.login_uid is not None else {}
    rules = control.request(cfg.socket, "rules", **kw)["rules"]
    _out(args, {"rules": rules}, lambda o: _table(
        [[r["id"], r["name"], ",".join(r["sources"]), ",".join(r["destinations"]),
          ",".join(r["services"]), _counts(r["counters"])] for r in o["rules"]],
        ["ID", "NAME", "SOURCES", "DESTINATIONS", "SERVICES",
         "ALLOWED pkts/bytes DENIED pkts/bytes"]))
    return EXIT_OK


def cmd_maps(args, cfg) -> int:
    with pins.pinned_maps(cfg.pin_dir) as maps:
        d = mapview.dump(maps)

    def human(d):
        parts = [f"config: {d['config']}",
                 "\naus_users:\n" + _table([[u["login_uid"], u["ruleset"], u["unmanaged"]]
                                           for u in d["users"]], ["LOGIN_UID", "RULESET", "UNMANAGED"]),
                 "\naus_dst:\n" + _table([[x["ruleset"], x["destination"], x["portset"]]
                                         for x in d["destinations"]], ["RULESET", "DESTINATION", "PORTSET"]),
                 "\naus_svc:\n" + _table([[x["portset"], x["proto"], x["ports"], x["rule_id"], x["rule"]]
                                         for x in d["services"]], ["PORTSET", "PROTO", "PORTS", "RULE_ID", "RULE"]),
                 "\naus_dns:\n" + _table([[x["login_uid"], x["address"], x["portset"], x["rule_id"],
                                          x["rule"], x["expires_in"]] for x in d["dns"]],
                                         ["LOGIN_UID", "ADDRESS", "PORTSET", "RULE_ID", "RULE",
                                          "EXPIRES_IN"]),
                 "\naus_user_stats:\n" + _table([[c["login_uid"], c["allowed_packets"], c["allowed_bytes"],
                                                  c["denied_packets"], c["denied_bytes"]]
                                                 for c in d["user_counters"]],
                                                ["LOGIN_UID", "ALLOWED_PKTS", "ALLOWED_BYTES", "DENIED_PKTS", "DENIED_BYTES"]),
                 "\naus_rule_stats:\n" + _table([[c["rule_id"], c["rule"], c["allowed_packets"], c["allowed_bytes"],
                                                  c["denied_packets"], c["denied_bytes"]]
                                                 for c in d["rule_counters"]],
                                                ["RULE_ID", "RULE", "ALLOWED_PKTS", "ALLOWED_BYTES", "DENIED_PKTS", "DENIED_BYTES"]),
                 f"\nevents: {d['events']}"]
        return "\n".join(parts)

    _out(args, d, human)
    return EXIT_OK


def cmd_check(args, cfg) -> int:
    if not isinstance(explain.parse_target(args.to), explain.DnsPattern):
        with pins.pinned_maps(cfg.pin_dir) as maps:
            res = mapview.check(maps, args.login_uid, args.to, args.proto, args.port or 0)
    else:
        res = _check_name(args, cfg)
    _out(args, res, lambda r: (
        f"{r['verdict'].upper()}: login UID {r['login_uid']} -> {r['to']} {r['proto']}"
        + (f"/{r['port']}" if r['proto'] in ('tcp', 'udp') else "")
        + (f" by rule {r['rule']} (id {r['rule_id']})" if r["rule_id"] else f" ({r['reason']})")
        + (f", ruleset {r['ruleset']}" if r["ruleset"] else "")
        + ("\n" + "\n".join(explain.describe_dns(r)) if r.get("dns") else "")))
    return EXIT_OK if res["allowed"] else EXIT_DENIED


def _check_name(args, cfg) -> dict:
    """check for a DNS name: the maps hold addresses only, the rules that
    name it are in the policy ausd enforces, so ausd is asked (as explain
    for the login UID's user)."""
    try:
        res = control.request(cfg.socket, "explain", user=str(args.login_uid), to=args.to,
                              proto=args.proto, port=args.port or 0)
    except ControlError as exc:
        raise ControlError(f"{exc} (a DNS name is checked against the policy ausd "
                           "enforces; ausctl check needs ausd for names)") from exc
    return {"login_uid": args.login_uid, "to": res["to"], "proto": res["proto"],
            "port": res["port"], "mode": res["mode"], "ruleset": None,
            "rule_id": res["rule_id"], "rule": res["rule"], "allowed": res["allowed"],
            "verdict": res["verdict"], "reason": res["reason"], "dns": res["dns"]}


def _record_rows(records: list[dict]) -> str:
    return _table([[r["user"] or r["login_uid"], ",".join(r["groups"]), r["process"],
                    r["dst"], r["proto"], r["port"] or "", r["verdict"], r["rule"] or "-",
                    r["count"], r["first_seen"], r["last_seen"]] for r in records],
                  ["USER", "GROUPS", "PROCESS", "DST", "PROTO", "PORT", "VERDICT", "RULE",
                   "COUNT", "FIRST_SEEN", "LAST_SEEN"])


def cmd_flows(args, cfg) -> int:
    if args.records and args.follow:
        raise AusError("--records and --follow do not go together "
                       "(records are shown per window)")
    filters = {k: v for k, v in (("user", args.user), ("verdict", args.verdict),
                                 ("to", args.to), ("port", args.port),
                                 ("since", args.since)) if v is not None}
    if args.records:
        reply = control.request(cfg.socket, "flows", records=True, limit=args.limit, **filters)
        _out(args, {"records": reply["records"]}, lambda o: _record_rows(o["records"]))
        return EXIT_OK
    with control.Client(cfg.socket, timeout=None if args.follow else 10) as c:
        reply = c.request("flows", follow=args.follow, limit=args.limit, **filters)
        for f in reply["flows"]:
            print(json.dumps(f, sort_keys=True) if args.json else flows.format_line(f), flush=True)
        while args.follow:
            msg = c.read()
            if msg is None:
                return EXIT_OK
            f = msg["flow"]
            print(json.dumps(f, sort_keys=True) if args.json else flows.format_line(f), flush=True)
    return EXIT_OK


def cmd_policy_check(args, cfg) -> int:
    """Offline: reads the file (and ausd.yaml's limits, if any), never ausd."""
    report = filecheck.check_file(args.file, baseline=cfg.baseline_networks,
                                  max_rules=cfg.max_rules)
    if args.json:
        print(json.dumps(report.wire(), indent=2, sort_keys=True))
    elif report.ok:
        print(f"{report.file}: OK, {report.rules} rules, {len(report.groups)} user groups")
    for e in report.errors if not args.json else ():
        print(e.text(), file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_explain(args, cfg) -> int:
    if args.policy is None:
        # The policy in force, whatever its source (a file or the policy
        # server's bundles, with their memberships): asked of ausd.
        ask = {k: v for k, v in (("user", args.user), ("groups", args.groups)) if v is not None}
        try:
            res = control.request(cfg.socket, "explain", to=args.to, proto=args.proto,
                                  port=args.port, **ask)
        except ControlError as exc:
            raise ControlError(f"{exc} (--policy FILE explains against a file "
                               "without ausd)") from exc
        res.pop("ok", None)
    else:
        policy = load_policy(args.policy)
        try:
            compiled = compile_policy(policy, cfg.baseline_networks, max_rules=cfg.max_rules)
        except ValueError as exc:
            raise PolicyError(args.policy, [str(exc)]) from exc
        subject = subjects.of_groups(args.groups) if args.user is None \
            else subjects.of_user(args.user)
        res = explain.explain(compiled, subject, args.to, args.proto, args.port,
                              mode=cfg.mode, unmanaged=cfg.unmanaged_login_uids)
        res["policy"] = {"source": args.policy, "version": None}
    _out(args, res, explain.describe)
    return EXIT_OK if res["allowed"] else EXIT_DENIED


def cmd_reload(args, cfg) -> int:
    # ausd answers once the new policy is in the maps, or refused: a
    # large policy may take longer than a read.
    r = control.request(cfg.socket, "reload", timeout=120)
    r.pop("ok", None)
    _out(args, r, lambda r: (
        f"re-fetch of the policy bundle requested from {r['url']}; in force: version "
        f"{r['version']}, {r['rules']} rules (see ausctl status)" if r.get("refetch") else
        f"policy reloaded: version {r['version']}, {r['rules']} rules"))
    return EXIT_OK


def cmd_session(args, cfg) -> int:
    r = control.request(cfg.socket, "session_" + args.action, timeout=args.timeout)
    r.pop("ok", None)
    _out(args, r, lambda r: (f"session {args.action}: login UID {r['login_uid']}"
                             + (f" ({r.get('user')}), rules {r.get('rules')}" if r.get("managed") else "")))
    return EXIT_OK


def cmd_uninstall(args, cfg) -> int:
    if not args.yes:
        print("ausctl uninstall detaches every aus program and removes the pinned maps: "
              "traffic is no longer filtered. Add --yes to do it.", file=sys.stderr)
        return EXIT_USAGE
    removed = pins.uninstall(cfg.pin_dir)
    _out(args, {"removed": removed}, lambda o: f"removed {len(o['removed'])} pins; "
         "enforcement is off (stop ausd too, or it reinstalls at its next start)")
    return EXIT_OK


def _uid(text: str) -> int:
    v = int(text)
    if not 0 <= v <= C.LOGINUID_UNSET:
        raise argparse.ArgumentTypeError("a login UID is 0..4294967295")
    return v


def _limit(text: str) -> int:
    v = int(text)
    if not 0 <= v <= MAX_FLOWS:
        raise argparse.ArgumentTypeError(f"--limit is 0..{MAX_FLOWS}")
    return v


def _target(text: str) -> str:
    """An address (normalized) or a DNS name (as given)."""
    try:
        target = explain.parse_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text.strip() if isinstance(target, explain.DnsPattern) else str(target)


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since(text: str, now: float | None = None) -> int:
    """``10m``, ``1h``, ``90s``, ``2d`` ago, or an ISO 8601 time (a time
    without a zone is local): a Unix time in whole seconds."""
    m = _AGO.fullmatch(text.strip())
    if m:
        t = (time.time() if now is None else now) - float(m[1]) * _UNITS[m[2]]
        return max(0, int(t))
    try:
        at = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 10m, 1h, 30s, 2d or an ISO 8601 "
            "time such as 2026-12-06T03:00:00Z") from None
    return max(0, int(at.timestamp()))


def _cidr(text: str) -> str:
    try:
        return str(parse_network(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    v = int(text)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError("a port is 0..65535")
    return v


def parser() -> argparse.ArgumentParser:
    def common_options(p, default):
        p.add_argument("--config", default=DEFAULT_CONFIG if default else argparse.SUPPRESS,
                       help=f"ausd configuration, for the socket and pin paths (default {DEFAULT_CONFIG})")
        p.add_argument("--json", action="store_true",
                       default=False if default else argparse.SUPPRESS,
                       help="machine-readable output")

    # The options work before and after the command; the command's copy
    # must not reset what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common_options(common, default=False)
    ap = argparse.ArgumentParser(prog="ausctl", description="Inspect and steer ausd.",
                                 epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(ap, default=True)
    ap.add_argument("--version", action="version", version=f"ausctl {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="daemon, policy, programs, counters").set_defaults(fn=cmd_status)
    sub.add_parser("users", parents=[common], help="active login UIDs, groups, rules, counters "
                   "(not root: your own)").set_defaults(fn=cmd_users)
    p = sub.add_parser("rules", parents=[common], help="the policy's rules and their counters "
                       "(not root: your own)")
    p.add_argument("--login-uid", type=_uid, help="only the rules of this login UID")
    p.set_defaults(fn=cmd_rules)
    sub.add_parser("maps", parents=[common], help="decoded dump of the pinned maps").set_defaults(fn=cmd_maps)
    p = sub.add_parser("check", parents=[common], help="the verdict for a connection, from the kernel's maps")
    p.add_argument("--login-uid", type=_uid, required=True)
    p.add_argument("--to", type=_target, required=True,
                   help="destination address, or a DNS name (asks ausd: names are in its policy)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--proto", choices=["tcp", "udp", "icmp"], required=True)
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("flows", parents=[common], help="recent flow events, or the "
                       "aggregated flow records (not root: your own)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--limit", type=_limit, default=100,
                   help=f"the last N events or records (0..{MAX_FLOWS}, default 100)")
    p.add_argument("--records", action="store_true",
                   help="the latest flow records (closed windows, then the open one)")
    p.add_argument("--user", help="only this user (name)")
    p.add_argument("--verdict", choices=VERDICTS, help="only this verdict")
    p.add_argument("--to", type=_cidr, help="only destinations in this CIDR (or address)")
    p.add_argument("--port", type=_port, help="only this destination port")
    p.add_argument("--since", type=since,
                   help="only since then: 10m, 1h, 30s, 2d ago or an ISO 8601 time")
    p.set_defaults(fn=cmd_flows)
    p = sub.add_parser("policy", help="policy files, without ausd")
    psub = p.add_subparsers(dest="policy_command", required=True)
    p = psub.add_parser("check", parents=[common], help="validate a policy file as ausd "
                        "would (no daemon, no root); errors as FILE:LINE: PATH: MESSAGE")
    p.add_argument("file", help="the policy file")
    p.set_defaults(fn=cmd_policy_check)
    p = sub.add_parser("explain", parents=[common], help="the verdict and the deciding rule "
                       "for a user (logged in or not) or groups, from the policy in force "
                       "(ausd; root) or a file")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user name (or UID), groups resolved as ausd does")
    who.add_argument("--groups", help="comma-separated group names, as they are")
    p.add_argument("--to", type=_target, required=True,
                   help="destination address, or a DNS name: the rules that name it")
    p.add_argument("--port", type=_port, default=0)
    p.add_argument("--proto", choices=list(explain.PROTOS), required=True)
    p.add_argument("--policy", help="explain against this policy file instead of asking ausd")
    p.set_defaults(fn=cmd_explain)
    sub.add_parser("reload", parents=[common],
                   help="re-read the policy file (a policy URL: fetch the bundle now)").set_defaults(fn=cmd_reload)
    p = sub.add_parser("session", parents=[common], help="tell ausd a login session opened or closed")
    p.add_argument("action", choices=["open", "close"])
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for ausd (default 2)")
    p.set_defaults(fn=cmd_session)
    p = sub.add_parser("uninstall", parents=[common], help="detach the programs and remove all pins")
    p.add_argument("--yes", action="store_true")
    p.set_defaults(fn=cmd_uninstall)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("check", "explain") and args.proto in ("tcp", "udp") \
            and not 1 <= args.port <= 65535:
        print(f"ausctl {args.command}: --port 1..65535 is needed for tcp and udp", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(args.config, required=args.config != DEFAULT_CONFIG)
        return args.fn(args, cfg)
    except AusError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}), file=sys.stderr)
        else:
            print(f"ausctl {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
