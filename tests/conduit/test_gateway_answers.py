"""The gateway's answers, encoded for each client as Phorge encodes them (no cluster needed).

The gateway serves over a real socket in front of the Conduit test server, or in
front of a small upstream that misbehaves on purpose (fault injection). Only
calls that need no credential are made here: ``conduit.ping`` (forwarded) and a
call without a token (the gateway's own refusal). Calls with credentials are in
``tests/integration/test_gateway.py``.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from phabmesh import serving
from phabmesh.conduit import responses
from phabmesh.dev.conduit_server import ConduitServer
from phabmesh.gateway.app import Gateway
from phabmesh.settings import Settings

Serve = Callable[[str], Awaitable[str]]
ABSENT = None


async def _start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = await serving.start_site(app, "127.0.0.1", 0)
    return runner, f"http://127.0.0.1:{serving.bound_port(runner)}"


@pytest.fixture
async def conduit() -> AsyncIterator[ConduitServer]:
    async with ConduitServer(hostname="lab") as server:
        yield server


@pytest.fixture
async def gateway_for() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Start a gateway in front of ``upstream``; its base URL."""
    started: list[tuple[web.AppRunner, Gateway]] = []

    async def start(upstream: str, **settings: Any) -> str:
        # No lease or key state: these calls never get that far.
        gateway = Gateway(Settings.local(upstream, **settings), state=None)  # type: ignore[arg-type]
        app = web.Application()
        gateway.routes(app)
        runner, url = await _start(app)
        started.append((runner, gateway))
        return url

    yield start
    for runner, gateway in started:
        await runner.cleanup()
        await gateway.close()


async def _post(
    url: str, method: str, accept: str | None, data: str = "output=json"
) -> tuple[int, dict[str, str], bytes]:
    """A raw call: the status, the headers and the body exactly as sent."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    skip: list[str] = []
    if accept is None:
        skip.append("Accept-Encoding")
    else:
        headers["Accept-Encoding"] = accept
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=skip) as http,
        http.post(f"{url}/api/{method}", data=data, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


def _decoded(headers: dict[str, str], raw: bytes) -> Any:
    coding = headers.get("Content-Encoding")
    body = {"gzip": gzip.decompress, "deflate": zlib.decompress}[coding](raw) if coding else raw
    return json.loads(body)


# What a stock Phorge answers for each Accept-Encoding (the response.* recordings).
ENCODINGS = [("gzip", "gzip"), ("gzip, deflate", "gzip"), ("deflate", "deflate")]
ENCODINGS += [("identity", None), (ABSENT, None)]


@pytest.mark.parametrize(("accept", "coding"), ENCODINGS)
async def test_forwarded_answers_are_encoded_as_phorge_would(
    conduit: ConduitServer, gateway_for: Callable[..., Awaitable[str]], accept: str, coding: str
) -> None:
    gateway = await gateway_for(conduit.url)
    direct = await _post(conduit.url, "conduit.ping", accept)
    status, headers, raw = await _post(gateway, "conduit.ping", accept)
    assert status == 200
    assert headers.get("Content-Encoding") == coding
    assert headers.get("Vary") == ("Accept-Encoding" if coding else None)
    assert raw == direct[2]  # the very bytes Phorge would send this client
    assert _decoded(headers, raw) == {"result": "lab", "error_code": None, "error_info": None}
    for name, value in responses.CONDUIT_HEADERS.items():
        assert headers[name] == value, name


@pytest.mark.parametrize(("accept", "coding"), ENCODINGS)
async def test_refusals_are_encoded_the_same_way(
    conduit: ConduitServer, gateway_for: Callable[..., Awaitable[str]], accept: str, coding: str
) -> None:
    gateway = await gateway_for(conduit.url)
    status, headers, raw = await _post(gateway, "user.whoami", accept)
    direct = await _post(conduit.url, "user.whoami", accept)
    assert raw == direct[2]  # Phorge's own refusal, byte for byte
    assert status == 200
    assert headers.get("Content-Encoding") == coding
    assert headers.get("Vary") == ("Accept-Encoding" if coding else None)
    assert _decoded(headers, raw) == {
        "result": None,
        "error_code": "ERR-INVALID-SESSION",
        "error_info": "Session key is not present.",
    }
    for name, value in responses.CONDUIT_HEADERS.items():
        assert headers[name] == value, name
    assert conduit.calls["user.whoami"] == 1  # the direct call: the gateway refused by itself


@pytest.mark.parametrize("anyway", ["gzip", "deflate"])
@pytest.mark.parametrize(("accept", "coding"), ENCODINGS)
async def test_an_upstream_that_compresses_anyway_is_decoded(
    conduit: ConduitServer,
    gateway_for: Callable[..., Awaitable[str]],
    anyway: responses.Coding,
    accept: str,
    coding: str,
) -> None:
    """A proxy in front of Phorge may compress whatever the gateway asked for."""
    gateway = await gateway_for(conduit.url)
    conduit.compress_anyway = anyway
    status, headers, raw = await _post(gateway, "conduit.ping", accept)
    assert (status, headers.get("Content-Encoding")) == (200, coding)
    assert _decoded(headers, raw)["result"] == "lab"


@pytest.fixture
async def odd_upstream() -> AsyncIterator[tuple[str, list[dict[str, str]], dict[str, Any]]]:
    """An upstream answering what the test says, recording the headers it was sent."""
    seen: list[dict[str, str]] = []
    answer: dict[str, Any] = {}

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=answer["body"], headers=answer["headers"])

    app = web.Application()
    app.router.add_route("*", "/api/{method}", handle)
    runner, url = await _start(app)
    yield url, seen, answer
    await runner.cleanup()


async def test_the_gateway_asks_for_identity_and_passes_only_conduit_headers(
    odd_upstream: tuple[str, list[dict[str, str]], dict[str, Any]],
    gateway_for: Callable[..., Awaitable[str]],
) -> None:
    url, seen, answer = odd_upstream
    body = b'{"result":"x","error_code":null,"error_info":null}'
    answer["body"] = body
    answer["headers"] = {
        "Content-Type": "application/json",
        "Set-Cookie": "phsid=secret; HttpOnly",
        "X-Powered-By": "PHP/8.2",
        "Content-Security-Policy": "default-src 'self'",
        "Cache-Control": "private",
        "X-Conduit-Capabilities": "gzip, something-new",
    }
    gateway = await gateway_for(url)
    status, headers, raw = await _post(gateway, "conduit.ping", "gzip")
    assert seen[-1]["Accept-Encoding"] == "identity"
    assert (status, gzip.decompress(raw)) == (200, body)
    assert headers["Cache-Control"] == "private"  # as upstream said
    assert headers["Expires"] == responses.CONDUIT_HEADERS["Expires"]
    assert headers["X-Conduit-Capabilities"] == "gzip"  # what the gateway itself accepts
    for name in ("Set-Cookie", "X-Powered-By", "Content-Security-Policy"):
        assert name not in headers, name


@pytest.mark.parametrize(
    ("coding", "body"),
    [("br", b"\x0b\x02\x80{}\x03"), ("gzip", b"not gzip"), ("deflate", b"\xff\xff")],
)
async def test_an_unreadable_upstream_answer_is_refused(
    odd_upstream: tuple[str, list[dict[str, str]], dict[str, Any]],
    gateway_for: Callable[..., Awaitable[str]],
    coding: str,
    body: bytes,
) -> None:
    url, _, answer = odd_upstream
    answer["body"] = body
    answer["headers"] = {"Content-Type": "application/json", "Content-Encoding": coding}
    gateway = await gateway_for(url)
    status, headers, raw = await _post(gateway, "conduit.ping", "deflate")
    assert status == 502
    assert headers["Content-Encoding"] == "deflate"
    refused = _decoded(headers, raw)
    assert refused["error_code"] == "ERR-PHABRICATOR-UNAVAILABLE"
    assert "cannot be decoded" in refused["error_info"]


async def test_an_answer_over_the_limit_is_refused(
    odd_upstream: tuple[str, list[dict[str, str]], dict[str, Any]],
    gateway_for: Callable[..., Awaitable[str]],
) -> None:
    url, _, answer = odd_upstream
    body = json.dumps({"result": "x" * 10_000, "error_code": None, "error_info": None}).encode()
    for coding, sent in (("gzip", gzip.compress(body)), (None, body)):
        answer["body"] = sent
        answer["headers"] = {"Content-Type": "application/json"}
        if coding:
            answer["headers"]["Content-Encoding"] = coding
        small = await gateway_for(url, max_response_bytes=len(body) - 1)
        status, headers, raw = await _post(small, "conduit.ping", "gzip")
        assert status == 502, coding
        refused = _decoded(headers, raw)
        assert refused["error_code"] == "ERR-PHABRICATOR-UNAVAILABLE"
        assert "PHABMESH_MAX_RESPONSE_BYTES" in refused["error_info"]
        roomy = await gateway_for(url, max_response_bytes=len(body))
        status, headers, raw = await _post(roomy, "conduit.ping", "gzip")
        assert (status, gzip.decompress(raw)) == (200, body)


async def test_a_large_answer_is_compressed_off_the_event_loop_and_arrives_whole(
    odd_upstream: tuple[str, list[dict[str, str]], dict[str, Any]],
    gateway_for: Callable[..., Awaitable[str]],
) -> None:
    url, _, answer = odd_upstream
    big = json.dumps({"result": ["row"] * 400_000, "error_code": None, "error_info": None})
    assert len(big) > responses.THREAD_ABOVE_BYTES
    answer["body"] = gzip.compress(big.encode())
    answer["headers"] = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    gateway = await gateway_for(url)
    for accept in ("gzip", "deflate", None):
        status, headers, raw = await _post(gateway, "conduit.ping", accept)
        assert status == 200
        assert _decoded(headers, raw) == json.loads(big)
