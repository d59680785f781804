"""Every Event the operator makes is counted by what became of it: posted, failed, or
dropped once too many wait to be posted (phabmesh_events_total)."""

from __future__ import annotations

import asyncio
from typing import Any

from phabmesh import metrics
from phabmesh.controller.writer import Writer
from phabmesh.kube import Unavailable
from phabmesh.leases.world import World

REF = {"kind": "Pod", "namespace": "ns", "name": "p", "uid": "u", "apiVersion": "v1"}


class _Events:
    """An events client whose creates wait until released, then pass or fail."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.fail = False
        self.created = 0

    async def create(self, _path: str, _body: Any, **_: Any) -> dict[str, Any]:
        await self.release.wait()
        if self.fail:
            raise Unavailable("the API server did not answer")
        self.created += 1
        return {}


def _count(recorded: metrics.Metrics, outcome: str) -> float:
    value = recorded.registry.get_sample_value("phabmesh_events_total", {"outcome": outcome})
    return value or 0.0


async def test_events_are_counted_posted_failed_and_dropped() -> None:
    recorded = metrics.Metrics(metrics.OPERATOR)
    metrics.use(recorded)
    events = _Events()
    writer = Writer(None, World(), events_client=events)  # type: ignore[arg-type]
    writer.MAX_PENDING_EVENTS = 3
    for n in range(5):  # three wait to be posted; the next two are dropped
        await writer.event(REF, "CredentialIssued", f"credential {n}")
    assert _count(recorded, "dropped") == 2
    events.release.set()
    await asyncio.gather(*writer._pending)
    assert (_count(recorded, "posted"), events.created) == (3, 3)
    events.fail = True
    await writer.event(REF, "CredentialRevoked", "revoked")
    await asyncio.gather(*writer._pending)
    assert _count(recorded, "failed") == 1
    assert _count(recorded, "posted") == 3
