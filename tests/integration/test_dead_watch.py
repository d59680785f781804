"""Every watch of the gateway and of the credential endpoint, killed by an unexpected
exception, is logged, counted and started again; while it is dead, what it judges by fails
closed.

Fault injection: the watch's transform raises ``ValueError`` (as a bug, or an object it
cannot read, would) from the next event on, and on every list after it, until released.
The event comes from a real write to the real API server.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from phabmesh import metrics, resources
from phabmesh.controller.driver import Work
from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.processes.gateway import GatewayProcess
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, active_leases, exchange, make_pod, pod_token, settings_for
from tests.stack import Threaded


class Fault:
    """Makes ``informer``'s transform raise while it is set."""

    def __init__(self, informer: Informer[Any]) -> None:
        self.informer = informer
        self.original: Callable[[JSON], Any] = informer.transform
        self.on = False
        informer.transform = self._transform

    def _transform(self, obj: JSON) -> Any:
        if self.on:
            raise ValueError("a fault injected into the transform")
        return self.original(obj)

    def restore(self) -> None:
        self.on = False
        self.informer.transform = self.original


@pytest.fixture
def own_gateway(
    conduit: ConduitServer, operator: Threaded, phabmesh_rbac: rbac.Installed
) -> Iterator[Threaded]:
    """A gateway of this test's own: its watches are broken on purpose."""
    kubeconfig = phabmesh_rbac.kubeconfig("gateway")
    proc = Threaded(GatewayProcess(settings_for(conduit), kubeconfig=kubeconfig)).start()
    wait_for(lambda: proc.process.state.ready, timeout=60, what="the gateway to be ready")  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def _failures(registry: metrics.Metrics, task: str) -> float:
    return sum(v for labels, v in metrics.samples(registry, "phabmesh_task_failures_total")
               if labels.get("task") == task)  # fmt: skip


def _touch(cluster: Cluster, *target: str) -> None:
    cluster.kubectl("annotate", "--overwrite", *target, f"phabmesh.io/test-touch={uuid.uuid4()}")


def _whoami(gateway: Threaded, credential: str) -> dict[str, Any]:
    port = gateway.process.port  # type: ignore[attr-defined]
    answer = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami",
        data={"api.token": credential, "output": "json"},
        timeout=10,
    )
    envelope: dict[str, Any] = answer.json()
    return envelope


# watch -> (its informer in a GatewayProcess, its resource label, what makes it an event, judged
# by: while it is dead every credential is refused).
GATEWAY_WATCHES: dict[str, tuple[Callable[[Any, str], Informer[Any]], str, str, bool]] = {
    "leases": (lambda p, b: p.state.leases.informer, "leases", "lease", True),
    "bindings": (lambda p, b: p.state.bindings, "bindings", "binding", True),
    "bots": (lambda p, b: p.state.bots, "bots", "bot", True),
    "namespaces": (lambda p, b: p.state.grants.namespaces, "namespaces", "namespace", True),
    "pods": (lambda p, b: p.state.pods.informer, "pods", "pod", True),
    "signing-keys": (lambda p, b: p.state.keys.informer, "secrets", "signing-secret", False),
    "bot-secret": (
        lambda p, b: p.state.secrets.secrets.watches[p.settings.namespace, _bot_secret(p, b)][0],
        "secrets",
        "bot-secret",
        False,
    ),
    "gateway-role": (lambda p, b: p.state.secrets.role, "other", "role", False),
}


def _bot_secret(gateway: Any, bound: str) -> str:
    """The Secret of the test's bot."""
    return str(gateway.state.bots.items[f"bot-{bound}"].secret_name)


def _event(cluster: Cluster, process: Any, bound: str, what: str) -> None:
    """A real write that the watch of ``what`` sees (``process``: a gateway's or an
    operator's)."""
    state = getattr(process, "state", process)
    if what == "lease":  # a new pod: the operator writes it a lease
        make_pod(cluster, bound, f"other-{uuid.uuid4().hex[:6]}")
    elif what == "binding":
        _touch(cluster, "phabricatorbinding", "runners", "-n", bound)
    elif what == "bot":
        _touch(cluster, "phabricatorbot", f"bot-{bound}")
    elif what == "namespace":
        _touch(cluster, "namespace", bound)
    elif what == "pod":
        _touch(cluster, "pod", "runner-1", "-n", bound)
    elif what == "signing-secret":
        _touch(cluster, "secret", state.keys.secret_name, "-n", SYSTEM)
    elif what == "bot-secret":
        _touch(cluster, "secret", _bot_secret(process, bound), "-n", SYSTEM)
    else:
        (key,) = state.secrets.role.items
        _touch(cluster, "role", key.partition("/")[2], "-n", SYSTEM)


def _kill(
    cluster: Cluster,
    process: Any,
    bound: str,
    pick: Callable[[Any, str], Informer[Any]],
    what: str,
) -> Fault:
    """The watch ``pick`` names, failed by the fault on the event ``what`` and left failing."""
    fault = Fault(pick(process, bound))
    fault.on = True
    _event(cluster, process, bound, what)
    wait_for(lambda: not fault.informer.connected, what="the watch dead")
    return fault


@pytest.mark.parametrize("watch", sorted(GATEWAY_WATCHES))
def test_a_dead_gateway_watch_fails_closed_and_comes_back(
    watch: str,
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    own_gateway: Threaded,
    bound: str,
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound), what="a lease")
    issued = exchange(operator, pod_token(cluster, bound, pod))
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    conduit.add_token(f"bot-{bound}")
    process: Any = own_gateway.process
    wait_for(lambda: process.state.ready and process.state.leases.by_uid, what="the lease seen")
    assert _whoami(own_gateway, credential)["error_code"] is None

    pick, resource, what, judged = GATEWAY_WATCHES[watch]
    task = f"watch:{resource}"
    before = _failures(process.metrics, task)
    fault = _kill(cluster, process, bound, pick, what)
    informer = fault.informer
    try:
        assert _failures(process.metrics, task) > before
        answer = _whoami(own_gateway, credential)
        if judged:
            assert answer["error_code"] == "ERR-INVALID-AUTH", answer
            assert "cannot be confirmed" in answer["error_info"], answer
            assert not process.state.ready  # /readyz says so: the Service sends calls elsewhere
        else:  # what it keeps (a key ring, a bot token) is still right until it is back
            assert answer["error_code"] is None, answer
        # It keeps trying (a list after each failure), and keeps failing while the fault is on.
        failed = _failures(process.metrics, task)
        wait_for(lambda: _failures(process.metrics, task) > failed, what="another attempt")
    finally:
        fault.restore()
    wait_for(lambda: informer.healthy, what=f"the {watch} watch back")
    wait_for(lambda: process.state.ready, what="the gateway ready again")
    assert _whoami(own_gateway, credential)["error_code"] is None


# watch -> its informer in an OperatorProcess, what makes it an event.
ENDPOINT_WATCHES: dict[str, tuple[Callable[[Any, str], Informer[Any]], str]] = {
    "leases": (lambda p, b: p.leases.informer, "lease"),
    "bindings": (lambda p, b: p.endpoint.grants.bindings, "binding"),
    "bots": (lambda p, b: p.endpoint.grants.bots, "bot"),
    "namespaces": (lambda p, b: p.endpoint.grants.namespaces, "namespace"),
    "signing-keys": (lambda p, b: p.keys.informer, "signing-secret"),
}


@pytest.mark.parametrize("watch", sorted(ENDPOINT_WATCHES))
def test_a_dead_credential_endpoint_watch_refuses_until_it_is_back(
    watch: str, cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound), what="a lease")
    token = pod_token(cluster, bound, pod)
    assert exchange(operator, token).status_code == 200
    process: Any = operator.process
    pick, what = ENDPOINT_WATCHES[watch]
    fault = _kill(cluster, process, bound, pick, what)
    informer = fault.informer
    try:
        refused = exchange(operator, token)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "not_ready"
        assert "lost a watch" in refused.json()["message"]
    finally:
        fault.restore()
    wait_for(lambda: informer.healthy, what=f"the {watch} watch back")
    wait_for(lambda: exchange(operator, token).status_code == 200, what="credentials again")


def _webhook(cluster: Cluster, namespace: str) -> None:
    """A new PhabricatorWebhook: an event of the webhooks watch."""
    cluster.custom.create_namespaced_custom_object(
        resources.GROUP,
        resources.VERSION,
        namespace,
        resources.WEBHOOK_PLURAL,
        {
            "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": f"hook-{uuid.uuid4().hex[:6]}"},
            "spec": {
                "herald": {"secretRef": {"name": "hook-key"}},
                "target": {"service": "deployer", "port": 8080, "path": "/hooks"},
            },
        },
    )


# The operator process's watches that only the controller reads (the others are the
# endpoint's too, above): watch -> its informer, what makes it an event.
CONTROLLER_WATCHES: dict[str, tuple[Callable[[Any, str], Any], str]] = {
    "pods": (lambda p, b: p.watches.pods, "pod"),
    "webhooks": (lambda p, b: p.memo.controller.webhooks, "webhook"),
    "secrets": (lambda p, b: p.watches.secrets, "bot-secret"),
}


# The watches a lease decision reads: while one is lost, the controller takes no lease work.
DECISIVE = {"pods", "leases", "bindings", "bots", "namespaces"}


@pytest.mark.parametrize("watch", sorted({*CONTROLLER_WATCHES, *ENDPOINT_WATCHES}))
def test_a_dead_operator_watch_holds_every_decision_until_it_is_back(
    watch: str, cluster: Cluster, operator: Threaded, bound: str
) -> None:
    """While a watch that lease decisions read is dead, the controller decides nothing (its
    World may be stale): the work waits, and is done once the watch has listed again. A dead
    watch that no lease decision reads (webhooks, the Secrets) holds none of them."""
    make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound), what="a lease")
    process: Any = operator.process
    pick, what = {**ENDPOINT_WATCHES, **CONTROLLER_WATCHES}[watch]
    controller = process.memo.controller
    fault = Fault(pick(process, bound))
    fault.on = True
    if what == "webhook":
        _webhook(cluster, bound)
    elif what == "bot-secret":
        secret = process.memo.world.bots[f"bot-{bound}"].spec.token_secret_ref.name
        _touch(cluster, "secret", secret, "-n", SYSTEM)
    else:
        _event(cluster, process, bound, what)
    try:
        wait_for(lambda: not fault.informer.connected, what="the watch dead")
        if watch in DECISIVE:
            assert not controller.may_decide()
            if watch != "pods":  # a new pod is known, its work waits: no lease is written
                uid = make_pod(cluster, bound, "runner-2").metadata.uid
                wait_for(lambda: Work("pod", uid) in controller.queue.waiting, what="queued")
                assert not any(x["spec"]["podUID"] == uid for x in active_leases(cluster, bound))
        else:  # leases are decided all the same
            assert controller.may_decide()
            uid = make_pod(cluster, bound, "runner-2").metadata.uid
            wait_for(
                lambda: any(x["spec"]["podUID"] == uid for x in active_leases(cluster, bound)),
                what="a lease while that watch is dead",
            )
    finally:
        fault.restore()
    wait_for(lambda: fault.informer.healthy, what=f"the {watch} watch back")
    make_pod(cluster, bound, "runner-3")
    wait_for(lambda: len(active_leases(cluster, bound)) >= 2, what="leases written again")
