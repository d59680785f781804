"""The README's quick start, with assertions: the same flow `phabmesh run` prints."""

from __future__ import annotations

import asyncio

from phabmesh import quickstart
from tests.kube import Cluster


def test_quick_start_flow(cluster: Cluster) -> None:
    lines: list[str] = []
    seen = asyncio.run(quickstart.demo(cluster.plane, quickstart.Say(lines.append)))
    assert seen["whoami"]["result"]["userName"] == "ci-bot"
    assert seen["whoami"]["error_code"] is None
    assert seen["refused"]["error_code"] == "ERR-INVALID-AUTH"
    assert "credential revoked" in seen["refused"]["error_info"]
    assert seen["lease"].startswith("ci-runner-0.ci-runners.")
    text = "\n".join(lines)
    assert "] The same credential, once more through the gateway" in text
    assert "credential revoked: pod " in text  # "pod terminating" or "pod deleted"
    # What the user reads never shows a token or a credential.
    assert "eyJ" not in text and "api-" not in text
