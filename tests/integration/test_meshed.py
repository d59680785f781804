"""What makes a pod meshed, and what proves it.

A pod's spec decides who gets a lease: a ``linkerd-proxy`` container, never Linkerd's
label or annotation alone. Only the connection proves it: with
``PHABMESH_REQUIRE_CLIENT_ID`` (the chart's default) the credential endpoint and the
gateway take a call only with ``l5d-client-id`` from the serving pod's own Linkerd proxy,
naming the pod's identity. The local control plane has no Linkerd, so the session's
operator and gateway run with it off; here an endpoint and a gateway with it on answer
beside them, and the calls that carry the header come from 127.0.0.1, as Linkerd's
inbound proxy connects from inside the serving pod.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from aiohttp import web

from phabmesh import resources, serving
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.processes.operator import OperatorProcess
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import G, V, active_leases, bind, exchange, make_pod, pod_token, settings_for
from tests.stack import Threaded

CLIENT_ID = "l5d-client-id"
LABEL = "linkerd.io/control-plane-ns"


def _identity(namespace: str, sa: str = "runner") -> str:
    return f"{sa}.{namespace}.serviceaccount.identity.linkerd.cluster.local"


def _status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    obj = cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, "runners"
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def test_linkerds_label_alone_gets_no_lease_and_no_credential(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    """No proxy, only the label `linkerd.io/control-plane-ns=linkerd` (any pod author can
    write it): not meshed, no lease, and the refusal says what is missing."""
    bind(cluster, conduit, namespace)
    labelled = make_pod(
        cluster, namespace, "labelled", meshed=False, labels={"app": "runner", LABEL: "linkerd"}
    )
    make_pod(cluster, namespace, "meshed")
    status = wait_for(
        lambda: (
            (s := _status(cluster, namespace)).get("matchedPods", 0) + s.get("unmeshedPods", 0) == 2
            and s.get("activeCredentials") == s.get("matchedPods")
            and s
        ),
        what="the binding to count both pods",
    )
    assert (status["matchedPods"], status["unmeshedPods"], status["activeCredentials"]) == (1, 1, 1)
    assert [x["spec"]["podName"] for x in active_leases(cluster, namespace)] == ["meshed"]
    refused = exchange(operator, pod_token(cluster, namespace, labelled))
    assert refused.status_code == 403, refused.text
    answer = refused.json()
    assert answer["error"] == "no_lease"
    assert "not meshed (ProxyMissing)" in answer["message"]
    assert "no linkerd-proxy container" in answer["message"]
    assert LABEL in answer["message"]


# -- PHABMESH_REQUIRE_CLIENT_ID -------------------------------------------------------------


@pytest.fixture
def strict_endpoint(operator: Threaded) -> Iterator[str]:
    """The session operator's credential endpoint, with PHABMESH_REQUIRE_CLIENT_ID on: the
    same watches, keys and TokenReviews, served on a port of its own."""
    process: OperatorProcess = operator.process  # type: ignore[assignment]
    strict = copy.copy(process.endpoint)
    strict.settings = process.settings.replace(require_client_id=True)

    async def serve() -> web.AppRunner:
        app = web.Application(client_max_size=64 * 1024)
        strict.routes(app)
        return await serving.start_site(app, "127.0.0.1", 0)

    runner: web.AppRunner = operator.call(serve)
    try:
        yield f"http://127.0.0.1:{serving.bound_port(runner)}/v1/credentials"
    finally:
        operator.call(runner.cleanup)


@pytest.fixture
def strict_gateway(conduit: ConduitServer, phabmesh_rbac: rbac.Installed) -> Iterator[Threaded]:
    """A gateway process of its own with PHABMESH_REQUIRE_CLIENT_ID on."""
    settings = settings_for(conduit).replace(require_client_id=True)
    kubeconfig = phabmesh_rbac.kubeconfig("gateway")
    proc = Threaded(GatewayProcess(settings, kubeconfig=kubeconfig)).start()
    try:
        wait_for(lambda: proc.process.state.ready, timeout=60, what="the gateway to be ready")  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()


def _post(url: str, token: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        url, headers={"Authorization": f"Bearer {token}", **(headers or {})}, timeout=10
    )


def _whoami(gateway: Threaded, credential: str, headers: dict[str, str] | None = None) -> Any:
    port = gateway.process.port  # type: ignore[attr-defined]
    answer = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami",
        data={"api.token": credential, "output": "json"},
        headers=headers or {},
        timeout=10,
    )
    return json.loads(answer.text)


def test_the_endpoint_requires_l5d_client_id_when_told_to(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    strict_endpoint: str,
    namespace: str,
) -> None:
    bind(cluster, conduit, namespace)
    pod = make_pod(cluster, namespace, "runner-0")
    wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
    token = pod_token(cluster, namespace, pod)
    me = _identity(namespace)

    # On: a call that did not come over Linkerd mTLS is refused, saying what to fix.
    bare = _post(strict_endpoint, token)
    assert bare.status_code == 403, bare.text
    refusal = bare.json()
    assert refusal["error"] == "no_client_id"
    assert "PHABMESH_REQUIRE_CLIENT_ID" in refusal["message"]
    assert "no l5d-client-id" in refusal["message"]
    assert "linkerd.io/inject: enabled" in refusal["message"]
    # Another identity than the pod's: refused.
    other = _post(strict_endpoint, token, {CLIENT_ID: _identity(namespace, "intruder")})
    assert other.status_code == 403
    assert other.json()["error"] == "identity_mismatch"
    # The pod's own identity, as the endpoint pod's Linkerd proxy sets it (from inside the
    # pod: here 127.0.0.1): a credential.
    vouched = _post(strict_endpoint, token, {CLIENT_ID: me})
    assert vouched.status_code == 200, vouched.text
    assert vouched.json()["identity"] == me

    # Off (the local control plane's setting): the same call without the header succeeds.
    assert exchange(operator, token).status_code == 200


def test_the_gateway_requires_l5d_client_id_when_told_to(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    strict_gateway: Threaded,
    namespace: str,
) -> None:
    bot = bind(cluster, conduit, namespace)
    pod = make_pod(cluster, namespace, "runner-0")
    (lease,) = wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
    issued = exchange(operator, pod_token(cluster, namespace, pod))
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    uid = lease["metadata"]["uid"]
    for proc in (gateway, strict_gateway):
        wait_for(
            lambda p=proc: uid in p.process.state.leases.by_uid,  # type: ignore[attr-defined]
            what="the gateways to see the lease",
        )
    me = _identity(namespace)

    # On: refused without the header, in Conduit's envelope, naming what to fix.
    bare = _whoami(strict_gateway, credential)
    assert bare["error_code"] == "ERR-INVALID-AUTH", bare
    assert "this gateway requires calls over Linkerd mTLS" in bare["error_info"]
    assert "linkerd.io/inject: enabled" in bare["error_info"]
    other = _whoami(strict_gateway, credential, {CLIENT_ID: _identity(namespace, "intruder")})
    assert other["error_code"] == "ERR-INVALID-AUTH"
    assert "does not match" in other["error_info"]
    vouched = _whoami(strict_gateway, credential, {CLIENT_ID: me})
    assert vouched["error_code"] is None, vouched
    assert vouched["result"]["userName"] == bot
    # Public methods carry no credential and stay open.
    port = strict_gateway.process.port  # type: ignore[attr-defined]
    ping = requests.post(f"http://127.0.0.1:{port}/api/conduit.ping", timeout=10)
    assert json.loads(ping.text)["error_code"] is None

    # Off: the session's gateway answers the same call without the header.
    assert _whoami(gateway, credential)["result"]["userName"] == bot
