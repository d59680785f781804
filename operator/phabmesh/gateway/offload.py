"""Work on large or compressed request bodies, done in worker processes so the event loop
never waits.

Parsing a body of up to the limit (1 MiB) is linear but takes Python tens to hundreds of
milliseconds: percent-escapes, thousands of fields, inflating. In a thread it would still
share the interpreter with the event loop and delay every other call; in processes of their
own it does not. A pool of ``size`` workers, at a lower scheduling priority than the gateway,
started with the gateway and started again if one dies. Admission is bounded: at most
``size + queue`` bodies are in the pool's hands at once (running or waiting), and one source
at most ``share`` of them; past either, :class:`Busy` is raised at once, never waited on.
Whatever the work raises (``wire.BadRequest`` included) is raised here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import structlog

T = TypeVar("T")
WORKER_NICENESS = 10
log = structlog.get_logger(__name__)


class Busy(Exception):
    """Refused at once for want of capacity: ``status`` is 429 (this source's share is
    used) or 503 (the gateway's); the caller may retry after ``retry_after`` seconds."""

    def __init__(self, status: int, info: str, retry_after: int = 1) -> None:
        super().__init__(info)
        self.status = status
        self.info = info
        self.retry_after = retry_after


class Workers:
    def __init__(self, size: int = 2, queue: int = 8, share: int = 2) -> None:
        if size < 1 or queue < 0 or share < 1:
            raise ValueError("a worker pool needs size >= 1, queue >= 0 and share >= 1")
        self.size = size
        self.queue = queue
        self.share = share
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.pending = 0  # bodies in the pool's hands: running or waiting
        self._by_source: collections.Counter[str] = collections.Counter()

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of this threaded process.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_lower_priority,
            )
        return self._pool

    async def start(self) -> None:
        """Start the workers ahead of the first large body (an interpreter takes a while)."""
        pool = self._executor()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(self.size)))

    def admit(self, source: str) -> None:
        """Raise :class:`Busy` unless ``source`` may hand the pool one more body now."""
        if self._by_source[source] >= self.share:
            raise Busy(
                429,
                f"phabmesh: this client already has {self.share} request bodies being "
                "decoded (PHABMESH_GATEWAY_DECODE_SHARE); retry shortly",
            )
        if self.pending >= self.size + self.queue:
            raise Busy(
                503,
                "phabmesh: the gateway is decoding as many request bodies as it queues "
                "(PHABMESH_GATEWAY_DECODE_WORKERS + PHABMESH_GATEWAY_DECODE_QUEUE); retry shortly",
            )

    async def run(self, work: Callable[[], T], source: str) -> T:
        """``work()`` in a worker process (``work`` and its result must pickle), or
        :class:`Busy` at once. A caller that goes away leaves its place taken until the
        worker is done with it."""
        self.admit(source)
        self.pending += 1
        self._by_source[source] += 1

        def release(_: object) -> None:
            self.pending -= 1
            self._by_source[source] -= 1
            if self._by_source[source] <= 0:
                del self._by_source[source]

        pool = self._executor()
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, work)
        except BaseException:
            release(None)
            raise
        future.add_done_callback(release)
        try:
            return await asyncio.shield(future)
        except BrokenProcessPool:
            log.warning("worker_process_lost")
            if self._pool is pool:
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
    """Where CPU is short, the gateway's own process (every other call) goes first. Ctrl-C
    in the gateway's terminal reaches its whole process group: the gateway stops its
    workers itself, so they ignore SIGINT rather than die mid-task with a traceback."""
    os.nice(WORKER_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
