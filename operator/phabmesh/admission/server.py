"""The pod-injection webhook, served by a process of its own beside the operator.

The operator's event loop serves the credential endpoint and runs the controller; a
webhook on that loop let anyone who reaches its port stall both with big
AdmissionReviews (parsing JSON holds the loop, and a thread would hold the GIL). So
the webhook runs in a child process, ``phabmesh webhook``, which the operator starts
and supervises (:class:`WebhookSupervisor`: started again, with a growing pause, when it
exits; each exit logged). The child has its own Kubernetes client, its own watch of the
bindings (:class:`~phabmesh.admission.Injector`) and reads the serving certificate from
the Secret the operator keeps (:class:`~phabmesh.admission.tls.WebhookTLS`). It runs at
the lowest CPU priority, and is the first the kernel ends when the pod runs short of
memory: a flood costs the flooder's own process.

Bounded work per request, before any of it is parsed:

- a body over :attr:`~phabmesh.settings.Settings.webhook_max_request_bytes` is refused
  with 413 as soon as its Content-Length (or what arrived) says so;
- at most :attr:`~phabmesh.settings.Settings.webhook_max_concurrent` reviews are read and
  answered at once, and at most :attr:`~phabmesh.settings.Settings.webhook_max_waiting`
  more wait (unread) for a place, each for :data:`WAIT_TIMEOUT` seconds at most; one more
  is answered 429 at once. One source (address) may hold half the places and be half of
  all present: one flooding address cannot take the API server's share;
- a review must arrive whole within :data:`READ_TIMEOUT` seconds (else 408).

Every refusal is an error to the API server, and the webhook's failure policy is Ignore:
the pod is created, without injection, as with phabmesh down. Where the API server has a
client certificate for webhooks (its AdmissionConfiguration's ``kubeConfigFile``),
:attr:`~phabmesh.settings.Settings.webhook_client_ca` makes the TLS handshake require one
signed by that CA (docs/security.md).

The child tells the operator over its stdout, one JSON object a line: ``{"ready": true}``
once it serves, and every second at most the counts of its decisions and refusals (the
operator's metrics). It exits when its stdin closes (the operator is gone).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import json
import os
import signal
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from phabmesh import metrics, serving, tasks
from phabmesh.admission import HANDLER_ID, Injector
from phabmesh.admission.inject import InvalidAnnotation
from phabmesh.admission.tls import CHECK_EVERY, WebhookTLS, service_names
from phabmesh.backoff import Backoff
from phabmesh.kube import KubeClient, load_connection
from phabmesh.settings import Settings

log = structlog.get_logger(__name__)

PATH = f"/{HANDLER_ID}"  # the webhook configuration's clientConfig path
READ_TIMEOUT = 5.0  # seconds for one review to arrive whole (the API server waits 5 s)
WAIT_TIMEOUT = 2.0  # seconds a review may wait for a place before it is refused (429)
NICENESS = 19  # the child's CPU priority: the lowest (os.nice), so a flood yields to all else
OOM_SCORE_ADJ = 1000  # the first the kernel ends when the pod runs out of memory (restarted)
REPORT_EVERY = 1.0  # seconds between the child's counts to the operator
STEADY = 60.0  # a child that served this long restarts after the first pause again

# Refusals (the `reason` label of phabmesh_webhook_refused_total).
TOO_LARGE = "TooLarge"
BUSY = "Busy"
SLOW = "Slow"
MALFORMED = "Malformed"


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The JSON Patch from ``before`` to ``after``, a pod the injection changed: whole
    fields of ``spec`` and the annotations (the only places it writes)."""
    ops: list[dict[str, Any]] = []
    old_spec, new_spec = before.get("spec") or {}, after.get("spec") or {}
    if "spec" not in before:
        ops.append({"op": "add", "path": "/spec", "value": new_spec})
    else:
        for key in sorted(old_spec.keys() | new_spec.keys()):
            path = "/spec/" + key.replace("~", "~0").replace("/", "~1")
            if key not in new_spec:
                ops.append({"op": "remove", "path": path})
            elif key not in old_spec:
                ops.append({"op": "add", "path": path, "value": new_spec[key]})
            elif old_spec[key] != new_spec[key]:
                ops.append({"op": "replace", "path": path, "value": new_spec[key]})
    old_meta, new_meta = before.get("metadata") or {}, after.get("metadata") or {}
    old_notes, new_notes = old_meta.get("annotations"), new_meta.get("annotations")
    if new_notes is not None and new_notes != old_notes:
        if "metadata" not in before:
            ops.append({"op": "add", "path": "/metadata", "value": {"annotations": new_notes}})
        else:
            op = "add" if old_notes is None else "replace"
            ops.append({"op": op, "path": "/metadata/annotations", "value": new_notes})
    return ops


def answer(review: Any, injector: Injector) -> dict[str, Any]:
    """The AdmissionReview that answers ``review``: allowed, with the injection's patch when
    the pod gets one; refused only for a bound pod whose phabmesh annotations are wrong
    (the message names the annotation). Raises ValueError for what is no AdmissionReview."""
    if not isinstance(review, dict) or not isinstance(review.get("request"), dict):
        raise ValueError("not an AdmissionReview")
    request = review["request"]
    uid = request.get("uid")
    if not isinstance(uid, str):
        raise ValueError("an AdmissionReview without request.uid")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object")
    if request.get("operation") == "CREATE" and isinstance(pod, dict):
        meta = pod.get("metadata")
        if not isinstance(meta, dict):
            meta = {}
        namespace = str(request.get("namespace") or meta.get("namespace") or "")
        try:
            injection = injector.decide(pod, namespace)
            if injection is not None:
                after = json.loads(json.dumps(pod))
                injection.apply(after)
                ops = json_patch(pod, after)
                if ops:
                    response["patchType"] = "JSONPatch"
                    response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        except InvalidAnnotation as exc:
            response["allowed"] = False
            response["status"] = {"code": 400, "reason": "BadRequest", "message": str(exc)}
        except Exception:  # never refuse a pod for phabmesh's own fault: admitted unchanged
            log.exception("pod_injection_failed", namespace=namespace)
    return {
        "apiVersion": review.get("apiVersion") or "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }


class WebhookApp:
    """The ``/inject`` route with its caps (see the module)."""

    def __init__(self, settings: Settings, injector: Injector) -> None:
        self.injector = injector
        self.max_bytes = settings.webhook_max_request_bytes
        self.max_concurrent = settings.webhook_max_concurrent
        self.max_waiting = settings.webhook_max_waiting
        # One source (address) may hold half the places, and be half of those waiting:
        # the API server keeps the other half whatever a flooder does.
        self.source_places = max(1, self.max_concurrent // 2)
        self.source_share = max(1, (self.max_concurrent + self.max_waiting) // 2)
        self.places = asyncio.Semaphore(self.max_concurrent)
        self.in_flight = 0  # holding a place
        self.present = 0  # holding a place or waiting for one
        self.by_source: collections.Counter[str] = collections.Counter()
        self.source_gates: dict[str, asyncio.Semaphore] = {}
        self.refused: collections.Counter[str] = collections.Counter()

    def routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.review)

    def _refuse(self, reason: str, status: int, text: str) -> web.Response:
        self.refused[reason] += 1
        # The rest of the body is not read: the connection goes with the answer (the
        # runner does not linger to drain it: runner()).
        response = web.Response(status=status, text=text + "\n")
        response.force_close()
        return response

    async def runner(self, settings: Settings) -> web.AppRunner:
        """An AppRunner (set up) serving this app: it never drains a refused body."""
        app = web.Application(client_max_size=settings.webhook_max_request_bytes)
        self.routes(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, lingering_time=0)
        await runner.setup()
        return runner

    async def review(self, request: web.Request) -> web.Response:
        length = request.content_length
        if length is not None and length > self.max_bytes:
            return self._refuse(
                TOO_LARGE, 413, f"an AdmissionReview of at most {self.max_bytes} bytes"
            )
        source = request.remote or ""
        if (
            self.present >= self.max_concurrent + self.max_waiting
            or self.by_source[source] >= self.source_share
        ):
            return self._refuse(BUSY, 429, "too many AdmissionReviews at once")
        self.present += 1
        self.by_source[source] += 1
        gate = self.source_gates.setdefault(source, asyncio.Semaphore(self.source_places))
        try:
            try:
                async with asyncio.timeout(WAIT_TIMEOUT):
                    await gate.acquire()
                    try:
                        await self.places.acquire()
                    except BaseException:
                        gate.release()
                        raise
            except TimeoutError:
                return self._refuse(BUSY, 429, "too many AdmissionReviews at once")
            self.in_flight += 1
            try:
                return await self._handle(request)
            finally:
                self.in_flight -= 1
                self.places.release()
                gate.release()
        finally:
            self.present -= 1
            self.by_source[source] -= 1
            if not self.by_source[source]:
                del self.by_source[source]
                del self.source_gates[source]

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                body = await self._read(request)
        except TimeoutError:
            return self._refuse(SLOW, 408, "the AdmissionReview arrived too slowly")
        if body is None:
            return self._refuse(
                TOO_LARGE, 413, f"an AdmissionReview of at most {self.max_bytes} bytes"
            )
        try:
            result = answer(json.loads(body), self.injector)
        except (ValueError, RecursionError) as exc:  # bad JSON included
            return self._refuse(MALFORMED, 400, f"{exc}"[:200])
        return web.json_response(result)

    async def _read(self, request: web.Request) -> bytes | None:
        """The body, or None once it passes the limit (the rest is never read)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)


def client_verifying(context: ssl.SSLContext, ca_file: str) -> None:
    """Make ``context`` require a client certificate signed by a CA in ``ca_file``."""
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"PHABMESH_WEBHOOK_CLIENT_CA: cannot load a CA bundle (PEM) from {ca_file}: {exc}"
        ) from exc
    context.verify_mode = ssl.CERT_REQUIRED


def yield_first() -> None:
    """This process at the lowest CPU priority, and the kernel's first choice to end when
    the pod runs short of memory (the operator starts it again)."""
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")


class WebhookProcess:
    """The child: ``phabmesh webhook`` (started by :class:`WebhookSupervisor`)."""

    def __init__(self, settings: Settings, *, kubeconfig: str | None = None) -> None:
        self.settings = settings
        self.kubeconfig = kubeconfig
        self.runner: web.AppRunner | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.decided: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        s = self.settings
        metrics.use(metrics.Metrics(metrics.OPERATOR))  # counts go to the operator instead
        self.client = KubeClient(
            load_connection(self.kubeconfig),
            qps=s.kube_qps,
            burst=s.kube_burst,
            component="webhook",
            policy=s.backoff(),
        )
        self.injector = Injector(s, self.client, on_decision=self._decided)
        self.tls = WebhookTLS(
            self.client,
            s.namespace,
            s.webhook_secret,
            s.webhook_configuration,
            service_names(s.webhook_service, s.namespace),
        )
        await self.tls.reload()
        assert self.tls.context is not None
        if s.webhook_client_ca:
            client_verifying(self.tls.context, s.webhook_client_ca)
        keep_tls = functools.partial(self.tls.run, CHECK_EVERY, keep=False)
        self.tasks.append(tasks.spawn("webhook-tls", keep_tls, s.backoff()))
        bindings = self.injector.bindings.run
        self.tasks.append(tasks.spawn("injector-bindings", bindings, s.backoff()))
        await self.injector.bindings.synced.wait()
        self.app = WebhookApp(s, self.injector)
        self.runner = await self.app.runner(s)
        site = web.TCPSite(
            self.runner, s.webhook_host, s.webhook_port, ssl_context=self.tls.context,
            reuse_address=True,
        )  # fmt: skip
        await site.start()
        log.info("webhook_started", port=serving.bound_port(self.runner))

    def _decided(self, outcome: str) -> None:
        self.decided[outcome] += 1

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.client.close()

    def _report(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def _reports(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            message: dict[str, Any] = {}
            if self.decided:
                message["decided"] = dict(self.decided)
                self.decided.clear()
            if self.app.refused:
                message["refused"] = dict(self.app.refused)
                self.app.refused.clear()
            if message:
                self._report(message)

    async def run_until_told(self) -> None:
        """Serve until SIGTERM/SIGINT or until stdin closes (the operator is gone)."""
        yield_first()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        orphaned = asyncio.create_task(stdin.read())
        await self.start()
        self._report({"ready": True})
        reports = asyncio.create_task(self._reports())
        waiter = asyncio.create_task(done.wait())
        await asyncio.wait({waiter, orphaned}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, orphaned, reports):
            task.cancel()
        await self.stop()


@dataclasses.dataclass
class WebhookSupervisor:
    """In the operator: runs the child, restarts it when it exits, forwards its counts."""

    settings: Settings
    kubeconfig: str | None = None
    ready: bool = False  # the child serves
    starts: int = 0
    child: asyncio.subprocess.Process | None = None
    # The pause before restarting the child: the retry policy of the settings.
    restarts: Backoff = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.restarts = self.settings.backoff()

    @property
    def settled(self) -> bool:
        """For the operator's readiness: the child serves, or its first start has failed.
        A webhook that keeps failing must not take the credential endpoint out of its
        Service (the operator's pods serve both); the failures are logged instead."""
        return self.ready or self.starts > 1

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "phabmesh.cli", "webhook"]
        if self.kubeconfig:
            command += ["--kubeconfig", self.kubeconfig]
        return command

    async def run(self) -> None:
        """Until cancelled: the child, again and again."""
        loop = asyncio.get_running_loop()
        exits = 0
        try:
            while True:
                started = loop.time()
                code = await self._run_once()
                self.ready = False
                exits = 1 if loop.time() - started > STEADY else exits + 1
                pause = self.restarts.delay(exits)
                log.error("webhook_process_exited", code=code, restart_in=round(pause, 1))
                await asyncio.sleep(pause)
        finally:
            self.ready = False
            await self._end()

    async def _run_once(self) -> int | None:
        env = {**os.environ, **self.settings.to_env()}
        self.starts += 1
        try:
            # A session of its own: Ctrl-C in the operator's terminal reaches the operator
            # alone, which stops the child itself (terminate, or its stdin closing), rather
            # than the child too, which would exit before the operator and be restarted.
            self.child = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            log.error("webhook_process_not_started", error=str(exc))
            return None
        assert self.child.stdout is not None
        async for line in self.child.stdout:
            self._heard(line)
        code = await self.child.wait()
        self.child = None
        return code

    def _heard(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("ready") is True:
            self.ready = True
            pid = self.child.pid if self.child is not None else None
            log.info("webhook_process_ready", starts=self.starts, pid=pid)
        current = metrics.current()
        for outcome, count in (message.get("decided") or {}).items():
            current.pod_injections.labels(str(outcome)).inc(int(count))
        for reason, count in (message.get("refused") or {}).items():
            current.webhook_refused.labels(str(reason)).inc(int(count))

    async def _end(self) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        try:
            await asyncio.wait_for(asyncio.shield(child.wait()), timeout=10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
