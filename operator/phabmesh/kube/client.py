"""Async Kubernetes API calls over one pooled aiohttp session.

Errors form a small tree: :class:`NotFound`, :class:`Conflict`, :class:`Gone`
(permanent for that call) and :class:`Unavailable` (the API server could not be
reached or answered 429/5xx: retryable). Transient failures are retried a few
times (``attempts``) with the short form of the process's retry policy
(:meth:`phabmesh.backoff.Backoff.short`), or after the server's ``Retry-After`` up to its
cap, before :class:`Unavailable` is raised.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import structlog

from phabmesh import __version__, backoff
from phabmesh.backoff import Backoff, parse_retry_after
from phabmesh.kube.config import Connection
from phabmesh.kube.shapes import Shape
from phabmesh.resources import resource_path

log = structlog.get_logger(__name__)

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class KubeError(Exception):
    """The API server refused a call; ``retry_after``: the seconds its ``Retry-After`` asked
    (priority and fairness sends one with a 429), None without one."""

    retry_after: float | None = None

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: AlreadyExists or a resourceVersion conflict."""


class Gone(KubeError):
    """410: a watch's resourceVersion is too old; list again."""


class Unavailable(KubeError):
    """The API server was unreachable or answered 429/5xx (after retries)."""


def _error_for(status: int, body: str) -> KubeError:
    reason, message = "", body[:500]
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            reason = str(parsed.get("reason", ""))
            message = str(parsed.get("message", message))
    except ValueError:
        pass
    cls: type[KubeError] = KubeError
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status == 410:
        cls = Gone
    elif status == 429 or status >= 500:
        cls = Unavailable
    return cls(status, reason, message)


def _answer_error(resp: aiohttp.ClientResponse, body: str) -> KubeError:
    """The error an answer of 300 or more is, with its ``Retry-After``."""
    error = _error_for(resp.status, body)
    error.retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    return error


class _TokenBucket:
    """Client-side rate limit: ``qps`` sustained, ``burst`` at once."""

    def __init__(self, qps: float, burst: int) -> None:
        self.rate = qps
        self.capacity = float(max(burst, 1))
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens < 1:
                await asyncio.sleep((1 - self.tokens) / self.rate)
                self.stamp = time.monotonic()
                self.tokens = 1
            self.tokens -= 1


def user_agent(component: str) -> str:
    """What the API server's audit log shows for a process's requests:
    ``phabmesh/<version> (<component>)``."""
    return f"phabmesh/{__version__} ({component})"


class KubeClient:
    """One per process; create it inside the running event loop and ``close()`` it.
    ``component`` names the process in its User-Agent (:func:`user_agent`). ``policy``: the
    process's retry policy (its settings'); a request's own retries use its short form, and
    so do the reconnects of the watches made with this client."""

    def __init__(
        self,
        connection: Connection,
        *,
        qps: float = 50.0,
        burst: int = 100,
        timeout: float = 30.0,
        attempts: int = 4,
        connections: int = 64,
        component: str = "client",
        policy: Backoff = backoff.DEFAULT,
    ) -> None:
        self.connection = connection
        self.policy = policy
        self.component = component
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self._limit = _TokenBucket(qps, burst)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def sibling(self, *, connections: int) -> KubeClient:
        """A client of its own connection pool (``connections``; 0: no bound) that shares
        this one's request budget: the process's ``kube_qps`` stays one budget."""
        other = KubeClient(
            self.connection,
            timeout=self.timeout,
            attempts=self.attempts,
            connections=connections,
            component=self.component,
            policy=self.policy,
        )
        other._limit = self._limit
        return other

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise Unavailable(0, "Closed", "the client is closed")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    ssl=self.connection.ssl_context, limit=self._connections
                ),
                raise_for_status=False,
                headers={"User-Agent": user_agent(self.component)},
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
        attempts: int | None = None,
        limited: bool = True,
        decode: Callable[[bytes], JSON] | None = None,
    ) -> JSON:
        """``decode``: how a successful answer's body becomes JSON (by default, whole; a
        :class:`~phabmesh.kube.shapes.Shape` keeps only what its reader reads)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", **self.connection.headers()}
        if data is not None:
            headers["Content-Type"] = content_type
        tries = attempts or self.attempts
        retries = self.policy.short()
        for attempt in range(1, tries + 1):
            if limited:  # else the caller keeps a budget of its own
                await self._limit.take()
            try:
                async with self.session.request(
                    method,
                    self.connection.host + path,
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
                ) as resp:
                    raw = await resp.read()
                    if resp.status < 300:
                        if not raw:
                            return {}
                        parsed: JSON = decode(raw) if decode is not None else json.loads(raw)
                        return parsed
                    error = _answer_error(resp, raw.decode(errors="replace"))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = Unavailable(0, type(exc).__name__, str(exc) or type(exc).__name__)
            if not isinstance(error, Unavailable) or attempt == tries:
                raise error
            await asyncio.sleep(retries.delay(attempt, error.retry_after))
        raise AssertionError("unreachable")

    # -- conveniences ---------------------------------------------------------------------

    async def get(self, path: str, **kw: Any) -> JSON:
        return await self.request("GET", path, **kw)

    async def create(self, path: str, body: JSON, **kw: Any) -> JSON:
        return await self.request("POST", path, body=body, **kw)

    async def merge_patch(self, path: str, patch: JSON, **kw: Any) -> JSON:
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH, **kw)

    async def json_patch(self, path: str, ops: list[JSON], **kw: Any) -> JSON:
        return await self.request("PATCH", path, body=ops, content_type=JSON_PATCH, **kw)

    async def delete(self, path: str, body: JSON | None = None, **kw: Any) -> JSON:
        return await self.request("DELETE", path, body=body, **kw)

    async def list_all(
        self, path: str, params: Mapping[str, str] | None = None, chunk: int = 500
    ) -> tuple[list[JSON], str]:
        """Every item of a collection, read in pages; returns (items, resourceVersion)."""
        items: list[JSON] = []
        version = ""
        async for page, page_version in self.list_pages(path, params, chunk):
            items.extend(page)
            version = page_version
        return items, version

    async def list_pages(
        self,
        path: str,
        params: Mapping[str, str] | None = None,
        chunk: int = 500,
        shape: Shape[Any] | None = None,
        not_older_than: str = "",
    ) -> AsyncIterator[tuple[list[JSON], str]]:
        """A collection page by page: (the page's items, the list's resourceVersion, known
        with the last page; "" before it). One page is held at a time; with ``shape``, only
        the fields it declares.

        By default a consistent read. An API server whose etcd reports watch progress
        (Kubernetes 1.31 and later; etcd 3.4.31, 3.5.13, 3.6) serves it from its watch cache
        once the cache has caught up with etcd; an older one has etcd serve every page, the
        API server decoding and converting each object (at 50,000 pods, twice the API
        server's CPU and 2 s of etcd's). With ``not_older_than`` (a resourceVersion this
        process has seen of this collection) the list is at least as new as that version,
        and the API server's watch cache serves it, page by page, on either
        (``resourceVersionMatch=NotOlderThan``, which client-go's informers use as well). A
        cache that does not reach that version in time (504, "Too large resource version") is
        passed by: a consistent read then. Without progress reports, another resource's
        version is one this collection's cache reaches only with this collection's next
        write: such a list would be held 3 s, then read consistently after all.
        """
        base = dict(params or {}, limit=str(chunk))
        query = dict(base)
        if not_older_than:
            query.update(resourceVersion=not_older_than, resourceVersionMatch="NotOlderThan")
        decode = shape.page if shape is not None else None
        while True:
            try:
                # A cache behind is not waited for again: its 504 came after 3 s.
                again = 1 if "resourceVersion" in query else None
                page = await self.get(path, params=query, decode=decode, attempts=again)
            except KubeError as error:
                if "resourceVersion" not in query or error.status != 504:
                    raise
                log.info("list_cache_behind", path=path, error=str(error))
                query = dict(base)
                continue
            meta = page.get("metadata") or {}
            cont = meta.get("continue")
            yield (
                list(page.get("items") or []),
                "" if cont else str(meta.get("resourceVersion", "")),
            )
            if not cont:
                return
            # A continued list names its version in the token alone.
            query = dict(base, **{"continue": cont})

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_seconds: int = 300,
        *,
        idle_timeout: float | None = None,
        opened: Callable[[], None] | None = None,
        shape: Shape[Any] | None = None,
    ) -> AsyncIterator[JSON]:
        """Raw watch events from ``resource_version`` until the server ends the stream.

        Raises :class:`Gone` when the version is too old and :class:`Unavailable`
        when the connection fails, stays silent for ``idle_timeout`` seconds (by default
        30 s past ``timeout_seconds``) or outlasts ``timeout_seconds`` by that much.
        ``opened`` is called once the server has accepted the watch. With ``shape``, each
        event's object holds only the fields it declares.
        """
        decode = shape.event if shape is not None else json.loads
        query = dict(
            params or {},
            watch="true",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        headers = {"Accept": "application/json", **self.connection.headers()}
        idle = idle_timeout if idle_timeout is not None else timeout_seconds + 30.0
        try:
            async with self.session.get(
                self.connection.host + path,
                params=query,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    # The server ends the watch after timeout_seconds: one that lasts longer is
                    # stalled however it trickles.
                    total=timeout_seconds + idle,
                    sock_connect=10,
                    sock_read=idle,
                ),
            ) as resp:
                if resp.status >= 300:
                    raise _answer_error(resp, await resp.text())
                if opened is not None:
                    opened()
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event: JSON = decode(line)
                    if event.get("type") == "ERROR":
                        obj = event.get("object") or {}
                        raise _error_for(int(obj.get("code", 500)), json.dumps(obj))
                    yield event
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(0, type(exc).__name__, str(exc) or type(exc).__name__) from exc

    async def pod_token(
        self,
        namespace: str,
        service_account: str,
        pod: JSON,
        audience: str = "phabmesh.io",
        seconds: int = 600,
    ) -> str:
        """A service-account token bound to ``pod`` (TokenRequest), as a projected volume has."""
        meta = pod["metadata"]
        answer = await self.create(
            resource_path("", "v1", "serviceaccounts", namespace, service_account, "token"),
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [audience],
                    "expirationSeconds": seconds,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            },
        )
        return str(answer["status"]["token"])

    async def token_review(self, token: str, audiences: list[str], *, limited: bool = True) -> JSON:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        review = await self.create(
            "/apis/authentication.k8s.io/v1/tokenreviews", body, limited=limited
        )
        status: JSON = review.get("status") or {}
        return status
