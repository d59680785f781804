"""A binding's readiness over a :class:`World`: its Ready and BotReady conditions
(:func:`judge_binding`, :class:`Verdict`), whether a bot allows a namespace, and the pods and
leases a binding counts.

Pure: no I/O. The controller's Bindings reconciler writes the verdicts in the bindings'
status; lease plans, ``kubectl phabmesh`` and the credential endpoint read them back
(:func:`status_verdicts`, :func:`shown_verdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from phabmesh import identity, matching, resources
from phabmesh.leases.reasons import (
    BOT_NOT_ALLOWED,
    BOT_NOT_READY,
    INVALID_SPEC,
    INVALID_SUBJECTS,
    READY,
)
from phabmesh.leases.world import NOT_CHECKED, BindingView, BotView, Key, World


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


def binding_matches(binding: BindingView, pod: identity.PodFacts, naming: identity.Naming) -> bool:
    """The binding's subjects and selector pick this pod (meshed or not)."""
    return binding.spec is not None and matching.matches(
        binding.spec, binding.namespace, pod, naming
    )


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


def status_verdict(status: Mapping[str, Any], generation: int) -> Verdict | None:
    """A binding's readiness as the operator last wrote it in ``status`` (its Ready and
    BotReady conditions and botPHID), or None when the status is not about ``generation``
    (not judged yet since the spec last changed)."""
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    ready = conditions.get(resources.READY)
    if ready is None or status.get("observedGeneration") != generation:
        return None
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


def status_verdicts(world: World, namespace: str) -> dict[Key, Verdict]:
    """The readiness the statuses of the namespace's bindings show (those judged since their
    spec last changed): what lease plans read. The controller's Bindings reconciler writes
    them; the controller's Leases reconciler, the credential endpoint and ``kubectl phabmesh``
    read them back, so that all of them go by the same readiness."""
    found: dict[Key, Verdict] = {}
    for binding in world.bindings_in(namespace):
        verdict = status_verdict(binding.status, binding.generation)
        if verdict is not None:
            found[binding.key] = verdict
    return found


def shown_verdict(body: Mapping[str, Any], binding: BindingView, world: World) -> Verdict:
    """A binding's readiness as the operator last wrote it (:func:`status_verdict`);
    otherwise judged as the operator judges it, from the bot and the namespace ``world``
    holds. For the parts that explain a binding read from the API."""
    shown = status_verdict(body.get("status") or {}, binding.generation)
    if shown is not None:
        return shown
    bot = world.bots.get(binding.bot) if binding.bot else None
    return judge_binding(binding, bot, world.namespaces.get(binding.namespace))


def of_bot(bot: BotView) -> tuple[bool, str, str | None]:
    """What a bot's bindings are judged by: the readiness, reason and PHID its status shows.
    A change of it has its bindings judged again."""
    return (bot.ready, bot.reason, bot.phid)


def of_binding(binding: BindingView) -> Verdict | None:
    """The readiness a binding's status shows, which lease plans read (None: not judged
    since its spec last changed). A change of it has the binding's pods planned again."""
    return status_verdict(binding.status, binding.generation)
