"""Herald webhooks through the gateway, over real sockets against the real API server: the
Conduit test server delivers as Phorge does, the gateway verifies and forwards to a real HTTP
target on loopback; every bad input gets its own answer, audit line and count, and nothing of
it is forwarded."""

from __future__ import annotations

import base64
import concurrent.futures
import http.server
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import structlog
from kubernetes import client

from phabmesh import herald, resources
from phabmesh.conduit import wire
from phabmesh.dev.conduit import ConduitServer
from phabmesh.dev.conduit.hooks import Delivery, Hook
from tests.kube import Cluster, wait_for
from tests.stack import Threaded

G, V = resources.GROUP, resources.VERSION
SYSTEM = "phabmesh-system"
KEY = "Zq3v9Lk2Pw8Tn5Rb7Yx1Hc4Jm6Gd0Fs2"  # an HMAC key as Phorge makes them: 32 characters
PATH = "/phorge/hooks"


class Target:
    """A real HTTP server on loopback: every POST it receives, answered with ``status``."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 202
        self.arrived = threading.Event()  # set on each POST
        self.gate: threading.Event | None = None  # when set here: answer only once it is set
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target.received.append((self.path, dict(self.headers.items()), body))
                target.arrived.set()
                if target.gate is not None:
                    target.gate.wait(30)
                self.send_response(target.status)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"queued\n")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    yield server
    server.close()


def _free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _grant(cluster: Cluster, namespace: str, secret: str) -> None:
    """What docs/webhooks.md has a namespace's admin apply: phabmesh may read this one Secret."""
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "phabmesh-webhook-key"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": [secret],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "phabmesh-webhook-key"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "phabmesh-webhook-key",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": f"phabmesh-{who}", "namespace": SYSTEM}
                for who in ("operator", "gateway")
            ],
        },
    )


def _secret(cluster: Cluster, namespace: str, name: str, key: str = KEY) -> None:
    cluster.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=name),
            data={"hmacKey": base64.b64encode(key.encode()).decode()},
        ),
    )


def _service(cluster: Cluster, namespace: str, name: str, port: int) -> None:
    cluster.core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name=name),
            spec=client.V1ServiceSpec(
                selector={"app": name}, ports=[client.V1ServicePort(port=port)]
            ),
        ),
    )


def _webhook(cluster: Cluster, namespace: str, name: str, service: str, port: int) -> None:
    cluster.custom.create_namespaced_custom_object(
        G,
        V,
        namespace,
        resources.WEBHOOK_PLURAL,
        {
            "apiVersion": f"{G}/{V}",
            "kind": resources.WEBHOOK_KIND,
            "metadata": {"name": name},
            "spec": {
                "herald": {"secretRef": {"name": f"{name}-key"}},
                "target": {"service": service, "port": port, "path": PATH},
            },
        },
    )


def _ready(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.WEBHOOK_PLURAL, name
    )
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def _wait_reason(cluster: Cluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    return wait_for(
        lambda: (c := _ready(cluster, namespace, name)).get("reason") == reason and c,
        timeout=60,
        what=f"webhook {namespace}/{name} Ready reason {reason}",
    )


def _gateway_sees(gateway: Threaded, namespace: str, name: str) -> None:
    """The gateway's watches show the webhook Ready and its key."""
    state = gateway.process.state  # type: ignore[attr-defined]

    def sees() -> bool:
        hook = state.webhook(namespace, name)
        return hook is not None and hook.ready and state.hook_key(hook) is not None

    wait_for(sees, timeout=60, what=f"the gateway to see webhook {namespace}/{name}")


def _ready_webhook(
    cluster: Cluster, gateway: Threaded, namespace: str, name: str, service: str, port: int
) -> dict[str, Any]:
    """A webhook with everything it needs (grant, Secret, Service), Ready as the gateway sees
    it; its Ready condition."""
    _grant(cluster, namespace, f"{name}-key")
    _secret(cluster, namespace, f"{name}-key")
    _service(cluster, namespace, service, port)
    _webhook(cluster, namespace, name, service, port)
    ready = _wait_reason(cluster, namespace, name, "Ready")
    _gateway_sees(gateway, namespace, name)
    return ready


def _url(gateway: Threaded, namespace: str, name: str) -> str:
    port = gateway.process.port  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{port}/hooks/{namespace}/{name}"


def _edit(conduit: ConduitServer, admin_token: str, phid: str) -> None:
    """An edit through Conduit (``user.edit``: disable the account), as an admin makes it."""
    params = {"objectIdentifier": phid, "transactions": [{"type": "disabled", "value": True}]}
    answer = requests.post(
        f"{conduit.url}/api/user.edit",
        data=wire.encode_params_json(params, admin_token),
        timeout=10,
    )
    assert answer.json()["error_code"] is None, answer.text


def _deliveries(gateway: Threaded) -> dict[str, float]:
    port = gateway.process.metrics_port  # type: ignore[attr-defined]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("phabmesh_hook_deliveries_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.split()[-1])
        if line.startswith("phabmesh_hook_delivery_seconds_count{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[f"seconds:{outcome}"] = float(line.split()[-1])
    return counts


def _moved(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def _audit(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in captured if line.get("event") == "hook_delivery"]


def test_a_signed_delivery_reaches_the_target_and_every_bad_one_is_refused(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    target: Target,
) -> None:
    name = "ci"
    ready = _ready_webhook(cluster, gateway, namespace, name, "ci-listener", target.port)
    assert ready["status"] == "True"
    url = _url(gateway, namespace, name)
    admin = f"admin-{uuid.uuid4().hex[:8]}"
    conduit.add_user(admin, admin=True)
    admin_token = conduit.add_token(admin)
    edited = conduit.add_user(f"user-{uuid.uuid4().hex[:8]}")
    hook = conduit.add_hook(url, KEY)
    before = _deliveries(gateway)
    try:
        with structlog.testing.capture_logs() as captured:
            # An edit in Phorge: its webhook delivery goes through the gateway to the target.
            delivered_before = len(conduit.deliveries)
            _edit(conduit, admin_token, edited.phid)
            wait_for(lambda: len(conduit.deliveries) > delivered_before, what="the delivery")
            delivery: Delivery = conduit.deliveries[-1]
            assert (delivery.status, delivery.text) == (202, "queued\n")
            assert len(target.received) == 1
            path, headers, body = target.received[0]
            assert path == PATH
            assert body == delivery.body  # byte for byte: the target can check it too
            assert headers[herald.SIGNATURE_HEADER] == herald.sign(body, KEY)
            assert headers["Content-Type"] == "application/json"
            verified = herald.verify(
                body, headers[herald.SIGNATURE_HEADER], KEY, now=time.time(), freshness=60
            )
            assert verified.object_phid == edited.phid
            # As Phorge builds it for an edit: the rule that called the hook, the edit's
            # transactions, not a test.
            payload = json.loads(body)
            assert payload["object"] == {"type": "USER", "phid": edited.phid}
            assert payload["triggers"] == [{"phid": hook.rule_phid}]
            assert [x["phid"][:15] for x in payload["transactions"]] == ["PHID-XACT-USER-"]
            assert payload["action"]["test"] is False

            # Each bad input: its own status and message; none reaches the target.
            wrong = Hook(url, KEY[::-1])
            forged = conduit.call_hook(wrong, edited.phid)
            unsigned = conduit.post_hook(url, delivery.body, {"Content-Type": "application/json"})
            epoch = int(time.time()) - 3600
            stale = conduit.call_hook(hook, edited.phid, epoch=epoch)
            replayed = conduit.post_hook(url, delivery.body, delivery.headers)
            unknown = conduit.call_hook(Hook(_url(gateway, namespace, "nope"), KEY), edited.phid)
            other_ns = conduit.call_hook(Hook(_url(gateway, "default", name), KEY), edited.phid)
            junk = b'{"object": {"phid": "PHID-TASK-x"}}\n'
            malformed = conduit.post_hook(
                url, junk, {herald.SIGNATURE_HEADER: herald.sign(junk, KEY)}
            )
            answers = {
                "bad_signature": forged,
                "unsigned": unsigned,
                "malformed": malformed,
                "replayed": replayed,
                "unknown_webhook": unknown,
                "unknown_webhook(other namespace)": other_ns,
            }
            statuses = {k: (a.status, a.text.strip()) for k, a in answers.items()}
            assert statuses == {
                "bad_signature": (
                    403,
                    f"phabmesh: {herald.SIGNATURE_HEADER} does not match the body",
                ),
                "unsigned": (401, f"phabmesh: no {herald.SIGNATURE_HEADER} header"),
                "malformed": (400, "phabmesh: the body is not a Herald webhook payload"),
                "replayed": (
                    409,
                    "phabmesh: this delivery was already received (same signed body)",
                ),
                "unknown_webhook": (404, f"phabmesh: no PhabricatorWebhook {namespace}/nope"),
                "unknown_webhook(other namespace)": (
                    404,
                    f"phabmesh: no PhabricatorWebhook default/{name}",
                ),
            }
            assert stale.status == 422
            assert re.fullmatch(
                rf"phabmesh: action\.epoch {epoch} is 360[01] s from now, outside the "
                r"freshness window \(300 s back, 60 s ahead\)",
                stale.text.strip(),
            ), stale.text
            assert len(target.received) == 1
            # A test call from Phorge's "Call Webhook" goes through as any delivery does.
            tested = conduit.call_hook(hook, edited.phid)
            assert tested.status == 202
            assert len(target.received) == 2
    finally:
        conduit.remove_hook(hook)
    moved = _moved(_deliveries(gateway), before)
    assert moved == {
        "delivered": 2,
        "bad_signature": 1,
        "unsigned": 1,
        "malformed": 1,
        "stale": 1,
        "replayed": 1,
        "unknown_webhook": 2,
        "seconds:delivered": 2,
        "seconds:bad_signature": 1,
        "seconds:unsigned": 1,
        "seconds:malformed": 1,
        "seconds:stale": 1,
        "seconds:replayed": 1,
        "seconds:unknown_webhook": 2,
    }
    audit = _audit(captured)
    assert [line["outcome"] for line in audit] == [
        "delivered",
        "bad_signature",
        "unsigned",
        "stale",
        "replayed",
        "unknown_webhook",
        "unknown_webhook",
        "malformed",
        "delivered",
    ]
    first = audit[0]
    assert first["source"] == "herald"
    assert first["object_phid"] == edited.phid
    assert (first["namespace"], first["webhook"]) == (namespace, name)
    assert first["target"] == f"ci-listener:{target.port}{PATH}"
    assert first["status"] == 202
    assert isinstance(first["latency_ms"], float)
    assert audit[-1]["test"] is True
    # Never the key, never a signature, in any line of the gateway's.
    text = repr(captured)
    assert KEY not in text
    for _, headers, _ in target.received:
        assert headers[herald.SIGNATURE_HEADER] not in text
    assert delivery.headers[herald.SIGNATURE_HEADER] not in text


def test_a_webhook_without_its_secret_says_so_and_refuses_until_it_is_there(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
) -> None:
    name = "deploys"
    port = _free_port()  # nothing listens there: the target is unreachable
    _grant(cluster, namespace, f"{name}-key")
    _service(cluster, namespace, "deployer", port)
    _webhook(cluster, namespace, name, "deployer", port)
    missing = _wait_reason(cluster, namespace, name, "SecretMissing")
    assert missing["status"] == "False"
    assert missing["message"] == f'Secret "{name}-key" not found in this namespace'

    def warned() -> bool:  # Events are posted in the background, after the status
        events = cluster.core.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={name}"
        )
        return any(e.reason == "SecretMissing" and e.type == "Warning" for e in events.items)

    wait_for(warned, what="a SecretMissing Warning Event")
    url = _url(gateway, namespace, name)
    hook = Hook(url, KEY)
    state = gateway.process.state  # type: ignore[attr-defined]
    wait_for(lambda: state.webhook(namespace, name), what="the gateway to see the webhook")
    before = _deliveries(gateway)
    with structlog.testing.capture_logs() as captured:
        refused = conduit.call_hook(hook, "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
        assert (refused.status, refused.text.strip()) == (
            503,
            f"phabmesh: PhabricatorWebhook {namespace}/{name} is not Ready (SecretMissing)",
        )
        # The Secret, without the key it names, then with it.
        cluster.core.create_namespaced_secret(
            namespace,
            client.V1Secret(metadata=client.V1ObjectMeta(name=f"{name}-key"), data={"x": "eA=="}),
        )
        _wait_reason(cluster, namespace, name, "KeyMissing")
        cluster.core.patch_namespaced_secret(
            f"{name}-key",
            namespace,
            {"data": {"hmacKey": base64.b64encode(KEY.encode()).decode()}},
        )
        _wait_reason(cluster, namespace, name, "Ready")
        _gateway_sees(gateway, namespace, name)
        unreachable = conduit.call_hook(hook, "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
        assert unreachable.status == 502
        assert unreachable.text.startswith("phabmesh: the target could not be reached")
        # Not delivered: Phorge's retry of the same body is not taken for a replay.
        again = conduit.post_hook(url, unreachable.body, unreachable.headers)
        assert again.status == 502
    assert _moved(_deliveries(gateway), before) == {
        "not_ready": 1,
        "target_unreachable": 2,
        "seconds:not_ready": 1,
        "seconds:target_unreachable": 2,
    }
    audit = _audit(captured)
    assert [(a["outcome"], a["status"]) for a in audit] == [
        ("not_ready", 503),
        ("target_unreachable", 502),
        ("target_unreachable", 502),
    ]
    assert audit[1]["object_phid"] == "PHID-TASK-aaaaaaaaaaaaaaaaaaaa"
    assert audit[1]["target"] == f"deployer:{port}{PATH}"


def test_phabmesh_reads_a_webhooks_secret_only_once_its_namespace_grants_it(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    target: Target,
) -> None:
    name = "granted-later"
    _secret(cluster, namespace, f"{name}-key")
    _service(cluster, namespace, "listener", target.port)
    _webhook(cluster, namespace, name, "listener", target.port)
    forbidden = _wait_reason(cluster, namespace, name, "SecretForbidden")
    assert forbidden["status"] == "False"
    assert "grant it in this namespace" in forbidden["message"]
    state = gateway.process.state  # type: ignore[attr-defined]
    wait_for(
        lambda: (h := state.webhook(namespace, name)) and h.reason == "SecretForbidden",
        what="the gateway to see the webhook refused its Secret",
    )
    # Nothing was tried: no watch of a Secret this namespace did not grant (the session's
    # RBAC audit fails on any refused call that is never allowed).
    assert (namespace, f"{name}-key") not in state.hook_keys.watches
    url = _url(gateway, namespace, name)
    refused = conduit.call_hook(Hook(url, KEY), "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
    assert (refused.status, refused.text.strip()) == (
        503,
        f"phabmesh: PhabricatorWebhook {namespace}/{name} is not Ready (SecretForbidden)",
    )
    _grant(cluster, namespace, f"{name}-key")
    _wait_reason(cluster, namespace, name, "Ready")
    _gateway_sees(gateway, namespace, name)
    delivered = conduit.call_hook(Hook(url, KEY), "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
    assert delivered.status == 202
    assert [body for _, _, body in target.received] == [delivered.body]
    # The grant withdrawn: SecretForbidden again, the watch and the key dropped, refused.
    rbac = client.RbacAuthorizationV1Api(cluster.api)
    rbac.delete_namespaced_role_binding("phabmesh-webhook-key", namespace)
    _wait_reason(cluster, namespace, name, "SecretForbidden")
    wait_for(
        lambda: (namespace, f"{name}-key") not in state.hook_keys.watches,
        what="the gateway to stop watching the Secret",
    )
    assert state.hook_key(state.webhook(namespace, name)) is None
    again = conduit.call_hook(Hook(url, KEY), "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
    assert again.status == 503
    assert len(target.received) == 1


def test_a_slow_target_a_busy_webhook_a_large_body_and_a_failing_target(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    target: Target,
) -> None:
    name = "bounded"
    _ready_webhook(cluster, gateway, namespace, name, "listener", target.port)
    url = _url(gateway, namespace, name)
    hooks = gateway.process.hooks  # type: ignore[attr-defined]
    settings = hooks.settings
    hooks.settings = settings.replace(hooks_timeout=0.5, hooks_max_concurrent=1)
    before = _deliveries(gateway)
    target.gate = threading.Event()
    try:
        # The target never answers in time: 504 (it did receive the delivery).
        slow = conduit.call_hook(Hook(url, KEY), "PHID-TASK-aaaaaaaaaaaaaaaaaaaa")
        assert (slow.status, slow.text.strip()) == (
            504,
            "phabmesh: the target did not answer within 0.5 s",
        )
        assert len(target.received) == 1
        # One delivery in flight is this webhook's bound: the next is refused at once.
        hooks.settings = settings.replace(hooks_max_concurrent=1)
        target.arrived.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(conduit.call_hook, Hook(url, KEY), "PHID-TASK-bbbbbbbbbbbbbbbbbbbb")
            assert target.arrived.wait(30)
            busy = conduit.call_hook(Hook(url, KEY), "PHID-TASK-cccccccccccccccccccc")
            target.gate.set()
            assert first.result(30).status == 202
        assert busy.status == 429
        assert "1 deliveries to this webhook are in flight" in busy.text
        assert len(target.received) == 2
        # Over the gateway's request size (PHABMESH_MAX_REQUEST_BYTES): 413, not read.
        large = requests.post(url, data=b"x" * (settings.max_request_bytes + 1), timeout=30)
        assert large.status_code == 413
        assert len(target.received) == 2
        # The target's own refusal is Phorge's answer; a 5xx is not delivered, so Phorge's
        # retry of the same body is forwarded again, not refused as a replay.
        hooks.settings = settings
        target.status = 503
        failed = conduit.call_hook(Hook(url, KEY), "PHID-TASK-dddddddddddddddddddd")
        assert (failed.status, failed.text) == (503, "queued\n")
        retried = conduit.post_hook(url, failed.body, failed.headers)
        assert retried.status == 503
        assert len(target.received) == 4
    finally:
        hooks.settings = settings
        target.gate.set()
    assert _moved(_deliveries(gateway), before) == {
        "target_timeout": 1,
        "busy": 1,
        "delivered": 1,
        "too_large": 1,
        "target_error": 2,
        "seconds:target_timeout": 1,
        "seconds:busy": 1,
        "seconds:delivered": 1,
        "seconds:too_large": 1,
        "seconds:target_error": 2,
    }


def test_a_rotated_key_is_used_at_once_and_the_old_one_refused(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    target: Target,
) -> None:
    name = "rotated"
    _ready_webhook(cluster, gateway, namespace, name, "listener", target.port)
    url = _url(gateway, namespace, name)
    assert conduit.call_hook(Hook(url, KEY), "PHID-TASK-aaaaaaaaaaaaaaaaaaaa").status == 202
    new_key = KEY[::-1]
    cluster.core.patch_namespaced_secret(
        f"{name}-key", namespace, {"data": {"hmacKey": base64.b64encode(new_key.encode()).decode()}}
    )
    state = gateway.process.state  # type: ignore[attr-defined]
    wait_for(
        lambda: state.hook_key(state.webhook(namespace, name)) == new_key,
        what="the gateway to see the new key",
    )
    old = conduit.call_hook(Hook(url, KEY), "PHID-TASK-bbbbbbbbbbbbbbbbbbbb")
    assert old.status == 403
    assert conduit.call_hook(Hook(url, new_key), "PHID-TASK-cccccccccccccccccccc").status == 202
    assert len(target.received) == 2


def test_the_hooks_port_serves_hooks_and_nothing_else(gateway: Threaded) -> None:
    """The port a Phorge outside the mesh may be let in on: /hooks/ answers there, /api/ does
    not (it stays on the Conduit port, for meshed callers)."""
    port = gateway.process.hooks_port  # type: ignore[attr-defined]
    assert port and port != gateway.process.port  # type: ignore[attr-defined]
    hook = requests.post(f"http://127.0.0.1:{port}/hooks/nowhere/none", data=b"{}", timeout=10)
    assert (hook.status_code, hook.text.strip()) == (
        404,
        "phabmesh: no PhabricatorWebhook nowhere/none",
    )
    api = requests.post(f"http://127.0.0.1:{port}/api/conduit.ping", data={}, timeout=10)
    assert api.status_code == 404 and "ERR-" not in api.text


def test_a_query_on_a_herald_webhooks_url_is_not_passed_on(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    target: Target,
) -> None:
    """The signature covers the body, not the URL: a query someone added to the URL never
    reaches the target."""
    _ready_webhook(cluster, gateway, namespace, "q", "q-listener", target.port)
    hook = Hook(_url(gateway, namespace, "q") + "?deploy=prod&x=%2541", KEY)
    answer = conduit.call_hook(hook, "PHID-USER-aaaaaaaaaaaaaaaaaaaa")
    assert answer.status == 202, answer.text
    assert [path for path, _, _ in target.received] == [PATH]
