"""The operator's two Secrets replaced as its ServiceAccount (manifests/' RBAC): a signing-key
rotation and a re-issued webhook certificate, each on the session's Secret that the running
operator and gateway use, so that the grant they need is exercised (tests/rbac.py)."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator

import pytest

from phabmesh.admission.tls import Material, WebhookTLS, service_names
from phabmesh.credentials.keystore import KeyStore
from phabmesh.dev.conduit_server import ConduitServer
from phabmesh.kube import KubeClient, load_connection
from phabmesh.kube.client import resource_path
from phabmesh.settings import Settings
from tests import rbac
from tests.kube import wait_for
from tests.phab import settings_for
from tests.stack import Threaded


@pytest.fixture
def settings(conduit: ConduitServer) -> Settings:
    return settings_for(conduit)


@pytest.fixture
async def as_operator(phabmesh_rbac: rbac.Installed) -> AsyncIterator[KubeClient]:
    """A client with the operator's ServiceAccount token, as a second replica would have."""
    client = KubeClient(load_connection(phabmesh_rbac.kubeconfig("operator")))
    yield client
    await client.close()


async def test_a_replica_rotates_the_signing_key_and_the_running_processes_follow(
    as_operator: KubeClient, settings: Settings, operator: Threaded, gateway: Threaded
) -> None:
    before = operator.process.keys.ring  # type: ignore[attr-defined]
    assert before is not None
    # A replica with a zero PHABMESH_KEY_ROTATION_INTERVAL: its rotation is due at once.
    replica = KeyStore(
        as_operator,
        settings.namespace,
        settings.signing_secret,
        rotate_every=datetime.timedelta(0),
        max_credential_ttl=datetime.timedelta(
            seconds=settings.max_credential_ttl + settings.clock_skew
        ),
    )
    await replica.ensure()
    assert await replica.rotate_if_due()
    assert replica.ring is not None
    new_kid = replica.ring.current.kid
    assert new_kid != before.current.kid
    # The old key stays beside the new one: credentials it signed still verify.
    assert before.current.kid in [k.kid for k in replica.ring.previous]
    for who, process in (("operator", operator), ("gateway", gateway)):
        keys = process.process.keys if who == "operator" else process.process.state.keys  # type: ignore[attr-defined]
        wait_for(
            lambda keys=keys: keys.ring is not None and keys.ring.current.kid == new_kid,
            what=f"the {who} to sign and verify with the rotated key",
        )


async def test_a_replica_reissues_the_webhook_certificate_under_the_same_ca(
    as_operator: KubeClient, settings: Settings, operator: Threaded
) -> None:
    path = resource_path("", "v1", "secrets", settings.namespace, settings.webhook_secret)
    before = Material.from_secret(await as_operator.get(path))
    assert before is not None
    # A replica that must also answer to a name the certificate lacks (a renamed Service)
    # re-issues the serving certificate; the CA, and with it the caBundle, stays.
    names = [*service_names(settings.webhook_service, settings.namespace), "phabmesh-renamed"]
    replica = WebhookTLS(
        as_operator,
        settings.namespace,
        settings.webhook_secret,
        settings.webhook_configuration,
        names,
    )
    renewed = await replica.ensure()
    assert "phabmesh-renamed" in renewed.names()
    assert renewed.ca_cert == before.ca_cert
    stored = Material.from_secret(await as_operator.get(path))
    assert stored is not None and stored.cert != before.cert
    # The running operator keeps serving: the new certificate covers its names too.
    assert set(service_names(settings.webhook_service, settings.namespace)) <= stored.names()
