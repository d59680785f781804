"""Real pods against simulated ones, in one run: ``python -m bench.realpods [--pods 5]``.

Needs root and ``make node-packages``. Starts a control plane with a real node and one KWOK
node, installs phabmesh on the real node with ``helm install`` from ``make image``'s archive
(tests/realpods.py, as the real-workload tests do), then, one pod after the other:

- a real pod (Deployment of the workload image, the agent as a native sidecar, the app
  calling ``arc call-conduit -- user.whoami`` in a loop): created -> its lease Active ->
  the app's first successful call through the gateway; scaled to zero -> its next call
  refused (the app keeps calling after TERM until it is);
- a KWOK pod of the same binding (tolerating the KWOK nodes' taint): created -> its lease
  Active; deleted -> its lease Revoked.

Times come from the host's clock: the test's own for creation and deletion, the app's
``date`` in its log for its calls (same machine). Then the memory of the agent, the gateway
and the operator from the kubelet's stats (working set). Nothing here asserts: it prints.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from phabmesh import resources
from phabmesh.dev import devcluster, image, realnode
from phabmesh.dev.conduit import ConduitServer
from tests import realpods
from tests.kube import Helm, wait_for
from tests.phab import make_binding, make_bot
from tests.realnode import RealCluster

REPO = Path(__file__).resolve().parents[1]
# Calls until one succeeds, saying when; after TERM, calls until one is refused, saying when.
LOOP = (
    "until echo {} | arcanist call-conduit -- user.whoami | grep -q userName; do :; done; "
    'echo "ok $(date +%s.%N)"; '
    "trap 'while echo {} | arcanist call-conduit -- user.whoami | grep -q userName; do :; done; "
    'echo "refused $(date +%s.%N)"; exit 0\' TERM; '
    "while :; do sleep 1 & wait $!; done"
)


def _lease_phase(cluster: RealCluster, namespace: str, pod: str) -> str | None:
    out = cluster.kubectl("get", "phabricatorcredentials", "-n", namespace, "-o", "json")
    for lease in json.loads(out.stdout)["items"]:
        if lease["spec"]["podName"] == pod:
            phase: str | None = (lease.get("status") or {}).get("phase")
            return phase
    return None


def _until(predicate: Callable[[], object], timeout: float = 180) -> float:
    wait_for(predicate, timeout=timeout, interval=0.05)
    return time.time()


def _real_pod(cluster: RealCluster, namespace: str, clients: str, n: int) -> dict[str, float]:
    name = f"real-{n}"
    doc = realpods.deployment(name, clients, linger=60)
    doc["spec"]["template"]["spec"]["containers"][0]["command"] = ["/bin/sh", "-c", LOOP]
    created = time.time()
    cluster.apply(doc, namespace=namespace)
    pod = wait_for(
        lambda: [p["metadata"]["name"] for p in realpods.pods_of(cluster, namespace, name)],
        timeout=60, interval=0.05,
    )[0]  # fmt: skip
    # (the lease comes before the app starts: the agent's credential is what it waits for)
    active = _until(lambda: _lease_phase(cluster, namespace, pod) == resources.ACTIVE)
    realpods.ready_pods(cluster, namespace, name)
    log: list[str] = []
    follower = threading.Thread(
        target=lambda: log.append(
            cluster.plane.kubectl(
                "logs", "-f", "-n", namespace, pod, "-c", "app", timeout=300
            ).stdout
        ),
        daemon=True,
    )
    follower.start()
    wait_for(lambda: "ok " in cluster.logs(pod, "app", namespace), timeout=180, interval=0.1)
    deleted = time.time()
    cluster.kubectl("scale", "-n", namespace, f"deployment/{name}", "--replicas=0")
    follower.join(timeout=300)
    said = dict(line.split() for line in "".join(log).splitlines() if line.count(" ") == 1)
    return {
        "lease": active - created,
        "first call": float(said["ok"]) - created,
        "refused": float(said["refused"]) - deleted,
    }


def _kwok_pod(cluster: RealCluster, namespace: str, clients: str, n: int) -> dict[str, float]:
    name = f"kwok-{n}"
    spec = realpods.workload_pod_spec(clients)
    spec["tolerations"] = [{"key": "kwok.x-k8s.io/node", "operator": "Exists"}]
    spec["nodeSelector"] = {"type": "kwok"}
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    created = time.time()
    cluster.apply(doc, namespace=namespace)
    active = _until(lambda: _lease_phase(cluster, namespace, name) == resources.ACTIVE)
    deleted = time.time()
    cluster.kubectl("delete", "pod", "-n", namespace, name, "--wait=false")
    revoked = _until(lambda: _lease_phase(cluster, namespace, name) in (None, resources.REVOKED))
    return {"lease": active - created, "refused": revoked - deleted}


def _memory(cluster: RealCluster) -> dict[str, list[int]]:
    summary = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/api/v1/nodes/{cluster.node.name}/proxy/stats/summary"
        ).stdout
    )
    found: dict[str, list[int]] = {}
    for pod in summary.get("pods", []):
        for container in pod.get("containers", []):
            name = container["name"]
            if name in ("phabmesh-agent", "gateway", "operator"):
                found.setdefault(name, []).append(container["memory"]["workingSetBytes"])
    return found


def _row(values: list[float]) -> str:
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    median = statistics.median(values)
    return f"p50 {median:.2f} s, p95 {p95:.2f} s, max {values[-1]:.2f} s (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=5)
    args = parser.parse_args()
    realnode.check_host()
    with tempfile.TemporaryDirectory(prefix="phabmesh-bench-") as scratch:
        work = Path(scratch)
        with devcluster.ControlPlane(work / "plane", nodes=1, real_node=True) as plane:
            cluster = RealCluster(plane)
            cluster.node.import_image(image.build(log=lambda _: None).path)
            clients, archive = realpods.clients_image(REPO / "build")
            cluster.node.import_image(archive)
            phabricator = ConduitServer(host=realnode.NODE_IP)
            phabricator.start()
            try:
                helm = Helm(devcluster.helm(), work / "helm")
                realpods.install_chart(cluster, helm, phabricator.url)
                bot = f"bench-{uuid.uuid4().hex[:6]}"
                make_bot(cluster, phabricator, bot)
                namespace = realpods.restricted_namespace(cluster, "bench")
                make_binding(
                    cluster, namespace, "runners", bot, agent={"mode": resources.AGENT_AUTO}
                )
                realpods.wait_injects(cluster, namespace, clients)
                real = [_real_pod(cluster, namespace, clients, n) for n in range(args.pods)]
                kwok = [_kwok_pod(cluster, namespace, clients, n) for n in range(args.pods)]
                cluster.apply(realpods.deployment("steady", clients), namespace=namespace)
                realpods.ready_pods(cluster, namespace, "steady")
                memory = _memory(cluster)
            finally:
                phabricator.stop()
    print(f"phabmesh on a real node, {args.pods} pods each, one after the other:")
    print(f"  real pod created -> lease Active:          {_row([r['lease'] for r in real])}")
    print(f"  KWOK pod created -> lease Active:          {_row([r['lease'] for r in kwok])}")
    print(f"  real pod created -> first call (arc):      {_row([r['first call'] for r in real])}")
    print(f"  real pod scaled to zero -> call refused:   {_row([r['refused'] for r in real])}")
    print(f"  KWOK pod deleted -> lease Revoked:         {_row([r['refused'] for r in kwok])}")
    for name, values in sorted(memory.items()):
        mib = ", ".join(f"{v / 2**20:.1f}" for v in values)
        print(f"  working set, {name}: {mib} MiB")


if __name__ == "__main__":
    main()
