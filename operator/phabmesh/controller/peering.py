"""Whether this replica's controller acts, read from kopf's peering object.

kopf pauses a replica's watching handlers while another live replica of the ClusterKopfPeering
has a higher (or the same) priority, and keeps them paused until the peering object says
otherwise; it keeps that state to itself. This process passes kopf its peering identity and
priority, watches the same object, and applies kopf's rule (``process_peering_event``): it
acts while no other live peer (``lastseen + lifetime`` not passed) has a priority as high as
its own. Without the object (or before its watch has listed) it does not act, as kopf does
not. In standalone mode (no peering) the controller acts once started.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import socket
from collections.abc import Iterable

from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON, resource_path
from phabmesh.kube.informer import Informer
from phabmesh.leases.view import parse_time

GROUP, VERSION, PLURAL = "kopf.dev", "v1", "clusterkopfpeerings"


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


class PeeringView:
    """A watch of one ClusterKopfPeering, judged for this replica at each question."""

    def __init__(self, client: KubeClient, name: str, identity: str, priority: int) -> None:
        self.identity = identity
        self.priority = priority
        self.name = name
        self.informer: Informer[tuple[Peer, ...]] = Informer(
            client,
            resource_path(GROUP, VERSION, PLURAL),
            peers,
            params={"fieldSelector": f"metadata.name={name}"},
            name="peering",
        )

    async def run(self) -> None:
        await self.informer.run()

    def acting(self, now: datetime.datetime | None = None) -> bool:
        listed = self.informer.items.get(self.name)
        if listed is None or not self.informer.synced.is_set():
            return False
        return acting(
            listed, self.identity, self.priority, now or datetime.datetime.now(datetime.UTC)
        )
