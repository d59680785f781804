"""The credential endpoint: a pod's projected service-account token in, a credential out.

``POST /v1/credentials`` with ``Authorization: Bearer <token>`` (audience
``phabmesh.io``) → TokenReview (successes cached by token hash for at most
10 s) → the pod's UID → its Active lease (from a watch; no API call), judged by
its binding, its bot and its namespace as the watches show them
(:mod:`phabmesh.leases.grants`), never by what the lease says alone → a credential
that ends no later than the lease's ``expiresAt`` nor the binding's current
``credentialTTL`` from now.

Its format: ``?format=phorge-token`` (``api-`` and 28 characters, like a Phorge
API token: :mod:`phabmesh.credentials.phorge`) or ``?format=jwt`` (a signed JWT:
:mod:`phabmesh.credentials.tokens`); without the parameter, the binding's
``credentialFormat`` (from the same watch), which defaults to the Phorge-shaped token.
Either is minted from the lease and the signing keys alone: no API write.

Also serves ``/.well-known/jwks.json`` and ``/.well-known/openid-configuration``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import cachetools
import structlog
from aiohttp import web

from phabmesh import (
    credentials,
    identity,
    logs,
    metrics,
    ratelimit,
    resources,
    serving,
)
from phabmesh.clock import format_time, utcnow
from phabmesh.credentials.keystore import KeyStore
from phabmesh.kube import KubeClient, KubeError, NotFound
from phabmesh.leases import explain
from phabmesh.leases.grants import BindingFacts, Grants, credential_end
from phabmesh.leases.index import LeaseIndex
from phabmesh.leases.view import LeaseView
from phabmesh.resources import resource_path
from phabmesh.serving import review_source
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
CLIENT_ID_HEADER = "l5d-client-id"
JWKS_PATH = "/.well-known/jwks.json"
MAX_NAME = 253  # a Kubernetes object name
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Credential formats, as ``?format=`` and the answer's ``format`` spell them.
PHORGE_TOKEN = "phorge-token"  # noqa: S105 - a format's name
JWT = "jwt"
FORMAT_PARAMETER = "format"
_FORMATS = {"phorgetoken": PHORGE_TOKEN, "jwt": JWT}  # case, '-' and '_' do not matter
_SPEC_FORMATS = {resources.PHORGE_TOKEN: PHORGE_TOKEN, resources.JWT: JWT}


def requested_format(value: str | None) -> str | None:
    """The format a ``?format=`` value names, None if it is absent; ValueError if unknown."""
    if value is None:
        return None
    wanted = _FORMATS.get(value.strip().lower().replace("-", "").replace("_", ""))
    if wanted is None:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise ValueError(
            f"unknown credential format {shown!r} in query parameter {FORMAT_PARAMETER!r}: "
            f"use {PHORGE_TOKEN} or {JWT}"
        )
    return wanted


class _BadQuery(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _query(request: web.Request) -> tuple[str | None, str | None]:
    """(``binding``, ``format``) from the query string; :class:`_BadQuery` if unusable."""
    wanted = request.query.get("binding")
    if wanted is not None and len(wanted) > MAX_NAME:
        raise _BadQuery("invalid_request", f"binding: a name is at most {MAX_NAME} characters")
    try:
        return wanted, requested_format(request.query.get(FORMAT_PARAMETER))
    except ValueError as exc:
        raise _BadQuery("invalid_format", str(exc)) from exc


def _binding_format(binding: BindingFacts) -> str:
    """The format a binding asks for (``credentialFormat``; the Phorge-shaped token by default)."""
    spec = binding.spec
    return _SPEC_FORMATS[spec.credential_format if spec else resources.PHORGE_TOKEN]


class Reviewed:
    """Who a TokenReview says the caller is."""

    __slots__ = ("namespace", "pod_name", "pod_uid", "service_account")

    def __init__(self, namespace: str, service_account: str, pod_name: str, pod_uid: str) -> None:
        self.namespace = namespace
        self.service_account = service_account
        self.pod_name = pod_name
        self.pod_uid = pod_uid


class RateLimited(Exception):
    """Too many TokenReviews: from this source, its namespace, or everyone together."""

    def __init__(self, retry_after: float, scope: str) -> None:
        super().__init__(f"too many token reviews ({scope})")
        self.retry_after = retry_after
        self.scope = scope


# Refusals for a source's or a namespace's empty TokenReview budget are held before they
# are answered (serving.Holds): at most this many at once, each at most this long.
HELD_REFUSALS = 256
HOLD_SECONDS = 1.0
UNIDENTIFIED = ""  # the namespace budget of callers without a mesh identity
# Requests that may wait for one review in flight for free (its token's retries); those past
# them spend from their budgets as a review would, so a forged token's copies are bounded.
MAX_JOINED = 64
RESERVE_NAMESPACE_SHARE = 0.25  # of the lease holders' reserve, what one namespace may take


class TokenReviewer:
    """TokenReview behind caches and limits of its own, so that junk cannot starve real pods.

    In order: a token reviewed successfully within ``cache_ttl`` passes, and one refused
    within ``negative_ttl`` is refused again, without a review (both cached by the token's
    hash, at most ``cache_size`` of each); a token under review for another request waits
    for that review's answer, spending nothing (:data:`MAX_JOINED` such requests, then each
    spends as below); a token that is not even a JWT for the audience is
    refused without a review; otherwise the review spends, all at once or not at all, from
    the source's own budget (``source_rate``/``source_burst``, by ``l5d-client-id`` or peer
    address), its namespace's (``namespace_rate``/``namespace_burst``: the namespace of its
    mesh identity; callers without one share one), and the reviews' shared budget
    (``rate``/``burst`` less the reserve), which is apart from the Kubernetes client's own.

    The reserve (``reserve_rate``/``reserve_burst``, a part of ``rate``/``burst``) is kept
    for lease holders: a caller whose namespace or the shared budget is empty, but whose mesh
    identity holds an Active lease for the pod its token names (``holds_lease``; the claim
    is unverified until the review, so a forger gains only its own identity's reserve),
    spends from it instead, its namespace at most :data:`RESERVE_NAMESPACE_SHARE` of it.
    A flood from one namespace, however many service accounts it uses, leaves the other
    namespaces their budgets and lease holders theirs.

    An empty budget raises :class:`RateLimited` at once: refusals cost nothing and wait for
    nothing.
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
        namespace_rate: float = 0.0,
        namespace_burst: int = 1,
        reserve_rate: float = 0.0,
        reserve_burst: int = 0,
        cache_size: int = 10_000,
        holds_lease: Callable[[str, str], bool] | None = None,
    ) -> None:
        if reserve_rate > 0 and rate > 0 and (reserve_rate >= rate or reserve_burst >= burst):
            raise ValueError(
                "the TokenReview reserve is a part of the shared budget: set "
                "PHABMESH_TOKEN_REVIEW_RESERVE_QPS and PHABMESH_TOKEN_REVIEW_RESERVE_BURST "
                "below PHABMESH_TOKEN_REVIEW_QPS and PHABMESH_TOKEN_REVIEW_BURST (or the "
                "reserve's QPS to 0)"
            )
        reserved = reserve_rate > 0 and rate > 0
        self.client = client
        self.audience = audience
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        # Successes for cache_ttl, refusals for negative_ttl, at most cache_size of each.
        self._cache: cachetools.TTLCache[str, Reviewed] = cachetools.TTLCache(
            cache_size, max(cache_ttl, 0), timer=clock
        )
        self._refused: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            cache_size, max(negative_ttl, 0), timer=clock
        )
        self._per_source = ratelimit.PerSource(source_rate, source_burst, cache_size, clock)
        self._per_namespace = ratelimit.PerSource(
            namespace_rate, namespace_burst, cache_size, clock
        )
        if reserved:
            self._limit = ratelimit.Bucket(rate - reserve_rate, burst - reserve_burst, clock)
            self._reserve: ratelimit.Bucket | None = ratelimit.Bucket(
                reserve_rate, reserve_burst, clock
            )
            self._reserve_shares = ratelimit.PerSource(
                reserve_rate * RESERVE_NAMESPACE_SHARE,
                max(1, round(reserve_burst * RESERVE_NAMESPACE_SHARE)),
                cache_size,
                clock,
            )
        else:
            self._limit = ratelimit.Bucket(rate, burst, clock)
            self._reserve = None
        # (pod UID the token names, caller's mesh identity) -> an Active lease has both?
        self.holds_lease = holds_lease
        # Reviews under way, by the token's hash: a request with the same token joins its
        # review rather than spend another (a burst of one pod's retries is one review).
        # Past MAX_JOINED callers, a request joins only if its budgets let it.
        self._in_flight: dict[str, tuple[asyncio.Future[Reviewed | None], int]] = {}

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
            namespace_rate=settings.token_review_namespace_qps,
            namespace_burst=settings.token_review_namespace_burst,
            reserve_rate=settings.token_review_reserve_qps,
            reserve_burst=settings.token_review_reserve_burst,
        )

    async def review(
        self,
        token: str,
        source: str = "",
        *,
        namespace: str | None = None,
        mesh_identity: str | None = None,
    ) -> Reviewed | None:
        """Who ``token`` says the caller is (None: nobody); :class:`RateLimited` past the
        budgets. ``source`` is :func:`review_source`; ``mesh_identity`` and ``namespace`` the
        caller's mesh identity (:func:`caller_identity`) and its namespace
        (:func:`caller_namespace`), or None."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(digest)
        if hit is not None:
            metrics.current().token_reviews.labels(result="cached").inc()
            return hit
        if digest in self._refused:
            metrics.current().token_reviews.labels(result="refused_cached").inc()
            return None
        claims = _claims(token, self.audience)
        if claims is None:
            metrics.current().token_reviews.labels(result="not_a_token").inc()
            return None
        pending = self._in_flight.get(digest)
        if pending is not None:  # the same token, under review for another request
            task, joined = pending
            if joined >= MAX_JOINED:  # past these, each pays its budgets as a review would
                self._spend(claims, source, namespace, mesh_identity)
            self._in_flight[digest] = (task, joined + 1)
            metrics.current().token_reviews.labels(result="joined").inc()
            return await asyncio.shield(task)
        self._spend(claims, source, namespace, mesh_identity)
        task = asyncio.ensure_future(self._review(token, digest))
        self._in_flight[digest] = (task, 0)
        task.add_done_callback(functools.partial(self._review_done, digest))
        # Shielded: a caller that goes away leaves the review to those who joined it.
        return await asyncio.shield(task)

    def _review_done(self, digest: str, task: asyncio.Future[Reviewed | None]) -> None:
        pending = self._in_flight.get(digest)
        if pending is not None and pending[0] is task:
            del self._in_flight[digest]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away

    async def _review(self, token: str, digest: str) -> Reviewed | None:
        """One TokenReview, its answer cached."""
        status = await self.client.token_review(token, [self.audience], limited=False)
        result = _reviewed(status, self.audience)
        if result is not None:
            metrics.current().token_reviews.labels(result="authenticated").inc()
            if self.cache_ttl > 0:
                self._cache[digest] = result
        else:
            metrics.current().token_reviews.labels(result="refused").inc()
            if self.negative_ttl > 0:
                self._refused[digest] = True
        return result

    def _spend(
        self,
        claims: dict[str, Any],
        source: str,
        namespace: str | None,
        mesh_identity: str | None,
    ) -> None:
        """One review from the budgets (all of them or none), else :class:`RateLimited`."""
        own = self._per_source.bucket(source)
        share = self._per_namespace.bucket(namespace or UNIDENTIFIED)
        wait = ratelimit.take_all(own, share, self._limit)
        if wait == 0:
            return
        scope = "source" if own.wait() > 0 else "namespace" if share.wait() > 0 else "all"
        if (
            scope != "source"
            and self._reserve is not None
            and namespace
            and mesh_identity
            and self.holds_lease is not None
            and self.holds_lease(_claimed_pod_uid(claims), mesh_identity)
        ):
            reserve_share = self._reserve_shares.bucket(namespace)
            if ratelimit.take_all(own, reserve_share, self._reserve) == 0:
                metrics.current().token_reviews.labels(result="reserve").inc()
                return
        metrics.current().token_reviews.labels(result=f"limited_{scope}").inc()
        raise RateLimited(wait, scope)


def caller_identity(
    client_id: str | None, peer: str | None, local: str | None = None
) -> str | None:
    """The caller's mesh identity, when the connection shows one (as :func:`review_source`
    trusts ``l5d-client-id``: from the serving pod's own proxy only)."""
    vouched = identity.vouched_client_id(client_id, peer, local)
    return vouched if vouched and len(vouched) <= MAX_NAME else None


def caller_namespace(mesh_identity: str | None, naming: identity.Naming) -> str | None:
    """The namespace of a mesh identity of this cluster (a service account's), else None."""
    parsed = identity.parse_identity(mesh_identity, naming) if mesh_identity else None
    return parsed[1] if parsed else None


def _claims(token: str, audience: str) -> dict[str, Any] | None:
    """The unverified claims of ``token`` if it could be a service-account token for
    ``audience``, else None.

    A projected token is a JWT whose ``aud`` names the audience; anything else would fail
    its TokenReview, so it is refused without one.
    """
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 16_384:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    aud = payload.get("aud")
    if aud == audience or (isinstance(aud, list) and audience in aud):
        return payload
    return None


def _claimed_pod_uid(claims: dict[str, Any]) -> str:
    """The pod UID a service-account token says it is bound to (unverified), else ""."""
    kube = claims.get("kubernetes.io")
    pod = kube.get("pod") if isinstance(kube, dict) else None
    uid = pod.get("uid") if isinstance(pod, dict) else None
    return uid if isinstance(uid, str) else ""


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


def _unvouched(request: web.Request) -> web.Response | None:
    """The refusal of a call whose ``l5d-client-id`` Linkerd's inbound proxy does not vouch
    for, or None."""
    header = request.headers.get(CLIENT_ID_HEADER)
    if (
        identity.vouched_client_id(header, request.remote, serving.local_address(request))
        is not None
    ):
        return None
    if header:
        why = (
            f"{CLIENT_ID_HEADER} came from {request.remote}, not from this pod's Linkerd proxy "
            "(a port the proxy skips, or a header the caller wrote)"
        )
    else:
        why = f"the call carried no {CLIENT_ID_HEADER}: it did not arrive over Linkerd mTLS"
    return _error(
        403,
        "no_client_id",
        f"this credential endpoint requires a meshed caller (PHABMESH_REQUIRE_CLIENT_ID): {why}; "
        "mesh the calling pod (linkerd.io/inject: enabled) and call the endpoint through "
        "its Service",
    )


# Why a response refused, for phabmesh_credential_refusals_total and the audit line.
REFUSAL = web.ResponseKey("phabmesh.refusal", str)


def _error(
    status: int, code: str, message: str, *, reason: str | None = None, **extra: Any
) -> web.Response:
    """A refusal answering ``code``; ``reason`` (default: the code) is what metrics count."""
    response = web.json_response({"error": code, "message": message, **extra}, status=status)
    response[REFUSAL] = reason or code
    return response


# The refusal path's explanations (CredentialEndpoint._why_no_lease).
EXPLAIN_TTL = 2.0  # seconds an explanation is given again without reading the API
EXPLAIN_MEMORY = 4096  # explanations remembered, the oldest forgotten first
EXPLAIN_QPS = 20.0  # explanations read from the API per second (3 reads each), at most
EXPLAIN_BURST = 40
# Of these, one pod's and one namespace's (the reviewed token's): one pod, or one tenant's
# pods, cannot spend everyone's.
EXPLAIN_POD_QPS = 1.0
EXPLAIN_POD_BURST = 5
EXPLAIN_NAMESPACE_QPS = 5.0
EXPLAIN_NAMESPACE_BURST = 10


class CredentialEndpoint:
    def __init__(
        self,
        settings: Settings,
        client: KubeClient,
        keys: KeyStore,
        leases: LeaseIndex,
        reviewer: TokenReviewer,
        clock: Callable[[], datetime.datetime] | None = None,
        grants: Grants | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.keys = keys
        self.leases = leases
        self.reviewer = reviewer
        self.clock = clock or utcnow
        self.naming = identity.Naming(
            control_plane_namespace=settings.linkerd_namespace,
            trust_domain=settings.trust_domain,
        )
        # Its own watches (the process runs them): a standby replica, whose controller
        # is paused, judges leases as well as the acting one.
        self.grants = grants or Grants(client, self.naming)
        if reviewer.holds_lease is None:  # the reserve of TokenReviews is kept for them
            reviewer.holds_lease = self._holds_lease
        # The refusal path's explanations: a few seconds per (pod, binding asked for), and
        # a budget of their own, so that a caller repeating a refused request (its token
        # review cached) costs the API server nothing more.
        self._explained: cachetools.TTLCache[tuple[str, str | None], str] = cachetools.TTLCache(
            EXPLAIN_MEMORY, EXPLAIN_TTL, timer=time.monotonic
        )
        self._explain_budget = ratelimit.Bucket(EXPLAIN_QPS, EXPLAIN_BURST)
        self.holds = serving.Holds(HELD_REFUSALS, HOLD_SECONDS)
        self._explain_per_pod = ratelimit.PerSource(EXPLAIN_POD_QPS, EXPLAIN_POD_BURST)
        self._explain_per_namespace = ratelimit.PerSource(
            EXPLAIN_NAMESPACE_QPS, EXPLAIN_NAMESPACE_BURST
        )

    @property
    def ready(self) -> bool:
        return (
            self.keys.ready and self.leases.synced and self.leases.connected and self.grants.healthy
        )

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
        recorded = metrics.current()
        recorded.credential_requests.labels(outcome=outcome).inc()
        recorded.credential_latency.observe(elapsed)
        if response.status != 200:
            reason = response.get(REFUSAL, metrics.OTHER)
            recorded.credential_refused(reason)
            audit[logs.REASON] = metrics.bounded(reason, metrics.CREDENTIAL_REFUSALS)
        log.info(
            "credential_requested",
            status=response.status,
            latency_ms=round(elapsed * 1000, 2),
            **audit,
        )
        return response

    async def _issue(self, request: web.Request, audit: dict[str, str]) -> web.Response:
        if (refusal := self._refused_at_once(request)) is not None:
            return refusal
        try:  # before any review: the query is the caller's, and cheap to refuse
            wanted, wanted_format = _query(request)
        except _BadQuery as exc:
            return _error(400, exc.code, str(exc))
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(
                401,
                "invalid_token",
                "send the pod's projected service-account token as 'Authorization: Bearer ...'",
            )
        client_id = request.headers.get(CLIENT_ID_HEADER)
        local = serving.local_address(request)
        mesh_identity = caller_identity(client_id, request.remote, local)
        try:
            who = await self.reviewer.review(
                token.strip(),
                review_source(client_id, request.remote, local),
                namespace=caller_namespace(mesh_identity, self.naming),
                mesh_identity=mesh_identity,
            )
        except RateLimited as exc:
            return await self._rate_limited(exc)
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
        held, refused = self._held(who, wanted, now)
        if not held and refused:
            name, problem = min(refused.items())
            return _error(
                403,
                "no_lease",
                f'the credential lease of PhabricatorBinding "{name}" is not honoured: '
                f"{_REFUSALS.get(problem) or resources.revocation_message(problem)}",
                reason=problem,
            )
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
        if client_id is not None and client_id != lease.identity:
            return _error(
                403,
                "identity_mismatch",
                f"the mTLS client identity does not match the pod's identity {lease.identity}",
            )
        binding = self.grants.binding(lease.namespace, lease.binding)
        end = credential_end(lease, binding, now) if binding is not None else None
        if end is None or end <= now:
            return _error(
                403,
                "no_lease",
                "the credential lease has ended: retry shortly",
                reason="lease_ended",
            )
        assert binding is not None
        credential_format = wanted_format or _binding_format(binding)
        audit.update(
            {
                logs.BINDING: lease.binding,
                logs.BOT: lease.bot,
                logs.CREDENTIAL_FORMAT: credential_format,
            }
        )
        return self._mint(lease, now, end, credential_format)

    async def _rate_limited(self, exc: RateLimited) -> web.Response:
        """The refusal for an empty TokenReview budget, held first when the budget was the
        caller's own or its namespace's (a flood waits for its answers)."""
        held = 0.0
        if exc.scope in _SCOPES:
            held = await self.holds.hold(exc.retry_after)
        retry = math.ceil(max(0.0, exc.retry_after - held))  # what is left of the wait
        scope = _SCOPES.get(exc.scope, "at once")
        refusal = _error(
            429, "rate_limited", f"too many credential requests ({scope}); retry in {retry} s"
        )
        refusal.headers["Retry-After"] = str(retry)
        return refusal

    def _refused_at_once(self, request: web.Request) -> web.Response | None:
        """A refusal that needs no review: the endpoint is starting, or the call did not
        come over Linkerd mTLS while PHABMESH_REQUIRE_CLIENT_ID asks for it (the identity
        itself is compared with the pod's once its lease is known)."""
        if not self.ready:
            return _error(
                503,
                "not_ready",
                "the credential endpoint is starting, or has lost a watch it judges by; "
                "retry shortly",
            )
        if self.settings.require_client_id:
            return _unvouched(request)
        return None

    def _holds_lease(self, pod_uid: str, mesh_identity: str) -> bool:
        """Does ``mesh_identity`` hold an Active lease for pod ``pod_uid`` (the watch's view)?"""
        return bool(pod_uid) and any(
            lease.active and lease.identity == mesh_identity
            for lease in self.leases.of_pod(pod_uid)
        )

    def _held(
        self, who: Reviewed, wanted: str | None, now: datetime.datetime
    ) -> tuple[list[LeaseView], dict[str, str]]:
        """The pod's leases to be honoured, and why each other Active lease is not."""
        pod_identity = identity.linkerd_identity(who.service_account, who.namespace, self.naming)
        honoured: list[LeaseView] = []
        refused: dict[str, str] = {}
        for lease in self.leases.of_pod(who.pod_uid):
            if not lease.active or lease.expires_at is None or lease.expires_at <= now:
                continue
            if wanted and lease.binding != wanted:
                continue
            problem = self._refusal(lease, who, pod_identity)
            if problem is None:
                honoured.append(lease)
            else:
                refused[lease.binding] = problem
        return honoured, refused

    def _refusal(self, lease: LeaseView, who: Reviewed, pod_identity: str) -> str | None:
        """Why this pod may not have a credential from ``lease`` (a revocation reason)."""
        if (lease.namespace, lease.pod_name, lease.identity) != (
            who.namespace,
            who.pod_name,
            pod_identity,
        ):
            return _MISMATCH
        return self.grants.refusal(lease)

    def _mint(
        self, lease: LeaseView, now: datetime.datetime, end: datetime.datetime, fmt: str
    ) -> web.Response:
        """A credential made from the lease and the ring alone: no API call, no write.

        ``end`` is when it must end at the latest (:func:`credential_end`); both
        mints also cap it at the maximum TTL and round it down to whole seconds.
        """
        assert self.keys.ring is not None
        ttl = datetime.timedelta(seconds=self.settings.max_credential_ttl)
        if fmt == PHORGE_TOKEN:
            token = credentials.phorge.mint(
                self.keys.ring,
                lease_uid=lease.uid,
                digest=lease.phorge_digest(),
                now=now,
                not_after=end,
                ttl=ttl,
            )
        else:
            token = credentials.mint(
                self.keys.ring,
                issuer=self.settings.issuer,
                audience=self.settings.credential_audience,
                subject=lease.identity,
                now=now,
                not_after=end,
                pod=lease.pod_name,
                pod_uid=lease.pod_uid,
                namespace=lease.namespace,
                binding=lease.binding,
                bot=lease.bot,
                bot_phid=lease.bot_phid,
                lease_uid=lease.uid,
                ttl=ttl,
            )
        expires = min(end, now + ttl).replace(microsecond=0)
        return web.json_response(
            {
                "credential": token,
                "format": fmt,
                "expiresAt": format_time(expires),
                "identity": lease.identity,
                "binding": lease.binding,
                "bot": lease.bot,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _why_no_lease(self, who: Reviewed, wanted: str | None) -> str:
        """The one reason the caller holds no credential (error path only).

        What the watches tell (a late renewal, a binding name that is not in the namespace)
        costs no API read. Else the explanation is remembered for :data:`EXPLAIN_TTL` per pod
        and binding (an existing one: a made-up name cannot multiply the reads), within
        budgets of API reads per pod, per namespace and in all (:data:`EXPLAIN_QPS`); past
        them, the plain answer."""
        leases = [
            lease
            for lease in self.leases.of_pod(who.pod_uid)
            if not wanted or lease.binding == wanted
        ]
        late = [x for x in leases if x.active and x.expires_at and x.expires_at <= self.clock()]
        if late:
            return (
                f"credential lease {late[0].name} has expired (its renewal is late): retry shortly"
            )
        if wanted and self.grants.binding(who.namespace, wanted) is None:
            return f'no PhabricatorBinding "{wanted}" in namespace {who.namespace}'
        key = (who.pod_uid, wanted)
        known = self._explained.get(key)
        if known is not None:
            return known
        if ratelimit.take_all(
            self._explain_per_pod.bucket(who.pod_uid),
            self._explain_per_namespace.bucket(who.namespace),
            self._explain_budget,
        ):
            return "no active credential lease for this pod"
        reason = await self._explain(who, wanted, leases)
        self._explained[key] = reason
        return reason

    async def _explain(self, who: Reviewed, wanted: str | None, leases: list[LeaseView]) -> str:
        """From the decision the operator makes (:func:`phabmesh.leases.explain.
        explain_from_objects`) over the pod, its namespace's bindings and the bots as the API
        server shows them now, and the pod's ``leases`` as this process's watch shows them."""
        try:
            pod = await self.client.get(
                resource_path("", "v1", "pods", who.namespace, who.pod_name)
            )
        except NotFound:
            return "the pod no longer exists"
        except KubeError:
            return "no active credential lease for this pod"
        facts = identity.PodFacts.from_pod(pod, self.naming)
        if facts.uid != who.pod_uid:
            return "the pod no longer exists (another pod has its name now)"
        try:
            listing, bots = await asyncio.gather(
                self.client.get(resources.binding_path(who.namespace)),
                self.client.get(resources.bot_path()),
            )
        except KubeError:
            return "no active credential lease for this pod"
        bindings = [
            body
            for body in listing.get("items") or []
            if not wanted or (body.get("metadata") or {}).get("name") == wanted
        ]
        explanation = explain.explain_from_objects(
            facts,
            bindings,
            self.naming,
            bots=bots.get("items") or [],
            namespace_labels=self.grants.namespaces.items.get(who.namespace),
            leases=leases,
        )
        if wanted and not bindings:
            return f'no PhabricatorBinding "{wanted}" in namespace {who.namespace}'
        return explanation.message


_MISMATCH = "LeaseMismatch"
# Whose TokenReview budget was empty, for the caller (RateLimited.scope).
_SCOPES = {"source": "from this source", "namespace": "from this namespace"}
# Why a lease is not honoured, for the caller.
_REFUSALS = {_MISMATCH: "it names another pod or identity"}  # else the reason's one message
