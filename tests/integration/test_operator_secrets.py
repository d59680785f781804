"""The operator's two Secrets replaced as its ServiceAccount (manifests/' RBAC): a signing-key
rotation and a re-issued webhook certificate, each on the session's Secret that the running
operator and gateway use, so that the grant they need is exercised (tests/rbac.py). And no
wider: the gateway reads only the bots' token Secrets (as the operator's Role names them) and
the signing keys, never the webhook CA; the operator creates no Secret but its own two
(manifests/secret-policy.yaml)."""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import AsyncIterator

import pytest

from phabmesh import gatewayrole, resources
from phabmesh.admission.tls import Material, WebhookTLS, service_names
from phabmesh.credentials.keystore import KeyStore
from phabmesh.dev.conduit import ConduitServer
from phabmesh.kube import Conflict, KubeClient, KubeError, load_connection
from phabmesh.kube.client import JSON
from phabmesh.resources import resource_path
from phabmesh.settings import Settings
from tests import rbac
from tests.kube import Cluster, wait_for
from tests.phab import SYSTEM, G, V, bind, settings_for
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


# --- no wider than the calls made: who may read and write which Secret ------------------


def _may(cluster: Cluster, who: str, verb: str, name: str | None) -> bool:
    """Whether RBAC lets phabmesh-<who> ``verb`` Secret ``name`` (None: every Secret) in
    phabmesh-system: a SubjectAccessReview, as the API server's own authorizer answers it."""
    namespace, _ = rbac.account(who)
    attributes = {"namespace": namespace, "resource": "secrets", "verb": verb, "name": name or ""}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": rbac.username(who),
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "resourceAttributes": attributes,
        },
    }
    out = cluster.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout
    return bool(json.loads(out)["status"]["allowed"])


def _role_names(cluster: Cluster) -> set[str]:
    out = cluster.kubectl("get", "role", gatewayrole.ROLE, "-n", SYSTEM, "-o", "json").stdout
    return set(gatewayrole.permitted(json.loads(out)))


def test_the_gateway_reads_the_bots_tokens_and_never_the_webhook_ca(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    namespace: str,
    settings: Settings,
) -> None:
    bot = bind(cluster, conduit, namespace)
    # Whoever writes bots points one at the webhook CA's Secret, and one at the signing keys.
    sneaky = {
        f"{namespace}-ca": settings.webhook_secret,
        f"{namespace}-keys": settings.signing_secret,
    }
    for name, secret in sneaky.items():
        cluster.custom.create_cluster_custom_object(
            G,
            V,
            resources.BOT_PLURAL,
            {
                "apiVersion": f"{G}/{V}",
                "kind": resources.BOT_KIND,
                "metadata": {"name": name},
                "spec": {
                    "username": name,
                    "tokenSecretRef": {"name": secret, "key": "tls.key"},
                    "namespaceSelector": {"matchLabels": {"phabmesh.io/bots": "allowed"}},
                },
            },
        )
    try:
        state = gateway.process.state  # type: ignore[attr-defined]
        wait_for(lambda: state.bot_token(bot), what="the gateway to read the new bot's token")
        wait_for(
            lambda: all(state.bots.items.get(name) for name in sneaky),
            what="the gateway to see the other bots",
        )
        assert f"{bot}-token" in _role_names(cluster)
        assert _may(cluster, "gateway", "watch", f"{bot}-token")
        # The operator named neither of its own Secrets for those bots: no token for them.
        assert not _role_names(cluster) & {settings.webhook_secret, settings.signing_secret}
        for name, secret in sneaky.items():
            held = state.bot_token(name) is not None  # never shown: it would be a key
            assert not held, f"the gateway holds Secret {secret} as bot {name}'s token"
        for verb in ("get", "list", "watch"):
            assert not _may(cluster, "gateway", verb, settings.webhook_secret), verb
            assert not _may(cluster, "gateway", verb, None), verb
        # The signing keys: watched by name, never read whole or written.
        assert _may(cluster, "gateway", "watch", settings.signing_secret)
        assert not _may(cluster, "gateway", "get", settings.signing_secret)
    finally:
        for name in sneaky:
            cluster.custom.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, name)


async def test_the_operator_creates_no_secret_but_its_own_two(
    cluster: Cluster, as_operator: KubeClient, operator: Threaded, settings: Settings
) -> None:
    collection = resource_path("", "v1", "secrets", settings.namespace)
    name = "phabmesh-not-its-own"
    other = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    refused: KubeError | None = None
    for _ in range(50):  # the API server takes a moment to enforce a new policy
        try:
            await as_operator.create(collection, other)
        except KubeError as exc:
            refused = exc
            break
        cluster.kubectl("delete", "secret", name, "-n", settings.namespace)
        await asyncio.sleep(0.1)
    assert refused is not None, f"the operator's ServiceAccount created Secret {name}"
    assert refused.status == 403
    assert "creates only its own Secrets" in refused.message
    # Its own two pass the policy (and then find the Secret already there).
    for name in (settings.signing_secret, settings.webhook_secret):
        own = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
        with pytest.raises(Conflict):
            await as_operator.create(collection, own)


async def test_the_gateways_secret_role_never_names_phabmeshs_own_secrets(
    cluster: Cluster,
    as_operator: KubeClient,
    operator: Threaded,
    gateway: Threaded,
    settings: Settings,
) -> None:
    """A stolen operator token could widen the Role as far as RBAC lets the operator grant;
    manifests/secret-policy.yaml keeps it to named Secrets read by list and watch."""
    path = resource_path(gatewayrole.RBAC_GROUP, "v1", "roles", SYSTEM, gatewayrole.ROLE)
    policy = "may only let the gateway list and watch named Secrets"
    escalation = "permissions not currently held"  # RBAC: a Role grants only what its writer holds
    wider: list[tuple[list[JSON], str]] = [
        (gatewayrole.rules(["some-bot-token", settings.webhook_secret]), policy),
        (gatewayrole.rules([settings.signing_secret]), policy),
        ([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]}], policy),
        ([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}], policy),
        ([{**gatewayrole.rules(["some-bot-token"])[0], "verbs": ["get"]}], escalation),
    ]
    for rules, why in wider:
        refused: KubeError | None = None
        for _ in range(50):  # the API server takes a moment to enforce a new policy
            out = cluster.kubectl("get", "role", gatewayrole.ROLE, "-n", SYSTEM, "-o", "json")
            role = json.loads(out.stdout)  # read as the admin: the operator only watches it
            try:
                await as_operator.request("PUT", path, body={**role, "rules": rules})
            except Conflict:
                continue  # the operator wrote it meanwhile
            except KubeError as exc:
                refused = exc
                break
            await asyncio.sleep(0.1)
        assert refused is not None and refused.status == 403, rules
        assert why in refused.message, rules
