"""Run the benchmark suite and write the results as Markdown.

    python -m bench.run                 the full suite (about 20 minutes)
    python -m bench.run --tiny          a seconds-long smoke run
    python -m bench.run --out FILE      where the Markdown goes

Every data-path figure is a ratio to the no-filter baseline measured just
before it in the same run; never compare absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from . import common, controlpath, datapath

TARGETS = """Targets (median ratios to no filter, 10,000 users x 100 rules): connect and UDP
rate >= 0.95; under 5% change from 1x1 to 10,000x100; ahead of the best
nftables form at every size. Control path: login p99 <= 10 ms, a policy
change reaching 10,000 users <= 1 s, resident memory <= 100 MB."""


def machine() -> str:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: Linux {platform.release()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM")


def datapath_tables(res: dict) -> tuple[str, list[str]]:
    lines, verdicts = [], []
    names = [c["name"] for c in res["configs"] if c["name"] != "none"]
    lines.append("| configuration | " + " | ".join(w[0] for w in datapath.WORKLOADS) + " |")
    lines.append("|---|" + "---|" * len(datapath.WORKLOADS))
    ratios: dict = {}
    for name in names:
        row = [name]
        for wname, *_ in datapath.WORKLOADS:
            samples = res["samples"][wname][name]
            r = common.summarize([s["rate"] / s["base"] for s in samples])
            ratios[(name, wname)] = r
            row.append(r.fmt())
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Baseline (no filter) absolute rates in this run, median (min-max), and its "
                 "noise floor: the ratio of each baseline measurement to the one before it.")
    lines.append("")
    lines.append("| workload | baseline rate | noise floor |")
    lines.append("|---|---|---|")
    for wname, _mode, _port, unit in datapath.WORKLOADS:
        base = common.summarize([s["rate"] for s in res["samples"][wname]["none"]])
        pairs = res["baseline_pairs"].get(wname) or [1.0]
        noise = common.summarize(pairs)
        lines.append(f"| {wname} | {base.median:,.0f} {unit} ({base.lo:,.0f}-{base.hi:,.0f}) "
                     f"| {noise.fmt(3)} |")

    def ratio(name, w):
        return ratios.get((name, w))

    sizes = sorted({(c["name"].split()[1]) for c in res["configs"] if c["name"].startswith("aus ")},
                   key=lambda s: tuple(int(x) for x in s.split("x")))
    if sizes:
        big, small = sizes[-1], sizes[0]
        for w in ("connect allowed", "udp allowed"):
            r = ratio(f"aus {big}", w)
            verdicts.append(f"{'MET ' if r.median >= 0.95 else 'MISSED'}: aus {big} {w} ratio "
                            f"{r.median:.3f} (target >= 0.95)")
            r0 = ratio(f"aus {small}", w)
            change = abs(r.median - r0.median) / r0.median
            verdicts.append(f"{'MET ' if change < 0.05 else 'MISSED'}: aus {w} changes "
                            f"{change * 100:.1f}% from {small} to {big} (target < 5%)")
        for size in sizes:
            for w in ("connect allowed", "udp allowed"):
                a, n = ratio(f"aus {size}", w), ratio(f"nft-set {size}", w)
                if a and n:
                    verdicts.append(f"{'MET ' if a.median > n.median else 'MISSED'}: {size} {w}: "
                                    f"aus {a.median:.3f} vs best nftables {n.median:.3f}")
    return "\n".join(lines), verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a smoke run: small sizes, short rounds")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--seconds", type=float, help="length of one measurement")
    ap.add_argument("--skip-datapath", action="store_true")
    ap.add_argument("--skip-controlpath", action="store_true")
    ap.add_argument("--out", default="BENCHMARKS-results.md", help="Markdown output")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (cgroups, namespaces, eBPF)", file=sys.stderr)
        return 2
    common.unwind_on_sigterm()
    if args.tiny:
        users, rules, linear_max = [1, 10], [1, 10], 100
        rounds, seconds = args.rounds or 2, args.seconds or 0.1
        cp_users, cp_logins = 50, 20
    else:
        users, rules, linear_max = [1, 100, 10000], [1, 10, 100], 1000
        rounds, seconds = args.rounds or 5, args.seconds or 0.5
        cp_users, cp_logins = 10000, 1000
    started = time.time()
    out = ["# Benchmark results\n", f"Machine: {machine()}  ",
           f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
           f"command: `sudo scripts/bench.sh{' --tiny' if args.tiny else ''}`\n", TARGETS, ""]
    raw = {}
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="aus-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        if not args.skip_datapath:
            configs = datapath.default_configs(users, rules, linear_max)
            res = datapath.run(configs, rounds=rounds, seconds=seconds, workdir=work)
            raw["datapath"] = res
            table, v = datapath_tables(res)
            verdicts += v
            out += [f"## Data path: ratio to no filter, median (min-max) over {rounds} rounds",
                    "", f"Each measurement lasts {seconds} s; a managed user's process in a "
                    "test cgroup sends to a destination on the loopback of a namespace of "
                    "its own.", "", table, "",
                    "Kernel state per aus configuration: " + "; ".join(
                        f"{c['name']}: {c.get('rulesets', '-')} rulesets, "
                        f"{c.get('destinations', '-')} destination entries"
                        for c in res["configs"] if c["name"].startswith("aus ")), ""]
        if not args.skip_controlpath:
            res = controlpath.run(users=cp_users, logins=cp_logins, workdir=work)
            raw["controlpath"] = res
            table, v = controlpath.tables(res)
            verdicts += v
            out += ["## Control path", "", table, ""]
    out += ["## Verdicts", ""] + [f"- {v}" for v in verdicts] + [
        "", f"Suite time: {time.time() - started:.0f} s."]
    text = "\n".join(out) + "\n"
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
