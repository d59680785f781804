"""The lease index files leases by the locator of their Phorge-shaped credentials."""

from __future__ import annotations

import dataclasses
import datetime
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


def test_a_credentials_term_start_is_found_by_its_expiry() -> None:
    """The earliest a Phorge-shaped credential (which carries only its expiry) can have been
    made: its term's start, for the current term and for earlier terms the watch saw."""
    index = _index()
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    minute = datetime.timedelta(minutes=1)
    issued = now - 3 * minute
    first = _lease(1, issued_at=issued, renewed_at=issued, expires_at=issued + 5 * minute)
    index._on_event(ADDED, _key(first), first)
    assert index.term_start(first, issued + 5 * minute) == issued
    renewed = dataclasses.replace(first, renewed_at=now - minute, expires_at=now + 3 * minute)
    index._on_event(MODIFIED, _key(renewed), renewed)
    shortened = dataclasses.replace(renewed, renewed_at=now, expires_at=now + minute)
    index._on_event(MODIFIED, _key(shortened), shortened)
    assert index.term_start(shortened, now + minute) == now  # the current term
    assert index.term_start(shortened, now + 3 * minute) == now - minute  # the one before
    assert index.term_start(shortened, issued + 5 * minute) == issued
    assert index.term_start(shortened, now + 2 * minute) == issued  # no such term: issuedAt
    # A lease re-created under the same name keeps none of the old one's terms.
    again = _lease(1, uid="lease-1b", issued_at=now, renewed_at=now, expires_at=now + minute)
    index._on_event(MODIFIED, _key(again), again)
    assert index.term_start(again, now + 3 * minute) == now
    index._on_event(DELETED, _key(again), None)
    assert index._terms == {}
