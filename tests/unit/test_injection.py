"""What the injection webhook adds, to which pods, in any order with Linkerd's injector."""

from __future__ import annotations

import copy
import datetime
import ssl
from typing import Any

import pytest
from cryptography import x509

from phabmesh import resources
from phabmesh.admission import Injector, inject, tls
from phabmesh.settings import Settings

INJECTION = inject.injection_from(Settings())
WILDCARD = "*.ci.serviceaccount.identity.linkerd.cluster.local"


def _pod(sa: str = "runner", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "labels": labels or {"app": "runner"}},
        "spec": {
            "serviceAccountName": sa,
            "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "helper", "image": "helper:1", "env": [{"name": "X", "value": "1"}]},
            ],
        },
    }


def _binding(**spec: Any) -> resources.BindingSpec:
    body = {
        "botRef": {"name": "bot"},
        "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
        "allowedMethods": ["user.whoami"],
        **spec,
    }
    return resources.BindingSpec.model_validate(body)


def _linkerd(pod: dict[str, Any]) -> None:
    """What Linkerd's proxy injector does to a pod, in outline."""
    spec = pod["spec"]
    spec.setdefault("initContainers", []).append({"name": "linkerd-init", "image": "init"})
    spec["containers"].insert(
        0,
        {
            "name": "linkerd-proxy",
            "image": "proxy",
            "env": [{"name": "LINKERD2_PROXY_LOG", "value": "warn"}],
            "volumeMounts": [{"name": "linkerd-identity-end-entity", "mountPath": "/var/run"}],
        },
    )
    spec.setdefault("volumes", []).append({"name": "linkerd-identity-end-entity", "emptyDir": {}})


@pytest.mark.parametrize(
    ("pod", "namespace", "bindings", "reason"),
    [
        (_pod(), "ci", [_binding()], inject.INJECTED),
        (_pod(sa="other"), "ci", [_binding()], inject.NOT_BOUND),
        (_pod(), "ci", [], inject.NOT_BOUND),
        (_pod(), "kube-system", [_binding()], inject.SYSTEM_NAMESPACE),
        (_pod(**{inject.OPT_OUT_LABEL: "disabled"}), "ci", [_binding()], inject.OPTED_OUT),
        (_pod(app="web"), "ci", [_binding(podSelector={"matchLabels": {"app": "runner"}})],
         inject.NOT_BOUND),
        (_pod(app="runner"), "ci", [_binding(podSelector={"matchLabels": {"app": "runner"}})],
         inject.INJECTED),
        (_pod(sa="x"), "ci", [_binding(identityRefs=[{"kind": "Namespace", "name": "ci"}])],
         inject.INJECTED),
        (_pod(sa="x"), "ci",
         [_binding(identityRefs=[], identities=[WILDCARD])],
         inject.INJECTED),
        # A pod without serviceAccountName runs as `default`.
        ({"metadata": {}, "spec": {"containers": []}}, "ci",
         [_binding(identityRefs=[{"kind": "ServiceAccount", "name": "default"}])],
         inject.INJECTED),
    ],
)  # fmt: skip
def test_which_pods_are_injected(
    pod: dict[str, Any], namespace: str, bindings: list[resources.BindingSpec], reason: str
) -> None:
    assert inject.reason_for(pod, namespace, bindings) == reason


def test_app_containers_get_the_mount_and_variables_and_nothing_else_changes() -> None:
    pod = _pod()
    before = copy.deepcopy(pod)
    INJECTION.apply(pod)
    assert pod["metadata"] == before["metadata"]
    (volume,) = pod["spec"]["volumes"]
    source = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert source == {"audience": "phabmesh.io", "expirationSeconds": 600, "path": "token"}
    for container, old in zip(pod["spec"]["containers"], before["spec"]["containers"], strict=True):
        assert container["volumeMounts"] == [
            {"name": inject.VOLUME, "mountPath": inject.MOUNT_DIR, "readOnly": True}
        ]
        assert container["env"][: len(old.get("env", []))] == old.get("env", [])
        added = {e["name"]: e["value"] for e in container["env"][len(old.get("env", [])) :]}
        assert added == {
            "PHABMESH_CREDENTIAL_ENDPOINT": "http://phabmesh-issuer.phabmesh-system.svc:8443",
            "PHABMESH_GATEWAY_URL": "http://phabmesh-gateway.phabmesh-system.svc:8080",
            "PHABMESH_TOKEN_FILE": inject.TOKEN_FILE,
        }
        assert {k: v for k, v in container.items() if k not in ("env", "volumeMounts")} == {
            k: v for k, v in old.items() if k != "env"
        }


def test_injection_is_idempotent_and_commutes_with_linkerd() -> None:
    ours_first, linkerd_first = _pod(), _pod()
    INJECTION.apply(ours_first)
    _linkerd(ours_first)
    INJECTION.apply(ours_first)  # reinvoked after Linkerd's change
    _linkerd(linkerd_first)
    INJECTION.apply(linkerd_first)
    # The same pod either way (volumes are a set to Kubernetes: only their order differs).
    for pod in (ours_first, linkerd_first):
        pod["spec"]["volumes"].sort(key=lambda v: v["name"])
    assert ours_first == linkerd_first
    proxy = ours_first["spec"]["containers"][0]
    assert proxy["env"] == [{"name": "LINKERD2_PROXY_LOG", "value": "warn"}]
    once = copy.deepcopy(linkerd_first)
    INJECTION.apply(linkerd_first)
    assert linkerd_first == once


def test_values_the_pod_already_sets_are_kept() -> None:
    pod = _pod()
    app = pod["spec"]["containers"][0]
    app["env"] = [{"name": "PHABMESH_GATEWAY_URL", "value": "http://mine"}]
    app["volumeMounts"] = [{"name": "own", "mountPath": inject.MOUNT_DIR}]
    INJECTION.apply(pod)
    assert [e["value"] for e in app["env"] if e["name"] == "PHABMESH_GATEWAY_URL"] == [
        "http://mine"
    ]
    assert app["volumeMounts"] == [{"name": "own", "mountPath": inject.MOUNT_DIR}]


def test_token_expiry_is_never_below_the_api_servers_floor() -> None:
    short = inject.injection_from(Settings(injected_token_ttl=60))
    assert short.expiration_seconds == inject.MIN_TOKEN_SECONDS


# -- TLS ------------------------------------------------------------------------------------


def test_serving_certificate_is_signed_by_its_ca_for_every_name() -> None:
    names = tls.service_names("phabmesh-webhook", "phabmesh-system")
    material = tls.issue(names)
    ca = x509.load_pem_x509_certificate(material.ca_cert)
    cert = x509.load_pem_x509_certificate(material.cert)
    cert.verify_directly_issued_by(ca)
    assert material.names() == set(names)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Round trip through the Secret's data; the context loads the pair.
    again = tls.Material.from_secret({"data": material.to_secret_data()})
    assert again == material
    assert isinstance(tls.server_context(material), ssl.SSLContext)


def test_renewal_keeps_the_ca_so_the_bundle_stays_valid() -> None:
    first = tls.issue(["a.svc"])
    later = datetime.datetime.now(datetime.UTC) + tls.CERT_LIFETIME - tls.RENEW_BEFORE
    second = tls.issue(["a.svc"], ca=(first.ca_cert, first.ca_key), now=later)
    assert second.ca_cert == first.ca_cert
    assert second.cert != first.cert
    x509.load_pem_x509_certificate(second.cert).verify_directly_issued_by(
        x509.load_pem_x509_certificate(first.ca_cert)
    )


def test_a_secret_with_missing_or_broken_fields_is_not_material() -> None:
    assert tls.Material.from_secret({"data": {"ca.crt": "eA=="}}) is None
    assert tls.Material.from_secret({"data": {}}) is None


def _event(kind: str, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    body = {
        "botRef": {"name": "bot"},
        "identityRefs": [{"kind": "ServiceAccount", "name": "runner"}],
        "allowedMethods": ["user.whoami"],
        **spec,
    }
    return {
        "type": kind,
        "object": {"metadata": {"namespace": namespace, "name": name}, "spec": body},
    }


def test_the_injector_keeps_each_namespaces_bindings_apart() -> None:
    injector = Injector(Settings(), client=None)  # type: ignore[arg-type] # events fed by hand
    watch = injector.bindings
    watch._apply(_event("ADDED", "ci", "a"))
    watch._apply(_event("ADDED", "ci", "b", allowedMethods=["differential.query"]))
    watch._apply(_event("ADDED", "web", "a"))
    assert len(injector.specs_in("ci")) == 2
    assert len(injector.specs_in("web")) == 1
    assert injector.specs_in("other") == []
    assert injector.decide(_pod(), "ci") is injector.injection

    watch._apply(_event("MODIFIED", "ci", "b", botRef="not a reference"))  # now invalid
    assert [s.allowed_methods for s in injector.specs_in("ci")] == [("user.whoami",)]
    watch._apply(_event("DELETED", "ci", "a"))
    assert injector.specs_in("ci") == []
    assert injector.decide(_pod(), "ci") is None
    assert "ci" not in injector.by_namespace  # nothing kept for emptied namespaces
    assert len(injector.specs_in("web")) == 1
