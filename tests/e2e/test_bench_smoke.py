"""The benchmarks keep working: a smoke-sized run that checks every figure is produced."""

from __future__ import annotations

import argparse
import asyncio

from bench.__main__ import run


def test_benchmarks_produce_every_figure() -> None:
    args = argparse.Namespace(
        pods=6, burst=3, calls=10, seconds=0.5, reviews=1, scale=10, big_pods=30, big_bindings=20
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
    ):
        assert figure in names
    assert all(value and "None" not in value for _, value, _ in rows)
