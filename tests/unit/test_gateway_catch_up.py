"""Gateway._admit: which refusals of a young credential wait for the watches, and how long.

The judging itself is replaced (fault injection): each test says what the watches show at
each turn, and counts the turns."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from phabmesh import metrics
from phabmesh.gateway import app
from phabmesh.gateway.app import HELD, Caller, Gateway, Refusal
from phabmesh.gateway.budget import Held
from phabmesh.gateway.state import Changes
from phabmesh.settings import Settings

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _caller(age: float | None, pod: str = "uid") -> Caller:
    issued = None if age is None else NOW - datetime.timedelta(seconds=age)
    return Caller("id", "ns", "pod", pod, "b", "bot", "lease", "jwt", NOW, issued)


class _Request(dict[Any, Any]):
    """What _admit reads of a request: its budgets' holder and its connection."""

    def __init__(self, source: str = "a") -> None:
        super().__init__({HELD: Held(source)})
        self.closing = False
        self.transport = SimpleNamespace(is_closing=lambda: self.closing)


class _Judged:
    """A gateway whose judging answers ``verdicts`` in turn (a Refusal is raised)."""

    def __init__(
        self,
        verdicts: list[Refusal | str],
        clock: Callable[[], datetime.datetime] = lambda: NOW,
        ended: Callable[[str], str | None] = lambda _uid: None,
    ) -> None:
        self.changes = Changes(gap=0)
        state = SimpleNamespace(changes=self.changes, pod_ended=ended)
        self.gateway = Gateway(Settings.local("http://127.0.0.1:9"), state=state, clock=clock)  # type: ignore[arg-type]
        self.turns = 0
        self.verified = 0

        def judge(_request: Any, _claims: Caller, _method: str) -> str:
            verdict = verdicts[min(self.turns, len(verdicts) - 1)]
            self.turns += 1
            if isinstance(verdict, Refusal):
                raise verdict
            return verdict

        def verify(_credential: str) -> Caller:
            self.verified += 1
            return self.caller

        self.caller = _caller(0.0)
        self.gateway._judge = judge  # type: ignore[method-assign]
        self.gateway._verify = verify  # type: ignore[method-assign]

    def admit(self, caller: Caller, request: _Request | None = None) -> Any:
        self.caller = caller
        return self.gateway._admit(request or _Request(), "credential", caller, "user.whoami")  # type: ignore[arg-type]


def _missing() -> Refusal:
    return Refusal("ERR-INVALID-AUTH", "no token yet", "bot_token_missing", settling=True)


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.fixture
def recorded() -> metrics.Metrics:
    """A registry of the test's own; each test uses it in its context."""
    return metrics.Metrics(metrics.GATEWAY)


def _count(recorded: metrics.Metrics, outcome: str) -> float:
    value = recorded.registry.get_sample_value(
        "phabmesh_gateway_catch_ups_total", {"outcome": outcome}
    )
    return value or 0.0


async def test_a_young_credential_waits_for_the_watches_and_is_served(
    recorded: metrics.Metrics,
) -> None:
    metrics.use(recorded)
    judged = _Judged([_missing(), _missing(), "token"])
    call = asyncio.create_task(judged.admit(_caller(1.0)))
    await _turns()
    assert not call.done() and judged.gateway._catching_up == 1
    judged.changes.notify()  # a watch moved: verified and judged again, still missing
    await _turns()
    assert not call.done() and (judged.turns, judged.verified) == (2, 1)
    judged.changes.notify()
    assert await call == "token"
    assert judged.gateway._catching_up == 0 and not judged.gateway._catching_up_from
    assert _count(recorded, "served") == 1


async def test_a_refusal_no_watch_can_lift_an_old_credential_or_an_ended_pod_does_not_wait(
    recorded: metrics.Metrics,
) -> None:
    metrics.use(recorded)
    revoked = Refusal("ERR-INVALID-AUTH", "credential revoked: pod deleted", "revoked")
    for verdict, caller, ended in (
        (revoked, _caller(0.0), None),
        (_missing(), _caller(app.CATCH_UP_SECONDS + 1), None),
        (_missing(), _caller(None), None),
        (_missing(), _caller(0.0), "PodDeleted"),
    ):
        judged = _Judged([verdict], ended=lambda _uid, e=ended: e)  # type: ignore[misc]
        with pytest.raises(Refusal) as refused:
            await judged.admit(caller)
        assert refused.value is verdict and judged.turns == 1
    assert _count(recorded, "refused") == 0


async def test_a_wait_ends_when_the_credential_is_no_longer_young_whatever_its_clock(
    recorded: metrics.Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is measured from the first refusal on the gateway's own clock: a credential
    whose issue time is ahead of the gateway's clock (within the skew its verification
    allows), or a wall clock that stands still or steps back, waits no longer."""
    metrics.use(recorded)
    monkeypatch.setattr(app, "CATCH_UP_SECONDS", 0.05)
    for age in (0.0, -30.0):  # issued now; issued 30 s "later" than the gateway's now
        judged = _Judged([_missing()])  # the wall clock stands still at NOW
        with pytest.raises(Refusal) as refused:
            await asyncio.wait_for(judged.admit(_caller(age)), 5)
        assert refused.value.reason == "bot_token_missing"
        assert judged.turns == 2  # judged again once, when the wait ran out
    assert _count(recorded, "refused") == 2


async def test_a_call_whose_caller_went_away_is_not_forwarded(recorded: metrics.Metrics) -> None:
    metrics.use(recorded)
    judged = _Judged([_missing(), "token"])
    request = _Request()
    call = asyncio.create_task(judged.admit(_caller(0.0), request))
    await _turns()
    request.closing = True  # the caller hung up
    judged.changes.notify()  # the token arrives
    with pytest.raises(Refusal):
        await call
    assert judged.turns == 1
    assert _count(recorded, "gone") == 1


async def test_past_the_waiting_bounds_a_young_credential_is_refused_at_once(
    recorded: metrics.Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics.use(recorded)
    monkeypatch.setattr(app, "MAX_CATCHING_UP", 3)
    monkeypatch.setattr(app, "MAX_CATCHING_UP_PER_SOURCE", 2)
    judged = _Judged([_missing()])
    waiting = [asyncio.create_task(judged.admit(_caller(0.0), _Request("a"))) for _ in range(2)]
    await _turns()
    with pytest.raises(Refusal):  # its source's share is taken
        await judged.admit(_caller(0.0), _Request("a"))
    waiting.append(asyncio.create_task(judged.admit(_caller(0.0), _Request("b"))))
    await _turns()
    assert judged.gateway._catching_up == 3
    with pytest.raises(Refusal):  # every place is taken
        await judged.admit(_caller(0.0), _Request("c"))
    assert _count(recorded, "crowded") == 2
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    # A caller that went away leaves no place taken.
    assert judged.gateway._catching_up == 0 and not judged.gateway._catching_up_from


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
    await _turns(5)
    assert wakes == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
