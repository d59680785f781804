"""A replica that may not write (paused by peering) decides nothing from what it has not
written: a bot it checks keeps the readiness its status shows, and a pod's leases are
planned from the bindings' status, so that when it acts it acts on what the acting replica
wrote, never on a readiness of its own (a live lease revoked "BotNotReady" at a failover)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from phabmesh import identity
from phabmesh.controller import bots as botcheck
from phabmesh.controller import reconcilers
from phabmesh.controller.writer import NotActing, Writer
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView, World
from phabmesh.settings import Settings


class _Refusing:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API was called ({name}) while not acting")


class _Memo:
    """What the bot and binding reconcilers use of the operator's memo."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.world = World()
        self.naming = identity.Naming()
        self.writer = Writer(_Refusing(), self.world, acting=lambda: False)  # type: ignore[arg-type]
        self.bots = reconcilers.Bots(self)  # type: ignore[arg-type]
        self.bindings = reconcilers.Bindings(self)  # type: ignore[arg-type]

    def clock(self) -> datetime.datetime:
        return datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


async def test_a_paused_replicas_bot_check_leaves_the_readiness_its_status_shows() -> None:
    memo = _Memo()
    bot = BotView.from_body(  # just applied: no status yet
        {
            "metadata": {"name": "ci-bot", "generation": 1, "uid": "u"},
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "t"},
                "namespaceSelector": {},
            },
        }
    )
    memo.world.bots[bot.name] = bot
    memo.world.namespaces["build"] = {}
    binding = BindingView.from_body(
        {
            "metadata": {"name": "runners", "namespace": "build", "uid": "b1", "generation": 1},
            "spec": {
                "botRef": {"name": "ci-bot"},
                "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
                "allowedMethods": ["user.whoami"],
            },
        }
    )
    memo.world.put_binding(binding)
    assert not memo.bindings.judge(binding).ready  # the bot is not checked yet
    verified = botcheck.Outcome("True", "Verified", "user ci-bot", phid="PHID-USER-x")
    with pytest.raises(NotActing):  # its status write is deferred
        await memo.bots._record_bot(bot, verified)
    # Not written, so not the bot's readiness: the acting replica's status is.
    assert not memo.world.bots["ci-bot"].ready
    assert not memo.bindings.judge(binding).ready


@pytest.mark.parametrize("bot_seen", [True, False])
async def test_a_pods_event_before_its_bindings_event_keeps_its_lease(bot_seen: bool) -> None:
    """A replica paused by peering acts; a pod's event comes first, its binding's status not
    yet written for its spec: the pod keeps its lease (no write at all), where before it was
    revoked "BotNotReady" and issued anew."""
    memo = _Memo()
    memo.writer = Writer(_Refusing(), memo.world)  # type: ignore[arg-type]  # any write fails
    memo.leases = reconcilers.Leases(memo)  # type: ignore[attr-defined,arg-type]
    memo.world.bots["ci-bot"] = BotView.from_body(
        {
            "metadata": {"name": "ci-bot", "generation": 1, "uid": "u"},
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "t"},
                "namespaceSelector": {},
            },
            "status": {
                "phid": "PHID-USER-x",
                "observedGeneration": 1,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Verified",
                        "observedGeneration": 1,
                    },
                    {
                        "type": "TokenVerified",
                        "status": "True",
                        "reason": "Verified",
                        "observedGeneration": 1,
                    },
                ],
            },
        }
    )
    assert memo.world.bots["ci-bot"].ready
    if not bot_seen:  # not even the bot's event yet: the binding cannot be judged
        del memo.world.bots["ci-bot"]
    memo.world.namespaces["build"] = {}
    memo.world.put_binding(
        BindingView.from_body(
            {
                "metadata": {"name": "runners", "namespace": "build", "uid": "b1", "generation": 1},
                "spec": {
                    "botRef": {"name": "ci-bot"},
                    "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
                    "allowedMethods": ["user.whoami"],
                },
            }
        )
    )
    memo.world.put_pod(
        identity.PodFacts.from_pod(
            {
                "metadata": {"name": "one", "namespace": "build", "uid": "p1"},
                "spec": {"serviceAccountName": "runner", "containers": [{"name": "linkerd-proxy"}]},
                "status": {"phase": "Running"},
            }
        )
    )
    memo.world.put_lease(
        LeaseView.from_body(
            {
                "metadata": {"name": "one.runners.1", "namespace": "build", "uid": "l1"},
                "spec": {"podName": "one", "podUID": "p1", "binding": "runners", "bot": "ci-bot"},
                "status": {"phase": "Active", "expiresAt": "2026-01-01T00:10:00Z"},
            }
        )
    )
    await memo.leases.reconcile_pod("p1")  # _Refusing fails the test on any write
