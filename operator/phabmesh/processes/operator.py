"""The operator process: the controller and the credential endpoint side by side,
and the pod-injection webhook in a child process it supervises.

The controller and the endpoint share one Kubernetes client and one event loop; the
endpoint keeps serving on a standby replica (peering pauses only the controller's
work), and so does the webhook. The webhook is kept off this loop
(:mod:`phabmesh.admission.server`): what its callers send costs its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import structlog
from aiohttp import web

from phabmesh import controller, gatewayrole, memory, metrics, serving, tasks
from phabmesh.admission.server import WebhookSupervisor
from phabmesh.admission.tls import WebhookTLS, service_names
from phabmesh.controller import peering
from phabmesh.controller.memo import Memo
from phabmesh.credentials.keystore import KeyStore
from phabmesh.endpoint.app import CredentialEndpoint, TokenReviewer
from phabmesh.kube import KubeClient, load_connection
from phabmesh.leases.grants import Grants, binding_facts, bot_facts
from phabmesh.leases.index import LeaseIndex
from phabmesh.leases.watches import Watches
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)
PEERING_NAME = "phabmesh"  # the ClusterKopfPeering of the replicas (manifests/peering.yaml)


class OperatorProcess:
    """Start with :meth:`start`, stop with :meth:`stop`; ports are known after start."""

    def __init__(
        self, settings: Settings, *, kubeconfig: str | None = None, standalone: bool = True
    ) -> None:
        self.settings = settings
        self.kubeconfig = kubeconfig
        self.standalone = standalone
        self.stop_flag = asyncio.Event()
        self.controller_ready = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.runners: list[web.AppRunner] = []
        self.endpoint_port = 0
        self.metrics_port = 0
        self.webhook_port = 0
        # Its own registry: what this process records, and nothing another process of the
        # same interpreter does (see phabmesh.metrics).
        self.metrics = metrics.Metrics(metrics.OPERATOR)
        self.peering_identity = peering.new_identity()
        self.peering_priority = peering.new_priority()
        self.peering: peering.PeeringView | None = None
        self.controller_task: asyncio.Task[None] | None = None
        # The controller's state (its World, clients, retries), kept for inspection.
        self.memo = Memo(settings, kubeconfig=kubeconfig)

    def ready(self) -> bool:
        return self.controller_ready.is_set() and self.endpoint.ready and self.webhook.settled

    def acting(self) -> bool:
        """The controller runs and is not paused by peering (phabmesh_operator_acting)."""
        task = self.controller_task
        if task is None or task.done() or self.stop_flag.is_set():
            return False
        if not self.controller_ready.is_set():
            return False
        return self.peering is None or self.peering.acting()

    async def start(self) -> None:
        metrics.use(self.metrics)  # for everything started from here, the controller included
        self.metrics.acting_from(self.acting)
        s = self.settings
        self.client = KubeClient(
            load_connection(self.kubeconfig),
            qps=s.kube_qps,
            burst=s.kube_burst,
            component=f"operator; {self.peering_identity}",
            policy=s.backoff(),
        )
        self.memo.use_client(self.client)  # one client, one request budget, for the process
        # One watch per resource for the whole process: the controller's World, the
        # endpoint's grants and lease index, and the gateway Role keeper read them.
        self.watches = Watches(
            self.client,
            self.memo.naming,
            namespace=s.namespace,
            liveness=s.watch_liveness,
            unmeshed_pods=s.watch_unmeshed_pods,
        )
        self.memo.use_watches(self.watches)
        self.keys = KeyStore(
            self.client,
            s.namespace,
            s.signing_secret,
            rotate_every=datetime.timedelta(seconds=s.key_rotation_interval),
            max_credential_ttl=datetime.timedelta(seconds=s.max_credential_ttl + s.clock_skew),
            secrets=self.watches.secrets,
        )
        self.leases = LeaseIndex(self.client, informer=self.watches.leases)
        grants = Grants(
            self.client,
            self.memo.naming,
            bindings=self.watches.bindings.view(binding_facts, name="grant-bindings"),
            bots=self.watches.bots.view(bot_facts, name="grant-bots"),
            namespaces=self.watches.namespaces,
        )
        self.endpoint = CredentialEndpoint(
            s,
            self.client,
            self.keys,
            self.leases,
            TokenReviewer.from_settings(self.client, s),
            grants=grants,
        )
        await self.keys.ensure()
        self.tasks.append(tasks.spawn("signing-keys", self.keys.run, s.backoff()))
        self.tasks.append(tasks.spawn("memory-trim", memory.Trimmer().run, s.backoff()))
        for name, loop in self.watches.tasks().items():
            self.tasks.append(tasks.spawn(name, loop, s.backoff()))
        self.webhook_tls = WebhookTLS(
            self.client,
            s.namespace,
            s.webhook_secret,
            s.webhook_configuration,
            service_names(s.webhook_service, s.namespace),
        )
        await self.webhook_tls.refresh()
        self.tasks.append(tasks.spawn("webhook-tls", self.webhook_tls.run, s.backoff()))
        # Which bot-token Secrets the gateway may read: the bots' own, never these two.
        self.gateway_role = gatewayrole.RoleKeeper(
            self.client,
            s.namespace,
            self.endpoint.grants.bots,
            excluded={s.webhook_secret, s.signing_secret},
            acting=self.acting,
            liveness=s.watch_liveness,
        )
        self.tasks.append(tasks.spawn("gateway-role", self.gateway_role.run, s.backoff()))
        self.webhook_port = s.webhook_port or serving.free_port(s.webhook_host)
        self.webhook = WebhookSupervisor(
            s.replace(webhook_port=self.webhook_port), kubeconfig=self.kubeconfig
        )
        self.tasks.append(tasks.spawn("webhook-process", self.webhook.run, s.backoff()))
        if not self.standalone:
            self.peering = peering.PeeringView(
                self.client,
                PEERING_NAME,
                self.peering_identity,
                self.peering_priority,
                int(s.peering_lifetime),
            )
            self.tasks.append(tasks.spawn("peering", self.peering.run, s.backoff()))
            self.memo.acting = self.peering.acting  # the controller writes only while acting
        self.controller_task = asyncio.create_task(
            controller.operate(
                s,
                kubeconfig=self.kubeconfig,
                stop_flag=self.stop_flag,
                ready_flag=self.controller_ready,
                memo=self.memo,
            )
        )
        self.tasks.append(self.controller_task)  # last: stop() and run_until_signalled() wait on it
        app = web.Application(client_max_size=64 * 1024)
        self.endpoint.routes(app)
        runner = await serving.start_site(app, s.endpoint_host, s.endpoint_port)
        self.runners.append(runner)
        self.endpoint_port = serving.bound_port(runner)
        health = web.Application()
        serving.add_health_routes(health, self.ready, self.metrics.registry)
        runner = await serving.start_site(health, s.endpoint_host, s.metrics_port)
        self.runners.append(runner)
        self.metrics_port = serving.bound_port(runner)
        log.info(
            "operator_started",
            endpoint_port=self.endpoint_port,
            metrics_port=self.metrics_port,
            webhook_port=self.webhook_port,
        )

    async def stop(self) -> None:
        self.stop_flag.set()
        if self.peering is not None:
            self.peering.stopping = True  # no renewal from now on
        for runner in self.runners:
            await runner.cleanup()
        controller_task = self.tasks[-1] if self.tasks else None
        if controller_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(controller_task), timeout=10)
        if self.peering is not None:
            # The controller has stopped: its entry goes, and another replica acts at once.
            await self.peering.goodbye()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()

    async def run_until_signalled(self) -> None:
        await self.start()
        await serving.until_signalled(self.tasks[-1])  # or the controller ends
        await self.stop()
