"""Every setting of every phabmesh process, each with its environment variable.

Settings are read once at start-up (``Settings.from_env()``) and passed down;
nothing reads the environment later. Durations are Go-style strings (``5m``,
``1h30m``) or plain seconds.
"""

from __future__ import annotations

import dataclasses
import os
import string
import urllib.parse
from collections.abc import Mapping
from typing import Any

from phabmesh import resources

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


@dataclasses.dataclass(frozen=True)
class Settings:
    """phabmesh settings. The field name in upper case, prefixed ``PHABMESH_``, sets it."""

    # Where phabmesh runs: bot-token Secrets and the signing-key Secret live here.
    namespace: str = "phabmesh-system"
    # Linkerd naming: <sa>.<ns>.serviceaccount.identity.<linkerd_namespace>.<trust_domain>
    linkerd_namespace: str = "linkerd"
    trust_domain: str = "cluster.local"
    # The Phabricator (Phorge) base URL the gateway and the controller talk to.
    phabricator_url: str = "http://127.0.0.1:8080"
    # Conduit client: timeout per call (seconds) and attempts on transport errors/5xx.
    conduit_timeout: float = 10.0
    conduit_attempts: int = 3
    # How often each PhabricatorBot is re-checked against Phabricator.
    bot_recheck_interval: float = 300.0
    # Audience of the projected service-account tokens pods present.
    token_audience: str = "phabmesh.io"  # noqa: S105 - an audience name, not a secret
    # iss and aud of the credentials phabmesh signs.
    issuer: str = "http://phabmesh-issuer.phabmesh-system.svc:8443"
    credential_audience: str = "phabmesh-gateway"
    # Signing keys: the Secret holding them, how often they rotate.
    signing_secret: str = "phabmesh-signing-keys"  # noqa: S105 - a Secret's name
    key_rotation_interval: float = 86400.0
    # The longest credentialTTL a binding may ask for (keys are kept at least this long).
    max_credential_ttl: float = 86400.0
    # Tolerated clock skew when checking exp/nbf.
    clock_skew: float = 30.0
    # Successful TokenReviews are cached (by token hash) for at most this long.
    token_review_cache_ttl: float = 10.0
    # Refused tokens are refused again without a TokenReview for this long (by token hash).
    token_review_negative_cache_ttl: float = 5.0
    # TokenReviews per second (sustained, and at once), a budget apart from kube_qps: a flood
    # of tokens cannot take the operator's writes' budget, nor exceed this. Past it: 429.
    token_review_qps: float = 100.0
    token_review_burst: int = 200
    # The same per source (its l5d-client-id through the local Linkerd proxy, else its
    # address): one flooding caller is refused (429 with Retry-After) while the others go on.
    token_review_source_qps: float = 20.0
    token_review_source_burst: int = 100
    # The same per namespace: the caller's, from its mesh identity (as above); callers without
    # one share one such budget. A tenant's many service accounts get this much together.
    token_review_namespace_qps: float = 20.0
    token_review_namespace_burst: int = 100
    # The part of token_review_qps/burst kept for pods that hold an Active lease (the caller's
    # mesh identity is the lease's, and its token names the lease's pod); one namespace may
    # take a quarter of it. Less than token_review_qps/burst; 0: nothing kept.
    token_review_reserve_qps: float = 20.0
    token_review_reserve_burst: int = 40
    # Kubernetes client limits per process (requests per second sustained, and at once): lease
    # writes in a mass scale-down, TokenReview bursts. Events get a quarter of these on top.
    kube_qps: float = 400.0
    kube_burst: int = 800
    # Only Linkerd's mTLS proves that a caller is meshed: every credential exchange and every
    # gateway call that carries a credential must arrive through the serving pod's Linkerd
    # proxy with l5d-client-id naming the pod's identity. Off only where there is no Linkerd
    # (the local control plane: Settings.local); then a binding's requireClientID still asks
    # it of that binding's gateway calls.
    require_client_id: bool = True
    # Listen addresses.
    issuer_host: str = "0.0.0.0"  # noqa: S104 - a pod serves on all its interfaces
    issuer_port: int = 8443
    gateway_host: str = "0.0.0.0"  # noqa: S104 - a pod serves on all its interfaces
    gateway_port: int = 8080
    metrics_port: int = 9090
    # Pod injection webhook (served by every operator replica over HTTPS).
    webhook_host: str = "0.0.0.0"  # noqa: S104 - a pod serves on all its interfaces
    webhook_port: int = 9443
    # The Service the API server calls it through (names in the serving certificate).
    webhook_service: str = "phabmesh-webhook"
    # The Secret with its CA and serving certificate, and the configuration whose caBundle
    # phabmesh keeps equal to that CA.
    webhook_secret: str = "phabmesh-webhook-tls"  # noqa: S105 - a Secret's name
    webhook_configuration: str = "phabmesh"
    # The webhook's own process refuses (and never reads) an AdmissionReview over this many
    # bytes with 413; it reads and answers this many at once, lets this many more wait
    # (unread, 2 s at most), and answers one more with 429: either way the pod is created
    # without injection (failure policy Ignore). One address gets half of each. A pod's
    # review is rarely over a few hundred KB. A PEM bundle file: when set, the webhook
    # requires a client certificate signed by it (the API server's, from its
    # AdmissionConfiguration).
    webhook_max_request_bytes: int = 1 << 20
    webhook_max_concurrent: int = 4
    webhook_max_waiting: int = 32
    webhook_client_ca: str = ""
    # What injected pods are told: where the credential endpoint and the gateway are, and
    # how long their projected token lives (the API server's minimum is 600 s).
    injected_credential_endpoint: str = "http://phabmesh-issuer.phabmesh-system.svc:8443"
    injected_gateway_url: str = "http://phabmesh-gateway.phabmesh-system.svc:8080"
    injected_token_ttl: float = 600.0
    # The image of the credential agent the webhook adds to pods whose binding asks for it
    # (spec.agent): phabmesh's own, at the operator's version (manifests/ set it so).
    agent_image: str = "ghcr.io/phabmesh/phabmesh:0.1.0"
    # The agent's requests and limits (Kubernetes quantities; empty: none). A pod's
    # annotations phabmesh.io/agent-requests-cpu, -requests-mem, -limits-cpu, -limits-mem
    # override them (docs/agent.md). About 32 MiB is the agent's own use.
    agent_requests_cpu: str = "5m"
    agent_requests_memory: str = "40Mi"
    agent_limits_cpu: str = ""
    agent_limits_memory: str = "64Mi"
    # Peering (several operator replicas): how long a silent replica counts as alive.
    peering_lifetime: float = 60.0
    # The gateway also watches pods and refuses a credential as soon as its pod is terminating,
    # finished or deleted, ahead of the operator's write of the lease's revocation. Off: the
    # gateway needs no access to pods and follows the leases alone.
    gateway_watch_pods: bool = True
    # A watch (of leases, bindings, bots, bot Secrets, pods) silent this long counts as lost,
    # though its connection is open: the gateway and the credential endpoint refuse what
    # they cannot confirm until a new watch is in place. Each watch is renewed within two
    # thirds of this, and the API server marks each renewal's end with a bookmark.
    watch_liveness: float = 30.0
    # Largest request body the gateway accepts (bytes, after decompression).
    max_request_bytes: int = 1 << 20
    # Largest answer the gateway takes from Phabricator (bytes, as sent and decompressed); a larger
    # one is refused with ERR-PHABRICATOR-UNAVAILABLE (HTTP 502). A big user.search or
    # differential answer is a few MB; this bounds the gateway's memory per call.
    max_response_bytes: int = 16 << 20
    # The gateway's memory and work in flight, bounded for its memory limit (256Mi in the
    # chart): past any of these a call is refused at once with ERR-GATEWAY-BUSY (HTTP 429 when
    # it is the caller's own share, else 503) and a Retry-After. Worker processes that inflate
    # and decode compressed or large request bodies, how many more bodies may wait for them,
    # and how many of both one source (its l5d-client-id through the local Linkerd proxy, else
    # its address) may have.
    gateway_decode_workers: int = 2
    gateway_decode_queue: int = 8
    gateway_decode_share: int = 2
    # Bytes of request bodies held at once (a quarter kept for bodies up to 16 KiB; one source
    # at most a quarter), and of Phabricator's answers (one source at most half; at least
    # max_response_bytes).
    gateway_body_budget_bytes: int = 16 << 20
    gateway_answer_budget_bytes: int = 32 << 20
    # Herald webhooks (PhabricatorWebhook, POST /hooks/<namespace>/<name> on the gateway).
    # Where a webhook's target Service is reached: a URL with {service}, {namespace} and
    # {port} (and no other field), http or https, through the gateway's Linkerd proxy. Change
    # the cluster domain here if it is not cluster.local.
    hooks_target_url: str = "http://{service}.{namespace}.svc.cluster.local:{port}"
    # A port of the gateway's own for /hooks/ alone (also served on gateway_port), so that a
    # Phorge outside the mesh can be let in there (Linkerd policy, NetworkPolicy) while
    # /api/ stays for meshed callers. 0: any free port (tests).
    hooks_port: int = 8081
    # A delivery whose action.epoch is further than this from the gateway's clock is refused
    # (stale), and one seen already within it (the same signed body) is refused (replayed).
    hooks_freshness: float = 300.0
    # How long the target may take to answer (Phorge itself gives up after 15 s).
    hooks_timeout: float = 10.0
    # Deliveries forwarded at once per webhook; one more is refused with 429.
    hooks_max_concurrent: int = 4
    # Deliveries remembered for the replay check (about 200 bytes each); when all are
    # within the window, a new delivery is refused (503) rather than one forgotten.
    hooks_replay_entries: int = 5_000  # per namespace
    # Logging.
    log_level: str = "INFO"
    log_json: bool | None = None

    def __post_init__(self) -> None:
        resources.container_resources(*self.agent_resources())
        hook_target_url(self.hooks_target_url, "svc", "ns", 80)
        for name in ("hooks_freshness", "hooks_timeout", "hooks_max_concurrent"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{PREFIX}{name.upper()}: must be more than 0")
        if self.hooks_replay_entries < 1:
            raise ValueError(f"{PREFIX}HOOKS_REPLAY_ENTRIES: must be 1 or more")

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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(PREFIX + field.name.upper())
            if raw is None:
                continue
            values[field.name] = _convert(field.name, field.type, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def local(cls, phabricator_url: str, **overrides: Any) -> Settings:
        """Every listener on 127.0.0.1 with an ephemeral port: tests, the quick start, benches."""
        return cls(**_local_values(phabricator_url, overrides))

    @classmethod
    def local_env(cls, phabricator_url: str, **overrides: Any) -> dict[str, str]:
        """``local`` as environment variables, for phabmesh run as a child process."""
        values = _local_values(phabricator_url, overrides)
        cls(**values)  # refuse an unknown field here, not in the child
        return {PREFIX + name.upper(): _render(value) for name, value in values.items()}

    def to_env(self) -> dict[str, str]:
        """These settings as environment variables, for a child process's ``from_env``."""
        return {
            PREFIX + f.name.upper(): _render(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    @classmethod
    def documented(cls) -> list[tuple[str, str, Any]]:
        """(environment variable, field, default) for every setting: for the docs."""
        return [(PREFIX + f.name.upper(), f.name, f.default) for f in dataclasses.fields(cls)]


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
        "issuer_host": "127.0.0.1",
        "issuer_port": 0,
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


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (requests per second, e.g. 50)") from None


def _convert(name: str, kind: Any, raw: str) -> Any:
    """``raw`` as the field's type; ValueError naming the variable for anything else (a
    rate given as a duration, a misspelt boolean, a negative number)."""
    kind = str(kind)
    text = raw.strip()
    try:
        if kind == "float":
            # Rates are numbers (per second); every other float is a duration.
            value = _rate(text) if name.endswith("_qps") else parse_seconds(text)
            if not value >= 0:  # negative, or NaN
                raise ValueError(f"not a number of 0 or more: {raw!r}")
            return value
        if kind == "int":
            number = int(text)
            if number < 0:
                raise ValueError(f"not a whole number of 0 or more: {raw!r}")
            return number
        if kind.startswith("bool"):
            word = text.lower()
            if word in {"", "auto"} and "None" in kind:
                return None
            if word in _TRUE | _FALSE:
                return word in _TRUE
            raise ValueError(f"not a boolean: {raw!r} (use true or false)")
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{name.upper()}: {exc}") from exc
    return raw
