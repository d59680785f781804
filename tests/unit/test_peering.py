"""Peering: kopf's rule for which replica acts, and the fence a replica puts on itself."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from phabmesh import metrics
from phabmesh.controller import peering
from phabmesh.controller.writer import NotActing, Writer
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import World

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
LIFETIME = 60


def _peering(**entries: tuple[int, datetime.datetime]) -> dict[str, Any]:
    status = {
        name: {"priority": priority, "lifetime": LIFETIME, "lastseen": seen.isoformat()}
        for name, (priority, seen) in entries.items()
    }
    return {"metadata": {"name": "phabmesh"}, "status": status}


def _judge(obj: dict[str, Any], me: str, priority: int, now: datetime.datetime) -> bool:
    listed = peering.peers(obj)
    return peering.acting(listed, me, priority, now) and not peering.fenced(listed, me, now)


def test_a_replica_whose_keep_alive_runs_out_stops_before_another_may_take_over() -> None:
    # Both last wrote their keep-alives at T0, then the API server went away.
    obj = _peering(high=(20, T0), low=(10, T0))
    deadline = T0 + datetime.timedelta(seconds=LIFETIME)
    # kopf's rule alone: the standby acts once the other's deadline passes (as soon as it
    # can read the object again), while the other, which sees no live peer above it, acts on.
    after = deadline + datetime.timedelta(seconds=1)
    assert peering.acting(peering.peers(obj), "low", 10, after)
    assert peering.acting(peering.peers(obj), "high", 20, after)
    # With the fence, never both at the same moment, at any moment.
    moment = T0
    while moment < deadline + datetime.timedelta(seconds=30):
        assert not (_judge(obj, "high", 20, moment) and _judge(obj, "low", 10, moment)), moment
        moment += datetime.timedelta(milliseconds=250)
    # The healthy case: the acting replica acts until its margin, the standby does not.
    assert _judge(obj, "high", 20, deadline - peering.FENCE_MARGIN - datetime.timedelta(seconds=1))
    assert not _judge(obj, "high", 20, deadline - peering.FENCE_MARGIN)
    assert not _judge(obj, "low", 10, T0 + datetime.timedelta(seconds=1))


def test_a_replica_missing_from_the_peering_object_is_fenced() -> None:
    obj = _peering(other=(1, T0))
    assert peering.acting(peering.peers(obj), "me", 5, T0)  # kopf's rule: nobody above
    assert peering.fenced(peering.peers(obj), "me", T0)  # but nothing shows it is alive


def test_kopfs_keep_alive_rhythm_never_fences_a_healthy_replica() -> None:
    # kopf (a replica of an earlier version) renews every lifetime minus 5 to 10 s: the entry
    # always has at least 5 s left.
    for slack in range(5, 11):
        renewed = T0 + datetime.timedelta(seconds=LIFETIME - slack)
        obj = _peering(me=(7, T0))
        assert not peering.fenced(peering.peers(obj), "me", renewed)


class _Refusing:
    """A client that fails the test if any call reaches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API was called ({name}) while not acting")


def test_a_writer_that_is_not_acting_writes_nothing_and_counts_it() -> None:
    lease = LeaseView.from_body(
        {
            "metadata": {"name": "p.b.1234", "namespace": "ns", "uid": "u1"},
            "spec": {"podName": "p", "podUID": "1234", "binding": "b", "bot": "bot"},
            "status": {"phase": "Active"},
        }
    )
    recorded = metrics.Metrics()
    writer = Writer(_Refusing(), World(), acting=lambda: False)  # type: ignore[arg-type]

    async def attempts() -> None:
        metrics.use(recorded)  # in this run's context only
        for write in (
            writer.renew(lease, datetime.timedelta(minutes=5)),
            writer.revoke(lease, "PodGone"),
            writer.delete_revoked(lease),
            writer.patch_status("/apis/x", {"a": 1}),
        ):
            with pytest.raises(NotActing):
                await write

    asyncio.run(attempts())
    deferred = metrics.samples(recorded, "phabmesh_controller_writes_deferred_total")
    assert [value for _, value in deferred] == [4.0]


class _Patches:
    """Records the merge patches of the peering object."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, Any]] = []

    async def merge_patch(self, path: str, body: Any, **_: Any) -> Any:
        self.patches.append((path, body))
        return body


def _view(obj: dict[str, Any] | None) -> tuple[peering.PeeringView, _Patches]:
    client = _Patches()
    view = peering.PeeringView(client, "phabmesh", "me", 7, LIFETIME)  # type: ignore[arg-type]
    if obj is not None:
        view.informer.items["phabmesh"] = peering.peers(obj)
    view.informer.connected = True
    return view, client


PATH = "/apis/kopf.dev/v1/clusterkopfpeerings/phabmesh"


@pytest.mark.parametrize(
    ("entries", "now", "written"),
    [
        # Not there yet (just started, or removed by a peer that judged it dead): added.
        ({}, T0, {"me": {"priority": 7, "lifetime": LIFETIME, "lastseen": T0.isoformat()}}),
        # Less than half its lifetime passed: nothing to write.
        ({"me": (7, T0)}, T0 + datetime.timedelta(seconds=29), None),
        # Half of it passed: renewed.
        (
            {"me": (7, T0)},
            T0 + datetime.timedelta(seconds=30),
            {"me": {"priority": 7, "lifetime": LIFETIME, "lastseen": "2026-01-01T00:00:30+00:00"}},
        ),
        # A peer whose keep-alive ran out: removed, as kopf removes it; a live one is kept.
        (
            {"me": (7, T0), "dead": (9, T0 - datetime.timedelta(seconds=61)), "live": (3, T0)},
            T0,
            {"dead": None},
        ),
    ],
    ids=["added", "fresh", "renewed-at-half", "dead-peer-removed"],
)
def test_the_replica_keeps_its_own_entry_alive_and_removes_dead_peers(
    entries: dict[str, tuple[int, datetime.datetime]],
    now: datetime.datetime,
    written: dict[str, Any] | None,
) -> None:
    view, client = _view(_peering(**entries))
    asyncio.run(view.tend(now))
    assert client.patches == ([] if written is None else [(PATH, {"status": written})])


def test_nothing_is_written_without_the_peering_object_nor_once_stopping() -> None:
    view, client = _view(None)
    asyncio.run(view.tend(T0))
    assert client.patches == []
    view, client = _view(_peering())
    view.stopping = True
    asyncio.run(view.tend(T0))
    assert client.patches == []


def test_goodbye_removes_its_own_entry_and_stops_renewing() -> None:
    view, client = _view(_peering(me=(7, T0)))
    asyncio.run(view.goodbye())
    assert client.patches == [(PATH, {"status": {"me": None}})]
    asyncio.run(view.tend(T0 + datetime.timedelta(seconds=59)))
    assert len(client.patches) == 1
