"""The CRDs refuse bad manifests with a message that names the field, and teach via explain.

Every case is sent to the real API server: what is checked is what a user of
``kubectl apply`` would see.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from phabmesh import resources
from tests.kube import Cluster

G, V = resources.GROUP, resources.VERSION
PLURALS = {
    resources.BOT_KIND: resources.BOT_PLURAL,
    resources.BINDING_KIND: resources.BINDING_PLURAL,
    resources.CREDENTIAL_KIND: resources.CREDENTIAL_PLURAL,
    resources.WEBHOOK_KIND: resources.WEBHOOK_PLURAL,
}

BOT: dict[str, Any] = {
    "apiVersion": resources.API_VERSION,
    "kind": resources.BOT_KIND,
    "metadata": {"name": "valid-bot"},
    "spec": {
        "username": "ci-bot",
        "tokenSecretRef": {"name": "ci-bot-token"},
        "namespaceSelector": {"matchLabels": {"team": "ci"}},
    },
}
BINDING: dict[str, Any] = {
    "apiVersion": resources.API_VERSION,
    "kind": resources.BINDING_KIND,
    "metadata": {"name": "valid-binding"},
    "spec": {
        "botRef": {"name": "ci-bot"},
        "identities": [
            "ci.build.serviceaccount.identity.linkerd.cluster.local",
            "*.build.serviceaccount.identity.linkerd.cluster.local",
            "spiffe://cluster.local/ns/build/sa/ci",
            "*",
        ],
        "identityRefs": [{"kind": "ServiceAccount", "name": "ci"}],
        "podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["ci"]}]},
        "allowedMethods": ["user.whoami", "differential.*"],
    },
}
CREDENTIAL: dict[str, Any] = {
    "apiVersion": resources.API_VERSION,
    "kind": resources.CREDENTIAL_KIND,
    "metadata": {"name": "valid-credential"},
    "spec": {
        "podName": "runner-0",
        "podUID": "6f1c2a8e-0000-4000-8000-000000000001",
        "serviceAccount": "ci",
        "identity": "ci.build.serviceaccount.identity.linkerd.cluster.local",
        "binding": "valid-binding",
        "bot": "ci-bot",
    },
}

WEBHOOK: dict[str, Any] = {
    "apiVersion": resources.API_VERSION,
    "kind": resources.WEBHOOK_KIND,
    "metadata": {"name": "valid-webhook"},
    "spec": {
        "herald": {"secretRef": {"name": "phorge-hook"}},
        "target": {"service": "ci-listener", "port": 8080},
    },
}

BUILD_STEP: dict[str, Any] = {
    **WEBHOOK,
    "metadata": {"name": "valid-build-step"},
    "spec": {
        "harbormaster": {
            "botRef": {"name": "ci-bot"},
            "credentialSecretRef": {"name": "step-credential"},
        },
        "target": {"service": "job-starter", "port": 8080},
    },
}

_DELETE = object()


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``path`` (dots, list indices as numbers) set, or deleted."""
    obj = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return obj


def _expr(operator: str, values: list[str] | None = None) -> dict[str, Any]:
    requirement: dict[str, Any] = {"key": "team", "operator": operator}
    if values is not None:
        requirement["values"] = values
    return {"matchExpressions": [requirement]}


# (case, base manifest, path to change, new value or _DELETE, field path the error must name)
BAD: list[tuple[str, dict[str, Any], str, Any, str]] = [
    ("bot without username", BOT, "spec.username", _DELETE, "spec.username"),
    ("bot username with a space", BOT, "spec.username", "ci bot", "spec.username"),
    ("bot username only digits", BOT, "spec.username", "12345", "spec.username"),
    ("bot username ending in a period", BOT, "spec.username", "ci-bot.", "spec.username"),
    ("bot username longer than 64", BOT, "spec.username", "b" * 65, "spec.username"),
    ("bot without tokenSecretRef", BOT, "spec.tokenSecretRef", _DELETE, "spec.tokenSecretRef"),
    (
        "secret name not DNS",
        BOT,
        "spec.tokenSecretRef.name",
        "Bad_Name",
        "spec.tokenSecretRef.name",
    ),
    ("secret key with a slash", BOT, "spec.tokenSecretRef.key", "a/b", "spec.tokenSecretRef.key"),
    ("bot without selector", BOT, "spec.namespaceSelector", _DELETE, "spec.namespaceSelector"),
    (
        "In without values",
        BOT,
        "spec.namespaceSelector",
        _expr("In"),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "NotIn with empty values",
        BOT,
        "spec.namespaceSelector",
        _expr("NotIn", []),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "Exists with values",
        BOT,
        "spec.namespaceSelector",
        _expr("Exists", ["x"]),
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "unknown selector operator",
        BOT,
        "spec.namespaceSelector",
        _expr("Near"),
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
    ("binding without botRef", BINDING, "spec.botRef", _DELETE, "spec.botRef"),
    ("bad identity", BINDING, "spec.identities.0", "CI_Bot!", "spec.identities[0]"),
    (
        "SPIFFE ID without ns",
        BINDING,
        "spec.identities.2",
        "spiffe://cluster.local/sa/ci",
        "spec.identities[2]",
    ),
    (
        "SPIFFE ID with a trailing segment",
        BINDING,
        "spec.identities.2",
        "spiffe://cluster.local/ns/build/sa/ci/x",
        "spec.identities[2]",
    ),
    (
        "wildcard in the middle",
        BINDING,
        "spec.identities.1",
        "ci.*.serviceaccount",
        "spec.identities[1]",
    ),
    (
        "neither identities nor identityRefs",
        BINDING,
        "spec",
        {"botRef": {"name": "b"}, "identities": [], "allowedMethods": ["user.whoami"]},
        "spec",
    ),
    (
        "identityRef kind Pod",
        BINDING,
        "spec.identityRefs.0.kind",
        "Pod",
        "spec.identityRefs[0].kind",
    ),
    (
        "namespace on a Namespace ref",
        BINDING,
        "spec.identityRefs.0",
        {"kind": "Namespace", "name": "build", "namespace": "build"},
        "spec.identityRefs[0].namespace",
    ),
    (
        "podSelector Exists with values",
        BINDING,
        "spec.podSelector",
        _expr("DoesNotExist", ["x"]),
        "spec.podSelector.matchExpressions[0].values",
    ),
    ("TTL below 1m", BINDING, "spec.credentialTTL", "30s", "spec.credentialTTL"),
    ("TTL above 24h", BINDING, "spec.credentialTTL", "24h1s", "spec.credentialTTL"),
    ("TTL in days", BINDING, "spec.credentialTTL", "1d", "spec.credentialTTL"),
    ("TTL not a duration", BINDING, "spec.credentialTTL", "fifteen minutes", "spec.credentialTTL"),
    (
        "podSelector label key with a space",
        BINDING,
        "spec.podSelector",
        {"matchLabels": {"bad key!": "x"}},
        "spec.podSelector.matchLabels",
    ),
    (
        "podSelector label value with a slash",
        BINDING,
        "spec.podSelector",
        {"matchLabels": {"app": "a/b"}},
        "spec.podSelector.matchLabels",
    ),
    (
        "podSelector expression key with a space",
        BINDING,
        "spec.podSelector",
        {"matchExpressions": [{"key": "bad key", "operator": "Exists"}]},
        "spec.podSelector.matchExpressions[0].key",
    ),
    (
        "namespaceSelector label key with a space",
        BOT,
        "spec.namespaceSelector",
        {"matchLabels": {"team name": "ci"}},
        "spec.namespaceSelector.matchLabels",
    ),
    ("without allowedMethods", BINDING, "spec.allowedMethods", _DELETE, "spec.allowedMethods"),
    ("empty allowedMethods", BINDING, "spec.allowedMethods", [], "spec.allowedMethods"),
    (
        "65 allowedMethods",
        BINDING,
        "spec.allowedMethods",
        [f"m{i}.search" for i in range(65)],
        "spec.allowedMethods",
    ),
    ("bad method glob", BINDING, "spec.allowedMethods.0", "User Whoami", "spec.allowedMethods[0]"),
    ("requireClientID not a bool", BINDING, "spec.requireClientID", "yes", "spec.requireClientID"),
    ("unknown credentialFormat", BINDING, "spec.credentialFormat", "PEM", "spec.credentialFormat"),
    (
        "credentialFormat in lower case",
        BINDING,
        "spec.credentialFormat",
        "jwt",
        "spec.credentialFormat",
    ),
    ("credential without podUID", CREDENTIAL, "spec.podUID", _DELETE, "spec.podUID"),
    ("credential without identity", CREDENTIAL, "spec.identity", _DELETE, "spec.identity"),
    ("credential with empty bot", CREDENTIAL, "spec.bot", "", "spec.bot"),
    (
        "webhook without a source",
        WEBHOOK,
        "spec.herald",
        _DELETE,
        "spec must give exactly one of herald or harbormaster",
    ),
    (
        "webhook with two sources",
        WEBHOOK,
        "spec.harbormaster",
        {"botRef": {"name": "ci-bot"}, "credentialSecretRef": {"name": "step-credential"}},
        "spec must give exactly one of herald or harbormaster",
    ),
    (
        "build step webhook without botRef",
        BUILD_STEP,
        "spec.harbormaster.botRef",
        _DELETE,
        "spec.harbormaster.botRef",
    ),
    (
        "build step webhook without a credential",
        BUILD_STEP,
        "spec.harbormaster.credentialSecretRef",
        _DELETE,
        "spec.harbormaster.credentialSecretRef",
    ),
    (
        "build step credential Secret not DNS",
        BUILD_STEP,
        "spec.harbormaster.credentialSecretRef.name",
        "Step_Credential",
        "spec.harbormaster.credentialSecretRef.name",
    ),
    ("webhook without target", WEBHOOK, "spec.target", _DELETE, "spec.target"),
    (
        "webhook without secretRef",
        WEBHOOK,
        "spec.herald.secretRef",
        _DELETE,
        "spec.herald.secretRef",
    ),
    (
        "webhook secret name not DNS",
        WEBHOOK,
        "spec.herald.secretRef.name",
        "Phorge_Hook",
        "spec.herald.secretRef.name",
    ),
    (
        "webhook secret key with a slash",
        WEBHOOK,
        "spec.herald.secretRef.key",
        "a/b",
        "spec.herald.secretRef.key",
    ),
    ("webhook without service", WEBHOOK, "spec.target.service", _DELETE, "spec.target.service"),
    # A dotted name would reach another namespace's Service (<service>.<namespace>.svc).
    (
        "webhook service in another namespace",
        WEBHOOK,
        "spec.target.service",
        "api.other-team",
        "spec.target.service",
    ),
    ("webhook without port", WEBHOOK, "spec.target.port", _DELETE, "spec.target.port"),
    ("webhook port 0", WEBHOOK, "spec.target.port", 0, "spec.target.port"),
    ("webhook port 65536", WEBHOOK, "spec.target.port", 65536, "spec.target.port"),
    ("webhook named port", WEBHOOK, "spec.target.port", "http", "spec.target.port"),
    ("webhook relative path", WEBHOOK, "spec.target.path", "hooks", "spec.target.path"),
    ("webhook path with a query", WEBHOOK, "spec.target.path", "/h?x=1", "spec.target.path"),
    ("webhook path with a space", WEBHOOK, "spec.target.path", "/a b", "spec.target.path"),
]


def _message(exc: ApiException) -> str:
    return str(json.loads(exc.body)["message"])


@pytest.fixture(scope="module")
def api(cluster: Cluster, crds: object) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(cluster.api)


@pytest.fixture(scope="module")
def ns(cluster: Cluster) -> Iterator[str]:
    core = client.CoreV1Api(cluster.api)
    name = f"crd-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def _create(api: client.CustomObjectsApi, body: dict[str, Any], ns: str) -> dict[str, Any]:
    plural = PLURALS[body["kind"]]
    if body["kind"] == resources.BOT_KIND:
        created: dict[str, Any] = api.create_cluster_custom_object(G, V, plural, body)
    else:
        created = api.create_namespaced_custom_object(G, V, ns, plural, body)
    return created


@pytest.mark.parametrize(("case", "base", "path", "value", "field"), BAD, ids=[b[0] for b in BAD])
def test_invalid_manifest_is_refused_naming_the_field(
    api: client.CustomObjectsApi,
    ns: str,
    case: str,
    base: dict[str, Any],
    path: str,
    value: Any,
    field: str,
) -> None:
    body = _with(base, path, value)
    body["metadata"]["name"] = "invalid"
    with pytest.raises(ApiException) as refused:
        _create(api, body, ns)
    assert refused.value.status == 422, refused.value.body
    assert field in _message(refused.value), _message(refused.value)


def test_a_wrong_duration_is_explained_with_examples(api: client.CustomObjectsApi, ns: str) -> None:
    body = _with(BINDING, "spec.credentialTTL", "1 hour")
    body["metadata"]["name"] = "ttl-typo"
    with pytest.raises(ApiException) as refused:
        _create(api, body, ns)
    message = _message(refused.value)
    assert "spec.credentialTTL" in message and "such as 15m" in message, message
    assert "should match" not in message and "[0-9]" not in message, message  # no regex


def test_a_label_key_error_says_what_a_key_is(api: client.CustomObjectsApi, ns: str) -> None:
    body = _with(BINDING, "spec.podSelector", {"matchLabels": {"bad key!": "x"}})
    body["metadata"]["name"] = "key-typo"
    with pytest.raises(ApiException) as refused:
        _create(api, body, ns)
    assert "e.g. app or app.kubernetes.io/name" in _message(refused.value)


@pytest.fixture
def credential(api: client.CustomObjectsApi, ns: str) -> Iterator[str]:
    name = f"lease-{uuid.uuid4().hex[:8]}"
    body = _with(CREDENTIAL, "metadata.name", name)
    _create(api, body, ns)
    yield name
    api.delete_namespaced_custom_object(G, V, ns, resources.CREDENTIAL_PLURAL, name)


ACTIVE = {
    "phase": "Active",
    "issuedAt": "2026-01-01T00:00:00Z",
    "expiresAt": "2026-01-01T00:15:00Z",
}
REVOKED = {"phase": "Revoked", "reason": "PodDeleted", "revokedAt": "2026-01-01T00:01:00Z"}

# (case, status patches applied in turn: all but the last must pass, field the refusal names)
BAD_STATUS: list[tuple[str, list[dict[str, Any]], str]] = [
    ("unknown phase", [{"phase": "Expired"}], "status.phase"),
    ("reason not CamelCase", [{**REVOKED, "reason": "pod deleted"}], "status.reason"),
    ("expiresAt not a time", [{**ACTIVE, "expiresAt": "in 15 minutes"}], "status.expiresAt"),
    (
        "Revoked without a reason",
        [{"phase": "Revoked", "revokedAt": REVOKED["revokedAt"]}],
        "status",
    ),
    ("Revoked back to Active", [ACTIVE, REVOKED, {"phase": "Active"}], "status.phase"),
]


@pytest.mark.parametrize(("case", "patches", "field"), BAD_STATUS, ids=[b[0] for b in BAD_STATUS])
def test_invalid_credential_status_is_refused(
    api: client.CustomObjectsApi,
    ns: str,
    credential: str,
    case: str,
    patches: list[dict[str, Any]],
    field: str,
) -> None:
    *fine, bad = patches

    def patch(status: dict[str, Any]) -> None:
        api.patch_namespaced_custom_object(
            G, V, ns, resources.CREDENTIAL_PLURAL, credential, {"status": status}
        )

    for status in fine:
        patch(status)
    with pytest.raises(ApiException) as refused:
        patch(bad)
    assert refused.value.status == 422, refused.value.body
    assert field in _message(refused.value), _message(refused.value)


def test_a_credentials_spec_cannot_change(
    api: client.CustomObjectsApi, ns: str, credential: str
) -> None:
    with pytest.raises(ApiException) as refused:
        api.patch_namespaced_custom_object(
            G, V, ns, resources.CREDENTIAL_PLURAL, credential, {"spec": {"bot": "another-bot"}}
        )
    assert refused.value.status == 422, refused.value.body
    message = _message(refused.value)
    assert "spec" in message
    assert "spec is immutable" in message


@pytest.mark.parametrize(
    ("condition", "field"),
    [
        ({"status": "Maybe"}, "status.conditions[0].status"),
        ({"reason": "not camel case"}, "status.conditions[0].reason"),
        ({"lastTransitionTime": None}, "status.conditions[0].lastTransitionTime"),
    ],
)
def test_invalid_bot_condition_is_refused(
    api: client.CustomObjectsApi, condition: dict[str, Any], field: str
) -> None:
    name = f"cond-{uuid.uuid4().hex[:8]}"
    _create(api, _with(BOT, "metadata.name", name), "")
    try:
        good = {
            "type": "Ready",
            "status": "True",
            "reason": "Verified",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        bad = {k: v for k, v in {**good, **condition}.items() if v is not None}
        with pytest.raises(ApiException) as refused:
            api.patch_cluster_custom_object_status(
                G, V, resources.BOT_PLURAL, name, {"status": {"conditions": [bad]}}
            )
        assert refused.value.status == 422, refused.value.body
        assert field in _message(refused.value), _message(refused.value)
    finally:
        api.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, name)


def test_valid_manifests_are_accepted_with_defaults(
    cluster: Cluster, api: client.CustomObjectsApi, ns: str, tmp_path: Path
) -> None:
    bot_name = f"valid-bot-{uuid.uuid4().hex[:8]}"
    bot = _create(api, _with(BOT, "metadata.name", bot_name), ns)
    try:
        assert bot["spec"]["tokenSecretRef"]["key"] == "token"
        assert resources.BotSpec.model_validate(bot["spec"]).token_secret_ref.key == "token"
        everyone = _with(BOT, "spec.namespaceSelector", {})
        everyone["metadata"]["name"] = f"{bot_name}-all"
        assert _create(api, everyone, ns)["spec"]["namespaceSelector"] == {}
        api.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, f"{bot_name}-all")

        binding = _create(api, copy.deepcopy(BINDING), ns)
        assert binding["spec"]["credentialTTL"] == "15m"
        assert binding["spec"]["requireClientID"] is False
        assert binding["spec"]["credentialFormat"] == "PhorgeToken"
        spec = resources.BindingSpec.model_validate(binding["spec"])
        assert spec.ttl.total_seconds() == 900
        assert spec.credential_format == resources.PHORGE_TOKEN
        refs_only = _with(BINDING, "spec.identities", _DELETE)
        refs_only["metadata"]["name"] = "refs-only"
        refs_only["spec"]["credentialTTL"] = "1h30m"
        refs_only["spec"]["credentialFormat"] = "JWT"
        created = _create(api, refs_only, ns)
        assert created["spec"]["credentialTTL"] == "1h30m"
        assert resources.BindingSpec.model_validate(created["spec"]).credential_format == "JWT"

        cred = _create(api, copy.deepcopy(CREDENTIAL), ns)
        resources.LeaseSpec.model_validate(cred["spec"])
        # A lease's end lies ahead: the column must read as that time, not an age.
        for status in ({**ACTIVE, "expiresAt": "2099-01-01T00:15:00Z"}, REVOKED):
            updated = api.patch_namespaced_custom_object(
                G, V, ns, resources.CREDENTIAL_PLURAL, "valid-credential", {"status": status}
            )
        assert resources.LeaseStatus.model_validate(updated["status"]).phase == "Revoked"

        # A fresh discovery cache: kubectl's shared one may predate the CRDs, and a category
        # lookup does not refresh it on a miss (resource names do).
        cache = f"--cache-dir={tmp_path}"
        listed = cluster.kubectl("get", "phabmesh", "-A", "-o", "name", cache).stdout.split()
        assert f"phabricatorbot.{G}/{bot_name}" in listed
        assert f"phabricatorbinding.{G}/valid-binding" in listed
        assert f"phabricatorcredential.{G}/valid-credential" in listed

        table = cluster.kubectl("get", "pbind", "-n", ns).stdout.splitlines()
        assert table[0].split() == ["NAME", "BOT", "TTL", "READY", "MATCHED", "ACTIVE", "AGE"]
        wide = cluster.kubectl("get", "pcred", "-n", ns, "-o", "wide").stdout.splitlines()
        assert wide[0].split()[:7] == [
            "NAME",
            "POD",
            "IDENTITY",
            "BOT",
            "PHASE",
            "EXPIRES",
            "REASON",
        ]
        assert "PodDeleted" in wide[1]
        assert "2099-01-01T00:15:00Z" in wide[1].split(), wide  # not <invalid>
        bots = cluster.kubectl("get", "pbot", bot_name).stdout.splitlines()
        assert bots[0].split() == ["NAME", "USERNAME", "PHID", "READY", "REASON", "AGE"]
    finally:
        api.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, bot_name)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.target.path", "hooks", "spec.target.path must start with '/'"),
        ("spec.target.path", "/h#x", "spec.target.path may not hold whitespace, '?' or '#'"),
    ],
)
def test_a_webhooks_path_error_says_what_is_wrong(
    api: client.CustomObjectsApi, ns: str, path: str, value: str, message: str
) -> None:
    body = _with(WEBHOOK, path, value)
    body["metadata"]["name"] = "path-typo"
    with pytest.raises(ApiException) as refused:
        _create(api, body, ns)
    assert message in _message(refused.value), _message(refused.value)


def test_a_webhook_names_no_other_namespace(api: client.CustomObjectsApi, ns: str) -> None:
    """There is no field to name one: strict field validation refuses it."""
    body = _with(WEBHOOK, "spec.target.namespace", "other-team")
    body["metadata"]["name"] = "elsewhere"
    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(
            G, V, ns, resources.WEBHOOK_PLURAL, body, field_validation="Strict"
        )
    assert 'unknown field "spec.target.namespace"' in _message(refused.value)


def test_a_valid_webhook_is_accepted_with_defaults_and_columns(
    cluster: Cluster, api: client.CustomObjectsApi, ns: str
) -> None:
    name = f"hook-{uuid.uuid4().hex[:8]}"
    created = _create(api, _with(WEBHOOK, "metadata.name", name), ns)
    try:
        assert created["spec"]["herald"]["secretRef"]["key"] == "hmacKey"
        assert created["spec"]["target"]["path"] == "/"
        spec = resources.WebhookSpec.model_validate(created["spec"])
        assert spec.herald is not None and spec.source == "herald"
        assert (spec.herald.secret_ref.key, spec.target.path) == ("hmacKey", "/")
        step = _create(api, _with(BUILD_STEP, "metadata.name", f"{name}-step"), ns)
        built = resources.WebhookSpec.model_validate(step["spec"])
        assert built.source == "harbormaster" and built.secret_names == ("step-credential",)
        harbor = " ".join(
            cluster.kubectl("explain", "phabricatorwebhook.spec.harbormaster").stdout.split()
        )
        for text in ("${target.phid}", "Wait For Message", "get and patch"):
            assert text in harbor, text
        table = cluster.kubectl("get", "phook", "-n", ns).stdout.splitlines()
        assert table[0].split() == ["NAME", "SERVICE", "PORT", "READY", "REASON", "AGE"]
        assert table[1].split()[:3] == [name, "ci-listener", "8080"]
        out = " ".join(cluster.kubectl("explain", "phabricatorwebhook.spec").stdout.split())
        for text in ("/hooks/<namespace>/<name>", "never another", "HMAC key", "-required-"):
            assert (
                text
                in " ".join(cluster.kubectl("explain", "phabricatorwebhook").stdout.split()) + out
            ), text
        status = " ".join(
            cluster.kubectl("explain", "phabricatorwebhook.status.conditions").stdout.split()
        )
        for reason in (
            "SecretMissing",
            "SecretForbidden",
            "KeyMissing",
            "ServiceMissing",
            "BotMissing",
            "BotNotAllowed",
            "BotNotReady",
        ):
            assert reason in status, reason
    finally:
        for each in (name, f"{name}-step"):
            api.delete_namespaced_custom_object(G, V, ns, resources.WEBHOOK_PLURAL, each)


def test_explain_teaches_the_fields(cluster: Cluster, crds: object) -> None:
    out = cluster.kubectl("explain", "phabricatorbinding.spec").stdout
    for text in (
        "credentialTTL",
        "from 1m to 24h. Defaults to 15m.",
        "MeshTLSAuthentication",
        "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>",
        "l5d-client-id",
        "allowedMethods",
        "credentialFormat",
        "Defaults to PhorgeToken.",
        "-required-",
    ):
        assert text in " ".join(out.split()), text
    status = cluster.kubectl("explain", "pcred.status.reason").stdout
    assert "PodTerminating" in status


def test_a_phabricatorcredential_explains_itself_as_a_lease(cluster: Cluster, crds: object) -> None:
    """The kind keeps its name; its short name and its description say what it is."""
    out = " ".join(cluster.kubectl("explain", "phablease").stdout.split())
    assert "KIND: PhabricatorCredential" in out
    assert "The lease of a credential, despite the kind's name" in out
    assert "is never stored here" in out
