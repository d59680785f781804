"""``python -m bench.hostile --parts rows``: one row per flood, the same three probes in each.

``phabmesh operator`` (with the shipped TokenReview budgets) and ``phabmesh gateway`` run
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
import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.__main__ import NS, Conduit, Gateway, ms, pct, ready, setup
from bench.hostile import (
    FORM,
    PLAIN_FLOOD,
    ShippedOperator,
    _flood_bodies,
    _identities_flood,
    _send_flood,
)
from bench.hostile_webhook import loops
from phabmesh.dev import devcluster
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.leases.index import LeaseIndex

PACE = 0.1  # seconds between a probe's exchanges: 10 a second, within the shipped budgets
LEAD = 1.0  # seconds a flood runs before the probes start
Flood = Callable[[float], Awaitable[object]]


def _in_process(niceness: int, work: Callable[..., object], *args: object) -> Flood:
    """A flood run by ``work(*args, seconds)`` in a fresh process of its own, at
    ``niceness``."""

    async def run(seconds: float) -> object:
        with concurrent.futures.ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=os.nice,
            initargs=(niceness,),
        ) as pool:
            return await asyncio.get_running_loop().run_in_executor(pool, work, *args, seconds)

    return run


def _webhook(niceness: int, port: int) -> Flood:
    async def run(seconds: float) -> object:
        flooder = await asyncio.create_subprocess_exec(
            "nice", "-n", str(niceness),
            sys.executable, "-m", "bench.webhook_flood", str(port), str(seconds), "8", "400000",
            NS, "runner", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out = (await flooder.communicate())[0].decode()
        return out.strip().splitlines()[-1] if out.strip() else ""

    return run


def _bare_server(ready: Any, stop: Any) -> None:
    """An aiohttp server with nothing of phabmesh: ``conduit.ping`` answered, anything else
    refused at once (429, connection closed) without its body being read."""

    async def serve() -> None:
        async def handle(request: web.Request) -> web.Response:
            if request.match_info["method"] == "conduit.ping":
                return web.json_response({"result": "pong"})
            refused = web.Response(status=429, text="busy")
            refused.force_close()
            return refused

        app = web.Application()
        app.router.add_route("*", "/api/{method}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        ready.put(runner.addresses[0][1])
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await runner.cleanup()

    asyncio.run(serve())


async def bare_floor(
    http: aiohttp.ClientSession, niceness: int, what: str, seconds: float
) -> tuple[str, str]:
    """The HTTP stack's own floor: ``conduit.ping`` p99 on a bare aiohttp server, alone and
    during the gateway flood ``what``, sent the same way."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    server = context.Process(target=_bare_server, args=(ready, stop))
    server.start()
    try:
        port = await asyncio.get_running_loop().run_in_executor(None, ready.get, True, 60)
        url = f"http://127.0.0.1:{port}/api/"

        async def pings() -> list[float]:
            took: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                async with http.post(url + "conduit.ping", data=b"", headers=FORM) as answer:
                    await answer.read()
                took.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
            return took

        alone = await pings()
        _, body, headers, count = _flood_bodies()[what]
        running = asyncio.create_task(
            _in_process(niceness, _send_flood, url + "user.whoami", body, headers, count)(
                seconds + LEAD + 3
            )
        )
        await asyncio.sleep(LEAD)
        during = await pings()
        await running
    finally:
        stop.set()
        server.join(10)
    added = pct(during, 99) - pct(alone, 99)
    return (
        "floor",
        f"the same flood ({what}) against a bare aiohttp server that refuses it at once: "
        f"conduit.ping p99 {ms(pct(during, 99))} ({'+' if added >= 0 else ''}{ms(added)})",
    )


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
        issuer_url = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        floods: list[tuple[str, Flood]] = [
            (
                "webhook: 8 x 400 KB AdmissionReviews",
                _webhook(args.sender_nice, operator.webhook_port),
            )
        ]
        for what, (_, body, headers, count) in _flood_bodies().items():
            sender = _in_process(args.sender_nice, _send_flood, gateway_url, body, headers, count)
            floods.append((f"gateway: {what}", sender))
        floods.append(
            (
                f"credential endpoint: forged tokens from {args.identities} identities",
                _in_process(args.sender_nice, _identities_flood, issuer_url, args.identities),
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
        only = {int(n) for n in args.only.split(",") if n.strip()}
        for n, (name, flood) in enumerate(floods, 1):
            if only and n not in only:
                continue
            running = asyncio.create_task(flood(seconds + LEAD + 3))
            await asyncio.sleep(LEAD)
            during = await probes(f"f{n}")
            answered = await running
            if isinstance(answered, list):  # the identities flood: one status per call
                answered = dict(collections.Counter(answered))
            rows.append((f"flood {n}", _row(name, alone, during)))
            rows.append(("", f"  the flood was answered: {answered}"))
        if not only or 4 in only:
            rows.append(await bare_floor(http, args.sender_nice, PLAIN_FLOOD, seconds))
        return rows
    finally:
        operator.stop()
        gateway.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()
