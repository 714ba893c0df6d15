"""Test cgroups: children of the cgroup2 root that only the caller's own
processes join; never the root itself."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from aus.agent.config import cgroup2_root

from .names import unique


@contextlib.contextmanager
def cgroup(prefix: str):
    """A new child of the cgroup2 root named ``prefix`` + random digits;
    removed afterwards, the processes left in it (the caller's) killed by
    PID first."""
    path: Path = cgroup2_root() / unique(prefix)
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        path.rmdir()
