"""A lease judged by its binding, its bot and its namespace, never by what it says alone."""

from __future__ import annotations

import datetime
from typing import Any

from phabmesh import identity, resources
from phabmesh.leases import grants
from phabmesh.leases.view import LeaseView

N = identity.DEFAULT_NAMING
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def lease(bot: str = "ci-bot", sa: str = "runner", namespace: str = "build") -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {"name": "l", "namespace": "build", "uid": "u"},
            "spec": {
                "podUID": "p1",
                "podName": "pod",
                "binding": "runners",
                "bot": bot,
                "identity": identity.linkerd_identity(sa, namespace, N),
            },
            "status": {"phase": "Active", "expiresAt": "2026-01-02T00:00:00Z"},
        }
    )


def binding(bot: str = "ci-bot", ttl: str = "10m", **meta: Any) -> grants.BindingFacts:
    return grants.binding_facts(
        {
            "metadata": {"name": "runners", "namespace": "build", **meta},
            "spec": {
                "botRef": {"name": bot},
                "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
                "allowedMethods": ["user.whoami"],
                "credentialTTL": ttl,
            },
        }
    )


def bot(selector: dict[str, Any] | None = None) -> grants.BotFacts:
    return grants.bot_facts(
        {
            "metadata": {"name": "ci-bot"},
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "t"},
                "namespaceSelector": {"matchLabels": selector or {}},
            },
        }
    )


def test_a_granted_lease_is_honoured() -> None:
    assert grants.refusal(lease(), binding(), bot(), {}, N) is None


def test_every_refusal() -> None:
    team = {"team": "ci"}
    cases = [
        (lease(), None, bot(), {}, resources.BINDING_DELETED),
        (
            lease(),
            binding(deletionTimestamp="2026-01-01T00:00:00Z"),
            bot(),
            {},
            resources.BINDING_DELETED,
        ),
        (lease(bot="vip-bot"), binding(), bot(), {}, resources.BOT_CHANGED),
        (lease(), binding(), None, {}, resources.BOT_NOT_ALLOWED),
        (lease(), binding(), bot(team), {"team": "web"}, resources.BOT_NOT_ALLOWED),
        (lease(), binding(), bot(team), None, resources.BOT_NOT_ALLOWED),
        (lease(sa="intruder"), binding(), bot(), {}, resources.NO_LONGER_MATCHED),
        (lease(namespace="other"), binding(), bot(), {}, resources.NO_LONGER_MATCHED),
    ]
    for view, facts, bot_facts, labels, reason in cases:
        assert grants.refusal(view, facts, bot_facts, labels, N) == reason, reason


def test_an_unreadable_bot_spec_allows_nowhere() -> None:
    broken = grants.bot_facts({"metadata": {"name": "ci-bot"}, "spec": {"username": 1}})
    assert broken.selector is None
    assert grants.refusal(lease(), binding(), broken, {}, N) == resources.BOT_NOT_ALLOWED


def test_a_credential_ends_at_the_bindings_current_ttl_or_the_lease() -> None:
    view = lease()  # expires a day after T0
    assert grants.credential_end(view, binding(ttl="1m"), T0) == T0 + datetime.timedelta(minutes=1)
    late = datetime.datetime(2026, 1, 1, 23, 59, 30, tzinfo=datetime.UTC)
    assert grants.credential_end(view, binding(ttl="10m"), late) == view.expires_at
