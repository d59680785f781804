"""PhabricatorWebhook readiness: is its HMAC key (Herald) or its bot and basic credential
(Harbormaster) there, and its target Service?

Gather (whether the webhook's namespace lets the operator read the Secret, asked with a
SelfSubjectAccessReview so that nothing it was not granted is ever tried; the Secret and the
Service, each read by name in the webhook's namespace), decide
(pure :func:`judge`), write the ``Ready`` condition only when it changes, and an Event when
its reason does. The operator never holds the key: it reads the Secret to say whether the
key is there, and keeps nothing of it. A Harbormaster webhook's basic credential is the one
thing it writes outside its own namespace: when the Secret the namespace created for it lacks
``username`` or ``password``, and the namespace granted ``patch`` on it, the operator generates
them into it (never logged, never kept). Webhooks are re-checked on their own events and every
:data:`RECHECK_EVERY` seconds (a Secret or a Service may come or go at any time; the operator
watches neither, since that would need a list of every namespace's Secrets).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
from typing import TYPE_CHECKING, Any

import structlog

from phabmesh import logs, resources
from phabmesh.controller.reconcilers import _Reconciler, changed
from phabmesh.controller.writer import NotActing
from phabmesh.kube import Conflict, KubeError, NotFound
from phabmesh.kube.client import JSON
from phabmesh.leases.readiness import bot_allows
from phabmesh.leases.world import Key, conditions_of
from phabmesh.resources import resource_path, webhook_path

if TYPE_CHECKING:
    from phabmesh.controller.memo import Memo

log = structlog.get_logger(__name__)

RECHECK_EVERY = 10.0  # seconds between checks of every webhook
# A Harbormaster webhook's basic credential, in its Secret: what the gateway compares the
# build step's Authorization with, and what the admin pastes into a Passphrase credential.
USERNAME_KEY, PASSWORD_KEY = "username", "password"
CREDENTIAL_KEYS = (USERNAME_KEY, PASSWORD_KEY)
PASSWORD_BYTES = 24  # of randomness in a generated password (32 URL-safe characters)
CREDENTIAL_GENERATED = "CredentialGenerated"  # the Event when phabmesh wrote one


@dataclasses.dataclass(frozen=True)
class WebhookView:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: resources.WebhookSpec | None
    problem: str | None  # why the spec could not be read
    status: JSON
    deleting: bool = False  # marked for deletion: as good as deleted

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @classmethod
    def from_body(cls, body: Any) -> WebhookView:
        meta = body.get("metadata") or {}
        spec, problem = resources.parse_webhook_spec(body)
        return cls(
            str(meta.get("namespace")),
            str(meta.get("name")),
            str(meta.get("uid") or ""),
            int(meta.get("generation") or 0),
            spec,
            problem,
            dict(body.get("status") or {}),
            meta.get("deletionTimestamp") is not None,
        )


@dataclasses.dataclass(frozen=True)
class Found:
    """What the reads found: a Secret's keys with a value (None: no such Secret), a Service's
    ports (None: no such Service); ``readable``: whether the namespace lets the operator read
    the Secret at all; ``error``: a read that failed."""

    secret_keys: frozenset[str] | None
    service_ports: frozenset[int] | None
    readable: bool = True
    service_problem: str | None = None  # why the Service could lead out of its namespace
    error: str | None = None
    # Harbormaster: the bot named by botRef (None: no such bot), whether its namespaceSelector
    # allows the webhook's namespace, and whether it is usable (Ready).
    bot: tuple[bool, bool] | None = (True, True)


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str


def judge(webhook: WebhookView, found: Found) -> Outcome:
    """The webhook's Ready condition from what the reads found (pure)."""
    if webhook.spec is None:
        return Outcome(
            "False", resources.HOOK_INVALID_SPEC, webhook.problem or "spec could not be read"
        )
    if found.error is not None:
        return Outcome("Unknown", resources.HOOK_CHECK_FAILED, found.error)
    spec = webhook.spec
    target = spec.target
    secret = _judge_secret(spec, found)
    if secret is not None:
        return secret
    if spec.harbormaster is not None and found.bot != (True, True):
        return _judge_bot(spec.harbormaster.bot_ref.name, webhook.namespace, found.bot)
    if found.service_ports is None:
        return Outcome(
            "False",
            resources.HOOK_SERVICE_MISSING,
            f'Service "{target.service}" not found in this namespace',
        )
    if found.service_problem is not None:
        return Outcome(
            "False",
            resources.HOOK_SERVICE_UNSUPPORTED,
            f'Service "{target.service}" {found.service_problem}: it could lead out of this '
            "namespace; use a Service that selects this namespace's pods",
        )
    if target.port not in found.service_ports:
        return Outcome(
            "False",
            resources.HOOK_PORT_MISSING,
            f'Service "{target.service}" has no port {target.port}',
        )
    return Outcome(
        "True",
        resources.HOOK_READY,
        f"deliveries are forwarded to Service {target.service} port {target.port}",
    )


def _needed_keys(spec: resources.WebhookSpec) -> tuple[str, tuple[str, ...]] | None:
    """The Secret this webhook needs and the keys it must hold (None: it needs none)."""
    if spec.herald is not None:
        return spec.herald.secret_ref.name, (spec.herald.secret_ref.key,)
    assert spec.harbormaster is not None
    return spec.harbormaster.credential_secret_ref.name, CREDENTIAL_KEYS


def _judge_secret(spec: resources.WebhookSpec, found: Found) -> Outcome | None:
    needed = _needed_keys(spec)
    if needed is None:
        return None
    name, keys = needed
    if not found.readable:
        verbs = "get" if spec.herald is not None else "get and patch"
        return Outcome(
            "False",
            resources.HOOK_SECRET_FORBIDDEN,
            f'phabmesh may not {verbs} Secret "{name}": grant it in this namespace '
            "(docs/webhooks.md)",
        )
    if found.secret_keys is None:
        return Outcome(
            "False",
            resources.HOOK_SECRET_MISSING,
            f'Secret "{name}" not found in this namespace',
        )
    missing = [k for k in keys if k not in found.secret_keys]
    if missing:
        return Outcome(
            "False",
            resources.HOOK_KEY_MISSING,
            f'Secret "{name}" has no key "{missing[0]}"'
            + (
                ""
                if spec.herald is not None
                else " (phabmesh generates it where this namespace grants it patch)"
            ),
        )
    return None


def _judge_bot(bot: str, namespace: str, found: tuple[bool, bool] | None) -> Outcome:
    if found is None:
        return Outcome("False", resources.HOOK_BOT_MISSING, f'PhabricatorBot "{bot}" not found')
    allowed, _ = found
    if not allowed:
        return Outcome(
            "False",
            resources.HOOK_BOT_NOT_ALLOWED,
            f'PhabricatorBot "{bot}" does not allow namespace "{namespace}" (its '
            "namespaceSelector)",
        )
    return Outcome(
        "False",
        resources.HOOK_BOT_NOT_READY,
        f'PhabricatorBot "{bot}" is not Ready (kubectl describe phabricatorbot {bot})',
    )


def generated_credential(keys: frozenset[str], username: str) -> JSON:
    """The merge patch that fills a credential Secret's missing keys: ``username`` (the
    webhook's own, unless one is there) and a random ``password``. An existing password is
    kept: the admin may have pasted it into Phorge already."""
    data: dict[str, str] = {}
    if USERNAME_KEY not in keys:
        data[USERNAME_KEY] = base64.b64encode(username.encode()).decode()
    if PASSWORD_KEY not in keys:
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        data[PASSWORD_KEY] = base64.b64encode(password.encode()).decode()
    return {"data": data}


def secret_keys(secret: JSON) -> frozenset[str]:
    """The keys of a Secret that hold a value (their values are not kept)."""
    return frozenset(k for k, v in (secret.get("data") or {}).items() if v)


def service_problem(service: JSON) -> str | None:
    """Why forwarding to ``service`` could reach outside its namespace, or None: its name
    resolves to its own pods only when it selects them (an ExternalName is a DNS alias of any
    name, and a Service without a selector has endpoints anyone allowed to write them chose)."""
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return "is of type ExternalName"
    if not spec.get("selector"):
        return "has no selector"
    return None


def service_ports(service: JSON) -> frozenset[int]:
    ports = (service.get("spec") or {}).get("ports") or []
    return frozenset(int(p["port"]) for p in ports if isinstance(p.get("port"), int))


class Webhooks(_Reconciler):
    """Each webhook's Ready condition, kept equal to what its Secret and Service show."""

    def __init__(self, memo: Memo) -> None:
        super().__init__(memo)
        self.items: dict[Key, WebhookView] = {}
        self._locks: dict[Key, asyncio.Lock] = {}

    def put(self, fresh: WebhookView) -> bool:
        """A webhook's event: kept; True when it is to be checked (new, or its spec changed)."""
        old = self.items.get(fresh.key)
        self.items[fresh.key] = fresh
        return old is None or old.uid != fresh.uid or old.generation != fresh.generation

    async def seen(self, body: Any) -> None:
        """A webhook's event: kept, and checked when its spec changed."""
        fresh = WebhookView.from_body(body)
        if self.put(fresh):
            await self.check(fresh.key)

    def forget(self, key: Key) -> None:
        self.items.pop(key, None)
        self._locks.pop(key, None)

    async def check_all(self) -> None:
        for key in list(self.items):
            await self.check(key)

    async def run(self, every: float = RECHECK_EVERY) -> None:
        """Re-check every webhook every ``every`` seconds; run until cancelled."""
        while True:
            await asyncio.sleep(every)
            await self.check_all()

    async def check(self, key: Key) -> None:
        """Check one webhook and write what changed. A write this replica may not make
        (peering) or that fails is left to the next pass, :data:`RECHECK_EVERY` away."""
        acting = self.writer.acting
        if acting is not None and not acting():
            return  # a standby replica reads nothing: the acting one's next pass checks it
        async with self._locks.setdefault(key, asyncio.Lock()):
            webhook = self.items.get(key)
            if webhook is None:
                return
            try:
                found = await self._gather(webhook)
                await self._record(webhook, judge(webhook, found))
            except NotActing:
                pass
            except KubeError as exc:
                log.warning(
                    "webhook_status_write_failed",
                    **{logs.NAMESPACE: key[0], logs.WEBHOOK: key[1]},
                    error=str(exc),
                )

    async def _gather(self, webhook: WebhookView) -> Found:
        if webhook.spec is None:
            return Found(None, None)
        ns = webhook.namespace
        spec, target = webhook.spec, webhook.spec.target
        needed = _needed_keys(spec)
        keys: frozenset[str] | None = frozenset()
        ports: frozenset[int] | None
        try:
            if needed is not None:
                readable, keys = await self._secret(webhook, *needed)
                if not readable:
                    # This namespace has not granted it (docs/webhooks.md): not read.
                    return Found(None, None, readable=False)
            try:
                service = await self.client.get(
                    resource_path("", "v1", "services", ns, target.service)
                )
                ports, problem = service_ports(service), service_problem(service)
            except NotFound:
                ports, problem = None, None
        except KubeError as exc:
            return Found(None, None, error=f"the API server could not be read: {exc}")
        return Found(keys, ports, service_problem=problem, bot=self._bot(webhook))

    def _bot(self, webhook: WebhookView) -> tuple[bool, bool] | None:
        """A Harbormaster webhook's bot, as the operator's world shows it (see Found.bot)."""
        assert webhook.spec is not None
        if webhook.spec.harbormaster is None:
            return (True, True)
        bot = self.world.bots.get(webhook.spec.harbormaster.bot_ref.name)
        if bot is None:
            return None
        labels = self.world.namespaces.get(webhook.namespace)
        return (bot_allows(bot, labels), bot.ready)

    async def _secret(
        self, webhook: WebhookView, name: str, keys: tuple[str, ...]
    ) -> tuple[bool, frozenset[str] | None]:
        """Whether the namespace lets the operator read the Secret, and its keys with a value
        (None: no such Secret). A Harbormaster credential with a key missing is generated into
        it when the namespace granted ``patch``."""
        ns = webhook.namespace
        if not await self._may(ns, name, "get"):
            return False, None
        path = resource_path("", "v1", "secrets", ns, name)
        try:
            secret = await self.client.get(path)
        except NotFound:
            return True, None
        found = secret_keys(secret)
        if keys != CREDENTIAL_KEYS or all(k in found for k in keys):
            return True, found
        if not await self._may(ns, name, "patch"):
            return True, found  # KeyMissing: what to grant is in its message
        acting = self.writer.acting
        if acting is not None and not acting():
            raise NotActing
        patch = generated_credential(found, f"phabmesh-{webhook.name}")
        # Only over the Secret as read: a password written since then is kept (409, and the
        # next pass reads it).
        patch["metadata"] = {
            "resourceVersion": (secret.get("metadata") or {}).get("resourceVersion")
        }
        try:
            await self.client.merge_patch(path, patch)
        except Conflict:
            return True, found
        await self.writer.event(
            self._ref(webhook),
            CREDENTIAL_GENERATED,
            f'phabmesh generated the basic credential into Secret "{name}" (keys username and '
            "password): paste them into the build step's Passphrase credential in Phorge",
            "Normal",
        )
        return True, found | set(keys)

    async def _may(self, namespace: str, secret: str, verb: str) -> bool:
        """Whether this namespace lets the operator ``verb`` the Secret (a
        SelfSubjectAccessReview, which every account may make): what it was not granted, it
        does not try."""
        review: JSON = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {
                    "namespace": namespace,
                    "verb": verb,
                    "resource": "secrets",
                    "name": secret,
                }
            },
        }
        path = resource_path("authorization.k8s.io", "v1", "selfsubjectaccessreviews")
        answer = await self.client.create(path, review)
        return bool((answer.get("status") or {}).get("allowed"))

    async def _record(self, webhook: WebhookView, outcome: Outcome) -> None:
        current = self.items.get(webhook.key, webhook)  # the status as the cluster showed it
        if current.uid != webhook.uid:
            return
        previous = conditions_of(current.status)
        conditions = resources.set_condition(
            previous,
            resources.Condition.new(
                resources.READY,
                outcome.status,  # type: ignore[arg-type]  # "True", "False" or "Unknown"
                outcome.reason,
                outcome.message,
                webhook.generation,
            ),
            self.clock(),
        )
        status: JSON = {
            "observedGeneration": webhook.generation,
            "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
        }
        if not changed(status, current.status):
            return
        written = await self.writer.patch_status(
            webhook_path(webhook.namespace, webhook.name), status
        )
        if written is not None and webhook.key in self.items:
            self.items[webhook.key] = dataclasses.replace(
                current, status=written.get("status") or {}
            )
        old_ready = next((c for c in previous if c.type == resources.READY), None)
        if old_ready is None or old_ready.reason != outcome.reason:
            log.info(
                "webhook_checked",
                **{
                    logs.NAMESPACE: webhook.namespace,
                    logs.WEBHOOK: webhook.name,
                    logs.REASON: outcome.reason,
                },
                status=outcome.status,
            )
            await self.writer.event(
                self._ref(webhook),
                outcome.reason,
                outcome.message,
                "Normal" if outcome.status == "True" else "Warning",
            )

    @staticmethod
    def _ref(webhook: WebhookView) -> JSON:
        return {
            "apiVersion": resources.API_VERSION,
            "kind": resources.WEBHOOK_KIND,
            "namespace": webhook.namespace,
            "name": webhook.name,
            "uid": webhook.uid,
        }
