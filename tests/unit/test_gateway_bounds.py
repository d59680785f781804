"""The gateway's bounds before authentication: byte budgets and the decoding pool's admission."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from phabmesh.conduit import responses
from phabmesh.gateway.app import HELD, Gateway
from phabmesh.gateway.budget import Budget, Held
from phabmesh.gateway.offload import Busy, Workers
from phabmesh.settings import Settings

KIB = 1024
MIB = 1024 * KIB


def _budget() -> Budget:
    return Budget(
        "request bodies", "X", 100 * KIB, share=40 * KIB, small=16 * KIB, small_reserve=20 * KIB
    )


def test_large_bodies_leave_the_small_reserve_and_each_source_its_share() -> None:
    budget = _budget()
    budget.take("a", 40 * KIB, whole=40 * KIB)
    with pytest.raises(Busy) as share:
        budget.take("a", 1 * KIB + 16 * KIB, whole=17 * KIB)
    assert share.value.status == 429
    budget.take("b", 40 * KIB, whole=40 * KIB)
    with pytest.raises(Busy) as full:  # 80 of 100 KiB held: the rest is for small bodies
        budget.take("c", 17 * KIB, whole=17 * KIB)
    assert full.value.status == 503
    for _ in range(5):  # small bodies still pass, from any source, the flooding one too
        budget.take("a", 4 * KIB, whole=4 * KIB)
    assert budget.used == 100 * KIB
    with pytest.raises(Busy):
        budget.take("d", 1, whole=1)
    budget.give("b", 40 * KIB)
    budget.take("c", 17 * KIB, whole=17 * KIB)


def test_a_body_of_unknown_size_counts_as_large_chunk_by_chunk() -> None:
    budget = _budget()
    held = Held("a")
    for _ in range(10):  # 4 KiB chunks, each small, of a body whose size nobody said
        held.take(budget, 4 * KIB)
    with pytest.raises(Busy) as share:
        held.take(budget, 4 * KIB)
    assert share.value.status == 429
    held.release()
    assert budget.used == 0 and held.taken == {}


def test_the_pool_admits_a_share_per_source_and_a_bounded_queue() -> None:
    workers = Workers(size=1, queue=2, share=2)
    workers.pending = 1
    workers._by_source["a"] = 2
    with pytest.raises(Busy) as share:
        workers.admit("a")
    assert share.value.status == 429
    workers.admit("b")
    workers.pending = 3
    with pytest.raises(Busy) as full:
        workers.admit("b")
    assert full.value.status == 503


def test_the_pool_runs_work_and_frees_its_place() -> None:
    async def run() -> None:
        workers = Workers(size=1, queue=0, share=1)
        try:
            assert await workers.run(_double, "a") == 42
            assert workers.pending == 0
            assert await workers.run(_double, "a") == 42
        finally:
            await workers.close()

    asyncio.run(run())


def _double() -> int:
    return 21 * 2


def test_a_part_given_back_leaves_the_rest_held_until_release() -> None:
    budget = _budget()
    held = Held("a")
    held.take(budget, 30 * KIB)
    held.give(budget, 10 * KIB)
    assert budget.used == 20 * KIB and held.taken == {budget: 20 * KIB}
    held.give(budget, 99 * KIB)  # never more than it holds
    held.take(budget, 5 * KIB)
    held.release()
    assert budget.used == 0 and held.taken == {}


@pytest.mark.parametrize("room", [1 * MIB, 6 * MIB])
async def test_a_compressed_answer_is_inflated_only_as_far_as_its_bytes_are_reserved(
    room: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phabricator's answer, compressed anyway: every step past the first (small, made and
    reserved with no await between) is reserved in the answer budget before it is made, so
    concurrent answers never hold more than the budget, whatever they inflate to."""
    gateway = Gateway(Settings.local("http://127.0.0.1:9"), state=None)  # type: ignore[arg-type]
    answers = gateway.answers
    answers.used = answers.limit - answers.small_reserve - room  # what other answers hold
    request = {HELD: Held("a")}
    bomb = gzip.compress(b"x" * (5 * MIB))
    made = 0
    step = responses.Inflation.step

    def reserved_first(inflation: responses.Inflation, at_most: int) -> int:
        nonlocal made
        if made:  # the first step is reserved once made, in the same turn of the loop
            assert request[HELD].taken[answers] >= made + at_most
        now = step(inflation, at_most)
        made += now
        return now

    monkeypatch.setattr(responses.Inflation, "step", reserved_first)
    if room < 5 * MIB:
        with pytest.raises(Busy):
            await gateway._inflate(bomb, "gzip", request)  # type: ignore[arg-type]
        assert made <= room
    else:
        result = await gateway._inflate(bomb, "gzip", request)  # type: ignore[arg-type]
        assert len(result) == made == 5 * MIB
        assert request[HELD].taken[answers] == 5 * MIB  # exactly what it holds
    request[HELD].release()
    await gateway.close()


async def test_an_answer_that_fits_its_share_with_less_than_a_step_to_spare_is_served() -> None:
    """Each step takes what the budget has room for (1 MiB at most), not a whole step: an
    answer that fits the source's share passes, whatever is left of it at its last step."""
    gateway = Gateway(Settings.local("http://127.0.0.1:9"), state=None)  # type: ignore[arg-type]
    share = gateway.answers.share
    body = b"x" * (share - 100 * KIB)
    raw = gzip.compress(body)
    request = {HELD: Held("a")}
    request[HELD].take(gateway.answers, len(raw), whole=len(raw))  # as sent, as _forward does
    result = await gateway._inflate(raw, "gzip", request)  # type: ignore[arg-type]
    assert len(result) == len(body)
    assert request[HELD].taken[gateway.answers] == len(raw) + len(body)
    request[HELD].release()
    assert gateway.answers.used == 0
    await gateway.close()


def test_giving_back_is_bounded_by_what_was_taken() -> None:
    budget, other = _budget(), _budget()
    held = Held("a")
    held.give(other, 5 * KIB)  # never taken: nothing to give
    assert other.used == 0
    with pytest.raises(ValueError, match="cannot give back"):
        held.give(budget, -1)
    assert budget.used == 0
