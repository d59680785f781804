"""Faults on the real control plane: the API server and etcd restarted, Phabricator down,
slow and back, bots lost in Phabricator, the gateway's clock off, the operator down. Each
test has its own control plane, Conduit server, operator and gateway, so that what it
breaks breaks nothing else. Docs: docs/reliability.md."""

from __future__ import annotations

import datetime
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from kubernetes import client

from phabmesh import resources
from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.processes.operator import OperatorProcess
from phabmesh.settings import Settings
from tests.kube import HAND_NODE, Cluster, compact_etcd, create_hand_node, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    binding_condition,
    bot_ready,
    label_namespace,
    leases,
    make_binding,
    make_bot,
    make_pod,
    pod_token,
    spawn_operator,
)
from tests.stack import Threaded

ROOT = Path(__file__).resolve().parents[2]
NS = "faults"
BOT = "fault-bot"


class Stack:
    """A private control plane with phabmesh's two processes and a Conduit server."""

    def __init__(self, plane: devcluster.ControlPlane, conduit: ConduitServer) -> None:
        self.plane = plane
        self.cluster = Cluster(plane)
        self.conduit = conduit
        self.settings = Settings.local(
            conduit.url,
            namespace=SYSTEM,
            bot_recheck_interval=10.0,
            conduit_timeout=1.0,
            conduit_attempts=2,
        )
        self.operator: Threaded | None = None
        self.gateway: Threaded | None = None
        self.bot_token = ""

    def start(self, gateway_clock: Callable[[], datetime.datetime] | None = None) -> Stack:
        kubeconfig = self.cluster.phabmesh_kubeconfig("operator")
        self.operator = Threaded(OperatorProcess(self.settings, kubeconfig=kubeconfig)).start()
        wait_for(self.operator.process.ready, timeout=60, what="operator ready")  # type: ignore[attr-defined]
        gateway = GatewayProcess(
            self.settings,
            kubeconfig=self.cluster.phabmesh_kubeconfig("gateway"),
            clock=gateway_clock,
        )
        self.gateway = Threaded(gateway).start()
        wait_for(lambda: gateway.state.ready, timeout=60, what="gateway ready")
        self.bot_token = make_bot(self.cluster, self.conduit, BOT)
        label_namespace(self.cluster, NS)
        make_binding(self.cluster, NS, "runners", BOT, credentialTTL="5m")
        wait_for(
            lambda: (c := binding_condition(self.cluster, NS, "runners")) and c["status"] == "True",
            what="binding Ready",
        )
        return self

    def stop(self) -> None:
        for proc in (self.gateway, self.operator):
            if proc is not None:
                proc.stop()

    def pod(self, name: str, node: str | None = None) -> client.V1Pod:
        pod = make_pod(self.cluster, NS, name, node=node)
        wait_for(lambda: self.lease_of(name), what=f"a lease for {name}")
        return pod

    def lease_of(self, pod: str) -> dict[str, Any] | None:
        return next(
            (x for x in active_leases(self.cluster, NS) if x["spec"]["podName"] == pod), None
        )

    def credential(self, pod: client.V1Pod, credential_format: str | None = None) -> str:
        """The pod's credential: in the default format, or as ``?format=`` asks."""
        assert self.operator is not None
        port = self.operator.process.endpoint_port  # type: ignore[attr-defined]
        token = pod_token(self.cluster, NS, pod)
        params = {"format": credential_format} if credential_format else {}

        def exchanged() -> str | None:
            answer = requests.post(
                f"http://127.0.0.1:{port}/v1/credentials",
                headers={"Authorization": f"Bearer {token}"},
                params=params,
                timeout=10,
            )
            return str(answer.json()["credential"]) if answer.status_code == 200 else None

        return wait_for(exchanged, what="a credential")

    def whoami(self, credential: str, port: int | None = None) -> tuple[int, dict[str, Any]]:
        """A call through the stack's gateway, or through the gateway listening on ``port``."""
        if port is None:
            assert self.gateway is not None
            port = self.gateway.process.port  # type: ignore[attr-defined]
        answer = requests.post(
            f"http://127.0.0.1:{port}/api/user.whoami", data={"api.token": credential}, timeout=15
        )
        body: dict[str, Any] = answer.json()
        return answer.status_code, body

    def accepted(self, credential: str) -> bool:
        return self.whoami(credential)[1].get("error_code") is None

    def refused(self, credential: str, says: str = "") -> bool:
        _, body = self.whoami(credential)
        return body.get("error_code") == "ERR-INVALID-AUTH" and says in str(body["error_info"])


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    conduit = ConduitServer()
    conduit.start()
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        cluster = Cluster(plane)
        create_hand_node(cluster.core)
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--all", "crd", "--timeout=60s")
        for name in (SYSTEM, NS):
            cluster.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
            )
        wait_for(lambda: cluster.core.list_namespaced_service_account(NS).items, what="default SA")
        made = Stack(plane, conduit)
        try:
            yield made
        finally:
            made.stop()
            conduit.stop()
        made.cluster.assert_nothing_forbidden()


def test_api_server_restart_fails_closed_then_resumes_after_410(stack: Stack) -> None:
    stack.start()
    first = stack.pod("first")
    credential = stack.credential(first)
    assert stack.accepted(credential)

    stack.plane.stop_apiserver()
    # The gateway cannot confirm the lease while its watch is down: it refuses.
    wait_for(lambda: stack.refused(credential, "cannot be confirmed"), what="fail closed")
    # Every resourceVersion the watches hold is compacted away: resuming gets 410 Gone.
    compact_etcd(stack.plane)
    stack.plane.start_apiserver()
    wait_for(lambda: stack.accepted(credential), timeout=60, what="the gateway to resume")

    # Pods come and go after the restart; nothing is missed.
    stack.cluster.core.delete_namespaced_pod("first", NS)
    second = stack.pod("second")
    wait_for(lambda: stack.refused(credential, "revoked"), what="first's credential refused")
    assert stack.accepted(stack.credential(second))
    # Under RBAC the restarted API server refuses requests until its authorizer has read the
    # roles; the operator's watches back off on those refusals and catch up after.
    wait_for(
        lambda: [x["spec"]["podName"] for x in active_leases(stack.cluster, NS)] == ["second"],
        timeout=90,
        what="first's lease revoked",
    )


def test_etcd_restart_while_pods_come_and_go(stack: Stack) -> None:
    stack.start()
    first = stack.pod("first")
    credential = stack.credential(first)
    stack.plane.stop_etcd()
    # The API server cannot store anything: a deletion now fails, so none can be missed.
    with pytest.raises((client.ApiException, urllib3.exceptions.HTTPError)):
        stack.cluster.core.delete_namespaced_pod("first", NS, _request_timeout=10)
    stack.plane.start_etcd()
    wait_for(lambda: stack.cluster.core.list_namespaced_pod(NS).items, timeout=60, what="etcd")
    stack.cluster.core.delete_namespaced_pod("first", NS)
    second = stack.pod("second")
    wait_for(lambda: stack.refused(credential, "revoked"), what="first's credential refused")
    assert stack.accepted(stack.credential(second))
    wait_for(lambda: stack.lease_of("first") is None, what="first's lease gone")


def test_phabricator_down_slow_and_back(stack: Stack) -> None:
    stack.start()
    credential = stack.credential(stack.pod("runner"))
    conduit = stack.conduit
    conduit.down = True
    try:
        # The bot degrades with a reason; its leases stay (only a definite "no" revokes).
        unknown = wait_for(
            lambda: (c := bot_ready(stack.cluster, BOT)) and c["status"] == "Unknown" and c,
            timeout=60,
            what="bot Ready=Unknown",
        )
        assert unknown["reason"] == "PhabricatorUnavailable"
        assert stack.lease_of("runner") is not None
        # The gateway answers at once, in its documented envelope.
        started = time.monotonic()
        status, body = stack.whoami(credential)
        assert time.monotonic() - started < 3
        assert (status, body["error_code"]) == (503, "ERR-PHABRICATOR-UNAVAILABLE")
        # Bounded retries with backoff: over 20 s the controller checks the bot a few times
        # (backoff 5 s, 10 s, ... capped at the re-check interval), each with 2 attempts.
        before = conduit.calls["user.whoami"]
        time.sleep(20)
        checks = conduit.calls["user.whoami"] - before
        assert 1 <= checks <= 2 * (20 // 5 + 1), checks

        # Slow: answers after the client's timeout count as unavailable.
        conduit.down, conduit.delay = False, 1.5
        started = time.monotonic()
        status, body = stack.whoami(credential)
        assert (status, body["error_code"]) == (503, "ERR-PHABRICATOR-UNAVAILABLE")
        assert time.monotonic() - started < 2 * 1.0 + 2  # attempts x timeout, plus backoff
    finally:
        conduit.down, conduit.delay = False, 0.0
    # Back: everything recovers without a restart.
    wait_for(
        lambda: (c := bot_ready(stack.cluster, BOT)) and c["status"] == "True",
        timeout=60,
        what="bot Ready again",
    )
    assert stack.accepted(credential)


@pytest.mark.parametrize("how", ["disabled", "token-revoked"])
def test_bot_lost_in_phabricator_revokes_leases_and_credentials(stack: Stack, how: str) -> None:
    stack.start()
    credential = stack.credential(stack.pod("runner"))
    assert stack.accepted(credential)
    if how == "disabled":
        stack.conduit.disable_user(BOT)
    else:
        stack.conduit.terminate_token(stack.bot_token)
    # Within one re-check (10 s here) the bot is not Ready...
    lost = wait_for(
        lambda: (c := bot_ready(stack.cluster, BOT)) and c["status"] == "False" and c,
        timeout=30,
        what="bot not Ready",
    )
    assert lost["reason"] == {"disabled": "Disabled", "token-revoked": "TokenInvalid"}[how]
    # ...its leases are revoked and the gateway refuses their credentials.
    wait_for(lambda: leases(stack.cluster, NS) == [], what="leases revoked")
    assert stack.refused(credential, "revoked")


@pytest.mark.parametrize(
    ("skew", "credential_format", "accepted"),
    [(30, "jwt", True), (-30, "jwt", True), (-45, "jwt", False), (-45, "phorge-token", True)],
    ids=[
        "gateway-30s-ahead",
        "gateway-30s-behind",
        "gateway-45s-behind",
        "gateway-45s-behind-phorge-token",
    ],
)
def test_clock_skew_between_endpoint_and_gateway(
    stack: Stack, skew: int, credential_format: str, accepted: bool
) -> None:
    def skewed() -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=skew)

    stack.start(gateway_clock=skewed)
    credential = stack.credential(stack.pod("runner"), credential_format)
    if accepted:
        # Within PHABMESH_CLOCK_SKEW (30 s) a fresh credential is good at once (and a
        # Phorge-shaped one, which has an expiry but no not-before, at any skew before it)...
        assert stack.accepted(credential)
    else:
        # ...beyond it, a gateway that far behind sees a JWT as not yet valid.
        assert stack.refused(credential, "not yet valid")
    # Revocation follows the lease, not the clocks.
    stack.cluster.core.delete_namespaced_pod("runner", NS)
    wait_for(lambda: stack.refused(credential, "revoked"), what="refused after deletion")


def test_operator_down_the_gateway_still_refuses_pods_that_ended(stack: Stack) -> None:
    stack.start()
    names = ("terminating", "completed", "deleted", "live")
    pods = {n: stack.pod(n, node=HAND_NODE if n == "terminating" else None) for n in names}
    creds = {n: stack.credential(pod) for n, pod in pods.items()}
    # Beside it, a gateway that follows the leases alone.
    assert stack.operator is not None and stack.gateway is not None
    leases_only = GatewayProcess(
        stack.settings.replace(gateway_watch_pods=False),
        kubeconfig=stack.cluster.phabmesh_kubeconfig("gateway"),
    )
    second = Threaded(leases_only).start()
    try:
        wait_for(lambda: leases_only.state.ready, timeout=60, what="second gateway ready")
        assert all(stack.accepted(c) for c in creds.values())

        stack.operator.stop()  # nothing writes a lease's revocation from here on
        stack.operator = None
        core = stack.cluster.core
        core.delete_namespaced_pod("terminating", NS)  # has a node: stays Terminating
        core.patch_namespaced_pod_status("completed", NS, {"status": {"phase": "Succeeded"}})
        core.delete_namespaced_pod("deleted", NS)  # no node: gone at once

        wait_for(lambda: stack.refused(creds["terminating"], "pod terminating"), what="refused")
        wait_for(lambda: stack.refused(creds["completed"], "pod completed"), what="refused")
        wait_for(lambda: stack.refused(creds["deleted"], "revoked"), what="refused")
        assert stack.accepted(creds["live"])
        # The leases of the pods that still exist were never revoked: the pod watch refused.
        active = {x["spec"]["podName"] for x in active_leases(stack.cluster, NS)}
        assert {"terminating", "completed", "live"} <= active

        # Following the leases alone, credentials stay good until the operator is back.
        for name in ("terminating", "completed", "live"):
            assert stack.whoami(creds[name], leases_only.port)[1]["error_code"] is None
    finally:
        second.stop()


def _started(log: Path) -> bool:
    return log.exists() and '"controller_started"' in log.read_text()


def test_operator_sigkilled_mid_scale_down_loses_and_duplicates_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    cluster = stack.cluster
    # No garbage collector: the restarted operator alone must revoke what the dead one missed.
    stack.plane.stop_controller_manager()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = spawn_operator(cluster, stack.conduit, logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _started(logs[0]), timeout=60, what="the operator")
        make_bot(cluster, stack.conduit, BOT)
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "runners", BOT, credentialTTL="10m")
        wait_for(lambda: (c := binding_condition(cluster, NS, "runners")) and c["status"] == "True")
        names = [f"w-{i:03d}" for i in range(200)]
        make_pod(cluster, NS, names[0], node=None)  # creates the ServiceAccount once
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: make_pod(cluster, NS, n, node=None), names[1:]))
        wait_for(lambda: len(active_leases(cluster, NS)) == 200, timeout=180, what="200 leases")
        before = {x["spec"]["podName"]: x["metadata"]["name"] for x in active_leases(cluster, NS)}

        # Scale down half; the operator dies (SIGKILL, no goodbye) a few deletions in.
        doomed, kept = names[::2], names[1::2]
        deleted = threading.Event()

        def scale_down() -> None:
            for i, name in enumerate(doomed):
                cluster.core.delete_namespaced_pod(name, NS)
                if i == 20:
                    deleted.set()

        worker = threading.Thread(target=scale_down)
        worker.start()
        deleted.wait(60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        worker.join(120)
        stale = [x for x in active_leases(cluster, NS) if x["spec"]["podName"] in doomed]
        assert stale, "the kill came too late to leave anything to catch up on"

        second = spawn_operator(cluster, stack.conduit, logs[1])
        wait_for(lambda: _started(logs[1]), timeout=60, what="the restarted operator")

        def settled() -> bool:
            held = [x for x in leases(cluster, NS) if x["spec"]["podName"] in doomed]
            return all((x.get("status") or {}).get("phase") == "Revoked" for x in held)

        wait_for(settled, timeout=60, what="every deleted pod's lease revoked")
        after = leases(cluster, NS)
        live = [x for x in after if x["spec"]["podName"] in kept]
        # Exactly one lease per live pod, the same one as before, still Active.
        assert sorted(x["spec"]["podName"] for x in live) == sorted(kept)
        assert {x["spec"]["podName"]: x["metadata"]["name"] for x in live} == {
            name: before[name] for name in kept
        }
        assert all(x["status"]["phase"] == "Active" for x in live)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def _binding(cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            G, V, NS, resources.BINDING_PLURAL, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def test_binding_deleted_while_operator_down_is_refused_and_its_name_free(stack: Stack) -> None:
    stack.start()
    cluster = stack.cluster
    # A second binding, for pods of another ServiceAccount; and one created with the
    # finalizer that earlier versions put on bindings (for their timers).
    make_binding(
        cluster, NS, "held", BOT, identityRefs=[{"kind": "ServiceAccount", "name": "other"}]
    )
    wait_for(lambda: (c := binding_condition(cluster, NS, "held")) and c["status"] == "True")
    make_binding(cluster, NS, "legacy", BOT, identityRefs=[{"kind": "ServiceAccount", "name": "x"}])
    cluster.custom.patch_namespaced_custom_object(
        G, V, NS, resources.BINDING_PLURAL, "legacy", {"metadata": {"finalizers": [KOPF_FINALIZER]}}
    )
    runner = stack.credential(stack.pod("runner"))
    other_pod = make_pod(cluster, NS, "other", sa="other")
    wait_for(lambda: stack.lease_of("other"), what="a lease for other")
    other = stack.credential(other_pod)
    assert stack.accepted(runner) and stack.accepted(other)
    # The operator puts no finalizer on bindings, and takes off the one they carry.
    wait_for(
        lambda: not ((_binding(cluster, "legacy") or {})["metadata"].get("finalizers")),
        what="kopf's finalizer removed from the legacy binding",
    )
    for name in ("runners", "held"):
        assert not (_binding(cluster, name) or {})["metadata"].get("finalizers")
    # Someone else's finalizer holds "held" when it is deleted.
    cluster.custom.patch_namespaced_custom_object(
        G,
        V,
        NS,
        resources.BINDING_PLURAL,
        "held",
        {"metadata": {"finalizers": ["example.com/hold"]}},
    )

    assert stack.operator is not None
    stack.operator.stop()
    stack.operator = None
    # Deleted while the operator is down: gone at once, refused at once, name free.
    cluster.custom.delete_namespaced_custom_object(G, V, NS, resources.BINDING_PLURAL, "runners")
    wait_for(lambda: _binding(cluster, "runners") is None, what="runners gone")
    wait_for(lambda: stack.refused(runner, "binding deleted"), what="runner refused")
    make_binding(cluster, NS, "runners", BOT, credentialTTL="5m")
    # Terminating (held by a finalizer): refused from the gateway's own watch.
    cluster.custom.delete_namespaced_custom_object(G, V, NS, resources.BINDING_PLURAL, "held")
    terminating = _binding(cluster, "held")
    assert terminating is not None and terminating["metadata"].get("deletionTimestamp")
    wait_for(lambda: stack.refused(other, "binding deleted"), what="other refused")
    assert stack.lease_of("other") is not None  # nothing revoked it: the gateway refused

    # Back: the terminating binding's lease is revoked; the re-created one serves.
    operator = OperatorProcess(stack.settings, kubeconfig=str(cluster.kubeconfig))
    stack.operator = Threaded(operator).start()
    wait_for(operator.ready, timeout=60, what="operator ready")
    wait_for(lambda: stack.lease_of("other") is None, what="held's lease revoked")
    wait_for(lambda: stack.lease_of("runner"), what="runner's lease")
    assert stack.accepted(stack.credential(stack.pod("runner-2")))
