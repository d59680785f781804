"""The webhook's TLS: a CA and a serving certificate kept in a Secret, and the caBundle.

The API server calls admission webhooks over HTTPS only, and checks the serving
certificate against the ``caBundle`` of the MutatingWebhookConfiguration. phabmesh
manages both itself, so installing needs no cert-manager:

- the Secret ``phabmesh-webhook-tls`` (in phabmesh's namespace) holds a CA (ten
  years) and a serving certificate it signed (one year, for the webhook Service's
  DNS names and 127.0.0.1). The first replica to start creates it; the others read
  it (the Secret's resourceVersion settles races, as for the signing keys). A
  serving certificate with less than 30 days left is re-issued by the same CA, so
  the caBundle does not change and replicas serving the old or the new certificate
  are both trusted.
- every replica keeps the ``caBundle`` of phabmesh's webhooks in the
  MutatingWebhookConfiguration equal to that CA, and checks again every minute (a
  re-applied manifest without a caBundle is repaired within a minute).

Deleting the Secret makes a fresh CA; until every replica has picked it up (within
a minute) some injections may be skipped, as with phabmesh down (the failure
policy is Ignore).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Sequence
from typing import Any

import structlog

from phabmesh import metrics
from phabmesh.admission.certificates import (
    CA_LIFETIME,
    CERT_LIFETIME,
    RENEW_BEFORE,
    Material,
    issue,
    load_into,
    server_context,
    service_names,
)
from phabmesh.clock import Clock, utcnow
from phabmesh.kube import Conflict, KubeClient, KubeError, NotFound
from phabmesh.kube.client import JSON
from phabmesh.resources import resource_path

log = structlog.get_logger(__name__)

CHECK_EVERY = 60.0  # seconds between checks of the Secret and the caBundle
WEBHOOK_SUFFIX = ".phabmesh.io"  # phabmesh's webhooks in the configuration end with this


class WebhookTLS:
    """Keeps the Secret, the serving context and the caBundle in step (see the module)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        secret_name: str,
        configuration: str,
        names: Sequence[str],
        *,
        clock: Clock = utcnow,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.secret_name = secret_name
        self.configuration = configuration
        self.names = list(names)
        self.clock = clock
        self.material: Material | None = None
        self.context: ssl.SSLContext | None = None

    @property
    def secret_path(self) -> str:
        return resource_path("", "v1", "secrets", self.namespace, self.secret_name)

    def _wanted(self, material: Material | None) -> bool:
        """Is ``material`` good to serve with (names covered, not close to expiry)?"""
        if material is None:
            return False
        try:
            return (
                set(self.names) <= material.names()
                and material.not_after - self.clock() > RENEW_BEFORE
            )
        except ValueError:
            return False

    async def ensure(self) -> Material:
        """Read the Secret; create it, or re-issue its serving certificate, when needed."""
        for _ in range(5):
            try:
                secret: JSON | None = await self.client.get(self.secret_path)
            except NotFound:
                secret = None
            current = Material.from_secret(secret) if secret else None
            if current is not None and self._wanted(current):
                return current
            ca = (current.ca_cert, current.ca_key) if current else None
            fresh = issue(self.names, ca=ca, now=self.clock())
            body: JSON = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": self.secret_name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/part-of": "phabmesh"},
                },
                "data": fresh.to_secret_data(),
            }
            try:
                if secret is None:
                    await self.client.create(
                        resource_path("", "v1", "secrets", self.namespace), body
                    )
                else:
                    body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]
                    await self.client.request("PUT", self.secret_path, body=body)
            except Conflict:
                continue  # another replica got there first: read what it wrote
            log.info("webhook_certificate_issued", not_after=fresh.not_after.isoformat())
            return fresh
        raise RuntimeError(f"could not settle Secret {self.namespace}/{self.secret_name}")

    async def refresh(self) -> bool:
        """Bring the serving context and the caBundle up to date; True if anything changed."""
        material = await self.ensure()
        changed = material != self.material
        if changed:
            if self.context is None:
                self.context = server_context(material)
            else:
                load_into(self.context, material)
            self.material = material
            metrics.current().webhook_certificate_expires(material.not_after)
        await self.inject_ca_bundle(material.ca_cert)
        return changed

    async def reload(self) -> bool:
        """Load the Secret's material into the serving context as it is, writing nothing
        (the webhook's own process: the operator keeps the Secret); True if it changed."""
        secret: JSON = await self.client.get(self.secret_path)
        material = Material.from_secret(secret)
        if material is None:
            raise RuntimeError(f"Secret {self.namespace}/{self.secret_name} holds no certificate")
        if material == self.material:
            return False
        if self.context is None:
            self.context = server_context(material)
        else:
            load_into(self.context, material)
        self.material = material
        return True

    async def inject_ca_bundle(self, ca_pem: bytes) -> bool:
        """Set the caBundle of phabmesh's webhooks; False when there is no configuration."""
        path = resource_path(
            "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
            None, self.configuration,
        )  # fmt: skip
        bundle = base64.b64encode(ca_pem).decode()
        try:
            config = await self.client.get(path)
        except NotFound:
            log.warning("webhook_configuration_missing", name=self.configuration)
            return False
        webhooks: list[dict[str, Any]] = config.get("webhooks") or []
        stale = [
            w
            for w in webhooks
            if str(w.get("name", "")).endswith(WEBHOOK_SUFFIX)
            and (w.get("clientConfig") or {}).get("caBundle") != bundle
        ]
        if not stale:
            return True
        for webhook in stale:
            webhook.setdefault("clientConfig", {})["caBundle"] = bundle
        try:
            await self.client.request("PUT", path, body=config)
        except Conflict:
            return False  # changed meanwhile: the next check sets it
        log.info("webhook_ca_bundle_set", name=self.configuration, webhooks=len(stale))
        return True

    async def run(self, every: float = CHECK_EVERY, *, keep: bool = True) -> None:
        """Check every ``every`` seconds until cancelled; errors are logged and retried.
        ``keep``: :meth:`refresh` (the operator), else :meth:`reload` (the webhook)."""
        while True:
            await asyncio.sleep(every)
            try:
                if await (self.refresh() if keep else self.reload()):
                    log.info("webhook_certificate_reloaded")
            except (KubeError, RuntimeError, ValueError) as exc:
                log.warning("webhook_tls_check_failed", error=str(exc))


__all__ = [  # the certificates' names stay reachable here, where callers have found them
    "CA_LIFETIME",
    "CERT_LIFETIME",
    "CHECK_EVERY",
    "RENEW_BEFORE",
    "WEBHOOK_SUFFIX",
    "Material",
    "WebhookTLS",
    "issue",
    "load_into",
    "server_context",
    "service_names",
]
