"""Which of the operator's replicas acts: kopf's peering protocol, kept by phabmesh itself.

The replicas announce themselves in one ClusterKopfPeering (``status.<identity>``: priority,
lifetime, ``lastseen``), exactly as kopf writes it, so that replicas of an earlier version,
whose kopf keeps the entries, take part in the same election during a rolling upgrade. This
process lists and watches that one object (the only watch of it in the process), keeps its
own entry alive (:meth:`PeeringView.keep_alive`), removes the entries of peers whose
``lastseen + lifetime`` has passed, as kopf does, and removes its own when it stops
(:meth:`PeeringView.goodbye`). kopf runs standalone: it watches nothing.

The rule is kopf's (``process_peering_event``): a replica acts while no other live peer has
a priority as high as its own. Without the object (or before its watch has listed) it does
not act. In standalone mode (no peering) the controller acts once started.

kopf's rule alone lets two replicas act at once. A replica judges the others by the
``lastseen`` they last wrote; the acting one never asks whether its own keep-alive still
lands. When the API server is away longer than what is left of the acting replica's
lifetime, the standby sees it dead as soon as it can read again, and acts; the other, which
never saw a live peer above it, would act too until its next keep-alive. So this replica
also *fences* itself (:func:`fenced`): it acts only while its own keep-alive, as the peering
object shows it, is younger than its lifetime less :data:`FENCE_MARGIN`, i.e. before any
other replica could judge it dead. Its keep-alive is renewed once half of its lifetime has
passed, and at once when the API server answers again after an outage, so a healthy
replica is never fenced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import secrets
import socket
from collections.abc import Iterable

import structlog

from phabmesh.clock import parse_time, utcnow
from phabmesh.kube import KubeClient, KubeError
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.resources import resource_path

GROUP, VERSION, PLURAL = "kopf.dev", "v1", "clusterkopfpeerings"
# Seconds before its own keep-alive runs out that a replica stops acting: less than the 5 s
# kopf keeps at least between a renewal and the end of the lifetime it renews, and more than
# the clock difference between replicas' nodes (NTP keeps it far smaller).
FENCE_MARGIN = datetime.timedelta(seconds=2)
RENEW_POLL = 0.5  # seconds between looks at the entries
log = structlog.get_logger(__name__)


def new_identity() -> str:
    """This replica's peering identity: its pod's name when known (kopf's ``POD_ID``), else
    the host, the process and a random part."""
    pod = os.environ.get("POD_ID")
    if pod:
        return pod
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def new_priority() -> int:
    """A random priority: replicas are identical, and equal priorities would make kopf pause
    them all, so a random one per process makes exactly one of them act."""
    return secrets.randbelow(1 << 30) + 1


@dataclasses.dataclass(frozen=True)
class Peer:
    identity: str
    priority: int
    deadline: datetime.datetime


def peers(obj: JSON) -> tuple[Peer, ...]:
    """The peers a ClusterKopfPeering's status lists (malformed entries are skipped)."""
    out: list[Peer] = []
    for identity, info in (obj.get("status") or {}).items():
        if not isinstance(info, dict):
            continue
        try:
            seen = parse_time(info.get("lastseen"))
            lifetime = datetime.timedelta(seconds=int(info.get("lifetime", 60)))
            priority = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if seen is None:
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        out.append(Peer(str(identity), priority, seen + lifetime))
    return tuple(out)


def acting(others: Iterable[Peer], identity: str, priority: int, now: datetime.datetime) -> bool:
    """kopf's rule: no other live peer has a priority as high as ours."""
    return not any(
        peer.identity != identity and peer.deadline > now and peer.priority >= priority
        for peer in others
    )


def fenced(others: Iterable[Peer], identity: str, now: datetime.datetime) -> bool:
    """Is this replica's own keep-alive missing, or too close to its end, for it to act?

    Its own ``lastseen`` was written with its own clock, so no clock difference plays a part
    in this judgement; another replica takes over once it sees ``lastseen + lifetime`` pass.
    """
    own = [peer.deadline for peer in others if peer.identity == identity]
    return not own or max(own) - FENCE_MARGIN <= now


class PeeringView:
    """A watch of one ClusterKopfPeering, judged for this replica at each question."""

    def __init__(
        self, client: KubeClient, name: str, identity: str, priority: int, lifetime: int = 60
    ) -> None:
        self.client = client
        self.identity = identity
        self.priority = priority
        self.lifetime = lifetime
        self.name = name
        self.stopping = False  # set before the goodbye, so that nothing renews after it
        self.was_acting: bool | None = None  # at the last look, for the log of a change
        self.informer: Informer[tuple[Peer, ...]] = Informer(
            client,
            resource_path(GROUP, VERSION, PLURAL),
            peers,
            params={"fieldSelector": f"metadata.name={name}"},
            name="peering",
        )

    async def run(self) -> None:
        await asyncio.gather(self.informer.run(), self.keep_alive())

    def own_deadline(self) -> datetime.datetime | None:
        listed = self.informer.items.get(self.name) or ()
        return max((p.deadline for p in listed if p.identity == self.identity), default=None)

    @property
    def path(self) -> str:
        return resource_path(GROUP, VERSION, PLURAL, None, self.name)

    async def keep_alive(self) -> None:
        """This replica's entry written at start and renewed once half its lifetime has
        passed (at once after an outage, when the API server answers again); peers whose
        keep-alive has run out removed. Nothing while the object is not there."""
        while True:
            await self.tend(utcnow())
            await asyncio.sleep(RENEW_POLL)

    async def tend(self, now: datetime.datetime) -> None:
        """One look at the entries (see :meth:`keep_alive`)."""
        now_acting = self.acting(now)
        if now_acting != self.was_acting:
            log.info("peering_acting" if now_acting else "peering_paused", identity=self.identity)
            self.was_acting = now_acting
        listed = self.informer.items.get(self.name)
        if self.stopping or not self.informer.connected or listed is None:
            return
        deadline = self.own_deadline()
        if deadline is None or deadline - now <= datetime.timedelta(seconds=self.lifetime / 2):
            await self._patch({self.identity: self.entry(now)}, "peering_renewed")
        dead = [p.identity for p in listed if p.deadline <= now]
        dead = [identity for identity in dead if identity != self.identity]
        if dead:
            await self._patch(dict.fromkeys(dead), "peering_dead_removed", dead=dead)

    def entry(self, now: datetime.datetime) -> JSON:
        """This replica's entry, as kopf writes it (``touch``)."""
        return {"priority": self.priority, "lifetime": self.lifetime, "lastseen": now.isoformat()}

    async def goodbye(self) -> None:
        """This replica's entry removed (it stops): another one takes over at once."""
        self.stopping = True
        await self._patch({self.identity: None}, "peering_goodbye")

    async def _patch(self, status: JSON, event: str, **fields: object) -> None:
        try:
            await self.client.merge_patch(self.path, {"status": status}, attempts=1)
        except KubeError as exc:
            log.warning("peering_write_failed", error=str(exc), write=event)
        else:
            (log.debug if event == "peering_renewed" else log.info)(event, **fields)

    def acting(self, now: datetime.datetime | None = None) -> bool:
        """kopf's rule, and this replica's own keep-alive fresh (:func:`fenced`): what the
        controller's writes ask before each write, and what ``phabmesh_operator_acting`` says."""
        listed = self.informer.items.get(self.name)
        if listed is None or not self.informer.synced.is_set():
            return False
        now = now or utcnow()
        return acting(listed, self.identity, self.priority, now) and not fenced(
            listed, self.identity, now
        )
