"""``kubectl phabmesh`` as an admin runs it: the real command (``python -m phabmesh.kubectl``,
what the ``kubectl-phabmesh`` executable runs) with the cluster's admin kubeconfig, against
the session's control plane, operator and gateway."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh import admission, resources
from phabmesh.admission import certificates
from phabmesh.dev.conduit import ConduitServer
from phabmesh.dev.conduit.hooks import Hook
from phabmesh.settings import Settings
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    bind,
    binding_condition,
    exchange,
    label_namespace,
    leases,
    make_binding,
    make_bot,
    make_pod,
    pod_token,
)
from tests.stack import Threaded

pytestmark = pytest.mark.e2e

WEBHOOK_YAML = Path(__file__).resolve().parents[2] / "manifests" / "webhook.yaml"
CONFIGMAP = "phabmesh-config"


def plugin(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phabmesh.kubectl", "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )


def answer(cluster: Cluster, *args: str) -> Any:
    """The command's ``-o json`` answer; it must have succeeded."""
    done = plugin(cluster, *args, "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    """``namespace`` with a Ready binding `runners` (ServiceAccount runner) of bot `bot-<ns>`."""
    make_bot(cluster, conduit, f"bot-{namespace}")
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", f"bot-{namespace}", credentialTTL="2m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True",
        what="the binding to be Ready",
    )
    return namespace


def _pod_leases(cluster: Cluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    return [item for item in leases(cluster, namespace) if item["spec"]["podName"] == pod]


def _active(cluster: Cluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    return [
        item
        for item in _pod_leases(cluster, namespace, pod)
        if (item.get("status") or {}).get("phase") == "Active"
    ]


def test_why_a_bound_running_pod_holds_a_credential(cluster: Cluster, bound: str) -> None:
    make_pod(cluster, bound, "runner-1")
    wait_for(lambda: _active(cluster, bound, "runner-1"), what="the pod's lease")
    why = answer(cluster, "why", "runner-1", "-n", bound)
    assert (why["credential"], why["reason"]) == (True, "Matched")
    assert [(x["bot"], x["binding"]) for x in why["leases"]] == [(f"bot-{bound}", "runners")]
    assert why["identity"] == f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    table = plugin(cluster, "why", "runner-1", "-n", bound)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()
    assert header.split() == ["NAMESPACE", "POD", "CREDENTIAL", "REASON", "MESSAGE"]
    assert row.split()[:4] == [bound, "runner-1", "yes", "Matched"]


def test_why_pods_hold_none(cluster: Cluster, bound: str) -> None:
    make_pod(cluster, bound, "stranger", sa="other")
    make_pod(cluster, bound, "plain", meshed=False)
    make_pod(cluster, bound, "unselected", labels={"app": "web"})
    cluster.custom.patch_namespaced_custom_object(
        G,
        V,
        bound,
        resources.BINDING_PLURAL,
        "runners",
        {"spec": {"podSelector": {"matchLabels": {"app": "runner"}}}},
    )
    expected = {
        "stranger": "IdentityNotListed",
        "plain": resources.POD_NOT_MESHED,
        "unselected": "SelectorMismatch",
    }
    for pod, reason in expected.items():
        why = answer(cluster, "why", pod, "-n", bound)
        assert (why["credential"], why["reason"]) == (False, reason), why
    assert "other" in answer(cluster, "why", "stranger", "-n", bound)["message"]
    # A namespace without a binding.
    other = f"t-{uuid.uuid4().hex[:10]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        wait_for(
            lambda: any(
                sa.metadata.name == "default"
                for sa in cluster.core.list_namespaced_service_account(other).items
            ),
            what="ServiceAccount default",
        )
        make_pod(cluster, other, "runner-1")
        why = answer(cluster, "why", "runner-1", "-n", other)
        assert (why["credential"], why["reason"]) == (False, "NoBinding")
    finally:
        cluster.core.delete_collection_namespaced_pod(other, grace_period_seconds=0)
        cluster.core.delete_namespace(other)
    missing = plugin(cluster, "why", "no-such-pod", "-n", bound)
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_why_a_binding_of_a_bot_that_is_not_there(cluster: Cluster, bound: str) -> None:
    make_pod(cluster, bound, "runner-1")
    wait_for(lambda: _active(cluster, bound, "runner-1"), what="the pod's lease")
    cluster.custom.patch_namespaced_custom_object(
        G, V, bound, resources.BINDING_PLURAL, "runners", {"spec": {"botRef": {"name": "nobody"}}}
    )
    wait_for(lambda: not _active(cluster, bound, "runner-1"), what="the lease's revocation")
    why = wait_for(
        lambda: (
            (w := answer(cluster, "why", "runner-1", "-n", bound))["reason"] == "BotNotAllowed"
            and w
        ),
        what="the operator's verdict",
    )
    assert why["credential"] is False
    assert "nobody" in why["message"]


def test_who_can_act_as_a_bot(cluster: Cluster, bound: str) -> None:
    bot = f"bot-{bound}"
    for name in ("runner-1", "runner-2"):
        make_pod(cluster, bound, name)
    make_pod(cluster, bound, "stranger", sa="other")
    wait_for(lambda: len(active_leases(cluster, bound)) == 2, what="two leases")
    # A Herald webhook is about no bot: who-can lists no webhook for it.
    cluster.custom.create_namespaced_custom_object(
        G,
        V,
        bound,
        resources.WEBHOOK_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": "herald"},
            "spec": {
                "herald": {"secretRef": {"name": "herald-hmac"}},
                "target": {"service": "listener", "port": 8080},
            },
        },
    )
    found = answer(cluster, "who-can", bot)
    assert found["bot"] == bot
    assert found["webhooks"] == []
    # A Harbormaster build step webhook checks its targets as the bot: listed.
    cluster.custom.create_namespaced_custom_object(
        G,
        V,
        bound,
        resources.WEBHOOK_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": "start-build"},
            "spec": {
                "harbormaster": {
                    "botRef": {"name": bot},
                    "credentialSecretRef": {"name": "start-build-credential"},
                },
                "target": {"service": "job-starter", "port": 8080},
            },
        },
    )
    found = answer(cluster, "who-can", bot)
    assert [(w["namespace"], w["webhook"]) for w in found["webhooks"]] == [(bound, "start-build")]
    assert sorted((h["namespace"], h["pod"]) for h in found["holders"]) == [
        (bound, "runner-1"),
        (bound, "runner-2"),
    ]
    assert {h["identity"] for h in found["holders"]} == {
        f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    }
    as_yaml = plugin(cluster, "who-can", bot, "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == found
    table = plugin(cluster, "who-can", bot).stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "POD", "IDENTITY", "BINDING", "EXPIRES", "CREDENTIAL"]
    assert len(table) == 3 + 3  # a blank line, then the webhooks' table: header and one
    assert table[-1].split()[:2] == [bound, "start-build"]
    cluster.core.delete_namespaced_pod("runner-2", bound, grace_period_seconds=0)
    wait_for(
        lambda: [h["pod"] for h in answer(cluster, "who-can", bot)["holders"]] == ["runner-1"],
        what="runner-2 to hold nothing",
    )
    unknown = plugin(cluster, "who-can", "no-such-bot")
    assert unknown.returncode == 1 and "not found" in unknown.stderr


def _gateway_call(gateway: Threaded, credential: str) -> dict[str, Any]:
    port = gateway.process.port  # type: ignore[attr-defined]
    response = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami",
        data={"api.token": credential, "output": "json"},
        timeout=10,
    )
    result: dict[str, Any] = response.json()
    return result


def test_revoke_a_pod_the_gateway_refuses_it_and_nothing_is_reissued(
    cluster: Cluster, operator: Threaded, gateway: Threaded, bound: str
) -> None:
    created = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: _active(cluster, bound, "runner-1"), what="the pod's lease")
    issued = exchange(operator, pod_token(cluster, bound, created))
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    wait_for(
        lambda: _gateway_call(gateway, credential)["error_code"] is None,
        what="the gateway to accept the credential",
    )

    done = plugin(cluster, "revoke", "pod/runner-1", "-n", bound, "-o", "json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert (row["pod"], row["result"]) == ("runner-1", "revoked")
    # The audit line: one JSON line on stderr, and never the credential.
    audit = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [a["event"] for a in audit] == ["lease_revoked"]
    assert (audit[0]["pod"], audit[0]["reason"]) == ("runner-1", resources.REVOKED_BY_ADMIN)
    assert credential not in done.stderr and credential not in done.stdout

    (lease,) = _pod_leases(cluster, bound, "runner-1")
    assert (lease["status"]["phase"], lease["status"]["reason"]) == (
        "Revoked",
        resources.REVOKED_BY_ADMIN,
    )
    refused = wait_for(
        lambda: (a := _gateway_call(gateway, credential))["error_code"] is not None and a,
        what="the gateway to refuse the credential",
    )
    assert refused["result"] is None
    assert refused["error_info"] == "credential revoked: revoked by an administrator"
    token = pod_token(cluster, bound, created)
    wait_for(
        lambda: (
            (r := exchange(operator, token)).status_code == 403
            and "administrator revoked" in r.text
        ),
        what="the credential endpoint to say why",
    )
    events = cluster.core.list_namespaced_event(
        bound, field_selector="involvedObject.name=runner-1,reason=CredentialRevoked"
    ).items
    assert any("kubectl phabmesh revoke" in (e.message or "") for e in events)

    # The pod still matches: a pod event makes the operator reconcile it, and it issues
    # nothing, while a new pod of the same binding gets its lease.
    cluster.core.patch_namespaced_pod("runner-1", bound, {"metadata": {"labels": {"poke": "1"}}})
    make_pod(cluster, bound, "runner-2")
    wait_for(lambda: _active(cluster, bound, "runner-2"), what="the new pod's lease")
    assert [x["status"]["phase"] for x in _pod_leases(cluster, bound, "runner-1")] == ["Revoked"]
    why = answer(cluster, "why", "runner-1", "-n", bound)
    assert (why["credential"], why["reason"]) == (False, resources.REVOKED_BY_ADMIN)
    # Nothing left to revoke.
    twice = plugin(cluster, "revoke", "pod", "runner-1", "-n", bound)
    assert twice.returncode == 1 and "no Active credential" in twice.stderr


def test_revoke_a_binding(cluster: Cluster, bound: str) -> None:
    for name in ("runner-1", "runner-2"):
        make_pod(cluster, bound, name)
    wait_for(lambda: len(active_leases(cluster, bound)) == 2, what="two leases")
    # Dry runs first: what would go, judged by the client alone or by the API server (RBAC
    # and the lease policy); nothing is revoked and no Event is posted.
    for mode in ("client", "server"):
        dry = plugin(cluster, "revoke", "binding/runners", "-n", bound, f"--dry-run={mode}",
                     "-o", "json")  # fmt: skip
        assert dry.returncode == 0, dry.stderr
        results = {row["result"] for row in json.loads(dry.stdout)}
        assert results == {
            f"would be revoked ({'dry run' if mode == 'client' else 'server dry run'})"
        }
        assert len(active_leases(cluster, bound)) == 2
    assert not cluster.core.list_namespaced_event(
        bound, field_selector="reason=CredentialRevoked"
    ).items
    done = plugin(cluster, "revoke", "binding/runners", "-n", bound)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split() == [
        "NAMESPACE",
        "CREDENTIAL",
        "POD",
        "BINDING",
        "BOT",
        "RESULT",
    ]
    assert not active_leases(cluster, bound)
    assert {x["status"]["reason"] for x in leases(cluster, bound)} == {resources.REVOKED_BY_ADMIN}
    events = cluster.core.list_namespaced_event(
        bound, field_selector="involvedObject.kind=PhabricatorBinding,reason=CredentialRevoked"
    ).items
    assert [e.involved_object.name for e in events] == ["runners"]
    assert plugin(cluster, "revoke", "binding/nothing", "-n", bound).returncode == 1
    assert plugin(cluster, "revoke", "runners", "-n", bound).returncode == 2


def test_recheck_a_bot(cluster: Cluster, bound: str) -> None:
    bot = f"bot-{bound}"
    done = plugin(cluster, "recheck", bot)
    assert done.returncode == 0, done.stderr
    body = cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, bot)
    stamp = body["metadata"]["annotations"][resources.RECHECK_ANNOTATION]
    assert stamp in done.stdout
    assert plugin(cluster, "recheck", "no-such-bot").returncode == 1


# -- check ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(cluster: Cluster, conduit: ConduitServer, operator: Threaded) -> Iterator[None]:
    """What an install has beyond the session's operator: the webhook configuration (its
    caBundle kept by the operator) and the ConfigMap naming Phabricator. Both put back as
    they were afterwards."""
    url = f"https://127.0.0.1:{operator.process.webhook_port}/inject"  # type: ignore[attr-defined]
    config = admission.pointed_at(yaml.safe_load(WEBHOOK_YAML.read_text()), url)
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(config)
    )
    operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    try:
        previous = cluster.core.read_namespaced_config_map(CONFIGMAP, SYSTEM)
    except ApiException as exc:
        if exc.status != 404:
            raise
        previous = None
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=CONFIGMAP),
        data={"PHABMESH_NAMESPACE": SYSTEM, "PHABMESH_PHABRICATOR_URL": conduit.url},
    )
    if previous is None:
        cluster.core.create_namespaced_config_map(SYSTEM, body)
    else:
        cluster.core.patch_namespaced_config_map(CONFIGMAP, SYSTEM, {"data": body.data})
    yield
    if previous is None:
        cluster.core.delete_namespaced_config_map(CONFIGMAP, SYSTEM)
    else:
        previous.metadata.resource_version = None  # it was patched meanwhile: put it back whole
        cluster.core.replace_namespaced_config_map(CONFIGMAP, SYSTEM, previous)
    cluster.kubectl(
        "delete", "mutatingwebhookconfiguration", Settings().webhook_configuration,
        "--ignore-not-found",
    )  # fmt: skip


def _checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    return {c["check"]: c for c in json.loads(done.stdout)["checks"]}


def test_check_on_a_healthy_install(
    cluster: Cluster, conduit: ConduitServer, gateway: Threaded, installed: None, namespace: str
) -> None:
    # A Ready binding whose pods the webhook injects, and a bot the operator has checked.
    bind(cluster, conduit, namespace, runner_account=True)
    done = plugin(cluster, "check", "-o", "json")
    checks = _checks(done)
    proven = ("config", "crds", "webhook", "injection", "rbac", "signing-keys")
    for name in (*proven, "phabricator (from here)", "phabricator (in-cluster)"):
        assert checks[name]["status"] == "OK", checks[name]
    # A dry run only: no pod was made.
    assert not cluster.core.list_namespaced_pod(namespace).items
    assert "phabricatorbots v1alpha1" in checks["crds"]["message"]
    # Linkerd is not installed here; if an earlier test left stand-ins of its CRDs, the
    # policy objects are looked for.
    assert checks["linkerd-policy"]["status"] in ("WARN", "FAIL")
    failed = any(c["status"] == "FAIL" for c in checks.values())
    assert done.returncode == (1 if failed else 0), done.stdout
    table = plugin(cluster, "check")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "MESSAGE"]
    assert any(line.split()[:2] == ["signing-keys", "OK"] for line in lines)


def test_check_fails_on_a_broken_install(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, installed: None, namespace: str
) -> None:
    bind(cluster, conduit, namespace, runner_account=True)
    name = Settings().webhook_configuration
    stranger = base64.b64encode(certificates.issue(["elsewhere.example"]).ca_cert).decode()
    cluster.kubectl(
        "patch", "mutatingwebhookconfiguration", name, "--type=json", "-p",
        json.dumps([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
                     "value": stranger}]),
    )  # fmt: skip
    try:
        done = plugin(cluster, "check", "-o", "json")
        assert done.returncode == 1
        webhook = _checks(done)["webhook"]
        assert webhook["status"] == "FAIL" and "caBundle" in webhook["message"], webhook
        assert "(see docs/troubleshooting.md#" in webhook["message"]
        # The API server cannot call a webhook it does not trust: no pod is injected, and
        # the dry run shows it.
        injected = _checks(done)["injection"]
        assert injected["status"] == "FAIL" and "NOT injected" in injected["message"], injected
    finally:
        operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    assert _checks(plugin(cluster, "check", "-o", "json"))["webhook"]["status"] == "OK"

    # phabmesh "installed" in a namespace that holds nothing of it: no keys, no grants.
    elsewhere = plugin(cluster, "check", "--phabmesh-namespace", namespace, "-o", "json")
    assert elsewhere.returncode == 1
    checks = _checks(elsewhere)
    assert checks["signing-keys"]["status"] == "FAIL"
    assert checks["rbac"]["status"] == "FAIL"
    assert "phabmesh-operator may not" in checks["rbac"]["message"]
    assert checks["config"]["status"] == "WARN"


def test_check_pre_says_whether_phabmesh_can_be_installed_and_by_whom(
    cluster: Cluster, crds: object, namespace: str
) -> None:
    done = plugin(cluster, "check", "--pre", "-o", "json")
    pre = _checks(done)
    assert pre["kubernetes"]["status"] == "OK" and "1.3" in pre["kubernetes"]["message"]
    assert pre["permissions"]["status"] == "OK", pre["permissions"]  # the cluster's admin
    # phabmesh is installed here already: an upgrade, said so.
    assert pre["existing"]["status"] == "WARN" and "already" in pre["existing"]["message"]
    assert pre["linkerd"]["status"] in ("OK", "WARN")
    assert done.returncode == 0, done.stdout
    # A user who may not create what the install creates: a FAIL naming what.
    cluster.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="someone"))
    )
    someone = str(cluster.plane.service_account_kubeconfig(namespace, "someone"))
    refused = subprocess.run(
        [sys.executable, "-m", "phabmesh.kubectl", "--kubeconfig", someone, "check", "--pre",
         "-o", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    permissions = _checks(refused)["permissions"]
    assert permissions["status"] == "FAIL", permissions
    assert "customresourcedefinitions" in permissions["message"]
    assert "(see docs/install.md#" in permissions["message"]
    assert refused.returncode == 1


# -- check: PhabricatorWebhooks ---------------------------------------------------------------

HOOK_KEY = "Zq3v9Lk2Pw8Tn5Rb7Yx1Hc4Jm6Gd0Fs2"  # an HMAC key as Phorge makes them


def _hook_objects(cluster: Cluster, namespace: str, port: int) -> None:
    """Webhook `ci` with its key Secret `ci-hmac` and its target Service `ci-listener`, and a
    Role of the namespace that grants the Secret to the operator only (the gateway left out of
    the RoleBinding, the mistake the check is there to catch)."""
    cluster.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="ci-hmac"),
            data={"hmacKey": base64.b64encode(HOOK_KEY.encode()).decode()},
        ),
    )
    cluster.core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="ci-listener"),
            spec=client.V1ServiceSpec(
                selector={"app": "ci-listener"}, ports=[client.V1ServicePort(port=port)]
            ),
        ),
    )
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "phabmesh-webhook-key"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["ci-hmac"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "phabmesh-webhook-key"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "phabmesh-webhook-key",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "phabmesh-operator", "namespace": SYSTEM}
            ],
        },
    )
    cluster.custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        resources.WEBHOOK_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": "ci"},
            "spec": {
                "herald": {"secretRef": {"name": "ci-hmac"}},
                "target": {"service": "ci-listener", "port": port},
            },
        },
    )


def _endpoint(cluster: Cluster, namespace: str, port: int) -> None:
    """A ready endpoint for Service ci-listener (an EndpointSlice as a listener pod's would be;
    no node runs pods here)."""
    client.DiscoveryV1Api(cluster.api).create_namespaced_endpoint_slice(
        namespace,
        {
            "metadata": {
                "name": "ci-listener-hand",
                "labels": {
                    "kubernetes.io/service-name": "ci-listener",
                    "endpointslice.kubernetes.io/managed-by": "tests.phabmesh.io",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": True}}],
            "ports": [{"name": "", "port": port, "protocol": "TCP"}],
        },
    )


def _viewer(cluster: Cluster, namespace: str) -> str:
    """The kubeconfig of ServiceAccount `viewer` of ``namespace``: it may read what the
    webhook line reads (and phabmesh's ConfigMap), and create no SubjectAccessReview."""
    cluster.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="viewer"))
    )
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.create_cluster_role(
        {
            "metadata": {"name": f"viewer-{namespace}"},
            "rules": [
                {"apiGroups": [G], "resources": ["phabricatorwebhooks"], "verbs": ["list"]},
                {"apiGroups": [""], "resources": ["services", "configmaps"], "verbs": ["get"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                 "verbs": ["list"]},
            ],
        }
    )  # fmt: skip
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": f"viewer-{namespace}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"viewer-{namespace}",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": namespace}],
        }
    )
    return str(cluster.plane.service_account_kubeconfig(namespace, "viewer"))


def _hooks_line(cluster: Cluster) -> dict[str, str]:
    return _checks(plugin(cluster, "check", "-o", "json"))["phabricatorwebhooks"]


def test_check_fails_a_ready_webhook_whose_key_the_gateway_may_not_read(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, namespace: str
) -> None:
    port = 18080
    _hook_objects(cluster, namespace, port)
    _endpoint(cluster, namespace, port)
    wait_for(
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (
                cluster.custom.get_namespaced_custom_object(
                    G, V, namespace, resources.WEBHOOK_PLURAL, "ci"
                ).get("status")
                or {}
            ).get("conditions")
            or []
        ),
        timeout=60,
        what="the webhook to be Ready (the operator may read its Secret)",
    )
    # Ready, yet the gateway cannot read the key: Phorge's deliveries are refused.
    gateway_port = gateway.process.port  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{gateway_port}/hooks/{namespace}/ci"
    refused = wait_for(
        lambda: (d := conduit.call_hook(Hook(url, HOOK_KEY), "PHID-USER-x")).status == 503 and d,
        timeout=30,
        what="the gateway to refuse the delivery for want of the key",
    )
    assert refused.text.strip() == (
        f"phabmesh: the HMAC key of PhabricatorWebhook {namespace}/ci is not available"
    )

    line = _hooks_line(cluster)
    assert line["status"] == "FAIL", line
    assert (
        f"{namespace}/ci is Ready but {SYSTEM}/phabmesh-gateway may not list or watch Secret "
        "ci-hmac"
    ) in line["message"], line
    assert (
        f"fix: in {namespace}, a Role granting get, list, watch on Secret ci-hmac bound to "
        f"ServiceAccount {SYSTEM}/phabmesh-gateway"
    ) in line["message"], line
    assert line["message"].endswith("(see docs/webhooks.md#troubleshooting)")
    table = plugin(cluster, "check")
    assert table.returncode == 1
    assert any(
        row.split()[:2] == ["phabricatorwebhooks", "FAIL"] for row in table.stdout.splitlines()
    )

    # Someone who may read the webhooks, Services and EndpointSlices but may not ask what
    # others may: the line says the gateway's access was not asked, and guesses nothing.
    viewer = _viewer(cluster, namespace)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "phabmesh.kubectl", "--kubeconfig", viewer, "check",
             "-o", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        line = _checks(done)["phabricatorwebhooks"]
        assert line["status"] == "WARN", line
        assert (
            f"whether {SYSTEM}/phabmesh-gateway may read their keys was not asked: your user "
            "may not create subjectaccessreviews"
        ) in line["message"], line
        assert "is Ready but" not in line["message"], line
    finally:
        rbac = client.RbacAuthorizationV1Api(cluster.api)
        rbac.delete_cluster_role_binding(f"viewer-{namespace}")
        rbac.delete_cluster_role(f"viewer-{namespace}")

    # The namespace grants it to the gateway too: the line no longer names this webhook.
    client.RbacAuthorizationV1Api(cluster.api).patch_namespaced_role_binding(
        "phabmesh-webhook-key",
        namespace,
        [
            {
                "op": "add",
                "path": "/subjects/-",
                "value": {
                    "kind": "ServiceAccount",
                    "name": "phabmesh-gateway",
                    "namespace": SYSTEM,
                },
            }
        ],
    )
    state = gateway.process.state  # type: ignore[attr-defined]
    wait_for(
        lambda: (
            (hook := state.webhook(namespace, "ci")) is not None
            and state.hook_key(hook) is not None
        ),
        timeout=60,
        what="the gateway to read the key once granted",
    )
    line = _hooks_line(cluster)
    assert namespace not in line["message"], line
    others = [
        h
        for h in cluster.custom.list_cluster_custom_object(G, V, resources.WEBHOOK_PLURAL)["items"]
        if h["metadata"]["namespace"] != namespace
    ]
    if not others:  # no other test's webhook left in the cluster: the line is exactly OK
        assert line["status"] == "OK", line
        assert line["message"].startswith(f"1 Ready; {SYSTEM}/phabmesh-gateway may read every key")

    # No listener pod ready: a WARN that deliveries would get 502.
    client.DiscoveryV1Api(cluster.api).delete_namespaced_endpoint_slice(
        "ci-listener-hand", namespace
    )
    line = _hooks_line(cluster)
    assert line["status"] in ("WARN", "FAIL"), line
    assert f"{namespace}/ci: Service ci-listener has no ready endpoint" in line["message"], line
    assert "502" in line["message"]
