"""The Conduit gateway: ``/api/<method>`` exactly as Phabricator serves it.

Per call: find the credential wherever Conduit clients put a token, verify it
(a JWT: signature, time, audience, issuer; a Phorge-shaped token: its lease by
locator from the watch, MAC, expiry), confirm its lease is Active (from the
watch) and its pod is not terminating or gone (from a watch of pods), check the
binding's method allowlist and the ``l5d-client-id``, swap in the bot's real
token, forward over a pooled keep-alive connection, and answer.
Every refusal is HTTP 200 in Conduit's own envelope, like Phorge; one audit
line per call.

Documented errors (``error_code``):

- ``ERR-INVALID-SESSION``: no credential at all.
- ``ERR-INVALID-AUTH``: the credential is malformed, forged, expired, not yet
  valid, for another audience or issuer, matches no lease (a Phorge-shaped one),
  or its lease is revoked or unknown;
  also when the lease cannot be confirmed because the gateway's watch is down
  (fail closed) and when ``l5d-client-id`` does not match. ``error_info`` says
  which.
- ``ERR-CONDUIT-CORE``: the method is not in the binding's ``allowedMethods``.
- ``ERR-PHABRICATOR-UNAVAILABLE`` (HTTP 503): Phabricator could not be reached,
  timed out, or answered 5xx; (HTTP 502) its answer is over
  ``max_response_bytes`` once decoded, or cannot be decoded, or is a redirect (never
  followed: the body carries the bot's token).
- ``ERR-REQUEST-TOO-LARGE`` (HTTP 413): the body (after decompression) is over
  the limit.
- ``ERR-GATEWAY-BUSY`` (HTTP 429: the caller's own share; 503: the gateway's), with a
  ``Retry-After``: the bytes of request bodies or of Phabricator's answers in flight, or the
  bodies handed to the decoding workers, are at their bound (:mod:`.budget`, :mod:`.offload`).

Answers, forwarded and refusals alike, are encoded for the client exactly as Phorge
encodes them (:mod:`phabmesh.conduit.responses`): gzip, deflate or none after the
client's ``Accept-Encoding``, with ``Content-Encoding`` and ``Vary`` to say so. The
gateway asks Phabricator for an uncompressed answer (``Accept-Encoding: identity``)
and still decodes one compressed anyway (a proxy in front of Phorge may), bounded,
so the token redaction and anything else that reads the body see the decoded text.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from phabmesh import credentials, logs, matching, metrics, neterrors, resources, serving
from phabmesh.clock import utcnow
from phabmesh.conduit import client as conduit_client
from phabmesh.conduit import responses, wire
from phabmesh.gateway import offload
from phabmesh.gateway.budget import Budget, Held
from phabmesh.gateway.state import GatewayState
from phabmesh.identity import vouched_client_id
from phabmesh.leases.view import LeaseView
from phabmesh.settings import Settings

log = structlog.get_logger("phabmesh.audit")
T = TypeVar("T")

NO_CREDENTIAL_METHODS = frozenset({"conduit.ping", "conduit.getcapabilities"})
CLIENT_ID_HEADER = "l5d-client-id"
# Upstream response headers passed to the client as Phabricator sent them: what the answer
# is (Content-Type: JSON, or the text of a 429) and that no cache may keep it (Cache-Control,
# Expires). Every answer also carries responses.CONDUIT_HEADERS where upstream says nothing,
# X-Conduit-Capabilities always the gateway's own ("gzip": the gateway itself decodes gzip
# request bodies, whatever Phabricator does), and Content-Encoding/Vary from the gateway's
# own encoding. Nothing else passes: not Set-Cookie (an anonymous Phorge session for the
# caller), not Content-Encoding or Content-Length (the body is re-encoded), not the headers
# Phorge sends for browsers (X-Powered-By, Content-Security-Policy, X-Frame-Options...).
PASSED_HEADERS = ("Content-Type", "Cache-Control", "Expires")
# What the gateway asks Phabricator for: an uncompressed answer.
UPSTREAM_ACCEPT_ENCODING = "identity"
# Bodies up to this size are decoded (and re-encoded) on the event loop, in well under a
# millisecond; larger ones in the worker processes, so that no body stalls other calls (see
# gateway.offload). A compressed body is first inflated here up to this size and no further
# (tens of microseconds whatever it holds): arc's small calls, all gzip, never queue.
INLINE_DECODE_BYTES = 16 * 1024
# A large compressed answer is inflated this much at a time, each step's bytes reserved in
# the answer budget before they exist.
INFLATE_STEP_BYTES = 1 << 20
# Longest method name an audit line carries (a Conduit method name is at most 128).
AUDIT_METHOD_CHARS = 128
AUDIT_INFO_CHARS = 1024
# The request's key for its metric label: set only once a call is public or allowed.
METRIC_METHOD = web.RequestKey("phabmesh.metric_method", str)
# What the request holds of the gateway's byte budgets, given back once it is answered.
HELD = web.RequestKey("phabmesh.held", Held)
# Set on a request whose refusal was held with its body unread and reading paused: its
# connection is closed as soon as the answer is written (aiohttp would otherwise wait its
# lingering time for the rest of a body nobody reads any more).
CLOSE_AFTER = web.RequestKey("phabmesh.close_after", bool)
RETRY_AFTER_SECONDS = 1
# Refusals of a source over its share are held before they are answered (serving.Holds):
# at most this many at once (each keeps its connection, but none of its body), each for at
# most this long.
HELD_REFUSALS = 256
HOLD_SECONDS = 1.0
# A credential this young (seconds from its issue) that its lease, binding or bot's token
# has not reached this gateway yet waits for them (Gateway._admit); so many such calls at
# most wait at once, the others are refused at once.
CATCH_UP_SECONDS = 5.0
MAX_CATCHING_UP = 256
MAX_CATCHING_UP_PER_SOURCE = 16


def envelope(
    code: str,
    info: str,
    status: int = 200,
    accept_encoding: str | None = None,
    retry_after: int | None = None,
) -> web.Response:
    """A refusal in Conduit's envelope, with Phorge's headers and encoding."""
    body = responses.envelope(None, code, info)
    encoded = responses.encode(body, accept_encoding)  # a few hundred bytes
    headers = {**responses.CONDUIT_HEADERS, **encoded.headers}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(status=status, body=encoded.body, headers=headers)


class Refusal(Exception):
    """A call answered with an error envelope. ``decision`` labels the request metrics and the
    audit line; ``reason`` (default: the decision) says why, for the refusal metrics."""

    def __init__(
        self,
        code: str,
        info: str,
        decision: str,
        status: int = 200,
        reason: str | None = None,
        retry_after: int | None = None,
        settling: bool = False,
    ) -> None:
        super().__init__(info)
        self.code = code
        self.info = info
        self.decision = decision
        self.status = status
        self.reason = reason or decision
        self.retry_after = retry_after
        # What refused may be what this gateway has not seen yet (Gateway._admit).
        self.settling = settling

    def response(self, accept_encoding: str | None = None) -> web.Response:
        return envelope(self.code, self.info, self.status, accept_encoding, self.retry_after)


def _stop_reading(request: web.Request) -> None:
    """Read no more of a refused request's body, and drop what was read of it (its
    connection is closed once it is answered)."""
    request.content.read_nowait()  # may resume reading, paused again at once below
    if request.transport is not None:
        request.transport.pause_reading()


def _busy(exc: offload.Busy, what: str) -> Refusal:
    """A refusal for want of capacity: ``what`` (bodies, decoding, answers) names which."""
    share = exc.status == 429
    return Refusal(
        "ERR-GATEWAY-BUSY",
        exc.info,
        "busy",
        exc.status,
        reason=f"busy_{what}_{'share' if share else 'full'}",
        retry_after=exc.retry_after,
    )


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who a verified credential speaks for, whatever its format: what the checks need."""

    subject: str  # the Linkerd identity
    namespace: str
    pod: str
    pod_uid: str
    binding: str
    bot: str
    lease_uid: str
    format: str  # "jwt" or "phorge-token"
    expires_at: datetime.datetime
    # When it was made (a JWT's iat) or, for a Phorge-shaped token, which does not say, the
    # earliest it can have been made: the start of its lease's term that ends when it does
    # (LeaseIndex.term_start). None: not known at all.
    issued_at: datetime.datetime | None

    @classmethod
    def from_claims(cls, claims: credentials.Claims) -> Caller:
        return cls(
            claims.subject,
            claims.namespace,
            claims.pod,
            claims.pod_uid,
            claims.binding,
            claims.bot,
            claims.lease_uid,
            "jwt",
            claims.expires_at,
            claims.issued_at,
        )

    @classmethod
    def from_lease(
        cls,
        lease: LeaseView,
        expires_at: datetime.datetime,
        issued_after: datetime.datetime | None,
    ) -> Caller:
        """A Phorge-shaped token carries no claims: its lease's facts, which its MAC covers."""
        return cls(
            lease.identity,
            lease.namespace,
            lease.pod_name,
            lease.pod_uid,
            lease.binding,
            lease.bot,
            lease.uid,
            "phorge-token",
            expires_at,
            issued_after,
        )

    def outlives(
        self,
        ttl: datetime.timedelta,
        lease_end: datetime.datetime,
        now: datetime.datetime,
        leeway: datetime.timedelta,
    ) -> bool:
        """Older than ``ttl``, the binding's credentialTTL now.

        A credential is good until the earlier of its own expiry (checked on verification)
        and its issue time plus the binding's current TTL: a shorter TTL takes a credential
        made under the longer one no further than its issue time plus the new TTL, and one
        made lately keeps its time. Without any issue time, one that ends after its lease
        (whose ``expiresAt`` only moves earlier when the TTL shrank) is refused.
        """
        if self.issued_at is None:
            return self.expires_at > lease_end + leeway
        return now > self.issued_at + ttl + leeway


class Gateway:
    def __init__(
        self,
        settings: Settings,
        state: GatewayState,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.clock = clock or utcnow
        self.upstream = settings.phabricator_url.rstrip("/")
        self.verified = credentials.VerifiedCache()
        self._session: aiohttp.ClientSession | None = None
        # The metrics series each (method label, decision) records into (see _series).
        self._recorded: metrics.Metrics | None = None
        self._serieses: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.holds = serving.Holds(HELD_REFUSALS, HOLD_SECONDS)
        self._catching_up = 0  # calls waiting in _admit
        self._catching_up_from: collections.Counter[str] = collections.Counter()  # by source
        s = settings
        self.workers = offload.Workers(
            s.gateway_decode_workers, s.gateway_decode_queue, s.gateway_decode_share
        )
        small = INLINE_DECODE_BYTES
        self.bodies = Budget(
            "request bodies",
            "PHABMESH_GATEWAY_BODY_BUDGET_BYTES",
            s.gateway_body_budget_bytes,
            share=max(s.gateway_body_budget_bytes // 4, small + 1),
            small=small,
            small_reserve=s.gateway_body_budget_bytes // 4,
        )
        # Kept for small answers (a ping's, a whoami's), whatever large ones hold.
        answer_reserve = min(s.gateway_answer_budget_bytes // 8, 4 << 20)
        answers = max(s.gateway_answer_budget_bytes, s.max_response_bytes + answer_reserve)
        self.answers = Budget(
            "Phabricator's answers",
            "PHABMESH_GATEWAY_ANSWER_BUDGET_BYTES",
            answers,
            share=max(answers // 2, s.max_response_bytes),
            small=small,
            small_reserve=answer_reserve,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.settings.conduit_timeout),
                auto_decompress=False,
                # Phorge sets a session cookie on anonymous calls: no caller's may reach another.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.workers.close()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/api/{method}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        source = serving.review_source(
            request.headers.get(CLIENT_ID_HEADER), request.remote, serving.local_address(request)
        )
        held = request[HELD] = Held(source)
        try:
            response = await self._answer(request)
            if held.taken or request.get(CLOSE_AFTER):  # its bytes stay reserved until sent
                await response.prepare(request)
                await response.write_eof()
            if request.get(CLOSE_AFTER) and request.transport is not None:
                request.transport.close()  # after what was written is flushed
            return response
        finally:
            held.release()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        method = request.match_info["method"]
        audit: dict[str, Any] = {logs.METHOD: logs.clip(method, AUDIT_METHOD_CHARS)}
        try:
            response = await self._handle(request, method, audit)
            decision = audit.get(logs.DECISION, "allowed")
        except Refusal as refusal:
            request[HELD].release()  # nothing of a refused call is kept while it is answered
            unread = not request.content.is_eof()
            if refusal.reason.endswith("_share") and refusal.retry_after:  # the flooder waits
                if unread:
                    _stop_reading(request)
                    request[CLOSE_AFTER] = True
                await self.holds.hold(refusal.retry_after)
            response = refusal.response(request.headers.get("Accept-Encoding"))
            if unread:
                # Refused before its body was read: the connection is not kept alive. aiohttp
                # still reads and drops the rest of the body for its lingering time, so that
                # the caller gets to read the answer; a held refusal's is closed at once.
                response.force_close()
            decision = refusal.decision
            audit["error_code"] = refusal.code
            audit["error_info"] = logs.clip(refusal.info, AUDIT_INFO_CHARS)
            if not decision.startswith("upstream_"):  # forwarded: an upstream error, not ours
                metrics.current().gateway_refused(refusal.reason)
        elapsed = time.perf_counter() - started
        # The method label comes only from a fixed set or a binding's allowlist, never from an
        # unauthenticated request: its series stay bounded by the configuration.
        label = request.get(METRIC_METHOD, "other")
        counted, timed = self._series(label, decision)
        counted.inc()
        timed.observe(elapsed)
        audit[logs.DECISION] = decision
        log.info("conduit_call", latency_ms=round(elapsed * 1000, 2), **audit)
        return response

    def _series(self, method: str, decision: str) -> tuple[Any, Any]:
        """The request counter's and the latency histogram's series for this call, looked up
        once per label set (prometheus_client's ``labels()`` checks and locks every time)."""
        recorded = metrics.current()
        key = (method, decision)
        if self._recorded is not recorded:
            self._recorded, self._serieses = recorded, {}
        found = self._serieses.get(key)
        if found is None:
            found = self._serieses[key] = (
                recorded.gateway_requests.labels(method=method, decision=decision),
                recorded.gateway_latency.labels(decision=decision),
            )
        return found

    async def _handle(
        self, request: web.Request, method: str, audit: dict[str, Any]
    ) -> web.StreamResponse:
        if not matching.is_method_name(method):
            # Whole names only: "user.whoami\n" is not user.whoami, and is never forwarded.
            raise Refusal(
                "ERR-CONDUIT-CORE",
                f"phabmesh: {logs.clip(method, AUDIT_METHOD_CHARS)!r} is not a Conduit method "
                "name (lower-case letters, digits and '_', in words joined by '.')",
                "bad_method",
            )
        body = await self.read_body(request)
        try:
            call = await self._decode(request, body)
        except wire.RequestTooLarge as exc:
            raise Refusal("ERR-REQUEST-TOO-LARGE", str(exc), "too_large", 413) from exc
        except wire.BadRequest as exc:
            # Phorge answers malformed bodies with ERR-CONDUIT-CORE; so do we.
            info = exc.info(logs.clip(method, AUDIT_METHOD_CHARS))
            raise Refusal("ERR-CONDUIT-CORE", info, "bad_request") from exc
        if method in NO_CREDENTIAL_METHODS:
            request[METRIC_METHOD] = method
            audit[logs.DECISION] = "public"
            return await self._forward(request, method, call.without_token(), None, audit)
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
                logs.CREDENTIAL_FORMAT: claims.format,
            }
        )
        token = await self._admit(request, call.token, claims, method)
        return await self._forward(request, method, call.with_token(token), token, audit)

    async def _admit(
        self, request: web.Request, credential: str, claims: Caller, method: str
    ) -> str:
        """The bot's token, if the credential may call ``method`` now; else a Refusal.

        A credential made moments ago can reach this gateway before its lease, its binding or
        its bot's token do: each comes by a watch of its own, and the operator does not wait
        for them. While the credential is that young (CATCH_UP_SECONDS from its issue, or
        from now if its issue time is ahead of this gateway's clock), a refusal that such a
        watch can lift waits for the watches to move, and the credential is verified and
        judged again. Past that, the refusal stands; with MAX_CATCHING_UP calls waiting (or
        MAX_CATCHING_UP_PER_SOURCE from the caller's source), it stands at once; and a call
        whose caller went away while it waited is never forwarded.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # on the loop's clock: past it, the refusal stands
        source = request[HELD].source
        while True:
            try:
                if deadline is not None:  # after a wait: a key retired meanwhile counts
                    claims = self._verify(credential)
                token = self._judge(request, claims, method)
            except Refusal as refusal:
                if deadline is None:
                    wait = self._catch_up_time(claims, refusal)
                    if wait <= 0:
                        raise
                    deadline = loop.time() + wait
                elif not refusal.settling or loop.time() >= deadline:
                    metrics.current().gateway_catch_ups.labels(outcome="refused").inc()
                    raise
                if (
                    self._catching_up >= MAX_CATCHING_UP
                    or self._catching_up_from[source] >= MAX_CATCHING_UP_PER_SOURCE
                ):
                    metrics.current().gateway_catch_ups.labels(outcome="crowded").inc()
                    raise
                self._catching_up += 1
                self._catching_up_from[source] += 1
                try:
                    await self.state.changes.wait(deadline - loop.time())
                finally:
                    self._catching_up -= 1
                    self._catching_up_from[source] -= 1
                    if not self._catching_up_from[source]:
                        del self._catching_up_from[source]
                if request.transport is None or request.transport.is_closing():
                    metrics.current().gateway_catch_ups.labels(outcome="gone").inc()
                    raise
            else:
                if deadline is not None:
                    metrics.current().gateway_catch_ups.labels(outcome="served").inc()
                return token

    def _catch_up_time(self, claims: Caller, refusal: Refusal) -> float:
        """How long a call refused so may wait for the watches (0: not at all)."""
        if not refusal.settling or claims.issued_at is None:
            return 0.0
        if self.state.pod_ended(claims.pod_uid):  # its pod is gone: nothing to wait for
            return 0.0
        age = max((self.clock() - claims.issued_at).total_seconds(), 0.0)
        return CATCH_UP_SECONDS - age

    def _judge(self, request: web.Request, claims: Caller, method: str) -> str:
        self._check_lease(claims)
        rules = self.state.binding(claims.namespace, claims.binding)
        if rules is None or rules.deleting:  # what _check_lease's grants saw: not reached
            raise _revoked("BindingDeleted")
        client_id = request.headers.get(CLIENT_ID_HEADER)
        if client_id is not None and client_id != claims.subject:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential refused: the mTLS client identity (l5d-client-id) "
                "does not match the credential's identity",
                "identity_mismatch",
            )
        # Only Linkerd's mTLS proves the caller meshed: the header as the serving pod's own
        # proxy sets it (from anywhere else, anyone may have written it).
        if (self.settings.require_client_id or rules.require_client_id) and vouched_client_id(
            client_id, request.remote, serving.local_address(request)
        ) is None:
            required = (
                "this gateway requires"
                if self.settings.require_client_id
                else "this binding requires"
            )
            raise Refusal(
                "ERR-INVALID-AUTH",
                f"credential refused: {required} calls over Linkerd mTLS (no l5d-client-id from "
                "the gateway's Linkerd proxy): mesh the calling pod (linkerd.io/inject: enabled) "
                "and call the gateway through its Service",
                "no_client_id",
            )
        glob = matching.allowing_glob(method, rules.allowed_methods)
        if glob is None:
            raise Refusal(
                "ERR-CONDUIT-CORE",
                f"phabmesh: method {method} is not allowed by PhabricatorBinding "
                f"{claims.namespace}/{claims.binding} (allowedMethods: "
                f"{', '.join(rules.allowed_methods)})",
                "method_denied",
            )
        request[METRIC_METHOD] = glob  # the method itself when the binding names it
        token = self.state.bot_token(claims.bot)
        if token is None:
            raise Refusal(
                "ERR-INVALID-AUTH",
                f"credential refused: the token of bot {claims.bot} is not available",
                "bot_token_missing",
                settling=True,
            )
        return token

    async def read_body(self, request: web.Request) -> bytes:
        """The body, each byte reserved in the body budget before it is read."""
        limit = self.settings.max_request_bytes
        held = request[HELD]
        declared = request.content_length
        if declared is not None and declared > limit:
            raise Refusal(
                "ERR-REQUEST-TOO-LARGE", f"request body over {limit} bytes", "too_large", 413
            )
        try:
            if declared is not None:
                held.take(self.bodies, declared, whole=declared)
                # No more than declared: the parser stops there (one read, no chunk loop).
                return await request.read()
            chunks: list[bytes] = []
            size = 0
            async for chunk in request.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise Refusal(
                        "ERR-REQUEST-TOO-LARGE",
                        f"request body over {limit} bytes",
                        "too_large",
                        413,
                    )
                if declared is None:  # of a size unknown: large, whatever the chunk
                    held.take(self.bodies, len(chunk))
                chunks.append(chunk)
        except offload.Busy as exc:
            raise _busy(exc, "bodies") from exc
        return b"".join(chunks)

    async def _decode(self, request: web.Request, body: bytes) -> wire.Call:
        encoded = request.headers.get("Content-Encoding", "").strip().lower()
        small = INLINE_DECODE_BYTES - len(request.query_string)
        plain = encoded in ("", "identity")
        if not plain and encoded in wire.COMPRESSED:
            # Inflated here as far as a small body goes and no further: a larger one (or a
            # bomb) costs the event loop this much and goes to the workers whole.
            try:
                body = wire.decompress(body, encoded, max(small, 0))
                plain = True
            except wire.RequestTooLarge:
                pass
            except wire.BadRequest as exc:
                raise Refusal(
                    "ERR-CONDUIT-CORE",
                    exc.info(logs.clip(request.match_info["method"], AUDIT_METHOD_CHARS)),
                    "bad_request",
                ) from exc
        inline = plain and len(body) <= small
        decode = functools.partial(
            wire.decode_request if inline else wire.decode_packed,
            request.method,
            request.headers.get("Content-Type", ""),
            body,
            request.query_string,
            content_encoding="" if plain else encoded,
            max_bytes=self.settings.max_request_bytes,
        )
        if inline:
            return decode()
        # The params stay packed: a refused call never costs the event loop their decoding.
        return await self._offload(decode, request)

    async def _encode(self, call: wire.Call, request: web.Request) -> tuple[bytes, str]:
        """The body to forward: encoded off the event loop when it is large, like decoding."""
        if call.packed is None and call.size <= INLINE_DECODE_BYTES:
            return call.encode()
        return await self._offload(call.encode, request)

    async def _offload(self, work: Callable[[], T], request: web.Request) -> T:
        try:
            return await self.workers.run(work, request[HELD].source)
        except offload.Busy as exc:
            raise _busy(exc, "decoding") from exc
        except BrokenProcessPool as exc:
            raise Refusal(
                "ERR-CONDUIT-CORE",
                "phabmesh: the gateway could not read this request; retry",
                "worker_lost",
                503,
                retry_after=RETRY_AFTER_SECONDS,
            ) from exc

    async def _inflate(
        self, raw: bytes, coding: str | None, request: web.Request
    ) -> bytes | bytearray:
        """Phabricator's answer decoded, its inflated bytes held in the answer budget as well,
        each step reserved before it is inflated (offload.Busy once the budget has no room):
        a small answer at once on the event loop, a larger one a step at a time in a thread,
        each step as large as the budget has room for, 1 MiB at most."""
        inflation = responses.Inflation(raw, coding, self.settings.max_response_bytes)
        if inflation.done:
            return inflation.result
        held = request[HELD]
        if len(raw) <= responses.THREAD_ABOVE_BYTES:  # its first 256 KiB, in well under 1 ms
            size = inflation.step(responses.THREAD_ABOVE_BYTES)  # no await: made, then held
            held.take(self.answers, size, whole=size if inflation.done else None)
        while not inflation.done:
            step = min(INFLATE_STEP_BYTES, self.answers.room(held.source))
            held.take(self.answers, step or INFLATE_STEP_BYTES)  # none: Busy, and why
            made = await asyncio.to_thread(inflation.step, step)
            held.give(self.answers, step - made)
        return inflation.result

    def _reserve_answer(self, request: web.Request) -> Callable[[int, int | None], None]:
        held = request[HELD]
        return lambda size, whole: held.take(self.answers, size, whole)

    def _verify(self, token: str) -> Caller:
        ring = self.state.keys.ring
        if ring is None:
            raise Refusal(
                "ERR-INVALID-AUTH",
                "credential cannot be verified yet: keys not loaded",
                "not_ready",
            )
        if token.startswith(credentials.phorge.PREFIX):
            return self._verify_phorge(token, ring)
        try:
            claims = self.verified.verify(
                token,
                ring,
                audience=self.settings.credential_audience,
                issuer=self.settings.issuer,
                now=self.clock(),
                leeway=datetime.timedelta(seconds=self.settings.clock_skew),
            )
        except credentials.CredentialError as exc:
            raise Refusal("ERR-INVALID-AUTH", f"credential refused: {exc}", "invalid") from exc
        return Caller.from_claims(claims)

    def _verify_phorge(self, token: str, ring: credentials.KeyRing) -> Caller:
        """Its lease, found by locator in the lease watch; one MAC per candidate and key.

        No cache: a call costs a dictionary lookup and an HMAC or two, and the lease is
        read afresh every time.
        """
        leases = self.state.leases
        if not self.state.confirmed:
            raise _unconfirmed()

        def candidates(locator: str) -> Iterator[tuple[LeaseView | str, bytes]]:
            yield from leases.at_locator(locator)
            yield from leases.buried_at(locator)  # removed lately: say why it went

        try:
            verified = credentials.phorge.verify(
                token,
                ring,
                candidates,
                now=self.clock(),
                leeway=datetime.timedelta(seconds=self.settings.clock_skew),
            )
        except credentials.CredentialError as exc:
            raise Refusal("ERR-INVALID-AUTH", f"credential refused: {exc}", "invalid") from exc
        if isinstance(verified.holder, str):
            raise self._gone(verified.holder)
        lease = verified.holder
        issued_after = leases.term_start(lease, verified.expires_at)
        return Caller.from_lease(lease, verified.expires_at, issued_after)

    def _gone(self, lease_uid: str) -> Refusal:
        reason = self.state.leases.tombstones.get(lease_uid)
        if not reason:  # or not seen yet
            return _revoked("LeaseGone", "lease no longer exists", settling=True)
        return _revoked(
            reason if reason in resources.REVOCATION_MESSAGES else "LeaseDeleted",
            resources.REVOCATION_MESSAGES.get(reason, "lease deleted"),
        )

    def _check_lease(self, claims: Caller) -> None:
        leases = self.state.leases
        if not self.state.confirmed:
            raise _unconfirmed()
        lease = leases.by_uid.get(claims.lease_uid)
        if lease is None:
            raise self._gone(claims.lease_uid)
        if not lease.active:  # Pending: the write that made it Active is on its way
            raise _revoked(lease.reason or "revoked", settling=lease.phase == "Pending")
        if (lease.pod_uid, lease.namespace, lease.binding, lease.bot, lease.identity) != (
            claims.pod_uid,
            claims.namespace,
            claims.binding,
            claims.bot,
            claims.subject,
        ):
            raise Refusal("ERR-INVALID-AUTH", "credential refused: lease mismatch", "invalid")
        ended = self.state.pod_ended(claims.pod_uid)
        if ended:  # seen on the pod watch before the lease's revocation was written
            raise _revoked(ended)
        # The lease is judged by the binding, the bot and the namespace this gateway sees,
        # not by what the lease says: a lease the operator did not grant grants nothing.
        problem = self.state.grants.refusal(lease)
        if problem:  # a watch here may be behind what the operator judged when it issued
            binding = self.state.binding(lease.namespace, lease.binding)
            raise _revoked(problem, settling=binding is None or not binding.deleting)
        now = self.clock()
        leeway = datetime.timedelta(seconds=self.settings.clock_skew)
        if lease.expires_at is None or now > lease.expires_at + leeway:
            raise _revoked("LeaseExpired", "lease expired")
        binding = self.state.binding(claims.namespace, claims.binding)
        ttl = binding.ttl if binding is not None else None
        if ttl is None or claims.outlives(ttl, lease.expires_at, now, leeway):
            # Minted under a longer credentialTTL than the binding has now.
            raise _revoked(
                "CredentialOutlivedTTL", "credential outlived the binding's credentialTTL"
            )

    async def _forward(
        self,
        request: web.Request,
        method: str,
        call: wire.Call,
        bot_token: str | None,
        audit: dict[str, Any],
    ) -> web.StreamResponse:
        data, content_type = await self._encode(call, request)
        limit = self.settings.max_response_bytes
        try:
            async with self.session.post(
                f"{self.upstream}/api/{method}",
                data=data,
                headers={"Content-Type": content_type, "Accept-Encoding": UPSTREAM_ACCEPT_ENCODING},
                # The body carries the bot's real token: never re-sent where a 307/308 points,
                # and a 301/302's target never answers as if it were Phabricator.
                allow_redirects=False,
            ) as upstream:
                status = upstream.status
                audit["upstream_status"] = status
                if 300 <= status < 400:
                    metrics.current().gateway_upstream_errors.labels(kind="redirect").inc()
                    target = conduit_client.redirect_target(upstream.headers.get("Location"))
                    raise Refusal(
                        "ERR-PHABRICATOR-UNAVAILABLE",
                        f"Phabricator answered HTTP {status}, a redirect{target}: not followed "
                        "(the gateway's Phabricator URL must be where Conduit answers)",
                        "upstream_redirect",
                        502,
                    )
                if status >= 500:
                    metrics.current().gateway_upstream_errors.labels(kind=f"http_{status}").inc()
                    raise Refusal(
                        "ERR-PHABRICATOR-UNAVAILABLE",
                        f"Phabricator answered HTTP {status}; retry later",
                        "upstream_unavailable",
                        503,
                    )
                coding = upstream.headers.get("Content-Encoding")
                passed = {h: upstream.headers[h] for h in PASSED_HEADERS if h in upstream.headers}
                raw = await _read_bounded(upstream, limit, self._reserve_answer(request))
        except offload.Busy as exc:
            raise _busy(exc, "answers") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connection"
            metrics.current().gateway_upstream_errors.labels(kind=kind).inc()
            raise Refusal(
                "ERR-PHABRICATOR-UNAVAILABLE",
                f"Phabricator at {self.upstream} is unavailable ({kind}: "
                f"{neterrors.cause(exc, self.settings.conduit_timeout)}); retry later",
                "upstream_unavailable",
                503,
            ) from exc
        except responses.BodyTooLarge as exc:
            raise _too_large(limit) from exc
        try:
            payload = await self._inflate(raw, coding, request)
        except offload.Busy as exc:
            raise _busy(exc, "answers") from exc
        except responses.BodyTooLarge as exc:
            raise _too_large(limit) from exc
        except responses.UnreadableBody as exc:
            metrics.current().gateway_upstream_errors.labels(kind="unreadable").inc()
            raise Refusal(
                "ERR-PHABRICATOR-UNAVAILABLE",
                f"Phabricator's answer cannot be decoded: {exc}",
                "upstream_unreadable",
                502,
            ) from exc
        if bot_token and bot_token.encode() in payload:
            # Phorge echoes a refused token in error_info: never hand the bot's out.
            payload = payload.replace(bot_token.encode(), b"[REDACTED]")
        encoded = await responses.encode_async(payload, request.headers.get("Accept-Encoding"))
        headers = {**responses.CONDUIT_HEADERS, **passed, **encoded.headers}
        return web.Response(status=status, body=encoded.body, headers=headers)


async def _read_bounded(
    upstream: aiohttp.ClientResponse, limit: int, reserve: Callable[[int, int | None], None]
) -> bytes:
    """The body as sent (perhaps compressed), refused past ``limit`` bytes before reading on;
    ``reserve(size, whole)`` (raising offload.Busy) is told its Content-Length first, or each
    chunk's size (of a whole unknown) before it is kept."""
    declared = upstream.content_length
    if declared is not None and declared > limit:
        raise responses.BodyTooLarge(f"body over {limit} bytes")
    if declared is not None:
        reserve(declared, declared)
        return await upstream.read()  # no more than declared: the parser stops there
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise responses.BodyTooLarge(f"body over {limit} bytes")
        if declared is None:
            reserve(len(chunk), None)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Refusal:
    metrics.current().gateway_upstream_errors.labels(kind="too_large").inc()
    return Refusal(
        "ERR-PHABRICATOR-UNAVAILABLE",
        f"Phabricator's answer is over {limit} bytes (PHABMESH_MAX_RESPONSE_BYTES)",
        "upstream_too_large",
        502,
    )


def _unconfirmed() -> Refusal:
    return Refusal(
        "ERR-INVALID-AUTH",
        "credential cannot be confirmed: the gateway has lost a watch it judges credentials by "
        "(leases, bindings, bots, namespaces or pods); retry shortly",
        "unconfirmed",
        settling=True,  # a watch listing again: a young credential waits for it
    )


def _revoked(reason: str, detail: str | None = None, *, settling: bool = False) -> Refusal:
    """Refused for its lease: ``reason`` (a revocation reason, or why the lease is unusable)
    for the metrics, ``detail`` (by default the reason's message) for the caller."""
    text = detail or resources.revocation_message(reason)
    return Refusal(
        "ERR-INVALID-AUTH",
        f"credential revoked: {text}",
        "revoked",
        reason=reason,
        settling=settling,
    )
