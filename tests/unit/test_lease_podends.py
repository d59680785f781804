"""Which pods have ended, from pod watch events fed by hand."""

from __future__ import annotations

from typing import Any

import pytest

from phabmesh.leases import podends
from phabmesh.leases.podends import PodEnds


def _pod(name: str, uid: str, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": "ci", "name": name, "uid": uid}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def _feed(ends: PodEnds, kind: str, obj: dict[str, Any]) -> None:
    ends.informer._apply({"type": kind, "object": obj})


@pytest.mark.parametrize(
    ("pod", "ended"),
    [
        (_pod("a", "u", "Pending"), ""),
        (_pod("a", "u", "Running"), ""),
        (_pod("a", "u", "Running", deleting=True), "PodTerminating"),
        (_pod("a", "u", "Succeeded"), "PodSucceeded"),
        (_pod("a", "u", "Failed"), "PodFailed"),
        (_pod("a", "u", "Succeeded", deleting=True), "PodTerminating"),
    ],
)
def test_what_counts_as_ended(pod: dict[str, Any], ended: str) -> None:
    assert podends.pod_life(pod) == podends.PodLife("u", ended)


def test_a_pod_is_followed_from_start_to_deletion() -> None:
    ends = PodEnds(client=None)  # type: ignore[arg-type] # events fed by hand
    _feed(ends, "ADDED", _pod("a", "u1", "Pending"))
    _feed(ends, "MODIFIED", _pod("a", "u1"))
    assert ends.reason("u1") is None
    _feed(ends, "MODIFIED", _pod("a", "u1", deleting=True))
    assert ends.reason("u1") == "PodTerminating"
    _feed(ends, "DELETED", _pod("a", "u1", deleting=True))
    assert ends.reason("u1") == "PodDeleted"
    assert "u1" not in ends.ended  # kept only among the bounded deleted


def test_a_new_pod_under_an_old_name_is_not_the_old_one() -> None:
    ends = PodEnds(client=None)  # type: ignore[arg-type]
    _feed(ends, "ADDED", _pod("a", "u1", "Succeeded"))
    # The DELETED event was missed (a relist would report it); the name came back as a new pod.
    _feed(ends, "ADDED", _pod("a", "u2"))
    assert ends.reason("u1") == "PodDeleted"
    assert ends.reason("u2") is None
    assert ends.reason("never-seen") is None  # unknown pods are left to their lease


def test_deleted_pods_are_remembered_within_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podends, "GONE", 3)
    ends = PodEnds(client=None)  # type: ignore[arg-type]
    for i in range(5):
        _feed(ends, "ADDED", _pod(f"p{i}", f"u{i}"))
        _feed(ends, "DELETED", _pod(f"p{i}", f"u{i}"))
    assert list(ends.gone) == ["u2", "u3", "u4"]
    assert ends.reason("u0") is None


def test_pods_are_listed_after_the_leases_and_consistently() -> None:
    import asyncio
    from collections.abc import Mapping

    from phabmesh.kube.client import JSON
    from phabmesh.kube.informer import Informer
    from tests.fakeapi import FakeAPI

    class Versions(FakeAPI):
        async def list_all(
            self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
        ) -> tuple[list[JSON], str]:
            return [], "41" if "phabricatorcredentials" in path else "42"

    async def scenario() -> list[str]:
        api = Versions()
        leases: Informer[Any] = Informer(
            api, "/apis/phabmesh.io/v1alpha1/phabricatorcredentials", dict
        )  # type: ignore[arg-type]
        ends = PodEnds(api, after=leases)  # type: ignore[arg-type]
        pods = asyncio.create_task(ends.run())
        await asyncio.sleep(0.05)
        assert api.listed_from == []  # nothing before the leases have listed
        watching = asyncio.create_task(leases.run())
        try:
            await asyncio.wait_for(ends.informer.synced.wait(), 5)
            return api.listed_from
        finally:
            for task in (pods, watching):
                task.cancel()
            await asyncio.gather(pods, watching, return_exceptions=True)

    # Both consistent reads: the pods' is newer than the leases' (not "not older than" the
    # leases' version, which the pods' watch cache may not reach: see leases.watches).
    assert asyncio.run(scenario()) == ["", ""]


def test_the_meshed_alone_are_watched_when_unmeshed_pods_are_not() -> None:
    from phabmesh import identity
    from phabmesh.leases.watches import Watches

    selector = {"labelSelector": "linkerd.io/control-plane-ns"}
    for unmeshed, params in ((True, {}), (False, selector)):
        watches = Watches(None, identity.Naming(), namespace="x", unmeshed_pods=unmeshed)  # type: ignore[arg-type]
        assert watches.pods.params == params
        assert PodEnds(None, unmeshed_pods=unmeshed).informer.params == params  # type: ignore[arg-type]
        # Nothing else is filtered.
        assert all(i.params == {} for i in watches.all if i is not watches.pods)
