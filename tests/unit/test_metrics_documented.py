"""Every metric phabmesh serves has its row in docs/metrics.md, and every row a metric."""

from __future__ import annotations

import re
from pathlib import Path

from phabmesh import metrics
from phabmesh.processes import gateway_workers

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _served() -> set[str]:
    names = set()
    for family in metrics.Metrics(metrics.ANY).registry.collect():
        if family.name.startswith("phabmesh_"):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    # The gateway's parent process adds its own to the workers' (PHABMESH_GATEWAY_WORKERS).
    source = Path(gateway_workers.__file__).read_text()
    return names | set(re.findall(r'"(phabmesh_gateway_worker_[a-z_]+_total)"', source))


def test_every_metric_served_is_documented_and_no_other() -> None:
    rows = set(re.findall(r"^\| `(phabmesh_[a-z_]+)` \|", DOC.read_text(), re.MULTILINE))
    served = _served()
    assert served - rows == set(), "served, not in docs/metrics.md"
    assert rows - served == set(), "in docs/metrics.md, not served"
