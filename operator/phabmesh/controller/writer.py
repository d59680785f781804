"""The controller's writes: leases, statuses and Events. All I/O of the controller is here."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
from collections.abc import Callable
from typing import Any

import cachetools
import structlog

from phabmesh import identity, logs, metrics, resources
from phabmesh.clock import Clock, format_time, utcnow
from phabmesh.kube import Conflict, KubeClient, KubeError, NotFound, events
from phabmesh.kube.client import JSON
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, World
from phabmesh.resources import lease_path, resource_path

log = structlog.get_logger(__name__)


class LeaseBusy(Exception):
    """The lease's name is taken by one this process cannot finish yet (not seen on the
    watch yet, or Revoked and being deleted): the pod's reconcile is tried again later."""

    def __init__(self, namespace: str, name: str) -> None:
        super().__init__(f"lease {namespace}/{name} exists and is not this pod's Pending lease")


class NotActing(Exception):
    """This replica may not write now (kopf peering: another acts, or this one cannot show
    that it is alive): the write is not made, and the pod's reconcile is tried again later."""

    def __init__(self) -> None:
        super().__init__("this operator replica is not acting (peering): write deferred")


def lease_name(pod_name: str, binding: str, pod_uid: str) -> str:
    """``<pod>.<binding>.<uid prefix>``: one per pod incarnation and binding, ≤ 253 chars."""
    name = f"{pod_name}.{binding}.{pod_uid[:8]}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{pod_name[:100]}.{binding[:100]}.{digest}"


class Writer:
    """Every write the controller makes. Events go out in the background through their own
    client (its own rate limit), so a burst of them never delays a lease write.

    ``acting`` (with kopf peering: :meth:`phabmesh.controller.peering.PeeringView.acting`) is
    asked before every lease and status write; while it says no, the write raises
    :class:`NotActing` instead of reaching the API server, so that a replica that is paused,
    or that cannot show it is alive, never writes beside the one that acts. Standalone: None.
    """

    MAX_PENDING_EVENTS = 2000
    # Leases whose revocation was announced, newest last: a revocation is said once.
    MAX_ANNOUNCED = 10_000

    def __init__(
        self,
        client: KubeClient,
        world: World,
        clock: Clock = utcnow,
        *,
        events_client: KubeClient | None = None,
        acting: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.acting = acting
        self.events_client = events_client or client
        self.world = world
        self.clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self._announced: cachetools.LRUCache[tuple[str, str, str], None] = cachetools.LRUCache(
            self.MAX_ANNOUNCED
        )

    async def close(self) -> None:
        """Cancel the Events not posted yet (best effort, as all Events)."""
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)

    def _may_write(self) -> None:
        if self.acting is not None and not self.acting():
            metrics.current().writes_deferred.inc()
            raise NotActing

    async def issue(
        self,
        pod: identity.PodFacts,
        binding: BindingView,
        pod_identity: str,
        ttl: datetime.timedelta,
        bot_phid: str | None,
    ) -> LeaseView | None:
        """Create an Active lease owned by ``pod``, in one write; None when it already exists.

        Leases have no status subresource (only phabmesh writes them, spec and status alike:
        manifests/lease-policy.yaml), so the lease is created with its status, Active.
        """
        self._may_write()
        now = self.clock()
        name = lease_name(pod.name, binding.name, pod.uid)
        assert binding.bot is not None
        status: JSON = {
            "phase": "Active",
            "issuedAt": format_time(now),
            "renewedAt": format_time(now),
            "expiresAt": format_time(now + ttl),
        }
        if bot_phid:
            status["botPHID"] = bot_phid
        body: JSON = {
            "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
            "kind": resources.CREDENTIAL_KIND,
            "metadata": {
                "name": name,
                "namespace": pod.namespace,
                "labels": {
                    "phabmesh.io/binding": resources.label_value(binding.name),
                    "phabmesh.io/bot": resources.label_value(binding.bot),
                },
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod.name,
                        "uid": pod.uid,
                        "blockOwnerDeletion": False,
                        "controller": False,
                    }
                ],
            },
            "spec": {
                "podName": pod.name,
                "podUID": pod.uid,
                "serviceAccount": pod.service_account,
                "identity": pod_identity,
                "binding": binding.name,
                "bot": binding.bot,
            },
            "status": status,
        }
        try:
            updated = await self.client.create(lease_path(pod.namespace), body)
        except Conflict:
            # Already there: another pass created it (or an earlier create of this one
            # landed and its answer did not), or a lease without status from a version
            # that wrote it in two steps. Finish only this pod's, if this process has seen
            # it and it is still Pending; an Active one is fine as it is.
            existing = self.world.leases.get((pod.namespace, name))
            if existing is not None and existing.active:
                return None
            if existing is None or existing.pod_uid != pod.uid or existing.phase != "Pending":
                raise LeaseBusy(pod.namespace, name) from None
            # Only that lease, not one deleted and made again under its name meanwhile.
            ops: list[JSON] = [
                {"op": "test", "path": "/metadata/uid", "value": existing.uid},
                {"op": "add", "path": "/status", "value": status},
            ]
            updated = await self.client.json_patch(lease_path(pod.namespace, name), ops)
        lease = LeaseView.from_body(updated)
        self.world.put_lease(lease)
        metrics.current().lease_issued()
        log.info(
            "lease_issued",
            **{
                logs.NAMESPACE: pod.namespace,
                logs.POD: pod.name,
                logs.BINDING: binding.name,
                logs.BOT: binding.bot,
                logs.IDENTITY: pod_identity,
                logs.LEASE: name,
            },
        )
        await self.event(
            _pod_ref(pod.namespace, pod.name, pod.uid),
            "CredentialIssued",
            f"credential {name} issued for PhabricatorBot {binding.bot} "
            f"via binding {binding.name}, expires {format_time(now + ttl)}",
        )
        return lease

    async def renew(self, lease: LeaseView, ttl: datetime.timedelta) -> None:
        self._may_write()
        now = self.clock()
        status = {"renewedAt": format_time(now), "expiresAt": format_time(now + ttl)}
        try:
            updated = await self.client.merge_patch(
                lease_path(lease.namespace, lease.name), {"status": status}
            )
        except NotFound:
            self.world.drop_lease(lease.key)
            return
        self.world.put_lease(LeaseView.from_body(updated))
        log.debug("lease_renewed", **{logs.NAMESPACE: lease.namespace, logs.LEASE: lease.name})

    async def revoke(self, lease: LeaseView, reason: str, message: str = "") -> None:
        """Mark the lease Revoked (the gateway refuses it on this event), then delete it."""
        self._may_write()
        now = self.clock()
        path = lease_path(lease.namespace, lease.name)
        revoked: JSON = {
            "phase": "Revoked",
            "reason": reason,
            "revokedAt": format_time(now),
            "message": message or resources.revocation_message(reason),
        }
        options: JSON = {"propagationPolicy": "Background"}
        try:
            if lease.uid and lease.phase != "Pending":
                # Only this lease, not another one issued since under the same name (a
                # lease re-issued for another bot takes the name): a JSON patch whose
                # first operation tests the UID, and a delete with a UID precondition.
                ops = [{"op": "test", "path": "/metadata/uid", "value": lease.uid}]
                ops += [
                    {"op": "add", "path": f"/status/{k}", "value": v} for k, v in revoked.items()
                ]
                updated = await self.client.json_patch(path, ops)
                options["preconditions"] = {"uid": lease.uid}
            else:
                updated = await self.client.merge_patch(path, {"status": revoked})
            # Kept, Revoked, until the watch's DELETED event: a late event from its Active
            # past is older than this and cannot bring it back.
            self.world.put_lease(LeaseView.from_body(updated))
        except NotFound:
            self.world.drop_lease(lease.key)
            await self.announce_revoked(lease, reason)
            return
        # Revoked: the gateway refuses it from now on, whether or not the delete lands (a
        # failed one is retried: the pod's plan deletes what is Revoked and still there).
        await self.announce_revoked(lease, reason)
        with contextlib.suppress(NotFound):
            await self.client.delete(path, body=options)

    async def delete_revoked(self, lease: LeaseView) -> None:
        """Delete a lease left Revoked (its delete failed earlier), this one only."""
        self._may_write()
        options: JSON = {"propagationPolicy": "Background"}
        if lease.uid:
            options["preconditions"] = {"uid": lease.uid}
        try:
            await self.client.delete(lease_path(lease.namespace, lease.name), body=options)
        except NotFound:
            self.world.drop_lease(lease.key, lease.uid)
        except Conflict:  # another lease under that name now: this one is gone
            self.world.drop_lease(lease.key, lease.uid)

    async def announce_revoked(self, lease: LeaseView, reason: str) -> None:
        """The audit line and the pod's Event for a revoked lease (also for one the garbage
        collector deleted with its pod before the operator revoked it), once per lease:
        when the garbage collector deletes a lease while the operator revokes it, both the
        watch's DELETED and the revocation's write (answered NotFound) report it, and the
        first says it."""
        said = (lease.namespace, lease.name, lease.uid)
        if said in self._announced:
            return
        self._announced[said] = None
        metrics.current().lease_revoked(reason)
        log.info(
            "lease_revoked",
            **{
                logs.NAMESPACE: lease.namespace,
                logs.POD: lease.pod_name,
                logs.BINDING: lease.binding,
                logs.BOT: lease.bot,
                logs.LEASE: lease.name,
                logs.REASON: reason,
            },
        )
        await self.event(
            _pod_ref(lease.namespace, lease.pod_name, lease.pod_uid),
            "CredentialRevoked",
            f"credential {lease.name} for PhabricatorBot {lease.bot} revoked: {reason}",
        )

    async def event(self, ref: JSON, reason: str, message: str, type_: str = "Normal") -> None:
        """Post a Kubernetes Event about ``ref`` in the background; failures are logged, never
        raised. Past :attr:`MAX_PENDING_EVENTS` not yet posted, new ones are dropped."""
        if len(self._pending) >= self.MAX_PENDING_EVENTS:
            metrics.current().events.labels(outcome="dropped").inc()
            log.warning("event_dropped", reason=reason, pending=len(self._pending))
            return
        task = asyncio.create_task(self._post_event(ref, reason, message, type_))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _post_event(self, ref: JSON, reason: str, message: str, type_: str) -> None:
        body = events.event_body(
            ref,
            reason,
            message,
            type_,
            self.clock(),
            source="phabmesh",
            reporting_component="phabmesh.io/controller",
        )
        namespace = body["metadata"]["namespace"]
        try:
            await self.events_client.create(
                resource_path("", "v1", "events", namespace), body, attempts=1
            )
        except Exception as exc:  # an Event is best effort
            metrics.current().events.labels(outcome="failed").inc()
            log.warning("event_post_failed", reason=reason, error=str(exc))
        else:
            metrics.current().events.labels(outcome="posted").inc()

    async def remove_finalizer(self, path: str, index: int, finalizer: str) -> None:
        """Take ``finalizer`` off the object at ``path``, where the watch last showed it at
        ``index`` (a test-and-remove: nothing else is touched; a stale index fails the test,
        and the object's next event tries again)."""
        self._may_write()
        at = f"/metadata/finalizers/{index}"
        try:
            await self.client.json_patch(
                path, [{"op": "test", "path": at, "value": finalizer}, {"op": "remove", "path": at}]
            )
        except (NotFound, Conflict):
            return
        except KubeError as exc:
            if exc.status != 422:  # the test failed: the list changed meanwhile
                raise

    async def patch_status(self, path: str, status: JSON) -> JSON | None:
        """Merge ``status`` in; the object as the API server then holds it (None: gone).

        Its ``metadata.resourceVersion`` tells a later watch event about an earlier state
        (which must not undo what this answer shows) from a newer one."""
        self._may_write()
        try:
            return await self.client.merge_patch(path + "/status", {"status": status})
        except NotFound:
            return None


def _pod_ref(namespace: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name, "uid": uid}
