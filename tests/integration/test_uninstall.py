"""`make uninstall` deletes phabmesh's CRDs and peering object, and leaves kopf's CRD alone.

kopf's ClusterKopfPeering CRD (``clusterkopfpeerings.kopf.dev``) ships in crds/ so that an
install has it, but every kopf-based operator in the cluster shares it. On the session's
control plane, whose CRDs every test shares, the arguments the Makefile passes to
``kubectl delete`` (``make uninstall-args``) run with ``--dry-run=server``: the API server
says what it would delete and nothing is deleted. ``make uninstall`` itself runs on a
control plane of its own.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from phabmesh.dev import devcluster
from tests.kube import Cluster, wait_for

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


def _served_from_cache(plane: devcluster.ControlPlane, *crd_files: Path) -> None:
    """Wait until the API server's watch cache of each CRD's objects is ready (a list at
    resourceVersion 0 answers from it: 429 "storage is (re)initializing" until then).

    A CRD deleted before then may stay Terminating for minutes: its finalizer's list of
    the objects fails (InstanceDeletionFailed) and is retried with a growing backoff. An
    install is never that young when it is uninstalled; these control planes are.
    """
    for path in crd_files:
        crd = yaml.safe_load(path.read_text())
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        url = f"/apis/{crd['spec']['group']}/{version}/{crd['spec']['names']['plural']}"

        def answered(url: str = url) -> bool:
            raw = plane.kubectl("get", "--raw", f"{url}?resourceVersion=0&limit=1", check=False)
            return raw.returncode == 0

        wait_for(answered, timeout=60, what=f"the watch cache of {url}")


def _phabmesh_crds() -> list[Path]:
    return [
        f for f in sorted((REPO / "crds").glob("*.yaml")) if f.name != "clusterkopfpeerings.yaml"
    ]


def test_crds_holds_phabmeshs_crds_and_kopfs() -> None:
    assert _crd_names("kopf.dev") == {KOPF_CRD}
    assert len(_crd_names("phabmesh.io")) == 4


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


def _make_uninstall(
    plane: devcluster.ControlPlane, *settings: str
) -> subprocess.CompletedProcess[str]:
    # KUBECTL: this control plane's; STAMP empty: the virtualenv the tests run in is the
    # one to use, not one for make to (re)build.
    kubectl = f"{plane.binaries.kubectl} --kubeconfig={plane.kubeconfig}"
    return subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(REPO),
            "uninstall",
            f"KUBECTL={kubectl}",
            "STAMP=",
            *settings,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_make_uninstall_keeps_kopfs_crd_and_other_operators_peering(tmp_path: Path) -> None:
    crds = str(REPO / "crds")
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        plane.kubectl("apply", "--server-side", "-f", crds)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "manifests" / "peering.yaml"))
        # Another kopf-based operator's peering object.
        other = "{apiVersion: kopf.dev/v1, kind: ClusterKopfPeering, metadata: {name: other}}"
        plane.kubectl("apply", "--server-side", "-f", "-", input=other)
        _served_from_cache(plane, *_phabmesh_crds())

        result = _make_uninstall(plane)
        assert result.returncode == 0, result.stderr
        crd_names = plane.kubectl("get", "crd", "-o", "name").stdout.split()
        assert crd_names == [f"{CRD}/{KOPF_CRD}"]
        peerings = plane.kubectl("get", "clusterkopfpeerings", "-o", "name").stdout.split()
        assert peerings == ["clusterkopfpeering.kopf.dev/other"]

        # Again, with nothing of phabmesh's left: nothing to do, and no error.
        assert _make_uninstall(plane).returncode == 0
        # Without kopf's CRD (no kopf operator left, CRD removed by hand): no error either.
        plane.kubectl("delete", "-f", str(REPO / "crds" / "clusterkopfpeerings.yaml"))
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "phabricatorbots.yaml"))
        plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/phabricatorbots.phabmesh.io",
        )
        _served_from_cache(plane, REPO / "crds" / "phabricatorbots.yaml")
        result = _make_uninstall(plane)
        assert result.returncode == 0, result.stderr
        assert plane.kubectl("get", "crd", "-o", "name").stdout.split() == []


def test_make_uninstall_never_hangs_on_a_finalizer_no_operator_removes(tmp_path: Path) -> None:
    """The operator gone first, a bot keeps kopf's finalizer: `make uninstall` says which
    objects hold the deletion and what to do, and with YES=1 removes the finalizers."""
    crds = str(REPO / "crds")
    held = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorBot",
        "metadata": {"name": "held-bot", "finalizers": ["kopf.zalando.org/KopfFinalizerMarker"]},
        "spec": {
            "username": "held-bot",
            "tokenSecretRef": {"name": "held-bot-token"},
            "namespaceSelector": {},
        },
    }
    with devcluster.ControlPlane(tmp_path / "controlplane") as plane:
        plane.kubectl("apply", "--server-side", "-f", crds)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        plane.kubectl("create", "-f", "-", input=yaml.safe_dump(held))
        _served_from_cache(plane, *_phabmesh_crds())

        refused = _make_uninstall(plane, "UNINSTALL_WAIT=3s")
        assert refused.returncode != 0
        assert "PhabricatorBot held-bot" in refused.stderr, refused.stderr
        assert "make uninstall YES=1" in refused.stderr, refused.stderr
        # Nothing was changed: the bot still holds its finalizer, its CRD is still there.
        bot = plane.kubectl("get", "phabricatorbot", "held-bot", "-o", "yaml").stdout
        assert "KopfFinalizerMarker" in bot

        done = _make_uninstall(plane, "UNINSTALL_WAIT=30s", "YES=1")
        assert done.returncode == 0, done.stderr
        names = plane.kubectl("get", "crd", "-o", "name").stdout.split()
        assert names == [f"{CRD}/{KOPF_CRD}"]
