"""What drives the controller: the process's shared watches, and a queue of work per object.

Each watch event updates the World at once, in the watch's own task (:class:`Controller`'s
``_on_*`` methods): what the controller knows is always what the watches last said. What the
event asks for (a pod's leases reconciled, a bot checked, a namespace's bindings judged
again) goes to a :class:`WorkQueue` as the object's *work*, which coalesces: an object
changed ten times while its work waited is handled once, from the World as it is then.
A fixed number of workers take the work, one object at a time each, so no object is handled
by two workers at once and the work in flight is bounded whatever the cluster's size.

Nothing is handled before every watch has listed once and the start-up sweep has run: no
decision is made about a lease's pod before the pods are known. While the replica is not
acting (peering), and while any watch is lost, the work waits, coalesced, and is handled
once it acts again with every watch current; that includes the first list of everything, so
a standby that takes over starts from every object.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import TYPE_CHECKING

import structlog

from phabmesh import metrics, resources
from phabmesh.controller.webhooks import WebhookView
from phabmesh.controller.writer import NotActing
from phabmesh.kube.informer import DELETED, View
from phabmesh.leases import plans, readiness, reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.watches import Watches
from phabmesh.leases.world import BindingView, BotView, Key

if TYPE_CHECKING:
    from phabmesh import identity
    from phabmesh.controller.memo import Memo

log = structlog.get_logger(__name__)

WORKERS = 64  # objects handled at once: lease writes in flight, within the process's qps
TICK = 5.0  # seconds between bot due-checks and renewal passes over each bot's bindings
ACTING_POLL = 0.5  # seconds between looks at whether a paused replica acts again
UNFINALIZE_AGAIN = 10.0  # seconds before a failed removal of kopf's old finalizer is retried


@dataclasses.dataclass
class BotWork:
    check: bool = False  # its spec changed or a recheck was asked: check it now
    tick: bool = False  # the periodic pass: check if due, renew and write its bindings
    refresh: bool = False  # judge its namespaces' bindings again


@dataclasses.dataclass(frozen=True)
class Work:
    """What one object's work is; ``data`` is merged by the queue (:meth:`WorkQueue.put`)."""

    kind: str  # "pod", "lease", "binding", "namespace", "judge", "bot", "webhook", "revoked"...
    key: Hashable


class WorkQueue:
    """Work per object, coalesced, handled by a bounded number of workers (module docstring).

    ``put`` is synchronous (watch listeners call it); the first ``put`` of an idle object
    queues it, a later one only merges into the waiting work; an object's work put while it
    is being handled is handled again after. Each new piece of work wakes one idle worker.
    """

    def __init__(
        self,
        handle: Callable[[Work, object], Awaitable[None]],
        *,
        workers: int = WORKERS,
        may_run: Callable[[], bool] = lambda: True,
    ) -> None:
        self.handle = handle
        self.workers = workers
        self.may_run = may_run
        self.waiting: dict[Work, object] = {}  # work not yet taken, with its merged data
        self.order: collections.deque[Work] = collections.deque()
        self.busy: set[Work] = set()
        self.ready = asyncio.Event()  # every watch listed and the sweep ran: work may start
        self._idle: collections.deque[asyncio.Future[None]] = collections.deque()
        self.handled = 0
        # The waiting work's gauge reads the queue when it is scraped: nothing per item.
        metrics.current().work_waiting.set_function(self.__len__)

    def __len__(self) -> int:
        return len(self.waiting)

    def open(self) -> None:
        """Let the workers begin (the work put so far included)."""
        self.ready.set()
        for _ in range(min(len(self.order), self.workers)):
            self._wake_one()

    def _wake_one(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put(
        self,
        work: Work,
        data: object = None,
        merge: Callable[[object, object], object] | None = None,
    ) -> None:
        if work in self.waiting:
            if merge is not None:
                self.waiting[work] = merge(self.waiting[work], data)
            else:
                self.waiting[work] = data
            return
        self.waiting[work] = data
        if work not in self.busy:
            self.order.append(work)
            self._wake_one()

    def discard(self, work: Work) -> None:
        """Forget ``work`` if it waits (nothing is left to do for it)."""
        if self.waiting.pop(work, _ABSENT) is not _ABSENT and work not in self.busy:
            with contextlib.suppress(ValueError):
                self.order.remove(work)

    async def _next(self) -> tuple[Work, object]:
        while True:
            if self.ready.is_set() and self.order:
                if self.may_run():
                    work = self.order.popleft()
                    data = self.waiting.pop(work)
                    self.busy.add(work)
                    return work, data
                await asyncio.sleep(ACTING_POLL)  # paused: the work waits
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def _worker(self) -> None:
        while True:
            work, data = await self._next()
            try:
                await self.handle(work, data)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("work_failed", kind=work.kind, key=str(work.key))
                metrics.current().task_failed(f"work:{work.kind}")
            finally:
                self.busy.discard(work)
                self.handled += 1
                metrics.current().work_done(work.kind)
                if work in self.waiting:  # put again while handled: its turn comes again
                    self.order.append(work)
            if self.order:
                self._wake_one()  # another worker may take what remains

    async def run(self) -> None:
        """The workers, until cancelled."""
        await asyncio.gather(*(self._worker() for _ in range(self.workers)))


_ABSENT = object()


def _merge_bot(old: object, new: object) -> object:
    assert isinstance(old, BotWork) and isinstance(new, BotWork)
    return BotWork(old.check or new.check, old.tick or new.tick, old.refresh or new.refresh)


class Controller:
    """The controller of one operator process: the watches' listeners, the work they queue,
    and the periodic pass over bots."""

    def __init__(
        self,
        memo: Memo,
        watches: Watches,
        *,
        acting: Callable[[], bool] | None = None,
        workers: int = WORKERS,
    ) -> None:
        self.memo = memo
        self.watches = watches
        self.acting = acting or (lambda: True)
        self.queue = WorkQueue(self.handle, workers=workers, may_run=self.may_decide)
        self._decisive = watches.decisive
        # Set once the first lists are in and the sweep has run: before it, the first lists'
        # events queue no namespace or binding work (each pod's own work covers them).
        self.started = False
        self.webhooks: View[WebhookView] = watches.webhooks.view(
            WebhookView.from_body, on_event=self._on_webhook, name="controller-webhooks"
        )
        watches.namespaces.subscribe(self._on_namespace)
        watches.bots.subscribe(self._on_bot)
        watches.bindings.subscribe(self._on_binding)
        watches.leases.subscribe(self._on_lease)
        watches.pods.subscribe(self._on_pod)

    def may_decide(self) -> bool:
        """This replica acts, and every watch a lease decision reads is current: a lost
        watch's World is not decided on (fail closed) until the watch has listed again."""
        return self.acting() and all(i.healthy for i in self._decisive)

    # -- start-up -----------------------------------------------------------------------

    async def start(self) -> int:
        """Wait until every watch has listed once, sweep orphaned leases, then let the work
        begin. Returns how many leases the sweep revoked."""
        await self.watches.wait_synced()
        self.started = True
        # The leases the lease list held when the pods were listed (leases.watches).
        swept = await self.memo.leases.sweep(self.watches.first_leases or ())
        self.queue.open()
        log.info(
            "controller_started",
            swept=swept,
            pods_known=len(self.memo.world.pods),
            work_waiting=len(self.queue),
        )
        return swept

    async def ticks(self) -> None:
        """Every :data:`TICK` seconds, each bot's periodic pass, as its work (until cancelled).

        The periodic work of bindings runs on their bot, so that bindings need no timer of
        their own."""
        await self.queue.ready.wait()
        while True:
            if self.acting():
                for name in list(self.memo.world.bots):
                    self.queue.put(Work("bot", name), BotWork(tick=True), _merge_bot)
            await asyncio.sleep(TICK)

    # -- what each event changes in the World, and the work it asks for -----------------

    def _on_namespace(self, kind: str, name: str, labels: object) -> None:
        world = self.memo.world
        if kind == DELETED:
            world.namespaces.pop(name, None)
        elif world.namespaces.get(name) == labels:
            return
        else:
            assert isinstance(labels, Mapping)
            world.namespaces[name] = labels
        if world.bindings_by_ns.get(name) and self.started:
            self.queue.put(Work("namespace", name))

    def _on_bot(self, kind: str, name: str, fresh: BotView | None) -> None:
        world = self.memo.world
        if kind == DELETED or fresh is None:
            namespaces = list(world.namespaces_of_bot(name))
            world.bots.pop(name, None)
            self.memo.bots.forget(name)
            metrics.current().bot_gone(name)
            for namespace in namespaces:
                self.queue.put(Work("namespace", namespace))
            return
        if fresh.kopf_finalizer >= 0:
            self._unfinalize(resources.bot_path(name), fresh.kopf_finalizer)
        old = world.bots.get(name)
        if old is not None and old.uid == fresh.uid and fresh.older_than(old):
            return  # an earlier state than the answer to this process's own write shows
        same = (
            old is not None
            and old.uid == fresh.uid
            and old.generation == fresh.generation
            and old.spec == fresh.spec
        )
        if same and old is not None:
            # Its status: its readiness is what that says (the acting replica's check).
            world.bots[name] = fresh
            if readiness.of_bot(old) != readiness.of_bot(fresh) and self.started:
                for namespace in world.namespaces_of_bot(name):
                    self.queue.put(Work("namespace", namespace))
            if fresh.recheck != old.recheck:
                # `kubectl phabmesh recheck`: check it now
                self.queue.put(Work("bot", name), BotWork(check=True), _merge_bot)
            return
        world.bots[name] = fresh
        if old is not None and old.uid != fresh.uid:
            self.memo.bots.forget(name)  # another bot of that name: checked afresh
        # A new or changed bot is checked now; its bindings are judged again (but at the
        # first lists, which start judges all at once).
        work = BotWork(check=True, refresh=self.started)
        self.queue.put(Work("bot", name), work, _merge_bot)

    def _on_binding(self, kind: str, key_text: str, fresh: BindingView | None) -> None:
        world = self.memo.world
        namespace, _, name = key_text.partition("/")
        key: Key = (namespace, name)
        if fresh is not None and fresh.kopf_finalizer >= 0:
            self._unfinalize(resources.binding_path(namespace, name), fresh.kopf_finalizer)
        # Marked for deletion (someone else's finalizer may hold it): as good as deleted.
        if kind == DELETED or fresh is None or fresh.deleting:
            world.drop_binding(key)
            metrics.current().binding_gone(namespace, name)
            if self.started:
                self.queue.put(Work("namespace", namespace))
            return
        old = world.bindings.get(key)
        if old is not None and old.uid == fresh.uid and fresh.older_than(old):
            return  # an earlier state than the answer to this process's own write shows
        if (
            old is not None
            and old.uid == fresh.uid
            and old.generation == fresh.generation
            and old.spec == fresh.spec
        ):
            world.put_binding(
                dataclasses.replace(
                    old, status=fresh.status, resource_version=fresh.resource_version
                )
            )
            if readiness.of_binding(old) != readiness.of_binding(fresh) and self.started:
                # Another replica's status write: lease plans read it.
                self.memo.requeue_pods_in(namespace)
            return
        world.put_binding(fresh)
        if self.started:
            self.queue.put(Work("binding", key))

    def _unfinalize(self, path: str, index: int) -> None:
        """kopf's finalizer of earlier versions goes: nothing of this version needs it, and
        it would hold the object's deletion for ever."""
        self.queue.put(Work("unfinalize", path), index)

    def _on_lease(self, kind: str, key_text: str, lease: LeaseView | None) -> None:
        world = self.memo.world
        namespace, _, name = key_text.partition("/")
        key: Key = (namespace, name)
        if kind == DELETED or lease is None:
            removed = self.watches.leases.previous
            dropped = world.drop_lease(key, removed.uid if removed is not None else None)
            if dropped is not None and dropped.active and self.acting():
                # Deleted while Active, not by this operator (its revocations are Revoked
                # first): only the garbage collector (with the pod that owns it) or the
                # namespace controller may (manifests/lease-policy.yaml). Say so on the pod
                # (the acting replica does: a standby would say it again on taking over).
                self.queue.put(Work("revoked", (key, dropped.uid)), dropped)
            return
        world.put_lease(lease)
        if lease.active and lease.pod_uid in world.pods:
            self.queue.put(Work("lease", key))

    def _on_pod(self, kind: str, _key: str, pod: identity.PodFacts | None) -> None:
        world = self.memo.world
        previous = self.watches.pods.previous
        if previous is not None and (pod is None or previous.uid != pod.uid):
            # Gone, or another incarnation under the same name (a relist after the watch
            # expired shows only the new one): the old one is deleted.
            world.drop_pod(previous.uid)
            gone = Work("pod", previous.uid)
            if world.leases_by_pod.get(previous.uid):
                self.queue.put(gone)  # its leases go
            else:
                self.queue.discard(gone)  # nothing left to do for it
        if kind == DELETED or pod is None:
            return
        # With the cluster's naming: a pod of another control plane or trust domain is not
        # meshed here (its identity is not the one a lease would carry).
        world.put_pod(pod)
        self.queue.put(Work("pod", pod.uid))

    def _on_webhook(self, kind: str, key_text: str, view: WebhookView | None) -> None:
        namespace, _, name = key_text.partition("/")
        key: Key = (namespace, name)
        if kind == DELETED or view is None or view.deleting:
            self.memo.webhooks.forget(key)
        elif self.memo.webhooks.put(view):
            self.queue.put(Work("webhook", key))

    # -- the work ------------------------------------------------------------------------

    async def handle(self, work: Work, data: object) -> None:
        memo = self.memo
        if work.kind == "pod":
            assert isinstance(work.key, str)
            await memo.leases.reconcile_pod(work.key)
        elif work.kind == "lease":
            await self._lease(work.key)
        elif work.kind == "namespace":
            assert isinstance(work.key, str)
            await memo.bindings.refresh_namespace(work.key)
        elif work.kind == "judge":
            assert isinstance(work.key, str)
            await memo.bindings.refresh_namespace(work.key, pods=False)
        elif work.kind == "binding":
            await self._binding(work.key)
        elif work.kind == "bot":
            assert isinstance(work.key, str) and isinstance(data, BotWork)
            await self._bot(work.key, data)
        elif work.kind == "webhook":
            assert isinstance(work.key, tuple)
            await memo.webhooks.check(work.key)
        elif work.kind == "unfinalize":
            assert isinstance(work.key, str) and isinstance(data, int)
            try:
                await memo.writer.remove_finalizer(work.key, data, resources.KOPF_FINALIZER)
            except NotActing:
                pass  # the acting replica removes it
            except Exception:
                # The object may have no further event (being deleted): try again later.
                asyncio.get_running_loop().call_later(UNFINALIZE_AGAIN, self.queue.put, work, data)
                raise
        elif work.kind == "revoked":
            assert isinstance(data, LeaseView)
            await memo.writer.announce_revoked(data, reasons.POD_DELETED)

    async def _lease(self, key: Hashable) -> None:
        """A lease the pod should not hold (written by someone else, or left from before a
        change) goes at once, not at the pod's next event or the lease's renewal. Only for a
        pod already seen: an unseen pod is not a deleted one, and its own event reconciles it.
        """
        assert isinstance(key, tuple)
        memo = self.memo
        lease = memo.world.leases.get(key)
        if lease is None or not lease.active or lease.pod_uid not in memo.world.pods:
            return
        verdicts = readiness.status_verdicts(memo.world, lease.namespace)
        plan = plans.plan_pod(memo.world, lease.pod_uid, memo.naming, verdicts)
        if any(revoked.key == lease.key for revoked, _ in plan.revoke):
            await memo.leases.reconcile_pod(lease.pod_uid)

    async def _binding(self, key: Hashable) -> None:
        assert isinstance(key, tuple)
        memo = self.memo
        await memo.bindings.refresh_namespace(key[0])
        binding = memo.world.bindings.get(key)
        if binding is not None:
            # A shorter credentialTTL shortens live leases now, not at their next renewal.
            await memo.leases.renew(binding)

    async def _bot(self, name: str, work: BotWork) -> None:
        memo = self.memo
        if name not in memo.world.bots:
            return
        if work.check:
            await memo.bots.check(name)
        elif work.tick:
            await memo.bots.check(name, only_if_due=True)
        if work.refresh or work.check:
            # Its bindings judged again. Their pods are planned again only if the bot's spec
            # changed (which namespaces and pods it serves); a check alone changes at most
            # verdicts, and a changed verdict queues its pods when its status is written
            # (``_on_binding``). So a start-up, whose pods are each planned from their own
            # event, plans none twice.
            again = "namespace" if work.refresh else "judge"
            for namespace in sorted(set(memo.world.namespaces_of_bot(name))):
                if Work("namespace", namespace) not in self.queue.waiting:  # it judges too
                    self.queue.put(Work(again, namespace))
        if work.tick:
            for binding in memo.world.bindings_of_bot(name):
                await memo.leases.renew(binding)
                await memo.bindings.write_status(binding)


__all__ = ["TICK", "BotWork", "Controller", "Work", "WorkQueue"]
