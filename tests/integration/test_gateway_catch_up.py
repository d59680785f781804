"""A credential can reach the gateway before what judges it does: the operator issues it
once the lease is Active, while the gateway learns of the lease, the binding and the bot's
token by watches of its own. A call made at once waits for them, a little."""

from __future__ import annotations

import concurrent.futures

import pytest
import requests

from phabmesh.dev.conduit import ConduitServer
from phabmesh.gateway import app
from phabmesh.processes.gateway import GatewayProcess
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import active_leases, bind, exchange, make_pod, pod_token, settings_for, whoami
from tests.stack import Threaded


def _catch_ups(gateway: Threaded, outcome: str) -> float:
    port = gateway.process.metrics_port  # type: ignore[attr-defined]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    line = f'phabmesh_gateway_catch_ups_total{{outcome="{outcome}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def test_a_call_made_before_the_gateway_has_the_bots_token_waits_for_it(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    phabmesh_rbac: rbac.Installed,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway of its own, under its RBAC, whose watches of the bots' Secrets start only
    when the test lets them: a Secrets Role watch that lags behind the operator's issue."""
    # The credential stays young for the whole test, however slow the machine (the gateway
    # runs in this process).
    monkeypatch.setattr(app, "CATCH_UP_SECONDS", 120.0)
    kubeconfig = phabmesh_rbac.kubeconfig("gateway")
    own = Threaded(GatewayProcess(settings_for(conduit), kubeconfig=kubeconfig)).start()
    try:
        wait_for(lambda: own.process.state.ready, timeout=60, what="the gateway to be ready")  # type: ignore[attr-defined]
        state = own.process.state  # type: ignore[attr-defined]
        held: list[object] = []
        state.secrets.reconcile = lambda: held.append(None)  # the lag: reconciles are held
        bot = bind(cluster, conduit, namespace, credentialTTL="2m")
        pod = make_pod(cluster, namespace, "runner-1")
        wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
        issued = exchange(operator, pod_token(cluster, namespace, pod), format="jwt")
        assert issued.status_code == 200, issued.text
        credential = issued.json()["credential"]
        wait_for(lambda: held, what="the Role to name the bot's Secret")
        assert state.bot_token(bot) is None  # the gateway does not have it yet
        served_before = _catch_ups(own, "served")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(whoami, own, credential, 30)
            gateway = own.process.gateway  # type: ignore[attr-defined]
            wait_for(lambda: gateway._catching_up == 1 or answer.done(), what="the call")
            assert not answer.done(), answer.result()  # answered without its bot's token

            async def let_the_watches_start() -> None:
                del state.secrets.reconcile
                state.secrets.reconcile()

            own.call(let_the_watches_start)
            result = answer.result(timeout=30)
        assert result["error_code"] is None, result
        assert result["result"]["userName"] == bot
        assert _catch_ups(own, "served") == served_before + 1
    finally:
        own.stop()
