"""``phabmesh run``: the whole story on one machine, in plain words.

With a cluster configured (``$KUBECONFIG``, ``~/.kube/config`` or in-cluster), it
runs the operator and the gateway as local processes against it. Without one,
it starts a local control plane and walks through the quick start: a Conduit
test server with a demo bot stands in for Phabricator, the samples are applied,
a meshed pod runs on a simulated node (KWOK), its credential is exchanged,
a Conduit call goes through the gateway, the pod is scaled down, and the same
credential is refused.

The local control plane has no Linkerd, so by default the quick start runs with
``PHABMESH_REQUIRE_CLIENT_ID`` off. ``phabmesh run --require-client-id`` runs it on, as
the chart ships it: a call without ``l5d-client-id`` is refused, and the quick start then
plays the part of the serving pod's Linkerd proxy, sending the header (the pod's identity)
from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml

from phabmesh import admission, resources, serving
from phabmesh.admission import inject
from phabmesh.dev import devcluster
from phabmesh.kube import Conflict, KubeClient, load_connection
from phabmesh.kube.client import JSON, KubeError, NotFound
from phabmesh.resources import resource_path
from phabmesh.settings import Settings, warn_deprecated

T = TypeVar("T")
SYSTEM = "phabmesh-system"
DEMO_NAMESPACE = "ci"
DEMO_BOT = "ci-bot"
CLIENT_ID_HEADER = "l5d-client-id"


class Say:
    """Numbered steps on stdout."""

    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.n = 0

    def step(self, text: str) -> None:
        self.n += 1
        self.out(f"\n[{self.n}] {text}")

    def detail(self, text: str) -> None:
        self.out(f"    {text}")


async def wait_for(
    predicate: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def repo_file(*parts: str) -> Path:
    root = devcluster.repo_root()
    if root is None:
        raise RuntimeError("run from a phabmesh checkout (the samples and CRDs live there)")
    return root.joinpath(*parts)


@contextlib.asynccontextmanager
async def running(process: Any) -> AsyncIterator[Any]:
    """Start a phabmesh process (OperatorProcess, GatewayProcess) in this event loop."""
    await process.start()
    try:
        yield process
    finally:
        await process.stop()


def _ready(obj: JSON) -> JSON | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready" and cond.get("status") == "True":
            return dict(cond)
    return None


async def demo(
    plane: devcluster.ControlPlane,
    say: Say,
    *,
    require_client_id: bool = False,
    linger: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The quick start on a running control plane. Returns what it observed.

    ``linger``: awaited after the story with everything still running (the operator, the
    gateway, the Conduit test server), so that what the story made can be explored.

    ``require_client_id``: run with ``PHABMESH_REQUIRE_CLIENT_ID`` on, sending
    ``l5d-client-id`` as Linkerd's inbound proxy would.
    """
    from phabmesh.dev.conduit import ConduitServer
    from phabmesh.processes.gateway import GatewayProcess
    from phabmesh.processes.operator import OperatorProcess

    seen: dict[str, Any] = {}
    kube = KubeClient(load_connection(str(plane.kubeconfig)))
    http = aiohttp.ClientSession()
    try:
        say.step("Installing the CRDs (kubectl apply -f crds/)")
        crds = str(repo_file("crds"))
        plane.kubectl("apply", "--server-side", "-f", crds)
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crds)
        with contextlib.suppress(Conflict):
            await kube.create(
                resource_path("", "v1", "namespaces"),
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}},
            )

        say.step("Starting a Conduit test server standing in for Phabricator, with bot ci-bot")
        async with ConduitServer() as conduit:
            conduit.add_user(DEMO_BOT, bot=True, real_name="CI Bot")
            token = conduit.add_token(DEMO_BOT)
            seen["secrets"] = [token]  # for tests that check nothing secret was logged
            say.detail(f"Phabricator (test server) at {conduit.url}")
            await kube.create(
                resource_path("", "v1", "secrets", SYSTEM),
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "ci-bot-token"},
                    "data": {"token": base64.b64encode(token.encode()).decode()},
                },
            )
            say.detail("the bot's Conduit token is in Secret phabmesh-system/ci-bot-token")
            # The injection webhook's port is chosen now, so that its configuration
            # (manifests/webhook.yaml, pointed at 127.0.0.1) is in place when the
            # operator starts and fills in its caBundle.
            webhook_port = serving.free_port("127.0.0.1")
            settings = Settings.local(
                conduit.url,
                namespace=SYSTEM,
                webhook_port=webhook_port,
                require_client_id=require_client_id,
            )
            webhook_url = _point_webhook(plane, webhook_port)
            say.step("Applying phabmesh's ServiceAccounts and RBAC (manifests/rbac-*.yaml)")
            plane.install_rbac(repo_file("manifests"))
            as_operator = str(plane.service_account_kubeconfig(SYSTEM, "phabmesh-operator"))
            as_gateway = str(plane.service_account_kubeconfig(SYSTEM, "phabmesh-gateway"))
            say.detail("each runs as its own ServiceAccount, with a token from TokenRequest")
            say.step("Starting the operator (controller + credential endpoint) and the gateway")
            async with (
                running(OperatorProcess(settings, kubeconfig=as_operator)) as operator,
                running(GatewayProcess(settings, kubeconfig=as_gateway)) as gateway,
            ):
                await wait_for(_true(operator.ready), "the operator", 60)
                await wait_for(_true(lambda: gateway.state.ready), "the gateway", 60)
                issuer_url = f"http://127.0.0.1:{operator.endpoint_port}"
                gateway_url = f"http://127.0.0.1:{gateway.port}"
                say.detail(f"credential endpoint {issuer_url}, gateway {gateway_url}")
                say.detail(f"pod injection webhook {webhook_url} (manifests/webhook.yaml)")
                if require_client_id:
                    say.detail(
                        "PHABMESH_REQUIRE_CLIENT_ID=true, as the chart ships it: only calls "
                        f"with {CLIENT_ID_HEADER} from the serving pod's Linkerd proxy count"
                    )
                else:
                    say.detail(
                        "PHABMESH_REQUIRE_CLIENT_ID=false: this control plane has no Linkerd "
                        f"to set {CLIENT_ID_HEADER} (the chart turns it on; "
                        "`phabmesh run --require-client-id` shows it on)"
                    )
                seen["require_client_id"] = require_client_id
                await _story(plane, kube, http, issuer_url, gateway_url, say, seen)
                if linger is not None:
                    await linger()
    finally:
        await http.close()
        await kube.close()
    return seen


def _point_webhook(plane: devcluster.ControlPlane, port: int) -> str:
    """manifests/webhook.yaml applied, calling the operator on 127.0.0.1:``port`` (the local
    control plane reaches no Service); its URL."""
    url = f"https://127.0.0.1:{port}/inject"
    configuration = yaml.safe_load(repo_file("manifests", "webhook.yaml").read_text())
    plane.kubectl(
        "apply", "--server-side", "-f", "-",
        input=json.dumps(admission.pointed_at(configuration, url)),
    )  # fmt: skip
    return url


def _true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return check()

    return probe


async def _story(
    plane: devcluster.ControlPlane,
    kube: KubeClient,
    http: aiohttp.ClientSession,
    issuer_url: str,
    gateway_url: str,
    say: Say,
    seen: dict[str, Any],
) -> None:
    say.step("Applying the samples: bot ci-bot, namespace ci, binding ci-runners")
    plane.kubectl("apply", "-f", str(repo_file("manifests", "samples", "demo.yaml")))
    bot_path = resources.bot_path(DEMO_BOT)
    ready = await wait_for(lambda: _get_ready(kube, bot_path), "bot Ready")
    say.detail(f"PhabricatorBot ci-bot: Ready ({ready['reason']}: {ready['message']})")
    binding_path = resources.binding_path(DEMO_NAMESPACE, "ci-runners")
    ready = await wait_for(lambda: _get_ready(kube, binding_path), "binding Ready")
    say.detail(f"PhabricatorBinding ci/ci-runners: Ready ({ready['message']})")

    say.step("Starting a meshed pod ci/ci-runner-0 (Linkerd proxy as native sidecar)")
    pod = await _meshed_pod(kube)
    say.detail(
        f"scheduled on {pod['spec']['nodeName']}, a node KWOK simulates: "
        f"Running, pod IP {pod['status']['podIP']}"
    )
    audience = _injected_audience(pod)
    seen["injected"] = audience is not None
    if audience is None:
        raise RuntimeError("the injection webhook did not add the projected token volume")
    (runner,) = pod["spec"]["containers"]
    names = ", ".join(e["name"] for e in runner.get("env") or [])
    say.detail(
        f"the injection webhook added volume {inject.VOLUME} (projected token, "
        f"audience {audience}) and {names} to container runner"
    )
    agent = _injected_agent(pod, say, seen)
    lease = await wait_for(lambda: _active_lease(kube), "the lease")
    seen["lease"] = lease["metadata"]["name"]
    say.detail(
        f"PhabricatorCredential {lease['metadata']['name']} is Active, "
        f"expires {lease['status']['expiresAt']}"
    )

    say.step("The pod exchanges its projected service-account token for a credential")
    sa_token = await kube.pod_token(DEMO_NAMESPACE, "ci-runner", pod, audience=audience)
    seen["secrets"].append(sa_token)
    issued, mesh = await _exchange(http, issuer_url, sa_token, lease, say, seen)
    credential = issued["credential"]
    seen["secrets"].append(credential)
    seen["format"] = issued["format"]
    say.detail(
        f"credential for {issued['identity']} (bot {issued['bot']}), "
        f"valid until {issued['expiresAt']}, format {issued['format']} "
        "(shaped like a Phorge API token: any Conduit client takes it)"
    )

    say.step("Calling Conduit through the gateway: user.whoami, as curl would")
    answer = await _whoami(http, gateway_url, credential, mesh)
    seen["whoami"] = answer
    say.detail(
        f"Phabricator says: userName={answer['result']['userName']}, "
        f"phid={answer['result']['phid']}"
    )

    if mesh:
        say.detail(
            "(the credential agent's calls go through its pod's Linkerd proxy, which this "
            "control plane lacks: not run here)"
        )
    else:
        await _agent(agent, sa_token, issuer_url, gateway_url, http, say, seen)

    say.step("Scaling down: the pod is deleted")
    await kube.delete(
        resource_path("", "v1", "pods", DEMO_NAMESPACE, pod["metadata"]["name"]),
        body={"gracePeriodSeconds": 0},
    )

    async def revoked() -> bool:
        return await _active_lease(kube) is None

    await wait_for(revoked, "the lease to be revoked")
    say.detail("its PhabricatorCredential was revoked and removed")

    say.step("The same credential, once more through the gateway")

    async def refusal() -> JSON | None:
        answer = await _whoami(http, gateway_url, credential, mesh)
        return answer if answer.get("error_code") else None

    refused = await wait_for(refusal, "the gateway to refuse")
    seen["refused"] = refused
    say.detail(f"refused: {refused['error_code']}: {refused['error_info']}")


async def _exchange(
    http: aiohttp.ClientSession,
    issuer_url: str,
    sa_token: str,
    lease: JSON,
    say: Say,
    seen: dict[str, Any],
) -> tuple[JSON, dict[str, str]]:
    """The credential exchange, and the headers every later call carries: with
    PHABMESH_REQUIRE_CLIENT_ID on, ``l5d-client-id`` as Linkerd's inbound proxy sets it,
    after showing the refusal of a call without it."""
    headers = {"Authorization": f"Bearer {sa_token}"}
    mesh: dict[str, str] = {}
    if seen["require_client_id"]:
        async with http.post(f"{issuer_url}/v1/credentials", headers=headers) as resp:
            seen["unmeshed"] = {"status": resp.status, **await resp.json()}
        say.detail(
            f"without {CLIENT_ID_HEADER}, as from a pod Linkerd does not mesh: "
            f"{resp.status} {seen['unmeshed']['error']}: {seen['unmeshed']['message']}"
        )
        mesh = {CLIENT_ID_HEADER: lease["spec"]["identity"]}
        say.detail(
            f"with {CLIENT_ID_HEADER}: {mesh[CLIENT_ID_HEADER]}, the pod's mTLS identity, as "
            "the endpoint pod's Linkerd proxy sets it (sent here from 127.0.0.1, where the "
            "proxy connects from)"
        )
    async with http.post(f"{issuer_url}/v1/credentials", headers={**headers, **mesh}) as resp:
        issued: JSON = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"credential refused: {issued}")
    return issued, mesh


def _injected_agent(pod: JSON, say: Say, seen: dict[str, Any]) -> JSON | None:
    """The credential agent the webhook added to ``pod``, if any (demo.yaml asks for it)."""
    inits = pod["spec"].get("initContainers") or []
    agent: JSON | None = next((c for c in inits if c["name"] == inject.AGENT_CONTAINER), None)
    seen["agent"] = agent["args"][1] if agent else None
    if agent is not None:
        say.detail(
            f"and the credential agent ({inject.AGENT_CONTAINER}, {seen['agent']}, as the "
            "binding's agent mode Auto gives a pod that keeps running): init containers "
            + " → ".join(c["name"] for c in inits)
        )
    return agent


async def _agent(
    container: JSON | None,
    sa_token: str,
    issuer_url: str,
    gateway_url: str,
    http: aiohttp.ClientSession,
    say: Say,
    seen: dict[str, Any],
) -> None:
    """The pod's credential agent, run here once (KWOK runs no containers), and a call
    made with nothing but the ~/.arcrc it writes."""
    if container is None:
        return
    say.step("The credential agent writes ~/.arcrc (KWOK runs no containers: run here, once)")
    with tempfile.TemporaryDirectory(prefix="phabmesh-agent-") as tmp:
        home = Path(tmp)
        token_file = home / "serviceaccount-token"
        token_file.write_text(sa_token)
        argv = [*container["args"][:1], "init", "--dir", str(home), "--token-file", str(token_file)]
        argv += ["--endpoint", issuer_url, "--gateway", gateway_url]
        argv += ["--termination-log", str(home / "termination-log")]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "phabmesh.cli", *argv,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PHABMESH_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
        if await proc.wait() != 0:
            reason = (home / "termination-log").read_text().strip()
            raise RuntimeError(f"the agent wrote no credential: {reason}")
        arcrc = home / ".arcrc"
        ((api, host),) = json.loads(arcrc.read_text())["hosts"].items()
        seen["secrets"].append(host["token"])
        say.detail(
            f"phabmesh agent wrote {home.name}/credential and {home.name}/.arcrc "
            f"(mode {arcrc.stat().st_mode & 0o777:o}), naming host {api}"
        )
        # What arc, phabfive, the phabricator package and canduit do with it: the host's token
        # as params.__conduit__.token, to the host's /api/<method>.
        params = json.dumps({"__conduit__": {"token": host["token"]}})
        async with http.post(
            f"{api}user.whoami", data={"params": params, "output": "json"}
        ) as resp:
            answer: JSON = json.loads(await resp.text())
    seen["agent_whoami"] = answer
    say.detail(
        "user.whoami with nothing but that ~/.arcrc, as an unmodified client calls it: "
        f"userName={(answer['result'] or {}).get('userName')}"
    )


async def _get_ready(kube: KubeClient, path: str) -> JSON | None:
    return _ready(await kube.get(path))


def _injected_audience(pod: JSON) -> str | None:
    for volume in pod["spec"].get("volumes") or []:
        if volume["name"] == inject.VOLUME:
            audience: str = volume["projected"]["sources"][0]["serviceAccountToken"]["audience"]
            return audience
    return None


async def _meshed_pod(kube: KubeClient) -> JSON:
    path = resource_path("", "v1", "pods", DEMO_NAMESPACE)
    pod = await kube.create(
        path,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "ci-runner-0", "labels": {"app": "ci-runner"}},
            "spec": {
                "serviceAccountName": "ci-runner",
                "initContainers": [
                    {
                        "name": "linkerd-proxy",
                        "image": "cr.l5d.io/linkerd/proxy:stable",
                        "restartPolicy": "Always",
                    }
                ],
                "containers": [{"name": "runner", "image": "registry.invalid/ci-runner:1"}],
            },
        },
    )

    async def running() -> JSON | None:
        # The scheduler binds it to a simulated node, whose KWOK runs it as a kubelet would.
        now = await kube.get(f"{path}/{pod['metadata']['name']}")
        status = now.get("status") or {}
        return dict(now) if status.get("phase") == "Running" and status.get("podIP") else None

    return await wait_for(running, "the pod to run", 60)


async def _active_lease(kube: KubeClient) -> JSON | None:
    listing = await kube.get(resources.lease_path(DEMO_NAMESPACE))
    for item in listing.get("items") or []:
        if (item.get("status") or {}).get("phase") == "Active":
            return dict(item)
    return None


async def _whoami(
    http: aiohttp.ClientSession,
    gateway_url: str,
    credential: str,
    headers: dict[str, str] | None = None,
) -> JSON:
    async with http.post(
        f"{gateway_url}/api/user.whoami",
        data={"api.token": credential, "output": "json"},
        headers=headers or {},
    ) as resp:
        answer: JSON = json.loads(await resp.text())
        return answer


def run(wait: bool = True, require_client_id: bool = False) -> int:
    """The README's run command."""
    from phabmesh.kube.config import kubeconfig_available

    say = Say()
    if kubeconfig_available():
        return run_against_cluster(say)
    say.step("No cluster configured: starting a local Kubernetes control plane on 127.0.0.1")
    with devcluster.running() as plane:
        say.detail(f"export KUBECONFIG={plane.kubeconfig}")

        async def explore() -> None:
            say.step("Done: a credential lived exactly as long as its pod.")
            say.detail(
                "The control plane, the operator, the gateway and the Conduit test server keep "
                "running for you to explore (KUBECONFIG above); Ctrl-C stops them."
            )
            await until_signalled()

        linger = explore if wait else None
        asyncio.run(demo(plane, say, require_client_id=require_client_id, linger=linger))
        if not wait:
            say.step("Done: a credential lived exactly as long as its pod.")
    return 0


async def until_signalled() -> None:
    """Wait for SIGINT or SIGTERM (Ctrl-C), in this event loop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class NotInstalled(Exception):
    """What to do before ``phabmesh run`` can run as phabmesh's ServiceAccounts."""


async def service_account_kubeconfig(
    kube: KubeClient, namespace: str, name: str, directory: Path, hours: int = 24
) -> Path:
    """A kubeconfig for the current cluster that authenticates as ServiceAccount
    ``namespace/name``, with a token from the TokenRequest API (``kubectl create token``),
    valid for ``hours``; private to its owner, in ``directory``."""
    path = resource_path("", "v1", "serviceaccounts", namespace, name, "token")
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": hours * 3600},
    }
    who = f"ServiceAccount {namespace}/{name}"
    try:
        answer = await kube.create(path, request)
    except NotFound as exc:
        raise NotInstalled(
            f"{who} not found: phabmesh runs as its own ServiceAccounts, so install its RBAC "
            "first: kubectl apply -k manifests/ (or helm install phabmesh charts/phabmesh "
            "-n phabmesh-system --create-namespace), then scale its Deployments to 0 if you "
            "want only this local run to act"
        ) from exc
    except KubeError as exc:
        raise NotInstalled(
            f"cannot get a token for {who} ({exc}): your kubeconfig's user needs "
            f"create on serviceaccounts/token in {namespace}"
        ) from exc
    token = str((answer.get("status") or {}).get("token") or "")
    return _write_kubeconfig(directory / f"{namespace}-{name}.kubeconfig", namespace, name, token)


def _write_kubeconfig(out: Path, namespace: str, name: str, token: str) -> Path:
    """The current kubeconfig's cluster, as ServiceAccount ``namespace/name`` with ``token``."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    cfg = k8s_client.Configuration()
    k8s_config.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]  # untyped upstream
    cluster: JSON = {"server": cfg.host}
    if not cfg.verify_ssl:
        cluster["insecure-skip-tls-verify"] = True
    elif cfg.ssl_ca_cert:
        ca = Path(cfg.ssl_ca_cert).read_bytes()
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": "cluster", "user": user}}],
        "current-context": name,
    }
    out.touch(mode=0o600)
    out.write_text(yaml.safe_dump(config))
    return out


async def _peering_installed(kube: KubeClient) -> bool:
    """Whether the install's ClusterKopfPeering is there (manifests/peering.yaml): its
    replicas coordinate through it, and an operator run here must join them, not act beside
    them."""
    from phabmesh.processes.operator import PEERING_NAME

    path = resource_path("kopf.dev", "v1", "clusterkopfpeerings", None, PEERING_NAME)
    try:
        await kube.get(path)
    except NotFound:  # no such object, or kopf's CRD is not installed
        return False
    except KubeError as exc:
        raise NotInstalled(
            f"cannot read ClusterKopfPeering {PEERING_NAME} ({exc}): your kubeconfig's user "
            "needs get on clusterkopfpeerings.kopf.dev, to know whether the operator must "
            "join the install's replicas there"
        ) from exc
    return True


def run_against_cluster(say: Say) -> int:
    from phabmesh.processes.gateway import GatewayProcess
    from phabmesh.processes.operator import PEERING_NAME, OperatorProcess

    settings = Settings.from_env()
    warn_deprecated()
    # Two processes in one: each its own metrics port (deployed, each pod has its own).
    gateway_settings = settings.replace(
        metrics_port=settings.metrics_port + 1 if settings.metrics_port else 0,
        # The hooks port only where asked for (the local Conduit server may hold 8081).
        hooks_port=settings.hooks_port if "PHABMESH_HOOKS_PORT" in os.environ else 0,
    )
    say.step("Using the configured cluster: running the operator and the gateway locally")
    say.detail(f"Phabricator: {settings.phabricator_url} (set PHABMESH_PHABRICATOR_URL)")
    say.detail(
        f"PHABMESH_REQUIRE_CLIENT_ID={str(settings.require_client_id).lower()}: calls without "
        f"{CLIENT_ID_HEADER} from a Linkerd proxy are "
        + (
            "refused (set it false where no Linkerd proxy fronts these processes)"
            if settings.require_client_id
            else "accepted"
        )
    )

    async def serve(directory: Path) -> int:
        admin = KubeClient(load_connection())
        try:
            as_operator = await service_account_kubeconfig(
                admin, settings.namespace, "phabmesh-operator", directory
            )
            as_gateway = await service_account_kubeconfig(
                admin, settings.namespace, "phabmesh-gateway", directory
            )
            peering = await _peering_installed(admin)
        except NotInstalled as exc:
            print(f"phabmesh run: {exc}", file=sys.stderr)
            return 2
        finally:
            await admin.close()
        say.detail(
            "each runs as its own ServiceAccount (phabmesh-operator, phabmesh-gateway), "
            "with a 24 h token from TokenRequest: the lease policy lets only the operator's "
            "write leases"
        )
        if peering:
            say.detail(
                f"the operator joins ClusterKopfPeering {PEERING_NAME} as the Deployment's "
                "replicas do: of all the live ones, exactly one acts"
            )
        operator_process = OperatorProcess(
            settings, kubeconfig=str(as_operator), standalone=not peering
        )
        async with (
            running(operator_process) as operator,
            running(GatewayProcess(gateway_settings, kubeconfig=str(as_gateway))) as gateway,
        ):
            say.detail(
                f"credential endpoint :{operator.endpoint_port}, gateway :{gateway.port} "
                f"(/hooks/ also :{gateway.hooks_port}), "
                f"metrics :{operator.metrics_port} (operator) and :{gateway.metrics_port} "
                "(gateway); Ctrl-C stops them"
            )
            await until_signalled()
        return 0

    with tempfile.TemporaryDirectory(prefix="phabmesh-run-") as directory:
        return asyncio.run(serve(Path(directory)))
