"""Gateway._admit: which refusals of a young credential wait for the watches, and how long.

The judging itself is replaced (fault injection): each test says what the watches show at
each turn, and counts the turns."""

from __future__ import annotations

import asyncio
import datetime
from types import SimpleNamespace
from typing import Any

import pytest

from phabmesh import metrics
from phabmesh.gateway import app
from phabmesh.gateway.app import Caller, Gateway, Refusal
from phabmesh.gateway.state import Changes
from phabmesh.settings import Settings

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _caller(age: float | None) -> Caller:
    issued = None if age is None else NOW - datetime.timedelta(seconds=age)
    return Caller("id", "ns", "pod", "uid", "b", "bot", "lease", "jwt", NOW, issued)


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def recorded() -> metrics.Metrics:
    """A registry of the test's own; each test uses it in its context."""
    return metrics.Metrics(metrics.GATEWAY)


def _gateway(clock: _Clock, verdicts: list[Refusal | str]) -> tuple[Gateway, Changes, list[int]]:
    """A gateway whose judging answers ``verdicts`` in turn (a Refusal is raised)."""
    changes = Changes()
    gateway = Gateway(
        Settings.local("http://127.0.0.1:9"),
        state=SimpleNamespace(changes=changes),  # type: ignore[arg-type]
        clock=clock,
    )
    turns = [0]

    def judge(_request: Any, _claims: Caller, _method: str) -> str:
        verdict = verdicts[min(turns[0], len(verdicts) - 1)]
        turns[0] += 1
        if isinstance(verdict, Refusal):
            raise verdict
        return verdict

    gateway._judge = judge  # type: ignore[method-assign]
    return gateway, changes, turns


def _missing() -> Refusal:
    return Refusal("ERR-INVALID-AUTH", "no token yet", "bot_token_missing", settling=True)


def _count(recorded: metrics.Metrics, outcome: str) -> float:
    value = recorded.registry.get_sample_value(
        "phabmesh_gateway_catch_ups_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_a_young_credential_waits_for_the_watches_and_is_served(
    recorded: metrics.Metrics,
) -> None:
    metrics.use(recorded)
    gateway, changes, turns = _gateway(_Clock(), [_missing(), _missing(), "token"])
    call = asyncio.create_task(gateway._admit(None, _caller(1.0), "user.whoami"))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not call.done() and gateway._catching_up == 1
    changes.notify()  # a watch moved: judged again, still missing
    for _ in range(20):
        await asyncio.sleep(0)
    assert not call.done() and turns[0] == 2
    changes.notify()
    assert await call == "token"
    assert gateway._catching_up == 0
    assert _count(recorded, "served") == 1


async def test_a_refusal_no_watch_can_lift_or_an_old_credential_does_not_wait(
    recorded: metrics.Metrics,
) -> None:
    metrics.use(recorded)
    revoked = Refusal("ERR-INVALID-AUTH", "credential revoked: pod deleted", "revoked")
    for verdict, age in (
        (revoked, 0.0),
        (_missing(), app.CATCH_UP_SECONDS + 1),
        (_missing(), None),
    ):
        gateway, _, turns = _gateway(_Clock(), [verdict])
        with pytest.raises(Refusal) as refused:
            await gateway._admit(None, _caller(age), "user.whoami")  # type: ignore[arg-type]
        assert refused.value is verdict and turns[0] == 1
    assert recorded.registry.get_sample_value(
        "phabmesh_gateway_catch_ups_total", {"outcome": "refused"}
    ) in (None, 0.0)


async def test_a_wait_ends_when_the_credential_is_no_longer_young(
    recorded: metrics.Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.use(recorded)
    monkeypatch.setattr(app, "CATCH_UP_SECONDS", 0.05)  # seconds from its issue
    gateway, _, turns = _gateway(_Clock(), [_missing()])
    gateway.clock = lambda: NOW + datetime.timedelta(seconds=loop.time() - started)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Refusal) as refused:
        await asyncio.wait_for(gateway._admit(None, _caller(0.0), "user.whoami"), 5)  # type: ignore[arg-type]
    assert refused.value.reason == "bot_token_missing"
    assert turns[0] >= 2  # judged again once the wait ran out
    assert _count(recorded, "refused") == 1


async def test_past_the_waiting_bound_a_young_credential_is_refused_at_once(
    recorded: metrics.Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.use(recorded)
    monkeypatch.setattr(app, "MAX_CATCHING_UP", 2)
    gateway, _, _ = _gateway(_Clock(), [_missing()])
    waiting = [
        asyncio.create_task(gateway._admit(None, _caller(0.0), "m"))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    await asyncio.sleep(0)
    assert gateway._catching_up == 2
    with pytest.raises(Refusal):
        await gateway._admit(None, _caller(0.0), "m")  # type: ignore[arg-type]
    assert _count(recorded, "crowded") == 1
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert gateway._catching_up == 0  # a caller that went away leaves no place taken


async def test_a_flood_of_events_wakes_the_waiters_once_per_gap() -> None:
    changes = Changes(gap=3600)  # no second wake due within the test but the one it makes
    wakes = 0

    async def waiter() -> None:
        nonlocal wakes
        while True:
            await changes.wait(3600)
            wakes += 1

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    changes.notify()  # the first wake comes at once
    for _ in range(1000):  # the next ones wait for the gap, all of them together
        await asyncio.sleep(0)
        changes.notify()
    assert wakes == 1
    due = changes._wake_later
    assert due is not None
    due.cancel()
    changes._wake()  # as the timer does when the gap is over
    for _ in range(5):
        await asyncio.sleep(0)
    assert wakes == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
