"""Signing keys kept in a Secret in the operator's namespace, watched and rotated.

Every credential-endpoint replica and every gateway replica watches the one
Secret; the endpoint replicas create it when missing and rotate it when due,
with the Secret's resourceVersion as an optimistic lock, so concurrent replicas
never lose a key: the loser of a race re-reads and finds the work done.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import structlog

from phabmesh import credentials, metrics
from phabmesh.clock import Clock, utcnow
from phabmesh.kube import Conflict, KubeClient, NotFound
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer, Watched
from phabmesh.resources import resource_path

log = structlog.get_logger(__name__)


def _whole(obj: JSON) -> JSON:
    return obj


class KeyStore:
    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        secret_name: str,
        *,
        rotate_every: datetime.timedelta,
        max_credential_ttl: datetime.timedelta,
        clock: Clock = utcnow,
        secrets: Informer[Any] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.secret_name = secret_name
        self.rotate_every = rotate_every
        self.max_credential_ttl = max_credential_ttl
        self.clock = clock
        self.ring: credentials.KeyRing | None = None
        self.version = ""
        # The process's watch of its namespace's Secrets when it has one (a view of this
        # Secret alone), else a watch of this Secret of its own.
        self.informer: Watched[JSON]
        if secrets is not None:
            self.informer = secrets.view(
                _whole,
                on_event=self._on_event,
                name="signing-keys",
                only=f"{namespace}/{secret_name}",
            )
        else:
            self.informer = Informer(
                client,
                resource_path("", "v1", "secrets", namespace),
                _whole,
                params={"fieldSelector": f"metadata.name={secret_name}"},
                on_event=self._on_event,
                name="signing-keys",
            )

    @property
    def path(self) -> str:
        return resource_path("", "v1", "secrets", self.namespace, self.secret_name)

    def _on_event(self, kind: str, key: str, obj: JSON | None) -> None:
        if obj is None:
            # Deleted: keep verifying with what we have; the issuer re-creates it.
            return
        self._load(obj)

    def _load(self, obj: JSON) -> None:
        try:
            self.ring = credentials.KeyRing.from_secret_data(obj.get("data") or {})
            self.version = str(obj["metadata"].get("resourceVersion", ""))
        except (credentials.CredentialError, ValueError, KeyError) as exc:
            log.error("signing_keys_unreadable", error=str(exc))

    def _secret(self, ring: credentials.KeyRing) -> JSON:
        meta: JSON = {
            "name": self.secret_name,
            "namespace": self.namespace,
            "labels": {"app.kubernetes.io/part-of": "phabmesh"},
        }
        if self.version:
            meta["resourceVersion"] = self.version
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": meta,
            "data": ring.to_secret_data(),
        }

    @property
    def ready(self) -> bool:
        return self.ring is not None and self.informer.connected

    async def ensure(self) -> None:
        """Create the Secret with a first key when it does not exist yet."""
        try:
            self._load(await self.client.get(self.path))
            return
        except NotFound:
            pass
        ring = credentials.KeyRing.generate(self.clock())
        self.version = ""  # a new object carries no resourceVersion
        body = self._secret(ring)
        try:
            self._load(
                await self.client.create(resource_path("", "v1", "secrets", self.namespace), body)
            )
            log.info("signing_key_created", kid=ring.current.kid)
        except Conflict:
            self._load(await self.client.get(self.path))

    async def rotate_if_due(self) -> bool:
        if self.ring is None:
            await self.ensure()
        assert self.ring is not None
        now = self.clock()
        rotated = credentials.rotate(self.ring, now, self.rotate_every, self.max_credential_ttl)
        if rotated is self.ring:
            self._report_due()
            return False
        try:
            # Replaced with the resourceVersion it was read at: 409 if anyone wrote first.
            obj = await self.client.request("PUT", self.path, body=self._secret(rotated))
        except Conflict:
            self._load(await self.client.get(self.path))
            return False
        self._load(obj)
        self._report_due()
        log.info("signing_key_rotated", kid=rotated.current.kid)
        return True

    def _report_due(self) -> None:
        """phabmesh_signing_key_rotation_due_timestamp_seconds: by the replicas that rotate."""
        if self.ring is not None:
            metrics.current().signing_key_due(self.ring.current.created_at + self.rotate_every)

    async def run(self, check_every: float = 60.0) -> None:
        """Watch the Secret; rotate when due. Run until cancelled."""
        watcher = asyncio.create_task(self.informer.run())
        try:
            while True:
                try:
                    await self.rotate_if_due()
                except Exception as exc:
                    log.warning("signing_key_rotation_failed", error=str(exc))
                await asyncio.sleep(check_every)
        finally:
            watcher.cancel()

    async def watch(self) -> None:
        """Only watch (gateways verify, never rotate). Run until cancelled."""
        await self.informer.run()
