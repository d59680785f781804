"""Bots, bindings and leases end to end on the real API server, with the Conduit test
server standing in for Phabricator and the operator running in a background thread."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh import credentials, resources
from phabmesh.issuer.process import OperatorProcess
from phabmesh.settings import Settings
from phabmesh.testing import ConduitServer
from tests.kube import Cluster, wait_for
from tests.stack import Threaded

G, V = resources.GROUP, resources.VERSION
SYSTEM = "phabmesh-system"


@pytest.fixture(scope="module")
def conduit() -> Iterator[ConduitServer]:
    server = ConduitServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def system(cluster: Cluster, crds: object) -> str:
    try:
        cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    return SYSTEM


@pytest.fixture(scope="module")
def operator(cluster: Cluster, system: str, conduit: ConduitServer) -> Iterator[Threaded]:
    settings = Settings(
        namespace=system,
        phabricator_url=conduit.url,
        bot_recheck_interval=2.0,
        issuer_host="127.0.0.1",
        issuer_port=0,
        metrics_port=0,
        conduit_timeout=2.0,
        conduit_attempts=1,
    )
    proc = Threaded(OperatorProcess(settings, kubeconfig=str(cluster.kubeconfig))).start()
    wait_for(proc.process.ready, timeout=60, what="the operator to be ready")  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def make_bot(cluster: Cluster, conduit: ConduitServer, username: str, *, bot: bool = True) -> str:
    """A Phabricator account, its token in a Secret, and a PhabricatorBot for it."""
    conduit.add_user(username, bot=bot)
    token = conduit.add_token(username)
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
    return token


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
    node: str | None = "node-a",
    labels: dict[str, str] | None = None,
) -> client.V1Pod:
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
                name="linkerd-proxy", image="cr.l5d.io/linkerd/proxy:edge", restart_policy="Always"
            )
        ]
        if meshed
        else None
    )
    pod = cluster.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=name, labels=labels or {"app": "runner"}),
            spec=client.V1PodSpec(
                service_account_name=sa, node_name=node, containers=containers, init_containers=init
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
    port = operator.process.issuer_port  # type: ignore[attr-defined]
    return requests.post(
        f"http://127.0.0.1:{port}/v1/credentials",
        headers={"Authorization": f"Bearer {token}"},
        params=params,
        timeout=10,
    )


# -- bots and bindings ------------------------------------------------------------------------


def test_bot_and_binding_become_ready_and_follow_phabricator(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    make_bot(cluster, conduit, "ready-bot")
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", "ready-bot")
    ready = wait_for(lambda: (c := bot_ready(cluster, "ready-bot")) and c["status"] == "True" and c)
    assert ready["reason"] == "Verified"
    bot = cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, "ready-bot")
    assert bot["status"]["phid"].startswith("PHID-USER-")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )

    conduit.disable_user("ready-bot")
    disabled = wait_for(
        lambda: (c := bot_ready(cluster, "ready-bot")) and c["reason"] == "Disabled" and c
    )
    assert disabled["status"] == "False"
    binding = wait_for(
        lambda: (
            (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "False" and c
        )
    )
    assert binding["reason"] == "BotNotReady"

    conduit.enable_user("ready-bot")
    wait_for(lambda: (c := bot_ready(cluster, "ready-bot")) and c["status"] == "True")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    assert bot_ready(cluster, "ready-bot")["lastTransitionTime"] != disabled["lastTransitionTime"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing-secret", "SecretMissing"),
        ("wrong-token", "TokenInvalid"),
        ("human", "NotABot"),
    ],
)
def test_each_bot_failure_has_its_reason(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, case: str, reason: str
) -> None:
    name = f"{case}-bot"
    make_bot(cluster, conduit, name, bot=case != "human")
    if case == "missing-secret":
        cluster.core.delete_namespaced_secret(f"{name}-token", SYSTEM)
    if case == "wrong-token":
        cluster.core.patch_namespaced_secret(
            f"{name}-token",
            SYSTEM,
            {"data": {"token": base64.b64encode(b"api-aaaaaaaaaaaaaaaaaaaaaaaaaaaa").decode()}},
        )
    found = wait_for(lambda: (c := bot_ready(cluster, name)) and c["reason"] == reason and c)
    assert found["status"] == "False"
    assert found["message"]


def test_namespace_outside_the_selector_is_refused(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    make_bot(cluster, conduit, "picky-bot")
    make_binding(cluster, namespace, "outsider", "picky-bot")  # namespace not labelled
    found = wait_for(
        lambda: (
            (c := binding_condition(cluster, namespace, "outsider"))
            and c["reason"] == "NamespaceNotAllowed"
            and c
        )
    )
    assert found["status"] == "False"
    pod = make_pod(cluster, namespace, "runner-1")
    response = exchange(operator, pod_token(cluster, namespace, pod))
    assert response.status_code == 403
    assert leases(cluster, namespace) == []


# -- leases -----------------------------------------------------------------------------------


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    """A namespace with a Ready binding `runners` of a Ready bot."""
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot, credentialTTL="2m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    return namespace


def test_running_meshed_pod_gets_a_lease_and_a_credential(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    lease = wait_for(lambda: active_leases(cluster, bound))[0]
    owner = lease["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", "runner-1", pod.metadata.uid)
    identity = f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    assert lease["spec"]["identity"] == identity
    assert lease["spec"]["bot"] == f"bot-{bound}"

    response = exchange(operator, pod_token(cluster, bound, pod))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["identity"] == identity
    port = operator.process.issuer_port  # type: ignore[attr-defined]
    jwks = requests.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=5).json()
    claims = credentials.verify_with_jwks(
        body["credential"],
        jwks,
        audience="phabmesh-gateway",
        issuer="https://phabmesh-issuer.phabmesh-system.svc",
    )
    assert claims.subject == identity
    assert claims.pod_uid == pod.metadata.uid
    assert claims.expires_at <= credentials_time(lease["status"]["expiresAt"])

    # An unmeshed pod gets nothing, and the binding says so.
    make_pod(cluster, bound, "plain", meshed=False)
    status = wait_for(
        lambda: (
            (
                s := cluster.custom.get_namespaced_custom_object(
                    G, V, bound, resources.BINDING_PLURAL, "runners"
                )["status"]
            ).get("unmeshedPods")
            == 1
            and s
        )
    )
    assert status["matchedPods"] == 1
    assert status["activeCredentials"] == 1


def credentials_time(text: str) -> Any:
    import datetime

    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_tokens_cannot_cross_pods_or_audiences(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod_a = make_pod(cluster, bound, "runner-a")
    make_pod(cluster, bound, "runner-b")
    wait_for(lambda: len(active_leases(cluster, bound)) == 2)
    a = exchange(operator, pod_token(cluster, bound, pod_a)).json()
    assert a["credential"]
    lease_names = [item["metadata"]["name"] for item in active_leases(cluster, bound)]
    assert any(name.startswith("runner-a.") for name in lease_names)
    # Pod A's token only ever yields pod A's credential.
    claims = credentials.unverified_claims(a["credential"])
    assert claims["pod"] == "runner-a"

    wrong = exchange(operator, pod_token(cluster, bound, pod_a, audience="someone-else"))
    assert wrong.status_code == 401
    assert exchange(operator, "not-a-token").status_code == 401
    # A deleted pod's token: refused at once (its lease is gone) even while the API
    # server may still accept the token itself for a while.
    token_a = pod_token(cluster, bound, pod_a)
    cluster.core.delete_namespaced_pod("runner-a", bound, grace_period_seconds=0)
    refused = wait_for(
        lambda: (r := exchange(operator, token_a)).status_code in (401, 403) and r.json()
    )
    assert refused["error"] in ("no_lease", "invalid_token")


@pytest.mark.parametrize("node", ["node-a", None])
def test_scale_down_revokes(
    cluster: Cluster, operator: Threaded, bound: str, node: str | None
) -> None:
    make_pod(cluster, bound, "runner-1", node=node)
    wait_for(lambda: active_leases(cluster, bound))
    cluster.core.delete_namespaced_pod("runner-1", bound)
    # With a node the pod lingers as Terminating; its lease goes at once all the same.
    wait_for(lambda: leases(cluster, bound) == [], what="the lease to be revoked and deleted")
    # The pod's Events tell the story (posted just after each write).
    wait_for(
        lambda: (
            {"CredentialIssued", "CredentialRevoked"}
            <= {e.reason for e in cluster.core.list_namespaced_event(bound).items}
        ),
        what="CredentialIssued and CredentialRevoked Events",
    )


def test_binding_deleted_or_bot_lost_revokes(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, bound: str
) -> None:
    make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    conduit.disable_user(f"bot-{bound}")
    wait_for(lambda: leases(cluster, bound) == [], what="revocation on bot loss")
    conduit.enable_user(f"bot-{bound}")
    wait_for(lambda: active_leases(cluster, bound), what="re-issue once the bot is back")
    cluster.custom.delete_namespaced_custom_object(G, V, bound, resources.BINDING_PLURAL, "runners")
    wait_for(lambda: leases(cluster, bound) == [], what="revocation on binding deletion")
