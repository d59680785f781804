"""Hostile input against the gateway: what a concurrent ``conduit.ping`` waits meanwhile.

    python -m bench.hostile [--seconds 5] [--names 30000]

A real kube-apiserver and etcd, the Conduit test server (``bench.conduit``) and
``phabmesh gateway`` each run in a process of their own on 127.0.0.1, the gateway logging
its audit lines at INFO as JSON (as deployed). This process sends, one kind at a time, a
hostile request of up to the body limit over and over on one connection (or
``--attackers`` at once), and beside it one
``conduit.ping`` after another on another connection; it prints the pings' latency
against the same pings with no attack, and the gateway's memory. Then it sends
``--names`` unauthenticated calls to distinct method names and counts the series of
``phabmesh_gateway_requests_total``. Last, with ``phabmesh operator`` beside them, the
credential endpoint: a real pod's exchange (an uncached TokenReview) alone, then while
``--flood`` requests with junk tokens and as many with forged ones (JWTs for the right
audience) arrive at once, and how many TokenReviews the flood cost. Then, with the shipped
TokenReview budgets, a real pod's exchanges (fresh tokens, 10 a second) alone and while
``--identities`` service accounts of another namespace send forged tokens: their latency
and how many were refused. With ``--parts floods`` (also in the default), the gateway's
floods, each sent from a process of its own for
``--seconds``, again and again: one row per flood with the p99 of ``conduit.ping`` and of
an authenticated arc-style call (gzip, ``user.whoami`` with a real pod's credential) during
the flood against the same without it, measured in the same run, how the flood was
answered, and the gateway's peak memory with its workers. Then the injection webhook
flooded with big AdmissionReviews, beside pings, exchanges and issuances
(``bench.hostile_webhook``). Nothing here asserts: it measures and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import gzip
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp

from bench.__main__ import (
    NS,
    Child,
    Conduit,
    G,
    Operator,
    V,
    install,
    ms,
    pct,
    pods,
    ready,
    setup,
    until,
)
from phabmesh import resources, serving
from phabmesh.dev import devcluster
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.kube.client import JSON
from phabmesh.leases.index import LeaseIndex
from phabmesh.resources import resource_path
from phabmesh.settings import Settings

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LIMIT = Settings().max_request_bytes


def _fill(head: str, unit: str, tail: str = "") -> bytes:
    """``head`` + ``unit`` repeated + ``tail``: as long as fits in the body limit."""
    count = (LIMIT - len(head) - len(tail)) // len(unit)
    return (head + unit * count + tail).encode()


def _fields() -> bytes:
    value = "v" * (LIMIT // 10_000 - 12)
    return "&".join(f"k{i:05d}={value}" for i in range(9_999)).encode()


def _json_params() -> bytes:
    entry = {"constraints": {"usernames": ["x" * 40]}, "limit": 100}
    size = len(json.dumps({"k00000": entry})) + 2
    body = json.dumps({f"k{i:05d}": entry for i in range((LIMIT - 10) // size)})
    return b"params=" + body.encode()  # JSON has no "&" or "=" and needs no escaping here


# (what, method, body, extra headers): each body is at most the body limit.
ATTACKS: list[tuple[str, str, Callable[[], bytes], dict[str, str]]] = [
    (
        "a params[x] value of '-----BEGIN PRIVATE KEY-----' repeated (1 MiB)",
        "user.whoami",
        lambda: _fill("params[x]=", "-----BEGIN+PRIVATE+KEY-----"),
        {},
    ),
    (
        "a params[x] value of 'eyJ' repeated (1 MiB)",
        "user.whoami",
        lambda: _fill("params[x]=", "eyJ"),
        {},
    ),
    (
        "a field name nested 349,500 deep (1 MiB)",
        "conduit.ping",
        lambda: _fill("a", "[x]", "=1"),
        {},
    ),
    (
        "one field of 349,500 percent-escapes, no credential (1 MiB)",
        "user.whoami",
        lambda: _fill("z=", "%41"),
        {},
    ),
    ("9,999 fields of 90 characters, no credential (1 MiB)", "user.whoami", _fields, {}),
    ("params=<JSON object of 1 MiB>, no credential", "user.whoami", _json_params, {}),
    (
        "the 9,999 fields to conduit.ping (public: decoded, re-encoded, forwarded)",
        "conduit.ping",
        _fields,
        {},
    ),
    (
        "the 9,999 fields gzip-compressed (1 MiB inflated)",
        "user.whoami",
        lambda: gzip.compress(_fields()),
        {"Content-Encoding": "gzip"},
    ),
]


class Gateway(Child):
    def __init__(self, plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path) -> None:
        self.port = serving.free_port("127.0.0.1")
        self.metrics_port = serving.free_port("127.0.0.1")
        local = Settings.local_env(
            conduit.url,
            log_level="INFO",  # the audit lines are part of the work per call
            log_json=True,
            gateway_port=self.port,
            metrics_port=self.metrics_port,
        )
        env = dict(os.environ, KUBECONFIG=str(plane.kubeconfig), **local)
        super().__init__([sys.executable, "-m", "phabmesh.cli", "gateway"], env, tmp / "gw.log")


async def _ping(http: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    async with http.post(url, data=b"", headers=FORM) as answer:
        body = await answer.json(content_type=None)
    if body.get("error_code") is not None:
        raise RuntimeError(f"ping refused: {body}")
    return time.perf_counter() - started


async def pings(http: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    """One ping after another (10 ms apart) for ``seconds``."""
    took: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        took.append(await _ping(http, url))
        await asyncio.sleep(0.01)
    return took


async def attack(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stop: asyncio.Event
) -> list[tuple[float, int, str]]:
    """The hostile request again and again until ``stop``: (seconds, HTTP status, error_code)."""
    answers: list[tuple[float, int, str]] = []
    while not stop.is_set():
        started = time.perf_counter()
        async with http.post(url, data=body, headers={**FORM, **headers}) as answer:
            text = await answer.text()
        code = str(json.loads(text).get("error_code")) if text.startswith("{") else text[:40]
        answers.append((time.perf_counter() - started, answer.status, code))
    return answers


def summary(took: list[float]) -> str:
    return (
        f"p50 {ms(pct(took, 50))}, p99 {ms(pct(took, 99))}, max {ms(max(took))} ({len(took)} pings)"
    )


async def cardinality(
    gateway: Gateway, http: aiohttp.ClientSession, base: str, args: argparse.Namespace
) -> tuple[str, str]:
    """Unauthenticated calls to distinct method names: the metric's series and memory."""
    metrics_url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"

    async def series() -> tuple[int, int]:
        async with http.get(metrics_url) as answer:
            text = await answer.text()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith("phabmesh_gateway_requests_total{")
        ]
        return len(lines), len(text)

    before, rss_before = await series(), gateway.memory_mb()[0]
    names = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))

    async def one(name: str) -> None:
        async with names.post(f"{base}/{name}", data=b"", headers=FORM) as answer:
            await answer.read()

    try:
        for start in range(0, args.names, 500):
            batch = range(start, min(start + 500, args.names))
            await asyncio.gather(*(one(f"x{uuid.uuid4().hex}") for _ in batch))
    finally:
        await names.close()
    after, rss_after = await series(), gateway.memory_mb()[0]
    return (
        f"{args.names:,} unauthenticated calls to distinct method names",
        f"phabmesh_gateway_requests_total series {before[0]} -> {after[0]}, /metrics "
        f"{before[1] / 1024:.1f} KB -> {after[1] / 1024:.1f} KB, gateway RSS "
        f"{rss_before:.0f} -> {rss_after:.0f} MB",
    )


async def scenario(
    gateway: Gateway, conduit: Conduit, args: argparse.Namespace
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    base = f"http://127.0.0.1:{gateway.port}/api"
    ping_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    hostile_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.attackers))
    try:
        deadline = time.perf_counter() + 60
        while True:
            try:
                await _ping(ping_http, f"{base}/conduit.ping")
                break
            except (aiohttp.ClientError, RuntimeError):
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.2)
        normal = await pings(ping_http, f"{base}/conduit.ping", args.seconds)
        rows.append(("conduit.ping, no attack", summary(normal)))
        for what, method, make, headers in ATTACKS:
            body = make()
            stop = asyncio.Event()
            hostile = asyncio.gather(
                *(
                    attack(hostile_http, f"{base}/{method}", body, headers, stop)
                    for _ in range(args.attackers)
                )
            )
            await asyncio.sleep(0.2)
            during = await pings(ping_http, f"{base}/conduit.ping", args.seconds)
            direct = ""
            if "forwarded" in what:  # Phabricator itself has the body to read
                beside = await pings(ping_http, f"{conduit.url}/api/conduit.ping", args.seconds)
                direct = f"; conduit.ping straight to Phabricator meanwhile: {summary(beside)}"
            stop.set()
            answers = [answer for each in await hostile for answer in each]
            codes = sorted({f"{status} {code}" for _, status, code in answers})
            rss, peak = gateway.memory_mb()
            rows.append(
                (
                    f"conduit.ping during: {what}",
                    f"{summary(during)}; p99 {ms(pct(during, 99) - pct(normal, 50))} over normal "
                    f"p50; {len(answers)} hostile calls of {len(body):,} bytes, each "
                    f"{ms(pct([a[0] for a in answers], 50))} (p50), answered {', '.join(codes)}; "
                    f"gateway RSS {rss:.0f} MB (peak {peak:.0f} MB){direct}",
                )
            )
        rows.append(await cardinality(gateway, ping_http, base, args))
    finally:
        await ping_http.close()
        await hostile_http.close()
    return rows


def _flood(url: str, count: int) -> list[int]:
    """``count`` junk and ``count`` forged tokens at once; their HTTP statuses."""

    async def flood() -> list[int]:
        connector = aiohttp.TCPConnector(limit=2 * count)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def bad(token: str) -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post(url, headers=headers) as answer:
                    await answer.read()
                    return answer.status

            tokens = [f"junk{i}" for i in range(count)] + [_forged(i) for i in range(count)]
            return list(await asyncio.gather(*(bad(token) for token in tokens)))

    return asyncio.run(flood())


def _forged(i: int) -> str:
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'aud': ['phabmesh.io'], 'sub': f'x{i}'})}.c2ln"


async def credential_flood(
    plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * args.flood + 8))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    operator = Operator(plane, conduit, tmp)
    try:
        await setup(kube, conduit)
        await ready(http, operator.metrics_port)
        created = await pods(kube, NS, 10, running=True)
        uids = {p["metadata"]["uid"] for p in created}

        async def all_active() -> bool:
            return sum(
                1 for lease in leases.by_uid.values() if lease.active and lease.pod_uid in uids
            ) == len(uids)

        await until(all_active, 60)
        url = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        identity = f"runner.{NS}.serviceaccount.identity.linkerd.cluster.local"

        async def exchange(pod: dict[str, object]) -> float:
            token = await kube.pod_token(NS, "runner", pod, seconds=3600)  # a fresh one: uncached
            started = time.perf_counter()
            async with http.post(
                url, headers={"Authorization": f"Bearer {token}", "l5d-client-id": identity}
            ) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(f"exchange refused: {answer.status}")
            return time.perf_counter() - started

        alone = [await exchange(p) for p in created]

        async def reviews() -> float:
            async with http.get(f"http://127.0.0.1:{operator.metrics_port}/metrics") as answer:
                text = await answer.text()
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("phabmesh_token_reviews_total{")
                and ('result="authenticated"' in line or 'result="refused"' in line)
            )

        before = await reviews()
        # The flood comes from a process of its own: this one's loop only times the exchanges.
        with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(pool, int, "0")  # the process is up
            flooding = loop.run_in_executor(pool, _flood, url, args.flood)
            await asyncio.sleep(0.2)
            during = [await exchange(p) for p in created]
            statuses = await flooding
        spent = await reviews() - before - len(created)
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        rss, peak = operator.memory_mb()
        return [
            (
                "credential exchange (uncached review), alone",
                f"p50 {ms(pct(alone, 50))}, max {ms(max(alone))}",
            ),
            (
                f"credential exchange during {args.flood} junk + {args.flood} forged tokens",
                f"p50 {ms(pct(during, 50))}, max {ms(max(during))}; the flood was answered "
                f"{counts} and cost {spent:.0f} TokenReviews; operator RSS {rss:.0f} MB "
                f"(peak {peak:.0f} MB)",
            ),
        ]
    finally:
        operator.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()


# -- many identities of one namespace against the TokenReview budgets ------------------------

FLOOD_NAMESPACE = "tenant-flood"  # the flooding identities' namespace (headers only)


class ShippedOperator(Operator):
    """``phabmesh operator`` with the shipped TokenReview budgets."""

    def __init__(self, plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path) -> None:
        super().__init__(plane, conduit, tmp, shipped_budgets=True)


def _identities_flood(url: str, identities: int, seconds: float) -> list[int]:
    """Forged tokens from ``identities`` mesh identities of one namespace, each one after
    the other for ``seconds`` (as the local Linkerd proxy would pass them on); statuses."""

    async def flood() -> list[int]:
        end = time.perf_counter() + seconds
        connector = aiohttp.TCPConnector(limit=identities)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(n: int) -> list[int]:
                who = f"flood-{n}.{FLOOD_NAMESPACE}.serviceaccount.identity.linkerd.cluster.local"
                statuses: list[int] = []
                while time.perf_counter() < end:
                    token = _forged(n * 1_000_000 + len(statuses))
                    headers = {"Authorization": f"Bearer {token}", "l5d-client-id": who}
                    async with http.post(url, headers=headers) as answer:
                        await answer.read()
                        statuses.append(answer.status)
                return statuses

            done = await asyncio.gather(*(one(n) for n in range(identities)))
            return [status for each in done for status in each]

    return asyncio.run(flood())


MIB = 1 << 20
BIG_ANSWER_BYTES = 14 * MIB  # under the default PHABMESH_MAX_RESPONSE_BYTES (16 MiB)


PLAIN_FLOOD = "300 plain bodies of 1 MiB, no credential"


def _flood_bodies() -> dict[str, tuple[str, bytes, dict[str, str], int]]:
    """What each gateway flood sends: (method, body, headers, at once)."""
    plain = b"a=" + b"0" * (MIB - 2)
    return {
        "48 gzip bodies of about 1 KB (each 1 MiB inflated), no credential": (
            "user.whoami",
            gzip.compress(plain),
            {"Content-Encoding": "gzip"},
            48,
        ),
        "8 gzip bodies of 27 KB (9,999 fields inflated), no credential": (
            "user.whoami",
            gzip.compress(_fields()),
            {"Content-Encoding": "gzip"},
            8,
        ),
        PLAIN_FLOOD: ("user.whoami", plain, {}, 300),
    }


def _send_flood(
    url: str, body: bytes, headers: dict[str, str], count: int, seconds: float
) -> dict[str, int]:
    """``count`` calls at once, again and again for ``seconds``: how they were answered."""

    async def flood() -> dict[str, int]:
        answered: dict[str, int] = {}
        connector = aiohttp.TCPConnector(limit=count)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> str:
                try:
                    async with http.post(url, data=body, headers={**FORM, **headers}) as answer:
                        text = await answer.text()
                    code = json.loads(text).get("error_code") if text.startswith("{") else text
                    return f"{answer.status} {code}"
                except aiohttp.ClientError as exc:  # closed by the gateway after its answer
                    return type(exc).__name__

            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for outcome in await asyncio.gather(*(one() for _ in range(count))):
                    answered[outcome] = answered.get(outcome, 0) + 1
        return answered

    return asyncio.run(flood())


async def _exchanges(
    http: aiohttp.ClientSession, kube: KubeClient, url: str, created: list[JSON], seconds: float
) -> tuple[list[float], int]:
    """Fresh tokens (uncached reviews) of the pods in turn, 10 a second, for ``seconds``:
    the latencies of those issued, and how many were refused."""
    identity = f"runner.{NS}.serviceaccount.identity.linkerd.cluster.local"
    took: list[float] = []
    refused, end, n = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        pod = created[n % len(created)]
        n += 1
        token = await kube.pod_token(NS, "runner", pod, seconds=3600)
        started = time.perf_counter()
        async with http.post(
            url, headers={"Authorization": f"Bearer {token}", "l5d-client-id": identity}
        ) as answer:
            await answer.read()
        if answer.status == 200:
            took.append(time.perf_counter() - started)
        else:
            refused += 1
        await asyncio.sleep(0.1)
    return took, refused


def _row(took: list[float], refused: int) -> str:
    total = len(took) + refused
    latency = f"p50 {ms(pct(took, 50))}, p99 {ms(pct(took, 99))}" if took else "none issued"
    share = f"{100 * refused / total:.0f} %" if total else "n/a"
    return f"{latency}; refused {refused} of {total} ({share})"


async def identities_flood(
    plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    """A real pod of namespace ``bench`` exchanges fresh tokens (10 a second) alone, then
    while ``--identities`` service accounts of another namespace send forged tokens."""
    plane.install_rbac(devcluster.repo_root() / "manifests")  # type: ignore[operator]
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
    leases = LeaseIndex(kube)
    watching = asyncio.create_task(leases.run())
    operator = ShippedOperator(plane, conduit, tmp)
    try:
        with contextlib.suppress(Conflict):  # else an earlier part made it
            await setup(kube, conduit)
        await ready(http, operator.metrics_port)
        created = await pods(kube, NS, 5, prefix="victim", running=True)
        uids = {p["metadata"]["uid"] for p in created}

        async def all_active() -> bool:
            held = {x.pod_uid for x in leases.by_uid.values() if x.active and x.pod_uid in uids}
            return held == uids

        await until(all_active, 60)
        url = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        alone = await _exchanges(http, kube, url, created, args.seconds)
        with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(pool, int, "0")  # the process is up
            flooding = loop.run_in_executor(
                pool, _identities_flood, url, args.identities, args.seconds + 0.5
            )
            await asyncio.sleep(0.5)  # the flood's bursts spent
            during = await _exchanges(http, kube, url, created, args.seconds)
            statuses = await flooding
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        return [
            (
                "exchange of a pod of another namespace (fresh token, 10/s), alone",
                _row(*alone),
            ),
            (
                f"the same during forged tokens from {args.identities} identities of one "
                "namespace (shipped budgets)",
                f"{_row(*during)}; the flood was answered {counts}",
            ),
        ]
    finally:
        operator.stop()
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await http.close()
        await kube.close()


def _tree_peak_mb(pid: int) -> float:
    """VmHWM of ``pid`` and of its child processes (the decoding workers), added up."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    total = 0
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


async def gateway_floods(  # noqa: PLR0915 - one measured story, told in order
    plane: devcluster.ControlPlane, conduit: Conduit, tmp: Path, args: argparse.Namespace
) -> list[tuple[str, str]]:
    """Each flood against conduit.ping and an authenticated arc-style call (see the top)."""
    kube = KubeClient(load_connection(str(plane.kubeconfig)), qps=0, burst=1000)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
    operator = Operator(plane, conduit, tmp)
    gateway = Gateway(plane, conduit, tmp)
    try:
        await setup(kube, conduit)
        await kube.merge_patch(
            resource_path(G, V, resources.BINDING_PLURAL, NS, "runners"),
            {"spec": {"allowedMethods": ["user.whoami", "user.search"]}},
        )
        big = "bench-big"
        async with http.post(
            f"{conduit.control}/user", json={"username": big, "bytes": BIG_ANSWER_BYTES}
        ) as added:
            added.raise_for_status()
        await ready(http, operator.metrics_port)
        await ready(http, gateway.metrics_port)
        pod = (await pods(kube, NS, 1, running=True))[0]
        token = await kube.pod_token(NS, "runner", pod, seconds=3600)
        url = f"http://127.0.0.1:{operator.endpoint_port}/v1/credentials"
        credential = ""

        async def exchanged() -> bool:
            nonlocal credential
            async with http.post(url, headers={"Authorization": f"Bearer {token}"}) as answer:
                if answer.status != 200:
                    return False
                credential = (await answer.json())["credential"]
                return True

        if await until(exchanged, 60) is None:
            raise RuntimeError("no credential for the bench pod")
        base = f"http://127.0.0.1:{gateway.port}/api"
        arc_body = gzip.compress(
            f"params={json.dumps({'__conduit__': {'token': credential}})}"
            "&output=json&__conduit__=1".encode()
        )
        probe_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2))

        async def timed(method: str, body: bytes, headers: dict[str, str]) -> float:
            started = time.perf_counter()
            async with probe_http.post(
                f"{base}/{method}", data=body, headers={**FORM, **headers}
            ) as answer:
                text = await answer.text()
            if json.loads(text).get("error_code") is not None:
                raise RuntimeError(f"{method} refused: {text[:200]}")
            return time.perf_counter() - started

        async def direct_ping() -> float:
            started = time.perf_counter()
            async with probe_http.post(f"{conduit.url}/api/conduit.ping", data=b"") as answer:
                await answer.read()
            return time.perf_counter() - started

        async def probes(seconds: float) -> tuple[list[float], list[float], list[float]]:
            """conduit.ping and the arc-style call through the gateway, and conduit.ping
            straight to Phabricator (what upstream itself adds), in turn, 10 ms apart."""
            ping: list[float] = []
            arc: list[float] = []
            direct: list[float] = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                ping.append(await timed("conduit.ping", b"", {}))
                arc.append(await timed("user.whoami", arc_body, {"Content-Encoding": "gzip"}))
                direct.append(await direct_ping())
                await asyncio.sleep(0.01)
            return ping, arc, direct

        async def healthy() -> bool:
            try:
                await timed("user.whoami", arc_body, {"Content-Encoding": "gzip"})
            except RuntimeError:
                return False
            return True

        if await until(healthy, 60) is None:
            raise RuntimeError("the gateway does not honour the bench credential")
        rows: list[tuple[str, str]] = []
        try:
            ping0, arc0, direct0 = await probes(args.seconds)
            rows.append(
                (
                    "gateway floods: none",
                    f"conduit.ping p99 {ms(pct(ping0, 99))}, authenticated arc call p99 "
                    f"{ms(pct(arc0, 99))}, conduit.ping straight to Phabricator p99 "
                    f"{ms(pct(direct0, 99))}; gateway peak "
                    f"{_tree_peak_mb(gateway.proc.pid):.0f} MB with its workers",
                )
            )
            search = json.dumps(
                {"constraints": {"usernames": [big]}, "__conduit__": {"token": credential}}
            )
            floods = {
                **_flood_bodies(),
                "6 answers of 14 MiB at once (user.search, allowed)": (
                    "user.search",
                    f"params={search}&output=json".encode(),
                    {},
                    6,
                ),
            }
            loop = asyncio.get_running_loop()
            with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")
            ) as pool:
                await loop.run_in_executor(pool, int, "0")  # the process is up
                for what, (method, body, headers, count) in floods.items():
                    sending = loop.run_in_executor(
                        pool,
                        _send_flood,
                        f"{base}/{method}",
                        body,
                        headers,
                        count,
                        args.seconds + 1,
                    )
                    await asyncio.sleep(0.5)
                    ping, arc, direct = await probes(args.seconds)
                    answered = await sending
                    shown = ", ".join(f"{n} {k}" for k, n in sorted(answered.items()))
                    added_ping = ms(pct(ping, 99) - pct(ping0, 99))
                    added_arc = ms(pct(arc, 99) - pct(arc0, 99))
                    peak = _tree_peak_mb(gateway.proc.pid)
                    rows.append(
                        (
                            f"gateway flood: {what}",
                            f"conduit.ping p99 {ms(pct(ping, 99))} ({added_ping} more), "
                            f"authenticated arc call p99 {ms(pct(arc, 99))} ({added_arc} more), "
                            f"conduit.ping straight to Phabricator p99 {ms(pct(direct, 99))}; "
                            f"flood answered: {shown}; gateway peak {peak:.0f} MB with its workers",
                        )
                    )
        finally:
            await probe_http.close()
        return rows
    finally:
        gateway.stop()
        operator.stop()
        await http.close()
        await kube.close()


async def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="phabmesh-hostile-") as tmp:
        plane = devcluster.ControlPlane(Path(tmp) / "plane")
        plane.start()
        conduit = Conduit(Path(tmp))
        gateway: Gateway | None = None
        try:
            install(plane)
            rows: list[tuple[str, str]] = []
            if "gateway" in args.parts:
                gateway = Gateway(plane, conduit, Path(tmp))
                rows += await scenario(gateway, conduit, args)
                gateway.stop()
            if "credentials" in args.parts:
                rows += await credential_flood(plane, conduit, Path(tmp), args)
            if "identities" in args.parts:
                rows += await identities_flood(plane, conduit, Path(tmp), args)
            if "floods" in args.parts:
                rows += await gateway_floods(plane, conduit, Path(tmp), args)
            if "rows" in args.parts:
                from bench.hostile_rows import flood_rows

                rows += await flood_rows(plane, conduit, Path(tmp), args)
            if "webhook" in args.parts:
                from bench.hostile_webhook import webhook_flood

                rows += await webhook_flood(plane, conduit, Path(tmp), args)
            return rows
        finally:
            if gateway is not None:
                gateway.stop()
            conduit.stop()
            plane.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile")
    parser.add_argument("--seconds", type=float, default=5.0, help="pings per kind of attack")
    parser.add_argument("--names", type=int, default=30_000, help="distinct method names")
    parser.add_argument("--flood", type=int, default=600, help="junk tokens (and forged ones)")
    parser.add_argument(
        "--parts",
        default="rows,gateway,credentials,identities,floods,webhook",
        help="what to measure (rows: ping, exchange and issuance during each flood)",
    )
    parser.add_argument(
        "--identities", type=int, default=50, help="flooding service accounts of one namespace"
    )
    parser.add_argument("--attackers", type=int, default=1, help="hostile connections at once")
    parser.add_argument(
        "--only", default="", help="rows: the floods to run, by number (e.g. 4,5); all if empty"
    )
    parser.add_argument(
        "--sender-nice",
        type=int,
        default=0,
        help="rows: the niceness of each flood's sender (10 stands for a sender elsewhere)",
    )
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(
        f"\n(python -m bench.hostile --seconds {args.seconds:g} --names {args.names} "
        f"--flood {args.flood} --parts {args.parts} --attackers {args.attackers}"
        + (f" --only {args.only}" if args.only else "")
        + (f" --sender-nice {args.sender_nice})" if args.sender_nice else ")")
    )


if __name__ == "__main__":
    main()
