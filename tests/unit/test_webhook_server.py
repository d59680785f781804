"""The webhook's own server: the patch it answers with, and its caps, over a real socket."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import jsonpatch
from aiohttp import web

from phabmesh import serving
from phabmesh.admission import Injector, inject, server
from phabmesh.settings import Settings


def _injector(**settings: Any) -> Injector:
    injector = Injector(Settings(**settings), client=None)  # type: ignore[arg-type]
    injector.bindings._apply(
        {
            "type": "ADDED",
            "object": {
                "metadata": {"namespace": "ci", "name": "b"},
                "spec": {
                    "botRef": {"name": "bot"},
                    "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
                    "allowedMethods": ["user.whoami"],
                    "agent": {"mode": "Sidecar"},
                },
            },
        }
    )
    return injector


def _review(sa: str = "runner", **extra: Any) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "p-", "namespace": "ci", **extra},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app:1"}]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": "u-1", "operation": "CREATE", "namespace": "ci", "object": pod},
    }


def test_the_answer_patches_the_pod_into_what_the_injection_makes() -> None:
    injector = _injector()
    for extra in ({}, {"annotations": {"mine": "1"}}):
        review = _review(**extra)
        answered = server.answer(review, injector)
        assert answered["apiVersion"] == "admission.k8s.io/v1"
        response = answered["response"]
        assert (response["uid"], response["allowed"], response["patchType"]) == (
            "u-1", True, "JSONPatch"
        )  # fmt: skip
        ops = json.loads(base64.b64decode(response["patch"]))
        pod = review["request"]["object"]
        patched = jsonpatch.apply_patch(pod, ops)
        assert patched["spec"]["initContainers"][0]["name"] == "phabmesh-agent"
        assert patched["metadata"]["annotations"].get("mine") == extra.get("annotations", {}).get(
            "mine"
        )
        wanted = copy.deepcopy(pod)
        decided = injector.decide(pod, "ci")  # the agent's mode from the binding: Sidecar
        assert decided is not None
        decided.apply(wanted)
        assert patched == wanted


def test_the_answer_allows_unbound_pods_unchanged_and_refuses_what_is_no_review() -> None:
    injector = _injector()
    response = server.answer(_review(sa="stranger"), injector)["response"]
    assert response == {"uid": "u-1", "allowed": True}
    for bad in ([], {"request": None}, {"request": {"object": {}}}):
        try:
            server.answer(bad, injector)
        except ValueError:
            continue
        raise AssertionError(f"answered {bad!r}")


def test_the_answer_refuses_a_bound_pod_with_a_wrong_agent_annotation_naming_it() -> None:
    outcomes: list[str] = []
    injector = _injector()
    injector.on_decision = outcomes.append
    wrong = {"annotations": {"phabmesh.io/agent-limits-mem": "64MB"}}
    response = server.answer(_review(**wrong), injector)["response"]
    assert response["allowed"] is False and "patch" not in response
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "phabmesh.io/agent-limits-mem: not a quantity: '64MB' (use e.g. 64Mi, 128M, 100m, 0.5)"
    )
    # A pod no binding names is none of phabmesh's business: admitted unchanged.
    response = server.answer(_review(sa="stranger", **wrong), injector)["response"]
    assert response == {"uid": "u-1", "allowed": True}
    assert outcomes == [inject.INVALID_ANNOTATION, inject.NOT_BOUND]


async def _serve(app: server.WebhookApp) -> tuple[web.AppRunner, int]:
    runner = await app.runner(Settings(webhook_max_request_bytes=app.max_bytes))
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, serving.bound_port(runner)


async def _status(port: int, body: bytes, *, length: int | None = None) -> int:
    """Send headers and ``body`` (no more); the status line that comes back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(line.split()[1])


async def test_an_oversize_review_is_refused_before_it_is_read() -> None:
    app = server.WebhookApp(Settings(webhook_max_request_bytes=1000), _injector())
    runner, port = await _serve(app)
    try:
        # Announced as 10 MB, none of it sent: refused at once from the headers, and the
        # connection closed (nothing of the rest is waited for).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the server closes
        writer.close()
        assert answer.startswith(b"HTTP/1.1 413 ")
        # No length said (chunked): refused once what arrived passes the limit.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /inject HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (1500, b"x" * 1500))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert int(line.split()[1]) == 413
        assert app.refused[server.TOO_LARGE] == 2
        # A review under the limit is answered.
        assert await _status(port, json.dumps(_review()).encode()) == 200
    finally:
        await runner.cleanup()


async def _hold(port: int, source: str = "127.0.0.1") -> asyncio.StreamWriter:
    """A review that never finishes arriving, from ``source``: it holds what it gets."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    return writer


async def _settle(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("never settled")


async def _from(port: int, source: str, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(
        b"POST /inject HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(line.split()[1])


async def test_one_source_gets_half_the_places_and_one_more_is_refused_at_once() -> None:
    # Two places, none to wait in: one for each of two sources.
    app = server.WebhookApp(Settings(webhook_max_concurrent=2, webhook_max_waiting=0), _injector())
    runner, port = await _serve(app)
    held = [await _hold(port)]
    try:
        await _settle(lambda: app.in_flight == 1)
        # The flooding source has its half: its next review is refused at once...
        assert await _from(port, "127.0.0.1", json.dumps(_review()).encode()) == 429
        assert app.refused[server.BUSY] == 1
        # ...and another source (the API server) still has its place.
        assert await _from(port, "127.0.0.2", json.dumps(_review()).encode()) == 200
    finally:
        for writer in held:
            writer.close()
    try:
        await _settle(lambda: app.present == 0)  # a dropped review gives its place back
        assert not app.by_source and not app.source_gates  # nothing kept per source
        assert await _from(port, "127.0.0.1", b"{not json") == 400
        assert await _from(port, "127.0.0.1", json.dumps(_review()).encode()) == 200
    finally:
        await runner.cleanup()


async def test_a_burst_waits_for_a_place_rather_than_being_refused() -> None:
    app = server.WebhookApp(Settings(webhook_max_concurrent=2, webhook_max_waiting=2), _injector())
    runner, port = await _serve(app)
    try:
        first = await _hold(port)  # the source's one place (half of two)
        await _settle(lambda: app.in_flight == 1)
        second = asyncio.ensure_future(_from(port, "127.0.0.1", json.dumps(_review()).encode()))
        await _settle(lambda: app.present == 2)
        assert not second.done()  # waiting, unread
        first.write(b" " * 99)  # the first review arrives whole (not JSON: 400)
        await first.drain()
        assert await second == 200  # then the waiting one is answered
        first.close()
    finally:
        await runner.cleanup()


def test_settings_reach_a_child_process_as_they_are() -> None:
    settings = Settings(webhook_port=1234, webhook_client_ca="/ca.pem", log_json=None)
    assert Settings.from_env(settings.to_env()) == settings
