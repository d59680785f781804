"""The README's quick start, with assertions: the same flow `phabmesh run` prints.

It runs on a control plane of its own, so that no other test's operator acts on it: with
PHABMESH_REQUIRE_CLIENT_ID off (the local control plane has no Linkerd) and on (the chart's
default: the quick start sends l5d-client-id as Linkerd's inbound proxy would).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import structlog
import yaml
from kubernetes import client

from phabmesh import logs, serving
from phabmesh.dev import devcluster, quickstart
from phabmesh.dev.conduit import ConduitServer
from phabmesh.settings import Settings
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, active_leases, label_namespace, make_binding, make_bot, make_pod

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("require_client_id", [False, True], ids=["off", "on"])
def test_quick_start_flow(tmp_path: Path, require_client_id: bool) -> None:
    lines: list[str] = []
    captured = io.StringIO()
    logs.configure("DEBUG", json_output=True, stream=captured)
    try:
        with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
            seen = asyncio.run(
                quickstart.demo(
                    plane, quickstart.Say(lines.append), require_client_id=require_client_id
                )
            )
            # The operator and the gateway ran as their ServiceAccounts, under the RBAC of
            # manifests/, with tokens that must not be logged either.
            accounts = plane.kubectl("get", "serviceaccounts", "-n", "phabmesh-system").stdout
            assert "phabmesh-operator" in accounts and "phabmesh-gateway" in accounts
            users = {e["user"]["username"] for e in plane.audit_events()}  # type: ignore[index]
            assert "system:serviceaccount:phabmesh-system:phabmesh-operator" in users
            assert "system:serviceaccount:phabmesh-system:phabmesh-gateway" in users
            for config in plane.workdir.glob("phabmesh-system-*.kubeconfig"):
                (user,) = yaml.safe_load(config.read_text())["users"]
                seen["secrets"].append(user["user"]["token"])
            keys = plane.kubectl(
                "get",
                "secret",
                "phabmesh-signing-keys",
                "-n",
                "phabmesh-system",
                "-o",
                "jsonpath={.data.keys\\.json}",
            ).stdout
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert seen["injected"] is True
    assert seen["format"] == "phorge-token"  # the default: what unchanged clients accept
    assert seen["whoami"]["result"]["userName"] == "ci-bot"
    assert seen["whoami"]["error_code"] is None
    assert seen["refused"]["error_code"] == "ERR-INVALID-AUTH"
    assert seen["lease"].startswith("ci-runner-0.ci-runners.")
    # The binding of demo.yaml asks for the agent.
    assert seen["agent"] == "sidecar"
    text = "\n".join(lines)
    if require_client_id:
        # Without l5d-client-id, refused before any review, saying what to fix; with it, as
        # Linkerd's proxy sets it, the rest of the story as above.
        assert seen["unmeshed"]["status"] == 403
        assert seen["unmeshed"]["error"] == "no_client_id"
        assert "PHABMESH_REQUIRE_CLIENT_ID" in seen["unmeshed"]["message"]
        assert "PHABMESH_REQUIRE_CLIENT_ID=true" in text
    else:
        # Its ~/.arcrc alone reaches the bot.
        assert seen["agent_whoami"]["result"]["userName"] == "ci-bot"
        assert "PHABMESH_REQUIRE_CLIENT_ID=false" in text
    assert "] The same credential, once more through the gateway" in text
    # "pod terminating", "pod deleted", or "lease deleted" when the garbage collector won the race
    assert "credential revoked: " in text
    # What the user reads never shows a token or a credential.
    assert "eyJ" not in text and "api-" not in text
    # Nor does any log line of the whole run: bot token, service-account token,
    # credential, signing key.
    log_text = captured.getvalue()
    assert log_text.count("\n") > 20  # the run did log (operator, gateway audit lines)
    assert "conduit_call" in log_text and "lease_issued" in log_text
    private_pem = json.loads(base64.b64decode(keys))["keys"][0]["privateKey"]
    for secret in [*seen["secrets"], private_pem.splitlines()[1]]:
        assert secret not in log_text
        assert secret not in text


def test_run_against_a_configured_cluster_runs_as_phabmeshs_service_accounts(
    tmp_path: Path, conduit: ConduitServer
) -> None:
    """`phabmesh run` with a kubeconfig: the operator and the gateway, each on its own
    metrics port, as their ServiceAccounts (so the lease policy lets the operator write
    leases); before phabmesh's RBAC is installed, one line says what to do."""
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        cluster = Cluster(plane)
        crds = str(REPO / "crds")
        plane.kubectl("apply", "--server-side", "-f", crds)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        metrics_port = serving.free_ports("127.0.0.1", 2)
        local = Settings.local_env(
            conduit.url, namespace=SYSTEM, metrics_port=metrics_port, log_json=True
        )
        env = dict(os.environ, KUBECONFIG=str(plane.kubeconfig), **local)
        command = [sys.executable, "-m", "phabmesh.cli", "run"]

        refused = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert refused.returncode == 2, refused.stderr
        assert "ServiceAccount phabmesh-system/phabmesh-operator not found" in refused.stderr
        assert "kubectl apply -k manifests/" in refused.stderr

        plane.install_rbac(REPO / "manifests")
        plane.kubectl("apply", "-f", str(REPO / "manifests" / "lease-policy.yaml"))
        out = tmp_path / "run.out"
        with out.open("w") as sink:
            proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "Ctrl-C stops them" in out.read_text(), timeout=60, what="run")
            text = out.read_text()
            assert f"metrics :{metrics_port} (operator) and :{metrics_port + 1} (gateway)" in text
            for port in (metrics_port, metrics_port + 1):
                assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).ok
            make_bot(cluster, conduit, "run-bot")
            cluster.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name="runs"))
            )
            label_namespace(cluster, "runs")
            make_binding(cluster, "runs", "runners", "run-bot")
            wait_for(lambda: cluster.core.list_namespaced_service_account("runs").items)
            make_pod(cluster, "runs", "runner-0", node=None)
            wait_for(lambda: active_leases(cluster, "runs"), timeout=60, what="a lease")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, out.read_text()[-2000:]
        users = {e["user"]["username"] for e in plane.audit_events()}  # type: ignore[index]
        assert "system:serviceaccount:phabmesh-system:phabmesh-operator" in users
        assert "system:serviceaccount:phabmesh-system:phabmesh-gateway" in users
