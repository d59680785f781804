"""Pod injection through the real API server: manifests/webhook.yaml, pointed at the
running operator, mutates pods as they are created; phabmesh down never blocks a pod."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from phabmesh import admission
from phabmesh.admission import inject
from phabmesh.settings import Settings
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, exchange, make_pod, pod_token
from tests.stack import Threaded

WEBHOOK_YAML = Path(__file__).resolve().parents[2] / "manifests" / "webhook.yaml"
CONFIG = Settings().webhook_configuration


def _install(cluster: Cluster, url: str) -> None:
    # No caBundle: the operator sets it.
    config = admission.pointed_at(yaml.safe_load(WEBHOOK_YAML.read_text()), url)
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(config)
    )


def _config(cluster: Cluster) -> dict[str, Any]:
    out = cluster.kubectl("get", "mutatingwebhookconfiguration", CONFIG, "-o", "json").stdout
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture(scope="module")
def webhook(cluster: Cluster, operator: Threaded) -> Iterator[str]:
    url = f"https://127.0.0.1:{operator.process.webhook_port}/inject"  # type: ignore[attr-defined]
    _install(cluster, url)
    # What the operator's once-a-minute check does, now rather than within a minute.
    operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    yield url
    cluster.kubectl("delete", "mutatingwebhookconfiguration", CONFIG, "--ignore-not-found")


def _phabmesh_env(container: client.V1Container) -> dict[str, str]:
    return {e.name: e.value for e in container.env or [] if e.name.startswith("PHABMESH_")}


def _volume(pod: client.V1Pod) -> client.V1Volume | None:
    return next((v for v in pod.spec.volumes or [] if v.name == inject.VOLUME), None)


def _create(cluster: Cluster, namespace: str, name: str, **kw: Any) -> client.V1Pod:
    """make_pod's pod, as the API server stored it (after admission)."""
    make_pod(cluster, namespace, name, **kw)
    return cluster.core.read_namespaced_pod(name, namespace)


def test_operator_keeps_the_ca_bundle(cluster: Cluster, operator: Threaded, webhook: str) -> None:
    secret = cluster.core.read_namespaced_secret(Settings().webhook_secret, SYSTEM)
    (hook,) = _config(cluster)["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret.data["ca.crt"]
    # Re-applying the manifest (no caBundle in it) is repaired by the next check.
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", CONFIG, "--type=json",
        "-p", '[{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]',
    )  # fmt: skip
    assert "caBundle" not in _config(cluster)["webhooks"][0]["clientConfig"]
    changed = operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    assert changed is False  # same certificate: only the bundle was put back
    (hook,) = _config(cluster)["webhooks"]
    assert hook["clientConfig"]["caBundle"] == secret.data["ca.crt"]


def test_bound_pod_gets_the_token_volume_and_the_settings(
    cluster: Cluster, operator: Threaded, webhook: str, bound: str
) -> None:
    pod = _create(cluster, bound, "bound-pod")
    settings: Settings = operator.process.settings  # type: ignore[attr-defined]
    volume = _volume(pod)
    assert volume is not None
    (source,) = volume.projected.sources
    assert source.service_account_token.audience == settings.token_audience
    assert source.service_account_token.expiration_seconds == 600
    assert source.service_account_token.path == "token"
    (app,) = pod.spec.containers
    assert _phabmesh_env(app) == {
        "PHABMESH_CREDENTIAL_ENDPOINT": settings.injected_credential_endpoint,
        "PHABMESH_GATEWAY_URL": settings.injected_gateway_url,
        "PHABMESH_TOKEN_FILE": inject.TOKEN_FILE,
    }
    (mount,) = [m for m in app.volume_mounts if m.name == inject.VOLUME]
    assert (mount.mount_path, mount.read_only) == (inject.MOUNT_DIR, True)
    # Linkerd's proxy (here a native sidecar, as Linkerd injected it first) is untouched.
    (proxy,) = pod.spec.init_containers
    assert proxy.name == "linkerd-proxy"
    assert not proxy.env
    assert not any(m.name == inject.VOLUME for m in proxy.volume_mounts or [])
    # A token like the kubelet would write into that volume is exchanged for a credential.
    token = pod_token(cluster, bound, pod, audience=source.service_account_token.audience)
    wait_for(lambda: exchange(operator, token).status_code == 200, what="a credential")


def test_other_pods_are_left_exactly_as_they_were(
    cluster: Cluster, webhook: str, bound: str
) -> None:
    # Same namespace, a service account no binding names.
    stranger = _create(cluster, bound, "stranger", sa="stranger")
    # A bound service account, but the pod opted out.
    opted_out = _create(
        cluster, bound, "opted-out", labels={"app": "runner", inject.OPT_OUT_LABEL: "disabled"}
    )
    for pod in (stranger, opted_out):
        assert _volume(pod) is None
        assert all(not _phabmesh_env(c) for c in pod.spec.containers)
        assert all(
            m.mount_path != inject.MOUNT_DIR for c in pod.spec.containers for m in c.volume_mounts
        )


def test_values_the_pod_sets_are_kept_and_dry_runs_are_injected(
    cluster: Cluster, webhook: str, bound: str
) -> None:
    # The user's own value of one variable is kept; the webhook adds only what is missing.
    cluster.core.create_namespaced_service_account(
        bound, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="runner"))
    )
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "own-endpoint", "labels": {"app": "runner"}},
        "spec": {
            "serviceAccountName": "runner",
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "env": [{"name": "PHABMESH_CREDENTIAL_ENDPOINT", "value": "http://mine:1"}],
                }
            ],
        },
    }
    out = cluster.kubectl(
        "create", "-n", bound, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body)
    ).stdout
    created = json.loads(out)
    (app,) = created["spec"]["containers"]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["PHABMESH_CREDENTIAL_ENDPOINT"] == "http://mine:1"
    assert env["PHABMESH_TOKEN_FILE"] == inject.TOKEN_FILE
    assert [v["name"] for v in created["spec"]["volumes"]].count(inject.VOLUME) == 1


def test_phabmesh_down_never_blocks_pod_creation(
    cluster: Cluster, operator: Threaded, webhook: str, bound: str
) -> None:
    ca_bundle = _config(cluster)["webhooks"][0]["clientConfig"]["caBundle"]
    # Point the webhook at a port where nothing listens: phabmesh unreachable.
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", CONFIG, "--type=json", "-p",
        json.dumps([{"op": "replace", "path": "/webhooks/0/clientConfig/url",
                     "value": "https://127.0.0.1:9/inject"}]),
    )  # fmt: skip
    try:
        pod = _create(cluster, bound, "while-down")
        assert _volume(pod) is None  # admitted unchanged
    finally:
        cluster.kubectl(
            "patch", "mutatingwebhookconfiguration", CONFIG, "--type=json", "-p",
            json.dumps([{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": webhook},
                        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle",
                         "value": ca_bundle}]),
        )  # fmt: skip
    assert _volume(_create(cluster, bound, "after-down")) is not None


def test_serving_certificate_is_signed_by_the_bundle(cluster: Cluster, webhook: str) -> None:
    from cryptography import x509

    secret = cluster.core.read_namespaced_secret(Settings().webhook_secret, SYSTEM)
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret.data["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "phabmesh-webhook.phabmesh-system.svc" in names.get_values_for_type(x509.DNSName)
