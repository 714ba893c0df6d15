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
    done = False
    try:
        yield path
        done = True
    finally:
        if path.exists():
            _empty_and_remove(path)
        elif done:
            # Removed by something else, or the cgroup2 mount is gone. After
            # an error of the caller's, that error is the one worth reading.
            raise RuntimeError(f"test cgroup {path} disappeared while in use")


def _empty_and_remove(path: Path) -> None:
    for _ in range(100):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    path.rmdir()
