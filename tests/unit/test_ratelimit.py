"""Budgets that refuse at once and say when to come back."""

from __future__ import annotations

import asyncio

from phabmesh import ratelimit, serving


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = ratelimit.Bucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == 0.5  # one more unit in half a second at 2/s
    clock.now += 0.5
    assert bucket.take() == 0.0
    assert bucket.take() > 0
    assert ratelimit.Bucket(rate=0, burst=1, clock=clock).take() == 0.0  # 0: unlimited


def test_each_source_has_its_own_bucket_and_few_are_remembered() -> None:
    clock = Clock()
    sources = ratelimit.PerSource(rate=1.0, burst=2, max_sources=3, clock=clock)
    assert [sources.take("flood") for _ in range(2)] == [0.0, 0.0]
    assert sources.take("flood") > 0
    assert sources.take("pod") == 0.0  # another source is not held back
    for name in ("a", "b", "c", "d"):
        sources.take(name)
    assert len(sources.buckets) == 3
    assert "flood" not in sources.buckets  # the least recently seen went first


def test_several_budgets_are_spent_together_or_not_at_all() -> None:
    clock = Clock()
    small = ratelimit.Bucket(rate=1.0, burst=1, clock=clock)
    large = ratelimit.Bucket(rate=1.0, burst=5, clock=clock)
    assert ratelimit.take_all(small, large) == 0.0
    # The small one is empty: nothing is taken from the large one either.
    assert ratelimit.take_all(small, large) == 1.0
    assert large.tokens == 4
    assert small.wait() == 1.0 and small.tokens == 0  # wait() takes nothing
    clock.now += 1
    assert ratelimit.take_all(small, large) == 0.0
    assert large.tokens == 4  # refilled to its burst of 5, one taken


async def test_held_refusals_wait_their_turn_and_are_bounded() -> None:
    holds = serving.Holds(limit=2, seconds=3600.0)
    first = asyncio.create_task(holds.hold(5.0))
    second = asyncio.create_task(holds.hold(9999.0))
    while holds.held < 2:  # both holding, neither answered
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    assert await holds.hold(5.0) == 0.0  # past the limit: answered at once
    assert await holds.hold(0.0) == 0.0  # nothing to wait for
    for task in (first, second):
        task.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert holds.held == 0  # a cancelled hold gives its place back
    short = serving.Holds(limit=1, seconds=0.01)
    assert await short.hold(5.0) == 0.01  # never longer than its own bound
