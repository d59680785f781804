"""A PhabricatorWebhook's Ready condition, judged from what the operator's reads found, and
the gateway's reading of it (pure)."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pytest

from phabmesh import resources
from phabmesh.controller import webhooks
from phabmesh.controller.memo import Memo
from phabmesh.controller.webhooks import Found, WebhookView
from phabmesh.gateway.state import hook_facts
from phabmesh.kube import NotFound
from phabmesh.settings import Settings

SPEC = {
    "herald": {"secretRef": {"name": "hook-key", "key": "hmacKey"}},
    "target": {"service": "listener", "port": 8080, "path": "/p"},
}


def _body(spec: Any = SPEC, generation: int = 3, status: Any = None) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ci", "name": "hook", "uid": "u1", "generation": generation},
        "spec": spec,
        "status": status or {},
    }


KEYS = frozenset({"hmacKey"})
PORTS = frozenset({8080, 9090})


@pytest.mark.parametrize(
    ("found", "status", "reason", "message"),
    [
        (Found(KEYS, PORTS), "True", "Ready", "deliveries are forwarded to Service listener"),
        (Found(None, None, readable=False), "False", "SecretForbidden", "grant it in this"),
        (Found(None, PORTS), "False", "SecretMissing", 'Secret "hook-key" not found'),
        (Found(frozenset({"other"}), PORTS), "False", "KeyMissing", 'has no key "hmacKey"'),
        (Found(KEYS, None), "False", "ServiceMissing", 'Service "listener" not found'),
        (Found(KEYS, frozenset({80})), "False", "PortMissing", "has no port 8080"),
        (
            Found(KEYS, PORTS, service_problem="is of type ExternalName"),
            "False",
            "ServiceUnsupported",
            "could lead out of this namespace",
        ),
        (Found(None, None, error="boom"), "Unknown", "CheckFailed", "boom"),
    ],
)
def test_each_finding_has_its_one_reason(
    found: Found, status: str, reason: str, message: str
) -> None:
    outcome = webhooks.judge(WebhookView.from_body(_body()), found)
    assert (outcome.status, outcome.reason) == (status, reason)
    assert message in outcome.message
    assert outcome.reason in resources.HOOK_REASONS


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target": {"service": "x", "port": 80}}, "give exactly one of herald or harbormaster"),
        (
            {
                **SPEC,
                "harbormaster": {"botRef": {"name": "b"}, "credentialSecretRef": {"name": "c"}},
            },
            "give exactly one of herald or harbormaster",
        ),
        ({"herald": SPEC["herald"], "target": {"service": "x"}}, "target.port"),
    ],
)
def test_a_spec_that_cannot_be_read_is_invalid_whatever_was_found(
    spec: dict[str, Any], message: str
) -> None:
    view = WebhookView.from_body(_body(spec=spec))
    assert view.spec is None
    outcome = webhooks.judge(view, Found(KEYS, PORTS))
    assert (outcome.status, outcome.reason) == ("False", "InvalidSpec")
    assert message in outcome.message


BUILD_STEP = {
    "harbormaster": {"botRef": {"name": "ci-bot"}, "credentialSecretRef": {"name": "step"}},
    "target": {"service": "listener", "port": 8080},
}
CREDENTIAL = frozenset({"username", "password"})


@pytest.mark.parametrize(
    ("found", "status", "reason", "message"),
    [
        (Found(CREDENTIAL, PORTS), "True", "Ready", "deliveries are forwarded"),
        (Found(None, None, readable=False), "False", "SecretForbidden", "get and patch"),
        (Found(None, PORTS), "False", "SecretMissing", 'Secret "step" not found'),
        (Found(frozenset({"username"}), PORTS), "False", "KeyMissing", 'no key "password"'),
        (Found(CREDENTIAL, PORTS, bot=None), "False", "BotMissing", '"ci-bot" not found'),
        (
            Found(CREDENTIAL, PORTS, bot=(False, True)),
            "False",
            "BotNotAllowed",
            'does not allow namespace "ci"',
        ),
        (Found(CREDENTIAL, PORTS, bot=(True, False)), "False", "BotNotReady", "is not Ready"),
        (Found(CREDENTIAL, None), "False", "ServiceMissing", 'Service "listener" not found'),
    ],
)
def test_a_build_step_webhook_needs_its_credential_and_a_bot_this_namespace_may_use(
    found: Found, status: str, reason: str, message: str
) -> None:
    outcome = webhooks.judge(WebhookView.from_body(_body(spec=BUILD_STEP)), found)
    assert (outcome.status, outcome.reason) == (status, reason)
    assert message in outcome.message
    assert outcome.reason in resources.HOOK_REASONS


def test_a_build_step_webhook_without_a_credential_is_invalid() -> None:
    spec = {"harbormaster": {"botRef": {"name": "ci-bot"}}, "target": BUILD_STEP["target"]}
    view = WebhookView.from_body(_body(spec=spec))
    assert view.spec is None
    outcome = webhooks.judge(view, Found(frozenset(), PORTS))
    assert (outcome.reason, "credentialSecretRef" in outcome.message) == ("InvalidSpec", True)


class _CredentialCluster:
    """The API server as the reconciler reads and writes a build step's credential Secret:
    which verbs the namespace granted, the Secret (its data), and the merge patches made."""

    def __init__(self, granted: set[str], data: dict[str, str]) -> None:
        self.granted = granted
        self.secret = {"metadata": {"resourceVersion": "41"}, "data": data}
        self.patches: list[dict[str, Any]] = []
        self.conflict = False
        self.service = {"spec": {"selector": {"app": "listener"}, "ports": [{"port": 8080}]}}

    async def create(self, path: str, body: Any) -> Any:
        attributes = body["spec"]["resourceAttributes"]
        assert (attributes["namespace"], attributes["name"]) == ("ci", "step")
        return {"status": {"allowed": attributes["verb"] in self.granted}}

    async def get(self, path: str) -> Any:
        return self.secret if "/secrets/" in path else self.service

    async def merge_patch(self, path: str, patch: Any) -> Any:
        assert path == "/api/v1/namespaces/ci/secrets/step"
        self.patches.append(patch)
        if self.conflict:
            raise webhooks.Conflict(409, "Conflict", "the object has been modified")
        return self.secret


def _step_check(cluster: _CredentialCluster) -> _Writer:
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    writer = _Writer()
    memo.writer = writer  # type: ignore[assignment]
    memo.use_client(cluster)  # type: ignore[arg-type]
    memo.world.bots["ci-bot"] = _bot_view()
    memo.world.namespaces["ci"] = {}
    asyncio.run(memo.webhooks.seen(_body(spec=BUILD_STEP)))
    return writer


def _bot_view() -> Any:
    from phabmesh.leases.world import BotView

    return BotView.from_body(
        {
            "metadata": {"name": "ci-bot", "generation": 1},
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "ci-bot-token"},
                "namespaceSelector": {},
            },
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Verified",
                        "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                        "observedGeneration": 1,
                    }
                ]
            },
        }
    )


def test_a_build_steps_credential_is_generated_over_the_secret_as_read() -> None:
    cluster = _CredentialCluster({"get", "patch"}, {})
    writer = _step_check(cluster)
    [patch] = cluster.patches
    assert patch["metadata"] == {"resourceVersion": "41"}  # a write since the read: 409
    assert set(patch["data"]) == {"username", "password"}
    assert writer.events == [("CredentialGenerated", "Normal"), ("Ready", "Normal")]


def test_a_password_written_since_the_read_is_kept() -> None:
    cluster = _CredentialCluster({"get", "patch"}, {})
    cluster.conflict = True
    writer = _step_check(cluster)
    assert len(cluster.patches) == 1
    assert writer.events == [("KeyMissing", "Warning")]  # read again at the next pass


def test_a_credential_phabmesh_may_not_patch_in_is_key_missing_and_says_what_to_grant() -> None:
    cluster = _CredentialCluster({"get"}, {"username": "dQ=="})
    writer = _step_check(cluster)
    assert cluster.patches == []
    assert writer.events == [("KeyMissing", "Warning")]
    message = writer.patches[0]["conditions"][0]["message"]
    assert 'no key "password"' in message and "grants it patch" in message


def test_a_standby_replica_generates_nothing() -> None:
    cluster = _CredentialCluster({"get", "patch"}, {})
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    writer = _Writer()
    acting = iter([True, False])  # acting when the check starts, not by the write
    writer.acting = lambda: next(acting, False)  # type: ignore[assignment]
    memo.writer = writer  # type: ignore[assignment]
    memo.use_client(cluster)  # type: ignore[arg-type]
    asyncio.run(memo.webhooks.seen(_body(spec=BUILD_STEP)))
    assert (cluster.patches, writer.events) == ([], [])


def test_a_generated_credential_fills_only_what_is_missing() -> None:
    import base64

    both = webhooks.generated_credential(frozenset(), "phabmesh-step")["data"]
    assert base64.b64decode(both["username"]) == b"phabmesh-step"
    password = base64.b64decode(both["password"]).decode()
    assert len(password) == 32 and password.isascii()
    again = webhooks.generated_credential(frozenset(), "phabmesh-step")["data"]
    assert again["password"] != both["password"]  # random each time
    # A password already there is kept (the admin may have pasted it into Phorge).
    assert webhooks.generated_credential(frozenset({"password"}), "u")["data"] == {
        "username": base64.b64encode(b"u").decode()
    }


def test_secret_keys_keep_names_of_keys_with_a_value_and_no_value() -> None:
    secret = {"data": {"hmacKey": "c2VjcmV0", "empty": ""}}
    assert webhooks.secret_keys(secret) == frozenset({"hmacKey"})
    assert webhooks.service_ports({"spec": {"ports": [{"port": 80}, {"name": "x"}]}}) == {80}


def _ready(reason: str, generation: int, status: str = "True") -> dict[str, Any]:
    return {
        "conditions": [
            {
                "type": "Ready",
                "status": status,
                "reason": reason,
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": generation,
            }
        ]
    }


def test_the_gateway_takes_a_webhook_as_ready_only_for_its_current_generation() -> None:
    current = hook_facts(_body(status=_ready("Ready", 3)))
    assert (current.ready, current.reason) == (True, "Ready")
    assert current.spec is not None and current.spec.target.port == 8080
    # Judged for an older spec: neither Ready nor a reason (its Secret is not watched yet).
    old = hook_facts(_body(status=_ready("Ready", 2)))
    assert (old.ready, old.reason) == (False, "")
    forbidden = hook_facts(_body(status=_ready("SecretForbidden", 3, "False")))
    assert (forbidden.ready, forbidden.reason) == (False, "SecretForbidden")
    unchecked = hook_facts(_body())
    assert (unchecked.ready, unchecked.reason) == (False, "")


# -- the reconciler: gather, judge, write only what changed ------------------------------------


class _Cluster:
    """The API server as the reconciler reads it: the access review's answer, the Secret and
    the Service (None: not found)."""

    def __init__(self) -> None:
        self.allowed = True
        self.secret: dict[str, Any] | None = {"data": {"hmacKey": "a2V5"}}
        self.service: dict[str, Any] | None = {
            "spec": {"selector": {"app": "listener"}, "ports": [{"port": 8080}]}
        }
        self.secret_reads = 0

    async def create(self, path: str, body: Any) -> Any:
        assert body["kind"] == "SelfSubjectAccessReview"
        assert body["spec"]["resourceAttributes"] == {
            "namespace": "ci",
            "verb": "get",
            "resource": "secrets",
            "name": "hook-key",
        }
        return {"status": {"allowed": self.allowed}}

    async def get(self, path: str) -> Any:
        if "/secrets/" in path:
            self.secret_reads += 1
            found = self.secret
        else:
            assert path == "/api/v1/namespaces/ci/services/listener"
            found = self.service
        if found is None:
            raise NotFound(404, "NotFound", path)
        return found


class _Writer:
    acting = None  # alone: always acting

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []

    async def patch_status(self, path: str, status: Any) -> Any:
        assert path == "/apis/phabmesh.io/v1alpha1/namespaces/ci/phabricatorwebhooks/hook"
        self.patches.append(status)
        return {"status": status}  # the object as the API server then holds it

    async def event(self, ref: Any, reason: str, message: str, type_: str = "Normal") -> None:
        assert (ref["kind"], ref["namespace"], ref["name"]) == ("PhabricatorWebhook", "ci", "hook")
        self.events.append((reason, type_))


def test_the_reconciler_writes_the_condition_only_when_it_changes() -> None:
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    cluster, writer = _Cluster(), _Writer()
    memo.writer = writer  # type: ignore[assignment]
    memo.use_client(cluster)  # type: ignore[arg-type]
    times = iter(datetime.datetime(2026, 1, 1, 12, m, tzinfo=datetime.UTC) for m in range(10))
    memo.clock = lambda: next(times)
    reconciler = memo.webhooks

    async def scenario() -> None:
        await reconciler.seen(_body())
        await reconciler.check_all()  # nothing changed: nothing written
        cluster.service = None
        await reconciler.check_all()
        await reconciler.check_all()
        cluster.allowed = False
        reads = cluster.secret_reads
        await reconciler.check_all()
        assert cluster.secret_reads == reads  # not granted: not tried

    asyncio.run(scenario())
    ready = [p["conditions"][0] for p in writer.patches]
    assert [(c["status"], c["reason"]) for c in ready] == [
        ("True", "Ready"),
        ("False", "ServiceMissing"),
        ("False", "SecretForbidden"),
    ]
    assert all(p["observedGeneration"] == 3 for p in writer.patches)
    # lastTransitionTime moves when the status flips, not when only the reason changes.
    assert ready[1]["lastTransitionTime"] != ready[0]["lastTransitionTime"]
    assert ready[2]["lastTransitionTime"] == ready[1]["lastTransitionTime"]
    assert writer.events == [
        ("Ready", "Normal"),
        ("ServiceMissing", "Warning"),
        ("SecretForbidden", "Warning"),
    ]


def test_a_standby_replica_reads_and_writes_nothing() -> None:
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    cluster, writer = _Cluster(), _Writer()
    writer.acting = lambda: False  # type: ignore[assignment]
    memo.writer = writer  # type: ignore[assignment]
    memo.use_client(cluster)  # type: ignore[arg-type]
    asyncio.run(memo.webhooks.seen(_body()))
    assert (cluster.secret_reads, writer.patches, writer.events) == (0, [], [])
    assert ("ci", "hook") in memo.webhooks.items  # known, for when it acts


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"selector": {"app": "listener"}, "ports": [{"port": 8080}]}, None),
        ({"type": "ExternalName", "externalName": "victim.other.svc"}, "ExternalName"),
        ({"ports": [{"port": 8080}]}, "no selector"),  # endpoints written by hand: any address
        ({"selector": {}, "ports": [{"port": 8080}]}, "no selector"),
    ],
)
def test_a_service_that_could_lead_out_of_its_namespace_is_refused(
    spec: dict[str, object], problem: str | None
) -> None:
    found = webhooks.service_problem({"spec": spec})
    assert (found is None) if problem is None else (problem in (found or ""))
