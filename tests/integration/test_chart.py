"""charts/phabmesh: the Helm chart renders the kustomize install's objects, and its values work.

Helm is built from its pinned Go module (tests/controlplane/helm) like the control plane.
The default render is compared object by object with ``kubectl kustomize manifests/`` plus
``crds/``: the only difference allowed is the Namespace, which Helm creates itself
(``helm install --create-namespace``) and a chart cannot own (Helm keeps its release record
in it). On the session's control plane renders are applied with ``--dry-run=server`` only:
its operator and RBAC objects are shared by every test. A real ``helm install`` and
``helm uninstall`` run on a control plane of their own.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh.dev import devcluster, linkerd
from phabmesh.settings import Settings
from tests.kube import Cluster, Helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "phabmesh"
SYSTEM = "phabmesh-system"
PART_OF = {"app.kubernetes.io/part-of": "phabmesh"}
Doc = dict[str, Any]
Key = tuple[str, str, str, str]
CEL = {"expression", "messageExpression"}
KUSTOMIZE_NAMESPACES_ANYWAY = {
    "ClusterKopfPeering",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(devcluster.helm(), tmp_path_factory.mktemp("helm"))


def _template(helm: Helm, *values: str, namespace: str = SYSTEM, chart: Path = CHART) -> list[Doc]:
    sets = [arg for value in values for arg in ("--set", value)]
    out = helm.run(
        "template", "phabmesh", str(chart), "--namespace", namespace, "--include-crds", *sets
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _key(doc: Doc) -> Key:
    meta = doc["metadata"]
    return (doc["apiVersion"], doc["kind"], meta.get("namespace", ""), meta["name"])


def _by_key(docs: list[Doc]) -> dict[Key, Doc]:
    keyed = {_key(d): d for d in docs}
    assert len(keyed) == len(docs), "an object is rendered twice"
    return keyed


def _kustomize(cluster: Cluster, directory: Path = REPO / "manifests") -> list[Doc]:
    out = cluster.kubectl("kustomize", str(directory)).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    for doc in docs:
        # kustomize does not know these kinds are cluster-scoped and gives them its
        # namespace, which the API server ignores for them; the chart gives them none.
        if doc["kind"] in KUSTOMIZE_NAMESPACES_ANYWAY:
            assert doc["metadata"].pop("namespace", SYSTEM) == SYSTEM
    crds = [yaml.safe_load(f.read_text()) for f in sorted((REPO / "crds").glob("*.yaml"))]
    return docs + crds


def _assert_same_objects(kustomized: list[Doc], rendered: list[Doc]) -> None:
    """The same objects, but for the Namespace (Helm's --create-namespace makes it)."""
    by_kustomize, by_helm = _by_key(kustomized), _by_key(rendered)
    assert set(by_kustomize) - set(by_helm) == {("v1", "Namespace", "", SYSTEM)}
    assert set(by_helm) - set(by_kustomize) == set()
    for key, doc in by_helm.items():
        assert _cel_spaced(doc) == _cel_spaced(by_kustomize[key]), f"{key} differs"


def _cel_spaced(value: Any) -> Any:
    """``value`` with the whitespace in its CEL expressions collapsed.

    kustomize's YAML library re-folds the lease policy's ``>-`` expression with an extra
    line break; CEL ignores whitespace between tokens.
    """
    if isinstance(value, dict):
        return {
            k: " ".join(v.split()) if k in CEL and isinstance(v, str) else _cel_spaced(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_cel_spaced(v) for v in value]
    return value


def _templated(docs: list[Doc]) -> list[Doc]:
    """The objects Helm renders from templates/ (not crds/, which Helm installs as they are)."""
    return [d for d in docs if d["kind"] != "CustomResourceDefinition"]


def _pod_templates(docs: list[Doc]) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"}


@pytest.fixture(scope="module")
def default(helm: Helm) -> list[Doc]:
    return _template(helm)


# --- lint and the CRDs ------------------------------------------------------------------


def test_chart_lints_strictly(helm: Helm) -> None:
    result = helm.run("lint", "--strict", str(CHART), "--namespace", SYSTEM)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    off = helm.run("lint", "--strict", str(CHART), "--set", "webhook.enabled=false")
    assert "0 chart(s) failed" in off.stdout


def test_chart_crds_are_the_repositorys(helm: Helm) -> None:
    # Helm installs a chart's crds/ as they are (and never upgrades or deletes them): the
    # chart carries copies of crds/, kopf's peering CRD included.
    ours = {f.name: f.read_bytes() for f in (REPO / "crds").glob("*.yaml")}
    charts = {f.name: f.read_bytes() for f in (CHART / "crds").glob("*.yaml")}
    assert charts == ours, "charts/phabmesh/crds/ differs from crds/: copy crds/*.yaml there"


# --- the default render is the kustomize install ------------------------------------------


def test_default_render_is_the_kustomize_install(cluster: Cluster, default: list[Doc]) -> None:
    _assert_same_objects(_kustomize(cluster), default)
    assert len(default) > 30  # every object, not an empty render that matches nothing


def test_default_render_names_the_kustomize_image_and_settings(default: list[Doc]) -> None:
    images = {c["image"] for t in _pod_templates(default).values() for c in t["spec"]["containers"]}
    assert images == {"ghcr.io/phabmesh/phabmesh:0.1.0"}
    (config,) = [d for d in default if d["kind"] == "ConfigMap"]
    assert config["data"]["PHABMESH_PHABRICATOR_URL"] == "https://phabricator.example.com"
    assert config["data"]["PHABMESH_REQUIRE_CLIENT_ID"] == "true"  # the safe choice by default


# --- values -------------------------------------------------------------------------------


def test_values_take_effect(helm: Helm, default: list[Doc]) -> None:
    docs = _template(
        helm,
        "image.repository=registry.example.org/tools/phabmesh",
        "image.tag=1.2.3",
        "image.pullPolicy=Always",
        "operator.replicas=3",
        "gateway.replicas=1",
        "operator.resources.limits.memory=1Gi",
        "gateway.resources.requests.cpu=250m",
        "phabricatorURL=https://phorge.example.org",
        "extraSettings.PHABMESH_BOT_RECHECK_INTERVAL=120",
        "linkerd.requireClientID=false",
        "commonLabels.team=platform",
        "commonAnnotations.owner=platform@example.org",
        "agent.resources.limits.cpu=100m",
        "agent.resources.requests.memory=48Mi",
        "gateway.priorityClassName=system-cluster-critical",
        "operator.podAnnotations.cluster-autoscaler\\.kubernetes\\.io/safe-to-evict=true",
        "operator.podAnnotations.linkerd\\.io/inject=disabled",  # phabmesh's own wins
        "operator.topologySpreadConstraints[0].maxSkew=1",
        "operator.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "operator.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        "gateway.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
    )
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert deployments["phabmesh-operator"]["spec"]["replicas"] == 3
    assert deployments["phabmesh-gateway"]["spec"]["replicas"] == 1
    for template in _pod_templates(docs).values():
        (container,) = template["spec"]["containers"]
        assert container["image"] == "registry.example.org/tools/phabmesh:1.2.3"
        assert container["imagePullPolicy"] == "Always"
        assert template["metadata"]["labels"]["team"] == "platform"
    operator = _pod_templates(docs)["phabmesh-operator"]["spec"]["containers"][0]
    gateway = _pod_templates(docs)["phabmesh-gateway"]["spec"]["containers"][0]
    # The webhook gives injected pods the credential agent in the operator's own image.
    agent = {e["name"]: e.get("value") for e in operator["env"]}["PHABMESH_AGENT_IMAGE"]
    assert agent == "registry.example.org/tools/phabmesh:1.2.3"
    assert operator["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    assert gateway["resources"]["requests"] == {"cpu": "250m", "memory": "128Mi"}
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["PHABMESH_PHABRICATOR_URL"] == "https://phorge.example.org"
    assert config["data"]["PHABMESH_BOT_RECHECK_INTERVAL"] == "120"
    assert config["data"]["PHABMESH_REQUIRE_CLIENT_ID"] == "false"
    agent_settings = {k: v for k, v in config["data"].items() if k.startswith("PHABMESH_AGENT_")}
    assert agent_settings == {
        "PHABMESH_AGENT_REQUESTS_CPU": "5m",
        "PHABMESH_AGENT_REQUESTS_MEMORY": "48Mi",
        "PHABMESH_AGENT_LIMITS_CPU": "100m",
        "PHABMESH_AGENT_LIMITS_MEMORY": "64Mi",
    }
    Settings.from_env(config["data"])  # what the processes accept
    pods = _pod_templates(docs)
    assert pods["phabmesh-gateway"]["spec"]["priorityClassName"] == "system-cluster-critical"
    assert "priorityClassName" not in pods["phabmesh-operator"]["spec"]
    notes = pods["phabmesh-operator"]["metadata"]["annotations"]
    assert notes["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "true"
    assert notes["linkerd.io/inject"] == "enabled"
    assert pods["phabmesh-operator"]["spec"]["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
         "whenUnsatisfiable": "ScheduleAnyway"}
    ]  # fmt: skip
    # An affinity of one's own replaces the default spread over nodes; the other keeps it.
    assert list(pods["phabmesh-gateway"]["spec"]["affinity"]) == ["nodeAffinity"]
    assert (
        pods["phabmesh-operator"]["spec"]["affinity"]
        == _pod_templates(default)["phabmesh-operator"]["spec"]["affinity"]
    )
    assert "podAntiAffinity" in pods["phabmesh-operator"]["spec"]["affinity"]
    assert any(d["apiVersion"].startswith("policy.linkerd.io/") for d in docs)
    # A cluster without Linkerd: the chart leaves Linkerd's policy objects out.
    without = _template(helm, "linkerd.policy=false")
    kinds = {(d["apiVersion"], d["kind"]) for d in default} - {
        (d["apiVersion"], d["kind"]) for d in without
    }
    assert kinds and all(api.startswith("policy.linkerd.io/") for api, _ in kinds), kinds
    # One gateway replica: no PodDisruptionBudget that would block every node drain.
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets == {"phabmesh-operator"}
    for doc in _templated(docs):
        assert doc["metadata"]["labels"] == {**PART_OF, "team": "platform"}, _key(doc)
        assert doc["metadata"]["annotations"] == {"owner": "platform@example.org"}, _key(doc)
    # Nothing else moved.
    assert {_key(d) for d in docs} == {_key(d) for d in default} - {
        ("policy/v1", "PodDisruptionBudget", SYSTEM, "phabmesh-gateway")
    }


@pytest.mark.parametrize(
    ("value", "refusal"),
    [
        ("operator.replica=3", "additional properties 'replica' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("operator.replicas=-1", "/operator/replicas"),
        # At its own path every time (a propertyNames rule was reported at a random one).
        ("extraSettings.LOG_LEVEL=DEBUG", "at '/extraSettings': additional properties 'LOG_LEVEL'"),
        ("phabricatorURL=phorge.example.org", "/phabricatorURL"),
        ("linkerd.requireClientID=maybe", "/linkerd/requireClientID"),
        ("agent.resources.limits.memory=64MB", "at '/agent/resources/limits/memory'"),
        ("agent.resources.limit.memory=64Mi", "additional properties 'limit' not allowed"),
        ("gateway.hooksFrom={phorge.example.org}", "at '/gateway/hooksFrom/0'"),
    ],
)
def test_values_schema_refuses_mistakes(helm: Helm, value: str, refusal: str) -> None:
    result = helm.run("template", "phabmesh", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert refusal in result.stderr


def test_default_render_adds_no_labels_or_annotations(default: list[Doc]) -> None:
    for doc in _templated(default):
        assert doc["metadata"]["labels"] == PART_OF, _key(doc)
        assert "annotations" not in doc["metadata"], _key(doc)


def test_webhook_off_removes_the_webhook_objects(helm: Helm, default: list[Doc]) -> None:
    off = _by_key(_template(helm, "webhook.enabled=false"))
    on = _by_key(default)
    assert set(on) - set(off) == {
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "", "phabmesh"),
        ("v1", "Service", SYSTEM, "phabmesh-webhook"),
    }
    assert set(off) - set(on) == set()
    for key, doc in off.items():
        assert doc == on[key], key


def test_another_namespace_is_named_everywhere(helm: Helm) -> None:
    docs = _templated(_template(helm, namespace="tools"))
    assert SYSTEM not in json.dumps(docs)
    namespaced = [d for d in docs if "namespace" in d["metadata"]]
    assert namespaced and {d["metadata"]["namespace"] for d in namespaced} == {"tools"}
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["data"]["PHABMESH_NAMESPACE"] == "tools"
    # `iss` is an identifier, kept as it was; pods are told the endpoint's new Service.
    assert config["data"]["PHABMESH_ISSUER"] == "http://phabmesh-issuer.tools.svc:8443"
    endpoint = config["data"]["PHABMESH_INJECTED_CREDENTIAL_ENDPOINT"]
    assert endpoint == "http://phabmesh-endpoint.tools.svc:8443"
    injected = config["data"]["PHABMESH_INJECTED_GATEWAY_URL"]
    assert injected == "http://phabmesh-gateway.tools.svc:8080"
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    assert (
        "system:serviceaccount:tools:phabmesh-operator"
        in policies["phabmesh-credential-writers"]["spec"]["variables"][0]["expression"]
    )
    assert (
        "system:serviceaccount:tools:phabmesh-operator"
        in policies["phabmesh-secret-writers"]["spec"]["matchConditions"][0]["expression"]
    )
    (webhook,) = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    skipped = webhook["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"]
    assert "tools" in skipped


# --- monitoring ----------------------------------------------------------------------------


MONITORING = REPO / "manifests" / "monitoring"
MONITORING_FILES = ("podmonitors.yaml", "prometheusrule.yaml", "dashboard.json")


def test_chart_monitoring_files_are_the_components() -> None:
    # Helm reads no file outside the chart: it carries copies of the component's objects.
    copies = CHART / "files" / "monitoring"
    for name in MONITORING_FILES:
        assert (copies / name).read_bytes() == (MONITORING / name).read_bytes(), (
            f"charts/phabmesh/files/monitoring/{name} differs from manifests/monitoring/"
        )
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    files = kustomization["resources"] + [
        f.split("=")[-1] for g in kustomization["configMapGenerator"] for f in g["files"]
    ]
    assert sorted(files) == sorted(MONITORING_FILES)


def test_monitoring_is_off_by_default(default: list[Doc]) -> None:
    assert not [d for d in default if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [d for d in default if d["metadata"]["name"] == "phabmesh-dashboard"]


def test_monitoring_renders_the_kustomize_component(
    cluster: Cluster, helm: Helm, tmp_path: Path
) -> None:
    # The overlay docs/monitoring.md describes: the install plus the monitoring component.
    shutil.copytree(REPO / "manifests", tmp_path / "manifests")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../manifests"],
                "components": ["../manifests/monitoring"],
            }
        )
    )
    rendered = _template(helm, "monitoring.enabled=true")
    _assert_same_objects(_kustomize(cluster, overlay), rendered)
    kinds = sorted(d["kind"] for d in rendered if d["apiVersion"].startswith("monitoring."))
    assert kinds == ["PodMonitor", "PodMonitor", "PrometheusRule"]


def test_monitoring_objects_take_the_namespace_labels_and_annotations(helm: Helm) -> None:
    docs = _template(
        helm,
        "monitoring.enabled=true",
        "monitoring.labels.release=kube-prometheus-stack",
        "commonLabels.team=platform",
        "commonAnnotations.owner=platform@example.org",
        namespace="tools",
    )
    monitoring = [
        d
        for d in docs
        if d["apiVersion"].startswith("monitoring.coreos.com/")
        or d["metadata"]["name"] == "phabmesh-dashboard"
    ]
    assert len(monitoring) == 4
    for doc in monitoring:
        assert doc["metadata"]["namespace"] == "tools"
        assert doc["metadata"]["labels"]["team"] == "platform"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "phabmesh"
        assert doc["metadata"]["annotations"] == {"owner": "platform@example.org"}
    others = [d for d in docs if d not in monitoring]
    assert others and not [d for d in others if "release" in d["metadata"].get("labels", {})]


def test_monitoring_without_monitoring_files_fails(helm: Helm, tmp_path: Path) -> None:
    chart = tmp_path / "phabmesh"
    shutil.copytree(CHART, chart)
    for name in MONITORING_FILES:
        (chart / "files" / "monitoring" / name).unlink()
    result = helm.run(
        "template", "phabmesh", str(chart), "--set", "monitoring.enabled=true", check=False
    )
    assert result.returncode != 0
    assert "the chart has no monitoring objects" in result.stderr


# --- on a real API server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def linkerd_crds(cluster: Cluster) -> Iterator[None]:
    standins = linkerd.standin_crds()
    cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(standins))
    names = [f"crd/{d['metadata']['name']}" for d in standins]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)
    yield
    cluster.kubectl("delete", "--ignore-not-found", *names)


OTHER_NAMESPACE = "phabmesh-chart-test"


@pytest.fixture(scope="module")
def other_namespace(cluster: Cluster) -> Iterator[str]:
    """An empty namespace to render the chart into (only dry runs go there)."""
    cluster.kubectl("create", "namespace", OTHER_NAMESPACE)
    yield OTHER_NAMESPACE
    cluster.kubectl("delete", "namespace", OTHER_NAMESPACE, "--wait=false")


@pytest.mark.parametrize(
    ("namespace", "values"),
    [
        pytest.param(SYSTEM, [], id="defaults"),
        pytest.param(
            SYSTEM,
            [
                "webhook.enabled=false",
                "gateway.replicas=1",
                "image.pullPolicy=IfNotPresent",
                "commonLabels.team=platform",
                "commonAnnotations.owner=platform@example.org",
                "operator.tolerations[0].operator=Exists",
                "imagePullSecrets[0].name=regcred",
                "extraSettings.PHABMESH_LOG_LEVEL=DEBUG",
            ],
            id="non-defaults",
        ),
        pytest.param(OTHER_NAMESPACE, [], id="another-namespace"),
    ],
)
def test_render_applies_to_a_real_api_server(
    cluster: Cluster,
    system: str,
    other_namespace: str,
    linkerd_crds: None,
    helm: Helm,
    namespace: str,
    values: list[str],
) -> None:
    # The CRDs are the session's (the `crds` fixture, through `system`): the rest is
    # validated and admitted by the API server, and nothing is created.
    docs = _templated(_template(helm, *values, namespace=namespace))
    out = cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "-o",
        "name",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
    ).stdout
    assert len(out.split()) == len(docs)


# --- helm install, on a control plane of its own -------------------------------------------


def _get(plane: devcluster.ControlPlane, doc: Doc) -> Doc:
    """The object ``doc`` names, as the API server has it."""
    group = doc["apiVersion"].rpartition("/")[0]
    kind = f"{doc['kind'].lower()}.{group}" if group else doc["kind"].lower()
    meta = doc["metadata"]
    where = ["-n", meta["namespace"]] if "namespace" in meta else []
    got: Doc = json.loads(plane.kubectl("get", kind, meta["name"], *where, "-o", "json").stdout)
    return got


def test_helm_install_then_uninstall(helm: Helm, tmp_path: Path) -> None:
    """A real `helm install` and `helm uninstall`, on a control plane of their own: the
    session's holds the one operator and the RBAC objects the tests share."""
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        standins = yaml.safe_dump_all(linkerd.standin_crds())
        plane.kubectl("apply", "--server-side", "-f", "-", input=standins)
        plane.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", "-f", "-", input=standins
        )
        kube = ["--kubeconfig", str(plane.kubeconfig), "--namespace", SYSTEM]
        helm.run("install", "phabmesh", str(CHART), *kube, "--create-namespace")

        # crds/ first, then every templated object, each marked as the release's.
        rendered = _template(helm)
        crds = {d["metadata"]["name"] for d in rendered if d["kind"] == "CustomResourceDefinition"}
        installed = {
            n.split("/")[-1] for n in plane.kubectl("get", "crd", "-o", "name").stdout.split()
        }
        assert crds <= installed and len(crds) == 5
        for doc in _templated(rendered):
            meta = _get(plane, doc)["metadata"]
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm", _key(doc)
            assert meta["labels"]["app.kubernetes.io/part-of"] == "phabmesh", _key(doc)
            assert meta["annotations"]["meta.helm.sh/release-name"] == "phabmesh", _key(doc)

        helm.run("uninstall", "phabmesh", *kube, "--wait")
        # Helm never deletes a chart's CRDs; the objects went with the release.
        installed = {
            n.split("/")[-1] for n in plane.kubectl("get", "crd", "-o", "name").stdout.split()
        }
        assert crds <= installed
        assert plane.kubectl("get", "clusterkopfpeerings", "-o", "name").stdout.split() == []
        deployments = plane.kubectl("get", "deployments", "-n", SYSTEM, "-o", "name").stdout
        assert deployments.split() == []


def test_webhook_callers_narrow_and_the_client_ca_mounts(helm: Helm, default: list[Doc]) -> None:
    docs = _template(
        helm,
        "networkPolicy.webhookFrom[0].ipBlock.cidr=10.0.0.0/28",
        "webhook.clientCAConfigMap=apiserver-webhook-ca",
    )
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    (webhook_rule,) = [
        rule
        for rule in policies["phabmesh-operator"]["spec"]["ingress"]
        if {"port": "webhook", "protocol": "TCP"} in rule["ports"]
    ]
    assert webhook_rule["from"] == [{"ipBlock": {"cidr": "10.0.0.0/28"}}]
    spec = _pod_templates(docs)["phabmesh-operator"]["spec"]
    (operator,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in operator["env"]}
    (mount,) = [m for m in operator["volumeMounts"] if m["name"] == "webhook-client-ca"]
    assert env["PHABMESH_WEBHOOK_CLIENT_CA"] == f"{mount['mountPath']}/ca.crt"
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == "webhook-client-ca"]
    assert volume["configMap"] == {"name": "apiserver-webhook-ca"}
    # By default: no client CA asked for.
    default_operator = _pod_templates(default)["phabmesh-operator"]["spec"]["containers"][0]
    assert "PHABMESH_WEBHOOK_CLIENT_CA" not in {e["name"] for e in default_operator["env"]}
    # Off: no NetworkPolicy at all.
    off = _template(helm, "networkPolicy.enabled=false")
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]
    assert {_key(d) for d in off} == {_key(d) for d in default} - {
        _key(d) for d in default if d["kind"] == "NetworkPolicy"
    }


def test_a_phorge_outside_the_mesh_is_let_in_on_the_hooks_port_alone(
    helm: Helm, default: list[Doc]
) -> None:
    """gateway.hooksFrom: those networks, unmeshed, on the gateway's hooks port and nowhere
    else; by default the hooks port is for meshed callers, as /api/ is."""
    docs = _template(helm, "gateway.hooksFrom={203.0.113.0/24,2001:db8::/32}")
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    networks = keyed["NetworkAuthentication", "phabmesh-hooks-networks"]["spec"]["networks"]
    assert networks == [{"cidr": "203.0.113.0/24"}, {"cidr": "2001:db8::/32"}]
    policy = keyed["AuthorizationPolicy", "phabmesh-gateway-hooks-networks"]["spec"]
    assert policy["targetRef"]["name"] == "phabmesh-gateway-hooks"
    server = keyed["Server", "phabmesh-gateway-hooks"]["spec"]
    assert (server["port"], server["accessPolicy"]) == ("hooks", "deny")
    # No policy lets those networks reach another Server (/api/, the endpoint).
    for (kind, _), doc in keyed.items():
        if kind == "AuthorizationPolicy" and "hooks" not in doc["spec"]["targetRef"]["name"]:
            refs = {r["name"] for r in doc["spec"]["requiredAuthenticationRefs"]}
            assert "phabmesh-hooks-networks" not in refs
    rules = keyed["NetworkPolicy", "phabmesh-gateway"]["spec"]["ingress"]
    (outside,) = [r for r in rules if any("ipBlock" in peer for peer in r["from"])]
    assert outside == {
        "from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}, {"ipBlock": {"cidr": "2001:db8::/32"}}],
        "ports": [{"port": "hooks", "protocol": "TCP"}],
    }
    # By default: the hooks port has its Server, for meshed callers only.
    plain = {(d["kind"], d["metadata"]["name"]): d for d in default}
    assert ("NetworkAuthentication", "phabmesh-hooks-networks") not in plain
    meshed = plain["AuthorizationPolicy", "phabmesh-gateway-hooks-meshed"]["spec"]
    assert meshed["requiredAuthenticationRefs"][0]["name"] == "phabmesh-meshed-clients"
    ports = plain["Service", "phabmesh-gateway"]["spec"]["ports"]
    assert {"name": "hooks", "port": 8081, "targetPort": "hooks", "protocol": "TCP"} in ports
