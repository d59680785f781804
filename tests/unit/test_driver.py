"""The controller's driver: the shared watches feed the World, the work queue coalesces and
bounds the work, and start-up sweeps only what the first lists prove orphaned (the writer is
replaced by a recorder and the API by a fake of the two calls an informer makes)."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from typing import Any

from phabmesh import identity, resources
from phabmesh.controller import bots as botcheck
from phabmesh.controller.driver import BotWork, Work, WorkQueue
from phabmesh.controller.memo import Memo
from phabmesh.kube import NotFound
from phabmesh.kube.client import JSON
from phabmesh.leases import reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.watches import Watches
from phabmesh.settings import Settings
from tests.fakeapi import FakeAPI

LEASE = "runner.build.serviceaccount.identity.linkerd.cluster.local"


def _pod(uid: str) -> JSON:
    return {
        "metadata": {"name": f"pod-{uid}", "namespace": "build", "uid": uid},
        "spec": {"serviceAccountName": "runner", "containers": [{"name": "linkerd-proxy"}]},
        "status": {"phase": "Running"},
    }


def _lease(pod_uid: str, binding: str = "runners") -> JSON:
    return {
        "metadata": {"name": f"l-{pod_uid}-{binding}", "namespace": "build", "uid": "l" + pod_uid},
        "spec": {
            "podUID": pod_uid,
            "podName": f"pod-{pod_uid}",
            "binding": binding,
            "bot": "ci-bot",
            "identity": LEASE,
        },
        "status": {"phase": "Active", "expiresAt": "2026-01-01T00:15:00Z"},
    }


def _bot(recheck: str | None = None, ready: str = "True") -> JSON:
    meta: dict[str, Any] = {"name": "ci-bot", "generation": 1}
    if recheck is not None:
        meta["annotations"] = {resources.RECHECK_ANNOTATION: recheck}
    return {
        "metadata": meta,
        "spec": {"username": "ci-bot", "tokenSecretRef": {"name": "t"}, "namespaceSelector": {}},
        "status": {
            "phid": "PHID-USER-x",
            "conditions": [{"type": "Ready", "status": ready, "reason": "Verified"}],
        },
    }


def _binding(name: str = "runners") -> JSON:
    return {
        "metadata": {"name": name, "namespace": "build", "uid": "b-" + name, "generation": 1},
        "spec": {
            "botRef": {"name": "ci-bot"},
            "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
            "allowedMethods": ["user.whoami"],
        },
    }


class _Cluster(FakeAPI):
    """Lists what it holds per collection and records the order of the lists; its watches
    stay open and quiet."""

    def __init__(self, objects: Mapping[str, list[JSON]]) -> None:
        super().__init__()
        self.objects = objects
        self.listed: list[str] = []

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        collection = path.rstrip("/").rsplit("/", 1)[-1]
        self.listed.append(collection)
        # Each list at its own version: the later, the higher.
        return [dict(obj) for obj in self.objects.get(collection, [])], str(len(self.listed))


class _Recorder:
    def __init__(self) -> None:
        self.revoked: list[tuple[str, str]] = []
        self.issued: list[str] = []
        self.unfinalized: list[tuple[str, int, str]] = []
        self.statuses: list[str] = []
        self.events: list[tuple[str, str]] = []
        self.acting: Callable[[], bool] | None = None

    async def revoke(self, lease: LeaseView, reason: str, message: str = "") -> None:
        self.revoked.append((lease.name, reason))

    async def issue(self, pod: identity.PodFacts, *args: Any, **kwargs: Any) -> None:
        self.issued.append(pod.uid)

    async def renew(self, lease: LeaseView, ttl: Any) -> None:
        return None

    async def remove_finalizer(self, path: str, index: int, finalizer: str) -> None:
        self.unfinalized.append((path, index, finalizer))

    async def patch_status(self, path: str, status: Any) -> Any:
        await asyncio.sleep(0.01)  # the API server's time: another writer may come meanwhile
        self.statuses.append(path)
        return {"status": status}

    async def event(self, ref: Any, reason: str, *args: Any, **kwargs: Any) -> None:
        self.events.append((ref.get("name"), reason))


class _Bots:
    """Records the checks asked for; each counts as made (its schedule)."""

    def __init__(self) -> None:
        self.checked: list[tuple[str, bool]] = []
        self.schedules: dict[str, botcheck.Schedule] = {}

    async def check(self, name: str, *, only_if_due: bool = False) -> None:
        self.checked.append((name, only_if_due))
        self.schedules[name] = botcheck.Schedule(last_at=datetime.datetime.now(datetime.UTC))

    def forget(self, name: str) -> None:
        return None


def _controller(objects: Mapping[str, list[JSON]]) -> tuple[Memo, _Cluster, _Recorder]:
    cluster = _Cluster(objects)
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    watches = Watches(cluster, memo.naming, namespace="phabmesh-system")  # type: ignore[arg-type]
    memo.use_watches(watches)
    recorder = _Recorder()
    memo.writer = recorder  # type: ignore[assignment]
    memo.bots = _Bots()  # type: ignore[assignment]  # no Phabricator: checks recorded
    return memo, cluster, recorder


async def _started(memo: Memo) -> int:
    loops = [asyncio.create_task(loop()) for loop in memo.watches.tasks().values()]
    try:
        return await asyncio.wait_for(memo.controller.start(), timeout=10)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def _drain(memo: Memo) -> list[Work]:
    """Handle the waiting work in this task, in order (what the workers would do)."""
    queue, done = memo.controller.queue, []
    while queue.order:
        work = queue.order.popleft()
        data = queue.waiting.pop(work)
        await memo.controller.handle(work, data)
        done.append(work)
    return done


CLUSTER = {
    "namespaces": [{"metadata": {"name": "build"}}],
    "phabricatorbots": [_bot()],
    "phabricatorbindings": [_binding()],
    "phabricatorcredentials": [_lease("p1"), _lease("gone")],
    "pods": [_pod("p1"), _pod("p2")],
}


async def test_start_up_lists_leases_before_pods_and_sweeps_only_orphans_of_the_first_list() -> (
    None
):
    memo, cluster, recorder = _controller(CLUSTER)
    swept = await _started(memo)
    leases, pods = cluster.listed.index("phabricatorcredentials"), cluster.listed.index("pods")
    assert leases < pods
    # The pods' list a consistent read, so newer than the lease list; not "not older than"
    # the lease list's version, which a quiet pods' watch cache does not reach (the API
    # server holds such a list 3 s, then refuses it). Every first list is consistent.
    assert set(cluster.listed_from) == {""}
    assert swept == 1
    assert recorder.revoked == [("l-gone-runners", reasons.POD_GONE)]
    # The World holds what the watches listed.
    assert set(memo.world.pods) == {"p1", "p2"}
    assert ("build", "runners") in memo.world.bindings
    # Nothing was handled before start; every pod's work waits for the workers.
    pods = {w.key for w in memo.controller.queue.order if w.kind == "pod"}
    assert pods == {"p1", "p2"}
    await _drain(memo)
    # The binding's verdict written in its status (after the bot's check), and the pods
    # planned from it: p1 holds its lease already.
    assert recorder.statuses == [resources.binding_path("build", "runners")]
    assert set(recorder.issued) == {"p2"}


async def test_a_lease_seen_after_the_first_list_is_never_swept() -> None:
    memo, _, recorder = _controller(CLUSTER)
    await _started(memo)
    # A lease written after start-up whose pod's event is not in yet.
    memo.watches.leases._put("ADDED", "build/l-p3-runners", _lease("p3"))
    assert await memo.leases.sweep([]) == 0
    await _drain(memo)
    assert ("l-p3-runners", reasons.POD_GONE) not in recorder.revoked


async def test_a_deleted_pod_is_dropped_from_the_world_and_reconciled() -> None:
    memo, _, recorder = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    memo.watches.pods._drop("build/pod-p1")
    assert "p1" not in memo.world.pods
    assert [w for w in memo.controller.queue.order] == [Work("pod", "p1")]
    await _drain(memo)
    assert ("l-p1-runners", reasons.POD_DELETED) in recorder.revoked


async def test_a_new_recheck_annotation_checks_the_bot_now() -> None:
    memo, _, _ = _controller(CLUSTER)
    bots = memo.bots
    assert isinstance(bots, _Bots)
    await _started(memo)
    await _drain(memo)
    assert bots.checked == [("ci-bot", False)]  # first seen: checked
    informer = memo.watches.bots
    informer._put("MODIFIED", "ci-bot", _bot(ready="False"))  # the operator's own status write
    await _drain(memo)
    assert bots.checked == [("ci-bot", False)]
    informer._put("MODIFIED", "ci-bot", _bot("2026-06-01T10:00:00.000001+00:00"))
    await _drain(memo)
    assert bots.checked == [("ci-bot", False), ("ci-bot", False)]
    assert memo.world.bots["ci-bot"].recheck == "2026-06-01T10:00:00.000001+00:00"
    informer._put("MODIFIED", "ci-bot", _bot("2026-06-01T10:00:00.000001+00:00"))  # once
    await _drain(memo)
    assert len(bots.checked) == 2
    # Its readiness is what the status of the last event says.
    assert memo.world.bots["ci-bot"].ready is True


async def test_a_binding_marked_for_deletion_is_as_good_as_deleted() -> None:
    memo, _, recorder = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    deleting = _binding()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    memo.watches.bindings._put("MODIFIED", "build/runners", deleting)
    assert ("build", "runners") not in memo.world.bindings
    await _drain(memo)
    assert ("l-p1-runners", reasons.BINDING_DELETED) in recorder.revoked


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(400):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the workers did not get there")


async def test_the_queue_coalesces_an_objects_work_and_never_runs_it_twice_at_once() -> None:
    running: set[Work] = set()
    seen: list[tuple[Work, object]] = []
    release = asyncio.Event()

    async def handle(work: Work, data: object) -> None:
        assert work not in running  # one worker per object at a time
        running.add(work)
        seen.append((work, data))
        await release.wait()
        running.discard(work)

    def merge(old: object, new: object) -> object:
        assert isinstance(old, BotWork) and isinstance(new, BotWork)
        return BotWork(old.check or new.check, old.tick or new.tick, old.refresh or new.refresh)

    queue = WorkQueue(handle, workers=4)
    bot = Work("bot", "ci-bot")
    queue.put(bot, BotWork(check=True), merge)
    queue.put(bot, BotWork(tick=True), merge)  # merged into the waiting work
    for uid in ("p1", "p1", "p2"):
        queue.put(Work("pod", uid))
    assert len(queue) == 3
    workers = asyncio.create_task(queue.run())
    for _ in range(5):
        await asyncio.sleep(0)  # not open: nothing taken (the workers are waiting)
    assert seen == []
    queue.open()
    await _until(lambda: len(seen) >= 3)
    assert (bot, BotWork(check=True, tick=True)) in seen
    queue.put(bot, BotWork(refresh=True), merge)  # while it is handled: after, not beside
    release.set()
    await _until(lambda: len(seen) >= 4)
    assert seen[-1] == (bot, BotWork(refresh=True))
    assert queue.handled >= 3
    workers.cancel()
    await asyncio.gather(workers, return_exceptions=True)


async def test_a_paused_replica_takes_no_work_until_it_acts() -> None:
    acting = False
    handled: list[Work] = []

    async def handle(work: Work, data: object) -> None:
        handled.append(work)

    queue = WorkQueue(handle, workers=2, may_run=lambda: acting)
    queue.open()
    queue.put(Work("pod", "p1"))
    workers = asyncio.create_task(queue.run())
    await asyncio.sleep(0.05)
    assert handled == []
    acting = True
    await _until(lambda: bool(handled))
    assert handled == [Work("pod", "p1")]
    workers.cancel()
    await asyncio.gather(workers, return_exceptions=True)


async def test_a_failing_work_is_counted_and_the_worker_goes_on() -> None:
    handled: list[Work] = []

    async def handle(work: Work, data: object) -> None:
        if work.key == "bad":
            raise ValueError("a fault of our own")
        handled.append(work)

    queue = WorkQueue(handle, workers=1)
    queue.open()
    queue.put(Work("pod", "bad"))
    queue.put(Work("pod", "good"))
    workers = asyncio.create_task(queue.run())
    await _until(lambda: bool(handled))
    assert handled == [Work("pod", "good")]
    workers.cancel()
    await asyncio.gather(workers, return_exceptions=True)


async def test_kopfs_finalizer_of_earlier_versions_is_taken_off_bots_and_bindings() -> None:
    bot = _bot()
    bot["metadata"]["finalizers"] = [resources.KOPF_FINALIZER]
    held = _binding("held")
    held["metadata"]["finalizers"] = ["example.com/hold", resources.KOPF_FINALIZER]
    held["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    memo, _, recorder = _controller({**CLUSTER, "phabricatorbots": [bot],
                                     "phabricatorbindings": [_binding(), held]})  # fmt: skip
    await _started(memo)
    await _drain(memo)
    assert sorted(recorder.unfinalized) == [
        (resources.binding_path("build", "held"), 1, resources.KOPF_FINALIZER),
        (resources.bot_path("ci-bot"), 0, resources.KOPF_FINALIZER),
    ]
    assert ("build", "held") not in memo.world.bindings  # being deleted: as good as gone


async def test_a_pod_recreated_under_its_name_drops_the_old_incarnation() -> None:
    """A relist after the watch expired shows only the new pod of that name: the old one is
    gone from the World and its work (revoking its lease) is queued."""
    memo, _, recorder = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    again = _pod("p1")
    again["metadata"]["uid"] = "p1-again"
    memo.watches.pods._put("MODIFIED", "build/pod-p1", again)
    assert "p1" not in memo.world.pods and "p1-again" in memo.world.pods
    assert {w.key for w in memo.controller.queue.order} == {"p1", "p1-again"}
    await _drain(memo)
    assert ("l-p1-runners", reasons.POD_DELETED) in recorder.revoked


async def test_a_standby_takes_over_with_the_leaders_bot_readiness_and_revokes_nothing() -> None:
    """A standby never checks a bot: it takes readiness from the status the acting replica
    writes, and plans leases from the bindings' status that replica wrote, so a live lease
    is not revoked "BotNotReady" for a bot it saw unchecked at its first list."""
    unchecked = _bot()
    del unchecked["status"]
    memo, _, recorder = _controller({**CLUSTER, "phabricatorbots": [unchecked]})
    acting = False
    memo.acting = lambda: acting
    await _started(memo)
    assert not memo.world.bots["ci-bot"].ready  # not checked yet, at the first list
    memo.watches.bots._put("MODIFIED", "ci-bot", _bot())  # the leader verified it
    assert memo.world.bots["ci-bot"].ready
    workers = asyncio.create_task(memo.controller.queue.run())
    try:
        await asyncio.sleep(0.05)
        assert recorder.revoked == [("l-gone-runners", reasons.POD_GONE)]  # the sweep only
        acting = True
        await _until(lambda: not memo.controller.queue.order and not memo.controller.queue.busy)
    finally:
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)
    assert not any(name == "l-p1-runners" for name, _ in recorder.revoked), recorder.revoked


async def test_the_sweep_takes_the_leases_listed_before_the_pods_not_later_ones() -> None:
    """The leases the sweep may revoke are those the lease list held when the pods were
    listed after it; one written later (its pod not yet seen) is not among them."""
    memo, _, recorder = _controller(CLUSTER)
    loops = [asyncio.create_task(loop()) for loop in memo.watches.tasks().values()]
    try:
        await asyncio.wait_for(memo.watches.wait_synced(), timeout=10)
        # A lease that came on the watch after the first lists (another replica issued it
        # for a pod this one has not seen yet), before the controller's start ran.
        memo.watches.leases._put("ADDED", "build/l-p3-runners", _lease("p3"))
        await asyncio.wait_for(memo.controller.start(), timeout=10)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert recorder.revoked == [("l-gone-runners", reasons.POD_GONE)]


async def test_a_standby_queues_no_revocation_event_and_forgets_pods_that_hold_nothing() -> None:
    memo, _, _ = _controller(CLUSTER)
    memo.acting = lambda: False
    await _started(memo)
    queue = memo.controller.queue
    waiting = len(queue)
    for i in range(100):  # pods that came and went while it stood by, holding no lease
        memo.watches.pods._put("ADDED", f"build/pod-x{i}", _pod(f"x{i}"))
        memo.watches.pods._drop(f"build/pod-x{i}")
    memo.watches.leases._drop("build/l-p1-runners")  # deleted while Active (by the GC)
    assert not any(w.kind == "revoked" for w in queue.waiting)  # the acting one says it
    assert len(queue) <= waiting + 1


async def test_a_cluster_without_the_webhook_crd_still_starts_and_serves_leases() -> None:
    class _NoWebhookCRD(_Cluster):
        async def list_all(
            self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
        ) -> tuple[list[JSON], str]:
            if path.endswith("/phabricatorwebhooks"):
                raise NotFound(404, "NotFound", "the server could not find the requested resource")
            return await super().list_all(path, params, chunk)

    memo = Memo(Settings.local("http://127.0.0.1:9"))
    memo.use_watches(Watches(_NoWebhookCRD(CLUSTER), memo.naming, namespace="phabmesh-system"))  # type: ignore[arg-type]
    recorder = _Recorder()
    memo.writer = recorder  # type: ignore[assignment]
    memo.bots = _Bots()  # type: ignore[assignment]
    assert await _started(memo) == 1
    assert not memo.watches.webhooks.healthy
    await _drain(memo)
    assert set(recorder.issued) == {"p2"}


async def test_two_status_writes_of_a_binding_at_once_write_and_say_it_once() -> None:
    """The bot's periodic pass and a namespace's work may write one binding's status at the
    same time: the second compares with what the first wrote (one write, one Ready Event)."""
    memo, _, recorder = _controller(CLUSTER)
    await _started(memo)
    binding = memo.world.bindings[("build", "runners")]
    await asyncio.gather(memo.bindings.write_status(binding), memo.bindings.write_status(binding))
    assert recorder.events == [("runners", "Ready")]
    assert len(recorder.statuses) == 1
