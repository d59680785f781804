"""The Conduit client against the test server over real sockets; faults injected with mocks."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from pytest_mock import MockerFixture

from phabmesh import conduit
from phabmesh.conduit import wire
from phabmesh.testing import ConduitServer


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
    client = conduit.ConduitClient(server.url, attempts=3, backoff=0.1, sleep=sleeps.append)
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


def test_gzip_bodies_are_understood(server: ConduitServer) -> None:
    token = server.add_token("admin")
    body = urlencode(wire.encode_params_json({}, token)).encode()
    resp = requests.post(
        f"{server.url}/api/user.whoami",
        data=gzip.compress(body),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Encoding": "gzip"},
        timeout=5,
    )
    assert json.loads(resp.text)["result"]["userName"] == "admin"


@pytest.mark.parametrize(
    ("pairs", "params"),
    [
        (
            [("constraints[usernames][0]", "a"), ("constraints[usernames][1]", "b")],
            {"constraints": {"usernames": ["a", "b"]}},
        ),
        (
            [("constraints[isBot]", "true"), ("limit", "2")],
            {"constraints": {"isBot": "true"}, "limit": "2"},
        ),
        ([("a[]", "x"), ("a[]", "y")], {"a": ["x", "y"]}),
        ([("m[k]", "v")], {"m": {"k": "v"}}),
    ],
)
def test_php_style_form_fields(pairs: list[tuple[str, str]], params: dict[str, Any]) -> None:
    assert wire.parse_form(pairs) == params


def test_form_round_trip() -> None:
    params = {"constraints": {"usernames": ["a", "b"], "isBot": True}, "limit": 5}
    assert wire.parse_form(wire.flatten(params)) == {
        "constraints": {"usernames": ["a", "b"], "isBot": "true"},
        "limit": "5",
    }


def test_decompression_is_bounded() -> None:
    bomb = gzip.compress(b"a" * (4 << 20))
    with pytest.raises(wire.RequestTooLarge):
        wire.decode_request(
            "POST",
            "application/x-www-form-urlencoded",
            bomb,
            content_encoding="gzip",
            max_bytes=1 << 20,
        )
    with pytest.raises(wire.BadRequest):
        wire.decode_request(
            "POST", "application/x-www-form-urlencoded", b"not gzip", content_encoding="gzip"
        )
