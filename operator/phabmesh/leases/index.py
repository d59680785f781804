"""A watched index of every PhabricatorCredential (lease), for the issuer and the gateway.

Kept current by one watch; lookups by pod UID, by lease UID and by the locator of a
Phorge-shaped credential cost no API call. While the watch is disconnected,
or silent for ``liveness`` seconds (stalled), ``connected`` is False and readers fail closed.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
from collections.abc import Callable, Iterable
from typing import TypeVar

from phabmesh import resources
from phabmesh.clock import utcnow
from phabmesh.credentials import phorge
from phabmesh.kube import KubeClient, shapes
from phabmesh.kube.informer import DEFAULT_LIVENESS, DELETED, Informer
from phabmesh.leases.view import LeaseView

T = TypeVar("T")
TOMBSTONES = 100_000  # bounded memory: about 15 MB at most
# Of the most recently removed leases, what a Phorge-shaped credential's MAC needs, so that
# the refusal can say why its lease went (older ones are refused as matching no lease):
# about 6 MB at most.
BURIED = 20_000
# Earlier terms kept per lease, and how long past its end one is kept (beyond any clock skew
# the expiry check tolerates): a term's credentials are refused as expired after that anyway.
EARLIER_TERMS = 2
TERM_KEPT_PAST_END = datetime.timedelta(minutes=10)


class LeaseIndex:
    def __init__(
        self,
        client: KubeClient,
        on_revoked: Callable[[LeaseView], None] | None = None,
        liveness: float = DEFAULT_LIVENESS,
        *,
        informer: Informer[LeaseView] | None = None,
    ) -> None:
        self.on_revoked = on_revoked
        self.by_uid: dict[str, LeaseView] = {}
        # A pod has a lease or two, a locator one lease: tuples (a dict each is 184 bytes).
        self.by_pod: dict[str, tuple[LeaseView, ...]] = {}
        self._uid_of: dict[str, str] = {}  # "ns/name" -> lease uid
        # Why recently removed leases went: so a refusal can say "pod deleted", not just "gone".
        self.tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        # Phorge-shaped credentials name their lease by locator: locator -> lease uid ->
        # ((lease, its digest), ...); and of the tombstoned leases, locator -> lease uid -> digest.
        self._by_locator: dict[str, tuple[tuple[LeaseView, bytes], ...]] = {}
        self._buried: dict[str, tuple[tuple[str, bytes], ...]] = {}
        self._buried_order: collections.deque[tuple[str, str]] = collections.deque()
        # Earlier terms of each lease seen on the watch, newest last: (expiresAt, start) in
        # Unix seconds, each as one status write set them (see term_start).
        self._terms: dict[str, tuple[tuple[int, int], ...]] = {}
        # The process's lease watch when it has one (leases.watches), else one of its own.
        self._own = informer is None
        if informer is None:
            informer = Informer(
                client,
                resources.lease_path(None),
                LeaseView.from_body,
                name="leases",
                liveness=liveness,
                shape=shapes.LEASE,
            )
        informer.subscribe(self._on_event)
        self.informer: Informer[LeaseView] = informer

    @property
    def connected(self) -> bool:
        return self.informer.connected

    @property
    def synced(self) -> bool:
        return self.informer.synced.is_set()

    async def run(self) -> None:
        if not self._own:  # the process runs the watch
            await asyncio.Event().wait()
        await self.informer.run()

    def _on_event(self, kind: str, key: str, lease: LeaseView | None) -> None:
        old_uid = self._uid_of.pop(key, None)
        old: LeaseView | None = None
        if old_uid is not None:
            old = self.by_uid.pop(old_uid, None)
            if old is not None:
                _unfile(self.by_pod, old.pod_uid, old_uid, lambda lease: lease.uid)
                _unfile(self._by_locator, phorge.locator(old_uid), old_uid, _filed_uid)
        if kind == DELETED or lease is None:
            if old_uid is not None:
                self._terms.pop(old_uid, None)
                self._bury(old_uid, old)
            return
        if old_uid is not None and old_uid != lease.uid:  # re-created under the same name
            self._terms.pop(old_uid, None)
        elif old is not None:
            self._remember_term(old, lease)
        revoked_now = lease.phase == "Revoked" and (old is None or old.phase != "Revoked")
        if revoked_now and self.on_revoked is not None:
            self.on_revoked(lease)
        self._uid_of[key] = lease.uid
        self.by_uid[lease.uid] = lease
        self.by_pod[lease.pod_uid] = (*self.by_pod.get(lease.pod_uid, ()), lease)
        locator = phorge.locator(lease.uid)
        filed = (lease, lease.phorge_digest())
        self._by_locator[locator] = (*self._by_locator.get(locator, ()), filed)

    def _remember_term(self, old: LeaseView, new: LeaseView) -> None:
        """Keep ``old``'s term if ``new`` starts another (a renewal or a shortening)."""
        if old.expires_at is None or (old.expires_at, old.renewed_at) == (
            new.expires_at,
            new.renewed_at,
        ):
            return
        start = old.renewed_at or old.issued_at
        if start is None:
            return
        horizon = utcnow() - TERM_KEPT_PAST_END
        term = (int(old.expires_at.timestamp()), int(start.timestamp()))
        kept = [t for t in self._terms.get(old.uid, ()) if t[0] > horizon.timestamp()]
        if term[0] > horizon.timestamp() and term not in kept:
            kept.append(term)
        if kept:
            self._terms[old.uid] = tuple(kept[-EARLIER_TERMS:])
        else:
            self._terms.pop(old.uid, None)

    def term_start(self, lease: LeaseView, expiry: datetime.datetime) -> datetime.datetime | None:
        """The earliest a credential of ``lease`` ending at ``expiry`` can have been made.

        A credential ends at its lease's ``expiresAt`` as it was when it was made: the term
        with that end began at its ``renewedAt`` (``issuedAt`` for the first), both written
        by the operator in the one status write that set the end, and the credential was
        made after that. The current term is on the lease; earlier ones are those this watch
        saw (the last :data:`EARLIER_TERMS`). Otherwise the lease's ``issuedAt``: no
        credential of a lease is older than the lease. None: the lease says neither.
        """
        second = int(expiry.timestamp())
        if lease.expires_at is not None and int(lease.expires_at.timestamp()) == second:
            current = lease.renewed_at or lease.issued_at
            if current is not None:
                return current
        for end, start in reversed(self._terms.get(lease.uid, ())):
            if end == second:
                return datetime.datetime.fromtimestamp(start, datetime.UTC)
        return lease.issued_at

    def _bury(self, uid: str, old: LeaseView | None) -> None:
        self.tombstones[uid] = (old.reason if old is not None else "") or "Deleted"
        while len(self.tombstones) > TOMBSTONES:
            self.tombstones.popitem(last=False)
        if old is None:
            return
        locator = phorge.locator(uid)
        self._buried[locator] = (*self._buried.get(locator, ()), (uid, old.phorge_digest()))
        self._buried_order.append((locator, uid))
        while len(self._buried_order) > BURIED:
            locator, gone = self._buried_order.popleft()
            _unfile(self._buried, locator, gone, lambda entry: entry[0])

    def at_locator(self, locator: str) -> Iterable[tuple[LeaseView, bytes]]:
        """The leases a Phorge-shaped credential with this locator may belong to (usually
        one), each with its digest."""
        return self._by_locator.get(locator, ())

    def buried_at(self, locator: str) -> Iterable[tuple[str, bytes]]:
        """Recently removed leases with this locator: (lease uid, digest) each."""
        return self._buried.get(locator, ())

    def of_pod(self, pod_uid: str) -> list[LeaseView]:
        return list(self.by_pod.get(pod_uid, ()))


def _filed_uid(filed: tuple[LeaseView, bytes]) -> str:
    return filed[0].uid


def _unfile(index: dict[str, tuple[T, ...]], at: str, uid: str, uid_of: Callable[[T], str]) -> None:
    """Take the entry of lease ``uid`` out of ``index[at]`` (and the key once empty)."""
    kept = tuple(entry for entry in index.get(at, ()) if uid_of(entry) != uid)
    if kept:
        index[at] = kept
    else:
        index.pop(at, None)
