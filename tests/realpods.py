"""Real workloads on the real node (tests/e2e/test_real_workloads.py): phabmesh installed as a
user installs it, its image and a workload image built here, and the pods that use it.

The workload image (``CLIENTS_IMAGE``) is Debian bookworm with arcanist (``arcanist``, PHP) and
the ``phabricator`` Python package at the version tests/clients/python pins, plus the
driver that calls it with nothing but ``~/.arcrc``: the same unmodified clients the host-side
e2e tests run, now inside a pod, configured by the files the injected agent writes.

No Linkerd can run here. ``linkerd_proxy_stand_in`` is a container named ``linkerd-proxy``
(what phabmesh reads of a pod's spec to call it meshed: docs/architecture.md, "Meshed, and
what proves it") that does nothing but run and stop when told: it proxies nothing and vouches
for no caller, so the install runs with ``linkerd.requireClientID=false``, as on a cluster
without Linkerd.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from phabmesh.dev import image, linkerd, ociimage
from phabmesh.dev.gobuild import cache_home
from tests.kube import Helm, wait_for
from tests.phab import label_namespace
from tests.realnode import RealCluster

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "tests" / "clients" / "python"
DRIVER = CLIENTS / "call_phabricator_arcrc.py"
CLIENTS_ROOTFS = image.Rootfs(
    "realpods-clients-rootfs",
    ("arcanist", "php-cli", "php-curl", "python3", "python3-requests", "ca-certificates"),
    image.IMAGE_FILES / "dpkg-excludes",
)
CLIENTS_USER = 1000
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _phabricator_pin() -> str:
    for line in (CLIENTS / "requirements.txt").read_text().splitlines():
        if line.startswith("phabricator=="):
            return line.strip()
    raise AssertionError("tests/clients/python/requirements.txt pins no phabricator")


def clients_image(out_dir: Path) -> tuple[str, Path]:
    """The workload image's name and archive, cached by its inputs (the Debian layer by
    phabmesh.dev.image's cache, the rest here)."""
    base, _ = image.base_layer(CLIENTS_ROOTFS, log=lambda _: None)
    pin = _phabricator_pin()
    key = hashlib.sha256(
        json.dumps(
            [base.digest, pin, "#!/usr/bin/python3", DRIVER.read_text(), ociimage.epoch()]
        ).encode()
    ).hexdigest()[:12]
    name = f"localhost/phabmesh-e2e-clients:{key}"
    archive = cache_home() / "images" / f"phabmesh-e2e-clients-{key}.tar"
    if not archive.is_file():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
            tree = Path(scratch) / "tree"
            site = tree / "usr/lib/python3/dist-packages"
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--no-compile", "--target", str(site), pin],
                check=True, capture_output=True,
            )  # fmt: skip
            shutil.rmtree(site / "bin", ignore_errors=True)
            bindir = tree / "usr/local/bin"
            bindir.mkdir(parents=True)
            (bindir / "call-phabricator").write_text("#!/usr/bin/python3\n" + DRIVER.read_text())
            (bindir / "call-phabricator").chmod(0o755)
            top = ociimage.layer_from_dir(tree, Path(scratch) / "top.tar.gz")
            config = ociimage.ImageConfig(cmd=("/bin/sh",), user=f"{CLIENTS_USER}")
            ociimage.write_archive(name, [base, top], config, archive)
    return name, archive


def linkerd_proxy_stand_in(clients: str) -> dict[str, Any]:
    """A native sidecar named ``linkerd-proxy``, shaped as Linkerd 2.20 injects its proxy
    (first init container, ``restartPolicy: Always``, ``_l5d_ns``/``_l5d_trustdomain``). It
    only runs: no traffic goes through it."""
    return {
        "name": "linkerd-proxy",
        "image": clients,
        "imagePullPolicy": "Never",
        "restartPolicy": "Always",
        "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
        "env": [
            {"name": "_l5d_ns", "value": "linkerd"},
            {"name": "_l5d_trustdomain", "value": "cluster.local"},
        ],
        "securityContext": RESTRICTED,
    }


# The app keeps running for `linger` seconds after TERM, so that a test can call from a pod
# that is terminating.
APP = "trap 'sleep {linger}; exit 0' TERM; while :; do sleep 1 & wait $!; done"


def workload_pod_spec(clients: str, *, linger: int = 0, app: str | None = None) -> dict[str, Any]:
    """A meshed pod of the workload image under Pod Security `restricted`: the stand-in proxy,
    and an app container that runs ``app`` (by default: idles)."""
    return {
        "serviceAccountName": "runner",
        "terminationGracePeriodSeconds": linger + 5,
        "securityContext": {
            "runAsUser": CLIENTS_USER,
            "runAsGroup": CLIENTS_USER,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [linkerd_proxy_stand_in(clients)],
        "containers": [
            {
                "name": "app",
                "image": clients,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", app or APP.format(linger=linger)],
                "securityContext": RESTRICTED,
            }
        ],
    }


def deployment(name: str, clients: str, *, replicas: int = 1, linger: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": workload_pod_spec(clients, linger=linger),
            },
        },
    }


def job(name: str, clients: str, command: str) -> dict[str, Any]:
    """A Job of one pod whose app runs ``command`` once; the agent in init mode."""
    spec = workload_pod_spec(clients, app=command)
    spec["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"phabmesh.io/agent": "init"}},
                "spec": spec,
            },
        },
    }


TIMEOUT = 180
SYSTEM = "phabmesh-system"


def rolled_out(cluster: RealCluster, namespace: str, *names: str) -> None:
    for name in names:
        done = cluster.kubectl(
            "rollout", "status", "-n", namespace, f"deployment/{name}", f"--timeout={TIMEOUT}s",
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            pods = cluster.kubectl("describe", "pods", "-n", namespace, check=False).stdout
            raise AssertionError(f"{name} did not roll out: {done.stderr}\n{pods[-4000:]}")


def restricted_namespace(cluster: RealCluster, name: str) -> str:
    """A namespace that enforces Pod Security `restricted`, allowed to use bots, with the
    ServiceAccount `runner`."""
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    label_namespace(cluster, name)
    cluster.kubectl("create", "serviceaccount", "-n", name, "runner")
    return name


def wait_injects(cluster: RealCluster, namespace: str, clients: str) -> None:
    """Wait until the webhook, called by the API server through its Service, injects the agent
    (it has the binding, and its CA is in the webhook configuration)."""
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "labels": {"app": "probe"}},
        "spec": workload_pod_spec(clients),
    }

    def injected() -> bool:
        done = cluster.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
            input=json.dumps(probe), check=False,
        )  # fmt: skip
        if done.returncode != 0:
            return False
        names = [c["name"] for c in json.loads(done.stdout)["spec"].get("initContainers", [])]
        return "phabmesh-agent" in names

    wait_for(injected, timeout=TIMEOUT, interval=1, what="the webhook to inject the agent")


def pods_of(cluster: RealCluster, namespace: str, app: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"app={app}", "-o", "json")
    pods: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return pods


def ready_pods(cluster: RealCluster, namespace: str, app: str, count: int = 1) -> list[str]:
    def ready() -> list[str] | None:
        names = [
            p["metadata"]["name"]
            for p in pods_of(cluster, namespace, app)
            if "deletionTimestamp" not in p["metadata"]
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p["status"].get("conditions", [])
            )
        ]
        return names if len(names) == count else None

    try:
        found: list[str] = wait_for(
            ready, timeout=TIMEOUT, interval=0.2, what=f"{count} ready {app}"
        )
    except AssertionError as exc:
        described = cluster.kubectl(
            "describe", "pods", "-n", namespace, "-l", f"app={app}", check=False
        )
        agents = cluster.kubectl(
            "logs",
            "-n",
            namespace,
            "-l",
            f"app={app}",
            "-c",
            "phabmesh-agent",
            "--tail=20",
            check=False,
        )
        raise AssertionError(
            f"{exc}\n{described.stdout[-5000:]}\n{agents.stdout}{agents.stderr}"
        ) from None
    return found


def whoami(cluster: RealCluster, namespace: str, pod: str, client: str) -> tuple[str | None, str]:
    """``user.whoami`` from the pod's app container with ``client``: the user name, or None
    and what the client said."""
    command = {
        "arc": ["arcanist", "call-conduit", "--", "user.whoami"],
        "phabricator": ["call-phabricator", "user.whoami", "{}"],
    }[client]
    done = cluster.kubectl(
        "exec", "-i", "-n", namespace, pod, "-c", "app", "--", *command, input="{}", check=False
    )
    said = (done.stdout + done.stderr).strip()
    try:
        printed = json.loads(done.stdout)
    except ValueError:
        return None, said
    answer = printed.get("response") if client == "arc" else printed.get("result")
    return (answer or {}).get("userName"), said


def diagnosis(cluster: RealCluster, namespace: str, pod: str) -> str:
    """What to read when a workload pod's call fails: the pod as admitted, its agent's log,
    its leases, and phabmesh's own logs."""
    parts = []
    commands: list[tuple[str, ...]] = [
        ("get", "pod", "-n", namespace, pod, "-o",
         "jsonpath={.metadata.annotations}{'\\n'}{.spec.initContainers[*].name}"),
        ("logs", "-n", namespace, pod, "-c", "phabmesh-agent", "--tail=20"),
        ("get", "phabricatorcredentials", "-n", namespace, "-o", "wide"),
        ("get", "pods", "-n", "phabmesh-system", "-o", "wide"),
    ]  # fmt: skip
    system = cluster.kubectl("get", "pods", "-n", "phabmesh-system", "-o", "name", check=False)
    for name in system.stdout.split():
        commands.append(("logs", "-n", "phabmesh-system", name, "--tail=40"))
    for args in commands:
        done = cluster.kubectl(*args, check=False)
        parts.append(f"$ kubectl {' '.join(args)}\n{done.stdout[-6000:]}{done.stderr[-2000:]}")
    return "\n".join(parts)


def refused(said: str) -> bool:
    return "ERR-INVALID-AUTH" in said or "INVALID CREDENTIALS" in said


def install_chart(cluster: RealCluster, helm: Helm, phabricator_url: str) -> None:
    """The CRDs and `helm install` of charts/phabmesh as docs/install.md gives them, with the
    image imported into the node (never pulled) and no Linkerd to vouch for callers (and, as
    `make dev-cluster` has them, stand-ins for Linkerd's policy CRDs); then its Deployments
    rolled out."""
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(linkerd.standin_crds()))
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    helm.env["KUBECONFIG"] = str(cluster.kubeconfig)
    helm.run(
        "install", "phabmesh", str(REPO / "charts" / "phabmesh"), "-n", SYSTEM,
        "--create-namespace",
        "--set", f"phabricatorURL={phabricator_url}",
        "--set", "linkerd.requireClientID=false",
        "--set", "image.pullPolicy=Never",
    )  # fmt: skip
    rolled_out(cluster, SYSTEM, "phabmesh-operator", "phabmesh-gateway")
