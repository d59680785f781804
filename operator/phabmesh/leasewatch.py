"""A watched index of every PhabricatorCredential (lease), for the issuer and the gateway.

Kept current by one watch; lookups by pod UID and by lease UID cost no API call.
While the watch is disconnected, or silent for ``liveness`` seconds (stalled), ``connected``
is False and readers fail closed.
"""

from __future__ import annotations

import collections
from collections import defaultdict
from collections.abc import Callable

from phabmesh import resources
from phabmesh.kube import KubeClient
from phabmesh.kube.client import resource_path
from phabmesh.kube.informer import DEFAULT_LIVENESS, DELETED, Informer
from phabmesh.lease import LeaseView

TOMBSTONES = 100_000  # bounded memory: about 10 MB at most


class LeaseIndex:
    def __init__(
        self,
        client: KubeClient,
        on_revoked: Callable[[LeaseView], None] | None = None,
        liveness: float = DEFAULT_LIVENESS,
    ) -> None:
        self.on_revoked = on_revoked
        self.by_uid: dict[str, LeaseView] = {}
        self.by_pod: defaultdict[str, dict[str, LeaseView]] = defaultdict(dict)
        self._uid_of: dict[str, str] = {}  # "ns/name" -> lease uid
        # Why recently removed leases went: so a refusal can say "pod deleted", not just "gone".
        self.tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.informer: Informer[LeaseView] = Informer(
            client,
            resource_path(resources.GROUP, resources.VERSION, resources.CREDENTIAL_PLURAL),
            LeaseView.from_body,
            on_event=self._on_event,
            name="leases",
            liveness=liveness,
        )

    @property
    def connected(self) -> bool:
        return self.informer.connected

    @property
    def synced(self) -> bool:
        return self.informer.synced.is_set()

    async def run(self) -> None:
        await self.informer.run()

    def _on_event(self, kind: str, key: str, lease: LeaseView | None) -> None:
        old_uid = self._uid_of.pop(key, None)
        old: LeaseView | None = None
        if old_uid is not None:
            old = self.by_uid.pop(old_uid, None)
            if old is not None:
                pods = self.by_pod.get(old.pod_uid)
                if pods is not None:
                    pods.pop(old_uid, None)
                    if not pods:
                        del self.by_pod[old.pod_uid]
        if kind == DELETED or lease is None:
            if old_uid is not None:
                self._bury(old_uid, old.reason if old is not None and old.reason else "")
            return
        revoked_now = lease.phase == "Revoked" and (old is None or old.phase != "Revoked")
        if revoked_now and self.on_revoked is not None:
            self.on_revoked(lease)
        self._uid_of[key] = lease.uid
        self.by_uid[lease.uid] = lease
        self.by_pod[lease.pod_uid][lease.uid] = lease

    def _bury(self, uid: str, reason: str) -> None:
        self.tombstones[uid] = reason or "Deleted"
        while len(self.tombstones) > TOMBSTONES:
            self.tombstones.popitem(last=False)

    def of_pod(self, pod_uid: str) -> list[LeaseView]:
        return list(self.by_pod.get(pod_uid, {}).values())
