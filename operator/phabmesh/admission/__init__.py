"""Pod injection: a mutating admission webhook served by every operator replica.

:mod:`~phabmesh.admission.inject` decides what a pod gets, :class:`Injector` keeps the
bindings it decides by (its own watch, so a standby replica answers as well as the
acting one), :mod:`~phabmesh.admission.tls` keeps the serving certificate and the
caBundle, :mod:`~phabmesh.admission.server` serves the webhook in a process of its own
beside the operator's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from phabmesh import identity, metrics, resources
from phabmesh.admission import inject
from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)

HANDLER_ID = "inject"  # the webhook's URL path: /inject


def _binding_spec(obj: JSON) -> resources.BindingSpec | None:
    spec, _ = resources.parse_binding_spec(obj)  # an invalid binding names nobody
    return spec


def pointed_at(configuration: JSON, url: str) -> JSON:
    """``configuration`` (manifests/webhook.yaml) calling ``url`` instead of the Service:
    for a control plane that cannot reach Services (the local one), with the operator
    running beside it."""
    webhooks = [{**hook, "clientConfig": {"url": url}} for hook in configuration["webhooks"]]
    return {**configuration, "webhooks": webhooks}


class Injector:
    """Answers "what does this new pod get?" from a watch of every binding."""

    def __init__(
        self,
        settings: Settings,
        client: KubeClient,
        *,
        on_decision: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        # Each decision's outcome: by default counted in this process's metrics.
        self.on_decision = on_decision or (
            lambda outcome: metrics.current().pod_injections.labels(outcome).inc()
        )
        self.injection = inject.injection_from(settings)
        self.naming = identity.Naming(
            control_plane_namespace=settings.linkerd_namespace,
            trust_domain=settings.trust_domain,
        )
        self.skip = inject.SYSTEM_NAMESPACES | {settings.namespace, settings.linkerd_namespace}
        self.bindings: Informer[resources.BindingSpec | None] = Informer(
            client,
            resources.binding_path(None),
            _binding_spec,
            on_event=self._index,
            name="injector-bindings",
        )
        # namespace -> binding name -> spec: an admission reads only its own namespace's.
        self.by_namespace: dict[str, dict[str, resources.BindingSpec]] = {}

    def _index(self, _kind: str, key: str, spec: resources.BindingSpec | None) -> None:
        namespace, _, name = key.partition("/")
        specs = self.by_namespace.setdefault(namespace, {})
        if spec is None:  # deleted, or invalid: names nobody
            specs.pop(name, None)
        else:
            specs[name] = spec
        if not specs:
            del self.by_namespace[namespace]

    @property
    def ready(self) -> bool:
        return self.bindings.synced.is_set()

    def specs_in(self, namespace: str) -> list[resources.BindingSpec]:
        return list(self.by_namespace.get(namespace, {}).values())

    def decide(self, pod: Mapping[str, Any], namespace: str) -> inject.Injection | None:
        """The injection for a pod being created in ``namespace``, or None; raises
        :class:`~phabmesh.admission.inject.InvalidAnnotation` for a bound pod whose phabmesh
        annotations are wrong (the webhook refuses it, naming the annotation)."""
        reason = inject.reason_for(
            pod,
            namespace,
            self.specs_in(namespace),
            skip_namespaces=self.skip,
            naming=self.naming,
        )
        injection = None
        if reason == inject.INJECTED:
            injection = self._injection(pod, namespace)
            try:
                injection.check(pod)
            except inject.InvalidAnnotation as exc:
                self._decided(pod, namespace, inject.INVALID_ANNOTATION)
                log.info("pod_refused", namespace=namespace, problem=str(exc))
                raise
        self._decided(pod, namespace, reason)
        return injection

    def _decided(self, pod: Mapping[str, Any], namespace: str, reason: str) -> None:
        self.on_decision(reason)
        meta = pod.get("metadata") or {}
        log.debug(
            "pod_admission",
            namespace=namespace,
            pod=meta.get("name") or meta.get("generateName"),
            outcome=reason,
        )

    def _injection(self, pod: Mapping[str, Any], namespace: str) -> inject.Injection:
        specs = inject.naming_bindings(pod, namespace, self.specs_in(namespace), self.naming)
        mode = inject.bindings_agent_mode(specs)
        if mode == self.injection.agent:
            return self.injection
        return dataclasses.replace(self.injection, agent=mode)


__all__ = ["HANDLER_ID", "Injector", "inject", "pointed_at"]
