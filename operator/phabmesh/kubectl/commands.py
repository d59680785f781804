"""``why``, ``who-can``, ``revoke`` and ``recheck``: gather from the API, decide with
phabmesh's own pure functions, answer as a :class:`~phabmesh.kubectl.output.Report`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

import structlog

from phabmesh import identity, logs, resources
from phabmesh.clock import format_time, utcnow
from phabmesh.kube import KubeError
from phabmesh.kube.client import JSON
from phabmesh.kubectl import cluster
from phabmesh.kubectl.output import Report
from phabmesh.leases import explain, grants
from phabmesh.leases.view import LeaseView
from phabmesh.resources import resource_path

log = structlog.get_logger("phabmesh.kubectl")


def naming_of(settings: Any) -> identity.Naming:
    return identity.Naming(settings.linkerd_namespace, settings.trust_domain)


# -- why --------------------------------------------------------------------------------------

WHY_COLUMNS = (
    ("namespace", "namespace"),
    ("pod", "pod"),
    ("credential", "credential"),
    ("reason", "reason"),
    ("message", "message"),
)


def why_report(
    explanation: explain.Explanation, pod: identity.PodFacts, naming: identity.Naming
) -> Report:
    row: dict[str, Any] = {
        "namespace": pod.namespace,
        "pod": pod.name,
        "uid": pod.uid,
        "identity": pod.identity(naming),
        "credential": explanation.holds,
        "reason": explanation.reason,
        "message": explanation.message,
        "leases": [
            {
                "name": lease.name,
                "binding": lease.binding,
                "bot": lease.bot,
                "expiresAt": format_time(lease.expires_at) if lease.expires_at else None,
            }
            for lease in explanation.leases
        ],
        "bindings": [
            {"name": e.binding.name, "bot": e.binding.bot, "reason": e.reason}
            for e in explanation.bindings
        ],
    }
    return Report(WHY_COLUMNS, [row], document=row)


async def why(session: cluster.Session, namespace: str, name: str) -> Report:
    settings, _ = await session.settings()
    naming = naming_of(settings)
    pod_body = await session.get(
        resource_path("", "v1", "pods", namespace, name), f'pods "{name}" in namespace {namespace}'
    )
    bindings, bots, leases, ns_body = await asyncio.gather(
        session.items(resources.binding_path(namespace)),
        session.items(resources.bot_path()),
        session.items(resources.lease_path(namespace)),
        session.find(resource_path("", "v1", "namespaces", None, namespace)),
    )
    pod = identity.PodFacts.from_pod(pod_body, naming)
    explanation = explain.explain_from_objects(
        pod,
        bindings,
        naming,
        bots=bots,
        namespace_labels=((ns_body or {}).get("metadata") or {}).get("labels") or {},
        leases=[LeaseView.from_body(body) for body in leases],
    )
    if explanation.reason == explain.ISSUE_PENDING:
        refused = await last_write_failure(session, namespace, pod.uid)
        if refused:
            explanation = dataclasses.replace(
                explanation,
                message=f"{explanation.message}, but the API server refused its last "
                f"write: {refused}",
            )
    return why_report(explanation, pod, naming)


async def last_write_failure(session: cluster.Session, namespace: str, uid: str) -> str | None:
    """The newest refused lease write the operator said on this pod (its Warning Event)."""
    found = await session.items(
        resource_path("", "v1", "events", namespace),
        fieldSelector=f"involvedObject.uid={uid},reason={resources.CREDENTIAL_WRITE_FAILED}",
    )
    if not found:
        return None
    newest = max(found, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    return f"{newest.get('message')} (at {newest.get('lastTimestamp') or newest.get('eventTime')})"


# -- who-can ----------------------------------------------------------------------------------

WHO_CAN_COLUMNS = (
    ("namespace", "namespace"),
    ("pod", "pod"),
    ("identity", "identity"),
    ("binding", "binding"),
    ("expires", "expiresAt"),
    ("credential", "lease"),
)


def holders(
    bot: str,
    leases: list[LeaseView],
    bindings: Mapping[tuple[str, str], grants.BindingFacts],
    bot_facts: grants.BotFacts | None,
    labels: Mapping[str, Mapping[str, str]],
    naming: identity.Naming,
    now: datetime.datetime,
) -> list[dict[str, Any]]:
    """The leases of ``bot`` that the credential endpoint and the gateway honour now: Active,
    not expired, and granted by their binding, the bot and the namespace as they are now
    (:func:`phabmesh.leases.grants.refusal`, the same judgement)."""
    rows = []
    for lease in sorted(leases, key=lambda x: (x.namespace, x.pod_name, x.binding)):
        if lease.bot != bot or not lease.active:
            continue
        if lease.expires_at is None or lease.expires_at <= now:
            continue
        binding = bindings.get((lease.namespace, lease.binding))
        if grants.refusal(lease, binding, bot_facts, labels.get(lease.namespace), naming):
            continue
        rows.append(
            {
                "namespace": lease.namespace,
                "pod": lease.pod_name,
                "podUID": lease.pod_uid,
                "identity": lease.identity,
                "binding": lease.binding,
                "expiresAt": format_time(lease.expires_at),
                "lease": lease.name,
            }
        )
    return rows


WHO_CAN_WEBHOOK_COLUMNS = (
    ("namespace", "namespace"),
    ("webhook", "webhook"),
    ("ready", "ready"),
    ("reason", "reason"),
)


def acting_webhooks(bot: str, webhooks: list[JSON]) -> list[dict[str, Any]]:
    """The PhabricatorWebhooks whose ``spec.harbormaster.botRef.name`` is ``bot``: the
    gateway acts as that bot (a Conduit call) when it checks one's build target. Webhooks
    without that field (Herald ones) are not about any bot."""
    rows = []
    for hook in webhooks:
        source = (hook.get("spec") or {}).get("harbormaster")
        ref = source.get("botRef") if isinstance(source, Mapping) else None
        if not isinstance(ref, Mapping) or ref.get("name") != bot:
            continue
        meta = hook.get("metadata") or {}
        conditions = (hook.get("status") or {}).get("conditions") or []
        ready: Mapping[str, Any] = next(
            (c for c in conditions if c.get("type") == resources.READY), {}
        )
        rows.append(
            {
                "namespace": str(meta.get("namespace")),
                "webhook": str(meta.get("name")),
                "ready": resources.condition_true(hook, resources.READY),
                "reason": ready.get("reason") or "NotChecked",
            }
        )
    return sorted(rows, key=lambda r: (r["namespace"], r["webhook"]))


async def who_can(session: cluster.Session, bot: str, now: datetime.datetime) -> Report:
    settings, _ = await session.settings()
    bot_body = await session.get(resources.bot_path(bot), f'phabricatorbots "{bot}"')
    lease_bodies, binding_bodies, namespaces, webhooks = await asyncio.gather(
        session.items(
            resources.lease_path(None),
            labelSelector=f"phabmesh.io/bot={resources.label_value(bot)}",
        ),
        session.items(resources.binding_path(None)),
        session.items(resource_path("", "v1", "namespaces")),
        session.items(resources.webhook_path(None)),
    )
    bindings = {
        (str(b["metadata"]["namespace"]), str(b["metadata"]["name"])): grants.binding_facts(b)
        for b in binding_bodies
    }
    labels = {str(n["metadata"]["name"]): grants.namespace_labels(n) for n in namespaces}
    rows = holders(
        bot,
        [LeaseView.from_body(b) for b in lease_bodies],
        bindings,
        grants.bot_facts(bot_body),
        labels,
        naming_of(settings),
        now,
    )
    hooks = acting_webhooks(bot, webhooks)
    return Report(
        WHO_CAN_COLUMNS,
        rows,
        document={"bot": bot, "holders": rows, "webhooks": hooks},
        empty=f"No pod holds a credential for PhabricatorBot {bot}, and no "
        "PhabricatorWebhook acts as it.",
        more=[(WHO_CAN_WEBHOOK_COLUMNS, hooks)],
    )


# -- revoke -----------------------------------------------------------------------------------

REVOKE_COLUMNS = (
    ("namespace", "namespace"),
    ("credential", "lease"),
    ("pod", "pod"),
    ("binding", "binding"),
    ("bot", "bot"),
    ("result", "result"),
)
REVOKED_EVENT = "CredentialRevoked"


def revocation_ops(lease: LeaseView, now: datetime.datetime) -> list[JSON]:
    """The JSON patch of the lease (its status; leases have no status subresource): only this
    lease (its UID), only while Active, to Revoked with reason RevokedByAdmin, phabmesh's own
    message and ``now`` (the API server's time): the one write manifests/lease-policy.yaml
    lets an administrator make."""
    revoked = {
        "phase": resources.REVOKED,
        "reason": resources.REVOKED_BY_ADMIN,
        "revokedAt": format_time(now),
        "message": resources.ADMIN_REVOCATION_MESSAGE,
    }
    return [
        {"op": "test", "path": "/metadata/uid", "value": lease.uid},
        {"op": "test", "path": "/status/phase", "value": resources.ACTIVE},
        *({"op": "add", "path": f"/status/{k}", "value": v} for k, v in revoked.items()),
    ]


def parse_target(words: list[str]) -> tuple[str, str]:
    """``pod/NAME``, ``binding/NAME``, or the same as two words: ("pod"|"binding", NAME)."""
    kinds = {
        "pod": "pod",
        "pods": "pod",
        "po": "pod",
        "binding": "binding",
        "bindings": "binding",
        "phabricatorbinding": "binding",
        "phabricatorbindings": "binding",
    }
    if len(words) == 1 and "/" in words[0]:
        kind, _, name = words[0].partition("/")
    elif len(words) == 2:
        kind, name = words
    else:
        raise ValueError("give what to revoke as pod/NAME or binding/NAME")
    kind = kinds.get(kind.lower().split(".")[0], "")
    if not kind or not name:
        raise ValueError("give what to revoke as pod/NAME or binding/NAME")
    return kind, name


DRY_RUNS = ("client", "server")


async def revoke(
    session: cluster.Session,
    namespace: str,
    kind: str,
    name: str,
    now: datetime.datetime,
    dry_run: str | None = None,
) -> Report:
    """Revoke the Active leases of a pod or a binding. ``dry_run`` as kubectl's: "client"
    lists what would be revoked and writes nothing; "server" sends each revocation with
    ``dryRun=All``, so that RBAC and the lease policy judge it and nothing is stored (no
    Event either)."""
    if kind == "pod":
        target = await session.get(
            resource_path("", "v1", "pods", namespace, name),
            f'pods "{name}" in namespace {namespace}',
        )
        uid = str(target["metadata"]["uid"])
        ref: JSON = {"apiVersion": "v1", "kind": "Pod"}

        def chosen(lease: LeaseView) -> bool:
            return lease.pod_uid == uid
    else:
        target = await session.get(
            resources.binding_path(namespace, name),
            f'phabricatorbindings "{name}" in namespace {namespace}',
        )
        ref = {"apiVersion": resources.API_VERSION, "kind": resources.BINDING_KIND}

        def chosen(lease: LeaseView) -> bool:
            return lease.binding == name

    ref.update(namespace=namespace, name=name, uid=str(target["metadata"]["uid"]))
    leases = [
        lease
        for lease in map(LeaseView.from_body, await session.items(resources.lease_path(namespace)))
        if lease.active and chosen(lease)
    ]
    if not leases:
        raise cluster.Missing(f"{kind} {namespace}/{name} holds no Active credential")
    user = await session.whoami() or "unknown"
    message = f"revoked by {user} (kubectl phabmesh revoke {kind}/{name})"
    rows = []
    # revokedAt is the API server's time (the policy checks it against the write's): this
    # machine's clock corrected by the server's.
    skew = await session.clock_skew()
    params = {"fieldManager": cluster.COMPONENT}  # the policy reads its stamp
    if dry_run == "server":
        params["dryRun"] = "All"
    for lease in sorted(leases, key=lambda x: x.name):
        if dry_run == "client":
            rows.append(_revoked_row(lease, "would be revoked (dry run)"))
            continue
        try:
            await session.client.json_patch(
                resources.lease_path(lease.namespace, lease.name),
                revocation_ops(lease, utcnow() + skew),
                params=params,
            )
            result = "revoked" if dry_run is None else "would be revoked (server dry run)"
        except KubeError as exc:
            result = f"failed: {exc.message or exc.reason}"
        if dry_run is not None:
            rows.append(_revoked_row(lease, result))
            continue
        log.info(
            "lease_revoked" if result == "revoked" else "lease_revocation_failed",
            **{
                logs.NAMESPACE: lease.namespace,
                logs.POD: lease.pod_name,
                logs.BINDING: lease.binding,
                logs.BOT: lease.bot,
                logs.LEASE: lease.name,
                logs.REASON: resources.REVOKED_BY_ADMIN,
            },
            user=user,
            result=result,
        )
        if result == "revoked":
            pod_ref: JSON = {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": lease.namespace,
                "name": lease.pod_name,
                "uid": lease.pod_uid,
            }
            await _event(
                session,
                pod_ref,
                f"credential {lease.name} for PhabricatorBot {lease.bot} {message}",
                now,
            )
        rows.append(_revoked_row(lease, result))
    if dry_run is not None:
        failed = any(row["result"].startswith("failed") for row in rows)
        return Report(REVOKE_COLUMNS, rows, exit_code=int(failed))
    done = sum(1 for row in rows if row["result"] == "revoked")
    if kind == "binding" and done:
        await _event(session, ref, f"{done} credential(s) of this binding {message}", now)
    return Report(REVOKE_COLUMNS, rows, exit_code=0 if done == len(rows) else 1)


def _revoked_row(lease: LeaseView, result: str) -> dict[str, Any]:
    return {
        "namespace": lease.namespace,
        "lease": lease.name,
        "pod": lease.pod_name,
        "binding": lease.binding,
        "bot": lease.bot,
        "result": result,
    }


async def _event(session: cluster.Session, ref: JSON, message: str, now: datetime.datetime) -> None:
    """The revocation's Event; one that cannot be posted is logged (the revocation stands)."""
    try:
        await session.event(ref, REVOKED_EVENT, message, now, "Warning")
    except KubeError as exc:
        log.warning("event_post_failed", reason=REVOKED_EVENT, error=str(exc))


# -- recheck ----------------------------------------------------------------------------------


async def recheck(session: cluster.Session, bot: str, now: datetime.datetime) -> Report:
    await session.get(resources.bot_path(bot), f'phabricatorbots "{bot}"')
    stamp = now.astimezone(datetime.UTC).isoformat(timespec="microseconds")
    await session.client.merge_patch(
        resources.bot_path(bot),
        {"metadata": {"annotations": {resources.RECHECK_ANNOTATION: stamp}}},
    )
    row = {"bot": bot, "requestedAt": stamp, "result": "recheck requested"}
    return Report((("bot", "bot"), ("requested", "requestedAt"), ("result", "result")), [row])
