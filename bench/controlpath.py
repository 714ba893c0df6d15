"""Control-path benchmark: the real ausd with many logged-in users.

The directory is a private one: ausd runs in a mount namespace of its own
where generated /etc/passwd, /etc/group and /etc/nsswitch.conf hold the
bench users (U users in 100 teams, all in `everyone`), so the machine's
own files are never touched. U processes hold those users' login UIDs, as
login sessions would. Measured:

* cold start to READY (programs compiled, every user's rules written),
* restart to READY adopting the pins (programs swapped in place),
* a policy change touching every user: the reload request's round trip,
  which returns once every user's entry points at the new rules,
* login: `session open` round trip for new users, one at a time,
* resident memory of ausd, and map memory per user and per rule.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from aus.agent import control, pins
from tests.support import logins
from tests.support.names import unique

from . import common

HOLDER_BASE = 70000
LOGIN_BASE = 200000
TEAMS = 100


def policy(extra_port: int | None) -> dict:
    rules = [{"name": f"team{k}", "sources": [f"team{k}"], "destinations": [f"10.{k}.0.0/16"],
              "services": ["443/tcp", "22/tcp"]} for k in range(TEAMS)]
    services = ["80/tcp"] + ([f"{extra_port}/tcp"] if extra_port else [])
    rules.append({"name": "everyone-web", "sources": ["everyone"],
                  "destinations": ["198.51.100.0/24", "2001:db8:100::/48"], "services": services})
    return {"user_groups": [{"name": f"team{k}"} for k in range(TEAMS)] + [{"name": "everyone"}],
            "rules": rules}


def write_directory(workdir: Path, uids: list[int]) -> tuple[Path, Path, Path]:
    passwd = [line for line in Path("/etc/passwd").read_text().splitlines() if line]
    group = [line for line in Path("/etc/group").read_text().splitlines() if line]
    members: dict[str, list[str]] = {f"team{k}": [] for k in range(TEAMS)}
    members["everyone"] = []
    for uid in uids:
        name = f"b{uid}"
        passwd.append(f"{name}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin")
        members[f"team{uid % TEAMS}"].append(name)
        members["everyone"].append(name)
    for i, (g, names) in enumerate(members.items()):
        group.append(f"{g}:x:{300000 + i}:{','.join(names)}")
    paths = workdir / "passwd", workdir / "group", workdir / "nsswitch.conf"
    paths[0].write_text("\n".join(passwd) + "\n")
    paths[1].write_text("\n".join(group) + "\n")
    paths[2].write_text("passwd: files\ngroup: files\nshadow: files\n")
    return paths


class Daemon:
    """ausd in a private mount namespace with the bench directory."""

    def __init__(self, workdir: Path, cg: Path, files, settings: dict | None = None):
        self.workdir = workdir
        self.pin_dir = Path("/sys/fs/bpf") / unique("aus-bench-cp-")
        self.policy_path = workdir / "policy.yaml"
        self.config_path = workdir / "ausd.yaml"
        self.socket = workdir / "ausd.sock"
        self.files = files
        self.proc: subprocess.Popen | None = None
        self.config_path.write_text(yaml.safe_dump({
            "policy": str(self.policy_path), "cgroup": str(cg), "pin_dir": str(self.pin_dir),
            "socket": str(self.socket), "log_level": "warning", "groups_ttl": 600.0,
            **(settings or {})}))

    def write_policy(self, extra_port: int | None) -> None:
        tmp = self.policy_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(policy(extra_port)))
        tmp.replace(self.policy_path)

    def command(self) -> list[str]:
        """ausd in a private mount namespace over a copy of /etc with the
        bench's files: a file bind-mounted alone is unmounted when something
        on the machine renames a new /etc/passwd over it (useradd does), and
        ausd would see the machine's users from then on."""
        passwd, group, nss = self.files
        etc = self.workdir / "etc"
        script = (f"rm -rf {etc} && mkdir {etc} && cp -a /etc/. {etc}/ && "
                  f"cp {passwd} {etc}/passwd && cp {group} {etc}/group && "
                  f"cp {nss} {etc}/nsswitch.conf && mount --bind {etc} /etc && "
                  f"exec {sys.executable} -m aus.agent.ausd --config {self.config_path}")
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]

    def start(self, timeout: float = 300) -> float:
        """Start and wait for READY; seconds from spawn to READY."""
        npath = self.workdir / unique("notify")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(npath))
        notify.settimeout(timeout)
        log = open(self.workdir / "ausd.log", "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, NOTIFY_SOCKET=str(npath)))
        log.close()
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
        except socket.timeout:
            raise RuntimeError("ausd did not become ready:\n"
                               + (self.workdir / "ausd.log").read_text()[-3000:]) from None
        finally:
            notify.close()
            npath.unlink()
        return time.perf_counter() - t0

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def rss_mb(self) -> float:
        """Resident set size in MiB: resident pages in /proc/PID/statm."""
        resident = int((Path("/proc") / str(self.proc.pid) / "statm").read_text().split()[1])
        return resident * os.sysconf("SC_PAGE_SIZE") / 2**20

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        if self.pin_dir.exists():
            pins.uninstall(self.pin_dir)


@contextlib.contextmanager
def holders(binary: Path, base: int, count: int):
    p = subprocess.Popen([str(binary), "holders", str(base), str(count)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def login_once(sock: Path, loginuid: int) -> float:
    """A login: a new process with this login UID asks for its session;
    the round trip in seconds, measured inside that process."""
    return logins.session_open(sock, loginuid)[1]


def map_memory(pin_dir: Path) -> dict:
    out = {}
    layout = pins.PinLayout(pin_dir)
    for name in ("aus_users", "aus_dst", "aus_svc", "aus_user_stats", "aus_rule_stats"):
        p = common.run("bpftool", "-j", "map", "show", "pinned", str(layout.map(name)))
        info = json.loads(p.stdout)
        out[name] = {"bytes": info.get("bytes_memlock"), "max_entries": info.get("max_entries")}
    with pins.pinned_maps(pin_dir) as maps:
        out["aus_dst"]["entries"] = sum(1 for _ in maps["aus_dst"].keys())
        out["aus_svc"]["entries"] = sum(1 for _ in maps["aus_svc"].keys())
        out["aus_users"]["entries"] = sum(1 for _ in maps["aus_users"].keys())
    return out


def users_pointing_at(pin_dir: Path, uids: list[int]) -> dict[int, int]:
    with pins.pinned_maps(pin_dir) as maps:
        return {k.value: v.ruleset for k, v in maps["aus_users"].items() if k.value in set(uids)}


def run(*, users: int, logins: int, workdir: Path, log=print) -> dict:
    binary = common.build_workload(workdir / "build")
    res: dict = {"users": users, "logins": logins}
    holder_uids = list(range(HOLDER_BASE, HOLDER_BASE + users))
    login_uids = list(range(LOGIN_BASE, LOGIN_BASE + logins))
    cpdir = workdir / "controlpath"
    cpdir.mkdir()
    os.chmod(cpdir, 0o755)
    files = write_directory(cpdir, holder_uids + login_uids)
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(common.cgroup())
        log(f"control path: starting {users} login sessions ...")
        stack.enter_context(holders(binary, HOLDER_BASE, users))
        d = Daemon(cpdir, cg, files)
        stack.callback(d.close)
        d.write_policy(None)
        log("control path: cold start ...")
        res["cold_start_s"] = d.start()
        res["rss_mb_ready"] = d.rss_mb()
        res["start_stages"] = control.request(d.socket, "status")["start_stages"]
        before = users_pointing_at(d.pin_dir, holder_uids)
        res["users_in_maps_at_ready"] = len(before)

        log("control path: policy changes ...")
        changes = []
        for i in range(5):
            d.write_policy(8080 + i)
            t0 = time.perf_counter()
            control.request(d.socket, "reload", timeout=120)
            changes.append(time.perf_counter() - t0)
            after = users_pointing_at(d.pin_dir, holder_uids)
            moved = sum(1 for u in holder_uids if after.get(u) != before.get(u))
            assert moved == users, f"only {moved} of {users} users got the new rules"
            before = after
        res["policy_change_s"] = changes

        log(f"control path: {logins} logins ...")
        lat = [login_once(d.socket, uid) for uid in login_uids]
        res["login_s"] = lat
        res["rss_mb_after"] = d.rss_mb()
        res["map_memory"] = map_memory(d.pin_dir)

        log("control path: restart ...")
        d.stop()
        res["restart_s"] = d.start()
        res["adopted"] = "replaced in place" in (cpdir / "ausd.log").read_text() or \
            bool(users_pointing_at(d.pin_dir, holder_uids))
    return res


def tables(res: dict) -> tuple[str, list[str]]:
    lat_ms = [x * 1000 for x in res["login_s"]]
    chg = common.summarize(res["policy_change_s"])
    mem = res["map_memory"]
    dst = mem["aus_dst"]
    users_map = mem["aus_users"]
    per_dst = dst["bytes"] / dst["entries"] if dst.get("entries") and dst.get("bytes") else None
    lines = [
        f"{res['users']} logged-in users (one process each), 100 teams, {TEAMS + 1} rules.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| cold start to READY (compile, attach, {res['users']} users written) | {res['cold_start_s']:.2f} s |",
        "| of which: " + ", ".join(f"{k} {v:.2f} s" for k, v in res["start_stages"].items())
        + " |  |",
        f"| restart to READY, adopting the pins | {res['restart_s']:.2f} s |",
        f"| policy change reaching all {res['users']} users, median (min-max) of 5 | "
        f"{chg.median * 1000:.0f} ms ({chg.lo * 1000:.0f}-{chg.hi * 1000:.0f}) |",
        f"| login (`session open`) to rules in the kernel, p50 / p99 / max of {len(lat_ms)} | "
        f"{common.percentile(lat_ms, 50):.2f} / {common.percentile(lat_ms, 99):.2f} / {max(lat_ms):.2f} ms |",
        f"| resident memory of ausd at READY / after the logins | "
        f"{res['rss_mb_ready']:.1f} / {res['rss_mb_after']:.1f} MB |",
        f"| aus_dst: {dst.get('entries')} entries | {dst.get('bytes')} bytes"
        + (f" ({per_dst:.0f} bytes per destination entry) |" if per_dst else " |"),
        f"| aus_users: {users_map.get('entries')} entries of {users_map.get('max_entries')} | "
        f"{users_map.get('bytes')} bytes (preallocated: "
        f"{users_map['bytes'] / users_map['max_entries']:.0f} bytes per user slot) |",
        f"| aus_user_stats (per-CPU array) | {mem['aus_user_stats']['bytes']} bytes "
        f"({mem['aus_user_stats']['bytes'] / mem['aus_user_stats']['max_entries']:.0f} per user slot) |",
        f"| aus_svc: {mem['aus_svc'].get('entries')} entries | {mem['aus_svc']['bytes']} bytes |",
    ]
    p99 = common.percentile(lat_ms, 99)
    verdicts = [
        f"{'MET ' if p99 <= 10 else 'MISSED'}: login p99 {p99:.2f} ms (target <= 10 ms)",
        f"{'MET ' if chg.hi <= 1.0 else 'MISSED'}: policy change to {res['users']} users, "
        f"worst {chg.hi * 1000:.0f} ms (target <= 1 s)",
        f"{'MET ' if res['rss_mb_after'] <= 100 else 'MISSED'}: resident memory "
        f"{res['rss_mb_after']:.1f} MB (target <= 100 MB)",
    ]
    return "\n".join(lines), verdicts
