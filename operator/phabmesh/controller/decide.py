"""Pure lease and readiness decisions over the controller's :class:`World`.

Gather (the world, kept by watch events), decide (here: no I/O), write (the
writer). Each function answers one question and returns plain values.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping

from phabmesh import identity, matching, resources
from phabmesh.controller.world import BindingView, BotView, World
from phabmesh.lease import LeaseView

# Binding Ready / BotReady reasons.
READY = "Ready"  # the bot is Ready and may be used from this namespace
INVALID_SPEC = "InvalidSpec"  # the spec could not be parsed (should be stopped by the CRD)
INVALID_SUBJECTS = "InvalidSubjects"  # identities or identityRefs make no sense together
BOT_NOT_FOUND = "BotNotFound"  # spec.botRef names no PhabricatorBot
BOT_NOT_READY = "BotNotReady"  # the bot exists but its Ready condition is not True
NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"  # the bot's namespaceSelector excludes us

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


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A binding's readiness: the Ready and BotReady conditions' content."""

    ready: bool
    reason: str
    message: str
    bot_ready: bool
    bot_reason: str
    bot_message: str
    bot_phid: str | None = None


def judge_binding(
    binding: BindingView, bot: BotView | None, namespace_labels: Mapping[str, str] | None
) -> Verdict:
    if binding.spec is None:
        message = "; ".join(binding.problems) or "spec could not be read"
        return Verdict(False, INVALID_SPEC, message, False, INVALID_SPEC, message)
    problems = matching.validate_subjects(binding.spec, binding.namespace)
    if bot is None:
        msg = f'PhabricatorBot "{binding.bot}" does not exist'
        verdict = Verdict(False, BOT_NOT_FOUND, msg, False, BOT_NOT_FOUND, msg)
    elif not bot.ready:
        msg = f'PhabricatorBot "{bot.name}" is not Ready ({bot.reason})'
        verdict = Verdict(False, BOT_NOT_READY, msg, False, bot.reason, msg, bot.phid)
    else:
        bot_msg = f'PhabricatorBot "{bot.name}" is Ready'
        selector = bot.spec.namespace_selector if bot.spec else None
        if not matching.selector_matches(selector, namespace_labels or {}):
            msg = (
                f'namespace "{binding.namespace}" is not allowed by the namespaceSelector '
                f'of PhabricatorBot "{bot.name}"'
            )
            verdict = Verdict(False, NAMESPACE_NOT_ALLOWED, msg, True, READY, bot_msg, bot.phid)
        else:
            verdict = Verdict(
                True,
                READY,
                "credentials are issued to matching pods",
                True,
                READY,
                bot_msg,
                bot.phid,
            )
    if problems:
        message = "; ".join(problems)
        return dataclasses.replace(verdict, ready=False, reason=INVALID_SUBJECTS, message=message)
    return verdict


def _pod_reason(pod: identity.PodFacts) -> str | None:
    """Why this pod may hold no lease at all, or None when it may."""
    if pod.terminating:
        return POD_TERMINATING
    if pod.phase == "Succeeded":
        return POD_SUCCEEDED
    if pod.phase == "Failed":
        return POD_FAILED
    if pod.phase != "Running":
        return NOT_RUNNING
    if not pod.meshed:
        return NOT_MESHED
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do about one pod: which bindings to issue for, which leases to revoke."""

    issue: tuple[BindingView, ...] = ()
    revoke: tuple[tuple[LeaseView, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.issue or self.revoke)


def binding_matches(binding: BindingView, pod: identity.PodFacts, naming: identity.Naming) -> bool:
    """The binding's subjects and selector pick this pod (meshed or not)."""
    return binding.spec is not None and matching.matches(
        binding.spec, binding.namespace, pod, naming
    )


def plan_pod(
    world: World,
    pod_uid: str,
    naming: identity.Naming,
    verdicts: Mapping[tuple[str, str], Verdict],
) -> Plan:
    """Leases to create and to revoke so that ``pod_uid`` holds exactly what it should."""
    pod = world.pods.get(pod_uid)
    held = {lease.binding: lease for lease in world.leases_of_pod(pod_uid) if lease.active}
    if pod is None:
        return Plan(revoke=tuple((lease, POD_DELETED) for lease in held.values()))
    blocked = _pod_reason(pod)
    issue: list[BindingView] = []
    revoke: list[tuple[LeaseView, str]] = []
    wanted: set[str] = set()
    for binding in world.bindings_in(pod.namespace):
        if not binding_matches(binding, pod, naming):
            continue
        verdict = verdicts.get(binding.key)
        if verdict is None or not verdict.ready:
            continue
        wanted.add(binding.name)
        if blocked is None and binding.name not in held:
            issue.append(binding)
    for name, lease in held.items():
        if blocked is not None:
            revoke.append((lease, blocked))
        elif name not in wanted:
            revoke.append((lease, _lost_reason(world, pod, lease, verdicts, naming)))
    return Plan(tuple(issue), tuple(revoke))


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


def count_binding(world: World, binding: BindingView, naming: identity.Naming) -> BindingCounts:
    matched = unmeshed = 0
    for pod in world.pods_in(binding.namespace):
        if pod.terminating or pod.phase in ("Succeeded", "Failed"):
            continue
        if binding_matches(binding, pod, naming):
            if pod.meshed:
                matched += 1
            else:
                unmeshed += 1
    active = sum(1 for lease in world.leases_of_binding(binding.key) if lease.active)
    return BindingCounts(matched, active, unmeshed)


def due_for_renewal(lease: LeaseView, ttl: datetime.timedelta, now: datetime.datetime) -> bool:
    """Renew once less than a third of the TTL is left (i.e. at about two thirds)."""
    if not lease.active or lease.expires_at is None:
        return False
    return lease.expires_at - now <= ttl / 3
