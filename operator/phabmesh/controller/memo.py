"""The controller's memo: what the controller's parts share (settings, World, clients,
writer, the process's watches) and the reconcilers
(:mod:`phabmesh.controller.reconcilers`), one per concern."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import kopf
import requests
import structlog

from phabmesh import conduit, identity, metrics, tasks
from phabmesh.clock import Clock, utcnow
from phabmesh.controller import reconcilers, webhooks
from phabmesh.controller.driver import Controller, Work
from phabmesh.controller.writer import Writer
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.informer import Informer
from phabmesh.leases.watches import SecretToken, Watches
from phabmesh.leases.world import World
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)


class Memo(kopf.Memo):
    """Shared by every handler of the controller in one operator process (kopf's ``memo``)."""

    def __init__(
        self,
        settings: Settings,
        *,
        kubeconfig: str | None = None,
        conduit_client: conduit.ConduitClient | None = None,
        clock: Clock = utcnow,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.kubeconfig = kubeconfig
        self.clock = clock
        self.naming = identity.Naming(
            control_plane_namespace=settings.linkerd_namespace,
            trust_domain=settings.trust_domain,
        )
        self.world = World()
        self.conduit = conduit_client or conduit.ConduitClient(
            settings.phabricator_url,
            session=requests.Session(),
            timeout=settings.conduit_timeout,
            attempts=settings.conduit_attempts,
            policy=settings.backoff(),
        )
        self._tasks: list[asyncio.Task[None]] = []
        # The reconcilers, made here: kopf hands each object's handlers a shallow copy of
        # the memo, so an attribute assigned later would not be seen by the others.
        self.bots = reconcilers.Bots(self)
        self.bindings = reconcilers.Bindings(self)
        self.leases = reconcilers.Leases(self)
        self.webhooks = webhooks.Webhooks(self)
        # With kopf peering: whether this replica may write now (PeeringView.acting), asked by
        # the Writer before each write; None when the controller runs alone.
        self.acting: Callable[[], bool] | None = None
        self.client: KubeClient
        self._own_client = True
        # The process's shared watches, and the controller they drive (use_watches).
        self.watches: Watches
        self.controller: Controller
        self.events_client: KubeClient
        self.writer: Writer

    # -- lifecycle ------------------------------------------------------------------------

    def use_client(self, client: KubeClient) -> None:
        """Talk to the API server through the process's own client (one request budget per
        process); without it, :meth:`start` makes one."""
        self.client = client
        self._own_client = False

    def use_watches(self, watches: Watches) -> None:
        """Drive the controller from the process's shared watches (before they run)."""
        self.watches = watches
        self.controller = Controller(self, watches, acting=self._acting)

    @property
    def secrets(self) -> Informer[SecretToken]:
        """The Secrets of phabmesh's namespace (bot tokens among them), from the process's
        watch."""
        return self.watches.secrets

    def requeue_pod(self, uid: str) -> None:
        """The pod's leases to be reconciled again, as its queued work."""
        self.controller.queue.put(Work("pod", uid))

    def requeue_namespace(self, namespace: str) -> None:
        """The namespace's bindings judged and its pods reconciled again, as its queued work."""
        self.controller.queue.put(Work("namespace", namespace))

    def requeue_pods_in(self, namespace: str) -> None:
        """Every pod of the namespace the World holds reconciled again, each as its own
        queued work. Only pods seen: a lease whose pod the pod watch has not shown yet is not
        a deleted pod's (a deleted pod's work is queued by its event, and the leases of pods
        gone while the operator was away by the start-up sweep)."""
        for uid in list(self.world.pods_by_ns.get(namespace, ())):
            self.controller.queue.put(Work("pod", uid))

    def _acting(self) -> bool:
        return self.acting is None or self.acting()

    async def start(self) -> None:
        """Clients, writer and the controller's own tasks; then wait until every watch
        has listed and the start-up sweep has run (:meth:`Controller.start`)."""
        connection = load_connection(self.kubeconfig)
        if self._own_client:
            self.client = KubeClient(
                connection,
                qps=self.settings.kube_qps,
                burst=self.settings.kube_burst,
                component="operator",
                policy=self.settings.backoff(),
            )
        # Events: their own, smaller budget, so that they never hold up a lease write.
        self.events_client = KubeClient(
            connection,
            qps=max(1.0, self.settings.kube_qps / 4),
            burst=max(1, self.settings.kube_burst // 4),
            connections=16,
            component=self.client.component,
            policy=self.settings.backoff(),
        )
        self.writer = Writer(
            self.client,
            self.world,
            self.clock,
            events_client=self.events_client,
            acting=self.acting,
        )
        self._tasks.append(
            tasks.spawn("webhook-checks", self.webhooks.run, self.settings.backoff())
        )
        self._tasks.append(
            tasks.spawn("controller-work", self.controller.queue.run, self.settings.backoff())
        )
        self._tasks.append(tasks.spawn("bot-ticks", self.controller.ticks, self.settings.backoff()))
        swept = await self.controller.start()
        metrics.current().active_leases.track(self.world)  # phabmesh_leases_active
        log.info("controller_ready", swept=swept)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.leases.close()
        await self.bindings.close()
        await self.writer.close()
        await self.events_client.close()
        if self._own_client:
            await self.client.close()
        self.conduit.session.close()
