"""Harbormaster "Make HTTP Request" build steps: the Conduit test server runs them and answers
about their targets as the real Phorge did (tests/conduit/harbormaster/recordings.json says
how that was recorded), and the gateway's checks (:mod:`phabmesh.harbormaster`) read those
recorded answers and requests as they should."""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from phabmesh import harbormaster
from phabmesh.conduit import wire
from phabmesh.dev.conduit import ConduitServer, builds

RECORDED = json.loads((Path(__file__).parent / "harbormaster" / "recordings.json").read_text())
CALLS = {c["name"]: c for c in RECORDED["calls"]}


class Capture:
    """A loopback server that keeps each request, answered 200."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        capture = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                capture.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers.items()),
                        "body": body.decode("latin-1"),
                    }
                )
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = do_PUT = do_GET = do_DELETE = _any

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def server() -> Iterator[ConduitServer]:
    conduit = ConduitServer()
    conduit.add_user("ci-bot", bot=True)
    conduit.start()
    yield conduit
    conduit.stop()


def _step(recorded: dict[str, Any], port: int) -> builds.Step:
    """The recorded request's step, its URI pointed at ``port``."""
    query = dict(parse_qsl(urlsplit(recorded["path"]).query))
    uri = f"http://127.0.0.1:{port}{urlsplit(recorded['path']).path}?target=${{target.phid}}"
    if "build" in query:
        uri += "&build=${build.id}&revision=${buildable.revision}"
    else:
        uri += "&step=${step.timestamp}"
    credential = recorded["credential"]
    pair = (credential["username"], credential["password"]) if credential else None
    return builds.Step(uri, method=recorded["method"], credential=pair, wait=True)


def _shape(value: Any) -> Any:
    """A JSON value with every PHID, epoch and id replaced by its kind: what must agree."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    if isinstance(value, str) and value.startswith("PHID-"):
        return value[:10]
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    return value


@pytest.mark.parametrize("recorded", RECORDED["requests"], ids=["post", "put with credential"])
def test_a_build_step_sends_what_phorge_sent(
    server: ConduitServer, capture: Capture, recorded: dict[str, Any]
) -> None:
    target, answer = server.run_build(_step(recorded, capture.port))
    assert answer.status == 200
    [sent] = capture.requests
    assert sent["method"] == recorded["method"]
    assert sent["body"] == recorded["body"] == ""
    path, query = urlsplit(sent["path"]).path, dict(parse_qsl(urlsplit(sent["path"]).query))
    want = dict(parse_qsl(urlsplit(recorded["path"]).query))
    assert path == urlsplit(recorded["path"]).path
    assert set(query) == set(want)
    assert query["target"] == target.phid and harbormaster.TARGET_PHID.fullmatch(target.phid)
    # Host differs (the port); aiohttp adds no header Phorge's cURL did not send.
    drop = {"Host"}
    assert {k: v for k, v in sent["headers"].items() if k not in drop} == recorded["headers"]
    # Once the request returned, the step waits for a message.
    assert target.status == builds.WAITING


def _search(server: ConduitServer, token: str, phid: str) -> Any:
    params = {"constraints": {"phids": [phid]}}
    answer = requests.post(
        f"{server.url}/api/harbormaster.target.search",
        data=wire.encode_params_json(params, token),
        timeout=10,
    )
    return answer.json()


def _send(server: ConduitServer, token: str, **params: str) -> Any:
    answer = requests.post(
        f"{server.url}/api/harbormaster.sendmessage",
        data=wire.encode_params_json(params, token),
        timeout=10,
    )
    return answer.json()


def test_a_targets_life_is_answered_as_phorge_answered_it(
    server: ConduitServer, capture: Capture
) -> None:
    token = server.add_token("ci-bot")
    seen_during: list[Any] = []
    step = _step(RECORDED["requests"][0], capture.port)
    recorded_name = CALLS["target.search during the request"]["response"]["result"]["data"][0]
    step = dataclasses.replace(step, name=recorded_name["fields"]["name"])
    original = capture.server.RequestHandlerClass.do_POST  # type: ignore[attr-defined]

    def during(handler: Any) -> None:  # the search made while Phorge's request is open
        phid = dict(parse_qsl(urlsplit(handler.path).query))["target"]
        seen_during.append(_search(server, token, phid))
        original(handler)

    capture.server.RequestHandlerClass.do_POST = during  # type: ignore[attr-defined]
    target, _ = server.run_build(step)
    phid = target.phid
    answers = {
        "target.search during the request": seen_during[0],
        "target.search while waiting": _search(server, token, phid),
        "sendmessage pass": _send(server, token, receiver=phid, type="pass"),
        "target.search after pass": _search(server, token, phid),
        "sendmessage to a passed target": _send(server, token, receiver=phid, type="pass"),
        "target.search unknown phid": _search(server, token, "PHID-HMBT-" + "a" * 20),
        "sendmessage unknown receiver": _send(
            server, token, receiver="PHID-HMBT-" + "a" * 20, type="pass"
        ),
    }
    for name, answer in answers.items():
        recorded = CALLS[name]["response"]
        assert _shape(answer) == _shape(recorded), name
    assert answers["target.search after pass"] == {
        **answers["target.search after pass"],
        "error_code": None,
    }
    assert server.methods.builds.builds[target.build_id] == "passed"


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("target.search during the request", None),
        ("target.search while waiting", harbormaster.REPLAYED),
        ("target.search after pass", harbormaster.FINISHED_TARGET),
        ("target.search unknown phid", harbormaster.UNKNOWN_TARGET),
    ],
)
def test_the_gateway_reads_each_recorded_answer(name: str, outcome: str | None) -> None:
    answer = CALLS[name]["response"]
    phid = CALLS[name]["params"]["constraints"]["phids"][0]
    if outcome is None:
        harbormaster.judge_search(answer, phid)
        return
    with pytest.raises(harbormaster.Refused) as refused:
        harbormaster.judge_search(answer, phid)
    assert refused.value.reason == outcome


def test_an_answer_about_another_target_or_an_error_lets_nothing_through() -> None:
    during = CALLS["target.search during the request"]["response"]
    phid = during["result"]["data"][0]["phid"]
    with pytest.raises(harbormaster.Refused) as other:
        harbormaster.judge_search(during, "PHID-HMBT-" + "b" * 20)
    assert other.value.reason == harbormaster.UNKNOWN_TARGET
    error = {"result": None, "error_code": "ERR-INVALID-AUTH", "error_info": "no"}
    for bad in (error, [], {"result": {}}, {"result": {"data": [{"phid": phid}]}}):
        with pytest.raises(harbormaster.Refused) as refused:
            harbormaster.judge_search(bad, phid)
        assert refused.value.status in (409, 502), bad
    pending = copy.deepcopy(during)
    pending["result"]["data"][0]["fields"]["status"]["value"] = "target/pending"
    with pytest.raises(harbormaster.Refused) as not_building:
        harbormaster.judge_search(pending, phid)
    assert not_building.value.reason == harbormaster.NOT_BUILDING


def test_the_recorded_basic_credential_is_accepted_and_any_other_refused() -> None:
    recorded = RECORDED["requests"][1]
    username, password = recorded["credential"]["username"], recorded["credential"]["password"]
    header = recorded["headers"]["Authorization"]
    harbormaster.check_basic(header, username, password)
    for wrong, status in (
        (None, 401),
        ("Bearer x", 401),
        ("Basic !!!", 403),
        (header[:-2], 403),
        (header, 403),  # against another password
    ):
        with pytest.raises(harbormaster.Refused) as refused:
            harbormaster.check_basic(
                wrong, username, password if wrong is not header else password + "x"
            )
        assert refused.value.status == status


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        ({"target": "PHID-HMBT-svmmczi2y2ihxt36ffdd"}, True),
        ({}, False),
        ({"target": ""}, False),
        ({"target": "PHID-DREV-svmmczi2y2ihxt36ffdd"}, False),
        ({"target": "PHID-HMBT-svmmczi2y2ihxt36ffdd&x"}, False),
        ({"target": "PHID-HMBT-" + "a" * 10_000}, False),
    ],
)
def test_the_target_comes_from_the_query_as_a_build_target_phid(
    query: dict[str, str], ok: bool
) -> None:
    if ok:
        assert harbormaster.target_phid(query) == query["target"]
        return
    with pytest.raises(harbormaster.Refused) as refused:
        harbormaster.target_phid(query)
    assert (refused.value.status, refused.value.reason) == (400, harbormaster.NO_TARGET)
