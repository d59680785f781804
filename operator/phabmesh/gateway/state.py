"""What the gateway knows, kept current by watches: leases, bindings, bots, namespaces'
labels, bot tokens, keys, (unless turned off) which pods have ended, and the Herald webhooks
with their HMAC keys.

No API server call is made per request. While the lease watch is disconnected
the gateway cannot confirm a lease and refuses credentials (fails closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from typing import Any

from phabmesh import gatewayrole, identity, metrics, resources, tasks
from phabmesh.credentials.keystore import KeyStore
from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.leases import grants
from phabmesh.leases.index import LeaseIndex
from phabmesh.leases.podends import PodEnds
from phabmesh.settings import Settings

# A binding's rules (allowedMethods, requireClientID, its bot, TTL, deletion) and where a
# bot's token is and which namespaces may use it: the same values the leases are judged by.
BindingRules = grants.BindingFacts
BotRef = grants.BotFacts
# Seconds between two wakes of the calls waiting for the watches (Changes), at least.
WAKE_GAP = 0.02


@dataclasses.dataclass(frozen=True)
class HookFacts:
    """A PhabricatorWebhook as the gateway needs it: where its key is and where it goes, and
    whether the operator judged it Ready (for this generation of its spec)."""

    namespace: str
    name: str
    spec: resources.WebhookSpec | None
    ready: bool
    # The Ready condition's reason for this generation of the spec ("": not checked yet).
    reason: str


def hook_facts(obj: JSON) -> HookFacts:
    meta = obj.get("metadata") or {}
    spec, _ = resources.parse_webhook_spec(obj)
    conditions = resources.parse_conditions((obj.get("status") or {}).get("conditions"))
    ready = next((c for c in conditions if c.type == resources.READY), None)
    current = ready is not None and ready.observed_generation == meta.get("generation")
    return HookFacts(
        str(meta.get("namespace")),
        str(meta.get("name")),
        spec,
        resources.condition_true(obj, resources.READY),
        ready.reason if ready is not None and current else "",
    )


class Changes:
    """Wakes the calls waiting for the watches a credential is judged by to move: any event
    of the leases, bindings, bots, namespaces, the Secrets Role and the bots' Secrets.

    Wakes come at most every :data:`WAKE_GAP` seconds, the events between them together:
    a watch that brings thousands of events a second (a scale-up's leases) wakes each
    waiting call a few dozen times a second, not once per event."""

    def __init__(self, gap: float = WAKE_GAP) -> None:
        self.gap = gap
        self._moved: asyncio.Event | None = None  # made for the first waiter, set on the wake
        self._woken_at = -gap
        self._wake_later: asyncio.TimerHandle | None = None

    def notify(self, *_: Any) -> None:
        if self._moved is None or self._wake_later is not None:
            return  # nobody waits, or a wake is due already
        loop = asyncio.get_running_loop()
        due = self._woken_at + self.gap - loop.time()
        if due <= 0:
            self._wake()
        else:
            self._wake_later = loop.call_later(due, self._wake)

    def _wake(self) -> None:
        self._wake_later = None
        self._woken_at = asyncio.get_running_loop().time()
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    async def wait(self, timeout: float) -> None:
        """Until the next wake, or ``timeout`` seconds."""
        if self._moved is None:
            self._moved = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), timeout)


class GatewayState:
    def __init__(self, settings: Settings, client: KubeClient) -> None:
        self.settings = settings
        self.client = client
        live = settings.watch_liveness
        self.changes = Changes()
        self.leases = LeaseIndex(
            client,
            on_revoked=lambda _: metrics.current().gateway_revocations_seen.inc(),
            liveness=live,
        )
        self.bindings: Informer[BindingRules] = Informer(
            client,
            resources.binding_path(None),
            grants.binding_facts,
            name="bindings",
            liveness=live,
        )
        self.bots: Informer[BotRef] = Informer(
            client,
            resources.bot_path(),
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
        # The bots' token Secrets, each watched by name once the operator's Role lets this
        # gateway read it (phabmesh.gatewayrole): never a list of the namespace's Secrets.
        # A connection pool of their own (a watch holds a connection, one per bot Secret),
        # within the process's one request budget.
        self.secret_client = client.sibling(connections=0)
        self.secrets = gatewayrole.BotSecrets(
            self.secret_client,
            settings.namespace,
            self.bots,
            excluded={settings.webhook_secret, settings.signing_secret},
            liveness=live,
            on_event=self.changes.notify,
        )
        for watch in (
            self.leases.informer,
            self.bindings,
            self.bots,
            self.grants.namespaces,
            self.secrets.role,
        ):
            watch.subscribe(self.changes.notify)
        self._secrets_synced = False
        # Herald webhooks, and the HMAC key Secret each names in its own namespace, watched by
        # name where that namespace grants it (docs/security.md): no list of any Secrets.
        self.webhooks: Informer[HookFacts] = Informer(
            client,
            resources.webhook_path(None),
            hook_facts,
            name="webhooks",
            liveness=live,
        )
        self.hook_keys = gatewayrole.SecretWatches(self.secret_client, "webhook-secret", live)
        self.webhooks.subscribe(lambda *_: self.hook_keys.follow(self._hook_secrets()))
        self.keys = KeyStore(
            client,
            settings.namespace,
            settings.signing_secret,
            rotate_every=datetime.timedelta(seconds=settings.key_rotation_interval),
            max_credential_ttl=datetime.timedelta(seconds=settings.max_credential_ttl),
        )
        self.pods = (
            PodEnds(
                client,
                live,
                after=self.leases.informer,
                unmeshed_pods=settings.watch_unmeshed_pods,
            )
            if settings.gateway_watch_pods
            else None
        )
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        for name, runner in (
            ("lease-index", self.leases.run),
            ("bindings", self.bindings.run),
            ("bots", self.bots.run),
            ("bot-secrets", self.secrets.run),
            ("signing-keys", self.keys.watch),
            ("grants", self.grants.run),
            ("webhooks", self.webhooks.run),
            *([("pods", self.pods.run)] if self.pods is not None else []),
        ):
            self._tasks.append(tasks.spawn(name, runner, self.settings.backoff()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.hook_keys.close()
        await self.secret_client.close()

    @property
    def confirmed(self) -> bool:
        """Every watch a credential is judged by is connected and synced (the leases, the
        bindings, bots and namespaces, the pods): else every credential is refused."""
        return (
            self.leases.synced
            and self.leases.connected
            and self.grants.healthy
            and (self.pods is None or self.pods.healthy)
        )

    @property
    def ready(self) -> bool:
        return self.confirmed and self._bot_secrets_synced() and self.keys.ring is not None

    def _bot_secrets_synced(self) -> bool:
        """Every bot Secret listed once since start; a bot added later does not make the
        gateway unready while its Secret's watch starts (its calls are refused meanwhile)."""
        if not self._secrets_synced:
            self._secrets_synced = self.bots.synced.is_set() and self.secrets.synced
        return self._secrets_synced

    def pod_ended(self, pod_uid: str) -> str | None:
        """The pod's revocation reason if the pod watch saw it terminating, finished or gone."""
        return self.pods.reason(pod_uid) if self.pods is not None else None

    def binding(self, namespace: str, name: str) -> BindingRules | None:
        return self.bindings.items.get(f"{namespace}/{name}")

    def bot_token(self, bot: str) -> str | None:
        ref = self.bots.items.get(bot)
        if ref is None:
            return None
        return self.secrets.token(ref.secret_name, ref.secret_key)

    def _hook_secrets(self) -> set[tuple[str, str]]:
        """The Secrets to watch: each webhook's, once the operator has checked this generation
        of it and found it readable (its namespace granted it). Nothing is asked for that
        was not granted; a grant given later shows as a new reason, and the watch starts."""
        return {
            (hook.namespace, name)
            for hook in self.webhooks.items.values()
            if hook.spec is not None and hook.reason not in ("", resources.HOOK_SECRET_FORBIDDEN)
            for name in hook.spec.secret_names
        }

    def webhook(self, namespace: str, name: str) -> HookFacts | None:
        return self.webhooks.items.get(f"{namespace}/{name}")

    def hook_key(self, hook: HookFacts) -> str | None:
        """The webhook's HMAC key, from the watch of its Secret (None: not there, or not
        listed yet)."""
        if hook.spec is None or hook.spec.herald is None:
            return None
        ref = hook.spec.herald.secret_ref
        return self.hook_keys.value(hook.namespace, ref.name, ref.key)

    def hook_credential(self, hook: HookFacts) -> tuple[str, str] | None:
        """A Harbormaster webhook's basic credential (username, password), from the watch of
        its Secret (None: not there, or not listed yet)."""
        if hook.spec is None or hook.spec.harbormaster is None:
            return None
        ref = hook.spec.harbormaster.credential_secret_ref
        username = self.hook_keys.value(hook.namespace, ref.name, "username")
        password = self.hook_keys.value(hook.namespace, ref.name, "password")
        if not username or not password:
            return None
        return username, password
