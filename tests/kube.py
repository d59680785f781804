"""Helpers for tests that talk to the real local control plane."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from kubernetes import client, config

from phabmesh import devcluster

T = TypeVar("T")


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
