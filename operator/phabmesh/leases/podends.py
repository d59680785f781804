"""Which pods have ended, from one watch of pods: the gateway's fast path to revocation.

The operator revokes a lease by writing it; under a burst of deletions those writes queue
behind each other at the API server. The gateway sees the same pod events itself and refuses
a credential the moment its pod is terminating, finished or gone, whatever the lease says.
This only ever refuses: a pod it has not seen (yet) is left to the lease, which stays the
authority for admitting a credential.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from phabmesh import identity, resources
from phabmesh.kube import KubeClient, shapes
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import DEFAULT_LIVENESS, Informer
from phabmesh.resources import resource_path

GONE = 100_000  # deleted pods remembered, oldest forgotten first: a few MB at most


@dataclasses.dataclass(frozen=True, slots=True)
class PodLife:
    uid: str
    ended: str  # "" while the pod lives, else the revocation reason: PodTerminating, ...


def pod_life(obj: JSON) -> PodLife:
    meta = obj.get("metadata") or {}
    phase = (obj.get("status") or {}).get("phase")
    if meta.get("deletionTimestamp"):
        ended = resources.POD_TERMINATING
    elif phase in ("Succeeded", "Failed"):
        ended = f"Pod{phase}"
    else:
        ended = ""
    return PodLife(str(meta.get("uid") or ""), ended)


class PodEnds:
    def __init__(
        self,
        client: KubeClient,
        liveness: float = DEFAULT_LIVENESS,
        after: Informer[Any] | None = None,
        unmeshed_pods: bool = True,
    ) -> None:
        """``after``: the process's lease watch. The pods are listed once it has listed, by a
        consistent read: every lease then known has its pod in that list, unless the pod is
        gone (not "not older than" the lease list's version: see
        :mod:`phabmesh.leases.watches`)."""
        self.after = after
        self.ended: dict[str, str] = {}  # pod uid -> reason, for pods that exist and ended
        self.gone: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._uid_of: dict[str, str] = {}  # "ns/name" -> uid of the pod under that name
        self.informer: Informer[PodLife] = Informer(
            client,
            resource_path("", "v1", "pods"),
            pod_life,
            on_event=self._on_event,
            name="pods",
            liveness=liveness,
            shape=shapes.POD,
            params=identity.pod_watch_params(unmeshed_pods),
        )

    async def run(self) -> None:
        if self.after is not None:
            await self.after.synced.wait()
        await self.informer.run()

    @property
    def healthy(self) -> bool:
        return self.informer.healthy

    def reason(self, pod_uid: str) -> str | None:
        """Why the pod with this UID can no longer hold a credential, if it is known to."""
        return self.ended.get(pod_uid) or self.gone.get(pod_uid)

    def _on_event(self, _kind: str, key: str, life: PodLife | None) -> None:
        previous = self._uid_of.pop(key, None)
        if previous is not None and (life is None or life.uid != previous):
            self.ended.pop(previous, None)  # deleted, or replaced by a pod of the same name
            self._bury(previous)
        if life is None:
            return
        self._uid_of[key] = life.uid
        if life.ended:
            self.ended[life.uid] = life.ended
        else:
            self.ended.pop(life.uid, None)

    def _bury(self, uid: str) -> None:
        self.gone[uid] = resources.POD_DELETED
        while len(self.gone) > GONE:
            self.gone.popitem(last=False)
