"""The credential endpoint's TokenReviews under a flood: caches, a filter and budgets.

A stand-in for the API server counts the reviews it is asked for (pure logic; the same
flood against the real API server is in tests/integration/test_issuer_flood.py).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from phabmesh.endpoint.app import RateLimited, TokenReviewer

AUDIENCE = "phabmesh.io"


class Reviews:
    """Answers every TokenReview: authenticated only for tokens in ``good``."""

    def __init__(self, good: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.good = good
        self.calls: list[tuple[str, bool]] = []

    async def token_review(
        self, token: str, audiences: list[str], *, limited: bool = True
    ) -> dict[str, Any]:
        self.calls.append((token, limited))
        if token not in self.good:
            return {"authenticated": False}
        return {
            "authenticated": True,
            "audiences": audiences,
            "user": {
                "username": "system:serviceaccount:ci:runner",
                "extra": {
                    "authentication.kubernetes.io/pod-name": ["p"],
                    "authentication.kubernetes.io/pod-uid": ["u"],
                },
            },
        }


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def jwt(subject: str, audience: Any = AUDIENCE) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'aud': audience, 'sub': subject})}.c2ln"


def reviewer(api: Reviews, clock: Clock, **limits: Any) -> TokenReviewer:
    settings: dict[str, Any] = {
        "negative_ttl": 5.0,
        "rate": 1.0,
        "burst": 50,
        "source_rate": 1.0,
        "source_burst": 5,
    }
    settings.update(limits)
    return TokenReviewer(api, AUDIENCE, 10.0, clock, **settings)  # type: ignore[arg-type]


async def test_what_is_not_a_token_for_the_audience_costs_no_review() -> None:
    api = Reviews()
    tokens = reviewer(api, Clock())
    for junk in ("junk", "a.b", "a.b.c", jwt("x", "another-audience"), "x." * 10_000):
        assert await tokens.review(junk, "flood") is None
    assert api.calls == []


async def test_a_refused_token_is_refused_again_without_a_review_for_a_while() -> None:
    api, clock = Reviews(), Clock()
    tokens = reviewer(api, clock)
    forged = jwt("forged")
    assert await tokens.review(forged, "a") is None
    assert await tokens.review(forged, "b") is None
    assert len(api.calls) == 1
    clock.now += 6
    assert await tokens.review(forged, "a") is None
    assert len(api.calls) == 2


async def test_a_flooding_source_is_refused_while_a_real_pod_goes_on() -> None:
    good = jwt("real")
    api, clock = Reviews({good}), Clock()
    tokens = reviewer(api, clock)
    limited = []
    for i in range(600):
        try:
            await tokens.review(jwt(f"forged-{i}"), "10.0.0.9")
        except RateLimited as exc:
            limited.append(exc)
    assert len(api.calls) == 5  # the source's burst, nothing more
    assert len(limited) == 595
    assert all(exc.scope == "source" and exc.retry_after > 0 for exc in limited)
    who = await tokens.review(good, "runner.ci.serviceaccount.identity.linkerd.cluster.local")
    assert who is not None and who.pod_uid == "u"
    # Its review is cached: the next exchange costs no review and no budget.
    assert await tokens.review(good, "10.0.0.9") is not None
    assert len(api.calls) == 6
    assert all(limited_flag is False for _, limited_flag in api.calls)  # a budget of its own


async def test_many_sources_together_meet_the_shared_budget() -> None:
    api = Reviews()
    tokens = reviewer(api, Clock(), burst=10)
    scopes = []
    for i in range(30):
        try:
            await tokens.review(jwt(f"forged-{i}"), f"source-{i}")
        except RateLimited as exc:
            scopes.append(exc.scope)
    assert len(api.calls) == 10
    assert scopes == ["all"] * 20


@pytest.mark.parametrize("good", [False, True])
async def test_both_caches_are_bounded(good: bool) -> None:
    tokens = [jwt(f"t{i}") for i in range(50)]
    api = Reviews(set(tokens) if good else set())
    reviews = reviewer(api, Clock(), cache_size=7, source_burst=100, burst=100)
    for token in tokens:
        await reviews.review(token, "s")
    assert len(reviews._cache if good else reviews._refused) == 7


def test_the_source_is_the_mesh_identity_only_from_the_local_proxy() -> None:
    from phabmesh.endpoint.app import review_source

    identity = "runner.ci.serviceaccount.identity.linkerd.cluster.local"
    assert review_source(identity, "127.0.0.1") == f"id:{identity}"
    assert review_source(identity, "::1") == f"id:{identity}"
    assert review_source(None, "127.0.0.1") == "peer:127.0.0.1"  # unmeshed: the proxy's budget
    # From anywhere else the header is anyone's to set: the address counts.
    assert review_source(identity, "10.0.0.9") == "peer:10.0.0.9"
    long_ones = {review_source(c * 100_000, "127.0.0.1") for c in "xy"}
    assert len(long_ones) == 2 and all(len(key) < 100 for key in long_ones)
