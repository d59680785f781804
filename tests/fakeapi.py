"""A test double of the two calls an informer makes (list and watch), for unit tests of
pure logic: ``list_all`` says what a list holds (one page), ``stream`` what a watch sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from phabmesh import backoff
from phabmesh.kube.client import JSON
from phabmesh.kube.shapes import Shape


class FakeAPI:
    """Lists nothing; its watch is accepted, then stays quiet (``quiet`` is set)."""

    def __init__(self) -> None:
        self.policy = backoff.DEFAULT  # a KubeClient's retry policy (its watches' reconnects)
        self.lists = 0
        self.listed_from: list[str] = []  # each list's not_older_than ("": consistent)
        self.listed_params: list[dict[str, str]] = []  # each list's query (label selector...)
        self.watches = 0
        self.quiet = asyncio.Event()

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        return [], "1"

    async def list_pages(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        chunk: int = 500,
        shape: Shape[Any] | None = None,
        not_older_than: str = "",
    ) -> AsyncIterator[tuple[list[JSON], str]]:
        """One page: all of ``list_all``, through ``shape`` as the API's JSON would go."""
        self.lists += 1
        self.listed_from.append(not_older_than)
        self.listed_params.append(dict(params or {}))
        items, version = await self.list_all(path, params, chunk)
        if shape is not None:
            page = shape.page(json.dumps({"metadata": {}, "items": items}).encode())
            items = list(page.get("items") or [])
        yield items, version

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_seconds: int = 300,
        *,
        idle_timeout: float | None = None,
        opened: Callable[[], None] | None = None,
        shape: Shape[Any] | None = None,
    ) -> AsyncIterator[JSON]:
        self.watches += 1
        async for event in self.stream(opened or (lambda: None)):
            yield event if shape is None else shape.event(json.dumps(event).encode())

    async def stream(self, opened: Callable[[], None]) -> AsyncIterator[JSON]:
        opened()
        self.quiet.set()
        await asyncio.Event().wait()  # no event for as long as the test runs
        yield {}
