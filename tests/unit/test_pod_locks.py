"""One reconcile of a pod at a time, and no lock kept for a pod that no reconcile holds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from phabmesh import identity
from phabmesh.controller import reconcilers
from phabmesh.leases import plans
from tests.unit.test_paused_bot_check import _Memo


async def test_reconciles_of_a_pod_wait_for_each_other_and_leave_no_lock_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    memo = _Memo()
    memo.leases = reconcilers.Leases(memo)  # type: ignore[arg-type]
    for uid in ("p1", "p2"):
        memo.world.put_pod(
            identity.PodFacts.from_pod(
                {
                    "metadata": {"name": uid, "namespace": "build", "uid": uid},
                    "spec": {"serviceAccountName": "runner"},
                    "status": {"phase": "Running"},
                }
            )
        )
    running: dict[str, int] = {"p1": 0, "p2": 0}
    most: dict[str, int] = {"p1": 0, "p2": 0}
    release, both = asyncio.Event(), asyncio.Event()

    async def execute(uid: str, _plan: Any) -> None:
        running[uid] += 1
        most[uid] = max(most[uid], running[uid])
        if running["p1"] and running["p2"]:
            both.set()
        await release.wait()
        running[uid] -= 1

    monkeypatch.setattr(plans, "plan_pod", lambda *_: plans.Plan(issue=("a binding",)))  # type: ignore[arg-type]
    monkeypatch.setattr(memo.leases, "_execute", execute)
    reconciles = [asyncio.ensure_future(memo.leases.reconcile_pod(u)) for u in ("p1", "p1", "p2")]
    await asyncio.wait_for(both.wait(), 10)
    for _ in range(5):  # turns of the loop in which the second reconcile of p1 could start
        await asyncio.sleep(0)
    assert running == {"p1": 1, "p2": 1}  # the second of p1 waits; p2 goes on
    release.set()
    await asyncio.gather(*reconciles)
    assert most == {"p1": 1, "p2": 1}
    assert memo.leases._pod_locks == {}  # both pods live, no reconcile: nothing kept
