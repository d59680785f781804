"""The credential agent, end to end: the webhook (manifests/webhook.yaml, pointed at the
session's operator) adds it to a Deployment's pods and to a Job's pod as the API server
stores them, and the agent, run for real as a process with the pod's identity, gives an
unmodified Conduit client (arc, the phabricator package, phabfive) a working ``~/.arcrc`` with
nothing else configured: the client reaches the bot through the gateway, keeps working
while the credential rotates under it, and is refused once the pod is gone.

KWOK runs no containers, so the agent runs here as a local process beside the client, as
it would beside the app in the pod: with the arguments the webhook gave its container, the
pod's own projected service-account token (a TokenRequest bound to the pod), and the local
addresses of the credential endpoint and the gateway instead of their Service names."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from kubernetes import client

from phabmesh import admission, harbormaster, resources
from phabmesh.admission import inject
from phabmesh.dev.conduit import ConduitServer, builds
from phabmesh.settings import Settings
from tests.kube import HOLD, Cluster, meshed_template, one_shot_job, wait_for
from tests.phab import bind, pod_token
from tests.stack import Threaded

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_YAML = ROOT / "manifests" / "webhook.yaml"
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"
ARCRC_DRIVER = ROOT / "tests" / "clients" / "python" / "call_phabricator_arcrc.py"
CONFIG = Settings().webhook_configuration
TIMEOUT = 60


@pytest.fixture(scope="module")
def webhook(cluster: Cluster, operator: Threaded) -> Iterator[str]:
    url = f"https://127.0.0.1:{operator.process.webhook_port}/inject"  # type: ignore[attr-defined]
    config = admission.pointed_at(yaml.safe_load(WEBHOOK_YAML.read_text()), url)
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(config)
    )
    operator.call(operator.process.webhook_tls.refresh)  # type: ignore[attr-defined]
    yield url
    cluster.kubectl("delete", "mutatingwebhookconfiguration", CONFIG, "--ignore-not-found")


@pytest.fixture
def ns(
    cluster: Cluster, conduit: ConduitServer, operator: Threaded, webhook: str, namespace: str
) -> str:
    """A namespace whose binding asks for the agent in Auto mode, credentials living 1 min."""
    bind(
        cluster, conduit, namespace, runner_account=True,
        credentialTTL="1m", agent={"mode": resources.AGENT_AUTO},
        # phabfive asks conduit.query first.
        allowedMethods=["user.*", "conduit.ping", "conduit.query"],
    )  # fmt: skip
    # The webhook's own watch of bindings (in its own process) has it too: a server-side
    # dry run of a bound pod comes back with the agent.
    probe = meshed_template("probe")
    probe["metadata"]["name"] = "probe"

    def knows() -> bool:
        stored = cluster.core.create_namespaced_pod(namespace, probe, dry_run="All")
        return inject.AGENT_INJECTED_ANNOTATION in (stored.metadata.annotations or {})

    wait_for(knows, what="the webhook to know the binding")
    return namespace


def _apply(cluster: Cluster, namespace: str, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def _running(cluster: Cluster, namespace: str, app: str) -> client.V1Pod:
    def one() -> client.V1Pod | None:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
        running = [
            p for p in pods if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
        ]
        return running[0] if len(running) == 1 else None

    pod: client.V1Pod = wait_for(one, timeout=120, interval=0.2, what=f"a running {app} pod")
    return pod


def _stored(cluster: Cluster, namespace: str, pod: client.V1Pod) -> dict[str, Any]:
    """The pod as the API server stored it, in its JSON form."""
    out = cluster.kubectl("get", "pod", "-n", namespace, pod.metadata.name, "-o", "json").stdout
    stored: dict[str, Any] = json.loads(out)
    return stored


def _assert_injected(stored: dict[str, Any], mode: str) -> dict[str, Any]:
    """The agent after Linkerd's proxy, the app told where everything is; the agent."""
    spec = stored["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["linkerd-proxy", "phabmesh-agent"]
    agent: dict[str, Any] = spec["initContainers"][1]
    assert agent["image"] == Settings().agent_image
    assert agent["args"] == ["agent", mode, "--dir", inject.AGENT_DIR]
    if mode == "sidecar":
        assert agent["restartPolicy"] == "Always"
        assert agent["startupProbe"]["exec"]["command"] == ["test", "-s", inject.CREDENTIAL_FILE]
    else:
        assert "restartPolicy" not in agent and "startupProbe" not in agent
    assert agent["resources"] == {
        "requests": {"cpu": "5m", "memory": "40Mi"},
        "limits": {"memory": "64Mi"},
    }
    assert stored["metadata"]["annotations"][inject.AGENT_INJECTED_ANNOTATION] == mode
    (app,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in app["env"]}
    assert env["HOME"] == inject.AGENT_DIR
    assert env[inject.ENV_ARCRC] == inject.ARCRC_FILE
    assert env[inject.ENV_CREDENTIAL_FILE] == inject.CREDENTIAL_FILE
    assert {"name": inject.AGENT_VOLUME, "mountPath": inject.AGENT_DIR} in app["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == inject.AGENT_VOLUME]
    assert volume["emptyDir"]["medium"] == "Memory"
    return agent


class Agent:
    """The pod's agent as a local process: the container's arguments, the pod's token."""

    def __init__(
        self,
        cluster: Cluster,
        operator: Threaded,
        gateway: Threaded,
        namespace: str,
        pod: client.V1Pod,
        container: dict[str, Any],
        workdir: Path,
    ) -> None:
        self.home = workdir / "home"  # the emptyDir, and HOME of the client
        self.home.mkdir()
        self.token_file = workdir / "token"
        self.token_file.write_text(pod_token(cluster, namespace, pod))
        self.log = workdir / "agent.log"
        self.termination_log = workdir / "termination-log"
        issuer = operator.process.endpoint_port  # type: ignore[attr-defined]
        self.gateway_url = f"http://127.0.0.1:{gateway.process.port}"  # type: ignore[attr-defined]
        # The container's own arguments, then where things are on this machine.
        self.argv = [sys.executable, "-m", "phabmesh.cli", *container["args"]]
        self.argv += ["--dir", str(self.home), "--token-file", str(self.token_file)]
        self.argv += ["--endpoint", f"http://127.0.0.1:{issuer}", "--gateway", self.gateway_url]
        self.process: subprocess.Popen[bytes] | None = None

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """An init agent: to the end."""
        argv = [*self.argv, "--termination-log", str(self.termination_log), *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)

    def start(self) -> None:
        """A sidecar agent: until stopped."""
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)

    @property
    def credential(self) -> str:
        path = self.home / "credential"
        return path.read_text().strip() if path.exists() else ""


# The clients, in the agent's HOME and with nothing else: no URL, no token.


def _run_client(home: Path, argv: list[str], stdin: str | None = None) -> tuple[Any, str]:
    """A client run with HOME (its ~/.arcrc) and nothing else: what it printed as JSON, or
    None and why."""
    done = subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"},
        cwd=home,
        check=False,
    )
    try:
        return json.loads(done.stdout), ""
    except ValueError:
        return None, f"exit {done.returncode}: {done.stderr.strip()[-500:]}"


def _arc(home: Path, method: str, params: dict[str, Any]) -> tuple[Any, str]:
    """``arc call-conduit -- METHOD``: the URI and token from ~/.arcrc alone."""
    arc = shutil.which("arcanist")
    if arc is None:
        pytest.fail("arc is not installed: run `make clients` (see tests/clients/)")
    printed, error = _run_client(home, [arc, "call-conduit", "--", method], json.dumps(params))
    if printed is None or printed.get("error"):
        return None, error or f"{printed['error']}: {printed.get('errorMessage')}"
    return printed.get("response"), ""


def _phabricator(home: Path, method: str, params: dict[str, Any]) -> tuple[Any, str]:
    """``Phabricator()`` with no host and no token: ~/.arcrc's first host."""
    if not CLIENTS_PYTHON.exists():
        pytest.fail("the phabricator package is not installed: run `make clients`")
    argv = [str(CLIENTS_PYTHON), str(ARCRC_DRIVER), method, json.dumps(params)]
    printed, error = _run_client(home, argv)
    if printed is None or printed.get("error_code"):
        return None, error or f"{printed['error_code']}: {printed.get('error_info')}"
    return printed["result"], ""


def _phabfive(home: Path, method: str, params: dict[str, Any]) -> tuple[Any, str]:
    """``phabfive user whoami``: no PHAB_URL, no PHAB_TOKEN, ~/.arcrc alone."""
    assert (method, params) == ("user.whoami", {})
    phabfive = CLIENTS_PYTHON.parent / "phabfive"
    if not phabfive.exists():
        pytest.fail("phabfive is not installed: run `make clients`")
    printed, error = _run_client(home, [str(phabfive), "--format", "json", "user", "whoami"])
    if printed is None:
        return None, error
    (me,) = printed
    return {"userName": me["User"]["UserName"]}, ""


CLIENTS = {"arc": _arc, "phabricator": _phabricator, "phabfive": _phabfive}


def _whoami(name: str, home: Path) -> tuple[str | None, str]:
    result, error = CLIENTS[name](home, "user.whoami", {})
    return (result or {}).get("userName") if not error else None, error


@pytest.mark.parametrize("name", ["arc", "phabricator"])
def test_deployment_pod_calls_conduit_through_its_sidecar_agent(
    cluster: Cluster,
    operator: Threaded,
    gateway: Threaded,
    ns: str,
    name: str,
    tmp_path: Path,
) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": meshed_template("web"),
        },
    }
    _apply(cluster, ns, deployment)
    pod = _running(cluster, ns, "web")
    container = _assert_injected(_stored(cluster, ns, pod), "sidecar")

    agent = Agent(cluster, operator, gateway, ns, pod, container, tmp_path)
    agent.start()
    try:
        wait_for(lambda: agent.credential, timeout=TIMEOUT, what="the agent's first credential")
        arcrc = json.loads((agent.home / ".arcrc").read_text())
        assert list(arcrc["hosts"]) == [agent.gateway_url + "/api/"]
        assert oct((agent.home / ".arcrc").stat().st_mode & 0o777) == "0o600"

        # The client names the bot with nothing configured, as the first credential is
        # admitted by the gateway (its lease watch has the lease).
        bot = f"bot-{ns}"
        wait_for(lambda: _whoami(name, agent.home)[0] == bot, what=f"{name} to name the bot")

        # The credential (1 min) is replaced about 30 s before it expires; every call in
        # the meantime, and right after, succeeds.
        first = agent.credential
        calls, failures = 0, []
        deadline = time.monotonic() + 90
        after_rotation = 0
        while after_rotation < 3:
            assert time.monotonic() < deadline, "the agent did not rotate the credential"
            me, error = _whoami(name, agent.home)
            calls += 1
            if me != bot:
                failures.append(error or repr(me))
            if agent.credential != first:
                after_rotation += 1
        assert not failures, f"{len(failures)} of {calls} calls failed: {failures[:3]}"
        assert calls > after_rotation  # some with the first credential, some with the next

        # The pod is deleted: the client is refused (the Deployment's next pod is another
        # pod, with a token of its own).
        cluster.core.delete_namespaced_pod(pod.metadata.name, ns, grace_period_seconds=0)
        refused = "INVALID CREDENTIALS" if name == "arc" else "ERR-INVALID-AUTH"
        wait_for(
            lambda: refused in _whoami(name, agent.home)[1],
            timeout=TIMEOUT,
            what=f"{name} refused once the pod is gone",
        )
    finally:
        agent.stop()
    log = agent.log.read_text()
    assert "credential_refreshed" in log
    assert all(credential not in log for credential in (first, agent.credential))


def test_job_pod_gets_one_credential_from_its_init_agent(
    cluster: Cluster, operator: Threaded, gateway: Threaded, ns: str, tmp_path: Path
) -> None:
    job = one_shot_job("once")
    _apply(cluster, ns, job)
    pod = _running(cluster, ns, "once")
    container = _assert_injected(_stored(cluster, ns, pod), "init")  # Auto, for a Job

    agent = Agent(cluster, operator, gateway, ns, pod, container, tmp_path)
    done = wait_for(
        lambda: (d := agent.run()).returncode == 0 and d,
        timeout=TIMEOUT,
        what="the init agent to write a credential",
    )
    assert agent.credential and agent.credential not in done.stdout + done.stderr
    assert not agent.termination_log.exists()
    bot = f"bot-{ns}"
    wait_for(lambda: _whoami("arc", agent.home)[0] == bot, what="arc to name the bot")
    for name in ("phabricator", "phabfive"):
        me, error = _whoami(name, agent.home)
        assert me == bot, f"{name}: {error}"

    # The work is done: KWOK finishes the pod (Succeeded) as its kubelet would.
    cluster.kubectl("annotate", "-n", ns, f"pod/{pod.metadata.name}", f"{HOLD}-")
    wait_for(
        lambda: cluster.core.read_namespaced_pod(pod.metadata.name, ns).status.phase == "Succeeded",
        timeout=TIMEOUT,
        what="the Job's pod to succeed",
    )
    wait_for(
        lambda: "INVALID CREDENTIALS" in _whoami("arc", agent.home)[1],
        timeout=TIMEOUT,
        what="arc refused once the pod has finished",
    )
    # An init agent with that pod's token now fails, saying why in its termination message.
    failed = agent.run("--timeout", "3")
    assert failed.returncode == 1
    reason = agent.termination_log.read_text()
    assert reason.startswith("no credential: 403 no_lease: "), reason
    assert "credential_refused" in failed.stderr and "no_lease" in failed.stderr  # logged too


def test_a_pod_opts_out_of_its_bindings_agent(cluster: Cluster, ns: str) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "no-agent",
            "labels": {"app": "no-agent"},
            "annotations": {inject.AGENT_ANNOTATION: "none"},
        },
        "spec": meshed_template("no-agent")["spec"],
    }
    out = cluster.kubectl(
        "create", "-n", ns, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body)
    ).stdout
    created = json.loads(out)
    assert [c["name"] for c in created["spec"]["initContainers"]] == ["linkerd-proxy"]
    assert inject.AGENT_INJECTED_ANNOTATION not in created["metadata"]["annotations"]
    # The token volume and variables still come: only the agent was declined.
    assert any(v["name"] == inject.VOLUME for v in created["spec"]["volumes"])


def test_a_pods_annotations_size_its_agent_and_a_wrong_one_is_refused_by_name(
    cluster: Cluster, ns: str
) -> None:
    def create(name: str, annotations: dict[str, str]) -> subprocess.CompletedProcess[str]:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": name}, "annotations": annotations},
            "spec": meshed_template(name)["spec"],
        }
        return cluster.kubectl(
            "create", "-n", ns, "--dry-run=server", "-o", "json", "-f", "-",
            input=json.dumps(body), check=False,
        )  # fmt: skip

    sized = create(
        "sized",
        {"phabmesh.io/agent-limits-mem": "96Mi", "phabmesh.io/agent-run-as-user": "4242"},
    )
    assert sized.returncode == 0, sized.stderr
    agent = json.loads(sized.stdout)["spec"]["initContainers"][1]
    assert agent["name"] == inject.AGENT_CONTAINER
    assert agent["resources"]["limits"] == {"memory": "96Mi"}
    assert agent["securityContext"]["runAsUser"] == 4242
    # What kubectl prints names the annotation, its value and what it takes.
    refused = create("typo", {"phabmesh.io/agent-limits-mem": "96MB"})
    assert refused.returncode != 0
    assert (
        'admission webhook "inject.phabmesh.io" denied the request: phabmesh.io/agent-limits-mem: '
        "not a quantity: '96MB' (use e.g. 64Mi, 128M, 100m, 0.5)"
    ) in refused.stderr, refused.stderr


def test_with_a_regular_proxy_container_the_api_server_takes_the_agent_after_it(
    cluster: Cluster, ns: str
) -> None:
    """Linkerd without native sidecars: the proxy is the first app container."""
    spec = meshed_template("regular")["spec"]
    spec["initContainers"] = [{"name": "linkerd-init", "image": "cr.l5d.io/linkerd/proxy-init"}]
    spec["containers"].insert(0, {"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy"})
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "regular", "labels": {"app": "regular"}},
        "spec": spec,
    }
    out = cluster.kubectl(
        "create", "-n", ns, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body)
    ).stdout
    created = json.loads(out)["spec"]
    assert [c["name"] for c in created["initContainers"]] == ["linkerd-init"]
    names = [c["name"] for c in created["containers"]]
    assert names == ["linkerd-proxy", inject.AGENT_CONTAINER, "app"]
    agent = created["containers"][1]
    assert agent["args"][:2] == ["agent", "sidecar"]
    assert agent["lifecycle"]["postStart"]["exec"]["command"][:2] == ["sh", "-c"]


class JobStarter:
    """What a namespace runs behind a Harbormaster webhook: a real HTTP server on loopback
    that starts a one-pod Job for each build step call it gets (its build target PHID in the
    Job's annotations), as a small in-cluster service with a Role to create Jobs would."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        starter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                starter.calls.append((self.command, self.path, headers))
                job = one_shot_job(f"build-{len(starter.calls)}")
                job["metadata"]["annotations"] = {
                    "phorge.example/build-target": headers[harbormaster.TARGET_HEADER]
                }
                _apply(cluster, namespace, job)
                self.send_response(202)
                self.end_headers()
                self.wfile.write(b"job started\n")

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _build_step_webhook(cluster: Cluster, ns: str, bot: str, port: int) -> None:
    """What docs/webhooks.md has a namespace's admin apply for a build step: an empty Secret
    for its basic credential, a Role that lets phabmesh fill and read it, a Service for the
    job starter, and the webhook."""
    cluster.core.create_namespaced_secret(
        ns, client.V1Secret(metadata=client.V1ObjectMeta(name="step-credential"))
    )
    grants = []
    for role, verbs, account in (
        ("phabmesh-build-step-fill", ["get", "patch"], "phabmesh-operator"),
        ("phabmesh-build-step-read", ["list", "watch"], "phabmesh-gateway"),
    ):
        rule = {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["step-credential"],
            "verbs": verbs,
        }
        grants += [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": role},
                "rules": [rule],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": [
                    {"kind": "ServiceAccount", "name": account, "namespace": "phabmesh-system"}
                ],
            },
        ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "job-starter"},
        "spec": {"selector": {"app": "job-starter"}, "ports": [{"port": port}]},
    }
    webhook = {
        "apiVersion": f"{resources.GROUP}/{resources.VERSION}",
        "kind": resources.WEBHOOK_KIND,
        "metadata": {"name": "start-build"},
        "spec": {
            "harbormaster": {
                "botRef": {"name": bot},
                "credentialSecretRef": {"name": "step-credential"},
            },
            "target": {"service": "job-starter", "port": port, "path": "/start"},
        },
    }
    for doc in (*grants, service, webhook):
        _apply(cluster, ns, doc)


def test_a_harbormaster_build_starts_a_job_whose_pod_reports_back_as_the_bot(
    cluster: Cluster,
    conduit: ConduitServer,
    operator: Threaded,
    gateway: Threaded,
    ns: str,
    tmp_path: Path,
) -> None:
    bot = f"bot-{ns}"
    cluster.custom.patch_namespaced_custom_object(
        resources.GROUP,
        resources.VERSION,
        ns,
        resources.BINDING_PLURAL,
        "runners",
        {"spec": {"allowedMethods": ["user.*", "conduit.ping", "harbormaster.sendmessage"]}},
    )
    starter = JobStarter(cluster, ns)
    try:
        _build_step_webhook(cluster, ns, bot, starter.port)

        # phabmesh generates the step's basic credential into the Secret and says so.
        def ready() -> bool:
            obj = cluster.custom.get_namespaced_custom_object(
                resources.GROUP, resources.VERSION, ns, resources.WEBHOOK_PLURAL, "start-build"
            )
            return resources.condition_true(obj, resources.READY)

        wait_for(ready, timeout=TIMEOUT, what="the build step webhook to be Ready")
        data = cluster.core.read_namespaced_secret("step-credential", ns).data
        username = base64.b64decode(data["username"]).decode()
        password = base64.b64decode(data["password"]).decode()
        assert username == "phabmesh-start-build" and len(password) == 32
        events = cluster.core.list_namespaced_event(
            ns, field_selector="involvedObject.name=start-build"
        ).items
        assert "CredentialGenerated" in {e.reason for e in events}
        assert all(password not in (e.message or "") for e in events)
        state = gateway.process.state  # type: ignore[attr-defined]
        wait_for(
            lambda: (
                (hook := state.webhook(ns, "start-build")) is not None
                and hook.ready
                and state.hook_credential(hook) is not None
            ),
            timeout=TIMEOUT,
            what="the gateway to see the webhook and its credential",
        )

        # Phorge runs a build whose "Make HTTP Request" step calls the gateway.
        port = gateway.process.port  # type: ignore[attr-defined]
        url = f"http://127.0.0.1:{port}/hooks/{ns}/start-build"
        step = builds.Step(
            uri=url + "?target=${target.phid}&build=${build.id}",
            credential=(username, password),
        )
        target, answer = conduit.run_build(step)
        assert (answer.status, answer.text) == (202, "job started\n")
        assert target.status == builds.WAITING
        [(method, path, headers)] = starter.calls
        assert (method, path) == ("POST", f"/start?target={target.phid}&build={target.build_id}")
        assert headers[harbormaster.TARGET_HEADER] == target.phid
        assert "Authorization" not in headers  # the step's credential stays at the gateway

        # Each bad call gets its own answer, and none reaches the job starter.
        called = answer.url
        auth = builds.request_headers(step)
        plain = {k: v for k, v in auth.items() if k != "Authorization"}
        wrong = builds.request_headers(dataclasses.replace(step, credential=(username, "x")))
        unknown = url + "?target=PHID-HMBT-" + "a" * 20
        bad = {
            "replayed": requests.post(called, headers=auth, timeout=10),
            "no credential": requests.post(called, headers=plain, timeout=10),
            "wrong credential": requests.post(called, headers=wrong, timeout=10),
            "no target": requests.post(url + "?build=1", headers=auth, timeout=10),
            "unknown target": requests.post(unknown, headers=auth, timeout=10),
        }
        assert {k: (r.status_code, r.text.strip()) for k, r in bad.items()} == {
            "replayed": (
                409,
                f"phabmesh: build target {target.phid} was already called (it waits for a message)",
            ),
            "no credential": (
                401,
                "phabmesh: no basic credential: give the build step the Passphrase credential "
                "of this webhook's Secret",
            ),
            "wrong credential": (
                403,
                "phabmesh: the basic credential does not match this webhook's",
            ),
            "no target": (
                400,
                "phabmesh: no ?target= in the URI: end the build step's URI with "
                "?target=${target.phid}",
            ),
            "unknown target": (
                404,
                f"phabmesh: no build target PHID-HMBT-{'a' * 20} that the webhook's bot can see",
            ),
        }
        assert len(starter.calls) == 1

        # The Job's pod gets its credential from its init agent and reports back through the
        # gateway as the bot, with arc: the build passes.
        pod = _running(cluster, ns, "build-1")
        job = client.BatchV1Api(cluster.api).read_namespaced_job("build-1", ns)
        assert job.metadata.annotations["phorge.example/build-target"] == target.phid
        container = _assert_injected(_stored(cluster, ns, pod), "init")
        agent = Agent(cluster, operator, gateway, ns, pod, container, tmp_path)
        wait_for(
            lambda: agent.run().returncode == 0,
            timeout=TIMEOUT,
            what="the init agent to write a credential",
        )
        result, error = _arc(
            agent.home, "harbormaster.sendmessage", {"receiver": target.phid, "type": "pass"}
        )
        assert (result, error) == (None, "")
        assert target.status == builds.PASSED
        assert conduit.methods.builds.builds[target.build_id] == "passed"
        # Replayed once the build has passed: the target has finished.
        again = requests.post(called, headers=auth, timeout=10)
        assert (again.status_code, again.text.strip()) == (
            409,
            f"phabmesh: build target {target.phid} has finished (target/passed)",
        )
        assert len(starter.calls) == 1

        # The query reaches the job starter as Phorge sent it, never decoded and re-encoded:
        # an encoded "target" is not a second target, and a repeated one is refused.
        second, answer = conduit.run_build(
            dataclasses.replace(step, uri=step.uri + "&note=%2574arget%3DPHID-HMBT-x&p=%2541")
        )
        assert answer.status == 202, answer.text
        assert starter.calls[-1][1] == (
            f"/start?target={second.phid}&build={second.build_id}"
            "&note=%2574arget%3DPHID-HMBT-x&p=%2541"
        )
        twice = requests.post(
            f"{url}?target={second.phid}&target={second.phid}", headers=auth, timeout=10
        )
        assert (twice.status_code, twice.text.strip()) == (
            400,
            "phabmesh: more than one ?target= in the URI: give it once",
        )
        # Once the namespace may no longer use the bot, nothing goes through: the gateway
        # judges the bot by its own watches, the operator then says BotNotAllowed.
        cluster.core.patch_namespace(ns, {"metadata": {"labels": {"phabmesh.io/bots": None}}})
        calls = len(starter.calls)
        target, refused = conduit.run_build(step)
        assert refused.status in (403, 503), refused.text
        assert "does not allow namespace" in refused.text or "BotNotAllowed" in refused.text
        assert target.status == builds.FAILED and len(starter.calls) == calls
    finally:
        starter.close()
