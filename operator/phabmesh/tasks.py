"""Background tasks that are named, supervised and never die silently.

Every long-running loop of a process (a watch, a key rotation, the webhook's child
process, peering) runs under :func:`spawn`: an exception that ends it is logged
(``task_failed``, with the traceback), counted in ``phabmesh_task_failures_total{task}``,
and the loop is started again after a pause that follows the process's retry policy
(``policy``: ``PHABMESH_RETRY_FIRST`` doubling to ``PHABMESH_RETRY_CAP``; back to the first
once it ran for :data:`STEADY` seconds). A loop that returns is started again as well: none
of these is meant to end before it is cancelled.

What a failure leaves behind is the loop's own business: an
:class:`~phabmesh.kube.informer.Informer` handles its own (it marks itself disconnected, so
its readers fail closed, and lists again), so its failures are counted as
``watch:<resource>`` and it never ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from phabmesh import backoff, metrics
from phabmesh.backoff import Backoff

log = structlog.get_logger(__name__)

STEADY = 60.0  # a loop that ran this long starts again after the first pause


def spawn(
    name: str, run: Callable[[], Awaitable[object]], policy: Backoff = backoff.DEFAULT
) -> asyncio.Task[None]:
    """``run()`` as the task ``name``, supervised until cancelled (module docstring);
    ``policy``: the process's retry policy (``Settings.backoff()``)."""
    return asyncio.create_task(supervise(name, run, policy), name=name)


async def supervise(
    name: str, run: Callable[[], Awaitable[object]], policy: Backoff = backoff.DEFAULT
) -> None:
    failures = 0
    while True:
        started = time.monotonic()
        try:
            await run()
            log.warning("task_ended", task=name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("task_failed", task=name)
        metrics.current().task_failed(name)
        failures = 1 if time.monotonic() - started >= STEADY else failures + 1
        await asyncio.sleep(policy.delay(failures))
