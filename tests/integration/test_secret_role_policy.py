"""Policy phabmesh-gateway-secrets (manifests/secret-policy.yaml) on the real API server.

The policy as ``kubectl kustomize manifests/`` renders it, bound here to a fresh namespace
under a name of its own (the session's phabmesh-system keeps its Role and its policy). An
install found that the Role as rbac-gateway.yaml ships it, with no ``rules``, was refused
("got 'types.Null', expected iterable type") whenever the policy was in force before the
Role was created: the API server shows a native object's absent list as a null that
``has()`` calls present. So an ``apply -k`` failed or passed with the order in which the API
server took the two in.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.kube import Cluster, wait_for
from tests.rbac import MANIFESTS

ROLE = "phabmesh-gateway-secrets"
WIDENED = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]


def _role(namespace: str, rules: list[dict[str, Any]] | None) -> str:
    body: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": ROLE, "namespace": namespace},
    }
    if rules is not None:
        body["rules"] = rules
    return json.dumps(body)


def _write(cluster: Cluster, verb: str, namespace: str, rules: Any) -> str | None:
    """None if the API server took the Role, else its refusal."""
    done = cluster.kubectl(verb, "-f", "-", input=_role(namespace, rules), check=False)
    return None if done.returncode == 0 else done.stderr


@pytest.fixture
def policed(cluster: Cluster, namespace: str) -> Iterator[str]:
    """``namespace``, under the shipped policy's validation: in force once it returns."""
    name = f"phabmesh-gateway-secrets-{uuid.uuid4().hex[:8]}"
    rendered = cluster.kubectl("kustomize", str(MANIFESTS)).stdout
    docs = [
        d
        for d in yaml.safe_load_all(rendered)
        if d and d["kind"].startswith("ValidatingAdmissionPolicy") and d["metadata"]["name"] == ROLE
    ]
    assert len(docs) == 2, "the policy and its binding"
    for doc in docs:
        doc["metadata"]["name"] = name
        if doc["kind"] == "ValidatingAdmissionPolicyBinding":
            doc["spec"]["policyName"] = name
        else:
            (condition,) = doc["spec"]["matchConditions"]
            assert "request.namespace == 'phabmesh-system'" in condition["expression"]
            condition["expression"] = condition["expression"].replace(
                "'phabmesh-system'", f"'{namespace}'"
            )
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))

    def in_force() -> bool:
        if _write(cluster, "create", namespace, WIDENED) is not None:
            return True
        cluster.kubectl("delete", "role", "-n", namespace, ROLE)
        return False

    try:
        wait_for(in_force, timeout=60, what="the policy to be in force")
        yield namespace
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            cluster.kubectl("delete", kind, name, "--ignore-not-found")


def test_the_role_as_shipped_is_admitted_under_the_policy_and_only_named_secrets_after(
    cluster: Cluster, policed: str
) -> None:
    assert _write(cluster, "create", policed, None) is None  # as rbac-gateway.yaml ships it
    named = [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["list", "watch"],
            "resourceNames": ["bot-token"],
        }
    ]
    assert _write(cluster, "replace", policed, named) is None  # what the operator writes
    assert _write(cluster, "replace", policed, []) is None  # no bots: no rule
    for widened in (
        WIDENED,
        [{**named[0], "resourceNames": ["phabmesh-signing-keys"]}],
        [{**named[0], "verbs": ["get", "list", "watch"]}],
        [{key: value for key, value in named[0].items() if key != "resourceNames"}],
    ):
        refusal = _write(cluster, "replace", policed, widened)
        assert refusal is not None and "may only let the gateway list and watch" in refusal, (
            widened,
            refusal,
        )
