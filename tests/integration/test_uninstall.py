"""`make uninstall` deletes phabmesh's CRDs and peering object, and leaves kopf's CRD alone.

kopf's ClusterKopfPeering CRD (``clusterkopfpeerings.kopf.dev``) ships in crds/ so that an
install has it, but every kopf-based operator in the cluster shares it. The test runs the
arguments the Makefile passes to ``kubectl delete`` (``make uninstall-args``) with
``--dry-run=server``: the session's CRDs are shared by every test, so the API server says
what it would delete and nothing is deleted.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.kube import Cluster

REPO = Path(__file__).resolve().parents[2]
KOPF_CRD = "clusterkopfpeerings.kopf.dev"
CRD = "customresourcedefinition.apiextensions.k8s.io"


def _uninstall_args() -> list[str]:
    out = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(REPO), "uninstall-args"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    args = out.split()
    # `-f FILE` pairs, relative to the repository.
    assert args[::2] == ["-f"] * (len(args) // 2) and len(args) % 2 == 0, args
    return [arg if arg == "-f" else str(REPO / arg) for arg in args]


def _crd_names(group: str) -> set[str]:
    docs = [yaml.safe_load(f.read_text()) for f in (REPO / "crds").glob("*.yaml")]
    return {d["metadata"]["name"] for d in docs if d["spec"]["group"] == group}


def test_crds_holds_phabmeshs_crds_and_kopfs() -> None:
    assert _crd_names("kopf.dev") == {KOPF_CRD}
    assert len(_crd_names("phabmesh.io")) == 3


def test_uninstall_deletes_only_what_is_phabmeshs(cluster: Cluster, crds: Path) -> None:
    # The peering object as `make deploy` creates it (test_manifests.py creates the same).
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "manifests" / "peering.yaml"))
    out = cluster.kubectl(
        "delete", "--ignore-not-found", "--dry-run=server", "-o", "name", *_uninstall_args()
    ).stdout
    deleted = set(out.split())
    assert deleted == {"clusterkopfpeering.kopf.dev/phabmesh"} | {
        f"{CRD}/{name}" for name in _crd_names("phabmesh.io")
    }
    assert f"{CRD}/{KOPF_CRD}" not in deleted
    # A dry run: everything is still there.
    cluster.kubectl("get", "crd", KOPF_CRD, *sorted(_crd_names("phabmesh.io")))
    cluster.kubectl("get", "clusterkopfpeering", "phabmesh")
