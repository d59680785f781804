"""What the injection webhook adds, to which pods, in any order with Linkerd's injector."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import re
import ssl
from collections.abc import Callable
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
            "PHABMESH_CREDENTIAL_ENDPOINT": "http://phabmesh-endpoint.phabmesh-system.svc:8443",
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


# -- the credential agent -------------------------------------------------------------------

SIDECAR = dataclasses.replace(INJECTION, agent=resources.AGENT_SIDECAR)


def _linkerd_native(pod: dict[str, Any]) -> None:
    """Linkerd's injector with native sidecars: linkerd-init, then the proxy, in front."""
    inits = pod["spec"].setdefault("initContainers", [])
    inits.insert(0, {"name": "linkerd-init", "image": "init"})
    inits.insert(1, {"name": "linkerd-proxy", "image": "proxy", "restartPolicy": "Always"})
    pod["spec"].setdefault("volumes", []).append(
        {"name": "linkerd-identity-end-entity", "emptyDir": {}}
    )


def _both_orders(
    injection: inject.Injection, linkerd: Callable[[dict[str, Any]], None], pod: dict[str, Any]
) -> dict[str, Any]:
    """The pod after both injectors, whichever runs first; asserts both give the same pod."""
    ours_first, linkerd_first = copy.deepcopy(pod), copy.deepcopy(pod)
    injection.apply(ours_first)
    linkerd(ours_first)
    injection.apply(ours_first)  # reinvoked after Linkerd's change (reinvocationPolicy)
    linkerd(linkerd_first)
    injection.apply(linkerd_first)
    for each in (ours_first, linkerd_first):
        each["spec"]["volumes"].sort(key=lambda v: v["name"])
    assert ours_first == linkerd_first
    again = copy.deepcopy(ours_first)
    injection.apply(again)
    assert again == ours_first  # idempotent
    return ours_first


def _names(containers: list[dict[str, Any]] | None) -> list[str]:
    return [c["name"] for c in containers or []]


def _agent(pod: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [
        c
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        if c["name"] == inject.AGENT_CONTAINER
    ]
    return agent


def _with_own_init(pod: dict[str, Any]) -> dict[str, Any]:
    pod["spec"]["initContainers"] = [{"name": "fetch", "image": "fetch:1"}]
    return pod


def test_sidecar_agent_follows_linkerds_native_proxy_in_either_order() -> None:
    pod = _both_orders(SIDECAR, _linkerd_native, _with_own_init(_pod()))
    inits = pod["spec"]["initContainers"]
    # After the proxy (it reaches the credential endpoint through the mesh), before the
    # pod's own init containers (which may use the credential).
    assert _names(inits) == ["linkerd-init", "linkerd-proxy", inject.AGENT_CONTAINER, "fetch"]
    agent = inits[2]
    assert agent["restartPolicy"] == "Always"  # a native sidecar
    assert agent["startupProbe"]["exec"]["command"] == ["test", "-s", inject.CREDENTIAL_FILE]
    assert agent["args"][:2] == ["agent", "sidecar"]
    assert agent["image"] == Settings().agent_image
    assert agent["resources"]["limits"] == {"memory": "64Mi"}
    assert agent["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {m["name"] for m in agent["volumeMounts"]} == {inject.VOLUME, inject.AGENT_VOLUME}
    assert pod["metadata"]["annotations"][inject.AGENT_INJECTED_ANNOTATION] == "sidecar"
    assert {"name": inject.AGENT_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}} in (
        pod["spec"]["volumes"]
    )
    for app in pod["spec"]["containers"]:
        env = {e["name"]: e["value"] for e in app["env"]}
        assert env["HOME"] == inject.AGENT_DIR
        assert env[inject.ENV_CREDENTIAL_FILE] == inject.CREDENTIAL_FILE
        assert env[inject.ENV_ARCRC] == inject.ARCRC_FILE
        assert {"name": inject.AGENT_VOLUME, "mountPath": inject.AGENT_DIR} in app["volumeMounts"]
    # Linkerd's containers are not touched, nor the pod's own init container.
    assert inits[0] == {"name": "linkerd-init", "image": "init"}
    assert inits[1] == {"name": "linkerd-proxy", "image": "proxy", "restartPolicy": "Always"}
    assert inits[3] == {"name": "fetch", "image": "fetch:1"}


def test_with_a_regular_proxy_the_agent_is_a_container_after_it() -> None:
    pod = _both_orders(SIDECAR, _linkerd, _with_own_init(_pod()))
    # No init container can reach the mesh before a regular proxy starts: the agent runs
    # right after the proxy, and its postStart hook holds the app until the credential is in.
    assert _names(pod["spec"]["containers"]) == [
        "linkerd-proxy", inject.AGENT_CONTAINER, "app", "helper"
    ]  # fmt: skip
    assert _names(pod["spec"]["initContainers"]) == ["fetch", "linkerd-init"]
    agent = pod["spec"]["containers"][1]
    assert "restartPolicy" not in agent and "startupProbe" not in agent
    assert inject.CREDENTIAL_FILE in agent["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert agent["args"][:2] == ["agent", "sidecar"]
    proxy = pod["spec"]["containers"][0]
    assert proxy["env"] == [{"name": "LINKERD2_PROXY_LOG", "value": "warn"}]


def test_init_mode_for_pods_that_run_once() -> None:
    auto = dataclasses.replace(INJECTION, agent=resources.AGENT_AUTO)
    job = _pod()
    job["spec"]["restartPolicy"] = "Never"
    job["metadata"]["ownerReferences"] = [{"kind": "Job", "name": "once"}]
    pod = _both_orders(auto, _linkerd_native, job)
    agent = _agent(pod)
    assert _names(pod["spec"]["initContainers"]).index(inject.AGENT_CONTAINER) == 2
    assert agent["args"][:2] == ["agent", "init"]
    assert "restartPolicy" not in agent and "startupProbe" not in agent
    assert pod["metadata"]["annotations"][inject.AGENT_INJECTED_ANNOTATION] == "init"
    # The same binding gives a Deployment's pod (restartPolicy Always) a sidecar.
    assert _agent(_both_orders(auto, _linkerd_native, _pod()))["args"][1] == "sidecar"


@pytest.mark.parametrize(
    ("binding", "annotation", "expected"),
    [
        (resources.AGENT_SIDECAR, "none", None),  # the pod opts out
        (resources.AGENT_SIDECAR, "NONE", None),
        (resources.AGENT_NONE, "init", "init"),  # the pod opts in
        (resources.AGENT_NONE, "sidecar", "sidecar"),
        (resources.AGENT_SIDECAR, "init", "init"),
        (resources.AGENT_INIT, "", "init"),
        (resources.AGENT_NONE, "", None),
    ],
)
def test_the_pods_annotation_overrides_the_binding(
    binding: resources.AgentMode, annotation: str, expected: str | None
) -> None:
    pod = _pod()
    if annotation:
        pod["metadata"]["annotations"] = {inject.AGENT_ANNOTATION: annotation}
    before = copy.deepcopy(pod)
    dataclasses.replace(INJECTION, agent=binding).apply(pod)
    if expected is None:
        plain = copy.deepcopy(before)
        INJECTION.apply(plain)
        assert pod == plain  # exactly the injection without an agent
        assert inject.AGENT_INJECTED_ANNOTATION not in pod["metadata"].get("annotations", {})
    else:
        assert _agent(pod)["args"][1] == expected


def test_what_the_pod_already_has_is_not_touched() -> None:
    pod = _linkerd_first_with_own_values()
    before = copy.deepcopy(pod)
    SIDECAR.apply(pod)
    app, helper = (c for c in pod["spec"]["containers"] if c["name"] in ("app", "helper"))
    own_app, own_helper = before["spec"]["containers"]
    # The app's own HOME, credential variable and mount at the agent's directory are kept.
    assert app["env"][: len(own_app["env"])] == own_app["env"]
    assert [e["value"] for e in app["env"] if e["name"] == "HOME"] == ["/home/app"]
    assert [e["value"] for e in app["env"] if e["name"] == inject.ENV_CREDENTIAL_FILE] == ["/x"]
    assert [m for m in app["volumeMounts"] if m["mountPath"] == inject.AGENT_DIR] == [
        {"name": "mine", "mountPath": inject.AGENT_DIR}
    ]
    assert helper["env"][:1] == own_helper["env"]
    # The agent runs as the app's own user, so that it can read the 0600 files, and asks
    # the endpoint the app names.
    agent = _agent(pod)
    security = agent["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (1000, 2000)
    agent_env = {e["name"]: e["value"] for e in agent["env"]}
    assert agent_env[inject.ENV_ENDPOINT] == "http://mine:1"
    assert agent_env[inject.ENV_GATEWAY] == INJECTION.gateway_url


def _linkerd_first_with_own_values() -> dict[str, Any]:
    pod = _pod()
    _linkerd_native(pod)
    app = pod["spec"]["containers"][0]
    app["env"] = [
        {"name": "HOME", "value": "/home/app"},
        {"name": "PHABMESH_CREDENTIAL_FILE", "value": "/x"},
        {"name": inject.ENV_ENDPOINT, "value": "http://mine:1"},
    ]
    app["volumeMounts"] = [{"name": "mine", "mountPath": inject.AGENT_DIR}]
    app["securityContext"] = {"runAsUser": 1000, "runAsGroup": 2000}
    pod["spec"]["volumes"] += [
        {"name": "mine", "emptyDir": {}},
    ]
    return pod


def test_a_volume_of_the_agents_name_that_phabmesh_did_not_add_means_no_agent() -> None:
    pod = _pod()
    own = {"name": inject.AGENT_VOLUME, "configMap": {"name": "own"}}
    pod["spec"]["volumes"] = [own]
    SIDECAR.apply(pod)
    plain = _pod()
    plain["spec"]["volumes"] = [copy.deepcopy(own)]
    INJECTION.apply(plain)
    assert pod == plain  # the token volume and variables only; the pod's volume as it was


def test_a_container_of_the_agents_name_that_phabmesh_did_not_add_is_left_alone() -> None:
    pod = _pod()
    own = {"name": inject.AGENT_CONTAINER, "image": "mine:1"}
    pod["spec"]["initContainers"] = [own]
    SIDECAR.apply(pod)
    assert pod["spec"]["initContainers"] == [{"name": inject.AGENT_CONTAINER, "image": "mine:1"}]
    assert inject.AGENT_INJECTED_ANNOTATION not in pod["metadata"].get("annotations", {})
    assert not any(
        m["name"] == inject.AGENT_VOLUME for c in pod["spec"]["containers"]
        for m in c["volumeMounts"]
    )  # fmt: skip


def test_the_agent_asks_for_the_binding_the_pod_names() -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {inject.AGENT_BINDING_ANNOTATION: "deployers"}
    SIDECAR.apply(pod)
    args = _agent(pod)["args"]
    assert args[args.index("--binding") + 1] == "deployers"


def test_several_bindings_take_the_strongest_agent_mode() -> None:
    modes = inject.bindings_agent_mode
    assert modes([]) == resources.AGENT_NONE
    assert modes([_binding()]) == resources.AGENT_NONE
    assert modes([_binding(agent={"mode": "Init"}), _binding()]) == resources.AGENT_INIT
    both = [_binding(agent={"mode": "Init"}), _binding(agent={"mode": "Sidecar"})]
    assert modes(both) == resources.AGENT_SIDECAR
    assert _binding().agent.mode == "None"  # the default: no agent, as before


def test_the_injector_gives_the_bindings_agent_mode() -> None:
    injector = Injector(Settings(), client=None)  # type: ignore[arg-type] # events fed by hand
    injector.bindings._apply(_event("ADDED", "ci", "a", agent={"mode": "Sidecar"}))
    injector.bindings._apply(_event("ADDED", "ci", "b", podSelector={"matchLabels": {"x": "y"}}))
    decided = injector.decide(_pod(), "ci")
    assert decided is not None and decided.agent == resources.AGENT_SIDECAR
    pod = _pod()
    decided.apply(pod)
    assert _agent(pod)["args"][1] == "sidecar"


def test_with_proxy_await_disabled_the_agent_still_follows_the_proxy() -> None:
    def linkerd_no_await(pod: dict[str, Any]) -> None:
        """Linkerd with config.linkerd.io/proxy-await: disabled: the proxy goes last."""
        pod["metadata"].setdefault("annotations", {})["config.linkerd.io/proxy-await"] = "disabled"
        pod["spec"]["containers"].append({"name": "linkerd-proxy", "image": "proxy"})

    pod = _both_orders(SIDECAR, linkerd_no_await, _pod())
    # Nothing holds the app containers for the proxy, so nothing can hold them for the
    # agent either (it would wait on a proxy that starts after it): it comes after the proxy.
    assert _names(pod["spec"]["containers"]) == [
        "app", "helper", "linkerd-proxy", inject.AGENT_CONTAINER
    ]  # fmt: skip


def test_the_agent_runs_as_the_apps_user_or_inherits_the_pods() -> None:
    own = _linkerd_first_with_own_values()
    SIDECAR.apply(own)
    assert _agent(own)["securityContext"]["runAsUser"] == 1000
    # Set on the pod only: every container inherits it, the agent included (not repeated).
    pod_level = _pod()
    pod_level["spec"]["securityContext"] = {"runAsUser": 1234}
    SIDECAR.apply(pod_level)
    assert "runAsUser" not in _agent(pod_level)["securityContext"]
    assert pod_level["spec"]["securityContext"] == {"runAsUser": 1234}


def test_the_agent_passes_pod_security_restricted() -> None:
    """Every field `restricted` checks on a container, set on the agent in each mode."""
    for injection in (SIDECAR, dataclasses.replace(SIDECAR, agent=resources.AGENT_INIT)):
        pod = _pod()
        injection.apply(pod)
        security = _agent(pod)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert "runAsUser" not in security  # the image's user (65532), or the pod's


def test_an_app_that_runs_as_root_keeps_a_root_agent_beside_it() -> None:
    """runAsNonRoot with runAsUser 0 would never start: the agent follows the app's choice."""
    for where in ("container", "pod"):
        pod = _pod()
        target = pod["spec"]["containers"][0] if where == "container" else pod["spec"]
        target["securityContext"] = {"runAsUser": 0}
        SIDECAR.apply(pod)
        security = _agent(pod)["securityContext"]
        assert "runAsNonRoot" not in security, where
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}


def _annotated(**annotations: str) -> dict[str, Any]:
    pod = _pod()
    pod["metadata"]["annotations"] = {f"phabmesh.io/{k.replace('_', '-')}": v
                                      for k, v in annotations.items()}  # fmt: skip
    return pod


def test_a_pods_annotations_set_the_agents_resources_and_user() -> None:
    sidecar = dataclasses.replace(INJECTION, agent=resources.AGENT_SIDECAR)
    pod = _annotated(
        agent_requests_mem="48Mi", agent_limits_mem="", agent_limits_cpu="200m",
        agent_run_as_user="1000", agent_run_as_group="3000",
    )  # fmt: skip
    sidecar.apply(pod)
    agent = _agent(pod)
    assert agent["resources"] == {
        "requests": {"cpu": "5m", "memory": "48Mi"},  # the default's cpu kept
        "limits": {"cpu": "200m"},  # the memory limit lifted (empty)
    }
    assert agent["securityContext"]["runAsUser"] == 1000
    assert agent["securityContext"]["runAsGroup"] == 3000
    assert agent["securityContext"]["runAsNonRoot"] is True
    # Over the app's own user, and root by choice drops runAsNonRoot (it could not start).
    root = _annotated(agent_run_as_user="0")
    root["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
    sidecar.apply(root)
    assert _agent(root)["securityContext"]["runAsUser"] == 0
    assert "runAsNonRoot" not in _agent(root)["securityContext"]


def test_the_settings_give_the_agents_default_resources() -> None:
    custom = inject.injection_from(Settings(agent_limits_cpu="1", agent_requests_memory="64Mi"))
    pod = _pod()
    dataclasses.replace(custom, agent=resources.AGENT_INIT).apply(pod)
    assert _agent(pod)["resources"] == {
        "requests": {"cpu": "5m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "64Mi"},
    }
    for wrong, named in (
        ({"agent_limits_memory": "64MB"}, "PHABMESH_AGENT_LIMITS_MEMORY: not a quantity: '64MB'"),
        ({"agent_requests_cpu": "2", "agent_limits_cpu": "1"},
         "PHABMESH_AGENT_REQUESTS_CPU: 2 is more than the cpu limit 1 (PHABMESH_AGENT_LIMITS_CPU)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(named)):
            Settings(**wrong)


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"agent": "sidcar"}, "phabmesh.io/agent: 'sidcar' is not one of none, sidecar, init"),
        ({"agent_limits_mem": "64MB"},
         "phabmesh.io/agent-limits-mem: not a quantity: '64MB' (use e.g. 64Mi"),
        ({"agent_requests_cpu": "-1"}, "phabmesh.io/agent-requests-cpu: not a quantity: '-1'"),
        ({"agent_requests_mem": "128Mi"},
         "phabmesh.io/agent-requests-mem: 128Mi is more than the memory limit 64Mi "
         "(PHABMESH_AGENT_LIMITS_MEMORY)"),
        ({"agent_requests_mem": "1Gi", "agent_limits_mem": "512Mi"},
         "phabmesh.io/agent-requests-mem: 1Gi is more than the memory limit 512Mi "
         "(phabmesh.io/agent-limits-mem)"),
        ({"agent_run_as_user": "app"}, "phabmesh.io/agent-run-as-user: 'app' is not a numeric id"),
        ({"agent_run_as_group": "4294967296"}, "phabmesh.io/agent-run-as-group: '4294967296'"),
        ({"agent_run_as_user": "\u0661\u0662"}, "phabmesh.io/agent-run-as-user: '\u0661\u0662'"),
        ({"agent_limits_mem": "6" * 100_000}, "phabmesh.io/agent-limits-mem: not a quantity: '666"),
    ],
)  # fmt: skip
def test_a_wrong_agent_annotation_is_named(annotations: dict[str, str], message: str) -> None:
    pod = _annotated(**annotations)
    sidecar = dataclasses.replace(INJECTION, agent=resources.AGENT_SIDECAR)
    with pytest.raises(inject.InvalidAnnotation, match=re.escape(message)):
        sidecar.check(pod)
    with pytest.raises(inject.InvalidAnnotation, match=re.escape(message)):
        sidecar.apply(copy.deepcopy(pod))


def test_agent_annotations_matter_only_where_an_agent_is_added() -> None:
    pod = _annotated(agent_limits_mem="64MB", agent_run_as_user="app")
    INJECTION.check(pod)  # no agent asked: the annotations are not read
    opted_out = _annotated(agent="none", agent_limits_mem="64MB")
    dataclasses.replace(INJECTION, agent=resources.AGENT_SIDECAR).check(opted_out)
