"""The benchmarks keep working: a smoke-sized run that checks every figure is produced."""

from __future__ import annotations

import argparse
import asyncio
import re

from bench import hooks
from bench.__main__ import run


def test_benchmarks_produce_every_figure() -> None:
    args = argparse.Namespace(
        pods=6,
        burst=3,
        calls=10,
        seconds=0.5,
        reviews=1,
        scale=10,
        big_pods=30,
        big_bindings=20,
        deploy="3,6",
    )
    rows = asyncio.run(run(args))
    names = " | ".join(name for name, _, _ in rows)
    for figure in (
        "issuance",
        "credential exchange",
        "gateway added latency, compression on",
        "gateway added latency, compression off",
        "gateway throughput",
        "revocation",
        "TokenReview alone",
        "Conduit calls",
        "scale-down",
        "operator memory",
        "gateway memory",
        "operator restart",
        "issuance on a Deployment scaled 0 -> 3",
        "issuance on a Deployment scaled 3 -> 6",
        "revocation on a Deployment scaled 6 -> 0",
        "scale-down: Deployment 6 -> 0",
    ):
        assert figure in names
    assert all(value and "None" not in value for _, value, _ in rows)


def test_the_webhook_delivery_benchmark_produces_every_figure() -> None:
    rows = asyncio.run(hooks.run(argparse.Namespace(deliveries=8, seconds=60.0)))
    assert [name for name, _, _ in rows] == [
        f"webhook delivery, concurrency {c}: direct -> through the gateway" for c in (1, 16)
    ]
    for _, value, _ in rows:
        for p in ("p50", "p95", "p99"):
            assert p in value
        # Every delivery went through the gateway to the target, and straight to it.
        assert re.search(r"8 via gateway \{202: 8\} at \d+/s, 8 direct \{202: 8\} at \d+/s", value)


def test_scale_benchmark_produces_every_figure() -> None:
    from bench import scale

    args = argparse.Namespace(
        pods=60,
        namespaces=4,
        meshed=0.2,
        jobs=0.1,
        bindings=4,
        nodes=2,
        scale_up=10,
        bursts="3,6",
        sample=3,
        restart_pods=2,
        client_qps=200,
        restart_limit=300,
        deadline=600,
        workdir=None,
    )
    rows = asyncio.run(scale.run(args))
    names = " | ".join(name for name, _ in rows)
    assert "stopped early" not in names, rows
    for figure in (
        "population: 60 pods in 4 namespaces",
        "operator RSS",
        "gateway RSS",
        "operator RSS by mapping",
        "issuance: 3 pods patched Running at once",
        "issuance: 6 pods patched Running at once",
        "scale-up: Deployment 0 -> 10 meshed pods",
        "API requests per pod start",
        "operator restart",
        "revocation: Deployment 10 -> 0",
        "revocation, 3 of those pods",
        "API requests per pod stop",
    ):
        assert figure in names, figure
    assert all(value and "None" not in value for _, value in rows)
    revoked = next(value for name, value in rows if name.startswith("revocation, 3 of"))
    assert revoked.endswith("(3 of 3)"), revoked
    restart = next(value for name, value in rows if name.startswith("operator restart"))
    assert re.search(r"CPU from start to ready: operator \d+\.\d s .*API server \d", restart)
    assert re.search(r"started once the control plane was quiet \(\d+ s after", restart)


def test_kopf_hold_releases_every_worker() -> None:
    from bench import kopf_hold

    listed, released = asyncio.run(kopf_hold.hold(20))
    assert 0 <= listed <= released


def test_gateway_benchmark_measures_each_worker_count() -> None:
    from bench import gateway

    args = argparse.Namespace(seconds=0.3, workers="1,2", repeat=1, before=None)
    lines = asyncio.run(gateway.main(args))
    text = "\n".join(lines)
    for name in ("direct", "gateway x1", "gateway x2"):
        assert re.search(rf"^{name} +\d+/s", text, re.MULTILINE), text
    assert re.search(
        r"gateway x2 RSS/PSS per process \(MB; the first is the parent\): \d+/\d+, \d+/\d+", text
    )
