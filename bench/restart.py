"""An operator restart at cluster scale, and where its time goes, in one run.

    python -m bench.restart [--pods 50000] [--namespaces 2000] [--meshed 0.2]
                            [--bindings 2000] [--restarts 2] [--modes all,meshed]
                            [--profile] [--deadline 1500]

Only etcd and kube-apiserver run (``ControlPlane.start_api_only``): this process writes every
pod and its status itself, as a kubelet would leave it (conditions, container statuses,
addresses), so that no node simulator shares the two cores and the pod list costs the API
server what a cluster's does. ``--meshed`` of the pods are meshed and matched by their
namespace's binding; the rest are not meshed (half of those matched by a binding all the
same). ``phabmesh operator`` runs under the RBAC of manifests/ while the population is made
and issues a lease for each meshed pod. Then, with the operator stopped:

- the pod list in pages of 500 three ways: a consistent read (as the operator's first list:
  the watch cache serves it once it has caught up with etcd, which etcd 3.6 makes a matter of
  a progress report), with ``resourceVersion=0`` (which ignores the page size: one page), and
  not older than the latest version (as the operator lists again after a lost watch): wall
  time, this process's CPU (reading and decoding whole), the API server's and etcd's CPU;
- ``--restarts`` restarts of the operator: to ready (every watch listed and swept), with the
  operator's CPU and the API server's and etcd's meanwhile;
- with ``--profile``, one more restart under cProfile (``bench.profiled``), its top functions.

``--modes``: the restarts are made for each, ``all`` (the operator watches every pod, as by
default) and ``meshed`` (``PHABMESH_WATCH_UNMESHED_PODS=false``: only the pods Linkerd's label
marks, the meshed fifth here).

Bounded by ``--deadline``; nothing asserts: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from bench.__main__ import (
    Child,
    Conduit,
    Operator,
    binding,
    install,
    namespace,
    ready,
    setup,
    stop_all,
)
from bench.scale import (
    MATCH,
    Audit,
    Clock,
    OutOfTime,
    Plan,
    Rows,
    Watch,
    cpu_of,
    gathered,
    pod_template,
)
from phabmesh.dev import devcluster
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.client import JSON
from phabmesh.resources import resource_path

STAMP = "2026-01-01T00:00:00Z"


def status(i: int, *, meshed: bool) -> JSON:
    """A Running pod's status as a kubelet writes it."""
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"

    def running(name: str) -> JSON:
        return {
            "name": name,
            "image": f"registry.example/{name}:1.0",
            "imageID": f"registry.example/{name}@sha256:{'0' * 64}",
            "containerID": f"containerd://{i:064x}",
            "ready": True,
            "restartCount": 0,
            "started": True,
            "state": {"running": {"startedAt": STAMP}},
        }

    conditions = [
        {"type": kind, "status": "True", "lastProbeTime": None, "lastTransitionTime": STAMP}
        for kind in (
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        )
    ]
    body: JSON = {
        "phase": "Running",
        "conditions": conditions,
        "hostIP": "192.168.0.1",
        "hostIPs": [{"ip": "192.168.0.1"}],
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": STAMP,
        "qosClass": "BestEffort",
        "containerStatuses": [running("app")],
    }
    if meshed:
        body["initContainerStatuses"] = [running("linkerd-proxy")]
    return body


async def populate(kube: KubeClient, plan: Plan, nodes: list[str], clock: Clock) -> int:
    """Namespaces, bindings and pods (each with its status): returns the meshed pods made."""
    args = plan.args
    await gathered([namespace(kube, f"s-{k}") for k in range(args.namespaces)], 32)
    await gathered(
        [
            binding(kube, f"s-{k}", f"b-{j}", {"matchLabels": MATCH})
            for k in range(args.namespaces)
            for j in range(plan.bindings(k))
        ],
        32,
    )
    work: list[Callable[[], Awaitable[None]]] = []
    meshed = 0
    serial = 0
    for k in range(args.namespaces):
        ns = f"s-{k}"
        kinds = [("mesh", True, True)] * plan.meshed(k) + [("plain", False, k % 2 == 0)] * (
            plan.plain(k) + plan.jobs(k)
        )
        for j, (app, is_meshed, matched) in enumerate(kinds):
            serial += 1
            meshed += is_meshed
            work.append(pod_maker(kube, ns, f"{app}-{j}", serial, is_meshed, matched, nodes))
    done = 0
    gate = asyncio.Semaphore(64)

    async def one(make: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        async with gate:
            if clock.left() < 0:
                raise OutOfTime("the run's deadline passed while making pods")
            await make()
            done += 1
            if done % 5000 == 0:
                print(f"[{time.strftime('%H:%M:%S')}] {done} pods", file=sys.stderr, flush=True)

    await asyncio.gather(*(one(w) for w in work))
    return meshed


def pod_maker(
    kube: KubeClient, ns: str, name: str, serial: int, meshed: bool, matched: bool, nodes: list[str]
) -> Callable[[], Awaitable[None]]:
    async def make() -> None:
        body = pod_template(
            name.split("-", maxsplit=1)[0],
            meshed=meshed,
            matched=matched,
            node=nodes[serial % len(nodes)],
        )
        body.update(apiVersion="v1", kind="Pod")
        body["metadata"]["name"] = name
        await kube.create(resource_path("", "v1", "pods", ns), body)
        await kube.merge_patch(
            resource_path("", "v1", "pods", ns, name, "status"),
            {"status": status(serial, meshed=meshed)},
        )

    return make


async def list_pods(
    plane: devcluster.ControlPlane, kube: KubeClient, params: dict[str, str], since: str = ""
) -> tuple[str, int]:
    """The pod list in pages of 500 with ``params`` (``since``: not older than that version):
    a row's figures, and the pods listed."""
    api, etcd = plane.pid("kube-apiserver"), plane.pid("etcd")
    before = (cpu_of(api), cpu_of(etcd), time.process_time())
    t = time.perf_counter()
    count = pages = 0
    path = resource_path("", "v1", "pods")
    async for page, _ in kube.list_pages(path, params, 500, not_older_than=since):
        count += len(page)
        pages += 1
    wall = time.perf_counter() - t
    used = (cpu_of(api) - before[0], cpu_of(etcd) - before[1], time.process_time() - before[2])
    return (
        f"{wall:.2f} s for {count} pods in {pages} pages ({wall / max(count, 1) * 1e6:.0f} µs a "
        f"pod); CPU: API server {used[0]:.1f} s, etcd {used[1]:.1f} s, reader (HTTP and JSON "
        f"decoding) {used[2]:.1f} s",
        count,
    )


async def restart(
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    tmp: Path,
    http: aiohttp.ClientSession,
    limit: float,
) -> tuple[Operator, str]:
    api, etcd = plane.pid("kube-apiserver"), plane.pid("etcd")
    before = (cpu_of(api), cpu_of(etcd))
    audit = Audit(plane)
    mark = audit.mark()
    operator = Operator(plane, conduit, tmp)
    try:
        took = await ready(http, operator.metrics_port, limit)
    except RuntimeError:
        return operator, f"not ready within {limit:.0f} s"
    used = (cpu_of(operator.proc.pid), cpu_of(api) - before[0], cpu_of(etcd) - before[1])
    calls = audit.since(mark)
    mine = ", ".join(
        f"{verb} {what} {n}"
        for (who, verb, what), n in calls.most_common()
        if who == "operator" and verb != "watch"
    )
    return operator, (
        f"ready {took:.1f} s; CPU meanwhile: operator {used[0]:.1f} s (the process's start "
        f"included), API server {used[1]:.1f} s, etcd {used[2]:.1f} s; "
        f"RSS {operator.memory_mb()[0]:.0f} MB; its requests: {mine}"
    )


def top(profile: Path, count: int = 25) -> str:
    out = Path(str(profile) + ".txt")
    with out.open("w") as stream:
        stats = pstats.Stats(str(profile), stream=stream)
        stats.sort_stats("tottime").print_stats(count)
    return out.read_text()


async def run(args: argparse.Namespace) -> Rows:
    rows = Rows()
    clock = Clock(time.perf_counter() + args.deadline)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phabmesh-restart-")))
        plane = devcluster.ControlPlane(tmp / "plane", nodes=10)
        plane.start_api_only()
        stack.callback(plane.stop)
        conduit = Conduit(tmp)
        stack.callback(conduit.stop)
        install(plane)
        try:
            await asyncio.wait_for(
                scenario(plane, conduit, args, tmp, clock, rows), max(clock.left(), 1)
            )
        except (OutOfTime, TimeoutError) as exc:
            rows.append(("stopped early", str(exc) or "the run's deadline passed"))
    return rows


async def scenario(  # noqa: PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    args: argparse.Namespace,
    tmp: Path,
    clock: Clock,
    rows: Rows,
) -> None:
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession()
    watch = Watch(kube)
    watching = asyncio.create_task(watch.run())
    children: list[Child] = []
    try:
        await setup(kube, conduit)
        operator = Operator(plane, conduit, tmp)
        children.append(operator)
        await ready(http, operator.metrics_port)
        t = time.perf_counter()
        meshed = await populate(kube, Plan(args), plane.nodes, clock)
        made = time.perf_counter() - t
        await clock.until(lambda: len(watch.active_at) >= meshed, 1200, every=0.5)
        rows.append(
            (
                f"population: {args.pods} pods ({meshed} meshed, each with an Active lease) in "
                f"{args.namespaces} namespaces",
                f"pods and their status written in {made:.0f} s; every lease Active "
                f"{time.perf_counter() - t:.0f} s after the first pod; operator RSS "
                f"{operator.memory_mb()[0]:.0f} MB",
            )
        )
        operator.stop()
        children.remove(operator)
        # The latest version of the pods this process's watch has seen (a version of the
        # pods: their watch cache has it, and serves the list at once).
        latest = watch.pods.resource_version
        for label, params, since in (
            ("a consistent read", {}, ""),
            ("from the watch cache (resourceVersion=0: one page)", {"resourceVersion": "0"}, ""),
            ("not older than the latest pod version (as the operator lists again)", {}, latest),
        ):
            row, _ = await list_pods(plane, kube, params, since)
            rows.append((f"pod list, pages of 500, {label}", row))
        runs = [(mode, n) for mode in args.modes.split(",") for n in range(args.restarts)]
        for k, (mode, n) in enumerate(runs):
            # The operator's environment is this process's: its pod watch as the mode says.
            os.environ["PHABMESH_WATCH_UNMESHED_PODS"] = str(mode != "meshed").lower()
            # Meshed pods made while it is down, in the last namespaces it lists: to be
            # leased once it has planned (nearly) every pod.
            last = Plan(args).with_binding - 1
            fresh = [f"new{k}-{j}" for j in range(args.restart_pods)]
            await gathered(
                [
                    pod_maker(kube, f"s-{last - j % 10}", name, j, True, True, plane.nodes)()
                    for j, name in enumerate(fresh)
                ],
                32,
            )

            def uids(names: list[str] = fresh) -> set[str]:
                want = set(names)
                return {
                    p.uid for key, p in list(watch.pods.items.items()) if key.split("/")[1] in want
                }

            await clock.until(lambda names=fresh: len(uids(names)) == len(names), 60)  # type: ignore[misc]
            new = uids()
            t = time.perf_counter()
            operator, row = await restart(plane, conduit, tmp, http, min(300, clock.left()))
            children.append(operator)
            await clock.until(lambda new=new: new <= watch.active_at.keys(), 300)  # type: ignore[misc]
            took = time.perf_counter() - t
            row += f"; the {len(new)} pods made while it was down leased {took:.1f} s"
            watched = "every pod" if mode != "meshed" else "the meshed pods alone (Linkerd's label)"
            rows.append((f"operator restart {n + 1} at {args.pods} pods, watching {watched}", row))
            operator.stop()
            children.remove(operator)
        if args.profile:
            out = tmp / "profile"
            out.mkdir()
            os.environ["PHABMESH_BENCH_PROFILE"] = str(out)
            try:
                operator, row = await restart(plane, conduit, tmp, http, min(600, clock.left()))
            finally:
                del os.environ["PHABMESH_BENCH_PROFILE"]
            children.append(operator)
            operator.stop()
            children.remove(operator)
            rows.append((f"operator restart under cProfile at {args.pods} pods", row))
            for dump in sorted(out.glob("*.prof")):
                print(top(dump), file=sys.stderr)
    finally:
        await stop_all(children, watching, http, kube)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.restart")
    parser.add_argument("--pods", type=int, default=50000)
    parser.add_argument("--namespaces", type=int, default=2000)
    parser.add_argument("--meshed", type=float, default=0.2, help="of the pods, meshed and bound")
    parser.add_argument("--bindings", type=int, default=2000)
    parser.add_argument("--restarts", type=int, default=2, help="timed restarts of the operator")
    parser.add_argument("--restart-pods", type=int, default=50, help="made while it is down")
    parser.add_argument("--profile", action="store_true", help="and one more under cProfile")
    parser.add_argument(
        "--modes",
        default="all,meshed",
        help="the restarts' pod watches: all (every pod), meshed (PHABMESH_WATCH_UNMESHED_PODS="
        "false: Linkerd's label selector)",
    )
    parser.add_argument("--deadline", type=float, default=1500, help="seconds for the whole run")
    args = parser.parse_args()
    args.jobs = 0.0
    rows = asyncio.run(run(args))
    print(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
