"""The CRDs refuse bad manifests with a message that names the field, and teach via explain."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

from phabmesh import resources
from tests.kube import Cluster

G, V = resources.GROUP, resources.VERSION

BOT: dict[str, Any] = {
    "apiVersion": f"{G}/{V}",
    "kind": "PhabricatorBot",
    "metadata": {"name": "valid-bot"},
    "spec": {
        "username": "ci-bot",
        "tokenSecretRef": {"name": "ci-bot-token"},
        "namespaceSelector": {"matchLabels": {"team": "ci"}},
    },
}
BINDING: dict[str, Any] = {
    "apiVersion": f"{G}/{V}",
    "kind": "PhabricatorBinding",
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
        "allowedMethods": ["user.whoami", "differential.*"],
    },
}
CREDENTIAL: dict[str, Any] = {
    "apiVersion": f"{G}/{V}",
    "kind": "PhabricatorCredential",
    "metadata": {"name": "valid-credential"},
    "spec": {
        "podName": "p",
        "podUID": "0000-1111",
        "serviceAccount": "ci",
        "identity": "ci.build.serviceaccount.identity.linkerd.cluster.local",
        "binding": "b",
        "bot": "ci-bot",
    },
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``base`` with ``path`` (dots; ``-`` deletes) set to ``value``."""
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


_DELETE = object()

BAD = [
    ("bot without username", BOT, "spec.username", _DELETE, "spec.username"),
    ("bot username with a space", BOT, "spec.username", "ci bot", "spec.username"),
    ("bot username only digits", BOT, "spec.username", "12345", "spec.username"),
    ("bot without secret", BOT, "spec.tokenSecretRef", _DELETE, "spec.tokenSecretRef"),
    (
        "bot secret name invalid",
        BOT,
        "spec.tokenSecretRef.name",
        "Bad_Name",
        "spec.tokenSecretRef.name",
    ),
    ("bot without selector", BOT, "spec.namespaceSelector", _DELETE, "spec.namespaceSelector"),
    (
        "In without values",
        BOT,
        "spec.namespaceSelector",
        {"matchExpressions": [{"key": "team", "operator": "In"}]},
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "Exists with values",
        BOT,
        "spec.namespaceSelector",
        {"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["x"]}]},
        "spec.namespaceSelector.matchExpressions[0].values",
    ),
    (
        "unknown selector operator",
        BOT,
        "spec.namespaceSelector",
        {"matchExpressions": [{"key": "team", "operator": "Near"}]},
        "spec.namespaceSelector.matchExpressions[0].operator",
    ),
    ("binding without botRef", BINDING, "spec.botRef", _DELETE, "spec.botRef"),
    ("bad identity", BINDING, "spec.identities.0", "CI_Bot!", "spec.identities[0]"),
    (
        "bad spiffe id",
        BINDING,
        "spec.identities.2",
        "spiffe://cluster.local/sa/ci",
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
        "neither identities nor refs",
        BINDING,
        "spec",
        {"botRef": {"name": "b"}, "allowedMethods": ["user.whoami"]},
        "spec",
    ),
    (
        "bad identityRef kind",
        BINDING,
        "spec.identityRefs.0.kind",
        "Pod",
        "spec.identityRefs[0].kind",
    ),
    ("ttl below 1m", BINDING, "spec.credentialTTL", "30s", "spec.credentialTTL"),
    ("ttl above 24h", BINDING, "spec.credentialTTL", "25h", "spec.credentialTTL"),
    ("ttl not a duration", BINDING, "spec.credentialTTL", "fifteen minutes", "spec.credentialTTL"),
    ("empty allowedMethods", BINDING, "spec.allowedMethods", [], "spec.allowedMethods"),
    ("bad method glob", BINDING, "spec.allowedMethods.0", "User Whoami", "spec.allowedMethods[0]"),
    ("requireClientID not a bool", BINDING, "spec.requireClientID", "yes", "spec.requireClientID"),
    ("credential without podUID", CREDENTIAL, "spec.podUID", _DELETE, "spec.podUID"),
]


def _create(cluster: Cluster, body: dict[str, Any], namespace: str) -> dict[str, Any]:
    plural = {
        "PhabricatorBot": resources.BOT_PLURAL,
        "PhabricatorBinding": resources.BINDING_PLURAL,
        "PhabricatorCredential": resources.CREDENTIAL_PLURAL,
    }[body["kind"]]
    if body["kind"] == "PhabricatorBot":
        return cluster.custom.create_cluster_custom_object(G, V, plural, body)
    return cluster.custom.create_namespaced_custom_object(G, V, namespace, plural, body)


@pytest.mark.parametrize(("case", "base", "path", "value", "field"), BAD, ids=[b[0] for b in BAD])
def test_invalid_manifest_is_refused_naming_the_field(
    cluster: Cluster,
    crds: object,
    namespace: str,
    case: str,
    base: dict[str, Any],
    path: str,
    value: Any,
    field: str,
) -> None:
    body = _with(base, path, value)
    body["metadata"]["name"] = "invalid"
    with pytest.raises(ApiException) as refused:
        _create(cluster, body, namespace)
    assert refused.value.status == 422, refused.value.body
    message = json.loads(refused.value.body)["message"]
    assert field in message, message


def test_valid_manifests_are_accepted_with_defaults(
    cluster: Cluster, crds: object, namespace: str
) -> None:
    bot = _create(cluster, copy.deepcopy(BOT), namespace)
    assert bot["spec"]["tokenSecretRef"]["key"] == "token"
    binding = _create(cluster, copy.deepcopy(BINDING), namespace)
    assert binding["spec"]["credentialTTL"] == "15m"
    assert binding["spec"]["requireClientID"] is False
    resources.BindingSpec.model_validate(binding["spec"])
    resources.BotSpec.model_validate(bot["spec"])
    cred = _create(cluster, copy.deepcopy(CREDENTIAL), namespace)
    cluster.custom.delete_cluster_custom_object(G, V, resources.BOT_PLURAL, "valid-bot")

    # A credential's spec cannot change after it is written.
    cred["spec"]["bot"] = "another-bot"
    with pytest.raises(ApiException) as refused:
        cluster.custom.replace_namespaced_custom_object(
            G, V, namespace, resources.CREDENTIAL_PLURAL, "valid-credential", cred
        )
    assert "spec is immutable" in json.loads(refused.value.body)["message"]


def test_explain_teaches_the_fields(cluster: Cluster, crds: object) -> None:
    out = cluster.kubectl("explain", "phabricatorbinding.spec").stdout
    assert "credentialTTL" in out
    assert "MeshTLSAuthentication" in out
    assert "spiffe://" in out
    listed = cluster.kubectl("get", "phabmesh", "-A").returncode
    assert listed == 0
