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
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from kubernetes import client

from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster, force_delete_pods, wait_for
from tests.phab import active_leases, bind, make_pod, pod_token
from tests.stack import Threaded

GENERIC = "no active credential lease for this pod"  # what an unexplained refusal says


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
    url = f"http://127.0.0.1:{operator.process.endpoint_port}/v1/credentials"  # type: ignore[attr-defined]
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
    # Each says when to come back: what is left of the wait once the refusal was held (0: now).
    assert all(
        body["error"] == "rate_limited" and retry is not None and int(retry) >= 0
        for body, retry in limited
    )
    assert {status for status, _, _ in forgeries} <= {401, 429}
    # The flooding source's budget and the real pod's one review, nothing more.
    bound_ = settings.token_review_source_burst + settings.token_review_source_qps * elapsed + 1
    assert reviews <= bound_, (reviews, elapsed)


def test_an_overlong_binding_name_is_refused_before_any_review(
    cluster: Cluster, operator: Threaded
) -> None:
    import requests

    url = f"http://127.0.0.1:{operator.process.endpoint_port}/v1/credentials"  # type: ignore[attr-defined]
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


@pytest.fixture
def namespace_2(cluster: Cluster) -> Iterator[str]:
    """A second fresh namespace (a second tenant), removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    force_delete_pods(cluster.core, name)
    cluster.core.delete_namespace(name)


def _list_calls(cluster: Cluster, resource: str) -> float:
    """LISTs of ``resource`` the API server has answered so far."""
    metrics = cluster.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("apiserver_request_total{")
        and f'resource="{resource}"' in line
        and 'verb="LIST"' in line
    )


def _mesh_identity(service_account: str, namespace: str) -> str:
    return f"{service_account}.{namespace}.serviceaccount.identity.linkerd.cluster.local"


async def _flood_from(
    http: aiohttp.ClientSession, url: str, identity: str, stop: asyncio.Event, cap: int
) -> list[int]:
    """Forged tokens, one after the other, from one mesh identity until ``stop`` (at most
    ``cap``): what a pod of that service account could send."""
    statuses = []
    for i in range(cap):
        if stop.is_set():
            break
        status, _, _ = await _post(
            http, url, forged(hash((identity, i))), {"l5d-client-id": identity}
        )
        statuses.append(status)
    return statuses


async def test_many_service_accounts_of_one_namespace_drain_only_its_share(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, bound: str, namespace_2: str
) -> None:
    """A review's model: 20 flooding identities refused 78 % of other tenants' exchanges and
    50 refused all, each identity within its own budget. Here 50 service accounts of one
    namespace flood; a pod of another namespace and a lease holder of the flooded namespace
    exchange fresh tokens meanwhile."""
    bind(cluster, conduit, namespace_2)
    holder = make_pod(cluster, bound, "runner-1")
    other = make_pod(cluster, namespace_2, "runner-1")
    wait_for(lambda: active_leases(cluster, bound) and active_leases(cluster, namespace_2))
    url = f"http://127.0.0.1:{operator.process.endpoint_port}/v1/credentials"  # type: ignore[attr-defined]
    settings = operator.process.settings  # type: ignore[attr-defined]
    real = {
        "lease holder of the flooded namespace": (
            pod_token(cluster, bound, holder),
            {"l5d-client-id": _mesh_identity("runner", bound)},
        ),
        "pod of another namespace": (
            pod_token(cluster, namespace_2, other),
            {"l5d-client-id": _mesh_identity("runner", namespace_2)},
        ),
    }
    stop = asyncio.Event()
    before = token_reviews(cluster)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as http:
        flood = [
            asyncio.ensure_future(
                _flood_from(http, url, _mesh_identity(f"flood-{i}", bound), stop, 200)
            )
            for i in range(50)
        ]
        await asyncio.sleep(0.5)  # the namespace's share spent, and still asked for
        try:
            answers = {
                who: await _post(http, url, token, headers)
                for who, (token, headers) in real.items()
            }
        finally:
            stop.set()
        statuses = [s for done in await asyncio.gather(*flood) for s in done]
    elapsed = time.monotonic() - started
    reviews = token_reviews(cluster) - before

    for who, (status, body, _) in answers.items():
        assert status == 200, (who, status, body)
    # Refused for the namespace's budget (each refusal held a while, so a few hundred), and
    # limited to the namespace's share of reviews (below).
    assert 429 in statuses, "the flood was never refused for its budget"
    assert set(statuses) <= {401, 429}
    # The flood's namespace share (and the two real reviews), however many identities.
    share = settings.token_review_namespace_burst + settings.token_review_namespace_qps * elapsed
    assert reviews <= share + 2, (reviews, elapsed)


async def test_random_binding_names_cost_no_api_reads_and_leave_others_their_explanations(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    """A review: 5,798 requests with random ``?binding=`` names in 16 s made 354 cluster-wide
    lists of bots, and meanwhile other pods' refusals said only the generic message."""
    # Pods of a service account no binding names: no lease, so each exchange is refused and
    # explained.
    prober = make_pod(cluster, bound, "prober", sa="other")
    victim = make_pod(cluster, bound, "victim", sa="other")
    url = f"http://127.0.0.1:{operator.process.endpoint_port}/v1/credentials"  # type: ignore[attr-defined]
    token = pod_token(cluster, bound, prober)
    bot_lists = _list_calls(cluster, "phabricatorbots")
    victim_token = pod_token(cluster, bound, victim)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:
        flood = asyncio.gather(
            *(_post(http, f"{url}?binding=made-up-{uuid.uuid4().hex}", token) for _ in range(400))
        )
        await asyncio.sleep(0.3)
        victim_answer = await _post(http, url, victim_token)  # while the flood goes on
        answers = await flood
    assert {status for status, _, _ in answers} == {403}
    assert all("no PhabricatorBinding" in body["message"] for _, body, _ in answers)
    assert _list_calls(cluster, "phabricatorbots") - bot_lists <= 2
    status, body, _ = victim_answer
    assert status == 403 and body["error"] == "no_lease"
    assert body["message"] != GENERIC, body
