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
from pathlib import Path

import pytest
import structlog
import yaml

from phabmesh import logs
from phabmesh.dev import devcluster, quickstart


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
