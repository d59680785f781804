"""What the pod-injection webhook adds to a pod, and to which pods. Pure: no I/O.

A pod is injected when a PhabricatorBinding in its namespace names its service
account (and its ``podSelector``, if any, selects the pod's labels). It then gets:

- a projected service-account token volume (audience ``phabmesh.io`` by default,
  short expiry, refreshed by the kubelet) mounted read-only in every app container
  at :data:`MOUNT_DIR`;
- environment variables telling clients where the credential endpoint and the
  gateway are, and where the token file is.

Nothing else in the pod changes. Values the pod already sets are kept (an env var
of the same name, a volume or mount of the same name or path), so applying the
injection twice, or before or after Linkerd's own injector, gives the same pod:
Linkerd's containers (``linkerd-proxy``, ``linkerd-init``, ``linkerd-network-validator``)
and init containers are never touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from phabmesh import identity, matching, resources

VOLUME = "phabmesh-token"
MOUNT_DIR = "/var/run/secrets/phabmesh.io/serviceaccount"
TOKEN_FILE = f"{MOUNT_DIR}/token"
ENV_ENDPOINT = "PHABMESH_CREDENTIAL_ENDPOINT"
ENV_GATEWAY = "PHABMESH_GATEWAY_URL"
ENV_TOKEN_FILE = "PHABMESH_TOKEN_FILE"  # noqa: S105 - a variable's name
# A pod labelled ``phabmesh.io/inject: disabled`` is left alone (so is every pod in a
# namespace labelled so: the webhook configuration's selectors skip both).
OPT_OUT_LABEL = "phabmesh.io/inject"
OPT_OUT_VALUE = "disabled"
# Never injected, whatever the webhook configuration's namespaceSelector says.
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
LINKERD_CONTAINERS = frozenset({"linkerd-proxy", "linkerd-init", "linkerd-network-validator"})
MIN_TOKEN_SECONDS = 600  # the API server's floor for projected token expiry

# Why a pod was or was not injected (a label value on the metric and in the log).
INJECTED = "Injected"
SYSTEM_NAMESPACE = "SystemNamespace"
OPTED_OUT = "OptedOut"
NOT_BOUND = "NotBound"


@dataclasses.dataclass(frozen=True)
class Injection:
    """The volume, mounts and variables one pod gets."""

    audience: str
    expiration_seconds: int
    credential_endpoint: str
    gateway_url: str

    def volume(self) -> dict[str, Any]:
        return {
            "name": VOLUME,
            "projected": {
                "defaultMode": 0o444,
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": self.audience,
                            "expirationSeconds": self.expiration_seconds,
                            "path": "token",
                        }
                    }
                ],
            },
        }

    def env(self) -> list[dict[str, str]]:
        return [
            {"name": ENV_ENDPOINT, "value": self.credential_endpoint},
            {"name": ENV_GATEWAY, "value": self.gateway_url},
            {"name": ENV_TOKEN_FILE, "value": TOKEN_FILE},
        ]

    def apply(self, pod: dict[str, Any]) -> None:
        """Add what is missing to ``pod`` in place; a second call changes nothing."""
        spec = pod.setdefault("spec", {})
        volumes = spec.setdefault("volumes", [])
        if not any(v.get("name") == VOLUME for v in volumes):
            volumes.append(self.volume())
        for container in spec.get("containers") or []:
            if container.get("name") in LINKERD_CONTAINERS:
                continue
            mounts = container.setdefault("volumeMounts", [])
            if not any(m.get("name") == VOLUME or m.get("mountPath") == MOUNT_DIR for m in mounts):
                mounts.append({"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True})
            env = container.setdefault("env", [])
            present = {e.get("name") for e in env}
            env.extend(e for e in self.env() if e["name"] not in present)


def injection_from(settings: Any) -> Injection:
    """The injection a :class:`~phabmesh.settings.Settings` describes."""
    return Injection(
        audience=settings.token_audience,
        expiration_seconds=max(MIN_TOKEN_SECONDS, int(settings.injected_token_ttl)),
        credential_endpoint=settings.injected_credential_endpoint,
        gateway_url=settings.injected_gateway_url,
    )


def reason_for(
    pod: Mapping[str, Any],
    namespace: str,
    bindings: Iterable[resources.BindingSpec],
    *,
    skip_namespaces: frozenset[str] = SYSTEM_NAMESPACES,
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> str:
    """:data:`INJECTED` or why not, for a pod being created in ``namespace``.

    ``bindings`` are the specs of the bindings in that namespace.
    """
    if namespace in skip_namespaces:
        return SYSTEM_NAMESPACE
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(OPT_OUT_LABEL) == OPT_OUT_VALUE:
        return OPTED_OUT
    service_account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    for spec in bindings:
        if matching.subjects_match(
            spec, namespace, service_account, naming
        ) and matching.selector_matches(spec.pod_selector, labels):
            return INJECTED
    return NOT_BOUND
