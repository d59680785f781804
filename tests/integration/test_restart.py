"""Leases survive the operator's absence correctly: a sweep at start-up, and the garbage
collector when the operator is down. Its own control plane, so that no other operator acts."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from phabmesh import metrics, resources
from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.processes.operator import OperatorProcess
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    binding_condition,
    condition,
    label_namespace,
    leases,
    make_binding,
    make_bot,
    make_pod,
    settings_for,
    time_of,
)
from tests.stack import Threaded

NS = "restart"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.fixture
def alone(tmp_path: Path, conduit: ConduitServer) -> Iterator[Cluster]:
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        cluster = Cluster(plane)
        cluster.kubectl("apply", "--server-side", "-f", str(Path(__file__).parents[2] / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--all", "crd", "--timeout=60s")
        for name in (SYSTEM, NS):
            cluster.core.create_namespace(
                client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
            )
        wait_for(lambda: cluster.core.list_namespaced_service_account(NS).items, what="default SA")
        yield cluster
        cluster.assert_nothing_forbidden()


def start_operator(cluster: Cluster, conduit: ConduitServer) -> Threaded:
    kubeconfig = cluster.phabmesh_kubeconfig("operator")
    proc = Threaded(OperatorProcess(settings_for(conduit), kubeconfig=kubeconfig))
    proc.start()
    wait_for(proc.process.ready, timeout=60, what="operator ready")  # type: ignore[attr-defined]
    return proc


def test_sweep_and_garbage_collection(alone: Cluster, conduit: ConduitServer) -> None:
    cluster = alone
    operator = start_operator(cluster, conduit)
    try:
        make_bot(cluster, conduit, "restart-bot")
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "runners", "restart-bot")
        wait_for(lambda: (c := binding_condition(cluster, NS, "runners")) and c["status"] == "True")
        make_pod(cluster, NS, "kept", node=None)
        make_pod(cluster, NS, "gone", node=None)
        wait_for(lambda: len(active_leases(cluster, NS)) == 2)
    finally:
        operator.stop()

    # Operator and garbage collector both down: a pod goes, its lease stays behind...
    cluster.plane.stop_controller_manager()
    cluster.core.delete_namespaced_pod("gone", NS)
    assert len(leases(cluster, NS)) == 2
    # ...until the operator starts again and sweeps it; the live pod's lease is untouched.
    operator = start_operator(cluster, conduit)
    try:
        remaining = wait_for(lambda: (items := leases(cluster, NS)) and len(items) == 1 and items)
        assert remaining[0]["spec"]["podName"] == "kept"
        assert remaining[0]["status"]["phase"] == "Active"
    finally:
        operator.stop()

    # Operator down, garbage collector up: Kubernetes itself removes the lease with its pod.
    cluster.plane.start_controller_manager()
    cluster.core.delete_namespaced_pod("kept", NS)
    wait_for(lambda: leases(cluster, NS) == [], timeout=60, what="the garbage collector")


def test_restart_with_due_renewals_revokes_no_live_pod(
    alone: Cluster, conduit: ConduitServer
) -> None:
    """Down longer than a third of the TTL: every renewal is due when the operator starts,
    and no pod it has not seen yet may be taken for deleted. Several restarts, same pods."""
    cluster = alone
    names = [f"live-{i:02d}" for i in range(30)]
    operator = start_operator(cluster, conduit)
    make_bot(cluster, conduit, "renew-bot")
    label_namespace(cluster, NS)
    make_binding(cluster, NS, "renewed", "renew-bot", credentialTTL="1m")
    wait_for(lambda: (c := binding_condition(cluster, NS, "renewed")) and c["status"] == "True")
    for name in names:
        make_pod(cluster, NS, name, node=None)
    wait_for(lambda: len(active_leases(cluster, NS)) == len(names), timeout=60)
    issued = {x["metadata"]["uid"] for x in active_leases(cluster, NS)}

    def left() -> list[float]:
        return [
            (time_of(x["status"]["expiresAt"]) - now()).total_seconds() for x in leases(cluster, NS)
        ]

    for _ in range(3):
        try:
            # Stop when every lease has under 45 s left: 25 s later all are due (< 20 s).
            wait_for(lambda: max(left()) < 45, timeout=40, what="leases older than 15 s")
        finally:
            operator.stop()
        time.sleep(25)
        operator = start_operator(cluster, conduit)
        # Renewed (expiresAt moved past what the down time left), never re-issued.
        wait_for(lambda: min(left()) > 40, timeout=40, what="every lease renewed")
        items = leases(cluster, NS)
        assert {x["metadata"]["uid"] for x in items} == issued
        assert all(x["status"]["phase"] == "Active" for x in items)
    operator.stop()


def test_a_restarted_operator_writes_no_status_that_did_not_change(
    alone: Cluster, conduit: ConduitServer
) -> None:
    """Conditions come from the objects, not from the process: a new operator (a restart,
    a failover) finds the bot and the binding as it would have written them, writes nothing
    to the bot, and moves no lastTransitionTime; only the binding's count of a new pod."""
    cluster = alone

    def bot() -> dict[str, Any]:
        return cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, "steady-bot")

    def binding() -> dict[str, Any]:
        return cluster.custom.get_namespaced_custom_object(
            G, V, NS, resources.BINDING_PLURAL, "steady"
        )

    def status_writes(resource: str) -> int:
        return sum(
            1
            for (_, _, what, verb, _), _ in rbac.calls(cluster.plane, "operator")
            if what == resource and verb in ("patch", "update")
        )

    operator = start_operator(cluster, conduit)
    try:
        make_bot(cluster, conduit, "steady-bot")
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "steady", "steady-bot")
        make_pod(cluster, NS, "steady-0", node=None)
        wait_for(lambda: binding().get("status", {}).get("activeCredentials") == 1)
        wait_for(lambda: (c := condition(bot())) and c["status"] == "True")
    finally:
        operator.stop()
    bot_before, binding_before = bot(), binding()
    bot_writes = status_writes("phabricatorbots/status")
    time.sleep(1.1)  # a re-stamped lastTransitionTime (whole seconds) would now differ

    operator = start_operator(cluster, conduit)
    try:
        # A pod after the restart: once its lease is counted, the new operator has
        # reconciled the namespace; two recheck intervals more, and it has checked the bot.
        make_pod(cluster, NS, "steady-1", node=None)
        wait_for(lambda: binding().get("status", {}).get("activeCredentials") == 2)
        time.sleep(2 * settings_for(conduit).bot_recheck_interval + 1)
        bot_after, binding_after = bot(), binding()
    finally:
        operator.stop()
    assert bot_after["metadata"]["resourceVersion"] == bot_before["metadata"]["resourceVersion"]
    assert status_writes("phabricatorbots/status") == bot_writes
    assert binding_after["status"]["conditions"] == binding_before["status"]["conditions"]
    assert binding_after["status"]["matchedPods"] == 2


def test_a_restart_while_phabricator_is_down_revokes_nothing(
    alone: Cluster, conduit: ConduitServer
) -> None:
    """A verified bot goes Unknown while Phabricator is down, and keeps its leases. A new
    operator, started meanwhile, reads the same from the bot's status (TokenVerified) and
    keeps them too: no lease revoked, none re-issued, and a new pod is served."""
    cluster = alone

    def bot() -> dict[str, Any]:
        return cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, "dark-bot")

    operator = start_operator(cluster, conduit)
    try:
        make_bot(cluster, conduit, "dark-bot")
        label_namespace(cluster, NS)
        make_binding(cluster, NS, "dark", "dark-bot")
        make_pod(cluster, NS, "dark-0", node=None)
        wait_for(lambda: len(active_leases(cluster, NS)) == 1, what="the first lease")
        issued = {x["metadata"]["uid"] for x in active_leases(cluster, NS)}
        conduit.down = True
        wait_for(
            lambda: (c := condition(bot())) and c["status"] == "Unknown",
            what="the bot Unknown while Phabricator is down",
        )
    finally:
        operator.stop()
    try:
        operator = start_operator(cluster, conduit)
        try:
            make_pod(cluster, NS, "dark-1", node=None)
            wait_for(lambda: len(active_leases(cluster, NS)) == 2, what="the new pod's lease")
            # The new operator checks the bot again (still Unknown), twice over.
            recorded = operator.process.metrics  # type: ignore[attr-defined]
            wait_for(
                lambda: (
                    sum(
                        value
                        for labels, value in metrics.samples(recorded, "phabmesh_bot_checks_total")
                        if labels.get("result") == "PhabricatorUnavailable"
                    )
                    >= 2
                ),
                what="two checks of the bot by the new operator",
            )
            assert (c := condition(bot())) and c["status"] == "Unknown", c
            items = leases(cluster, NS)
        finally:
            operator.stop()
    finally:
        conduit.down = False
    assert issued < {x["metadata"]["uid"] for x in items}
    assert all(x["status"]["phase"] == "Active" for x in items), items
    assert (c := binding_condition(cluster, NS, "dark")) and c["status"] == "True", c
