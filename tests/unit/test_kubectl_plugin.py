"""kubectl phabmesh's pure parts: arguments, output formats, and each check's judgement."""

from __future__ import annotations

import base64
import datetime
import json
import re
from dataclasses import replace as dataclasses_replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh import apicalls, credentials, identity, resources
from phabmesh.admission import certificates
from phabmesh.controller import bots
from phabmesh.kube.client import JSON
from phabmesh.kubectl import checks, cluster, commands, injection, main, output, precheck
from phabmesh.leases import explain, grants, readiness, reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, World
from phabmesh.settings import Settings

REPO = Path(__file__).resolve().parents[2]
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
N = identity.DEFAULT_NAMING


# -- arguments --------------------------------------------------------------------------------


def test_kubectls_options_go_before_or_after_the_subcommand() -> None:
    parser = main.build_parser()
    after = parser.parse_args(["why", "runner-1", "-n", "ci", "-o", "json", "--context", "c"])
    before = parser.parse_args(["-n", "ci", "--context", "c", "-o", "json", "why", "runner-1"])
    for args in (after, before):
        options = main.options_of(args)
        assert (args.command, args.pod, args.output) == ("why", "runner-1", "json")
        assert (options.namespace, options.context, options.system) == ("ci", "c", SYSTEM)
    defaults = main.options_of(parser.parse_args(["check"]))
    assert (defaults.namespace, defaults.kubeconfig, defaults.system) == (None, None, SYSTEM)
    assert main.options_of(
        parser.parse_args(["check", "--phabmesh-namespace", "elsewhere"])
    ).system == ("elsewhere")


SYSTEM = "phabmesh-system"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["why"],
        ["who-can"],
        ["explain", "x"],
        ["check", "-o", "wide"],
        ["revoke", "runner-1"],
        ["revoke", "deployment/runner"],
        ["revoke", "pod/"],
        ["revoke", "pod", "a", "b"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main.main(argv)
    assert raised.value.code == 2
    assert "usage: kubectl phabmesh" in capsys.readouterr().err


def test_revoke_targets() -> None:
    assert commands.parse_target(["pod/runner-1"]) == ("pod", "runner-1")
    assert commands.parse_target(["po", "runner-1"]) == ("pod", "runner-1")
    assert commands.parse_target(["binding/runners"]) == ("binding", "runners")
    assert commands.parse_target(["phabricatorbindings.phabmesh.io/r"]) == ("binding", "r")
    with pytest.raises(ValueError, match="pod/NAME or binding/NAME"):
        commands.parse_target(["bot/ci-bot"])


def test_the_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'kubectl-phabmesh = "phabmesh.kubectl.main:main"' in text


# -- output -----------------------------------------------------------------------------------

REPORT = output.Report(
    (("namespace", "namespace"), ("pod", "pod"), ("credential", "held"), ("message", "msg")),
    [
        {"namespace": "ci", "pod": "runner-1", "held": True, "msg": "holds\nit"},
        {"namespace": "build-long", "pod": "r", "held": False, "msg": None},
    ],
)


def test_tables_are_kubectls() -> None:
    out, err = output.render(REPORT, "table")
    assert err == ""
    assert out.splitlines() == [
        "NAMESPACE    POD        CREDENTIAL   MESSAGE",
        "ci           runner-1   yes          holds it",
        "build-long   r          no           <none>",
    ]


def test_json_and_yaml_print_the_document() -> None:
    rows, _ = output.render(REPORT, "json")
    assert json.loads(rows) == [dict(r) for r in REPORT.rows]
    doc = output.Report(REPORT.columns, REPORT.rows, document={"bot": "b", "holders": []})
    assert json.loads(output.render(doc, "json")[0]) == {"bot": "b", "holders": []}
    assert yaml.safe_load(output.render(doc, "yaml")[0]) == {"bot": "b", "holders": []}
    with pytest.raises(ValueError, match="unknown output format"):
        output.render(doc, "wide")


def test_an_empty_table_says_so_on_stderr() -> None:
    empty = output.Report(REPORT.columns, [], empty="No pod holds a credential for X.")
    assert output.render(empty, "table") == ("", "No pod holds a credential for X.\n")
    assert output.render(empty, "json")[0] == "[]\n"


def test_why_report_shape() -> None:
    pod = identity.PodFacts.from_pod(
        {
            "metadata": {"name": "runner-1", "namespace": "ci", "uid": "u1"},
            "spec": {"serviceAccountName": "runner", "containers": [{"name": "linkerd-proxy"}]},
            "status": {"phase": "Running"},
        }
    )
    explained = explain.Explanation(explain.NO_BINDING, "no PhabricatorBinding in namespace ci")
    report = commands.why_report(explained, pod, N)
    (row,) = report.rows
    assert row == report.document
    assert (row["credential"], row["reason"], row["identity"]) == (
        False,
        "NoBinding",
        "runner.ci.serviceaccount.identity.linkerd.cluster.local",
    )
    out, _ = output.render(report, "table")
    assert out.splitlines()[1].split()[:4] == ["ci", "runner-1", "no", "NoBinding"]


# -- verdicts and holders -----------------------------------------------------------------------


def _binding_body(status: dict[str, Any] | None = None, generation: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": "runners", "namespace": "ci", "uid": "b", "generation": generation},
        "spec": {
            "botRef": {"name": "ci-bot"},
            "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
            "allowedMethods": ["user.whoami"],
        },
        "status": status or {},
    }


def test_the_operators_verdict_is_read_from_the_binding_when_current() -> None:
    status = {
        "observedGeneration": 2,
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "Ready", "message": "issued"},
            {"type": "BotReady", "status": "True", "reason": "Ready", "message": "ok"},
        ],
    }
    body = _binding_body(status)
    verdict = readiness.shown_verdict(body, BindingView.from_body(body), World())
    assert (verdict.ready, verdict.reason, verdict.bot_shown) == (True, "Ready", True)
    # Stale (another generation) or absent: judged here as the operator judges, and with no
    # bot known, the bot is not allowed.
    for stale in (_binding_body({**status, "observedGeneration": 1}), _binding_body()):
        judged = readiness.shown_verdict(stale, BindingView.from_body(stale), World())
        assert (judged.ready, judged.reason) == (False, reasons.BOT_NOT_ALLOWED)


def _lease(name: str, **spec: str) -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {"name": name, "namespace": spec.pop("namespace", "ci"), "uid": name},
            "spec": {
                "podName": name,
                "podUID": f"uid-{name}",
                "binding": "runners",
                "bot": "ci-bot",
                "identity": "runner.ci.serviceaccount.identity.linkerd.cluster.local",
                **spec,
            },
            "status": {
                "phase": spec.get("phase", "Active"),
                "expiresAt": spec.get("expires", "2026-06-01T00:10:00Z"),
            },
        }
    )


def test_holders_are_the_leases_the_gateway_honours() -> None:
    body = _binding_body()
    bindings = {("ci", "runners"): grants.binding_facts(body)}
    spec = {"username": "ci-bot", "tokenSecretRef": {"name": "t"}, "namespaceSelector": {}}
    bot = grants.bot_facts({"spec": spec})
    leases = [
        _lease("a"),
        _lease("expired", expires="2026-05-31T23:59:00Z"),
        _lease("revoked", phase="Revoked"),
        _lease("other-bot", bot="other"),
        _lease("stray", binding="gone"),
        _lease("sa", identity="web.ci.serviceaccount.identity.linkerd.cluster.local"),
    ]
    rows = commands.holders("ci-bot", leases, bindings, bot, {"ci": {}}, N, NOW)
    assert [r["pod"] for r in rows] == ["a"]
    assert rows[0]["expiresAt"] == "2026-06-01T00:10:00Z"
    # A bot whose namespaceSelector leaves the namespace out: nobody, whatever leases say.
    picky = grants.bot_facts(
        {
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "t"},
                "namespaceSelector": {"matchLabels": {"team": "x"}},
            }
        }
    )
    assert commands.holders("ci-bot", leases, bindings, picky, {"ci": {}}, N, NOW) == []


def test_a_revocation_touches_only_that_lease_while_active() -> None:
    ops = commands.revocation_ops(_lease("a"), NOW)
    assert ops[:2] == [
        {"op": "test", "path": "/metadata/uid", "value": "a"},
        {"op": "test", "path": "/status/phase", "value": "Active"},
    ]
    written = {op["path"]: op["value"] for op in ops[2:]}
    assert written == {
        "/status/phase": "Revoked",
        "/status/reason": resources.REVOKED_BY_ADMIN,
        "/status/revokedAt": "2026-06-01T00:00:00Z",
        "/status/message": resources.ADMIN_REVOCATION_MESSAGE,
    }


# -- checks -----------------------------------------------------------------------------------


def _crd(versions: list[str], established: bool = True) -> dict[str, Any]:
    return {
        "spec": {"versions": [{"name": v, "served": True, "storage": True} for v in versions]},
        "status": {
            "conditions": [{"type": "Established", "status": "True" if established else "False"}]
        },
    }


def test_judge_crds() -> None:
    names = [f"{p}.phabmesh.io" for p in checks.PHABMESH_CRDS]
    good = checks.judge_crds(dict.fromkeys(names, _crd(["v1alpha1"])))
    assert good.status == "OK" and "phabricatorbots v1alpha1" in good.message
    missing = checks.judge_crds({**dict.fromkeys(names, _crd(["v1alpha1"])), names[0]: None})
    assert missing.status == "FAIL" and "not installed" in missing.message
    assert checks.judge_crds({names[0]: _crd(["v1"])}).status == "FAIL"
    assert checks.judge_crds({names[0]: _crd(["v1alpha1"], established=False)}).status == "FAIL"


def test_judge_webhook() -> None:
    material = certificates.issue(["phabmesh-webhook.phabmesh-system.svc"], now=NOW)
    secret = {"data": material.to_secret_data()}
    bundle = base64.b64encode(material.ca_cert).decode()

    def config(ca: str | None) -> dict[str, Any]:
        hook: dict[str, Any] = {"name": "inject.phabmesh.io", "clientConfig": {}}
        if ca is not None:
            hook["clientConfig"]["caBundle"] = ca
        return {"webhooks": [hook, {"name": "someone.else.io", "clientConfig": {}}]}

    def judge(cfg: Any, sec: Any, now: datetime.datetime = NOW) -> checks.Result:
        return checks.judge_webhook(cfg, sec, "phabmesh", "phabmesh-webhook-tls", now)

    assert judge(config(bundle), secret).status == "OK"
    assert judge(None, secret).status == "FAIL"
    assert judge({"webhooks": []}, secret).status == "FAIL"
    assert judge(config(bundle), None).status == "FAIL"
    stale = judge(config(None), secret)
    assert stale.status == "FAIL" and "inject.phabmesh.io" in stale.message
    other = certificates.issue(["x"], now=NOW)
    assert judge(config(base64.b64encode(other.ca_cert).decode()), secret).status == "FAIL"
    soon = material.not_after - datetime.timedelta(days=3)
    assert judge(config(bundle), secret, soon).status == "WARN"
    assert judge(config(bundle), secret, material.not_after).status == "FAIL"


def test_judge_peering() -> None:
    crd = _crd(["v1"])

    def peer(seconds_ago: int, priority: int) -> dict[str, Any]:
        seen = NOW - datetime.timedelta(seconds=seconds_ago)
        return {"priority": priority, "lifetime": 60, "lastseen": seen.isoformat()}

    live = {"status": {"a@host": peer(10, 5), "b@host": peer(20, 9), "c@host": peer(120, 99)}}
    ok = checks.judge_peering(crd, live, NOW)
    assert ok.status == "OK" and "2 live" in ok.message and "b@host" in ok.message
    dead = checks.judge_peering(crd, {"status": {"c@host": peer(120, 1)}}, NOW)
    assert dead.status == "FAIL" and "1 expired" in dead.message
    assert checks.judge_peering(crd, {"status": {}}, NOW).status == "FAIL"
    assert checks.judge_peering(crd, None, NOW).status == "WARN"
    assert checks.judge_peering(None, None, NOW).status == "WARN"


def test_judge_rbac() -> None:
    assert checks.judge_rbac({}, 40).status == "OK"
    denied = checks.judge_rbac(
        {"gateway": [(None, "", "pods", "watch", None), ("ns", "", "secrets", "list", None)]}, 40
    )
    assert denied.status == "FAIL"
    assert denied.message == (
        "phabmesh-gateway may not watch pods cluster-wide; phabmesh-gateway may not list "
        "secrets in ns"
    )


def test_the_rbac_check_asks_for_the_manifests_calls_in_the_installed_namespace() -> None:
    calls = list(apicalls.each(apicalls.GATEWAY_CALLS, "elsewhere", {"phabmesh-signing-keys": "k"}))
    assert ("elsewhere", "", "secrets", "watch", "k") in calls
    assert ("elsewhere", "", "secrets", "watch", None) not in calls  # by name only
    assert (None, "", "pods", "list", None) in calls
    assert all(ns != apicalls.SYSTEM for ns, *_ in calls)
    renamed = set(apicalls.each(apicalls.OPERATOR_CALLS, "x", {"phabmesh-signing-keys": "keys"}))
    assert ("x", "", "secrets", "update", "keys") in renamed
    assert ("x", "", "secrets", "update", "phabmesh-webhook-tls") in renamed


def test_judge_linkerd() -> None:
    plurals = {plural for _, plural, _ in checks.LINKERD_POLICY}
    absent = checks.judge_linkerd(dict.fromkeys(plurals), {})
    assert absent.status == "WARN" and "not installed" in absent.message
    present = dict.fromkeys(plurals, _crd(["v1beta3"]))
    names = [f"{kind}/{name}" for kind, _, name in checks.LINKERD_POLICY]
    assert checks.judge_linkerd(present, dict.fromkeys(names, True)).status == "OK"
    missing = checks.judge_linkerd(present, {**dict.fromkeys(names, True), names[0]: False})
    assert missing.status == "FAIL" and names[0] in missing.message


def test_the_linkerd_policy_check_looks_for_the_manifests_objects() -> None:
    docs = yaml.safe_load_all((REPO / "manifests" / "linkerd-policy.yaml").read_text())
    shipped = {(d["kind"], d["metadata"]["name"]) for d in docs if d}
    assert shipped == {(kind, name) for kind, _, name in checks.LINKERD_POLICY}


def test_judge_keys_never_shows_key_material() -> None:
    ring = credentials.KeyRing.generate(NOW - datetime.timedelta(hours=5))
    data = ring.to_secret_data()
    ok = checks.judge_keys({"data": data}, "keys", NOW)
    assert ok.status == "OK" and ring.current.kid in ok.message and "0d5h" in ok.message
    assert data[credentials.keys.SECRET_KEY] not in ok.message
    assert checks.judge_keys(None, "keys", NOW).status == "FAIL"
    broken = checks.judge_keys({"data": {"keys.json": "bm90IGpzb24="}}, "keys", NOW)
    assert broken.status == "FAIL" and "unreadable" in broken.message


def test_judge_ready_and_report() -> None:
    bots = [
        {
            "metadata": {"name": "a"},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        },
        {
            "metadata": {"name": "b"},
            "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "Disabled"}]},
        },
    ]
    warned = checks.judge_ready(resources.BOT_KIND, bots)
    assert (warned.check, warned.status, warned.message) == (
        "bots",
        "WARN",
        "1 of 2 not Ready: b (Disabled)",
    )
    results = [checks.Result("crds", "OK", "x"), warned]
    assert checks.report(results).exit_code == 0
    failed = checks.report([*results, checks.Result("phabricator (in-cluster)", "FAIL", "down")])
    assert failed.exit_code == 1 and failed.document["ok"] is False
    # From the admin's machine: a hint, not the operator's view.
    here = checks.judge_phabricator("http://p", None, "refused")
    assert (here.check, here.status) == ("phabricator (from here)", "WARN")
    assert "from this machine" in here.message
    assert checks.judge_config(None, "bad value", None).status == "FAIL"
    assert checks.judge_config({}, None, Settings()).status == "OK"
    unproven = checks.judge_config({}, None, Settings(require_client_id=False))
    assert unproven.status == "WARN" and "PHABMESH_REQUIRE_CLIENT_ID is false" in unproven.message
    old = {"data": {"PHABMESH_ISSUER_PORT": "8443"}}
    renamed = checks.judge_config(old, None, Settings.from_env(old["data"]))
    assert renamed.status == "WARN"
    assert "PHABMESH_ISSUER_PORT (now PHABMESH_ENDPOINT_PORT)" in renamed.message
    assert "8443" not in renamed.message


def test_check_warns_of_a_configmap_that_injects_the_deprecated_service() -> None:
    old_url = "http://phabmesh-issuer.phabmesh-system.svc:8443"
    old = {"data": {"PHABMESH_INJECTED_CREDENTIAL_ENDPOINT": old_url}}
    warned = checks.judge_config(old, None, Settings.from_env(old["data"]))
    assert warned.status == "WARN"
    assert "names the deprecated Service phabmesh-issuer" in warned.message
    assert "http://phabmesh-endpoint.phabmesh-system.svc:8443" in warned.message
    # With a renamed setting too: both said, in one line.
    both = {"data": {**old["data"], "PHABMESH_ISSUER_PORT": "8443"}}
    warned = checks.judge_config(both, None, Settings.from_env(both["data"]))
    assert "PHABMESH_ISSUER_PORT (now PHABMESH_ENDPOINT_PORT)" in warned.message
    assert "phabmesh-issuer" in warned.message.split("; ", 1)[1]
    # The new name, the default, or another host: nothing to say about it.
    for url in ("http://phabmesh-endpoint.tools.svc:8443", "http://issuer.example:8443"):
        new = {"data": {"PHABMESH_INJECTED_CREDENTIAL_ENDPOINT": url}}
        assert checks.judge_config(new, None, Settings.from_env(new["data"])).status == "OK"
    assert checks.judge_config({}, None, Settings()).status == "OK"


def test_the_namespace_defaults_to_the_contexts(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [
                    {"name": "ci", "context": {"cluster": "c", "user": "u", "namespace": "ci"}},
                    {"name": "bare", "context": {"cluster": "c", "user": "u"}},
                ],
                "current-context": "ci",
            }
        )
    )
    path = str(kubeconfig)
    assert cluster.default_namespace(cluster.Options(kubeconfig=path)) == "ci"
    assert cluster.default_namespace(cluster.Options(kubeconfig=path, context="bare")) == "default"
    assert cluster.default_namespace(cluster.Options(kubeconfig=path, namespace="x")) == "x"
    missing = cluster.Options(kubeconfig=str(tmp_path / "none"))
    assert cluster.default_namespace(missing) == "default"


NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def _bot(name: str, reason: str, checked: datetime.datetime | None, message: str = "") -> JSON:
    status = "True" if reason == "Verified" else "Unknown"
    body: JSON = {
        "metadata": {"name": name},
        "status": {
            "conditions": [
                {"type": "Ready", "status": status, "reason": reason, "message": message}
            ]
        },
    }
    if checked is not None:
        body["status"]["lastCheckedAt"] = checked.strftime("%Y-%m-%dT%H:%M:%SZ")
    return body


def test_phabricator_in_cluster_is_what_the_operators_bot_checks_found() -> None:
    url = "http://phorge.internal"
    judge = checks.judge_phabricator_in_cluster
    fresh = NOW - datetime.timedelta(seconds=30)
    assert judge(url, [], NOW, 300).status == "WARN"
    ok = judge(url, [_bot("a", "Verified", fresh)], NOW, 300)
    assert (ok.check, ok.status) == ("phabricator (in-cluster)", "OK") and url in ok.message
    down = judge(
        url,
        [_bot("a", "Verified", fresh), _bot("b", "PhabricatorUnavailable", fresh, "refused")],
        NOW,
        300,
    )
    assert down.status == "FAIL" and url in down.message and "b: refused" in down.message
    # The operator stopped: its last checks grow old; a status that is not fresh says so.
    stale = judge(url, [_bot("a", "Verified", NOW - datetime.timedelta(hours=1))], NOW, 300)
    assert stale.status == "WARN" and "is the operator running?" in stale.message
    assert judge(url, [_bot("a", "Verified", None)], NOW, 300).status == "WARN"


def test_phabricator_in_cluster_counts_only_checks_that_called_it() -> None:
    """A bot whose token Secret is gone is re-checked (lastCheckedAt moves) without any
    Conduit call: that check must not read as the operator reaching Phabricator."""
    url = "http://phorge.internal"
    judge = checks.judge_phabricator_in_cluster
    fresh = NOW - datetime.timedelta(seconds=3)
    unread = [_bot("a", "SecretMissing", fresh), _bot("b", "SecretKeyMissing", fresh)]
    result = judge(url, unread, NOW, 300)
    assert result.status == "WARN", result
    assert "a (SecretMissing), b (SecretKeyMissing)" in result.message
    assert url not in result.message
    # One bot that did call: it alone counts.
    mixed = judge(url, [*unread, _bot("c", "TokenInvalid", fresh)], NOW, 300)
    assert mixed.status == "OK" and url in mixed.message
    # The reasons are the controller's own.
    assert {bots.SECRET_MISSING, bots.SECRET_KEY_MISSING, bots.INVALID_SPEC} == checks.NO_CALL


def _binding(spec: JSON, namespace: str = "ci") -> JSON:
    return {
        "metadata": {"name": "b", "namespace": namespace},
        "spec": {"botRef": {"name": "bot"}, "allowedMethods": ["user.*"], **spec},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.mark.parametrize(
    ("spec", "account", "labels"),
    [
        ({"identityRefs": [{"kind": "ServiceAccount", "name": "runner"}]}, "runner", {}),
        ({"identities": ["deploy.ci.serviceaccount.identity.linkerd.cluster.local"]}, "deploy", {}),
        ({"identities": ["spiffe://cluster.local/ns/ci/sa/builder"]}, "builder", {}),
        ({"identities": ["*"]}, "default", {}),
        ({"identityRefs": [{"kind": "Namespace", "name": "ci"}]}, "default", {}),
        (
            {
                "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
                "podSelector": {
                    "matchLabels": {"app": "ci"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["build", "test"]},
                        {"key": "gpu", "operator": "Exists"},
                        {"key": "legacy", "operator": "DoesNotExist"},
                    ],
                },
            },
            "runner",
            {"app": "ci", "tier": "build", "gpu": "phabmesh-check"},
        ),
    ],
)
def test_the_injection_check_builds_a_pod_the_binding_takes(
    spec: JSON, account: str, labels: dict[str, str]
) -> None:
    pod = injection.candidate_pod(_binding(spec), identity.DEFAULT_NAMING)
    assert pod is not None
    assert pod["spec"]["serviceAccountName"] == account
    assert pod["metadata"]["labels"] == labels
    assert pod["metadata"]["namespace"] == "ci" and "name" not in pod["metadata"]
    # Restricted, so that no namespace's Pod Security refuses it.
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_injection_check_says_what_it_saw() -> None:
    # Another namespace's ServiceAccount only: no pod of this namespace is taken.
    other = {"identityRefs": [{"kind": "ServiceAccount", "name": "x", "namespace": "else"}]}
    assert injection.candidate_pod(_binding(other), identity.DEFAULT_NAMING) is None
    volume = {"spec": {"volumes": [{"name": "phabmesh-token"}]}}
    assert injection.judge("ci/b", "runner", volume, None)[0] == "OK"
    status, message = injection.judge("ci/b", "runner", {"spec": {}}, None)
    assert status == "FAIL" and "NOT injected" in message
    # The docs section comes once, from the report (with_fix), not from judge too.
    line = checks.with_fix(checks.Result(injection.CHECK, status, message))
    assert line.message.count(injection.FIX) == 1, line.message
    assert injection.judge("ci/b", "runner", None, "forbidden")[0] == "WARN"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip("# ").strip().lower())
    return text.replace(" ", "-")


def test_every_warning_and_failure_names_a_docs_section_that_exists() -> None:
    root = Path(__file__).resolve().parents[2]
    for check, link in checks.FIXES.items():
        path, _, anchor = link.partition("#")
        text = (root / path).read_text()
        if anchor:
            anchors = {_anchor(line) for line in text.splitlines() if line.startswith("#")}
            assert anchor in anchors, (check, link, sorted(anchors))
        warned = checks.with_fix(checks.Result(check, "WARN", "x"))
        assert warned.message == f"x (see {link})"
    assert checks.with_fix(checks.Result("crds", "OK", "x")).message == "x"


def test_check_pre_judges() -> None:
    assert (
        precheck.judge_version({"major": "1", "minor": "36", "gitVersion": "v1.36.3"}).status
        == "OK"
    )
    old = precheck.judge_version({"major": "1", "minor": "29+", "gitVersion": "v1.29.1-eks"})
    assert old.status == "FAIL" and "1.30 or later" in old.message
    assert precheck.judge_version({"major": "", "minor": ""}).status == "WARN"
    missing = precheck.judge_linkerd({"servers.policy.linkerd.io": None})
    assert missing.status == "WARN" and "linkerd.policy=false" in missing.message
    assert precheck.judge_linkerd({"servers.policy.linkerd.io": {}}).status == "OK"
    assert precheck.judge_existing({"phabricatorbots.phabmesh.io": {}}, None).status == "WARN"
    fresh = precheck.judge_existing({"phabricatorbots.phabmesh.io": None}, {})
    assert fresh.status == "OK" and "kopf's peering CRD" in fresh.message
    denied = precheck.judge_permissions(["customresourcedefinitions"], 13)
    assert denied.status == "FAIL" and "customresourcedefinitions" in denied.message
    assert precheck.judge_permissions([], 13).status == "OK"


def test_lease_writes_refused_lately_fail_the_check() -> None:
    def event(minutes_ago: int) -> JSON:
        when = NOW - datetime.timedelta(minutes=minutes_ago)
        return {
            "lastTimestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "involvedObject": {"namespace": "ci", "name": f"p{minutes_ago}"},
            "message": "the operator could not write this pod's credential lease: 403",
        }

    assert checks.judge_lease_writes([], NOW).status == "OK"
    assert checks.judge_lease_writes([event(30)], NOW).status == "OK"  # long past
    failed = checks.judge_lease_writes([event(30), event(2), event(5)], NOW)
    assert failed.status == "FAIL" and "2 pod(s)" in failed.message and "ci/p2" in failed.message


# -- PhabricatorWebhooks ----------------------------------------------------------------------


def _hook(
    name: str,
    reason: str | None = "Ready",
    message: str = "",
    namespace: str = "ci",
    generation: int = 1,
    checked: int = 1,
    spec: JSON | None = None,
) -> JSON:
    status: JSON = {}
    if reason is not None:
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if reason == "Ready" else "False",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": "2026-06-01T00:00:00Z",
                    "observedGeneration": checked,
                }
            ]
        }
    return {
        "metadata": {"namespace": namespace, "name": name, "generation": generation},
        "spec": spec
        if spec is not None
        else {
            "herald": {"secretRef": {"name": f"{name}-hmac"}},
            "target": {"service": f"{name}-listener", "port": 8080, "path": "/"},
        },
        "status": status,
    }


def test_judge_webhooks_none_is_ok() -> None:
    assert checks.judge_webhooks([], {}, {}, SYSTEM) == checks.Result(
        "phabricatorwebhooks", "OK", "no PhabricatorWebhook in any namespace"
    )


def test_judge_webhooks_all_ready_reachable_and_readable() -> None:
    ok = checks.judge_webhooks([_hook("a"), _hook("b")], {}, {"ci/a": 1, "ci/b": 2}, SYSTEM)
    assert ok.status == "OK", ok
    assert ok.message.startswith("2 Ready; phabmesh-system/phabmesh-gateway may read every key")


def test_a_ready_webhook_whose_key_the_gateway_may_not_read_fails_naming_the_role() -> None:
    failed = checks.judge_webhooks(
        [_hook("a"), _hook("b")], {"ci/a": ["list", "watch"]}, {"ci/a": 1, "ci/b": 1}, SYSTEM
    )
    assert failed.status == "FAIL"
    assert "ci/a is Ready but phabmesh-system/phabmesh-gateway may not list or watch" in (
        failed.message
    )
    assert "Secret a-hmac" in failed.message
    assert "a Role granting get, list, watch on Secret a-hmac" in failed.message
    assert "ci/b" not in failed.message
    line = checks.with_fix(failed)
    assert line.message.endswith("(see docs/webhooks.md#troubleshooting)")
    # A webhook that is not Ready is refused anyway: its reason is what to fix, not the grant.
    not_ready = checks.judge_webhooks(
        [_hook("a", "SecretForbidden", 'phabmesh may not read Secret "a-hmac"')],
        {"ci/a": ["list"]},
        {},
        SYSTEM,
    )
    assert not_ready.status == "WARN", not_ready


@pytest.mark.parametrize(
    ("reason", "fix"),
    [
        ("SecretForbidden", "bound to ServiceAccounts phabmesh-system/phabmesh-operator and "
         "phabmesh-system/phabmesh-gateway"),
        ("SecretMissing", "kubectl -n ci create secret generic a-hmac --from-literal=hmacKey="),
        ("KeyMissing", "under hmacKey in Secret a-hmac"),
        ("ServiceMissing", "create Service a-listener in ci"),
        ("PortMissing", "add port 8080 to Service a-listener"),
        ("ServiceUnsupported", "a Service with a selector"),
        ("InvalidSpec", "correct the spec"),
        ("CheckFailed", "see its log"),
    ],
)  # fmt: skip
def test_each_webhook_not_ready_says_its_reason_message_and_fix(reason: str, fix: str) -> None:
    result = checks.judge_webhooks([_hook("a", reason, "what the operator said")], {}, {}, SYSTEM)
    assert result.status == "WARN"
    assert f"1 webhook(s): 1 not Ready: ci/a {reason}: what the operator said (fix: " in (
        result.message
    )
    assert fix in result.message, result.message


def test_a_webhook_not_checked_for_its_generation_is_not_ready() -> None:
    unchecked = checks.judge_webhooks([_hook("a", None)], {}, {}, SYSTEM)
    assert unchecked.status == "WARN" and "ci/a NotChecked: not checked yet" in unchecked.message
    stale = checks.judge_webhooks([_hook("a", generation=2, checked=1)], {}, {"ci/a": 1}, SYSTEM)
    assert stale.status == "WARN" and "not checked since its spec changed" in stale.message


def test_a_ready_webhook_without_a_ready_endpoint_warns_of_502() -> None:
    warned = checks.judge_webhooks([_hook("a"), _hook("b")], {}, {"ci/a": 0, "ci/b": 3}, SYSTEM)
    assert warned.status == "WARN"
    assert "ci/a: Service a-listener has no ready endpoint" in warned.message
    assert "502" in warned.message and "ci/b" not in warned.message


def test_the_webhook_line_is_bounded() -> None:
    hooks = [_hook(f"h{i:02d}", "SecretMissing", "gone") for i in range(25)]
    result = checks.judge_webhooks(hooks, {}, {}, SYSTEM, more=40)
    assert result.message.startswith("65 webhook(s) (the first 25 looked at; 40 more not): ")
    assert result.message.count("SecretMissing") == checks.HOOKS_SHOWN
    assert "; and 15 more" in result.message
    unknown = checks.judge_webhooks([_hook("a")], {}, {"ci/a": 1}, SYSTEM, more=-1)
    assert unknown.status == "OK" and unknown.message.endswith("(the first 1 looked at; more not)")


def test_a_user_who_may_not_ask_for_the_gateway_is_told_so() -> None:
    result = checks.judge_webhooks(
        [_hook("a")], {}, {"ci/a": 1}, SYSTEM, unasked="your user may not create them"
    )
    assert result.status == "WARN"
    assert "may read their keys was not asked: your user may not create them" in result.message


def test_webhook_key_and_target_from_the_raw_object() -> None:
    assert checks.hook_key_secret(_hook("a")) == ("a-hmac", "hmacKey")
    keyed = _hook("a", spec={"herald": {"secretRef": {"name": "s", "key": "k"}}})
    assert checks.hook_key_secret(keyed) == ("s", "k")
    assert checks.hook_target(keyed) is None
    harbormaster = _hook(
        "b",
        spec={
            "harbormaster": {"botRef": {"name": "ci-bot"}},
            "target": {"service": "x", "port": 1},
        },
    )
    assert checks.hook_key_secret(harbormaster) is None
    assert checks.hook_target(harbormaster) == ("x", 1)
    # A Ready build step webhook without a credential has no Secret for the gateway to read.
    assert checks.judge_webhooks([harbormaster], {}, {"ci/b": 1}, SYSTEM).status == "OK"
    # With one, the gateway reads its credential Secret: judged as a Herald key is.
    spec = harbormaster["spec"]
    with_credential = _hook(
        "c",
        spec={
            **spec,
            "harbormaster": {**spec["harbormaster"], "credentialSecretRef": {"name": "cred"}},
        },
    )
    assert checks.hook_key_secret(with_credential) == ("cred", "password")
    failed = checks.judge_webhooks([with_credential], {"ci/c": ["watch"]}, {"ci/c": 1}, SYSTEM)
    assert failed.status == "FAIL"
    assert "may not watch Secret cred" in failed.message
    assert "list, watch on Secret cred" in failed.message


def test_ready_endpoints_count_the_targets_port_only() -> None:
    service: JSON = {
        "spec": {"ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9000}]}
    }
    slices: list[JSON] = [
        {
            "ports": [{"name": "http", "port": 80}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.3"]},
            ],
        },
        {"ports": [{"name": "admin", "port": 9}], "endpoints": [{"addresses": ["10.0.0.4"]}]},
    ]
    assert checks.ready_endpoints(service, 8080, slices) == 2
    assert checks.ready_endpoints(service, 9000, slices) == 1
    assert checks.ready_endpoints(service, 1234, slices) == 0
    assert checks.ready_endpoints(None, 8080, slices) == 0
    assert checks.ready_endpoints(service, 8080, []) == 0
    unnamed: JSON = {"spec": {"ports": [{"port": 80}]}}
    assert (
        checks.ready_endpoints(unnamed, 80, [{"ports": [{"port": 8080}], "endpoints": [{}]}]) == 1
    )


def test_who_can_lists_the_webhooks_acting_as_the_bot() -> None:
    def harbormaster(name: str, bot: str, reason: str = "Ready") -> JSON:
        return _hook(
            name,
            reason,
            spec={
                "harbormaster": {"botRef": {"name": bot}},
                "target": {"service": "s", "port": 80},
            },
        )

    hooks = [
        harbormaster("z", "ci-bot"),
        harbormaster("a", "ci-bot", "ServiceMissing"),
        harbormaster("other", "other-bot"),
        _hook("herald"),  # no harbormaster source: about no bot
        _hook("broken", spec={"harbormaster": "junk"}),
        _hook("nobot", spec={"harbormaster": {}}),
    ]
    assert commands.acting_webhooks("ci-bot", hooks) == [
        {"namespace": "ci", "webhook": "a", "ready": False, "reason": "ServiceMissing"},
        {"namespace": "ci", "webhook": "z", "ready": True, "reason": "Ready"},
    ]
    assert commands.acting_webhooks("nobody", hooks) == []


def test_more_tables_print_after_the_first_as_kubectl_get_does() -> None:
    report = output.Report(
        (("name", "name"),),
        [{"name": "a"}],
        more=[((("webhook", "webhook"),), [{"webhook": "w"}]), ((("x", "x"),), [])],
    )
    assert output.render(report, "table") == ("NAME\na\n\nWEBHOOK\nw\n", "")
    only_more = dataclasses_replace(report, rows=[])
    assert output.render(only_more, "table") == ("WEBHOOK\nw\n", "")
    none = dataclasses_replace(report, rows=[], more=[])
    assert output.render(none, "table") == ("", "No resources found.\n")
