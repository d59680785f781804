"""A watch that stalls without breaking: the connection stays open and nothing comes.

Fault injection: a TCP proxy on 127.0.0.1 between the informer and the real API server
stops forwarding in both directions (and holds new connections) while keeping every
socket open. Before, such a watch kept ``connected`` True until the socket read timeout
(330 s): the gateway would have accepted credentials whose revocation it never saw. A gateway
behind the same proxy says so on its /metrics (``phabmesh_gateway_fail_closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.informer import Informer
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.resources import resource_path
from tests import rbac
from tests.kube import Cluster
from tests.phab import settings_for
from tests.stack import Threaded


class FreezingProxy:
    """Forwards TCP to ``upstream`` until frozen; frozen, it forwards nothing, closes nothing."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self.flowing.wait()  # frozen: hold the bytes, keep the socket
                writer.write(data)
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        self.flowing.set()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy(cluster: Cluster) -> AsyncIterator[FreezingProxy]:
    target = urlsplit(load_connection(str(cluster.kubeconfig)).host)
    assert target.hostname is not None and target.port is not None
    running = FreezingProxy(target.hostname, target.port)
    await running.start()
    yield running
    await running.stop()


def _cm(name: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}


async def _until(check: object, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        await asyncio.sleep(0.05)


async def test_a_stalled_watch_counts_as_lost_and_resumes_without_a_gap(
    cluster: Cluster, namespace: str, proxy: FreezingProxy
) -> None:
    direct = KubeClient(load_connection(str(cluster.kubeconfig)))
    connection = load_connection(str(cluster.kubeconfig))
    via_proxy = KubeClient(
        dataclasses.replace(connection, host=f"https://127.0.0.1:{proxy.port}"), attempts=1
    )
    path = resource_path("", "v1", "configmaps", namespace)
    await direct.create(path, _cm("before"))
    informer = Informer(via_proxy, path, lambda obj: obj["metadata"]["name"], liveness=3.0)
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 20)
        # Quiet but healthy: the server ends each watch (2 s) and the informer renews it,
        # staying connected throughout.
        samples = []
        for _ in range(70):
            samples.append(informer.connected)
            await asyncio.sleep(0.1)
        assert all(samples)

        proxy.flowing.clear()  # stalled: sockets open, nothing moves
        await direct.create(path, _cm("while-stalled"))  # a change this watch cannot see
        await _until(lambda: not informer.connected, 30, "the stalled watch to count as lost")
        assert f"{namespace}/while-stalled" not in informer.items

        proxy.flowing.set()
        await _until(
            lambda: informer.connected and f"{namespace}/while-stalled" in informer.items,
            30,
            "the watch to resume and replay what it missed",
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await via_proxy.close()
        await direct.close()


def _through(kubeconfig: str, port: int, where: Path) -> str:
    """The kubeconfig with its server replaced by the proxy on 127.0.0.1:``port``."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{port}"
    where.write_text(yaml.safe_dump(config))
    return str(where)


async def _gauges(process: GatewayProcess) -> dict[str, float]:
    """The gateway's fail-closed gauge and its watches' connected gauges, from /metrics."""
    url = f"http://127.0.0.1:{process.metrics_port}/metrics"
    text = (await asyncio.to_thread(requests.get, url, timeout=5)).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "phabmesh_gateway_fail_closed":
                out["fail_closed"] = sample.value
            elif sample.name == "phabmesh_watch_connected":
                out[sample.labels["resource"]] = sample.value
    return out


async def test_a_gateway_whose_lease_watch_stalls_says_it_fails_closed(
    conduit: ConduitServer,
    operator: Threaded,
    phabmesh_rbac: rbac.Installed,
    proxy: FreezingProxy,
    tmp_path: Path,
) -> None:
    kubeconfig = _through(phabmesh_rbac.kubeconfig("gateway"), proxy.port, tmp_path / "kc")
    settings = settings_for(conduit).replace(watch_liveness=3.0)
    # Started off this loop: the proxy serves on it.
    gateway = await asyncio.to_thread(
        Threaded(GatewayProcess(settings, kubeconfig=kubeconfig)).start
    )
    process: GatewayProcess = gateway.process  # type: ignore[assignment]
    try:
        await _until(lambda: process.state.ready, 60, "the gateway to be ready")
        healthy = await _gauges(process)
        assert healthy["fail_closed"] == 0.0
        assert healthy["leases"] == 1.0 and healthy["pods"] == 1.0

        proxy.flowing.clear()  # every watch of this gateway stalls
        await _until(lambda: not process.state.leases.connected, 30, "the lease watch lost")
        stalled = await _gauges(process)
        assert stalled["fail_closed"] == 1.0
        assert stalled["leases"] == 0.0

        proxy.flowing.set()
        await _until(lambda: process.state.ready, 30, "the gateway to recover")
        recovered = await _gauges(process)
        assert recovered["fail_closed"] == 0.0
        assert recovered["leases"] == 1.0
    finally:
        proxy.flowing.set()
        await asyncio.to_thread(gateway.stop)
