"""Shared pieces of the benchmark: building the C workload, private network
namespaces and cgroups (made by tests.support), starting a process inside
them with a login UID, and the statistics every table uses."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support import cgroups
from tests.support import netns as namespaces
from tests.support.sigterm import unwind_on_sigterm  # noqa: F401 - bench.run, bench.scale

HERE = Path(__file__).resolve().parent


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; a failure says what the command printed."""
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip()[-800:]}")
    return p


def build_workload(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "workload"
    src = HERE / "workload.c"
    if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
        run("cc", "-O2", "-Wall", "-o", str(binary), str(src))
    return binary


@contextlib.contextmanager
def netns(addr: str):
    """A network namespace whose loopback also holds ``addr``: the
    destination is on this machine, in a namespace of our own."""
    with namespaces.namespace("ausb") as name:
        namespaces.up("lo", [f"{addr}/32"], ns=name)
        # nsenter, not a preexec_fn: nothing of this process runs between
        # fork and exec for a one-off command
        run("nsenter", f"--net={namespaces.NETNS_RUN_DIR}/{name}", "sysctl", "-q", "-w",
            "net.ipv4.ip_local_port_range=1024 65535")
        yield name


def cgroup():
    """A benchmark cgroup (tests.support.cgroups), removed afterwards."""
    return cgroups.cgroup("aus-bench-")


def enter(ns: str | None = None, cg: Path | None = None, loginuid: int | None = None,
          uid: int | None = None, cpu: int | None = None):
    """preexec_fn: join a netns and a cgroup, set the login UID and uid."""
    def pre():
        if ns is not None:
            namespaces.enter(ns)
        if loginuid is not None:
            with open("/proc/self/loginuid", "w") as f:
                f.write(str(loginuid))
        if cg is not None:
            with open(cg / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    return pre


@contextlib.contextmanager
def server(binary: Path, ns: str, addr: str, cpu: int | None = None):
    p = subprocess.Popen([str(binary), "server", addr], stdout=subprocess.PIPE, text=True,
                         preexec_fn=enter(ns=ns, cpu=cpu))
    try:
        assert p.stdout.readline().strip() == "ready", "workload server did not start"
        yield p
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def client(binary: Path, mode: str, ns: str, cg: Path, uid: int, addr: str, port: int,
           seconds: float, cpu: int | None = None) -> dict:
    """One measurement: the C client as the measured user; its figures."""
    p = subprocess.run([str(binary), mode, addr, str(port), str(seconds)],
                       preexec_fn=enter(ns=ns, cg=cg, loginuid=uid, uid=uid, cpu=cpu),
                       capture_output=True, text=True, timeout=seconds + 30)
    if p.returncode != 0:
        raise RuntimeError(f"workload {mode} failed: {p.stderr.strip()}")
    fields = dict(kv.split("=") for kv in p.stdout.split())
    out = {k: float(v) for k, v in fields.items()}
    out["rate"] = (out["bytes"] if mode == "bulk" else out["ops"]) / out["seconds"]
    return out


@dataclass(frozen=True)
class Summary:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 2) -> str:
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}-{self.hi:.{digits}f})"


def summarize(values: list[float]) -> Summary:
    return Summary(statistics.median(values), min(values), max(values), len(values))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


# -- the fleet-scale suite (bench.scale): each part returns one of these -----


@dataclass(frozen=True)
class Verdict:
    """One target: what it asks, the figure measured in this run, met or not."""
    target: str
    figure: str
    met: bool


@dataclass(frozen=True)
class Part:
    """One section of the fleet-scale results: Markdown tables and verdicts."""
    title: str
    markdown: str
    verdicts: tuple[Verdict, ...]
    raw: dict | None = None
