"""Phorge's calls into the mesh: ``/hooks/<namespace>/<name>``, the URL an admin pastes into
Phorge for a PhabricatorWebhook: a Herald webhook's delivery, or a Harbormaster build step's
request (:mod:`phabmesh.harbormaster`; its checks are listed below the Herald ones).

Per delivery: find the webhook (from the gateway's watch of them) and its HMAC key (from the
watch of its Secret), read the body within the gateway's body budget, ``max_request_bytes``
(the Conduit path's own) and ``hooks_timeout``, verify it (:mod:`phabmesh.herald`: signature
in constant time, freshness of ``action.epoch``, replay, per namespace), bound the verified
deliveries in flight per webhook, forward it with Phorge's headers to the webhook's target
Service in the webhook's own namespace over a connection pool of its own, bounded in time,
and answer Phorge with the target's status. Nothing is forwarded unless every check passed.
One audit line (``hook_delivery``) and one count per delivery; never the key, never the
signature.

Answers (plain text, each with its own status):

- the target's status and body (at most :data:`MAX_ANSWER_BYTES`) once forwarded;
- 401 no signature, 403 a wrong one, 400 not a Herald payload, 422 stale, 409 replayed;
- 404 no such webhook, 503 not Ready (its reason), its key not available, the webhook watch
  down, or the namespace's replay entries full; 429 too many deliveries in flight for this
  webhook, 413 too large, 429/503 the body budget, 408 a body that did not arrive in time;
- 502 the target unreachable, 504 the target past ``hooks_timeout``.

A delivery that was not delivered (502, 504, or the target's 5xx, 408, 425 or 429) is
forgotten by the replay check, so that Phorge's retry of it (the same body) goes through.

A Harbormaster build step's request (any of the step's methods): its basic credential when the
webhook has one (401 none, 403 wrong; 503 not available), ``?target=`` a build target PHID
(400), the target, looked up with ``harbormaster.target.search`` as the webhook's bot,
Building now (404 not found, 409 waiting or finished; 503 the bot's token not available or
Phabricator down, 502 its error), and one call per target (409). Then it is forwarded with
its method and query, and ``X-Phabmesh-Build-Target``; never the credential.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import aiohttp
import structlog
import yarl
from aiohttp import web

from phabmesh import harbormaster, herald, logs, metrics, neterrors
from phabmesh.gateway.app import HELD, Gateway, Refusal
from phabmesh.gateway.budget import Held
from phabmesh.gateway.state import HookFacts
from phabmesh.serving import local_address, review_source
from phabmesh.settings import hook_target_url

log = structlog.get_logger("phabmesh.audit")

ROUTE = "/hooks/{namespace}/{name}"
MAX_ANSWER_BYTES = 64 * 1024  # of the target's answer, passed back to Phorge (which logs it)
# Connections to targets, all webhooks together: a pool of their own, so that deliveries
# never wait for (or hold) the connections of Conduit calls to Phabricator.
TARGET_CONNECTIONS = 64
# A target's answers that leave the delivery open to Phorge's retry (besides 5xx): the
# target did not take it, so the same body is not a replay when it comes again.
NOT_TAKEN = frozenset({408, 425, 429})
NAME_CHARS = 253  # the longest namespace or name an audit line carries
MAX_SEARCH_BYTES = 256 * 1024  # of harbormaster.target.search's answer (one target's)


class HookRefusal(Exception):
    """A delivery answered without being forwarded: its status, message and outcome."""

    def __init__(self, status: int, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=f"phabmesh: {self.message}\n")


class Hooks:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.state = gateway.state
        self.settings = gateway.settings
        self.replays = herald.ReplayCache(self.settings.hooks_replay_entries)
        # Build targets called within harbormaster.CLAIM_SECONDS, all webhooks together (a
        # target is claimed only once Phorge said it is Building, so only real ones enter).
        self.targets = herald.ReplayCache(self.settings.hooks_replay_entries)
        self.in_flight: collections.Counter[str] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=TARGET_CONNECTIONS, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", ROUTE, self.handle)

    def now(self) -> float:
        return self.gateway.clock().timestamp()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        source = review_source(None, request.remote, local_address(request))
        held = request[HELD] = Held(source)
        audit: dict[str, Any] = {
            "source": "unknown",
            logs.NAMESPACE: logs.clip(request.match_info["namespace"], NAME_CHARS),
            logs.WEBHOOK: logs.clip(request.match_info["name"], NAME_CHARS),
        }
        try:
            response = await self._deliver(request, audit)
            outcome = "delivered" if response.status < 400 else "target_error"
        except HookRefusal as refusal:
            response = refusal.response()
            if not request.content.is_eof():
                response.force_close()  # refused before its body was read: not read at all
            outcome = refusal.outcome
            audit["error"] = refusal.message
        finally:
            held.release()
        elapsed = time.perf_counter() - started
        metrics.current().hook_delivered(audit["source"], outcome, elapsed)
        log.info(
            "hook_delivery",
            outcome=outcome,
            status=response.status,
            latency_ms=round(elapsed * 1000, 2),
            **audit,
        )
        return response

    async def _deliver(self, request: web.Request, audit: dict[str, Any]) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if not self.state.webhooks.healthy:
            raise HookRefusal(
                503, "webhooks cannot be confirmed now (the gateway's watch is down)", "unconfirmed"
            )
        hook = self.state.webhook(namespace, name)
        if hook is None:
            shown = f"{audit[logs.NAMESPACE]}/{audit[logs.WEBHOOK]}"  # clipped: it is anyone's
            raise HookRefusal(404, f"no PhabricatorWebhook {shown}", "unknown_webhook")
        if hook.spec is None:
            raise HookRefusal(
                503,
                f"PhabricatorWebhook {namespace}/{name} is not Ready (InvalidSpec)",
                "not_ready",
            )
        target = hook.spec.target
        audit["source"] = hook.spec.source
        audit["target"] = f"{target.service}:{target.port}{target.path}"
        if not hook.ready:
            raise HookRefusal(
                503,
                f"PhabricatorWebhook {namespace}/{name} is not Ready "
                f"({hook.reason or 'not checked yet'})",
                "not_ready",
            )
        allowed = {"POST"} if hook.spec.herald is not None else harbormaster.METHODS
        if request.method not in allowed:
            raise HookRefusal(
                405,
                f"{request.method} is not how Phorge calls this webhook "
                f"({', '.join(sorted(allowed))})",
                "method_not_allowed",
            )
        if hook.spec.harbormaster is not None:
            return await self._build_step(request, hook, audit)
        return await self._verify_and_forward(request, hook, audit)

    async def _build_step(
        self, request: web.Request, hook: HookFacts, audit: dict[str, Any]
    ) -> web.Response:
        """A Harbormaster build step's request: credential, target, once, Building; then
        forwarded."""
        assert hook.spec is not None and hook.spec.harbormaster is not None
        key = f"{hook.namespace}/{hook.name}"
        try:
            credential = self.state.hook_credential(hook)
            if credential is None:
                raise HookRefusal(
                    503,
                    f"the basic credential of PhabricatorWebhook {key} is not available",
                    "key_unavailable",
                )
            harbormaster.check_basic(request.headers.get("Authorization"), *credential)
            phid = harbormaster.target_phid(request.query)
        except harbormaster.Refused as refused:
            raise HookRefusal(refused.status, refused.message, refused.reason) from refused
        audit["object_phid"] = phid
        body = await self._read(request)
        self._admit(key)
        self.in_flight[key] += 1
        try:
            # Phorge's word first (a later replay is told the target waits or has finished),
            # then the claim, with no wait between them: of two copies at once, one passes.
            await self._check_target(hook, phid)
            return await self._claim_and_forward(request, hook, body, phid)
        finally:
            self._done(key)

    async def _claim_and_forward(
        self, request: web.Request, hook: HookFacts, body: bytes, phid: str
    ) -> web.Response:
        now = self.now()
        # One call per target, whichever webhook of whichever namespace it comes to.
        claim = ("", phid)
        try:
            self.targets.claim_key(
                "",
                claim,
                until=now + harbormaster.CLAIM_SECONDS,
                now=now,
                replayed=f"build target {phid} is being called already",
            )
        except herald.Rejected as rejected:
            raise HookRefusal(rejected.status, rejected.message, rejected.reason) from rejected
        except herald.Full as full:
            raise HookRefusal(503, str(full), "replay_full") from full
        try:
            added = {harbormaster.TARGET_HEADER: phid}
            response = await self._forward(
                request, hook, body, added, harbormaster.FORWARDED_HEADERS
            )
        except HookRefusal:
            self.targets.release_key("", claim)
            raise
        if response.status >= 500 or response.status in NOT_TAKEN:
            self.targets.release_key("", claim)
        return response

    async def _check_target(self, hook: HookFacts, phid: str) -> None:
        """``harbormaster.target.search`` as the webhook's bot: the target is Building."""
        assert hook.spec is not None and hook.spec.harbormaster is not None
        bot = hook.spec.harbormaster.bot_ref.name
        # The bot is judged as a lease's is, by this gateway's own watches: not only by the
        # operator's Ready, which lags a change of the bot or of the namespace's labels.
        if not self.state.grants.healthy:
            raise HookRefusal(
                503, "bots cannot be confirmed now (the gateway's watch is down)", "unconfirmed"
            )
        if not self.state.grants.bot_allows(bot, hook.namespace):
            raise HookRefusal(
                403,
                f'PhabricatorBot "{bot}" does not allow namespace "{hook.namespace}"',
                "bot_not_allowed",
            )
        token = self.state.bot_token(bot)
        if token is None:
            raise HookRefusal(
                503, f'the token of PhabricatorBot "{bot}" is not available', "bot_unavailable"
            )
        timeout = self.settings.conduit_timeout
        url = f"{self.gateway.upstream}/api/{harbormaster.SEARCH_METHOD}"
        form = {"api.token": token, **harbormaster.search_params(phid)}
        try:
            async with self.session.post(
                url,
                data=form,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as answer:
                status = answer.status
                raw = await _read_head(answer, MAX_SEARCH_BYTES)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise HookRefusal(
                503,
                f"Phabricator is unavailable ({neterrors.cause(exc, timeout)}); retry later",
                "phabricator_unavailable",
            ) from exc
        if status != 200:
            raise HookRefusal(
                503, f"Phabricator answered HTTP {status}; retry later", "phabricator_unavailable"
            )
        try:
            harbormaster.judge_search(json.loads(raw), phid)
        except ValueError as exc:  # not JSON (json.JSONDecodeError, UnicodeDecodeError)
            raise HookRefusal(
                502, "Phabricator's answer is not JSON", harbormaster.PHABRICATOR_ERROR
            ) from exc
        except harbormaster.Refused as refused:
            message = logs.redact_text(refused.message, token)
            raise HookRefusal(refused.status, message, refused.reason) from refused

    def _admit(self, key: str) -> None:
        """A verified call counts against its webhook's calls in flight."""
        if self.in_flight[key] >= self.settings.hooks_max_concurrent:
            raise HookRefusal(
                429,
                f"{self.settings.hooks_max_concurrent} deliveries to this webhook are in flight "
                "(PHABMESH_HOOKS_MAX_CONCURRENT); retry shortly",
                "busy",
            )

    def _done(self, key: str) -> None:
        self.in_flight[key] -= 1
        if self.in_flight[key] <= 0:
            del self.in_flight[key]

    async def _read(self, request: web.Request) -> bytes:
        """The body, within the Conduit path's bounds and within ``hooks_timeout``: a
        caller that trickles it holds nothing of the webhook's."""
        timeout = self.settings.hooks_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self.gateway.read_body(request)
        except Refusal as refusal:  # the Conduit path's bounds, answered plainly
            outcome = "too_large" if refusal.status == 413 else "busy"
            raise HookRefusal(refusal.status, refusal.info, outcome) from refusal
        except TimeoutError as exc:
            raise HookRefusal(
                408, f"the body did not arrive within {timeout:g} s", "body_timeout"
            ) from exc

    async def _verify_and_forward(
        self, request: web.Request, hook: HookFacts, audit: dict[str, Any]
    ) -> web.Response:
        body = await self._read(request)
        key = f"{hook.namespace}/{hook.name}"
        secret = self.state.hook_key(hook)
        if secret is None:
            raise HookRefusal(
                503, f"the HMAC key of PhabricatorWebhook {key} is not available", "key_unavailable"
            )
        freshness = self.settings.hooks_freshness
        now = self.now()
        try:
            delivery = herald.verify(
                body,
                request.headers.get(herald.SIGNATURE_HEADER),
                secret,
                now=now,
                freshness=freshness,
            )
            audit["object_phid"] = logs.clip(delivery.object_phid, herald.PHID_CHARS)
            if delivery.test:
                audit["test"] = True
        except herald.Rejected as rejected:
            raise HookRefusal(rejected.status, rejected.message, rejected.reason) from rejected
        # Only a verified delivery counts against the webhook's deliveries in flight.
        self._admit(key)
        try:
            self.replays.claim(hook.namespace, hook.name, delivery, now=now, freshness=freshness)
        except herald.Rejected as rejected:
            raise HookRefusal(rejected.status, rejected.message, rejected.reason) from rejected
        except herald.Full as full:
            raise HookRefusal(503, str(full), "replay_full") from full
        self.in_flight[key] += 1
        try:
            response = await self._forward(request, hook, body, {}, herald.FORWARDED_HEADERS)
        except HookRefusal:
            self.replays.release(hook.namespace, hook.name, delivery)
            raise
        finally:
            self._done(key)
        if response.status >= 500 or response.status in NOT_TAKEN:
            self.replays.release(hook.namespace, hook.name, delivery)
        return response

    async def _forward(
        self,
        request: web.Request,
        hook: HookFacts,
        body: bytes,
        added: dict[str, str],
        forwarded: tuple[str, ...],
    ) -> web.Response:
        """Pass the call on to the webhook's target: its method, its query, the ``forwarded``
        headers (the source's: never a credential) and ``added``."""
        assert hook.spec is not None  # a webhook without one is unknown (_deliver)
        target = hook.spec.target
        base = hook_target_url(
            self.settings.hooks_target_url, target.service, hook.namespace, target.port
        )
        headers = {h: request.headers[h] for h in forwarded if h in request.headers}
        headers.update(added)
        # The call's query exactly as it came, never decoded and encoded again (the target
        # reads what the gateway checked); a Herald delivery's query, which its signature
        # does not cover, is not passed on.
        raw = request.rel_url.raw_query_string if hook.spec.harbormaster is not None else ""
        url = yarl.URL(base + target.path + (f"?{raw}" if raw else ""), encoded=True)
        timeout = self.settings.hooks_timeout
        try:
            async with self.session.request(
                request.method,
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as answer:
                status = answer.status
                content_type = answer.headers.get("Content-Type", "text/plain")
                text = await _read_head(answer, MAX_ANSWER_BYTES)
        except TimeoutError as exc:
            raise HookRefusal(
                504, f"the target did not answer within {timeout:g} s", "target_timeout"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise HookRefusal(
                502,
                f"the target could not be reached: {neterrors.cause(exc, timeout)}",
                "target_unreachable",
            ) from exc
        return web.Response(status=status, body=text, headers={"Content-Type": content_type})


async def _read_head(answer: aiohttp.ClientResponse, limit: int) -> bytes:
    """The first ``limit`` bytes of the answer's body; the rest is not read."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in answer.content.iter_chunked(16 * 1024):
        chunks.append(chunk[: limit - size])
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)
