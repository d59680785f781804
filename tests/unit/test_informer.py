"""The informer's ``connected`` flag after a reconnect to a quiet resource (fault injected)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from phabmesh import metrics
from phabmesh.kube.client import JSON, Unavailable
from phabmesh.kube.informer import Informer
from tests.fakeapi import FakeAPI


class _FakeClient(FakeAPI):
    """The two calls an informer makes; ``listing`` and ``stream`` say what they give."""

    def listing(self) -> list[JSON]:
        return []

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        return self.listing(), "7"


class _FlakyClient(_FakeClient):
    """Lists nothing; the first watch fails with 429, the second is accepted and stays quiet."""

    async def stream(self, opened: Callable[[], None]) -> AsyncIterator[JSON]:
        if self.watches == 1:
            raise Unavailable(429, "TooManyRequests", "storage is (re)initializing")
        async for event in super().stream(opened):
            yield event


def test_connected_again_once_the_watch_is_accepted_without_waiting_for_an_event() -> None:
    async def scenario() -> bool:
        client = _FlakyClient()
        informer: Informer[Any] = Informer(client, "/apis/x", lambda obj: obj)  # type: ignore[arg-type]
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(client.quiet.wait(), timeout=10)
            await asyncio.sleep(0)
            return informer.connected and informer.synced.is_set()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(scenario())


class _OneBadEvent(_FakeClient):
    """Lists one object; the first watch sends an object the transform cannot read, the
    next ones stay quiet."""

    def listing(self) -> list[JSON]:
        return [{"metadata": {"name": "a", "resourceVersion": "5"}, "spec": 1}]

    async def stream(self, opened: Callable[[], None]) -> AsyncIterator[JSON]:
        if self.watches == 1:
            opened()
            yield {"type": "MODIFIED", "object": {"metadata": {"name": "a"}, "spec": "bad"}}
        async for event in super().stream(opened):
            yield event


def test_a_transform_that_raises_leaves_the_watch_lost_counted_and_listed_again() -> None:
    registry = metrics.Metrics()

    def transform(obj: JSON) -> int:
        return int(obj["spec"])  # ValueError for "bad"

    async def scenario() -> tuple[int, Any]:
        metrics.use(registry)
        client = _OneBadEvent()
        informer: Informer[int] = Informer(client, "/api/v1/pods", transform)  # type: ignore[arg-type]
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(client.quiet.wait(), timeout=10)
            await asyncio.sleep(0)
            assert informer.healthy and informer.items == {"a": 1}
            return client.lists, client
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    lists, client = asyncio.run(scenario())
    assert lists == 2  # listed again after the failure
    # The first list a consistent read; the second no older than what the first showed
    # (so that the API server's watch cache serves it).
    assert client.listed_from == ["", "7"]
    failures = dict(
        (labels["task"], value)
        for labels, value in metrics.samples(registry, "phabmesh_task_failures_total")
    )
    assert failures == {"watch:pods": 1.0}


def test_a_readers_handler_that_raises_fails_the_watch_for_every_reader_and_lists_again() -> None:
    """A view's handler fails on one event: that reader no longer knows what it holds, so the
    one watch behind every reader counts as lost, is counted, and lists again."""
    registry = metrics.Metrics()
    seen: list[tuple[str, str]] = []

    def fussy(kind: str, key: str, value: Any) -> None:
        seen.append((kind, key))
        if value == "bad":
            raise RuntimeError("a reader's bug")

    async def scenario() -> tuple[int, bool]:
        metrics.use(registry)
        client = _OneBadEvent()
        informer: Informer[Any] = Informer(client, "/api/v1/pods", lambda obj: obj)  # type: ignore[arg-type]
        view = informer.view(lambda obj: obj["spec"], on_event=fussy)
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(client.quiet.wait(), timeout=10)
            await asyncio.sleep(0)
            return client.lists, view.healthy and view.items == {"a": 1}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    lists, healthy = asyncio.run(scenario())
    assert lists == 2  # listed again after the reader's failure
    assert healthy  # and the view holds the listed object again
    assert seen == [("ADDED", "a"), ("MODIFIED", "a"), ("MODIFIED", "a")]
    failures = {
        labels["task"]: value
        for labels, value in metrics.samples(registry, "phabmesh_task_failures_total")
    }
    assert failures.get("watch:pods") == 1
