"""Unique names for what tests and benchmarks make (cgroups, network
namespaces, links, pins), and free loopback ports, so parallel runs and
leftovers of a crashed run never collide."""

from __future__ import annotations

import secrets
import socket


def unique(prefix: str) -> str:
    """``prefix`` and six random hex digits; short enough for an interface
    name (15 characters) when the prefix has at most nine."""
    return f"{prefix}{secrets.token_hex(3)}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
