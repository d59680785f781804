"""One judgement of "is this lease honoured": the controller (the world's views) and the
credential endpoint and gateway (their watches' facts) give the same reason for the same
objects. Each side reads the objects with its own parser, as in the processes.

Before, a binding whose spec could not be read was ``BotChanged`` to the controller and
``BindingNotReady`` to the gateway. One difference stays, on purpose: a namespace a process
has not seen yet. The gateway refuses (fail closed); the controller takes it as unlabelled,
and never revokes a lease on its own ignorance.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from phabmesh import identity
from phabmesh.leases import grants, plans
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView, World

NAMING = identity.Naming()
NAMESPACE = "build"
IDENTITY = "runner.build.serviceaccount.identity.linkerd.cluster.local"


def _lease(identity_: str) -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {"name": "l", "namespace": NAMESPACE, "uid": "l"},
            "spec": {
                "podUID": "p1",
                "podName": "pod",
                "binding": "runners",
                "bot": "ci-bot",
                "identity": identity_,
            },
            "status": {"phase": "Active", "expiresAt": "2026-01-01T00:15:00Z"},
        }
    )


def _binding(bot: str, account: str, readable: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "botRef": {"name": bot},
        "identityRefs": [{"kind": "ServiceAccount", "name": account}],
        "allowedMethods": ["user.whoami"],
    }
    if not readable:
        spec["credentialTTL"] = "forever"  # what the CRD's schema would refuse
    return {"metadata": {"name": "runners", "namespace": NAMESPACE, "uid": "b"}, "spec": spec}


def _bot(selector: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"username": "ci-bot", "tokenSecretRef": {"name": "t"}}
    if selector is not None:
        spec["namespaceSelector"] = selector
    return {"metadata": {"name": "ci-bot", "uid": "u"}, "spec": spec}


bindings = st.one_of(
    st.none(),
    st.builds(
        _binding,
        st.sampled_from(["ci-bot", "other-bot"]),
        st.sampled_from(["runner", "deployer"]),
        st.booleans(),
    ),
)
bots = st.one_of(
    st.none(),
    st.builds(
        _bot,
        st.sampled_from(
            [None, {}, {"matchLabels": {"team": "ci"}}, {"matchLabels": {"team": "web"}}]
        ),
    ),
)
labels = st.sampled_from([{}, {"team": "ci"}, {"team": "web", "tier": "1"}])
identities = st.sampled_from(
    [
        IDENTITY,
        "deployer.build.serviceaccount.identity.linkerd.cluster.local",
        "runner.other.serviceaccount.identity.linkerd.cluster.local",
        "junk",
    ]
)


@settings(max_examples=400, deadline=None)
@given(binding=bindings, bot=bots, namespace_labels=labels, identity_=identities)
def test_the_controller_and_the_gateway_judge_a_lease_alike(
    binding: dict[str, Any] | None,
    bot: dict[str, Any] | None,
    namespace_labels: dict[str, str],
    identity_: str,
) -> None:
    lease = _lease(identity_)
    world = World()
    if binding is not None:
        world.put_binding(BindingView.from_body(binding))
    if bot is not None:
        view = BotView.from_body(bot)
        world.bots[view.name] = view
    world.namespaces[NAMESPACE] = namespace_labels
    controller = plans.lease_problem(world, lease, NAMING)
    gateway = grants.refusal(
        lease,
        grants.binding_facts(binding) if binding is not None else None,
        grants.bot_facts(bot) if bot is not None else None,
        namespace_labels,
        NAMING,
    )
    assert controller == gateway


def test_an_unreadable_binding_is_binding_not_ready_to_both() -> None:
    body = _binding("ci-bot", "runner", readable=False)
    world = World()
    world.put_binding(BindingView.from_body(body))
    bot = BotView.from_body(_bot({}))
    world.bots[bot.name] = bot
    world.namespaces[NAMESPACE] = {}
    lease = _lease(IDENTITY)
    assert plans.lease_problem(world, lease, NAMING) == "BindingNotReady"
    facts = grants.binding_facts(body), grants.bot_facts(_bot({}))
    assert grants.refusal(lease, *facts, {}, NAMING) == "BindingNotReady"
