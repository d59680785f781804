"""phabmesh's custom resources as typed models, and Kubernetes condition conventions.

Pure: no I/O. The CRDs in ``crds/`` and these models must agree; ``python -m
phabmesh.dev.schemacheck crds/`` (``make manifests``) fails when they drift.

Parse a watched object's parts with ``BotSpec.model_validate(body["spec"])`` (and
``BindingSpec``, ``LeaseSpec``, ``*Status`` alike): fields are read by their
CRD (camelCase) names and exposed as snake_case attributes; dump with
``model_dump(by_alias=True, mode="json")``. Spec models refuse unknown fields;
status models ignore them. Defaults equal the CRD's, so a spec the API server
accepted always parses, with the same values the server filled in.
"""

from __future__ import annotations

import datetime
import decimal
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phabmesh.clock import format_time

GROUP = "phabmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
BOT_KIND, BOT_PLURAL = "PhabricatorBot", "phabricatorbots"
BINDING_KIND, BINDING_PLURAL = "PhabricatorBinding", "phabricatorbindings"
CREDENTIAL_KIND, CREDENTIAL_PLURAL = "PhabricatorCredential", "phabricatorcredentials"
WEBHOOK_KIND, WEBHOOK_PLURAL = "PhabricatorWebhook", "phabricatorwebhooks"
CATEGORY = "phabmesh"  # `kubectl get phabmesh` lists every kind
# On a PhabricatorBot: a new value asks the operator to check the bot again now
# (`kubectl phabmesh recheck`); any value will do, the time of the request by convention.
RECHECK_ANNOTATION = "phabmesh.io/recheck-requested-at"
# The finalizer kopf put on objects that had a kopf timer (bots; bindings before that) in
# earlier versions of phabmesh. Nothing puts it any more; the controller takes it off.
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def kopf_finalizer_at(meta: Mapping[str, Any]) -> int:
    """Where :data:`KOPF_FINALIZER` is in ``metadata.finalizers``; -1: not there."""
    finalizers = list(meta.get("finalizers") or [])
    return finalizers.index(KOPF_FINALIZER) if KOPF_FINALIZER in finalizers else -1


# Condition types (on bots: Ready and TokenVerified; on bindings: Ready and BotReady).
READY = "Ready"  # the object does its job: a verified bot, a binding that issues credentials
BOT_READY = "BotReady"  # on a binding: the referenced bot's own Ready, with the bot's reason
# On a bot: Phabricator's last definite answer (True: the token is this bot's; False: a
# definite no, with its reason). It stands while Phabricator is unavailable (Ready Unknown),
# so that whether the bot is still usable is read from the object, by any process, after
# any restart (bot_usable).
TOKEN_VERIFIED = "TokenVerified"  # noqa: S105 - a condition type, not a secret

# The Warning Event on a pod whose credential lease the API server refused to write (the
# operator without its ServiceAccount's rights, a policy refusing it): `kubectl describe pod`,
# `kubectl phabmesh why` and `check` show it.
CREDENTIAL_WRITE_FAILED = "CredentialWriteFailed"

# PhabricatorCredential status.phase.
# Ready condition reasons of a PhabricatorWebhook (the operator writes them; the gateway
# reads them).
# (reasons, not secrets: hence the noqa on those that name a Secret or a key)
HOOK_READY = "Ready"  # the key is in its Secret and the Service has the port
HOOK_INVALID_SPEC = "InvalidSpec"  # the spec could not be read
HOOK_SECRET_MISSING = "SecretMissing"  # noqa: S105 - no such Secret in the webhook's namespace
HOOK_SECRET_FORBIDDEN = "SecretForbidden"  # noqa: S105 - the namespace did not grant it
HOOK_KEY_MISSING = "KeyMissing"  # the Secret has no such key, or it is empty
HOOK_SERVICE_MISSING = "ServiceMissing"  # no Service of that name in the webhook's namespace
HOOK_PORT_MISSING = "PortMissing"  # the Service has no such port
# The Service could lead out of its namespace: an ExternalName (a DNS name anywhere), or no
# selector (endpoints written by hand, which may be any address).
HOOK_SERVICE_UNSUPPORTED = "ServiceUnsupported"
HOOK_CHECK_FAILED = "CheckFailed"  # the API server could not answer (status Unknown)
# A Harbormaster webhook's bot: no such PhabricatorBot, its namespaceSelector does not allow
# the webhook's namespace, or it is not usable (not Ready).
HOOK_BOT_MISSING = "BotMissing"
HOOK_BOT_NOT_ALLOWED = "BotNotAllowed"
HOOK_BOT_NOT_READY = "BotNotReady"
HOOK_REASONS = frozenset(
    {
        HOOK_READY,
        HOOK_INVALID_SPEC,
        HOOK_SECRET_MISSING,
        HOOK_SECRET_FORBIDDEN,
        HOOK_KEY_MISSING,
        HOOK_SERVICE_MISSING,
        HOOK_PORT_MISSING,
        HOOK_SERVICE_UNSUPPORTED,
        HOOK_CHECK_FAILED,
        HOOK_BOT_MISSING,
        HOOK_BOT_NOT_ALLOWED,
        HOOK_BOT_NOT_READY,
    }
)


ACTIVE = "Active"  # the pod may act as the bot until expiresAt
REVOKED = "Revoked"  # it may not, ever again (the CRD refuses a way back to Active)

# PhabricatorCredential status.reason: why a lease was revoked.
POD_TERMINATING = "PodTerminating"  # the pod got a deletionTimestamp
POD_SUCCEEDED = "PodSucceeded"  # the pod finished
POD_FAILED = "PodFailed"  # the pod failed
POD_DELETED = "PodDeleted"  # the pod is gone from the API server
POD_GONE = "PodGone"  # at start-up: the lease's pod no longer exists (or has another UID)
POD_NOT_RUNNING = "PodNotRunning"  # the pod does not run (Pending with nothing running, Unknown)
POD_NOT_MESHED = "PodNotMeshed"  # the pod no longer carries a Linkerd proxy
NO_LONGER_MATCHED = "NoLongerMatched"  # the binding's subjects or selector no longer match
BINDING_DELETED = "BindingDeleted"  # the binding was deleted
BINDING_NOT_READY = "BindingNotReady"  # the binding is not Ready for another reason
BOT_NOT_READY = "BotNotReady"  # the bot stopped being Ready (disabled, token revoked)
BOT_CHANGED = "BotChanged"  # the binding's botRef now names another bot than the lease's
BOT_NOT_ALLOWED = "BotNotAllowed"  # the lease's bot is gone or no longer allows the namespace
# An administrator revoked it (`kubectl phabmesh revoke`). Such a lease is kept, Revoked, until
# its pod goes (the garbage collector deletes it then): while it stands, the operator issues
# that pod no new lease through that binding.
REVOKED_BY_ADMIN = "RevokedByAdmin"
# Its status.message, the one text manifests/lease-policy.yaml accepts (the policy has a copy;
# tests check they agree): who revoked is in the API server's audit log and the plugin's Event.
ADMIN_REVOCATION_MESSAGE = "revoked by an administrator"
# How far its revokedAt may be from the time the API server records for the write (the
# policy has a copy, in seconds).
ADMIN_REVOCATION_LEEWAY = 15
# Each reason's one message: in the lease's status.message, the pod's Event, the gateway's
# and the credential endpoint's refusals ("credential revoked: <message>").
REVOCATION_MESSAGES: Mapping[str, str] = {
    POD_TERMINATING: "pod terminating",
    POD_SUCCEEDED: "pod completed",
    POD_FAILED: "pod failed",
    POD_DELETED: "pod deleted",
    POD_GONE: "pod gone",
    POD_NOT_RUNNING: "pod not running",
    POD_NOT_MESHED: "pod not meshed",
    NO_LONGER_MATCHED: "binding no longer matches the pod",
    BINDING_DELETED: "binding deleted",
    BINDING_NOT_READY: "binding not ready",
    BOT_NOT_READY: "bot not ready",
    BOT_CHANGED: "the binding names another bot now",
    BOT_NOT_ALLOWED: "bot not allowed in this namespace",
    REVOKED_BY_ADMIN: ADMIN_REVOCATION_MESSAGE,
}
REVOCATION_REASONS = frozenset(REVOCATION_MESSAGES)


def revocation_message(reason: str) -> str:
    """The one message of a revocation reason (the reason itself when it is not one)."""
    return REVOCATION_MESSAGES.get(reason, reason)


# The CRD's credentialTTL pattern, without its anchors (used with fullmatch).
_DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# credentialTTL's bounds, as the CRD's CEL rule enforces them.
MIN_CREDENTIAL_TTL = datetime.timedelta(minutes=1)
MAX_CREDENTIAL_TTL = datetime.timedelta(hours=24)


def parse_duration(text: str) -> datetime.timedelta:
    """Go ``time.ParseDuration`` syntax for h, m, s, ms: ``15m``, ``1h30m``, ``90s``, ``1.5h``.

    The same subset the CRD's ``credentialTTL`` pattern admits; raises ``ValueError``
    for anything else (signs, ``us``/``ns``, spaces, a bare number).
    """
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 15m, 1h30m)")
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(text))
    return datetime.timedelta(seconds=seconds)


# A Kubernetes resource quantity (k8s.io/apimachinery resource.Quantity): a decimal number
# with a binary (Ki…Ei) or decimal (n, u, m, k, M…E) suffix, or a decimal exponent.
_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
_BINARY: dict[str, int] = {
    s: 1 << (10 * i) for i, s in enumerate(("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))
}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(text: str) -> decimal.Decimal:
    """``"64Mi"`` → 67108864, ``"5m"`` → 0.005, ``"1e3"`` → 1000: the value of a Kubernetes
    quantity (no sign: a container's requests and limits are never negative). Raises
    ``ValueError`` for anything else, with examples."""
    match = _QUANTITY.fullmatch(text) if len(text) <= 64 else None
    if not match:
        raise ValueError(f"not a quantity: {text[:64]!r} (use e.g. 64Mi, 128M, 100m, 0.5)")
    number, suffix = decimal.Decimal(match[1]), match[2] or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    exponent = int(suffix[1:])
    if abs(exponent) > 30:
        raise ValueError(f"not a quantity: {text!r} (an exponent from -30 to 30)")
    return number.scaleb(exponent)


def container_resources(
    values: Mapping[tuple[str, str], str], names: Mapping[tuple[str, str], str]
) -> dict[str, dict[str, str]]:
    """A container's ``resources`` from ``(requests|limits, cpu|memory)`` → quantity (empty:
    none). ``ValueError`` names ``names[key]`` (a setting, an annotation) for a value that is
    no quantity, or a request over its limit (the API server's rule)."""
    parsed: dict[tuple[str, str], decimal.Decimal] = {}
    for key, text in values.items():
        if text:
            try:
                parsed[key] = parse_quantity(text)
            except ValueError as exc:
                raise ValueError(f"{names[key]}: {exc}") from None
    for (kind, resource), amount in parsed.items():
        limit = parsed.get(("limits", resource))
        if kind == "requests" and limit is not None and amount > limit:
            raise ValueError(
                f"{names[kind, resource]}: {values[kind, resource]} is more than the {resource} "
                f"limit {values['limits', resource]} ({names['limits', resource]})"
            )
    result: dict[str, dict[str, str]] = {}
    for (kind, resource), text in sorted(values.items(), key=lambda item: item[0][0] == "limits"):
        if text:
            result.setdefault(kind, {})[resource] = text
    return result


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)


class LabelSelectorRequirement(_Model):
    """One ``matchExpressions`` entry; the CRD checks values against the operator."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()


class LabelSelector(_Model):
    """A Kubernetes LabelSelector; empty selects everything."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field(
        default=(), alias="matchExpressions"
    )


class SecretKeyRef(_Model):
    """A key of a Secret in the operator's own namespace."""

    name: str
    key: str = "token"


class BotSpec(_Model):
    """``PhabricatorBot.spec``."""

    username: str
    token_secret_ref: SecretKeyRef = Field(alias="tokenSecretRef")
    namespace_selector: LabelSelector = Field(alias="namespaceSelector")


class BotRef(_Model):
    """The PhabricatorBot a binding acts as."""

    name: str


class IdentityRef(_Model):
    """A ServiceAccount (namespace defaulting to the binding's) or a whole Namespace."""

    kind: Literal["ServiceAccount", "Namespace"]
    name: str
    namespace: str | None = None


# PhabricatorBinding.spec.credentialFormat: what a pod gets unless it asks (?format=).
CredentialFormat = Literal["PhorgeToken", "JWT"]
# api- and 28 characters, like a Phorge token: any Conduit client takes it.
PHORGE_TOKEN: CredentialFormat = "PhorgeToken"  # noqa: S105 - a format's name
JWT: CredentialFormat = "JWT"  # a signed JWT, verifiable by third parties through the JWKS

# PhabricatorBinding.spec.agent.mode: whether the webhook adds the credential agent to pods.
AgentMode = Literal["None", "Sidecar", "Init", "Auto"]
AGENT_NONE: AgentMode = "None"  # no agent: the pod gets the token volume and variables only
AGENT_SIDECAR: AgentMode = "Sidecar"  # a native sidecar that keeps the credential fresh
AGENT_INIT: AgentMode = "Init"  # an init container that writes one credential and exits
# Init for pods that run once (restartPolicy Never or OnFailure: Jobs), Sidecar otherwise.
AGENT_AUTO: AgentMode = "Auto"


class AgentSpec(_Model):
    """``PhabricatorBinding.spec.agent``: the credential agent the webhook adds to pods."""

    mode: AgentMode = AGENT_NONE


class BindingSpec(_Model):
    """``PhabricatorBinding.spec``."""

    bot_ref: BotRef = Field(alias="botRef")
    identities: tuple[str, ...] = ()
    identity_refs: tuple[IdentityRef, ...] = Field(default=(), alias="identityRefs")
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")
    credential_ttl: str = Field(default="15m", alias="credentialTTL")
    allowed_methods: tuple[str, ...] = Field(alias="allowedMethods")
    require_client_id: bool = Field(default=False, alias="requireClientID")
    credential_format: CredentialFormat = Field(default=PHORGE_TOKEN, alias="credentialFormat")
    agent: AgentSpec = Field(default_factory=AgentSpec)

    @field_validator("credential_ttl")
    @classmethod
    def _ttl(cls, value: str) -> str:
        ttl = parse_duration(value)
        if not MIN_CREDENTIAL_TTL <= ttl <= MAX_CREDENTIAL_TTL:
            raise ValueError(f"credentialTTL {value!r} is not between 1m and 24h")
        return value

    @property
    def ttl(self) -> datetime.timedelta:
        """credentialTTL as a timedelta."""
        return parse_duration(self.credential_ttl)


class LeaseSpec(_Model):
    """``PhabricatorCredential.spec``, a lease's: immutable once written."""

    pod_name: str = Field(alias="podName")
    pod_uid: str = Field(alias="podUID")
    service_account: str = Field(alias="serviceAccount")
    identity: str
    binding: str
    bot: str


class WebhookSecretRef(_Model):
    """A key of a Secret in the webhook's own namespace."""

    name: str
    key: str = "hmacKey"


class HeraldSource(_Model):
    """``PhabricatorWebhook.spec.herald``: a Herald webhook and where its HMAC key is."""

    secret_ref: WebhookSecretRef = Field(alias="secretRef")


class WebhookTarget(_Model):
    """``PhabricatorWebhook.spec.target``: a Service in the webhook's own namespace."""

    service: str
    port: int
    path: str = "/"


class CredentialSecretRef(_Model):
    """A Secret in the webhook's own namespace holding an HTTP basic credential, under the keys
    ``username`` and ``password`` (phabmesh generates them into it when they are missing)."""

    name: str


class HarbormasterSource(_Model):
    """``PhabricatorWebhook.spec.harbormaster``: a Harbormaster "Make HTTP Request" build step.
    The build target named in its request is checked through Conduit as ``botRef``, a bot this
    namespace may use; ``credentialSecretRef`` is the step's basic credential (required: a
    target PHID alone proves nothing about who calls)."""

    bot_ref: BotRef = Field(alias="botRef")
    credential_secret_ref: CredentialSecretRef = Field(alias="credentialSecretRef")


class WebhookSpec(_Model):
    """``PhabricatorWebhook.spec``: exactly one source (``herald`` or ``harbormaster``)."""

    herald: HeraldSource | None = None
    harbormaster: HarbormasterSource | None = None
    target: WebhookTarget

    @model_validator(mode="after")
    def _one_source(self) -> WebhookSpec:
        if (self.herald is None) == (self.harbormaster is None):
            raise ValueError("give exactly one of herald or harbormaster")
        return self

    @property
    def source(self) -> str:
        """Where deliveries come from: ``herald`` or ``harbormaster``."""
        return "herald" if self.herald is not None else "harbormaster"

    @property
    def secret_names(self) -> tuple[str, ...]:
        """The Secrets (in the webhook's namespace) the gateway reads for this webhook."""
        if self.herald is not None:
            return (self.herald.secret_ref.name,)
        assert self.harbormaster is not None
        return (self.harbormaster.credential_secret_ref.name,)


ConditionStatus = Literal["True", "False", "Unknown"]
Phase = Literal["Active", "Revoked"]


class Condition(_Model):
    """``metav1.Condition``: every field but observedGeneration is required (message may be "")."""

    type: str
    status: ConditionStatus
    reason: str
    message: str
    last_transition_time: str = Field(alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")

    @classmethod
    def new(
        cls, type_: str, status: ConditionStatus, reason: str, message: str, generation: int
    ) -> Condition:
        """A condition whose lastTransitionTime :func:`set_condition` fills in."""
        return cls(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time="",
            observed_generation=generation,
        )


class BotStatus(_Model):
    """``PhabricatorBot.status``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)
    phid: str | None = None
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    last_checked_at: str | None = Field(default=None, alias="lastCheckedAt")
    conditions: tuple[Condition, ...] = ()


class BindingStatus(_Model):
    """``PhabricatorBinding.status``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: tuple[Condition, ...] = ()
    matched_pods: int = Field(default=0, alias="matchedPods")
    active_credentials: int = Field(default=0, alias="activeCredentials")
    unmeshed_pods: int = Field(default=0, alias="unmeshedPods")
    other_mesh_pods: int = Field(default=0, alias="otherMeshPods")
    bot_phid: str | None = Field(default=None, alias="botPHID")


class LeaseStatus(_Model):
    """``PhabricatorCredential.status``, a lease's."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)
    phase: Phase | None = None
    issued_at: str | None = Field(default=None, alias="issuedAt")
    renewed_at: str | None = Field(default=None, alias="renewedAt")
    expires_at: str | None = Field(default=None, alias="expiresAt")
    revoked_at: str | None = Field(default=None, alias="revokedAt")
    reason: str | None = None
    message: str | None = None
    bot_phid: str | None = Field(default=None, alias="botPHID")


class WebhookStatus(_Model):
    """``PhabricatorWebhook.status``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: tuple[Condition, ...] = ()


SPECS: dict[str, type[_Model]] = {
    BOT_KIND: BotSpec,
    BINDING_KIND: BindingSpec,
    CREDENTIAL_KIND: LeaseSpec,
    WEBHOOK_KIND: WebhookSpec,
}
STATUSES: dict[str, type[_Model]] = {
    BOT_KIND: BotStatus,
    BINDING_KIND: BindingStatus,
    CREDENTIAL_KIND: LeaseStatus,
    WEBHOOK_KIND: WebhookStatus,
}


def resource_path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/namespaces/ns/pods/name/status`` and its CRD equivalents."""
    base = f"/api/{version}" if group in ("", "core") else f"/apis/{group}/{version}"
    if namespace is not None:
        base += f"/namespaces/{quote(namespace, safe='')}"
    base += f"/{plural}"
    if name is not None:
        base += f"/{quote(name, safe='')}"
    if subresource is not None:
        base += f"/{subresource}"
    return base


def bot_path(name: str | None = None, subresource: str | None = None) -> str:
    return resource_path(GROUP, VERSION, BOT_PLURAL, None, name, subresource)


def binding_path(
    namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    return resource_path(GROUP, VERSION, BINDING_PLURAL, namespace, name, subresource)


def lease_path(
    namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    return resource_path(GROUP, VERSION, CREDENTIAL_PLURAL, namespace, name, subresource)


def webhook_path(
    namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    return resource_path(GROUP, VERSION, WEBHOOK_PLURAL, namespace, name, subresource)


def parse_conditions(raw: object) -> list[Condition]:
    """Conditions as stored on an object; malformed entries are dropped."""
    out: list[Condition] = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(Condition.model_validate(item))
        except ValueError:
            continue
    return out


def bot_usable(conditions: Sequence[Mapping[str, Any]], generation: int) -> bool:
    """May a bot's credentials be issued and kept? Ready, or Ready Unknown (Phabricator
    unavailable) after a verification of this generation of its spec that no definite "no"
    has followed: an outage of Phabricator revokes nothing; a definite answer does. A Ready of
    the spec's earlier generation stands until the check of the new one answers (queued at
    once): every spec change bumps the generation, a namespaceSelector edit too, and taking
    the bot as unchecked meanwhile would revoke its live leases. After a changed spec, an
    Unknown answer is not usable until a check has verified it."""
    by_type = {str(c.get("type")): c for c in conditions if isinstance(c, Mapping)}
    ready = (by_type.get(READY) or {}).get("status")
    verified = by_type.get(TOKEN_VERIFIED) or {}
    return ready == "True" or (
        ready == "Unknown"
        and verified.get("status") == "True"
        and verified.get("observedGeneration") == generation
    )


def set_condition(
    conditions: list[Condition], new: Condition, now: datetime.datetime
) -> list[Condition]:
    """Put ``new`` in place of the condition of its type.

    ``lastTransitionTime`` moves only when ``status`` flips (Kubernetes API
    conventions); reason, message and observedGeneration follow ``new``.
    """
    previous = next((c for c in conditions if c.type == new.type), None)
    if previous is not None and previous.status == new.status and previous.last_transition_time:
        stamp = previous.last_transition_time
    else:
        stamp = format_time(now)
    updated = new.model_copy(update={"last_transition_time": stamp})
    rest = [c for c in conditions if c.type != new.type]
    return sorted([*rest, updated], key=lambda c: c.type)


def parse_binding_spec(obj: Mapping[str, Any]) -> tuple[BindingSpec | None, str | None]:
    """A PhabricatorBinding's spec, or None and what is wrong with it: the one parse the
    controller, the endpoint, the webhook and the gateway share. (An invalid binding names
    nobody; the CRD's schema and the admission checks keep most from being stored.)"""
    try:
        return BindingSpec.model_validate(obj.get("spec") or {}), None
    except ValueError as exc:
        return None, f"spec: {exc}"


def parse_bot_spec(obj: Mapping[str, Any]) -> tuple[BotSpec | None, str | None]:
    """A PhabricatorBot's spec, or None and what is wrong with it (see parse_binding_spec)."""
    try:
        return BotSpec.model_validate(obj.get("spec") or {}), None
    except ValueError as exc:
        return None, f"spec: {exc}"


def parse_webhook_spec(obj: Mapping[str, Any]) -> tuple[WebhookSpec | None, str | None]:
    """A PhabricatorWebhook's spec, or None and what is wrong with it (see parse_binding_spec)."""
    try:
        return WebhookSpec.model_validate(obj.get("spec") or {}), None
    except ValueError as exc:
        return None, f"spec: {exc}"


def condition_true(obj: Mapping[str, Any], type_: str) -> bool:
    """Whether ``obj`` shows condition ``type_`` True for its current generation."""
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation")
    for condition in parse_conditions(status.get("conditions")):
        if condition.type == type_:
            return condition.status == "True" and condition.observed_generation == generation
    return False


def label_value(name: str) -> str:
    """An object's name as a label value (the lease's binding and bot labels): at most 63
    characters, ending alphanumeric (a name cut at 63 may end in "-" or ".", which a label
    value may not)."""
    return name[:63].rstrip("-._")
