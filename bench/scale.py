"""phabmesh at cluster scale: tens of thousands of pods over thousands of namespaces, one run.

    python -m bench.scale [--pods 50000] [--namespaces 2000] [--meshed 0.2] [--bindings 2000]
                          [--jobs 0.1] [--nodes 10] [--scale-up 5000] [--bursts 100,1000]
                          [--sample 100] [--restart-pods 50] [--deadline 1500]

The same parts as ``python -m bench`` (bench/__main__.py), each its own process on
127.0.0.1: kube-apiserver and etcd, the controller manager, KWOK's simulated nodes, the
Conduit test server, ``phabmesh operator`` and ``phabmesh gateway`` under the RBAC of
manifests/. The population is made as a cluster makes it: Deployments and Jobs, their pods
created by the controller manager and run by KWOK (no start or stop delay: what is measured
is phabmesh's work, not a kubelet's). Every pod names its node (``spec.nodeName``): the
scheduler, one bind at a time, would take longer than the rest together.

In each namespace: a Deployment of unmeshed pods (in every other namespace labelled so that
the namespace's binding selects them: matched but unmeshed), a Job of unmeshed pods (they
run and complete), and, where the namespace has a binding, a Deployment of meshed pods (a
``linkerd-proxy`` native sidecar, Linkerd's label and annotation, the binding's label),
which get leases. Then, in order:

- operator and gateway RSS before any pod, after the unmeshed pods, after the meshed ones;
- lease issuance with 100 and 1,000 hand-made pods patched Running at once, beside the time
  the API server takes for those same status patches from this process;
- a Deployment of meshed pods scaled 0 -> ``--scale-up``: until every pod Running and every
  lease Active, and the phabmesh processes' API requests per pod start (the audit log);
- an operator restart at full size: to ready, and to swept and judged (every lease of a pod
  deleted while it was down revoked, every pod created meanwhile holding an Active lease),
  with the CPU from start to ready of the operator and of what shares its cores (the API
  server, etcd, KWOK, the controller manager, the scheduler, the gateway);
- that Deployment scaled back to 0: from each pod's deletionTimestamp to its lease revoked,
  and for ``--sample`` of its pods to the gateway refusing their credential.

Bounded: every wait has a limit and the whole run ``--deadline`` seconds; past it, the run
prints what it measured so far, stops its processes and removes its files. Nothing here
asserts: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.__main__ import (
    SYSTEM,
    Child,
    Conduit,
    Gateway,
    Operator,
    binding,
    install,
    namespace,
    pct,
    pods,
    ready,
    setup,
    stop_all,
)
from phabmesh import identity, logs, memory, resources
from phabmesh.dev import devcluster
from phabmesh.kube import KubeClient, load_connection, shapes
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.leases.view import LeaseView
from phabmesh.resources import resource_path

Row = tuple[str, str]
MATCH = {"phab": "yes"}  # what every binding of the population selects
LINKERD_NS = "linkerd"


class Rows(list[Row]):
    """The figures so far; each is also printed (to stderr) as soon as it is measured."""

    def append(self, row: Row) -> None:
        super().append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {row[0]}: {row[1]}", file=sys.stderr, flush=True)


class OutOfTime(Exception):
    """The run's deadline has passed."""


@dataclasses.dataclass
class Clock:
    """The run's deadline: every wait is bounded by its own limit and by what is left."""

    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()

    async def until(self, done: Callable[[], bool], limit: float, every: float = 0.05) -> float:
        """Seconds until ``done()``; OutOfTime past ``limit`` or the deadline."""
        start = time.perf_counter()
        while not done():
            now = time.perf_counter()
            if now - start > limit:
                raise OutOfTime(f"not within {limit:.0f} s")
            if now > self.end:
                raise OutOfTime("the run's deadline passed")
            await asyncio.sleep(every)
        return time.perf_counter() - start


# -- what this process sees: pods and leases, each event timed on arrival ----------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PodSeen:
    namespace: str
    uid: str
    app: str
    phase: str
    terminating: bool


def _pod(obj: JSON) -> PodSeen:
    meta = obj.get("metadata") or {}
    return PodSeen(
        namespace=str(meta.get("namespace")),
        uid=str(meta.get("uid")),
        app=str((meta.get("labels") or {}).get("app") or ""),
        phase=str((obj.get("status") or {}).get("phase") or ""),
        terminating=bool(meta.get("deletionTimestamp")),
    )


class Watch:
    """Every pod and every lease of the cluster, with the moment each change was seen."""

    def __init__(self, kube: KubeClient) -> None:
        self.running_at: dict[str, float] = {}  # pod uid -> first seen Running
        self.deleting_at: dict[str, float] = {}  # pod uid -> first seen terminating or gone
        self.uid_of: dict[str, str] = {}  # pod "ns/name" -> uid
        self.active_at: dict[str, float] = {}  # pod uid -> first seen with an Active lease
        self.revoked_at: dict[str, float] = {}  # pod uid -> its Active lease first seen not so
        self.lease_pod: dict[str, str] = {}  # lease "ns/name" -> pod uid
        self.pods: Informer[PodSeen] = Informer(
            kube,
            resource_path("", "v1", "pods"),
            _pod,
            on_event=self._pod_event,
            name="pods",
            shape=shapes.POD,
        )
        self.leases: Informer[LeaseView] = Informer(
            kube,
            resources.lease_path(None),
            LeaseView.from_body,
            on_event=self._lease_event,
            name="leases",
            shape=shapes.LEASE,
        )

    def _pod_event(self, _kind: str, key: str, pod: PodSeen | None) -> None:
        now = time.perf_counter()
        if pod is None:
            uid = self.uid_of.pop(key, None)
            if uid is not None:
                self.deleting_at.setdefault(uid, now)
            return
        self.uid_of[key] = pod.uid
        if pod.phase == "Running" and not pod.terminating:
            self.running_at.setdefault(pod.uid, now)
        if pod.terminating:
            self.deleting_at.setdefault(pod.uid, now)

    def _lease_event(self, _kind: str, key: str, lease: LeaseView | None) -> None:
        now = time.perf_counter()
        if lease is None:
            uid = self.lease_pod.pop(key, None)
            if uid is not None and uid in self.active_at:
                self.revoked_at.setdefault(uid, now)
            return
        self.lease_pod[key] = lease.pod_uid
        if lease.active:
            self.active_at.setdefault(lease.pod_uid, now)
        elif lease.pod_uid in self.active_at:
            self.revoked_at.setdefault(lease.pod_uid, now)

    def in_namespaces(self, prefix: str) -> list[PodSeen]:
        return [p for p in list(self.pods.items.values()) if p.namespace.startswith(prefix)]

    async def run(self) -> None:
        await asyncio.gather(self.pods.run(), self.leases.run())


# -- workloads --------------------------------------------------------------------------------


def pod_template(app: str, *, meshed: bool, matched: bool, node: str) -> JSON:
    labels = {"app": app, **(MATCH if matched else {})}
    annotations: dict[str, str] = {}
    init: list[JSON] = []
    if meshed:  # as Linkerd's injector leaves a pod: its label, annotation and native sidecar
        labels[identity.CONTROL_PLANE_LABEL] = LINKERD_NS
        annotations[identity.PROXY_VERSION_ANNOTATION] = "edge-25.1.1"
        init.append(
            {
                "name": identity.PROXY_CONTAINER,
                "image": "proxy",
                "restartPolicy": "Always",
                "env": [{"name": "_l5d_ns", "value": LINKERD_NS}],
            }
        )
    return {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "serviceAccountName": "runner",
            "nodeName": node,
            "initContainers": init,
            "containers": [{"name": "app", "image": "app"}],
        },
    }


def deployment(name: str, replicas: int, template: JSON) -> JSON:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": template["metadata"]["labels"]["app"]}},
            "template": template,
        },
    }


def job(name: str, count: int, template: JSON) -> JSON:
    template = json.loads(json.dumps(template))
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"completions": count, "parallelism": count, "template": template},
    }


@dataclasses.dataclass(frozen=True)
class Plan:
    """How many pods of each kind go to namespace ``k`` (of ``namespaces``)."""

    args: argparse.Namespace

    def spread(self, total: int, k: int, over: int) -> int:
        return total // over + (1 if k < total % over else 0)

    @property
    def with_binding(self) -> int:
        return min(int(self.args.namespaces), int(self.args.bindings))

    @property
    def meshed_total(self) -> int:
        return round(float(self.args.pods) * float(self.args.meshed))

    @property
    def job_total(self) -> int:
        return round(float(self.args.pods) * float(self.args.jobs))

    @property
    def plain_total(self) -> int:
        return int(self.args.pods) - self.meshed_total - self.job_total

    def meshed(self, k: int) -> int:
        return self.spread(self.meshed_total, k, self.with_binding) if k < self.with_binding else 0

    def jobs(self, k: int) -> int:
        return self.spread(self.job_total, k, self.args.namespaces)

    def plain(self, k: int) -> int:
        return self.spread(self.plain_total, k, self.args.namespaces)

    def bindings(self, k: int) -> int:
        return self.spread(self.args.bindings, k, self.with_binding) if k < self.with_binding else 0


async def gathered(work: list[Awaitable[object]], at_once: int) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one(w: Awaitable[object]) -> None:
        async with gate:
            await w

    await asyncio.gather(*(one(w) for w in work))


# -- measuring ----------------------------------------------------------------------------------


async def quiet(
    clock: Clock,
    pids: list[int | None],
    enough: Callable[[list[float]], bool],
    limit: float,
    spare: float = 0,
) -> float:
    """Seconds until ``enough`` holds of the CPU seconds each of ``pids`` used over 2 s (at
    most ``limit``, and only while the run has ``spare`` seconds left beyond that)."""
    start = time.perf_counter()
    while time.perf_counter() - start < min(limit, max(clock.left() - spare, 0)):
        before = [cpu_of(pid) for pid in pids]
        await asyncio.sleep(2)
        if enough([cpu_of(pid) - b for pid, b in zip(pids, before, strict=True)]):
            break
    return time.perf_counter() - start


async def settled(clock: Clock, children: list[Child], limit: float = 30) -> float:
    """Seconds until each of ``children`` has used under 5 % of a core over 2 s."""
    pids: list[int | None] = [c.proc.pid for c in children]
    return await quiet(clock, pids, lambda used: all(u < 0.1 for u in used), limit)


async def plane_quiet(clock: Clock, pids: dict[str, int | None], limit: float = 60) -> float:
    """Seconds until the processes ``pids`` together use under a quarter of a core over 2 s
    (at most ``limit``): idle, a control plane's own upkeep takes a few percent."""
    return await quiet(clock, list(pids.values()), lambda used: sum(used) < 0.5, limit, 120)


async def rested(clock: Clock, children: list[Child]) -> None:
    """Settled, then three of the processes' memory periods: what a burst left is measured
    once the process has given back what it gives back by itself (phabmesh.memory)."""
    await settled(clock, children)
    await asyncio.sleep(3 * memory.PERIOD)


class Audit:
    """The phabmesh processes' requests, from the API server's audit log."""

    def __init__(self, plane: devcluster.ControlPlane) -> None:
        self.path = plane.audit_log
        self.users = {
            f"system:serviceaccount:{SYSTEM}:phabmesh-{who}": who for who in ("operator", "gateway")
        }

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def since(self, mark: int) -> Counter[tuple[str, str, str]]:
        """(process, verb, resource) -> requests completed after ``mark``."""
        counts: Counter[tuple[str, str, str]] = Counter()
        with self.path.open("rb") as log:
            log.seek(mark)
            for line in log:
                if not line.strip():
                    continue
                event = json.loads(line)
                who = self.users.get(event.get("user", {}).get("username", ""))
                if who is None:
                    continue
                ref = event.get("objectRef") or {}
                resource = ref.get("resource", "") + (
                    f"/{ref['subresource']}" if ref.get("subresource") else ""
                )
                counts[(who, event.get("verb", ""), resource)] += 1
        return counts


def per_pod(counts: Counter[tuple[str, str, str]], started: int) -> str:
    total = {who: 0 for who in ("operator", "gateway")}
    for (who, _, _), n in counts.items():
        total[who] += n
    top = ", ".join(
        f"{who} {verb} {resource} {n}" for (who, verb, resource), n in counts.most_common(6)
    )
    return (
        f"operator {total['operator'] / max(started, 1):.2f}, gateway "
        f"{total['gateway'] / max(started, 1):.2f} per pod ({sum(total.values())} requests "
        f"for {started} pods; most: {top or 'none'})"
    )


def ms(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"p50 {pct(values, 50) * 1000:.0f} ms, p99 {pct(values, 99) * 1000:.0f} ms, "
        f"max {max(values) * 1000:.0f} ms"
    )


# -- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> list[Row]:
    """Every figure measured before the deadline (a row says where it stopped, if it did)."""
    rows = Rows()
    clock = Clock(time.perf_counter() + args.deadline)
    with contextlib.ExitStack() as stack:
        tmp = getattr(args, "workdir", None) or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="phabmesh-scale-")
        )
        Path(tmp).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before anything runs
        plane = devcluster.ControlPlane(
            Path(tmp) / "plane", nodes=args.nodes, client_qps=args.client_qps
        )
        plane.start()
        conduit = Conduit(Path(tmp))
        try:
            install(plane)
            try:
                await asyncio.wait_for(
                    scenario(plane, conduit, args, Path(tmp), clock, rows),
                    timeout=max(clock.left(), 1),
                )
            except (OutOfTime, TimeoutError) as exc:
                why = str(exc) or "the run's deadline passed"
                rows.append(("stopped early", f"--deadline {args.deadline:g} s: {why}"))
        finally:
            conduit.stop()
            plane.stop()
    return rows


async def scenario(  # noqa: PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    args: argparse.Namespace,
    tmp: Path,
    clock: Clock,
    rows: list[Row],
) -> None:
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    watch = Watch(kube)
    watching = asyncio.create_task(watch.run())
    children: list[Child] = []
    audit = Audit(plane)
    plan = Plan(args)
    nodes = plane.nodes

    def leased(pod_uids: set[str]) -> Callable[[], bool]:
        return lambda: pod_uids <= watch.active_at.keys()

    try:
        await setup(kube, conduit)
        operator = Operator(plane, conduit, tmp)
        gateway = Gateway(plane, conduit, tmp)
        children += [operator, gateway]
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        await settled(clock, children)
        base = {"operator": operator.memory_mb()[0], "gateway": gateway.memory_mb()[0]}

        # Namespaces, their bindings, and the unmeshed pods (Deployments and Jobs).
        t = time.perf_counter()
        spaces = [f"s-{k}" for k in range(args.namespaces)]

        async def space(k: int) -> None:
            ns = spaces[k]
            await namespace(kube, ns)
            for b in range(plan.bindings(k)):
                await binding(kube, ns, f"b{b}", {"matchLabels": MATCH})
            node = nodes[k % len(nodes)]
            plain = pod_template("plain", meshed=False, matched=k % 2 == 0, node=node)
            if plan.plain(k):
                await kube.create(
                    resource_path("apps", "v1", "deployments", ns),
                    deployment("plain", plan.plain(k), plain),
                )
            if plan.jobs(k):
                batch = pod_template("batch", meshed=False, matched=False, node=node)
                await kube.create(
                    resource_path("batch", "v1", "jobs", ns), job("batch", plan.jobs(k), batch)
                )

        await gathered([space(k) for k in range(args.namespaces)], 16)
        unmeshed = plan.plain_total + plan.job_total

        def population(count: int) -> Callable[[], bool]:
            def done() -> bool:
                pods = watch.in_namespaces("s-")
                return len(pods) >= count and all(p.phase in ("Running", "Succeeded") for p in pods)

            return done

        await clock.until(population(unmeshed), 3600, every=1)
        made = time.perf_counter() - t
        await rested(clock, children)
        after_plain = {"operator": operator.memory_mb()[0], "gateway": gateway.memory_mb()[0]}
        kinds_plain = operator.memory_kinds()

        # The meshed pods, every one selected by its namespace's binding.
        t = time.perf_counter()

        async def meshed(k: int) -> None:
            template = pod_template("mesh", meshed=True, matched=True, node=nodes[k % len(nodes)])
            await kube.create(
                resource_path("apps", "v1", "deployments", spaces[k]),
                deployment("mesh", plan.meshed(k), template),
            )

        await gathered([meshed(k) for k in range(plan.with_binding) if plan.meshed(k)], 16)

        def all_leased() -> bool:
            pods = watch.in_namespaces("s-")
            running = [p.uid for p in pods if p.phase == "Running"]
            return len(pods) >= args.pods and sum(u in watch.active_at for u in running) >= (
                plan.meshed_total
            )

        await clock.until(population(args.pods), 3600, every=1)
        await clock.until(all_leased, 600, every=1)
        made_meshed = time.perf_counter() - t
        await rested(clock, children)
        after_mesh = {"operator": operator.memory_mb()[0], "gateway": gateway.memory_mb()[0]}
        kinds_mesh = operator.memory_kinds()
        rows.append(
            (
                f"population: {args.pods} pods in {args.namespaces} namespaces, "
                f"{args.bindings} bindings on {len(nodes)} KWOK nodes",
                f"{unmeshed} unmeshed ({plan.job_total} of them by Jobs) made and Running or "
                f"Succeeded in {made:.0f} s; {plan.meshed_total} meshed, each with an Active "
                f"lease, {made_meshed:.0f} s after",
            )
        )
        for who in ("operator", "gateway"):
            rows.append(
                (
                    f"{who} RSS: before any pod / {unmeshed} unmeshed / +{plan.meshed_total} "
                    "meshed with leases",
                    f"{base[who]:.0f} / {after_plain[who]:.0f} / {after_mesh[who]:.0f} MB; "
                    f"per unmeshed pod {_kb(after_plain[who] - base[who], unmeshed)}, per "
                    f"meshed pod {_kb(after_mesh[who] - after_plain[who], plan.meshed_total)}, "
                    f"per pod overall {_kb(after_mesh[who] - base[who], args.pods)}",
                )
            )

        rows.append(
            (
                "operator RSS by mapping: after the unmeshed / after the meshed",
                ", ".join(
                    f"{kind} {kinds_plain[kind]:.0f} / {kinds_mesh[kind]:.0f} MB"
                    for kind in kinds_plain
                ),
            )
        )

        # Issuance with hand-made pods patched Running at once, beside the patches' own time.
        await namespace(kube, "burst")
        await binding(kube, "burst", "runners")
        bursts = [int(n) for n in str(args.bursts).split(",") if n]
        created = await pods(kube, "burst", sum(bursts), prefix="hand")
        await asyncio.sleep(2)
        offset = 0
        for size in bursts:
            group = created[offset : offset + size]
            offset += size
            started: dict[str, float] = {}

            async def running(pod: JSON, started: dict[str, float] = started) -> None:
                started[pod["metadata"]["uid"]] = time.perf_counter()
                await kube.merge_patch(
                    resource_path("", "v1", "pods", "burst", pod["metadata"]["name"], "status"),
                    {"status": {"phase": "Running"}},
                )

            t = time.perf_counter()
            await asyncio.gather(*(running(p) for p in group))
            patched = time.perf_counter() - t
            uids = {p["metadata"]["uid"] for p in group}
            await clock.until(leased(uids), 300)
            lat = [watch.active_at[u] - started[u] for u in uids]
            rows.append(
                (
                    f"issuance: {size} pods patched Running at once -> lease Active",
                    f"{ms(lat)}; the API server took {patched * 1000:.0f} ms for the {size} "
                    f"status patches themselves: p99 / that = {pct(lat, 99) / patched:.1f}",
                )
            )
            await asyncio.sleep(2)

        # A Deployment of meshed pods scaled 0 -> scale_up.
        ns = "fleet"
        await namespace(kube, ns)
        await binding(kube, ns, "fleet", {"matchLabels": MATCH})
        template = pod_template("fleet", meshed=True, matched=True, node=nodes[0])
        await kube.create(
            resource_path("apps", "v1", "deployments", ns), deployment("fleet", 0, template)
        )
        await asyncio.sleep(1)
        mark = audit.mark()
        t = time.perf_counter()
        await asyncio.to_thread(
            plane.kubectl, "scale", "-n", ns, "deploy/fleet", f"--replicas={args.scale_up}"
        )

        def fleet() -> list[PodSeen]:
            return [p for p in list(watch.pods.items.values()) if p.namespace == ns]

        await clock.until(lambda: sum(p.phase == "Running" for p in fleet()) >= args.scale_up, 1800)
        all_running = time.perf_counter() - t
        uids = {p.uid for p in fleet()}
        await clock.until(leased(uids), 600)
        all_active = max(watch.active_at[u] for u in uids) - t
        last_running = max(watch.running_at[u] for u in uids) - t
        lag = [watch.active_at[u] - watch.running_at[u] for u in uids if u in watch.running_at]
        await settled(clock, children)
        rows.append(
            (
                f"scale-up: Deployment 0 -> {args.scale_up} meshed pods (kubectl scale) -> "
                "every pod event handled (each lease Active)",
                f"{all_active:.1f} s; the last pod Running at {last_running:.1f} s (all "
                f"{all_running:.1f} s); pod Running -> its lease Active {ms(lag)}",
            )
        )
        rows.append(
            (
                f"API requests per pod start (audit log, the {args.scale_up}-pod scale-up)",
                per_pod(audit.since(mark), len(uids)),
            )
        )

        # Credentials for a sample of those pods, to be refused by the gateway on scale-down.
        issuer = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        sample = sorted(uids)[: args.sample]
        names = {watch.uid_of[k]: k.split("/", 1)[1] for k in list(watch.uid_of)}
        credentials: dict[str, str] = {}

        async def credential(uid: str) -> None:
            pod = {"metadata": {"name": names[uid], "uid": uid}}
            token = await kube.pod_token(ns, "runner", pod, seconds=3600)
            async with http.post(issuer, headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status == 200:
                    credentials[uid] = str((await r.json())["credential"])

        await gathered([credential(u) for u in sample], 16)

        # The Deployment scaled back to 0: every lease revoked; the sample refused.
        gw = f"http://127.0.0.1:{gateway.port}/api/user.whoami"
        refused: dict[str, float] = {}

        async def refusal(uid: str, credential: str) -> None:
            await clock.until(lambda: uid in watch.deleting_at, 600, every=0.02)
            while clock.left() > 0 and uid not in refused:
                async with http.post(gw, data={"api.token": credential}) as r:
                    body = await r.json()
                if body.get("error_code"):
                    refused[uid] = time.perf_counter() - watch.deleting_at[uid]
                    return
                await asyncio.sleep(0.02)

        probes = [asyncio.create_task(refusal(u, c)) for u, c in credentials.items()]
        mark = audit.mark()
        t = time.perf_counter()
        await asyncio.to_thread(plane.kubectl, "scale", "-n", ns, "deploy/fleet", "--replicas=0")
        try:
            await clock.until(lambda: uids <= watch.revoked_at.keys(), 1800)
            all_revoked = time.perf_counter() - t
            await asyncio.wait_for(asyncio.gather(*probes), max(1, min(120, clock.left())))
        finally:
            for probe in probes:
                probe.cancel()
        await settled(clock, children)
        stopped = per_pod(audit.since(mark), len(uids))
        revocation = [
            watch.revoked_at[u] - watch.deleting_at[u] for u in uids if u in watch.deleting_at
        ]
        rows.append(
            (
                f"revocation: Deployment {args.scale_up} -> 0, pod's deletionTimestamp -> its "
                "lease revoked",
                f"{ms(revocation)}; every lease revoked {all_revoked:.1f} s after kubectl scale",
            )
        )
        rows.append(
            (
                f"revocation, {len(credentials)} of those pods: deletionTimestamp -> the gateway "
                "refuses its credential",
                ms(list(refused.values())) + f" ({len(refused)} of {len(credentials)})",
            )
        )
        rows.append(("API requests per pod stop (audit log, the same scale-down)", stopped))

        # An operator restart at full size: some pods deleted and replaced while it is down.
        operator.stop()
        children.remove(operator)
        mesh_pods = [
            (key, uid)
            for key, uid in list(watch.uid_of.items())
            if key.startswith("s-") and uid in watch.active_at and uid not in watch.revoked_at
        ][: args.restart_pods]
        gone = {uid for _, uid in mesh_pods}
        await gathered(
            [
                kube.delete(
                    resource_path("", "v1", "pods", *key.split("/", 1)),
                    body={"gracePeriodSeconds": 0},
                )
                for key, _ in mesh_pods
            ],
            16,
        )
        replaced_spaces = {key.split("/", 1)[0] for key, _ in mesh_pods}

        def replacements() -> set[str]:
            return {
                p.uid
                for p in list(watch.pods.items.values())
                if p.namespace in replaced_spaces
                and p.app == "mesh"
                and p.phase == "Running"
                and p.uid not in watch.active_at
                and p.uid not in gone
            }

        await clock.until(lambda: len(replacements()) >= len(mesh_pods), 300, every=0.5)
        fresh = replacements()
        size = len(watch.pods.items)
        pids = {label: plane.pid(name) for label, name in BESIDE}
        pids["gateway"] = gateway.proc.pid
        # The restart is measured on a quiet machine: the control plane done with the
        # scale-down and the replacements (KWOK finishing 5,000 pods' deletions takes a core).
        quiet = await plane_quiet(clock, pids)
        mark = audit.mark()
        before = {label: cpu_of(pid) for label, pid in pids.items()}
        t = time.perf_counter()
        operator = Operator(plane, conduit, tmp)
        children.append(operator)
        limit = max(1.0, min(args.restart_limit, clock.left() - 30))
        try:
            took = f"{await ready(http, operator.metrics_port, limit):.1f} s"
        except RuntimeError:
            took = f"not within {limit:.0f} s"
        used = ", ".join(
            [f"operator {cpu_of(operator.proc.pid):.1f} s (its start included)"]
            + [f"{label} {cpu_of(pid) - before[label]:.1f} s" for label, pid in pids.items()]
        )
        try:
            await clock.until(leased(fresh), max(1.0, limit - (time.perf_counter() - t)))
            judged = f"{time.perf_counter() - t:.1f} s"
        except OutOfTime:
            pages = sum(
                n
                for (who, verb, what), n in audit.since(mark).items()
                if (who, verb, what) == ("operator", "list", "pods")
            )
            judged = (
                f"not within {time.perf_counter() - t:.0f} s: "
                f"{len(fresh & watch.active_at.keys())} of the {len(fresh)} leased; it had read "
                f"{pages} pages of 500 pods (of about {size // 500 + 1})"
            )
        rows.append(
            (
                f"operator restart at {size} pods: start -> ready; -> every pod judged (the "
                f"{len(fresh)} meshed pods created while it was down leased)",
                f"{took}; {judged}; started once the control plane was quiet ({quiet:.0f} s "
                f"after the replacements ran); CPU from start to ready: {used}; "
                f"RSS then {operator.memory_mb()[0]:.0f} MB (the "
                f"{len(gone)} leases of the pods deleted while it was down: deleted with their "
                "pods by the garbage collector)",
            )
        )
    finally:
        await stop_all(children, watching, http, kube)


def cpu_of(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# What shares the cores with the operator, for the CPU figures of its restart.
BESIDE = (
    ("API server", "kube-apiserver"),
    ("etcd", "etcd"),
    ("KWOK", "kwok"),
    ("controller manager", "kube-controller-manager"),
    ("scheduler", "kube-scheduler"),
)


def _kb(mb: float, count: int) -> str:
    return f"{mb * 1024 / max(count, 1):.1f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--pods", type=int, default=50000, help="the population's pods")
    parser.add_argument("--namespaces", type=int, default=2000)
    parser.add_argument("--meshed", type=float, default=0.2, help="of the pods, meshed and bound")
    parser.add_argument("--jobs", type=float, default=0.1, help="of the pods, Jobs' (unmeshed)")
    parser.add_argument("--bindings", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=10, help="KWOK nodes")
    parser.add_argument("--scale-up", type=int, default=5000, help="a Deployment scaled 0 -> N")
    parser.add_argument("--bursts", default="100,1000", help="pods patched Running at once")
    parser.add_argument("--sample", type=int, default=100, help="credentials tried on scale-down")
    parser.add_argument("--restart-pods", type=int, default=50, help="replaced while it is down")
    parser.add_argument(
        "--client-qps", type=int, default=1000, help="the controller manager's request rate"
    )
    parser.add_argument(
        "--restart-limit", type=float, default=600, help="seconds for the operator's restart"
    )
    parser.add_argument(
        "--workdir", help="keep the control plane's and the processes' files and logs here"
    )
    parser.add_argument("--deadline", type=float, default=1500, help="seconds for the whole run")
    args = parser.parse_args()
    problems = [
        f"--{name.replace('_', '-')} must be positive"
        for name in ("pods", "namespaces", "nodes", "scale_up", "deadline", "client_qps")
        if getattr(args, name) <= 0
    ]
    if not 0 <= args.meshed + args.jobs <= 1:
        problems.append("--meshed plus --jobs must be between 0 and 1")
    if problems:
        parser.error("; ".join(problems))
    logs.configure("WARNING")

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # as Ctrl-C: every process of the run is stopped on the way out

    signal.signal(signal.SIGTERM, interrupted)
    rows = asyncio.run(run(args))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  measured")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(
        f"\n(python -m bench.scale --pods {args.pods} --namespaces {args.namespaces} "
        f"--meshed {args.meshed:g} --jobs {args.jobs:g} --bindings {args.bindings} "
        f"--nodes {args.nodes} --scale-up {args.scale_up} --bursts {args.bursts} "
        f"--sample {args.sample} --restart-pods {args.restart_pods} "
        f"--client-qps {args.client_qps} --restart-limit {args.restart_limit:g} "
        f"--deadline {args.deadline:g})"
    )


if __name__ == "__main__":
    main()
