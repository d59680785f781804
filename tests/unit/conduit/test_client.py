"""The Conduit client against the test server over real sockets; faults injected with mocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pytest_mock import MockerFixture
from structlog.testing import capture_logs

from phabmesh import conduit
from phabmesh.backoff import Backoff
from phabmesh.dev.conduit import ConduitServer
from tests.redirects import REDIRECT_STATUSES, redirecting


@pytest.fixture
def server() -> Iterator[ConduitServer]:
    srv = ConduitServer(hostname="phorge-test")
    srv.start()
    srv.add_user("admin", admin=True)
    for i in range(7):
        srv.add_user(f"bot-{i}", bot=True)
    yield srv
    srv.stop()


@pytest.mark.parametrize("encoding", ["form", "params-json", "per-key-json"])
def test_every_encoding_reaches_the_server(server: ConduitServer, encoding: Any) -> None:
    token = server.add_token("admin")
    client = conduit.ConduitClient(server.url, encoding=encoding, timeout=5)
    found = client.user_search(token, {"usernames": ["bot-1", "bot-2"], "isBot": True})
    assert sorted(u.username for u in found) == ["bot-1", "bot-2"]
    assert all(u.is_bot and not u.is_disabled for u in found)
    assert client.whoami(token).username == "admin"
    assert client.ping() == "phorge-test"


def test_paging_follows_the_cursor(server: ConduitServer) -> None:
    token = server.add_token("admin")
    client = conduit.ConduitClient(server.url, timeout=5)
    found = client.user_search(token, {"isBot": True}, limit=2)
    assert [u.username for u in found] == [f"bot-{i}" for i in reversed(range(7))]
    assert server.calls["user.search"] == 4


def test_errors_become_typed_and_hide_the_token(server: ConduitServer) -> None:
    client = conduit.ConduitClient(server.url, timeout=5)
    bad = "api-" + "a" * 28
    with pytest.raises(conduit.InvalidAuth) as refused:
        client.whoami(bad)
    assert bad not in str(refused.value)
    with pytest.raises(conduit.InvalidSession):
        client.call("user.whoami")
    with pytest.raises(conduit.CallError):
        client.call("user.nosuchmethod")
    token = server.add_token("admin")
    with pytest.raises(conduit.CoreError) as paging:
        client.call("user.search", {"limit": 101}, token=token)
    assert paging.value.code == "ERR-INVALID-PAGE-SIZE"
    server.disable_user("admin")
    with pytest.raises(conduit.InvalidAuth, match="not permitted"):
        client.whoami(token)


def test_server_errors_are_retried_with_backoff_then_raised(server: ConduitServer) -> None:
    server.down = True
    sleeps: list[float] = []
    client = conduit.ConduitClient(
        server.url, attempts=3, policy=Backoff(0.1, 5.0), sleep=sleeps.append
    )
    with pytest.raises(conduit.PhabricatorUnavailable) as down:
        client.ping()
    assert down.value.retryable
    assert server.calls["conduit.ping"] == 3
    assert len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.15 and 0.1 <= sleeps[1] <= 0.3


def test_conduit_errors_are_never_retried(server: ConduitServer) -> None:
    client = conduit.ConduitClient(server.url, attempts=5, sleep=lambda _: None)
    with pytest.raises(conduit.InvalidSession):
        client.call("user.whoami")
    assert server.calls["user.whoami"] == 1


def test_transport_failures_are_retried(mocker: MockerFixture) -> None:
    session = requests.Session()
    post = mocker.patch.object(session, "post", side_effect=requests.ConnectionError("refused"))
    client = conduit.ConduitClient(
        "http://127.0.0.1:9", session=session, attempts=2, sleep=lambda _: None, timeout=(1, 2)
    )
    with pytest.raises(conduit.PhabricatorUnavailable):
        client.ping()
    assert post.call_count == 2
    assert post.call_args.kwargs["timeout"] == (1, 2)


def test_slow_server_times_out(server: ConduitServer) -> None:
    server.delay = 1.0
    client = conduit.ConduitClient(server.url, attempts=1, timeout=0.2)
    with pytest.raises(conduit.PhabricatorUnavailable):
        client.ping()


def test_gzip_requests_like_arcanist(server: ConduitServer) -> None:
    token = server.add_token("admin")
    client = conduit.ConduitClient(server.url, encoding="params-json", compress=True, timeout=5)
    assert client.whoami(token).username == "admin"


def test_typed_results(server: ConduitServer) -> None:
    token = server.add_token("admin")
    client = conduit.ConduitClient(server.url, timeout=5)
    me = client.whoami(token)
    assert me.phid == server.users["admin"].phid and not me.is_bot
    bot = server.users["bot-3"]
    assert client.whoami(server.add_token("bot-3")).is_bot  # whoami says "agent"
    [found] = client.user_search(token, {"phids": [bot.phid]})
    assert (found.id, found.username, found.date_created) == (bot.id, "bot-3", bot.date_created)
    assert found.is_bot and not found.is_admin
    server.disable_user("bot-3")
    [found] = client.user_search(token, {"usernames": ["bot-3"]})
    assert found.is_disabled
    active = client.user_search(token, query_key="active", limit=3)
    assert "bot-3" not in [u.username for u in active] and len(active) == 7


def test_paging_is_bounded(server: ConduitServer) -> None:
    token = server.add_token("admin")
    client = conduit.ConduitClient(server.url, timeout=5)
    with pytest.raises(conduit.CoreError) as endless:
        client.user_search(token, {"isBot": True}, limit=1, max_pages=3)
    assert endless.value.code == "ERR-TOO-MANY-PAGES"
    assert server.calls["user.search"] == 3


@pytest.mark.parametrize("secret", ["hunter2", "api-" + "b" * 28, "x" * 32])
def test_a_refused_token_appears_nowhere(server: ConduitServer, secret: str) -> None:
    # Phorge echoes a refused token in error_info, whatever its shape.
    client = conduit.ConduitClient(server.url, timeout=5)
    with capture_logs() as logs, pytest.raises(conduit.InvalidAuth) as refused:
        client.whoami(secret)
    assert secret not in str(refused.value)
    assert secret not in repr(refused.value)
    assert secret not in refused.value.info
    assert secret not in repr(logs)


def test_secrets_in_an_error_message_are_masked_whatever_their_kind(mocker: MockerFixture) -> None:
    # Phorge's error_info may carry more than the token sent: another token of any length,
    # a JWT, a private key. None reaches the caller or the log.
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA\n-----END PRIVATE KEY-----"
    info = f"token api-Short1 refused; session {jwt}; key {pem}; sent hunter2"
    body = json.dumps({"result": None, "error_code": "ERR-CONDUIT-CORE", "error_info": info})
    session = requests.Session()
    mocker.patch.object(session, "post", return_value=_response(200, body))
    client = conduit.ConduitClient("http://phorge.invalid", session=session, attempts=1)
    with capture_logs() as logs, pytest.raises(conduit.CoreError) as refused:
        client.call("user.whoami", token="hunter2")
    shown = f"{refused.value} {refused.value.info} {logs!r}"
    for secret in ("api-Short1", jwt, "MC4CAQAwBQYDK2VwBCIEIA", "hunter2"):
        assert secret not in shown, secret
    assert refused.value.info.startswith("token [REDACTED] refused; session [REDACTED]; key ")


def test_transient_failures_are_retried_until_they_pass(server: ConduitServer) -> None:
    server.fail_next = 2
    sleeps: list[float] = []
    client = conduit.ConduitClient(server.url, attempts=3, sleep=sleeps.append, timeout=5)
    with capture_logs() as logs:
        assert client.ping() == "phorge-test"
    assert server.calls["conduit.ping"] == 3 and len(sleeps) == 2
    failed = [e for e in logs if e["event"] == "conduit_call_failed"]
    assert [(e["method"], e["attempt"], e["status"]) for e in failed] == [
        ("conduit.ping", 1, 500),
        ("conduit.ping", 2, 500),
    ]


def test_rate_limiting_is_unavailability_after_retries(server: ConduitServer) -> None:
    server.rate_limited = True
    client = conduit.ConduitClient(server.url, attempts=2, sleep=lambda _: None, timeout=5)
    with pytest.raises(conduit.PhabricatorUnavailable) as limited:
        client.ping()
    assert limited.value.status == 429
    assert server.calls["conduit.ping"] == 2


def _response(status: int, body: str = "", **headers: str) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = body.encode()
    resp.headers.update(headers)
    return resp


def test_retry_after_is_honoured_within_the_cap(mocker: MockerFixture) -> None:
    session = requests.Session()
    mocker.patch.object(
        session,
        "post",
        side_effect=[
            _response(429, "slow down", **{"Retry-After": "2"}),
            _response(429, "slow down", **{"Retry-After": "120"}),
            _response(200, '{"result":"ok","error_code":null,"error_info":null}'),
        ],
    )
    sleeps: list[float] = []
    client = conduit.ConduitClient(
        "http://phorge.invalid",
        session=session,
        attempts=3,
        policy=Backoff(0.2, 10),
        sleep=sleeps.append,
    )
    assert client.ping() == "ok"
    assert sleeps == [2.0, 10.0]


def test_backoff_doubles_with_jitter_and_a_cap(mocker: MockerFixture) -> None:
    session = requests.Session()
    mocker.patch.object(session, "post", side_effect=requests.ConnectionError("refused"))
    sleeps: list[float] = []
    client = conduit.ConduitClient(
        "http://phorge.invalid",
        session=session,
        attempts=5,
        policy=Backoff(1.0, 3.0),
        sleep=sleeps.append,
        jitter=lambda: 0.0,  # the jitter takes nothing off: the full delays
    )
    with pytest.raises(conduit.PhabricatorUnavailable) as down:
        client.ping()
    assert sleeps == [1.0, 2.0, 3.0, 3.0]
    assert isinstance(down.value.__cause__, requests.ConnectionError)


def test_the_deadline_stops_retrying(mocker: MockerFixture) -> None:
    session = requests.Session()
    post = mocker.patch.object(session, "post", side_effect=requests.Timeout("read timed out"))
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    client = conduit.ConduitClient(
        "http://phorge.invalid",
        session=session,
        attempts=10,
        policy=Backoff(1.0, 5.0),
        deadline=2.5,
        sleep=sleep,
        clock=lambda: now[0],
        jitter=lambda: 0.0,
    )
    with pytest.raises(conduit.PhabricatorUnavailable, match="timeout"):
        client.ping()
    assert post.call_count == 2  # slept 1 s; another 2 s would pass the 2.5 s deadline


def test_an_answer_without_an_envelope_is_unavailability(mocker: MockerFixture) -> None:
    session = requests.Session()
    mocker.patch.object(session, "post", return_value=_response(200, "<html>login</html>"))
    client = conduit.ConduitClient("http://phorge.invalid", session=session, attempts=1)
    with pytest.raises(conduit.PhabricatorUnavailable) as odd:
        client.ping()
    assert odd.value.status == 200 and odd.value.retryable


def test_error_tree() -> None:
    assert isinstance(conduit.error_for("ERR-INVALID-SESSION", ""), conduit.InvalidSession)
    assert isinstance(conduit.error_for("ERR-INVALID-AUTH", ""), conduit.InvalidAuth)
    assert isinstance(conduit.error_for("ERR-CONDUIT-CALL", ""), conduit.CallError)
    for code in ("ERR-CONDUIT-CORE", "ERR-INVALID-PAGE-SIZE", "ERR-BAD-QUERYKEY"):
        assert type(conduit.error_for(code, "")) is conduit.CoreError
    assert not any(
        cls.retryable
        for cls in (
            conduit.InvalidSession,
            conduit.InvalidAuth,
            conduit.CallError,
            conduit.CoreError,
        )
    )
    assert conduit.PhabricatorUnavailable.retryable


@pytest.mark.parametrize("status", REDIRECT_STATUSES)
@pytest.mark.parametrize("compress", [False, True])
def test_a_redirect_is_never_followed_with_the_bot_token(status: int, compress: bool) -> None:
    """The bot check's client (as the controller makes it) once re-sent the token on a 307/308
    and took a 301/302's target's answer for Phabricator's."""
    with redirecting() as redirects:
        redirects.status = status
        client = conduit.ConduitClient(
            redirects.url, session=requests.Session(), attempts=3, compress=compress, timeout=5
        )
        with pytest.raises(conduit.PhabricatorUnavailable) as raised:
            client.whoami("api-bottokenbottokenbottokenbott")
        assert raised.value.status == status
        assert "redirect to localhost" in raised.value.info
        assert "not followed" in raised.value.info
        assert redirects.received == []
        assert not redirects.got("api-bottokenbottokenbottokenbott")


def test_an_unreachable_phabricator_is_named_with_the_systems_own_reason() -> None:
    client = conduit.ConduitClient("http://127.0.0.1:9", attempts=1, timeout=2)
    with pytest.raises(conduit.PhabricatorUnavailable) as refused:
        client.call("user.whoami", token="api-" + "a" * 28)
    message = str(refused.value)
    assert "calling user.whoami at http://127.0.0.1:9: Connection refused" in message, message
    assert "PHABMESH_PHABRICATOR_URL" in message
    assert "api-aaaa" not in message
