"""Which login UIDs are active: opened sessions plus a scan of /proc.

A login UID is active while any process carries it, and for a short
grace after ``ausctl session open`` (called by the PAM hook), so the rules
are in the kernel before the login's first process is. The scan finds sessions that began while ausd was down and processes
that outlive their session; an entry goes only when both are gone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..core import contract as C


def read_loginuid(pid: int) -> int | None:
    try:
        fd = os.open(f"/proc/{pid}/loginuid", os.O_RDONLY)
    except OSError:
        return None
    try:
        return int(os.read(fd, 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def is_zombie(pid: int) -> bool:
    """Whether a process has exited and waits to be reaped (state Z, or X
    while it goes): its login UID is still readable, but it runs nothing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True   # gone since its login UID was read
    # the state follows the command name, which may itself hold ") "
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] in (b"Z", b"X")


def all_pids() -> list[int]:
    """The ID of every process, from the numeric entries of /proc."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def scan_loginuids(proc_pids=None) -> dict[int, int]:
    """{login UID: number of processes} for every set login UID. A process
    that exited but is not reaped yet carries none: its parent may never
    reap it, and the user's session must not outlive it."""
    counts: dict[int, int] = {}
    for pid in proc_pids if proc_pids is not None else all_pids():
        uid = read_loginuid(pid)
        if uid is not None and uid != C.LOGINUID_UNSET and not is_zombie(pid):
            counts[uid] = counts.get(uid, 0) + 1
    return counts


@dataclass
class Sessions:
    """Opened sessions and the last scan, per login UID.

    A login UID is active while processes carry it, or for ``grace``
    seconds after a session opened (the login's first process may not be
    visible to a scan yet). Closing a session ends the grace at once, so
    the entry goes as soon as no process is left.
    """
    grace: float = 10.0
    clock: Callable[[], float] = time.monotonic
    opened_at: dict[int, float] = field(default_factory=dict)
    processes: dict[int, int] = field(default_factory=dict)

    def open(self, login_uid: int) -> None:
        self.opened_at[login_uid] = self.clock()

    def close(self, login_uid: int) -> None:
        self.opened_at.pop(login_uid, None)

    def update_scan(self, counts: dict[int, int]) -> None:
        self.processes = dict(counts)
        now = self.clock()
        for uid, t in list(self.opened_at.items()):
            if now - t >= self.grace:
                del self.opened_at[uid]

    def is_active(self, login_uid: int, unmanaged: set[int]) -> bool:
        """Whether ``login_uid`` is in :meth:`active`, without building it."""
        return (login_uid != C.LOGINUID_UNSET and login_uid not in unmanaged
                and (login_uid in self.opened_at or self.processes.get(login_uid, 0) > 0))

    def active(self, unmanaged: set[int]) -> set[int]:
        uids = set(self.opened_at) | {u for u, n in self.processes.items() if n > 0}
        return {u for u in uids if u != C.LOGINUID_UNSET and u not in unmanaged}


def peer_loginuid(pid: int) -> int | None:
    """Login UID of a control-socket peer, from its PID (SO_PEERCRED)."""
    return read_loginuid(pid) if pid > 0 and os.path.exists(f"/proc/{pid}") else None


def viewer_of(peer) -> int | None:
    """The login UID whose users, rules and flows a control-socket peer
    may see: None (everyone's) for root; else the peer's login UID, which
    is what the kernel judges its traffic by (after ``su`` too); else,
    when it has none or its PID now belongs to another user (the peer
    exited and the PID was reused), its UID."""
    if peer.uid == 0:
        return None
    try:
        owner = os.stat(f"/proc/{peer.pid}").st_uid if peer.pid > 0 else None
    except OSError:
        owner = None
    uid = read_loginuid(peer.pid) if owner == peer.uid else None
    return peer.uid if uid is None or uid == C.LOGINUID_UNSET else uid
