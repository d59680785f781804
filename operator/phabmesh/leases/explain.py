"""Explanations: the one reason a pod holds a credential or holds none
(:func:`explain_pod`), from the same decisions as :func:`phabmesh.leases.plans.plan_pod`.
What ``kubectl phabmesh why`` prints and the credential endpoint answers a pod it refuses
(:func:`explain_from_objects`, over objects as the API shows them).

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from phabmesh import identity, matching
from phabmesh.leases.plans import Entitlement, entitlements, plan_pod, pod_reason
from phabmesh.leases.readiness import Verdict, shown_verdict
from phabmesh.leases.reasons import (
    INVALID_SPEC,
    NOT_MESHED,
    NOT_RUNNING,
    POD_DELETED,
    POD_FAILED,
    POD_SUCCEEDED,
    POD_TERMINATING,
    REVOKED_BY_ADMIN,
)
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, BotView, World

# What explain_pod answers besides phabmesh.leases.reasons' and matching's.
NO_BINDING = "NoBinding"  # no PhabricatorBinding in the pod's namespace
ISSUE_PENDING = "IssuePending"  # a binding entitles the pod; its lease is not written yet


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Why a pod holds a credential, or does not: one reason and its message, the Active
    leases it keeps, and each binding's own answer (:func:`entitlements`)."""

    reason: str
    message: str
    leases: tuple[LeaseView, ...] = ()
    bindings: tuple[Entitlement, ...] = ()

    @property
    def holds(self) -> bool:
        return bool(self.leases)


_POD_MESSAGES = {
    POD_TERMINATING: "the pod is terminating",
    POD_SUCCEEDED: "the pod has completed",
    POD_FAILED: "the pod has failed",
}
# Which binding's answer explains best why a pod has no lease: the nearest miss first.
_MISSES = (REVOKED_BY_ADMIN, matching.SELECTOR_MISMATCH, INVALID_SPEC, matching.IDENTITY_NOT_LISTED)


def _miss_rank(entitlement: Entitlement) -> tuple[int, str]:
    reason = entitlement.reason
    # A binding that picks the pod but is not Ready (any verdict reason) ranks after an
    # administrator's revocation and before the bindings that do not pick the pod.
    rank = _MISSES.index(reason) * 2 if reason in _MISSES else 1
    return rank, entitlement.binding.name


def explain_pod(
    world: World,
    pod_uid: str,
    naming: identity.Naming,
    verdicts: Mapping[tuple[str, str], Verdict],
) -> Explanation:
    """The one reason ``pod_uid`` holds a credential or holds none, from the same decisions
    as :func:`plan_pod`: the pod's state, then each binding's :func:`entitlements`."""
    pod = world.pods.get(pod_uid)
    if pod is None:
        return Explanation(POD_DELETED, "the pod does not exist")
    found = tuple(sorted(entitlements(world, pod, naming, verdicts), key=lambda e: e.binding.name))
    plan = plan_pod(world, pod_uid, naming, verdicts)
    going = {lease.key for lease, _ in plan.revoke}
    kept = tuple(
        sorted(
            (x for x in world.leases_of_pod(pod_uid) if x.active and x.key not in going),
            key=lambda x: x.name,
        )
    )
    pod_identity = pod.identity(naming)
    blocked = pod_reason(pod, holding=bool(kept))
    if blocked is not None:
        if blocked == NOT_MESHED:
            message = _not_meshed_message(pod, naming)
        elif blocked == NOT_RUNNING:
            message = _not_running_message(pod)
        else:
            message = _POD_MESSAGES[blocked]
        return Explanation(blocked, message, kept, found)
    if kept:
        shown = ", ".join(f'{x.name} (bot "{x.bot}", binding "{x.binding}")' for x in kept)
        return Explanation(matching.MATCHED, f"{pod_identity} holds {shown}", kept, found)
    if plan.revoke:
        lease, reason = plan.revoke[0]
        return Explanation(
            reason, f"credential {lease.name} is being revoked ({reason})", (), found
        )
    entitled = [e for e in found if e.entitled]
    if entitled:
        names = ", ".join(f'"{e.binding.name}"' for e in entitled)
        message = f"PhabricatorBinding {names} matches; the operator is issuing the credential"
        return Explanation(ISSUE_PENDING, message, (), found)
    if not found:
        return Explanation(
            NO_BINDING, f"no PhabricatorBinding in namespace {pod.namespace}", (), found
        )
    miss = min(found, key=_miss_rank)
    return Explanation(miss.reason, _miss_message(miss, pod, pod_identity, verdicts), (), found)


def _not_running_message(pod: identity.PodFacts) -> str:
    if pod.phase == "Pending" and not pod.node_name:
        why = "the pod is Pending, not on a node yet"
    elif pod.phase == "Pending":
        why = "the pod is Pending and none of its containers runs yet"
    else:
        why = f"the pod is {pod.phase} (its node does not report it)"
    return f"{why}: credentials are issued to pods that run (Running, or an init container running)"


def _not_meshed_message(pod: identity.PodFacts, naming: identity.Naming) -> str:
    if pod.mesh_reason == identity.OTHER_CONTROL_PLANE:
        return (
            "the pod is meshed by another Linkerd control plane: only pods of the control "
            f'plane in namespace "{naming.control_plane_namespace}" get credentials'
        )
    if pod.mesh_reason == identity.OTHER_TRUST_DOMAIN:
        return (
            "the pod's proxy belongs to another trust domain: only pods of trust domain "
            f'"{naming.trust_domain}" get credentials'
        )
    if pod.mesh_reason == identity.PROXY_MISSING:
        return (
            f"the pod is not meshed ({pod.mesh_reason}): it carries Linkerd's label "
            f"{identity.CONTROL_PLANE_LABEL} or annotation {identity.PROXY_VERSION_ANNOTATION} "
            f"but has no {identity.PROXY_CONTAINER} container, and a label or annotation is not "
            "a Linkerd identity: let Linkerd inject its proxy (annotation linkerd.io/inject: "
            "enabled) instead of setting Linkerd's markers by hand"
        )
    hint = {
        identity.INJECTION_DISABLED: "the pod says linkerd.io/inject: disabled",
        identity.NOT_INJECTED: "injection was asked for but Linkerd's webhook did not inject it",
    }.get(pod.mesh_reason, "annotate the pod or its namespace linkerd.io/inject: enabled")
    return (
        f"the pod is not meshed ({pod.mesh_reason}): no {identity.PROXY_CONTAINER} container, "
        f"so no Linkerd identity to trust, and only meshed pods get credentials ({hint})"
    )


def _miss_message(
    miss: Entitlement,
    pod: identity.PodFacts,
    pod_identity: str,
    verdicts: Mapping[tuple[str, str], Verdict],
) -> str:
    name = miss.binding.name
    if miss.reason == REVOKED_BY_ADMIN:
        return (
            f'an administrator revoked the credential of PhabricatorBinding "{name}": this pod '
            "gets no new one through it (a new pod does)"
        )
    if miss.reason == matching.SELECTOR_MISMATCH:
        return (
            f'PhabricatorBinding "{name}" names {pod_identity} but its podSelector does not '
            "select the pod"
        )
    if miss.reason == INVALID_SPEC:
        return f'PhabricatorBinding "{name}" has a spec that cannot be read'
    if miss.reason == matching.IDENTITY_NOT_LISTED:
        return f"no PhabricatorBinding in namespace {pod.namespace} names {pod_identity}"
    verdict = verdicts.get(miss.binding.key)
    detail = verdict.message if verdict is not None else "not judged yet"
    return f'PhabricatorBinding "{name}" matches this pod but is not Ready: {detail}'


def explain_from_objects(
    pod: identity.PodFacts,
    bindings: Iterable[Mapping[str, Any]],
    naming: identity.Naming,
    *,
    bots: Iterable[Mapping[str, Any]] = (),
    namespace_labels: Mapping[str, str] | None = None,
    leases: Iterable[LeaseView] = (),
) -> Explanation:
    """:func:`explain_pod` for one pod from objects as the API shows them (its namespace's
    bindings, the bots, the pod's leases): the same World and the same decisions as the
    operator's, built for this one question."""
    world = World()
    world.put_pod(pod)
    world.namespaces[pod.namespace] = dict(namespace_labels or {})
    for body in bots:
        bot = BotView.from_body(body)
        world.bots[bot.name] = bot
    shown: list[tuple[Mapping[str, Any], BindingView]] = []
    for body in bindings:
        if (body.get("metadata") or {}).get("deletionTimestamp") is None:
            view = BindingView.from_body(body)
            world.put_binding(view)
            shown.append((body, view))
    for lease in leases:
        if lease.pod_uid == pod.uid:
            world.put_lease(lease)
    verdicts = {view.key: shown_verdict(body, view, world) for body, view in shown}
    return explain_pod(world, pod.uid, naming, verdicts)
