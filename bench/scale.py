"""The fleet-scale suite: every target of the fleet at the size of a real
tenant (100,000 users, 10,000 groups, 10,000 workloads), measured at that
size in one run, and written as Markdown with MET or MISSED per target.

    python -m bench.scale                  every part at full size
    python -m bench.scale --tiny           the same code on small sizes
    python -m bench.scale --only fleet,sync
    python -m bench.scale --out FILE       where the Markdown goes

Each part is a module with ``scale_part(tiny, workdir) -> common.Part``;
they run one after another so none shares the CPUs with another.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import common
from .run import machine

# name -> module; the order is the order of the run and of the results
PARTS: dict[str, str] = {
    "fleet": "bench.fleet",
    "sync": "bench.scim_sync",
    "startup": "bench.startup",
    "rulesets": "bench.rulesets",
    "connect": "bench.connect",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--only", help="comma-separated parts: " + ", ".join(PARTS))
    ap.add_argument("--out", default="BENCHMARKS-scale.md", help="Markdown output")
    ap.add_argument("--json", help="also write the raw figures here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.scale: needs root (cgroups, namespaces, eBPF, PostgreSQL)", file=sys.stderr)
        return 2
    common.unwind_on_sigterm()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"bench.scale: unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}",
              file=sys.stderr)
        return 2
    started = time.time()
    command = "sudo scripts/bench-scale.sh" + (" --tiny" if args.tiny else "") + \
        (f" --only {args.only}" if args.only else "")
    out = ["# Fleet-scale results\n", f"Machine: {machine()}  ",
           f"Run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, command: `{command}`\n"]
    verdicts: list[common.Verdict] = []
    raw: dict = {}
    failed = False
    for name in names:
        t0 = time.time()
        print(f"bench.scale: {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"aus-scale-{name}-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)
            try:
                part = importlib.import_module(PARTS[name]).scale_part(args.tiny, work)
            except Exception:
                failed = True
                out += [f"## {name}: FAILED", "", "```", traceback.format_exc().strip(), "```", ""]
                verdicts.append(common.Verdict(f"{name}: the part ran", "it failed", False))
                continue
        raw[name] = part.raw
        verdicts += part.verdicts
        out += [f"## {part.title}", "", part.markdown.strip(), "",
                f"Part time: {time.time() - t0:.0f} s.", ""]
        # written after every part: a long run stopped midway keeps what it measured
        _write(args, out, verdicts, raw, started, done=False)
    text = _write(args, out, verdicts, raw, started, done=True)
    print(text)
    return 1 if failed else 0


def _write(args, out: list[str], verdicts: list[common.Verdict], raw: dict, started: float,
           done: bool) -> str:
    lines = out + ["## Verdicts", "", "| target | figure | |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.figure} | {'MET' if v.met else '**MISSED**'} |"
              for v in verdicts]
    lines += ["", f"Suite time: {time.time() - started:.0f} s." if done
              else "The run has not finished: the parts above are complete."]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    return text


if __name__ == "__main__":
    sys.exit(main())
