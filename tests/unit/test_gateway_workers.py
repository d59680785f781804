"""How the gateway's parent merges its workers' metrics (phabmesh.processes.gateway_workers)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from phabmesh import metrics
from phabmesh.processes.gateway_workers import Merged, requests_counted, worker_settings
from phabmesh.settings import Settings


def exposition(calls: int, connected: bool, fail_closed: bool) -> str:
    m = metrics.Metrics(metrics.GATEWAY)
    for _ in range(calls):
        m.gateway_requests.labels(method="user.whoami", decision="allowed").inc()
        m.gateway_latency.labels(decision="allowed").observe(0.002)
    m.fail_closed_from(lambda: fail_closed)
    text = generate_latest(m.registry).decode()
    watch = f'phabmesh_watch_connected{{resource="leases"}} {1.0 if connected else 0.0}\n'
    return text + "# TYPE phabmesh_watch_connected gauge\n" + watch


def values(merged: Merged) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(merged)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


ALLOWED = ("phabmesh_gateway_requests_total", (("decision", "allowed"), ("method", "user.whoami")))


def test_counters_and_histograms_are_summed_gauges_take_the_worst_worker() -> None:
    merged = Merged()
    merged.add(exposition(3, connected=True, fail_closed=False))
    merged.add(exposition(4, connected=False, fail_closed=True))
    got = values(merged)
    assert got[ALLOWED] == 7
    assert got[("phabmesh_gateway_request_seconds_count", (("decision", "allowed"),))] == 7
    assert got[("phabmesh_gateway_fail_closed", ())] == 1  # the highest: one worker fails
    assert got[("phabmesh_watch_connected", (("resource", "leases"),))] == 0  # the lowest


def test_an_exited_workers_counts_are_kept_its_gauges_are_not() -> None:
    retired = Merged()
    retired.add(exposition(5, connected=False, fail_closed=True), counted_only=True)
    merged = Merged()
    merged.add(exposition(2, connected=True, fail_closed=False))
    merged.merge(retired)
    got = values(merged)
    assert got[ALLOWED] == 7
    assert got[("phabmesh_gateway_fail_closed", ())] == 0
    assert got[("phabmesh_watch_connected", (("resource", "leases"),))] == 1
    assert requests_counted(exposition(2, True, False)) == 2


def test_each_worker_gets_the_shared_ports_and_a_share_of_the_decoders() -> None:
    settings = Settings.local("http://127.0.0.1:1", gateway_workers=3, gateway_decode_workers=4)
    each = worker_settings(settings, 8080, 8081)
    assert (each.gateway_port, each.hooks_port, each.metrics_port) == (8080, 8081, 0)
    assert each.gateway_workers == 1
    assert each.gateway_decode_workers == 1


def test_no_workers_is_refused_with_the_variable_named() -> None:
    with pytest.raises(ValueError, match="PHABMESH_GATEWAY_WORKERS: must be 1 or more"):
        Settings.from_env({"PHABMESH_GATEWAY_WORKERS": "0"})


def test_a_worker_that_keeps_exiting_is_restarted_after_the_retry_policys_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its pauses double from PHABMESH_RETRY_FIRST while it exits soon after each start
    (a replacement that could not start counts as one more), as every retry of phabmesh."""
    import asyncio
    import types

    from phabmesh.processes import gateway_workers

    settings = Settings().replace(gateway_workers=2, retry_first=0.5, retry_cap=4.0)
    parent = gateway_workers.GatewayWorkers(settings)
    pauses: list[float] = []
    installed: list[int] = []
    attempts = {"left": 1}  # the first replacement fails to start
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        pauses.append(delay)
        await real_sleep(0)

    async def exited(process: object) -> None:
        return None

    def fake_worker(slot: int) -> gateway_workers.Worker:
        process = types.SimpleNamespace(pid=1, exitcode=1)
        pipe = types.SimpleNamespace(close=lambda: None)
        return gateway_workers.Worker(slot, process, pipe, 0)  # type: ignore[arg-type]

    async def spawn(slot: int) -> gateway_workers.Worker:
        if attempts["left"]:
            attempts["left"] -= 1
            raise OSError("no more processes")
        return fake_worker(slot)

    def install(worker: gateway_workers.Worker) -> None:
        installed.append(worker.slot)

    monkeypatch.setattr(gateway_workers.asyncio, "sleep", sleep)
    monkeypatch.setattr(gateway_workers, "_exited", exited)
    monkeypatch.setattr(parent, "_spawn", spawn)
    monkeypatch.setattr(parent, "_install", install)
    asyncio.run(parent._supervise(fake_worker(1)))
    assert installed == [1]
    assert len(pauses) == 2
    assert 0.25 <= pauses[0] <= 0.5  # the first pause: half of to all of the first
    assert 0.5 <= pauses[1] <= 1.0  # then doubled
