"""manifests/lease-policy.yaml on the real API server: only phabmesh writes leases.

The policy is applied as ``kubectl kustomize manifests/`` renders it, for this module only
(the other tests' operator writes leases as the cluster's admin, which the policy refuses
like anyone else). Who is who is shown by impersonation: phabmesh's operator ServiceAccount,
a tenant whose Role grants ``*`` on ``*`` in its namespace, and the real garbage collector
and namespace controller of the local kube-controller-manager.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from phabmesh import resources
from phabmesh.dev.conduit import ConduitServer
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, G, V, active_leases, bind, make_pod
from tests.stack import Threaded

REPO = Path(__file__).resolve().parents[2]
OPERATOR = f"system:serviceaccount:{SYSTEM}:phabmesh-operator"
TENANT = "tenant-admin"
ADMIN = ""
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
REFUSAL = "written by phabmesh only"


def _apply(cluster: Cluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))


def _lease(namespace: str, name: str, owner: client.V1Pod | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": owner.metadata.name,
                "uid": owner.metadata.uid,
                "blockOwnerDeletion": False,
            }
        ]
    return {
        "apiVersion": f"{G}/{V}",
        "kind": resources.CREDENTIAL_KIND,
        "metadata": meta,
        "spec": {
            "podName": "p",
            "podUID": "u",
            "serviceAccount": "sa",
            "identity": f"sa.{namespace}.serviceaccount.identity.linkerd.cluster.local",
            "binding": "b",
            "bot": "any-bot",
        },
    }


def _as(cluster: Cluster, who: str, *args: str, body: dict[str, Any] | None = None) -> str:
    """kubectl as ``who`` (ADMIN: the cluster's admin): "" when it succeeded, else its
    error output."""
    result = cluster.kubectl(
        *([f"--as={who}"] if who != ADMIN else []),
        *args,
        check=False,
        input=json.dumps(body) if body is not None else None,
    )
    return "" if result.returncode == 0 else result.stderr


def _operator(cluster: Cluster) -> client.CustomObjectsApi:
    """The API as phabmesh's operator ServiceAccount (impersonated by the admin)."""
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    api.set_default_header("Impersonate-User", OPERATOR)
    return client.CustomObjectsApi(api)


def _refused_create(cluster: Cluster, who: str, body: dict[str, Any]) -> str | None:
    """The policy's refusal of ``who`` creating ``body``; None (and no object left behind)
    while the policy is not in force yet."""
    error = _as(cluster, who, "create", "-f", "-", body=body)
    if not error:
        # Gone again, as the operator (the policy may have come into force since the create,
        # and refuse anyone else the delete).
        meta = body["metadata"]
        _operator(cluster).delete_namespaced_custom_object(
            G, V, meta["namespace"], resources.CREDENTIAL_PLURAL, meta["name"]
        )
    return error if REFUSAL in error else None


@pytest.fixture(scope="module")
def policy(cluster: Cluster, crds: object, system: str) -> Iterator[None]:
    rendered = [
        d
        for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout)
        if d
    ]
    rbac = [
        d
        for d in rendered
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")
        and d["metadata"]["name"] == "phabmesh-operator"
    ]
    docs = [
        d
        for d in rendered
        if d["kind"] in POLICY_KINDS and d["metadata"]["name"] == "phabmesh-credential-writers"
    ]
    assert len(docs) == 2
    _apply(cluster, rbac + docs)
    yield
    cluster.kubectl(
        "delete",
        "--ignore-not-found",
        *(
            f"{d['kind'].lower()}.admissionregistration.k8s.io/{d['metadata']['name']}"
            for d in docs
        ),
    )
    # The API server drops the policy from its cache a moment after the delete: wait until
    # a lease write is no longer refused, so that no later test's operator meets it.
    probe = _lease(system, f"probe-{uuid.uuid4().hex[:8]}")
    wait_for(
        lambda: _refused_create(cluster, ADMIN, probe) is None,
        timeout=60,
        what="the policy to be out of force",
    )


@pytest.fixture
def tenant(cluster: Cluster, namespace: str) -> str:
    """``namespace`` with a Role granting ``*`` on ``*`` to user tenant-admin."""
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.create_namespaced_role(
        namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="everything"),
            rules=[client.V1PolicyRule(api_groups=["*"], resources=["*"], verbs=["*"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="everything"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="everything"
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="User", name=TENANT, api_group="rbac.authorization.k8s.io"
                )
            ],
        ),
    )
    return namespace


def _revocation(
    *,
    reason: str = resources.REVOKED_BY_ADMIN,
    message: str = resources.ADMIN_REVOCATION_MESSAGE,
    at: datetime.datetime | None = None,
) -> dict[str, Any]:
    """A merge patch revoking a lease (as ``kubectl phabmesh revoke`` does, by default)."""
    when = at or datetime.datetime.now(datetime.UTC)
    return {
        "status": {
            "phase": "Revoked",
            "reason": reason,
            "revokedAt": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "message": message,
        }
    }


def _exists(cluster: Cluster, namespace: str, name: str) -> bool:
    try:
        cluster.custom.get_namespaced_custom_object(
            G, V, namespace, resources.CREDENTIAL_PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_a_tenant_with_every_right_in_its_namespace_cannot_write_leases(
    cluster: Cluster, policy: None, tenant: str
) -> None:
    # RBAC alone would let the tenant: that is what the policy is for.
    can_i = cluster.kubectl(
        f"--as={TENANT}",
        "auth",
        "can-i",
        "create",
        "phabricatorcredentials",
        "-n",
        tenant,
        check=False,
    )
    assert can_i.stdout.strip() == "yes"
    # The policy takes a moment to be compiled and served.
    refusal = wait_for(
        lambda: _refused_create(cluster, TENANT, _lease(tenant, "forged")),
        what="the policy to refuse the tenant",
    )
    assert REFUSAL in refusal and TENANT in refusal and "create" in refusal, refusal
    assert not _exists(cluster, tenant, "forged")

    # phabmesh's operator may (with exactly the calls it makes), and the tenant may not
    # touch what it wrote.
    operator = _operator(cluster)
    operator.create_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, _lease(tenant, "real")
    )
    status = {"status": {"phase": "Active", "expiresAt": "2099-01-01T00:00:00Z"}}
    patch = ("patch", "phabricatorcredential", "real", "-n", tenant, "--type=merge")
    refused = _as(cluster, TENANT, *patch, "-p", json.dumps(status))
    assert REFUSAL in refused, refused
    assert REFUSAL in _as(cluster, TENANT, *patch, "-p", '{"metadata":{"labels":{"x":"y"}}}')
    assert REFUSAL in _as(cluster, TENANT, "delete", "phabricatorcredential", "real", "-n", tenant)
    operator.patch_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "real", status
    )
    operator.delete_namespaced_custom_object(G, V, tenant, resources.CREDENTIAL_PLURAL, "real")
    assert not _exists(cluster, tenant, "real")


def test_the_garbage_collector_and_the_namespace_controller_still_clean_up(
    cluster: Cluster, policy: None, namespace: str
) -> None:
    wait_for(
        lambda: _refused_create(cluster, ADMIN, _lease(namespace, "x")),
        what="the policy to be in force (even the cluster's admin is refused)",
    )
    # A lease owned by a pod goes with the pod (deleted by the garbage collector).
    pod = cluster.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="owner"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="i")]),
        ),
    )
    operator = _operator(cluster)
    operator.create_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL, _lease(namespace, "owned", pod)
    )
    cluster.core.delete_namespaced_pod("owner", namespace, grace_period_seconds=0)
    wait_for(lambda: not _exists(cluster, namespace, "owned"), timeout=60, what="GC of the lease")

    # A namespace holding a lease is deleted whole (its leases by the namespace controller).
    doomed = f"t-{uuid.uuid4().hex[:10]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=doomed)))
    operator.create_namespaced_custom_object(
        G, V, doomed, resources.CREDENTIAL_PLURAL, _lease(doomed, "left")
    )
    cluster.core.delete_namespace(doomed)

    def gone() -> bool:
        try:
            cluster.core.read_namespace(doomed)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(gone, timeout=90, what="the namespace to be deleted with its lease")


def test_anyone_allowed_by_rbac_may_revoke_an_active_lease_and_nothing_else(
    cluster: Cluster, policy: None, tenant: str
) -> None:
    """`kubectl phabmesh revoke`'s one write: Active to Revoked, reason RevokedByAdmin."""
    wait_for(
        lambda: _refused_create(cluster, TENANT, _lease(tenant, "forged")),
        what="the policy to refuse the tenant",
    )
    operator = _operator(cluster)
    operator.create_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, _lease(tenant, "held")
    )
    active = {"status": {"phase": "Active", "expiresAt": "2099-01-01T00:00:00Z"}}
    operator.patch_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held", active
    )
    patch = ("patch", "phabricatorcredential", "held", "-n", tenant, "--type=merge")

    def revoked(reason: str) -> dict[str, Any]:
        return _revocation(reason=reason)

    # Another reason is the operator's to write.
    refused = _as(
        cluster,
        TENANT,
        *patch,
        "-p",
        json.dumps(revoked(resources.NO_LONGER_MATCHED)),
    )
    assert REFUSAL in refused, refused
    # Nor with anything else changed on the way (leases have no status subresource): labels,
    # owners, finalizers stay as phabmesh wrote them.
    for extra in (
        {"labels": {"x": "y"}},
        {"finalizers": ["example.com/keep"]},
        {"ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]},
        {"annotations": {"note": "revoked by someone else"}},
    ):
        both = {**revoked(resources.REVOKED_BY_ADMIN), "metadata": extra}
        assert REFUSAL in _as(cluster, TENANT, *patch, "-p", json.dumps(both)), extra
    # Nor another status field than the revocation's own.
    for field, value in (("expiresAt", "2098-01-01T00:00:00Z"), ("botPHID", "PHID-USER-x")):
        changed = revoked(resources.REVOKED_BY_ADMIN)
        changed["status"][field] = value
        assert REFUSAL in _as(cluster, TENANT, *patch, "-p", json.dumps(changed)), field
    assert not _as(
        cluster,
        TENANT,
        *patch,
        "-p",
        json.dumps(revoked(resources.REVOKED_BY_ADMIN)),
    )
    lease = cluster.custom.get_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held"
    )
    assert (lease["status"]["phase"], lease["status"]["reason"]) == (
        "Revoked",
        resources.REVOKED_BY_ADMIN,
    )
    # A revoked lease is no longer open to anyone but phabmesh: not even a second revocation,
    # nor its deletion.
    assert REFUSAL in _as(
        cluster,
        TENANT,
        *patch,
        "-p",
        json.dumps(revoked(resources.REVOKED_BY_ADMIN)),
    )
    assert REFUSAL in _as(cluster, TENANT, "delete", "phabricatorcredential", "held", "-n", tenant)
    operator.delete_namespaced_custom_object(G, V, tenant, resources.CREDENTIAL_PLURAL, "held")


def _policy_texts() -> dict[str, str]:
    return {
        path: (REPO / path).read_text()
        for path in ("manifests/lease-policy.yaml", "charts/phabmesh/templates/lease-policy.yaml")
    }


def test_the_policy_accepts_the_message_and_leeway_the_plugin_writes() -> None:
    """One message and one leeway in code (resources), which the plugin writes and both
    copies of the policy check."""
    message = resources.ADMIN_REVOCATION_MESSAGE
    leeway = resources.ADMIN_REVOCATION_LEEWAY
    for path, text in _policy_texts().items():
        assert f"object.status.message == '{message}'" in text, path
        durations = set(re.findall(r"duration\('(-?[0-9]+)s'\)", text))
        assert durations == {str(leeway), str(-leeway)}, (path, durations)
        assert f"{leeway} s (resources.ADMIN_REVOCATION_LEEWAY)" in text, path  # its comment
        assert f'"{message}", revokedAt the time of the' in text, path  # its refusal
        assert f"write within {leeway} s" in text, path


def _held(cluster: Cluster, namespace: str, name: str, pod: client.V1Pod | None = None) -> None:
    """An Active lease ``name`` (of ``pod`` when given), written as phabmesh's operator."""
    body = _lease(namespace, name)
    if pod is not None:
        body["spec"].update(podName=pod.metadata.name, podUID=pod.metadata.uid)
    operator = _operator(cluster)
    operator.create_namespaced_custom_object(G, V, namespace, resources.CREDENTIAL_PLURAL, body)
    active = {"status": {"phase": "Active", "expiresAt": "2099-01-01T00:00:00Z"}}
    operator.patch_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL, name, active
    )


def test_an_admin_revocation_takes_only_phabmeshs_message_and_the_time_of_the_write(
    cluster: Cluster, policy: None, tenant: str
) -> None:
    """A review stored terminal escape codes and a false "revoked by cluster-admin" in
    status.message, and a revokedAt in the past, with the one write a tenant may make."""
    wait_for(
        lambda: _refused_create(cluster, TENANT, _lease(tenant, "forged")),
        what="the policy to refuse the tenant",
    )
    _held(cluster, tenant, "held")
    patch = ("patch", "phabricatorcredential", "held", "-n", tenant, "--type=merge")
    now = datetime.datetime.now(datetime.UTC)
    lies = {
        "escape codes": _revocation(message="\x1b[2J\x1b[1;31mrevoked by cluster-admin\x1b[0m"),
        "another author": _revocation(message="revoked by cluster-admin"),
        "no message": {"status": {**_revocation()["status"], "message": None}},
        "the past": _revocation(at=now - datetime.timedelta(days=30)),
        "a minute ago": _revocation(at=now - datetime.timedelta(minutes=1)),
        "the future": _revocation(at=now + datetime.timedelta(hours=1)),
    }
    for lie, body in lies.items():
        refused = _as(cluster, TENANT, *patch, "-p", json.dumps(body))
        assert REFUSAL in refused, (lie, refused)
        assert resources.ADMIN_REVOCATION_MESSAGE in refused  # what it takes instead
    # Nor with managedFields entries of its own making, stamped at the time it claims (or
    # with the record of the write reset).
    when = now - datetime.timedelta(days=30)

    def forged(manager: str, operation: str = "Update") -> dict[str, Any]:
        return {
            "manager": manager,
            "operation": operation,
            "apiVersion": f"{G}/{V}",
            "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:revokedAt": {}}},
        }

    lease = cluster.custom.get_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held"
    )
    stamps = lease["metadata"].get("managedFields") or []
    for managed in (
        [*stamps, forged("kubectl-phabmesh")],
        [*stamps, forged("kubectl-patch")],  # kubectl patch's own field manager
        [*stamps, forged("kubectl-patch", "Apply")],
        [{}],
    ):
        body = {**_revocation(at=when), "metadata": {"managedFields": managed}}
        refused = _as(cluster, TENANT, *patch, "-p", json.dumps(body))
        assert REFUSAL in refused, (managed, refused)
    lease = cluster.custom.get_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held"
    )
    assert lease["status"]["phase"] == "Active"
    # phabmesh's own message at the time of the write is taken.
    assert not _as(cluster, TENANT, *patch, "-p", json.dumps(_revocation()))
    lease = cluster.custom.get_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held"
    )
    assert lease["status"]["message"] == resources.ADMIN_REVOCATION_MESSAGE
    _operator(cluster).delete_namespaced_custom_object(
        G, V, tenant, resources.CREDENTIAL_PLURAL, "held"
    )


def test_kubectl_phabmesh_revoke_passes_the_policy(
    cluster: Cluster, policy: None, namespace: str, conduit: ConduitServer, operator: Threaded
) -> None:
    wait_for(
        lambda: _refused_create(cluster, ADMIN, _lease(namespace, "x")),
        what="the policy to be in force (even the cluster's admin is refused)",
    )
    # A lease the running operator issued and keeps (one written by hand for a pod no
    # binding names would be revoked by the operator first).
    bind(cluster, conduit, namespace)
    make_pod(cluster, namespace, "runner-1")
    (held,) = wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
    name = held["metadata"]["name"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "phabmesh.kubectl",
            "--kubeconfig",
            str(cluster.kubeconfig),
            "revoke",
            "pod/runner-1",
            "-n",
            namespace,
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [row["result"] for row in json.loads(done.stdout)] == ["revoked"]
    lease = cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL, name
    )
    status = lease["status"]
    assert (status["phase"], status["reason"], status["message"]) == (
        "Revoked",
        resources.REVOKED_BY_ADMIN,
        resources.ADMIN_REVOCATION_MESSAGE,
    )
    revoked_at = datetime.datetime.fromisoformat(status["revokedAt"].replace("Z", "+00:00"))
    stamps = [
        datetime.datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
        for e in lease["metadata"]["managedFields"]
    ]
    leeway = datetime.timedelta(seconds=resources.ADMIN_REVOCATION_LEEWAY)
    assert abs(revoked_at - max(stamps)) <= leeway
