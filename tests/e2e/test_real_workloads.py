"""phabmesh installed on the real node as a cluster admin installs it, and used by real pods.

The image is the one `make image` builds, imported into the node's containerd; the chart is
installed with `helm install` (and, at the end, the kustomize install with `kubectl apply
-k`), so the operator and the gateway run as the chart's pods under its securityContext,
probes and limits, and the API server calls the injection webhook through its Service
(kube-proxy). The workloads run the unmodified clients (arc, the `phabricator` package) in
their own containers, configured by nothing but the files the injected agent writes, through
the gateway's Service name (cluster DNS). Phabricator is the Conduit test server, listening
on the node's bridge address.

What is not real here: Linkerd (tests/realpods.py: a stand-in container named
`linkerd-proxy` that only runs; the install sets `linkerd.requireClientID=false`, as on a
cluster without Linkerd), and NetworkPolicies (nothing enforces them on this node).

Figures (first call after a pod is created, refusal after a pod is deleted) are printed
with `-s`; `python -m bench.realpods` measures them with percentiles.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh import resources
from phabmesh.dev import devcluster, image, realnode
from phabmesh.dev.conduit import ConduitServer
from tests import realpods
from tests.kube import Helm, wait_for
from tests.phab import make_binding, make_bot
from tests.realnode import RealCluster
from tests.realpods import refused, whoami

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SYSTEM = realpods.SYSTEM
TIMEOUT = realpods.TIMEOUT


@pytest.fixture(scope="module")
def phabricator(real_cluster: RealCluster) -> Iterator[ConduitServer]:
    """The Conduit test server on the node's bridge address, where the gateway's pods reach
    it (the node's pods reach the host there, and nothing else off the bridge)."""
    server = ConduitServer(host=realnode.NODE_IP)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def clients(real_cluster: RealCluster) -> str:
    """phabmesh's image (`make image`) and the workload image, imported into the node."""
    real_cluster.node.import_image(image.build(log=lambda _: None).path)
    name, archive = realpods.clients_image(REPO / "build")
    real_cluster.node.import_image(archive)
    return name


@pytest.fixture(scope="module")
def installed(
    real_cluster: RealCluster,
    clients: str,
    phabricator: ConduitServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Helm]:
    """The CRDs and the chart, as docs/install.md says, with the locally built image."""
    helm = Helm(devcluster.helm(), tmp_path_factory.mktemp("helm"))
    realpods.install_chart(real_cluster, helm, phabricator.url)
    yield helm
    helm.run("uninstall", "phabmesh", "-n", SYSTEM, "--wait", check=False)


@pytest.fixture(scope="module")
def bot(real_cluster: RealCluster, installed: Helm, phabricator: ConduitServer) -> str:
    name = f"real-bot-{uuid.uuid4().hex[:6]}"
    make_bot(real_cluster, phabricator, name)
    return name


@pytest.fixture(scope="module")
def ns(real_cluster: RealCluster, bot: str, clients: str) -> Iterator[str]:
    """A restricted namespace whose binding asks for the agent (Auto: sidecar for long-running
    pods, init for a Job's) with credentials living 1 minute, so that they rotate under the
    running clients."""
    namespace = realpods.restricted_namespace(real_cluster, f"real-{uuid.uuid4().hex[:6]}")
    make_binding(
        real_cluster, namespace, "runners", bot,
        credentialTTL="1m", agent={"mode": resources.AGENT_AUTO},
    )  # fmt: skip
    realpods.wait_injects(real_cluster, namespace, clients)
    yield namespace
    real_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_sidecar_deployment_calls_through_the_gateway_with_arc_and_the_phabricator_package(
    real_cluster: RealCluster, ns: str, bot: str, clients: str
) -> None:
    created = time.monotonic()
    real_cluster.apply(realpods.deployment("calls", clients), namespace=ns)
    (pod,) = realpods.ready_pods(real_cluster, ns, "calls")
    user = wait_for(
        lambda: whoami(real_cluster, ns, pod, "arc")[0],
        timeout=TIMEOUT,
        what="arc's first call",
    )
    print(
        f"\nreal pod: created -> first call through the gateway: {time.monotonic() - created:.2f} s"
    )
    assert user == bot
    assert whoami(real_cluster, ns, pod, "phabricator")[0] == bot
    stored = real_cluster.pod(pod, ns)
    agent = next(c for c in stored["spec"]["initContainers"] if c["name"] == "phabmesh-agent")
    assert agent["restartPolicy"] == "Always"
    # The agent runs as the pod's user (inherited): the files are the app's alone.
    files = real_cluster.exec(pod, "ls", "-lna", "/var/run/phabmesh", namespace=ns)
    for name in ("credential", ".arcrc"):
        line = next(x for x in files.splitlines() if x.endswith(f" {name}"))
        assert line.startswith(f"-rw------- 1 {realpods.CLIENTS_USER} {realpods.CLIENTS_USER} "), (
            files
        )


def test_the_credential_rotates_under_a_running_client(
    real_cluster: RealCluster, ns: str, bot: str
) -> None:
    (pod,) = realpods.ready_pods(real_cluster, ns, "calls")

    def credential() -> str:
        return real_cluster.exec(pod, "sha256sum", "/var/run/phabmesh/credential", namespace=ns)

    first = credential()
    # A 1-minute credential is replaced when a third of its life is left.
    wait_for(lambda: credential() != first, timeout=90, interval=1, what="a new credential")
    assert whoami(real_cluster, ns, pod, "arc")[0] == bot
    assert whoami(real_cluster, ns, pod, "phabricator")[0] == bot


def test_a_job_in_init_mode_completes(
    real_cluster: RealCluster, ns: str, bot: str, clients: str
) -> None:
    command = f'echo {{}} | arcanist call-conduit -- user.whoami | grep -q \'"userName": "{bot}"\''
    real_cluster.apply(realpods.job("once", clients, command), namespace=ns)

    def finished() -> dict[str, Any] | None:
        out = real_cluster.kubectl("get", "job", "-n", ns, "once", "-o", "json").stdout
        status: dict[str, Any] = json.loads(out).get("status", {})
        return status if status.get("succeeded") or status.get("failed") else None

    status = wait_for(finished, timeout=TIMEOUT, interval=0.5, what="the Job to finish")
    (pod,) = realpods.pods_of(real_cluster, ns, "once")
    assert status.get("succeeded") == 1, real_cluster.kubectl(
        "logs", "-n", ns, pod["metadata"]["name"], "--all-containers", check=False
    ).stdout
    (agent,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "phabmesh-agent"]
    assert "restartPolicy" not in agent  # init mode: a plain init container


def test_scaled_to_zero_a_terminating_pods_next_call_is_refused(
    real_cluster: RealCluster, ns: str, bot: str, clients: str
) -> None:
    real_cluster.apply(realpods.deployment("lingers", clients, linger=60), namespace=ns)
    (pod,) = realpods.ready_pods(real_cluster, ns, "lingers")
    wait_for(
        lambda: whoami(real_cluster, ns, pod, "arc")[0] == bot,
        timeout=TIMEOUT,
        what="a call",
    )
    deleted = time.monotonic()
    real_cluster.kubectl("scale", "-n", ns, "deployment/lingers", "--replicas=0")
    # The pod is terminating, its app still runs (it lingers 60 s after TERM): its next call
    # is refused.
    said = wait_for(
        lambda: (r := whoami(real_cluster, ns, pod, "arc")) and r[0] is None and r[1],
        timeout=30, interval=0.2, what="a refusal",
    )  # fmt: skip
    print(f"\nreal pod: scaled to zero -> call refused: {time.monotonic() - deleted:.2f} s")
    assert refused(said), said
    assert "deletionTimestamp" in real_cluster.pod(pod, ns)["metadata"]
    _, said = whoami(real_cluster, ns, pod, "phabricator")
    assert refused(said), said


def test_a_rollout_replaces_every_pod_without_a_failed_call(
    real_cluster: RealCluster, ns: str, bot: str, clients: str
) -> None:
    """Each pod calls once a second until it is told to stop (TERM); a rollout replaces both
    pods; every call of every pod, old and new, succeeded, but for a pod's last call when it
    began between the pod's deletion (its lease is revoked then) and the signal: that one is
    refused as arc's invalid credentials, and the pod stops right after."""
    loop = (
        "trap 'echo stopped; exit 0' TERM; "
        "while :; do "
        "if echo {} | arcanist call-conduit -- user.whoami | grep -q userName; "
        "then echo ok; else echo FAILED; fi; sleep 1 & wait $!; done"
    )
    doc = realpods.deployment("rolls", clients, replicas=2)
    doc["spec"]["template"]["spec"]["containers"][0]["command"] = ["/bin/sh", "-c", loop]
    doc["spec"]["strategy"] = {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    real_cluster.apply(doc, namespace=ns)
    old = realpods.ready_pods(real_cluster, ns, "rolls", 2)
    logs: dict[str, str] = {}
    followers: list[threading.Thread] = []

    def follow(pod: str) -> None:
        done = real_cluster.plane.kubectl(
            "logs", "-f", "-n", ns, pod, "-c", "app", check=False, timeout=TIMEOUT
        )
        logs[pod] = done.stdout

    def watch(names: list[str]) -> None:
        for name in names:
            if name not in logs and name not in [t.name for t in followers]:
                thread = threading.Thread(target=follow, args=(name,), name=name, daemon=True)
                thread.start()
                followers.append(thread)

    watch(old)
    real_cluster.kubectl("rollout", "restart", "-n", ns, "deployment/rolls")

    def replaced() -> bool:
        current = [p["metadata"]["name"] for p in realpods.pods_of(real_cluster, ns, "rolls")]
        watch([n for n in current if n not in old])
        return not set(current) & set(old)

    wait_for(replaced, timeout=TIMEOUT, interval=0.5, what="every old pod gone")
    new = realpods.ready_pods(real_cluster, ns, "rolls", 2)
    watch(new)
    wait_for(
        lambda: all(real_cluster.logs(n, "app", ns).count("ok") >= 2 for n in new),
        timeout=TIMEOUT, what="the new pods' calls",
    )  # fmt: skip
    real_cluster.kubectl("delete", "-n", ns, "deployment/rolls", "--wait=true")
    for thread in followers:
        thread.join(timeout=TIMEOUT)
    assert set(old) | set(new) <= set(logs)
    for pod, text in logs.items():
        outcomes = [line for line in text.splitlines() if line in ("ok", "FAILED", "stopped")]
        assert outcomes.count("ok") >= 1 and outcomes[-1] == "stopped", f"{pod}: {text}"
        if "FAILED" in outcomes:
            assert outcomes[-2:] == ["FAILED", "stopped"], f"{pod}: {text}"
            assert outcomes.count("FAILED") == 1 and "INVALID CREDENTIALS" in text, f"{pod}: {text}"


def test_the_operator_killed_mid_scale_down_recovers(
    real_cluster: RealCluster, ns: str, bot: str, clients: str
) -> None:
    real_cluster.apply(realpods.deployment("fleet", clients, replicas=3, linger=60), namespace=ns)
    pods = realpods.ready_pods(real_cluster, ns, "fleet", 3)
    for pod in pods:
        wait_for(lambda p=pod: whoami(real_cluster, ns, p, "arc")[0] == bot, timeout=TIMEOUT)
    real_cluster.kubectl("scale", "-n", ns, "deployment/fleet", "--replicas=0")
    real_cluster.kubectl(
        "delete", "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/name=phabmesh-operator",
        "--grace-period=0", "--force", "--wait=false",
    )  # fmt: skip
    # Every terminating pod is refused, whether the old operator revoked its lease or the
    # new one does once it is up.
    for pod in pods:
        said = wait_for(
            lambda p=pod: (r := whoami(real_cluster, ns, p, "arc")) and r[0] is None and r[1],
            timeout=TIMEOUT, interval=0.5, what=f"{pod} refused",
        )  # fmt: skip
        assert refused(said), said
    realpods.rolled_out(real_cluster, SYSTEM, "phabmesh-operator")

    def leases_of_the_fleet() -> list[str]:
        out = real_cluster.kubectl("get", "phabricatorcredentials", "-n", ns, "-o", "json")
        return [c["spec"]["podName"] for c in json.loads(out.stdout)["items"]
                if c["spec"]["podName"] in pods]  # fmt: skip

    wait_for(
        lambda: not leases_of_the_fleet(), timeout=TIMEOUT, interval=1,
        what="the scaled-down pods' leases gone",
    )  # fmt: skip
    # and the recovered operator serves a new pod, once its webhook is called again (a pod
    # admitted while the Service still led nowhere gets no injection: failure policy Ignore,
    # docs/troubleshooting.md)
    realpods.wait_injects(real_cluster, ns, clients)
    real_cluster.kubectl("scale", "-n", ns, "deployment/fleet", "--replicas=1")
    (fresh,) = realpods.ready_pods(real_cluster, ns, "fleet")
    try:
        answered = wait_for(lambda: whoami(real_cluster, ns, fresh, "arc")[0], timeout=TIMEOUT)
    except AssertionError as exc:
        said = whoami(real_cluster, ns, fresh, "arc")[1]
        seen = realpods.diagnosis(real_cluster, ns, fresh)
        raise AssertionError(f"{exc}\n{said}\n{seen}") from None
    assert answered == bot


def test_the_kustomize_install_works_the_same(
    real_cluster: RealCluster,
    installed: Helm,
    phabricator: ConduitServer,
    bot: str,
    clients: str,
    tmp_path: Path,
) -> None:
    """`helm uninstall`, then `kubectl apply -k` of an overlay of manifests/ that sets what the
    chart was given (Phabricator's URL, no client ID, the local image): a new pod calls."""
    installed.run("uninstall", "phabmesh", "-n", SYSTEM, "--wait")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    config_patch = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "phabmesh-config", "namespace": SYSTEM},
        "data": {
            "PHABMESH_PHABRICATOR_URL": phabricator.url,
            "PHABMESH_REQUIRE_CLIENT_ID": "false",
        },
    }
    never = [
        {"op": "add", "path": "/spec/template/spec/containers/0/imagePullPolicy", "value": "Never"}
    ]
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "manifests", overlay)],
        "patches": [
            {"patch": yaml.safe_dump(config_patch)},
            {"target": {"kind": "Deployment"}, "patch": json.dumps(never)},
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    real_cluster.kubectl("apply", "-k", str(overlay))
    try:
        realpods.rolled_out(real_cluster, SYSTEM, "phabmesh-operator", "phabmesh-gateway")
        namespace = realpods.restricted_namespace(real_cluster, f"realk-{uuid.uuid4().hex[:6]}")
        make_binding(real_cluster, namespace, "runners", bot, agent={"mode": resources.AGENT_AUTO})
        realpods.wait_injects(real_cluster, namespace, clients)
        real_cluster.apply(realpods.deployment("calls", clients), namespace=namespace)
        (pod,) = realpods.ready_pods(real_cluster, namespace, "calls")
        user = wait_for(
            lambda: whoami(real_cluster, namespace, pod, "phabricator")[0], timeout=TIMEOUT
        )
        assert user == bot
    finally:
        real_cluster.kubectl("delete", "-k", str(overlay), "--ignore-not-found", check=False)
