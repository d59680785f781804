"""The writer's Events give way to its lease writes: an Event waits while a lease write is in
flight (for a while at most), so that a burst of issues or revocations does not share the
API server with its own Events."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from phabmesh.controller.writer import Writer
from phabmesh.kube.client import JSON
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import World
from phabmesh.resources import lease_path
from tests.fakekube import FakeKube

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
POD: JSON = {"apiVersion": "v1", "kind": "Pod", "name": "runner-1", "namespace": "build"}


class HeldKube(FakeKube):
    """Deletes of leases wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def delete(self, path: str, body: JSON | None = None, **kw: Any) -> JSON:
        self.calls.append(("delete-begun", path, None))
        await self.gate.wait()
        return await super().delete(path, body, **kw)


def _lease(i: int) -> LeaseView:
    return LeaseView(
        namespace="build",
        name=f"runner-{i}.runners.0000",
        pod_uid=f"pod-{i}",
        pod_name=f"runner-{i}",
        binding="runners",
        bot="ci-bot",
        identity="runner.build.serviceaccount.identity.linkerd.cluster.local",
        phase="Revoked",
        expires_at=None,
        issued_at=None,
        uid=f"lease-{i}",
    )


def _writer() -> tuple[Writer, HeldKube, FakeKube]:
    kube, events = HeldKube(), FakeKube()
    for i in (1, 2):
        lease = _lease(i)
        kube.put(
            lease_path(lease.namespace, lease.name),
            {"metadata": {"name": lease.name, "namespace": "build", "uid": lease.uid}},
        )
    writer = Writer(kube, World(), lambda: NOW, events_client=events)  # type: ignore[arg-type]
    return writer, kube, events


async def _settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_an_event_waits_until_no_lease_write_is_in_flight() -> None:
    writer, kube, events = _writer()
    writer.EVENT_YIELD = 3600  # only the end of the lease writes can let it go
    first = asyncio.create_task(writer.delete_revoked(_lease(1)))
    second = asyncio.create_task(writer.delete_revoked(_lease(2)))
    await _settle()
    await writer.event(POD, "CredentialIssued", "credential issued")
    await _settle()
    assert [verb for verb, _, _ in kube.calls] == ["delete-begun", "delete-begun"]
    assert events.calls == []  # two lease writes in flight: the Event waits

    kube.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second, *writer._pending), 60)
    assert [verb for verb, _, _ in kube.calls] == ["delete-begun"] * 2 + ["delete"] * 2
    [(verb, path, body)] = events.calls
    assert (verb, path, body["reason"]) == (
        "create",
        "/api/v1/namespaces/build/events",
        "CredentialIssued",
    )
    # The Event keeps the moment of its fact, not of its posting.
    assert body["firstTimestamp"] == "2026-01-01T00:00:00Z"


async def test_an_event_goes_all_the_same_when_lease_writes_never_stop() -> None:
    writer, kube, events = _writer()
    writer.EVENT_YIELD = 0.01  # steady churn: some lease write is always in flight
    held = asyncio.create_task(writer.delete_revoked(_lease(1)))
    await _settle()
    await writer.event(POD, "CredentialRevoked", "credential revoked")
    await asyncio.gather(*writer._pending)
    assert [body["reason"] for _, _, body in events.calls] == ["CredentialRevoked"]
    assert [verb for verb, _, _ in kube.calls] == ["delete-begun"]  # still in flight
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    # A lease write that ended by an error (here: cancelled) counts out as well: the next
    # Event does not wait.
    writer.EVENT_YIELD = 3600
    await writer.event(POD, "CredentialRevoked", "again")
    await asyncio.wait_for(asyncio.gather(*writer._pending), 60)
    assert len(events.calls) == 2


async def test_past_a_quarter_of_the_cap_waiting_events_go_without_waiting() -> None:
    writer, kube, events = _writer()
    writer.EVENT_YIELD = 3600
    writer.MAX_PENDING_EVENTS = 8  # a quarter: 2
    held = asyncio.create_task(writer.delete_revoked(_lease(1)))
    await _settle()
    for i in range(5):
        await writer.event(POD, "CredentialIssued", f"credential {i}")
    await _settle()
    # The first two wait for the lease write; the others find two waiting and go.
    assert [body["message"] for _, _, body in events.calls] == [
        "credential 2",
        "credential 3",
        "credential 4",
    ]
    kube.gate.set()
    await asyncio.wait_for(asyncio.gather(held, *writer._pending), 60)
    assert len(events.calls) == 5


async def test_at_close_the_waiting_events_go() -> None:
    writer, _kube, events = _writer()
    writer.EVENT_YIELD = 3600
    held = asyncio.create_task(writer.delete_revoked(_lease(1)))
    await _settle()
    await writer.event(POD, "CredentialRevoked", "credential revoked")
    await _settle()
    assert events.calls == []
    await asyncio.wait_for(writer.close(), 60)
    assert [body["reason"] for _, _, body in events.calls] == ["CredentialRevoked"]
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
