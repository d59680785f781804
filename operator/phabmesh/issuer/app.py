"""The credential endpoint: a pod's projected service-account token in, a credential out.

``POST /v1/credentials`` with ``Authorization: Bearer <token>`` (audience
``phabmesh.io``) → TokenReview (successes cached by token hash for at most
10 s) → the pod's UID → its Active lease (from a watch; no API call) → a signed
credential whose ``exp`` never passes the lease's ``expiresAt``.

Also serves ``/.well-known/jwks.json`` and ``/.well-known/openid-configuration``.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web

from phabmesh import credentials, identity, logs, matching, metrics, ratelimit, resources
from phabmesh.keystore import KeyStore
from phabmesh.kube import KubeClient, KubeError, NotFound
from phabmesh.kube.client import resource_path
from phabmesh.lease import LeaseView
from phabmesh.leasewatch import LeaseIndex
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
CLIENT_ID_HEADER = "l5d-client-id"
JWKS_PATH = "/.well-known/jwks.json"
MAX_NAME = 253  # a Kubernetes object name
LOOPBACK = frozenset({"127.0.0.1", "::1"})
DISCOVERY_PATH = "/.well-known/openid-configuration"


class Reviewed:
    """Who a TokenReview says the caller is."""

    __slots__ = ("namespace", "pod_name", "pod_uid", "service_account")

    def __init__(self, namespace: str, service_account: str, pod_name: str, pod_uid: str) -> None:
        self.namespace = namespace
        self.service_account = service_account
        self.pod_name = pod_name
        self.pod_uid = pod_uid


class RateLimited(Exception):
    """Too many TokenReviews: from this source, or from everyone together."""

    def __init__(self, retry_after: float, scope: str) -> None:
        super().__init__(f"too many token reviews ({scope})")
        self.retry_after = retry_after
        self.scope = scope


class TokenReviewer:
    """TokenReview behind caches and limits of its own, so that junk cannot starve real pods.

    In order: a token reviewed successfully within ``cache_ttl`` passes, and one refused
    within ``negative_ttl`` is refused again, without a review (both cached by the token's
    hash, at most ``cache_size`` of each); a token that is not even a JWT for the audience is
    refused without a review; otherwise the review spends from the source's own budget
    (``source_rate``/``source_burst``, by ``l5d-client-id`` or peer address), then from
    the reviews' shared budget (``rate``/``burst``), which is apart from the Kubernetes
    client's own. An empty budget raises :class:`RateLimited` at once: refusals cost
    nothing and wait for nothing.
    """

    def __init__(
        self,
        client: KubeClient,
        audience: str,
        cache_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        negative_ttl: float = 0.0,
        rate: float = 0.0,
        burst: int = 1,
        source_rate: float = 0.0,
        source_burst: int = 1,
        cache_size: int = 10_000,
    ) -> None:
        self.client = client
        self.audience = audience
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self.cache_size = cache_size
        self._cache: collections.OrderedDict[str, tuple[float, Reviewed]] = (
            collections.OrderedDict()
        )
        self._refused: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._limit = ratelimit.Bucket(rate, burst, clock)
        self._per_source = ratelimit.PerSource(source_rate, source_burst, cache_size, clock)

    @classmethod
    def from_settings(cls, client: KubeClient, settings: Settings) -> TokenReviewer:
        return cls(
            client,
            settings.token_audience,
            settings.token_review_cache_ttl,
            negative_ttl=settings.token_review_negative_cache_ttl,
            rate=settings.token_review_qps,
            burst=settings.token_review_burst,
            source_rate=settings.token_review_source_qps,
            source_burst=settings.token_review_source_burst,
        )

    async def review(self, token: str, source: str = "") -> Reviewed | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            metrics.TOKEN_REVIEWS.labels(result="cached").inc()
            return hit[1]
        refused_until = self._refused.get(digest)
        if refused_until is not None and refused_until > now:
            metrics.TOKEN_REVIEWS.labels(result="refused_cached").inc()
            return None
        if not _plausible(token, self.audience):
            metrics.TOKEN_REVIEWS.labels(result="not_a_token").inc()
            return None
        # The source's budget first: a flooding source spends nothing of everyone's.
        wait = self._per_source.take(source)
        scope = "source"
        if wait == 0:
            wait, scope = self._limit.take(), "all"
        if wait > 0:
            metrics.TOKEN_REVIEWS.labels(result=f"limited_{scope}").inc()
            raise RateLimited(wait, scope)
        status = await self.client.token_review(token, [self.audience], limited=False)
        result = _reviewed(status, self.audience)
        now = self.clock()
        if result is not None:
            metrics.TOKEN_REVIEWS.labels(result="authenticated").inc()
            if self.cache_ttl > 0:
                _remember(self._cache, digest, (now + self.cache_ttl, result), self.cache_size)
        else:
            metrics.TOKEN_REVIEWS.labels(result="refused").inc()
            if self.negative_ttl > 0:
                _remember(self._refused, digest, now + self.negative_ttl, self.cache_size)
        return result


def review_source(client_id: str | None, peer: str | None) -> str:
    """Whose TokenReview budget a call spends.

    Behind Linkerd every call comes from the local proxy (a loopback peer), which sets
    ``l5d-client-id`` for a meshed caller: that identity is the source, and unmeshed callers
    share the proxy's budget. From any other peer the header proves nothing (anyone can
    send it), so the peer's address is the source.
    """
    address = peer or ""
    if client_id and address in LOOPBACK:
        if len(client_id) > MAX_NAME:  # no identity is that long: keep the key small anyway
            return "id-sha256:" + hashlib.sha256(client_id.encode()).hexdigest()
        return "id:" + client_id
    return "peer:" + address


def _remember(cache: collections.OrderedDict[str, T], key: str, value: T, size: int) -> None:
    """Insert, dropping the oldest entries past ``size`` (every entry lives as long)."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > size:
        cache.popitem(last=False)


def _plausible(token: str, audience: str) -> bool:
    """Could ``token`` be a service-account token for ``audience``? (Unverified: a filter.)

    A projected token is a JWT whose ``aud`` names the audience; anything else would fail
    its TokenReview, so it is refused without one.
    """
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16_384:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return False
    aud = payload.get("aud") if isinstance(payload, dict) else None
    return aud == audience or (isinstance(aud, list) and audience in aud)


def _reviewed(status: dict[str, Any], audience: str) -> Reviewed | None:
    if not status.get("authenticated"):
        return None
    if audience not in (status.get("audiences") or [audience]):
        return None
    user = status.get("user") or {}
    parts = str(user.get("username", "")).split(":")
    extra = user.get("extra") or {}
    pod_names, pod_uids = extra.get(POD_NAME) or [], extra.get(POD_UID) or []
    if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
        return None
    if not pod_names or not pod_uids:
        return Reviewed(parts[2], parts[3], "", "")
    return Reviewed(parts[2], parts[3], str(pod_names[0]), str(pod_uids[0]))


def _error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


class Issuer:
    def __init__(
        self,
        settings: Settings,
        client: KubeClient,
        keys: KeyStore,
        leases: LeaseIndex,
        reviewer: TokenReviewer,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys
        self.leases = leases
        self.reviewer = reviewer
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.naming = identity.Naming(
            control_plane_namespace=settings.linkerd_namespace,
            trust_domain=settings.trust_domain,
        )

    @property
    def ready(self) -> bool:
        return self.keys.ready and self.leases.synced and self.leases.connected

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/credentials", self.issue)
        app.router.add_get(JWKS_PATH, self.jwks)
        app.router.add_get(DISCOVERY_PATH, self.discovery)

    async def jwks(self, request: web.Request) -> web.Response:
        if self.keys.ring is None:
            return _error(503, "not_ready", "signing keys are not loaded yet")
        return web.json_response(
            credentials.jwks(self.keys.ring), headers={"Cache-Control": "max-age=60"}
        )

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response(
            credentials.discovery_document(
                self.settings.issuer, self.settings.issuer.rstrip("/") + JWKS_PATH
            )
        )

    async def issue(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        audit: dict[str, str] = {}
        response = await self._issue(request, audit)
        elapsed = time.perf_counter() - started
        outcome = "issued" if response.status == 200 else f"refused_{response.status}"
        metrics.CREDENTIAL_REQUESTS.labels(outcome=outcome).inc()
        metrics.CREDENTIAL_LATENCY.observe(elapsed)
        log.info(
            "credential_requested",
            status=response.status,
            latency_ms=round(elapsed * 1000, 2),
            **audit,
        )
        return response

    async def _issue(self, request: web.Request, audit: dict[str, str]) -> web.Response:
        if not self.ready:
            return _error(503, "not_ready", "the credential endpoint is starting; retry shortly")
        wanted = request.query.get("binding")
        if wanted is not None and len(wanted) > MAX_NAME:
            # Refused before any review: the only query parameter is a name, and bounded.
            return _error(
                400, "invalid_request", f"binding: a name is at most {MAX_NAME} characters"
            )
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(
                401,
                "invalid_token",
                "send the pod's projected service-account token as 'Authorization: Bearer ...'",
            )
        source = review_source(request.headers.get(CLIENT_ID_HEADER), request.remote)
        try:
            who = await self.reviewer.review(token.strip(), source)
        except RateLimited as exc:
            retry = max(1, math.ceil(exc.retry_after))
            scope = "from this source" if exc.scope == "source" else "at once"
            refusal = _error(
                429, "rate_limited", f"too many credential requests ({scope}); retry in {retry} s"
            )
            refusal.headers["Retry-After"] = str(retry)
            return refusal
        except KubeError as exc:
            log.warning("token_review_failed", **{logs.ERROR: str(exc)})
            return _error(503, "review_unavailable", "TokenReview failed; retry shortly")
        if who is None:
            return _error(
                401,
                "invalid_token",
                f"the token is not a valid service-account token for audience "
                f'"{self.settings.token_audience}" (expired, revoked or another audience)',
            )
        if not who.pod_uid:
            return _error(
                401,
                "invalid_token",
                "the token is not bound to a pod: use a projected service-account token",
            )
        audit.update({logs.NAMESPACE: who.namespace, logs.POD: who.pod_name})
        now = self.clock()
        held = [
            lease
            for lease in self.leases.of_pod(who.pod_uid)
            if lease.active and lease.expires_at is not None and lease.expires_at > now
        ]
        if wanted:
            held = [lease for lease in held if lease.binding == wanted]
        if not held:
            reason = await self._why_no_lease(who, wanted)
            return _error(403, "no_lease", reason)
        if len(held) > 1:
            names = sorted(lease.binding for lease in held)
            return _error(
                409,
                "ambiguous_binding",
                "several bindings grant this pod a credential: choose one with ?binding=NAME",
                bindings=names,
            )
        lease = held[0]
        client_id = request.headers.get(CLIENT_ID_HEADER)
        if client_id is not None and client_id != lease.identity:
            return _error(
                403,
                "identity_mismatch",
                f"the mTLS client identity does not match the pod's identity {lease.identity}",
            )
        audit.update({logs.BINDING: lease.binding, logs.BOT: lease.bot})
        return self._mint(lease, now)

    def _mint(self, lease: LeaseView, now: datetime.datetime) -> web.Response:
        assert self.keys.ring is not None and lease.expires_at is not None
        token = credentials.mint(
            self.keys.ring,
            issuer=self.settings.issuer,
            audience=self.settings.credential_audience,
            subject=lease.identity,
            now=now,
            not_after=lease.expires_at,
            pod=lease.pod_name,
            pod_uid=lease.pod_uid,
            namespace=lease.namespace,
            binding=lease.binding,
            bot=lease.bot,
            bot_phid=lease.bot_phid,
            lease_uid=lease.uid,
        )
        return web.json_response(
            {
                "credential": token,
                "expiresAt": lease.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "identity": lease.identity,
                "binding": lease.binding,
                "bot": lease.bot,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _why_no_lease(self, who: Reviewed, wanted: str | None) -> str:
        """A reason the caller can act on (error path only: may call the API server)."""
        try:
            pod = await self.client.get(
                resource_path("", "v1", "pods", who.namespace, who.pod_name)
            )
        except NotFound:
            return "the pod no longer exists"
        except KubeError:
            return "no active credential lease for this pod"
        facts = identity.PodFacts.from_pod(pod)
        if facts.uid != who.pod_uid or facts.terminating:
            return "the pod is terminating: its credential was revoked"
        if facts.phase != "Running":
            return f"the pod is {facts.phase}, not Running"
        if not facts.meshed:
            return "the pod is not meshed (no linkerd-proxy): only meshed pods get credentials"
        try:
            listing = await self.client.get(
                resource_path(
                    resources.GROUP, resources.VERSION, resources.BINDING_PLURAL, who.namespace
                )
            )
        except KubeError:
            return "no active credential lease for this pod"
        pod_identity = identity.linkerd_identity(
            facts.service_account, facts.namespace, self.naming
        )
        for body in listing.get("items") or []:
            name = body["metadata"]["name"]
            if wanted and name != wanted:
                continue
            try:
                spec = resources.BindingSpec.model_validate(body.get("spec") or {})
            except ValueError:
                continue
            if not matching.matches(spec, who.namespace, facts, self.naming):
                continue
            ready = next(
                (
                    c
                    for c in (body.get("status") or {}).get("conditions") or []
                    if c.get("type") == "Ready"
                ),
                None,
            )
            if ready is None or ready.get("status") != "True":
                detail = (ready or {}).get("message") or "not reconciled yet"
                return f'PhabricatorBinding "{name}" matches this pod but is not Ready: {detail}'
            return f'PhabricatorBinding "{name}" matches; the credential is being issued: retry'
        scope = f'named "{wanted}" ' if wanted else ""
        return (
            f"no PhabricatorBinding {scope}in namespace {who.namespace} matches "
            f"identity {pod_identity}"
        )
