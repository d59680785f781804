"""The Conduit test server: HTTP as Phorge's web server answers it (faults, encodings), in
front of the :mod:`~phabmesh.dev.conduit.methods` over a :mod:`~phabmesh.dev.conduit.store`."""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from phabmesh import serving
from phabmesh.conduit import responses, wire
from phabmesh.dev.conduit import builds, hooks
from phabmesh.dev.conduit.api import (
    COMMON_HEADERS,
    DB_DOWN_PAGE,
    METHOD_NAME_BYTES,
    PARAMS,
    PUBLIC_METHODS,
    RATE_LIMITED_TEXT,
)
from phabmesh.dev.conduit.methods import Methods
from phabmesh.dev.conduit.php import Failure
from phabmesh.dev.conduit.store import Store, TestUser, Token


class ConduitServer:
    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, hostname: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.hostname = hostname or socket.gethostname()
        self.store = Store()
        self.methods = Methods(self.store, self.hostname)
        self.down = False  # every request answers 500 with Phorge's fatal page
        self.fail_next = 0  # the next N requests answer ``fail_status``, then all is well
        self.fail_status = 500
        self.rate_limited = False  # every request answers 429, as Phorge's rate limiter
        self.delay = 0.0  # seconds to wait before answering
        # As a proxy in front of Phorge that compresses every answer with this coding,
        # whatever the client's Accept-Encoding says (None: Phorge's own choice).
        self.compress_anyway: responses.Coding | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        # Herald webhooks: every edit that changes an object is delivered to each, as Phorge's
        # daemons do after the edit, and what each delivery got back is kept, in order.
        self.hooks: list[hooks.Hook] = []
        self.deliveries: list[hooks.Delivery] = []
        self._delivering: set[asyncio.Task[None]] = set()
        self._lock = self.store.lock
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- driving it from tests ------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def users(self) -> dict[str, TestUser]:
        return self.store.users

    @property
    def tokens(self) -> dict[str, Token]:
        return self.store.tokens

    @property
    def clock(self) -> Callable[[], float]:
        return self.store.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.store.clock = clock

    def add_user(self, username: str, **fields: Any) -> TestUser:
        """A Phorge account (``bot``, ``admin``, ``disabled``, ...: see Store.add_user)."""
        return self.store.add_user(username, **fields)

    def add_token(
        self, username: str, token: str | None = None, expires: float | None = None
    ) -> str:
        return self.store.add_token(username, token, expires)

    def disable_user(self, username: str) -> None:
        self.store.disable_user(username)

    def enable_user(self, username: str) -> None:
        self.store.enable_user(username)

    def terminate_token(self, token: str) -> None:
        """What the web UI's "terminate" does: the expiry moves into the past."""
        self.store.terminate_token(token)

    def delete_token(self, token: str) -> None:
        """What ``bin/auth revoke --type conduit`` does: the token is gone."""
        self.store.delete_token(token)

    def add_hook(self, url: str, key: str) -> hooks.Hook:
        """A Herald webhook to ``url`` signed with ``key``, called on every edit."""
        hook = hooks.Hook(url, key)
        with self._lock:
            self.hooks.append(hook)
        return hook

    def remove_hook(self, hook: hooks.Hook) -> None:
        with self._lock:
            self.hooks.remove(hook)

    def call_hook(
        self,
        hook: hooks.Hook,
        object_phid: str,
        *,
        epoch: int | None = None,
        transactions: tuple[str, ...] = (),
        test: bool = True,
        by: str = "PHID-USER-webhooktester00",
    ) -> hooks.Delivery:
        """Call ``hook`` now, as Phorge's "Call Webhook" test action does (``test``; its
        trigger is the user ``by`` who asked), and wait for its answer. ``epoch``: when
        Phorge queued the call (default now)."""
        when = int(self.clock()) if epoch is None else epoch
        body, headers = hooks.request(
            hook,
            object_phid,
            epoch=when,
            transactions=transactions,
            test=test,
            triggers=(by,) if test else None,
        )
        return self.post_hook(hook.url, body, headers)

    def post_hook(self, url: str, body: bytes, headers: dict[str, str]) -> hooks.Delivery:
        """POST a delivery as given (a replay, a forgery) from the server's loop; its answer."""
        assert self._loop is not None, "the server is not started"
        future = asyncio.run_coroutine_threadsafe(hooks.post(url, body, headers), self._loop)
        return future.result(hooks.TIMEOUT + 5)

    def run_build(
        self, step: builds.Step, *, revision: int | None = 1
    ) -> tuple[builds.Target, hooks.Delivery]:
        """Run a build of one "Make HTTP Request" ``step`` as Phorge's daemons do, and wait
        for the step's request: its target (Waiting, Passed or Failed after it) and what the
        request got back."""
        assert self._loop is not None, "the server is not started"
        with self._lock:
            target = self.methods.builds.start(step, int(self.clock()))
        values = builds.variables(target, revision)
        url = builds.request_url(step.uri, values)
        headers = builds.request_headers(step)
        future = asyncio.run_coroutine_threadsafe(
            builds.send(step.method, url, headers), self._loop
        )
        delivery = future.result(builds.REQUEST_SECONDS + 5)
        with self._lock:
            self.methods.builds.requested(target, delivery, int(self.clock()))
        return target, delivery

    def _edited(self, object_phid: str, transactions: list[str]) -> None:
        """After an edit: a delivery to each webhook, in the background (Phorge's daemons)."""
        if not transactions:
            return
        when = int(self.store.clock())
        for hook in list(self.hooks):
            body, headers = hooks.request(
                hook, object_phid, epoch=when, transactions=tuple(transactions)
            )
            task = asyncio.create_task(self._deliver(hook.url, body, headers))
            self._delivering.add(task)
            task.add_done_callback(self._delivering.discard)

    async def _deliver(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        delivery = await hooks.post(url, body, headers)
        with self._lock:
            self.deliveries.append(delivery)

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=8 << 20)
        app.router.add_route("*", "/api/{method}", self._handle)
        return app

    async def start_async(self) -> None:
        # Bodies are decompressed by wire.decompress, which bounds their size.
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, auto_decompress=False
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break

    async def stop_async(self) -> None:
        for task in list(self._delivering):
            task.cancel()
        await asyncio.gather(*self._delivering, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ConduitServer:
        await self.start_async()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_async()

    def start(self) -> ConduitServer:
        """Serve from a background thread with its own event loop."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conduit-test-server", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.start_async(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self.stop_async(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()
        self._loop = None

    # -- the server -----------------------------------------------------------------------

    @staticmethod
    def _reply(result: Any = None, code: str | None = None, info: str | None = None) -> bytes:
        return responses.envelope(result, code, info)

    def _encode(self, request: web.Request, body: bytes) -> web.Response:
        """A Conduit answer compressed as Phorge compresses it (errors too)."""
        if self.compress_anyway is not None:
            encoded = responses.Encoded(
                responses.compress(body, self.compress_anyway), self.compress_anyway
            )
        else:
            encoded = responses.encode(body, request.headers.get("Accept-Encoding"))
        return web.Response(
            body=encoded.body,
            headers={
                "X-Conduit-Capabilities": "gzip",
                "Content-Type": "application/json",
                **COMMON_HEADERS,
                **encoded.headers,
            },
        )

    def _fault(self, request: web.Request) -> web.Response | None:
        """A broken or rate-limited server, as Phorge's startup code answers before Conduit.

        These pages are written before ``AphrontResponse`` turns compression on: never
        compressed.
        """
        with self._lock:
            if self.down:
                status = 500
            elif self.fail_next:
                self.fail_next -= 1
                status = self.fail_status
            elif self.rate_limited:
                status = 429
            else:
                return None
        if status == 429:
            return web.Response(
                status=429,
                text=RATE_LIMITED_TEXT.format(client=request.remote or "127.0.0.1"),
                content_type="text/plain",
                charset="utf-8",
            )
        return web.Response(
            status=status,
            text=DB_DOWN_PAGE,
            content_type="text/html",
            charset="UTF-8",
            headers=COMMON_HEADERS,
        )

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        with self._lock:
            self.calls[method] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        fault = self._fault(request)
        if fault is not None:
            return fault
        return self._encode(request, await self._call(request, method))

    async def _call(self, request: web.Request, method: str) -> bytes:
        """Phorge's order: read params, find the method, check its params, authenticate, run."""
        body = await request.read()
        # Phorge truncates the name to its call log's 64-byte column before anything else.
        method = method.encode()[:METHOD_NAME_BYTES].decode(errors="ignore")
        try:
            call = serving.decode_conduit(request, body, 8 << 20)
        except wire.BadRequest as exc:
            return self._reply(None, "ERR-CONDUIT-CORE", exc.info(method))
        if method not in PARAMS:
            return self._reply(
                None, "ERR-CONDUIT-CALL", f'Conduit API method "{method}" does not exist.'
            )
        unknown = [key for key in call.params if key not in PARAMS[method]]
        if unknown:
            listed = "'" + "', '".join(unknown) + "'"
            return self._reply(
                None,
                "ERR-CONDUIT-CALL",
                f'API Method "{method}" does not define these parameters: {listed}.',
            )
        try:
            with self._lock:
                user = None if method in PUBLIC_METHODS else self.store.authenticate(call.token)
                result = self.methods.execute(method, call, user, str(request.url.origin()))
        except Failure as failure:
            return self._reply(None, failure.code, failure.info)
        if method.endswith(".edit") and isinstance(result, dict):
            self._edited(str(result["object"]["phid"]), [x["phid"] for x in result["transactions"]])
        return self._reply(result)
