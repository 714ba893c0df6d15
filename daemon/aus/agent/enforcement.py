"""Which enforcement mode ausd applies, and why.

Precedence, first that says something wins:

1. ``mode`` set in ausd.yaml (``config``): the host's administrator decides;
2. the bundle's mode for this workload's name (``server:workload``);
3. the bundle's org default (``server:org``);
4. the built-in default, ``enforce`` (``default``): what a host with no
   server and no ``mode`` has always done.

The workload's name is the one sent to the policy server as
``X-Aus-Workload``. See docs/enforcement-mode.md.
"""

from __future__ import annotations

from typing import NamedTuple

from ..core.bundle import Bundle
from .config import DaemonConfig

SOURCES = ("config", "server:workload", "server:org", "default")


class ModeInForce(NamedTuple):
    mode: str      # "enforce" | "visibility"
    source: str    # one of SOURCES


def mode_in_force(cfg: DaemonConfig, bundle: Bundle | None,
                  workload: str | None) -> ModeInForce:
    if cfg.mode_explicit:
        return ModeInForce(cfg.mode, "config")
    if bundle is not None and bundle.enforcement is not None and workload:
        found = bundle.enforcement.mode_for(workload)
        if found is not None:
            return ModeInForce(*found)
    return ModeInForce(cfg.mode, "default")
