"""Pods to Linkerd identities, and whether a pod is meshed. Pure: no I/O.

Linkerd names a pod's identity
``<serviceaccount>.<namespace>.serviceaccount.identity.<control-plane-ns>.<trust-domain>``
(built-in certificates carry only this DNS-form name); phabmesh accepts
``spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`` as an equivalent
spelling. A pod is meshed when it runs a ``linkerd-proxy`` container (a native
sidecar in ``initContainers`` since Linkerd 2.20, a plain container before) or
carries the markers Linkerd's injector writes (annotation
``linkerd.io/proxy-version``, label ``linkerd.io/control-plane-ns``). The
``linkerd.io/inject: enabled`` annotation alone only *asks* for injection, so it
does not count.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from typing import Any

PROXY_CONTAINER = "linkerd-proxy"
PROXY_VERSION_ANNOTATION = "linkerd.io/proxy-version"
CONTROL_PLANE_LABEL = "linkerd.io/control-plane-ns"

# Why a pod is, or is not, meshed.
MESHED = "Meshed"  # a linkerd-proxy container or the injector's markers are present
NO_PROXY = "NoProxy"  # neither: Linkerd did not inject this pod

_SPIFFE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")


@dataclasses.dataclass(frozen=True)
class Naming:
    """How Linkerd spells identities in this cluster."""

    control_plane_namespace: str = "linkerd"
    trust_domain: str = "cluster.local"

    @property
    def suffix(self) -> str:
        return f"serviceaccount.identity.{self.control_plane_namespace}.{self.trust_domain}"


DEFAULT_NAMING = Naming()


def linkerd_identity(service_account: str, namespace: str, naming: Naming = DEFAULT_NAMING) -> str:
    return f"{service_account}.{namespace}.{naming.suffix}"


def spiffe_id(service_account: str, namespace: str, naming: Naming = DEFAULT_NAMING) -> str:
    return f"spiffe://{naming.trust_domain}/ns/{namespace}/sa/{service_account}"


def spiffe_to_dns(uri: str, naming: Naming = DEFAULT_NAMING) -> str | None:
    """The DNS-form spelling of a ``spiffe://`` ID, or None if it is not one of ours."""
    match = _SPIFFE.match(uri)
    if not match:
        return None
    trust_domain, namespace, service_account = match.groups()
    return linkerd_identity(
        service_account, namespace, Naming(naming.control_plane_namespace, trust_domain)
    )


def parse_identity(name: str, naming: Naming = DEFAULT_NAMING) -> tuple[str, str] | None:
    """(service account, namespace) of a DNS-form or SPIFFE identity in this cluster."""
    if name.startswith("spiffe://"):
        dns = spiffe_to_dns(name, naming)
        if dns is None:
            return None
        name = dns
    tail = "." + naming.suffix
    if not name.endswith(tail):
        return None
    head = name[: -len(tail)].split(".")
    if len(head) != 2 or not all(head):
        return None
    return head[0], head[1]


def mesh_status(pod: Mapping[str, Any]) -> tuple[bool, str]:
    """(meshed, reason) for a pod body as the API returns it."""
    spec = pod.get("spec") or {}
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or ():
            if container.get("name") == PROXY_CONTAINER:
                return True, MESHED
    meta = pod.get("metadata") or {}
    if PROXY_VERSION_ANNOTATION in (meta.get("annotations") or {}):
        return True, MESHED
    if CONTROL_PLANE_LABEL in (meta.get("labels") or {}):
        return True, MESHED
    return False, NO_PROXY


def _intern(value: object) -> str:
    return sys.intern(str(value)) if value is not None else ""


@dataclasses.dataclass(frozen=True, slots=True)
class PodFacts:
    """The few facts about a pod that decisions need; thousands of these are kept."""

    uid: str
    name: str
    namespace: str
    service_account: str
    phase: str
    labels: Mapping[str, str]
    terminating: bool
    meshed: bool
    mesh_reason: str
    node_name: str

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> PodFacts:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        meshed, reason = mesh_status(pod)
        labels = meta.get("labels") or {}
        return cls(
            uid=str(meta.get("uid", "")),
            name=str(meta.get("name", "")),
            namespace=_intern(meta.get("namespace", "")),
            service_account=_intern(spec.get("serviceAccountName") or "default"),
            phase=_intern(status.get("phase") or "Pending"),
            labels={_intern(k): _intern(v) for k, v in labels.items()},
            terminating=meta.get("deletionTimestamp") is not None,
            meshed=meshed,
            mesh_reason=reason,
            node_name=_intern(spec.get("nodeName") or ""),
        )
