"""Lease and readiness decisions: pure functions over a World."""

from __future__ import annotations

import dataclasses
import datetime

from phabmesh import identity
from phabmesh.leases import explain, plans, readiness, reasons
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView, World

N = identity.DEFAULT_NAMING
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def bot(ready: bool = True, selector: dict[str, object] | None = None) -> BotView:
    return BotView.from_body(
        {
            "metadata": {"name": "ci-bot", "generation": 1},
            "spec": {
                "username": "ci-bot",
                "tokenSecretRef": {"name": "t"},
                "namespaceSelector": selector if selector is not None else {},
            },
            "status": {
                "phid": "PHID-USER-x",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True" if ready else "False",
                        "reason": "Verified" if ready else "Disabled",
                        "lastTransitionTime": "x",
                    }
                ],
            },
        }
    )


def binding(name: str = "runners", sa: str = "runner") -> BindingView:
    return BindingView.from_body(
        {
            "metadata": {"name": name, "namespace": "build", "uid": "b1", "generation": 1},
            "spec": {
                "botRef": {"name": "ci-bot"},
                "identityRefs": [{"kind": "ServiceAccount", "name": sa}],
                "allowedMethods": ["user.whoami"],
            },
        }
    )


def pod(
    uid: str = "p1",
    phase: str = "Running",
    meshed: bool = True,
    deleting: bool = False,
    sa: str = "runner",
) -> identity.PodFacts:
    body: dict[str, object] = {
        "metadata": {"name": f"pod-{uid}", "namespace": "build", "uid": uid},
        "spec": {
            "serviceAccountName": sa,
            "containers": [{"name": "linkerd-proxy" if meshed else "app"}],
        },
        "status": {"phase": phase},
    }
    if deleting:
        body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # type: ignore[index]
    return identity.PodFacts.from_pod(body)


def lease(pod_uid: str = "p1", binding_name: str = "runners", phase: str = "Active") -> LeaseView:
    return LeaseView.from_body(
        {
            "metadata": {"name": f"l-{pod_uid}-{binding_name}", "namespace": "build", "uid": "l"},
            "spec": {
                "podUID": pod_uid,
                "podName": f"pod-{pod_uid}",
                "binding": binding_name,
                "bot": "ci-bot",
                "identity": "runner.build.serviceaccount.identity.linkerd.cluster.local",
            },
            "status": {"phase": phase, "expiresAt": "2026-01-01T00:15:00Z"},
        }
    )


def world(
    *pods: identity.PodFacts,
    bindings: tuple[BindingView, ...] = (),
    leases: tuple[LeaseView, ...] = (),
    bots: tuple[BotView, ...] | None = None,
    labels: dict[str, str] | None = None,
) -> World:
    w = World()
    for b_view in (bot(),) if bots is None else bots:
        w.bots[b_view.name] = b_view
    w.namespaces["build"] = labels or {}
    for p in pods:
        w.put_pod(p)
    for b in bindings:
        w.put_binding(b)
    for lease_view in leases:
        w.put_lease(lease_view)
    return w


def verdicts(w: World, bot_view: BotView | None, labels: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    return {b.key: readiness.judge_binding(b, bot_view, labels or {}) for b in w.bindings.values()}


def test_running_meshed_matching_pod_gets_a_lease() -> None:
    w = world(pod(), bindings=(binding(),))
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    assert [b.name for b in plan.issue] == ["runners"] and plan.revoke == ()
    w.put_lease(lease())
    assert not plans.plan_pod(w, "p1", N, verdicts(w, bot()))  # holds it already


def test_a_pending_pod_whose_agent_runs_is_issued_its_lease() -> None:
    """With the agent as a native sidecar (or an init container), the app containers start
    only once it has its credential: the pod is Pending until then, on its node, with the
    agent running. A lease is issued to it (no deadlock), not to a Pending pod that has no
    container running yet."""
    waiting = pod(phase="Pending")
    running = identity.PodFacts.from_pod(
        {
            "metadata": {"name": "pod-p1", "namespace": "build", "uid": "p1"},
            "spec": {
                "serviceAccountName": "runner",
                "nodeName": "node-1",
                "initContainers": [
                    {"name": "linkerd-proxy", "restartPolicy": "Always"},
                    {"name": "phabmesh-agent", "restartPolicy": "Always"},
                ],
                "containers": [{"name": "app"}],
            },
            "status": {
                "phase": "Pending",
                "initContainerStatuses": [
                    {"name": "linkerd-proxy", "state": {"running": {}}},
                    {"name": "phabmesh-agent", "state": {"running": {}}},
                ],
            },
        }
    )
    w = world(running, bindings=(binding(),))
    assert plans.plan_pod(w, "p1", N, verdicts(w, bot())).issue
    w = world(waiting, bindings=(binding(),))
    assert not plans.plan_pod(w, "p1", N, verdicts(w, bot())).issue


def _pending_on_node(states: list[dict[str, object]]) -> identity.PodFacts:
    return identity.PodFacts.from_pod(
        {
            "metadata": {"name": "pod-p1", "namespace": "build", "uid": "p1"},
            "spec": {
                "serviceAccountName": "runner",
                "nodeName": "node-1",
                "initContainers": [
                    {"name": "linkerd-proxy", "restartPolicy": "Always"},
                    {"name": "phabmesh-agent"},
                ],
                "containers": [{"name": "app"}],
            },
            "status": {
                "phase": "Pending",
                "initContainerStatuses": [
                    {"name": name, "state": state}
                    for name, state in zip(["linkerd-proxy", "phabmesh-agent"], states, strict=True)
                ],
            },
        }
    )


def test_a_pending_pod_keeps_its_lease_while_an_init_container_restarts() -> None:
    """The agent (init mode) wrote its credential and ended; the stand-in proxy then restarts:
    for a moment no init container runs. The pod has not ended: its lease stays (the app's
    credential keeps working), and no new one is issued in its place."""
    restarting = _pending_on_node(
        [{"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": {"exitCode": 0}}]
    )
    assert not restarting.started
    w = world(restarting, bindings=(binding(),), leases=(lease(),))
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    assert not plan.revoke and not plan.issue
    explained = explain.explain_pod(w, "p1", N, verdicts(w, bot()))
    assert explained.reason == "Matched"
    # Without a lease held, such a pod is not issued one yet.
    w = world(restarting, bindings=(binding(),))
    assert not plans.plan_pod(w, "p1", N, verdicts(w, bot())).issue
    # Off its node (Unknown), or ended, the lease goes.
    for facts in (pod(phase="Unknown"), pod(phase="Succeeded")):
        w = world(facts, bindings=(binding(),), leases=(lease(),))
        assert plans.plan_pod(w, "p1", N, verdicts(w, bot())).revoke


def test_pods_that_may_not_hold_a_lease() -> None:
    for facts in (pod(phase="Pending"), pod(meshed=False), pod(sa="other")):
        w = world(facts, bindings=(binding(),))
        assert not plans.plan_pod(w, "p1", N, verdicts(w, bot()))


def test_an_idle_pod_is_planned_alike_without_the_verdicts() -> None:
    # The controller reads no verdict for a pod that may hold no lease and holds none: its
    # plan is the same without them. A pod that may hold one, or holds one, is not idle.
    for facts in (pod(phase="Pending"), pod(meshed=False), pod(deleting=True)):
        w = world(facts, bindings=(binding(),))
        assert plans.idle(w, facts)
        assert plans.plan_pod(w, "p1", N, {}) == plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    for facts, held in ((pod(), ()), (pod(sa="other"), ()), (pod(meshed=False), (lease(),))):
        w = world(facts, bindings=(binding(),), leases=held)
        assert not plans.idle(w, facts)
    w = world(pod(meshed=False), bindings=(binding(),), leases=(lease(),))
    revoked = plans.plan_pod(w, "p1", N, verdicts(w, bot())).revoke
    assert [(lv.name, r) for lv, r in revoked] == [("l-p1-runners", reasons.NOT_MESHED)]


def test_every_revocation_reason() -> None:
    cases = [
        (
            world(pod(deleting=True), bindings=(binding(),), leases=(lease(),)),
            bot(),
            reasons.POD_TERMINATING,
        ),
        (
            world(pod(phase="Succeeded"), bindings=(binding(),), leases=(lease(),)),
            bot(),
            reasons.POD_SUCCEEDED,
        ),
        (
            world(pod(phase="Failed"), bindings=(binding(),), leases=(lease(),)),
            bot(),
            reasons.POD_FAILED,
        ),
        (world(bindings=(binding(),), leases=(lease(),)), bot(), reasons.POD_DELETED),
        (world(pod(), leases=(lease(),)), bot(), reasons.BINDING_DELETED),
        (
            world(pod(sa="other"), bindings=(binding(),), leases=(lease(),)),
            bot(),
            reasons.NO_LONGER_MATCHED,
        ),
        (
            world(pod(), bindings=(binding(),), leases=(lease(),)),
            bot(ready=False),
            reasons.BOT_LOST,
        ),
        (
            world(pod(), bindings=(binding(),), leases=(lease(),), bots=()),
            None,
            reasons.BOT_GONE_HERE,
        ),
    ]
    for w, bot_view, reason in cases:
        plan = plans.plan_pod(w, "p1", N, verdicts(w, bot_view))
        assert [(lv.name, r) for lv, r in plan.revoke] == [("l-p1-runners", reason)], reason
        assert plan.issue == ()


def test_namespace_selector_gates_the_binding() -> None:
    picky = bot(selector={"matchLabels": {"team": "ci"}})
    b = binding()
    assert readiness.judge_binding(b, picky, {"team": "ci"}).ready
    refused = readiness.judge_binding(b, picky, {"team": "web"})
    assert (refused.ready, refused.reason, refused.bot_ready) == (
        False,
        reasons.BOT_NOT_ALLOWED,
        False,
    )


def test_a_bot_the_namespace_may_not_use_is_indistinguishable_from_none() -> None:
    """Neither existence, readiness nor PHID of a bot leaks to a namespace it excludes."""
    b = binding()
    missing = readiness.judge_binding(b, None, {"team": "web"})
    for view in (
        bot(selector={"matchLabels": {"team": "ci"}}),
        bot(ready=False, selector={"matchLabels": {"team": "ci"}}),
    ):
        excluded = readiness.judge_binding(b, view, {"team": "web"})
        shown = dataclasses.replace(excluded, detail="")
        assert shown == dataclasses.replace(missing, detail="")
        assert (excluded.bot_shown, excluded.bot_phid) == (False, None)
        assert excluded.reason == reasons.BOT_NOT_ALLOWED
    assert missing.detail != excluded.detail  # the operator's log still tells them apart
    # Allowed: the bot's details are the namespace's to see.
    allowed = readiness.judge_binding(b, bot(ready=False), {})
    assert (allowed.reason, allowed.bot_shown, allowed.bot_phid) == (
        reasons.BOT_NOT_READY,
        True,
        "PHID-USER-x",
    )


def test_revoked_leases_are_not_held() -> None:
    w = world(pod(), bindings=(binding(),), leases=(lease(phase="Revoked"),))
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    assert [b.name for b in plan.issue] == ["runners"]


def test_counts() -> None:
    w = world(
        pod("a"),
        pod("b", meshed=False),
        pod("c", sa="other"),
        pod("d", deleting=True),
        bindings=(binding(),),
        leases=(lease("a"),),
    )
    assert readiness.count_binding(w, binding(), N) == readiness.BindingCounts(
        matched=1, active=1, unmeshed=1
    )


def test_renewal_at_two_thirds() -> None:
    ttl = datetime.timedelta(minutes=15)
    view = lease()  # expires at 00:15
    assert not plans.due_for_renewal(view, ttl, T0 + datetime.timedelta(minutes=9, seconds=59))
    assert plans.due_for_renewal(view, ttl, T0 + datetime.timedelta(minutes=10))
    assert not plans.due_for_renewal(
        lease(phase="Revoked"), ttl, T0 + datetime.timedelta(minutes=14)
    )


def named_bot(name: str, selector: dict[str, object] | None = None) -> BotView:
    view = bot(selector=selector)
    return dataclasses.replace(view, name=name)


def repointed(to: str) -> BindingView:
    view = binding()
    assert view.spec is not None
    spec = view.spec.model_copy(
        update={"bot_ref": view.spec.bot_ref.model_copy(update={"name": to})}
    )
    return dataclasses.replace(view, spec=spec)


def test_a_lease_for_the_bot_the_binding_no_longer_names_is_revoked_and_replaced() -> None:
    """botRef X -> Y: X's lease goes (BotChanged), a lease for Y comes, in one plan."""
    w = world(
        pod(),
        bindings=(repointed("other-bot"),),
        leases=(lease(),),  # for ci-bot
        bots=(bot(), named_bot("other-bot")),
    )
    plan = plans.plan_pod(w, "p1", N, verdicts(w, named_bot("other-bot")))
    assert [(lv.bot, r) for lv, r in plan.revoke] == [("ci-bot", reasons.BOT_CHANGED)]
    assert [(b.name, b.bot) for b in plan.issue] == [("runners", "other-bot")]


def test_a_lease_of_a_bot_that_stops_allowing_the_namespace_is_revoked() -> None:
    picky = bot(selector={"matchLabels": {"team": "ci"}})
    w = world(pod(), bindings=(binding(),), leases=(lease(),), bots=(picky,), labels={})
    # Even with a verdict that still says Ready (judged before the selector changed).
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    assert [r for _, r in plan.revoke] == [reasons.BOT_GONE_HERE]
    assert plan.issue == ()


def test_namespaces_of_a_bot_include_those_holding_its_leases() -> None:
    """The admin narrows X's selector after the binding moved to Y: X's lease's namespace
    is still re-evaluated."""
    w = world(pod(), bindings=(repointed("other-bot"),), leases=(lease(),))
    assert set(w.namespaces_of_bot("ci-bot")) == {"build"}
    assert w.bindings_of_bot("ci-bot") == []
    w.drop_lease(lease().key)
    assert set(w.namespaces_of_bot("ci-bot")) == set()


def test_a_shorter_ttl_makes_a_lease_due_at_once() -> None:
    view = lease()  # expires at 00:15, issued under a 15m TTL
    now = T0 + datetime.timedelta(seconds=13)
    assert not plans.due_for_renewal(view, datetime.timedelta(minutes=15), now)
    assert plans.due_for_renewal(view, datetime.timedelta(minutes=1), now)
    # A longer TTL waits for the usual renewal point.
    assert not plans.due_for_renewal(view, datetime.timedelta(minutes=30), now)


def test_pods_of_another_mesh_get_nothing_and_are_counted() -> None:
    other_plane = identity.PodFacts.from_pod(
        {
            "metadata": {
                "name": "pod-o",
                "namespace": "build",
                "uid": "o",
                "labels": {"linkerd.io/control-plane-ns": "other-linkerd"},
            },
            "spec": {"serviceAccountName": "runner", "containers": [{"name": "linkerd-proxy"}]},
            "status": {"phase": "Running"},
        },
        N,
    )
    w = world(other_plane, pod("a"), bindings=(binding(),))
    assert not plans.plan_pod(w, "o", N, verdicts(w, bot()))
    assert readiness.count_binding(w, binding(), N) == readiness.BindingCounts(
        matched=1, active=0, unmeshed=0, other_mesh=1
    )


def _revoked_by_admin(pod_uid: str = "p1") -> LeaseView:
    return dataclasses.replace(
        lease(pod_uid, phase="Revoked"), reason=reasons.REVOKED_BY_ADMIN, resource_version="9"
    )


def test_no_new_lease_where_an_administrator_revoked_one() -> None:
    w = world(pod(), bindings=(binding(),), leases=(_revoked_by_admin(),))
    assert not plans.plan_pod(w, "p1", N, verdicts(w, bot()))  # nor is it deleted
    # Once the pod is gone, it goes like any Revoked lease left behind.
    w.drop_pod("p1")
    assert [x.reason for x in plans.plan_pod(w, "p1", N, verdicts(w, bot())).delete] == [
        reasons.REVOKED_BY_ADMIN
    ]
    w.put_pod(pod())
    # Another pod of the same binding still gets its lease, and a lease the operator revoked
    # for a reason of its own does not hold a re-issue back.
    w.put_pod(pod(uid="p2"))
    assert [b.name for b in plans.plan_pod(w, "p2", N, verdicts(w, bot())).issue] == ["runners"]
    own = dataclasses.replace(lease(phase="Revoked"), reason=reasons.NO_LONGER_MATCHED)
    w = world(pod(), bindings=(binding(),), leases=(own,))
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    assert [b.name for b in plan.issue] == ["runners"] and plan.delete == (own,)


def test_explain_pod_gives_the_one_reason() -> None:
    cases = [
        (world(pod(), bindings=(binding(),), leases=(lease(),)), bot(), "Matched", True),
        (world(pod(), bindings=(binding(),)), bot(), explain.ISSUE_PENDING, False),
        (world(pod()), bot(), explain.NO_BINDING, False),
        (world(pod(sa="other"), bindings=(binding(),)), bot(), "IdentityNotListed", False),
        (world(pod(meshed=False), bindings=(binding(),)), bot(), reasons.NOT_MESHED, False),
        (world(pod(phase="Pending"), bindings=(binding(),)), bot(), reasons.NOT_RUNNING, False),
        (world(pod(deleting=True), bindings=(binding(),)), bot(), reasons.POD_TERMINATING, False),
        (world(pod(), bindings=(binding(),)), bot(ready=False), reasons.BOT_NOT_READY, False),
        (world(pod(), bindings=(binding(),), bots=()), None, reasons.BOT_NOT_ALLOWED, False),
        (
            world(pod(), bindings=(binding(),), leases=(_revoked_by_admin(),)),
            bot(),
            reasons.REVOKED_BY_ADMIN,
            False,
        ),
        (world(bindings=(binding(),)), bot(), reasons.POD_DELETED, False),
    ]
    for w, bot_view, reason, holds in cases:
        explained = explain.explain_pod(w, "p1", N, verdicts(w, bot_view))
        assert (explained.reason, explained.holds) == (reason, holds), explained
        assert explained.message


def test_explain_pod_agrees_with_plan_pod() -> None:
    """The explanation rests on the plan: a lease being revoked is not held."""
    w = world(pod(sa="other"), bindings=(binding(),), leases=(lease(),))
    plan = plans.plan_pod(w, "p1", N, verdicts(w, bot()))
    explained = explain.explain_pod(w, "p1", N, verdicts(w, bot()))
    assert [r for _, r in plan.revoke] == [explained.reason] == [reasons.NO_LONGER_MATCHED]
    assert not explained.holds


def test_the_nearest_miss_explains() -> None:
    """Of several bindings, the one that picks the pod but is not Ready says why."""
    other = binding(name="others", sa="someone-else")
    w = world(pod(), bindings=(other, binding()))
    explained = explain.explain_pod(w, "p1", N, verdicts(w, bot(ready=False)))
    assert explained.reason == reasons.BOT_NOT_READY
    assert '"runners"' in explained.message
    assert {e.binding.name: e.reason for e in explained.bindings} == {
        "others": "IdentityNotListed",
        "runners": reasons.BOT_NOT_READY,
    }


def _body(uid: str, **meta: object) -> dict[str, object]:
    return {
        "metadata": {"name": f"pod-{uid}", "namespace": "build", "uid": uid, **meta},
        "spec": {"serviceAccountName": "runner", "containers": [{"name": "app"}]},
        "status": {"phase": "Running"},
    }


def test_linkerds_label_without_its_proxy_gets_no_lease_and_says_what_is_missing() -> None:
    """A pod author can write Linkerd's label: without a linkerd-proxy container the pod is
    not meshed, the operator plans no lease, and `why` names what is missing."""
    label_only = identity.PodFacts.from_pod(
        _body("l", labels={"linkerd.io/control-plane-ns": "linkerd"}), N
    )
    annotated = identity.PodFacts.from_pod(
        _body("a", annotations={"linkerd.io/proxy-version": "edge-25.1.1"}), N
    )
    w = world(label_only, annotated, bindings=(binding(),))
    for uid in ("l", "a"):
        assert not plans.plan_pod(w, uid, N, verdicts(w, bot()))
        explained = explain.explain_pod(w, uid, N, verdicts(w, bot()))
        assert (explained.reason, explained.holds) == (reasons.NOT_MESHED, False)
        assert "not meshed (ProxyMissing)" in explained.message
        assert "no linkerd-proxy container" in explained.message
        assert "linkerd.io/inject: enabled" in explained.message
    assert readiness.count_binding(w, binding(), N) == readiness.BindingCounts(
        matched=0, active=0, unmeshed=2, other_mesh=0
    )
    # A pod Linkerd never touched is told the same container is what it lacks.
    w = world(pod(meshed=False), bindings=(binding(),))
    message = explain.explain_pod(w, "p1", N, verdicts(w, bot())).message
    assert "not meshed (NoProxy): no linkerd-proxy container" in message
