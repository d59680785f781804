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
