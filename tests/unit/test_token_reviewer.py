"""The credential endpoint's TokenReviews under a flood: caches, a filter and budgets.

A stand-in for the API server counts the reviews it is asked for (pure logic; the same
flood against the real API server is in tests/integration/test_issuer_flood.py).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import heapq
import json
import random
from typing import Any

import pytest

from phabmesh.endpoint.app import MAX_JOINED, RateLimited, TokenReviewer
from phabmesh.settings import Settings

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
    # Linkerd 2.11 and later: the proxy connects from the pod's own address.
    assert review_source(identity, "10.0.0.9", "10.0.0.9") == f"id:{identity}"
    # From anywhere else the header is anyone's to set: the address counts.
    assert review_source(identity, "10.0.0.9") == "peer:10.0.0.9"
    assert review_source(identity, "10.0.0.9", "10.0.0.8") == "peer:10.0.0.9"
    long_ones = {review_source(c * 100_000, "127.0.0.1") for c in "xy"}
    assert len(long_ones) == 2 and all(len(key) < 100 for key in long_ones)


# -- many identities in one namespace ---------------------------------------------------------
#
# A tenant needs only more ServiceAccounts to have more sources. The model: ``identities``
# mesh identities of namespace ``tenant`` each send forged tokens (Poisson, 10 a second) for
# 120 s, the time an init-mode agent waits through refusals before its Job fails. Meanwhile
# pods of ten other namespaces exchange fresh tokens (2 a second in all) and a pod of the
# tenant's namespace that holds a lease does (1 a second). Each class's share refused.

MESH = "serviceaccount.identity.linkerd.cluster.local"
HOLDER_UID = "uid-of-a-lease-holder"
HOLDER = f"holder.tenant.{MESH}"


class Mesh(Reviews):
    """Authenticates every token whose subject starts with ``real``."""

    async def token_review(
        self, token: str, audiences: list[str], *, limited: bool = True
    ) -> dict[str, Any]:
        payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        self.good = {token} if payload["sub"].startswith("real") else set()
        return await super().token_review(token, audiences, limited=limited)


def pod_jwt(subject: str, pod_uid: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    claims = {"aud": AUDIENCE, "sub": subject, "kubernetes.io": {"pod": {"uid": pod_uid}}}
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def shipped(*, before: bool) -> dict[str, Any]:
    """The budgets at the shipped defaults: today's, or those without namespaces and
    reserve (what shipped before)."""
    s = Settings()
    limits = {
        "negative_ttl": s.token_review_negative_cache_ttl,
        "rate": s.token_review_qps,
        "burst": s.token_review_burst,
        "source_rate": s.token_review_source_qps,
        "source_burst": s.token_review_source_burst,
    }
    if not before:
        limits |= {
            "namespace_rate": s.token_review_namespace_qps,
            "namespace_burst": s.token_review_namespace_burst,
            "reserve_rate": s.token_review_reserve_qps,
            "reserve_burst": s.token_review_reserve_burst,
        }
    return limits


async def flood_model(identities: int, limits: dict[str, Any]) -> dict[str, float]:
    """Per class of caller (flood, other namespaces, lease holder): the share refused."""
    clock, rng = Clock(), random.Random(identities)
    tokens = TokenReviewer(
        Mesh(),  # type: ignore[arg-type]
        AUDIENCE,
        10.0,
        clock,
        holds_lease=lambda uid, who: (uid, who) == (HOLDER_UID, HOLDER),
        **limits,
    )
    start, end = clock.now, clock.now + 120.0
    # (when, class, caller): every caller's next request.
    callers = [(f"f{i}.tenant.{MESH}", 10.0, "flood") for i in range(identities)]
    callers += [(f"runner.team-{i}.{MESH}", 0.2, "other") for i in range(10)]
    callers += [(HOLDER, 1.0, "holder")]
    queue = [(start + rng.expovariate(rate), n) for n, (_, rate, _) in enumerate(callers)]
    heapq.heapify(queue)
    sent: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    while queue[0][0] < end:
        when, n = heapq.heappop(queue)
        who, rate, kind = callers[n]
        clock.now = when
        sent[kind] += 1
        subject = "forged" if kind == "flood" else "real"
        token = pod_jwt(f"{subject}-{sent.total()}", HOLDER_UID if kind == "holder" else "x")
        try:
            await tokens.review(token, f"id:{who}", namespace=who.split(".")[1], mesh_identity=who)
        except RateLimited:
            refused[kind] += 1
        heapq.heappush(queue, (when + rng.expovariate(rate), n))
    return {kind: refused[kind] / sent[kind] for kind in sent}


async def test_many_identities_of_one_namespace_drained_everyone_before() -> None:
    refused = {n: (await flood_model(n, shipped(before=True)))["other"] for n in (8, 12, 20, 50)}
    # As the review's model: nothing at 8 identities, then more and more (here 0 %, 14 %,
    # 48 % and 75 %).
    assert refused[8] == 0
    assert 0.05 < refused[12] < refused[20] < refused[50]
    assert refused[20] > 0.4 and refused[50] > 0.7, refused


@pytest.mark.parametrize("identities", [8, 12, 20, 50])
async def test_many_identities_of_one_namespace_spend_only_its_share(identities: int) -> None:
    refused = await flood_model(identities, shipped(before=False))
    assert refused["other"] == 0  # other namespaces: their own shares
    assert refused["holder"] == 0  # the flooded namespace's lease holder: the reserve
    assert refused["flood"] > 0.5  # the flood itself: its namespace's share, no more


async def test_a_forged_claim_of_a_lease_spends_only_the_callers_own_reserve() -> None:
    """The pod UID a token names is unverified before the review: a caller naming a lease
    holder's pod gains the reserve only with the lease holder's own mesh identity."""
    clock = Clock()
    tokens = reviewer(
        Reviews(),
        clock,
        rate=10.0,
        burst=10,
        source_rate=100.0,
        source_burst=100,
        namespace_rate=1.0,
        namespace_burst=2,
        reserve_rate=4.0,
        reserve_burst=8,
        holds_lease=lambda uid, who: (uid, who) == (HOLDER_UID, HOLDER),
    )
    flooder = f"f0.tenant.{MESH}"
    scopes = []
    for i in range(20):
        try:
            await tokens.review(
                pod_jwt(f"forged-{i}", HOLDER_UID),
                f"id:{flooder}",
                namespace="tenant",
                mesh_identity=flooder,
            )
        except RateLimited as exc:
            scopes.append(exc.scope)
    assert scopes == ["namespace"] * 18  # its namespace's burst of 2, and no reserve
    # The lease holder itself: its namespace's share is spent, the reserve is there, up to
    # its namespace's quarter of it (a burst of 2).
    for i in range(2):
        token = pod_jwt(f"real-{i}", HOLDER_UID)
        assert (
            await tokens.review(token, f"id:{HOLDER}", namespace="tenant", mesh_identity=HOLDER)
            is None
        )
    with pytest.raises(RateLimited):
        await tokens.review(
            pod_jwt("real-2", HOLDER_UID), f"id:{HOLDER}", namespace="tenant", mesh_identity=HOLDER
        )


def test_a_reserve_as_large_as_the_whole_is_refused_with_the_settings_to_fix() -> None:
    with pytest.raises(ValueError, match="PHABMESH_TOKEN_REVIEW_RESERVE_QPS"):
        reviewer(Reviews(), Clock(), rate=10.0, burst=20, reserve_rate=10.0, reserve_burst=5)


def test_the_namespace_is_the_mesh_identitys_only_from_the_local_proxy() -> None:
    from phabmesh.endpoint.app import caller_identity, caller_namespace
    from phabmesh.identity import Naming

    naming = Naming("linkerd", "cluster.local")
    identity = f"runner.ci.{MESH}"
    assert caller_namespace(caller_identity(identity, "127.0.0.1"), naming) == "ci"
    assert caller_identity(identity, "10.0.0.9") is None  # anyone's to send from elsewhere
    assert caller_namespace(None, naming) is None  # unidentified: one shared budget
    assert caller_namespace("runner.ci.serviceaccount.identity.other.example", naming) is None


class Slow(Reviews):
    """Answers once let go (``answer``), or fails with ``error``."""

    def __init__(self, good: set[str]) -> None:
        super().__init__(good)
        self.answer = asyncio.Event()
        self.error: Exception | None = None

    async def token_review(
        self, token: str, audiences: list[str], *, limited: bool = True
    ) -> dict[str, Any]:
        await self.answer.wait()
        if self.error is not None:
            self.calls.append((token, limited))
            raise self.error
        return await super().token_review(token, audiences, limited=limited)


async def test_concurrent_requests_with_one_token_share_one_review() -> None:
    """A pod retrying with the same token while its first review is under way: one review,
    one unit of its budget, one answer for all, even when the first caller goes away."""
    good = jwt("real")
    api = Slow({good})
    tokens = reviewer(api, Clock(), source_burst=2)
    first = asyncio.ensure_future(tokens.review(good, "10.0.0.9"))
    await asyncio.sleep(0)
    joined = [asyncio.ensure_future(tokens.review(good, "10.0.0.9")) for _ in range(50)]
    await asyncio.sleep(0)
    first.cancel()  # its caller disconnected
    api.answer.set()
    answers = await asyncio.gather(*joined)
    assert all(who is not None and who.pod_uid == "u" for who in answers)
    assert len(api.calls) == 1
    # The source spent one of its two: another token still gets a review.
    assert await tokens.review(jwt("forged"), "10.0.0.9") is None
    assert len(api.calls) == 2


async def test_a_shared_review_that_fails_fails_for_all_and_the_next_one_reviews_again() -> None:
    token = jwt("real")
    api = Slow({token})
    api.error = OSError("connection reset")
    tokens = reviewer(api, Clock())
    callers = [asyncio.ensure_future(tokens.review(token, f"s{i}")) for i in range(5)]
    await asyncio.sleep(0)
    api.answer.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, OSError) for o in outcomes)
    assert len(api.calls) == 1
    api.error = None
    assert await tokens.review(token, "s0") is not None
    assert len(api.calls) == 2


async def test_past_the_free_joiners_copies_of_a_token_pay_their_budgets() -> None:
    """A forged token's copies sent while its one review is under way: the first
    MAX_JOINED wait for it for free, the rest spend their source's budget or are refused."""
    forged = jwt("forged")
    api = Slow(set())
    tokens = reviewer(api, Clock(), source_burst=3)
    first = asyncio.ensure_future(tokens.review(forged, "10.0.0.9"))
    await asyncio.sleep(0)
    copies = [
        asyncio.ensure_future(tokens.review(forged, "10.0.0.9")) for _ in range(MAX_JOINED + 10)
    ]
    await asyncio.sleep(0)
    api.answer.set()
    outcomes = await asyncio.gather(first, *copies, return_exceptions=True)
    limited = [o for o in outcomes if isinstance(o, RateLimited)]
    assert len(api.calls) == 1  # still one review
    assert len(limited) == 10 - 2  # the source's other two units paid for two of them
    assert all(o is None for o in outcomes if not isinstance(o, RateLimited))
