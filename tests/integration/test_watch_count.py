"""The operator process opens one watch per resource, shared by everything in it, as the API
server's audit log records them (each request carries the process's User-Agent,
``phabmesh/<version> (operator; <peering identity>)``)."""

from __future__ import annotations

import datetime
from collections import defaultdict
from typing import Any

from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube.client import user_agent
from phabmesh.processes.operator import OperatorProcess
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import settings_for
from tests.stack import Threaded

# What the operator process watches: the controller, the credential endpoint, the signing
# keys and the gateway Role keeper, all from these.
WATCHED = {
    "namespaces",
    "pods",
    "phabricatorbots",
    "phabricatorbindings",
    "phabricatorcredentials",
    "phabricatorwebhooks",
    "secrets",  # phabmesh's namespace: bot tokens and the signing keys
    "roles",  # the gateway's Secret-reading Role, by name
}


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _watches(cluster: Cluster, agent: str) -> dict[str, list[tuple[datetime.datetime, Any]]]:
    """Per resource, each watch request of ``agent``: (when received, when it ended or None)."""
    started: dict[str, tuple[str, datetime.datetime]] = {}
    ended: dict[str, datetime.datetime] = {}
    for event in cluster.plane.audit_events():
        if event.get("userAgent") != agent or event.get("verb") != "watch":
            continue
        ref: dict[str, Any] = event.get("objectRef") or {}  # type: ignore[assignment]
        audit_id = str(event["auditID"])
        started[audit_id] = (ref["resource"], _time(str(event["requestReceivedTimestamp"])))
        if event.get("stage") == "ResponseComplete":
            ended[audit_id] = _time(str(event["stageTimestamp"]))
    per_resource: dict[str, list[tuple[datetime.datetime, Any]]] = defaultdict(list)
    for audit_id, (resource, start) in started.items():
        per_resource[resource].append((start, ended.get(audit_id)))
    return per_resource


def _most_at_once(spans: list[tuple[datetime.datetime, Any]]) -> int:
    """The most of these watches open at one time."""
    edges = sorted(
        [(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans if end is not None],
        key=lambda edge: (edge[0], edge[1]),  # an end before a start at the same instant
    )
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_the_operator_process_opens_one_watch_per_resource(
    cluster: Cluster, conduit: ConduitServer, system: str, phabmesh_rbac: rbac.Installed
) -> None:
    # Watches renewed every 4 s: within seconds, each resource's watch has been replaced.
    settings = settings_for(conduit).replace(watch_liveness=6.0)
    process = OperatorProcess(settings, kubeconfig=phabmesh_rbac.kubeconfig("operator"))
    since = datetime.datetime.now(datetime.UTC)
    proc = Threaded(process).start()
    try:
        wait_for(process.ready, timeout=60, what="the operator ready")
        agent = user_agent(f"operator; {process.peering_identity}")

        def renewed() -> dict[str, list[tuple[datetime.datetime, Any]]] | None:
            watches = _watches(cluster, agent)
            done = set(watches) >= WATCHED and all(
                sum(1 for _, end in watches[r] if end is not None) >= 2 for r in WATCHED
            )
            return watches if done else None

        watches = wait_for(renewed, timeout=60, what="every watch renewed twice")
    finally:
        proc.stop()
    assert set(watches) == WATCHED, sorted(watches)
    at_once = {resource: _most_at_once(spans) for resource, spans in watches.items()}
    assert at_once == dict.fromkeys(WATCHED, 1), at_once
    # kopf (start, stop and, with replicas, peering) watches nothing alone: not the CRDs.
    kopf = {
        (event.get("objectRef") or {}).get("resource")  # type: ignore[attr-defined]
        for event in cluster.plane.audit_events()
        if str(event.get("userAgent", "")).startswith("kopf/")
        and event.get("verb") == "watch"
        and _time(str(event["requestReceivedTimestamp"])) >= since
    }
    assert kopf == set(), kopf
