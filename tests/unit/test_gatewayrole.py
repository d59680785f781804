"""The gateway's Secret Role, as pure values: which names it lists, and what it grants."""

from __future__ import annotations

from phabmesh import gatewayrole
from phabmesh.leases.grants import BotFacts

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
