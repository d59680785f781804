"""``python -m bench.hostile --parts webhook``: a flood of big AdmissionReviews at the
injection webhook's port, and what the rest of phabmesh waits meanwhile.

``phabmesh operator`` and ``phabmesh gateway`` run as processes of their own against the
local control plane. For ``--seconds`` without the flood, then as long with it
(``bench.webhook_flood``, a process of its own: 8 connections each sending one 400 KB
AdmissionReview after another), three loops run side by side: ``conduit.ping`` through the
gateway, a pod's credential exchange (a fresh token each time: an uncached TokenReview)
and a new pod's lease issuance (created Running until its lease is Active). The row gives
each one's p99 without and with the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from bench.__main__ import (
    NS,
    Conduit,
    Gateway,
    Operator,
    ms,
    pct,
    pods,
    ready,
    setup,
    until,
)
from phabmesh.dev import devcluster
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.leases.index import LeaseIndex

if TYPE_CHECKING:
    from bench.hostile import ShippedOperator

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process ``pid`` in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def _child_memory_mb(pid: int) -> tuple[float, float]:
    """_memory_mb of the first child of process ``pid`` (the operator's webhook process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return _memory_mb(int(children[0])) if children else (0.0, 0.0)


async def loops(
    http: aiohttp.ClientSession,
    kube: KubeClient,
    leases: LeaseIndex,
    gateway: Gateway,
    operator: Operator | ShippedOperator,
    seconds: float,
    tag: str,
    pace: float = 0.01,
) -> tuple[list[float], list[float], list[float]]:
    """(ping, exchange, issuance) times, each loop one after another for ``seconds``
    (exchanges ``pace`` seconds apart)."""
    url = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
    identity = f"runner.{NS}.serviceaccount.identity.linkerd.cluster.local"
    (pod,) = await pods(kube, NS, 1, prefix=f"exchanger-{tag}", running=True)

    async def leased(uid: str) -> bool:
        return any(lease.active and lease.pod_uid == uid for lease in leases.by_uid.values())

    if await until(lambda: leased(pod["metadata"]["uid"]), 60) is None:
        raise RuntimeError("the exchanging pod got no lease within 60 s")
    end = time.perf_counter() + seconds

    async def ping() -> list[float]:
        took: list[float] = []
        while time.perf_counter() < end:
            started = time.perf_counter()
            async with http.post(
                f"http://127.0.0.1:{gateway.port}/api/conduit.ping", data=b"", headers=FORM
            ) as answer:
                await answer.read()
            took.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        return took

    async def exchange() -> list[float]:
        took: list[float] = []
        while time.perf_counter() < end:
            token = await kube.pod_token(NS, "runner", pod, seconds=3600)
            started = time.perf_counter()
            async with http.post(
                url, headers={"Authorization": f"Bearer {token}", "l5d-client-id": identity}
            ) as answer:
                await answer.read()
                status = answer.status
            took.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"exchange refused: {status}")
            await asyncio.sleep(pace)
        return took

    async def issuance() -> list[float]:
        took: list[float] = []
        n = 0
        while time.perf_counter() < end:
            n += 1
            started = time.perf_counter()
            (new,) = await pods(kube, NS, 1, prefix=f"issued-{tag}-{n}", running=True)
            uid = new["metadata"]["uid"]
            if await until(lambda uid=uid: leased(uid), 60) is None:
                raise RuntimeError("no lease within 60 s")
            took.append(time.perf_counter() - started)
        return took

    ping_t, exchange_t, issuance_t = await asyncio.gather(ping(), exchange(), issuance())
    return ping_t, exchange_t, issuance_t


async def webhook_flood(
    plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    root = devcluster.repo_root()
    assert root is not None, "run from a phabmesh checkout"
    plane.install_rbac(root / "manifests")
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    operator = Operator(plane, conduit, tmp)
    gateway = Gateway(plane, conduit, tmp)
    try:
        with contextlib.suppress(Conflict):  # set up by an earlier part of this run
            await setup(kube, conduit)
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        alone = await loops(http, kube, leases, gateway, operator, args.seconds, "alone")
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.webhook_flood", str(operator.webhook_port),
            str(args.seconds + 5), "8", "400000", NS, "runner",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flooder.stdout is not None
            await flooder.stdout.readline()  # started
            await asyncio.sleep(1.0)
            during = await loops(http, kube, leases, gateway, operator, args.seconds, "flood")
            lasted = flooder.returncode is None  # the flood outlived the measurement
            out = (await flooder.communicate())[0].decode()
        finally:
            if flooder.returncode is None:
                flooder.kill()
                await flooder.wait()
        counts = json.loads(out.strip().splitlines()[-1])
        rss, peak = operator.memory_mb()
        hook_rss, hook_peak = _child_memory_mb(operator.proc.pid)
        names = ("conduit.ping", "exchange", "issuance")
        parts = [
            f"{name} p99 {ms(pct(a, 99))} alone, {ms(pct(d, 99))} during ({len(d)} calls)"
            for name, a, d in zip(names, alone, during, strict=True)
        ]
        return [
            (
                "8 x 400 KB AdmissionReviews at once at the webhook port",
                "; ".join(parts)
                + f"; the flood was answered {counts}"
                + ("" if lasted else " (and ended before the measurement)")
                + f"; operator RSS {rss:.0f} MB (peak {peak:.0f} MB), its webhook process "
                f"{hook_rss:.0f} MB (peak {hook_peak:.0f} MB)",
            )
        ]
    finally:
        operator.stop()
        gateway.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()
