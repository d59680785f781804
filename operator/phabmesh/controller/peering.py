"""Whether this replica's controller acts, read from kopf's peering object.

kopf pauses a replica's watching handlers while another live replica of the ClusterKopfPeering
has a higher (or the same) priority, and keeps them paused until the peering object says
otherwise; it keeps that state to itself. This process passes kopf its peering identity and
priority, watches the same object, and applies kopf's rule (``process_peering_event``): it
acts while no other live peer (``lastseen + lifetime`` not passed) has a priority as high as
its own. Without the object (or before its watch has listed) it does not act, as kopf does
not. In standalone mode (no peering) the controller acts once started.

kopf's rule alone lets two replicas act at once. A replica judges the others by the
``lastseen`` they last wrote; the acting one never asks whether its own keep-alive still
lands. When the API server is away longer than what is left of the acting replica's
lifetime, the standby sees it dead as soon as it can read again, and acts; the other, which
never saw a live peer above it, acts too until its next keep-alive (up to ``lifetime`` - 5 s
later). So this replica also *fences* itself (:func:`fenced`): it acts only while its own
keep-alive, as the peering object shows it, is younger than its lifetime less
:data:`FENCE_MARGIN`, i.e. before any other replica could judge it dead. kopf renews a
keep-alive at least 5 s before it runs out, so a healthy replica is never fenced.

kopf renews a keep-alive on its own rhythm, which an outage breaks: back from one, every
replica would stay fenced until its next turn (up to ``lifetime`` - 5 s). So the view also
renews this replica's entry, exactly as kopf writes it, as soon as it can once the entry is
about to run out (:meth:`PeeringView.renew_when_due`). It never adds an entry that is not
there: kopf removes its own when it stops, and a peer removes one it judged dead; kopf's
next keep-alive adds it back.
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
# The view renews this replica's keep-alive itself once less than this is left of it (kopf
# renews with 5 to 10 s left; this only acts when kopf's turn did not come).
RENEW_LEFT = FENCE_MARGIN + datetime.timedelta(seconds=2)
RENEW_POLL = 0.5  # seconds between looks at the entry
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
        self.stopping = False  # set before kopf's goodbye, so that nothing renews after it
        self.informer: Informer[tuple[Peer, ...]] = Informer(
            client,
            resource_path(GROUP, VERSION, PLURAL),
            peers,
            params={"fieldSelector": f"metadata.name={name}"},
            name="peering",
        )

    async def run(self) -> None:
        await asyncio.gather(self.informer.run(), self.renew_when_due())

    def own_deadline(self) -> datetime.datetime | None:
        listed = self.informer.items.get(self.name) or ()
        return max((p.deadline for p in listed if p.identity == self.identity), default=None)

    async def renew_when_due(self) -> None:
        """Renew this replica's entry (as kopf's ``touch`` does) when it is about to run out
        and kopf has not: after an API server outage, at once once it answers again."""
        path = resource_path(GROUP, VERSION, PLURAL, None, self.name)
        while True:
            await asyncio.sleep(RENEW_POLL)
            deadline = self.own_deadline()
            now = utcnow()
            if self.stopping or not self.informer.connected or deadline is None:
                continue
            if deadline - now > RENEW_LEFT:
                continue
            entry = {
                "priority": self.priority,
                "lifetime": self.lifetime,
                "lastseen": now.isoformat(),
            }
            try:
                await self.client.merge_patch(path, {"status": {self.identity: entry}}, attempts=1)
            except KubeError as exc:
                log.warning("peering_renewal_failed", error=str(exc))
            else:
                log.info("peering_renewed", late_seconds=round((now - deadline).total_seconds(), 1))

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
