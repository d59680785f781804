"""The gateway under floods, as a process of its own (its decoding workers included): its
memory stays under the chart's limit (256Mi) at the default settings, and what it cannot
take now it refuses at once, in Conduit's envelope, with a Retry-After.

The floods are those of a hostile review: 300 unauthenticated 1 MiB bodies at once, 48
gzip bodies of about 1 KB that inflate to 1 MiB, and 6 answers of 14 MiB at once from an
allowed method (sent plain, then gzip-compressed). Memory is read from /proc every 10 ms
during the floods: the proportional set sizes (Pss) of the gateway and of each of its
workers, added up, which is what a container's memory limit weighs (a page shared by two
processes counts once). Each process's own peak (VmHWM), added up, is printed beside it: it
adds peaks of different moments, so it is more than they ever held at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from phabmesh import serving
from phabmesh.dev.conduit import ConduitServer
from phabmesh.settings import Settings
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, active_leases, exchange, make_pod, pod_token
from tests.stack import Threaded

CHART_LIMIT_MIB = 256
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MIB = 1 << 20


class GatewayChild:
    """``phabmesh gateway`` in a process of its own, as deployed (default settings)."""

    def __init__(self, conduit: ConduitServer, kubeconfig: str, log: Path) -> None:
        self.port = serving.free_port("127.0.0.1")
        self.metrics_port = serving.free_port("127.0.0.1")
        local = Settings.local_env(
            conduit.url,
            namespace=SYSTEM,
            gateway_port=self.port,
            metrics_port=self.metrics_port,
            log_level="WARNING",
            log_json=True,
        )
        env = {**os.environ, "KUBECONFIG": kubeconfig, **local}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "phabmesh.cli", "gateway"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.base = f"http://127.0.0.1:{self.port}/api"

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            return requests.get(url, timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def peak_mib(self) -> float:
        """VmHWM of the gateway and of each of its child processes, added up, in MiB: each
        process's own peak, whenever it was, so more than they ever held at one time."""
        pids = [self.proc.pid, *_children(self.proc.pid)]
        return sum(_status_kib(pid, "VmHWM") for pid in pids) / 1024

    def held_mib(self) -> float:
        """What the gateway and its child processes hold now, in MiB: their proportional set
        sizes added up (a page two of them share counts once), what a pod's memory limit
        weighs."""
        pids = [self.proc.pid, *_children(self.proc.pid)]
        return sum(_rollup_kib(pid, "Pss") for pid in pids) / 1024

    @contextlib.contextmanager
    def sampled(self, every: float = 0.01) -> Iterator[list[float]]:
        """The most the processes held at once while inside (sampled every ``every`` s), in
        the one-element list yielded."""
        peak = [self.held_mib()]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every):
                peak[0] = max(peak[0], self.held_mib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield peak
        finally:
            done.set()
            sampler.join()

    def workers(self) -> int:
        return len(_children(self.proc.pid))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _rollup_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.fixture
def child(
    tmp_path: Path, conduit: ConduitServer, operator: Threaded, phabmesh_rbac: rbac.Installed
) -> Iterator[GatewayChild]:
    gateway = GatewayChild(conduit, phabmesh_rbac.kubeconfig("gateway"), tmp_path / "gw.log")
    try:
        wait_for(gateway.ready, timeout=60, what="the gateway process to be ready")
        yield gateway
    finally:
        gateway.stop()


async def _send(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str, str | None]:
    """(HTTP status, error_code, Retry-After) of one call."""
    try:
        async with http.post(url, data=body, headers={**FORM, **headers}) as answer:
            text = await answer.text()
            code = str(json.loads(text).get("error_code")) if text.startswith("{") else text[:40]
            return answer.status, code, answer.headers.get("Retry-After")
    except aiohttp.ClientError as exc:  # the gateway may close a refused upload early
        return 0, type(exc).__name__, None


def _flood(url: str, body: bytes, headers: dict[str, str], count: int) -> list[tuple[Any, ...]]:
    async def all_at_once() -> list[tuple[Any, ...]]:
        connector = aiohttp.TCPConnector(limit=count)
        async with aiohttp.ClientSession(connector=connector) as http:
            return list(
                await asyncio.gather(*(_send(http, url, body, headers) for _ in range(count)))
            )

    return asyncio.run(all_at_once())


def test_the_gateways_memory_stays_under_its_limit_under_floods(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, bound: str, child: GatewayChild
) -> None:
    # A pod with a credential, and an account whose record is 14 MiB: user.search of it is an
    # allowed method with a 14 MiB answer.
    pod = make_pod(cluster, bound, "runner-1")
    wait_for(lambda: active_leases(cluster, bound))
    issued = exchange(operator, pod_token(cluster, bound, pod))
    assert issued.status_code == 200, issued.text
    credential = issued.json()["credential"]
    big = f"big-{bound}"
    conduit.add_user(big, real_name="x" * (14 * MIB))
    search = json.dumps({"constraints": {"usernames": [big]}, "__conduit__": {"token": credential}})
    search_body = f"params={search}&output=json".encode()
    whoami = f"{child.base}/user.whoami"

    def allowed() -> bool:
        answer = requests.post(whoami, data={"api.token": credential}, timeout=10).json()
        return answer.get("error_code") is None

    wait_for(allowed, timeout=60, what="the gateway to honour the credential")
    before = child.held_mib()

    with child.sampled() as held:
        # 300 unauthenticated bodies of 1 MiB at once.
        plain = b"a=" + b"0" * (MIB - 2)
        answers = _flood(whoami, plain, {}, 300)
        busy = [a for a in answers if a[1] == "ERR-GATEWAY-BUSY"]
        assert busy, sorted({a[:2] for a in answers})
        assert all(a[0] in (429, 503) and a[2] == "1" for a in busy)
        # 48 gzip bodies of about 1 KB that inflate to 1 MiB, at once, three times.
        bomb = gzip.compress(plain)
        assert len(bomb) < 2048
        for _ in range(3):
            _flood(whoami, bomb, {"Content-Encoding": "gzip"}, 48)
        # 6 answers of 14 MiB at once, plain and then gzip-compressed by Phabricator.
        search_url = f"{child.base}/user.search"
        outcomes = []
        for coding in (None, "gzip"):
            conduit.compress_anyway = coding
            try:
                outcomes += _flood(search_url, search_body, {}, 6)
            finally:
                conduit.compress_anyway = None
        assert {a[1] for a in outcomes} <= {"None", "ERR-GATEWAY-BUSY"}, outcomes
        assert any(a[1] == "None" for a in outcomes)  # some got their answer

    assert child.workers() >= 1
    # What the pod's limit weighs: the most held at once (the sum of each process's own
    # peak, printed beside it, counts peaks of different moments together).
    summary = (
        f"gateway held {before:.0f} -> at most {held[0]:.0f} MiB at once "
        f"(each process's own peak added up: {child.peak_mib():.0f} MiB)"
    )
    print(summary)
    assert held[0] < CHART_LIMIT_MIB, summary
    # And it still answers, as before.
    assert allowed()


def test_a_held_refusal_leaves_a_kept_alive_connection_usable(child: GatewayChild) -> None:
    """Busy refusals of a source over its share are held before they are answered; one whose
    body was read whole keeps its connection, which then serves the next call."""
    bomb = gzip.compress(b"a=" + b"0" * (MIB - 2))
    whoami, ping = f"{child.base}/user.whoami", f"{child.base}/conduit.ping"

    async def flood_then_ping() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        connector = aiohttp.TCPConnector(limit=48)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            gz = {"Content-Encoding": "gzip"}
            refused = await asyncio.gather(*(_send(http, whoami, bomb, gz) for _ in range(48)))
            # The same 48 connections, kept alive, each asked again.
            pings = await asyncio.gather(*(_send(http, ping, b"", {}) for _ in range(48)))
            return list(refused), list(pings)

    refused, pings = asyncio.run(flood_then_ping())
    assert any(a[:2] == (429, "ERR-GATEWAY-BUSY") for a in refused), refused
    assert all(p[:2] == (200, "None") for p in pings), pings
