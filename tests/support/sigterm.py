"""SIGTERM that unwinds the process that asked for it, and nothing else.

A test harness or benchmark that owns namespaces, cgroups, pins and servers
wants SIGTERM (a timeout, a stop) to unwind like Ctrl-C so its ``finally``
blocks remove them. A child forked from it inherits the handler, and
pyroute2 forks one per namespace operation and stops it with SIGTERM:
unwinding there runs the parent's ``finally`` blocks in the child, which
shares the mount namespace, so the parent's network namespace is unmounted
and unlinked under it. The handler therefore unwinds only in the process
that installed it; anywhere else it exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def _exit() -> None:
    sys.exit(143)


def unwind_on_sigterm(unwind: Callable[[], None] = _exit) -> None:
    """On SIGTERM call ``unwind`` (which raises) in this process only; a
    forked child that inherited the handler exits with status 143."""
    owner = os.getpid()

    def on_sigterm(*_):
        if os.getpid() != owner:
            os._exit(143)
        unwind()
    signal.signal(signal.SIGTERM, on_sigterm)
