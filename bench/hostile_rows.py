"""``python -m bench.hostile --parts rows``: one row per flood, the same three probes in each.

``phabmesh controller`` (with the shipped TokenReview budgets) and ``phabmesh gateway`` run
as processes of their own against the local control plane. For ``--seconds``, three loops
run side by side (``bench.hostile_webhook.loops``): ``conduit.ping`` through the gateway, a
pod's credential exchange (a fresh token each time, an uncached TokenReview, 10 a second)
and a new pod's lease issuance. They run once with no flood, then once during each flood,
each flood sent from a process of its own and lasting past the measurement:

- the injection webhook: 8 connections sending 400 KB AdmissionReviews of bound pods;
- the gateway: 48 gzip bodies of about 1 KB at once (1 MiB each inflated), 8 gzip bodies of
  27 KB (9,999 fields), 300 plain bodies of 1 MiB, all without a credential;
- the credential endpoint: forged tokens from ``--identities`` service accounts of another
  namespace (as the local Linkerd proxy would pass them on).

Each row gives each probe's p99 during the flood, and what it added to the p99 without a
flood, measured in the same run. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.__main__ import NS, Conduit, Gateway, ms, pct, ready, setup
from bench.hostile import ShippedOperator, _flood_bodies, _identities_flood, _send_flood
from bench.hostile_webhook import loops
from phabmesh.dev import devcluster
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.leases.index import LeaseIndex

PACE = 0.1  # seconds between a probe's exchanges: 10 a second, within the shipped budgets
LEAD = 1.0  # seconds a flood runs before the probes start
Flood = Callable[[float], Awaitable[object]]


def _in_process(work: Callable[..., object], *args: object) -> Flood:
    """A flood run by ``work(*args, seconds)`` in a fresh process of its own."""

    async def run(seconds: float) -> object:
        with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            return await asyncio.get_running_loop().run_in_executor(pool, work, *args, seconds)

    return run


def _webhook(port: int) -> Flood:
    async def run(seconds: float) -> object:
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.webhook_flood", str(port), str(seconds), "8", "400000",
            NS, "runner", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out = (await flooder.communicate())[0].decode()
        return out.strip().splitlines()[-1] if out.strip() else ""

    return run


def _row(name: str, alone: tuple[list[float], ...], during: tuple[list[float], ...]) -> str:
    parts = []
    for probe, a, d in zip(("conduit.ping", "exchange", "issuance"), alone, during, strict=True):
        added = pct(d, 99) - pct(a, 99)
        parts.append(f"{probe} p99 {ms(pct(d, 99))} ({'+' if added >= 0 else ''}{ms(added)})")
    return f"{name}: " + ", ".join(parts)


async def flood_rows(
    plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    root = devcluster.repo_root()
    assert root is not None, "run from a phabmesh checkout"
    plane.install_rbac(root / "manifests")
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    operator = ShippedOperator(plane, conduit, tmp)
    gateway = Gateway(plane, conduit, tmp)
    try:
        with contextlib.suppress(Conflict):  # set up by an earlier part of this run
            await setup(kube, conduit)
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        seconds = args.seconds

        async def probes(tag: str) -> tuple[list[float], ...]:
            return await loops(http, kube, leases, gateway, operator, seconds, tag, PACE)

        alone = await probes("alone")
        gateway_url = f"http://127.0.0.1:{gateway.port}/api/user.whoami"
        issuer_url = f"http://127.0.0.1:{operator.issuer_port}/v1/credentials"
        floods: list[tuple[str, Flood]] = [
            ("webhook: 8 x 400 KB AdmissionReviews", _webhook(operator.webhook_port))
        ]
        for what, (_, body, headers, count) in _flood_bodies().items():
            sender = _in_process(_send_flood, gateway_url, body, headers, count)
            floods.append((f"gateway: {what}", sender))
        floods.append(
            (
                f"credential endpoint: forged tokens from {args.identities} identities",
                _in_process(_identities_flood, issuer_url, args.identities),
            )
        )
        rows = [
            (
                "no flood (the baseline below)",
                ", ".join(
                    f"{p} p99 {ms(pct(a, 99))}"
                    for p, a in zip(("conduit.ping", "exchange", "issuance"), alone, strict=True)
                ),
            )
        ]
        for n, (name, flood) in enumerate(floods):
            running = asyncio.create_task(flood(seconds + LEAD + 3))
            await asyncio.sleep(LEAD)
            during = await probes(f"f{n}")
            await running
            rows.append((f"flood {n + 1}", _row(name, alone, during)))
        return rows
    finally:
        operator.stop()
        gateway.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()
