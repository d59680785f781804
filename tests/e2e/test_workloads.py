"""Workloads as Kubernetes runs them, end to end: the scheduler binds a Deployment's,
StatefulSet's or Job's pods to KWOK's simulated nodes, KWOK runs them and stops them as a
kubelet would, and the workload controllers scale, roll out, finish, drain and delete.
Each scenario asserts what the gateway answers each pod's credential: one working
credential per running pod, and a refusal for every pod that is gone, going or finished.

The pods carry the Linkerd proxy as a native sidecar (an init container with
``restartPolicy: Always``), which is what "meshed" means to phabmesh. A pod's credential
comes the way a pod gets it: a projected ServiceAccount token bound to the pod
(TokenRequest), exchanged at the operator's credential endpoint. The operator and the
gateway run as their own ServiceAccounts, under the manifests' RBAC (tests/rbac.py)."""

from __future__ import annotations

import collections
import uuid
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh.dev.conduit import ConduitServer
from tests.kube import HOLD, Cluster, meshed_template, one_shot_job, wait_for
from tests.phab import (
    active_leases,
    bind,
    exchange,
    pod_token,
)
from tests.stack import Threaded


class Mesh:
    """phabmesh's operator and gateway on the session's control plane (the session's own:
    another operator beside them, without peering, would act as well)."""

    def __init__(
        self, cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded
    ) -> None:
        self.cluster = cluster
        self.conduit = conduit
        self.operator = operator
        self.gateway = gateway

    def credential(self, namespace: str, pod: client.V1Pod) -> str:
        """The pod's credential, exchanged for its pod-bound ServiceAccount token."""
        token = pod_token(self.cluster, namespace, pod)

        def issued() -> str | None:
            answer = exchange(self.operator, token)
            return str(answer.json()["credential"]) if answer.status_code == 200 else None

        return wait_for(issued, timeout=60, what=f"a credential for {pod.metadata.name}")

    def answer(self, credential: str) -> dict[str, Any]:
        port = self.gateway.process.port  # type: ignore[attr-defined]
        reply = requests.post(
            f"http://127.0.0.1:{port}/api/user.whoami", data={"api.token": credential}, timeout=15
        )
        assert reply.status_code == 200  # refusals too: Conduit's envelope, HTTP 200
        body: dict[str, Any] = reply.json()
        return body

    def accepted(self, credential: str) -> bool:
        return self.answer(credential).get("error_code") is None

    def refused(self, credential: str) -> bool:
        return self.answer(credential).get("error_code") == "ERR-INVALID-AUTH"


@pytest.fixture(scope="module")
def mesh(cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded) -> Mesh:
    return Mesh(cluster, conduit, operator, gateway)


@pytest.fixture
def ns(cluster: Cluster, mesh: Mesh, namespace: str) -> str:
    """The test's namespace: a Ready binding of ServiceAccount `runner` to a bot."""
    bind(cluster, mesh.conduit, namespace, runner_account=True, credentialTTL="5m")
    return namespace


# --- workloads ------------------------------------------------------------------------------


def deployment(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": meshed_template(name),
        },
    }


def apply(cluster: Cluster, namespace: str, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def running_pods(cluster: Cluster, namespace: str, app: str) -> dict[str, client.V1Pod]:
    """The app's pods that run (Running, not terminating), by UID."""
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    return {
        p.metadata.uid: p
        for p in pods
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
    }


def wait_running(cluster: Cluster, namespace: str, app: str, count: int) -> dict[str, client.V1Pod]:
    """Exactly ``count`` running pods and no other pod of the app left."""

    def settled() -> tuple[dict[str, client.V1Pod]] | None:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
        running = running_pods(cluster, namespace, app)
        return (running,) if len(running) == count == len(pods) else None

    (found,) = wait_for(settled, timeout=120, interval=0.2, what=f"{count} running {app} pods")
    return found


def credentials(mesh: Mesh, namespace: str, pods: dict[str, client.V1Pod]) -> dict[str, str]:
    return {uid: mesh.credential(namespace, pod) for uid, pod in pods.items()}


def assert_one_working_credential_each(
    mesh: Mesh, namespace: str, held: dict[str, str], running: dict[str, client.V1Pod]
) -> None:
    """Every running pod holds exactly one Active lease, and its credential works."""

    def one_lease_each() -> bool:
        count = collections.Counter(
            x["spec"]["podUID"] for x in active_leases(mesh.cluster, namespace)
        )
        return all(count[uid] == 1 for uid in running) and set(count) <= set(running)

    wait_for(one_lease_each, timeout=60, what="one Active lease per running pod")
    for uid, pod in running.items():
        assert mesh.accepted(held[uid]), pod.metadata.name


def wait_refused(mesh: Mesh, credential: str, what: str) -> None:
    wait_for(lambda: mesh.refused(credential), timeout=60, interval=0.2, what=what)


# --- scenarios -------------------------------------------------------------------------------


def test_deployment_scaled_up_then_down_to_zero(cluster: Cluster, mesh: Mesh, ns: str) -> None:
    apply(cluster, ns, deployment("web", 0))
    cluster.kubectl("scale", "-n", ns, "deploy/web", "--replicas=4")
    pods = wait_running(cluster, ns, "web", 4)
    held = credentials(mesh, ns, pods)
    assert_one_working_credential_each(mesh, ns, held, pods)

    cluster.kubectl("scale", "-n", ns, "deploy/web", "--replicas=1")
    (kept,) = wait_running(cluster, ns, "web", 1)
    for uid in set(pods) - {kept}:
        wait_refused(mesh, held[uid], f"removed pod {pods[uid].metadata.name} refused")
    assert_one_working_credential_each(mesh, ns, held, {kept: pods[kept]})

    cluster.kubectl("scale", "-n", ns, "deploy/web", "--replicas=0")
    wait_running(cluster, ns, "web", 0)
    for uid in pods:
        wait_refused(mesh, held[uid], f"pod {pods[uid].metadata.name} refused at zero")
    assert active_leases(cluster, ns) == []


def test_rollout_restart_moves_access_to_the_new_replicaset(
    cluster: Cluster, mesh: Mesh, ns: str
) -> None:
    apply(cluster, ns, deployment("web", 2))
    old = wait_running(cluster, ns, "web", 2)
    old_held = credentials(mesh, ns, old)
    assert_one_working_credential_each(mesh, ns, old_held, old)

    cluster.kubectl("rollout", "restart", "-n", ns, "deploy/web")
    cluster.kubectl("rollout", "status", "-n", ns, "deploy/web", "--timeout=120s")
    new = wait_running(cluster, ns, "web", 2)
    assert not set(new) & set(old)
    replicasets = {p.metadata.owner_references[0].name for p in new.values()}
    assert replicasets.isdisjoint(p.metadata.owner_references[0].name for p in old.values())
    for uid, pod in old.items():
        wait_refused(mesh, old_held[uid], f"old pod {pod.metadata.name} refused")
    new_held = credentials(mesh, ns, new)
    assert_one_working_credential_each(mesh, ns, new_held, new)


def test_job_pod_refused_once_succeeded(cluster: Cluster, mesh: Mesh, ns: str) -> None:
    job = one_shot_job("once")
    apply(cluster, ns, job)
    (uid, pod), *_ = wait_running(cluster, ns, "once", 1).items()
    credential = mesh.credential(ns, pod)
    assert mesh.accepted(credential)

    # The work is done: KWOK finishes the pod (Succeeded) as its kubelet would.
    cluster.kubectl("annotate", "-n", ns, f"pod/{pod.metadata.name}", f"{HOLD}-")
    wait_for(
        lambda: cluster.core.read_namespaced_pod(pod.metadata.name, ns).status.phase == "Succeeded",
        timeout=60,
        what="the Job's pod to succeed",
    )
    wait_refused(mesh, credential, "the finished pod's credential refused")
    batch = client.BatchV1Api(cluster.api)
    wait_for(lambda: batch.read_namespaced_job("once", ns).status.succeeded == 1)
    assert all(x["spec"]["podUID"] != uid for x in active_leases(cluster, ns))


def test_statefulset_scaled_down_loses_its_last_ordinal(
    cluster: Cluster, mesh: Mesh, ns: str
) -> None:
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 3,
            "serviceName": "db",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "db"}},
            "template": meshed_template("db"),
        },
    }
    apply(cluster, ns, sts)
    pods = wait_running(cluster, ns, "db", 3)
    held = credentials(mesh, ns, pods)
    assert_one_working_credential_each(mesh, ns, held, pods)
    by_name = {p.metadata.name: uid for uid, p in pods.items()}

    cluster.kubectl("scale", "-n", ns, "statefulset/db", "--replicas=1")
    kept = wait_running(cluster, ns, "db", 1)
    assert set(kept) == {by_name["db-0"]}
    for name in ("db-1", "db-2"):
        wait_refused(mesh, held[by_name[name]], f"{name} refused")
    assert_one_working_credential_each(mesh, ns, held, kept)


def test_node_drained_under_a_disruption_budget(cluster: Cluster, mesh: Mesh, ns: str) -> None:
    nodes = cluster.plane.nodes
    assert len(nodes) >= 2, "draining needs a second node to move to"
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "web"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}},
    }
    apply(cluster, ns, deployment("web", 3), budget)
    pods = wait_running(cluster, ns, "web", 3)
    held = credentials(mesh, ns, pods)
    assert_one_working_credential_each(mesh, ns, held, pods)
    drained = next(iter(pods.values())).spec.node_name
    on_drained = {uid for uid, p in pods.items() if p.spec.node_name == drained}
    # The budget's status (from the disruption controller) allows one eviction at a time.
    policy = client.PolicyV1Api(cluster.api)
    wait_for(lambda: policy.read_namespaced_pod_disruption_budget("web", ns).status.current_healthy)

    try:
        cluster.plane.kubectl(
            "drain", drained, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s",
            timeout=150,
        )  # fmt: skip
        after = wait_running(cluster, ns, "web", 3)
        for uid in on_drained:
            wait_refused(mesh, held[uid], f"evicted pod {pods[uid].metadata.name} refused")
        assert all(p.spec.node_name != drained for p in after.values())
        held |= credentials(mesh, ns, {u: p for u, p in after.items() if u not in held})
        assert_one_working_credential_each(mesh, ns, held, after)
    finally:
        cluster.kubectl("uncordon", drained)


def test_namespace_deleted(cluster: Cluster, mesh: Mesh) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(
        lambda: any(
            sa.metadata.name == "default"
            for sa in cluster.core.list_namespaced_service_account(name).items
        ),
        what=f"ServiceAccount default in {name}",
    )
    bind(cluster, mesh.conduit, name, runner_account=True, credentialTTL="5m")
    apply(cluster, name, deployment("web", 2))
    pods = wait_running(cluster, name, "web", 2)
    held = credentials(mesh, name, pods)
    assert_one_working_credential_each(mesh, name, held, pods)

    cluster.core.delete_namespace(name)
    for uid, pod in pods.items():
        wait_refused(mesh, held[uid], f"pod {pod.metadata.name} of the deleted namespace")

    def gone() -> bool:
        try:
            cluster.core.read_namespace(name)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=120, interval=0.5, what=f"namespace {name} to be gone")
    for credential in held.values():
        assert mesh.refused(credential)
