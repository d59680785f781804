"""Writes that failed, tried again with backoff until they land or are no longer wanted.

The controller's answer to a lease write the API server refused for a while (5xx, 429,
unreachable past the client's own few quick retries, a conflict with a lease being
deleted): the pod's reconcile is scheduled again, later each time, and the reconcile
decides afresh from the world, so a retry does exactly what is still wanted, or nothing.
One pending retry per key; a success forgets the count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

import structlog

from phabmesh import logs
from phabmesh.backoff import Backoff

log = structlog.get_logger(__name__)

BASE = 0.2  # seconds before the first retry
CAP = 30.0  # seconds: no retry waits longer


class Retries:
    """Retries scheduled per key (a pod's UID): one pending at a time, backing off."""

    def __init__(self, *, base: float = BASE, cap: float = CAP) -> None:
        self.policy = Backoff(base, cap)  # phabmesh's one retry policy (phabmesh.backoff)
        self._failures: dict[Hashable, int] = {}
        self._pending: dict[Hashable, asyncio.Task[None]] = {}

    def failed(self, key: Hashable, again: Callable[[], Awaitable[object]]) -> float | None:
        """``again`` failed for ``key``: run it later. The delay, or None when one is pending."""
        if key in self._pending:
            return None
        attempt = self._failures.get(key, 0) + 1
        self._failures[key] = attempt
        delay = self.policy.delay(attempt)
        self._pending[key] = asyncio.create_task(self._later(key, delay, again))
        log.info("write_retry_scheduled", key=str(key), attempt=attempt, delay=round(delay, 3))
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def attempts(self, key: Hashable) -> int:
        return self._failures.get(key, 0)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def _later(
        self, key: Hashable, delay: float, again: Callable[[], Awaitable[object]]
    ) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._pending.pop(key, None)  # a failure of this run may schedule the next one
        try:
            await again()
        except Exception as exc:  # again() schedules its own next retry when it fails
            log.warning("write_retry_failed", key=str(key), **{logs.ERROR: str(exc)})

    async def close(self) -> None:
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()
