"""Helpers for integration tests: a bot, a binding, pods, tokens, credential exchange."""

from __future__ import annotations

import base64
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh import resources
from phabmesh.dev.conduit import ConduitServer
from phabmesh.settings import Settings
from tests.kube import HAND_NODE, Cluster, hand_made, wait_for
from tests.stack import Threaded

G, V = resources.GROUP, resources.VERSION
SYSTEM = "phabmesh-system"


def settings_for(conduit: ConduitServer) -> Settings:
    return Settings.local(
        conduit.url,
        namespace=SYSTEM,
        bot_recheck_interval=2.0,
        conduit_timeout=2.0,
        conduit_attempts=1,
        # A webhook's target is a server on loopback whose port the webhook names.
        hooks_target_url="http://127.0.0.1:{port}",
    )


def make_bot(cluster: Cluster, conduit: ConduitServer, username: str, *, bot: bool = True) -> str:
    """A Phabricator account, its token in a Secret, and a PhabricatorBot for it."""
    conduit.add_user(username, bot=bot)
    token = conduit.add_token(username)
    register_bot(cluster, username, token)
    return token


def register_bot(cluster: Cluster, username: str, token: str) -> None:
    """The token of an existing Phabricator account in a Secret, and a PhabricatorBot for it."""
    cluster.core.create_namespaced_secret(
        SYSTEM,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=f"{username}-token"),
            data={"token": base64.b64encode(token.encode()).decode()},
        ),
    )
    cluster.custom.create_cluster_custom_object(
        G,
        V,
        resources.BOT_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.BOT_KIND,
            "metadata": {"name": username},
            "spec": {
                "username": username,
                "tokenSecretRef": {"name": f"{username}-token"},
                "namespaceSelector": {"matchLabels": {"phabmesh.io/bots": "allowed"}},
            },
        },
    )


def label_namespace(cluster: Cluster, namespace: str) -> None:
    cluster.core.patch_namespace(
        namespace, {"metadata": {"labels": {"phabmesh.io/bots": "allowed"}}}
    )


def make_binding(cluster: Cluster, namespace: str, name: str, bot: str, **spec: Any) -> None:
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": resources.BINDING_KIND,
        "metadata": {"name": name},
        "spec": {
            "botRef": {"name": bot},
            "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
            "allowedMethods": ["user.*", "conduit.ping"],
            **spec,
        },
    }
    cluster.custom.create_namespaced_custom_object(G, V, namespace, resources.BINDING_PLURAL, body)


def bind(
    cluster: Cluster,
    conduit: ConduitServer,
    namespace: str,
    *,
    bot: str | None = None,
    runner_account: bool = False,
    **spec: Any,
) -> str:
    """A Ready binding `runners` of a Ready bot (`bot-<namespace>` by default) in the namespace,
    labelled to use it; with ``runner_account``, the ServiceAccount `runner` as well (pods a
    workload controller makes need it to exist). The bot's name."""
    bot = bot or f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    if runner_account:
        cluster.core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="runner"))
        )
    make_binding(cluster, namespace, "runners", bot, **spec)
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True",
        what="the binding to be Ready",
    )
    return bot


def condition(obj: dict[str, Any], type_: str = "Ready") -> dict[str, Any] | None:
    return next(
        (c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None
    )


def bot_ready(cluster: Cluster, name: str) -> dict[str, Any] | None:
    bot = cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, name)
    return condition(bot)


def binding_condition(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    obj = cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, name
    )
    return condition(obj)


def make_pod(
    cluster: Cluster,
    namespace: str,
    name: str,
    *,
    sa: str = "runner",
    meshed: bool = True,
    node: str | None = HAND_NODE,
    labels: dict[str, str] | None = None,
    proxy_env: dict[str, str] | None = None,
) -> client.V1Pod:
    """A hand-made meshed pod (see tests.kube.hand_made), its status patched Running."""
    try:
        cluster.core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
    containers = [client.V1Container(name="app", image="registry.invalid/app:1")]
    init = (
        [
            client.V1Container(
                name="linkerd-proxy",
                image="cr.l5d.io/linkerd/proxy:edge",
                restart_policy="Always",
                env=[client.V1EnvVar(name=k, value=v) for k, v in (proxy_env or {}).items()]
                or None,
            )
        ]
        if meshed
        else None
    )
    pod = cluster.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": "runner"}),
            spec=hand_made(
                client.V1PodSpec(
                    service_account_name=sa,
                    node_name=node,
                    containers=containers,
                    init_containers=init,
                )
            ),
        ),
    )
    cluster.core.patch_namespaced_pod_status(
        name,
        namespace,
        {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
    )
    return pod


def leases(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return cluster.custom.list_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL
    )["items"]


def active_leases(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return [
        item
        for item in leases(cluster, namespace)
        if (item.get("status") or {}).get("phase") == "Active"
    ]


def pod_token(
    cluster: Cluster, namespace: str, pod: client.V1Pod, audience: str = "phabmesh.io"
) -> str:
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[audience],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    return cluster.core.create_namespaced_service_account_token(
        pod.spec.service_account_name, namespace, request
    ).status.token


def exchange(operator: Threaded, token: str, **params: str) -> requests.Response:
    port = operator.process.endpoint_port  # type: ignore[attr-defined]
    return requests.post(
        f"http://127.0.0.1:{port}/v1/credentials",
        headers={"Authorization": f"Bearer {token}"},
        params=params,
        timeout=10,
    )


def time_of(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def spawn_operator(
    cluster: Cluster, conduit: ConduitServer, log: Path, *args: str
) -> subprocess.Popen[bytes]:
    """``phabmesh operator`` as a real process (loopback listeners, JSON logs to ``log``)."""
    local = Settings.local_env(
        conduit.url, namespace=SYSTEM, log_json=True, log_level="INFO", peering_lifetime=10
    )
    env = dict(os.environ, KUBECONFIG=cluster.phabmesh_kubeconfig("operator"), **local)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "phabmesh.cli", "operator", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def whoami(gateway: Threaded, credential: str, timeout: float = 10) -> dict[str, Any]:
    """``user.whoami`` through ``gateway`` with ``credential``: Conduit's envelope."""
    port = gateway.process.port  # type: ignore[attr-defined]
    answer: dict[str, Any] = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami",
        data={"api.token": credential, "output": "json"},
        timeout=timeout,
    ).json()
    return answer
