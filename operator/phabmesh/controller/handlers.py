"""kopf handlers: the controller's top layer. Watch events feed the World; decisions
come from :mod:`phabmesh.leases.decide`; writes go through the Writer.

Only ``on.event`` handlers, index functions (that store nothing in kopf: see
:func:`pod_seen`) and timers on bots are used, so kopf needs no diff-base copies of
objects and writes no annotations; pods and bindings get no finalizers, and pods are
never written to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import kopf
import structlog

from phabmesh import identity, metrics, resources
from phabmesh.controller.state import Memo
from phabmesh.leases import decide
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView, Key

log = structlog.get_logger(__name__)
registry = kopf.OperatorRegistry()

TICK = 5.0  # seconds between bot due-checks and renewal passes over the bot's bindings


class _NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: with only event handlers and timers, kopf needs none (and copies none)."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere: $KUBECONFIG or ~/.kube/config."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
async def configure(settings: kopf.OperatorSettings, memo: Memo, **_: Any) -> None:
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.watching.chunk_size = 500
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.level = 30  # warnings and errors only, as Events on our objects
    settings.networking.request_timeout = 30
    # settings.peering.priority: random per process, given to kopf by controller.operate
    # (phabmesh.controller.peering.new_priority), so that exactly one of identical replicas acts.
    settings.peering.lifetime = int(memo.settings.peering_lifetime)
    # The injection webhook is not kopf's: it runs in a process of its own
    # (phabmesh.admission.server), off this event loop.
    settings.admission.server = None
    settings.admission.managed = None
    await memo.start()
    await memo.startup.preload()
    swept = await memo.startup.sweep()
    log.info("controller_started", swept=swept, pods_known=len(memo.world.pods))


@kopf.on.cleanup(registry=registry)
async def shutdown(memo: Memo, **_: Any) -> None:
    await memo.stop()


# -- what kopf's first lists hold ---------------------------------------------------------------
# Index functions run for every object of kopf's first list of a resource before any handler
# or timer of any resource (see pod_seen); these only note which objects exist, so that
# Memo.listed can forget what preload read and was deleted before kopf's lists. Nothing is
# stored in kopf's own indices (None).


@kopf.index("", "v1", "namespaces", registry=registry)
def namespace_seen(name: str, memo: Memo, **_: Any) -> None:
    memo.startup.saw("namespaces", name)


@kopf.index(resources.GROUP, resources.VERSION, resources.BOT_PLURAL, registry=registry)
def bot_seen(name: str, memo: Memo, **_: Any) -> None:
    memo.startup.saw("bots", name)


@kopf.index(resources.GROUP, resources.VERSION, resources.BINDING_PLURAL, registry=registry)
def binding_seen(namespace: str | None, name: str, memo: Memo, **_: Any) -> None:
    memo.startup.saw("bindings", (namespace, name))


@kopf.index(resources.GROUP, resources.VERSION, resources.CREDENTIAL_PLURAL, registry=registry)
def lease_seen(namespace: str | None, name: str, memo: Memo, **_: Any) -> None:
    memo.startup.saw("leases", (namespace, name))


# -- namespaces -------------------------------------------------------------------------------


@kopf.on.event("", "v1", "namespaces", registry=registry)
async def namespace_event(
    event: kopf.RawEvent, body: kopf.Body, name: str, memo: Memo, **_: Any
) -> None:
    await memo.startup.listed()
    world = memo.world
    labels = dict(body.get("metadata", {}).get("labels") or {})
    if event.get("type") == "DELETED":
        world.namespaces.pop(name, None)
    elif world.namespaces.get(name) == labels:
        return
    else:
        world.namespaces[name] = labels
    if world.bindings_by_ns.get(name):
        await memo.bindings.refresh_namespace(name)


# -- bots -------------------------------------------------------------------------------------


@kopf.on.event(resources.GROUP, resources.VERSION, resources.BOT_PLURAL, registry=registry)
async def bot_event(event: kopf.RawEvent, body: kopf.Body, name: str, memo: Memo, **_: Any) -> None:
    await memo.startup.listed()
    world = memo.world
    if event.get("type") == "DELETED":
        world.bots.pop(name, None)
        memo.bots.forget(name)
        metrics.current().bot_gone(name)
    else:
        fresh = BotView.from_body(body)
        old = world.bots.get(name)
        # Keep the readiness this process decided; take spec changes from the event, and
        # the status it shows (what the next status write is compared with).
        if old is not None and old.generation == fresh.generation and old.spec == fresh.spec:
            world.bots[name] = dataclasses.replace(old, status=fresh.status, recheck=fresh.recheck)
            if fresh.recheck != old.recheck:  # `kubectl phabmesh recheck`: check it now
                await memo.bots.check(name)
            return
        world.bots[name] = fresh
        if fresh.generation != (old.generation if old else -1):
            await memo.bots.check(name)
    for namespace in world.namespaces_of_bot(name):
        await memo.bindings.refresh_namespace(namespace)


@kopf.timer(
    resources.GROUP, resources.VERSION, resources.BOT_PLURAL, interval=TICK, registry=registry
)
async def bot_tick(name: str, memo: Memo, **_: Any) -> None:
    """The bot's due re-check, then its bindings' renewals and status.

    The periodic work of bindings runs here, on the cluster-scoped bot, so that
    bindings have no timer: a kopf timer puts kopf's finalizer on its object, and a
    binding deleted while the operator is down would stay Terminating until it
    returned (its name not free to re-create). kopf removes that finalizer from
    bindings that still carry it from earlier versions: no handler needs it.
    """
    await memo.startup.listed()
    await memo.bots.check(name, only_if_due=True)
    for binding in memo.world.bindings_of_bot(name):
        await memo.leases.renew(binding)
        await memo.bindings.write_status(binding)


# -- bindings ---------------------------------------------------------------------------------


@kopf.on.event(resources.GROUP, resources.VERSION, resources.BINDING_PLURAL, registry=registry)
async def binding_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: Memo, **_: Any
) -> None:
    assert namespace is not None  # a namespaced resource
    await memo.startup.listed()
    world = memo.world
    key: Key = (namespace, name)
    # Marked for deletion (someone else's finalizer may hold it): as good as deleted.
    deleting = body.get("metadata", {}).get("deletionTimestamp") is not None
    if event.get("type") == "DELETED" or deleting:
        world.drop_binding(key)
        memo.bindings.forget(key)
        metrics.current().binding_gone(namespace, name)
    else:
        fresh = BindingView.from_body(body)
        old = world.bindings.get(key)
        if old is not None and old.generation == fresh.generation and old.spec == fresh.spec:
            world.put_binding(dataclasses.replace(old, status=fresh.status))
            return
        world.put_binding(fresh)
    await memo.bindings.refresh_namespace(namespace)
    binding = world.bindings.get(key)
    if binding is not None:
        # A shorter credentialTTL shortens live leases now, not at their next renewal.
        await memo.leases.renew(binding)


# -- webhooks ---------------------------------------------------------------------------------


@kopf.on.event(resources.GROUP, resources.VERSION, resources.WEBHOOK_PLURAL, registry=registry)
async def webhook_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: Memo, **_: Any
) -> None:
    """A webhook's Ready condition: checked when it appears or its spec changes, and by the
    periodic pass of :class:`~phabmesh.controller.webhooks.Webhooks` (no kopf timer: it would
    put kopf's finalizer on the webhook)."""
    assert namespace is not None  # a namespaced resource
    await memo.startup.listed()
    deleting = body.get("metadata", {}).get("deletionTimestamp") is not None
    if event.get("type") == "DELETED" or deleting:
        memo.webhooks.forget((namespace, name))
    else:
        await memo.webhooks.seen(body)


# -- pods and leases --------------------------------------------------------------------------


@kopf.index("", "v1", "pods", registry=registry)
def pod_seen(body: kopf.Body, memo: Memo, **_: Any) -> None:
    """Every pod's facts into the World, before any handler runs at start-up.

    kopf calls index functions for each object of a resource's first listing and
    holds back every handler and timer of every resource until all of those
    listings are complete. So no decision is made about a lease's pod before the
    pod list is known: a pod that the World does not know is truly gone, never
    merely not seen yet. Nothing is stored in kopf's own index (None).
    """
    # With the cluster's naming: a pod of another control plane or trust domain is not
    # meshed here (its identity is not the one a lease would carry).
    memo.world.put_pod(identity.PodFacts.from_pod(body, memo.naming))


@kopf.on.event("", "v1", "pods", registry=registry)
async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: Memo, **_: Any) -> None:
    await memo.startup.listed()
    uid = str(body.get("metadata", {}).get("uid"))
    if event.get("type") == "DELETED":
        memo.world.drop_pod(uid)
    # Otherwise pod_seen (called first, for this same event) has put its facts in the World.
    await memo.leases.reconcile_pod(uid)


@kopf.on.event(resources.GROUP, resources.VERSION, resources.CREDENTIAL_PLURAL, registry=registry)
async def lease_event(
    event: kopf.RawEvent, body: kopf.Body, namespace: str | None, name: str, memo: Memo, **_: Any
) -> None:
    assert namespace is not None  # a namespaced resource
    await memo.startup.listed()
    if event.get("type") == "DELETED":
        uid = str(body.get("metadata", {}).get("uid") or "")
        dropped = memo.world.drop_lease((namespace, name), uid)
        if dropped is not None and dropped.active:
            # Deleted while Active, not by this operator (its revocations are Revoked first):
            # only the garbage collector (with the pod that owns it) or the namespace
            # controller may (manifests/lease-policy.yaml). Say so on the pod, as a revocation.
            await memo.writer.announce_revoked(dropped, decide.POD_DELETED)
        return
    lease = LeaseView.from_body(body)
    memo.world.put_lease(lease)
    # A lease the pod should not hold (written by someone else, or left from before a
    # change) goes at once, not at the pod's next event or the lease's renewal. Only for a
    # pod already seen: an unseen pod is not a deleted one, and its own event reconciles it.
    if lease.active and lease.pod_uid in memo.world.pods:
        verdicts = memo.bindings.verdicts_in(lease.namespace)
        plan = decide.plan_pod(memo.world, lease.pod_uid, memo.naming, verdicts)
        if any(revoked.key == lease.key for revoked, _ in plan.revoke):
            await memo.leases.reconcile_pod(lease.pod_uid)


__all__ = [
    "binding_event",
    "binding_seen",
    "bot_event",
    "bot_seen",
    "bot_tick",
    "configure",
    "lease_event",
    "lease_seen",
    "namespace_event",
    "namespace_seen",
    "pod_event",
    "pod_seen",
    "shutdown",
    "webhook_event",
]
