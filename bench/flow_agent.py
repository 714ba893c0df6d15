"""Flow-record benchmark: ausd's CPU while a managed user's processes
cause about 10,000 flow events per second, against the same daemon idle
in the same run.

A real ausd (enforce mode, the kernel's event rate limit raised so it does
not cap the load) on a cgroup of its own; a real local user logged in with
a login UID; a paced UDP sender as that user, in the cgroup, whose every
sendto() to a denied port is refused and reported (one event per call).
ausd's CPU is utime+stime from /proc/<pid>/stat over each phase. The
phases: idle; load to one destination (one record per window); load
spread over many destinations (that many records per window), without
and with the JSON-lines export. The events/s are the kernel's own count
of events sent (aus_stats) over the phase.

    python -m bench.flow_agent [--seconds 5] [--rate 10000] [--destinations 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aus.agent import mapview, pins
from tests.support import lab

TICK = os.sysconf("SC_CLK_TCK")
SENDER = r"""
import socket, sys, time
addr, rate, seconds, ports = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
batch = max(1, rate // 200)            # 200 batches a second
start = time.monotonic()
n = 0
while True:
    now = time.monotonic() - start
    if now >= seconds:
        break
    due = int(now * rate)
    while n < due:
        for _ in range(min(batch, due - n)):
            try:
                s.sendto(b"x", (addr, 20000 + n % ports))
            except PermissionError:
                pass
            n += 1
    time.sleep(1 / 200)
print(n)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime


def events_sent(pin_dir: Path) -> int:
    with pins.pinned_maps(pin_dir) as maps:
        return mapview.event_stats(maps)["events_sent"]


def phase(d: lab.Ausd, seconds: float, load=None) -> dict:
    pid = d.proc.pid
    c0, e0, t0 = cpu_seconds(pid), events_sent(d.pin_dir), time.monotonic()
    if load is None:
        time.sleep(seconds)
    else:
        load()
    wall = time.monotonic() - t0
    c1, e1 = cpu_seconds(pid), events_sent(d.pin_dir)
    return {"seconds": round(wall, 2), "cpu_pct": round(100 * (c1 - c0) / wall, 2),
            "events_per_s": round((e1 - e0) / wall)}


def sender(cg: Path, user: lab.User, addr: str, rate: int, seconds: float, ports: int):
    def go():
        p = lab.spawn([lab.PYTHON, "-c", SENDER, addr, str(rate), str(seconds), str(ports)],
                      cg=cg, loginuid=user.uid, uid=user.uid, gid=user.gid,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=seconds + 60)
        if p.returncode != 0:
            raise RuntimeError(f"sender failed: {err.strip()}")
    return go


def run(seconds: float, rate: int, destinations: int, log=print) -> list[dict]:
    rows = []
    with contextlib.ExitStack() as stack:
        peer = stack.enter_context(lab.peer([53]))
        cg = stack.enter_context(lab.cgroup())
        users, groups = stack.enter_context(lab.users({"bench": ["dev"]}))
        user = users["bench"]
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aus-bench-flows-")))
        policy = {"user_groups": [{"name": groups["dev"]}],
                  "ip_lists": {"peer": [f"{peer.v4}/32"]},
                  "services": {"dns": ["53/udp"]},
                  "rules": [{"name": "dns", "sources": [groups["dev"]],
                             "destinations": ["peer"], "services": ["dns"]}]}
        for export in (False, True):
            extra = {"flow_log": {"path": str(tmp / "flows.jsonl"), "max_bytes": 64 << 20,
                                  "keep": 1}} if export else {}
            with lab.ausd(cg, policy, events_per_second=rate * 10, events_burst=rate * 10,
                          log_level="info", **extra) as d:
                d.start()
                with lab.session(d, user.uid, user.uid, user.gid):
                    time.sleep(1)      # the start's own work settles
                    label = "export to a JSON-lines file" if export else "no export"
                    idle = phase(d, seconds)
                    rows.append({"phase": f"idle ({label})", **idle})
                    log(rows[-1])
                    for dests in ((1, destinations) if not export else (destinations,)):
                        load = phase(d, seconds, sender(cg, user, peer.v4, rate, seconds, dests))
                        rows.append({"phase": f"{dests} destinations ({label})", **load,
                                     "idle_cpu_pct": idle["cpu_pct"]})
                        log(rows[-1])
                    st = d.ctl_json("status")["flow_records"]
                    log({"flow_records": st})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| phase | events/s (kernel) | ausd CPU, % of one core | seconds |",
           "|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['phase']} | {r['events_per_s']} | {r['cpu_pct']} | {r['seconds']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flow_agent", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=10_000, help="flow events per second to cause")
    ap.add_argument("--destinations", type=int, default=1000)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.flow_agent needs root (it runs the real ausd)", file=sys.stderr)
        return 2
    rows = run(args.seconds, args.rate, args.destinations,
               log=lambda r: print(r, file=sys.stderr, flush=True))
    print(table(rows))
    worst = max(r["cpu_pct"] for r in rows if "idle_cpu_pct" in r)
    print(f"\nworst ausd CPU under load: {worst}% of one core (target at most 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
