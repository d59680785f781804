"""The gateway as several worker processes on one port (PHABMESH_GATEWAY_WORKERS=2): calls
spread over the workers, every call counted by the parent's /metrics, a killed worker
replaced, readiness only with every worker ready, SIGTERM drains them all."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from phabmesh.dev.conduit import ConduitServer
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import active_leases, exchange, make_pod, pod_token, settings_for
from tests.stack import Threaded


@pytest.fixture
def workers(
    system: str, conduit: ConduitServer, operator: Threaded, phabmesh_rbac: rbac.Installed
) -> Iterator[Threaded]:
    from phabmesh.processes.gateway_workers import GatewayWorkers

    settings = settings_for(conduit).replace(gateway_workers=2, gateway_decode_workers=2)
    proc = Threaded(GatewayWorkers(settings, kubeconfig=phabmesh_rbac.kubeconfig("gateway")))
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def ready(proc: Threaded) -> bool:
    answer = requests.get(f"http://127.0.0.1:{proc.process.metrics_port}/readyz", timeout=10)  # type: ignore[attr-defined]
    return answer.status_code == 200


def samples(proc: Threaded, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples ``name`` of the parent's /metrics, by their labels."""
    text = requests.get(f"http://127.0.0.1:{proc.process.metrics_port}/metrics", timeout=10).text  # type: ignore[attr-defined]
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def allowed(proc: Threaded) -> float:
    return sum(
        value
        for labels, value in samples(proc, "phabmesh_gateway_requests_total").items()
        if ("decision", "allowed") in labels
    )


def call(proc: Threaded, token: str) -> dict[str, object]:
    """One call on a connection of its own (the kernel picks a worker per connection)."""
    answer = requests.post(
        f"http://127.0.0.1:{proc.process.port}/api/user.whoami",  # type: ignore[attr-defined]
        data={"api.token": token},
        headers={"Connection": "close"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    envelope: dict[str, object] = json.loads(answer.text)
    return envelope


def test_two_workers_share_the_port_and_are_supervised(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, workers: Threaded, bound: str
) -> None:
    parent = workers.process
    created = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    issued = exchange(operator, pod_token(cluster, bound, created))
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    conduit.add_token(f"bot-{bound}")
    wait_for(lambda: ready(workers), timeout=60, what="every worker to be ready")
    first = list(parent.pids)  # type: ignore[attr-defined]
    assert len(set(first)) == 2 and os.getpid() not in first

    # Each on a connection of its own: both workers serve (2^-39 odds of one taking all 40).
    for _ in range(40):
        answer = call(workers, credential)
        assert answer["error_code"] is None, answer
    per_worker = samples(workers, "phabmesh_gateway_worker_requests_total")
    assert per_worker[(("worker", "0"),)] > 0
    assert per_worker[(("worker", "1"),)] > 0
    assert allowed(workers) == 40

    # A forged credential: refused in Conduit's envelope, whichever worker took it.
    for _ in range(4):
        forged = call(workers, credential[:-4] + ("aaaa" if credential[-4:] != "aaaa" else "bbbb"))
        assert forged["error_code"] == "ERR-INVALID-AUTH"
        assert forged["result"] is None

    # A worker killed: not ready until it is replaced (a new process), counted, calls go on.
    assert allowed(workers) == 40  # scraped: what it counted is kept when it goes
    os.kill(first[0], signal.SIGKILL)
    wait_for(lambda: not ready(workers), timeout=10, what="the gateway unready without a worker")
    wait_for(
        lambda: parent.pids[0] not in (0, first[0]),  # type: ignore[attr-defined]
        timeout=60,
        what="the worker replaced",
    )
    wait_for(lambda: ready(workers), timeout=60, what="the replacement to be ready")
    assert parent.pids[1] == first[1]  # type: ignore[attr-defined]
    assert samples(workers, "phabmesh_gateway_worker_restarts_total") == {(): 1.0}
    for _ in range(20):
        assert call(workers, credential)["error_code"] is None
    assert allowed(workers) == 60  # the killed worker's 40-odd calls are still counted

    # SIGTERM drains: a call in flight when the gateway is told to stop is answered.
    before = conduit.calls["user.whoami"]
    conduit.delay = 1.0  # within the gateway's conduit_timeout (2 s)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(call, workers, credential) for _ in range(4)]
            # All 4 forwarded, each waiting for the test server's answer.
            wait_for(lambda: conduit.calls["user.whoami"] == before + 4, what="4 calls forwarded")
            workers.call(parent.stop)  # type: ignore[attr-defined]
            for future in pending:
                assert future.result(timeout=30)["error_code"] is None
    finally:
        conduit.delay = 0.0
    for pid in parent.pids:  # type: ignore[attr-defined]
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
