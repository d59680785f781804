"""Every Kubernetes API call each phabmesh process makes, as RBAC sees it. Pure data.

One row: (namespace, or None for cluster-wide; API group; resource[/subresource]; verbs,
space-separated; object name, or None for any). The manifests' RBAC grants exactly these
(tests/integration/test_manifests.py checks both directions), and ``kubectl phabmesh check``
asks the API server whether the installed ServiceAccounts may make each of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

SYSTEM = "phabmesh-system"  # the namespace of the manifests (settings.namespace)
ALL = None
Call = tuple[str | None, str, str, str, str | None]
Calls = list[Call]
GATEWAY_SECRETS_ROLE = "phabmesh-gateway-secrets"  # its rule: phabmesh.gatewayrole

OPERATOR_CALLS: Calls = [
    (ALL, "", "pods", "get list watch", None),
    (ALL, "", "namespaces", "list watch", None),
    (ALL, "phabmesh.io", "phabricatorcredentials", "list watch create patch delete", None),
    (ALL, "phabmesh.io", "phabricatorbots", "list watch patch", None),
    (ALL, "phabmesh.io", "phabricatorbindings", "list watch patch", None),
    (ALL, "phabmesh.io", "phabricatorbots/status", "patch", None),
    (ALL, "phabmesh.io", "phabricatorbindings/status", "patch", None),
    (ALL, "phabmesh.io", "phabricatorwebhooks", "list watch", None),
    (ALL, "phabmesh.io", "phabricatorwebhooks/status", "patch", None),
    # A webhook's target Service, read by name for its status. Its HMAC key Secret too, by
    # name, where the webhook's namespace grants it (docs/webhooks.md): not in this table.
    (ALL, "", "services", "get", None),
    (ALL, "", "events", "create", None),
    (ALL, "authentication.k8s.io", "tokenreviews", "create", None),
    (ALL, "kopf.dev", "clusterkopfpeerings", "list watch patch", None),
    (
        ALL,
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "get update",
        "phabmesh",
    ),
    # create: any name as RBAC sees it; manifests/secret-policy.yaml admits only these two.
    (SYSTEM, "", "secrets", "list watch create", None),
    (SYSTEM, "", "secrets", "get update", "phabmesh-signing-keys"),
    (SYSTEM, "", "secrets", "get update", "phabmesh-webhook-tls"),
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "list watch update", GATEWAY_SECRETS_ROLE),
]
GATEWAY_CALLS: Calls = [
    (ALL, "phabmesh.io", "phabricatorcredentials", "list watch", None),
    (ALL, "phabmesh.io", "phabricatorbindings", "list watch", None),
    (ALL, "phabmesh.io", "phabricatorbots", "list watch", None),
    (ALL, "phabmesh.io", "phabricatorwebhooks", "list watch", None),
    # Each webhook's HMAC key Secret, by name, where its namespace grants it (docs/webhooks.md).
    # The bots' token Secrets too, by name, as the Role below lists them (phabmesh.gatewayrole):
    # not in this table, since their names are the bots'.
    (SYSTEM, "", "secrets", "list watch", "phabmesh-signing-keys"),
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "list watch", GATEWAY_SECRETS_ROLE),
    (ALL, "", "pods", "list watch", None),
    (ALL, "", "namespaces", "list watch", None),
]
CALLS = {"operator": OPERATOR_CALLS, "gateway": GATEWAY_CALLS}


def each(
    calls: Calls, namespace: str = SYSTEM, names: Mapping[str, str] | None = None
) -> Iterator[Call]:
    """One call per verb, with phabmesh's namespace ``namespace`` in place of the manifests',
    and object names renamed by ``names`` (the manifests' Secret names to the settings')."""
    renamed = names or {}
    for ns, group, resource, verbs, name in calls:
        for verb in verbs.split():
            shown = renamed.get(name, name) if name else name
            yield (namespace if ns == SYSTEM else ns, group, resource, verb, shown)
