"""The Conduit gateway over real sockets: every client style, every refusal, outages."""

from __future__ import annotations

import base64
import datetime
import gzip
import http.client
import http.server
import json
import re
import socket
import threading
import time
import uuid
import zlib
from typing import Any, ClassVar
from urllib.parse import urlencode

import jwt
import pytest
import requests

from phabmesh import credentials, gatewayrole
from phabmesh.conduit import responses, wire
from phabmesh.credentials.keys import SigningKey
from phabmesh.dev.conduit import ConduitServer
from phabmesh.leases.view import LeaseView
from phabmesh.processes.gateway import GatewayProcess
from tests.kube import Cluster, wait_for
from tests.phab import (
    SYSTEM,
    active_leases,
    exchange,
    leases,
    make_pod,
    pod_token,
    settings_for,
)
from tests.redirects import REDIRECT_STATUSES, redirecting
from tests.stack import Threaded

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class Pod:
    def __init__(self, name: str, credential: str, bot_token: str) -> None:
        self.name = name
        self.credential = credential
        self.bot_token = bot_token


PHORGE_SHAPE = re.compile(r"^api-[a-z0-9]{28}$")  # what clients check a Phorge token against
PHABFIVE_SHAPE = re.compile(r"^[a-zA-Z0-9-]{32}$")


def _pod(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    bound: str,
    **params: str,
) -> Pod:
    created = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    issued = exchange(operator, pod_token(cluster, bound, created), **params)
    assert issued.status_code == 200, issued.text
    bot_token = conduit.add_token(f"bot-{bound}")
    wait_for(lambda: _leases_seen(gateway, bound), what="the gateway to see the lease")
    return Pod("runner-1", issued.json()["credential"], bot_token)


@pytest.fixture
def pod(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> Pod:
    """A pod with a credential in the default format (shaped like a Phorge token)."""
    return _pod(cluster, conduit, operator, gateway, bound)


@pytest.fixture
def jwt_pod(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> Pod:
    """A pod with a JWT credential (?format=jwt)."""
    return _pod(cluster, conduit, operator, gateway, bound, format="jwt")


@pytest.fixture(params=["phorge-token", "jwt"])
def any_pod(
    request: pytest.FixtureRequest,
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    bound: str,
) -> Pod:
    """A pod with a credential in each format in turn."""
    return _pod(cluster, conduit, operator, gateway, bound, format=request.param)


def _leases_seen(gateway: Threaded, namespace: str) -> list[LeaseView]:
    """The leases of ``namespace`` in the gateway's index."""
    index = gateway.process.state.leases.by_uid  # type: ignore[attr-defined]
    return [lease for lease in index.values() if lease.namespace == namespace]


def url(gateway: Threaded, method: str) -> str:
    return f"http://127.0.0.1:{gateway.process.port}/api/{method}"  # type: ignore[attr-defined]


def call(gateway: Threaded, method: str, **kw: Any) -> requests.Response:
    return requests.post(url(gateway, method), timeout=10, **kw)


def envelope(response: requests.Response) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(response.text)
    return answer


def test_every_client_style_passes_and_matches_a_direct_call(
    gateway: Threaded, conduit: ConduitServer, any_pod: Pod, bound: str
) -> None:
    pod = any_pod
    bot = f"bot-{bound}"
    direct = requests.post(
        f"{conduit.url}/api/user.whoami",
        data=urlencode(wire.encode_form({}, pod.bot_token)),
        headers=FORM,
        timeout=10,
    )
    styles = {
        "curl (flat form)": dict(data={"api.token": pod.credential, "output": "json"}),
        "arcanist (params JSON)": dict(
            data=urlencode(wire.encode_params_json({}, pod.credential)), headers=FORM
        ),
        "arcanist, gzip": dict(
            data=gzip.compress(urlencode(wire.encode_params_json({}, pod.credential)).encode()),
            headers={**FORM, "Content-Encoding": "gzip"},
        ),
        "query string": dict(params={"api.token": pod.credential}),
    }
    for style, kwargs in styles.items():
        through = call(gateway, "user.whoami", **kwargs)
        assert through.status_code == 200, style
        assert through.content == direct.content, style  # byte-identical
        assert envelope(through)["result"]["userName"] == bot, style
        assert through.headers["X-Conduit-Capabilities"] == "gzip"
        assert "Set-Cookie" not in through.headers


def test_search_with_constraints_through_the_gateway(
    gateway: Threaded, pod: Pod, bound: str
) -> None:
    answer = envelope(
        call(
            gateway,
            "user.search",
            data=[("api.token", pod.credential), ("constraints[usernames][0]", f"bot-{bound}")],
        )
    )
    assert [u["fields"]["username"] for u in answer["result"]["data"]] == [f"bot-{bound}"]


def test_public_methods_need_no_credential(gateway: Threaded) -> None:
    assert envelope(call(gateway, "conduit.ping"))["error_code"] is None
    caps = envelope(call(gateway, "conduit.getcapabilities"))
    assert "token" in caps["result"]["authentication"]


def test_no_credential_is_an_invalid_session(gateway: Threaded) -> None:
    answer = envelope(call(gateway, "user.whoami", data={"output": "json"}))
    assert answer["error_code"] == "ERR-INVALID-SESSION"


def test_method_outside_the_allowlist_is_refused(gateway: Threaded, pod: Pod) -> None:
    answer = envelope(call(gateway, "maniphest.edit", data={"api.token": pod.credential}))
    assert answer["error_code"] == "ERR-CONDUIT-CORE"
    assert "not allowed by PhabricatorBinding" in answer["error_info"]


def test_a_method_name_with_a_tail_is_refused_not_forwarded(
    gateway: Threaded, conduit: ConduitServer, pod: Pod
) -> None:
    """``user.whoami%0A`` once passed ``user.*`` and was forwarded as user.whoami."""
    before = conduit.calls["user.whoami"]
    for tail in ("%0A", "%0D%0A", "%00", "%20"):
        answer = envelope(call(gateway, "user.whoami" + tail, data={"api.token": pod.credential}))
        assert answer["error_code"] == "ERR-CONDUIT-CORE", tail
        assert "is not a Conduit method name" in answer["error_info"]
    assert conduit.calls["user.whoami"] == before
    assert envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))["result"]


def test_spoofed_client_identity_is_refused(gateway: Threaded, pod: Pod, bound: str) -> None:
    answer = envelope(
        call(
            gateway,
            "user.whoami",
            data={"api.token": pod.credential},
            headers={
                "l5d-client-id": f"intruder.{bound}.serviceaccount.identity.linkerd.cluster.local"
            },
        )
    )
    assert answer["error_code"] == "ERR-INVALID-AUTH"
    assert "l5d-client-id" in answer["error_info"]
    matching = f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    ok = envelope(
        call(
            gateway,
            "user.whoami",
            data={"api.token": pod.credential},
            headers={"l5d-client-id": matching},
        )
    )
    assert ok["error_code"] is None


def _forged(pod: Pod, how: str) -> str:
    """A JWT credential, altered."""
    claims = credentials.unverified_claims(pod.credential)
    kid = jwt.get_unverified_header(pod.credential)["kid"]
    other = SigningKey.generate(datetime.datetime.now(datetime.UTC))
    if how == "unknown key":
        return jwt.encode(claims, other.private_key, algorithm="EdDSA", headers={"kid": other.kid})
    if how == "another key, same kid":
        return jwt.encode(claims, other.private_key, algorithm="EdDSA", headers={"kid": kid})
    if how == "alg none":
        head = credentials.keys.b64url(json.dumps({"alg": "none", "kid": kid}).encode())
        body = credentials.keys.b64url(json.dumps(claims).encode())
        return f"{head}.{body}."
    if how == "expired":
        claims.update(exp=int(time.time()) - 3600)
    elif how == "other audience":
        claims.update(aud="someone-else")
    elif how == "tampered":
        claims.update(pod_uid="another-pod")
    head, _, sig = pod.credential.split(".")
    return f"{head}.{credentials.keys.b64url(json.dumps(claims).encode())}.{sig}"


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("unknown key", "unknown key"),
        ("another key, same kid", "signature"),
        ("alg none", "algorithm"),
        ("expired", "signature"),  # re-signed claims cannot keep the signature
        ("other audience", "signature"),
        ("tampered", "signature"),
    ],
)
def test_forged_credentials_are_refused(
    gateway: Threaded, jwt_pod: Pod, how: str, says: str
) -> None:
    pod = jwt_pod
    answer = envelope(call(gateway, "user.whoami", data={"api.token": _forged(pod, how)}))
    assert answer["error_code"] == "ERR-INVALID-AUTH"
    assert says in answer["error_info"]
    assert pod.credential not in answer["error_info"]


def test_deleted_pod_credential_is_refused(
    cluster: Cluster, gateway: Threaded, any_pod: Pod, bound: str
) -> None:
    pod = any_pod
    assert envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))["result"]
    cluster.core.delete_namespaced_pod(pod.name, bound, grace_period_seconds=0)
    refused = wait_for(
        lambda: (
            (a := envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))).get(
                "error_code"
            )
            and a
        )
    )
    assert refused["error_code"] == "ERR-INVALID-AUTH"
    assert refused["error_info"].startswith("credential revoked: ")  # pod ..., or lease deleted
    wait_for(lambda: leases(cluster, bound) == [])
    wait_for(lambda: not _leases_seen(gateway, bound), what="the gateway to see the lease go")
    # With its lease gone from the gateway's index too, it still says why.
    gone = envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))
    assert gone["error_code"] == "ERR-INVALID-AUTH"
    assert gone["error_info"].startswith("credential revoked: "), gone


def test_phabricator_down_then_back(gateway: Threaded, conduit: ConduitServer, pod: Pod) -> None:
    conduit.down = True
    try:
        started = time.monotonic()
        down = call(gateway, "user.whoami", data={"api.token": pod.credential})
        assert time.monotonic() - started < 5
        assert down.status_code == 503
        assert envelope(down)["error_code"] == "ERR-PHABRICATOR-UNAVAILABLE"
        conduit.down, conduit.delay = False, 3.0  # slower than the gateway's 2 s timeout
        slow = call(gateway, "user.whoami", data={"api.token": pod.credential})
        assert envelope(slow)["error_code"] == "ERR-PHABRICATOR-UNAVAILABLE"
        # The answer names where the gateway looked, and why it got nothing.
        info = envelope(slow)["error_info"]
        assert f"Phabricator at {conduit.url} is unavailable (timeout: " in info, info
    finally:
        conduit.down, conduit.delay = False, 0.0
    back = envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))
    assert back["error_code"] is None


def test_bodies_over_the_limit_are_refused(gateway: Threaded, pod: Pod) -> None:
    huge = {"api.token": pod.credential, "junk": "x" * (2 << 20)}
    assert call(gateway, "user.whoami", data=huge).status_code == 413
    bomb = gzip.compress(b"a=" + b"b" * (8 << 20))
    refused = call(gateway, "user.whoami", data=bomb, headers={**FORM, "Content-Encoding": "gzip"})
    assert refused.status_code == 413
    assert envelope(call(gateway, "conduit.ping"))["error_code"] is None  # still serving


def test_metrics_and_audit(gateway: Threaded, pod: Pod) -> None:
    call(gateway, "user.whoami", data={"api.token": pod.credential})
    port = gateway.process.metrics_port  # type: ignore[attr-defined]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    # The label is the allowlist entry that let the call through (the binding allows user.*).
    assert 'phabmesh_gateway_requests_total{decision="allowed",method="user.*"}' in text
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200


def test_malformed_bodies_get_phorges_own_answers(gateway: Threaded) -> None:
    bad_json = envelope(
        call(gateway, "user.whoami", data="params=%7Bnot-json&output=json", headers=FORM)
    )
    assert bad_json == {
        "result": None,
        "error_code": "ERR-CONDUIT-CORE",
        "error_info": "Invalid parameter information was passed to method 'user.whoami'.",
    }
    json_body = envelope(call(gateway, "user.whoami", json={"api.token": "x"}))
    assert json_body["error_code"] == "ERR-CONDUIT-CORE"
    assert json_body["error_info"].startswith("Use form-encoded data")


def _raw(gateway: Threaded, request: bytes) -> bytes:
    """Send bytes as they are (no client library to tidy them up); the answer's first line."""
    port = gateway.process.port  # type: ignore[attr-defined]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return sock.recv(65536).split(b"\r\n", 1)[0]


def test_hostile_requests_get_clear_answers_and_the_gateway_keeps_serving(
    gateway: Threaded, pod: Pod
) -> None:
    token = {"api.token": pod.credential}
    # Header injection: CR/LF inside a header value, or a header smuggled in the path.
    injected = _raw(
        gateway,
        b"POST /api/user.whoami HTTP/1.1\r\nHost: x\r\n"
        b"l5d-client-id: a\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n",
    )
    assert injected.split(b" ")[1] == b"400", injected
    smuggled = _raw(gateway, b"POST /api/user.whoami%0d%0aX-Evil:%201 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert smuggled.split(b" ")[1] in {b"200", b"400", b"404"}, smuggled
    # Two Content-Length headers (request smuggling) are refused by the parser.
    double = _raw(
        gateway,
        b"POST /api/conduit.ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Content-Length: 5\r\n\r\nhello",
    )
    assert double.split(b" ")[1] == b"400", double
    # Unknown and absurd method names: Phorge's own answer, no upstream call.
    for method in ("no.such.method", "x" * 5000, "user.whoami.", "../../conduit.ping"):
        answer = call(gateway, method, data=token)
        assert answer.status_code in (200, 404), (method[:20], answer.status_code)
        if answer.status_code == 200:
            assert envelope(answer)["error_code"] is not None, method[:20]
    # Absurd parameter counts and sizes: 9,000 fields pass, 20,000 are refused (a bound on
    # parsing work), a value nested 100,000 deep is refused as Phorge refuses bad params.
    many = {**token, **{f"k{i}": "v" for i in range(9_000)}}
    forwarded = call(gateway, "user.whoami", data=many)  # Phorge's answer, whatever it is
    assert forwarded.status_code == 200
    assert envelope(forwarded)["error_code"] != "ERR-REQUEST-TOO-LARGE"
    too_many = call(gateway, "user.whoami", data={**many, **{f"j{i}": "" for i in range(11_000)}})
    assert too_many.status_code == 413
    assert envelope(too_many)["error_code"] == "ERR-REQUEST-TOO-LARGE"
    deep = "[" * 100_000 + "]" * 100_000
    nested = envelope(call(gateway, "user.whoami", data={**token, "params": deep}))
    assert nested["error_code"] == "ERR-CONDUIT-CORE"
    # Wrong content types: read as Phorge reads them, never a crash.
    for kind in ("text/xml", "multipart/form-data; boundary=x", "application/octet-stream"):
        answer = call(gateway, "user.whoami", data=b"\x00\xff<a/>", headers={"Content-Type": kind})
        assert answer.status_code in (200, 400, 413, 415), (kind, answer.status_code)
        assert envelope(answer)["error_code"] is not None, kind
    # Still serving, as before.
    assert envelope(call(gateway, "user.whoami", data=token))["error_code"] is None


def _metrics(gateway: Threaded) -> str:
    port = gateway.process.metrics_port  # type: ignore[attr-defined]
    return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def _count(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


BAD_REQUESTS = 'phabmesh_gateway_requests_total{decision="bad_request",method="other"}'


def test_a_hostile_value_is_echoed_and_audited_only_in_part(gateway: Threaded) -> None:
    before = _count(_metrics(gateway), BAD_REQUESTS)
    flood = "-----BEGIN PRIVATE KEY-----" * 12_000  # 324 KB: the gateway froze on it
    answer = call(gateway, "user.whoami", data={"params[x]": flood})
    refused = envelope(answer)
    assert refused["error_code"] == "ERR-CONDUIT-CORE"
    assert refused["error_info"].startswith("The value for parameter 'x' is not valid JSON.")
    assert len(answer.content) < 2048
    assert _count(_metrics(gateway), BAD_REQUESTS) == before + 1
    assert envelope(call(gateway, "conduit.ping"))["error_code"] is None


def test_deeply_nested_field_names_are_refused_not_a_500(gateway: Threaded) -> None:
    before = _count(_metrics(gateway), BAD_REQUESTS)
    deep = "a" + "[x]" * 3000 + "=1"
    for method in ("conduit.ping", "user.whoami"):
        answer = call(gateway, method, data=deep, headers=FORM)
        assert answer.status_code == 200
        refused = envelope(answer)
        assert refused["error_code"] == "ERR-CONDUIT-CORE"
        assert "nests deeper than 64 levels" in refused["error_info"]
    assert _count(_metrics(gateway), BAD_REQUESTS) == before + 2


def test_unauthenticated_method_names_add_no_metric_series(gateway: Threaded) -> None:
    def series(text: str) -> set[str]:
        return {
            line.split(" ")[0]
            for line in text.splitlines()
            if line.startswith("phabmesh_gateway_requests_total{")
        }

    call(gateway, "xwarmup", data={})  # the "other" series of this decision exists from here
    before = series(_metrics(gateway))
    names = [f"x{uuid.uuid4().hex}" for _ in range(200)]
    for name in names:
        assert envelope(call(gateway, name, data={}))["error_code"] == "ERR-INVALID-SESSION"
    text = _metrics(gateway)
    assert series(text) == before
    assert not any(name in text for name in names)


class _CookieUpstream(http.server.BaseHTTPRequestHandler):
    """A Phabricator that, like Phorge on anonymous calls, sets a session cookie each time."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(dict(self.headers))
        body = b'{"result":"pong","error_code":null,"error_info":null}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Set-Cookie", f"phsid=caller-{len(self.seen)}; path=/; httponly")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the hook's signature
        pass


def test_no_cookie_or_header_of_one_caller_reaches_another(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded
) -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CookieUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    # A DNS name, not an address: cookie jars keep cookies only for those.
    settings = settings_for(conduit).replace(
        phabricator_url=f"http://localhost:{upstream.server_port}"
    )
    own = Threaded(GatewayProcess(settings, kubeconfig=str(cluster.kubeconfig))).start()
    try:
        base = f"http://127.0.0.1:{own.process.port}/api/conduit.ping"  # type: ignore[attr-defined]
        first = requests.post(
            base, data={}, headers={"Cookie": "phsid=mine", "X-Caller": "one"}, timeout=10
        )
        assert first.status_code == 200
        assert "Set-Cookie" not in first.headers
        second = requests.post(base, data={}, timeout=10)
        assert envelope(second)["result"] == "pong"
        assert len(_CookieUpstream.seen) == 2
        for seen in _CookieUpstream.seen:
            assert "Cookie" not in seen, seen
            assert "X-Caller" not in seen, seen
    finally:
        own.stop()
        upstream.shutdown()
        upstream.server_close()


def _raw_call(
    gateway: Threaded, method: str, fields: dict[str, str], accept: str | None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A call with exactly this Accept-Encoding (or none): status, headers, body as sent."""
    port = gateway.process.port  # type: ignore[attr-defined]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = urlencode(fields).encode()
        conn.putrequest("POST", f"/api/{method}", skip_accept_encoding=True)
        conn.putheader("Content-Type", FORM["Content-Type"])
        conn.putheader("Content-Length", str(len(body)))
        if accept is not None:
            conn.putheader("Accept-Encoding", accept)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _decoded(headers: http.client.HTTPMessage, raw: bytes) -> dict[str, Any]:
    coding = headers.get("Content-Encoding")
    if coding == "gzip":
        raw = gzip.decompress(raw)
    elif coding == "deflate":
        raw = zlib.decompress(raw)
    else:
        assert coding is None, coding
    answer: dict[str, Any] = json.loads(raw)
    return answer


# What a stock Phorge answers for each Accept-Encoding (absent: None).
ENCODINGS = [("gzip", "gzip"), ("gzip, deflate", "gzip"), ("deflate", "deflate")]
ENCODINGS += [("identity", None), (None, None)]


@pytest.mark.parametrize(("accept", "coding"), ENCODINGS)
def test_answers_and_refusals_are_encoded_for_each_client(
    gateway: Threaded, pod: Pod, bound: str, accept: str | None, coding: str | None
) -> None:
    forwarded = _raw_call(gateway, "user.whoami", {"api.token": pod.credential}, accept)
    refused = _raw_call(gateway, "maniphest.edit", {"api.token": pod.credential}, accept)
    for status, headers, _ in (forwarded, refused):
        assert status == 200
        assert headers.get("Content-Encoding") == coding
        assert headers.get("Vary") == ("Accept-Encoding" if coding else None)
        for name, value in responses.CONDUIT_HEADERS.items():
            assert headers.get(name) == value, name
        assert "Set-Cookie" not in headers
    assert _decoded(*forwarded[1:])["result"]["userName"] == f"bot-{bound}"
    denied = _decoded(*refused[1:])
    assert denied["error_code"] == "ERR-CONDUIT-CORE"
    assert "not allowed by PhabricatorBinding" in denied["error_info"]


@pytest.mark.parametrize("accept", ["gzip", "deflate", None])
def test_the_bot_token_phorge_echoes_in_a_compressed_error_is_redacted(
    gateway: Threaded, conduit: ConduitServer, pod: Pod, bound: str, accept: str | None
) -> None:
    """A proxy in front of Phorge compresses its answers; the bot's token is refused there."""
    bot_token = gateway.process.state.bot_token(f"bot-{bound}")  # type: ignore[attr-defined]
    assert bot_token
    conduit.compress_anyway = "gzip"
    conduit.terminate_token(bot_token)
    try:
        status, headers, raw = _raw_call(
            gateway, "user.whoami", {"api.token": pod.credential}, accept
        )
    finally:
        conduit.add_token(f"bot-{bound}", bot_token)  # valid again, before the next re-check
        conduit.compress_anyway = None
    assert status == 200
    answer = _decoded(headers, raw)
    assert answer["error_code"] == "ERR-INVALID-AUTH"
    assert answer["error_info"] == 'API token "[REDACTED]" was previously valid, but has expired.'
    assert bot_token.encode() not in raw


def test_a_bot_made_while_the_gateway_runs_has_its_token_swapped_in(
    cluster: Cluster, gateway: Threaded, conduit: ConduitServer, pod: Pod, bound: str
) -> None:
    """The gateway reads no Secret but those the operator's Role names (manifests/
    rbac-gateway.yaml): a bot made after it started gets its Secret named there, and its token
    is swapped in; an apply that empties the Role is undone, and a new token in the Secret
    follows."""
    bot = f"bot-{bound}"
    assert f"{bot}-token" in _gateway_secret_names(cluster)
    answer = envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))
    assert answer["result"]["userName"] == bot
    reset = [{"op": "replace", "path": "/rules", "value": []}]
    cluster.kubectl(
        "patch", "role", gatewayrole.ROLE, "-n", SYSTEM, "--type=json", "-p", json.dumps(reset)
    )
    wait_for(
        lambda: f"{bot}-token" in _gateway_secret_names(cluster),
        what="the operator to name the bot's Secret in the Role again",
    )
    token = conduit.add_token(bot)
    data = {"token": base64.b64encode(token.encode()).decode()}
    cluster.core.patch_namespaced_secret(f"{bot}-token", SYSTEM, {"data": data})
    state = gateway.process.state  # type: ignore[attr-defined]
    wait_for(lambda: state.bot_token(bot) == token, what="the gateway to read the new token")
    answer = envelope(call(gateway, "user.whoami", data={"api.token": pod.credential}))
    assert answer["result"]["userName"] == bot


def _gateway_secret_names(cluster: Cluster) -> set[str]:
    out = cluster.kubectl("get", "role", gatewayrole.ROLE, "-n", SYSTEM, "-o", "json").stdout
    return set(gatewayrole.permitted(json.loads(out)))


def test_a_redirect_from_upstream_is_never_followed_with_the_bot_token(
    cluster: Cluster, conduit: ConduitServer, pod: Pod, bound: str
) -> None:
    """The gateway's client once re-sent the body, with the bot's real token, where a 307/308
    pointed, and answered a 301/302's target's answer as Phabricator's."""
    with redirecting() as redirects:
        settings = settings_for(conduit).replace(phabricator_url=redirects.url)
        own = Threaded(GatewayProcess(settings, kubeconfig=str(cluster.kubeconfig))).start()
        try:
            state = own.process.state  # type: ignore[attr-defined]
            wait_for(
                lambda: (
                    state.ready and _leases_seen(own, bound) and state.bot_token(f"bot-{bound}")
                ),
                what="the gateway to see the lease and the bot's token",
            )
            for status in REDIRECT_STATUSES:
                redirects.status = status
                for kwargs in (
                    dict(data={"api.token": pod.credential}),
                    dict(
                        data=gzip.compress(
                            urlencode(wire.encode_params_json({}, pod.credential)).encode()
                        ),
                        headers={**FORM, "Content-Encoding": "gzip"},
                    ),
                ):
                    answer = requests.post(
                        f"http://127.0.0.1:{own.process.port}/api/user.whoami",  # type: ignore[attr-defined]
                        timeout=10,
                        **kwargs,  # type: ignore[arg-type]
                    )
                    assert answer.status_code == 502, (status, answer.text)
                    refused = envelope(answer)
                    assert refused["error_code"] == "ERR-PHABRICATOR-UNAVAILABLE"
                    assert f"HTTP {status}, a redirect to localhost" in refused["error_info"]
                    assert pod.bot_token not in answer.text
            assert redirects.received == []
            assert not redirects.got(pod.bot_token)
        finally:
            own.stop()
