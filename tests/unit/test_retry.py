"""Failed writes tried again later: the backoff, one pending retry per key, and a plan
that deletes a lease left Revoked by a delete that failed."""

from __future__ import annotations

import asyncio
import dataclasses

from phabmesh.backoff import Backoff
from phabmesh.controller import retry
from phabmesh.identity import Naming
from phabmesh.leases import plans, readiness
from phabmesh.leases.world import World
from phabmesh.settings import Settings
from tests.unit.test_decide import binding, bot, lease, pod


def test_backoff_doubles_up_to_the_cap_and_never_waits_less_than_half() -> None:
    policy = retry.Retries(Settings().backoff()).policy
    for attempt, full in [(1, 0.2), (2, 0.4), (3, 0.8), (9, 30.0), (10_000, 30.0)]:
        for _ in range(50):
            delay = policy.delay(attempt)
            assert full / 2 <= delay <= full
    assert policy.delay(0) <= 0.2  # nonsense attempts are the first one


def test_one_retry_per_key_backing_off_until_it_succeeds() -> None:
    async def scenario() -> tuple[list[int], int, int]:
        retries = retry.Retries(Backoff(0.01, 0.05))
        runs: list[int] = []
        left = {"failures": 3}

        async def again() -> None:
            runs.append(retries.attempts("pod"))
            if left["failures"]:
                left["failures"] -= 1
                retries.failed("pod", again)  # what a reconcile that fails again does
            else:
                retries.succeeded("pod")

        assert retries.failed("pod", again) is not None
        assert retries.failed("pod", again) is None  # one pending per key
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not retries.pending and retries.attempts("pod") == 0:
                break
        pending, attempts = retries.pending, retries.attempts("pod")
        await retries.close()
        return runs, pending, attempts

    runs, pending, attempts = asyncio.run(scenario())
    assert runs == [1, 2, 3, 4]
    assert (pending, attempts) == (0, 0)


def test_close_cancels_what_is_pending() -> None:
    async def scenario() -> list[str]:
        retries = retry.Retries(Backoff(10, 10))
        ran: list[str] = []

        async def again() -> None:
            ran.append("ran")

        retries.failed("pod", again)
        await retries.close()
        await asyncio.sleep(0)
        return ran

    assert asyncio.run(scenario()) == []


def test_a_lease_left_revoked_is_deleted_by_the_pods_plan() -> None:
    world = World()
    world.namespaces["build"] = {}
    world.bots["ci-bot"] = bot()
    world.put_pod(pod("p1"))
    world.put_binding(binding("runners"))
    active = lease("p1", "runners")
    world.put_lease(active)
    verdicts = {
        b.key: readiness.judge_binding(b, world.bots["ci-bot"], {}) for b in world.bindings.values()
    }
    assert not plans.plan_pod(world, active.pod_uid, Naming(), verdicts)
    left = dataclasses.replace(active, phase="Revoked", reason="PodTerminating")
    world.put_lease(left)
    plan = plans.plan_pod(world, active.pod_uid, Naming(), verdicts)
    assert plan.delete == (left,)
    # The pod is still entitled: issued again once the delete has freed the name (the
    # revocations and deletes of a plan go first).
    assert [b.name for b in plan.issue] == ["runners"]


def test_a_refused_lease_write_is_retried_after_the_retry_after_it_carried() -> None:
    """The API server's Retry-After on a refused lease write (429 under priority and
    fairness) is what the pod's retry waits, capped by the policy."""
    from phabmesh.controller import reconcilers
    from phabmesh.kube import KubeError
    from tests.unit.test_paused_bot_check import _Memo

    async def scenario() -> list[float | None]:
        memo = _Memo()
        leases = reconcilers.Leases(memo)  # type: ignore[arg-type]
        delays: list[float | None] = []
        failed = leases.retries.failed

        def recorded(*args: object, **kwargs: object) -> float | None:
            delays.append(failed(*args, **kwargs))  # type: ignore[arg-type]
            return delays[-1]

        leases.retries.failed = recorded  # type: ignore[method-assign]
        refused = KubeError(429, "TooManyRequests", "slow down")
        refused.retry_after = 7.0
        leases.write_failed("p1", refused)
        await leases.close()
        return delays

    assert asyncio.run(scenario()) == [7.0]
