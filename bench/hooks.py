"""Herald webhook delivery latency through the gateway, against the same deliveries posted
straight to the target.

    python -m bench.hooks [--deliveries 400] [--seconds 20]

Everything runs on 127.0.0.1, each part as its own process as deployed: a real
kube-apiserver and etcd, the Conduit test server as Phabricator (``bench.conduit``),
``phabmesh operator`` and ``phabmesh gateway`` under the RBAC of manifests/, and the
webhook's target, a plain HTTP server answering 202 (``--serve-target``, a process of its
own). A PhabricatorWebhook in namespace ``hooks-bench`` names the target; its namespace
grants both ServiceAccounts its key Secret (docs/webhooks.md). The gateway reaches the
target on loopback (``PHABMESH_HOOKS_TARGET_URL=http://127.0.0.1:{port}``, no Linkerd).

Each delivery is signed as Phorge signs it (``phabmesh.dev.conduit.hooks.request``: the
formatted Herald payload, ``X-Phabricator-Webhook-Signature``), each body unique (the
gateway refuses a replay), all built before the clock starts. At concurrency 1 and then 16,
``--deliveries`` of them go through the gateway (``POST /hooks/<namespace>/<name>``: verify,
replay check, forward), then as many fresh ones straight to the target; each phase stops
after ``--seconds`` whatever is left. Connections are kept alive on both paths. The gateway's
per-webhook bound of deliveries in flight (``PHABMESH_HOOKS_MAX_CONCURRENT``, 4 as shipped)
is raised to 16 here, so that concurrency 16 measures latency and not refusals (429).
Nothing here asserts: it measures and prints p50/p95/p99 of each, their ratio and the
milliseconds the gateway adds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.__main__ import (
    SYSTEM,
    Conduit,
    Gateway,
    Operator,
    install,
    pct,
    ready,
    until,
)
from phabmesh import logs, resources, serving
from phabmesh.dev import devcluster
from phabmesh.dev.conduit.hooks import Hook, request
from phabmesh.kube import KubeClient, load_connection
from phabmesh.resources import resource_path

G, V = resources.GROUP, resources.VERSION
NS, NAME, SERVICE, SECRET = "hooks-bench", "bench-hook", "bench-listener", "bench-hook-hmac"
KEY = "Zq3v9Lk2Pw8Tn5Rb7Yx1Hc4Jm6Gd0Fs2"  # an HMAC key as Phorge makes them (a bench's own)
CONCURRENCY = (1, 16)


async def serve_target() -> None:
    """The webhook's target: 202 and a short answer to every POST, as a listener that queues
    the delivery. Prints its port, then serves until SIGTERM or SIGINT."""

    async def take(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=202, text="queued\n")

    app = web.Application()
    app.router.add_post("/{tail:.*}", take)
    runner = await serving.start_site(app, "127.0.0.1", 0)
    print(json.dumps({"port": serving.bound_port(runner)}), flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await runner.cleanup()


class Target:
    """``--serve-target`` in its own process."""

    def __init__(self, tmp: Path) -> None:
        with (tmp / "target.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.hooks", "--serve-target"],
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class HookGateway(Gateway):
    """``phabmesh gateway`` forwarding every webhook's deliveries to 127.0.0.1:<its port>."""

    log_name = "gw-hooks.log"

    def __init__(self, plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path) -> None:
        settings = {
            "PHABMESH_HOOKS_TARGET_URL": "http://127.0.0.1:{port}",
            "PHABMESH_HOOKS_MAX_CONCURRENT": str(max(CONCURRENCY)),
        }
        super().__init__(plane, conduit, tmp, settings)


async def setup(kube: KubeClient, target_port: int) -> None:
    """The webhook, its key Secret, its target Service and the grant (docs/webhooks.md)."""
    await kube.create(
        resource_path("", "v1", "namespaces"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
    )
    await kube.create(
        resource_path("", "v1", "secrets", NS),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET},
            "data": {"hmacKey": base64.b64encode(KEY.encode()).decode()},
        },
    )
    await kube.create(
        resource_path("", "v1", "services", NS),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE},
            "spec": {"selector": {"app": SERVICE}, "ports": [{"port": target_port}]},
        },
    )
    rbac = "rbac.authorization.k8s.io"
    await kube.create(
        resource_path(rbac, "v1", "roles", NS),
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "Role",
            "metadata": {"name": "phabmesh-webhook-key"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": [SECRET],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    )
    await kube.create(
        resource_path(rbac, "v1", "rolebindings", NS),
        {
            "apiVersion": f"{rbac}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "phabmesh-webhook-key"},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "phabmesh-webhook-key"},
            "subjects": [
                {"kind": "ServiceAccount", "name": f"phabmesh-{who}", "namespace": SYSTEM}
                for who in ("operator", "gateway")
            ],
        },
    )
    await kube.create(
        resources.webhook_path(NS),
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": NAME},
            "spec": {
                "herald": {"secretRef": {"name": SECRET}},
                "target": {"service": SERVICE, "port": target_port, "path": "/phorge"},
            },
        },
    )


def deliveries(hook: Hook, count: int) -> list[tuple[bytes, dict[str, str]]]:
    """``count`` signed deliveries as Phorge sends them, each body unique (its transaction)."""
    epoch = int(time.time())
    return [
        request(
            hook,
            f"PHID-DREV-{uuid.uuid4().hex[:20]}",
            epoch=epoch,
            transactions=(f"PHID-XACT-DREV-{uuid.uuid4().hex[:14]}",),
        )
        for _ in range(count)
    ]


async def post_all(
    http: aiohttp.ClientSession,
    url: str,
    batch: list[tuple[bytes, dict[str, str]]],
    concurrency: int,
    seconds: float,
) -> tuple[list[float], Counter[int], float]:
    """Post ``batch`` to ``url``, ``concurrency`` at a time, for ``seconds`` at most: each
    answered delivery's latency (any status), the count of each status, and the seconds it
    all took."""
    queue = list(reversed(batch))
    took: list[float] = []
    statuses: Counter[int] = Counter()
    begun = time.perf_counter()
    end = begun + seconds

    async def worker() -> None:
        while queue and time.perf_counter() < end:
            body, headers = queue.pop()
            started = time.perf_counter()
            async with http.post(url, data=body, headers=headers) as answer:
                await answer.read()
                statuses[answer.status] += 1
            took.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return took, statuses, time.perf_counter() - begun


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def row(
    concurrency: int,
    direct: tuple[list[float], Counter[int], float],
    gateway: tuple[list[float], Counter[int], float],
) -> tuple[str, str, str]:
    """One figure: p50/p95/p99 straight and through the gateway, their ratio, the ms added,
    and the deliveries per second of each."""
    (d, d_status, d_took), (g, g_status, g_took) = direct, gateway
    parts = []
    for p in (50, 95, 99):
        dp, gp = pct(d, p), pct(g, p)
        parts.append(f"p{p} {_ms(dp)} -> {_ms(gp)} ms ({gp / dp:.1f}x, +{(gp - dp) * 1000:.2f} ms)")
    answers = (
        f"{len(g)} via gateway {dict(sorted(g_status.items()))} at {len(g) / g_took:.0f}/s, "
        f"{len(d)} direct {dict(sorted(d_status.items()))} at {len(d) / d_took:.0f}/s"
    )
    return (
        f"webhook delivery, concurrency {concurrency}: direct -> through the gateway",
        "; ".join(parts) + f" [{answers}]",
        "-",
    )


async def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="phabmesh-bench-hooks-") as tmp_name:
        tmp = Path(tmp_name)
        plane = devcluster.ControlPlane(tmp / "plane")
        plane.start()
        conduit = Conduit(tmp)
        target = Target(tmp)
        try:
            install(plane)
            return await measure(plane, conduit, target, args, tmp)
        finally:
            target.stop()
            conduit.stop()
            plane.stop()


async def measure(
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    target: Target,
    args: argparse.Namespace,
    tmp: Path,
) -> list[tuple[str, str, str]]:
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    limit = max(CONCURRENCY)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))
    operator = Operator(plane, conduit, tmp)
    gateway = HookGateway(plane, conduit, tmp)
    try:
        await setup(kube, target.port)
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        via = f"http://127.0.0.1:{gateway.port}/hooks/{NS}/{NAME}"
        direct = f"http://127.0.0.1:{target.port}/phorge"
        hook = Hook(via, KEY)

        async def forwarded() -> bool:
            ((body, headers),) = deliveries(hook, 1)
            async with http.post(via, data=body, headers=headers) as answer:
                await answer.read()
                return answer.status == 202

        # Ready, and the gateway holds the key (its watch of the Secret).
        if await until(forwarded, 120) is None:
            raise RuntimeError(f"no delivery through {via} reached the target within 120 s")
        # Warm both paths' connections and code (not measured).
        await post_all(http, via, deliveries(hook, 20), limit, args.seconds)
        await post_all(http, direct, deliveries(hook, 20), limit, args.seconds)
        rows = []
        for concurrency in CONCURRENCY:
            through = await post_all(
                http, via, deliveries(hook, args.deliveries), concurrency, args.seconds
            )
            straight = await post_all(
                http, direct, deliveries(hook, args.deliveries), concurrency, args.seconds
            )
            rows.append(row(concurrency, straight, through))
        return rows
    finally:
        operator.stop()
        gateway.stop()
        await http.close()
        await kube.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hooks")
    parser.add_argument(
        "--deliveries", type=int, default=400, help="per path and concurrency (at most)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (at most)")
    parser.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_target:
        asyncio.run(serve_target())
        return
    logs.configure("WARNING")
    rows = asyncio.run(run(args))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  measured")
    for name, value, _ in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\n(python -m bench.hooks --deliveries {args.deliveries} --seconds {args.seconds:g})")


if __name__ == "__main__":
    main()
