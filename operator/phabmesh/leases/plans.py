"""Lease plans over a :class:`World`: which leases a pod should hold (:func:`plan_pod`, over
each binding's :func:`entitlements`), why one goes, and when one is due for renewal.

Gather (the world, kept by watch events), decide (here: no I/O), write (the writer). Each
function answers one question and returns plain values.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from phabmesh import identity, matching
from phabmesh.leases import grants
from phabmesh.leases.readiness import Verdict, binding_matches, bot_allows
from phabmesh.leases.reasons import (
    BINDING_DELETED,
    BINDING_NOT_READY,
    BOT_LOST,
    BOT_NOT_ALLOWED,
    INVALID_SPEC,
    NO_LONGER_MATCHED,
    NOT_MESHED,
    NOT_RUNNING,
    POD_DELETED,
    POD_FAILED,
    POD_SUCCEEDED,
    POD_TERMINATING,
    REVOKED_BY_ADMIN,
)
from phabmesh.leases.view import LeaseView
from phabmesh.leases.world import BindingView, World


def pod_reason(pod: identity.PodFacts, *, holding: bool = False) -> str | None:
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


def idle(world: World, pod: identity.PodFacts) -> bool:
    """A pod that may hold no lease and holds none (most unmeshed pods): its plan is empty
    whatever its namespace's bindings say, so their verdicts need not be read for it."""
    return pod_reason(pod) is not None and not world.leases_of_pod(pod.uid)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do about one pod: which bindings to issue for, which leases to revoke, and
    which leases, Revoked already, are still to be deleted (a delete that failed)."""

    issue: tuple[BindingView, ...] = ()
    revoke: tuple[tuple[LeaseView, str], ...] = ()
    delete: tuple[LeaseView, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.issue or self.revoke or self.delete)


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
    if idle(world, pod):
        return Plan()  # most unmeshed pods: no binding needs matching
    blocked = pod_reason(pod)
    blocked_held = pod_reason(pod, holding=True)
    revoke: list[tuple[LeaseView, str]] = []
    wanted = {e.binding.name for e in entitlements(world, pod, naming, verdicts) if e.entitled}
    kept: set[str] = set()
    for lease in held:
        slot = (lease.namespace, lease.binding)
        if blocked_held is not None:
            revoke.append((lease, blocked_held))
        elif (problem := lease_problem(world, lease, naming)) is not None:
            revoke.append((lease, problem))
        elif slot not in verdicts and slot in world.bindings:
            # Its binding's status not written since its spec changed: no reason to revoke
            # (the checks above stand); once it is, the pod is planned again.
            kept.add(lease.binding)
        elif lease.binding not in wanted:
            revoke.append((lease, _lost_reason(world, pod, lease, verdicts, naming)))
        else:
            kept.add(lease.binding)
    issue: list[BindingView] = []
    if blocked is None:
        # And the bot's own status still usable: its binding's status is written after it,
        # and a pod planned in between is not given a lease of a bot known to be refused.
        issue = [
            binding
            for binding in world.bindings_in(pod.namespace)
            if binding.name in wanted
            and binding.name not in kept
            and _bot_usable(world, binding.bot)
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


def _bot_usable(world: World, name: str | None) -> bool:
    bot = world.bots.get(name or "")
    return bot is not None and bot.ready


def due_for_renewal(lease: LeaseView, ttl: datetime.timedelta, now: datetime.datetime) -> bool:
    """Renew once less than a third of the TTL is left (i.e. at about two thirds), and at
    once when the lease runs longer than the TTL from now (the TTL was shortened): the
    renewal then brings ``expiresAt`` down to now + TTL."""
    if not lease.active or lease.expires_at is None:
        return False
    left = lease.expires_at - now
    return left <= ttl / 3 or left > ttl
