"""What the pod-injection webhook adds to a pod, and to which pods. Pure: no I/O.

A pod is injected when a PhabricatorBinding in its namespace names its service
account (and its ``podSelector``, if any, selects the pod's labels). It then gets:

- a projected service-account token volume (audience ``phabmesh.io`` by default,
  short expiry, refreshed by the kubelet) mounted read-only in every app container
  at :data:`MOUNT_DIR`;
- environment variables telling clients where the credential endpoint and the
  gateway are, and where the token file is.

When the binding's ``spec.agent.mode`` or the pod's annotation ``phabmesh.io/agent``
asks for it, the pod also gets the credential agent (``phabmesh agent``, docs/agent.md):
a container of the phabmesh image that exchanges the token for a credential and writes
it, with an ``.arcrc`` for the gateway, into an emptyDir that every app container
mounts at :data:`AGENT_DIR` (``HOME`` points there unless the container sets it):

- sidecar: a native sidecar (an init container with ``restartPolicy: Always``) whose
  startup probe passes once the credential is written, so the app containers start
  with it in place; it keeps the credential fresh;
- init: an init container that writes one credential and exits (Jobs, one-shot pods).

The agent reaches the credential endpoint through Linkerd's proxy, so it is placed
after it: right after ``linkerd-proxy`` when the proxy is a native sidecar (or at the
front of the init containers before Linkerd has run: Linkerd puts its own in front);
when the proxy is a regular container, no init container can reach the mesh, and the
agent becomes a regular container right after the proxy (whose ``proxy-await`` hook
holds the next containers until it is ready), with a ``postStart`` hook that holds the
app containers until the credential is written. The agent is re-placed on every call
(the webhook is called again after Linkerd's injector), so either order gives one pod.

Nothing else in the pod changes. Values the pod already sets are kept (an env var
of the same name, a volume or mount of the same name or path, a container of the
agent's name that phabmesh did not add), so applying the injection twice, or before
or after Linkerd's own injector, gives the same pod: Linkerd's containers
(``linkerd-proxy``, ``linkerd-init``, ``linkerd-network-validator``) and init
containers are never touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from phabmesh import identity, matching, resources

# The credential agent (docs/agent.md).
AGENT_CONTAINER = "phabmesh-agent"
AGENT_VOLUME = "phabmesh-agent"
AGENT_DIR = "/var/run/phabmesh"
CREDENTIAL_FILE = f"{AGENT_DIR}/credential"
ARCRC_FILE = f"{AGENT_DIR}/.arcrc"
ENV_CREDENTIAL_FILE = "PHABMESH_CREDENTIAL_FILE"
ENV_ARCRC = "PHABMESH_ARCRC"
# A pod's choice, over its binding's: sidecar, init, auto or none.
AGENT_ANNOTATION = "phabmesh.io/agent"
# Which binding the agent asks for, when several grant the pod a credential.
AGENT_BINDING_ANNOTATION = "phabmesh.io/agent-binding"
# Set by the webhook with the agent it added (sidecar or init): the agent container is
# phabmesh's to re-place only when the pod carries it.
AGENT_INJECTED_ANNOTATION = "phabmesh.io/agent-injected"
LINKERD_PROXY = "linkerd-proxy"
# A pod's own requests and limits for the agent, over the settings' (PHABMESH_AGENT_*), by
# the Vault agent injector's names: a quantity, or empty for none.
RESOURCE_ANNOTATIONS = {
    ("requests", "cpu"): "phabmesh.io/agent-requests-cpu",
    ("requests", "memory"): "phabmesh.io/agent-requests-mem",
    ("limits", "cpu"): "phabmesh.io/agent-limits-cpu",
    ("limits", "memory"): "phabmesh.io/agent-limits-mem",
}
# The user and group the agent runs as, over the app's (the agent's files are the owner's).
RUN_AS_ANNOTATIONS = {
    "runAsUser": "phabmesh.io/agent-run-as-user",
    "runAsGroup": "phabmesh.io/agent-run-as-group",
}
MAX_ID = 2**31 - 1  # a Linux user or group id Kubernetes accepts
# How long a regular-container agent's postStart hook holds the app containers (seconds).
AGENT_HOLD_SECONDS = 300
_MODES = {
    "none": resources.AGENT_NONE,
    "sidecar": resources.AGENT_SIDECAR,
    "init": resources.AGENT_INIT,
    "auto": resources.AGENT_AUTO,
}
# Among several bindings naming a pod, the first of these that one of them asks for.
_PREFERENCE = (resources.AGENT_SIDECAR, resources.AGENT_AUTO, resources.AGENT_INIT)

VOLUME = "phabmesh-token"
MOUNT_DIR = "/var/run/secrets/phabmesh.io/serviceaccount"
TOKEN_FILE = f"{MOUNT_DIR}/token"
ENV_ENDPOINT = "PHABMESH_CREDENTIAL_ENDPOINT"
ENV_GATEWAY = "PHABMESH_GATEWAY_URL"
ENV_TOKEN_FILE = "PHABMESH_TOKEN_FILE"  # noqa: S105 - a variable's name
# A pod labelled ``phabmesh.io/inject: disabled`` is left alone (so is every pod in a
# namespace labelled so: the webhook configuration's selectors skip both).
OPT_OUT_LABEL = "phabmesh.io/inject"
OPT_OUT_VALUE = "disabled"
# Never injected, whatever the webhook configuration's namespaceSelector says.
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
LINKERD_CONTAINERS = frozenset({"linkerd-proxy", "linkerd-init", "linkerd-network-validator"})
MIN_TOKEN_SECONDS = 600  # the API server's floor for projected token expiry

# Why a pod was or was not injected (a label value on the metric and in the log).
INJECTED = "Injected"
INVALID_ANNOTATION = "InvalidAnnotation"  # refused: a phabmesh annotation's value is wrong
SYSTEM_NAMESPACE = "SystemNamespace"
OPTED_OUT = "OptedOut"
NOT_BOUND = "NotBound"


class InvalidAnnotation(ValueError):
    """A bound pod's phabmesh annotation that the webhook refuses; the message names it,
    its value and what it takes."""


@dataclasses.dataclass(frozen=True)
class Injection:
    """The volume, mounts and variables one pod gets, and the agent if ``agent`` says so."""

    audience: str
    expiration_seconds: int
    credential_endpoint: str
    gateway_url: str
    agent_image: str = "phabmesh"
    agent: resources.AgentMode = resources.AGENT_NONE
    # The agent's requests and limits, (requests|limits, cpu|memory) → quantity or "" for
    # none, and → the setting that gave it (Settings.agent_resources).
    agent_quantities: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    agent_sources: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)

    def volume(self) -> dict[str, Any]:
        return {
            "name": VOLUME,
            "projected": {
                "defaultMode": 0o444,
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": self.audience,
                            "expirationSeconds": self.expiration_seconds,
                            "path": "token",
                        }
                    }
                ],
            },
        }

    def env(self) -> list[dict[str, str]]:
        return [
            {"name": ENV_ENDPOINT, "value": self.credential_endpoint},
            {"name": ENV_GATEWAY, "value": self.gateway_url},
            {"name": ENV_TOKEN_FILE, "value": TOKEN_FILE},
        ]

    def apply(self, pod: dict[str, Any]) -> None:
        """Add what is missing to ``pod`` in place; a second call changes nothing."""
        spec = pod.setdefault("spec", {})
        volumes = spec.setdefault("volumes", [])
        if not any(v.get("name") == VOLUME for v in volumes):
            volumes.append(self.volume())
        mode = agent_mode(pod, self.agent)
        if mode != resources.AGENT_NONE and not _place_agent(pod, self, mode):
            mode = resources.AGENT_NONE  # a container or volume of its name that is not ours
        for container in spec.get("containers") or []:
            if container.get("name") in LINKERD_CONTAINERS or _ours(pod, container):
                continue
            _add_mount(container, VOLUME, MOUNT_DIR, read_only=True)
            _add_env(container, self.env())
            if mode != resources.AGENT_NONE:
                _add_mount(container, AGENT_VOLUME, AGENT_DIR, read_only=False)
                _add_env(container, self.app_env())

    def check(self, pod: Mapping[str, Any]) -> None:
        """Raise :class:`InvalidAnnotation` for a phabmesh annotation of ``pod`` that is
        wrong, as this injection would read it."""
        if agent_mode(pod, self.agent) != resources.AGENT_NONE:
            self.resources_for(pod)
            run_as(pod)

    def resources_for(self, pod: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """The agent's requests and limits: the defaults, with the pod's annotations over
        them."""
        annotations = _annotations(pod)
        values, names = dict(self.agent_quantities), dict(self.agent_sources)
        for key, annotation in RESOURCE_ANNOTATIONS.items():
            if annotation in annotations:
                values[key] = str(annotations[annotation]).strip()
                names[key] = annotation
        try:
            return resources.container_resources(values, names)
        except ValueError as exc:
            raise InvalidAnnotation(str(exc)) from None

    def app_env(self) -> list[dict[str, str]]:
        """What an app container beside the agent is told (docs/agent.md)."""
        return [
            {"name": ENV_CREDENTIAL_FILE, "value": CREDENTIAL_FILE},
            {"name": ENV_ARCRC, "value": ARCRC_FILE},
            # arc, phabfive, the phabricator package and canduit read ~/.arcrc.
            {"name": "HOME", "value": AGENT_DIR},
        ]

    def agent_container(
        self, mode: resources.AgentMode, pod: Mapping[str, Any], *, regular: bool
    ) -> dict[str, Any]:
        """The agent's container: ``mode`` Sidecar or Init; ``regular`` when it must run
        among the app containers (Linkerd's proxy is a regular container)."""
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        args = ["agent", "sidecar" if mode == resources.AGENT_SIDECAR or regular else "init"]
        args += ["--dir", AGENT_DIR]
        binding = annotations.get(AGENT_BINDING_ANNOTATION)
        if binding:
            args += ["--binding", str(binding)]
        # What Pod Security's `restricted` profile asks of every container: a pod that
        # passes it without the agent passes it with the agent.
        security: dict[str, Any] = {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        # The files are readable by their owner only (clients such as phabfive refuse an
        # .arcrc others may read): run as the app's user when it has one of its own (else
        # the pod's, inherited; docs/agent.md says to set one). Without either, the image's
        # user (65532) runs it.
        app = _first_app(pod)
        for key in ("runAsUser", "runAsGroup"):
            value = ((app or {}).get("securityContext") or {}).get(key)
            if value is not None:
                security[key] = value
        security.update(run_as(pod))
        pod_user = ((pod.get("spec") or {}).get("securityContext") or {}).get("runAsUser")
        if security.get("runAsUser", pod_user) == 0:
            # An app that runs as root by choice (no `restricted` pod): the agent runs as
            # root beside it, or its owner-only files would be out of the app's reach.
            del security["runAsNonRoot"]
        # Where the app's own settings point elsewhere (its own endpoint or gateway), the
        # agent follows them.
        own = {e.get("name"): e for e in (app or {}).get("env") or [] if "value" in e}
        env = [dict(own.get(e["name"]) or e) for e in self.env()]
        container: dict[str, Any] = {
            "name": AGENT_CONTAINER,
            "image": self.agent_image,
            "args": args,
            "env": env,
            "resources": self.resources_for(pod),
            "securityContext": security,
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [
                {"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": True},
                {"name": AGENT_VOLUME, "mountPath": AGENT_DIR},
            ],
        }
        ready = ["test", "-s", CREDENTIAL_FILE]
        if regular:
            hold = (
                f"i=0; until test -s {CREDENTIAL_FILE}; do i=$((i+1)); "
                f"[ $i -gt {AGENT_HOLD_SECONDS * 5} ] && exit 1; sleep 0.2; done"
            )
            container["lifecycle"] = {"postStart": {"exec": {"command": ["sh", "-c", hold]}}}
        elif mode == resources.AGENT_SIDECAR:
            container["restartPolicy"] = "Always"
            container["startupProbe"] = {
                "exec": {"command": ready},
                "periodSeconds": 1,
                "failureThreshold": AGENT_HOLD_SECONDS,
            }
        return container


def _add_mount(container: dict[str, Any], name: str, path: str, *, read_only: bool) -> None:
    mounts = container.setdefault("volumeMounts", [])
    if not any(m.get("name") == name or m.get("mountPath") == path for m in mounts):
        mount: dict[str, Any] = {"name": name, "mountPath": path}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)


def _add_env(container: dict[str, Any], wanted: list[dict[str, str]]) -> None:
    env = container.setdefault("env", [])
    present = {e.get("name") for e in env}
    env.extend(e for e in wanted if e["name"] not in present)


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def _ours(pod: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    """Is ``container`` the agent phabmesh added to ``pod``?"""
    return container.get("name") == AGENT_CONTAINER and AGENT_INJECTED_ANNOTATION in _annotations(
        pod
    )


def _first_app(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") not in LINKERD_CONTAINERS and not _ours(pod, container):
            return dict(container)
    return None


def run_as(pod: Mapping[str, Any]) -> dict[str, int]:
    """The agent's ``runAsUser``/``runAsGroup`` that the pod's annotations ask for."""
    wanted: dict[str, int] = {}
    for key, annotation in RUN_AS_ANNOTATIONS.items():
        text = str(_annotations(pod).get(annotation, "")).strip()
        if not text:
            continue
        if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
            raise InvalidAnnotation(
                f"{annotation}: {text[:64]!r} is not a numeric id from 0 to {MAX_ID} "
                "(the user the app runs as, e.g. 1000)"
            )
        wanted[key] = int(text)
    return wanted


def agent_mode(pod: Mapping[str, Any], bindings_mode: resources.AgentMode) -> resources.AgentMode:
    """Sidecar, Init or None for ``pod``: its annotation, else its bindings' mode; Auto is
    Init for a pod that runs once (restartPolicy Never or OnFailure), Sidecar otherwise."""
    asked = str(_annotations(pod).get(AGENT_ANNOTATION, "")).strip().lower()
    if asked and asked not in _MODES:
        raise InvalidAnnotation(
            f"{AGENT_ANNOTATION}: {asked[:64]!r} is not one of {', '.join(_MODES)}"
        )
    mode = _MODES.get(asked, bindings_mode)
    if mode == resources.AGENT_AUTO:
        once = (pod.get("spec") or {}).get("restartPolicy") in ("Never", "OnFailure")
        mode = resources.AGENT_INIT if once else resources.AGENT_SIDECAR
    return mode


def bindings_agent_mode(specs: Iterable[resources.BindingSpec]) -> resources.AgentMode:
    """The agent mode several bindings naming one pod ask for (see :data:`_PREFERENCE`)."""
    asked = {spec.agent.mode for spec in specs}
    return next((mode for mode in _PREFERENCE if mode in asked), resources.AGENT_NONE)


def _place_agent(pod: dict[str, Any], injection: Injection, mode: resources.AgentMode) -> bool:
    """Put the agent in its place for the pod as it is now (removing phabmesh's earlier one);
    False, changing nothing, when a container or volume of its name is not phabmesh's."""
    spec = pod["spec"]
    inits: list[dict[str, Any]] = spec.get("initContainers") or []
    containers: list[dict[str, Any]] = spec.setdefault("containers", [])
    named = [c for c in [*inits, *containers] if c.get("name") == AGENT_CONTAINER]
    if named and not all(_ours(pod, c) for c in named):
        return False
    volumes = spec.get("volumes") or []
    if AGENT_INJECTED_ANNOTATION not in _annotations(pod) and any(
        v.get("name") == AGENT_VOLUME for v in volumes
    ):
        return False  # the pod's own volume of that name
    inits = [c for c in inits if c.get("name") != AGENT_CONTAINER]
    containers[:] = [c for c in containers if c.get("name") != AGENT_CONTAINER]
    init_names = [c.get("name") for c in inits]
    names = [c.get("name") for c in containers]
    regular = LINKERD_PROXY in names and LINKERD_PROXY not in init_names
    agent = injection.agent_container(mode, pod, regular=regular)
    if regular:
        containers.insert(names.index(LINKERD_PROXY) + 1, agent)
    else:
        # After Linkerd's init containers (and its proxy), before the pod's own.
        linkerd = [i for i, name in enumerate(init_names) if name in LINKERD_CONTAINERS]
        inits.insert(max(linkerd) + 1 if linkerd else 0, agent)
    if inits:
        spec["initContainers"] = inits
    else:  # the agent moved out (an empty list is no list to the API server)
        spec.pop("initContainers", None)
    if not any(v.get("name") == AGENT_VOLUME for v in spec.setdefault("volumes", [])):
        spec["volumes"].append(
            {"name": AGENT_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}
        )
    meta = pod.setdefault("metadata", {})
    annotations = meta.get("annotations") or {}
    meta["annotations"] = {**annotations, AGENT_INJECTED_ANNOTATION: args_mode(agent)}
    return True


def args_mode(container: Mapping[str, Any]) -> str:
    """sidecar or init: what an agent container runs as."""
    return str(container["args"][1])


def injection_from(settings: Any) -> Injection:
    """The injection a :class:`~phabmesh.settings.Settings` describes."""
    quantities, sources = settings.agent_resources()
    return Injection(
        audience=settings.token_audience,
        expiration_seconds=max(MIN_TOKEN_SECONDS, int(settings.injected_token_ttl)),
        credential_endpoint=settings.injected_credential_endpoint,
        gateway_url=settings.injected_gateway_url,
        agent_image=settings.agent_image,
        agent_quantities=quantities,
        agent_sources=sources,
    )


def reason_for(
    pod: Mapping[str, Any],
    namespace: str,
    bindings: Iterable[resources.BindingSpec],
    *,
    skip_namespaces: frozenset[str] = SYSTEM_NAMESPACES,
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> str:
    """:data:`INJECTED` or why not, for a pod being created in ``namespace``.

    ``bindings`` are the specs of the bindings in that namespace.
    """
    if namespace in skip_namespaces:
        return SYSTEM_NAMESPACE
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(OPT_OUT_LABEL) == OPT_OUT_VALUE:
        return OPTED_OUT
    return INJECTED if naming_bindings(pod, namespace, bindings, naming) else NOT_BOUND


def naming_bindings(
    pod: Mapping[str, Any],
    namespace: str,
    bindings: Iterable[resources.BindingSpec],
    naming: identity.Naming = identity.DEFAULT_NAMING,
) -> list[resources.BindingSpec]:
    """The bindings (of ``namespace``) whose subjects and selector take ``pod``."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    service_account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    return [
        spec
        for spec in bindings
        if matching.subjects_match(spec, namespace, service_account, naming)
        and matching.selector_matches(spec.pod_selector, labels)
    ]
