"""When a verified credential has outlived the binding's credentialTTL (gateway.app.Caller)."""

from __future__ import annotations

import datetime

from phabmesh.gateway.app import Caller

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
LEEWAY = datetime.timedelta(seconds=30)


def caller(expires_at: datetime.datetime, issued_at: datetime.datetime | None) -> Caller:
    return Caller("id", "ns", "pod", "uid", "b", "bot", "lease", "x", expires_at, issued_at)


def test_a_credential_ending_with_its_lease_has_not_outlived_it() -> None:
    lease_end = NOW + 10 * MINUTE
    assert not caller(lease_end, None).outlives(10 * MINUTE, lease_end, NOW, LEEWAY)
    assert not caller(lease_end, NOW).outlives(10 * MINUTE, lease_end, NOW, LEEWAY)


def test_a_credential_ending_after_its_shortened_lease_has() -> None:
    # The TTL went from 10m to 1m: the lease now ends in a minute, the credential in eight.
    lease_end = NOW + MINUTE
    old = NOW + 8 * MINUTE
    assert caller(old, None).outlives(MINUTE, lease_end, NOW, LEEWAY)
    assert caller(old, NOW - 2 * MINUTE).outlives(MINUTE, lease_end, NOW, LEEWAY)


def test_the_gateways_clock_does_not_matter_without_an_issue_time() -> None:
    lease_end = NOW + MINUTE
    skewed = NOW - datetime.timedelta(seconds=45)  # a gateway 45 s behind
    assert not caller(lease_end, None).outlives(MINUTE, lease_end, skewed, LEEWAY)


def test_a_jwt_older_than_the_ttl_has_outlived_it() -> None:
    lease_end = NOW + 10 * MINUTE
    issued = NOW - 2 * MINUTE
    assert caller(NOW + MINUTE, issued).outlives(MINUTE, lease_end, NOW, LEEWAY)
    assert not caller(NOW + MINUTE, issued).outlives(5 * MINUTE, lease_end, NOW, LEEWAY)


def test_a_young_credential_keeps_its_time_when_the_ttl_shrinks() -> None:
    # credentialTTL 2m -> 1m, 2.1 s after the credential was made: the lease now ends a minute
    # from now, the credential in two; it is good until its issue time plus the new TTL.
    issued = NOW - datetime.timedelta(seconds=2.1)
    lease_end = NOW + MINUTE
    young = caller(issued + 2 * MINUTE, issued)
    assert not young.outlives(MINUTE, lease_end, NOW, LEEWAY)
    assert not young.outlives(MINUTE, lease_end, issued + MINUTE + LEEWAY, LEEWAY)
    later = issued + MINUTE + LEEWAY + datetime.timedelta(seconds=1)
    assert young.outlives(MINUTE, lease_end, later, LEEWAY)
