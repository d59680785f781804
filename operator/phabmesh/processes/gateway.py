"""The gateway process: watches, the Conduit endpoint, Herald webhooks, and health/metrics."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable

import structlog
from aiohttp import web

from phabmesh import memory, metrics, serving, tasks
from phabmesh.gateway.app import Gateway
from phabmesh.gateway.hooks import Hooks
from phabmesh.gateway.state import GatewayState
from phabmesh.kube import KubeClient, load_connection
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)
GATEWAY_READ_BUFSIZE = 16 * 1024


class GatewayProcess:
    def __init__(
        self,
        settings: Settings,
        *,
        kubeconfig: str | None = None,
        clock: Callable[[], datetime.datetime] | None = None,
        reuse_port: bool = False,
        metrics_host: str | None = None,
    ) -> None:
        self.settings = settings
        # One of several worker processes (processes.gateway_workers): the gateway's ports
        # shared with SO_REUSEPORT, its health and metrics on a port of its own.
        self.reuse_port = reuse_port
        self.metrics_host = metrics_host
        self.kubeconfig = kubeconfig
        self.clock = clock  # None: the system clock (another only to test clock skew)
        self.runners: list[web.AppRunner] = []
        self.port = 0
        self.hooks_port = 0
        self.metrics_port = 0
        # Its own registry: what this process records, and nothing another process of the
        # same interpreter does (see phabmesh.metrics).
        self.metrics = metrics.Metrics(metrics.GATEWAY)

    async def start(self) -> None:
        metrics.use(self.metrics)  # for everything started from here
        s = self.settings
        self.client = KubeClient(
            load_connection(self.kubeconfig),
            qps=s.kube_qps,
            burst=s.kube_burst,
            component="gateway",
            policy=s.backoff(),
        )
        self.state = GatewayState(s, self.client)
        state = self.state
        self.metrics.fail_closed_from(lambda: not state.ready)
        await self.state.start()
        self.trimming = tasks.spawn("memory-trim", memory.Trimmer().run, s.backoff())
        self.gateway = Gateway(s, self.state, clock=self.clock)
        await self.gateway.workers.start()
        # aiohttp's own body limit sits above ours so that ours answers in Conduit's envelope.
        app = web.Application(client_max_size=s.max_request_bytes + 1)
        self.gateway.routes(app)
        self.hooks = Hooks(self.gateway)
        self.hooks.routes(app)
        # Each connection buffers at most 32 KiB of a body its handler has not read yet: a
        # flood of connections costs little memory before the body budget refuses them.
        runner = await serving.start_site(
            app,
            s.gateway_host,
            s.gateway_port,
            read_bufsize=GATEWAY_READ_BUFSIZE,
            reuse_port=self.reuse_port,
        )
        self.runners.append(runner)
        self.port = serving.bound_port(runner)
        # /hooks/ alone, on a port of its own: the one a Phorge outside the mesh may be let in
        # on (the shipped policies: meshed callers only, unless told otherwise).
        hooks_app = web.Application(client_max_size=s.max_request_bytes + 1)
        self.hooks.routes(hooks_app)
        runner = await serving.start_site(
            hooks_app,
            s.gateway_host,
            s.hooks_port,
            read_bufsize=GATEWAY_READ_BUFSIZE,
            reuse_port=self.reuse_port,
        )
        self.runners.append(runner)
        self.hooks_port = serving.bound_port(runner)
        health = web.Application()
        serving.add_health_routes(health, lambda: self.state.ready, self.metrics.registry)
        runner = await serving.start_site(
            health, self.metrics_host or s.gateway_host, s.metrics_port
        )
        self.runners.append(runner)
        self.metrics_port = serving.bound_port(runner)
        log.info(
            "gateway_started",
            port=self.port,
            hooks_port=self.hooks_port,
            metrics_port=self.metrics_port,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.state.ready:  # noqa: ASYNC110 - readiness combines several watches
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.trimming.cancel()
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()
        await self.hooks.close()
        await self.gateway.close()
        await asyncio.gather(self.trimming, return_exceptions=True)
        await self.state.stop()
        await self.client.close()

    async def run_until_signalled(self) -> None:
        await self.start()
        await serving.until_signalled()
        await self.stop()
