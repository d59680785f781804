"""The credential endpoint under a flood of unauthenticated requests, on the real API server.

A review found that 600 concurrent ``Bearer junk<i>`` requests made 600 TokenReviews and
held a real pod's exchange up for 26.8 s: failed reviews were not cached and shared one
budget with everything else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp

from tests.kube import Cluster, wait_for
from tests.phab import active_leases, make_pod, pod_token
from tests.stack import Threaded


def token_reviews(cluster: Cluster) -> float:
    """TokenReviews the API server has answered so far (its own request counter)."""
    metrics = cluster.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("apiserver_request_total{")
        and 'resource="tokenreviews"' in line
        and 'verb="POST"' in line
    )


def forged(i: int) -> str:
    """A JWT for the right audience with a made-up signature: only a TokenReview tells."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'aud': ['phabmesh.io'], 'sub': f'x{i}'})}.c2ln"


async def _post(
    http: aiohttp.ClientSession, url: str, token: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str | None]:
    async with http.post(
        url, headers={"Authorization": f"Bearer {token}", **(headers or {})}
    ) as answer:
        return answer.status, await answer.json(), answer.headers.get("Retry-After")


async def test_a_flood_of_bad_tokens_costs_few_reviews_and_a_real_pod_goes_on(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    token = pod_token(cluster, bound, pod)
    identity = f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    settings = operator.process.settings  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{operator.process.issuer_port}/v1/credentials"  # type: ignore[attr-defined]
    before = token_reviews(cluster)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=600)) as http:
        flood = [_post(http, url, f"junk{i}") for i in range(600)]
        flood += [_post(http, url, forged(i)) for i in range(600)]
        tasks = [asyncio.ensure_future(one) for one in flood]
        await asyncio.sleep(0.05)
        # A meshed pod's call carries its identity (Linkerd sets l5d-client-id): its own budget.
        real = await _post(http, url, token, {"l5d-client-id": identity})
        answers = await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    reviews = token_reviews(cluster) - before

    assert real[0] == 200, real
    assert {status for status, _, _ in answers[:600]} == {401}  # junk: refused, never reviewed
    forgeries = answers[600:]
    limited = [(body, retry) for status, body, retry in forgeries if status == 429]
    assert limited, "the flooding source was never limited"
    assert all(body["error"] == "rate_limited" and int(retry or 0) >= 1 for body, retry in limited)
    assert {status for status, _, _ in forgeries} <= {401, 429}
    # The flooding source's budget and the real pod's one review, nothing more.
    bound_ = settings.token_review_source_burst + settings.token_review_source_qps * elapsed + 1
    assert reviews <= bound_, (reviews, elapsed)


def test_an_overlong_binding_name_is_refused_before_any_review(
    cluster: Cluster, operator: Threaded
) -> None:
    import requests

    url = f"http://127.0.0.1:{operator.process.issuer_port}/v1/credentials"  # type: ignore[attr-defined]
    before = token_reviews(cluster)
    answer = requests.post(
        url,
        params={"binding": "b" * 5000},
        headers={"Authorization": f"Bearer {forged(1)}"},
        timeout=10,
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_request"
    assert len(answer.text) < 200
    assert token_reviews(cluster) == before
