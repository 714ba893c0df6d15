"""Waiting on state, never on a fixed sleep: poll until true, with a deadline."""

from __future__ import annotations

import time


def wait_until(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """The first truthy value of ``pred()``; AssertionError naming ``what``
    once ``timeout`` seconds have passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
