"""Benchmarks on real workloads: one Deployment on KWOK's simulated nodes, scaled as
``kubectl scale`` scales it. The scheduler binds its pods, KWOK starts and stops them with
realistic delays (``devcluster.Delays.realistic``), and each pod behaves as a client would:
once Running, it exchanges its pod-bound token and calls Conduit through the gateway
until the call succeeds; once terminating, its last credential is tried until refused.

Timings start from what the cluster shows, seen on a watch of the pods: a pod's Running
(issuance) and its deletionTimestamp (revocation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import aiohttp

from phabmesh.dev import devcluster
from phabmesh.kube import KubeClient
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.leases.index import LeaseIndex
from phabmesh.resources import resource_path

NS = "fleet"
DEPLOYMENT = "fleet"
Row = tuple[str, str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class Seen:
    name: str
    uid: str
    running: bool
    terminating: bool


def _seen(obj: JSON) -> Seen:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    return Seen(
        name=str(meta.get("name")),
        uid=str(meta.get("uid")),
        running=status.get("phase") == "Running" and bool(status.get("podIP")),
        terminating=bool(meta.get("deletionTimestamp")),
    )


def deployment(replicas: int) -> JSON:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "template": {
                "metadata": {"labels": {"app": DEPLOYMENT}},
                "spec": {
                    "serviceAccountName": "runner",
                    "initContainers": [
                        {"name": "linkerd-proxy", "image": "proxy", "restartPolicy": "Always"}
                    ],
                    "containers": [{"name": "app", "image": "app"}],
                },
            },
        },
    }


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _summary(values: list[float], wanted: int) -> str:
    if not values:
        return f"no pod of {wanted} got there"
    return (
        f"p50 {_pct(values, 50) * 1000:.0f} ms, p99 {_pct(values, 99) * 1000:.0f} ms, "
        f"max {max(values) * 1000:.0f} ms ({len(values)} of {wanted} pods)"
    )


class Fleet:
    """The Deployment's pods as clients: each one's Running and deletion, and its calls."""

    def __init__(
        self, kube: KubeClient, http: aiohttp.ClientSession, issuer: str, gateway: str
    ) -> None:
        self.kube, self.http, self.endpoint, self.gateway = kube, http, issuer, gateway
        self.running_at: dict[str, float] = {}
        self.first_ok: dict[str, float] = {}  # uid -> seconds from Running to the first OK
        self.deleting_at: dict[str, float] = {}
        self.refused: dict[str, float] = {}  # uid -> seconds from deletion to the refusal
        self.credentials: dict[str, str] = {}
        self.gate = asyncio.Semaphore(64)  # requests in flight, all pods together
        self.tasks: set[asyncio.Task[None]] = set()
        self.informer: Informer[Seen] = Informer(
            kube,
            resource_path("", "v1", "pods", NS),
            _seen,
            on_event=self._on_event,
            name="fleet",
        )

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_event(self, _kind: str, _key: str, pod: Seen | None) -> None:
        now = time.perf_counter()
        if pod is None:  # deleted: no deletionTimestamp seen first (gracePeriodSeconds 0)
            return
        if pod.running and not pod.terminating and pod.uid not in self.running_at:
            self.running_at[pod.uid] = now
            self._spawn(self._start(pod))
        if pod.terminating and pod.uid not in self.deleting_at:
            self.deleting_at[pod.uid] = now
            if pod.uid in self.credentials:
                self._spawn(self._stop(pod.uid))

    async def _call(self, credential: str) -> str | None:
        """The gateway's error code for a call with ``credential`` ("" when it went through)."""
        async with self.gate, self.http.post(self.gateway, data={"api.token": credential}) as r:
            body = await r.json()
        return str(body.get("error_code") or "")

    async def _start(self, pod: Seen) -> None:
        """The pod's client: token, exchange, then calls until one goes through."""
        async with self.gate:
            token = await self.kube.pod_token(
                NS, "runner", {"metadata": {"name": pod.name, "uid": pod.uid}}, seconds=3600
            )
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline and pod.uid not in self.deleting_at:
            async with (
                self.gate,
                self.http.post(self.endpoint, headers={"Authorization": f"Bearer {token}"}) as r,
            ):
                body = await r.json() if r.status == 200 else None
            if body is not None:
                credential = str(body["credential"])
                self.credentials[pod.uid] = credential
                while time.perf_counter() < deadline and pod.uid not in self.deleting_at:
                    if await self._call(credential) == "":
                        self.first_ok[pod.uid] = time.perf_counter() - self.running_at[pod.uid]
                        return
                    await asyncio.sleep(0.02)
                return
            await asyncio.sleep(0.02)

    async def _stop(self, uid: str) -> None:
        """From the pod's deletion on: its credential, tried until the gateway refuses it."""
        credential = self.credentials[uid]
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            if await self._call(credential):
                self.refused[uid] = time.perf_counter() - self.deleting_at[uid]
                return
            await asyncio.sleep(0.02)

    async def grown(self, target: int, known: set[str]) -> tuple[float | None, list[float]]:
        """Seconds until ``target`` pods have run, and each new pod's Running -> first OK."""
        all_running = await self.settle(lambda: len(self.running_at) >= target, 600)

        def new() -> set[str]:
            return set(self.running_at) - known

        await self.settle(lambda: new() <= self.first_ok.keys(), 300)
        return all_running, [self.first_ok[u] for u in new() if u in self.first_ok]

    async def settle(self, done: Callable[[], bool], limit: float) -> float | None:
        start = time.perf_counter()
        while time.perf_counter() - start < limit:
            if done():
                return time.perf_counter() - start
            await asyncio.sleep(0.05)
        return None


async def figures(
    kube: KubeClient,
    http: aiohttp.ClientSession,
    leases: LeaseIndex,
    plane: devcluster.ControlPlane,
    issuer: str,
    gateway: str,
    steps: list[int],
) -> list[Row]:
    """The Deployment scaled 0 -> each of ``steps`` in turn, then to 0."""
    rows: list[Row] = []
    await kube.create(resource_path("apps", "v1", "deployments", NS), deployment(0))
    fleet = Fleet(kube, http, issuer, gateway)
    watching = asyncio.create_task(fleet.informer.run())
    await fleet.informer.synced.wait()

    async def scale(replicas: int) -> None:
        await asyncio.to_thread(
            plane.kubectl, "scale", "-n", NS, f"deploy/{DEPLOYMENT}", f"--replicas={replicas}"
        )

    try:
        before = 0
        for target in steps:
            known = set(fleet.running_at)
            await scale(target)
            all_running, took = await fleet.grown(target, known)
            rows.append(
                (
                    f"issuance on a Deployment scaled {before} -> {target}: pod Running -> "
                    "its first call through the gateway goes through",
                    f"{_summary(took, target - before)}; all Running "
                    f"{all_running if all_running is None else round(all_running, 1)} s "
                    "after kubectl scale",
                    "p99 <= 1 s",
                )
            )
            before = target

        uids = set(fleet.credentials)
        await scale(0)

        def revoked() -> bool:
            return not any(x.active and x.pod_uid in uids for x in list(leases.by_uid.values()))

        all_revoked = await fleet.settle(revoked, 300)
        await fleet.settle(lambda: uids <= fleet.refused.keys(), 120)
        rows.append(
            (
                f"revocation on a Deployment scaled {before} -> 0: pod's deletionTimestamp -> "
                "the gateway refuses its credential",
                _summary([fleet.refused[u] for u in uids if u in fleet.refused], len(uids)),
                "p99 <= 0.5 s",
            )
        )
        rows.append(
            (
                f"scale-down: Deployment {before} -> 0 (kubectl scale) -> every lease revoked",
                f"{all_revoked:.2f} s" if all_revoked is not None else "not within 300 s",
                "<= 10 s",
            )
        )
    finally:
        watching.cancel()
        for task in list(fleet.tasks):
            task.cancel()
        await asyncio.gather(watching, *fleet.tasks, return_exceptions=True)
    return rows
