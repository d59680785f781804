"""manifests/ on a real API server: it renders, applies, and its RBAC is least privilege.

How each kind of object is checked:

- ServiceAccounts, RBAC, the ConfigMap, Services, PodDisruptionBudgets and kopf's peering
  CRD and object are really created, so that RBAC can be tested by impersonation.
- Deployments are applied with ``--dry-run=server``: fully validated and admitted, but no
  pods are created (this control plane has no scheduler or kubelet, and pending pods in
  phabmesh-system would only be noise for the other tests).
- Linkerd's policy objects: Linkerd's CRDs are not installed here, so the test installs
  stand-ins with the same group, versions, kinds and the fields these manifests use
  (required ones and enums as Linkerd's CRDs declare them). Applying with strict field
  validation then catches misspelt or missing fields; the references between the objects
  (policy → Server, policy → authentication, Server → a named container port of the pods
  it selects) are checked offline.
- The samples need phabmesh's own CRDs (``crds/``, through the ``crds`` fixture): the
  bot, the binding and the workload are validated with ``--dry-run=server``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh import apicalls
from phabmesh.dev import linkerd
from tests.kube import Cluster

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
SAMPLES = MANIFESTS / "samples"
SYSTEM = "phabmesh-system"
IMAGE = "ghcr.io/phabmesh/phabmesh:0.1.0"
LINKERD_GROUP = linkerd.LINKERD_GROUP
Doc = dict[str, Any]
# (namespace or None for cluster-wide, API group, resource[/subresource], verbs, name or None)
Calls = list[tuple[str | None, str, str, str, str | None]]

# Every API call each process makes (phabmesh.apicalls, which `kubectl phabmesh check` reads
# too). The tests check both directions: each call is allowed, and the rendered RBAC grants
# exactly these and nothing more.
ALL = apicalls.ALL
OPERATOR_CALLS: Calls = apicalls.OPERATOR_CALLS
GATEWAY_CALLS: Calls = apicalls.GATEWAY_CALLS
# Calls that must be refused, in the same form.
OPERATOR_DENIED: Calls = [
    ("kube-system", "", "secrets", "get list", None),
    ("ci", "", "secrets", "get list watch", None),
    (ALL, "", "secrets", "get list", None),
    (SYSTEM, "", "secrets", "update patch", "ci-bot-token"),
    (SYSTEM, "", "secrets", "delete patch", "phabmesh-signing-keys"),
    # Bot tokens are read from watches only; only its own two Secrets are read by name.
    (SYSTEM, "", "secrets", "get", "ci-bot-token"),
    # The gateway's Secret Role is the one RBAC object it writes, and only by update.
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "create delete patch", None),
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "update", "phabmesh-gateway"),
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "update", "phabmesh-operator"),
    (SYSTEM, "rbac.authorization.k8s.io", "rolebindings", "create update", None),
    ("ci", "", "pods", "create patch update delete", None),
    ("ci", "", "pods/eviction", "create", None),
    ("ci", "", "serviceaccounts/token", "create", None),
    ("ci", "phabmesh.io", "phabricatorbindings", "update create delete", None),
    ("ci", "phabmesh.io", "phabricatorcredentials", "update", None),
    ("ci", "phabmesh.io", "phabricatorcredentials/status", "patch update", None),
    ("ci", "phabmesh.io", "phabricatorbindings/status", "update", None),
    (ALL, "phabmesh.io", "phabricatorbots", "update create delete", None),
    (SYSTEM, "coordination.k8s.io", "leases", "get create update", None),
    (ALL, "apiextensions.k8s.io", "customresourcedefinitions", "get create patch", None),
    (ALL, "kopf.dev", "clusterkopfpeerings", "get create delete", None),
    (SYSTEM, "", "configmaps", "get", None),
    (ALL, "rbac.authorization.k8s.io", "clusterroles", "escalate bind", None),
    (ALL, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "list create", None),
    (ALL, "admissionregistration.k8s.io", "mutatingwebhookconfigurations", "update", "other"),
    (ALL, "admissionregistration.k8s.io", "validatingwebhookconfigurations", "get update", None),
    (ALL, "events.k8s.io", "events", "create", None),
    ("ci", "", "events", "patch", None),
]
GATEWAY_DENIED: Calls = [
    # The webhook CA's private key, and any Secret not named to it: a bot's token Secret is
    # readable only once the operator names it in Role phabmesh-gateway-secrets, which the
    # manifests ship empty.
    (SYSTEM, "", "secrets", "get list watch", "phabmesh-webhook-tls"),
    (SYSTEM, "", "secrets", "get list watch", None),
    (SYSTEM, "", "secrets", "get list watch", "ci-bot-token"),
    (SYSTEM, "", "secrets", "get", "phabmesh-signing-keys"),
    (SYSTEM, "rbac.authorization.k8s.io", "roles", "update patch", "phabmesh-gateway-secrets"),
    ("kube-system", "", "secrets", "get", None),
    ("ci", "", "secrets", "get list", None),
    (ALL, "", "secrets", "list", None),
    (SYSTEM, "", "secrets", "create", None),
    (SYSTEM, "", "secrets", "update patch", "phabmesh-signing-keys"),
    ("ci", "", "pods", "get create update patch delete", None),
    ("ci", "", "pods/status", "patch", None),
    ("ci", "phabmesh.io", "phabricatorcredentials", "create update delete", None),
    ("ci", "phabmesh.io", "phabricatorcredentials/status", "patch", None),
    ("ci", "phabmesh.io", "phabricatorbindings", "patch", None),
    (ALL, "authentication.k8s.io", "tokenreviews", "create", None),
    ("ci", "", "events", "create", None),
    (ALL, "kopf.dev", "clusterkopfpeerings", "get patch", None),
    (ALL, "", "namespaces", "get create update patch delete", None),
]


def _sa(who: str) -> str:
    return f"system:serviceaccount:{SYSTEM}:phabmesh-{who}"


def _expand(calls: Calls) -> set[tuple[Any, ...]]:
    return {
        (ns, group, resource, verb, name)
        for ns, group, resource, verbs, name in calls
        for verb in verbs.split()
    }


def _render(path: Path, cluster: Cluster) -> list[Doc]:
    out = cluster.kubectl("kustomize", str(path)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _apply(cluster: Cluster, docs: list[Doc], *extra: str) -> None:
    if not docs:
        return
    cluster.kubectl("apply", "--server-side", *extra, "-f", "-", input=yaml.safe_dump_all(docs))


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(cluster: Cluster) -> list[Doc]:
    return _render(MANIFESTS, cluster)


@pytest.fixture(scope="module")
def installed(cluster: Cluster, crds: object, rendered: list[Doc]) -> Iterator[list[Doc]]:
    standins = linkerd.standin_crds()
    _apply(cluster, standins)
    crd_docs = [d for d in rendered if d["kind"] == "CustomResourceDefinition"]
    _apply(cluster, crd_docs)
    for crd in standins + crd_docs:
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}"
        )
    rest = [d for d in rendered if d["kind"] != "CustomResourceDefinition"]
    # The webhook configuration too is only dry-run: the Service behind it has no pods here,
    # and tests/integration/test_injection.py installs it pointed at a running operator.
    # So is the lease policy: the tests' operator writes leases as the cluster's admin, and
    # tests/integration/test_lease_policy.py installs the policy for its own tests only.
    dry = (
        "Deployment",
        "MutatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    )
    _apply(cluster, [d for d in rest if d["kind"] not in dry])
    _apply(cluster, [d for d in rest if d["kind"] in dry], "--dry-run=server")
    yield rendered
    names = [f"crd/{d['metadata']['name']}" for d in standins]
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", *names)


def _can(cluster: Cluster, who: str, call: tuple[Any, ...]) -> bool:
    """Ask the API server, as ServiceAccount phabmesh-<who>, whether it may make ``call``.

    A SelfSubjectAccessReview created with kubectl's impersonation (what
    ``kubectl auth can-i --as`` sends), spelt out so that group, subresource and name are
    exact even for resources the API server does not serve (``kopfpeerings``).
    """
    namespace, group, resource, verb, name = call
    resource, _, subresource = resource.partition("/")
    attributes = {"group": group, "resource": resource, "subresource": subresource, "verb": verb}
    attributes |= {"namespace": namespace or "", "name": name or ""}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": attributes},
    }
    out = cluster.kubectl(
        "create",
        f"--as={_sa(who)}",
        "--validate=false",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(review),
    ).stdout
    return bool(json.loads(out)["status"]["allowed"])


def _calls(table: Calls) -> list[Any]:
    return [
        pytest.param(call, id="-".join(p or "all" for p in (call[3], call[2], call[4], call[0])))
        for call in sorted(_expand(table), key=str)
    ]


# --- rendering and applying ---------------------------------------------------------


def test_manifests_render_with_the_release_image(rendered: list[Doc]) -> None:
    kinds = {d["kind"] for d in rendered}
    assert kinds >= {"Namespace", "ServiceAccount", "ClusterRole", "Role", "Deployment"}
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterKopfPeering",
        "MutatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for d in rendered:
        if d["kind"] not in cluster_scoped:
            assert d["metadata"]["namespace"] == SYSTEM, d["metadata"]
    images = {
        c["image"]
        for d in _by_kind(rendered, "Deployment").values()
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {IMAGE}


def test_everything_applies_to_a_real_api_server(cluster: Cluster, installed: list[Doc]) -> None:
    for kind, name in [
        ("serviceaccount", "phabmesh-operator"),
        ("serviceaccount", "phabmesh-gateway"),
        ("configmap", "phabmesh-config"),
        ("service", "phabmesh-endpoint"),
        ("service", "phabmesh-issuer"),
        ("service", "phabmesh-gateway"),
        ("poddisruptionbudget", "phabmesh-operator"),
        ("server.policy.linkerd.io", "phabmesh-metrics"),
        ("server.policy.linkerd.io", "phabmesh-gateway-hooks"),
        ("authorizationpolicy.policy.linkerd.io", "phabmesh-gateway-hooks-meshed"),
        ("networkpolicy", "phabmesh-operator"),
        ("networkpolicy", "phabmesh-gateway"),
    ]:
        cluster.kubectl("get", "-n", SYSTEM, kind, name)
    cluster.kubectl("get", "clusterkopfpeering", "phabmesh")


def test_one_apply_installs_on_a_cluster_with_the_crds(rendered: list[Doc]) -> None:
    # kubectl maps every object before creating any: an object whose CRD is created by the
    # same apply is refused ("ensure CRDs are installed first").
    defined_here = {
        (d["spec"]["group"], d["spec"]["names"]["kind"])
        for d in rendered
        if d["kind"] == "CustomResourceDefinition"
    }
    needs_them = [
        d["kind"] for d in rendered if (d["apiVersion"].split("/")[0], d["kind"]) in defined_here
    ]
    assert needs_them == []


# --- RBAC, by impersonation -----------------------------------------------------------


@pytest.mark.parametrize("call", _calls(OPERATOR_CALLS))
def test_operator_may_make_every_call_it_makes(
    cluster: Cluster, installed: object, call: tuple[Any, ...]
) -> None:
    assert _can(cluster, "operator", call)


@pytest.mark.parametrize("call", _calls(GATEWAY_CALLS))
def test_gateway_may_make_every_call_it_makes(
    cluster: Cluster, installed: object, call: tuple[Any, ...]
) -> None:
    assert _can(cluster, "gateway", call)


@pytest.mark.parametrize("call", _calls(OPERATOR_DENIED))
def test_operator_is_refused_anything_else(
    cluster: Cluster, installed: object, call: tuple[Any, ...]
) -> None:
    assert not _can(cluster, "operator", call)


@pytest.mark.parametrize("call", _calls(GATEWAY_DENIED))
def test_gateway_is_refused_anything_else(
    cluster: Cluster, installed: object, call: tuple[Any, ...]
) -> None:
    assert not _can(cluster, "gateway", call)


def _granted(docs: list[Doc], who: str) -> set[tuple[Any, ...]]:
    """What the rendered (Cluster)RoleBindings grant ServiceAccount phabmesh-<who>."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"].endswith("Role")}
    grants: set[tuple[Any, ...]] = set()
    for binding in (d for d in docs if d["kind"].endswith("RoleBinding")):
        subjects = binding["subjects"]
        if {
            "kind": "ServiceAccount",
            "name": f"phabmesh-{who}",
            "namespace": SYSTEM,
        } not in subjects:
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        ns = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else ALL
        for rule in role.get("rules") or []:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [None]:
                            grants.add((ns, group, resource, verb, name))
    return grants


def test_rbac_grants_exactly_the_calls_made(rendered: list[Doc]) -> None:
    assert _granted(rendered, "operator") == _expand(OPERATOR_CALLS)
    assert _granted(rendered, "gateway") == _expand(GATEWAY_CALLS)
    # No wildcards anywhere, and only phabmesh's two ServiceAccounts are bound.
    for role in (d for d in rendered if d["kind"].endswith("Role")):
        assert "*" not in json.dumps(role.get("rules") or []), role["metadata"]["name"]
    subjects = [s for d in rendered if d["kind"].endswith("RoleBinding") for s in d["subjects"]]
    assert {s["name"] for s in subjects} == {"phabmesh-operator", "phabmesh-gateway"}


# --- workloads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "args", "ports", "requests", "memory_limit"),
    [
        (
            "phabmesh-operator",
            ["operator", "--peering"],
            {"endpoint": 8443, "metrics": 9090, "webhook": 9443},
            {"cpu": "100m", "memory": "256Mi"},
            "512Mi",
        ),
        (
            "phabmesh-gateway",
            ["gateway"],
            {"conduit": 8080, "hooks": 8081, "metrics": 9090},
            {"cpu": "100m", "memory": "128Mi"},
            "256Mi",
        ),
    ],
)
def test_workloads_are_hardened_and_meshed(
    rendered: list[Doc],
    name: str,
    args: list[str],
    ports: dict[str, int],
    requests: dict[str, str],
    memory_limit: str,
) -> None:
    deployment = _by_kind(rendered, "Deployment")[name]
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["linkerd.io/inject"] == "enabled"
    assert annotations["config.linkerd.io/default-inbound-policy"] == "deny"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == name
    assert spec["automountServiceAccountToken"] is True
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (container,) = spec["containers"]
    assert container["args"] == args
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == ports
    assert container["envFrom"] == [{"configMapRef": {"name": "phabmesh-config"}}]
    downward = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert downward == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    # The operator's webhook gives injected pods the agent in its own image (replacements).
    values = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    expected = {"PHABMESH_AGENT_IMAGE": container["image"]} if name == "phabmesh-operator" else {}
    assert values == expected
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"] == {"requests": requests, "limits": {"memory": memory_limit}}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def test_settings_are_the_documented_ones(rendered: list[Doc]) -> None:
    config = _by_kind(rendered, "ConfigMap")["phabmesh-config"]["data"]
    assert config == {
        "PHABMESH_NAMESPACE": SYSTEM,
        "PHABMESH_PHABRICATOR_URL": "https://phabricator.example.com",
        "PHABMESH_LINKERD_NAMESPACE": "linkerd",
        "PHABMESH_TRUST_DOMAIN": "cluster.local",
        # Only Linkerd's mTLS proves a caller meshed: on wherever Linkerd runs.
        "PHABMESH_REQUIRE_CLIENT_ID": "true",
        "PHABMESH_ISSUER": "http://phabmesh-issuer.phabmesh-system.svc:8443",
        "PHABMESH_LOG_JSON": "true",
        # The credential agent's requests and limits (docs/agent.md).
        "PHABMESH_AGENT_REQUESTS_CPU": "5m",
        "PHABMESH_AGENT_REQUESTS_MEMORY": "40Mi",
        "PHABMESH_AGENT_LIMITS_CPU": "",
        "PHABMESH_AGENT_LIMITS_MEMORY": "64Mi",
    }


def _pods_selected(rendered: list[Doc], selector: Doc) -> list[Doc]:
    """Pod templates of the rendered Deployments that a label selector selects."""
    selected = []
    for d in _by_kind(rendered, "Deployment").values():
        labels = d["spec"]["template"]["metadata"]["labels"]
        ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In", expr  # the only operator these manifests use
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            selected.append(d["spec"]["template"])
    return selected


def _port_names(pod: Doc) -> set[str | int]:
    """The ports a pod declares, by name and by number."""
    ports = [p for c in pod["spec"]["containers"] for p in c["ports"]]
    return {p["name"] for p in ports} | {p["containerPort"] for p in ports}


def test_services_and_budgets_select_the_pods(rendered: list[Doc]) -> None:
    services = _by_kind(rendered, "Service")
    # The credential endpoint's port by number: the pods of the release before named it
    # otherwise, and stay behind both Services while a rolling upgrade replaces them.
    assert {p["port"]: p["targetPort"] for p in services["phabmesh-endpoint"]["spec"]["ports"]} == {
        8443: 8443,
        9090: "metrics",
    }
    assert [p["name"] for p in services["phabmesh-endpoint"]["spec"]["ports"]] == [
        "endpoint",
        "metrics",
    ]
    assert {p["port"]: p["targetPort"] for p in services["phabmesh-gateway"]["spec"]["ports"]} == {
        8080: "conduit",
        8081: "hooks",
        9090: "metrics",
    }
    for service in services.values():
        (pod,) = _pods_selected(rendered, {"matchLabels": service["spec"]["selector"]})
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= _port_names(pod)
    budgets = _by_kind(rendered, "PodDisruptionBudget")
    assert set(budgets) == {"phabmesh-operator", "phabmesh-gateway"}
    for budget in budgets.values():
        assert budget["spec"]["minAvailable"] == 1
        assert len(_pods_selected(rendered, budget["spec"]["selector"])) == 1


# --- Linkerd policy -----------------------------------------------------------------------


def test_the_deprecated_issuer_service_is_the_endpoints_under_its_old_name(
    rendered: list[Doc],
) -> None:
    """phabmesh-issuer, the endpoint's former Service: kept (agents configured with its URL,
    the default `iss`), the same pods and ports as phabmesh-endpoint, its port's old name."""
    services = _by_kind(rendered, "Service")
    old, new = services["phabmesh-issuer"], services["phabmesh-endpoint"]
    assert old["spec"]["selector"] == new["spec"]["selector"]
    assert [p["name"] for p in old["spec"]["ports"]] == ["issuer", "metrics"]

    def ports(service: Doc) -> list[tuple[int, object, str]]:
        return [(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]]

    assert ports(old) == ports(new)
    # What the pods of the release before (port named "issuer") and of this one declare.
    (pod,) = _pods_selected(rendered, {"matchLabels": old["spec"]["selector"]})
    before = _port_names(pod) - {"endpoint"} | {"issuer"}
    for service in (old, new):
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= _port_names(pod) & before
    # The one Linkerd Server of that port covers both Services, and the pods before too.
    servers = _by_kind(rendered, "Server")
    covering = [s for s in servers.values() if s["spec"]["port"] in (8443, "endpoint", "issuer")]
    assert [s["metadata"]["name"] for s in covering] == ["phabmesh-endpoint"]
    assert covering[0]["spec"]["port"] == 8443
    assert _pods_selected(rendered, covering[0]["spec"]["podSelector"]) == [pod]
    # The NetworkPolicy lets both Services' port in, by number as well.
    (netpol,) = [
        d
        for d in _by_kind(rendered, "NetworkPolicy").values()
        if d["spec"]["podSelector"]["matchLabels"] == old["spec"]["selector"]
    ]
    allowed = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    assert 8443 in allowed and not allowed & {"issuer", "endpoint"}


def test_only_meshed_clients_reach_the_gateway_and_the_endpoint(rendered: list[Doc]) -> None:
    policy = [d for d in rendered if d["apiVersion"].startswith(LINKERD_GROUP + "/")]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in policy}
    servers = _by_kind(policy, "Server")
    # Each Server names a port that every pod it selects declares.
    for server in servers.values():
        pods = _pods_selected(rendered, server["spec"]["podSelector"])
        assert pods, server["metadata"]["name"]
        for pod in pods:
            assert server["spec"]["port"] in _port_names(pod), server["metadata"]["name"]
    # Each authorization targets an existing Server with existing authentications.
    allowed: dict[str, set[str]] = {}
    for ap in _by_kind(policy, "AuthorizationPolicy").values():
        target = ap["spec"]["targetRef"]
        assert (target["group"], target["kind"]) == (LINKERD_GROUP, "Server")
        assert ("Server", target["name"]) in objects
        for ref in ap["spec"]["requiredAuthenticationRefs"]:
            assert ref["group"] == LINKERD_GROUP
            assert (ref["kind"], ref["name"]) in objects
            allowed.setdefault(target["name"], set()).add(ref["kind"])
    meshed = _by_kind(policy, "MeshTLSAuthentication")["phabmesh-meshed-clients"]
    assert meshed["spec"] == {"identities": ["*"]}
    assert allowed == {
        "phabmesh-gateway": {"MeshTLSAuthentication"},
        "phabmesh-gateway-hooks": {"MeshTLSAuthentication"},
        "phabmesh-endpoint": {"MeshTLSAuthentication"},
        "phabmesh-metrics": {"NetworkAuthentication"},
    }
    assert {servers[s]["spec"]["port"] for s in allowed} == {
        "conduit",
        "hooks",
        8443,
        "metrics",
    }
    anyone = _by_kind(policy, "NetworkAuthentication")["phabmesh-any-network"]
    assert {n["cidr"] for n in anyone["spec"]["networks"]} == {"0.0.0.0/0", "::/0"}


# --- samples ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(cluster: Cluster, crds: object, installed: object) -> Iterator[list[Doc]]:
    """The samples, validated by the API server; only their namespace is really created."""
    docs = _render(SAMPLES, cluster)
    namespaces = [d for d in docs if d["kind"] == "Namespace"]
    _apply(cluster, namespaces)
    _apply(cluster, [d for d in docs if d["kind"] != "Namespace"], "--dry-run=server")
    yield docs
    for ns in namespaces:
        cluster.kubectl("delete", "namespace", ns["metadata"]["name"], "--wait=false")


def test_samples_are_not_installed_by_default(rendered: list[Doc]) -> None:
    assert not [d for d in rendered if d["apiVersion"].startswith("phabmesh.io/")]
    assert "samples" not in (MANIFESTS / "kustomization.yaml").read_text().split("#")[0]


def test_samples_bind_the_ci_runner_to_ci_bot(samples: list[Doc]) -> None:
    bot = _by_kind(samples, "PhabricatorBot")["ci-bot"]["spec"]
    assert bot == {
        "username": "ci-bot",
        "tokenSecretRef": {"name": "ci-bot-token", "key": "token"},
        "namespaceSelector": {"matchLabels": {"phabmesh.io/allow-ci-bot": "true"}},
    }
    assert _by_kind(samples, "Namespace")["ci"]["metadata"]["labels"] == {
        "phabmesh.io/allow-ci-bot": "true"
    }
    binding = _by_kind(samples, "PhabricatorBinding")["ci-runners"]
    assert binding["metadata"]["namespace"] == "ci"
    assert binding["spec"] == {
        "botRef": {"name": "ci-bot"},
        "identityRefs": [{"kind": "ServiceAccount", "name": "ci-runner"}],
        "credentialTTL": "15m",
        "allowedMethods": ["user.whoami", "differential.*", "conduit.ping"],
        "requireClientID": False,
        "credentialFormat": "PhorgeToken",
        "agent": {"mode": "Auto"},
    }
    runner = _by_kind(samples, "Deployment")["ci-runner"]["spec"]["template"]
    assert runner["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
    assert runner["spec"]["serviceAccountName"] == "ci-runner"
    # No hand-written credential container or volume: the agent is the webhook's to add.
    assert [c["name"] for c in runner["spec"]["containers"]] == ["runner"]
    assert "initContainers" not in runner["spec"] and "volumes" not in runner["spec"]
    assert "ci-runner" in _by_kind(samples, "ServiceAccount")


def test_the_sample_token_is_a_placeholder(samples: list[Doc]) -> None:
    secret = _by_kind(samples, "Secret")["ci-bot-token"]
    assert secret["metadata"]["namespace"] == SYSTEM
    assert secret["stringData"]["token"].startswith("api-REPLACEME")


def test_the_sample_build_step_names_a_bot_ci_may_use_and_grants_one_secret(
    samples: list[Doc],
) -> None:
    hook = _by_kind(samples, "PhabricatorWebhook")["start-build"]
    source = hook["spec"]["harbormaster"]
    assert source["botRef"]["name"] in _by_kind(samples, "PhabricatorBot")
    secret = _by_kind(samples, "Secret")[source["credentialSecretRef"]["name"]]
    assert "data" not in secret and "stringData" not in secret  # phabmesh fills it
    # The operator fills it, the gateway reads it: each only that, on that one name.
    roles, bindings = _by_kind(samples, "Role"), _by_kind(samples, "RoleBinding")
    for role, verbs, account in (
        ("phabmesh-build-step-fill", ["get", "patch"], "phabmesh-operator"),
        ("phabmesh-build-step-read", ["list", "watch"], "phabmesh-gateway"),
    ):
        assert roles[role]["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [secret["metadata"]["name"]],
                "verbs": verbs,
            }
        ]
        assert [s["name"] for s in bindings[role]["subjects"]] == [account]
    service = _by_kind(samples, "Service")[hook["spec"]["target"]["service"]]
    assert service["metadata"]["namespace"] == hook["metadata"]["namespace"] == "ci"
    assert service["spec"]["selector"]


def test_the_sample_webhook_reaches_only_its_service_and_admits_only_the_gateway(
    samples: list[Doc],
) -> None:
    hook = _by_kind(samples, "PhabricatorWebhook")["phorge-ci"]
    assert hook["metadata"]["namespace"] == "ci"
    assert hook["spec"]["target"] == {"service": "ci-listener", "port": 8080, "path": "/phorge"}
    secret = _by_kind(samples, "Secret")[hook["spec"]["herald"]["secretRef"]["name"]]
    assert secret["stringData"]["hmacKey"].startswith("REPLACEME")
    # The namespace grants phabmesh that one Secret, nothing more.
    role = _by_kind(samples, "Role")["phabmesh-webhook-keys"]
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["phorge-ci-hmac"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = _by_kind(samples, "RoleBinding")["phabmesh-webhook-keys"]
    assert {(s["name"], s["namespace"]) for s in binding["subjects"]} == {
        ("phabmesh-operator", SYSTEM),
        ("phabmesh-gateway", SYSTEM),
    }
    service = _by_kind(samples, "Service")["ci-listener"]
    assert [p["port"] for p in service["spec"]["ports"]] == [8080]
    # The target's port admits the gateway's identity and no other.
    server = _by_kind(samples, "Server")["ci-listener"]
    assert (server["spec"]["port"], server["spec"]["accessPolicy"]) == (8080, "deny")
    policy = _by_kind(samples, "AuthorizationPolicy")["ci-listener-from-phabmesh"]
    assert policy["spec"]["targetRef"]["name"] == "ci-listener"
    (auth,) = policy["spec"]["requiredAuthenticationRefs"]
    mesh = _by_kind(samples, "MeshTLSAuthentication")[auth["name"]]
    assert mesh["spec"] == {
        "identityRefs": [
            {"kind": "ServiceAccount", "name": "phabmesh-gateway", "namespace": SYSTEM}
        ]
    }


def test_injection_webhook_reaches_the_operator_and_never_blocks_pods(rendered: list[Doc]) -> None:
    from phabmesh import admission
    from phabmesh.admission import inject
    from phabmesh.settings import Settings

    defaults = Settings()
    config = _by_kind(rendered, "MutatingWebhookConfiguration")[defaults.webhook_configuration]
    (webhook,) = config["webhooks"]
    assert webhook["name"].endswith(".phabmesh.io")  # the operator keeps its caBundle
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert webhook["timeoutSeconds"] <= 5
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    skipped = webhook["namespaceSelector"]["matchExpressions"][0]
    assert skipped["key"] == "kubernetes.io/metadata.name"
    assert skipped["operator"] == "NotIn"
    assert set(skipped["values"]) == inject.SYSTEM_NAMESPACES | {SYSTEM, "linkerd"}
    opt_out = {"key": inject.OPT_OUT_LABEL, "operator": "NotIn", "values": [inject.OPT_OUT_VALUE]}
    assert opt_out in webhook["namespaceSelector"]["matchExpressions"]
    assert webhook["objectSelector"]["matchExpressions"] == [opt_out]
    # Service → operator pods' named port, at kopf's path for the handler.
    target = webhook["clientConfig"]["service"]
    assert target["path"] == "/" + admission.HANDLER_ID
    assert (target["name"], target["namespace"]) == (defaults.webhook_service, SYSTEM)
    service = next(
        d for d in rendered if d["kind"] == "Service" and d["metadata"]["name"] == target["name"]
    )
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == target["port"]]
    (pod,) = _pods_selected(rendered, {"matchLabels": service["spec"]["selector"]})
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == defaults.webhook_port
    # The API server is not meshed: the webhook port bypasses the proxy.
    skip = pod["metadata"]["annotations"]["config.linkerd.io/skip-inbound-ports"]
    assert skip == str(defaults.webhook_port)


def test_a_network_policy_names_every_port_of_each_pod(rendered: list[Doc]) -> None:
    """Each Deployment's pods are selected by a NetworkPolicy for ingress, and each of
    their container ports is in one of its rules: nothing open by omission, nothing
    closed by mistake. The webhook port has a rule of its own (the API server's)."""
    policies = list(_by_kind(rendered, "NetworkPolicy").values())
    for name, deployment in _by_kind(rendered, "Deployment").items():
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        (policy,) = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert policy["spec"]["policyTypes"] == ["Ingress"], name
        named = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
        declared = [p for c in template["spec"]["containers"] for p in c["ports"]]
        missing = [p["name"] for p in declared if not {p["name"], p["containerPort"]} & named]
        assert not missing, (name, missing)
        for rule in policy["spec"]["ingress"]:
            rule_ports = {port["port"] for port in rule["ports"]}
            assert "webhook" not in rule_ports or rule_ports == {"webhook"}, name
