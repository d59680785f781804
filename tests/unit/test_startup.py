"""Start-up: what preload read and kopf's first lists lack was deleted in between (the
writer is replaced by a recorder: pure logic, no API server)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from phabmesh.controller.state import Memo
from phabmesh.leases import decide
from phabmesh.leases.view import LeaseView
from phabmesh.settings import Settings
from tests.unit.test_decide import binding, bot, lease, pod


class _Recorder:
    def __init__(self) -> None:
        self.revoked: list[tuple[str, str]] = []
        self.issued: list[str] = []

    async def revoke(self, lease: LeaseView, reason: str, message: str = "") -> None:
        self.revoked.append((lease.name, reason))

    async def issue(self, *args: Any, **kwargs: Any) -> None:
        self.issued.append(args[1].name)

    async def patch_status(self, path: str, status: Any) -> None:
        return None

    async def event(self, *args: Any, **kwargs: Any) -> None:
        return None


def _memo() -> tuple[Memo, _Recorder]:
    memo = Memo(Settings.local("http://127.0.0.1:9"))
    recorder = _Recorder()
    memo.writer = recorder  # type: ignore[assignment]
    world = memo.world
    world.namespaces["build"] = {}
    world.bots["ci-bot"] = bot()
    world.put_pod(pod("p1"))
    for name in ("runners", "deployers"):
        world.put_binding(binding(name))
        world.put_lease(lease("p1", name))
    for view in world.bindings.values():
        memo.bindings.judge(view)
    return memo, recorder


def test_a_binding_deleted_between_preload_and_the_watch_is_forgotten_and_revoked() -> None:
    memo, recorder = _memo()
    memo.startup.saw("namespaces", "build")
    memo.startup.saw("bots", "ci-bot")
    memo.startup.saw("bindings", ("build", "runners"))  # "deployers" went before kopf listed
    for key in memo.world.leases:
        memo.startup.saw("leases", key)
    asyncio.run(memo.startup.listed())
    assert ("build", "deployers") not in memo.world.bindings
    assert recorder.revoked == [("l-p1-deployers", decide.BINDING_DELETED)]
    assert recorder.issued == []
    # Only once: later events and timers find nothing more to forget.
    memo.world.put_binding(binding("late"))
    asyncio.run(memo.startup.listed())
    assert ("build", "late") in memo.world.bindings


def test_a_bot_and_a_lease_deleted_between_preload_and_the_watch_are_forgotten() -> None:
    memo, recorder = _memo()
    memo.startup.saw("namespaces", "build")
    memo.startup.saw("bindings", ("build", "runners"))
    memo.startup.saw("bindings", ("build", "deployers"))
    memo.startup.saw("leases", ("build", "l-p1-runners"))  # the other lease went before kopf listed
    asyncio.run(memo.startup.listed())
    assert "ci-bot" not in memo.world.bots
    assert list(memo.world.leases) == [("build", "l-p1-runners")]
    # The bot is gone: its bindings are not Ready and the remaining lease is revoked (a bot
    # that no longer exists and one that does not allow the namespace read alike).
    assert recorder.revoked == [("l-p1-runners", decide.BOT_GONE_HERE)]


def test_only_once_across_the_memo_copies_kopf_hands_each_object() -> None:
    memo, recorder = _memo()
    for kind, key in (
        ("namespaces", "build"),
        ("bots", "ci-bot"),
        ("bindings", ("build", "runners")),
        ("bindings", ("build", "deployers")),
        *(("leases", key) for key in memo.world.leases),
    ):
        memo.startup.saw(kind, key)
    first, second = copy.copy(memo), copy.copy(memo)  # as kopf's per-object memos
    asyncio.run(first.startup.listed())
    # A lease written after start-up, its watch event not in yet: never taken for deleted.
    memo.world.put_lease(lease("p2", "runners"))
    asyncio.run(second.startup.listed())
    assert ("build", "l-p2-runners") in memo.world.leases
    assert recorder.revoked == []
