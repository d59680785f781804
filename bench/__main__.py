"""phabmesh benchmarks on the local control plane: percentiles and ratios from one run.

    python -m bench [--pods 200] [--burst 100] [--calls 300] [--seconds 5] [--reviews 20]
                    [--scale 1000] [--big-pods 5000] [--big-bindings 500] [--deploy 100,1000]

Everything runs on 127.0.0.1, each part as its own process as deployed: a real
kube-apiserver and etcd, the Conduit test server as Phabricator (``bench.conduit``),
``phabmesh operator`` and ``phabmesh gateway``; this process only generates load and
watches. Every load loop is bounded in count and time. Nothing here asserts: it
measures and prints.

phabmesh's processes run as their ServiceAccounts under the RBAC of manifests/. Most
figures use hand-made pods whose status this process writes (no node runs them); the
Deployment figures (bench/workloads.py) use pods the scheduler binds and KWOK runs with
realistic start and stop delays.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import workloads
from phabmesh import logs, resources, serving
from phabmesh.dev import devcluster
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.client import JSON
from phabmesh.leases.index import LeaseIndex
from phabmesh.resources import resource_path
from phabmesh.settings import Settings

G, V = resources.GROUP, resources.VERSION
NS, SYSTEM = "bench", "phabmesh-system"
BOT = "bench-bot"
BENCH = {"bench": "yes"}


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


class Child:
    """A process of the benchmark (a phabmesh process or the Conduit server).

    With ``PHABMESH_BENCH_PROFILE=<dir>`` each phabmesh process runs under cProfile, timed in
    its own CPU seconds (``bench.profiled``), and writes ``<dir>/<name>-<n>.prof`` when it
    stops (read with ``python -m pstats``).
    """

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        profile = os.environ.get("PHABMESH_BENCH_PROFILE")
        if profile:
            dump = Path(profile) / f"{log.stem}-{time.monotonic_ns()}.prof"
            argv = [argv[0], "-m", "bench.profiled", str(dump), *argv[1:]]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB: resident now, and its peak."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)

    def memory_kinds(self) -> dict[str, float]:
        """Resident MB by kind of mapping: ``heap`` (glibc's main arena), ``anonymous``
        (Python's object arenas, glibc's other arenas, large blocks), ``files`` (code)."""
        kinds = {"heap": 0.0, "anonymous": 0.0, "files": 0.0}
        kind = "files"
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                path = head[5] if len(head) > 5 else ""
                kind = (
                    "heap" if path == "[heap]" else "files" if path.startswith("/") else "anonymous"
                )
            elif head[0] == "Rss:":
                kinds[kind] += int(head[1]) / 1024
        return kinds

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Conduit:
    """bench.conduit in its own process."""

    def __init__(self, tmp: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.conduit"],
            stdout=subprocess.PIPE,
            stderr=(tmp / "conduit.log").open("ab"),
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.url, self.control = info["url"], info["control"]
        self.secret_token, self.direct_token = info["secret"], info["direct"]

    async def delay(self, http: aiohttp.ClientSession, seconds: float) -> None:
        async with http.post(f"{self.control}/delay", json={"seconds": seconds}) as r:
            r.raise_for_status()

    async def calls(self, http: aiohttp.ClientSession) -> int:
        async with http.get(f"{self.control}/calls") as r:
            return sum((await r.json()).values())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


def phabmesh_env(
    plane: devcluster.ControlPlane, conduit: Conduit, who: str, **ports: int
) -> dict[str, str]:
    """The environment of phabmesh-<who>: its ServiceAccount's kubeconfig, loopback ports."""
    local = Settings.local_env(conduit.url, log_level="WARNING", log_json=True, **ports)
    kubeconfig = plane.service_account_kubeconfig(SYSTEM, f"phabmesh-{who}")
    return dict(os.environ, KUBECONFIG=str(kubeconfig), **local)


class Operator(Child):
    """``phabmesh operator``; with ``shipped_budgets``, its TokenReview budgets as shipped
    (else raised for the benchmark's one-identity pods, below)."""

    def __init__(
        self,
        plane: devcluster.ControlPlane,
        conduit: Conduit,
        tmp: Path,
        *,
        shipped_budgets: bool = False,
    ) -> None:
        self.endpoint_port = serving.free_port("127.0.0.1")
        self.metrics_port = serving.free_port("127.0.0.1")
        self.webhook_port = serving.free_port("127.0.0.1")
        env = phabmesh_env(
            plane,
            conduit,
            "operator",
            endpoint_port=self.endpoint_port,
            metrics_port=self.metrics_port,
            webhook_port=self.webhook_port,
        )
        # Every pod here exchanges from one source (one address, no l5d-client-id), as all
        # the replicas of one Deployment share one identity. The default budget per source
        # (a burst of 100, then 20/s: docs/settings.md) would pace the exchange figures
        # after the hundredth; it is raised as for a Deployment of that size.
        if not shipped_budgets:
            env["PHABMESH_TOKEN_REVIEW_SOURCE_BURST"] = "5000"  # noqa: S105 - a number
            env["PHABMESH_TOKEN_REVIEW_SOURCE_QPS"] = "1000"  # noqa: S105 - a number
            # So is the budget of their namespace (callers without a mesh identity share one).
            env["PHABMESH_TOKEN_REVIEW_NAMESPACE_BURST"] = "5000"  # noqa: S105 - a number
            env["PHABMESH_TOKEN_REVIEW_NAMESPACE_QPS"] = "1000"  # noqa: S105 - a number
        log = tmp / ("op-shipped.log" if shipped_budgets else "op.log")
        super().__init__([sys.executable, "-m", "phabmesh.cli", "operator"], env, log)


class Gateway(Child):
    """``phabmesh gateway`` on free ports; ``settings``: more PHABMESH_* variables."""

    log_name = "gw.log"

    def __init__(
        self,
        plane: devcluster.ControlPlane,
        conduit: Conduit,
        tmp: Path,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.port = serving.free_port("127.0.0.1")
        self.metrics_port = serving.free_port("127.0.0.1")
        env = phabmesh_env(
            plane, conduit, "gateway", gateway_port=self.port, metrics_port=self.metrics_port
        )
        env.update(settings or {})
        argv = [sys.executable, "-m", "phabmesh.cli", "gateway"]
        super().__init__(argv, env, tmp / self.log_name)


def install(plane: devcluster.ControlPlane) -> None:
    """phabmesh's CRDs (Established) and RBAC on ``plane``: namespace phabmesh-system and the
    ServiceAccounts the operator and the gateway run as."""
    root = devcluster.repo_root()
    assert root is not None, "run from a phabmesh checkout"
    crds = str(root / "crds")
    plane.kubectl("apply", "--server-side", "-f", crds)
    plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
    plane.install_rbac(root / "manifests")


async def ready(http: aiohttp.ClientSession, metrics_port: int, limit: float = 120) -> float:
    """Seconds until the process's /readyz says 200 (raises past ``limit``)."""

    async def ok() -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{metrics_port}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    took = await until(ok, limit)
    if took is None:
        raise RuntimeError(f"not ready within {limit} s (port {metrics_port})")
    return took


async def stop_all(
    children: list[Child],
    watching: asyncio.Task[Any],
    http: aiohttp.ClientSession,
    kube: KubeClient,
) -> None:
    """A run's end: its processes stopped, newest first; its watch and clients closed."""
    for child in reversed(children):
        child.stop()
    watching.cancel()
    await asyncio.gather(watching, return_exceptions=True)
    await http.close()
    await kube.close()


async def namespace(kube: KubeClient, name: str) -> None:
    await kube.create(
        resource_path("", "v1", "namespaces"),
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": BENCH}},
    )
    await kube.create(
        resource_path("", "v1", "serviceaccounts", name),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "runner"}},
    )


async def binding(kube: KubeClient, ns: str, name: str, selector: JSON | None = None) -> None:
    spec: JSON = {"botRef": {"name": BOT}, "identities": ["*"], "allowedMethods": ["user.whoami"]}
    if selector is not None:
        spec["podSelector"] = selector
    await kube.create(
        resource_path(G, V, resources.BINDING_PLURAL, ns),
        {
            "apiVersion": f"{G}/{V}",
            "kind": "PhabricatorBinding",
            "metadata": {"name": name},
            "spec": spec,
        },
    )


async def setup(kube: KubeClient, conduit: Conduit) -> None:
    await kube.create(
        resource_path("", "v1", "secrets", SYSTEM),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-bot-token"},
            "data": {"token": base64.b64encode(conduit.secret_token.encode()).decode()},
        },
    )
    await kube.create(
        resource_path(G, V, resources.BOT_PLURAL),
        {
            "apiVersion": f"{G}/{V}",
            "kind": "PhabricatorBot",
            "metadata": {"name": BOT},
            "spec": {
                "username": BOT,
                "tokenSecretRef": {"name": "bench-bot-token"},
                "namespaceSelector": {"matchLabels": BENCH},
            },
        },
    )
    await namespace(kube, NS)
    await binding(kube, NS, "runners")


async def pods(
    kube: KubeClient,
    ns: str,
    count: int,
    *,
    prefix: str = "runner",
    labels: Callable[[int], dict[str, str]] = lambda i: {},
    running: bool = False,
) -> list[JSON]:
    """``count`` meshed hand-made pods, at most 32 API calls in flight; Running if asked.

    No node runs them: they name a scheduler that does not exist, so they stay unbound
    and their status is what this process writes.
    """
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> JSON:
        async with gate:
            pod = await kube.create(
                resource_path("", "v1", "pods", ns),
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{prefix}-{i}", "labels": labels(i)},
                    "spec": {
                        "serviceAccountName": "runner",
                        "schedulerName": "hand-made",
                        "initContainers": [
                            {"name": "linkerd-proxy", "image": "proxy", "restartPolicy": "Always"}
                        ],
                        "containers": [{"name": "app", "image": "app"}],
                    },
                },
            )
            if running:
                await kube.merge_patch(
                    resource_path("", "v1", "pods", ns, pod["metadata"]["name"], "status"),
                    {"status": {"phase": "Running"}},
                )
            return pod

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="phabmesh-bench-") as tmp:
        plane = devcluster.ControlPlane(Path(tmp) / "plane", delays=devcluster.Delays.realistic())
        plane.start()
        conduit = Conduit(Path(tmp))
        try:
            install(plane)
            rows += await scenario(plane, conduit, args, Path(tmp))
        finally:
            conduit.stop()
            plane.stop()
    return rows


async def scenario(  # noqa: PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane, conduit: Conduit, args: argparse.Namespace, tmp: Path
) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    children: list[Child] = []
    try:
        await setup(kube, conduit)
        operator = Operator(plane, conduit, tmp)
        gateway = Gateway(plane, conduit, tmp)
        children += [operator, gateway]
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        issuer = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        gw = f"http://127.0.0.1:{gateway.port}/api/user.whoami"

        # Issuance: a few pods, then `burst` pods, patched Running at once -> leases Active.
        calls_before = await conduit.calls(http)
        small = min(10, max(1, args.burst // 10))
        created = await pods(kube, NS, args.pods + small)  # `small` more, to revoke alone
        await asyncio.sleep(1)
        started: dict[str, float] = {}

        async def run_pod(pod: JSON) -> None:
            started[pod["metadata"]["uid"]] = time.perf_counter()
            await kube.merge_patch(
                resource_path("", "v1", "pods", NS, pod["metadata"]["name"], "status"),
                {"status": {"phase": "Running"}},
            )

        issued: dict[str, float] = {}

        async def issuance(group: list[JSON]) -> tuple[str, str, str]:
            """``group`` patched Running at once -> each lease Active, seen on a watch."""
            t = time.perf_counter()
            await asyncio.gather(*(run_pod(p) for p in group))
            patched = time.perf_counter() - t
            uids = {p["metadata"]["uid"] for p in group}

            async def all_issued() -> bool:
                for lease in list(leases.by_uid.values()):
                    if lease.active and lease.pod_uid in uids and lease.pod_uid not in issued:
                        issued[lease.pod_uid] = time.perf_counter() - started[lease.pod_uid]
                return uids <= issued.keys()

            await until(all_issued, 60)
            lat = [issued[u] for u in uids if u in issued]
            return (
                f"issuance: Running -> lease Active, {len(group)} pods at once",
                f"p50 {ms(pct(lat, 50))}, p99 {ms(pct(lat, 99))} "
                f"(the {len(group)} status patches themselves: {ms(patched)})",
                "p99 <= 200 ms",
            )

        rows.append(await issuance(created[args.burst : args.burst + small]))
        await asyncio.sleep(1)
        rows.append(await issuance(created[: args.burst]))
        await asyncio.gather(*(run_pod(p) for p in created[args.burst + small :]))
        uids = {p["metadata"]["uid"] for p in created}
        await until(lambda: _true(_active(leases, uids) == len(uids)), 120)
        per_pod = (await conduit.calls(http) - calls_before) / max(len(created), 1)

        # Credential exchange, TokenReview uncached then cached.
        tokens = await asyncio.gather(
            *(kube.pod_token(NS, "runner", p, seconds=3600) for p in created)
        )
        first: list[float] = []
        again: list[float] = []
        credentials: list[str] = []
        for token in tokens:
            for bucket in (first, again):
                t = time.perf_counter()
                async with http.post(issuer, headers={"Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                bucket.append(time.perf_counter() - t)
            if "credential" not in body:
                raise RuntimeError(f"credential exchange refused ({r.status}): {body}")
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

        # Gateway overhead: the same call direct and through the gateway, interleaved; once
        # with the client asking for gzip (Phorge and the gateway compress each answer, the
        # gateway after decoding Phabricator's, redacting and re-encoding), once without.
        bot_token = conduit.direct_token
        direct_url = f"{conduit.url}/api/user.whoami"
        for accept, label in (("gzip", "compression on"), ("identity", "compression off")):
            direct: list[float] = []
            via: list[float] = []
            for i in range(args.calls):
                for url, form, bucket in (
                    (direct_url, {"api.token": bot_token}, direct),
                    (gw, {"api.token": credentials[i % len(credentials)]}, via),
                ):
                    t = time.perf_counter()
                    async with http.post(url, data=form, headers={"Accept-Encoding": accept}) as r:
                        await r.read()
                    bucket.append(time.perf_counter() - t)
            added50 = pct(via, 50) - pct(direct, 50)
            added99 = pct(via, 99) - pct(direct, 99)
            rows.append(
                (
                    f"gateway added latency, {label} ({args.calls} sequential calls, "
                    f"Accept-Encoding: {accept})",
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
            return float(done / args.seconds)

        # Once against the test server as it is (answers in well under 1 ms: the gateway's
        # own cost shows in full), once with 50 ms per answer, closer to a real Phorge.
        for service, label in ((0.0, "test server as is"), (0.05, "50 ms upstream")):
            await conduit.delay(http, service)
            rate_direct = await throughput(direct_url, lambda k: {"api.token": bot_token})
            rate_via = await throughput(
                gw, lambda k: {"api.token": credentials[k % len(credentials)]}
            )
            rows.append(
                (
                    f"gateway throughput vs direct, 32 clients, {label}",
                    f"{rate_via:.0f}/s vs {rate_direct:.0f}/s = {rate_via / rate_direct:.0%}",
                    ">= 80 %",
                )
            )
        await conduit.delay(http, 0.0)

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
        pairs = list(zip(created, credentials, strict=True))
        for group, first_index in ((pairs[-small:], len(pairs)), (pairs[:-small], 0)):
            t = time.perf_counter()
            revoked = await asyncio.gather(
                *(delete_and_time(first_index + i, p, c) for i, (p, c) in enumerate(group))
            )
            scale_down = time.perf_counter() - t
            rev = [r for r in revoked if r is not None]
            rows.append(
                (
                    f"revocation: pod deleted -> gateway refuses, {len(group)} pods at once",
                    f"p50 {ms(pct(rev, 50))}, p99 {ms(pct(rev, 99))}; all in {scale_down:.2f} s",
                    "p99 <= 0.5 s",
                )
            )
            await asyncio.sleep(1)
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

        rows.append(await mass_scale_down(kube, leases, args.scale))
        await namespace(kube, workloads.NS)
        await binding(kube, workloads.NS, "fleet")
        steps = [int(n) for n in str(args.deploy).split(",") if n]
        rows += await workloads.figures(kube, http, leases, plane, issuer, gw, steps)
        rows += await at_size(kube, http, leases, plane, conduit, (operator, gateway), args, tmp)
    finally:
        await stop_all(children, watching, http, kube)
    return rows


def _active(leases: LeaseIndex, pod_uids: set[str]) -> int:
    return sum(1 for x in list(leases.by_uid.values()) if x.active and x.pod_uid in pod_uids)


async def mass_scale_down(kube: KubeClient, leases: LeaseIndex, count: int) -> tuple[str, str, str]:
    """``count`` Running pods deleted at once (64 deletions in flight) -> every lease revoked."""
    ns = "scale"
    await namespace(kube, ns)
    await binding(kube, ns, "workers")
    created = await pods(kube, ns, count, prefix="worker", running=True)
    uids = {p["metadata"]["uid"] for p in created}
    await until(lambda: _true(_active(leases, uids) == count), 300)
    gate = asyncio.Semaphore(64)

    async def delete(pod: JSON) -> None:
        async with gate:
            await kube.delete(
                resource_path("", "v1", "pods", ns, pod["metadata"]["name"]),
                body={"gracePeriodSeconds": 0},
            )

    t = time.perf_counter()
    await asyncio.gather(*(delete(p) for p in created))
    issued_in = time.perf_counter() - t
    after = await until(lambda: _true(_active(leases, uids) == 0), 120)
    total = time.perf_counter() - t if after is not None else float("nan")
    return (
        f"scale-down: {count} pods deleted -> every lease revoked",
        f"{total:.2f} s; the deletions themselves took {issued_in:.2f} s, "
        f"the last lease went {after or float('nan'):.2f} s after the last deletion",
        "<= 10 s",
    )


async def at_size(
    kube: KubeClient,
    http: aiohttp.ClientSession,
    leases: LeaseIndex,
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    processes: tuple[Operator, Gateway],
    args: argparse.Namespace,
    tmp: Path,
) -> list[tuple[str, str, str]]:
    """``big_pods`` pods across ``big_bindings`` bindings (10 per namespace), a third of the
    pods matched: the operator's and the gateway's memory, then a restart at that size."""
    operator, gateway = processes
    per_ns = 10
    spaces = max(1, args.big_bindings // per_ns)
    gate = asyncio.Semaphore(16)

    async def space(k: int) -> list[JSON]:
        ns = f"big-{k}"
        async with gate:
            await namespace(kube, ns)
            for b in range(per_ns):
                await binding(kube, ns, f"b{b}", {"matchLabels": {"binding": f"b{b}"}})

        def labels(i: int) -> dict[str, str]:
            # Every third pod carries a label one binding selects; the rest match none.
            return {"binding": f"b{i % per_ns}" if i % 3 == 0 else "none"}

        return await pods(
            kube, ns, args.big_pods // spaces, prefix="p", labels=labels, running=True
        )

    made = [p for chunk in await asyncio.gather(*(space(k) for k in range(spaces))) for p in chunk]
    matched = {p["metadata"]["uid"] for p in made if p["metadata"]["labels"]["binding"] != "none"}
    await until(lambda: _true(_active(leases, matched) == len(matched)), 600)
    await asyncio.sleep(5)  # let the operator settle (timers, status writes)
    rss, peak = operator.memory_mb()
    rows = [
        (
            f"operator memory: {len(made)} pods, {spaces * per_ns} bindings, "
            f"{len(matched)} matched",
            f"RSS {rss:.0f} MB (peak {peak:.0f} MB)",
            "<= 300 MB",
        ),
        (
            "gateway memory at that size (watches every pod and lease)",
            "RSS {:.0f} MB (peak {:.0f} MB)".format(*gateway.memory_mb()),
            "-",
        ),
    ]
    operator.stop()
    again = Operator(plane, conduit, tmp)
    try:
        took = await ready(http, again.metrics_port, 120)  # ready: listed, swept, serving
        rss_after, _ = again.memory_mb()
    finally:
        again.stop()
    rows.append(
        (
            "operator restart at that size: start to ready and swept",
            f"{took:.1f} s (RSS then {rss_after:.0f} MB)",
            "<= 30 s",
        )
    )
    return rows


async def _true(value: bool) -> bool:
    return value


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--pods", type=int, default=200, help="pods for exchange and revocation")
    parser.add_argument("--burst", type=int, default=100, help="of those, Running at once")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--reviews", type=int, default=20)
    parser.add_argument("--scale", type=int, default=1000, help="pods in the scale-down")
    parser.add_argument("--big-pods", type=int, default=5000)
    parser.add_argument("--big-bindings", type=int, default=500)
    parser.add_argument(
        "--deploy", default="100,1000", help="replicas a Deployment is scaled to, in turn"
    )
    args = parser.parse_args()
    logs.configure("WARNING")
    rows = asyncio.run(run(args))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'measured':<60}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:<60}  {target}")
    print(
        f"\n(python -m bench --pods {args.pods} --burst {args.burst} --calls {args.calls} "
        f"--seconds {args.seconds:g} --reviews {args.reviews} --scale {args.scale} "
        f"--big-pods {args.big_pods} --big-bindings {args.big_bindings} --deploy {args.deploy})"
    )


if __name__ == "__main__":
    main()
