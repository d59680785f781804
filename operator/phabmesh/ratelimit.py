"""Token buckets that refuse instead of waiting: a refusal says when to come back. Pure.

:class:`Bucket` is one budget (``rate`` per second sustained, ``burst`` at once);
:class:`PerSource` keeps one per source, for a bounded number of sources (the least
recently seen is forgotten first); :func:`take_all` spends from several budgets at once, or
from none. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cachetools

Clock = Callable[[], float]


class Bucket:
    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.capacity = float(max(burst, 1))
        self.tokens = self.capacity
        self.clock = clock
        self.stamp = clock()

    def take(self) -> float:
        """0 when one unit was taken; otherwise the seconds until one is there (none taken)."""
        wait = self.wait()
        if wait == 0 and self.rate > 0:
            self.tokens -= 1
        return wait

    def wait(self) -> float:
        """The seconds until one unit is there (0: it is there now); nothing is taken."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate


def take_all(*buckets: Bucket) -> float:
    """One unit from every bucket, or from none: 0 when taken, else the longest wait."""
    wait = max((bucket.wait() for bucket in buckets), default=0.0)
    if wait == 0:
        for bucket in buckets:
            bucket.take()
    return wait


class PerSource:
    def __init__(
        self, rate: float, burst: int, max_sources: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.buckets: cachetools.LRUCache[str, Bucket] = cachetools.LRUCache(max_sources)

    def take(self, source: str) -> float:
        """:meth:`Bucket.take` on ``source``'s own bucket."""
        if self.rate <= 0:
            return 0.0
        return self.bucket(source).take()

    def bucket(self, source: str) -> Bucket:
        """``source``'s own bucket (a full one for a source not seen, or forgotten)."""
        bucket = self.buckets.get(source)  # the least recently seen is forgotten first
        if bucket is None:
            bucket = self.buckets[source] = Bucket(self.rate, self.burst, self.clock)
        return bucket
