"""A PhabricatorWebhook's Ready condition, judged from what the operator's reads found, and
the gateway's reading of it (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from phabmesh import resources
from phabmesh.controller import webhooks
from phabmesh.controller.webhooks import Found, WebhookView
from phabmesh.gateway.state import hook_facts

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


def test_a_spec_that_cannot_be_read_is_invalid_whatever_was_found() -> None:
    view = WebhookView.from_body(_body(spec={"target": {"service": "x"}}))
    assert view.spec is None
    outcome = webhooks.judge(view, Found(KEYS, PORTS))
    assert (outcome.status, outcome.reason) == ("False", "InvalidSpec")
    assert "herald" in outcome.message


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
