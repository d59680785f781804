"""The gateway's Secret Role, as pure values: which names it lists, and what it grants; and
the gateway's watches of the Secrets it names, with refusals injected."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import cast

from phabmesh import gatewayrole
from phabmesh.kube import KubeClient, KubeError
from phabmesh.kube.client import JSON
from phabmesh.kube.informer import Informer
from phabmesh.leases.grants import BotFacts
from tests.fakeapi import FakeAPI

OWN = {"phabmesh-webhook-tls", "phabmesh-signing-keys"}


def _bot(secret: str) -> BotFacts:
    return BotFacts(None, secret, "token")


def test_the_role_names_the_bots_secrets_and_never_phabmeshs_own() -> None:
    bots = [_bot("b-token"), _bot("a-token"), _bot("a-token"), _bot(""), *map(_bot, OWN)]
    assert gatewayrole.wanted(bots, OWN) == ("a-token", "b-token")


def test_no_bots_means_no_rule_rather_than_an_empty_name_list() -> None:
    # An empty resourceNames would grant every Secret of the namespace.
    assert gatewayrole.rules([]) == []
    (rule,) = gatewayrole.rules(["x"])
    assert rule == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["list", "watch"],
        "resourceNames": ["x"],
    }


def test_the_gateway_reads_only_names_granted_for_list_and_watch() -> None:
    role = {
        "rules": [
            *gatewayrole.rules(["a", "b"]),
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["c"]},
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["list", "watch"],
                "resourceNames": ["d"],
            },
        ]
    }
    assert gatewayrole.permitted(role) == {"a", "b"}
    assert gatewayrole.permitted({"rules": []}) == frozenset()


def test_rules_compare_as_sets_of_names() -> None:
    written = [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "verbs": ["watch", "list"],
            "resourceNames": ["b", "a"],
        }
    ]
    assert gatewayrole.same_rules(written, gatewayrole.rules(["a", "b"]))
    assert not gatewayrole.same_rules(written, gatewayrole.rules(["a"]))
    assert not gatewayrole.same_rules(written, [])
    assert gatewayrole.same_rules([], gatewayrole.rules([]))


def _secrets(role: frozenset[str] | None, *bot_secrets: str) -> gatewayrole.BotSecrets:
    """The gateway's side with its watches' caches filled by hand (no API server)."""
    client = cast(KubeClient, None)
    bots: Informer[BotFacts] = Informer(client, "/bots", gatewayrole_bot, name="bots")
    bots.items = {s: _bot(s) for s in bot_secrets}
    secrets = gatewayrole.BotSecrets(client, "phabmesh-system", bots, excluded=OWN)
    if role is not None:
        secrets.role.items["phabmesh-system/" + gatewayrole.ROLE] = role
    secrets.role.synced.set()
    return secrets


def gatewayrole_bot(obj: dict[str, object]) -> BotFacts:
    return _bot(str(obj))


def test_the_gateway_watches_what_the_role_lists_and_a_bot_names() -> None:
    secrets = _secrets(frozenset({"a", "c"}), "a", "b", "phabmesh-webhook-tls")
    assert secrets.wanted() == {"a"}
    # Without the Role (run as a cluster admin, no manifests), RBAC alone decides: every
    # Secret a bot names, but never phabmesh's own.
    assert _secrets(None, "a", "b", "phabmesh-webhook-tls").wanted() == {"a", "b"}
    # Nothing before the Role is read.
    unread = _secrets(None, "a")
    unread.role.synced.clear()
    assert unread.wanted() == set()
    assert not unread.synced


class _LaggingAuthorizer(FakeAPI):
    """The API server right after the Role named Secret ``a``: the Role reads so already,
    the first two reads of the Secret are still refused (403), then it is served."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals = 2

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        if path.endswith("/roles"):
            return [{"metadata": {"name": gatewayrole.ROLE}, **_role(["a"])}], "1"
        if self.refusals:
            self.refusals -= 1
            raise KubeError(403, "Forbidden", 'secrets "a" is forbidden')
        token = base64.b64encode(b"api-token-a").decode()
        return [{"metadata": {"name": "a", "namespace": "ns"}, "data": {"token": token}}], "2"


def _role(names: list[str]) -> JSON:
    return {"rules": gatewayrole.rules(names)}


def test_a_refused_secret_watch_is_retried_until_the_authorizer_catches_up() -> None:
    async def scenario() -> tuple[str | None, int, bool]:
        client = _LaggingAuthorizer()
        bots: Informer[BotFacts] = Informer(
            cast(KubeClient, client), "/bots", gatewayrole_bot, name="bots"
        )
        bots.items = {"bot-a": _bot("a")}
        bots.synced.set()
        secrets = gatewayrole.BotSecrets(cast(KubeClient, client), "ns", bots, excluded=OWN)
        task = asyncio.create_task(secrets.run())
        try:
            async with asyncio.timeout(10):
                while secrets.token("a", "token") is None:
                    await asyncio.sleep(0.01)
            return secrets.token("a", "token"), client.refusals, task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    token, refusals_left, crashed = asyncio.run(scenario())
    assert (token, refusals_left, crashed) == ("api-token-a", 0, False)
