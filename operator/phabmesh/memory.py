"""Giving back the memory a burst of work left behind.

A burst (a restart's lists, a scale-up's thousands of leases, a flood of calls) allocates
and frees far more than the process keeps. glibc's allocator keeps what was freed inside
its heaps for the next allocation: the process's RSS stays at the burst's peak, although
the objects are gone. Once a burst is over, :class:`Trimmer` asks glibc to return its
free pages to the system (``malloc_trim(0)``). It costs a walk of the heap's free lists, in
a thread of its own, after every second of CPU time the process has worked, and never
while the process is busy. Without glibc (musl, another system) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

PERIOD = 5.0  # seconds between looks at the process's CPU time
QUIET = 0.05  # of a core over a period, at most: the burst is over
WORTH = 1.0  # CPU seconds of work since the last trim, at least: a burst to trim after
LOGGED_MB = 8  # a trim that gives back this much is logged at info, others at debug


def _rss_mb() -> float:
    """The process's resident memory in MB (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None without glibc: from its usual soname, else from
    the symbols the process has loaded already (``dlopen(NULL)``)."""
    for name in ("libc.so.6", None):
        try:
            trim = ctypes.CDLL(name).malloc_trim
        except (OSError, AttributeError):
            continue
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        return lambda: trim(0)
    return None


class Trimmer:
    """Trims once the process, having worked ``worth`` CPU seconds since the last trim,
    has used at most ``quiet`` of a core over a ``period``."""

    def __init__(
        self,
        *,
        period: float = PERIOD,
        quiet: float = QUIET,
        worth: float = WORTH,
        cpu: Callable[[], float] = time.process_time,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self.period = period
        self.quiet = quiet
        self.worth = worth
        self.cpu = cpu
        self.trim = trim if trim is not None else _malloc_trim()
        self._last = cpu()
        self._worked = 0.0  # CPU seconds since the last trim
        self.trims = 0

    def due(self) -> bool:
        """One period's look: whether to trim now."""
        now = self.cpu()
        used, self._last = now - self._last, now
        self._worked += used
        return not (
            self.trim is None or used > self.quiet * self.period or self._worked < self.worth
        )

    def run_trim(self) -> None:
        """Trim (glibc takes its arenas' locks in turn: run it off the event loop)."""
        assert self.trim is not None
        before, started = _rss_mb(), time.perf_counter()
        self.trim()
        took, after = time.perf_counter() - started, _rss_mb()
        self._worked = 0.0
        self.trims += 1
        # Said when it gave back much: after a burst, how much of its peak the process held.
        (log.info if before - after >= LOGGED_MB else log.debug)(
            "memory_trimmed",
            rss_mb_before=round(before),
            rss_mb_after=round(after),
            ms=round(took * 1000, 1),
        )

    async def run(self) -> None:
        """Look every period until cancelled; trim in a thread when it is due."""
        while True:
            await asyncio.sleep(self.period)
            if self.due():
                await asyncio.to_thread(self.run_trim)
