"""Metrics: bounded labels, one series per object, per-process registries, scrape-time gauges."""

from __future__ import annotations

import asyncio
import datetime
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
from prometheus_client import generate_latest

from phabmesh import harbormaster, herald, metrics, resources
from phabmesh.clock import format_time
from phabmesh.controller import bots, peering
from phabmesh.controller.driver import Work, WorkQueue
from phabmesh.endpoint import app as endpoint_app
from phabmesh.gateway import app as gateway_app
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer, resource_of
from phabmesh.leases import reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, World
from tests.fakeapi import FakeAPI

NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)


def sample(m: metrics.Metrics, name: str, **labels: str) -> float | None:
    for found, value in metrics.samples(m, name):
        if found == labels:
            return value
    return None


def series(m: metrics.Metrics, name: str) -> list[dict[str, str]]:
    return [labels for labels, _ in metrics.samples(m, name)]


def _constants(module: object) -> set[str]:
    return {
        value
        for name, value in inspect.getmembers(module)
        if name.isupper() and isinstance(value, str)
    }


# -- enumerations ---------------------------------------------------------------------------


def test_the_enumerations_hold_every_reason_the_code_defines() -> None:
    bot_reasons = {
        bots.VERIFIED,
        bots.SECRET_MISSING,
        bots.SECRET_KEY_MISSING,
        bots.TOKEN_INVALID,
        bots.USERNAME_MISMATCH,
        bots.NOT_A_BOT,
        bots.DISABLED,
        bots.UNAVAILABLE,
        bots.INVALID_SPEC,
    }
    assert bot_reasons == _constants(bots)
    assert bot_reasons == metrics.BOT_REASONS
    binding_reasons = {
        reasons.READY,
        reasons.INVALID_SPEC,
        reasons.INVALID_SUBJECTS,
        reasons.BOT_NOT_READY,
        reasons.BOT_NOT_ALLOWED,
    }
    assert binding_reasons == metrics.BINDING_REASONS
    assert metrics.REVOCATION_REASONS == resources.REVOCATION_REASONS
    # Every way a Herald delivery is refused for what it carries is an outcome of its own.
    assert set(herald.STATUSES) < metrics.HOOK_OUTCOMES
    # And every way a Harbormaster build step's call is.
    assert harbormaster.REASONS < metrics.HOOK_OUTCOMES


def test_a_hook_delivery_is_counted_and_timed_by_a_bounded_outcome() -> None:
    m = metrics.Metrics(metrics.GATEWAY)
    m.hook_delivered("herald", "delivered", 0.01)
    m.hook_delivered("herald", "stale", 0.001)
    m.hook_delivered("herald", "ns/a-webhook-name", 0.001)  # never a label of its own
    m.hook_delivered("ns/name", "unknown_target", 0.001)  # nor a source
    h = {"source": "herald"}
    assert sample(m, "phabmesh_hook_deliveries_total", **h, outcome="delivered") == 1
    assert sample(m, "phabmesh_hook_deliveries_total", **h, outcome="stale") == 1
    assert sample(m, "phabmesh_hook_deliveries_total", **h, outcome="other") == 1
    assert (
        sample(m, "phabmesh_hook_deliveries_total", source="other", outcome="unknown_target") == 1
    )
    assert sample(m, "phabmesh_hook_delivery_seconds_count", **h, outcome="delivered") == 1
    assert sample(m, "phabmesh_hook_delivery_seconds_sum", **h, outcome="delivered") == 0.01


def test_a_value_outside_its_enumeration_is_counted_as_other() -> None:
    m = metrics.Metrics()
    m.lease_revoked("PodDeleted")
    m.lease_revoked("made up by someone")
    m.credential_refused("invalid_token")
    m.credential_refused("x" * 300)
    m.gateway_refused("BindingDeleted")
    m.gateway_refused("whatever a lease's status.reason says")
    m.bot_checked(False, "TokenInvalid")
    m.bot_checked(False, "NewReason")
    m.bot_checked(True, "Verified")
    assert sample(m, "phabmesh_leases_revoked_total", reason="PodDeleted") == 1
    assert sample(m, "phabmesh_leases_revoked_total", reason="other") == 1
    assert sample(m, "phabmesh_credential_refusals_total", reason="invalid_token") == 1
    assert sample(m, "phabmesh_credential_refusals_total", reason="other") == 1
    assert sample(m, "phabmesh_gateway_refusals_total", reason="BindingDeleted") == 1
    assert sample(m, "phabmesh_gateway_refusals_total", reason="other") == 1
    assert {labels["result"] for labels in series(m, "phabmesh_bot_checks_total")} == {
        "TokenInvalid",
        "other",
        "Ready",
    }


# -- one series per object ------------------------------------------------------------------


def test_a_bot_has_one_series_which_follows_its_reason_and_goes_with_it() -> None:
    m = metrics.Metrics()
    m.bot_status("ci", False, "SecretMissing")
    assert series(m, "phabmesh_bot_ready") == [{"bot": "ci", "reason": "SecretMissing"}]
    assert sample(m, "phabmesh_bot_ready", bot="ci", reason="SecretMissing") == 0
    m.bot_status("ci", True, "Verified")
    m.bot_status("ci", True, "Verified")
    m.bot_status("deploy", False, "Unheard-of")
    assert sorted(series(m, "phabmesh_bot_ready"), key=str) == [
        {"bot": "ci", "reason": "Verified"},
        {"bot": "deploy", "reason": "other"},
    ]
    assert sample(m, "phabmesh_bot_ready", bot="ci", reason="Verified") == 1
    m.bot_gone("ci")
    m.bot_gone("never-seen")
    assert series(m, "phabmesh_bot_ready") == [{"bot": "deploy", "reason": "other"}]


def test_a_binding_has_one_series_which_follows_its_reason_and_goes_with_it() -> None:
    m = metrics.Metrics()
    m.binding_status("build", "runners", False, reasons.BOT_NOT_READY)
    m.binding_status("build", "runners", True, reasons.READY)
    m.binding_status("other", "runners", False, reasons.BOT_NOT_ALLOWED)
    assert sample(m, "phabmesh_binding_ready", namespace="build", binding="runners", reason="Ready")
    assert len(series(m, "phabmesh_binding_ready")) == 2
    m.binding_gone("build", "runners")
    assert series(m, "phabmesh_binding_ready") == [
        {"namespace": "other", "binding": "runners", "reason": "BotNotAllowed"}
    ]


# -- per-process registries -----------------------------------------------------------------


def test_each_process_serves_only_its_own_metrics() -> None:
    operator, gateway = metrics.Metrics(metrics.OPERATOR), metrics.Metrics(metrics.GATEWAY)
    operator.lease_issued()
    gateway.gateway_refused("invalid")
    operator_text = generate_latest(operator.registry).decode()
    gateway_text = generate_latest(gateway.registry).decode()
    assert "phabmesh_leases_issued_total 1.0" in operator_text
    assert "phabmesh_gateway_" not in operator_text
    assert 'phabmesh_gateway_refusals_total{reason="invalid"} 1.0' in gateway_text
    assert "phabmesh_leases_" not in gateway_text
    assert (
        "phabmesh_watch_connected" in operator_text and "phabmesh_watch_connected" in gateway_text
    )
    assert "process_cpu_seconds_total" in operator_text  # the usual process metrics as well


def test_each_task_tree_records_into_the_metrics_its_process_chose() -> None:
    first, second = metrics.Metrics(), metrics.Metrics()

    async def process(chosen: metrics.Metrics, times: int) -> None:
        metrics.use(chosen)

        async def child() -> None:
            metrics.current().lease_issued()

        await asyncio.gather(*(asyncio.create_task(child()) for _ in range(times)))
        await asyncio.to_thread(lambda: metrics.current().lease_issued())

    async def both() -> None:
        await asyncio.gather(process(first, 2), process(second, 5))

    asyncio.run(both())
    assert sample(first, "phabmesh_leases_issued_total") == 3
    assert sample(second, "phabmesh_leases_issued_total") == 6
    assert metrics.current() is metrics.DEFAULT  # this context chose nothing


# -- scrape-time gauges ---------------------------------------------------------------------


class _Watch:
    def __init__(self, resource: str, healthy: bool, alive_at: float) -> None:
        self.resource, self.healthy, self.alive_at = resource, healthy, alive_at


def test_watches_of_a_resource_are_connected_only_together_and_as_fresh_as_the_stalest() -> None:
    m = metrics.Metrics()
    kept = [
        _Watch("bindings", True, 200.0),
        _Watch("bindings", True, 150.0),
        _Watch("leases", True, 300.0),
        _Watch("namespaces", False, 0.0),
        _Watch("other", True, 1.0),  # not a reported resource
    ]
    for watch in kept:
        m.watches.add(watch)
    connected = {
        labels["resource"]: v for labels, v in metrics.samples(m, "phabmesh_watch_connected")
    }
    assert connected == {"bindings": 1.0, "leases": 1.0, "namespaces": 0.0}
    resync = dict(
        (labels["resource"], v)
        for labels, v in metrics.samples(m, "phabmesh_watch_last_resync_timestamp_seconds")
    )
    assert resync == {"bindings": 150.0, "leases": 300.0, "namespaces": 0.0}
    kept[0].healthy = False
    assert sample(m, "phabmesh_watch_connected", resource="bindings") == 0.0


class _OneList(FakeAPI):
    """Lists one object; its watch is accepted, sends a bookmark, then stays quiet."""

    def __init__(self) -> None:
        super().__init__()
        self.bookmarked = asyncio.Event()

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        return [{"metadata": {"name": "a", "resourceVersion": "5"}}], "5"

    async def stream(self, opened: Callable[[], None]) -> AsyncIterator[JSON]:
        opened()
        yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}
        self.bookmarked.set()
        await asyncio.Event().wait()


def test_an_informer_reports_its_resource_and_when_it_was_last_alive() -> None:
    m = metrics.Metrics()

    async def scenario() -> tuple[float, float, float]:
        metrics.use(m)
        client = _OneList()
        informer: Informer[Any] = Informer(
            client,  # type: ignore[arg-type]
            "/apis/phabmesh.io/v1alpha1/phabricatorcredentials",
            lambda obj: obj,
        )
        before = sample(m, "phabmesh_watch_connected", resource="leases")
        task = asyncio.create_task(informer.run())
        try:
            await asyncio.wait_for(client.bookmarked.wait(), timeout=10)
            listed_at = informer.alive_at
            assert listed_at > 0
            connected = sample(m, "phabmesh_watch_connected", resource="leases")
            resync = sample(m, "phabmesh_watch_last_resync_timestamp_seconds", resource="leases")
            assert before == 0.0 and connected is not None and resync is not None
            return connected, resync, listed_at
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    connected, resync, listed_at = asyncio.run(scenario())
    assert connected == 1.0
    assert resync == listed_at


def test_paths_name_the_resources_of_the_watch_metrics() -> None:
    assert resource_of("/api/v1/pods") == "pods"
    assert resource_of("/api/v1/namespaces/phabmesh-system/secrets") == "secrets"
    assert resource_of("/api/v1/namespaces") == "namespaces"
    assert resource_of("/apis/phabmesh.io/v1alpha1/namespaces/x/phabricatorcredentials") == "leases"
    assert resource_of("/apis/phabmesh.io/v1alpha1/phabricatorbindings") == "bindings"
    assert resource_of("/apis/phabmesh.io/v1alpha1/phabricatorbots") == "bots"
    assert resource_of("/apis/kopf.dev/v1/clusterkopfpeerings") == "other"


def _lease(name: str, binding: str, phase: str, expires: datetime.datetime) -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {"name": name, "namespace": "build", "uid": name},
            "spec": {"podUID": f"pod-{name}", "podName": name, "binding": binding, "bot": "ci"},
            "status": {"phase": phase, "expiresAt": format_time(expires)},
        }
    )


def _binding(name: str) -> BindingView:
    return BindingView.from_body(
        {"metadata": {"namespace": "build", "name": name, "uid": name}, "spec": {}}
    )


def test_active_leases_count_per_binding_neither_revoked_nor_expired_ones() -> None:
    m = metrics.Metrics()
    world = World()
    m.active_leases.track(world)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
    earlier = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    world.put_binding(_binding("runners"))
    world.put_binding(_binding("idle"))
    world.put_lease(_lease("a", "runners", "Active", later))
    world.put_lease(_lease("b", "runners", "Active", later))
    world.put_lease(_lease("c", "runners", "Revoked", later))
    world.put_lease(_lease("d", "runners", "Active", earlier))  # expired
    world.put_lease(_lease("e", "deleted", "Active", later))  # its binding is gone
    assert {
        (labels["binding"], v) for labels, v in metrics.samples(m, "phabmesh_leases_active")
    } == {("runners", 2.0), ("idle", 0.0), ("deleted", 1.0)}
    world.drop_binding(("build", "idle"))
    assert sample(m, "phabmesh_leases_active", namespace="build", binding="idle") is None


def test_the_gauges_read_at_scrape_time_follow_their_source() -> None:
    m = metrics.Metrics()
    state = {"failing": True, "acting": False}
    m.fail_closed_from(lambda: state["failing"])
    m.acting_from(lambda: state["acting"])
    assert sample(m, "phabmesh_gateway_fail_closed") == 1.0
    assert sample(m, "phabmesh_operator_acting") == 0.0
    state.update(failing=False, acting=True)
    assert sample(m, "phabmesh_gateway_fail_closed") == 0.0
    assert sample(m, "phabmesh_operator_acting") == 1.0


def test_expiry_times_are_unix_seconds() -> None:
    m = metrics.Metrics()
    m.webhook_certificate_expires(NOW)
    m.signing_key_due(NOW + datetime.timedelta(days=1))
    assert sample(m, "phabmesh_webhook_certificate_expiry_timestamp_seconds") == NOW.timestamp()
    assert sample(m, "phabmesh_signing_key_rotation_due_timestamp_seconds") == (
        NOW.timestamp() + 86400
    )


# -- kopf peering, read back ------------------------------------------------------------------


def _peering(**entries: tuple[int, datetime.datetime, int]) -> JSON:
    return {
        "metadata": {"name": "phabmesh"},
        "status": {
            identity: {"priority": prio, "lastseen": seen.isoformat(), "lifetime": life}
            for identity, (prio, seen, life) in entries.items()
        },
    }


@pytest.mark.parametrize(
    ("others", "acts"),
    [
        ({}, True),  # alone
        ({"b": (5, NOW, 60)}, True),  # a lower priority
        ({"b": (20, NOW, 60)}, False),  # a higher priority, alive
        ({"b": (10, NOW, 60)}, False),  # the same priority: kopf pauses both
        ({"b": (20, NOW - datetime.timedelta(seconds=61), 60)}, True),  # higher, but dead
        ({"b": (5, NOW, 60), "c": (30, NOW, 60)}, False),
    ],
)
def test_a_replica_acts_while_no_live_peer_outranks_it(
    others: dict[str, tuple[int, datetime.datetime, int]], acts: bool
) -> None:
    listed = peering.peers(_peering(a=(10, NOW, 60), **others))
    assert peering.acting(listed, "a", 10, NOW) is acts


def test_malformed_peer_entries_are_skipped() -> None:
    obj: JSON = {
        "status": {
            "x": "not a mapping",
            "y": {"priority": "high", "lastseen": NOW.isoformat()},
            "z": {"priority": 3},
            "ok": {"priority": 3, "lastseen": "2026-01-01T12:00:00", "lifetime": 30},
        }
    }
    (peer,) = peering.peers(obj)
    assert peer.identity == "ok"
    assert peer.deadline == NOW + datetime.timedelta(seconds=30)


# -- refusal reasons at their sources -----------------------------------------------------------


def test_gateway_refusals_carry_a_reason_from_the_enumeration() -> None:
    revoked = gateway_app._revoked(resources.POD_DELETED)
    assert (revoked.decision, revoked.reason) == ("revoked", "PodDeleted")
    assert revoked.info == "credential revoked: pod deleted"  # the caller's words as before
    expired = gateway_app._revoked("LeaseExpired", "lease expired")
    assert expired.info == "credential revoked: lease expired"
    plain = gateway_app.Refusal("ERR-INVALID-SESSION", "no", "no_credential")
    for refusal in (revoked, expired, plain, gateway_app._unconfirmed()):
        assert refusal.reason in metrics.GATEWAY_REFUSALS


def test_credential_endpoint_refusals_say_why_for_the_metrics() -> None:
    assert endpoint_app._error(401, "invalid_token", "x")[endpoint_app.REFUSAL] == "invalid_token"
    refused = endpoint_app._error(403, "no_lease", "x", reason=resources.BINDING_DELETED)
    assert refused[endpoint_app.REFUSAL] == "BindingDeleted"
    assert refused[endpoint_app.REFUSAL] in metrics.CREDENTIAL_REFUSALS


def test_the_work_queue_says_how_much_waits_and_what_it_handled() -> None:
    m = metrics.Metrics()
    seen: list[float | None] = []

    async def handle(work: Work, _data: object) -> None:
        seen.append(sample(m, "phabmesh_controller_work_waiting"))

    async def run() -> None:
        metrics.use(m)
        queue = WorkQueue(handle, workers=1)
        for uid in ("a", "b", "a"):  # "a" twice: its work once
            queue.put(Work("pod", uid))
        queue.put(Work("judge", "build"))
        queue.put(Work("bogus", "x"))
        assert sample(m, "phabmesh_controller_work_waiting") == 4
        workers = asyncio.create_task(queue.run())
        queue.open()
        while queue.handled < 4:
            await asyncio.sleep(0.01)
        workers.cancel()
        await asyncio.gather(workers, return_exceptions=True)

    asyncio.run(run())
    assert seen == [3, 2, 1, 0]  # read as each was handled: what still waited
    assert sample(m, "phabmesh_controller_work_waiting") == 0
    assert sample(m, "phabmesh_controller_work_handled_total", kind="pod") == 2
    assert sample(m, "phabmesh_controller_work_handled_total", kind="judge") == 1
    assert sample(m, "phabmesh_controller_work_handled_total", kind="other") == 1
