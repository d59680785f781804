"""The controller's reconcilers, one per concern, each with only its own state.

- :class:`Bots`: each bot's check against Phabricator (when due) and its status;
- :class:`Bindings`: each binding's verdict (Ready, BotReady), written in its status;
- :class:`Leases`: which leases each pod holds: issue, renew, revoke, retries of the
  writes that failed, and the start-up sweep of leases whose pods went meanwhile.

Each gathers from the World (kept by watch events and by the API's answers to this
process's own writes), decides with a pure policy (:mod:`phabmesh.controller.bots`,
:mod:`phabmesh.leases.plans`, :mod:`phabmesh.leases.readiness`), and writes (through the
:class:`~phabmesh.controller.writer.Writer`) only what changed against the object as the
cluster last showed it. The shared parts (settings, World, clients, writer) are the
:class:`~phabmesh.controller.memo.Memo`'s.

They talk only through the API's objects, as the endpoint and ``kubectl phabmesh`` do: a
bot's readiness is what its status says, a binding's verdict is judged from that and
written in the binding's status, and a pod's leases are planned from the bindings' status.
A change one of them writes asks for the others' work through the work queue
(``Memo.requeue_*``), never by calling them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from phabmesh import identity, logs, metrics, resources
from phabmesh.clock import format_time
from phabmesh.controller import bots as botcheck
from phabmesh.controller.retry import Retries
from phabmesh.kube import Conflict, KubeError
from phabmesh.kube.client import JSON
from phabmesh.leases import plans, readiness, reasons
from phabmesh.leases.world import NOT_CHECKED, BindingView, BotView, Key, World, conditions_of
from phabmesh.resources import binding_path, bot_path

if TYPE_CHECKING:
    from phabmesh import conduit
    from phabmesh.controller.memo import Memo
    from phabmesh.controller.writer import Writer
    from phabmesh.kube import KubeClient
    from phabmesh.leases.watches import SecretToken
    from phabmesh.settings import Settings

log = structlog.get_logger(__name__)


def changed(wanted: JSON, shown: Any) -> bool:
    """Whether writing ``wanted`` would change the status the cluster shows (a field set to
    None is one the write removes)."""
    return any(shown.get(key) != value for key, value in wanted.items())


class _Reconciler:
    """The shared parts: the World and the naming, made with the memo and never replaced,
    are kept; the rest is read from the memo when used (tests replace the writer)."""

    def __init__(self, memo: Memo) -> None:
        self.memo = memo
        self.world: World = memo.world  # read for every pod: not through the memo's lookup
        self.naming: identity.Naming = memo.naming

    @property
    def settings(self) -> Settings:
        return self.memo.settings

    @property
    def writer(self) -> Writer:
        return self.memo.writer

    @property
    def client(self) -> KubeClient:
        return self.memo.client

    @property
    def conduit(self) -> conduit.ConduitClient:
        return self.memo.conduit

    def clock(self) -> datetime.datetime:
        return self.memo.clock()


class Bots(_Reconciler):
    """Bot checks: due by generation, Secret version and interval; status and Events."""

    def __init__(self, memo: Memo) -> None:
        super().__init__(memo)
        self.schedules: dict[str, botcheck.Schedule] = {}

    def forget(self, name: str) -> None:
        self.schedules.pop(name, None)

    @property
    def secrets(self) -> dict[str, SecretToken]:
        return self.memo.secrets.items

    async def check(self, name: str, *, only_if_due: bool = False) -> None:
        bot = self.world.bots.get(name)
        if bot is None:
            return
        now = self.clock()
        schedule = self.schedules.setdefault(name, botcheck.Schedule())
        secret = (
            self.secrets.get(f"{self.settings.namespace}/{bot.spec.token_secret_ref.name}")
            if bot.spec
            else None
        )
        version = secret.version if secret else None
        interval = datetime.timedelta(seconds=self.settings.bot_recheck_interval)
        if only_if_due and not schedule.due(now, bot.generation, version, interval):
            return
        outcome = await self._check(bot, secret)
        metrics.current().bot_checked(outcome.ready, outcome.reason)
        try:
            await self._record_bot(bot, outcome)
        except BaseException:
            # Its status not written (refused, or deferred: not acting): due again at the
            # next pass, not a recheck interval after an earlier check.
            schedule.last_at = None
            raise
        schedule.record(now, bot.generation, version, outcome)

    async def _check(self, bot: BotView, secret: SecretToken | None) -> botcheck.Outcome:
        if bot.spec is None:
            return botcheck.Outcome("False", botcheck.INVALID_SPEC, "spec could not be read")
        ref = bot.spec.token_secret_ref
        if secret is None:
            return botcheck.Outcome(
                "False",
                botcheck.SECRET_MISSING,
                f'Secret "{ref.name}" not found in namespace "{self.settings.namespace}"',
            )
        token = secret.data.get(ref.key)
        if not token:
            return botcheck.Outcome(
                "False", botcheck.SECRET_KEY_MISSING, f'Secret "{ref.name}" has no key "{ref.key}"'
            )
        return await asyncio.to_thread(botcheck.check, self.conduit, bot.spec.username, token)

    async def _record_bot(self, bot: BotView, outcome: botcheck.Outcome) -> None:
        now = self.clock()
        previous = self.world.bots.get(bot.name)
        shown = previous or bot  # the status as the cluster last showed it
        phid = outcome.phid or (bot.phid if outcome.status == "Unknown" else None)
        conditions = conditions_of(shown.status)
        new_conditions = resources.set_condition(
            conditions,
            resources.Condition.new(
                resources.READY,
                outcome.status,  # type: ignore[arg-type]  # "True", "False" or "Unknown"
                outcome.reason,
                outcome.message,
                bot.generation,
            ),
            now,
        )
        if outcome.status != "Unknown":  # a definite answer; an outage leaves the last one
            new_conditions = resources.set_condition(
                new_conditions,
                resources.Condition.new(
                    resources.TOKEN_VERIFIED,
                    outcome.status,  # type: ignore[arg-type]  # "True" or "False"
                    outcome.reason,
                    outcome.message,
                    bot.generation,
                ),
                now,
            )
        dumped = [c.model_dump(by_alias=True, mode="json") for c in new_conditions]
        metrics.current().bot_status(bot.name, outcome.ready, outcome.reason)
        # Its readiness is what the status says once written (resources.bot_usable: Unknown,
        # Phabricator unreachable, keeps a verified bot usable; leases are revoked for a
        # definite "no", not for an outage), so that every replica, the endpoint and a
        # restarted operator judge the same; the bindings are judged from it.
        status: JSON = {
            "phid": phid,
            "observedGeneration": bot.generation,
            "conditions": dumped,
        }
        if changed(status, shown.status):
            written = await self.writer.patch_status(
                bot_path(bot.name), {**status, "lastCheckedAt": format_time(now)}
            )
            self._saw_bot(bot.name, written)
        old_ready = next((c for c in conditions if c.type == resources.READY), None)
        if old_ready is None or old_ready.reason != outcome.reason:
            log.info(
                "bot_checked",
                **{logs.BOT: bot.name, logs.REASON: outcome.reason, "status": outcome.status},
            )
            await self.writer.event(
                {
                    "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
                    "kind": resources.BOT_KIND,
                    "name": bot.name,
                    "uid": bot.uid,
                },
                outcome.reason,
                outcome.message,
                "Normal" if outcome.ready else "Warning",
            )

    def _saw_bot(self, name: str, written: JSON | None) -> None:
        """The API's answer to the bot's status write: the World shows it at once (its watch
        event comes later, and is then no change); a change of readiness asks for its
        namespaces' work (their bindings judged again, their pods planned)."""
        current = self.world.bots.get(name)
        uid = str((written or {}).get("metadata", {}).get("uid") or "")
        if written is None or current is None or (uid and current.uid and uid != current.uid):
            return  # gone, or another bot of that name since
        fresh = current.shown(written)
        if fresh.older_than(current):
            return
        self.world.bots[name] = fresh
        if readiness.of_bot(current) != readiness.of_bot(fresh):
            for namespace in self.world.namespaces_of_bot(name):
                self.memo.requeue_namespace(namespace)


class Bindings(_Reconciler):
    """Binding verdicts, judged from the World (the bot's readiness as its status says) and
    written in the binding's status, where lease plans read them."""

    def __init__(self, memo: Memo) -> None:
        super().__init__(memo)
        # One status write per binding at a time: a second writer (the bot's periodic pass
        # beside a namespace's work) compares with what the first wrote, so a change is
        # written, and said as an Event, once.
        self._writing: dict[Key, asyncio.Lock] = {}
        # A namespace whose status writes failed: its work queued again, backing off.
        self.retries = Retries(self.settings.backoff())

    async def close(self) -> None:
        await self.retries.close()

    def judge(self, binding: BindingView) -> readiness.Verdict:
        bot = self.world.bots.get(binding.bot) if binding.bot else None
        return readiness.judge_binding(binding, bot, self.world.namespaces.get(binding.namespace))

    async def refresh_namespace(self, namespace: str, *, pods: bool = True) -> None:
        """Bindings, bots or labels changed here: each binding judged and its status written,
        then (``pods``) every pod of the namespace (and every pod holding a lease here)
        planned again, as its own work (a binding's subjects, selector or namespace may have
        changed even where its verdict has not)."""
        bindings = self.world.bindings_in(namespace)
        results = await asyncio.gather(
            *(self.write_status(binding) for binding in bindings), return_exceptions=True
        )
        if pods:
            self.memo.requeue_pods_in(namespace)
        # Each binding's write is its own: one refused does not hold the others' (nor the
        # pods' work); the namespace's work is queued again later, and the first failure
        # fails this one, which says so.
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.retries.failed(namespace, lambda: self._again(namespace), failures[0])
            raise failures[0]
        self.retries.succeeded(namespace)

    async def _again(self, namespace: str) -> None:
        self.memo.requeue_namespace(namespace)

    async def write_status(self, binding: BindingView) -> None:
        lock = self._writing.setdefault(binding.key, asyncio.Lock())
        try:
            async with lock:
                # The binding as the World holds it now (a caller's view may be from before
                # a spec change, and would write the status back to an older generation).
                current = self.world.bindings.get(binding.key)
                if current is not None and current.uid == binding.uid:
                    await self._write_status(current)
        finally:
            if not lock.locked() and binding.key not in self.world.bindings:
                self._writing.pop(binding.key, None)

    def _saw_binding(self, binding: BindingView, written: JSON | None) -> None:
        """The API's answer to the status write: the World shows it at once (its watch event
        is then no change); when the readiness shown changed, the namespace's pods are
        planned again by it."""
        current = self.world.bindings.get(binding.key)
        if written is None or current is None or current.uid != binding.uid:
            return
        fresh = current.shown(written)
        if fresh.older_than(current):
            return
        self.world.put_binding(fresh)
        if readiness.of_binding(current) != readiness.of_binding(fresh):
            self.memo.requeue_pods_in(binding.namespace)

    async def _write_status(self, binding: BindingView) -> None:
        verdict = self.judge(binding)
        metrics.current().binding_status(*binding.key, verdict.ready, verdict.reason)
        counts = readiness.count_binding(self.world, binding, self.naming)
        now = self.clock()
        seen = self.world.bindings.get(binding.key, binding)  # as the cluster last showed it
        previous = conditions_of(seen.status)
        conditions = previous
        shown = [("Ready", verdict.ready, verdict.reason, verdict.message)]
        if verdict.bot_shown:
            shown.append(("BotReady", verdict.bot_ready, verdict.bot_reason, verdict.bot_message))
        else:
            # No word about a bot this namespace may not use: not even whether it exists.
            conditions = [c for c in conditions if c.type != resources.BOT_READY]
        for type_, ok, reason, message in shown:
            conditions = resources.set_condition(
                conditions,
                resources.Condition.new(
                    type_, "True" if ok else "False", reason, message, binding.generation
                ),
                now,
            )
        status: JSON = {
            "observedGeneration": binding.generation,
            "matchedPods": counts.matched,
            "activeCredentials": counts.active,
            "unmeshedPods": counts.unmeshed,
            "otherMeshPods": counts.other_mesh,
            # null removes the field; the merge patch replaces the conditions list whole, so
            # a BotReady left out above is removed as well.
            "botPHID": verdict.bot_phid if verdict.bot_shown else None,
            "conditions": [c.model_dump(by_alias=True, mode="json") for c in conditions],
        }
        if not changed(status, seen.status):
            return
        written = await self.writer.patch_status(
            binding_path(binding.namespace, binding.name), status
        )
        self._saw_binding(binding, written)
        old_ready = next((c for c in previous if c.type == "Ready"), None)
        old_bot = next((c for c in previous if c.type == resources.BOT_READY), None)
        # Until the bot's first check answers, the binding waits without an Event (a bot
        # applied with its binding is not a problem yet); that answer's verdict is said, even
        # when it keeps the reason BotNotReady.
        waiting = verdict.bot_shown and verdict.bot_reason == NOT_CHECKED
        waited = old_bot is not None and old_bot.reason == NOT_CHECKED
        if not waiting and (old_ready is None or old_ready.reason != verdict.reason or waited):
            if verdict.detail:  # the whole truth, for the administrator's eyes only
                log.info(
                    "binding_judged",
                    **{
                        logs.NAMESPACE: binding.namespace,
                        logs.BINDING: binding.name,
                        logs.BOT: binding.bot,
                        logs.REASON: verdict.reason,
                    },
                    detail=verdict.detail,
                )
            await self.writer.event(
                {
                    "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
                    "kind": resources.BINDING_KIND,
                    "namespace": binding.namespace,
                    "name": binding.name,
                    "uid": binding.uid,
                },
                verdict.reason,
                verdict.message,
                "Normal" if verdict.ready else "Warning",
            )


@dataclasses.dataclass
class _PodLock:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0  # reconciles holding or awaiting it


# A refused lease write is said on its pod at most this often, and for this many pods.
WRITE_FAILED_EVERY = datetime.timedelta(seconds=60)
MAX_SAID_FAILED = 10_000


class Leases(_Reconciler):
    """Each pod's leases: what it should hold (the pod's plan), written, retried on failure."""

    def __init__(self, memo: Memo) -> None:
        super().__init__(memo)
        self.retries = Retries(self.settings.backoff())  # lease writes that failed, per pod UID
        self._pod_locks: dict[str, _PodLock] = {}
        self._said_failed: dict[str, datetime.datetime] = {}  # pod UID -> last Event
        self._pending_events: set[asyncio.Future[None]] = set()

    async def close(self) -> None:
        await self.retries.close()

    async def renew(self, binding: BindingView) -> None:
        if binding.spec is None:
            return
        ttl = binding.spec.ttl
        now = self.clock()
        due = [
            lease
            for lease in self.world.leases_of_binding(binding.key)
            if plans.due_for_renewal(lease, ttl, now)
        ]
        for lease in due:
            await self.reconcile_pod(lease.pod_uid)
            current = self.world.leases.get(lease.key)
            if current is not None and current.active:
                try:
                    await self.writer.renew(current, ttl)
                except Exception as exc:
                    # Still due at the bot's next tick (seconds away, long before a third
                    # of the TTL has passed): that pass tries it again.
                    log.warning(
                        "lease_write_failed",
                        **{logs.LEASE: current.name, logs.POD_UID: current.pod_uid},
                        error=str(exc),
                    )

    async def reconcile_pod(self, uid: str) -> None:
        """One reconcile of a pod at a time: its lock is forgotten as soon as no reconcile
        holds or awaits it (a lock per live pod would cost every pod its memory)."""
        entry = self._pod_locks.setdefault(uid, _PodLock())
        entry.users += 1
        try:
            async with entry.lock:
                pod = self.world.pods.get(uid)
                verdicts = (
                    readiness.status_verdicts(self.world, pod.namespace)
                    if pod is not None and not plans.idle(self.world, pod)
                    else {}
                )
                plan = plans.plan_pod(self.world, uid, self.naming, verdicts)
                if plan:
                    await self._execute(uid, plan)
                else:
                    self.retries.succeeded(uid)  # nothing (more) to write: no retry count left
        finally:
            entry.users -= 1
            if entry.users == 0:
                self._pod_locks.pop(uid, None)

    async def _execute(self, uid: str, plan: plans.Plan) -> None:
        # Revocations first: a lease re-issued for another bot takes the revoked one's name.
        revokes = await asyncio.gather(
            *(self.writer.revoke(lease, reason) for lease, reason in plan.revoke),
            *(self.writer.delete_revoked(lease) for lease in plan.delete),
            return_exceptions=True,
        )
        writes: list[Coroutine[Any, Any, object]] = []
        pod = self.world.pods.get(uid)
        if pod is not None:
            pod_identity = identity.linkerd_identity(
                pod.service_account, pod.namespace, self.naming
            )
            for binding in plan.issue:
                assert binding.spec is not None
                verdict = readiness.status_verdict(binding.status, binding.generation)
                writes.append(
                    self.writer.issue(
                        pod,
                        binding,
                        pod_identity,
                        binding.spec.ttl,
                        verdict.bot_phid if verdict else None,
                    )
                )
        results = await asyncio.gather(*writes, return_exceptions=True)
        failures = [r for r in [*revokes, *results] if isinstance(r, Exception)]
        for failure in failures:
            self.write_failed(uid, failure)
        if not failures:
            self.retries.succeeded(uid)

    async def _again(self, uid: str) -> None:
        """A retry: the pod's work queued again, so that it waits (as all work does) while
        this replica does not act or a watch is lost."""
        self.memo.requeue_pod(uid)

    def write_failed(self, uid: str, error: Exception) -> None:
        """A lease write for this pod failed: reconcile it again later, backing off, until
        its leases are what they should be (or nothing more is wanted). A write the API
        server refused (not one deferred by peering, nor a passing outage) is also said on
        the pod, as a Warning Event, where `kubectl describe` and `kubectl phabmesh why`
        show it: at most one per pod per :data:`WRITE_FAILED_EVERY`."""
        log.warning("lease_write_failed", **{logs.POD_UID: uid, logs.ERROR: str(error)})
        self.retries.failed(uid, lambda: self._again(uid), error)
        pod = self.world.pods.get(uid)
        refused = isinstance(error, KubeError) and 400 <= error.status < 500
        if pod is None or not refused or isinstance(error, Conflict):
            return
        now = self.clock()
        last = self._said_failed.get(uid)
        if last is not None and now - last < WRITE_FAILED_EVERY:
            return
        self._said_failed[uid] = now
        while len(self._said_failed) > MAX_SAID_FAILED:
            self._said_failed.pop(next(iter(self._said_failed)))
        ref = {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace,
               "name": pod.name, "uid": pod.uid}  # fmt: skip
        message = f"the operator could not write this pod's credential lease: {error}"
        task = self.writer.event(ref, resources.CREDENTIAL_WRITE_FAILED, message, "Warning")
        self._pending_events.add(asyncio.ensure_future(task))
        self._pending_events = {t for t in self._pending_events if not t.done()}

    async def sweep(self, listed: Iterable[Key]) -> int:
        """Revoke every lease of ``listed`` whose pod is gone or is another incarnation.

        ``listed``: the leases of the first list, taken before the pods were listed
        (:mod:`phabmesh.leases.watches`), so a lease's pod that existed then is known now
        unless it has since gone.
        """
        world = self.world
        leases = (world.leases.get(key) for key in listed)
        orphans = [
            lease for lease in leases if lease is not None and lease.pod_uid not in world.pods
        ]
        # One Revoked already (by an administrator, or before a delete that failed) keeps
        # its reason and time, and is said no second time: it is only deleted.
        results = await asyncio.gather(
            *(
                self.writer.delete_revoked(lease)
                if lease.phase == "Revoked"
                else self.writer.revoke(lease, reasons.POD_GONE)
                for lease in orphans
            ),
            return_exceptions=True,
        )
        for lease, result in zip(orphans, results, strict=True):
            if isinstance(result, Exception):
                self.write_failed(lease.pod_uid, result)
        return len(orphans)
