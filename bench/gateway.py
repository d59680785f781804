"""The gateway's throughput and CPU per call, alone: the gateway part of ``python -m bench``.

    python -m bench.gateway [--seconds 5] [--workers 1,2] [--repeat 3]

A real kube-apiserver and etcd, the Conduit test server (``bench.conduit``), ``phabmesh
controller`` and ``phabmesh gateway`` (one per ``--workers`` value, all started before the
first measurement and idle when not measured), each its own process on 127.0.0.1; this
process generates the load: 32 clients, each calling ``user.whoami`` in a loop for
``--seconds``, direct to the test server and through each gateway, in turn, ``--repeat``
times. For each measurement: calls per second and the CPU seconds every process spent
(the gateway's summed over its worker processes), hence the gateway's CPU per call; and the
gateway's resident memory per process. Medians over the repeats; nothing asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from bench.__main__ import NS, Conduit, Gateway, Operator, install, pods, ready, setup, until
from phabmesh import logs
from phabmesh.dev import devcluster
from phabmesh.kube import KubeClient, load_connection
from phabmesh.leases.index import LeaseIndex

CLIENTS = 32
# The gateways log as deployed: one JSON audit line per call (to a file here).
AS_DEPLOYED = {"PHABMESH_LOG_LEVEL": "INFO"}
TICKS = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants, now."""
    found, queue = [], [pid]
    while queue:
        p = queue.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                queue += [int(c) for c in task.read_text().split()]
            except OSError:
                continue
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU seconds spent so far by ``pids`` (living ones)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def memory_mb(pid: int) -> str:
    """Resident (RSS) and proportional (PSS: shared pages split between their users) MB."""
    values = {}
    for name, field in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field):
                values[field] = int(line.split()[1]) / 1024
    return f"{values.get('VmRSS:', float('nan')):.0f}/{values.get('Pss:', float('nan')):.0f}"


@dataclasses.dataclass
class Run:
    rate: float
    cpu: dict[str, float]  # CPU seconds per process during the run
    calls: int


async def throughput(
    http: aiohttp.ClientSession,
    url: str,
    form: Callable[[int], dict[str, str]],
    seconds: float,
    watched: dict[str, list[int]],
) -> Run:
    done = 0
    refused = 0
    before = {name: cpu_seconds(p) for name, p in watched.items()}
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal done, refused
        while time.perf_counter() < deadline:
            async with http.post(url, data=form(k)) as r:
                body = await r.read()
            if b'"error_code":null' not in body:
                refused += 1
            done += 1

    await asyncio.gather(*(client(k) for k in range(CLIENTS)))
    if refused:
        raise RuntimeError(f"{refused} of {done} calls to {url} were refused")
    cpu = {name: cpu_seconds(p) - before[name] for name, p in watched.items()}
    return Run(done / seconds, cpu, done)


async def main(args: argparse.Namespace) -> list[str]:
    """The figures, a line each (also printed)."""
    workers = [int(n) for n in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="phabmesh-bench-gw-") as tmp:
        plane = devcluster.ControlPlane(Path(tmp) / "plane")
        plane.start()
        conduit = Conduit(Path(tmp))
        try:
            install(plane)
            return await scenario(plane, conduit, Path(tmp), workers, args)
        finally:
            conduit.stop()
            plane.stop()


async def scenario(  # noqa: PLR0912, PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane,
    conduit: Conduit,
    tmp: Path,
    workers: list[int],
    args: argparse.Namespace,
) -> list[str]:
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    gateways: dict[str, Gateway] = {}
    lines: list[str] = []
    operator: Operator | None = None
    try:
        await setup(kube, conduit)
        operator = Operator(plane, conduit, tmp)
        for n in workers:
            Gateway.log_name = f"gw{n}.log"
            gateways[f"gateway x{n}"] = Gateway(
                plane, conduit, tmp, {**AS_DEPLOYED, "PHABMESH_GATEWAY_WORKERS": str(n)}
            )
        if args.before:
            # Another build of the gateway, one process, beside this one: its modules first.
            Gateway.log_name = "gw-before.log"
            path = os.pathsep.join([str(Path(args.before) / "operator"), *sys.path])
            gateways["before x1"] = Gateway(
                plane, conduit, tmp, {**AS_DEPLOYED, "PYTHONPATH": path}
            )
        await ready(http, operator.metrics_port)
        for gw in gateways.values():
            await ready(http, gw.metrics_port)
        created = await pods(kube, NS, 8, running=True)
        uids = {p["metadata"]["uid"] for p in created}

        async def all_active() -> bool:
            return sum(
                1 for x in list(leases.by_uid.values()) if x.active and x.pod_uid in uids
            ) == len(uids)

        await until(all_active, 60)
        issuer = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        credentials = []
        for pod in created:
            token = await kube.pod_token(NS, "runner", pod, seconds=3600)
            async with http.post(issuer, headers={"Authorization": f"Bearer {token}"}) as r:
                credentials.append((await r.json())["credential"])
        bot_token = conduit.direct_token
        direct_url = f"{conduit.url}/api/user.whoami"
        conduit_pids = [conduit.proc.pid]
        load_pids = [os.getpid()]
        # Warm every gateway's connections and caches.
        for gw in gateways.values():
            url = f"http://127.0.0.1:{gw.port}/api/user.whoami"
            for c in credentials:
                async with http.post(url, data={"api.token": c}) as r:
                    await r.read()
        results: dict[str, list[Run]] = {"direct": []}
        results.update({name: [] for name in gateways})
        for _ in range(args.repeat):
            results["direct"].append(
                await throughput(
                    http,
                    direct_url,
                    lambda k: {"api.token": bot_token},
                    args.seconds,
                    {"load": load_pids, "conduit": conduit_pids},
                )
            )
            for name, gw in gateways.items():
                results[name].append(
                    await throughput(
                        http,
                        f"http://127.0.0.1:{gw.port}/api/user.whoami",
                        lambda k: {"api.token": credentials[k % len(credentials)]},
                        args.seconds,
                        {
                            "load": load_pids,
                            "conduit": conduit_pids,
                            "gateway": tree(gw.proc.pid),
                        },
                    )
                )
        direct = statistics.median(r.rate for r in results["direct"])
        lines.append(f"{CLIENTS} clients, {args.seconds:g} s each, median of {args.repeat}")
        for name, runs in results.items():
            rate = statistics.median(r.rate for r in runs)
            rates = ", ".join(f"{r.rate:.0f}" for r in runs)
            cpu = {k: statistics.median(r.cpu[k] / args.seconds for r in runs) for k in runs[0].cpu}
            line = f"{name:<12} {rate:7.0f}/s ({rates}) = {rate / direct:4.0%} of direct; CPU/s: "
            line += ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
            if "gateway" in runs[0].cpu:
                per_call = statistics.median(r.cpu["gateway"] / r.calls * 1e6 for r in runs)
                line += f"; gateway CPU per call {per_call:.0f} us"
            lines.append(line)
        for name, gw in gateways.items():
            pids = tree(gw.proc.pid)
            mem = ", ".join(memory_mb(p) for p in pids)
            lines.append(f"{name} RSS/PSS per process (MB; the first is the parent): {mem}")
    finally:
        for gw in gateways.values():
            gw.stop()
        if operator is not None:
            operator.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()
    print("", *lines, sep="\n")
    return lines


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", default="1", help="gateways' worker counts, in turn")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--before", help="a source tree (its operator/) of another gateway to measure beside"
    )
    args = parser.parse_args()
    logs.configure("WARNING")
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
