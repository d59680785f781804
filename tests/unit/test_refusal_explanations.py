"""The credential endpoint's refusal explanations: API reads, budgeted per pod and namespace.

A stand-in for the API server counts the reads (pure logic; the same flood against the real
API server is in tests/integration/test_issuer_flood.py).
"""

from __future__ import annotations

from typing import Any

from phabmesh.endpoint import app
from phabmesh.endpoint.app import CredentialEndpoint, Reviewed, TokenReviewer
from phabmesh.settings import Settings

GENERIC = "no active credential lease for this pod"


class Api:
    """Answers the explanation's reads: the pod (as asked), no bindings, no bots."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    async def get(self, path: str, **_: Any) -> dict[str, Any]:
        self.reads.append(path)
        if "/pods/" in path:
            namespace, name = path.split("/namespaces/")[1].split("/pods/")
            return {"metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"}}
        return {"items": []}


class Leases:
    def of_pod(self, pod_uid: str) -> list[Any]:
        return []


class Informer:
    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items


class Grants:
    """Every binding name exists (the worst case: each is worth an explanation)."""

    namespaces = Informer({})

    def binding(self, namespace: str, name: str) -> object | None:
        return None if name.startswith("made-up") else object()


def endpoint(api: Api) -> CredentialEndpoint:
    reviewer = TokenReviewer(api, "phabmesh.io", 10.0)  # type: ignore[arg-type]
    issuer = CredentialEndpoint(
        Settings(),
        api,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        Leases(),  # type: ignore[arg-type]
        reviewer,
        grants=Grants(),  # type: ignore[arg-type]
    )
    # The budgets' clock stands still: nothing refills while the test runs.
    for name in ("_explain_budget", "_explain_per_pod", "_explain_per_namespace"):
        budget = getattr(issuer, name, None)  # (what there is of them)
        if budget is not None:
            budget.clock = lambda: 1e12
    return issuer


def pod(name: str, namespace: str = "tenant") -> Reviewed:
    return Reviewed(namespace, "runner", name, f"uid-{name}")


async def test_a_binding_name_not_in_the_namespace_is_answered_without_a_read() -> None:
    api = Api()
    issuer = endpoint(api)
    for i in range(500):
        reason = await issuer._why_no_lease(pod("prober"), f"made-up-{i}")
        assert reason == f'no PhabricatorBinding "made-up-{i}" in namespace tenant'
    assert api.reads == []


async def test_one_pod_or_one_namespace_cannot_spend_everyones_explanations() -> None:
    api = Api()
    issuer = endpoint(api)
    # One pod asking about many (existing) bindings: its own budget, then the plain answer.
    answers = [await issuer._why_no_lease(pod("prober"), f"b{i}") for i in range(100)]
    reads = len(api.reads)
    # Another namespace's pod is still told why.
    assert await issuer._why_no_lease(pod("victim", "other"), None) != GENERIC
    explained = [a for a in answers if a != GENERIC]
    assert len(explained) == app.EXPLAIN_POD_BURST
    assert reads == 3 * app.EXPLAIN_POD_BURST
    # Its namespace's other pods, until the namespace's budget is spent.
    spent = app.EXPLAIN_POD_BURST
    for i in range(100):
        if await issuer._why_no_lease(pod(f"prober-{i}"), "b0") != GENERIC:
            spent += 1
    assert spent == app.EXPLAIN_NAMESPACE_BURST
    assert await issuer._why_no_lease(pod("victim-2", "other"), None) != GENERIC
