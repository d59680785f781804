"""``kubectl phabmesh check``: one line per part of the install, OK, WARN or FAIL.

Each ``judge_*`` function is pure (objects as the API returned them, None for a missing
one, and the time); :func:`run` gathers and judges. A WARN is something to look at that does
not stop credentials from working; a FAIL is something that does (exit code 1).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from phabmesh import apicalls, conduit, credentials, gatewayrole, identity, resources
from phabmesh.admission import certificates, tls
from phabmesh.clock import parse_time
from phabmesh.kube import KubeError
from phabmesh.kube.client import JSON
from phabmesh.kubectl import cluster, injection
from phabmesh.kubectl.output import Report
from phabmesh.leases import grants
from phabmesh.resources import resource_path
from phabmesh.settings import Settings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PEERING = "phabmesh"  # the ClusterKopfPeering of manifests/peering.yaml (`controller --peering`)
PEERING_CRD = "clusterkopfpeerings.kopf.dev"
PHABMESH_CRDS = (
    resources.BOT_PLURAL,
    resources.BINDING_PLURAL,
    resources.CREDENTIAL_PLURAL,
    resources.WEBHOOK_PLURAL,
)
LINKERD_GROUP = "policy.linkerd.io"
# manifests/linkerd-policy.yaml: (kind, plural, name) of each object, in phabmesh's namespace.
LINKERD_POLICY = (
    ("Server", "servers", "phabmesh-gateway"),
    ("Server", "servers", "phabmesh-issuer"),
    ("Server", "servers", "phabmesh-metrics"),
    ("MeshTLSAuthentication", "meshtlsauthentications", "phabmesh-meshed-clients"),
    ("NetworkAuthentication", "networkauthentications", "phabmesh-any-network"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-gateway-meshed"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-issuer-meshed"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-metrics-unauthenticated"),
)
COLUMNS = (("check", "check"), ("status", "status"), ("message", "message"))
# The docs section that says how to fix each check's WARN or FAIL (paths in the repository).
FIXES = {
    "config": "docs/settings.md",
    "crds": "docs/install.md#with-kustomize",
    "webhook": "docs/troubleshooting.md#a-pod-has-no-phabmesh-token-volume",
    injection.CHECK: injection.FIX,
    "peering": "docs/install.md#high-availability-kopf-peering-kept",
    "rbac": "docs/install.md#with-kustomize",
    "linkerd-policy": "docs/install.md#installing-and-uninstalling",
    "signing-keys": "docs/troubleshooting.md#the-credential-endpoint-answers",
    "phabricator (from here)": "docs/troubleshooting.md#phabricatorbot-ready",
    "phabricator (in-cluster)": "docs/troubleshooting.md#phabricatorbot-ready",
    "bots": "docs/troubleshooting.md#phabricatorbot-ready",
    "bindings": "docs/troubleshooting.md#phabricatorbinding-ready",
    "lease-writes": "docs/troubleshooting.md#a-pods-credential-lease-is-not-written",
    # check --pre
    "kubernetes": "docs/install.md#installing-and-uninstalling",
    "linkerd": "docs/install.md#installing-and-uninstalling",
    "existing": "docs/install.md#uninstalling",
    "permissions": "docs/install.md#installing-and-uninstalling",
}


@dataclasses.dataclass(frozen=True)
class Result:
    check: str
    status: str
    message: str


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), {})


def _served(crd: Mapping[str, Any]) -> list[str]:
    return [
        str(v["name"]) for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served")
    ]


def judge_crds(crds: Mapping[str, JSON | None]) -> Result:
    """phabmesh's CRDs: installed, Established, serving phabmesh's version."""
    problems, found = [], []
    for name, crd in crds.items():
        if crd is None:
            problems.append(f"{name} not installed")
            continue
        versions = _served(crd)
        if _condition(crd, "Established").get("status") != "True":
            problems.append(f"{name} not Established")
        elif resources.VERSION not in versions:
            problems.append(
                f"{name} serves {','.join(versions) or 'no version'}, not {resources.VERSION}"
            )
        else:
            found.append(f"{name.split('.')[0]} {','.join(versions)}")
    if problems:
        return Result("crds", FAIL, "; ".join(problems) + " (kubectl apply -f crds/)")
    return Result("crds", OK, ", ".join(found))


def judge_webhook(
    configuration: JSON | None,
    secret: JSON | None,
    name: str,
    secret_name: str,
    now: datetime.datetime,
) -> Result:
    """The MutatingWebhookConfiguration is there, each phabmesh webhook's caBundle is the CA of
    the operator's webhook Secret, and the serving certificate is not about to expire."""
    if configuration is None:
        return Result(
            "webhook",
            FAIL,
            f"MutatingWebhookConfiguration {name} not found (kubectl apply -k manifests/)",
        )
    hooks = [
        w
        for w in configuration.get("webhooks") or []
        if str(w.get("name", "")).endswith(tls.WEBHOOK_SUFFIX)
    ]
    if not hooks:
        return Result(
            "webhook",
            FAIL,
            f"MutatingWebhookConfiguration {name} has no *{tls.WEBHOOK_SUFFIX} webhook",
        )
    material = certificates.Material.from_secret(secret) if secret is not None else None
    if material is None:
        return Result(
            "webhook",
            FAIL,
            f"Secret {secret_name} is missing or unreadable: the "
            "operator creates it at start-up (is it running?)",
        )
    bundle = base64.b64encode(material.ca_cert).decode()
    stale = [
        str(w["name"]) for w in hooks if (w.get("clientConfig") or {}).get("caBundle") != bundle
    ]
    if stale:
        return Result(
            "webhook",
            FAIL,
            f"caBundle of {', '.join(stale)} is not the CA in Secret "
            f"{secret_name} (the operator repairs it within a minute while it runs)",
        )
    try:
        left = material.not_after - now
    except ValueError:
        return Result(
            "webhook", FAIL, f"the serving certificate in Secret {secret_name} is unreadable"
        )
    if left <= datetime.timedelta(0):
        return Result("webhook", FAIL, "the serving certificate has expired")
    if left <= certificates.RENEW_BEFORE:
        return Result(
            "webhook",
            WARN,
            f"the serving certificate expires in {left.days} days "
            "and is not renewed yet (the operator renews it 30 days ahead)",
        )
    return Result(
        "webhook",
        OK,
        f"{name}: caBundle matches Secret {secret_name}; "
        f"certificate valid for {left.days} more days",
    )


def judge_peering(crd: JSON | None, peering: JSON | None, now: datetime.datetime) -> Result:
    """kopf's ClusterKopfPeering ``phabmesh`` holds a live replica (one seen within its
    lifetime). Missing altogether: replicas run standalone, fine for one replica only."""
    if crd is None or peering is None:
        what = f"CRD {PEERING_CRD}" if crd is None else f"ClusterKopfPeering {PEERING}"
        return Result(
            "peering",
            WARN,
            f"{what} not found: the operator runs standalone "
            "(run one replica only, without --peering)",
        )
    live, dead = [], 0
    for peer, info in (peering.get("status") or {}).items():
        if not isinstance(info, Mapping):
            continue
        seen = parse_time(info.get("lastseen"))
        lifetime = datetime.timedelta(seconds=int(info.get("lifetime") or 60))
        if seen is not None and seen.tzinfo is None:
            seen = seen.replace(tzinfo=datetime.UTC)
        if seen is not None and seen + lifetime > now:
            live.append((int(info.get("priority") or 0), str(peer)))
        else:
            dead += 1
    if not live:
        return Result(
            "peering",
            FAIL,
            f"no live operator replica in ClusterKopfPeering {PEERING}"
            + (f" ({dead} expired)" if dead else ""),
        )
    acting = max(live)[1]
    return Result(
        "peering",
        OK,
        f"{len(live)} live replica(s) in ClusterKopfPeering {PEERING}; acting: {acting}",
    )


def judge_rbac(denied: Mapping[str, Sequence[apicalls.Call]], asked: int) -> Result:
    """Each call the operator and the gateway make is allowed to their ServiceAccounts."""
    problems = [
        f"phabmesh-{who} may not {verb} {resource}"
        + (f" {name}" if name else "")
        + (f" in {ns}" if ns else " cluster-wide")
        for who, calls in denied.items()
        for ns, _group, resource, verb, name in calls
    ]
    if problems:
        return Result("rbac", FAIL, "; ".join(problems))
    return Result("rbac", OK, f"all {asked} calls of the operator and the gateway are allowed")


def judge_linkerd(crds: Mapping[str, JSON | None], found: Mapping[str, bool]) -> Result:
    """Linkerd's policy objects of manifests/linkerd-policy.yaml; Linkerd's policy CRDs
    absent: not installed (a WARN: nothing limits who reaches the gateway but the network)."""
    if all(crd is None for crd in crds.values()):
        return Result(
            "linkerd-policy",
            WARN,
            f"not installed (no {LINKERD_GROUP} CRDs): "
            "Linkerd is not there to restrict who reaches phabmesh",
        )
    missing = [name for name, present in found.items() if not present]
    if missing:
        return Result(
            "linkerd-policy", FAIL, f"missing: {', '.join(missing)} (kubectl apply -k manifests/)"
        )
    return Result("linkerd-policy", OK, f"{len(found)} policy objects present")


def judge_keys(secret: JSON | None, name: str, now: datetime.datetime) -> Result:
    """The signing-key Secret reads as a key ring (never shows key material)."""
    if secret is None:
        return Result(
            "signing-keys",
            FAIL,
            f"Secret {name} not found: the operator creates it at start-up (is it running?)",
        )
    try:
        ring = credentials.KeyRing.from_secret_data(secret.get("data") or {})
    except credentials.KeyRingError as exc:
        return Result("signing-keys", FAIL, str(exc))
    age = now - ring.current.created_at
    return Result(
        "signing-keys",
        OK,
        f"{len(ring.keys)} key(s); current {ring.current.kid}, "
        f"{age.days}d{age.seconds // 3600}h old",
    )


def judge_phabricator(url: str, host: str | None, error: str | None) -> Result:
    """Phabricator as this machine reaches it (the admin's; not what the operator sees)."""
    label = "phabricator (from here)"
    if error is not None:
        return Result(label, WARN, f"conduit.ping to {url} from this machine failed: {error}")
    return Result(label, OK, f"conduit.ping to {url} from this machine answered {host!r}")


# A bot's Ready reasons whose check made no Conduit call: its token could not be read
# (phabmesh.controller.bots; not imported here, the plugin does without kopf).
NO_CALL = frozenset({"SecretMissing", "SecretKeyMissing", "InvalidSpec"})


def judge_phabricator_in_cluster(
    url: str, bots: Sequence[JSON], now: datetime.datetime, recheck: float
) -> Result:
    """Phabricator as the operator reaches it from inside the cluster: what its bot checks
    (each a Conduit call to ``url``) last found, and whether they are recent."""
    label = "phabricator (in-cluster)"
    if not bots:
        return Result(label, WARN, "no PhabricatorBot yet: no check shows the operator reaching it")
    down = [
        f"{(b.get('metadata') or {}).get('name')}: {_condition(b, resources.READY).get('message')}"
        for b in bots
        if _condition(b, resources.READY).get("reason") == "PhabricatorUnavailable"
    ]
    if down:
        return Result(label, FAIL, f"the operator cannot reach {url}: " + "; ".join(down[:3]))
    # A bot whose token could not be read was checked without any call to Phabricator.
    called = [b for b in bots if _condition(b, resources.READY).get("reason") not in NO_CALL]
    checked = [t for b in called if (t := parse_time((b.get("status") or {}).get("lastCheckedAt")))]
    if not checked and len(called) < len(bots):
        uncalled = [
            f"{(b.get('metadata') or {}).get('name')} "
            f"({_condition(b, resources.READY).get('reason')})"
            for b in bots
            if b not in called
        ]
        return Result(
            label,
            WARN,
            "no bot check called Phabricator, since no bot's token could be read: "
            + ", ".join(uncalled[:3])
            + (" ..." if len(uncalled) > 3 else ""),
        )
    if not checked:
        return Result(label, WARN, "no bot checked yet: is the operator running?")
    age = (now - max(checked)).total_seconds()
    if age > 2 * recheck + 60:
        return Result(
            label,
            WARN,
            f"the newest bot check is {int(age // 60)} min old (re-checks every "
            f"{int(recheck)} s): is the operator running?",
        )
    return Result(label, OK, f"the operator's bot checks reached {url} {int(age)} s ago")


def judge_config(configmap: JSON | None, error: str | None, settings: Settings | None) -> Result:
    if error is not None:
        return Result("config", FAIL, f"ConfigMap {cluster.CONFIGMAP}: {error}")
    assert settings is not None
    if configmap is None:
        return Result(
            "config",
            WARN,
            f"no ConfigMap {cluster.CONFIGMAP} in {settings.namespace}: defaults assumed",
        )
    if not settings.require_client_id:
        return Result(
            "config",
            WARN,
            f"ConfigMap {cluster.CONFIGMAP}: PHABMESH_REQUIRE_CLIENT_ID is false: a pod counts "
            "as meshed by its spec alone, which its author writes; set it true where Linkerd runs",
        )
    return Result(
        "config", OK, f"ConfigMap {cluster.CONFIGMAP}: Phabricator at {settings.phabricator_url}"
    )


def judge_ready(kind: str, objects: Sequence[JSON]) -> Result:
    """Bots or bindings whose Ready is not True (a WARN: each is a user's object)."""
    label = "bots" if kind == resources.BOT_KIND else "bindings"
    bad = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        ready = _condition(obj, resources.READY)
        if ready.get("status") != "True":
            where = f"{meta.get('namespace')}/" if meta.get("namespace") else ""
            bad.append(f"{where}{meta.get('name')} ({ready.get('reason') or 'not reconciled'})")
    if bad:
        return Result(
            label,
            WARN,
            f"{len(bad)} of {len(objects)} not Ready: "
            + ", ".join(bad[:10])
            + (" ..." if len(bad) > 10 else ""),
        )
    return Result(label, OK, f"{len(objects)} Ready")


WRITES_WINDOW = datetime.timedelta(minutes=10)  # how far back refused lease writes count


def judge_lease_writes(events: Sequence[JSON], now: datetime.datetime) -> Result:
    """Lease writes the API server refused lately (the operator's Warning Events on pods)."""
    recent = []
    for event in events:
        when = parse_time(event.get("lastTimestamp") or event.get("eventTime"))
        if when is not None and now - when <= WRITES_WINDOW:
            recent.append((when, event))
    if not recent:
        return Result("lease-writes", OK, "no lease write refused in the last 10 min")
    when, newest = max(recent, key=lambda pair: pair[0])
    obj = newest.get("involvedObject") or {}
    return Result(
        "lease-writes",
        FAIL,
        f"{len(recent)} pod(s) whose credential lease the API server refused to write in the "
        f"last 10 min; newest, pod {obj.get('namespace')}/{obj.get('name')}: "
        f"{newest.get('message')}",
    )


def _crd_path(name: str) -> str:
    return resource_path("apiextensions.k8s.io", "v1", "customresourcedefinitions", None, name)


def _storage_version(crd: JSON) -> str:
    versions = (crd.get("spec") or {}).get("versions") or []
    stored = [v for v in versions if v.get("storage")] or [v for v in versions if v.get("served")]
    return str(stored[0]["name"]) if stored else ""


async def _linkerd(session: cluster.Session, system: str) -> Result:
    plurals = sorted({plural for _, plural, _ in LINKERD_POLICY})
    crd_list = await asyncio.gather(
        *(session.find(_crd_path(f"{p}.{LINKERD_GROUP}")) for p in plurals)
    )
    crds = dict(zip(plurals, crd_list, strict=True))
    found: dict[str, bool] = {}
    for kind, plural, name in LINKERD_POLICY:
        crd = crds[plural]
        present = False
        if crd is not None:
            path = resource_path(LINKERD_GROUP, _storage_version(crd), plural, system, name)
            present = await session.find(path) is not None
        found[f"{kind}/{name}"] = present
    return judge_linkerd(crds, found)


async def _bot_secret_calls(
    session: cluster.Session, system: str, settings: Settings
) -> list[apicalls.Call]:
    """The gateway's watches of the bots' token Secrets, which the operator grants by name in
    Role phabmesh-gateway-secrets (phabmesh.gatewayrole) as the bots come."""
    bots = await session.items(resources.bot_path())
    own = {settings.webhook_secret, settings.signing_secret}
    names = gatewayrole.wanted((grants.bot_facts(bot) for bot in bots), own)
    return [(system, "", "secrets", verb, name) for name in names for verb in gatewayrole.VERBS]


async def _rbac(session: cluster.Session, system: str, settings: Settings) -> Result:
    denied: dict[str, list[apicalls.Call]] = {}
    asked = 0
    defaults = Settings()
    names = {
        defaults.signing_secret: settings.signing_secret,
        defaults.webhook_secret: settings.webhook_secret,
        defaults.webhook_configuration: settings.webhook_configuration,
    }
    for who, table in apicalls.CALLS.items():
        user = f"system:serviceaccount:{system}:phabmesh-{who}"
        groups = [
            "system:serviceaccounts",
            f"system:serviceaccounts:{system}",
            "system:authenticated",
        ]
        calls = list(apicalls.each(table, system, names))
        if who == "gateway":
            calls += await _bot_secret_calls(session, system, settings)
        asked += len(calls)
        allowed = await asyncio.gather(*(session.may(user, groups, call) for call in calls))
        denied[who] = [call for call, ok in zip(calls, allowed, strict=True) if not ok]
    return judge_rbac({who: calls for who, calls in denied.items() if calls}, asked)


async def _phabricator(url: str) -> Result:
    client = conduit.ConduitClient(url, timeout=(3.05, 10.0), attempts=1)
    try:
        host = await asyncio.to_thread(client.ping)
    except conduit.ConduitError as exc:
        return judge_phabricator(url, None, str(exc))
    finally:
        client.session.close()
    return judge_phabricator(url, host, None)


async def guarded(name: str, work: Any) -> Result:
    """A check that could not be made (the API server refused to answer) is a FAIL."""
    try:
        result: Result = await work
    except KubeError as exc:
        return Result(name, FAIL, f"could not check: {exc}")
    return result


async def run(session: cluster.Session, now: datetime.datetime) -> list[Result]:
    system = session.options.system
    results: list[Result] = []
    try:
        settings, configmap = await session.settings()
        results.append(judge_config(configmap, None, settings))
    except ValueError as exc:
        results.append(judge_config(None, str(exc), None))
        settings = Settings(namespace=system)

    async def crds() -> Result:
        names = [f"{plural}.{resources.GROUP}" for plural in PHABMESH_CRDS]
        found = await asyncio.gather(*(session.find(_crd_path(n)) for n in names))
        return judge_crds(dict(zip(names, found, strict=True)))

    async def webhook() -> Result:
        configuration, secret = await asyncio.gather(
            session.find(
                resource_path(
                    "admissionregistration.k8s.io",
                    "v1",
                    "mutatingwebhookconfigurations",
                    None,
                    settings.webhook_configuration,
                )
            ),
            session.find(resource_path("", "v1", "secrets", system, settings.webhook_secret)),
        )
        return judge_webhook(
            configuration, secret, settings.webhook_configuration, settings.webhook_secret, now
        )

    async def peering() -> Result:
        crd, obj = await asyncio.gather(
            session.find(_crd_path(PEERING_CRD)),
            session.find(resource_path("kopf.dev", "v1", "clusterkopfpeerings", None, PEERING)),
        )
        return judge_peering(crd, obj, now)

    async def keys() -> Result:
        path = resource_path("", "v1", "secrets", system, settings.signing_secret)
        return judge_keys(await session.find(path), settings.signing_secret, now)

    async def ready(kind: str, path: str) -> Result:
        return judge_ready(kind, await session.items(path))

    async def writes() -> Result:
        events = await session.items(
            resource_path("", "v1", "events"),
            fieldSelector=f"reason={resources.CREDENTIAL_WRITE_FAILED}",
        )
        return judge_lease_writes(events, now)

    async def in_cluster() -> Result:
        bots = await session.items(resources.bot_path())
        return judge_phabricator_in_cluster(
            settings.phabricator_url, bots, now, settings.bot_recheck_interval
        )

    async def injected() -> Result:
        bindings = await session.items(resources.binding_path(None))
        naming = identity.Naming(
            control_plane_namespace=settings.linkerd_namespace,
            trust_domain=settings.trust_domain,
        )
        status, message = await injection.check(session, bindings, naming)
        return Result(injection.CHECK, status, message)

    results += await asyncio.gather(
        guarded("crds", crds()),
        guarded("webhook", webhook()),
        guarded(injection.CHECK, injected()),
        guarded("peering", peering()),
        guarded("rbac", _rbac(session, system, settings)),
        guarded("linkerd-policy", _linkerd(session, system)),
        guarded("signing-keys", keys()),
        _phabricator(settings.phabricator_url),
        guarded("phabricator (in-cluster)", in_cluster()),
        guarded("bots", ready(resources.BOT_KIND, resources.bot_path())),
        guarded("bindings", ready(resources.BINDING_KIND, resources.binding_path(None))),
        guarded("lease-writes", writes()),
    )
    return results


def with_fix(result: Result) -> Result:
    """A WARN or FAIL names the docs section that says how to fix it."""
    fix = FIXES.get(result.check)
    if result.status == OK or fix is None:
        return result
    return dataclasses.replace(result, message=f"{result.message} (see {fix})")


def report(results: Sequence[Result]) -> Report:
    rows = [dataclasses.asdict(with_fix(r)) for r in results]
    failed = any(r.status == FAIL for r in results)
    return Report(COLUMNS, rows, document={"checks": rows, "ok": not failed}, exit_code=int(failed))
