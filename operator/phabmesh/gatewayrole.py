"""Which bot-token Secrets the gateway may read: the Role ``phabmesh-gateway-secrets``.

RBAC has no rule for "the Secrets the bots name": it narrows a read only by object name
(``resourceNames``), and a list or watch only when the request itself names the object
(``fieldSelector=metadata.name=<name>``). The bots' token Secrets are named by whoever writes
each PhabricatorBot (``tokenSecretRef``), so a fixed manifest cannot list them. Hence:

- the operator keeps the one rule of that Role (manifests/rbac-gateway.yaml ships it without
  rules) equal to the Secret names the bots use: list and watch, nothing else, and never the
  operator's own Secrets (the webhook CA's key, the signing keys; the gateway reads the
  latter by a fixed grant of its own) (:class:`RoleKeeper`, on every replica, writing only
  while it is the one that acts, and only once it has seen every bot). The API server holds
  anyone to that shape (manifests/secret-policy.yaml);
- the gateway watches each Secret that a bot names and the Role lists, one watch per name
  (:class:`BotSecrets`). It reads the Role too, so it asks only for what it was granted; a
  refusal anyway (the API server's authorizer lags the Role by a moment) is retried by the
  watch like any failure, and never stops the gateway. Without that Role (phabmesh run
  as a cluster admin, no manifests), it watches every Secret the bots name: RBAC is what
  decides, the Role only spares the calls it would refuse.

A Role may only grant what its writer holds (RBAC's escalation check): the operator may list
and watch every Secret in its namespace (it checks the bots' tokens), so it may write this
rule, and it may update only this Role (``resourceNames``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import structlog

from phabmesh import apicalls
from phabmesh.kube import Conflict, KubeClient
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import DEFAULT_LIVENESS, Informer, Watched
from phabmesh.leases.grants import BotFacts
from phabmesh.resources import resource_path

log = structlog.get_logger(__name__)

ROLE = apicalls.GATEWAY_SECRETS_ROLE
RBAC_GROUP = "rbac.authorization.k8s.io"
VERBS = ("list", "watch")  # the gateway's calls: a watch of one Secret, by name
CHECK_EVERY = 5.0  # seconds between the keeper's checks when nothing changed


def wanted(bots: Iterable[BotFacts], excluded: Collection[str]) -> tuple[str, ...]:
    """The Secret names the bots use, sorted, less ``excluded`` (the operator's own)."""
    return tuple(sorted({b.secret_name for b in bots if b.secret_name} - set(excluded)))


def rules(names: Collection[str]) -> list[JSON]:
    """The Role's rules for ``names``: none at all for no names (an empty ``resourceNames``
    would mean every Secret)."""
    if not names:
        return []
    return [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": list(VERBS),
            "resourceNames": sorted(names),
        }
    ]


def _normal(rule: Mapping[str, Any]) -> JSON:
    keys = ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs")
    return {k: sorted(rule[k]) for k in keys if rule.get(k)}


def same_rules(current: Iterable[Mapping[str, Any]], wanted_rules: Iterable[JSON]) -> bool:
    return [_normal(r) for r in current] == [_normal(r) for r in wanted_rules]


def permitted(role: JSON) -> frozenset[str]:
    """Secret names the Role lets the gateway list and watch, by name."""
    names: set[str] = set()
    for rule in role.get("rules") or []:
        if (
            "" in (rule.get("apiGroups") or [])
            and "secrets" in (rule.get("resources") or [])
            and set(VERBS) <= set(rule.get("verbs") or [])
        ):
            names.update(rule.get("resourceNames") or [])
    return frozenset(names)


def _role_informer(
    client: KubeClient,
    namespace: str,
    name: str,
    transform: Callable[[JSON], Any],
    liveness: float,
) -> Informer[Any]:
    return Informer(
        client,
        resource_path(RBAC_GROUP, "v1", "roles", namespace),
        transform,
        params={"fieldSelector": f"metadata.name={name}"},
        name="gateway-secrets-role",
        liveness=liveness,
    )


class RoleKeeper:
    """The operator's side: the Role's rule follows the bots (see the module)."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        bots: Watched[BotFacts],
        *,
        excluded: Collection[str],
        acting: Callable[[], bool],
        name: str = ROLE,
        liveness: float = DEFAULT_LIVENESS,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.bots = bots
        self.excluded = frozenset(excluded)
        self.acting = acting
        self.role: Informer[JSON] = _role_informer(
            client, namespace, name, lambda obj: obj, liveness
        )
        self._wake = asyncio.Event()
        self._missing = False
        self.role.subscribe(self._changed)
        bots.subscribe(self._changed)

    def _changed(self, *_: Any) -> None:
        self._wake.set()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    async def sync(self) -> bool:
        """Write the rule if it differs from the bots' names; True if written."""
        if not (self.acting() and self.bots.synced.is_set() and self.role.synced.is_set()):
            return False
        current = self.role.items.get(self.key)
        if current is None:
            if not self._missing:
                log.warning("gateway_secrets_role_missing", role=self.key)
            self._missing = True
            return False
        self._missing = False
        names = wanted(self.bots.items.values(), self.excluded)
        want = rules(names)
        if same_rules(current.get("rules") or [], want):
            return False
        meta = current.get("metadata") or {}
        body: JSON = {
            "apiVersion": f"{RBAC_GROUP}/v1",
            "kind": "Role",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "resourceVersion", "labels", "annotations")
                if k in meta
            },
            "rules": want,
        }
        path = resource_path(RBAC_GROUP, "v1", "roles", self.namespace, self.name)
        try:
            # Replaced at the version it was read at: a newer one comes by the watch.
            written = await self.client.request("PUT", path, body=body)
        except Conflict:
            return False
        self.role.items[self.key] = written
        log.info("gateway_secrets_role_set", role=self.key, secrets=len(names))
        return True

    async def run(self, check_every: float = CHECK_EVERY) -> None:
        """Watch the Role and keep its rule; run until cancelled."""
        watcher = asyncio.create_task(self.role.run())
        try:
            while True:
                self._wake.clear()
                try:
                    await self.sync()
                except Exception as exc:
                    log.warning("gateway_secrets_role_failed", role=self.key, error=str(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=check_every)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def secret_data(obj: JSON) -> dict[str, str]:
    """A Secret's values, decoded and stripped (those that are not text are left out)."""
    out: dict[str, str] = {}
    for key, value in (obj.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value).decode().strip()
        except ValueError:
            continue
    return out


class SecretWatches:
    """One watch per Secret, by name (``fieldSelector=metadata.name=<name>``, which RBAC
    authorizes by ``resourceNames``), started and stopped to follow the names wanted. Their
    values are dropped with their watch."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        liveness: float = DEFAULT_LIVENESS,
        on_event: Callable[[str, str, dict[str, str] | None], None] | None = None,
    ) -> None:
        self.client = client
        self.name = name  # each watch's, in the logs
        self.liveness = liveness
        self.on_event = on_event  # called on each event of every watch
        # (namespace, name) -> the watch and its task.
        self.watches: dict[tuple[str, str], tuple[Informer[dict[str, str]], asyncio.Task[None]]]
        self.watches = {}

    def follow(self, want: Collection[tuple[str, str]]) -> None:
        """Start a watch for each wanted Secret, stop the others."""
        for gone in set(self.watches) - set(want):
            _, task = self.watches.pop(gone)
            task.cancel()
        for namespace, name in sorted(set(want) - set(self.watches)):
            informer: Informer[dict[str, str]] = Informer(
                self.client,
                resource_path("", "v1", "secrets", namespace),
                secret_data,
                params={"fieldSelector": f"metadata.name={name}"},
                name=self.name,
                liveness=self.liveness,
                on_event=self.on_event,
            )
            self.watches[namespace, name] = (informer, asyncio.create_task(informer.run()))

    @property
    def synced(self) -> bool:
        """Every watch listed once."""
        return all(informer.synced.is_set() for informer, _ in self.watches.values())

    def value(self, namespace: str, secret: str, key: str) -> str | None:
        """The Secret's value under ``key`` (decoded, stripped), if watched and there."""
        watched = self.watches.get((namespace, secret))
        if watched is None:
            return None
        data = watched[0].items.get(f"{namespace}/{secret}") or {}
        return data.get(key) or None

    async def close(self) -> None:
        tasks = [task for _, task in self.watches.values()]
        self.watches.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BotSecrets:
    """The gateway's side: a watch of each Secret that a bot names and the Role lists."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        bots: Watched[BotFacts],
        *,
        excluded: Collection[str],
        name: str = ROLE,
        liveness: float = DEFAULT_LIVENESS,
        on_event: Callable[[str, str, Any], None] | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.bots = bots
        self.excluded = frozenset(excluded)
        self.liveness = liveness
        self.role: Informer[frozenset[str]] = _role_informer(
            client, namespace, name, permitted, liveness
        )
        self.secrets = SecretWatches(client, "bot-secret", liveness, on_event)
        self._running = False
        self._started = False  # a reconcile has run with the Role read
        self.role.subscribe(self._changed)
        bots.subscribe(self._changed)

    def _changed(self, *_: Any) -> None:
        if self._running:
            self.reconcile()

    def wanted(self) -> set[str]:
        """The Secrets to watch: those the bots name and the Role lists. With no such Role
        (an install without phabmesh's RBAC, say as a cluster admin), every one the bots
        name: RBAC decides either way, the Role only spares calls it would refuse."""
        if not self.role.synced.is_set():
            return set()
        names = {b.secret_name for b in self.bots.items.values() if b.secret_name}
        names -= self.excluded
        if not self.role.items:
            return names
        allowed: set[str] = set().union(*self.role.items.values())
        return names & allowed

    def reconcile(self) -> None:
        """Start a watch for each wanted name, stop the others (their tokens go with them)."""
        want = self.wanted()
        self._started = self.role.synced.is_set()
        self.secrets.follow({(self.namespace, name) for name in want})

    @property
    def synced(self) -> bool:
        """The Role read, and every watch started for it listed once."""
        return self._started and self.secrets.synced

    def token(self, secret: str, key: str) -> str | None:
        return self.secrets.value(self.namespace, secret, key)

    async def run(self) -> None:
        """Watch the Role, and through it the Secrets; run until cancelled."""
        self._running = True
        watcher = asyncio.create_task(self.role.run())
        try:
            # Its first list emits nothing when the Role is absent: start from here.
            await self.role.synced.wait()
            self.reconcile()
            await watcher
        finally:
            watcher.cancel()
            self._running = False
            await self.secrets.close()
