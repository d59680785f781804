"""The test harness itself: a real control plane (API server, etcd, controller manager,
scheduler) and KWOK's simulated nodes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube import HAND_NODE, Cluster, hand_made, wait_for

REPO = Path(__file__).resolve().parents[2]

WIDGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.harness.phabmesh.io
spec:
  group: harness.phabmesh.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1, maximum: 10}
                colour: {type: string, enum: [red, green]}
"""


def test_crd_schema_is_enforced(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=WIDGET_CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.harness.phabmesh.io", "--timeout=30s"
    )
    good = {
        "apiVersion": "harness.phabmesh.io/v1",
        "kind": "Widget",
        "metadata": {"name": "ok"},
        "spec": {"size": 3, "colour": "red"},
    }
    created = cluster.custom.create_namespaced_custom_object(
        "harness.phabmesh.io", "v1", namespace, "widgets", good
    )
    assert created["spec"]["size"] == 3

    bad = dict(good, metadata={"name": "bad"}, spec={"size": 99, "colour": "blue"})
    with pytest.raises(ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(
            "harness.phabmesh.io", "v1", namespace, "widgets", bad
        )
    assert refused.value.status == 422
    message = json.loads(refused.value.body)["message"]
    assert "spec.size" in message
    assert "spec.colour" in message


def _pod(name: str, node: str | None = None) -> client.V1Pod:
    """A hand-made pod (tests.kube.hand_made): its status moves only when written."""
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=hand_made(
            client.V1PodSpec(
                node_name=node,
                containers=[client.V1Container(name="app", image="registry.invalid/app:1")],
            )
        ),
    )


def _set_running(cluster: Cluster, namespace: str, name: str) -> client.V1Pod:
    status = {
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "app",
                    "ready": True,
                    "restartCount": 0,
                    "image": "registry.invalid/app:1",
                    "imageID": "",
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                }
            ],
        }
    }
    return cluster.core.patch_namespaced_pod_status(name, namespace, status)


def _pod_exists(cluster: Cluster, namespace: str, name: str) -> bool:
    try:
        cluster.core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_pod_lifecycle_both_ways(cluster: Cluster, namespace: str) -> None:
    # A pod without a node stays Pending until its status is patched...
    cluster.core.create_namespaced_pod(namespace, _pod("floating"))
    assert cluster.core.read_namespaced_pod("floating", namespace).status.phase == "Pending"
    running = _set_running(cluster, namespace, "floating")
    assert running.status.phase == "Running"
    assert running.status.conditions[0].type == "Ready"
    # ...and vanishes at once when deleted.
    cluster.core.delete_namespaced_pod("floating", namespace)
    assert not _pod_exists(cluster, namespace, "floating")

    # A pod bound to a node stays Terminating (no kubelet) until force-deleted.
    cluster.core.create_namespaced_pod(namespace, _pod("bound", node=HAND_NODE))
    _set_running(cluster, namespace, "bound")
    cluster.core.delete_namespaced_pod("bound", namespace)
    terminating = cluster.core.read_namespaced_pod("bound", namespace)
    assert terminating.metadata.deletion_timestamp is not None
    cluster.core.delete_namespaced_pod("bound", namespace, grace_period_seconds=0)
    assert not _pod_exists(cluster, namespace, "bound")


def _review(cluster: Cluster, token: str) -> client.V1TokenReviewStatus:
    review = client.AuthenticationV1Api(cluster.api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["phabmesh.io"]))
    )
    return review.status


def test_pod_bound_token_review(cluster: Cluster, namespace: str) -> None:
    pod = cluster.core.create_namespaced_pod(namespace, _pod("holder", node=HAND_NODE))
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=["phabmesh.io"],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name="holder", uid=pod.metadata.uid
            ),
        )
    )
    token = cluster.core.create_namespaced_service_account_token(
        "default", namespace, request
    ).status.token

    status = _review(cluster, token)
    assert status.authenticated is True
    assert status.user.username == f"system:serviceaccount:{namespace}:default"
    assert status.user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]
    assert status.user.extra["authentication.kubernetes.io/pod-name"] == ["holder"]

    cluster.core.delete_namespaced_pod("holder", namespace, grace_period_seconds=0)
    # Successful reviews are cached by the API server for up to 10 s.
    wait_for(
        lambda: not _review(cluster, token).authenticated,
        timeout=30,
        interval=0.5,
        what="the deleted pod's token to be refused",
    )


def test_garbage_collector_removes_dependents(cluster: Cluster, namespace: str) -> None:
    owner = cluster.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    cluster.core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name="dependent",
                owner_references=[
                    client.V1OwnerReference(
                        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
                    )
                ],
            )
        ),
    )
    cluster.core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            cluster.core.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=60, interval=0.2, what="the garbage collector")


WORKLOADS = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      initContainers:
        - {name: linkerd-proxy, image: registry.invalid/proxy:1, restartPolicy: Always}
      containers:
        - {name: app, image: registry.invalid/app:1}
---
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - {name: app, image: registry.invalid/app:1}
"""


def _pods(cluster: Cluster, namespace: str, selector: str) -> list[client.V1Pod]:
    items: list[client.V1Pod] = cluster.core.list_namespaced_pod(
        namespace, label_selector=selector
    ).items
    return items


def test_kwok_runs_workloads_like_a_kubelet(cluster: Cluster, namespace: str) -> None:
    nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
    simulated = cluster.plane.nodes
    assert simulated and set(simulated) <= set(nodes)
    for name in simulated:
        ready = next(c for c in nodes[name].status.conditions if c.type == "Ready")
        assert ready.status == "True"

    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=WORKLOADS)

    def web_running() -> list[client.V1Pod]:
        pods = _pods(cluster, namespace, "app=web")
        running = [p for p in pods if p.status.phase == "Running" and p.status.pod_ip]
        return running if len(running) == 2 else []

    # Scheduled onto a simulated node, then Running with a pod IP and container statuses
    # (the native sidecar running too).
    pods = wait_for(web_running, timeout=60, what="the Deployment's pods to run")
    for pod in pods:
        assert pod.spec.node_name in simulated
        assert [s.state.running is not None for s in pod.status.container_statuses] == [True]
        (proxy,) = pod.status.init_container_statuses
        assert proxy.name == "linkerd-proxy" and proxy.state.running is not None

    # A Job's pod finishes: Succeeded, and the Job completes.
    def job_done() -> bool:
        job = client.BatchV1Api(cluster.api).read_namespaced_job("once", namespace)
        return bool(job.status.succeeded)

    wait_for(job_done, timeout=60, what="the Job to complete")
    (job_pod,) = _pods(cluster, namespace, "job-name=once")
    assert job_pod.status.phase == "Succeeded"

    # Scaled down: the removed pod terminates gracefully and is gone; the other stays.
    cluster.kubectl("scale", "-n", namespace, "deploy/web", "--replicas=1")
    wait_for(
        lambda: len(_pods(cluster, namespace, "app=web")) == 1,
        timeout=60,
        what="the scaled-down pod to be gone",
    )
    (kept,) = _pods(cluster, namespace, "app=web")
    assert kept.metadata.uid in {p.metadata.uid for p in pods}
    assert kept.status.phase == "Running" and kept.metadata.deletion_timestamp is None


def test_make_dev_cluster_is_a_place_to_install_phabmesh(tmp_path: Path) -> None:
    """`phabmesh dev-cluster` (make dev-cluster) has Linkerd's policy CRDs (stand-ins), so
    that manifests/ applies whole, Linkerd policy included, after phabmesh's CRDs."""
    out = tmp_path / "dev-cluster.out"
    data = tmp_path / "data"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "phabmesh.cli", "dev-cluster", "--data-dir", str(data)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        wait_for(lambda: "Press Ctrl-C" in out.read_text(), timeout=120, what="dev-cluster")
        kubeconfig = next(
            line.split("=", 1)[1]
            for line in out.read_text().splitlines()
            if "export KUBECONFIG=" in line
        )
        kubectl = out.read_text().split("(kubectl: ")[1].split(")")[0]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [kubectl, f"--kubeconfig={kubeconfig}", *args],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )

        assert "servers.policy.linkerd.io" in run("get", "crd", "-o", "name").stdout
        # The documented install: the CRDs, then the manifests (here a server-side dry run).
        assert run("apply", "--server-side", "-f", str(REPO / "crds")).returncode == 0
        established = run("wait", "--for=condition=Established", "--timeout=60s", "--all", "crd")
        assert established.returncode == 0, established.stderr
        # (A dry run creates no namespace for the rest to land in.)
        assert run("create", "namespace", "phabmesh-system").returncode == 0
        applied = run("apply", "--dry-run=server", "-k", str(REPO / "manifests"))
        assert applied.returncode == 0, applied.stderr
        assert "authorizationpolicy.policy.linkerd.io/phabmesh" in applied.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()[-2000:]


def _pod_list_sources(cluster: Cluster) -> tuple[float, float]:
    """How many pod lists the API server has served from its watch cache, and from etcd."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts = {"cache": 0.0, "etcd": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if 'resource="pods"' not in name:
            continue
        if name.startswith("apiserver_cache_list_total{"):
            counts["cache"] += float(value)
        elif name.startswith("etcd_requests_total{") and 'operation="list"' in name:
            counts["etcd"] += float(value)
    return counts["cache"], counts["etcd"]


def test_consistent_lists_come_from_the_watch_cache(cluster: Cluster, namespace: str) -> None:
    # As on a current cluster: etcd reports watch progress, so the API server serves a
    # consistent list (no resourceVersion), paged or filtered, from its watch cache once the
    # cache has caught up with etcd, instead of reading every pod from etcd. A restart's pod
    # list costs what the bench measures only so.
    for name in ("a", "b", "c"):
        pod = _pod(name)
        pod.metadata.labels = {"app": "harness"}
        cluster.core.create_namespaced_pod(namespace, pod)
    cache, etcd = _pod_list_sources(cluster)
    first = cluster.core.list_pod_for_all_namespaces(limit=2)
    assert first.metadata._continue
    cluster.core.list_pod_for_all_namespaces(limit=2, _continue=first.metadata._continue)
    listed = cluster.core.list_namespaced_pod(namespace, label_selector="app=harness")
    assert len(listed.items) == 3
    cache_after, etcd_after = _pod_list_sources(cluster)
    # Other clients of the cluster list too: none of these three reached etcd.
    assert cache_after - cache >= 3
    assert etcd_after - etcd < 3
