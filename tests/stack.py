"""phabmesh's processes run in background threads against the test control plane."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog


class Process(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class Threaded:
    """Run an OperatorProcess or GatewayProcess on its own event loop in a thread."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, make: Callable[[], Awaitable[Any]], timeout: float = 60) -> Any:
        future: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(
            _wrap(make), self.loop
        )
        return future.result(timeout)

    def start(self) -> Threaded:
        self.thread.start()
        self.call(self.process.start)
        return self

    def stop(self) -> None:
        try:
            self.call(self.process.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()


async def _wrap(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()


def this_thread_only() -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    """A structlog processor for ``capture_logs(processors=[this_thread_only()])``: it drops
    what threads other than the caller's log. The session's operator and gateway run in
    threads of their own, and structlog's capture is process-wide."""
    mine = threading.get_ident()

    def keep(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        if threading.get_ident() != mine:
            raise structlog.DropEvent
        return event

    return keep
