"""Work on large request bodies, done in a worker process so the event loop never waits.

Parsing a body of up to the limit (1 MiB) is linear but takes Python tens to hundreds of
milliseconds: percent-escapes, thousands of fields. In a thread it would still share the
interpreter with the event loop and delay every other call; in a process of its own it
does not. One worker, one body at a time (callers queue), at a lower scheduling priority
than the gateway; started with the gateway, and started again if it dies. Whatever it
raises (``wire.BadRequest`` included) is raised here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import structlog

T = TypeVar("T")
WORKER_NICENESS = 10
log = structlog.get_logger(__name__)


class Worker:
    def __init__(self) -> None:
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._turn = asyncio.Semaphore(1)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of this threaded process.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
            )
        return self._pool

    async def start(self) -> None:
        """Start the worker ahead of the first large body (an interpreter takes a while)."""
        await self.run(_ready)

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` in the worker process (``work`` and its result must pickle)."""
        async with self._turn:
            pool = self._executor()
            try:
                return await asyncio.get_running_loop().run_in_executor(pool, work)
            except BrokenProcessPool:
                log.warning("worker_process_lost")
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)


def _ready() -> bool:
    return True


def _lower_priority() -> None:
    """Where CPU is short, the gateway's own process (every other call) goes first."""
    os.nice(WORKER_NICENESS)
