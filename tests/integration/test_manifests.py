"""manifests/ on the real API server: it applies, and RBAC is exactly least privilege.

Linkerd's policy CRDs are not installed here, so those objects are checked offline; the
kopf peering object is applied after its CRD is established.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.kube import Cluster

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
SA = "system:serviceaccount:phabmesh-system:phabmesh-{}"

OPERATOR_CALLS = [
    ("list", "pods", None),
    ("watch", "pods", None),
    ("get", "namespaces", None),
    ("watch", "namespaces", None),
    ("list", "phabricatorbots.phabmesh.io", None),
    ("watch", "phabricatorbindings.phabmesh.io", None),
    ("patch", "phabricatorbots.phabmesh.io/status", None),
    ("patch", "phabricatorbindings.phabmesh.io/status", None),
    ("create", "phabricatorcredentials.phabmesh.io", "team-a"),
    ("patch", "phabricatorcredentials.phabmesh.io/status", "team-a"),
    ("delete", "phabricatorcredentials.phabmesh.io", "team-a"),
    ("create", "events", "team-a"),
    ("create", "tokenreviews.authentication.k8s.io", None),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("patch", "clusterkopfpeerings.kopf.dev", None),
    ("watch", "secrets", "phabmesh-system"),
    ("create", "secrets", "phabmesh-system"),
    ("update", "secrets/phabmesh-signing-keys", "phabmesh-system"),
]
OPERATOR_DENIED = [
    ("get", "secrets", "kube-system"),
    ("list", "secrets", "team-a"),
    ("update", "secrets/ci-bot-token", "phabmesh-system"),
    ("patch", "pods", "team-a"),
    ("delete", "pods", "team-a"),
    ("update", "phabricatorbindings.phabmesh.io", "team-a"),
    ("create", "serviceaccounts/token", "team-a"),
]
GATEWAY_CALLS = [
    ("watch", "phabricatorcredentials.phabmesh.io", None),
    ("list", "phabricatorbindings.phabmesh.io", None),
    ("watch", "phabricatorbots.phabmesh.io", None),
    ("watch", "secrets", "phabmesh-system"),
]
GATEWAY_DENIED = [
    ("get", "secrets", "team-a"),
    ("create", "phabricatorcredentials.phabmesh.io", "team-a"),
    ("patch", "phabricatorcredentials.phabmesh.io/status", "team-a"),
    ("list", "pods", None),
    ("create", "tokenreviews.authentication.k8s.io", None),
    ("create", "secrets", "phabmesh-system"),
]


def _rendered(cluster: Cluster) -> list[dict[str, object]]:
    out = cluster.kubectl("kustomize", str(MANIFESTS)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def installed(cluster: Cluster, crds: object) -> list[dict[str, object]]:
    docs = _rendered(cluster)
    local = [d for d in docs if not str(d["apiVersion"]).startswith("policy.linkerd.io")]
    crd_docs = [d for d in local if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in local if d["kind"] != "CustomResourceDefinition"]
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(crd_docs))
    cluster.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev")
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(rest))
    return docs


def _can(cluster: Cluster, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    resource, _, sub = resource.partition("/")
    extra = []
    if sub == "status":  # a subresource, not an object's name
        sub, extra = "", ["--subresource=status"]
    target = f"{resource}/{sub}" if sub else resource
    args = ["auth", "can-i", verb, target, f"--as={SA.format(who)}", *extra]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


@pytest.mark.parametrize(("verb", "resource", "namespace"), OPERATOR_CALLS)
def test_operator_may_make_every_call_it_makes(
    cluster: Cluster, installed: object, verb: str, resource: str, namespace: str | None
) -> None:
    assert _can(cluster, "operator", verb, resource, namespace)


@pytest.mark.parametrize(("verb", "resource", "namespace"), OPERATOR_DENIED)
def test_operator_may_do_nothing_more(
    cluster: Cluster, installed: object, verb: str, resource: str, namespace: str | None
) -> None:
    assert not _can(cluster, "operator", verb, resource, namespace)


@pytest.mark.parametrize(("verb", "resource", "namespace"), GATEWAY_CALLS)
def test_gateway_may_make_every_call_it_makes(
    cluster: Cluster, installed: object, verb: str, resource: str, namespace: str | None
) -> None:
    assert _can(cluster, "gateway", verb, resource, namespace)


@pytest.mark.parametrize(("verb", "resource", "namespace"), GATEWAY_DENIED)
def test_gateway_may_do_nothing_more(
    cluster: Cluster, installed: object, verb: str, resource: str, namespace: str | None
) -> None:
    assert not _can(cluster, "gateway", verb, resource, namespace)


def test_workloads_are_hardened_and_meshed(installed: list[dict[str, object]]) -> None:
    deployments = [d for d in installed if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"phabmesh-operator", "phabmesh-gateway"}  # type: ignore[index]
    for d in deployments:
        pod = d["spec"]["template"]  # type: ignore[index]
        assert pod["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["spec"]["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]["memory"]
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {d["kind"] for d in installed} >= {"PodDisruptionBudget", "Service", "ConfigMap"}


def test_only_meshed_clients_reach_the_endpoints(installed: list[dict[str, object]]) -> None:
    policy = {
        (d["kind"], d["metadata"]["name"]): d
        for d in installed  # type: ignore[index]
        if str(d["apiVersion"]).startswith("policy.linkerd.io")
    }
    assert policy[("MeshTLSAuthentication", "phabmesh-meshed-clients")]["spec"] == {
        "identities": ["*"]
    }
    for server in ("phabmesh-gateway", "phabmesh-issuer"):
        assert ("Server", server) in policy
        assert any(
            p["spec"]["targetRef"]["name"] == server  # type: ignore[index]
            for (kind, _), p in policy.items()
            if kind == "AuthorizationPolicy"
        )
