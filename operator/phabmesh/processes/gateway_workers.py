"""Several gateway processes behind one pod's ports (``PHABMESH_GATEWAY_WORKERS`` > 1).

One Python process runs the gateway on one CPU at most. With more workers, a parent process
starts that many gateway processes (:class:`~phabmesh.processes.gateway.GatewayProcess`,
each a fresh interpreter), all listening on the gateway's and the hooks' ports with
``SO_REUSEPORT``: the kernel spreads incoming connections over them. The parent holds each
port bound (not listening) from before the first worker starts until the last one stopped, so
that port 0 means one port for all, and nothing else takes it between two workers.

Each worker keeps its own watches (leases, bindings, bots, their Secrets, keys, pods,
webhooks), exactly as a single gateway does: a call never waits for another process, and a
worker judges credentials by what it has seen itself, failing closed while its own watches
are down. The price is memory (a copy of the watched objects per worker) and one more watch
connection per resource and worker at the API server.

The parent serves the health and metrics port:

- ``/readyz``: 200 only while every worker is running and answers its own ``/readyz`` with
  200 (its watches synced, its keys loaded).
- ``/metrics``: the workers' metrics (each scraped on its own loopback port) as one process
  would show them: counters and histograms summed over the workers, and over workers that
  have since exited as last scraped (a counter does not go back when a worker is replaced);
  gauges the highest of the workers' (``phabmesh_watch_*`` and start times: the lowest; the
  processes' memory and open files: summed); the parent's own process metrics added in. And
  the parent's own: ``phabmesh_gateway_worker_restarts_total`` and, per worker slot,
  ``phabmesh_gateway_worker_requests_total`` (the calls the worker now in that slot counted).

A worker that exits is logged (``gateway_worker_exited``), counted, and started again after
the retry policy's pause (``PHABMESH_RETRY_FIRST``, doubling up to ``PHABMESH_RETRY_CAP``
while it keeps exiting within that cap of its start; :mod:`phabmesh.backoff`). On SIGTERM
the parent sends SIGTERM to every worker: each stops accepting and finishes the calls it
has (aiohttp's graceful shutdown), then exits. A worker whose parent is gone (its pipe to
the parent closes) stops the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import signal
import socket
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from phabmesh import logs, serving
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)

# How long a worker may take from its start to serving (an interpreter, then its watches'
# first lists are not waited for: readiness says when they are done).
START_TIMEOUT = 120.0
# How long a worker may take to finish its calls once told to stop, before it is killed.
STOP_TIMEOUT = 70.0
SCRAPE_TIMEOUT = 5.0
# Gauges whose sum over the workers is the pod's figure, and those whose lowest value is.
SUMMED_GAUGES = frozenset(
    {"process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"}
)
LOWEST_GAUGES = frozenset(
    {
        "phabmesh_watch_connected",
        "phabmesh_watch_last_resync_timestamp_seconds",
        "process_start_time_seconds",
    }
)
COUNTED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
REQUESTS = "phabmesh_gateway_requests_total"

Key = tuple[str, tuple[tuple[str, str], ...]]


def worker_settings(settings: Settings, port: int, hooks_port: int) -> Settings:
    """What each worker runs with: the ports the parent holds, its own metrics port (any,
    on loopback), its share of the decoding workers."""
    return settings.replace(
        gateway_port=port,
        hooks_port=hooks_port,
        metrics_port=0,
        gateway_workers=1,
        gateway_decode_workers=max(1, settings.gateway_decode_workers // settings.gateway_workers),
    )


def _main(env: dict[str, str], kubeconfig: str | None, parent: Connection) -> None:
    """A worker process: a gateway on the shared ports until SIGTERM or its parent is gone."""
    settings = Settings.from_env(env)
    logs.configure(settings.log_level, settings.log_json)
    # Ctrl-C in a terminal reaches every process of the group: the parent stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(settings, kubeconfig, parent))


async def _serve(settings: Settings, kubeconfig: str | None, parent: Connection) -> None:
    # Imported in the worker only: the parent needs none of the gateway's own modules.
    from phabmesh.processes.gateway import GatewayProcess

    process = GatewayProcess(
        settings, kubeconfig=kubeconfig, reuse_port=True, metrics_host="127.0.0.1"
    )
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(parent.fileno(), done.set)  # the parent never writes: readable = gone
    try:
        await process.start()
        parent.send(process.metrics_port)
        await done.wait()
    finally:
        loop.remove_reader(parent.fileno())
        await process.stop()
        parent.close()


@dataclasses.dataclass
class Worker:
    slot: int
    process: BaseProcess
    pipe: Connection  # kept open while the parent lives: the worker stops when it closes
    metrics_port: int
    last: str = ""  # its metrics as last scraped
    started: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid or 0


def _reserve(host: str, port: int) -> socket.socket:
    """``port`` (0: any) bound, not listening, so that workers can listen on it beside it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def _exited(process: BaseProcess) -> None:
    """Until ``process`` has exited (its sentinel turns readable), then reaped."""
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    sentinel = process.sentinel

    def exited() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(sentinel, exited)
    try:
        await ended
    finally:
        loop.remove_reader(sentinel)
    await asyncio.to_thread(process.join)


class Merged(Collector):
    """Metric families parsed from several processes' expositions, merged (see the module's
    docstring); ``retired`` holds what exited workers had counted, as last scraped."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[str, dict[Key, float]] = {}

    def add(self, text: str, counted_only: bool = False) -> None:
        for family in text_string_to_metric_families(text):
            counted = family.type in COUNTED
            if counted_only and not counted:
                continue
            if family.name not in self.families:
                self.families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            values = self.values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in values:
                    values[key] = sample.value
                elif counted or family.name in SUMMED_GAUGES:
                    values[key] += sample.value
                elif family.name in LOWEST_GAUGES or family.name.endswith("_created"):
                    values[key] = min(values[key], sample.value)
                else:
                    values[key] = max(values[key], sample.value)

    def merge(self, other: Merged) -> None:
        for name, family in other.families.items():
            self.families.setdefault(name, family)
            values = self.values.setdefault(name, {})
            for key, value in other.values[name].items():
                values[key] = values.get(key, 0.0) + value

    def collect(self) -> Iterable[Metric]:
        for name, family in self.families.items():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for (sample, labels), value in self.values[name].items():
                merged.add_sample(sample, dict(labels), value)
            yield merged


def requests_counted(text: str) -> float:
    """The calls one worker's exposition counts (phabmesh_gateway_requests_total, summed)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == REQUESTS
    )


class GatewayWorkers:
    """The parent of ``settings.gateway_workers`` gateway processes (see the module)."""

    def __init__(self, settings: Settings, *, kubeconfig: str | None = None) -> None:
        self.settings = settings
        self.kubeconfig = kubeconfig
        self.count = settings.gateway_workers
        self.policy = settings.backoff()
        self._exits: dict[int, int] = {}  # slot -> exits in a row, each soon after its start
        self.workers: list[Worker | None] = [None] * self.count
        self.port = 0
        self.hooks_port = 0
        self.metrics_port = 0
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.restarts = Counter(
            "phabmesh_gateway_worker_restarts_total",
            "Gateway worker processes that exited while the gateway ran, each started again",
            registry=self.registry,
        )
        self.retired = Merged()  # what exited workers counted, as last scraped
        self._reserved: list[socket.socket] = []
        self._env: dict[str, str] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None
        self._context = multiprocessing.get_context("spawn")

    @property
    def pids(self) -> list[int]:
        return [w.pid if w is not None else 0 for w in self.workers]

    async def start(self) -> None:
        s = self.settings
        self._reserved = [_reserve(s.gateway_host, s.gateway_port)]
        self.port = self._reserved[0].getsockname()[1]
        self._reserved.append(_reserve(s.gateway_host, s.hooks_port))
        self.hooks_port = self._reserved[1].getsockname()[1]
        self._env = worker_settings(s, self.port, self.hooks_port).to_env()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        started = await asyncio.gather(
            *(self._spawn(slot) for slot in range(self.count)), return_exceptions=True
        )
        for worker in started:
            if isinstance(worker, Worker):
                self._install(worker)
        failed = [w for w in started if isinstance(w, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]
        health = web.Application()
        health.router.add_get("/healthz", self._healthz)
        health.router.add_get("/readyz", self._readyz)
        health.router.add_get("/metrics", self._metrics)
        self._runner = await serving.start_site(health, s.gateway_host, s.metrics_port)
        self.metrics_port = serving.bound_port(self._runner)
        log.info(
            "gateway_started",
            port=self.port,
            hooks_port=self.hooks_port,
            metrics_port=self.metrics_port,
            workers=self.pids,
        )

    async def _spawn(self, slot: int) -> Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_main,
            args=(self._env, self.kubeconfig, theirs),
            name=f"phabmesh-gateway-{slot}",
        )
        process.start()
        theirs.close()
        try:
            port = await asyncio.to_thread(_receive, ours, START_TIMEOUT)
        except BaseException:
            ours.close()
            process.terminate()
            await asyncio.to_thread(process.join, 10)
            raise
        if port is None:
            ours.close()
            await asyncio.to_thread(process.join, 10)
            raise RuntimeError(
                f"gateway worker {slot} did not start serving within {START_TIMEOUT:g} s "
                f"(exit code {process.exitcode}); its log says why"
            )
        return Worker(slot, process, ours, port)

    def _install(self, worker: Worker) -> None:
        self.workers[worker.slot] = worker
        self._watchers.append(asyncio.create_task(self._supervise(worker)))

    async def _supervise(self, worker: Worker) -> None:
        """Start a worker again when it exits (unless the gateway is stopping)."""
        await _exited(worker.process)
        worker.pipe.close()
        if self._stopping:
            return
        self.workers[worker.slot] = None
        if worker.last:
            self.retired.add(worker.last, counted_only=True)
        self.restarts.inc()
        log.warning(
            "gateway_worker_exited",
            worker=worker.slot,
            pid=worker.pid,
            exit_code=worker.process.exitcode,
        )
        lived = time.monotonic() - worker.started
        exits = 1 if lived > self.policy.cap else self._exits.get(worker.slot, 0) + 1
        self._exits[worker.slot] = exits
        while not self._stopping:
            await asyncio.sleep(self.policy.delay(exits))
            if self._stopping:
                return
            try:
                replacement = await self._spawn(worker.slot)
            except Exception as exc:  # logged, tried again
                log.warning("gateway_worker_start_failed", worker=worker.slot, error=str(exc))
                exits += 1
                continue
            if self._stopping:
                replacement.process.terminate()
                await _exited(replacement.process)
                return
            self._install(replacement)
            log.info("gateway_worker_started", worker=worker.slot, pid=replacement.pid)
            return

    async def _get(self, worker: Worker, path: str) -> tuple[int, str]:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{worker.metrics_port}{path}") as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError):
            return 0, ""

    async def ready(self) -> bool:
        """Every worker running and ready."""
        workers = list(self.workers)
        if self._stopping or any(w is None or not w.process.is_alive() for w in workers):
            return False
        answers = await asyncio.gather(*(self._get(w, "/readyz") for w in workers if w))
        return all(status == 200 for status, _ in answers)

    async def scrape(self) -> bytes:
        """The merged exposition (see the module's docstring)."""
        workers = [w for w in self.workers if w is not None]
        answers = await asyncio.gather(*(self._get(w, "/metrics") for w in workers))
        merged = Merged()
        per_worker: list[tuple[int, float]] = []
        for worker, (status, text) in zip(workers, answers, strict=True):
            if status == 200:
                worker.last = text
            if worker.last:
                merged.add(worker.last)
                per_worker.append((worker.slot, requests_counted(worker.last)))
        merged.merge(self.retired)
        merged.add(generate_latest(self.registry).decode())
        slots = Metric(
            "phabmesh_gateway_worker_requests",
            "Gateway calls counted by the worker now in each slot (from its start)",
            "counter",
        )
        for slot, count in per_worker:
            slots.add_sample("phabmesh_gateway_worker_requests_total", {"worker": str(slot)}, count)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(merged)
        registry.register(_Static([slots]))
        return generate_latest(registry)

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if await self.ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=await self.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        """Every worker told to stop (SIGTERM: each finishes its calls), then the parent's
        port and ports released."""
        self._stopping = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            if worker.process.is_alive():
                worker.process.terminate()
        for worker in workers:
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await _exited(worker.process)
            except TimeoutError:
                log.warning("gateway_worker_killed", worker=worker.slot, pid=worker.pid)
                worker.process.kill()
                await _exited(worker.process)
            worker.pipe.close()
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def run_until_signalled(self) -> None:
        await self.start()
        await serving.until_signalled()
        await self.stop()


class _Static(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _receive(pipe: Connection, timeout: float) -> Any:
    """What the worker sends first (its metrics port), or None if it exited first."""
    with contextlib.suppress(EOFError, OSError):
        if pipe.poll(timeout):
            return pipe.recv()
    return None
