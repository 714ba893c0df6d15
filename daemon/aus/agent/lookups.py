"""Directory lookups off the daemon's loop: a few threads, a priority queue,
and a time limit per lookup.

NSS calls block (an LDAP server that does not answer, SSSD restarting)
and glibc cannot cancel them, so the loop never makes one for the
background: it queues the login UID here, a worker thread asks the
directory (``ask``: NSS through glibc or SSSD's module, both thread-safe,
both releasing the GIL while they wait) and hands the answer back with
``deliver``; the loop judges it and writes the maps. Lower numbers go
first (new users before refreshes); a login does not queue at all, it has
its own path (:class:`Bounded`), and the pool starts no lookup while a
login is served (:meth:`LookupPool.paused`). A lookup still running after ``timeout`` seconds is
reported once by :meth:`overdue`, so the loop can treat the user as not
answered and retry later; the thread stays blocked in NSS until the call
returns, which is why the pool is small and bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

NEW_USER = 1       # a login UID the maps hold nothing for
REFRESH = 2        # a user whose rules are in the maps already
WORKERS = 4
TIMEOUT = 2.0


class LookupPool:
    def __init__(self, ask: Callable[[int], Any], deliver: Callable[[int, Any], None], *,
                 workers: int = WORKERS, timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.monotonic):
        self.ask, self.deliver = ask, deliver
        self.timeout, self.clock = timeout, clock
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._queued: dict[int, int] = {}       # uid -> best priority queued
        self._running: dict[int, float] = {}    # uid -> when its lookup started
        self._reported: set[int] = set()        # overdue, already reported
        self.answered = 0
        self.timed_out = 0
        self.workers = [threading.Thread(target=self._work, name=f"aus-lookup-{i}", daemon=True)
                        for i in range(workers)]
        self._stop = False
        self._started = False
        self._go = threading.Event()   # cleared while a login is served
        self._go.set()

    def start(self) -> None:
        """Start the workers (once; again is a no-op)."""
        if not self._started:
            self._started = True
            for t in self.workers:
                t.start()

    def stop(self) -> None:
        """Workers end after their current lookup; none is waited for."""
        self._stop = True
        for _ in self.workers:
            self._queue.put((-1, next(self._seq), None))

    @contextlib.contextmanager
    def paused(self):
        """No lookup starts while this lasts (one already running ends):
        a login's lookup and map writes get the CPUs, the GIL and the
        directory to themselves."""
        self._go.clear()
        try:
            yield
        finally:
            self._go.set()

    def submit(self, uid: int, priority: int = REFRESH) -> bool:
        """Queue a lookup unless one is queued at this priority or better,
        or running; True if queued."""
        with self._lock:
            if uid in self._running or self._queued.get(uid, priority + 1) <= priority:
                return False
            self._queued[uid] = priority
        self._queue.put((priority, next(self._seq), uid))
        return True

    def busy(self, uid: int) -> bool:
        with self._lock:
            return uid in self._queued or uid in self._running

    def pending(self) -> int:
        with self._lock:
            return len(self._queued) + len(self._running)

    def overdue(self) -> list[int]:
        """Login UIDs whose lookup has run longer than the timeout, each
        reported once."""
        now = self.clock()
        with self._lock:
            late = [u for u, t in self._running.items()
                    if now - t >= self.timeout and u not in self._reported]
            self._reported.update(late)
            self.timed_out += len(late)
        return late

    def status(self) -> dict:
        with self._lock:
            return {"workers": len(self.workers), "queued": len(self._queued),
                    "running": len(self._running), "answered": self.answered,
                    "timed_out": self.timed_out, "timeout_seconds": self.timeout}

    def _work(self) -> None:
        while True:
            priority, _, uid = self._queue.get()
            if uid is None or self._stop:
                return
            self._go.wait()   # a login is being served: it goes first
            with self._lock:
                if self._queued.get(uid) != priority:
                    continue    # queued again at a better priority: taken there
                del self._queued[uid]
                self._running[uid] = self.clock()
            try:
                answer = self.ask(uid)
            except Exception:   # a bug in a lookup must not end the worker
                log.exception("directory lookup of login UID %d failed", uid)
                answer = None
            with self._lock:
                self._running.pop(uid, None)
                self._reported.discard(uid)
                self.answered += 1
            if answer is not None:
                self.deliver(uid, answer)


class Bounded:
    """One lookup at a time for whoever waits for it (a login), on a
    thread of its own so that nothing queued goes first, waited for at
    most ``timeout`` seconds. The threads are daemon threads: one blocked
    in NSS must not hold up the daemon's exit. At most ``limit`` may be
    blocked at once; past that a lookup is not even started."""

    def __init__(self, ask: Callable[[int], Any], *, limit: int = 8):
        self.ask, self.limit = ask, limit
        self._lock = threading.Lock()
        self._blocked = 0

    def __call__(self, uid: int, timeout: float) -> Any | None:
        """The answer, or None if it did not come within ``timeout``."""
        with self._lock:
            if self._blocked >= self.limit:
                return None
            self._blocked += 1
        box: list = []
        done = threading.Event()

        def run():
            try:
                box.append(self.ask(uid))
            finally:
                with self._lock:
                    self._blocked -= 1
                done.set()
        threading.Thread(target=run, name=f"aus-login-{uid}", daemon=True).start()
        return box[0] if done.wait(timeout) and box else None
