"""Two real operator processes with kopf peering: one acts, the other takes over when it dies.

Its own control plane, so that no other test's operator acts on it.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from kubernetes import client

from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    active_leases,
    binding_condition,
    label_namespace,
    make_binding,
    make_bot,
    make_pod,
    spawn_operator,
)

ROOT = Path(__file__).resolve().parents[2]
NS = "peers"


@pytest.fixture
def alone(tmp_path: Path) -> Iterator[Cluster]:
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        cluster = Cluster(plane)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        peering = str(ROOT / "manifests" / "peering.yaml")
        cluster.kubectl("apply", "--server-side", "-f", peering, check=False)  # the CRD first...
        cluster.kubectl("wait", "--for=condition=Established", "--all", "crd", "--timeout=60s")
        cluster.kubectl("apply", "--server-side", "-f", peering)  # ...then its object
        for name in (SYSTEM, NS):
            cluster.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
            )
        wait_for(lambda: cluster.core.list_namespaced_service_account(NS).items, what="default SA")
        yield cluster
        cluster.assert_nothing_forbidden()


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    """Stop replicas as Kubernetes would (SIGTERM, then SIGKILL after a grace period)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _port(log: str, which: str = "webhook_port") -> int:
    for line in log.splitlines():
        if '"operator_started"' in line:
            return int(json.loads(line)[which])
    raise AssertionError("no operator_started line")


def _webhook_port(log: str) -> int:
    return _port(log)


def _acting(log: str) -> float | None:
    """phabmesh_operator_acting on the replica's /metrics (None if it does not answer)."""
    try:
        text = requests.get(
            f"http://127.0.0.1:{_port(log, 'metrics_port')}/metrics", timeout=5
        ).text
    except requests.RequestException:
        return None
    for line in text.splitlines():
        if line.startswith("phabmesh_operator_acting "):
            return float(line.split()[1])
    raise AssertionError("no phabmesh_operator_acting on /metrics")


def _admits_with_injection(port: int, ca: Path) -> bool:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x", "namespace": NS, "labels": {"app": "runner"}},
        "spec": {"serviceAccountName": "runner", "containers": [{"name": "app", "image": "a"}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0a",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {"username": "tester"},
            "object": pod,
        },
    }
    url = f"https://127.0.0.1:{port}/inject"
    try:
        answer = requests.post(url, json=review, verify=str(ca), timeout=5).json()["response"]
    except requests.ConnectionError:
        return False  # the webhook's process is still starting
    patch = json.loads(base64.b64decode(answer.get("patch") or "W10="))
    return bool(answer["allowed"] and "phabmesh-token" in json.dumps(patch))


def _webhook_pid(log: str) -> int | None:
    """The webhook process's pid, once the replica has logged it ready."""
    for line in log.splitlines():
        if '"webhook_process_ready"' in line:
            return int(json.loads(line)["pid"])
    return None


def _gone(pid: int) -> bool:
    """The process has ended (exited, even if nobody has reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def test_one_of_two_replicas_acts_and_the_other_takes_over(
    alone: Cluster, conduit: ConduitServer, tmp_path: Path
) -> None:
    cluster = alone
    first = spawn_operator(cluster, conduit, tmp_path / "first.log", "--peering")
    wait_for(
        lambda: "controller_started" in (tmp_path / "first.log").read_text(),
        timeout=60,
        what="the first replica",
    )
    second = spawn_operator(cluster, conduit, tmp_path / "second.log", "--peering")
    try:
        wait_for(
            lambda: "controller_started" in (tmp_path / "second.log").read_text(),
            timeout=60,
            what="the second replica",
        )
        make_bot(cluster, conduit, "peer-bot")
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "runners", "peer-bot")
        wait_for(lambda: (c := binding_condition(cluster, NS, "runners")) and c["status"] == "True")
        make_pod(cluster, NS, "one", node=None)
        wait_for(lambda: active_leases(cluster, NS), what="a lease from the active replica")

        def read_logs() -> list[str]:
            return [(tmp_path / f"{n}.log").read_text() for n in ("first", "second")]

        # The replica logs the issuance just after its write: the lease can be seen first.
        wait_for(lambda: "lease_issued" in "".join(read_logs()), what="the issuance logged")
        logs = read_logs()
        issued = [text.count('"lease_issued"') for text in logs]
        assert sorted(issued) == [0, 1], issued  # exactly one replica acted
        active = issued.index(1)
        # Each replica's /metrics says whether it acts: the one that issued, only.
        wanted = [float(a == active) for a in (0, 1)]
        seen: list[list[float | None]] = []
        try:
            wait_for(
                lambda: (seen.append([_acting(t) for t in read_logs()]) or seen[-1]) == wanted,
                timeout=60,
                what=f"phabmesh_operator_acting {wanted} on the two replicas",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last read: {seen[-1:]}") from None
        # Both replicas serve pod injection (peering pauses only the acting handlers), with
        # certificates from the one CA in the Secret, and decide alike.
        ca = tmp_path / "ca.crt"
        secret = cluster.core.read_namespaced_secret("phabmesh-webhook-tls", SYSTEM)
        ca.write_bytes(base64.b64decode(secret.data["ca.crt"]))
        for text in logs:
            wait_for(lambda text=text: _admits_with_injection(_webhook_port(text), ca))

        # The acting replica dies without a goodbye; the other takes over.
        victim = (first, second)[active]
        orphan = wait_for(
            lambda: _webhook_pid(read_logs()[active]), what="the webhook process ready line"
        )
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        # Its webhook process sees the operator gone (its stdin closes) and ends too.
        wait_for(lambda: _gone(orphan), timeout=20, what="the webhook process to end")
        make_pod(cluster, NS, "two", node=None)
        wait_for(
            lambda: len(active_leases(cluster, NS)) == 2,
            timeout=120,
            what="the standby to take over",
        )
        assert _acting(read_logs()[1 - active]) == 1.0
    finally:
        _stop(first, second)


def test_two_replicas_never_act_at_once_across_an_api_server_outage(
    alone: Cluster, conduit: ConduitServer, tmp_path: Path
) -> None:
    """An outage longer than what is left of the acting replica's keep-alive: kopf's rule
    alone lets the standby act as soon as it reads again while the other acts on; each
    replica's own fence keeps them from acting at once (peering lifetime 10 s here)."""
    cluster = alone
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [spawn_operator(cluster, conduit, log, "--peering") for log in logs]
    samples: list[tuple[float, list[float | None]]] = []
    done = threading.Event()

    def sample() -> None:
        texts = [log.read_text() for log in logs]
        while not done.is_set():
            samples.append((time.monotonic(), [_acting(text) for text in texts]))
            done.wait(0.1)

    try:
        for log in logs:
            wait_for(lambda log=log: "controller_started" in log.read_text(), timeout=60)
        wait_for(
            lambda: sorted(_acting(log.read_text()) or 0.0 for log in logs) == [0.0, 1.0],
            timeout=60,
            what="one replica acting",
        )
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        alone.plane.stop_apiserver()
        # Nothing shows either replica alive now: each stops acting before its keep-alive
        # runs out, so neither can act beside one that another judges dead.
        wait_for(
            lambda: samples and samples[-1][1] == [0.0, 0.0],
            timeout=30,
            what="both replicas fenced while the API server is away",
        )
        alone.plane.start_apiserver()
        back = time.monotonic()
        wait_for(
            lambda: samples and sorted(v or 0.0 for v in samples[-1][1]) == [0.0, 1.0],
            timeout=120,
            what="one replica acting again",
        )
        print(f"a replica acted again {time.monotonic() - back:.1f} s after the API server")
        # And it acts: a new pod gets its lease.
        make_bot(cluster, conduit, "outage-bot")
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "runners", "outage-bot")
        make_pod(cluster, NS, "after", node=None)
        wait_for(lambda: active_leases(cluster, NS), timeout=90, what="a lease after the outage")
    finally:
        done.set()
        _stop(*procs)
    # Both acting is seen at most in one sample at a time: the moment between a keep-alive
    # landing and the other replica's watch bringing it (milliseconds), never a stretch.
    both = [i for i, (_, values) in enumerate(samples) if values == [1.0, 1.0]]
    stretches = [i for i in both if i + 1 in both]
    assert not stretches, [samples[i] for i in both]
