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
import urllib.parse
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
from phabmesh.settings import DEPRECATED, PREFIX, Settings

OK, WARN, FAIL = "OK", "WARN", "FAIL"
PEERING = "phabmesh"  # the ClusterKopfPeering of manifests/peering.yaml (`operator --peering`)
PEERING_CRD = "clusterkopfpeerings.kopf.dev"
PHABMESH_CRDS = (
    resources.BOT_PLURAL,
    resources.BINDING_PLURAL,
    resources.CREDENTIAL_PLURAL,
    resources.WEBHOOK_PLURAL,
)
LINKERD_GROUP = "policy.linkerd.io"
# The credential endpoint's Service (manifests/operator.yaml), and its former name: a Service
# still there, deprecated as the address agents call.
ENDPOINT_SERVICE = "phabmesh-endpoint"
OLD_ENDPOINT_SERVICE = "phabmesh-issuer"
# manifests/linkerd-policy.yaml: (kind, plural, name) of each object, in phabmesh's namespace.
LINKERD_POLICY = (
    ("Server", "servers", "phabmesh-gateway"),
    ("Server", "servers", "phabmesh-gateway-hooks"),
    ("Server", "servers", "phabmesh-endpoint"),
    ("Server", "servers", "phabmesh-metrics"),
    ("MeshTLSAuthentication", "meshtlsauthentications", "phabmesh-meshed-clients"),
    ("NetworkAuthentication", "networkauthentications", "phabmesh-any-network"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-gateway-meshed"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-gateway-hooks-meshed"),
    ("AuthorizationPolicy", "authorizationpolicies", "phabmesh-endpoint-meshed"),
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
    "phabricatorwebhooks": "docs/webhooks.md#troubleshooting",
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


def _names_service(url: str, service: str) -> bool:
    """Whether ``url``'s host is the Service ``service`` (``name``, ``name.ns``, ``….svc…``)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    return host.split(".")[0] == service


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
    data = configmap.get("data") or {}
    renamed = [
        f"{old} (now {PREFIX}{DEPRECATED[old].upper()})" for old in DEPRECATED if old in data
    ]
    warnings = []
    if renamed:
        warnings.append(
            f"deprecated names, still read: {', '.join(renamed)}; set the new names instead"
        )
    if _names_service(settings.injected_credential_endpoint, OLD_ENDPOINT_SERVICE):
        warnings.append(
            "PHABMESH_INJECTED_CREDENTIAL_ENDPOINT names the deprecated Service "
            f"{OLD_ENDPOINT_SERVICE}: pods injected from now on call it; name "
            f"{ENDPOINT_SERVICE} instead (http://{ENDPOINT_SERVICE}.{settings.namespace}.svc:8443)"
        )
    if warnings:
        return Result("config", WARN, f"ConfigMap {cluster.CONFIGMAP}: {'; '.join(warnings)}")
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


# -- PhabricatorWebhooks ----------------------------------------------------------------------

HOOKS = "phabricatorwebhooks"
HOOKS_PAGE = 250  # webhooks looked at, at most (the first page of the list)
HOOKS_SHOWN = 10  # webhooks named per finding in the line
GATEWAY_ACCOUNT = "phabmesh-gateway"  # manifests/gateway.yaml, charts/phabmesh: its ServiceAccount
# What the gateway asks of a webhook's key Secret (a watch of it, by name: gateway/state.py).
GATEWAY_KEY_VERBS = ("list", "watch")
DEFAULT_HOOK_KEY = "hmacKey"  # spec.herald.secretRef.key's default (crds/phabricatorwebhooks.yaml)


def hook_key_secret(hook: Mapping[str, Any]) -> tuple[str, str] | None:
    """(Secret name, key) of what the gateway reads for a webhook, from the object as the API
    server returned it: a Herald webhook's HMAC key, or a Harbormaster build step's basic
    credential (its ``password``); None for a webhook without one (a build step without a
    credential, or an unreadable spec)."""
    spec = hook.get("spec") or {}
    ref = ((spec.get("herald") or {}).get("secretRef")) or {}
    key = str(ref.get("key") or DEFAULT_HOOK_KEY) if isinstance(ref, Mapping) else ""
    if not ref:
        ref = ((spec.get("harbormaster") or {}).get("credentialSecretRef")) or {}
        key = "password"
    name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not name:
        return None
    return name, key


def _is_build_step(hook: Mapping[str, Any]) -> bool:
    return bool((hook.get("spec") or {}).get("harbormaster"))


def hook_target(hook: Mapping[str, Any]) -> tuple[str, int] | None:
    """(Service, port) a webhook forwards to; None when its spec does not say."""
    target = (hook.get("spec") or {}).get("target") or {}
    if not isinstance(target, Mapping):
        return None
    service, port = target.get("service"), target.get("port")
    if not isinstance(service, str) or not service or not isinstance(port, int):
        return None
    return service, port


def ready_endpoints(service: JSON | None, port: int, slices: Sequence[JSON]) -> int:
    """The ready endpoints that serve ``port`` of ``service`` in its EndpointSlices (an
    endpoint with no ``ready`` condition counts as ready, as Kubernetes says)."""
    if service is None:
        return 0
    names = {
        str(p.get("name") or "")
        for p in (service.get("spec") or {}).get("ports") or []
        if p.get("port") == port
    }
    if not names:
        return 0
    count = 0
    for piece in slices:
        served = {str(p.get("name") or "") for p in piece.get("ports") or []}
        if not served & names:
            continue
        count += sum(
            1
            for endpoint in piece.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready") is not False
        )
    return count


def _hook_fix(reason: str, hook: Mapping[str, Any], system: str) -> str:
    """What to do about a webhook that is not Ready, by its reason."""
    ns = (hook.get("metadata") or {}).get("namespace")
    secret = hook_key_secret(hook)
    target = hook_target(hook)
    s_name, s_key = secret or ("<secret>", DEFAULT_HOOK_KEY)
    service, port = target or ("<service>", 0)
    step = _is_build_step(hook)
    verbs = "get, list, watch"
    bot = (((hook.get("spec") or {}).get("harbormaster") or {}).get("botRef") or {}).get("name")
    fixes = {
        resources.HOOK_SECRET_FORBIDDEN: (
            f"in {ns}, a Role granting get and patch on Secret {s_name} bound to "
            f"ServiceAccount {system}/phabmesh-operator, and one granting list and watch on it "
            f"bound to {system}/{GATEWAY_ACCOUNT}"
            if step
            else f"in {ns}, a Role granting {verbs} on Secret {s_name} bound to "
            f"ServiceAccounts {system}/phabmesh-operator and {system}/{GATEWAY_ACCOUNT}"
        ),
        resources.HOOK_SECRET_MISSING: (
            f"create it empty (phabmesh fills it): kubectl -n {ns} create secret generic {s_name}"
            if step
            else f"create it: kubectl -n {ns} create secret generic {s_name} "
            f'--from-literal={s_key}="$KEY"'
        ),
        resources.HOOK_KEY_MISSING: (
            f"grant phabmesh patch on Secret {s_name} (it generates username and password), "
            "or put both there"
            if step
            else f"put the webhook's HMAC key under {s_key} in Secret {s_name}"
        ),
        resources.HOOK_BOT_MISSING: f"create PhabricatorBot {bot}, or name another in botRef",
        resources.HOOK_BOT_NOT_ALLOWED: (
            f"label namespace {ns} as PhabricatorBot {bot}'s namespaceSelector asks, or name "
            "a bot meant for it"
        ),
        resources.HOOK_BOT_NOT_READY: f"kubectl describe phabricatorbot {bot} says why",
        resources.HOOK_SERVICE_MISSING: (
            f"create Service {service} in {ns}, or name an existing one in spec.target.service"
        ),
        resources.HOOK_PORT_MISSING: (
            f"add port {port} to Service {service}, or name one of its ports in spec.target.port"
        ),
        resources.HOOK_SERVICE_UNSUPPORTED: (
            "name a Service with a selector of this namespace's pods in spec.target.service"
        ),
        resources.HOOK_INVALID_SPEC: "correct the spec (kubectl describe says what is wrong)",
        resources.HOOK_CHECK_FAILED: "the operator could not read the API server: see its log",
    }
    return fixes.get(reason, "is the operator running?")


def _hook_name(hook: Mapping[str, Any]) -> str:
    meta = hook.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _first(items: Sequence[str], prefix: str = "") -> str:
    """The first :data:`HOOKS_SHOWN` of ``items`` after ``prefix``; "" for none."""
    if not items:
        return ""
    left = len(items) - HOOKS_SHOWN
    return prefix + "; ".join(items[:HOOKS_SHOWN]) + (f"; and {left} more" if left > 0 else "")


def _not_ready(hook: Mapping[str, Any], system: str) -> str:
    """A webhook that is not Ready: its reason, its message and the fix."""
    ready = _condition(hook, resources.READY)
    if ready.get("status") == "True":  # for an earlier generation of its spec
        reason, message = "NotChecked", "not checked since its spec changed"
    else:
        reason = str(ready.get("reason") or "NotChecked")
        message = str(ready.get("message") or "not checked yet")
    return f"{_hook_name(hook)} {reason}: {message} (fix: {_hook_fix(reason, hook, system)})"


def judge_webhooks(
    hooks: Sequence[JSON],
    denied: Mapping[str, Sequence[str]],
    endpoints: Mapping[str, int],
    system: str,
    *,
    more: int = 0,
    unasked: str | None = None,
) -> Result:
    """PhabricatorWebhooks: each one not Ready (its reason, message and fix: a WARN, it is a
    user's object); each Ready one whose key Secret the gateway's ServiceAccount may not
    list and watch (``denied``: the verbs refused, by namespace/name; a FAIL: the operator
    judged it Ready with its own access, but the gateway refuses every delivery); each Ready
    one whose target Service has no ready endpoint (``endpoints``, by namespace/name; a
    WARN: deliveries get 502). ``more``: webhooks past the ones listed; ``unasked``: why
    the gateway's access could not be asked (the caller may not create SubjectAccessReviews).
    """
    if not hooks:
        return Result(HOOKS, OK, "no PhabricatorWebhook in any namespace")
    not_ready, unreadable, no_endpoint = [], [], []
    for hook in hooks:
        name = _hook_name(hook)
        if not resources.condition_true(hook, resources.READY):
            not_ready.append(_not_ready(hook, system))
            continue
        refused = denied.get(name)
        secret = hook_key_secret(hook)
        if refused and secret is not None:
            verbs = "list, watch" if _is_build_step(hook) else "get, list, watch"
            unreadable.append(
                f"{name} is Ready but {system}/{GATEWAY_ACCOUNT} may not "
                f"{' or '.join(refused)} Secret {secret[0]}: every delivery is refused "
                f"(key_unavailable); fix: in {hook.get('metadata', {}).get('namespace')}, a "
                f"Role granting {verbs} on Secret {secret[0]} bound to ServiceAccount "
                f"{system}/{GATEWAY_ACCOUNT} as well as {system}/phabmesh-operator"
            )
        if endpoints.get(name) == 0:
            service = (hook_target(hook) or ("?", 0))[0]
            no_endpoint.append(
                f"{name}: Service {service} has no ready endpoint on its port: deliveries "
                "would get 502 (start its pods, or check its selector)"
            )
    total = len(hooks) + max(more, 0)
    parts = [
        found
        for found in (
            _first(unreadable),
            _first(not_ready, f"{len(not_ready)} not Ready: "),
            _first(no_endpoint),
        )
        if found
    ]
    if unasked is not None:
        parts.append(
            f"whether {system}/{GATEWAY_ACCOUNT} may read their keys was not asked: {unasked}"
        )
    listed = ""
    if more:
        listed = f" (the first {len(hooks)} looked at; " + (
            f"{more} more not)" if more > 0 else "more not)"
        )
    if unreadable:
        status = FAIL
    elif parts:
        status = WARN
    else:
        return Result(
            HOOKS,
            OK,
            f"{total} Ready; {system}/{GATEWAY_ACCOUNT} may read every key; every target has a "
            "ready endpoint" + listed,
        )
    return Result(HOOKS, status, f"{total} webhook(s){listed}: " + "; ".join(parts))


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


async def _webhooks(session: cluster.Session, system: str) -> Result:
    """One page of PhabricatorWebhooks (at most :data:`HOOKS_PAGE`); for each Ready one, a
    SubjectAccessReview per verb the gateway uses on its key Secret, and its target
    Service's EndpointSlices (each Secret and Service asked once, 16 calls at a time)."""
    page = await session.client.get(resources.webhook_path(None), params={"limit": str(HOOKS_PAGE)})
    hooks: list[JSON] = list(page.get("items") or [])
    meta = page.get("metadata") or {}
    more = int(meta.get("remainingItemCount") or -1) if meta.get("continue") else 0
    ready = [h for h in hooks if resources.condition_true(h, resources.READY)]
    gate = asyncio.Semaphore(16)
    user = f"system:serviceaccount:{system}:{GATEWAY_ACCOUNT}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{system}", "system:authenticated"]

    async def refused(namespace: str, secret: str) -> list[str]:
        async with gate:
            allowed = [
                await session.may(user, groups, (namespace, "", "secrets", verb, secret))
                for verb in GATEWAY_KEY_VERBS
            ]
        return [verb for verb, ok in zip(GATEWAY_KEY_VERBS, allowed, strict=True) if not ok]

    async def serving(namespace: str, service: str, port: int) -> int:
        async with gate:
            found = await session.find(resource_path("", "v1", "services", namespace, service))
            slices = await session.items(
                resource_path("discovery.k8s.io", "v1", "endpointslices", namespace),
                labelSelector=f"kubernetes.io/service-name={service}",
            )
        return ready_endpoints(found, port, slices)

    secrets = sorted(
        {(str(h["metadata"]["namespace"]), key[0]) for h in ready if (key := hook_key_secret(h))}
    )
    targets = sorted(
        {(str(h["metadata"]["namespace"]), *t) for h in ready if (t := hook_target(h))}
    )
    denied: dict[str, list[str]] = {}
    unasked = None
    try:
        answers = await asyncio.gather(*(refused(ns, name) for ns, name in secrets))
    except KubeError as exc:
        if exc.status != 403:
            raise
        unasked = "your user may not create subjectaccessreviews (authorization.k8s.io)"
    else:
        by_secret = dict(zip(secrets, answers, strict=True))
        for hook in ready:
            key = hook_key_secret(hook)
            ns = str(hook["metadata"]["namespace"])
            if key is not None and by_secret[(ns, key[0])]:
                denied[_hook_name(hook)] = by_secret[(ns, key[0])]
    counts = dict(zip(targets, await asyncio.gather(*(serving(*t) for t in targets)), strict=True))
    endpoints = {
        _hook_name(h): counts[(str(h["metadata"]["namespace"]), *t)]
        for h in ready
        if (t := hook_target(h))
    }
    return judge_webhooks(hooks, denied, endpoints, system, more=more, unasked=unasked)


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
        guarded(HOOKS, _webhooks(session, system)),
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
