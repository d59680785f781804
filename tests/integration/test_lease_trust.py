"""A lease is only as good as its binding and its bot, now: bot swaps, forged leases, TTL
changes and pods of another mesh, on the real API server with the operator and the gateway
running."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from typing import Any

import pytest

from phabmesh import credentials, resources
from phabmesh.controller.writer import Writer
from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube import KubeClient, KubeError, load_connection
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import World
from tests.kube import Cluster, wait_for
from tests.phab import (
    G,
    V,
    active_leases,
    binding_condition,
    exchange,
    label_namespace,
    make_binding,
    make_bot,
    make_pod,
    pod_token,
    time_of,
    whoami,
)
from tests.stack import Threaded


def acts_as(gateway: Threaded, credential: str) -> str | None:
    """The bot the gateway answers as, or None when it refuses the credential."""
    answer = whoami(gateway, credential)
    return None if answer.get("error_code") else str(answer["result"]["userName"])


def patch_binding(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    cluster.custom.patch_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, name, {"spec": spec}
    )


def patch_bot_selector(cluster: Cluster, name: str, labels: dict[str, str]) -> None:
    cluster.custom.patch_cluster_custom_object(
        G, V, resources.BOT_PLURAL, name, {"spec": {"namespaceSelector": {"matchLabels": labels}}}
    )


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -- a bot taken away after a bot swap ------------------------------------------------------


def test_a_bot_swap_revokes_the_old_bots_lease_and_the_admin_can_take_the_old_bot_away(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> None:
    """Binding → X with an Active lease; the tenant points it at Y; the admin removes the
    namespace from X's selector. Nothing of X must remain: not the lease, not a fresh
    exchange, not the gateway."""
    x, y = f"bot-{bound}", f"y-{bound}"
    make_bot(cluster, conduit, y)
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    token = pod_token(cluster, bound, pod)
    before = exchange(operator, token).json()
    assert before["bot"] == x
    wait_for(lambda: acts_as(gateway, before["credential"]) == x, what="the gateway to act as X")

    patch_binding(cluster, bound, "runners", {"botRef": {"name": y}})
    lease = wait_for(
        lambda: [item for item in active_leases(cluster, bound) if item["spec"]["bot"] == y],
        what="a lease for the new bot",
    )[0]
    assert [item["spec"]["bot"] for item in active_leases(cluster, bound)] == [y]
    assert lease["spec"]["binding"] == "runners"
    patch_bot_selector(cluster, x, {"phabmesh.io/bots": "someone-else"})

    refused = wait_for(lambda: (a := whoami(gateway, before["credential"])).get("error_code") and a)
    assert "the binding names another bot now" in refused["error_info"], refused
    after = wait_for(lambda: (r := exchange(operator, token)).status_code == 200 and r.json())
    assert after["bot"] == y
    assert wait_for(lambda: acts_as(gateway, after["credential"])) == y


def test_narrowing_a_bots_selector_revokes_its_leases(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> None:
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    credential = exchange(operator, pod_token(cluster, bound, pod)).json()["credential"]
    patch_bot_selector(cluster, f"bot-{bound}", {"phabmesh.io/bots": "someone-else"})
    wait_for(lambda: not active_leases(cluster, bound), what="the lease to be revoked")
    refused = wait_for(lambda: (a := whoami(gateway, credential)).get("error_code") and a)
    assert refused["error_code"] == "ERR-INVALID-AUTH"
    answer = exchange(operator, pod_token(cluster, bound, pod))
    assert answer.status_code == 403


# -- forged leases ------------------------------------------------------------------------


def _forge(
    cluster: Cluster,
    namespace: str,
    pod: Any,
    bot: str,
    binding: str,
    lasting: datetime.timedelta = datetime.timedelta(hours=24),
) -> dict[str, Any]:
    """What anyone allowed to write leases in the namespace could write."""
    sa = pod.spec.service_account_name
    body = {
        "apiVersion": f"{G}/{V}",
        "kind": resources.CREDENTIAL_KIND,
        "metadata": {"name": f"forged-{pod.metadata.name}"},
        "spec": {
            "podName": pod.metadata.name,
            "podUID": pod.metadata.uid,
            "serviceAccount": sa,
            "identity": f"{sa}.{namespace}.serviceaccount.identity.linkerd.cluster.local",
            "binding": binding,
            "bot": bot,
        },
    }
    cluster.custom.create_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL, body
    )
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    status = {
        "phase": "Active",
        "issuedAt": now().strftime(stamp),
        "renewedAt": now().strftime(stamp),
        "expiresAt": (now() + lasting).strftime(stamp),
    }
    forged: dict[str, Any] = cluster.custom.patch_namespaced_custom_object(
        G, V, namespace, resources.CREDENTIAL_PLURAL, body["metadata"]["name"], {"status": status}
    )
    return forged


def _gateway_saw(gateway: Threaded, uid: str) -> bool:
    leases = gateway.process.state.leases  # type: ignore[attr-defined]
    return uid in leases.by_uid or uid in leases.tombstones


def test_a_forged_lease_for_another_bot_gets_nothing(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, bound: str
) -> None:
    """A lease naming a bot whose selector excludes the namespace, 24 h long, for a binding
    that names another bot: neither the endpoint nor the gateway ever acts as that bot."""
    vip, ours = f"vip-{bound}", f"bot-{bound}"
    make_bot(cluster, conduit, vip)
    patch_bot_selector(cluster, vip, {"phabmesh.io/bots": "vip-only"})
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    forged = LeaseView.from_body(_forge(cluster, bound, pod, vip, "second"))
    make_binding(cluster, bound, "second", ours)

    # A credential for it, as an endpoint that trusted the lease would have signed it.
    ring = operator.process.keys.ring  # type: ignore[attr-defined]
    settings = operator.process.settings  # type: ignore[attr-defined]
    credential = credentials.mint(
        ring,
        issuer=settings.issuer,
        audience=settings.credential_audience,
        subject=forged.identity,
        now=now(),
        not_after=now() + datetime.timedelta(hours=1),
        pod=forged.pod_name,
        pod_uid=forged.pod_uid,
        namespace=forged.namespace,
        binding=forged.binding,
        bot=forged.bot,
        bot_phid="",
        lease_uid=forged.uid,
    )
    wait_for(lambda: _gateway_saw(gateway, forged.uid), what="the gateway to see the lease")
    refused = whoami(gateway, credential)
    assert refused.get("error_code") == "ERR-INVALID-AUTH", refused

    token = pod_token(cluster, bound, pod)
    answer = wait_for(
        lambda: (r := exchange(operator, token, binding="second")).status_code == 200 and r.json(),
        what="a credential through binding second",
    )
    assert answer["bot"] == ours  # re-issued by the operator for the binding's own bot
    # The operator revoked the forged lease without waiting for a pod or binding event.
    assert forged.uid not in {item["metadata"]["uid"] for item in active_leases(cluster, bound)}


def test_a_forged_lease_for_a_pod_that_is_not_entitled_is_revoked_at_once(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    """Binding and bot agree, but the pod is not meshed: the operator revokes the lease
    from its own event, not at the pod's next event or the lease's renewal."""
    pod = make_pod(cluster, bound, "plain", meshed=False)
    wait_for(lambda: _status(cluster, bound).get("unmeshedPods") == 1, what="the pod seen")
    # Within the binding's 2m TTL and not due for renewal for a minute.
    lasting = datetime.timedelta(seconds=100)
    forged = _forge(cluster, bound, pod, f"bot-{bound}", "runners", lasting)
    assert forged["status"]["phase"] == "Active"
    wait_for(lambda: not active_leases(cluster, bound), what="the forged lease to be revoked")
    answer = exchange(operator, pod_token(cluster, bound, pod))
    assert answer.status_code == 403


# -- credentialTTL changes ----------------------------------------------------------------


def test_a_shorter_ttl_shortens_live_leases_and_credentials_at_once(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, gateway: Threaded, namespace: str
) -> None:
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot, credentialTTL="10m")
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True"
    )
    pod = make_pod(cluster, namespace, "runner-1")
    lease = wait_for(lambda: active_leases(cluster, namespace))[0]
    assert time_of(lease["status"]["expiresAt"]) - now() > datetime.timedelta(minutes=9)
    token = pod_token(cluster, namespace, pod)
    assert time_of(exchange(operator, token).json()["expiresAt"]) - now() > datetime.timedelta(
        minutes=9
    )

    patch_binding(cluster, namespace, "runners", {"credentialTTL": "1m"})
    minute = datetime.timedelta(minutes=1, seconds=2)  # 2 s: the test's own pace
    wait_for(
        lambda: [
            item
            for item in active_leases(cluster, namespace)
            if time_of(item["status"]["expiresAt"]) - now() <= minute
        ],
        what="the live lease to be shortened to the new TTL",
    )
    issued = wait_for(lambda: (r := exchange(operator, token)).status_code == 200 and r.json())
    assert time_of(issued["expiresAt"]) - now() <= minute
    assert wait_for(lambda: acts_as(gateway, issued["credential"])) == bot
    signed = exchange(operator, token, format="jwt").json()
    claims = credentials.unverified_claims(signed["credential"])
    assert claims["exp"] - claims["iat"] <= 60
    assert acts_as(gateway, signed["credential"]) == bot
    # A credential signed two minutes ago (under the old TTL, still before its exp) has
    # outlived the new one: the gateway refuses it.
    live = LeaseView.from_body(active_leases(cluster, namespace)[0])
    ring = operator.process.keys.ring  # type: ignore[attr-defined]
    settings = operator.process.settings  # type: ignore[attr-defined]
    old = credentials.mint(
        ring,
        issuer=settings.issuer,
        audience=settings.credential_audience,
        subject=live.identity,
        now=now() - datetime.timedelta(minutes=2),
        not_after=now() + datetime.timedelta(minutes=8),
        pod=live.pod_name,
        pod_uid=live.pod_uid,
        namespace=live.namespace,
        binding=live.binding,
        bot=live.bot,
        bot_phid="",
        lease_uid=live.uid,
    )
    refused = whoami(gateway, old)
    assert "credential outlived the binding's credentialTTL" in (refused["error_info"] or "")
    # A Phorge-shaped one says no issue time: it was made no earlier than the start of its
    # lease's term that ends when it does, or else than the lease's issuedAt. One made in the
    # term before the shortening (the lease is seconds old) keeps its time: good until that
    # start plus the new TTL (tests/integration/test_ttl_shrink.py follows it to its end).
    young = credentials.phorge.mint(
        ring,
        lease_uid=live.uid,
        digest=live.phorge_digest(),
        now=now(),
        not_after=time_of(lease["status"]["expiresAt"]),
    )
    assert acts_as(gateway, young) == bot

    # Longer again: it applies at the next renewal, and the lease stays Active throughout.
    patch_binding(cluster, namespace, "runners", {"credentialTTL": "5m"})
    wait_for(
        lambda: [
            item
            for item in active_leases(cluster, namespace)
            if time_of(item["status"]["expiresAt"]) - now() > datetime.timedelta(minutes=2)
        ],
        timeout=60,
        what="the lease to be renewed under the longer TTL",
    )


# -- only this mesh counts ----------------------------------------------------------------


def _status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    obj = cluster.custom.get_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, "runners"
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def test_pods_of_another_control_plane_or_trust_domain_get_no_lease(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    other_plane = make_pod(
        cluster,
        bound,
        "other-plane",
        labels={"app": "runner", "linkerd.io/control-plane-ns": "other-linkerd"},
    )
    other_domain = make_pod(
        cluster,
        bound,
        "other-domain",
        proxy_env={"_l5d_ns": "linkerd", "_l5d_trustdomain": "other.example"},
    )
    make_pod(
        cluster,
        bound,
        "ours",
        proxy_env={"_l5d_ns": "linkerd", "_l5d_trustdomain": "cluster.local"},
    )
    status = wait_for(
        lambda: (
            (s := _status(cluster, bound)).get("otherMeshPods") == 2
            and s.get("activeCredentials") == 1
            and s
        ),
        what="the binding to count the two pods of other meshes",
    )
    assert (status["matchedPods"], status["unmeshedPods"]) == (1, 0)
    assert [item["spec"]["podName"] for item in active_leases(cluster, bound)] == ["ours"]
    plane = exchange(operator, pod_token(cluster, bound, other_plane))
    assert plane.status_code == 403
    assert "another Linkerd control plane" in plane.json()["message"]
    domain = exchange(operator, pod_token(cluster, bound, other_domain))
    assert domain.status_code == 403
    assert "another trust domain" in domain.json()["message"]


# -- a lease name taken by a newer lease ----------------------------------------------------


def test_revoking_an_old_view_never_revokes_the_lease_now_under_its_name(
    cluster: Cluster, operator: Threaded, bound: str
) -> None:
    """A lease re-issued for another bot takes the old one's name; a revocation decided on a
    stale view of the old one (a late watch event) must not touch the new one."""
    make_pod(cluster, bound, "runner-1")
    current = LeaseView.from_body(wait_for(lambda: active_leases(cluster, bound))[0])
    stale = dataclasses.replace(current, uid="00000000-0000-0000-0000-000000000000")

    async def revoke() -> None:
        kube = KubeClient(load_connection(str(cluster.kubeconfig)))
        try:
            await Writer(kube, World()).revoke(stale, resources.POD_GONE)
        finally:
            await kube.close()

    with pytest.raises(KubeError) as refused:
        asyncio.run(revoke())
    assert refused.value.status < 500, refused.value  # a definite no, not an outage
    assert [item["metadata"]["uid"] for item in active_leases(cluster, bound)] == [current.uid]
