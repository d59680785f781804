"""Signing keys in their Secret: created once, rotated with overlap, by racing replicas."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator

import pytest

from phabmesh import credentials
from phabmesh.credentials.keystore import KeyStore
from phabmesh.kube import KubeClient, load_connection
from phabmesh.resources import resource_path
from tests.kube import Cluster

HOUR = datetime.timedelta(hours=1)
T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture
async def kube(cluster: Cluster) -> AsyncIterator[KubeClient]:
    client = KubeClient(load_connection(str(cluster.kubeconfig)))
    yield client
    await client.close()


def _mint(ring: credentials.KeyRing, now: datetime.datetime) -> str:
    return credentials.mint(
        ring,
        issuer="i",
        audience="a",
        subject="s",
        now=now,
        not_after=now + HOUR,
        pod="p",
        pod_uid="u",
        namespace="n",
        binding="b",
        bot="bot",
        bot_phid="",
        lease_uid="l",
    )


async def test_rotation_with_overlap_and_racing_replicas(kube: KubeClient, namespace: str) -> None:
    clock = {"now": T0}
    stores = [
        KeyStore(
            kube,
            namespace,
            "keys",
            rotate_every=24 * HOUR,
            max_credential_ttl=HOUR,
            clock=lambda: clock["now"],
        )
        for _ in range(2)
    ]
    await asyncio.gather(*(s.ensure() for s in stores))  # two replicas start at once
    assert stores[0].ring is not None and stores[1].ring is not None
    assert stores[0].ring.current.kid == stores[1].ring.current.kid  # one key, not two
    first = stores[0].ring
    old_credential = _mint(first, T0)

    clock["now"] = T0 + 24 * HOUR
    results = await asyncio.gather(*(s.rotate_if_due() for s in stores))
    assert sorted(results) == [False, True]  # exactly one replica rotated; the other re-read
    secret = await kube.get(resource_path("", "v1", "secrets", namespace, "keys"))
    ring = credentials.KeyRing.from_secret_data(secret["data"])
    assert ring.current.kid != first.current.kid
    assert [k.kid for k in ring.previous] == [first.current.kid]
    # The old key still verifies what it signed, until that has expired.
    credentials.verify(
        old_credential,
        ring,
        audience="a",
        issuer="i",
        now=T0 + 30 * 60 * datetime.timedelta(seconds=1),
    )
    assert len(credentials.jwks(ring)["keys"]) == 2

    clock["now"] = T0 + 25 * HOUR + datetime.timedelta(seconds=1)
    assert await stores[1].rotate_if_due()  # drops the retired key
    secret = await kube.get(resource_path("", "v1", "secrets", namespace, "keys"))
    ring = credentials.KeyRing.from_secret_data(secret["data"])
    assert [k["kid"] for k in credentials.jwks(ring)["keys"]] == [ring.current.kid]
    with pytest.raises(credentials.UnknownKey):
        credentials.verify(old_credential, ring, audience="a", issuer="i", now=T0)
