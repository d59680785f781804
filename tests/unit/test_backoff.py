"""phabmesh's one retry policy: doubling, jittered, capped; a server's Retry-After first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from phabmesh import backoff
from phabmesh.kube import client as kube_client
from phabmesh.kube.config import Connection


def test_the_delay_doubles_up_to_the_cap_less_up_to_half_at_random() -> None:
    policy = backoff.Backoff(0.2, 30.0)
    for attempt, full in [(1, 0.2), (2, 0.4), (3, 0.8), (9, 30.0), (10_000, 30.0)]:
        assert policy.delay(attempt, jitter=lambda: 0.0) == full
        assert policy.delay(attempt, jitter=lambda: 0.999) == pytest.approx(full / 2, rel=0.01)
        for _ in range(50):
            assert full / 2 <= policy.delay(attempt) <= full  # never over the cap
    assert policy.delay(0, jitter=lambda: 0.0) == 0.2  # nonsense attempts are the first one


def test_retry_after_is_waited_instead_up_to_the_cap() -> None:
    policy = backoff.Backoff(0.2, 5.0)
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=120.0) == 5.0
    assert policy.delay(7, retry_after=0.0) == 0.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("2", 2.0), (" 1.5 ", 1.5), (None, None), ("", None), ("-1", None), ("nan", None),
     ("Wed, 21 Oct 2026 07:28:00 GMT", None)],
)  # fmt: skip
def test_a_retry_after_header_is_read_as_seconds(header: str | None, seconds: float | None) -> None:
    assert backoff.parse_retry_after(header) == seconds


async def test_the_kube_client_waits_what_a_429_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over a real socket: the API server's priority and fairness answers 429 with a
    Retry-After; the client waits that long (not its own shorter backoff), then succeeds."""
    answers = [
        web.json_response({"reason": "TooManyRequests"}, status=429, headers={"Retry-After": "1"}),
        web.json_response({"kind": "Namespace"}),
    ]

    async def handler(_: web.Request) -> web.Response:
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        waited.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(kube_client.asyncio, "sleep", sleep)
    connection = Connection(f"http://127.0.0.1:{port}", False, lambda: None)
    kube = kube_client.KubeClient(connection)
    try:
        assert await kube.get("/api/v1/namespaces/x") == {"kind": "Namespace"}
    finally:
        await kube.close()
        await runner.cleanup()
    # (asyncio.sleep is the module's: aiohttp's own sleep(0) calls are left out)
    assert [seconds for seconds in waited if seconds] == [1.0]
