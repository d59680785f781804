"""Supervised background tasks: a failure is counted and the task runs again."""

from __future__ import annotations

import asyncio

import pytest

from phabmesh import metrics, tasks


def _failures(registry: metrics.Metrics, task: str) -> float:
    return sum(v for labels, v in metrics.samples(registry, "phabmesh_task_failures_total")
               if labels.get("task") == task)  # fmt: skip


async def test_a_failing_task_is_counted_and_started_again_until_cancelled() -> None:
    registry = metrics.Metrics()
    metrics.use(registry)
    runs: list[int] = []
    steady = asyncio.Event()

    async def run() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise ValueError("a bug")
        if len(runs) == 2:
            return  # a loop that ends is started again too
        steady.set()
        await asyncio.Event().wait()

    task = tasks.spawn("example", run, tasks.Backoff(0.001, 30.0))
    assert task.get_name() == "example"
    await asyncio.wait_for(steady.wait(), timeout=5)
    assert runs == [0, 1, 2]
    assert _failures(registry, "example") == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _failures(registry, "example") == 2
