"""Large rulesets: logins of users whose groups carry 1, 100 and 10,000
rules, and the load and compile time of a 10,000-rule policy.

A real ausd runs on a cgroup of its own with a private directory (the
bench users in generated /etc/passwd and /etc/group, in a mount namespace
of its own, as in bench.controlpath). For each size N:

* new ruleset: each login is a user in group ``nN`` (N-1 rules) and in a
  group of its own (one more rule), so its N rules are a combination no
  one else has: the login compiles them and writes the whole ruleset (N
  destination entries) into the kernel. The worst case of a login.
* shared ruleset: users in ``nN`` and ``nN-shared``; after the first, the
  ruleset is already in the kernel and a login writes one user entry.

A login is a new process with the user's login UID sending `session open`
(the request `ausctl session open` sends for the PAM hook); its round trip
ends once ausd has written the user's rules. Before the session is closed
the bench looks the user's last rule up in the kernel's maps (aus_dst and
aus_svc of the user's ruleset): it must be there. `ausctl session open`
itself, with the PAM hook's timeout, runs a few times per size and must
exit 0.

The policy file figure is a separate 10,000-rule policy (ip lists, named
services, literals, port ranges), loaded and compiled in a fresh process
each time (nothing cached from a previous run).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from aus.agent import control, mapsync, pins
from aus.core import contract as C

from . import common, controlpath

LOGIN_BASE = 500000
PORT = 443


def dest(index: int) -> str:
    """The index-th /32 of 10.0.0.0/8: every rule a destination of its own."""
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


class Layout:
    """The bench policy and directory: per size, its users and what the
    last rule of each user allows."""

    def __init__(self, sizes: tuple[int, ...], logins: int, shared: int, ausctl: int):
        self.sizes = sizes
        self.groups: list[str] = []
        self.rules: list[dict] = []
        self.members: dict[str, list[str]] = {}
        # size -> kind ("new", "shared", "ausctl") -> [(login uid, its last rule, its address)]
        self.users: dict[int, dict[str, list[tuple[int, str, str]]]] = {}
        n_dest = 0

        def rule(name: str, group: str) -> str:
            nonlocal n_dest
            addr = dest(n_dest)
            n_dest += 1
            self.rules.append({"name": name, "sources": [group], "destinations": [f"{addr}/32"],
                               "services": [f"{PORT}/tcp"]})
            return addr

        def group(name: str, users: list[str]) -> None:
            self.groups.append(name)
            self.members[name] = users

        uid = LOGIN_BASE
        for n in sizes:
            base = f"n{n}"
            for k in range(n - 1):
                rule(f"{base}-r{k}", base)
            shared_addr = rule(f"{base}-shared", f"{base}-shared")
            kinds: dict[str, list[tuple[int, str, str]]] = {"new": [], "shared": [], "ausctl": []}
            for kind, count in (("new", logins), ("ausctl", ausctl), ("shared", shared)):
                for i in range(count):
                    if kind == "shared":
                        kinds[kind].append((uid, f"{base}-shared", shared_addr))
                    else:
                        own = f"{base}-{kind}{i}"
                        addr = rule(own, own)
                        group(own, [f"b{uid}"])
                        kinds[kind].append((uid, own, addr))
                    uid += 1
            group(base, [f"b{u}" for us in kinds.values() for u, _, _ in us])
            group(f"{base}-shared", [f"b{u}" for u, _, _ in kinds["shared"]])
            self.users[n] = kinds

    def policy(self) -> dict:
        return {"user_groups": [{"name": g} for g in self.groups], "rules": self.rules}

    def write_directory(self, workdir: Path) -> tuple[Path, Path, Path]:
        passwd = [ln for ln in Path("/etc/passwd").read_text().splitlines() if ln]
        group = [ln for ln in Path("/etc/group").read_text().splitlines() if ln]
        for kinds in self.users.values():
            for users in kinds.values():
                for uid, _, _ in users:
                    passwd.append(f"b{uid}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin")
        for i, (g, names) in enumerate(self.members.items()):
            group.append(f"{g}:x:{400000 + i}:{','.join(names)}")
        paths = workdir / "passwd", workdir / "group", workdir / "nsswitch.conf"
        paths[0].write_text("\n".join(passwd) + "\n")
        paths[1].write_text("\n".join(group) + "\n")
        paths[2].write_text("passwd: files\ngroup: files\nshadow: files\n")
        return paths


def in_kernel(maps: dict, ruleset: int, addr: str) -> str | None:
    """The rule the kernel's two lookups give for addr:PORT/tcp in this
    ruleset (its name), or what is missing: the maps ausd wrote, read back."""
    import ipaddress

    a16 = C.addr16(ipaddress.ip_address(addr))
    dv = maps[C.MAP_DST].lookup(mapsync.dst_key(ruleset, a16, 128))
    if dv is None:
        return f"no aus_dst entry in ruleset {ruleset}"
    sv = maps[C.MAP_SVC].lookup(mapsync.svc_key(dv.portset, C.PROTO_TCP, PORT,
                                                C.SVC_PROTO_PREFIX + 16))
    if sv is None:
        return f"no aus_svc entry in portset {dv.portset}"
    info = maps[C.MAP_RULES].lookup(mapsync._u32(sv.rule))
    return info.name.decode() if info is not None else None


def login(sock: Path, loginuid: int, check) -> float:
    """One login: a new process with this login UID sends `session open`
    and times the round trip; ``check(reply)`` runs while the session is
    open; then the process closes it, as the PAM hook does at logout."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.close(go_w)
            with open("/proc/self/loginuid", "w") as f:
                f.write(str(loginuid))
            with control.Client(sock, timeout=60) as c:
                t0 = time.perf_counter()
                reply = c.request("session_open")
                dt = time.perf_counter() - t0
            os.write(w, json.dumps({"dt": dt, "ruleset": reply.get("ruleset"),
                                    "groups": reply.get("groups"),
                                    "rules": len(reply.get("rules") or ())}).encode() + b"\n")
            os.read(go_r, 1)
            control.request(sock, "session_close", timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"error": str(exc)}).encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        res = json.loads(data)
        if "error" in res:
            raise RuntimeError(f"login {loginuid}: {res['error']}")
        check(res)
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
        os.close(r)
        os.waitpid(pid, 0)
    return res["dt"]


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used (/proc/PID/stat)."""
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ausctl_open(config: Path, loginuid: int) -> dict:
    """`ausctl session open` as the PAM hook runs it (its default timeout),
    then `session close`; exit status and wall time of the open."""
    cmd = [sys.executable, "-m", "aus.cli.ausctl", "--config", str(config), "session"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd + ["open"], preexec_fn=common.enter(loginuid=loginuid),
                       capture_output=True, text=True, timeout=60)
    dt = time.perf_counter() - t0
    subprocess.run(cmd + ["close"], preexec_fn=common.enter(loginuid=loginuid),
                   capture_output=True, text=True, timeout=60)
    return {"exit": p.returncode, "seconds": dt, "stderr": p.stderr.strip()[-300:]}


# -- the policy file figure ---------------------------------------------------

def big_policy(rules: int) -> dict:
    """A policy of ``rules`` rules as an administrator writes them: 50
    groups, ip lists and named services, literals and port ranges."""
    out = []
    for i in range(rules):
        out.append({
            "name": f"rule-{i}",
            "sources": [f"team{i % 50}"] + (["ops"] if i % 10 == 0 else []),
            "destinations": ["web"] if i % 7 == 0 else [f"{dest(i)}/32", f"10.200.{i % 256}.0/24"],
            "services": ["web"] if i % 3 == 0 else ["443/tcp", "8000-8100/tcp", "53/udp"],
        })
    return {"user_groups": [{"name": f"team{k}"} for k in range(50)] + [{"name": "ops"}],
            "ip_lists": {"web": ["192.0.2.0/24", "2001:db8::/32"]},
            "services": {"web": ["80/tcp", "443/tcp"]},
            "rules": out}


_TIME_LOAD = """
import ipaddress, json, sys, time
from aus.core import compiler
from aus.core.errors import PolicyError
from aus.core.policy import load_policy
t0 = time.perf_counter()
try:
    p = load_policy(sys.argv[1])
except PolicyError as exc:
    print(json.dumps({"load": time.perf_counter() - t0, "error": str(exc)[:300]}))
    raise SystemExit(0)
t1 = time.perf_counter()
c = compiler.compile_policy(p, [ipaddress.ip_network("127.0.0.0/8")], max_rules=len(p.rules) + 16)
c.warm()                 # as ausd does: large groups' rulesets, every rule's grants prepared
c.baseline_ruleset()
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "compile": t2 - t1, "rules": len(c.rules)}))
"""


def time_load(path: Path) -> dict:
    p = common.run(sys.executable, "-c", _TIME_LOAD, str(path))
    return json.loads(p.stdout)


def policy_file(workdir: Path, rules: int, runs: int) -> dict:
    path = workdir / "big-policy.yaml"
    doc = big_policy(rules)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    res = {"rules": rules, "bytes": path.stat().st_size,
           "runs": [time_load(path) for _ in range(runs)]}
    assert all(r.get("rules") == rules for r in res["runs"]), res["runs"]
    # The same file with one bad reference near the end: the error path
    # (the lines found by the node tree) still names file and line.
    doc["rules"][-1]["sources"] = ["no-such-group"]
    bad = workdir / "big-policy-bad.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    res["bad"] = time_load(bad)
    return res


# -- the part -----------------------------------------------------------------

def run(*, sizes: tuple[int, ...], logins: int, shared: int, ausctl: int, policy_rules: int,
        policy_runs: int, workdir: Path, log=print) -> dict:
    lay = Layout(sizes, logins, shared, ausctl)
    res: dict = {"sizes": list(sizes), "logins": logins, "shared": shared,
                 "policy_rules_in_ausd": len(lay.rules)}
    log(f"rulesets: policy file of {policy_rules} rules ...")
    res["policy_file"] = policy_file(workdir, policy_rules, policy_runs)
    rsdir = workdir / "rulesets"
    rsdir.mkdir()
    os.chmod(rsdir, 0o755)
    files = lay.write_directory(rsdir)
    settings = {"max_rules": 1 << (len(lay.rules) + 2).bit_length(),
                "max_destinations": 1 << 20, "scan_interval": 0.5}
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(common.cgroup())
        d = controlpath.Daemon(rsdir, cg, files, settings)
        stack.callback(d.close)
        d.policy_path.write_text(yaml.safe_dump(lay.policy(), sort_keys=False))
        log(f"rulesets: starting ausd with {len(lay.rules)} rules ...")
        res["cold_start_s"] = d.start()
        maps = stack.enter_context(pins.pinned_maps(d.pin_dir))
        for n in sizes:
            kinds = lay.users[n]
            for kind in ("new", "shared"):
                log(f"rulesets: {len(kinds[kind])} logins with {n} rules ({kind} ruleset) ...")
                lat, counts = [], []
                cpu0 = cpu_seconds(d.proc.pid)
                for uid, last_rule, addr in kinds[kind]:
                    def check(reply, last_rule=last_rule, addr=addr):
                        counts.append(reply["rules"])
                        got = in_kernel(maps, reply["ruleset"], addr)
                        if got != last_rule:
                            raise AssertionError(f"login {uid}: the kernel gives {got!r} for "
                                                 f"{addr}:{PORT}/tcp, not {last_rule!r} "
                                                 f"(reply: {reply})")
                    lat.append(login(d.socket, uid, check))
                    time.sleep(0.05)
                res[f"{kind}_{n}"] = {"login_s": lat, "rules_per_user": sorted(set(counts)),
                                      "ausd_cpu_s": cpu_seconds(d.proc.pid) - cpu0}
            res[f"ausctl_{n}"] = [ausctl_open(d.config_path, uid) for uid, _, _ in kinds["ausctl"]]
        res["rss_mb"] = d.rss_mb()
    return res


def part(res: dict) -> common.Part:
    pf = res["policy_file"]
    loads = [r["load"] for r in pf["runs"]]
    compiles = [r["compile"] for r in pf["runs"]]
    totals = [r["load"] + r["compile"] for r in pf["runs"]]
    tot = common.summarize(totals)
    lines = [
        f"A real ausd on a cgroup of its own, {res['policy_rules_in_ausd']} rules in its policy; "
        "each login is a new process with the user's login UID sending `session open`, "
        "timed to its reply (the user's rules written); the user's last rule is then looked "
        "up in the kernel's maps before the session closes. ausd's CPU time per login counts "
        "all it did meanwhile (the login, the logout's cleanup at the next scan, and any "
        "other login UIDs on the machine its scans see).",
        "",
        "| rules per user | ruleset | logins | p50 | p99 | max | ausd CPU per login | "
        "`ausctl session open` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for n in res["sizes"]:
        runs = res[f"ausctl_{n}"]
        ok = sum(1 for r in runs if r["exit"] == 0)
        ctl = (f"{ok}/{len(runs)} exit 0, slowest {max(r['seconds'] for r in runs):.2f} s "
               "(the whole process, Python's start included)" if runs else "not run")
        for kind in ("new", "shared"):
            lat = [x * 1000 for x in res[f"{kind}_{n}"]["login_s"]]
            if not lat:
                continue
            p50, p99 = common.percentile(lat, 50), common.percentile(lat, 99)
            what = "new (compiled and written)" if kind == "new" else "shared (in the kernel)"
            cpu = res[f"{kind}_{n}"]["ausd_cpu_s"] / len(lat) * 1000
            lines.append(f"| {n:,} | {what} | {len(lat)} | {p50:.1f} ms | {p99:.1f} ms | "
                         f"{max(lat):.1f} ms | {cpu:.1f} ms | {ctl if kind == 'new' else ''} |")
        lat_new = [x * 1000 for x in res[f"new_{n}"]["login_s"]]
        p99 = common.percentile(lat_new, 99)
        verdicts.append(common.Verdict(
            f"login to rules in the kernel, {n:,} rules per user, new ruleset: p99 <= 100 ms",
            f"p99 {p99:.1f} ms, p50 {common.percentile(lat_new, 50):.1f} ms over "
            f"{len(lat_new)} logins", p99 <= 100))
        verdicts.append(common.Verdict(
            f"`ausctl session open` confirms, {n:,} rules per user (exit 0, no timeout)",
            ctl, bool(runs) and ok == len(runs)))
    lines += [
        "",
        f"Policy file of {pf['rules']:,} rules ({pf['bytes'] / 1e6:.1f} MB of YAML), loaded "
        f"(YAML and validation) and compiled in a fresh process, {len(totals)} runs: "
        f"load {common.summarize(loads).fmt(2)} s, compile {common.summarize(compiles).fmt(2)} s, "
        f"together {tot.fmt(2)} s (median (min-max)).",
        f"The same file with one bad reference in its last rule: refused in "
        f"{pf['bad']['load']:.2f} s with "
        f"`{' '.join(pf['bad'].get('error', 'NO ERROR').split())[-110:]}`.",
        f"ausd cold start with this policy: {res['cold_start_s']:.1f} s; "
        f"resident memory after the logins: {res['rss_mb']:.0f} MB.",
    ]
    verdicts.append(common.Verdict(
        f"a {pf['rules']:,}-rule policy loads and compiles in <= 1 s",
        f"median {tot.median:.2f} s (load {common.summarize(loads).median:.2f} s + compile "
        f"{common.summarize(compiles).median:.2f} s), worst {tot.hi:.2f} s", tot.median <= 1.0))
    return common.Part("Large rulesets", "\n".join(lines), tuple(verdicts), res)


def scale_part(tiny: bool, workdir: Path) -> common.Part:
    if tiny:
        res = run(sizes=(1, 100, 1000), logins=8, shared=4, ausctl=1, policy_rules=1000,
                  policy_runs=2, workdir=workdir)
    else:
        res = run(sizes=(1, 100, 10_000), logins=200, shared=50, ausctl=5, policy_rules=10_000,
                  policy_runs=5, workdir=workdir)
    return part(res)
