"""manifests/monitoring, the optional monitoring component, checked with the real tools.

- Its objects (two PodMonitors, the PrometheusRule, the dashboard's ConfigMap) are applied
  with ``--dry-run=server`` and strict field validation to the session's API server, with
  prometheus-operator's own CRDs installed (the version tests/controlplane/prometheus-operator
  pins, read from Go's module cache).
- The rules pass ``promtool check rules``, and ``promtool test rules`` runs their unit tests
  (tests/monitoring/alerts-test.yaml), where every alert fires for the failure it names and
  stays silent while all is well. promtool is built from the Prometheus Go module that
  tests/controlplane/prometheus pins.
- Every expression of the rules and of the dashboard is valid PromQL (promtool again) and
  reads only metrics that phabmesh's processes export (phabmesh.metrics), or ``up`` of the
  jobs the PodMonitors define.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

from phabmesh.dev import devcluster
from tests.kube import Cluster

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
COMPONENT = MANIFESTS / "monitoring"
UNIT_TESTS = REPO / "tests" / "monitoring" / "alerts-test.yaml"
DOCS = REPO / "docs" / "monitoring.md"
SYSTEM = "phabmesh-system"
Doc = dict[str, Any]

# The alerts an administrator needs (the failures they name are in docs/monitoring.md).
ALERTS = {
    "PhabmeshOperatorDown",
    "PhabmeshGatewayDown",
    "PhabmeshNoOperatorActing",
    "PhabmeshBotNotReady",
    "PhabmeshBindingNotReady",
    "PhabmeshGatewayFailingClosed",
    "PhabmeshUpstreamErrors",
    "PhabmeshWebhookCertificateExpiring",
    "PhabmeshSigningKeyRotationOverdue",
    "PhabmeshTaskFailing",
}
MONITORING_CRDS = ("podmonitors", "servicemonitors", "prometheusrules")
# Grafana's variables, replaced by what Grafana would put there before checking the PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}
PHABMESH_METRIC = re.compile(r"\bphabmesh_[a-z0-9_]+\b")
UP_JOB = re.compile(r'\bup\{job="([^"]+)"\}')


# --- helpers ---------------------------------------------------------------------------------


def _render(cluster: Cluster, path: Path) -> list[Doc]:
    out = cluster.kubectl("kustomize", str(path)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _key(doc: Doc) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def _rule(docs: list[Doc]) -> Doc:
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    return rule


def _alerts(rule: Doc) -> list[Doc]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def _dashboard(docs: list[Doc]) -> Doc:
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (text,) = configmap["data"].values()
    dashboard: Doc = json.loads(text)
    return dashboard


def _panels(dashboard: Doc) -> Iterator[Doc]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: Doc) -> dict[str, str]:
    """Each target's PromQL, Grafana's variables replaced, by panel title and refId."""
    exprs = {}
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs[f"{panel['title']} ({target['refId']})"] = expr
    return exprs


def _exported_metrics() -> set[str]:
    """The series names phabmesh's processes can export, from their metric definitions."""
    for module in ("phabmesh.metrics", "phabmesh.processes.operator", "phabmesh.processes.gateway"):
        importlib.import_module(module)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in prometheus_client.REGISTRY.collect()
        if family.name.startswith("phabmesh_")
        for suffix in suffixes.get(family.type, ("",))
    }


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown document."""
    anchors = set()
    for line in markdown.splitlines():
        if match := re.match(r"#+\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> Path:
    return devcluster.promtool()


@pytest.fixture(scope="module")
def base(cluster: Cluster) -> list[Doc]:
    return _render(cluster, MANIFESTS)


@pytest.fixture(scope="module")
def overlay(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    """An overlay as docs/monitoring.md shows it: the install plus the component."""
    root = tmp_path_factory.mktemp("overlay")
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(MANIFESTS, root)],
        "components": [os.path.relpath(COMPONENT, root)],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return _render(cluster, root)


@pytest.fixture(scope="module")
def component(base: list[Doc], overlay: list[Doc]) -> list[Doc]:
    """What the component adds to the install."""
    keys = {_key(d) for d in base}
    return [d for d in overlay if _key(d) not in keys]


@pytest.fixture(scope="module")
def monitoring_crds(cluster: Cluster) -> Iterator[None]:
    """prometheus-operator's CRDs for the kinds the component uses, installed and Established."""
    crds = devcluster.prometheus_operator_crds()
    files = [str(crds / f"monitoring.coreos.com_{plural}.yaml") for plural in MONITORING_CRDS]
    args = [arg for f in files for arg in ("-f", f)]
    cluster.kubectl("apply", "--server-side", *args)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *args)
    yield
    cluster.kubectl("delete", "--ignore-not-found", "--wait=false", *args)


@pytest.fixture(scope="module")
def rules_file(component: list[Doc], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file, beside the rules' unit tests."""
    workdir = tmp_path_factory.mktemp("rules")
    path = workdir / "phabmesh-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": _rule(component)["spec"]["groups"]}))
    shutil.copy(UNIT_TESTS, workdir / UNIT_TESTS.name)
    return path


def _dry_run(cluster: Cluster, docs: list[Doc]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump_all(docs),
        check=False,
    )


# --- the component ---------------------------------------------------------------------------


def test_the_component_adds_its_objects_and_changes_nothing_else(
    base: list[Doc], overlay: list[Doc], component: list[Doc]
) -> None:
    assert sorted(_key(d) for d in component) == [
        ("ConfigMap", SYSTEM, "phabmesh-dashboard"),
        ("PodMonitor", SYSTEM, "phabmesh-gateway"),
        ("PodMonitor", SYSTEM, "phabmesh-operator"),
        ("PrometheusRule", SYSTEM, "phabmesh"),
    ]
    by_key = {_key(d): d for d in overlay}
    assert all(by_key[_key(d)] == d for d in base)
    for doc in component:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "phabmesh"


def test_the_dashboard_configmap_is_found_by_grafanas_sidecar(component: list[Doc]) -> None:
    (configmap,) = [d for d in component if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(configmap["data"]) == ["phabmesh.json"]
    assert _dashboard(component) == json.loads((COMPONENT / "dashboard.json").read_text())


def test_component_objects_pass_prometheus_operators_crd_schemas(
    cluster: Cluster, system: str, monitoring_crds: None, component: list[Doc]
) -> None:
    result = _dry_run(cluster, component)
    assert result.returncode == 0, result.stderr
    applied = {line.split()[0] for line in result.stdout.splitlines() if "(server dry run)" in line}
    expected = set()
    for doc in component:
        group, _, _ = doc["apiVersion"].rpartition("/")
        resource = doc["kind"].lower() + (f".{group}" if group else "")
        expected.add(f"{resource}/{doc['metadata']['name']}")
    assert applied == expected


def test_the_crd_schemas_refuse_what_prometheus_operator_would_not_understand(
    cluster: Cluster, system: str, monitoring_crds: None, component: list[Doc]
) -> None:
    # The schemas are really in force: a misspelt field, and a duration Prometheus cannot
    # parse, are refused.
    (monitor, _) = [d for d in component if d["kind"] == "PodMonitor"]
    misspelt = json.loads(json.dumps(monitor))
    misspelt["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    result = _dry_run(cluster, [misspelt])
    assert result.returncode != 0
    assert "prot" in result.stderr
    rule = json.loads(json.dumps(_rule(component)))
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    result = _dry_run(cluster, [rule])
    assert result.returncode != 0
    assert "for" in result.stderr


def test_podmonitors_scrape_the_metrics_port_of_each_process(
    base: list[Doc], component: list[Doc]
) -> None:
    templates = {
        d["metadata"]["name"]: d["spec"]["template"] for d in base if d["kind"] == "Deployment"
    }
    jobs = set()
    for monitor in (d for d in component if d["kind"] == "PodMonitor"):
        spec = monitor["spec"]
        selected = [
            t
            for t in templates.values()
            if spec["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, monitor["metadata"]["name"]
        (template,) = selected
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert [e["port"] for e in spec["podMetricsEndpoints"]] == ["metrics"]
        assert "metrics" in ports
        jobs.add(template["metadata"]["labels"][spec["jobLabel"]])
    assert jobs == {"phabmesh-operator", "phabmesh-gateway"}


# --- the alerts ------------------------------------------------------------------------------


def test_rules_pass_promtool_check(promtool: Path, rules_file: Path) -> None:
    result = _promtool(promtool, "check", "rules", rules_file.name, cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_pass(promtool: Path, rules_file: Path) -> None:
    result = _promtool(promtool, "test", "rules", UNIT_TESTS.name, cwd=rules_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_alert_fails_its_unit_test(promtool: Path, rules_file: Path) -> None:
    # The unit tests can fail: with a threshold that never trips, the alert stays silent
    # where a test expects it.
    rules = yaml.safe_load(rules_file.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule.get("alert") == "PhabmeshGatewayFailingClosed":
            rule["expr"] = "phabmesh_gateway_fail_closed == 2"
    workdir = rules_file.parent.parent / "broken-rules"
    workdir.mkdir(exist_ok=True)
    (workdir / rules_file.name).write_text(yaml.safe_dump(rules))
    shutil.copy(UNIT_TESTS, workdir / UNIT_TESTS.name)
    result = _promtool(promtool, "test", "rules", UNIT_TESTS.name, cwd=workdir)
    assert result.returncode != 0
    assert "PhabmeshGatewayFailingClosed" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent(component: list[Doc]) -> None:
    alerts = {a["alert"] for a in _alerts(_rule(component))}
    assert alerts == ALERTS
    tests = [
        t
        for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    ]
    fires = {t["alertname"] for t in tests if t["exp_alerts"]}
    silent = {t["alertname"] for t in tests if not t["exp_alerts"]}
    assert fires == ALERTS
    assert silent == ALERTS


def test_every_alert_says_how_bad_what_and_where_its_runbook_is(component: list[Doc]) -> None:
    anchors = _anchors(DOCS.read_text())
    for alert in _alerts(_rule(component)):
        name = alert["alert"]
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"], name
        assert alert["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", alert["for"]), name
        page, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert page == "docs/monitoring.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"docs/monitoring.md has no section {name}"


# --- every expression ------------------------------------------------------------------------


def test_dashboard_expressions_are_valid_promql(
    promtool: Path, component: list[Doc], tmp_path: Path
) -> None:
    exprs = _dashboard_exprs(_dashboard(component))
    assert len(exprs) >= 10
    rules = [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool(promtool, "check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_panel_queries_the_prometheus_data_source_variable(component: list[Doc]) -> None:
    dashboard = _dashboard(component)
    assert dashboard["uid"] == "phabmesh"
    (variable,) = dashboard["templating"]["list"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_rules_and_dashboard_read_only_metrics_phabmesh_exports(component: list[Doc]) -> None:
    exported = _exported_metrics()
    jobs = {"phabmesh-operator", "phabmesh-gateway"}  # the PodMonitors' jobs (tested above)
    exprs = {
        a["alert"] + " " + a["labels"]["severity"]: a["expr"] for a in _alerts(_rule(component))
    }
    exprs |= _dashboard_exprs(_dashboard(component))
    unknown = {}
    for where, expr in exprs.items():
        names = set(PHABMESH_METRIC.findall(expr))
        up_jobs = set(UP_JOB.findall(expr))
        assert names or up_jobs, f"{where}: reads no metric"
        assert up_jobs <= jobs, where
        if names - exported:
            unknown[where] = sorted(names - exported)
    assert unknown == {}, "metrics that phabmesh.metrics does not define"
