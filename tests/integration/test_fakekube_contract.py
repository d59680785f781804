"""The fake API server of the unit tests (tests/fakekube.py) answers as the real one does: the
same calls made to both, the same outcomes (what the answer shows, or the error's status)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from phabmesh.kube import KubeClient, KubeError, load_connection
from phabmesh.resources import resource_path, webhook_path
from tests.fakekube import FakeKube
from tests.kube import Cluster


@pytest.fixture
async def kube(cluster: Cluster, crds: object) -> AsyncIterator[KubeClient]:
    client = KubeClient(load_connection(str(cluster.kubeconfig)), attempts=1)
    yield client
    await client.close()


async def _outcome(call: Any, *fields: str) -> Any:
    """The fields of the answer (dotted paths), or the error's status."""
    try:
        answer = await call
    except KubeError as exc:
        return ("error", exc.status)
    found = []
    for field in fields:
        value: Any = answer
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found.append(value)
    return ("ok", *found)


OURS = {7, 5, 12}  # the status generations the scenario writes


def _ours(outcome: Any) -> Any:
    """An answer's (observedGeneration, port) with a generation the scenario did not write
    (none, or the operator's) as None."""
    if outcome[0] != "ok":
        return outcome
    return ("ok", outcome[1] if outcome[1] in OURS else None, *outcome[2:])


async def _scenario(kube: Any, ns: str) -> list[Any]:
    maps = resource_path("", "v1", "configmaps", ns)
    one = f"{maps}/one"
    hooks = webhook_path(ns)
    hook = webhook_path(ns, "hook")
    body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "one"}}
    out = [await _outcome(kube.create(maps, {**body, "data": {"a": "1", "b": "2"}}), "data")]
    out.append(await _outcome(kube.create(maps, body)))  # AlreadyExists
    held = await kube.get(one)
    uid, version = held["metadata"]["uid"], held["metadata"]["resourceVersion"]
    out.append(await _outcome(kube.merge_patch(one, {"data": {"a": None, "c": "3"}}), "data"))
    stale = {"metadata": {"resourceVersion": version}, "data": {"d": "4"}}
    out.append(await _outcome(kube.merge_patch(one, stale)))  # a stale version
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "add", "path": "/data/e", "value": "5"},
        {"op": "replace", "path": "/data/b", "value": "two"},
        {"op": "remove", "path": "/data/c"},
    ]
    out.append(await _outcome(kube.json_patch(one, ops), "data"))
    for refused in (
        [{"op": "test", "path": "/metadata/uid", "value": "another"}, ops[1]],
        [{"op": "remove", "path": "/data/none"}],
        [{"op": "replace", "path": "/data/none", "value": "x"}],
        [{"op": "add", "path": "/none/x", "value": "x"}],
    ):
        out.append(await _outcome(kube.json_patch(one, refused)))
    out.append(await _outcome(kube.get(one), "data"))  # nothing of the refused ones written
    out.append(await _outcome(kube.merge_patch(one + "/status", {"data": {"x": "y"}})))
    out.append(await _outcome(kube.delete(one, body={"preconditions": {"uid": "another"}})))
    out.append(await _outcome(kube.delete(one, body={"preconditions": {"uid": uid}}), "kind"))
    for gone in (kube.get(one), kube.delete(one), kube.merge_patch(one, {"data": {}})):
        out.append(await _outcome(gone))
    out.append(await _outcome(kube.json_patch(one, ops)))
    # The status subresource (a PhabricatorWebhook's). The session's operator writes the
    # webhook's status meanwhile (its check): only the generations this scenario writes
    # (7, 5, 12: never one the operator writes) are compared, anything else as None.
    webhook = {
        "apiVersion": "phabmesh.io/v1alpha1",
        "kind": "PhabricatorWebhook",
        "metadata": {"name": "hook"},
        "spec": {
            "herald": {"secretRef": {"name": "key"}},
            "target": {"service": "listener", "port": 8080},
        },
        "status": {"observedGeneration": 7},
    }
    fields = ("status.observedGeneration", "spec.target.port")
    out.append(_ours(await _outcome(kube.create(hooks, webhook), *fields)))
    both = {"spec": {"target": {"port": 9090}}, "status": {"observedGeneration": 5}}
    out.append(_ours(await _outcome(kube.merge_patch(hook, both), *fields)))
    again = {"spec": {"target": {"port": 7070}}, "status": {"observedGeneration": 12}}
    out.append(_ours(await _outcome(kube.merge_patch(hook + "/status", again), *fields)))
    out.append(await _outcome(kube.delete(hook), "kind"))
    return out


async def test_the_fake_answers_as_the_api_server_does(kube: KubeClient, namespace: str) -> None:
    real = await _scenario(kube, namespace)
    fake = await _scenario(FakeKube(), namespace)
    differ = [(i, f, r) for i, (f, r) in enumerate(zip(fake, real, strict=True)) if f != r]
    assert differ == []  # (step, the fake's outcome, the API server's)
    assert real[1] == ("error", 409)  # the scenario does reach the errors it is about
