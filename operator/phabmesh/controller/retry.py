"""Writes that failed, tried again with backoff until they land or are no longer wanted.

The controller's answer to a lease write the API server refused for a while (5xx, 429,
unreachable past the client's own few quick retries, a conflict with a lease being
deleted): the pod's reconcile is scheduled again, later each time, and the reconcile
decides afresh from the world, so a retry does exactly what is still wanted, or nothing.
One pending retry per key; a success forgets the count. The waits are the process's retry
policy (``PHABMESH_RETRY_FIRST``, ``..._CAP``), or, for a failure given to
:meth:`Retries.failed`, the API server's ``Retry-After`` (a
:class:`~phabmesh.kube.KubeError`'s ``retry_after``) up to its cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

import structlog

from phabmesh import logs
from phabmesh.backoff import Backoff

log = structlog.get_logger(__name__)


class Retries:
    """Retries scheduled per key (a pod's UID): one pending at a time, backing off."""

    def __init__(self, policy: Backoff) -> None:
        self.policy = policy  # the process's retry policy (phabmesh.backoff)
        self._failures: dict[Hashable, int] = {}
        self._pending: dict[Hashable, asyncio.Task[None]] = {}

    def failed(
        self,
        key: Hashable,
        again: Callable[[], Awaitable[object]],
        error: BaseException | None = None,
    ) -> float | None:
        """``again`` failed for ``key`` (with ``error``): run it later, after the policy's
        delay or the ``Retry-After`` the error carries. The delay, or None when one is
        pending."""
        if key in self._pending:
            return None
        attempt = self._failures.get(key, 0) + 1
        self._failures[key] = attempt
        delay = self.policy.delay(attempt, retry_after_of(error))
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


def retry_after_of(error: BaseException | None) -> float | None:
    """The seconds an error's ``Retry-After`` asked (a KubeError's ``retry_after``), else
    None."""
    seconds = getattr(error, "retry_after", None)
    return float(seconds) if isinstance(seconds, int | float) else None
