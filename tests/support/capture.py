"""A packet capture in a test's network namespace (lab_capture.py, an
AF_PACKET socket on one link), started and stopped around what a test
sends; the packets are what actually reached the link."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from . import netns

SCRIPT = Path(__file__).resolve().parent / "lab_capture.py"


class Capture:
    def __init__(self, ns: str, ifname: str) -> None:
        self.ns, self.ifname = ns, ifname
        self.proc: subprocess.Popen | None = None
        self.packets: list[dict] = []

    def __enter__(self) -> Capture:
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), self.ifname],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: netns.enter(self.ns))
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"capture on {self.ifname} in {self.ns} did not start: {line!r}")
        return self

    def __exit__(self, *exc) -> None:
        try:
            out, _ = self.proc.communicate("stop\n", timeout=10)
            self.packets = json.loads(out)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def count(self, **match) -> int:
        """Packets whose fields equal every given value (flags: all set)."""
        n = 0
        for p in self.packets:
            flags = match.get("flags")
            if all(p.get(k) == v for k, v in match.items() if k != "flags") and \
                    (flags is None or p["flags"] & flags == flags):
                n += 1
        return n
