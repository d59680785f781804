"""phabmesh benchmarks on the local control plane: percentiles and ratios from one run.

    python -m bench [--pods 100] [--calls 300] [--seconds 5] [--reviews 20]

Everything runs on 127.0.0.1: a real kube-apiserver, the Conduit test server as
Phabricator, the operator and the gateway in this process. Every load loop is
bounded in count and time. Nothing here asserts: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from phabmesh import devcluster, logs, resources
from phabmesh.gateway.process import GatewayProcess
from phabmesh.issuer.process import OperatorProcess
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.client import JSON, resource_path
from phabmesh.settings import Settings
from phabmesh.testing import ConduitServer

G, V = resources.GROUP, resources.VERSION
NS, SYSTEM = "bench", "phabmesh-system"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def until(check: Callable[[], Awaitable[bool]], limit: float) -> float | None:
    """Seconds until ``check()`` is true, polling tightly; None past ``limit``."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        if await check():
            return time.perf_counter() - start
        await asyncio.sleep(0.005)
    return None


async def setup(kube: KubeClient, conduit: ConduitServer) -> None:
    conduit.add_user("bench-bot", bot=True)
    token = conduit.add_token("bench-bot")
    for name, labels in ((SYSTEM, {}), (NS, {"bench": "yes"})):
        await kube.create(
            resource_path("", "v1", "namespaces"),
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}},
        )
    await kube.create(
        resource_path("", "v1", "secrets", SYSTEM),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-bot-token"},
            "data": {"token": base64.b64encode(token.encode()).decode()},
        },
    )
    await kube.create(
        resource_path(G, V, resources.BOT_PLURAL),
        {
            "apiVersion": f"{G}/{V}",
            "kind": "PhabricatorBot",
            "metadata": {"name": "bench-bot"},
            "spec": {
                "username": "bench-bot",
                "tokenSecretRef": {"name": "bench-bot-token"},
                "namespaceSelector": {"matchLabels": {"bench": "yes"}},
            },
        },
    )
    await kube.create(
        resource_path(G, V, resources.BINDING_PLURAL, NS),
        {
            "apiVersion": f"{G}/{V}",
            "kind": "PhabricatorBinding",
            "metadata": {"name": "runners"},
            "spec": {
                "botRef": {"name": "bench-bot"},
                "identities": ["*"],
                "allowedMethods": ["user.whoami"],
            },
        },
    )
    await kube.create(
        resource_path("", "v1", "serviceaccounts", NS),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}},
    )


async def pods(kube: KubeClient, count: int) -> list[JSON]:
    async def one(i: int) -> JSON:
        return await kube.create(
            resource_path("", "v1", "pods", NS),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"runner-{i}"},
                "spec": {
                    "serviceAccountName": "runner",
                    "initContainers": [
                        {"name": "linkerd-proxy", "image": "proxy", "restartPolicy": "Always"}
                    ],
                    "containers": [{"name": "app", "image": "app"}],
                },
            },
        )

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="phabmesh-bench-") as tmp:
        plane = devcluster.ControlPlane(Path(tmp))
        plane.start()
        try:
            crds = str(devcluster.repo_root() / "crds")  # type: ignore[operator]
            plane.kubectl("apply", "--server-side", "-f", crds)
            plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
            async with ConduitServer() as conduit:
                rows += await scenario(plane, conduit, args)
        finally:
            plane.stop()
    return rows


async def scenario(  # noqa: PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane, conduit: ConduitServer, args: argparse.Namespace
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    settings = Settings.local(conduit.url, namespace=SYSTEM, log_level="WARNING")
    operator = OperatorProcess(settings, kubeconfig=str(plane.kubeconfig))
    gateway = GatewayProcess(settings, kubeconfig=str(plane.kubeconfig))
    try:
        await setup(kube, conduit)
        await operator.start()
        await gateway.start()
        await until(lambda: _true(operator.ready() and gateway.state.ready), 60)
        issuer = f"http://127.0.0.1:{operator.issuer_port}/v1/credentials"
        gw = f"http://127.0.0.1:{gateway.port}/api/user.whoami"

        # Issuance: N pods patched Running at once -> each lease Active.
        calls_before = sum(conduit.calls.values())
        created = await pods(kube, args.pods)
        await asyncio.sleep(1)
        started: dict[str, float] = {}

        async def run_pod(pod: JSON) -> None:
            started[pod["metadata"]["uid"]] = time.perf_counter()
            await kube.merge_patch(
                resource_path("", "v1", "pods", NS, pod["metadata"]["name"], "status"),
                {"status": {"phase": "Running"}},
            )

        await asyncio.gather(*(run_pod(p) for p in created))
        issued: dict[str, float] = {}

        async def all_issued() -> bool:
            for lease in operator.leases.by_uid.values():
                if lease.active and lease.pod_uid not in issued:
                    issued[lease.pod_uid] = time.perf_counter() - started[lease.pod_uid]
            return len(issued) == len(created)

        await until(all_issued, 60)
        per_pod = (sum(conduit.calls.values()) - calls_before) / max(len(created), 1)
        lat = list(issued.values())
        rows.append(
            (
                f"issuance: Running -> lease Active, {len(created)} pods at once",
                f"p50 {ms(pct(lat, 50))}, p99 {ms(pct(lat, 99))}",
                "p99 <= 200 ms",
            )
        )

        # Credential exchange, TokenReview uncached then cached.
        tokens = await asyncio.gather(
            *(kube.pod_token(NS, "runner", p, seconds=3600) for p in created)
        )
        first, again, credentials = [], [], []
        for token in tokens:
            for bucket in (first, again):
                t = time.perf_counter()
                async with http.post(issuer, headers={"Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                bucket.append(time.perf_counter() - t)
            credentials.append(body["credential"])
        rows.append(
            (
                "credential exchange, TokenReview uncached",
                f"p50 {ms(pct(first, 50))}, p99 {ms(pct(first, 99))}",
                "p99 <= 50 ms",
            )
        )
        rows.append(
            (
                "credential exchange, TokenReview cached",
                f"p50 {ms(pct(again, 50))}, p99 {ms(pct(again, 99))}",
                "p99 <= 20 ms",
            )
        )

        # Gateway overhead: the same call direct and through the gateway, interleaved.
        bot_token = conduit.add_token("bench-bot")
        direct_url = f"{conduit.url}/api/user.whoami"
        direct, via = [], []
        for i in range(args.calls):
            for url, form, bucket in (
                (direct_url, {"api.token": bot_token}, direct),
                (gw, {"api.token": credentials[i % len(credentials)]}, via),
            ):
                t = time.perf_counter()
                async with http.post(url, data=form) as r:
                    await r.read()
                bucket.append(time.perf_counter() - t)
        added50 = pct(via, 50) - pct(direct, 50)
        added99 = pct(via, 99) - pct(direct, 99)
        rows.append(
            (
                f"gateway added latency ({args.calls} sequential calls)",
                f"p50 {ms(added50)}, p99 {ms(added99)} (direct p50 {ms(pct(direct, 50))})",
                "<= 2 ms / <= 10 ms",
            )
        )

        async def throughput(url: str, form: Callable[[int], dict[str, str]]) -> float:
            done = 0
            deadline = time.perf_counter() + args.seconds

            async def client(k: int) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    async with http.post(url, data=form(k)) as r:
                        await r.read()
                    done += 1

            await asyncio.gather(*(client(k) for k in range(32)))
            return done / args.seconds

        rate_direct = await throughput(direct_url, lambda k: {"api.token": bot_token})
        rate_via = await throughput(gw, lambda k: {"api.token": credentials[k % len(credentials)]})
        rows.append(
            (
                "gateway throughput vs direct, 32 clients",
                f"{rate_via:.0f}/s vs {rate_direct:.0f}/s = {rate_via / rate_direct:.0%}",
                ">= 80 %",
            )
        )

        # Revocation: pods deleted -> the gateway refuses; beside it, TokenReview alone.
        async def refused(credential: str) -> bool:
            async with http.post(gw, data={"api.token": credential}) as r:
                return b"ERR-INVALID-AUTH" in await r.read()

        async def review_window(token: str) -> float:
            """From deletion: how long TokenReview alone still says yes (at most 70 s)."""

            async def fails() -> bool:
                status = await kube.token_review(token, ["phabmesh.io"])
                return not status.get("authenticated")

            return await until(fails, 70) or 70.0

        windows: list[float] = []

        async def delete_and_time(i: int, pod: JSON, credential: str) -> float | None:
            await kube.delete(
                resource_path("", "v1", "pods", NS, pod["metadata"]["name"]),
                body={"gracePeriodSeconds": 0},
            )
            if i < args.reviews:  # side by side, from the same moment
                task = asyncio.create_task(review_window(tokens[i]))
                task.add_done_callback(lambda t: windows.append(t.result()))
                review_tasks.append(task)
            return await until(lambda: refused(credential), 30)

        review_tasks: list[asyncio.Task[float]] = []
        t = time.perf_counter()
        revoked = await asyncio.gather(
            *(
                delete_and_time(i, p, c)
                for i, (p, c) in enumerate(zip(created, credentials, strict=True))
            )
        )
        scale_down = time.perf_counter() - t
        rev = [r for r in revoked if r is not None]
        rows.append(
            (
                f"revocation: pod deleted -> gateway refuses, {len(created)} pods",
                f"p50 {ms(pct(rev, 50))}, p99 {ms(pct(rev, 99))}; all in {scale_down:.2f} s",
                "p99 <= 0.5 s",
            )
        )
        sample = review_tasks
        await asyncio.gather(*review_tasks)
        rows.append(
            (
                f"TokenReview alone keeps accepting a deleted pod's token ({len(sample)} pods)",
                f"p50 {pct(list(windows), 50):.2f} s, p99 {pct(list(windows), 99):.2f} s; "
                f"{pct(list(windows), 50) / max(pct(rev, 50), 1e-6):.0f}x phabmesh's p50",
                "report the ratio",
            )
        )
        rows.append(("Conduit calls per pod start", f"{per_pod:g}", "0"))
    finally:
        await gateway.stop()
        await operator.stop()
        await http.close()
        await kube.close()
    return rows


async def _true(value: bool) -> bool:
    return value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reviews", type=int, default=20)
    args = parser.parse_args()
    logs.configure("WARNING")
    rows = asyncio.run(run(args))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'measured':<60}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<60}  {target}")
    print(
        f"\n(python -m bench --pods {args.pods} --calls {args.calls} "
        f"--seconds {args.seconds:g} --reviews {args.reviews})"
    )


if __name__ == "__main__":
    main()
