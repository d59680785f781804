"""One Event per happening: the Events the operator posts, counted on the real API server.

phabmesh posts each Event under a name of its own (nothing aggregates them), so a happening
announced by two code paths shows twice in ``kubectl describe``. Counted once the operator
has settled: the pod and its leases gone from its World, no reconcile of the pod running,
and no Event still being posted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from phabmesh import resources
from phabmesh.dev.conduit import ConduitServer
from phabmesh.leases import readiness
from tests.kube import HAND_NODE, Cluster, wait_for
from tests.phab import (
    SYSTEM,
    G,
    V,
    active_leases,
    binding_condition,
    bot_ready,
    label_namespace,
    leases,
    make_binding,
    make_bot,
    make_pod,
    register_bot,
)
from tests.stack import Threaded


def _events(cluster: Cluster, namespace: str, **selector: str) -> list[client.CoreV1Event]:
    fields = ",".join(f"{key}={value}" for key, value in selector.items())
    items: list[client.CoreV1Event] = cluster.core.list_namespaced_event(
        namespace, field_selector=fields
    ).items
    return items


def _quiet(operator: Threaded, namespace: str, pod_uid: str | None = None) -> bool:
    """The operator holds no lease of ``namespace`` (nor the pod), reconciles nothing of
    the pod, and has no Event left to post."""

    async def probe() -> bool:
        memo: Any = operator.process.memo  # type: ignore[attr-defined]
        if any(lease.namespace == namespace for lease in memo.world.leases.values()):
            return False
        if pod_uid is not None and (
            pod_uid in memo.world.pods or pod_uid in memo.leases._pod_locks
        ):
            return False
        return not memo.writer._pending

    quiet: bool = operator.call(probe)
    return quiet


def _uid(pod: client.V1Pod) -> str:
    assert pod.metadata is not None
    return str(pod.metadata.uid)


def _bound(cluster: Cluster, conduit: ConduitServer, namespace: str) -> str:
    bot = f"bot-{namespace}"
    make_bot(cluster, conduit, bot)
    label_namespace(cluster, namespace)
    make_binding(cluster, namespace, "runners", bot)
    wait_for(
        lambda: (c := binding_condition(cluster, namespace, "runners")) and c["status"] == "True",
        what="the binding to be Ready",
    )
    return bot


def _delete_pod_at_once(cluster: Cluster, namespace: str, bot: str) -> None:
    cluster.core.delete_namespaced_pod("runner-1", namespace, grace_period_seconds=0)


def _delete_pod(cluster: Cluster, namespace: str, bot: str) -> None:
    cluster.core.delete_namespaced_pod("runner-1", namespace)


def _delete_token_secret(cluster: Cluster, namespace: str, bot: str) -> None:
    cluster.core.delete_namespaced_secret(f"{bot}-token", SYSTEM)


def _delete_binding(cluster: Cluster, namespace: str, bot: str) -> None:
    cluster.custom.delete_namespaced_custom_object(
        G, V, namespace, resources.BINDING_PLURAL, "runners"
    )


Breaker = Callable[[Cluster, str, str], None]


@pytest.mark.parametrize(
    ("node", "breaker", "reason"),
    [
        (HAND_NODE, _delete_pod_at_once, None),  # PodDeleted, or PodTerminating if seen so
        # on a KWOK node: Terminating, then gone at once (PodDeleted when the operator sees
        # only the deletion, on a busy machine): one Event either way
        (None, _delete_pod, None),
        (HAND_NODE, _delete_token_secret, "BotNotReady"),
        (HAND_NODE, _delete_binding, "BindingDeleted"),
    ],
    ids=["pod-deleted-at-once", "pod-deleted", "bot-token-deleted", "binding-deleted"],
)
def test_a_revoked_lease_makes_one_credential_revoked_event(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    namespace: str,
    node: str | None,
    breaker: Breaker,
    reason: str | None,
) -> None:
    bot = _bound(cluster, conduit, namespace)
    pod = make_pod(cluster, namespace, "runner-1", node=node)
    (lease,) = wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
    breaker(cluster, namespace, bot)
    wait_for(lambda: leases(cluster, namespace) == [], what="the lease revoked and deleted")
    wait_for(lambda: _quiet(operator, namespace), timeout=60, what="the operator to settle")
    if breaker in (_delete_pod, _delete_pod_at_once):
        wait_for(
            lambda: _quiet(operator, namespace, _uid(pod)),
            timeout=60,
            what="the operator to be done with the pod",
        )
    revoked = _events(
        cluster, namespace, reason="CredentialRevoked", **{"involvedObject.name": "runner-1"}
    )
    messages = [e.message for e in revoked]
    assert len(revoked) == 1, messages
    (event,) = revoked
    assert str(event.message).startswith(f"credential {lease['metadata']['name']} ")
    assert event.count == 1
    if reason is not None:
        assert str(event.message).endswith(f"revoked: {reason}"), event.message
    else:
        assert str(event.message).endswith(("revoked: PodDeleted", "revoked: PodTerminating"))
    issued = _events(
        cluster, namespace, reason="CredentialIssued", **{"involvedObject.name": "runner-1"}
    )
    assert len(issued) == 1, [e.message for e in issued]


def test_a_revocation_racing_the_garbage_collector_makes_one_event(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    """A pod's deletion, its lease revoked by the operator while the garbage collector
    deletes it with the pod: the watch's DELETED of the Active lease and the revocation's
    write (answered NotFound) both said so on the pod, each with its own message.

    The race is made certain (fault injection): the operator's revocation write is held
    until its World has seen the garbage collector's deletion. The pod is a hand-made one
    that stays Terminating (no kubelet) until the test removes it for good."""
    _bound(cluster, conduit, namespace)
    pod = make_pod(cluster, namespace, "runner-1")
    (lease,) = wait_for(lambda: active_leases(cluster, namespace), what="the pod's lease")
    key = (namespace, lease["metadata"]["name"])
    memo: Any = operator.process.memo  # type: ignore[attr-defined]
    kube = memo.writer.client
    original = kube.json_patch
    held: list[str] = []

    async def revocation_held(path: str, ops: list[dict[str, Any]], **kw: Any) -> Any:
        if path.endswith(f"/phabricatorcredentials/{key[1]}") and any(
            op.get("path") == "/status/phase" for op in ops
        ):
            held.append(path)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while key in memo.world.leases and loop.time() < deadline:
                await asyncio.sleep(0.02)
        return await original(path, ops, **kw)

    kube.json_patch = revocation_held
    try:
        cluster.core.delete_namespaced_pod("runner-1", namespace)  # Terminating
        wait_for(lambda: held, what="the operator's revocation write")
        cluster.core.delete_namespaced_pod("runner-1", namespace, grace_period_seconds=0)
        wait_for(lambda: leases(cluster, namespace) == [], timeout=60, what="the lease gone")
        wait_for(
            lambda: _quiet(operator, namespace, _uid(pod)),
            timeout=60,
            what="the operator to be done with the pod",
        )
    finally:
        del kube.json_patch
    revoked = _events(
        cluster, namespace, reason="CredentialRevoked", **{"involvedObject.name": "runner-1"}
    )
    assert len(revoked) == 1, [e.message for e in revoked]


def _bot_checked_after_its_binding(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str, *, valid: bool
) -> str:
    """A bot and its binding applied together, as `kubectl apply` makes them (as
    manifests/samples/demo.yaml does); its token ``valid`` or not. That the binding is
    judged before the bot's first check answers is made certain (fault injection): the
    operator's first Conduit call for this bot waits until the binding has its verdict.
    Returns once the bot's check has answered and the operator has settled."""
    bot = f"bot-{namespace}"
    label_namespace(cluster, namespace)
    memo: Any = operator.process.memo  # type: ignore[attr-defined]
    phabricator = memo.conduit
    original = phabricator.whoami
    key = (namespace, "runners")
    conduit.add_user(bot, bot=True)
    token = conduit.add_token(bot) if valid else "api-" + "x" * 28

    def judged() -> bool:  # the binding's verdict written in its status
        binding = memo.world.bindings.get(key)
        return binding is not None and readiness.of_binding(binding) is not None

    def whoami_held(asked: str) -> Any:  # in the operator's worker thread
        if asked == token:
            deadline = time.monotonic() + 30
            while not judged() and time.monotonic() < deadline:
                time.sleep(0.02)
        return original(asked)

    phabricator.whoami = whoami_held
    try:
        register_bot(cluster, bot, token)
        make_binding(cluster, namespace, "runners", bot)
        wait_for(
            lambda: bot_ready(cluster, bot) is not None,
            what="the bot's first check",
        )
    finally:
        del phabricator.whoami
    wait_for(
        lambda: (
            (c := binding_condition(cluster, namespace, "runners"))
            and c["status"] == ("True" if valid else "False")
        ),
        what="the binding's verdict",
    )
    wait_for(
        lambda: _events(cluster, namespace, **{"involvedObject.name": "runners"}),
        what="the binding's Events",
    )
    wait_for(lambda: _quiet(operator, namespace), timeout=60, what="the operator to settle")
    return bot


def test_a_healthy_start_makes_no_warning_event(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    """The binding waits for its bot's first check without a Warning that the bot is not
    Ready, and each says Ready once."""
    bot = _bot_checked_after_its_binding(cluster, conduit, operator, namespace, valid=True)
    on_binding = _events(cluster, namespace, **{"involvedObject.name": "runners"})
    on_bot = _events(cluster, "default", **{"involvedObject.name": bot})
    said = [(e.type, e.reason, e.message) for e in [*on_binding, *on_bot]]
    assert [e for e in said if e[0] != "Normal"] == [], said
    assert sorted((e.reason, e.count) for e in on_binding) == [("Ready", 1)], said
    assert sorted((e.reason, e.count) for e in on_bot) == [("Verified", 1)], said


def test_a_bot_whose_first_check_fails_is_said_on_its_binding_once(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, namespace: str
) -> None:
    """Waiting kept the binding's reason BotNotReady; the check's answer (still BotNotReady,
    now with the cause) is said all the same: one Warning naming it."""
    bot = _bot_checked_after_its_binding(cluster, conduit, operator, namespace, valid=False)
    on_binding = _events(cluster, namespace, **{"involvedObject.name": "runners"})
    said = [(e.type, e.reason, e.message, e.count) for e in on_binding]
    assert said == [
        ("Warning", "BotNotReady", f'PhabricatorBot "{bot}" is not Ready (TokenInvalid)', 1)
    ], said
