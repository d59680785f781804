"""Credentials shaped like Phorge tokens, end to end: issued, accepted, refused, chosen."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
from typing import Any

import pytest
import requests
import structlog.testing

from phabmesh import credentials, resources
from phabmesh.credentials import phorge
from phabmesh.dev.conduit import ConduitServer
from phabmesh.leases.view import LeaseView
from tests.kube import Cluster, wait_for
from tests.phab import G, V, active_leases, exchange, make_pod, pod_token, time_of
from tests.stack import Threaded

PHORGE_SHAPE = re.compile(r"^api-[a-z0-9]{28}$")  # a Phorge API token's shape
PHABFIVE_SHAPE = re.compile(r"^[a-zA-Z0-9-]{32}$")  # what phabfive checks before it starts
HOUR = datetime.timedelta(hours=1)


def whoami(gateway: Threaded, credential: str) -> dict[str, Any]:
    port = gateway.process.port  # type: ignore[attr-defined]
    answer = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami", data={"api.token": credential}, timeout=10
    )
    assert answer.status_code == 200
    body: dict[str, Any] = json.loads(answer.text)
    return body


def _lease_seen(gateway: Threaded, namespace: str) -> LeaseView | None:
    index = gateway.process.state.leases.by_uid  # type: ignore[attr-defined]
    return next((lease for lease in index.values() if lease.namespace == namespace), None)


class Issued:
    def __init__(self, pod: Any, token: str, lease: LeaseView) -> None:
        self.pod = pod
        self.token = token  # the pod's service-account token
        self.lease = lease  # as the gateway sees it


@pytest.fixture
def issued(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> Issued:
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    conduit.add_token(f"bot-{bound}")
    lease = wait_for(lambda: _lease_seen(gateway, bound), what="the gateway to see the lease")
    return Issued(pod, pod_token(cluster, bound, pod), lease)


def test_the_default_credential_is_shaped_like_a_phorge_token_and_works(
    cluster: Cluster, operator: Threaded, gateway: Threaded, issued: Issued, bound: str
) -> None:
    answer = exchange(operator, issued.token)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["format"] == "phorge-token"
    credential = body["credential"]
    assert PHORGE_SHAPE.match(credential) and PHABFIVE_SHAPE.match(credential)
    lease = active_leases(cluster, bound)[0]
    assert time_of(body["expiresAt"]) <= time_of(lease["status"]["expiresAt"])
    assert phorge.parse(credential).expires_at == time_of(body["expiresAt"])
    with structlog.testing.capture_logs() as captured:
        result = whoami(gateway, credential)
    assert result["error_code"] is None
    assert result["result"]["userName"] == f"bot-{bound}"
    audit = [line for line in captured if line.get("event") == "conduit_call"]
    assert audit and audit[-1]["credential_format"] == "phorge-token"
    assert audit[-1]["bot"] == f"bot-{bound}"
    assert credential not in repr(captured)  # not even before redaction


def _random_token() -> str:
    return "api-" + base64.b32encode(os.urandom(20)).decode().lower()[:28]


def _forged(issued: Issued, gateway: Threaded, good: str, how: str) -> str:
    ring = gateway.process.state.keys.ring  # type: ignore[attr-defined]
    lease = issued.lease
    now = datetime.datetime.now(datetime.UTC)
    if how == "one character changed":
        last = "a" if good[-1] != "a" else "b"
        return good[:-1] + last
    if how == "another key":
        other = credentials.KeyRing.generate(now)
        return phorge.mint(
            other, lease_uid=lease.uid, digest=lease.phorge_digest(), now=now, not_after=now + HOUR
        )
    if how == "expired":  # made an hour ago with the real key, for a lease term long past
        return phorge.mint(
            ring,
            lease_uid=lease.uid,
            digest=lease.phorge_digest(),
            now=now - 2 * HOUR,
            not_after=now - HOUR,
        )
    if how == "another pod's facts":
        digest = phorge.lease_digest(
            lease_uid=lease.uid,
            pod_uid="another-pod",
            namespace=lease.namespace,
            binding=lease.binding,
            bot=lease.bot,
            identity=lease.identity,
        )
        return phorge.mint(ring, lease_uid=lease.uid, digest=digest, now=now, not_after=now + HOUR)
    if how == "random":
        return _random_token()
    if how == "digits outside base32":
        return "api-" + "0189" * 7
    if how == "one character short":
        return good[:-1]
    raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("one character changed", "credential refused: credential matches no lease"),
        ("another key", "credential refused: credential matches no lease"),
        ("another pod's facts", "credential refused: credential matches no lease"),
        ("random", "credential refused: credential matches no lease"),
        ("expired", "credential refused: credential expired"),
        ("digits outside base32", "credential refused: credential has characters outside"),
        ("one character short", "credential refused: credential is not api- and 28"),
    ],
)
def test_forged_expired_and_random_phorge_tokens_are_refused(
    operator: Threaded, gateway: Threaded, issued: Issued, how: str, says: str
) -> None:
    good = exchange(operator, issued.token).json()["credential"]
    forged = _forged(issued, gateway, good, how)
    assert forged != good
    answer = whoami(gateway, forged)
    assert answer["result"] is None
    assert answer["error_code"] == "ERR-INVALID-AUTH"
    assert answer["error_info"].startswith(says), answer
    assert forged not in answer["error_info"] and good not in answer["error_info"]
    assert whoami(gateway, good)["error_code"] is None  # the real one still works


def test_the_caller_chooses_the_format(
    operator: Threaded, gateway: Threaded, issued: Issued, bound: str
) -> None:
    for asked in ("jwt", "JWT"):
        body = exchange(operator, issued.token, format=asked).json()
        assert body["format"] == "jwt"
        port = operator.process.endpoint_port  # type: ignore[attr-defined]
        jwks = requests.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=5).json()
        claims = credentials.verify_with_jwks(
            body["credential"],
            jwks,
            audience="phabmesh-gateway",
            issuer=operator.process.settings.issuer,  # type: ignore[attr-defined]
        )
        assert claims.lease_uid == issued.lease.uid
        assert whoami(gateway, body["credential"])["result"]["userName"] == f"bot-{bound}"
    for asked in ("phorge-token", "Phorge-Token", "PhorgeToken"):
        body = exchange(operator, issued.token, format=asked).json()
        assert body["format"] == "phorge-token"
        assert PHORGE_SHAPE.match(body["credential"])
    refused = exchange(operator, issued.token, format="pem")
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_format"
    assert "'format'" in refused.json()["message"]
    assert "phorge-token" in refused.json()["message"]


def test_the_binding_chooses_the_default_format(
    cluster: Cluster, operator: Threaded, gateway: Threaded, issued: Issued, bound: str
) -> None:
    cluster.custom.patch_namespaced_custom_object(
        G, V, bound, resources.BINDING_PLURAL, "runners", {"spec": {"credentialFormat": "JWT"}}
    )
    body = wait_for(
        lambda: (b := exchange(operator, issued.token).json()).get("format") == "jwt" and b,
        what="the endpoint to see the binding's credentialFormat",
    )
    assert credentials.unverified_claims(body["credential"])["binding"] == "runners"
    assert whoami(gateway, body["credential"])["error_code"] is None
    # The caller's choice still wins.
    asked = exchange(operator, issued.token, format="phorge-token").json()
    assert PHORGE_SHAPE.match(asked["credential"])
    assert whoami(gateway, asked["credential"])["error_code"] is None


def test_binding_deleted_revokes_phorge_tokens(
    cluster: Cluster, operator: Threaded, gateway: Threaded, issued: Issued, bound: str
) -> None:
    credential = exchange(operator, issued.token).json()["credential"]
    assert whoami(gateway, credential)["error_code"] is None
    cluster.custom.delete_namespaced_custom_object(G, V, bound, resources.BINDING_PLURAL, "runners")
    refused = wait_for(
        lambda: (a := whoami(gateway, credential)).get("error_code") and a,
        what="the gateway to refuse",
    )
    assert refused["error_code"] == "ERR-INVALID-AUTH"
    assert refused["error_info"].startswith("credential revoked: "), refused
