"""Every setting of every phabmesh process, each with its environment variable.

Settings are read once at start-up (``Settings.from_env()``) and passed down;
nothing reads the environment later. Durations are Go-style strings (``5m``,
``1h30m``) or plain seconds; rates are numbers per second. Each field carries its
group (:data:`GROUPS`) and its description: docs/settings.md is generated from them
(``python -m phabmesh.settings docs/settings.md``). A bad value is refused at start
with a message that names its variable and says what it takes.
"""

from __future__ import annotations

import os
import string
import sys
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Self

import structlog
from pydantic import BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from phabmesh import resources
from phabmesh.backoff import DEFAULT_CAP, DEFAULT_FIRST, Backoff

log = structlog.get_logger(__name__)

PREFIX = "PHABMESH_"


def parse_seconds(text: str) -> float:
    """``"90"``, ``"90s"``, ``"1m30s"``, ``"1h"`` → seconds: a number of seconds, or the
    duration syntax of the CRDs (:func:`phabmesh.resources.parse_duration`)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return resources.parse_duration(text).total_seconds()
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h30m)") from None


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (requests per second, e.g. 50)") from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not a whole number of 0 or more: {text!r}") from None


def _number(parse: Callable[[str], float], kind: str, whole: bool = False) -> Any:
    """A validator: text through ``parse`` (or a number as it is), refused below 0 or NaN."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            number = parse(value.strip())
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = value
            if whole and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(f"not a whole number of 0 or more: {value!r}")
                number = int(value)
        else:
            raise ValueError(f"not {kind}: {value!r}")
        if not number >= 0:  # negative, or NaN
            raise ValueError(f"not a {'whole ' if whole else ''}number of 0 or more: {value!r}")
        return number

    return BeforeValidator(check)


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _flag(auto: bool) -> Any:
    """A validator: ``true``/``false`` (also yes/no, on/off, 1/0); with ``auto``, ``auto``
    or empty for None (decided at run time)."""
    words = "true, false or auto" if auto else "true or false"

    def check(value: Any) -> Any:
        if (value is None and auto) or isinstance(value, bool):
            return value
        if isinstance(value, str):
            word = value.strip().lower()
            if auto and word in {"", "auto"}:
                return None
            if word in _TRUE | _FALSE:
                return word in _TRUE
        raise ValueError(f"not a boolean: {value!r} (use {words})")

    return BeforeValidator(check)


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level(value: Any) -> Any:
    if isinstance(value, str) and value.strip().upper() in _LEVELS:
        return value.strip().upper()
    raise ValueError(f"not a log level: {value!r} (use one of {', '.join(_LEVELS)})")


# The kinds of value a setting takes, each read from text by its own rule.
Duration = Annotated[float, _number(parse_seconds, "a duration")]  # 30s, 5m, 1h30m or seconds
Rate = Annotated[float, _number(_rate, "a rate")]  # requests per second
Count = Annotated[int, _number(_whole, "a whole number", whole=True)]  # bytes, ports, sizes
Flag = Annotated[bool, _flag(auto=False)]
AutoFlag = Annotated[bool | None, _flag(auto=True)]
Level = Annotated[str, BeforeValidator(_level)]

# The groups of settings, in the order docs/settings.md shows them: name → title.
GROUPS = {
    "common": "Every process",
    "retry": "Retries (every process, and the pod side)",
    "kubernetes": "Kubernetes client",
    "controller": "Controller",
    "endpoint": "Credential endpoint",
    "gateway": "Conduit gateway",
    "hooks": "Herald webhooks and Harbormaster build steps (on the gateway)",
    "webhook": "Pod injection webhook",
    "agent": "Credential agent (added by the injection webhook)",
    "logging": "Logging",
}

# Renamed variables still read: old variable → the field it sets now. A process logs
# ``setting_deprecated`` once at start for each one set (warn_deprecated); setting both the
# old and the new variable to different values is refused.
DEPRECATED = {
    "PHABMESH_ISSUER_HOST": "endpoint_host",
    "PHABMESH_ISSUER_PORT": "endpoint_port",
}


def setting(default: Any, group: str, description: str) -> Any:
    """A field: its default, its group (a key of :data:`GROUPS`), and what it does."""
    assert group in GROUPS, group
    return Field(default, description=description, json_schema_extra={"group": group})


class Settings(BaseSettings):
    """phabmesh settings. The field name in upper case, prefixed ``PHABMESH_``, sets it.
    Frozen: :meth:`replace` makes a changed copy, validated as the original was."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    namespace: str = setting(
        "phabmesh-system",
        "common",
        "Where phabmesh runs: bot-token Secrets and the signing-key Secret live here.",
    )
    linkerd_namespace: str = setting(
        "linkerd",
        "common",
        "Linkerd's namespace, part of every mesh identity: "
        "`<sa>.<ns>.serviceaccount.identity.<linkerd_namespace>.<trust_domain>`.",
    )
    trust_domain: str = setting(
        "cluster.local",
        "common",
        "The mesh's trust domain, the last part of a Linkerd identity (as above).",
    )
    phabricator_url: str = setting(
        "http://127.0.0.1:8080",
        "common",
        "The Phabricator (Phorge) base URL the gateway and the controller talk to.",
    )
    conduit_timeout: Duration = setting(
        10.0,
        "common",
        "Conduit client (gateway and controller): how long one call to Phabricator may take.",
    )
    conduit_attempts: Count = setting(
        3,
        "common",
        "Attempts per Conduit call on transport errors and 5xx answers (see "
        "`PHABMESH_CONDUIT_TIMEOUT`).",
    )
    require_client_id: Flag = setting(
        True,
        "common",
        "Only Linkerd's mTLS proves that a caller is meshed (a pod's labels and containers are "
        "its author's to write). On: every credential exchange, and every gateway call that "
        "carries a credential, must arrive through the serving pod's own Linkerd proxy (a peer "
        "inside the pod: loopback or the pod's own address) with `l5d-client-id` naming the "
        "pod's identity; otherwise the endpoint answers 403 `no_client_id` (before any "
        "TokenReview) and the gateway `ERR-INVALID-AUTH`. The chart and `manifests/` set it "
        "`true`. Off (`false`) only where there is no Linkerd, as on the local control plane "
        "(`Settings.local`, the quick start, the tests); a binding's `requireClientID` then "
        "still asks it of that binding's gateway calls.",
    )
    metrics_port: Count = setting(
        9090,
        "common",
        "Port of the metrics and health endpoints of the operator and of the gateway, on the "
        "address of each one's main listener.",
    )
    watch_unmeshed_pods: Flag = setting(
        True,
        "common",
        "The operator and the gateway watch every pod. Off (`false`): only pods that carry "
        "Linkerd's label `linkerd.io/control-plane-ns`, which Linkerd's injector puts on every "
        "pod it injects (a label selector the API server applies): pods outside the mesh then "
        "cost them nothing, in memory, in CPU and at a restart. A pod that loses the label "
        "leaves the watch, and its lease is revoked as its pod's; a pod with a `linkerd-proxy` "
        "container but not the label gets no lease. A binding's `unmeshedPods` then counts "
        "only labelled pods without a proxy (`kubectl phabmesh why` explains any pod).",
    )
    watch_liveness: Duration = setting(
        30.0,
        "common",
        "A watch of the gateway or the credential endpoint (leases, bindings, bots, bot "
        "Secrets, pods) that stays silent this long counts as lost, although its connection is "
        "open: the gateway refuses credentials it cannot confirm (fail closed) until a new "
        "watch resumes from the last version seen. Each watch asks the API server to end it "
        "within two thirds of this (`timeoutSeconds`), and the server sends a bookmark 2 s "
        "before that end, so a healthy watch is never silent so long.",
    )
    # The one retry policy (phabmesh.backoff): its two settings, checked in _consistent.
    retry_first: Duration = setting(
        DEFAULT_FIRST,
        "retry",
        "Every retry loop waits this long before its first retry, then twice as long each time"
        " (less up to half at random), at most `PHABMESH_RETRY_CAP`: the controller's lease "
        "writes, the supervised tasks, the webhook's process, the Conduit client, the agent and"
        " `phabmesh credential --watch` (which read it from the pod's environment). A "
        "Kubernetes request's own retries and a watch's reconnects wait a quarter of it, "
        "doubling to a fifteenth of the cap (0.05 s to 2 s by default). More than 0, at most "
        "`PHABMESH_RETRY_CAP`.",
    )
    retry_cap: Duration = setting(
        DEFAULT_CAP,
        "retry",
        "The longest any retry waits (see `PHABMESH_RETRY_FIRST`), also when the other side's "
        "`Retry-After` (API server, Phabricator, credential endpoint) asks for longer.",
    )
    kube_qps: Rate = setting(
        400.0,
        "kubernetes",
        "Kubernetes client limits per process (requests per second sustained, and at once): "
        "lease writes in a mass scale-down, TokenReview bursts. Events get a quarter of these "
        "on top.",
    )
    kube_burst: Count = setting(
        800, "kubernetes", "Kubernetes requests at once per process (see `PHABMESH_KUBE_QPS`)."
    )
    bot_recheck_interval: Duration = setting(
        300.0, "controller", "How often each PhabricatorBot is re-checked against Phabricator."
    )
    peering_lifetime: Duration = setting(
        60.0,
        "controller",
        "Peering (several operator replicas): how long a silent replica counts as alive.",
    )
    token_audience: str = setting(
        "phabmesh.io", "endpoint", "Audience of the projected service-account tokens pods present."
    )
    issuer: str = setting(
        "http://phabmesh-issuer.phabmesh-system.svc:8443",
        "endpoint",
        "`iss` of the credentials phabmesh signs, compared by the gateway; JWT validators "
        "find `/.well-known/openid-configuration` and the JWKS under it. An identifier: its "
        "default names the credential endpoint's former Service, `phabmesh-issuer` (kept, "
        "deprecated as an address for agents), so that credentials already out and validators "
        "configured with it stay valid; agents call `phabmesh-endpoint`.",
    )
    credential_audience: str = setting(
        "phabmesh-gateway",
        "endpoint",
        "`aud` of the credentials phabmesh signs: the gateway accepts only these.",
    )
    signing_secret: str = setting(
        "phabmesh-signing-keys",
        "endpoint",
        "Signing keys: the Secret holding them (created by the operator).",
    )
    key_rotation_interval: Duration = setting(
        86400.0,
        "endpoint",
        "How often the signing key rotates; a retired key is kept for verification at least "
        "`PHABMESH_MAX_CREDENTIAL_TTL`.",
    )
    max_credential_ttl: Duration = setting(
        86400.0,
        "endpoint",
        "The longest credentialTTL a binding may ask for (keys are kept at least this long).",
    )
    clock_skew: Duration = setting(30.0, "endpoint", "Tolerated clock skew when checking exp/nbf.")
    token_review_cache_ttl: Duration = setting(
        10.0,
        "endpoint",
        "Successful TokenReviews are cached (by token hash) for at most this long.",
    )
    token_review_negative_cache_ttl: Duration = setting(
        5.0,
        "endpoint",
        "A refused token is refused again without a TokenReview for this long (cached by token "
        "hash; at most 10,000 of each kind).",
    )
    token_review_qps: Rate = setting(
        100.0,
        "endpoint",
        "TokenReviews per second sustained, and at once (`…_BURST`), for all callers together: "
        "a budget of their own, apart from `PHABMESH_KUBE_QPS`, so a flood of tokens can "
        "neither take the operator's write budget nor exceed this. Past it the endpoint answers"
        " 429 with `Retry-After` at once. A token that is not a JWT for "
        "`PHABMESH_TOKEN_AUDIENCE` is refused without a review.",
    )
    token_review_burst: Count = setting(
        200,
        "endpoint",
        "TokenReviews at once for all callers together (see `PHABMESH_TOKEN_REVIEW_QPS`).",
    )
    token_review_source_qps: Rate = setting(
        20.0,
        "endpoint",
        "The same budget per source: its `l5d-client-id` when the call comes from the serving "
        "pod's own Linkerd proxy (a peer inside the pod: the pod's own address, or loopback; "
        "behind Linkerd every call does), else its peer address (from elsewhere the header is "
        "anyone's to set). One flooding caller gets 429 while the others go on. All pods of one"
        " service account share an identity: size `…_SOURCE_BURST` for the largest rollout.",
    )
    token_review_source_burst: Count = setting(
        100, "endpoint", "TokenReviews at once per source (see `PHABMESH_TOKEN_REVIEW_SOURCE_QPS`)."
    )
    token_review_namespace_qps: Rate = setting(
        20.0,
        "endpoint",
        "The same budget per namespace: the namespace of the caller's mesh identity (as above, "
        "from the local Linkerd proxy only); callers without one share one such budget. However"
        " many service accounts a tenant uses, its namespace spends this much of the shared "
        "budget, no more. A rollout of one namespace gets `…_NAMESPACE_BURST` reviews at once, "
        "then this rate (and its lease holders the reserve below).",
    )
    token_review_namespace_burst: Count = setting(
        100,
        "endpoint",
        "TokenReviews at once per namespace (see `PHABMESH_TOKEN_REVIEW_NAMESPACE_QPS`).",
    )
    token_review_reserve_qps: Rate = setting(
        20.0,
        "endpoint",
        "The part of `PHABMESH_TOKEN_REVIEW_QPS` (and of `…_BURST`, by `…_RESERVE_BURST`) kept "
        "for pods that hold an Active lease: the caller's mesh identity is the lease's and its "
        "token names the lease's pod. They spend from it when their namespace's or the shared "
        "budget is empty; one namespace may take a quarter of it. Must be below "
        "`PHABMESH_TOKEN_REVIEW_QPS` and `…_BURST`; `0` keeps nothing.",
    )
    token_review_reserve_burst: Count = setting(
        40,
        "endpoint",
        "The part of `PHABMESH_TOKEN_REVIEW_BURST` kept for lease holders (see "
        "`PHABMESH_TOKEN_REVIEW_RESERVE_QPS`); below it.",
    )
    endpoint_host: str = setting(
        "0.0.0.0",  # noqa: S104 - a pod serves on all its interfaces
        "endpoint",
        "Listen address of the credential endpoint (`POST /v1/credentials`, JWKS, OpenID "
        "discovery) and of the operator's metrics. Formerly `PHABMESH_ISSUER_HOST` (still read,"
        " deprecated).",
    )
    endpoint_port: Count = setting(
        8443,
        "endpoint",
        "Port of the credential endpoint (the `phabmesh-endpoint` Service's target). Formerly "
        "`PHABMESH_ISSUER_PORT` (still read, deprecated).",
    )
    gateway_host: str = setting(
        "0.0.0.0",  # noqa: S104 - a pod serves on all its interfaces
        "gateway",
        "Listen address of the Conduit gateway (and of its metrics).",
    )
    gateway_port: Count = setting(
        8080, "gateway", "Port of the Conduit gateway (`/api/`, and `/hooks/` too)."
    )
    gateway_watch_pods: Flag = setting(
        True,
        "gateway",
        "The gateway also watches pods and refuses a credential as soon as its pod is "
        "terminating, finished or deleted, ahead of the operator's write of the lease's "
        "revocation. Off (`false`): the gateway needs no access to pods (drop the `pods` rule "
        "from its ClusterRole) and follows the leases alone.",
    )
    max_request_bytes: Count = setting(
        1048576, "gateway", "Largest request body the gateway accepts (bytes, after decompression)."
    )
    max_response_bytes: Count = setting(
        16777216,
        "gateway",
        "Largest answer the gateway takes from Phabricator (bytes, as sent and decompressed); a"
        " larger one is refused with `ERR-PHABRICATOR-UNAVAILABLE` (HTTP 502). Bounds the "
        "gateway's memory per call (a big `user.search` or differential answer is a few MB). "
        "Raise `PHABMESH_GATEWAY_ANSWER_BUDGET_BYTES` and the memory limit with it.",
    )
    gateway_decode_workers: Count = setting(
        2,
        "gateway",
        "Worker processes (each about 25 MB) that inflate and decode request bodies over 16 KiB"
        " (compressed ones once inflated past that: smaller ones are inflated on the gateway's "
        "loop, with a hard bound, so arc's small gzip calls never wait for a worker). About one"
        " per CPU the gateway may use.",
    )
    gateway_decode_queue: Count = setting(
        8,
        "gateway",
        "Bodies that may wait for a worker beyond those being decoded. Past it a body is "
        "refused at once with `ERR-GATEWAY-BUSY`, HTTP 503 and `Retry-After: 1`, before it is "
        "read any further.",
    )
    gateway_decode_share: Count = setting(
        2,
        "gateway",
        "Bodies one source may have with the workers (decoding or waiting) at once; past it: "
        "`ERR-GATEWAY-BUSY`, HTTP 429, `Retry-After: 1`. A source is the caller's "
        "`l5d-client-id` when it comes through the local Linkerd proxy (a loopback peer), else "
        "its address, as for the credential endpoint's TokenReview budget.",
    )
    gateway_body_budget_bytes: Count = setting(
        16777216,
        "gateway",
        "Bytes of request bodies the gateway holds at once: each request reserves its "
        "`Content-Length` (or each chunk as it is read) before reading it, and gives it back "
        "once answered. Past it: `ERR-GATEWAY-BUSY`, HTTP 503, `Retry-After: 1`. A quarter is "
        "kept for bodies up to 16 KiB (small calls are never refused for large ones), and a "
        "source may hold at most a quarter with large bodies (else 429). With the defaults the "
        "gateway (its workers included) stays under the chart's 256Mi limit; raise it only with"
        " the limit.",
    )
    gateway_answer_budget_bytes: Count = setting(
        33554432,
        "gateway",
        "Bytes of Phabricator's answers the gateway holds at once (as sent, plus the inflated "
        "copy of a compressed one), reserved by `Content-Length` or chunk as they are read (a "
        "compressed one's inflated bytes past its first 256 KiB a MiB at a time, before they "
        "are inflated) and "
        "given back once the answer is sent to the caller. Past it: `ERR-GATEWAY-BUSY`, HTTP "
        "503, `Retry-After: 1`; a source may hold at most half of it (else 429). Never below "
        "`PHABMESH_MAX_RESPONSE_BYTES`.",
    )
    gateway_workers: Count = setting(
        1,
        "gateway",
        "Processes that serve the gateway's ports together (`SO_REUSEPORT`: the kernel spreads"
        " connections over them), so that one gateway pod can use more than one CPU. Each "
        "keeps its own watches (about 80 MB resident per process, plus about 65 MB for the "
        "parent: raise the memory limit with it) and its share of "
        "`PHABMESH_GATEWAY_DECODE_WORKERS` (at least one each); a parent process supervises "
        "them (a dead one is started again), serves `/metrics` as their sum and `/readyz` "
        "once every one is ready. Every bound is per worker, as it is per replica: the body "
        "and answer budgets (memory), the decoding queue, a source's shares, and the webhooks'"
        " replay checks ([webhooks](webhooks.md)). 1: one process, no parent.",
    )
    hooks_target_url: str = setting(
        "http://{service}.{namespace}.svc.cluster.local:{port}",
        "hooks",
        "Where the gateway posts a `PhabricatorWebhook`'s deliveries: a URL template with "
        "`{service}`, `{namespace}` (always the webhook's own) and `{port}` from the webhook's "
        "`spec.target`, and no other field; `http` or `https`. The default goes through the "
        "gateway's Linkerd proxy to the Service (change `cluster.local` for another cluster "
        "domain). A template without `{service}` or `{namespace}` sends every webhook to one "
        "place: only for tests on loopback. Checked at start-up. ([webhooks](webhooks.md))",
    )
    hooks_port: Count = setting(
        8081,
        "hooks",
        "The gateway's port for `/hooks/` alone (Phorge's webhooks and build steps; also served"
        " on the gateway port), so that a Phorge outside the mesh can be let in on it while "
        "`/api/` stays for meshed callers (the chart's `gateway.hooksFrom`; "
        "[webhooks](webhooks.md#reaching-the-gateway-from-phorge)).",
    )
    hooks_freshness: Duration = setting(
        300.0,
        "hooks",
        "A delivery whose `action.epoch` is further than this from the gateway's clock (either "
        "way) is refused as stale (422); one already received within it (the same signed body) "
        "is refused as replayed (409). Phorge's own retries carry the first attempt's epoch: "
        "retries later than this are refused. More than 0.",
    )
    hooks_timeout: Duration = setting(
        10.0,
        "hooks",
        "How long a webhook's target may take to answer before the gateway answers Phorge 504 "
        "(Phorge itself waits 15 s). More than 0.",
    )
    hooks_max_concurrent: Count = setting(
        4,
        "hooks",
        "Deliveries forwarded at once per webhook; one more is refused with 429. More than 0.",
    )
    hooks_replay_entries: Count = setting(
        5000,
        "hooks",
        "Deliveries remembered for the replay check, per namespace (about 200 bytes each): one "
        "namespace's deliveries never take another's room. When every entry of a namespace is "
        "still within the freshness window, its new delivery is refused with 503 rather than "
        "one forgotten. 1 or more.",
    )
    webhook_host: str = setting(
        "0.0.0.0",  # noqa: S104 - a pod serves on all its interfaces
        "webhook",
        "Pod injection webhook: listen address (HTTPS, every operator replica serves it).",
    )
    webhook_port: Count = setting(
        9443,
        "webhook",
        "Port of the pod injection webhook (the `phabmesh-webhook` Service's target).",
    )
    webhook_service: str = setting(
        "phabmesh-webhook",
        "webhook",
        "The Service the API server calls the webhook through (its names go into the serving "
        "certificate).",
    )
    webhook_secret: str = setting(
        "phabmesh-webhook-tls",
        "webhook",
        "Secret holding the webhook's CA and serving certificate (created by the operator).",
    )
    webhook_configuration: str = setting(
        "phabmesh",
        "webhook",
        "MutatingWebhookConfiguration whose `caBundle` the operator keeps equal to that CA.",
    )
    webhook_max_request_bytes: Count = setting(
        1048576,
        "webhook",
        "The webhook (a process of its own beside the operator's) refuses an AdmissionReview "
        "over this many bytes with 413, from its `Content-Length` or as soon as what arrived "
        "passes it, without reading the rest. A pod's review is rarely over a few hundred KB; a"
        " refused pod is created without injection (failure policy Ignore) and counted in "
        '`phabmesh_webhook_refused_total{reason="TooLarge"}`.',
    )
    webhook_max_concurrent: Count = setting(
        4,
        "webhook",
        "AdmissionReviews the webhook reads and answers at once (each a few ms for a usual pod;"
        " at the size limit, some tens of MB of memory each). One source address may hold half "
        "of these places.",
    )
    webhook_max_waiting: Count = setting(
        32,
        "webhook",
        "AdmissionReviews that may wait, unread, for a place (2 s at most: a burst of pod "
        "creations is answered, not refused). One more, or one from a source address that "
        "already has half of all present, is answered 429 at once, its pod created without "
        'injection (`phabmesh_webhook_refused_total{reason="Busy"}`).',
    )
    webhook_client_ca: str = setting(
        "",
        "webhook",
        "A PEM file of the CA that signs the API server's client certificate for webhooks. When"
        " set, the webhook's TLS requires a client certificate and verifies it against this "
        "bundle; empty: no client certificate asked for. See "
        "[security.md](security.md#who-may-call-phabmeshs-ports).",
    )
    injected_credential_endpoint: str = setting(
        "http://phabmesh-endpoint.phabmesh-system.svc:8443",
        "webhook",
        "Injected pods get it as `PHABMESH_CREDENTIAL_ENDPOINT`.",
    )
    injected_gateway_url: str = setting(
        "http://phabmesh-gateway.phabmesh-system.svc:8080",
        "webhook",
        "Injected pods get it as `PHABMESH_GATEWAY_URL`.",
    )
    injected_token_ttl: Duration = setting(
        600.0,
        "webhook",
        "`expirationSeconds` of the injected projected token (at least 600; the kubelet "
        "refreshes it).",
    )
    agent_image: str = setting(
        "ghcr.io/phabmesh/phabmesh:0.1.0",
        "agent",
        "Image of the credential agent the webhook adds to pods whose binding or annotation "
        "asks for it ([agent.md](agent.md)): phabmesh's own, at the operator's version. "
        "`manifests/` set it to the operator's image.",
    )
    agent_requests_cpu: str = setting(
        "5m",
        "agent",
        "The credential agent's CPU request (a Kubernetes quantity; empty: none). A pod's "
        "annotation `phabmesh.io/agent-requests-cpu` overrides it "
        "([agent.md](agent.md#resources-and-user)).",
    )
    agent_requests_memory: str = setting(
        "40Mi",
        "agent",
        "The agent's memory request; the pod's `phabmesh.io/agent-requests-mem` overrides it.",
    )
    agent_limits_cpu: str = setting(
        "",
        "agent",
        "The agent's CPU limit (none by default); the pod's `phabmesh.io/agent-limits-cpu` "
        "overrides it.",
    )
    agent_limits_memory: str = setting(
        "64Mi",
        "agent",
        "The agent's memory limit (it uses about 32 MiB); the pod's "
        "`phabmesh.io/agent-limits-mem` overrides it. A process refuses to start when one of "
        "these four is no quantity, or a request is over its limit, and names the variable.",
    )
    log_level: Level = setting(
        "INFO", "logging", "Least level logged: `DEBUG`, `INFO`, `WARNING` or `ERROR`."
    )
    log_json: AutoFlag = setting(
        None,
        "logging",
        "JSON lines (`true`), a readable console format (`false`), or `auto` (or empty): JSON "
        "unless standard error is a terminal.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _refusal(exc) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: ``Settings(...)`` never reads the environment, which
        :meth:`from_env` alone does (from the mapping it is given)."""
        return (init_settings,)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        resources.container_resources(*self.agent_resources())
        hook_target_url(self.hooks_target_url, "svc", "ns", 80)
        for name in ("hooks_freshness", "hooks_timeout", "hooks_max_concurrent"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{PREFIX}{name.upper()}: must be more than 0")
        if self.hooks_replay_entries < 1:
            raise ValueError(f"{PREFIX}HOOKS_REPLAY_ENTRIES: must be 1 or more")
        _check_retry(self.retry_first, self.retry_cap)
        if self.gateway_workers < 1:
            raise ValueError(f"{PREFIX}GATEWAY_WORKERS: must be 1 or more")
        return self

    def backoff(self) -> Backoff:
        """This process's retry policy (``PHABMESH_RETRY_FIRST``, ``..._CAP``)."""
        return Backoff(self.retry_first, self.retry_cap)

    def agent_resources(
        self,
    ) -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
        """The agent's default requests and limits: ``(kind, resource)`` → quantity, and →
        the setting's variable (for errors)."""
        values, names = {}, {}
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                field = f"agent_{kind}_{resource}"
                values[kind, resource] = str(getattr(self, field)).strip()
                names[kind, resource] = PREFIX + field.upper()
        return values, names

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``, validated as a new one is (an unknown name: TypeError)."""
        return type(self)(**{**self.model_dump(), **changes})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """The settings ``env`` (default: this process's environment) gives, and
        ``overrides``; ValueError naming the variable for a value it cannot use."""
        env = _renamed(os.environ if env is None else env)
        values = _EnvSource(cls, env)()
        return cls(**{**values, **overrides})

    @classmethod
    def local(cls, phabricator_url: str, **overrides: Any) -> Settings:
        """Every listener on 127.0.0.1 with an ephemeral port: tests, the quick start, benches."""
        return cls(**_local_values(phabricator_url, overrides))

    @classmethod
    def local_env(cls, phabricator_url: str, **overrides: Any) -> dict[str, str]:
        """``local`` as environment variables, for phabmesh run as a child process."""
        values = _local_values(phabricator_url, overrides)
        cls(**values)  # refuse an unknown field or a bad value here, not in the child
        return {PREFIX + name.upper(): _render(value) for name, value in values.items()}

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for a child process's ``from_env``."""
        return {
            PREFIX + name.upper(): _render(getattr(self, name)) for name in type(self).model_fields
        }

    @classmethod
    def documented(cls) -> list[tuple[str, str, Any]]:
        """(environment variable, field, default) for every setting: for the docs."""
        return [(PREFIX + name.upper(), name, f.default) for name, f in cls.model_fields.items()]

    @classmethod
    def group_of(cls, name: str) -> str:
        """The group (a key of :data:`GROUPS`) of field ``name``."""
        extra = cls.model_fields[name].json_schema_extra
        assert isinstance(extra, dict)
        group = extra["group"]
        assert isinstance(group, str)
        return group


def _check_retry(first: float, cap: float) -> None:
    for name, value in (("RETRY_FIRST", first), ("RETRY_CAP", cap)):
        if not value > 0:
            raise ValueError(f"{PREFIX}{name}: must be more than 0 (a duration, e.g. 200ms or 0.2)")
    if first > cap:
        raise ValueError(
            f"{PREFIX}RETRY_FIRST: must be at most {PREFIX}RETRY_CAP ({first:g} s > {cap:g} s)"
        )


RETRY_VARIABLES = {PREFIX + "RETRY_FIRST": "retry_first", PREFIX + "RETRY_CAP": "retry_cap"}


def retry_policy(env: Mapping[str, str] | None = None) -> Backoff:
    """The retry policy alone, from ``env`` (default: this process's environment): for the
    pod side (``phabmesh agent``, ``phabmesh credential``), which reads no other setting;
    ValueError naming the variable for a value it cannot use."""
    env = os.environ if env is None else env
    given = {field: env[var] for var, field in RETRY_VARIABLES.items() if var in env}
    return Settings(**given).backoff()


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' reading of ``PHABMESH_*`` variables, from a given mapping."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            (key if self.case_sensitive else key.lower()): value
            for key, value in self._given.items()
        }


def _renamed(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` with each deprecated variable's value under its new name; ValueError when
    both are set to different values."""
    given = [old for old in DEPRECATED if old in env]
    if not given:
        return env
    merged = dict(env)
    for old in given:
        new = PREFIX + DEPRECATED[old].upper()
        if new in env and not _same(DEPRECATED[old], env[new], env[old]):
            raise ValueError(
                f"{old} (deprecated) and {new} are both set, to different values: set only {new}"
            )
        merged.setdefault(new, env[old])
    return merged


def _same(field: str, one: str, other: str) -> bool:
    """Whether two texts give ``field`` one value (``8443`` and ``08443`` do)."""
    if one.strip() == other.strip():
        return True
    try:
        values = [getattr(Settings(**{field: text}), field) for text in (one, other)]
    except ValueError:
        return False
    return bool(values[0] == values[1])


_warned: set[str] = set()


def warn_deprecated(env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(old, new) variable for each deprecated variable ``env`` (default: this process's
    environment) sets; each logged once per process as ``setting_deprecated`` (never its
    value). Called at start, once logging is configured."""
    env = os.environ if env is None else env
    used = [(old, PREFIX + field.upper()) for old, field in DEPRECATED.items() if old in env]
    for old, new in used:
        if old not in _warned:
            _warned.add(old)
            log.warning("setting_deprecated", old=old, new=new)
    return used


def _refusal(exc: ValidationError) -> Exception:
    """One line naming each variable at fault and what it takes (TypeError for a field
    that does not exist, as for any unknown keyword)."""
    problems = []
    for error in exc.errors(include_url=False):
        where = [str(part) for part in error["loc"]]
        if error["type"] == "extra_forbidden":
            return TypeError(f"Settings: no setting {where[0]!r} ({PREFIX}{where[0].upper()})")
        cause = (error.get("ctx") or {}).get("error")
        problem = str(cause) if isinstance(cause, Exception) else error["msg"]
        problems.append(f"{PREFIX}{where[0].upper()}: {problem}" if where else problem)
    return ValueError("; ".join(problems))


HOOK_TARGET_FIELDS = frozenset({"service", "namespace", "port"})


def hook_target_url(template: str, service: str, namespace: str, port: int) -> str:
    """``hooks_target_url`` filled in; ValueError naming the setting for a template with
    another field or a scheme other than http(s). (A template without {service} or
    {namespace} sends every webhook's deliveries to one place: for tests on loopback.)"""
    name = f"{PREFIX}HOOKS_TARGET_URL"
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if fields - HOOK_TARGET_FIELDS:
        raise ValueError(
            f"{name}: {template!r} may hold only {{service}}, {{namespace}} and {{port}}"
        )
    url = template.format(service=service, namespace=namespace, port=port)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"{name}: {template!r} is not an http or https URL")
    return url.rstrip("/")


def _local_values(phabricator_url: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "namespace": "phabmesh-system",
        "phabricator_url": phabricator_url,
        "endpoint_host": "127.0.0.1",
        "endpoint_port": 0,
        "gateway_host": "127.0.0.1",
        "gateway_port": 0,
        "hooks_port": 0,
        "metrics_port": 0,
        "webhook_host": "127.0.0.1",
        "webhook_port": 0,
        "require_client_id": False,  # no Linkerd on a local control plane
        **overrides,
    }


def _render(value: Any) -> str:
    """The text ``from_env`` reads back as ``value``."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


DOC_HEAD = """\
# Settings

<!-- Generated from phabmesh.settings (each field's group and description):
     python -m phabmesh.settings docs/settings.md -->

Every phabmesh process reads its settings once, at start-up, from environment
variables (`phabmesh.settings.Settings.from_env`). Durations take `30s`, `5m`, `1h30m` or plain
seconds; rates are requests per second (a number, never a duration); booleans take `true` or
`false` (also `yes`/`no`, `on`/`off`, `1`/`0`); numbers are 0 or more. A process refuses to
start on a value it cannot use, with one line naming the variable and what it takes. In the
manifests they come from ConfigMap `phabmesh-config`.
"""


def document() -> str:
    """docs/settings.md: the settings by group, then the deprecated names."""
    parts = [DOC_HEAD]
    for group, title in GROUPS.items():
        parts.append(f"\n## {title}\n\n| variable | default | meaning |\n| --- | --- | --- |\n")
        for var, name, default in Settings.documented():
            if Settings.group_of(name) == group:
                description = Settings.model_fields[name].description or ""
                parts.append(f"| `{var}` | `{_render(default)}` | {description} |\n")
    parts.append(
        "\n## Deprecated names\n\n"
        "A renamed variable's old name is still read. Each process logs `setting_deprecated` "
        "(with the old and the new name, never the value) once at start for each old name "
        "set, and refuses to start when the old and the new name are both set to different "
        "values. Set the new name instead.\n\n"
        "| deprecated variable | use instead |\n| --- | --- |\n"
    )
    for old, name in DEPRECATED.items():
        parts.append(f"| `{old}` | `{PREFIX}{name.upper()}` |\n")
    return "".join(parts)


if __name__ == "__main__":
    # python -m phabmesh.settings [FILE]: write docs/settings.md (or print it).
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as out:
            out.write(document())
    else:
        sys.stdout.write(document())
