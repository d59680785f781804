"""Pure lease and readiness decisions over a :class:`World`: which leases a pod should hold
and why (the controller acts on them; the credential endpoint and ``kubectl phabmesh why``
explain with them).

Gather (the world, kept by watch events), decide (here: no I/O), write (the
writer). Each function answers one question and returns plain values.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from phabmesh import identity, matching, resources
from phabmesh.leases import grants
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import NOT_CHECKED, BindingView, BotView, World

# Binding Ready / BotReady reasons.
READY = "Ready"  # the bot is Ready and may be used from this namespace
INVALID_SPEC = "InvalidSpec"  # the spec could not be parsed (should be stopped by the CRD)
INVALID_SUBJECTS = "InvalidSubjects"  # identities or identityRefs make no sense together
BOT_NOT_READY = "BotNotReady"  # the bot allows this namespace but its Ready is not True
# spec.botRef names no PhabricatorBot, or one whose namespaceSelector excludes this
# namespace: one answer for both, so that a binding cannot be used to find out which bots
# exist (the bot's own status and the operator's log tell an administrator which it is).
BOT_NOT_ALLOWED = "BotNotAllowed"

# Lease revocation reasons (PhabricatorCredential status.reason) are defined, with the
# CRD's documentation of each, in phabmesh.resources.
POD_TERMINATING = resources.POD_TERMINATING
POD_SUCCEEDED = resources.POD_SUCCEEDED
POD_FAILED = resources.POD_FAILED
POD_DELETED = resources.POD_DELETED
POD_GONE = resources.POD_GONE
NOT_RUNNING = resources.POD_NOT_RUNNING
NOT_MESHED = resources.POD_NOT_MESHED
NO_LONGER_MATCHED = resources.NO_LONGER_MATCHED
BINDING_DELETED = resources.BINDING_DELETED
BINDING_NOT_READY = resources.BINDING_NOT_READY
BOT_LOST = resources.BOT_NOT_READY
BOT_CHANGED = resources.BOT_CHANGED
BOT_GONE_HERE = resources.BOT_NOT_ALLOWED
REVOKED_BY_ADMIN = resources.REVOKED_BY_ADMIN

# What explain_pod answers besides the reasons above and matching's.
NO_BINDING = "NoBinding"  # no PhabricatorBinding in the pod's namespace
ISSUE_PENDING = "IssuePending"  # a binding entitles the pod; its lease is not written yet


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A binding's readiness: the Ready and BotReady conditions' content.

    ``bot_shown`` is False when the bot does not exist or does not allow the binding's
    namespace: then the status carries no BotReady condition and no botPHID, and
    ``detail`` (for the operator's log only) says which of the two it is.
    """

    ready: bool
    reason: str
    message: str
    bot_ready: bool
    bot_reason: str
    bot_message: str
    bot_phid: str | None = None
    bot_shown: bool = True
    detail: str = ""


def bot_allows(bot: BotView | None, namespace_labels: Mapping[str, str] | None) -> bool:
    """The bot exists, its spec reads, and its namespaceSelector selects these labels."""
    if bot is None or bot.spec is None:
        return False
    return matching.selector_matches(bot.spec.namespace_selector, namespace_labels or {})


def judge_binding(
    binding: BindingView, bot: BotView | None, namespace_labels: Mapping[str, str] | None
) -> Verdict:
    if binding.spec is None:
        message = "; ".join(binding.problems) or "spec could not be read"
        return Verdict(False, INVALID_SPEC, message, False, INVALID_SPEC, message)
    problems = matching.validate_subjects(binding.spec, binding.namespace)
    if bot is None or not bot_allows(bot, namespace_labels):
        msg = (
            f'PhabricatorBot "{binding.bot}" does not exist or does not allow namespace '
            f'"{binding.namespace}"'
        )
        if bot is None:
            detail = "the bot does not exist"
        elif bot.spec is None:
            detail = "the bot's spec could not be read"
        else:
            detail = "the bot's namespaceSelector excludes the namespace"
        verdict = Verdict(
            False, BOT_NOT_ALLOWED, msg, False, BOT_NOT_ALLOWED, msg, bot_shown=False, detail=detail
        )
    elif not bot.ready:
        if bot.reason == NOT_CHECKED:
            msg = f'PhabricatorBot "{bot.name}" is not checked yet'
        else:
            msg = f'PhabricatorBot "{bot.name}" is not Ready ({bot.reason})'
        verdict = Verdict(False, BOT_NOT_READY, msg, False, bot.reason, msg, bot.phid)
    else:
        verdict = Verdict(
            True,
            READY,
            "credentials are issued to matching pods",
            True,
            READY,
            f'PhabricatorBot "{bot.name}" is Ready',
            bot.phid,
        )
    if problems:
        message = "; ".join(problems)
        return dataclasses.replace(verdict, ready=False, reason=INVALID_SUBJECTS, message=message)
    return verdict


def _pod_reason(pod: identity.PodFacts, *, holding: bool = False) -> str | None:
    """Why this pod may hold no lease at all, or None when it may.

    ``holding``: for a lease the pod holds already. A Pending pod on its node keeps it while
    none of its init containers happens to run (one restarting, or the gap between two): its
    phase has not ended, as a Running pod whose containers restart keeps its own."""
    if pod.terminating:
        return POD_TERMINATING
    if pod.phase == "Succeeded":
        return POD_SUCCEEDED
    if pod.phase == "Failed":
        return POD_FAILED
    if not pod.started and not (holding and pod.phase == "Pending" and pod.node_name):
        return NOT_RUNNING
    if not pod.meshed:
        return NOT_MESHED
    return None


def _not_running_message(pod: identity.PodFacts) -> str:
    if pod.phase == "Pending" and not pod.node_name:
        why = "the pod is Pending, not on a node yet"
    elif pod.phase == "Pending":
        why = "the pod is Pending and none of its containers runs yet"
    else:
        why = f"the pod is {pod.phase} (its node does not report it)"
    return f"{why}: credentials are issued to pods that run (Running, or an init container running)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do about one pod: which bindings to issue for, which leases to revoke, and
    which leases, Revoked already, are still to be deleted (a delete that failed)."""

    issue: tuple[BindingView, ...] = ()
    revoke: tuple[tuple[LeaseView, str], ...] = ()
    delete: tuple[LeaseView, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.issue or self.revoke or self.delete)


def binding_matches(binding: BindingView, pod: identity.PodFacts, naming: identity.Naming) -> bool:
    """The binding's subjects and selector pick this pod (meshed or not)."""
    return binding.spec is not None and matching.matches(
        binding.spec, binding.namespace, pod, naming
    )


def lease_problem(
    world: World, lease: LeaseView, naming: identity.Naming = identity.DEFAULT_NAMING
) -> str | None:
    """Why ``lease`` may not stand whatever the pod does, or None.

    Checked against the binding and the bot as they are now, never against what the
    lease itself says, by the one judgement the credential endpoint and the gateway use
    (:func:`phabmesh.leases.grants.refusal`): its binding must exist, read, and still name
    the lease's bot and the lease's identity, and that bot must allow the lease's namespace.
    """
    binding = world.bindings.get((lease.namespace, lease.binding))
    bot = world.bots.get(lease.bot)
    return grants.refusal(
        lease,
        None if binding is None else grants.BindingFacts.of(binding.bot or "", binding.spec),
        None if bot is None else grants.BotFacts.of(bot.spec),
        # A namespace the world has not seen yet is taken as unlabelled, as before: the
        # controller never revokes on its own ignorance (the gateway fails closed instead).
        world.namespaces.get(lease.namespace, {}),
        naming,
    )


def plan_pod(
    world: World,
    pod_uid: str,
    naming: identity.Naming,
    verdicts: Mapping[tuple[str, str], Verdict],
) -> Plan:
    """Leases to create and to revoke so that ``pod_uid`` holds exactly what it should.

    A lease that must go and a binding that still entitles the pod give both a
    revocation and an issue (for a bot swap: the old bot's lease goes, the new bot's
    comes); the caller revokes before it issues.
    """
    pod = world.pods.get(pod_uid)
    held = [lease for lease in world.leases_of_pod(pod_uid) if lease.active]
    # An administrator's revocation stands while its pod lives (see entitlements).
    delete = tuple(
        lease
        for lease in world.leases_of_pod(pod_uid)
        if lease.phase == "Revoked" and (pod is None or lease.reason != REVOKED_BY_ADMIN)
    )
    if pod is None:
        return Plan(revoke=tuple((lease, POD_DELETED) for lease in held), delete=delete)
    blocked = _pod_reason(pod)
    blocked_held = _pod_reason(pod, holding=True)
    revoke: list[tuple[LeaseView, str]] = []
    wanted = {e.binding.name for e in entitlements(world, pod, naming, verdicts) if e.entitled}
    kept: set[str] = set()
    for lease in held:
        if blocked_held is not None:
            revoke.append((lease, blocked_held))
        elif (lease.namespace, lease.binding) not in verdicts and (
            lease.namespace,
            lease.binding,
        ) in world.bindings:
            # Its binding not judged yet (a replica that acts after a peering pause, before
            # it has seen the binding's bot): no reason to revoke; judged, it is planned again.
            kept.add(lease.binding)
        elif (problem := lease_problem(world, lease, naming)) is not None:
            revoke.append((lease, problem))
        elif lease.binding not in wanted:
            revoke.append((lease, _lost_reason(world, pod, lease, verdicts, naming)))
        else:
            kept.add(lease.binding)
    issue: list[BindingView] = []
    if blocked is None:
        issue = [
            binding
            for binding in world.bindings_in(pod.namespace)
            if binding.name in wanted and binding.name not in kept
        ]
    return Plan(tuple(issue), tuple(revoke), delete)


@dataclasses.dataclass(frozen=True)
class Entitlement:
    """One binding of a pod's namespace: whether it entitles the pod to a lease (reason
    ``Matched``) or why not, the pod's own state aside (:func:`plan_pod` checks that first)."""

    binding: BindingView
    reason: str

    @property
    def entitled(self) -> bool:
        return self.reason == matching.MATCHED


def entitlements(
    world: World,
    pod: identity.PodFacts,
    naming: identity.Naming,
    verdicts: Mapping[tuple[str, str], Verdict],
) -> list[Entitlement]:
    """Each binding of the pod's namespace with the reason it does or does not give the pod a
    lease: its subjects and selector (matching's reasons), its readiness (the verdict's), the
    bot's namespaceSelector now, and an administrator's revocation standing for this pod."""
    revoked_by_admin = {
        lease.binding
        for lease in world.leases_of_pod(pod.uid)
        if not lease.active and lease.reason == REVOKED_BY_ADMIN
    }
    found: list[Entitlement] = []
    for binding in world.bindings_in(pod.namespace):
        if binding.spec is None:
            reason = INVALID_SPEC
        else:
            reason = matching.select(binding.spec, binding.namespace, pod, naming).reason
        if reason == matching.MATCHED:
            verdict = verdicts.get(binding.key)
            if verdict is None:
                reason = BINDING_NOT_READY  # not judged yet
            elif not verdict.ready:
                reason = verdict.reason
            elif not bot_allows(
                world.bots.get(binding.bot or ""), world.namespaces.get(pod.namespace)
            ):
                reason = BOT_NOT_ALLOWED  # a verdict from before the bot's selector changed
            elif binding.name in revoked_by_admin:
                reason = REVOKED_BY_ADMIN
        found.append(Entitlement(binding, reason))
    return found


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
    blocked = _pod_reason(pod, holding=bool(kept))
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


def _lost_reason(
    world: World,
    pod: identity.PodFacts,
    lease: LeaseView,
    verdicts: Mapping[tuple[str, str], Verdict],
    naming: identity.Naming,
) -> str:
    binding = world.bindings.get((lease.namespace, lease.binding))
    if binding is None:
        return BINDING_DELETED
    if not binding_matches(binding, pod, naming):
        return NO_LONGER_MATCHED
    verdict = verdicts.get(binding.key)
    if verdict is not None and not verdict.bot_ready:
        return BOT_LOST
    return BINDING_NOT_READY


@dataclasses.dataclass(frozen=True)
class BindingCounts:
    matched: int
    active: int
    unmeshed: int
    other_mesh: int = 0


def count_binding(world: World, binding: BindingView, naming: identity.Naming) -> BindingCounts:
    matched = unmeshed = other_mesh = 0
    for pod in world.pods_in(binding.namespace):
        if pod.terminating or pod.phase in ("Succeeded", "Failed"):
            continue
        if binding_matches(binding, pod, naming):
            if pod.meshed:
                matched += 1
            elif pod.mesh_reason in identity.OTHER_MESH:
                other_mesh += 1
            else:
                unmeshed += 1
    active = sum(1 for lease in world.leases_of_binding(binding.key) if lease.active)
    return BindingCounts(matched, active, unmeshed, other_mesh)


def due_for_renewal(lease: LeaseView, ttl: datetime.timedelta, now: datetime.datetime) -> bool:
    """Renew once less than a third of the TTL is left (i.e. at about two thirds), and at
    once when the lease runs longer than the TTL from now (the TTL was shortened): the
    renewal then brings ``expiresAt`` down to now + TTL."""
    if not lease.active or lease.expires_at is None:
        return False
    left = lease.expires_at - now
    return left <= ttl / 3 or left > ttl


def shown_verdict(body: Mapping[str, Any], binding: BindingView, world: World) -> Verdict:
    """A binding's readiness as the operator last wrote it (its Ready and BotReady
    conditions, when they are about the binding's current generation); otherwise judged as
    the operator judges it, from the bot and the namespace ``world`` holds. For the parts
    that read bindings from the API instead of the operator's memory."""
    status = body.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = conditions.get(resources.READY)
    if ready is not None and status.get("observedGeneration") == binding.generation:
        bot_ready = conditions.get(resources.BOT_READY) or {}
        return Verdict(
            ready.get("status") == "True",
            str(ready.get("reason") or ""),
            str(ready.get("message") or ""),
            bot_ready.get("status") == "True",
            str(bot_ready.get("reason") or ""),
            str(bot_ready.get("message") or ""),
            status.get("botPHID"),
            bot_shown=bool(bot_ready),
        )
    bot = world.bots.get(binding.bot) if binding.bot else None
    return judge_binding(binding, bot, world.namespaces.get(binding.namespace))


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
