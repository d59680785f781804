"""phabmesh's one retry policy: doubling, jittered, capped; a server's Retry-After first."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from phabmesh import backoff, conduit, settings, tasks
from phabmesh.admission import server as admission_server
from phabmesh.admission.server import WebhookSupervisor
from phabmesh.controller.memo import Memo
from phabmesh.kube import client as kube_client
from phabmesh.kube import informer as informer_module
from phabmesh.kube.config import Connection
from phabmesh.pod import agent
from phabmesh.pod import client as podclient
from phabmesh.settings import Settings
from tests.unit.conftest import FakeEndpoint

REPO = Path(__file__).resolve().parents[2]


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


# -- the policy from the settings --------------------------------------------------------

NO_JITTER = {"jitter": lambda: 0.0}  # the full delays: nothing taken off at random


def _policy(**env: str) -> backoff.Backoff:
    """The policy ``PHABMESH_<NAME>=value`` give, its jitter fixed."""
    settings = Settings.from_env({f"PHABMESH_{k.upper()}": v for k, v in env.items()})
    return dataclasses.replace(settings.backoff(), **NO_JITTER)


def test_the_policy_is_read_from_the_settings_and_defaults_to_what_the_loops_used() -> None:
    assert Settings().backoff() == backoff.Backoff(0.2, 30.0)
    assert Settings().backoff().short() == backoff.Backoff(0.05, 2.0)  # the old request retries
    settings = Settings.from_env({"PHABMESH_RETRY_FIRST": "500ms", "PHABMESH_RETRY_CAP": "1m"})
    assert settings.backoff() == backoff.Backoff(0.5, 60.0)
    assert settings.backoff().short() == backoff.Backoff(0.125, 4.0)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PHABMESH_RETRY_FIRST": "0"}, "PHABMESH_RETRY_FIRST"),
        ({"PHABMESH_RETRY_FIRST": "-1"}, "PHABMESH_RETRY_FIRST"),
        ({"PHABMESH_RETRY_CAP": "0s"}, "PHABMESH_RETRY_CAP"),
        ({"PHABMESH_RETRY_CAP": "soon"}, "PHABMESH_RETRY_CAP"),
        ({"PHABMESH_RETRY_FIRST": "1m", "PHABMESH_RETRY_CAP": "30s"}, "PHABMESH_RETRY_CAP"),
    ],
)
def test_a_policy_it_cannot_use_is_refused_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        Settings.from_env(env)
    with pytest.raises(ValueError, match=named):  # the pod side's reading of the same two
        settings.retry_policy(env)


def test_the_pod_side_reads_the_two_variables_alone() -> None:
    env = {"PHABMESH_RETRY_CAP": "5s", "PHABMESH_LOG_LEVEL": "LOUD"}  # not the pod side's
    assert settings.retry_policy(env) == backoff.Backoff(0.2, 5.0)
    assert settings.retry_policy({}) == backoff.DEFAULT


# -- each loop: a changed PHABMESH_RETRY_CAP changes its waits; Retry-After is honoured ---


class _Stop(Exception):
    """Ends a loop under test once it has waited enough times."""


def _recording_sleep(
    monkeypatch: pytest.MonkeyPatch, module: Any, waited: list[float], stop_after: int = 0
) -> None:
    """``module``'s asyncio.sleep records what it is asked (aiohttp's own sleep(0) calls
    are let through); with ``stop_after``, the loop ends at that many waits."""
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> None:
        if seconds:
            waited.append(seconds)
            if stop_after and len(waited) >= stop_after:
                raise _Stop
        await real_sleep(0)

    monkeypatch.setattr(module.asyncio, "sleep", sleep)


async def _serve(routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]) -> Any:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_the_kube_clients_own_retries_follow_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's retries wait the short form of the process's policy: a fifteenth of
    PHABMESH_RETRY_CAP at most, for a 503 as for a 429's long Retry-After."""
    answers = [
        web.json_response({"reason": "ServiceUnavailable"}, status=503),
        web.json_response({"reason": "ServiceUnavailable"}, status=503),
        web.json_response({"reason": "TooManyRequests"}, status=429, headers={"Retry-After": "9"}),
        web.json_response({"kind": "Namespace"}),
    ]

    async def handler(_: web.Request) -> web.Response:
        return answers.pop(0)

    runner = await _serve({"/api/v1/namespaces/x": handler})
    waited: list[float] = []
    _recording_sleep(monkeypatch, kube_client, waited)
    connection = Connection(f"http://127.0.0.1:{runner.addresses[0][1]}", False, lambda: None)
    policy = _policy(retry_first="0.4", retry_cap="3")  # short form: 0.1 s doubling to 0.2 s
    kube = kube_client.KubeClient(connection, attempts=4, policy=policy)
    try:
        assert await kube.get("/api/v1/namespaces/x") == {"kind": "Namespace"}
    finally:
        await kube.close()
        await runner.cleanup()
    assert waited == [0.1, 0.2, 0.2]  # the third: Retry-After 9, up to the cap's fifteenth


async def test_a_refused_watch_carries_its_retry_after() -> None:
    """Over a real socket: a watch the API server answers 429 raises Unavailable with the
    seconds its Retry-After asks."""

    async def refuse(_: web.Request) -> web.Response:
        return web.json_response({"reason": "TooManyRequests"}, status=429,
                                 headers={"Retry-After": "3"})  # fmt: skip

    runner = await _serve({"/api/v1/pods": refuse})
    connection = Connection(f"http://127.0.0.1:{runner.addresses[0][1]}", False, lambda: None)
    kube = kube_client.KubeClient(connection)
    try:
        with pytest.raises(kube_client.Unavailable) as refused:
            async for _ in kube.watch("/api/v1/pods", "1"):
                pass
    finally:
        await kube.close()
        await runner.cleanup()
    assert (refused.value.status, refused.value.retry_after) == (429, 3.0)


@pytest.mark.parametrize(
    ("watch_answer", "cap", "expected"),
    [
        # No Retry-After: the short form of the policy, 0.1 s doubling to a fifteenth of the cap.
        ((503, {}), "3", [0.1, 0.2, 0.2, 0.2]),
        ((503, {}), "6", [0.1, 0.2, 0.4, 0.4]),
        # The API server's Retry-After (priority and fairness), up to that cap (here the
        # default policy's: 2 s).
        ((429, {"Retry-After": "1"}), None, [1.0, 1.0, 1.0, 1.0]),
        ((429, {"Retry-After": "9"}), "6", [0.4, 0.4, 0.4, 0.4]),
    ],
)
async def test_a_watch_reconnects_after_the_policys_pause_or_the_servers_retry_after(
    monkeypatch: pytest.MonkeyPatch,
    watch_answer: tuple[int, dict[str, str]],
    cap: str | None,
    expected: list[float],
) -> None:
    """An informer over a real socket: the list answers, every watch is refused."""
    status, headers = watch_answer

    async def collection(request: web.Request) -> web.Response:
        if request.query.get("watch") == "true":
            return web.json_response({"reason": "Refused"}, status=status, headers=headers)
        return web.json_response({"metadata": {"resourceVersion": "7"}, "items": []})

    runner = await _serve({"/api/v1/pods": collection})
    waited: list[float] = []
    _recording_sleep(monkeypatch, informer_module, waited, stop_after=len(expected))
    connection = Connection(f"http://127.0.0.1:{runner.addresses[0][1]}", False, lambda: None)
    if cap is None:
        kube = kube_client.KubeClient(connection)
    else:
        kube = kube_client.KubeClient(connection, policy=_policy(retry_first="0.4", retry_cap=cap))
    pods = informer_module.Informer(kube, "/api/v1/pods", lambda obj: obj)
    try:
        with pytest.raises(_Stop):
            await pods.run()
    finally:
        await kube.close()
        await runner.cleanup()
    assert waited == expected
    assert pods.synced.is_set() and not pods.connected


def test_the_controllers_lease_write_retries_follow_the_settings_and_retry_after() -> None:
    """The controller's Leases reconciler makes its retries with the settings' policy; a
    write the API server refused with Retry-After waits that, up to the cap."""
    memo = Memo(Settings.local("http://127.0.0.1:1", retry_first=0.5, retry_cap=4.0))
    retries = memo.leases.retries
    assert retries.policy == backoff.Backoff(0.5, 4.0)
    retries.policy = dataclasses.replace(retries.policy, **NO_JITTER)
    throttled = kube_client.Unavailable(429, "TooManyRequests", "slow down")
    throttled.retry_after = 3.0
    refused = kube_client.Unavailable(503, "ServiceUnavailable", "later")
    refused.retry_after = 60.0

    async def scenario() -> list[float | None]:
        async def again() -> None:
            pass

        delays = []
        for key, error in [("a", None), ("b", throttled), ("c", refused)]:
            delays.append(retries.failed(key, again, error))
        for _ in range(4):  # "a" fails again and again: doubling to the cap
            retries._pending.pop("a").cancel()
            delays.append(retries.failed("a", again))
        await retries.close()
        return delays

    assert asyncio.run(scenario()) == [0.5, 3.0, 4.0, 1.0, 2.0, 4.0, 4.0]


def test_the_conduit_client_of_the_controller_follows_the_settings() -> None:
    memo = Memo(Settings.local("http://127.0.0.1:1", retry_first=0.3, retry_cap=2.0))
    assert memo.conduit.policy == backoff.Backoff(0.3, 2.0)
    sleeps: list[float] = []
    session = requests.Session()
    answer = requests.Response()
    answer.status_code, answer.headers["Retry-After"] = 429, "120"
    answer._content = b"slow down"
    session.post = lambda *a, **k: answer  # type: ignore[method-assign]  # Phabricator, throttling
    client = conduit.ConduitClient(
        "http://phorge.invalid",
        session=session,
        attempts=3,
        policy=memo.conduit.policy,
        sleep=sleeps.append,
    )
    with pytest.raises(conduit.PhabricatorUnavailable):
        client.ping()
    assert sleeps == [2.0, 2.0]  # Retry-After 120, up to PHABMESH_RETRY_CAP


async def test_a_supervised_task_restarts_after_the_policys_pauses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waited: list[float] = []
    _recording_sleep(monkeypatch, tasks, waited, stop_after=5)

    async def broken() -> None:
        raise RuntimeError("a bug")

    policy = _policy(retry_first="0.25", retry_cap="1")
    with pytest.raises(_Stop):
        await tasks.supervise("broken", broken, policy)
    assert waited == [0.25, 0.5, 1.0, 1.0, 1.0]


async def test_the_webhook_process_restarts_after_the_policys_pauses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A child that cannot start (no such program) is started again after the pauses of
    the settings' policy."""
    supervisor = WebhookSupervisor(Settings.local("http://127.0.0.1:1", retry_cap=1.5))
    assert supervisor.restarts == backoff.Backoff(0.2, 1.5)
    supervisor.restarts = dataclasses.replace(supervisor.restarts, **NO_JITTER)
    monkeypatch.setattr(supervisor, "command", lambda: [str(tmp_path / "no-such-program")])
    waited: list[float] = []
    _recording_sleep(monkeypatch, admission_server, waited, stop_after=5)
    with pytest.raises(_Stop):
        await supervisor.run()
    assert waited == [0.2, 0.4, 0.8, 1.5, 1.5]
    assert supervisor.starts == 5


def test_the_agent_waits_the_policys_pauses_or_the_endpoints_retry_after(
    tmp_path: Path,
) -> None:
    outcomes: list[Exception] = [
        podclient.ExchangeError("down"),
        podclient.ExchangeError("down"),
        podclient.ExchangeError("busy", retry_after=0.7),
        podclient.ExchangeError("busy", retry_after=45.0),
        podclient.ExchangeError("down"),
        podclient.ExchangeError("401 invalid_token", retryable=False),
    ]
    slept: list[float] = []

    def fetch() -> podclient.Credential:
        raise outcomes.pop(0)

    policy = dataclasses.replace(settings.retry_policy({"PHABMESH_RETRY_CAP": "1"}), **NO_JITTER)
    code = agent.run_init(
        fetch,
        lambda _c: None,
        timeout=300,
        termination_log=tmp_path / "log",
        sleep=slept.append,
        policy=policy,
    )
    assert code == 1
    assert slept == [0.2, 0.4, 0.7, 1.0, 1.0]


def test_credential_watch_waits_the_policys_pauses_or_the_endpoints_retry_after() -> None:
    outcomes: list[Exception] = [
        podclient.ExchangeError("down"),
        podclient.ExchangeError("busy", retry_after=45.0),
        podclient.ExchangeError("down"),
    ]
    slept: list[float] = []

    def fetch() -> podclient.Credential:
        raise outcomes.pop(0)

    policy = dataclasses.replace(settings.retry_policy({"PHABMESH_RETRY_CAP": "2"}), **NO_JITTER)
    podclient.watch(fetch, lambda _c: None, stop=lambda: not outcomes, sleep=slept.append,
                    policy=policy)  # fmt: skip
    assert slept == [0.2, 2.0, 0.8]


def _agent_init(endpoint: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    token_file = tmp_path / "token"
    token_file.write_text("service-account-token")
    argv = [sys.executable, "-m", "phabmesh.cli", "agent", "init", "--endpoint", endpoint,
            "--token-file", str(token_file), "--dir", str(tmp_path / "run"), "--timeout", "1",
            "--termination-log", str(tmp_path / "log")]  # fmt: skip
    variables = {k: v for k, v in os.environ.items() if not k.startswith("PHABMESH_")}
    variables.update(env, PYTHONPATH=str(REPO / "operator"), PHABMESH_LOG_LEVEL="INFO")
    return subprocess.run(argv, capture_output=True, text=True, env=variables, timeout=60,
                          check=False)  # fmt: skip


def test_the_agent_command_reads_the_policy_from_its_environment(
    endpoint: str, tmp_path: Path
) -> None:
    """`phabmesh agent init` in a pod whose environment sets PHABMESH_RETRY_CAP: the
    endpoint's long Retry-After is waited only up to that cap."""
    FakeEndpoint.answers[:] = [(503, {"error": "not_ready", "message": "starting"})]
    FakeEndpoint.extra_headers = {"Retry-After": "30"}
    done = _agent_init(endpoint, tmp_path, PHABMESH_RETRY_FIRST="0.1", PHABMESH_RETRY_CAP="0.3")
    assert done.returncode == 1, done.stderr
    waits = [float(w) for w in re.findall(r"retry_in\W+([0-9.]+)", done.stderr)]
    assert len(waits) >= 2, done.stderr
    assert max(waits) <= 0.3, waits


def test_the_agent_command_refuses_a_policy_it_cannot_use(endpoint: str, tmp_path: Path) -> None:
    done = _agent_init(endpoint, tmp_path, PHABMESH_RETRY_FIRST="2", PHABMESH_RETRY_CAP="1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "phabmesh agent: PHABMESH_RETRY_FIRST: must be at most PHABMESH_RETRY_CAP (2 s > 1 s)"
    ]
    assert FakeEndpoint.seen == []  # refused before any exchange


def test_every_process_gives_its_loops_the_settings_policy() -> None:
    """Each Kubernetes client, supervised task and Conduit client a process makes is given
    the policy of its settings (none falls back to the default of a tool or a test)."""
    missing = []
    for path in sorted((REPO / "operator" / "phabmesh").rglob("*.py")):
        parts = path.relative_to(REPO / "operator" / "phabmesh").parts
        if parts[0] in {"dev", "kubectl"}:  # tools, with no settings of their own
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            given = any(k.arg == "policy" for k in node.keywords)
            if name == "spawn" and len(node.args) < 3 and not given:
                missing.append(f"{path.name}:{node.lineno} spawn")
            if name in {"KubeClient", "ConduitClient"} and not given:
                missing.append(f"{path.name}:{node.lineno} {name}")
    assert missing == []
