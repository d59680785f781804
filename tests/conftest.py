"""Shared fixtures: a real local Kubernetes control plane for the whole test session, and
phabmesh's operator and gateway on it (one of each for the session: two operators without
peering on one cluster would both act)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.gateway import GatewayProcess
from phabmesh.processes.operator import OperatorProcess
from tests import rbac
from tests.kube import Cluster, create_hand_node, force_delete_pods, wait_for
from tests.phab import SYSTEM, settings_for
from tests.realnode import RealCluster
from tests.realnode import start as start_real_cluster
from tests.stack import Threaded

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
T = TypeVar("T")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("controlplane")
    with devcluster.ControlPlane(workdir) as plane:
        cluster = Cluster(plane)
        create_hand_node(cluster.core)
        yield cluster


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """A control plane of its own with a real node beside a KWOK node (tests/realnode.py):
    pods on the node really run. Needs root and `make node-packages`; fails otherwise."""
    yield from start_real_cluster(tmp_path_factory)


@pytest.fixture(scope="session")
def phabmesh_rbac(cluster: Cluster) -> Iterator[rbac.Installed]:
    """manifests/' RBAC applied; the operator and the gateway run as their ServiceAccounts.

    Every call either made and the API server refused fails the session: a grant missing
    from the manifests.
    """
    yield cluster.rbac
    cluster.assert_nothing_forbidden()


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Path:
    """phabmesh's CRDs applied and Established."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))
    return CRDS


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
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists; removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    wait_for(
        lambda: any(
            sa.metadata.name == "default"
            for sa in cluster.core.list_namespaced_service_account(name).items
        ),
        what=f"ServiceAccount default in {name}",
    )
    yield name
    force_delete_pods(cluster.core, name)
    if not os.environ.get("PHABMESH_KEEP_NAMESPACES"):
        cluster.core.delete_namespace(name)


# Whether pytest deselected any collected test (-k, -m, --deselect, --lf, ...).
NARROWED = pytest.StashKey[bool]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash[NARROWED] = True


def unused_grants_fail(config: pytest.Config) -> bool:
    """Whether a grant no call used fails the session (the rule is in tests/rbac.py)."""
    setting = os.environ.get("PHABMESH_RBAC_UNUSED", "")
    if setting in ("fail", "list"):
        return setting == "fail"
    return (
        config.args_source is pytest.Config.ArgsSource.TESTPATHS
        and not config.stash.get(NARROWED, False)
        and not config.getoption("ignore")
        and not config.getoption("ignore_glob")
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Grants of manifests/ that no call of this session used (tests/rbac.py)."""
    unused = {who: calls for who, calls in rbac.session_unused().items() if calls}
    if not unused:
        return
    terminalreporter.section("RBAC grants no call of this session used")
    for who, calls in unused.items():
        for call in sorted(calls, key=str):
            terminalreporter.line(f"phabmesh-{who}: {call}")
    if unused_grants_fail(terminalreporter.config):
        terminalreporter.line(
            "the whole suite ran (or PHABMESH_RBAC_UNUSED=fail): the session fails"
        )
    else:
        terminalreporter.line(
            "part of the suite ran: listed only (PHABMESH_RBAC_UNUSED=fail fails)"
        )


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if unused_grants_fail(session.config) and any(rbac.session_unused().values()):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
