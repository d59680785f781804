"""The benchmarks keep working: a smoke-sized run that checks every figure is produced."""

from __future__ import annotations

import argparse
import asyncio

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
