"""Pods to Linkerd identities, and whether a pod is meshed. Pure: no I/O.

Linkerd names a pod's identity
``<serviceaccount>.<namespace>.serviceaccount.identity.<control-plane-ns>.<trust-domain>``
(built-in certificates carry only this DNS-form name); phabmesh accepts
``spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`` as an equivalent
spelling. A ServiceAccount name may contain dots (it is a DNS subdomain) but a
namespace may not (it is a DNS label), so the DNS form parses back unambiguously:
the namespace is the last label before the suffix, the service account is the rest.

Meshed pods. Linkerd's injector adds a ``linkerd-proxy`` container (since Linkerd
2.20 usually a native sidecar in ``initContainers``, a plain container before), with
the control plane's namespace and the trust domain in its environment, and marks the
pod with the label ``linkerd.io/control-plane-ns`` and the annotation
``linkerd.io/proxy-version``. Only the container counts: a pod is meshed when its spec
has a ``linkerd-proxy`` container. The label and the annotation alone never make a pod
meshed (anyone who writes a pod writes its labels; such a pod is explained as
:data:`PROXY_MISSING`), and ``linkerd.io/inject`` is only a *request* to the injector
(``enabled``, ``ingress``, ``disabled``).

This is all a pod's spec can tell, and a pod's author can forge it as well (name a
container ``linkerd-proxy``). It decides who gets a lease; it proves nothing. The
proof is the connection: Linkerd's inbound proxy sets ``l5d-client-id`` to the mTLS
identity of the caller and strips the header from every other request, so the header
means something only on a connection from the proxy itself, inside the serving pod
(:func:`vouched_client_id`). ``PHABMESH_REQUIRE_CLIENT_ID`` makes the credential
endpoint and the gateway require it (docs/security.md).

Only this mesh counts. The injector writes the control plane's namespace and the trust
domain into the proxy's environment (``_l5d_ns``, ``_l5d_trustdomain``: its identity is
``$(_pod_sa).$(_pod_ns).serviceaccount.identity.$(_l5d_ns).$(_l5d_trustdomain)``). Given
the cluster's :class:`Naming`, a pod with a proxy whose label or environment names
another control plane, or whose proxy names another trust domain, is not meshed *here*:
its identity is not the one phabmesh would write into a lease.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

PROXY_CONTAINER = "linkerd-proxy"
PROXY_VERSION_ANNOTATION = "linkerd.io/proxy-version"
CONTROL_PLANE_LABEL = "linkerd.io/control-plane-ns"


def pod_watch_params(unmeshed: bool) -> dict[str, str]:
    """The pod watch's query: every pod, or (``unmeshed`` false) only those Linkerd's
    injector labelled (``PHABMESH_WATCH_UNMESHED_PODS``)."""
    return {} if unmeshed else {"labelSelector": CONTROL_PLANE_LABEL}


INJECT_ANNOTATION = "linkerd.io/inject"
DEFAULT_SERVICE_ACCOUNT = "default"

# Why a pod is, or is not, meshed (PodFacts.mesh_reason).
MESHED = "Meshed"  # a linkerd-proxy container (of this mesh, when naming is given)
NO_PROXY = "NoProxy"  # no proxy and no marker: Linkerd was never asked to inject this pod
# No proxy, but Linkerd's label or annotation: markers anyone can write, never a proxy.
PROXY_MISSING = "ProxyMissing"
INJECTION_DISABLED = "InjectionDisabled"  # no proxy; the pod says linkerd.io/inject: disabled
NOT_INJECTED = "NotInjected"  # injection was asked for, but no proxy came (webhook skipped it)
OTHER_CONTROL_PLANE = "OtherControlPlane"  # meshed by a control plane in another namespace
OTHER_TRUST_DOMAIN = "OtherTrustDomain"  # meshed by a proxy of another trust domain
OTHER_MESH = frozenset({OTHER_CONTROL_PLANE, OTHER_TRUST_DOMAIN})
# The proxy's environment as Linkerd's injector writes it.
PROXY_ENV_CONTROL_PLANE = "_l5d_ns"
PROXY_ENV_TRUST_DOMAIN = "_l5d_trustdomain"

_SPIFFE = re.compile(r"^spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)$")
# Kubernetes name shapes: a namespace is a DNS-1123 label, a ServiceAccount a DNS-1123 subdomain.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_namespace_name(name: str) -> bool:
    return len(name) <= 63 and bool(_DNS_LABEL.match(name))


def is_service_account_name(name: str) -> bool:
    return len(name) <= 253 and bool(_DNS_SUBDOMAIN.match(name))


@dataclasses.dataclass(frozen=True, slots=True)
class Naming:
    """How Linkerd spells identities in this cluster."""

    control_plane_namespace: str = "linkerd"
    trust_domain: str = "cluster.local"

    @property
    def suffix(self) -> str:
        """``serviceaccount.identity.<control-plane-ns>.<trust-domain>``."""
        return f"serviceaccount.identity.{self.control_plane_namespace}.{self.trust_domain}"


DEFAULT_NAMING = Naming()


def linkerd_identity(service_account: str, namespace: str, naming: Naming = DEFAULT_NAMING) -> str:
    """The DNS-form identity Linkerd gives pods of this service account."""
    return f"{service_account}.{namespace}.{naming.suffix}"


def spiffe_id(service_account: str, namespace: str, naming: Naming = DEFAULT_NAMING) -> str:
    """The SPIFFE spelling of the same identity."""
    return f"spiffe://{naming.trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe(uri: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service account) of a well-formed SPIFFE ID, else None."""
    match = _SPIFFE.match(uri)
    if not match:
        return None
    trust_domain, namespace, service_account = match.groups()
    if not is_namespace_name(namespace) or not is_service_account_name(service_account):
        return None
    return trust_domain, namespace, service_account


def spiffe_to_dns(uri: str, naming: Naming = DEFAULT_NAMING) -> str | None:
    """The DNS-form spelling of a ``spiffe://`` ID, or None if it is not one.

    The URI's own trust domain is kept, so an ID from another trust domain turns
    into a name that no pod of this cluster carries.
    """
    parsed = parse_spiffe(uri)
    if parsed is None:
        return None
    trust_domain, namespace, service_account = parsed
    return linkerd_identity(
        service_account, namespace, Naming(naming.control_plane_namespace, trust_domain)
    )


def parse_identity(name: str, naming: Naming = DEFAULT_NAMING) -> tuple[str, str] | None:
    """(service account, namespace) of a DNS-form or SPIFFE identity of this cluster, else None."""
    if name.startswith("spiffe://"):
        parsed = parse_spiffe(name)
        if parsed is None or parsed[0] != naming.trust_domain:
            return None
        return parsed[2], parsed[1]
    tail = "." + naming.suffix
    if not name.endswith(tail):
        return None
    service_account, _, namespace = name[: -len(tail)].rpartition(".")
    if not is_namespace_name(namespace) or not is_service_account_name(service_account):
        return None
    return service_account, namespace


def _proxy(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or ():
            if isinstance(container, Mapping) and container.get("name") == PROXY_CONTAINER:
                return container
    return None


def _proxy_env(proxy: Mapping[str, Any], name: str) -> str | None:
    """The literal value of one of the proxy's variables (None: unset or not a literal)."""
    for var in proxy.get("env") or ():
        if isinstance(var, Mapping) and var.get("name") == name:
            value = var.get("value")
            return value if isinstance(value, str) and value else None
    return None


def mesh_status(pod: Mapping[str, Any], naming: Naming | None = None) -> tuple[bool, str]:
    """(meshed, reason) for a pod body as the API returns it: meshed only with a
    ``linkerd-proxy`` container.

    With ``naming``, a pod whose proxy is there but whose ``linkerd.io/control-plane-ns``
    label or proxy names another control plane, or whose proxy names another trust domain
    (so its identity has another suffix), is not meshed *here*.
    """
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    control_plane = labels.get(CONTROL_PLANE_LABEL)
    proxy = _proxy(pod.get("spec") or {})
    if proxy is None:
        if control_plane or annotations.get(PROXY_VERSION_ANNOTATION):
            return False, PROXY_MISSING
        inject = annotations.get(INJECT_ANNOTATION)
        if inject == "disabled":
            return False, INJECTION_DISABLED
        if inject in ("enabled", "ingress"):
            return False, NOT_INJECTED
        return False, NO_PROXY
    if naming is not None:
        planes = {control_plane, _proxy_env(proxy, PROXY_ENV_CONTROL_PLANE)}
        domain = _proxy_env(proxy, PROXY_ENV_TRUST_DOMAIN)
        if any(p and p != naming.control_plane_namespace for p in planes):
            return False, OTHER_CONTROL_PLANE
        if domain and domain != naming.trust_domain:
            return False, OTHER_TRUST_DOMAIN
    return True, MESHED


def from_local_proxy(peer: str | None, local: str | None) -> bool:
    """Whether a connection from ``peer`` to ``local`` (IP addresses) comes from inside the
    serving pod, where Linkerd's inbound proxy connects from.

    The proxy connects to the application at the connection's original destination, the
    pod's own address (Linkerd 2.11 and later; 127.0.0.1 before): so the peer is the
    pod's own address or a loopback one. A caller in another pod, or one that reached a
    port the proxy skips, has an address of its own.
    """
    peer_ip, local_ip = _ip(peer), _ip(local)
    if peer_ip is None:
        return False
    return peer_ip.is_loopback or peer_ip == local_ip


def vouched_client_id(header: str | None, peer: str | None, local: str | None) -> str | None:
    """The mTLS identity Linkerd's inbound proxy vouches for on this connection, or None.

    The proxy sets ``l5d-client-id`` on each request of an mTLS connection and removes it
    from every other: the header is its word only when the proxy itself is the peer
    (:func:`from_local_proxy`). From anywhere else, anyone may have written it.
    """
    if not header or not from_local_proxy(peer, local):
        return None
    return header


def _ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Labels(Mapping[str, str]):
    """An immutable, hashable label set. Equal sets are shared: see :func:`labels_of`."""

    __slots__ = ("__weakref__", "_hash", "_items")

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items: dict[str, str] = {sys.intern(k): sys.intern(v) for k, v in items.items()}
        self._hash = hash(frozenset(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Labels):
            return self._hash == other._hash and self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"


# Pods of one ReplicaSet carry identical labels: keep one copy for all of them.
_SHARED_LABELS: weakref.WeakValueDictionary[frozenset[tuple[str, str]], Labels] = (
    weakref.WeakValueDictionary()
)


def labels_of(items: Mapping[str, Any]) -> Labels:
    """A shared :class:`Labels` equal to ``items`` (values made strings)."""
    clean = {str(k): "" if v is None else str(v) for k, v in items.items()}
    key = frozenset(clean.items())
    shared = _SHARED_LABELS.get(key)
    if shared is None:
        shared = Labels(clean)
        _SHARED_LABELS[key] = shared
    return shared


def _intern(value: object) -> str:
    return sys.intern(str(value)) if value is not None else ""


def _init_running(status: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """Whether one of a Pending pod's init containers runs on its node."""
    if (status.get("phase") or "Pending") != "Pending" or not spec.get("nodeName"):
        return False
    return any(
        "running" in ((container or {}).get("state") or {})
        for container in status.get("initContainerStatuses") or ()
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PodFacts:
    """The few facts about a pod that decisions need; thousands of these are kept.

    No resourceVersion, no spec, no status beyond the phase: replace the whole
    value on every watch event. Repeated strings (namespace, service account,
    phase, node, label keys and values) are interned, and label sets shared.
    """

    uid: str
    name: str
    namespace: str
    service_account: str
    phase: str
    labels: Labels
    terminating: bool
    meshed: bool
    mesh_reason: str
    node_name: str
    # Pending on a node with an init container running (see `started`).
    init_running: bool = False

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any], naming: Naming | None = None) -> PodFacts:
        """Facts of a pod body as the API returns it (``naming``: see :func:`mesh_status`)."""
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        meshed, reason = mesh_status(pod, naming)
        # serviceAccount is the deprecated alias the API server still fills in.
        service_account = (
            spec.get("serviceAccountName") or spec.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT
        )
        return cls(
            uid=str(meta.get("uid") or ""),
            name=str(meta.get("name") or ""),
            namespace=_intern(meta.get("namespace") or ""),
            service_account=_intern(service_account),
            phase=_intern(status.get("phase") or "Pending"),
            labels=labels_of(meta.get("labels") or {}),
            terminating=meta.get("deletionTimestamp") is not None,
            meshed=meshed,
            mesh_reason=sys.intern(reason),
            node_name=_intern(spec.get("nodeName") or ""),
            init_running=_init_running(status, spec),
        )

    @property
    def started(self) -> bool:
        """Whether the pod runs: Running, or Pending with an init container running. A pod is
        Pending until its app containers start, and they start after its init containers: a
        native sidecar (the credential agent, Linkerd's proxy) or an init container runs, and
        needs its credential, before the pod is Running."""
        return self.phase == "Running" or self.init_running

    def identity(self, naming: Naming = DEFAULT_NAMING) -> str:
        """This pod's DNS-form Linkerd identity."""
        return linkerd_identity(self.service_account, self.namespace, naming)
