"""Bots, bindings and leases end to end on the real API server, with the Conduit test
server standing in for Phabricator and the operator running in a background thread."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import requests

from phabmesh import credentials, resources
from phabmesh.dev.conduit import ConduitServer
from tests.kube import HAND_NODE, Cluster, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    binding_condition,
    bot_ready,
    condition,
    exchange,
    label_namespace,
    leases,
    make_binding,
    make_bot,
    make_pod,
    pod_token,
    time_of,
)
from tests.stack import Threaded

# -- bots and bindings ------------------------------------------------------------------------


def test_bot_and_binding_become_ready_and_follow_phabricator(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    make_bot(cluster, conduit, "ready-bot")
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", "ready-bot")
    ready = wait_for(lambda: (c := bot_ready(cluster, "ready-bot")) and c["status"] == "True" and c)
    assert ready["reason"] == "Verified"
    bot = cluster.custom.get_cluster_custom_object(G, V, resources.BOT_PLURAL, "ready-bot")
    assert bot["status"]["phid"].startswith("PHID-USER-")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )

    conduit.disable_user("ready-bot")
    disabled = wait_for(
        lambda: (c := bot_ready(cluster, "ready-bot")) and c["reason"] == "Disabled" and c
    )
    assert disabled["status"] == "False"
    binding = wait_for(
        lambda: (
            (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "False" and c
        )
    )
    assert binding["reason"] == "BotNotReady"

    conduit.enable_user("ready-bot")
    wait_for(lambda: (c := bot_ready(cluster, "ready-bot")) and c["status"] == "True")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    assert bot_ready(cluster, "ready-bot")["lastTransitionTime"] != disabled["lastTransitionTime"]
    # What an administrator reads: `kubectl describe` finds the bot's Events by its uid.
    described = wait_for(
        lambda: (
            (out := cluster.kubectl("describe", "phabricatorbot", "ready-bot").stdout)
            and "Disabled" in out.split("Events:")[-1]
            and out
        )
    )
    events = described.split("Events:")[-1]
    assert "<none>" not in events and "Verified" in events, events


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing-secret", "SecretMissing"),
        ("wrong-token", "TokenInvalid"),
        ("human", "NotABot"),
    ],
)
def test_each_bot_failure_has_its_reason(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, case: str, reason: str
) -> None:
    name = f"{case}-bot"
    make_bot(cluster, conduit, name, bot=case != "human")
    if case == "missing-secret":
        cluster.core.delete_namespaced_secret(f"{name}-token", SYSTEM)
    if case == "wrong-token":
        cluster.core.patch_namespaced_secret(
            f"{name}-token",
            SYSTEM,
            {"data": {"token": base64.b64encode(b"api-aaaaaaaaaaaaaaaaaaaaaaaaaaaa").decode()}},
        )
    found = wait_for(lambda: (c := bot_ready(cluster, name)) and c["reason"] == reason and c)
    assert found["status"] == "False"
    assert found["message"]


def test_namespace_outside_the_selector_is_refused(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    make_bot(cluster, conduit, "picky-bot")
    make_binding(cluster, namespace, "outsider", "picky-bot")  # namespace not labelled
    found = wait_for(
        lambda: (
            (c := binding_condition(cluster, namespace, "outsider"))
            and c["reason"] == "BotNotAllowed"
            and c
        )
    )
    assert found["status"] == "False"
    pod = make_pod(cluster, namespace, "runner-1")
    response = exchange(operator, pod_token(cluster, namespace, pod))
    assert response.status_code == 403
    assert leases(cluster, namespace) == []


def _binding(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    return cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, name
    )


def test_a_binding_does_not_tell_which_bots_exist(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    """A bot that excludes the namespace looks exactly like one that does not exist: same
    reason, same message, no BotReady, no botPHID. The bot's own status says the truth."""
    make_bot(cluster, conduit, "secret-bot")
    wait_for(lambda: (c := bot_ready(cluster, "secret-bot")) and c["status"] == "True")
    make_binding(cluster, namespace, "probe-real", "secret-bot")  # namespace not labelled
    make_binding(cluster, namespace, "probe-none", "no-such-bot")

    def settled(name: str) -> dict[str, Any] | None:
        obj = _binding(cluster, namespace, name)
        ready = condition(obj)
        return obj if ready and ready["reason"] != "Ready" and ready["status"] == "False" else None

    real = wait_for(lambda: settled("probe-real"))["status"]
    none = wait_for(lambda: settled("probe-none"))["status"]
    for status, bot in ((real, "secret-bot"), (none, "no-such-bot")):
        assert "botPHID" not in status or status["botPHID"] is None, status
        assert [c["type"] for c in status["conditions"]] == ["Ready"], status
        ready = status["conditions"][0]
        assert ready["reason"] == "BotNotAllowed"
        ready["message"] = ready["message"].replace(bot, "BOT")
    assert real["conditions"][0]["message"] == none["conditions"][0]["message"]
    # Labelled: now the bot's details are this namespace's to see.
    label_namespace(cluster, namespace)
    allowed = wait_for(
        lambda: (s := _binding(cluster, namespace, "probe-real").get("status")) and s.get("botPHID")
    )
    assert allowed.startswith("PHID-USER-")
    assert condition(_binding(cluster, namespace, "probe-real"), "BotReady")["status"] == "True"


# -- leases -----------------------------------------------------------------------------------


def test_running_meshed_pod_gets_a_lease_and_a_credential(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    lease = wait_for(lambda: active_leases(cluster, bound))[0]
    owner = lease["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Pod", "runner-1", pod.metadata.uid)
    identity = f"runner.{bound}.serviceaccount.identity.linkerd.cluster.local"
    assert lease["spec"]["identity"] == identity
    assert lease["spec"]["bot"] == f"bot-{bound}"

    response = exchange(operator, pod_token(cluster, bound, pod), format="jwt")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["identity"] == identity
    assert body["format"] == "jwt"
    port = operator.process.endpoint_port  # type: ignore[attr-defined]
    jwks = requests.get(f"http://127.0.0.1:{port}/.well-known/jwks.json", timeout=5).json()
    claims = credentials.verify_with_jwks(
        body["credential"],
        jwks,
        audience="phabmesh-gateway",
        issuer=operator.process.settings.issuer,  # type: ignore[attr-defined]
    )
    assert claims.subject == identity
    assert claims.pod_uid == pod.metadata.uid
    assert claims.expires_at <= time_of(lease["status"]["expiresAt"])

    # An unmeshed pod gets nothing, and the binding says so.
    make_pod(cluster, bound, "plain", meshed=False)
    status = wait_for(
        lambda: (
            (
                s := cluster.custom.get_namespaced_custom_object(
                    G, V, bound, resources.BINDING_PLURAL, "runners"
                )["status"]
            ).get("unmeshedPods")
            == 1
            and s
        )
    )
    assert status["matchedPods"] == 1
    assert status["activeCredentials"] == 1


def test_tokens_cannot_cross_pods_or_audiences(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    pod_a = make_pod(cluster, bound, "runner-a")
    make_pod(cluster, bound, "runner-b")
    wait_for(lambda: len(active_leases(cluster, bound)) == 2)
    a = exchange(operator, pod_token(cluster, bound, pod_a), format="jwt").json()
    assert a["credential"]
    lease_names = [item["metadata"]["name"] for item in active_leases(cluster, bound)]
    assert any(name.startswith("runner-a.") for name in lease_names)
    # Pod A's token only ever yields pod A's credential.
    claims = credentials.unverified_claims(a["credential"])
    assert claims["pod"] == "runner-a"

    wrong = exchange(operator, pod_token(cluster, bound, pod_a, audience="someone-else"))
    assert wrong.status_code == 401
    assert exchange(operator, "not-a-token").status_code == 401
    # A deleted pod's token: refused at once (its lease is gone) even while the API
    # server may still accept the token itself for a while.
    token_a = pod_token(cluster, bound, pod_a)
    cluster.core.delete_namespaced_pod("runner-a", bound, grace_period_seconds=0)
    refused = wait_for(
        lambda: (r := exchange(operator, token_a)).status_code in (401, 403) and r.json()
    )
    assert refused["error"] in ("no_lease", "invalid_token")


@pytest.mark.parametrize("node", [HAND_NODE, None])
def test_scale_down_revokes(
    cluster: Cluster, operator: Threaded, bound: str, node: str | None
) -> None:
    make_pod(cluster, bound, "runner-1", node=node)
    wait_for(lambda: active_leases(cluster, bound))
    cluster.core.delete_namespaced_pod("runner-1", bound)
    # With a node the pod lingers as Terminating; its lease goes at once all the same.
    wait_for(lambda: leases(cluster, bound) == [], what="the lease to be revoked and deleted")
    # The pod's Events tell the story (posted just after each write).
    wait_for(
        lambda: (
            {"CredentialIssued", "CredentialRevoked"}
            <= {e.reason for e in cluster.core.list_namespaced_event(bound).items}
        ),
        what="CredentialIssued and CredentialRevoked Events",
    )


def test_binding_deleted_or_bot_lost_revokes(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, bound: str
) -> None:
    make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    conduit.disable_user(f"bot-{bound}")
    wait_for(lambda: leases(cluster, bound) == [], what="revocation on bot loss")
    conduit.enable_user(f"bot-{bound}")
    wait_for(lambda: active_leases(cluster, bound), what="re-issue once the bot is back")
    cluster.custom.delete_namespaced_custom_object(G, V, bound, resources.BINDING_PLURAL, "runners")
    wait_for(lambda: leases(cluster, bound) == [], what="revocation on binding deletion")


def test_several_bindings_need_a_choice(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, bound: str
) -> None:
    make_binding(cluster, bound, "second", f"bot-{bound}")
    wait_for(lambda: (c := binding_condition(cluster, bound, "second")) and c["status"] == "True")
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: len(active_leases(cluster, bound)) == 2)
    token = pod_token(cluster, bound, pod)
    ambiguous = exchange(operator, token)
    assert ambiguous.status_code == 409
    assert ambiguous.json()["bindings"] == ["runners", "second"]
    chosen = exchange(operator, token, binding="second")
    assert chosen.status_code == 200 and chosen.json()["binding"] == "second"
    port = operator.process.endpoint_port  # type: ignore[attr-defined]
    spoofed = requests.post(
        f"http://127.0.0.1:{port}/v1/credentials",
        headers={"Authorization": f"Bearer {token}", "l5d-client-id": "someone.else"},
        params={"binding": "runners"},
        timeout=10,
    )
    assert spoofed.status_code == 403
    assert spoofed.json()["error"] == "identity_mismatch"
