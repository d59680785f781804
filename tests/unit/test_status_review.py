"""The controller's reconcilers talking through the API's objects (a bot's readiness is what
its status says, a binding's verdict is written in its status, lease plans read it): cases
where that leaves a lease issued late, a revocation undone or never made, or a lease issued
by a verdict the World already knows is stale.

The shared watches run on a fake of the two calls an informer makes; the writer is a
recorder whose status writes answer with the object as an API server would (its status and
a new resourceVersion), and fail where a test says; Phabricator's answer is injected.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Mapping
from typing import Any

from phabmesh import identity, resources
from phabmesh.controller import bots as botcheck
from phabmesh.controller import reconcilers
from phabmesh.controller.driver import TICK, BotWork, Work
from phabmesh.controller.memo import Memo
from phabmesh.kube.client import JSON, Unavailable
from phabmesh.leases import reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.watches import Watches
from phabmesh.leases.world import BotView
from phabmesh.settings import Settings
from tests.fakeapi import FakeAPI
from tests.unit.test_driver import _lease as driver_lease
from tests.unit.test_driver import _pod

VERIFIED = botcheck.Outcome("True", botcheck.VERIFIED, "user ci-bot", phid="PHID-USER-x")
REVOKED = botcheck.Outcome("False", botcheck.TOKEN_INVALID, "Phabricator does not accept it")


def _lease(pod_uid: str, binding: str = "runners") -> JSON:
    """The driver tests' lease, with a resourceVersion and a uid of its own."""
    body = driver_lease(pod_uid, binding)
    body["metadata"].update(uid=f"l-{pod_uid}-{binding}", resourceVersion="1")
    return body


def _bot(*, status: bool = True, version: str = "1", recheck: str = "") -> JSON:
    meta: dict[str, Any] = {
        "name": "ci-bot",
        "generation": 1,
        "uid": "bot-1",
        "resourceVersion": version,
    }
    if recheck:
        meta["annotations"] = {resources.RECHECK_ANNOTATION: recheck}
    body: JSON = {
        "metadata": meta,
        "spec": {"username": "ci-bot", "tokenSecretRef": {"name": "t"}, "namespaceSelector": {}},
    }
    if status:
        body["status"] = {
            "phid": "PHID-USER-x",
            "observedGeneration": 1,
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Verified", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1},
            ],
        }  # fmt: skip
    return body


def _binding(name: str = "runners") -> JSON:
    return {
        "metadata": {
            "name": name,
            "namespace": "build",
            "uid": "b-" + name,
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": {
            "botRef": {"name": "ci-bot"},
            "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
            "allowedMethods": ["user.whoami"],
        },
    }


class _Cluster(FakeAPI):
    def __init__(self, objects: Mapping[str, list[JSON]]) -> None:
        super().__init__()
        self.objects = objects

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        collection = path.rstrip("/").rsplit("/", 1)[-1]
        return [dict(obj) for obj in self.objects.get(collection, [])], "1"


class _Writer:
    """Records lease writes; a status write answers with the object as the API server then
    holds it (its status, a new resourceVersion), or fails, as the client does once its own
    retries are spent, while ``failing(path)`` says so."""

    def __init__(self) -> None:
        self.revoked: list[tuple[str, str]] = []
        self.issued: list[str] = []
        self.statuses: list[tuple[str, JSON]] = []
        self.failing: Callable[[str], bool] = lambda path: False
        self.versions = iter(str(n) for n in range(100, 10_000))  # the API's, for all objects
        self.acting: Callable[[], bool] | None = None

    def version(self) -> str:
        """The resourceVersion of a change made now (by someone else)."""
        return next(self.versions)

    async def revoke(self, lease: LeaseView, reason: str, message: str = "") -> None:
        self.revoked.append((lease.name, reason))

    async def delete_revoked(self, lease: LeaseView) -> None:
        return None

    async def issue(self, pod: identity.PodFacts, *args: Any, **kwargs: Any) -> None:
        self.issued.append(pod.uid)

    async def renew(self, lease: LeaseView, ttl: Any) -> None:
        return None

    async def remove_finalizer(self, path: str, index: int, finalizer: str) -> None:
        return None

    async def patch_status(self, path: str, status: JSON) -> JSON:
        await asyncio.sleep(0)
        if self.failing(path):
            # What the client raises once its own retries are spent (an API server restart).
            raise Unavailable(503, "ServiceUnavailable", "the API server is not ready")
        self.statuses.append((path, status))
        return {"metadata": {"resourceVersion": next(self.versions)}, "status": status}

    async def event(self, ref: Any, reason: str, *args: Any, **kwargs: Any) -> None:
        return None


class _Phabricator(reconcilers.Bots):
    """The real bot reconciler; only Phabricator's answer is injected (``outcome``), and
    ``during`` runs while Phabricator is being asked (an event that comes meanwhile)."""

    outcome = VERIFIED
    during: Callable[[], None] = staticmethod(lambda: None)

    async def _check(self, bot: BotView, secret: Any) -> botcheck.Outcome:
        self.during()
        return self.outcome


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


def _controller(
    objects: Mapping[str, list[JSON]],
) -> tuple[Memo, _Writer, _Phabricator, _Clock]:
    clock = _Clock()
    memo = Memo(Settings.local("http://127.0.0.1:9"), clock=clock)
    memo.use_watches(Watches(_Cluster(objects), memo.naming, namespace="phabmesh-system"))  # type: ignore[arg-type]
    writer = _Writer()
    memo.writer = writer  # type: ignore[assignment]
    bots = _Phabricator(memo)
    memo.bots = bots
    return memo, writer, bots, clock


async def _started(memo: Memo) -> None:
    loops = [asyncio.ensure_future(loop()) for loop in memo.watches.tasks().values()]
    try:
        await asyncio.wait_for(memo.controller.start(), timeout=10)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


async def _drain(memo: Memo) -> list[Work]:
    """The waiting work handled in order, as the workers would: a work that fails is
    logged and dropped (WorkQueue._worker), the others go on."""
    queue, failed = memo.controller.queue, []
    while queue.order:
        work = queue.order.popleft()
        data = queue.waiting.pop(work)
        try:
            await memo.controller.handle(work, data)
        except Exception:
            failed.append(work)
    return failed


def _merge(old: object, new: object) -> object:
    assert isinstance(old, BotWork) and isinstance(new, BotWork)
    return BotWork(old.check or new.check, old.tick or new.tick, old.refresh or new.refresh)


async def _ticks(memo: Memo, clock: _Clock, seconds: float) -> None:
    """The periodic pass (Controller.ticks) over every bot, for ``seconds`` of the clock."""
    for _ in range(int(seconds / TICK)):
        clock.now += datetime.timedelta(seconds=TICK)
        for name in list(memo.world.bots):
            memo.controller.queue.put(Work("bot", name), BotWork(tick=True), _merge)
        await _drain(memo)


def _recheck(memo: Memo, writer: _Writer) -> None:
    """`kubectl phabmesh recheck ci-bot`: the annotation's event, with the bot's status as
    the cluster holds it."""
    body = _bot(version=writer.version(), recheck="now")
    body["status"] = dict(memo.world.bots["ci-bot"].status)
    memo.watches.bots._put("MODIFIED", "ci-bot", body)


def _pod_changed(memo: Memo, uid: str) -> None:
    """Any update of the pod (a status change, a label): its work is queued."""
    memo.watches.pods._put("MODIFIED", f"build/pod-{uid}", _pod(uid))


CLUSTER: dict[str, list[JSON]] = {
    "namespaces": [{"metadata": {"name": "build"}}],
    "phabricatorbots": [_bot()],
    "phabricatorbindings": [_binding()],
    "phabricatorcredentials": [_lease("p1")],
    "pods": [_pod("p1"), _pod("p2")],
}


# -- 1. A bot check whose status write fails: its outcome is lost until the next recheck ----


async def test_a_failed_bot_status_write_loses_the_checks_outcome_until_the_recheck_interval() -> (
    None
):
    """A new bot verified by Phabricator, its status write failing once (the API server
    unavailable past the client's retries): the check counts as made (Schedule.record runs
    before the write), so no tick checks it again before bot_recheck_interval (300 s); the
    World goes by the status, which still says NotChecked, so for a minute of ticks and pod
    events no pod gets a lease."""
    memo, writer, _, clock = _controller(
        {**CLUSTER, "phabricatorbots": [_bot(status=False)], "phabricatorcredentials": []}
    )
    failures = iter([True])
    writer.failing = lambda path: path == resources.bot_path("ci-bot") and next(failures, False)
    await _started(memo)
    await _drain(memo)
    await _ticks(memo, clock, 60)
    _pod_changed(memo, "p2")
    await _drain(memo)
    assert memo.world.bots["ci-bot"].ready, "the verified bot is still NotChecked a minute on"
    assert "p2" in writer.issued


# -- 2. ... and a revoked token's leases stay live as long --------------------------------


async def test_a_failed_bot_status_write_keeps_a_revoked_tokens_leases_live() -> None:
    """Phabricator says the token is revoked; that status write fails: the World keeps
    the status's Ready, and no tick rechecks the bot for 300 s, so p1's lease is not revoked
    within a minute of ticks and pod events (before, the check's outcome judged the bindings
    before the write, and the pod's next reconcile revoked it)."""
    memo, writer, bots, clock = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    assert not [name for name, _ in writer.revoked]
    bots.outcome = REVOKED
    writer.failing = lambda path: path == resources.bot_path("ci-bot")
    _recheck(memo, writer)
    await _drain(memo)
    writer.failing = lambda path: False  # the API server is well again
    await _ticks(memo, clock, 60)
    _pod_changed(memo, "p1")
    await _drain(memo)
    assert ("l-p1-runners", reasons.BOT_LOST) in writer.revoked


# -- 3. A binding status write that fails stops the namespace's pods being planned ---------


async def test_a_failed_binding_status_write_leaves_a_deleted_bots_leases_active() -> None:
    """The bot is deleted: the namespace's work writes each binding's status first and only
    then queues its pods; the status write fails, so the pods are never planned, and no tick
    covers a bot that is gone: p1's lease of the deleted bot stays Active."""
    memo, writer, _, clock = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    writer.failing = lambda path: path == resources.binding_path("build", "runners")
    memo.watches.bots._drop("ci-bot")
    await _drain(memo)
    writer.failing = lambda path: False
    await _ticks(memo, clock, 60)
    assert ("l-p1-runners", reasons.BOT_GONE_HERE) in writer.revoked


async def test_a_failed_status_write_of_a_sibling_binding_keeps_a_deleted_bindings_leases() -> None:
    """Binding "runners" is deleted; the namespace's work first writes the status of the
    namespace's other binding ("others", whose activeCredentials moved since its last
    write), which fails once. The pods are never queued; the ticks that follow write that
    status (no change of readiness, so no pod is queued either) and renew only the leases of
    bindings that exist: p1's lease of the deleted binding is never revoked."""
    memo, writer, _, clock = _controller(
        {**CLUSTER, "phabricatorbindings": [_binding(), _binding("others")]}
    )
    await _started(memo)
    await _drain(memo)
    assert "p2" in writer.issued
    memo.watches.leases._put("ADDED", "build/l-p2-others", _lease("p2", "others"))
    await _drain(memo)
    failures = iter([True])
    writer.failing = lambda path: (
        path == resources.binding_path("build", "others") and next(failures, False)
    )
    memo.watches.bindings._drop("build/runners")
    await _drain(memo)
    await _ticks(memo, clock, 60)
    assert ("l-p1-runners", reasons.BINDING_DELETED) in writer.revoked


# -- 4. A pod planned between the bot's status answer and its bindings' status write ----------


async def test_a_pod_planned_before_its_bindings_status_write_gets_a_revoked_bots_lease() -> None:
    """The acting replica's check finds the token revoked and writes the bot's status: the
    World knows the bot is not Ready, and the namespace's work is queued behind a pod's
    work that came meanwhile. That pod is planned from the binding's status, still Ready:
    it is issued a lease of a bot known revoked (then revoked again by the namespace's work).
    Before, the check's outcome judged the bindings before any pod was planned."""
    memo, writer, bots, _ = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    bots.outcome = REVOKED
    bots.during = lambda: memo.watches.pods._put("ADDED", "build/pod-p3", _pod("p3"))
    _recheck(memo, writer)
    await _drain(memo)
    assert not memo.world.bots["ci-bot"].ready
    assert "p3" not in writer.issued


# -- 5. An earlier event after the status write's answer -----------------------------------


async def test_an_earlier_bot_event_never_undoes_the_status_answer() -> None:
    """An event older than the answer to the operator's own status write (a label added while
    Phabricator was asked) comes after that answer: it is ignored, so the bot, just verified,
    is not NotChecked again and p1's live lease is kept. resourceVersions are compared as
    integers (Kubernetes' comparable resource versions, KEP-5504, stable since 1.35): "99"
    is older than "100", which a comparison of the strings would get wrong."""
    unchecked = _bot(status=False, version="99")
    memo, writer, bots, _ = _controller({**CLUSTER, "phabricatorbots": [unchecked]})
    writer.versions = iter(str(n) for n in range(100, 10_000))
    late: list[JSON] = []
    labelled = _bot(status=False, version="99")
    labelled["metadata"]["labels"] = {"team": "ci"}
    bots.during = lambda: late.append(labelled)
    await _started(memo)
    await _drain(memo)
    assert memo.world.bots["ci-bot"].ready
    memo.watches.bots._put("MODIFIED", "ci-bot", late[0])
    await _drain(memo)
    assert not [r for r in writer.revoked if r[0] == "l-p1-runners"], writer.revoked
    assert memo.world.bots["ci-bot"].ready, "the answer to the status write was undone"


# -- 6. A status write from a view the tick took before the binding's spec changed ---------


async def test_a_ticks_stale_binding_view_writes_its_status_back_to_an_older_generation() -> None:
    """The bot's periodic pass takes its bindings' views, renews their leases (awaiting the
    API), then writes each one's status from the view it took. Meanwhile the binding's spec
    changed (generation 2) and its status was written for it; the pass then writes the
    status judged from generation 1 over it: observedGeneration goes back to 1, the binding
    has no verdict for its generation, and lease plans issue nothing by it until the next
    pass writes it again (Bindings.write_status does not take the binding as the World
    holds it under its lock). The race is older than this change; that lease plans now go
    by the status it leaves is new."""
    memo, writer, _, _ = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    taken = memo.world.bindings[("build", "runners")]  # the pass's view, generation 1
    edited = _binding()
    edited["metadata"].update(generation=2, resourceVersion=writer.version())
    edited["spec"]["credentialTTL"] = "10m"
    memo.watches.bindings._put("MODIFIED", "build/runners", edited)
    await _drain(memo)
    assert writer.statuses[-1][1]["observedGeneration"] == 2
    await memo.bindings.write_status(taken)  # the pass goes on with the view it took
    shown = memo.world.bindings[("build", "runners")]
    assert shown.status.get("observedGeneration") == 2, shown.status


# -- 7. Pods queued again by a status change: a lease whose pod is not seen yet is revoked ---


async def test_a_status_change_requeue_revokes_the_lease_of_a_pod_not_seen_yet() -> None:
    """After a failover, the lease watch shows a lease the previous replica issued for a pod
    the pod watch has not shown yet (two watches, each with its own lag). A binding status
    written by another replica (its event, readiness changed) queues every pod "holding a
    lease there" (Memo.requeue_pods_in): that pod's work finds no pod and revokes its live
    lease PodDeleted, where the lease's own work (Controller._lease) leaves an unseen pod
    alone. The namespace refresh did the same before this change; every status answer and
    every other replica's status event now reaches it too."""
    memo, writer, _, _ = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    memo.watches.leases._put("ADDED", "build/l-p3-runners", _lease("p3"))
    await _drain(memo)
    assert not [r for r in writer.revoked if r[0] == "l-p3-runners"]
    shown = memo.world.bindings[("build", "runners")].status
    body = _binding()
    body["metadata"]["resourceVersion"] = writer.version()
    body["status"] = {
        **shown,
        "conditions": [
            {**c, "message": "judged by the other replica"} if c["type"] == "Ready" else c
            for c in shown["conditions"]
        ],
    }
    memo.watches.bindings._put("MODIFIED", "build/runners", body)
    await _drain(memo)
    assert ("l-p3-runners", reasons.POD_DELETED) not in writer.revoked


async def test_a_namespace_whose_status_write_failed_has_its_work_queued_again() -> None:
    """A binding's status write that fails (a bot with no periodic pass: deleted) is not left
    for a later event: the namespace's work is queued again, backing off, and writes it."""
    memo, writer, _, _ = _controller(CLUSTER)
    await _started(memo)
    await _drain(memo)
    writer.failing = lambda path: path == resources.binding_path("build", "runners")
    memo.watches.bots._drop("ci-bot")
    await _drain(memo)
    assert memo.bindings.retries.pending == 1
    writer.failing = lambda path: False
    await asyncio.gather(*memo.bindings.retries._pending.values())  # its backoff, then queued
    assert Work("namespace", "build") in memo.controller.queue.waiting
    written = len(writer.statuses)
    await _drain(memo)
    assert len(writer.statuses) == written + 1  # the binding's status, BotNotAllowed now
    assert memo.bindings.retries.attempts("build") == 0
