"""HTTP plumbing shared by every process: health, readiness and metrics endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import signal
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from phabmesh import identity
from phabmesh import metrics as metrics_module
from phabmesh.conduit import wire

ReadyCheck = Callable[[], bool]


def add_health_routes(
    app: web.Application, ready: ReadyCheck, registry: CollectorRegistry | None = None
) -> None:
    """``/healthz`` (the process answers), ``/readyz`` (``ready()``), ``/metrics`` (the
    process's own registry: :attr:`phabmesh.metrics.Metrics.registry`)."""
    served = registry if registry is not None else metrics_module.current().registry

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(served)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def start_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    read_bufsize: int | None = None,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Serve ``app`` on host:port; returns the runner to ``cleanup()`` later.

    ``read_bufsize``: how much of a request body each connection buffers before it stops
    reading from its socket until the handler reads (twice this; aiohttp's default 64 KiB).
    ``reuse_port``: with ``SO_REUSEPORT``, beside other processes listening on the same port
    (the kernel spreads the connections over them).
    """
    extra: dict[str, Any] = {} if read_bufsize is None else {"read_bufsize": read_bufsize}
    # Request bodies stay as sent: Conduit bodies are decompressed, bounded, by wire.decompress.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, auto_decompress=False, **extra
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    return runner


async def until_signalled(also: asyncio.Future[Any] | None = None) -> None:
    """Until SIGINT or SIGTERM (or ``also`` is done: a task the process cannot go on
    without)."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    waiter = asyncio.ensure_future(done.wait())
    waiting = {waiter} if also is None else {waiter, also}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's first site listens on (for port 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the runner listens on no TCP port")


def local_address(request: web.Request) -> str | None:
    """The address a request's connection reached: the serving pod's own behind Linkerd,
    whose inbound proxy connects to it (see :func:`phabmesh.identity.from_local_proxy`)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sockname[0]) if isinstance(sockname, tuple) and sockname else None


def decode_conduit(request: web.Request, body: bytes, max_bytes: int) -> wire.Call:
    """A Conduit call as this request carries it (any encoding, compressed or not)."""
    return wire.decode_request(
        request.method,
        request.headers.get("Content-Type", ""),
        body,
        request.query_string,
        content_encoding=request.headers.get("Content-Encoding", ""),
        max_bytes=max_bytes,
    )


def free_port(host: str) -> int:
    """A port free on ``host`` now, for a server that must be told its port up front."""
    return free_ports(host, 1)


# Where ports told up front are taken from: below Linux's ephemeral range (32768-60999), from
# which the system picks the local port of every outgoing connection and of every listener on
# port 0, so that none of those takes a port between its choice here and its use.
CHOSEN_PORTS = range(20000, 32000)


def free_ports(host: str, count: int) -> int:
    """The first of ``count`` consecutive ports all free on ``host`` now (``phabmesh run``
    gives the gateway the port after the operator's)."""
    for _ in range(200):
        port = secrets.choice(CHOSEN_PORTS[: len(CHOSEN_PORTS) - count])
        with contextlib.ExitStack() as held:
            try:
                for offset in range(count):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((host, port + offset))
            except OSError:
                continue
            return port
    raise OSError(f"no {count} consecutive free ports on {host}")


class Holds:
    """Refusals of a caller over its own share, answered late: a flood waits for its answers
    instead of being answered as fast as it can ask (as nginx's ``limit_req`` delays the
    requests over a rate).

    A caller that honours ``Retry-After`` loses little: it would have waited anyway (the
    credential endpoint's ``Retry-After`` is what is left of the wait after the hold; the
    gateway's stays its fixed second). A flooding caller's connections sit idle for the hold,
    so it gets about ``limit / seconds`` refusals a second in all, instead of as many as the
    event loop can write, while everyone else's calls are served beside them. At most
    ``limit`` refusals are held at once (each keeps a connection); past that they are
    answered at once.
    """

    def __init__(self, limit: int, seconds: float) -> None:
        self.limit = limit
        self.seconds = seconds
        self.held = 0

    async def hold(self, retry_after: float) -> float:
        """Wait up to ``retry_after`` seconds (at most :attr:`seconds`) while a place is
        free; the seconds waited."""
        wait = min(retry_after, self.seconds)
        if wait <= 0 or self.held >= self.limit:
            return 0.0
        self.held += 1
        try:
            await asyncio.sleep(wait)
        finally:
            self.held -= 1
        return wait


MAX_SOURCE_NAME = 253  # a Kubernetes object name; no identity is longer


def review_source(client_id: str | None, peer: str | None, local: str | None = None) -> str:
    """Who a call counts as, for the budgets a source may not exceed (the credential
    endpoint's TokenReviews, the gateway's decoding and bytes in flight).

    Behind Linkerd every call comes from the serving pod's own inbound proxy (the pod's own
    address, or loopback before Linkerd 2.11: :func:`phabmesh.identity.from_local_proxy`),
    which sets ``l5d-client-id`` for a meshed caller: that identity is the source, and
    unmeshed callers share the proxy's budget. From any other peer the header proves
    nothing (anyone can send it), so the peer's address is the source.
    """
    vouched = identity.vouched_client_id(client_id, peer, local)
    if vouched:
        if len(vouched) > MAX_SOURCE_NAME:  # no identity is that long: keep the key small anyway
            return "id-sha256:" + hashlib.sha256(vouched.encode()).hexdigest()
        return "id:" + vouched
    return "peer:" + (peer or "")
