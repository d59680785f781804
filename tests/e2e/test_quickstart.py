"""The README's quick start, with assertions: the same flow `phabmesh run` prints.

It runs on a control plane of its own, so that no other test's operator acts on it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from phabmesh import devcluster, quickstart


def test_quick_start_flow(tmp_path: Path) -> None:
    lines: list[str] = []
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        seen = asyncio.run(quickstart.demo(plane, quickstart.Say(lines.append)))
    assert seen["whoami"]["result"]["userName"] == "ci-bot"
    assert seen["whoami"]["error_code"] is None
    assert seen["refused"]["error_code"] == "ERR-INVALID-AUTH"
    assert seen["lease"].startswith("ci-runner-0.ci-runners.")
    text = "\n".join(lines)
    assert "] The same credential, once more through the gateway" in text
    assert "credential revoked: pod " in text  # "pod terminating" or "pod deleted"
    # What the user reads never shows a token or a credential.
    assert "eyJ" not in text and "api-" not in text
