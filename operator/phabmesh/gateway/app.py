"""The Conduit gateway: ``/api/<method>`` exactly as Phabricator serves it.

Per call: find the credential wherever Conduit clients put a token, verify it
(signature, time, audience, issuer), confirm its lease is Active (from the
watch) and its pod is not terminating or gone (from a watch of pods), check the
binding's method allowlist and the ``l5d-client-id``, swap in the bot's real
token, forward over a pooled keep-alive connection, and answer.
Every refusal is HTTP 200 in Conduit's own envelope, like Phorge; one audit
line per call.

Documented errors (``error_code``):

- ``ERR-INVALID-SESSION``: no credential at all.
- ``ERR-INVALID-AUTH``: the credential is malformed, forged, expired, not yet
  valid, for another audience or issuer, or its lease is revoked or unknown;
  also when the lease cannot be confirmed because the gateway's watch is down
  (fail closed) and when ``l5d-client-id`` does not match. ``error_info`` says
  which.
- ``ERR-CONDUIT-CORE``: the method is not in the binding's ``allowedMethods``.
- ``ERR-PHABRICATOR-UNAVAILABLE`` (HTTP 503): Phabricator could not be reached,
  timed out, or answered 5xx.
- ``ERR-REQUEST-TOO-LARGE`` (HTTP 413): the body (after decompression) is over
  the limit.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from phabmesh import credentials, logs, matching, metrics, serving
from phabmesh.conduit import wire
from phabmesh.gateway.state import GatewayState
from phabmesh.settings import Settings

log = structlog.get_logger("phabmesh.audit")

NO_CREDENTIAL_METHODS = frozenset({"conduit.ping", "conduit.getcapabilities"})
CLIENT_ID_HEADER = "l5d-client-id"
# Response headers that matter to Conduit clients; everything else (cookies!) stays behind.
PASSED_HEADERS = ("Content-Type", "X-Conduit-Capabilities", "Cache-Control", "Expires")


def envelope(code: str, info: str, status: int = 200) -> web.Response:
    body = json.dumps({"result": None, "error_code": code, "error_info": info})
    return web.Response(
        status=status, body=body.encode(), headers={"Content-Type": "application/json"}
    )


class Refusal(Exception):
    def __init__(self, code: str, info: str, decision: str, status: int = 200) -> None:
        super().__init__(info)
        self.code = code
        self.info = info
        self.decision = decision
        self.status = status

    def response(self) -> web.Response:
        return envelope(self.code, self.info, self.status)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        state: GatewayState,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self.upstream = settings.phabricator_url.rstrip("/")
        self.verified = credentials.VerifiedCache()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/{method}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        method = request.match_info["method"]
        audit: dict[str, Any] = {logs.METHOD: method}
        try:
            response = await self._handle(request, method, audit)
            decision = audit.get(logs.DECISION, "allowed")
        except Refusal as refusal:
            response = refusal.response()
            decision = refusal.decision
            audit["error_code"] = refusal.code
            audit["error_info"] = refusal.info
        elapsed = time.perf_counter() - started
        metrics.GATEWAY_REQUESTS.labels(method=_metric_method(method), decision=decision).inc()
        metrics.GATEWAY_LATENCY.labels(decision=decision).observe(elapsed)
        audit[logs.DECISION] = decision
        log.info("conduit_call", latency_ms=round(elapsed * 1000, 2), **audit)
        return response

    async def _handle(
        self, request: web.Request, method: str, audit: dict[str, Any]
    ) -> web.StreamResponse:
        body = await self._read_body(request)
        try:
            call = serving.decode_conduit(request, body, self.settings.max_request_bytes)
        except wire.RequestTooLarge as exc:
            raise Refusal("ERR-REQUEST-TOO-LARGE", str(exc), "too_large", 413) from exc
        except wire.BadRequest as exc:
            # Phorge answers malformed bodies with ERR-CONDUIT-CORE; so do we.
            raise Refusal("ERR-CONDUIT-CORE", exc.info(method), "bad_request") from exc
        if method in NO_CREDENTIAL_METHODS:
            audit[logs.DECISION] = "public"
            return await self._forward(method, call.without_token(), None, audit)
        if not call.token:
            raise Refusal("ERR-INVALID-SESSION", "Session key is not present.", "no_credential")
        claims = self._verify(call.token)
        audit.update(
            {
                logs.IDENTITY: claims.subject,
                logs.NAMESPACE: claims.namespace,
                logs.POD: claims.pod,
                logs.BINDING: claims.binding,
                logs.BOT: claims.bot,
            }
        )
        self._check_lease(claims)
        rules = self.state.binding(claims.namespace, claims.binding)
        if rules is None or rules.deleting:
            raise _revoked(_REASONS["BindingDeleted"])
        client_id = request.headers.get(CLIENT_ID_HEADER)
        if client_id is not None and client_id != claims.subject:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential refused: the mTLS client identity (l5d-client-id) "
                "does not match the credential's identity",
                "identity_mismatch",
            )
        if rules.require_client_id and client_id is None:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential refused: this binding requires calls over Linkerd mTLS "
                "(no l5d-client-id)",
                "no_client_id",
            )
        if not matching.method_allowed(method, rules.allowed_methods):
            raise Refusal(
                "ERR-CONDUIT-CORE",
                f"phabmesh: method {method} is not allowed by PhabricatorBinding "
                f"{claims.namespace}/{claims.binding} (allowedMethods: "
                f"{', '.join(rules.allowed_methods)})",
                "method_denied",
            )
        token = self.state.bot_token(claims.bot)
        if token is None:
            raise Refusal(
                "ERR-INVALID-AUTH",
                f"credential refused: the token of bot {claims.bot} is not available",
                "bot_token_missing",
            )
        return await self._forward(method, call.with_token(token), token, audit)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(
                "ERR-REQUEST-TOO-LARGE", f"request body over {limit} bytes", "too_large", 413
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise Refusal(
                    "ERR-REQUEST-TOO-LARGE", f"request body over {limit} bytes", "too_large", 413
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _verify(self, token: str) -> credentials.Claims:
        ring = self.state.keys.ring
        if ring is None:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential cannot be verified yet: keys not loaded",
                "not_ready",
            )
        try:
            return self.verified.verify(
                token,
                ring,
                audience=self.settings.credential_audience,
                issuer=self.settings.issuer,
                now=self.clock(),
                leeway=datetime.timedelta(seconds=self.settings.clock_skew),
            )
        except credentials.CredentialError as exc:
            raise Refusal("ERR-INVALID-AUTH", f"credential refused: {exc}", "invalid") from exc

    def _check_lease(self, claims: credentials.Claims) -> None:
        leases = self.state.leases
        if not leases.connected:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential cannot be confirmed: the gateway has lost its watch on leases; "
                "retry shortly",
                "unconfirmed",
            )
        lease = leases.by_uid.get(claims.lease_uid)
        if lease is None:
            reason = leases.tombstones.get(claims.lease_uid)
            raise _revoked(
                _REASONS.get(reason, "lease deleted") if reason else "lease no longer exists"
            )
        if not lease.active:
            reason = lease.reason or "revoked"
            raise _revoked(_REASONS.get(reason, reason))
        if lease.pod_uid != claims.pod_uid:
            raise Refusal("ERR-INVALID-AUTH", "credential refused: lease mismatch", "invalid")
        ended = self.state.pod_ended(claims.pod_uid)
        if ended:  # seen on the pod watch before the lease's revocation was written
            raise _revoked(_REASONS.get(ended, ended))

    async def _forward(
        self, method: str, call: wire.Call, bot_token: str | None, audit: dict[str, Any]
    ) -> web.StreamResponse:
        data, content_type = call.encode()
        try:
            async with self.session.post(
                f"{self.upstream}/api/{method}",
                data=data,
                headers={"Content-Type": content_type},
                timeout=aiohttp.ClientTimeout(total=self.settings.conduit_timeout),
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                headers = {h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connection"
            metrics.GATEWAY_UPSTREAM_ERRORS.labels(kind=kind).inc()
            raise Refusal(
                "ERR-PHABRICATOR-UNAVAILABLE",
                f"Phabricator is unavailable ({kind}); retry later",
                "upstream_unavailable",
                503,
            ) from exc
        audit["upstream_status"] = status
        if status >= 500:
            metrics.GATEWAY_UPSTREAM_ERRORS.labels(kind=f"http_{status}").inc()
            raise Refusal(
                "ERR-PHABRICATOR-UNAVAILABLE",
                f"Phabricator answered HTTP {status}; retry later",
                "upstream_unavailable",
                503,
            )
        if bot_token and bot_token.encode() in payload:
            # Phorge echoes a refused token in error_info: never hand the bot's out.
            payload = payload.replace(bot_token.encode(), b"[REDACTED]")
        return web.Response(status=status, body=payload, headers=headers)


def _revoked(detail: str) -> Refusal:
    return Refusal("ERR-INVALID-AUTH", f"credential revoked: {detail}", "revoked")


def _metric_method(method: str) -> str:
    """Bound the metric's cardinality: unknown-looking method names collapse."""
    return method if len(method) <= 64 and method.replace(".", "").isalnum() else "other"


_REASONS: Mapping[str, str] = {
    "PodTerminating": "pod terminating",
    "PodSucceeded": "pod completed",
    "PodFailed": "pod failed",
    "PodDeleted": "pod deleted",
    "PodGone": "pod gone",
    "PodNotRunning": "pod not running",
    "PodNotMeshed": "pod not meshed",
    "NoLongerMatched": "binding no longer matches the pod",
    "BindingDeleted": "binding deleted",
    "BindingNotReady": "binding not ready",
    "BotNotReady": "bot not ready",
}
