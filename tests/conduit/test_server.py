"""The Conduit test server where the recordings are silent: Phorge's rules read from its source."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests

from phabmesh.conduit import wire
from phabmesh.dev import conduit_server
from phabmesh.dev.conduit_server import ConduitServer

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def server() -> Iterator[ConduitServer]:
    srv = ConduitServer()
    srv.start()
    srv.add_user("admin", admin=True, real_name="Lab Admin")
    srv.add_user("ci-bot", bot=True, real_name="CI Bot")
    srv.add_user("deploy-bot", bot=True, real_name="Deploy Robot")
    yield srv
    srv.stop()


def post(
    server: ConduitServer, method: str, pairs: list[tuple[str, str]] | bytes, **headers: str
) -> requests.Response:
    return requests.post(
        f"{server.url}/api/{method}", data=pairs, headers={**FORM, **headers}, timeout=5
    )


def envelope(resp: requests.Response) -> tuple[Any, Any, Any]:
    body = resp.json()
    return body["result"], body["error_code"], body["error_info"]


def test_ids_and_tokens_look_like_phorges(server: ConduitServer) -> None:
    token = server.add_token("ci-bot")
    assert token.startswith("api-") and len(token) == 32 and token[4:].isalnum()
    phid = server.users["ci-bot"].phid
    assert phid.startswith("PHID-USER-") and len(phid) == 30 and phid[10:].islower()


def test_params_are_read_before_the_method_is_looked_up(server: ConduitServer) -> None:
    resp = post(server, "user.nosuchmethod", b"{}", **{"Content-Type": "application/json"})
    assert envelope(resp)[1] == "ERR-CONDUIT-CORE"
    resp = post(server, "user.nosuchmethod", [("params", "{oops")])
    assert envelope(resp)[2] == (
        "Invalid parameter information was passed to method 'user.nosuchmethod'."
    )


def test_long_method_names_are_cut_to_64_bytes(server: ConduitServer) -> None:
    name = "x" * 80
    assert envelope(post(server, name, []))[2] == f'Conduit API method "{"x" * 64}" does not exist.'


def test_unknown_parameters_are_listed_as_sent(server: ConduitServer) -> None:
    token = server.add_token("admin")
    resp = post(server, "user.whoami", [("api.token", token), ("zeta", "1"), ("alpha", "2")])
    assert envelope(resp)[1:] == (
        "ERR-CONDUIT-CALL",
        "API Method \"user.whoami\" does not define these parameters: 'zeta', 'alpha'.",
    )


def test_conduit_query_describes_each_method_it_has(server: ConduitServer) -> None:
    """Phorge describes every method it has; phabfive reads this before its first call."""
    assert envelope(post(server, "conduit.query", []))[1] == "ERR-INVALID-SESSION"
    token = server.add_token("ci-bot")
    result, code, _ = envelope(post(server, "conduit.query", [("api.token", token)]))
    assert code is None
    assert set(result) == set(conduit_server.PARAMS)
    for method, definition in result.items():
        params = definition["params"] or {}
        assert set(params) == conduit_server.PARAMS[method], method
        assert definition["description"] and definition["return"], method


def test_json_params_are_strictly_typed(server: ConduitServer) -> None:
    token = server.add_token("admin")
    strict = post(
        server, "user.search", wire.encode_params_json({"constraints": {"isBot": "true"}}, token)
    )
    assert envelope(strict)[1:] == (
        "ERR-CONDUIT-CORE",
        'Error while reading "isBot": Expected boolean (true or false), got something else.',
    )
    loose = post(server, "user.search", wire.encode_form({"constraints": {"isBot": "1"}}, token))
    assert [u["fields"]["username"] for u in envelope(loose)[0]["data"]] == ["deploy-bot", "ci-bot"]
    bad_ids = post(server, "user.search", wire.encode_form({"constraints": {"ids": ["x"]}}, token))
    assert (
        envelope(bad_ids)[2]
        == 'Error while reading "ids[0]": Expected integer, got something else.'
    )


@pytest.mark.parametrize(
    ("limit", "info"),
    [
        (
            "abc",
            "Maximum page size for Conduit API method calls is 100, but this call specified abc.",
        ),
        ("-1", "Minimum page size for Conduit API method calls is 1, but this call specified -1."),
    ],
)
def test_limits_compare_as_php_does(server: ConduitServer, limit: str, info: str) -> None:
    token = server.add_token("admin")
    resp = post(server, "user.search", [("api.token", token), ("limit", limit)])
    assert envelope(resp)[1:] == ("ERR-INVALID-PAGE-SIZE", info)


def test_constraint_and_attachment_formats(server: ConduitServer) -> None:
    token = server.add_token("admin")
    cases = {
        "ERR-INVALID-CONSTRAINTS-FORMAT": [("constraints", "x")],
        "ERR-INVALID-ATTACHMENTS-FORMAT": [("attachments", "x")],
        "ERR-INVALID-ATTACHMENT": [("attachments[nope]", "1")],
    }
    for code, pairs in cases.items():
        assert envelope(post(server, "user.search", [("api.token", token), *pairs]))[1] == code
    # Phorge attaches every key named, even one set to false.
    resp = post(
        server,
        "user.search",
        wire.encode_params_json({"attachments": {"availability": False}, "limit": 1}, token),
    )
    assert "availability" in envelope(resp)[0]["data"][0]["attachments"]


def test_name_like_matches_usernames_and_real_names(server: ConduitServer) -> None:
    token = server.add_token("admin")
    resp = post(
        server, "user.search", wire.encode_form({"constraints": {"nameLike": "robot"}}, token)
    )
    assert [u["fields"]["username"] for u in envelope(resp)[0]["data"]] == ["deploy-bot"]


def test_tokens_and_accounts_change_on_the_next_call(server: ConduitServer) -> None:
    def whoami(token: str) -> tuple[Any, Any, Any]:
        return envelope(post(server, "user.whoami", wire.encode_form({}, token)))

    terminated, deleted, kept = (server.add_token("ci-bot") for _ in range(3))
    server.terminate_token(terminated)
    assert "was previously valid, but has expired" in whoami(terminated)[2]
    server.delete_token(deleted)
    assert whoami(deleted)[2] == f'API token "{deleted}" is not valid.'
    server.disable_user("ci-bot")
    assert whoami(kept)[2] == "User account is not permitted to use the API."
    server.enable_user("ci-bot")
    assert whoami(kept)[0]["userName"] == "ci-bot"
    assert server.calls["user.whoami"] == 4


def test_faults(server: ConduitServer) -> None:
    server.rate_limited = True
    limited = post(server, "conduit.ping", [])
    assert limited.status_code == 429 and limited.text.startswith("TOO MANY REQUESTS")
    assert limited.headers["Content-Type"] == "text/plain; charset=utf-8"
    server.rate_limited = False
    server.fail_next, server.fail_status = 1, 503
    assert post(server, "conduit.ping", []).status_code == 503
    assert post(server, "conduit.ping", []).status_code == 200


async def test_async_context_manager() -> None:
    async with ConduitServer(hostname="phorge") as server:
        token = server.add_token(server.add_user("ci-bot", bot=True).username)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.url}/api/conduit.ping",
                data=dict(wire.encode_form({}, token)),
            ) as resp,
        ):
            assert json.loads(await resp.text())["result"] == "phorge"
            assert resp.headers["X-Conduit-Capabilities"] == "gzip"


def test_importable_without_pytest() -> None:
    code = "import sys, phabmesh.dev.conduit_server; assert 'pytest' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=sys.path[0] or None, env=None)


def test_token_length_is_counted_in_bytes_and_markup_is_escaped(server: ConduitServer) -> None:
    """As a stock Phorge answers: PHP's strlen, then json_encode with < and > escaped."""
    wide = post(server, "user.whoami", [("api.token", "api-\u00eb" + "a" * 27)])
    assert wide.text == (
        '{"result":null,"error_code":"ERR-INVALID-AUTH","error_info":"API token '
        '\\"api-\\u00eb' + "a" * 27 + '\\" has the wrong length. API tokens should be 32 '
        'characters long."}'
    )
    marked = post(server, "user.whoami", [("api.token", "api-<>x/" + "a" * 24)])
    assert '\\"api-\\u003c\\u003ex\\/' in marked.text
