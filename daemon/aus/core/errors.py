"""The project's error types.

Every layer below (bcc, the bpf(2) syscall, YAML, pydantic, sockets) has its
own exceptions; they are translated into these at one point each, with
``raise ... from exc``, so callers handle one hierarchy::

    AusError
    +-- ConfigError        ausd.yaml is missing, unreadable or invalid
    +-- PolicyError        the policy file is invalid (file, field/line, reason)
    +-- KernelError        the kernel refused something
    |   +-- ProbeError     a needed kernel feature is missing (one sentence)
    |   +-- BpfError       one bpf(2) or bcc operation failed (object, errno)
    +-- LockError          another ausd already owns these pins
    +-- ControlError       the control socket: unreachable, refused, bad reply
    +-- PolicySourceError  the policy server (bundles, flow uploads) or the bundle
                           cache or flow spool: unreachable,
                           refused (HTTP status), bad reply, unwritable
"""

from __future__ import annotations

import errno as _errno
import os


class AusError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AusError):
    pass


class PolicyError(AusError):
    """A policy that cannot be enforced. ``problems`` lists each one as
    text; ``located`` the same ones as (line or None, path, message), for
    machine-readable reports (``ausctl policy check --json``)."""

    def __init__(self, source: str, problems: list[str],
                 located: list[tuple[int | None, str, str]] | None = None):
        self.source = source
        self.problems = list(problems)
        self.located = list(located) if located is not None else \
            [(None, "", p) for p in self.problems]
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{source}: policy refused:\n{lines}")


class KernelError(AusError):
    pass


class ProbeError(KernelError):
    pass


class BpfError(KernelError):
    """A bpf(2)/bcc operation failed on a named object."""

    def __init__(self, op: str, obj: str, err: int | None, detail: str = ""):
        self.op = op
        self.obj = obj
        self.errno = err
        name = _errno.errorcode.get(err, str(err)) if err else "?"
        text = f"{op} {obj}: "
        text += f"{name} ({os.strerror(err)})" if err else "failed"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class LockError(AusError):
    pass


class ControlError(AusError):
    pass


class PolicySourceError(AusError):
    """Fetching the policy bundle failed, or its cache could not be used.

    ``kind`` says what failed, for the retry logic and status: "network",
    "tls", "auth" (401), "forbidden" (403), "not_found" (404), "server"
    (5xx), "protocol" (a reply ausd cannot use), "interrupted" (an
    immediate re-fetch was asked for), "cache". ``status`` is the HTTP
    status when there was one."""

    def __init__(self, kind: str, message: str, status: int | None = None):
        self.kind = kind
        self.status = status
        super().__init__(message)
