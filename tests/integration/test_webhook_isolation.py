"""The injection webhook apart from the operator, on the real API server.

A review found that 8 concurrent AdmissionReviews of 422 KB each, sent to the webhook's
port by anyone, took credential exchange from 4 ms to 8.4 s and a new pod's lease from
0.03 s to 11.3 s: the reviews were parsed on the operator's one event loop. The webhook
now has a process of its own, with caps on what it reads. And an injected agent broke
Pod Security ``restricted``: it set neither runAsNonRoot nor a seccomp profile.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.rest import ApiException

from phabmesh import admission, serving
from phabmesh.admission import inject
from phabmesh.dev.conduit import ConduitServer
from phabmesh.dev.pki import Pki
from phabmesh.settings import Settings
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import active_leases, bind, exchange, make_pod, pod_token
from tests.stack import Threaded

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_YAML = ROOT / "manifests" / "webhook.yaml"
CONFIG = Settings().webhook_configuration
FLOOD_SECONDS = 12.0  # how long the flood sends: what must complete, completes inside it
FLOOD_CONNECTIONS = 8
REVIEW_BYTES = 400_000


@pytest.fixture(scope="module")
def webhook(cluster: Cluster, operator: Threaded) -> Iterator[int]:
    """manifests/webhook.yaml pointed at the operator's webhook; its port."""
    port: int = operator.process.webhook_port  # type: ignore[attr-defined]
    config = admission.pointed_at(
        yaml.safe_load(WEBHOOK_YAML.read_text()), f"https://127.0.0.1:{port}/inject"
    )
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(config)
    )
    operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    yield port
    cluster.kubectl("delete", "mutatingwebhookconfiguration", CONFIG, "--ignore-not-found")


# -- Pod Security `restricted` -----------------------------------------------------------------

RESTRICTED_CONTAINER: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _restricted_pod(name: str, *, pod_level: bool, restart: str = "Always") -> dict[str, Any]:
    """A meshed pod that passes `restricted`: its settings on every container (many charts
    do so), or runAsNonRoot and the seccomp profile once for the pod."""
    own = dict(RESTRICTED_CONTAINER)
    spec: dict[str, Any] = {"serviceAccountName": "runner", "restartPolicy": restart}
    if pod_level:
        spec["securityContext"] = {
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        own = {k: v for k, v in own.items() if k not in spec["securityContext"]}
    spec["initContainers"] = [
        {
            "name": "linkerd-proxy",
            "image": "cr.l5d.io/linkerd/proxy:edge",
            "restartPolicy": "Always",
            "securityContext": dict(own),
        }
    ]
    spec["containers"] = [
        {"name": "app", "image": "registry.invalid/app:1", "securityContext": dict(own)}
    ]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def _webhook_knows(cluster: Cluster, namespace: str) -> bool:
    """A server-side dry run of a bound pod comes back injected: the webhook's own watch
    has the namespace's binding."""
    body = _restricted_pod("probe", pod_level=True)
    try:
        stored = cluster.core.create_namespaced_pod(namespace, body, dry_run="All")
    except ApiException:
        return False
    return any(v.name == inject.VOLUME for v in stored.spec.volumes or [])


def test_injected_pods_pass_pod_security_restricted(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, webhook: int, namespace: str
) -> None:
    bind(cluster, conduit, namespace, runner_account=True, agent={"mode": "Auto"})
    cluster.core.patch_namespace(
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    wait_for(lambda: _webhook_knows(cluster, namespace), what="the webhook to know the binding")
    cases = [
        ("per-container-sidecar", False, "Always", "sidecar"),
        ("pod-level-sidecar", True, "Always", "sidecar"),
        ("per-container-init", False, "Never", "init"),
    ]
    for name, pod_level, restart, mode in cases:
        body = _restricted_pod(name, pod_level=pod_level, restart=restart)
        try:
            cluster.core.create_namespaced_pod(namespace, body)
        except ApiException as exc:
            raise AssertionError(f"{name}: refused: {exc.body}") from exc
        stored = cluster.core.read_namespaced_pod(name, namespace)
        assert stored.metadata.annotations[inject.AGENT_INJECTED_ANNOTATION] == mode, name
        (agent,) = [c for c in stored.spec.init_containers if c.name == inject.AGENT_CONTAINER]
        assert agent.security_context.run_as_non_root is True, name
        assert agent.security_context.seccomp_profile.type == "RuntimeDefault", name
    # The namespace does enforce `restricted`: a pod that does not comply is refused.
    with pytest.raises(ApiException) as refused:
        cluster.core.create_namespaced_pod(
            namespace,
            {
                "metadata": {"name": "not-restricted"},
                "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            },
        )
    assert refused.value.status == 403 and "restricted" in str(refused.value.body)


# -- the flood -----------------------------------------------------------------------------------


def _flood(port: int, seconds: float, namespace: str) -> subprocess.Popen[str]:
    """The flooder (bench.webhook_flood), a process of its own as an attacker's is:
    FLOOD_CONNECTIONS connections each sending one REVIEW_BYTES AdmissionReview after
    another for ``seconds``."""
    flooder = subprocess.Popen(
        [sys.executable, "-m", "bench.webhook_flood", str(port), str(seconds),
         str(FLOOD_CONNECTIONS), str(REVIEW_BYTES), namespace, "runner"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    assert flooder.stdout is not None
    assert flooder.stdout.readline().strip() == "started"
    return flooder


def test_a_webhook_flood_leaves_exchange_and_issuance_alone(
    cluster: Cluster, operator: Threaded, webhook: int, bound: str
) -> None:
    first = make_pod(cluster, bound, "before-flood")
    wait_for(lambda: active_leases(cluster, bound), what="the first pod's lease")
    first_token = pod_token(cluster, bound, first)
    assert exchange(operator, first_token).status_code == 200

    # Reviews of pods the binding names: the costliest to answer (each one is injected).
    flooder = _flood(webhook, FLOOD_SECONDS, bound)
    # The flooder sends until then (a review it has sent may be answered later).
    flood_ends = time.monotonic() + FLOOD_SECONDS
    try:
        time.sleep(1.0)  # the flood under way
        assert flooder.poll() is None
        # A fresh pod: its lease is issued (the controller) and its token exchanged (the
        # endpoint, with an uncached TokenReview), while the flood goes on.
        pod = make_pod(cluster, bound, "during-flood")
        wait_for(
            lambda: any(
                lease["spec"]["podUID"] == pod.metadata.uid
                for lease in active_leases(cluster, bound)
            ),
            timeout=FLOOD_SECONDS,
            what="the new pod's lease",
        )
        answer = exchange(operator, pod_token(cluster, bound, pod))
        assert answer.status_code == 200, answer.text
        assert exchange(operator, first_token).status_code == 200
        still_flooding = time.monotonic() < flood_ends and flooder.poll() is None
    finally:
        out, _ = flooder.communicate(timeout=FLOOD_SECONDS + 30)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts.get("200", 0) > 0, counts  # the webhook served the flood (in its process)
    assert still_flooding, f"exchange and issuance finished only after the flood: {counts}"


def _status(port: int, head: bytes, body: bytes = b"") -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(head + body)
        return int(tls.makefile("rb").readline().split()[1])


def _head(length: int) -> bytes:
    return (
        f"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_the_webhook_refuses_an_oversize_review_unread(webhook: int) -> None:
    # Announced as 10 MB (over the limit, 1 MiB by default), nothing sent: refused from
    # the headers alone.
    assert _status(webhook, _head(10_000_000)) == 413


def test_the_webhook_refuses_one_review_too_many_at_once(operator: Threaded, webhook: int) -> None:
    settings: Settings = operator.process.settings  # type: ignore[attr-defined]
    # One source may hold half the places and be half of all present (reading or waiting):
    # this test's address takes its whole share with reviews that never finish arriving.
    share = (settings.webhook_max_concurrent + settings.webhook_max_waiting) // 2
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    held = []
    try:
        for _ in range(share):
            raw = socket.create_connection(("127.0.0.1", webhook), timeout=5)
            tls = context.wrap_socket(raw)
            tls.sendall(_head(1000) + b"{")
            held.append(tls)
        # One more from the same source: refused (at once while the share is taken; after
        # the wait bound at most, if some of the share has already given up waiting).
        assert _status(webhook, _head(2), b"{}") == 429
    finally:
        for tls in held:
            tls.close()
    # The places come back once those go.
    wait_for(lambda: _status(webhook, _head(2), b"{}") == 400, what="the places back")


# -- a client certificate, where the API server has one --------------------------------------


def test_a_client_ca_makes_the_webhook_require_a_client_certificate(
    operator: Threaded, webhook: int, phabmesh_rbac: rbac.Installed, tmp_path: Path
) -> None:
    from phabmesh.admission.server import WebhookProcess

    pki = Pki.create(tmp_path / "pki")  # its CA signs the "admin" client certificate
    stranger = Pki.create(tmp_path / "other")
    base: Settings = operator.process.settings  # type: ignore[attr-defined]
    port = serving.free_port("127.0.0.1")
    settings = base.replace(webhook_port=port, webhook_client_ca=str(pki.ca_cert))
    child = Threaded(WebhookProcess(settings, kubeconfig=phabmesh_rbac.kubeconfig("operator")))
    child.start()
    try:

        def post(cert: Pki | None) -> int:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            if cert is not None:
                crt, key = cert.pair("admin")
                context.load_cert_chain(crt, key)
            return asyncio.run(_post_status(port, context))

        assert post(pki) == 400  # through: {} is no AdmissionReview
        for who in (None, stranger):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                post(who)
    finally:
        child.stop()


async def _post_status(port: int, context: ssl.SSLContext) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(_head(2) + b"{}")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            raise ConnectionResetError("closed without an answer")
        return int(line.split()[1])
    finally:
        writer.close()


def test_the_operator_restarts_its_webhook_process(operator: Threaded, webhook: int) -> None:
    supervisor = operator.process.webhook  # type: ignore[attr-defined]
    child = supervisor.child
    assert child is not None and supervisor.ready
    starts = supervisor.starts
    # It yields first: the lowest CPU priority, the first to go when memory runs short.
    proc = Path(f"/proc/{child.pid}")
    assert (proc / "oom_score_adj").read_text().strip() == "1000"
    assert int((proc / "stat").read_text().rsplit(")", 1)[1].split()[16]) == 19  # nice
    os.kill(child.pid, 9)
    wait_for(lambda: supervisor.starts > starts and supervisor.ready, timeout=30,
             what="a new webhook process")  # fmt: skip
    assert _status(webhook, _head(2), b"{}") == 400  # it serves again
