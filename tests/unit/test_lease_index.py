"""The lease index files leases by the locator of their Phorge-shaped credentials."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from phabmesh.credentials import phorge
from phabmesh.kube.informer import ADDED, DELETED, MODIFIED
from phabmesh.leases import index as lease_index
from phabmesh.leases.view import LeaseView


def _lease(i: int, **over: Any) -> LeaseView:
    view = LeaseView(
        namespace="build",
        name=f"runner-{i}.runners.0000",
        pod_uid=f"pod-{i}",
        pod_name=f"runner-{i}",
        binding="runners",
        bot="ci-bot",
        identity="runner.build.serviceaccount.identity.linkerd.cluster.local",
        phase="Active",
        expires_at=None,
        issued_at=None,
        uid=f"lease-{i}",
    )
    return dataclasses.replace(view, **over)


def _index() -> lease_index.LeaseIndex:
    return lease_index.LeaseIndex(cast(Any, None))  # no watch runs: events are fed by hand


def _key(lease: LeaseView) -> str:
    return f"{lease.namespace}/{lease.name}"


def test_leases_are_found_by_locator_with_their_digest() -> None:
    index = _index()
    first, second = _lease(1), _lease(2)
    for lease in (first, second):
        index._on_event(ADDED, _key(lease), lease)
    assert list(index.at_locator(phorge.locator(first.uid))) == [(first, first.phorge_digest())]
    assert list(index.at_locator("aaaaaa")) == []
    revoked = dataclasses.replace(first, phase="Revoked", reason="PodTerminating")
    index._on_event(MODIFIED, _key(first), revoked)
    assert list(index.at_locator(phorge.locator(first.uid))) == [(revoked, first.phorge_digest())]


def test_removed_leases_stay_findable_for_the_refusal_only() -> None:
    index = _index()
    lease = dataclasses.replace(_lease(1), phase="Revoked", reason="PodDeleted")
    index._on_event(ADDED, _key(lease), lease)
    index._on_event(DELETED, _key(lease), None)
    locator = phorge.locator(lease.uid)
    assert list(index.at_locator(locator)) == []
    assert list(index.buried_at(locator)) == [(lease.uid, lease.phorge_digest())]
    assert index.tombstones[lease.uid] == "PodDeleted"


def test_the_removed_ones_are_bounded_oldest_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_index, "BURIED", 3)
    index = _index()
    leases = [_lease(i) for i in range(5)]
    for lease in leases:
        index._on_event(ADDED, _key(lease), lease)
        index._on_event(DELETED, _key(lease), None)
    buried = [bool(list(index.buried_at(phorge.locator(x.uid)))) for x in leases]
    assert buried == [False, False, True, True, True]
    assert len(index.tombstones) == 5  # the reasons themselves are kept longer
