"""``check``'s proof that pod injection works: a server-side dry run of a pod a binding takes.

The webhook's configuration, its caBundle and its certificate can all be right while no pod
is injected: the Service has no endpoints, a NetworkPolicy blocks the API server, the
operator is down; ``failurePolicy: Ignore`` hides all of these. So the check asks the API
server to create, as a dry run (nothing is stored, nothing runs), a pod that a Ready binding
takes, and reads whether the answer carries what the webhook adds. The pod is built to pass
Pod Security ``restricted``, so that the namespace's own policy does not refuse it.

:func:`candidate_pod` and :func:`judge` are pure; :func:`check` makes the one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from phabmesh import identity, matching, resources
from phabmesh.admission import inject
from phabmesh.kube import KubeError
from phabmesh.kube.client import JSON
from phabmesh.kubectl import cluster
from phabmesh.resources import resource_path

CHECK = "injection"
OK, WARN, FAIL = "OK", "WARN", "FAIL"
POD_PREFIX = "phabmesh-check-"
FIX = "docs/troubleshooting.md#a-pod-has-no-phabmesh-token-volume"


def _service_accounts(spec: resources.BindingSpec, namespace: str) -> list[str]:
    """Service accounts of ``namespace`` that the binding's subjects may name, best first."""
    names: list[str] = []
    for ref in spec.identity_refs:
        if ref.kind == "ServiceAccount" and (ref.namespace or namespace) == namespace:
            names.append(ref.name)
    for name in spec.identities:
        if name.startswith("spiffe://"):
            names.append(name.rsplit("/sa/", 1)[-1])
        elif not name.startswith("*"):
            names.append(name.split(".", 1)[0])
    return [*names, "default"]


def _labels(selector: resources.LabelSelector | None) -> dict[str, str]:
    """Labels that ``selector`` selects (every requirement met where one can be)."""
    if selector is None:
        return {}
    labels = dict(selector.match_labels)
    for requirement in selector.match_expressions:
        if requirement.operator == "In" and requirement.values:
            labels.setdefault(requirement.key, requirement.values[0])
        elif requirement.operator == "Exists":
            labels.setdefault(requirement.key, "phabmesh-check")
    return labels


def candidate_pod(binding: JSON, naming: identity.Naming) -> JSON | None:
    """A pod (never stored) that ``binding`` takes, or None when none can be built."""
    spec, _ = resources.parse_binding_spec(binding)
    namespace = str((binding.get("metadata") or {}).get("namespace") or "")
    if spec is None or not namespace:
        return None
    labels = _labels(spec.pod_selector)
    if not matching.selector_matches(spec.pod_selector, labels):
        return None
    for account in _service_accounts(spec, namespace):
        if matching.subjects_match(spec, namespace, account, naming):
            return _pod(namespace, account, labels)
    return None


def _pod(namespace: str, service_account: str, labels: Mapping[str, str]) -> JSON:
    restricted = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": POD_PREFIX, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "serviceAccountName": service_account,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
            "containers": [
                {"name": "app", "image": "phabmesh-check", "securityContext": restricted}
            ],
        },
    }


def injected(pod: Mapping[str, Any]) -> bool:
    """Does ``pod`` (as the API server answered it) carry the webhook's token volume?"""
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return any(volume.get("name") == inject.VOLUME for volume in volumes)


def judge(
    binding: str, service_account: str, answer: JSON | None, error: str | None
) -> tuple[str, str]:
    """(status, message) for the dry run of a pod of ``binding`` (namespace/name)."""
    what = f"a dry-run pod of ServiceAccount {service_account} that binding {binding} takes"
    if error is not None:
        return WARN, f"could not test: the API server refused {what}: {error}"
    assert answer is not None
    if injected(answer):
        return OK, f"{what} was injected (token volume {inject.VOLUME})"
    return FAIL, (
        f"{what} was NOT injected: the API server could not reach the webhook (is the operator "
        "running? has Service phabmesh-webhook endpoints? does a NetworkPolicy let the API "
        "server in?), and failurePolicy Ignore let the pod through"
    )


ATTEMPTS = 5  # bindings tried at most, while the API server refuses their test pods


async def check(
    session: cluster.Session, bindings: Sequence[JSON], naming: identity.Naming
) -> tuple[str, str]:
    """Dry-run one pod for the first Ready binding that takes one; (status, message). A pod
    the API server refuses (its ServiceAccount does not exist yet, say) proves nothing either
    way: the next binding is tried, up to :data:`ATTEMPTS`."""
    refused: tuple[str, str] | None = None
    tried = 0
    for binding in bindings:
        conditions = (binding.get("status") or {}).get("conditions") or []
        ready = any(
            c.get("type") == resources.READY and c.get("status") == "True" for c in conditions
        )
        pod = candidate_pod(binding, naming) if ready else None
        if pod is None:
            continue
        meta = binding.get("metadata") or {}
        name = f"{meta.get('namespace')}/{meta.get('name')}"
        account = str(pod["spec"]["serviceAccountName"])
        path = resource_path("", "v1", "pods", str(meta.get("namespace")))
        try:
            answer = await session.client.create(path, pod, params={"dryRun": "All"})
        except KubeError as exc:
            refused = judge(name, account, None, str(exc))
            tried += 1
            if tried >= ATTEMPTS:
                break
            continue
        return judge(name, account, answer, None)
    return refused or (WARN, "no Ready binding takes a pod yet: injection cannot be tested")
