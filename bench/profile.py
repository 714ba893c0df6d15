"""Per-program cost of enforcement: run time per program run and runs per
operation, from the kernel's own accounting (BPF_ENABLE_STATS, the same
counters as kernel.bpf_stats_enabled), for connect and UDP workloads.

    python -m bench.profile [--users N] [--rules M] [--seconds S]

The accounting itself adds a few tens of nanoseconds per run; compare
figures from this tool with each other, not with the ratios of bench.run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from aus.agent import bpfsys, pins
from tests.support.names import unique

from . import common, datapath


def profile(users: int, rules: int, seconds: float, workdir: Path) -> list[dict]:
    binary = common.build_workload(workdir / "build")
    rows = []
    with contextlib.ExitStack() as stack:
        cfg = datapath.Config("aus", users, rules)
        cfg.ns = stack.enter_context(common.netns(datapath.DEST))
        cfg.cg = stack.enter_context(common.cgroup())
        stack.enter_context(common.server(binary, cfg.ns, datapath.DEST, cpu=0))
        pin_dir = Path("/sys/fs/bpf") / unique("aus-profile-")
        stack.callback(pins.uninstall, pin_dir)
        loaded = datapath.setup_aus(cfg, pin_dir)
        stack.callback(loaded.close)
        stats_fd = bpfsys.enable_stats()
        stack.callback(os.close, stats_fd)
        for mode, port in (("connect", datapath.PORT_TCP), ("udp", datapath.PORT_UDP)):
            before = {h: bpfsys.prog_info(fd) for h, fd in loaded.prog_fds.items()}
            r = common.client(binary, mode, cfg.ns, cfg.cg, cfg.uid, datapath.DEST, port,
                              seconds, cpu=1)
            after = {h: bpfsys.prog_info(fd) for h, fd in loaded.prog_fds.items()}
            for hook, info in after.items():
                runs = info["run_cnt"] - before[hook]["run_cnt"]
                ns = info["run_time_ns"] - before[hook]["run_time_ns"]
                if runs >= r["ops"] * 0.5:
                    rows.append({"workload": mode, "rate": r["rate"], "program": hook,
                                 "runs_per_op": runs / r["ops"], "ns_per_run": ns / runs,
                                 "ns_per_op": ns / r["ops"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--rules", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aus-profile-") as tmp:
        os.chmod(tmp, 0o755)
        rows = profile(args.users, args.rules, args.seconds, Path(tmp))
    print(f"| workload | program | runs/op | ns/run | ns/op |  ({args.users} users x {args.rules} rules)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} ({r['rate']:,.0f}/s) | {r['program']} | {r['runs_per_op']:.2f} "
              f"| {r['ns_per_run']:.0f} | {r['ns_per_op']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
