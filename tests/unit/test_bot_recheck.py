"""A PhabricatorBot's recheck annotation (`kubectl phabmesh recheck`) makes the operator check
the bot at once; any other event that changes neither spec nor generation does not."""

from __future__ import annotations

from typing import Any

from phabmesh import resources
from phabmesh.controller import handlers
from phabmesh.leases.world import BotView, World


class _Bots:
    def __init__(self) -> None:
        self.checked: list[str] = []

    async def check(self, name: str, *, only_if_due: bool = False) -> None:
        self.checked.append(name)


class _Startup:
    async def listed(self) -> None:
        return None


class _Bindings:
    async def refresh_namespace(self, namespace: str) -> None:
        return None


class _Memo:
    """What bot_event uses of the operator's memo, recording the checks it asks for."""

    def __init__(self) -> None:
        self.world = World()
        self.bots = _Bots()
        self.startup = _Startup()
        self.bindings = _Bindings()

    @property
    def checked(self) -> list[str]:
        return self.bots.checked


def _bot(recheck: str | None = None, ready: str = "True") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "ci-bot", "generation": 1}
    if recheck is not None:
        meta["annotations"] = {resources.RECHECK_ANNOTATION: recheck}
    return {
        "metadata": meta,
        "spec": {"username": "ci-bot", "tokenSecretRef": {"name": "t"}, "namespaceSelector": {}},
        "status": {"conditions": [{"type": "Ready", "status": ready, "reason": "Verified"}]},
    }


async def _event(memo: _Memo, body: dict[str, Any]) -> None:
    await handlers.bot_event(
        event={"type": "MODIFIED", "object": body},
        body=body,
        name="ci-bot",
        memo=memo,  # type: ignore[arg-type]  # a stand-in with what bot_event uses
    )


async def test_a_new_recheck_annotation_checks_the_bot_now() -> None:
    memo = _Memo()
    await _event(memo, _bot())
    assert memo.checked == ["ci-bot"]  # first seen: checked
    await _event(memo, _bot(ready="False"))  # the operator's own status write: nothing
    assert memo.checked == ["ci-bot"]
    await _event(memo, _bot("2026-06-01T10:00:00.000001+00:00"))
    assert memo.checked == ["ci-bot", "ci-bot"]
    assert memo.world.bots["ci-bot"].recheck == "2026-06-01T10:00:00.000001+00:00"
    await _event(memo, _bot("2026-06-01T10:00:00.000001+00:00"))  # the same request: once
    assert memo.checked == ["ci-bot", "ci-bot"]
    # The readiness this process decided is kept (not the status the event carries).
    assert memo.world.bots["ci-bot"].ready is True
    assert isinstance(memo.world.bots["ci-bot"], BotView)
