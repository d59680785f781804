"""Helpers for tests that talk to the real local control plane."""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from phabmesh.dev import devcluster
from tests import rbac

T = TypeVar("T")

# Hand-made pods: tests that need a pod state on cue, which KWOK's simulated kubelet would
# move on from (Running without ever starting, Terminating until the test says otherwise,
# Running while unscheduled), create pods that KWOK never touches. They are bound to
# HAND_NODE, a Node no KWOK manages, or left unbound by naming a scheduler that does not
# exist; they tolerate every taint, so the node lifecycle controller does not evict them
# when HAND_NODE (which sends no heartbeats) turns NotReady.
HAND_NODE = "node-a"
NO_SCHEDULER = "hand-made"


def hand_made(spec: client.V1PodSpec) -> client.V1PodSpec:
    """``spec`` as a hand-made pod's: left alone by the scheduler, KWOK and evictions."""
    if not spec.node_name:
        spec.scheduler_name = NO_SCHEDULER
    spec.tolerations = [client.V1Toleration(operator="Exists")]
    return spec


def create_hand_node(core: client.CoreV1Api) -> None:
    """HAND_NODE, so the pod garbage collector does not delete pods bound to it."""
    try:
        core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name=HAND_NODE)))
    except ApiException as exc:
        if exc.status != 409:
            raise


class Cluster:
    """A running control plane plus clients configured for it."""

    def __init__(self, plane: devcluster.ControlPlane) -> None:
        self.plane = plane
        self.kubeconfig = plane.kubeconfig
        self.api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        self.api.configuration.retries = 3
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    ) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, check=check, input=input)

    @functools.cached_property
    def rbac(self) -> rbac.Installed:
        """manifests/' RBAC, applied on first use (tests/rbac.py)."""
        return rbac.install(self.plane)

    def phabmesh_kubeconfig(self, who: str) -> str:
        """The kubeconfig phabmesh-<who> (operator, gateway) runs with: its ServiceAccount."""
        return self.rbac.kubeconfig(who)

    def assert_nothing_forbidden(self) -> None:
        """No call phabmesh made was refused by RBAC: no grant is missing from manifests/."""
        if "rbac" not in self.__dict__:
            return  # phabmesh never ran on this control plane
        self.rbac.record()
        for who in rbac.WHO:
            assert self.rbac.forbidden(who) == set(), f"phabmesh-{who} was refused these calls"


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def force_delete_pods(core: client.CoreV1Api, namespace: str) -> None:
    core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)


def compact_etcd(plane: devcluster.ControlPlane) -> int:
    """Compact etcd at its current revision: every older resourceVersion is gone (410)."""
    base = f"http://127.0.0.1:{plane.etcd_port}/v3/kv"

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(  # noqa: S310 - loopback etcd
            f"{base}/{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    revision = int(post("range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
    post("compaction", {"revision": revision, "physical": True})
    return revision


def meshed_template(app: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A meshed pod template: Linkerd's proxy as a native sidecar, as Linkerd injects it."""
    return {
        "metadata": {"labels": {"app": app}, "annotations": annotations or {}},
        "spec": {
            "serviceAccountName": "runner",
            "terminationGracePeriodSeconds": 5,
            "initContainers": [
                {
                    "name": "linkerd-proxy",
                    "image": "cr.l5d.io/linkerd/proxy:edge",
                    "restartPolicy": "Always",
                }
            ],
            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        },
    }


HOLD = "phabmesh.io/kwok-hold"  # KWOK keeps a Job's pod so annotated Running (stages.yaml)


def one_shot_job(name: str) -> dict[str, Any]:
    """A Job of one meshed pod that runs once, held Running by KWOK until the test lets it
    finish (by removing the annotation :data:`HOLD`)."""
    template = meshed_template(name, {HOLD: "until the test has called"})
    template["spec"]["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": template},
    }


class Helm:
    """The helm command, with its configuration, cache and data in a directory of its own."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = dict(os.environ)
        for name in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME"):
            self.env[name] = str(home / name.lower())

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result
