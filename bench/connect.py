"""The connect and UDP targets at fleet size: the data-path suite's aus
10,000 x 100 configuration against no filter (rounds interleaved, every
figure a ratio to the baseline measured just before it), the same with the
destination allowed by a DNS-derived entry instead of an address rule
(aus-dns: the same targets), and the cost of each program per run from the
kernel's own accounting (bench.profile), which a shared machine disturbs
far less than rates.

    python -m bench.scale --only connect
"""

from __future__ import annotations

from pathlib import Path

from . import common, datapath, profile

FULL = {"users": 10000, "rules": 100, "rounds": 5, "seconds": 0.5, "profile_seconds": 2.0}
TINY = {"users": 100, "rules": 10, "rounds": 2, "seconds": 0.3, "profile_seconds": 0.3}
TARGET = 0.95
MEASURED = ("connect allowed", "udp allowed")


def measure(users: int, rules: int, rounds: int, seconds: float, profile_seconds: float,
            workdir: Path, log=print) -> dict:
    """Ratios to no filter for the two allowed workloads, then the profile."""
    configs = [datapath.Config("none"), datapath.Config("aus", users, rules),
               datapath.Config("aus-dns", users, rules)]
    workloads = [w for w in datapath.WORKLOADS if w[0] in MEASURED]
    res = datapath.run(configs, rounds=rounds, seconds=seconds, workdir=workdir / "datapath",
                       log=log, workloads=workloads)
    res["profile"] = profile.profile(users, rules, profile_seconds, workdir / "profile")
    res["size"] = {"users": users, "rules": rules}
    return res


def tables(res: dict) -> tuple[str, list[common.Verdict]]:
    users, rules = res["size"]["users"], res["size"]["rules"]
    units = {w[0]: w[3] for w in datapath.WORKLOADS}
    lines = [f"{users:,} users x {rules} rules, {res['rounds']} rounds of {res['seconds']} s, "
             "each aus measurement right after a no-filter one. aus-dns: the measured "
             "destination allowed by a DNS-derived entry (aus_dns) instead of an address rule.",
             "", "| workload | configuration | ratio to no filter, median (min-max) "
             "| per-round ratios | no filter, median |", "|---|---|---|---|---|"]
    verdicts = []
    for kind, what in (("aus", "an address rule"), ("aus-dns", "a DNS-derived entry")):
        name = f"{kind} {users}x{rules}"
        for w in MEASURED:
            samples = res["samples"][w][name]
            ratios = [s["rate"] / s["base"] for s in samples]
            r = common.summarize(ratios)
            base = common.summarize([s["base"] for s in samples])
            lines.append(f"| {w} | {kind} | {r.fmt()} | {', '.join(f'{x:.2f}' for x in ratios)} "
                         f"| {base.median:,.0f} {units[w]} |")
            verdicts.append(common.Verdict(f"{w} rate >= {TARGET} of no filter at "
                                           f"{users:,} x {rules}, allowed by {what}", r.fmt(),
                                           r.median >= TARGET))
    lines += ["", "Program cost per run (kernel run-time accounting, which adds a few tens "
              "of ns itself):", "",
              "| workload | program | runs/op | ns/run | ns/op |", "|---|---|---|---|---|"]
    for p in res["profile"]:
        lines.append(f"| {p['workload']} ({p['rate']:,.0f}/s) | {p['program']} "
                     f"| {p['runs_per_op']:.2f} | {p['ns_per_run']:.0f} | {p['ns_per_op']:.0f} |")
    return "\n".join(lines), verdicts


def scale_part(tiny: bool, workdir: Path) -> common.Part:
    size = TINY if tiny else FULL
    res = measure(**size, workdir=workdir)
    markdown, verdicts = tables(res)
    return common.Part("Connect and UDP rates at fleet size", markdown, tuple(verdicts), res)
