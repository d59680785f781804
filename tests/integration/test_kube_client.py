"""phabmesh's async Kubernetes client and informer against the real API server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import structlog.testing
from pytest_mock import MockerFixture

from phabmesh import identity
from phabmesh.kube import Conflict, KubeClient, NotFound, load_connection
from phabmesh.kube.client import Gone
from phabmesh.kube.informer import Informer
from phabmesh.resources import resource_path
from tests.kube import Cluster
from tests.stack import this_thread_only


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[KubeClient]:
    client = KubeClient(load_connection(str(cluster.kubeconfig)))
    yield client
    await client.close()


def _cm(name: str, value: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {"v": value},
    }


async def test_calls_and_their_errors(kube: KubeClient, namespace: str) -> None:
    path = resource_path("", "v1", "configmaps", namespace)
    await kube.create(path, _cm("one", "1"))
    with pytest.raises(Conflict):
        await kube.create(path, _cm("one", "1"))
    patched = await kube.merge_patch(f"{path}/one", {"data": {"v": "2"}})
    assert patched["data"] == {"v": "2"}
    for i in range(7):
        await kube.create(path, _cm(f"page-{i}", str(i)))
    items, version = await kube.list_all(path, chunk=3)
    assert sorted(i["metadata"]["name"] for i in items) == ["one"] + [f"page-{i}" for i in range(7)]
    assert version
    await kube.delete(f"{path}/one")
    with pytest.raises(NotFound):
        await kube.get(f"{path}/one")


async def test_informer_follows_changes_and_resumes(kube: KubeClient, namespace: str) -> None:
    path = resource_path("", "v1", "configmaps", namespace)
    await kube.create(path, _cm("before", "0"))
    seen: list[tuple[str, str, str | None]] = []
    informer = Informer(
        kube,
        path,
        lambda obj: obj.get("data", {}).get("v"),
        on_event=lambda kind, key, value: seen.append((kind, key, value)),
        watch_timeout=1,  # the server ends each watch after 1 s: the informer must resume
    )
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        assert informer.items == {f"{namespace}/before": "0"}
        await asyncio.sleep(2.5)  # at least two server-side watch timeouts
        await kube.create(path, _cm("after", "1"))
        await kube.merge_patch(f"{path}/after", {"data": {"v": "2"}})
        await kube.delete(f"{path}/before")

        async def settled() -> None:
            while informer.items != {f"{namespace}/after": "2"}:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(settled(), 10)
        assert ("DELETED", f"{namespace}/before", None) in seen
        assert informer.connected
    finally:
        task.cancel()


async def test_informer_lists_again_after_410_gone(
    kube: KubeClient, namespace: str, mocker: MockerFixture
) -> None:
    """The informer's side of 410 Gone (injected here; the API server's own 410 after a
    restart over a compacted etcd is in tests/e2e/test_outages.py)."""
    path = resource_path("", "v1", "configmaps", namespace)
    await kube.create(path, _cm("kept", "0"))
    # Its first watch is told the version is gone, so it lists again.
    real_watch = kube.watch
    watches = 0

    def first_one_gone(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        nonlocal watches
        watches += 1
        if watches > 1:
            return real_watch(*args, **kwargs)

        async def gone() -> AsyncIterator[Any]:
            await kube.create(path, _cm("meanwhile", "1"))  # missed by no watch
            raise Gone(410, "Expired", "too old resource version")
            yield  # an async generator

        return gone()

    mocker.patch.object(kube, "watch", side_effect=first_one_gone)
    informer = Informer(kube, path, lambda obj: obj.get("data", {}).get("v"), watch_timeout=5)
    relists = mocker.spy(informer, "relist")
    task = asyncio.create_task(informer.run())
    try:

        async def current() -> None:
            while informer.items != {f"{namespace}/kept": "0", f"{namespace}/meanwhile": "1"}:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(current(), 10)
        assert relists.call_count == 2
        assert informer.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _pod(name: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"schedulerName": "none", "containers": [{"name": "app", "image": "app"}]},
    }


async def test_a_list_not_older_than_a_version_holds_what_that_version_held_page_by_page(
    kube: KubeClient, namespace: str, cluster: Cluster
) -> None:
    path = resource_path("", "v1", "pods", namespace)
    for i in range(5):
        await kube.create(path, _pod(f"p-{i}"))
    last = await kube.create(path, _pod("last"))
    version = last["metadata"]["resourceVersion"]
    # As the operator lists (its ServiceAccount's requests are in the audit log).
    operator = KubeClient(load_connection(cluster.phabmesh_kubeconfig("operator")))
    try:
        pages = [
            (items, listed)
            async for items, listed in operator.list_pages(path, chunk=2, not_older_than=version)
        ]
    finally:
        await operator.close()
    names = sorted(i["metadata"]["name"] for items, _ in pages for i in items)
    assert names == sorted([*(f"p-{i}" for i in range(5)), "last"])
    assert len(pages) == 3  # the cache pages it as asked
    assert int(pages[-1][1]) >= int(version)
    # As the API server saw it: the first page from the version, the others by their token.
    asked = _audited_lists(cluster, namespace)
    assert len(asked) == 3
    assert asked[0]["resourceVersionMatch"] == ["NotOlderThan"]
    assert asked[0]["resourceVersion"] == [version]
    assert all("continue" in a and "resourceVersion" not in a for a in asked[1:])


async def test_a_list_from_a_version_the_cache_never_reaches_is_read_consistently(
    kube: KubeClient, namespace: str
) -> None:
    path = resource_path("", "v1", "configmaps", namespace)
    await kube.create(path, _cm("here", "1"))
    # Far ahead of anything written: the watch cache waits for it, then answers 504.
    with structlog.testing.capture_logs(processors=[this_thread_only()]) as logs:
        pages = [p async for p in kube.list_pages(path, not_older_than=str(10**15))]
    assert [e["event"] for e in logs] == ["list_cache_behind"]
    assert [i["metadata"]["name"] for items, _ in pages for i in items] == ["here"]
    assert 0 < int(pages[-1][1]) < 10**15


def _audited_lists(cluster: Cluster, namespace: str) -> list[dict[str, list[str]]]:
    """The query of each list of pods in ``namespace`` the audit log holds, in order."""
    asked = []
    for event in cluster.plane.audit_events():
        ref = event.get("objectRef") or {}
        assert isinstance(ref, dict)
        if (
            event.get("verb") == "list"
            and ref.get("resource") == "pods"
            and ref.get("namespace") == namespace
        ):
            asked.append(parse_qs(urlsplit(str(event["requestURI"])).query))
    return asked


async def test_a_pod_watch_of_the_meshed_alone_follows_linkerds_label(
    kube: KubeClient, namespace: str
) -> None:
    """PHABMESH_WATCH_UNMESHED_PODS=false: the API server applies the label selector, to
    the list and to the watch; a pod that loses the label leaves the watch (DELETED: its
    lease is revoked as its pod's), and comes back with it."""
    path = resource_path("", "v1", "pods", namespace)
    labelled = _pod("labelled")
    labelled["metadata"]["labels"] = {identity.CONTROL_PLANE_LABEL: "linkerd"}  # type: ignore[index]
    await kube.create(path, labelled)
    await kube.create(path, _pod("plain"))
    seen: list[tuple[str, str]] = []
    informer = Informer(
        kube,
        path,
        lambda obj: obj["metadata"]["name"],
        params=identity.pod_watch_params(False),
        on_event=lambda kind, key, _v: seen.append((kind, key)),
        watch_timeout=5,
    )
    task = asyncio.create_task(informer.run())

    async def until(check: Any) -> None:
        while not check():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        assert set(informer.items) == {f"{namespace}/labelled"}
        label = identity.CONTROL_PLANE_LABEL
        await kube.merge_patch(f"{path}/labelled", {"metadata": {"labels": {label: None}}})
        await asyncio.wait_for(until(lambda: not informer.items), 10)
        await kube.merge_patch(f"{path}/plain", {"metadata": {"labels": {label: "linkerd"}}})
        await asyncio.wait_for(until(lambda: f"{namespace}/plain" in informer.items), 10)
        assert seen == [
            ("ADDED", f"{namespace}/labelled"),
            ("DELETED", f"{namespace}/labelled"),
            ("ADDED", f"{namespace}/plain"),
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_the_first_pod_list_after_the_leases_is_not_held_by_a_quiet_pod_cache(
    kube: KubeClient, namespace: str, crds: object
) -> None:
    """The operator lists pods once the leases are listed, and that list must be at least as
    new as the lease list (the start-up sweep). No pod written since: the pods' watch cache
    has not reached the lease list's version, so a list "not older than" that version is held
    by the API server, then refused (504). The pods are read consistently instead."""
    from phabmesh.leases.watches import Watches

    pods = resource_path("", "v1", "pods", namespace)
    for i in range(3):
        await kube.create(pods, _pod(f"p-{i}"))
    # The last write is not a pod's (as a lease's renewal or a status write often is).
    await kube.create(resource_path("", "v1", "configmaps", namespace), _cm("later", "1"))
    watches = Watches(kube, identity.Naming(), namespace=namespace, chunk=2)
    run = watches.tasks()
    loops = [asyncio.create_task(run["watch:leases"]()), asyncio.create_task(run["watch:pods"]())]
    try:
        with structlog.testing.capture_logs(processors=[this_thread_only()]) as logs:
            await asyncio.wait_for(watches.pods.synced.wait(), 30)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    assert "list_cache_behind" not in [e["event"] for e in logs]
    assert {f"{namespace}/p-{i}" for i in range(3)} <= set(watches.pods.items)
    # At least as new as the lease list, as the sweep needs.
    assert int(watches.pods.resource_version) >= int(watches.leases.resource_version)
