"""Lease writes the API server refuses for a while: issue, renew and revoke each end right.

Faults are injected into the running operator's own Kubernetes client, after its quick
retries of one call (a 5xx or a 429 that outlasts them, a create whose answer is lost,
a conflict): the call fails as a longer outage would make it fail, and the operator must
try again later, until the lease is what the cluster says it should be.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phabmesh.dev import devcluster
from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube import Conflict, KubeClient
from phabmesh.kube.client import Unavailable
from phabmesh.processes.operator import OperatorProcess
from tests.integration.test_lease_policy import REFUSAL, _lease
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    bind,
    leases,
    make_pod,
    settings_for,
    time_of,
)
from tests.stack import Threaded

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Rule:
    method: str
    path_part: str  # the path contains it...
    times: int
    error: Exception
    after_the_call: bool = False  # the call reaches the API server; its answer is lost
    ends: str = ""  # ...and ends with this
    hits: int = 0


class Faults:
    """Fails the operator's client calls that match a rule, ``times`` times each."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self.real = client.request
        self.rules: list[Rule] = []
        self.lock = threading.Lock()
        client.request = self.request  # type: ignore[method-assign]

    def add(self, rule: Rule) -> Rule:
        with self.lock:
            self.rules.append(rule)
        return rule

    def remove(self) -> None:
        self.client.request = self.real  # type: ignore[method-assign]

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if (
                    rule.method == method
                    and rule.path_part in path
                    and path.endswith(rule.ends)
                    and rule.hits < rule.times
                ):
                    rule.hits += 1
                    return rule
        return None

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        rule = self._match(method, path)
        if rule is None:
            return await self.real(method, path, **kw)
        if rule.after_the_call:
            await self.real(method, path, **kw)
        raise rule.error


def server_error() -> Exception:
    return Unavailable(500, "InternalError", "injected: etcd timed out")


def too_many() -> Exception:
    return Unavailable(429, "TooManyRequests", "injected: priority and fairness")


def lost() -> Exception:
    return Unavailable(0, "ServerDisconnectedError", "injected: the answer never came")


@pytest.fixture
def faults(operator: Threaded) -> Iterator[Faults]:
    injector = Faults(operator.process.memo.client)  # type: ignore[attr-defined]
    yield injector
    injector.remove()


@pytest.fixture
def bound(cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str) -> str:
    # An hour: shortening it to 10 minutes makes the live lease due for renewal at once.
    bind(cluster, conduit, namespace, bot=f"wf-{namespace}", credentialTTL="1h")
    return namespace


def lease_path(namespace: str) -> str:
    return f"/namespaces/{namespace}/phabricatorcredentials"


@pytest.mark.parametrize(
    ("method", "part", "error", "after", "times"),
    [
        ("POST", "", server_error(), False, 3),  # the create, refused
        ("POST", "", too_many(), False, 3),
        # The create landed, its answer did not: the next create finds it, Active.
        ("POST", "", lost(), True, 1),
    ],
    ids=["create-500", "create-429", "create-lost"],
)
def test_issue_is_retried_until_the_pod_holds_its_lease(
    cluster: Cluster,
    faults: Faults,
    bound: str,
    method: str,
    part: str,
    error: Exception,
    after: bool,
    times: int,
) -> None:
    rule = faults.add(Rule(method, lease_path(bound), times, error, after, ends=part))
    make_pod(cluster, bound, "runner-0")
    held = wait_for(lambda: active_leases(cluster, bound), timeout=60, what="the lease, Active")
    assert rule.hits == times
    assert len(held) == 1
    assert held[0]["spec"]["podName"] == "runner-0"
    assert len(leases(cluster, bound)) == 1  # one lease, not one per attempt


def test_a_conflict_on_create_with_a_lease_being_deleted_is_retried(
    cluster: Cluster, faults: Faults, bound: str
) -> None:
    rule = faults.add(
        Rule("POST", lease_path(bound), 2, Conflict(409, "AlreadyExists", "injected"))
    )
    make_pod(cluster, bound, "runner-0")
    wait_for(lambda: active_leases(cluster, bound), timeout=60, what="the lease, Active")
    assert rule.hits == 2


def test_renewal_is_retried_until_it_lands(cluster: Cluster, faults: Faults, bound: str) -> None:
    make_pod(cluster, bound, "runner-0")
    (lease,) = wait_for(lambda: active_leases(cluster, bound), timeout=60)
    name = lease["metadata"]["name"]
    rule = faults.add(Rule("PATCH", f"{lease_path(bound)}/{name}", 3, server_error(), ends=name))
    # A shorter TTL renews live leases at once (down to now + TTL).
    cluster.custom.patch_namespaced_custom_object(
        G, V, bound, "phabricatorbindings", "runners", {"spec": {"credentialTTL": "10m"}}
    )
    limit = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=11)

    def renewed() -> bool:
        (current,) = active_leases(cluster, bound)
        return time_of(current["status"]["expiresAt"]) <= limit

    wait_for(renewed, timeout=60, what="the lease renewed to the shorter TTL")
    assert rule.hits == 3
    assert [x["metadata"]["uid"] for x in active_leases(cluster, bound)] == [
        lease["metadata"]["uid"]
    ]


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("PATCH", server_error()),  # marking it Revoked
        ("PATCH", too_many()),
        ("DELETE", server_error()),  # deleting it once Revoked
    ],
    ids=["status-500", "status-429", "delete-500"],
)
def test_revocation_is_retried_until_the_lease_is_gone(
    cluster: Cluster, faults: Faults, bound: str, method: str, error: Exception
) -> None:
    make_pod(cluster, bound, "runner-0")
    (lease,) = wait_for(lambda: active_leases(cluster, bound), timeout=60)
    name = lease["metadata"]["name"]
    rule = faults.add(Rule(method, f"{lease_path(bound)}/{name}", 3, error, ends=name))
    # The pod stays (no garbage collector to help): the binding no longer selects it.
    cluster.custom.patch_namespaced_custom_object(
        G,
        V,
        bound,
        "phabricatorbindings",
        "runners",
        {"spec": {"podSelector": {"matchLabels": {"app": "other"}}}},
    )
    wait_for(lambda: leases(cluster, bound) == [], timeout=60, what="the lease revoked, deleted")
    assert rule.hits == 3
    assert active_leases(cluster, bound) == []


def test_a_write_the_api_server_refuses_is_said_where_people_look(
    tmp_path: Path, conduit: ConduitServer
) -> None:
    """The operator run with an admin's kubeconfig instead of its ServiceAccount: the lease
    policy refuses every lease write. The pod says so (a Warning Event), `kubectl phabmesh
    why` names the refusal instead of "issuing", and `check` fails its lease-writes line."""
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        cluster = Cluster(plane)
        crds = str(REPO / "crds")
        plane.kubectl("apply", "--server-side", "-f", crds)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        plane.kubectl("apply", "-f", str(REPO / "manifests" / "lease-policy.yaml"))
        plane.kubectl("create", "namespace", SYSTEM)
        plane.kubectl("create", "namespace", "refused")
        plane.kubectl("create", "namespace", "probe")

        def in_force() -> bool:  # the API server takes a new policy in a moment after
            probe = _lease("probe", f"probe-{time.monotonic_ns()}")
            made = plane.kubectl("create", "-f", "-", input=json.dumps(probe), check=False)
            return made.returncode != 0 and REFUSAL in made.stderr

        wait_for(in_force, timeout=60, what="the lease policy to be in force")
        wait_for(lambda: cluster.core.list_namespaced_service_account("refused").items)
        as_admin = OperatorProcess(settings_for(conduit), kubeconfig=str(plane.kubeconfig))
        operator = Threaded(as_admin).start()
        try:
            wait_for(as_admin.ready, timeout=60, what="the operator")
            bind(cluster, conduit, "refused")
            make_pod(cluster, "refused", "runner-0", node=None)
            selector = "reason=CredentialWriteFailed,involvedObject.name=runner-0"
            events = cluster.core.list_namespaced_event
            said = wait_for(
                lambda: events("refused", field_selector=selector).items,
                what="the pod's Warning Event",
            )
            assert "may not create" in said[0].message and said[0].type == "Warning"
            assert not leases(cluster, "refused")

            def plugin(*args: str) -> Any:
                done = subprocess.run(
                    [sys.executable, "-m", "phabmesh.kubectl", "--kubeconfig",
                     str(plane.kubeconfig), *args, "-o", "json"],
                    capture_output=True, text=True, timeout=120, check=False,
                )  # fmt: skip
                return json.loads(done.stdout)

            why = plugin("why", "runner-0", "-n", "refused")
            assert why["reason"] == "IssuePending"
            assert "the API server refused its last write" in why["message"], why
            assert "may not create" in why["message"]
            writes = {c["check"]: c for c in plugin("check")["checks"]}["lease-writes"]
            assert writes["status"] == "FAIL" and "refused/runner-0" in writes["message"], writes
        finally:
            operator.stop()
