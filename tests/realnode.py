"""The real-node tier: a control plane with a real node (kubelet, kube-proxy, containerd)
beside one KWOK node, and the local images its tests run (no registry).

``real_cluster`` (tests/conftest.py) starts it once per session; it needs root and the packages
of ``make node-packages``, and fails with one line saying what is missing otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from phabmesh.dev import devcluster, ociimage, realnode
from tests.kube import Cluster

IMAGES = Path(__file__).resolve().parent / "images"
BUSYBOX = realnode.BUSYBOX_IMAGE
APICLIENT = "localhost/apiclient:local"
ON_REAL_NODE = {realnode.NODE_LABEL[0]: realnode.NODE_LABEL[1]}


class RealCluster(Cluster):
    """A control plane with a real node: ``node`` runs the pods bound to it."""

    def __init__(self, plane: devcluster.ControlPlane) -> None:
        super().__init__(plane)
        assert plane.real_node is not None
        self.node = plane.real_node

    def apply(self, *docs: dict[str, Any], namespace: str = "default") -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))

    def wait_ready(self, pod: str, namespace: str = "default", timeout: int = 90) -> None:
        result = self.kubectl(
            "wait", "-n", namespace, "--for=condition=Ready", f"--timeout={timeout}s",
            f"pod/{pod}", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            described = self.kubectl("describe", "pod", "-n", namespace, pod, check=False)
            raise AssertionError(f"pod {pod} not Ready: {described.stdout[-3000:]}")

    def wait_phase(self, pod: str, phases: set[str], namespace: str = "default") -> str:
        deadline = time.monotonic() + 90
        phase = ""
        while time.monotonic() < deadline:
            phase = self.pod(pod, namespace)["status"].get("phase", "")
            if phase in phases:
                return phase
            time.sleep(0.2)
        raise AssertionError(f"pod {pod} is {phase}, not one of {sorted(phases)}")

    def pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        out = self.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout
        pod: dict[str, Any] = json.loads(out)
        return pod

    def logs(self, pod: str, container: str | None = None, namespace: str = "default") -> str:
        args = ["logs", "-n", namespace, pod, *(["-c", container] if container else [])]
        return self.kubectl(*args).stdout

    def exec(self, pod: str, *command: str, namespace: str = "default") -> str:
        return self.kubectl("exec", "-n", namespace, pod, "--", *command).stdout


def pod(
    name: str,
    command: str,
    *,
    image: str = BUSYBOX,
    labels: dict[str, str] | None = None,
    grace: int = 1,
    **spec: Any,
) -> dict[str, Any]:
    """A pod on the real node running ``command`` with ``sh -c`` (local image, never pulled)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            "nodeSelector": ON_REAL_NODE,
            "terminationGracePeriodSeconds": grace,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", command],
                }
            ],
            **spec,
        },
    }


def jwt_claims(token: str) -> dict[str, Any]:
    """A JWT's claims (not verified: the API server's TokenReview does that)."""
    payload = token.split(".")[1]
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    return claims


def apiclient_archive(out: Path) -> Path:
    """``localhost/apiclient:local``: tests/images/apiclient.go, built static."""
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        mod, root = Path(scratch) / "mod", Path(scratch) / "rootfs"
        mod.mkdir()
        root.mkdir()
        shutil.copy(IMAGES / "apiclient.go", mod / "main.go")
        (mod / "go.mod").write_text("module apiclient\n\ngo 1.22\n")
        subprocess.run(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(root / "apiclient"), "."],
            cwd=mod,
            env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod"),
            check=True,
            capture_output=True,
        )
        config = ociimage.ImageConfig(entrypoint=("/apiclient",), env=())
        ociimage.image_from_dir(APICLIENT, root, config, out)
    return out


def start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """The session's control plane with a real node and one KWOK node, with the test images."""
    try:
        realnode.check_host()
    except realnode.NodeError as exc:
        pytest.fail(str(exc), pytrace=False)
    workdir = tmp_path_factory.mktemp("realnode")
    images = workdir / "images"
    images.mkdir()
    archives = [
        realnode.busybox_archive(images / "busybox.tar"),
        apiclient_archive(images / "apiclient.tar"),
    ]
    plane = devcluster.ControlPlane(
        workdir, nodes=1, real_node=True, node_setup=[lambda node: node.install(archives)]
    )
    with plane:
        yield RealCluster(plane)
