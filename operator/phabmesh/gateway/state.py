"""What the gateway knows, kept current by watches: leases, bindings, bots, namespaces'
labels, bot tokens, keys, and (unless turned off) which pods have ended.

No API server call is made per request. While the lease watch is disconnected
the gateway cannot confirm a lease and refuses credentials (fails closed).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

from phabmesh import identity, metrics, resources
from phabmesh.credentials.keystore import KeyStore
from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON, resource_path
from phabmesh.kube.informer import Informer
from phabmesh.leases import grants
from phabmesh.leases.index import LeaseIndex
from phabmesh.leases.podends import PodEnds
from phabmesh.settings import Settings

# A binding's rules (allowedMethods, requireClientID, its bot, TTL, deletion) and where a
# bot's token is and which namespaces may use it: the same values the leases are judged by.
BindingRules = grants.BindingFacts
BotRef = grants.BotFacts


def _secret_data(obj: JSON) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value).decode().strip()
        except ValueError:
            continue
    return out


class GatewayState:
    def __init__(self, settings: Settings, client: KubeClient) -> None:
        self.settings = settings
        self.client = client
        live = settings.watch_liveness
        self.leases = LeaseIndex(
            client,
            on_revoked=lambda _: metrics.current().gateway_revocations_seen.inc(),
            liveness=live,
        )
        g, v = resources.GROUP, resources.VERSION
        self.bindings: Informer[BindingRules] = Informer(
            client,
            resource_path(g, v, resources.BINDING_PLURAL),
            grants.binding_facts,
            name="bindings",
            liveness=live,
        )
        self.bots: Informer[BotRef] = Informer(
            client,
            resource_path(g, v, resources.BOT_PLURAL),
            grants.bot_facts,
            name="bots",
            liveness=live,
        )
        # Judges each lease by its binding, its bot and its namespace's labels (a watch of
        # namespaces of its own; the two informers above are shared).
        self.grants = grants.Grants(
            client,
            identity.Naming(settings.linkerd_namespace, settings.trust_domain),
            bindings=self.bindings,
            bots=self.bots,
        )
        self.secrets: Informer[dict[str, str]] = Informer(
            client,
            resource_path("", "v1", "secrets", settings.namespace),
            _secret_data,
            name="bot-secrets",
            liveness=live,
        )
        self.keys = KeyStore(
            client,
            settings.namespace,
            settings.signing_secret,
            rotate_every=datetime.timedelta(seconds=settings.key_rotation_interval),
            max_credential_ttl=datetime.timedelta(seconds=settings.max_credential_ttl),
        )
        self.pods = PodEnds(client, live) if settings.gateway_watch_pods else None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        for runner in (
            self.leases.run(),
            self.bindings.run(),
            self.bots.run(),
            self.secrets.run(),
            self.keys.watch(),
            self.grants.run(),
            *([self.pods.run()] if self.pods is not None else []),
        ):
            self._tasks.append(asyncio.create_task(runner))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @property
    def ready(self) -> bool:
        return (
            self.leases.synced
            and self.leases.connected
            and self.bindings.synced.is_set()
            and self.bots.synced.is_set()
            and self.secrets.synced.is_set()
            and self.grants.synced
            and self.keys.ring is not None
        )

    def pod_ended(self, pod_uid: str) -> str | None:
        """The pod's revocation reason if the pod watch saw it terminating, finished or gone."""
        return self.pods.reason(pod_uid) if self.pods is not None else None

    def binding(self, namespace: str, name: str) -> BindingRules | None:
        return self.bindings.items.get(f"{namespace}/{name}")

    def bot_token(self, bot: str) -> str | None:
        ref = self.bots.items.get(bot)
        if ref is None:
            return None
        data = self.secrets.items.get(f"{self.settings.namespace}/{ref.secret_name}") or {}
        return data.get(ref.secret_key) or None
