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
and with the JSON-lines export; windows of 2 s, so each phase closes
several. Then, in this process, what closing a full window of 10,000
records costs the loop. The events/s are the kernel's own count
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
from aus.agent.flowlog import FileSink
from aus.agent.flowrecords import Aggregator
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
            # Windows of 2 s: every load phase includes several closes.
            with lab.ausd(cg, policy, events_per_second=rate * 10, events_burst=rate * 10,
                          log_level="info", flow_window=2.0, **extra) as d:
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


def window_close(records: int, tmp: Path) -> dict:
    """What closing a full window costs ausd's loop, in this process (the
    same code ausd runs), best of three: the longest single step of the
    close (the loop serves other work between steps), all steps together,
    and the JSON-lines export, which runs in the export's own thread."""
    best: dict[str, float] = {}
    for n in range(3):
        clock = [0.0]
        agg = Aggregator(10.0, records, lambda uid: ("bench", ("DEV",)), lambda: clock[0])
        for port in range(records):
            agg.add({"time": time.time(), "login_uid": 1000, "verdict": "deny", "proto": "udp",
                     "dport": port % 65536, "dst": f"192.0.2.{port // 65536 + 1}",
                     "rule": None, "comm": "bench"})
        clock[0] = 10.0
        steps, closed = [], None
        while closed is None:
            t0 = time.perf_counter()
            closed = agg.step()
            steps.append(time.perf_counter() - t0)
        sink = FileSink(tmp / f"close-{n}.jsonl", 1 << 30, 0)
        t0 = time.perf_counter()
        sink(closed[0], 0)
        t1 = time.perf_counter()
        sink.flush()
        t2 = time.perf_counter()
        sink.close()
        for k, v in (("longest_step_ms", max(steps)), ("all_steps_ms", sum(steps)),
                     ("queue_ms", t1 - t0), ("export_thread_ms", t2 - t1)):
            best[k] = min(best.get(k, v), v)
    return {k: round(v * 1000, 2) for k, v in best.items()}


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
    ap.add_argument("--window-records", type=int, default=10_000,
                    help="records of the full window whose close is timed")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.flow_agent needs root (it runs the real ausd)", file=sys.stderr)
        return 2
    rows = run(args.seconds, args.rate, args.destinations,
               log=lambda r: print(r, file=sys.stderr, flush=True))
    print(table(rows))
    worst = max(r["cpu_pct"] for r in rows if "idle_cpu_pct" in r)
    print(f"\nworst ausd CPU under load: {worst}% of one core (target at most 10%)")
    with tempfile.TemporaryDirectory(prefix="aus-bench-close-") as tmp:
        close = window_close(args.window_records, Path(tmp))
    print(f"closing a full window of {args.window_records} records: the longest step holds "
          f"the loop {close['longest_step_ms']} ms ({close['all_steps_ms']} ms over all "
          f"steps); queueing it for the JSON-lines export {close['queue_ms']} ms; the export "
          f"thread writes it in {close['export_thread_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
