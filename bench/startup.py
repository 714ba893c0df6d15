"""Start-up benchmark (bench.scale part ``startup``): how soon ausd is READY
with 10,000 logged-in users, and how logins fare while the directory is
refreshed behind READY.

Each directory backend runs in a mount namespace of its own (``unshare -m
--propagation private``), where this module is started again as a child
that builds the directory, bind-mounts it over /etc and runs ausd there:

* ``files``: generated /etc/passwd, /etc/group and nsswitch.conf (``files``
  alone), U users in 100 teams, all in `everyone` (a U-member group);
* ``sssd``: a throwaway OpenLDAP (slapd on loopback) holding the same users
  and groups (rfc2307, memberUid), served by a real SSSD, nsswitch.conf
  ``files sss`` (see bench/sssd_directory.py).

In each: U processes hold real login UIDs (one per user, as sessions
would). Measured, from spawn to READY (sd_notify on a socket of ours):
cold start (no pins: compile, every user looked up), then restart
adopting the pins (the programs and maps as they are; the directory is
refreshed after READY), then logins (``session open``, one at a time, as
the PAM hook does) sent from the moment READY arrives, while the refresh
runs, and the time the refresh took.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from aus.agent import control

from . import common, controlpath

HOLDER_BASE = 70000
LOGIN_BASE = 200000
BACKENDS = ("files", "sssd")
READY_TARGET = 1.0       # restart adopting pins, seconds
COLD_TARGET = 3.0        # cold start, seconds
LOGIN_P99_TARGET = 10.0  # ms, the login target of the control path


class Ausd(controlpath.Daemon):
    """ausd started in this mount namespace (the directory is already in
    place here)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "aus.agent.ausd", "--config", str(self.config_path)]


def _login_stream(sock: Path, uids: list[int]) -> list[dict]:
    """Logins one after another; each with its latency and when it ended."""
    out = []
    for uid in uids:
        dt = controlpath.login_once(sock, uid)
        out.append({"uid": uid, "s": dt, "at": time.time()})
    return out


def measure(workdir: Path, users: int, logins: int, log=print) -> dict:
    """Cold start, restart adopting pins, logins during the refresh, in
    the current mount namespace (whose NSS serves the bench users)."""
    binary = common.build_workload(workdir / "build")
    holder_uids = list(range(HOLDER_BASE, HOLDER_BASE + users))
    res: dict = {"users": users, "logins": logins}
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(common.cgroup())
        log(f"startup: {users} login sessions ...")
        stack.enter_context(controlpath.holders(binary, HOLDER_BASE, users))
        d = Ausd(workdir, cg, None)
        stack.callback(d.close)
        d.write_policy(None)
        log("startup: cold start ...")
        res["cold_start_s"] = d.start()
        t_ready = time.perf_counter()
        # ausd writes before READY and removes nobody here: users found by
        # the first count were in the maps at READY
        res["cold_users_in_maps"] = n = len(controlpath.users_pointing_at(d.pin_dir, holder_uids))
        res["cold_all_users_s"] = res["cold_start_s"]
        while n < users and time.perf_counter() - t_ready < 600:
            time.sleep(0.05)
            n = len(controlpath.users_pointing_at(d.pin_dir, holder_uids))
            res["cold_all_users_s"] = res["cold_start_s"] + time.perf_counter() - t_ready
        st = control.request(d.socket, "status")
        res["cold_stages"] = st["start_stages"]
        res["cold_directory"] = st["directory"]
        # let the first refresh settle so the restart finds a quiet daemon
        time.sleep(0.5)
        log("startup: restart adopting the pins ...")
        d.stop()
        res["restart_s"] = d.start()
        ready_at = time.time()
        lg = _login_stream(d.socket, list(range(LOGIN_BASE, LOGIN_BASE + logins)))
        st = control.request(d.socket, "status")
        res["restart_stages"] = st["start_stages"]
        res["restart_users_in_maps"] = len(controlpath.users_pointing_at(d.pin_dir, holder_uids))
        deadline = time.monotonic() + 300
        while st["directory"]["adopted_not_refreshed"] and time.monotonic() < deadline:
            time.sleep(0.05)
            st = control.request(d.socket, "status")
        dr = st["directory"]
        res["refresh"] = dr
        res["refresh_s"] = (dr["refresh_done"] - dr["refresh_started"]) \
            if dr["refresh_done"] else None
        done = dr["refresh_done"] or float("inf")
        res["logins_s"] = [x["s"] for x in lg]
        res["logins_during_refresh_s"] = [x["s"] for x in lg if x["at"] <= done]
        res["first_login_after_ready_s"] = lg[0]["at"] - ready_at if lg else None
        res["reused_programs"] = "take the attached programs" in res["restart_stages"]
    return res


# ---- the child in its own mount namespace ---------------------------------------

def _private_mount_ns() -> None:
    """Refuse to mount over /etc unless this mount namespace is not the
    parent's and propagates nothing."""
    mine = os.readlink("/proc/self/ns/mnt")
    if os.readlink(f"/proc/{os.getppid()}/ns/mnt") == mine:
        raise SystemExit("bench.startup: run under `unshare -m --propagation private`")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if any(f.startswith("shared:") for f in fields[6:fields.index("-")]):
            raise SystemExit(f"bench.startup: {fields[4]} propagates mounts")


def child(backend: str, workdir: Path, users: int, logins: int) -> dict:
    _private_mount_ns()
    uids = list(range(HOLDER_BASE, HOLDER_BASE + users)) + \
        list(range(LOGIN_BASE, LOGIN_BASE + logins))
    with contextlib.ExitStack() as stack:
        if backend == "files":
            passwd, group, nss = controlpath.write_directory(workdir, uids)
            for src, dst in ((passwd, "/etc/passwd"), (group, "/etc/group"),
                             (nss, "/etc/nsswitch.conf")):
                common.run("mount", "--bind", str(src), dst)
        else:
            from . import sssd_directory
            built = stack.enter_context(sssd_directory.directory(
                workdir, uids, controlpath.TEAMS, log=_err))
        res = measure(workdir, users, logins, log=_err)
        if backend != "files":
            res["directory_build"] = built
        return res


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_backend(backend: str, workdir: Path, users: int, logins: int) -> dict:
    work = workdir / backend
    work.mkdir()
    os.chmod(work, 0o755)
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-m",
                        "bench.startup", backend, str(work), str(users), str(logins)],
                       capture_output=True, text=True, timeout=1800,
                       cwd=Path(__file__).resolve().parents[1])
    if p.returncode != 0:
        raise RuntimeError(f"startup {backend} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def tables(results: dict[str, dict]) -> tuple[str, list[common.Verdict]]:
    lines = ["| backend | cold start to READY | of which directory (after the compile) | "
             "cold start to every user's rules in the maps | restart to READY "
             "(adopting pins) | refresh after READY | logins during refresh: p50 / p99 / max "
             "(n of all) |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for backend, r in results.items():
        during = [x * 1000 for x in r["logins_during_refresh_s"]]
        cell = (f"{common.percentile(during, 50):.2f} / {common.percentile(during, 99):.2f} / "
                f"{max(during):.2f} ms ({len(during)} of {len(r['logins_s'])})"
                if during else f"none fell in the refresh ({len(r['logins_s'])} logins)")
        refresh = f"{r['refresh_s']:.2f} s" if r["refresh_s"] is not None else "not done"
        lines.append(f"| {backend} | {r['cold_start_s']:.2f} s | "
                     f"{r['cold_stages'].get('directory lookups', 0):.2f} s | "
                     f"{r['cold_all_users_s']:.2f} s | "
                     f"{r['restart_s']:.2f} s | {refresh} | {cell} |")
        n = r["users"]
        verdicts.append(common.Verdict(
            f"startup ({backend}): restart to READY adopting pins, {n} users, <= {READY_TARGET:g} s",
            f"{r['restart_s']:.2f} s", r["restart_s"] <= READY_TARGET))
        verdicts.append(common.Verdict(
            f"startup ({backend}): cold start to READY, {n} users, <= {COLD_TARGET:g} s",
            f"{r['cold_start_s']:.2f} s", r["cold_start_s"] <= COLD_TARGET))
        allv = [x * 1000 for x in r["logins_s"]]
        p99 = common.percentile(allv, 99)
        verdicts.append(common.Verdict(
            f"startup ({backend}): login right after a restart, during the refresh, "
            f"p99 <= {LOGIN_P99_TARGET:g} ms",
            f"p99 {p99:.2f} ms of {len(allv)} ({len(during)} while the refresh ran)",
            p99 <= LOGIN_P99_TARGET))
    first = next(iter(results.values()))
    text = "\n".join([
        f"{first['users']} logged-in users (one process each, real login UIDs), 100 teams, "
        f"101 rules; {first['logins']} logins sent one after another from the moment the "
        "restart's READY arrived. Each backend in a mount namespace of its own; ausd with "
        "the pins of the cold start for the restart.", "", *lines, "",
        "Stages of the restart (s): " + "; ".join(
            f"{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["restart_stages"].items())
            for b, r in results.items()),
        "", "Users in the maps at READY (cold start / restart; the rest of a cold start "
        "follow READY, denied until then): " + "; ".join(
            f"{b}: {r['cold_users_in_maps']} / {r['restart_users_in_maps']}"
            for b, r in results.items())])
    return text, verdicts


def scale_part(tiny: bool, workdir: Path) -> common.Part:
    users, logins = (200, 20) if tiny else (10_000, 200)
    results = {b: run_backend(b, workdir, users, logins) for b in BACKENDS}
    text, verdicts = tables(results)
    return common.Part(f"Start-up: READY without waiting for the directory ({users} users)",
                       text, tuple(verdicts), results)


if __name__ == "__main__":
    backend, work, n_users, n_logins = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4])
    print(json.dumps(child(backend, work, n_users, n_logins)))
