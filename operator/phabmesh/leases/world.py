"""The controller's in-memory view of the cluster: small values, kept by watch events.

No I/O here. Pods are kept as :class:`~phabmesh.identity.PodFacts` (a few strings
each) so that thousands of pods cost little; bindings, bots, namespaces and
leases are kept as the few fields decisions need. Secondary indices (pods by
namespace, leases by pod, bindings by bot) are maintained alongside.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from phabmesh import identity, resources
from phabmesh.leases.view import LeaseView, older_version

Key = tuple[str, str]  # (namespace, name)
Status = Mapping[str, Any]


def conditions_of(status: Status) -> list[resources.Condition]:
    """The conditions of a status as the cluster showed it; unreadable entries are left out."""
    found: list[resources.Condition] = []
    for entry in status.get("conditions") or []:
        try:
            found.append(resources.Condition.model_validate(entry))
        except ValueError:
            continue
    return found


# A bot's reason before its first check has answered (no Ready condition yet).
NOT_CHECKED = "NotChecked"


@dataclasses.dataclass(frozen=True)
class BotView:
    name: str
    generation: int
    spec: resources.BotSpec | None
    ready: bool  # usable: Ready, or Unknown after a verification (resources.bot_usable)
    phid: str | None
    reason: str
    # The status as the cluster last showed it (watch events, the API's answers to this
    # process's own writes): what a write is compared with, and where conditions' times
    # come from. Not part of the view's identity.
    status: Status = dataclasses.field(default_factory=dict, compare=False)
    recheck: str = ""  # resources.RECHECK_ANNOTATION: a new value asks for a check now
    uid: str = ""  # for its Events' involvedObject (kubectl describe finds them by uid)
    # Where kopf's finalizer of earlier versions is in its finalizers (-1: not there).
    kopf_finalizer: int = dataclasses.field(default=-1, compare=False)
    resource_version: str = dataclasses.field(default="", compare=False)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BotView:
        meta = body.get("metadata") or {}
        spec, _ = resources.parse_bot_spec(body)
        view = cls(
            name=str(meta.get("name")),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            ready=False,
            phid=None,
            reason=NOT_CHECKED,
            recheck=str((meta.get("annotations") or {}).get(resources.RECHECK_ANNOTATION) or ""),
            uid=str(meta.get("uid") or ""),
            kopf_finalizer=resources.kopf_finalizer_at(meta),
        )
        return view.shown(body)

    def shown(self, body: Mapping[str, Any]) -> BotView:
        """This bot with the status (and readiness) ``body`` shows: a watch event's, or the
        API's answer to a status write. Its readiness is only ever what the status says."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        conditions = status.get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == resources.READY), None)
        return dataclasses.replace(
            self,
            ready=resources.bot_usable(conditions, self.generation),
            phid=status.get("phid"),
            reason=str((ready or {}).get("reason") or NOT_CHECKED),
            status=status,
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    def older_than(self, other: BotView) -> bool:
        """An earlier state of the object than ``other`` (see :func:`older_version`)."""
        return older_version(self.resource_version, other.resource_version)


@dataclasses.dataclass(frozen=True)
class BindingView:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: resources.BindingSpec | None
    problems: tuple[str, ...]
    status: Status = dataclasses.field(default_factory=dict, compare=False)  # as on BotView
    # Marked for deletion (someone else's finalizer may hold it): as good as deleted.
    deleting: bool = dataclasses.field(default=False, compare=False)
    kopf_finalizer: int = dataclasses.field(default=-1, compare=False)  # as on BotView
    resource_version: str = dataclasses.field(default="", compare=False)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def bot(self) -> str | None:
        return self.spec.bot_ref.name if self.spec else None

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BindingView:
        meta = body.get("metadata") or {}
        spec, problem = resources.parse_binding_spec(body)
        problems = [problem] if problem else []
        return cls(
            namespace=str(meta.get("namespace")),
            name=str(meta.get("name")),
            uid=str(meta.get("uid")),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            problems=tuple(problems),
            status=body.get("status") or {},
            deleting=meta.get("deletionTimestamp") is not None,
            kopf_finalizer=resources.kopf_finalizer_at(meta),
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    def shown(self, body: Mapping[str, Any]) -> BindingView:
        """This binding with the status ``body`` shows (the API's answer to a status write)."""
        meta = body.get("metadata") or {}
        return dataclasses.replace(
            self,
            status=body.get("status") or {},
            resource_version=str(meta.get("resourceVersion") or ""),
        )

    def older_than(self, other: BindingView) -> bool:
        """An earlier state of the object than ``other`` (see :func:`older_version`)."""
        return older_version(self.resource_version, other.resource_version)


class World:
    """Everything the controller knows, indexed for its questions."""

    def __init__(self) -> None:
        self.pods: dict[str, identity.PodFacts] = {}
        self.pods_by_ns: defaultdict[str, set[str]] = defaultdict(set)
        self.bindings: dict[Key, BindingView] = {}
        self.bindings_by_ns: defaultdict[str, set[str]] = defaultdict(set)
        self.bots: dict[str, BotView] = {}
        self.namespaces: dict[str, Mapping[str, str]] = {}
        self.leases: dict[Key, LeaseView] = {}
        # A pod has a lease or two: a tuple of their keys (48 bytes for one; a set is 216).
        self.leases_by_pod: dict[str, tuple[Key, ...]] = {}
        self.leases_by_binding: defaultdict[Key, set[Key]] = defaultdict(set)
        self.leases_by_bot: defaultdict[str, set[Key]] = defaultdict(set)

    # pods

    def put_pod(self, pod: identity.PodFacts) -> None:
        self.pods[pod.uid] = pod
        self.pods_by_ns[pod.namespace].add(pod.uid)

    def drop_pod(self, uid: str) -> identity.PodFacts | None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            members = self.pods_by_ns.get(pod.namespace)
            if members is not None:
                members.discard(uid)
                if not members:
                    del self.pods_by_ns[pod.namespace]
        return pod

    def pods_in(self, namespace: str) -> list[identity.PodFacts]:
        return [self.pods[uid] for uid in self.pods_by_ns.get(namespace, ())]

    # bindings

    def put_binding(self, binding: BindingView) -> None:
        self.bindings[binding.key] = binding
        self.bindings_by_ns[binding.namespace].add(binding.name)

    def drop_binding(self, key: Key) -> BindingView | None:
        binding = self.bindings.pop(key, None)
        names = self.bindings_by_ns.get(key[0])
        if names is not None:
            names.discard(key[1])
            if not names:
                del self.bindings_by_ns[key[0]]
        return binding

    def bindings_in(self, namespace: str) -> list[BindingView]:
        return [self.bindings[(namespace, n)] for n in self.bindings_by_ns.get(namespace, ())]

    def bindings_of_bot(self, bot: str) -> list[BindingView]:
        return [b for b in self.bindings.values() if b.bot == bot]

    # leases

    def put_lease(self, lease: LeaseView) -> None:
        old = self.leases.get(lease.key)
        if old is not None and lease.older_than(old):
            # A watch event older than what the writer already put here (its create event
            # after the Active status was written, say): keep the newer state.
            return
        if old is not None and (old.pod_uid, old.binding, old.bot) != (
            lease.pod_uid,
            lease.binding,
            lease.bot,
        ):
            self._unindex_lease(old)
        # One key tuple for every index (a tuple each would be 56 bytes more per index; on an
        # update, each keeps the equal key it holds).
        key = lease.key
        self.leases[key] = lease
        of_pod = self.leases_by_pod.get(lease.pod_uid, ())
        if key not in of_pod:
            self.leases_by_pod[lease.pod_uid] = (*of_pod, key)
        self.leases_by_binding[(lease.namespace, lease.binding)].add(key)
        self.leases_by_bot[lease.bot].add(key)

    def drop_lease(self, key: Key, uid: str | None = None) -> LeaseView | None:
        """Forget the lease under ``key``; with ``uid``, only if it is that lease (the
        deletion of an earlier lease of the same name never drops its successor)."""
        lease = self.leases.get(key)
        if lease is None or (uid and lease.uid and lease.uid != uid):
            return None
        del self.leases[key]
        self._unindex_lease(lease)
        return lease

    def _unindex_lease(self, lease: LeaseView) -> None:
        by_pod = self.leases_by_pod.get(lease.pod_uid)
        if by_pod is not None:
            kept = tuple(k for k in by_pod if k != lease.key)
            if kept:
                self.leases_by_pod[lease.pod_uid] = kept
            else:
                del self.leases_by_pod[lease.pod_uid]
        slot = (lease.namespace, lease.binding)
        by_binding = self.leases_by_binding.get(slot)
        if by_binding is not None:
            by_binding.discard(lease.key)
            if not by_binding:
                del self.leases_by_binding[slot]
        by_bot = self.leases_by_bot.get(lease.bot)
        if by_bot is not None:
            by_bot.discard(lease.key)
            if not by_bot:
                del self.leases_by_bot[lease.bot]

    def leases_of_pod(self, uid: str) -> list[LeaseView]:
        return [self.leases[k] for k in self.leases_by_pod.get(uid, ())]

    def leases_of_binding(self, key: Key) -> list[LeaseView]:
        return [self.leases[k] for k in self.leases_by_binding.get(key, ())]

    def active_leases(self, now: datetime.datetime) -> dict[Key, int]:
        """Active leases not expired at ``now``, per binding (namespace, name): every known
        binding (0 without any), and binding names that only leases still carry."""
        counts = dict.fromkeys(self.bindings, 0)
        for lease in list(self.leases.values()):
            if lease.active and lease.expires_at is not None and lease.expires_at > now:
                slot = (lease.namespace, lease.binding)
                counts[slot] = counts.get(slot, 0) + 1
        return counts

    def namespaces_of_bot(self, bot: str) -> Iterable[str]:
        """Namespaces whose bindings name the bot now, and namespaces holding leases of it
        (whatever their bindings were since re-pointed to, renamed or deleted)."""
        names = {b.namespace for b in self.bindings_of_bot(bot)}
        names.update(key[0] for key in self.leases_by_bot.get(bot, ()))
        return names
