"""Failed-authentication limits per source address: a token bucket.

Every check that needs the secret's hash (a token not in the verified
cache) takes a token before the hash is computed, and gives it back when
the key turns out valid; so only failures spend the bucket, and a burst
of concurrent wrong secrets cannot run more hashes than the bucket holds.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

BURST = 10.0          # failed checks an address may make at once
REFILL_SECONDS = 2.0  # then one every REFILL_SECONDS
MAX_SOURCES = 100_000  # addresses tracked; full buckets are dropped first


class FailureLimiter:
    def __init__(self, burst: float = BURST, refill_seconds: float = REFILL_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)
        self._lock = threading.Lock()

    def _level(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self.burst, now))
        return min(self.burst, tokens + (now - at) / self.refill_seconds)

    def take(self, source: str) -> float:
        """Take a token for one check from ``source``: 0.0 when taken, else
        the seconds until one is there (nothing taken)."""
        now = self.clock()
        with self._lock:
            level = self._level(source, now)
            if level < 1.0:
                self._buckets[source] = (level, now)
                return (1.0 - level) * self.refill_seconds
            if len(self._buckets) >= MAX_SOURCES:
                self._prune(now)
            self._buckets[source] = (level - 1.0, now)
            return 0.0

    def give_back(self, source: str) -> None:
        """The check succeeded: its token was not a failure."""
        now = self.clock()
        with self._lock:
            level = min(self.burst, self._level(source, now) + 1.0)
            if level >= self.burst:
                self._buckets.pop(source, None)
            else:
                self._buckets[source] = (level, now)

    def retry_after(self, source: str) -> int:
        """Whole seconds until ``source`` may try again (0: now)."""
        with self._lock:
            level = self._level(source, self.clock())
        return 0 if level >= 1.0 else math.ceil((1.0 - level) * self.refill_seconds)

    def _prune(self, now: float) -> None:
        for src in [s for s in self._buckets if self._level(s, now) >= self.burst]:
            del self._buckets[src]
        if len(self._buckets) >= MAX_SOURCES:   # all busy: forget the oldest half
            for src in sorted(self._buckets, key=lambda s: self._buckets[s][1])[:MAX_SOURCES // 2]:
                del self._buckets[src]
