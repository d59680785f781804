"""Integration fixtures: phabmesh's processes against the session's control plane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh.gateway.process import GatewayProcess
from phabmesh.issuer.process import OperatorProcess
from phabmesh.testing import ConduitServer
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    binding_condition,
    label_namespace,
    make_binding,
    make_bot,
    settings_for,
)
from tests.stack import Threaded


@pytest.fixture(scope="session")
def conduit() -> Iterator[ConduitServer]:
    server = ConduitServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def system(cluster: Cluster, crds: object) -> str:
    try:
        cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=SYSTEM)))
    except ApiException as exc:
        if exc.status != 409:
            raise
    return SYSTEM


@pytest.fixture(scope="session")
def operator(
    system: str, conduit: ConduitServer, phabmesh_rbac: rbac.Installed
) -> Iterator[Threaded]:
    settings = settings_for(conduit)
    kubeconfig = phabmesh_rbac.kubeconfig("operator")
    proc = Threaded(OperatorProcess(settings, kubeconfig=kubeconfig)).start()
    wait_for(proc.process.ready, timeout=60, what="the operator to be ready")  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gateway(
    system: str, conduit: ConduitServer, operator: Threaded, phabmesh_rbac: rbac.Installed
) -> Iterator[Threaded]:
    # After the operator: it creates the signing-key Secret the gateway needs to be ready.
    kubeconfig = phabmesh_rbac.kubeconfig("gateway")
    proc = Threaded(GatewayProcess(settings_for(conduit), kubeconfig=kubeconfig))
    proc.start()
    wait_for(lambda: proc.process.state.ready, timeout=60, what="the gateway to be ready")  # type: ignore[attr-defined]
    yield proc
    proc.stop()


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    """A namespace with a Ready binding `runners` of a Ready bot `bot-<namespace>`."""
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot, credentialTTL="2m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    return namespace
