"""A real, local Kubernetes control plane on 127.0.0.1 for tests and local runs.

What runs for real, as local processes:

- etcd, built from the Go module ``go.etcd.io/etcd/server/v3`` pinned in
  ``tests/controlplane/etcd/go.mod``;
- kube-apiserver, kube-controller-manager, kube-scheduler and kubectl, built from the Go
  module ``k8s.io/kubernetes`` at the version pinned in ``tests/controlplane/go.mod``;
- KWOK's controller, built from ``sigs.k8s.io/kwok`` pinned in
  ``tests/controlplane/kwok/go.mod``.

Binaries are built once into a cache keyed by each module's version and files, and reused.

The API server runs with RBAC, a service-account issuer and signing key (so the
TokenRequest and TokenReview APIs work for pod-bound tokens) and the default admission
plugins (webhooks at ``https://127.0.0.1:PORT`` URLs are accepted). The controller manager
runs the garbage collector, the service-account and namespace controllers and the workload
controllers (Deployment, ReplicaSet, StatefulSet, Job, DaemonSet, disruption budgets,
endpoints, pod garbage collection, node lifecycle and taint eviction); the scheduler binds
pods to nodes.

What is simulated: the nodes. There is no kubelet and no container runtime. ``nodes``
Node objects annotated ``kwok.x-k8s.io/node=fake`` are KWOK's: it keeps them Ready (node
leases) and moves the pods bound to them through their phases from its stage
configuration (``tests/controlplane/kwok/stages.yaml``): Running with a pod IP and
container statuses (native sidecars running), Succeeded for a Job's pods, and gone once
deleted. How long each step takes is ``Delays`` (immediate by default; ``Delays.realistic``
for the benchmark). No container ever runs: a pod's "linkerd-proxy" is only the container
its spec names. Pods bound to any other node, or left unscheduled, move only when
something writes their status.

With ``real_node=True`` a real node runs beside the KWOK nodes (``phabmesh.dev.realnode``: a
kubelet, kube-proxy and containerd; root and ``make node-packages`` needed): pods bound to it
really run. The KWOK nodes are then tainted ``kwok.x-k8s.io/node=fake:NoSchedule``, so pods go
to the real node unless they tolerate that taint; the real node is labelled
``phabmesh.dev/node=real`` for nodeSelectors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

import yaml

from phabmesh.dev.gobuild import (
    Binaries,
    ControlPlaneError,
    build_binaries,
    go_tool,
    helm,
    kwok_stages,
    prometheus_operator_crds,
    promtool,
    repo_root,
    run,
    spawn,
)
from phabmesh.dev.pki import Pki

if typing.TYPE_CHECKING:
    from phabmesh.dev.realnode import RealNode

CONTROLLERS = (
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    # workloads
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "daemonset-controller",
    "ttl-after-finished-controller",
    # PodDisruptionBudgets (the Eviction API and kubectl drain), Services, nodes
    "disruption-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
    "node-lifecycle-controller",
    "taint-eviction-controller",
)
# With a real node: the ConfigMap kube-root-ca.crt in every namespace, which the default
# service-account volume (kube-api-access-*) projects; without it such a pod never starts.
REAL_NODE_CONTROLLERS = ("root-ca-certificate-publisher-controller",)
SERVICE_CIDR = "10.96.0.0/16"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"  # nodes annotated "fake" are KWOK's to simulate
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The audit log records every request made as a ServiceAccount outside kube-system (the
# controller manager's controllers): what phabmesh's processes really ask for.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclasses.dataclass(frozen=True)
class Delays:
    """How long KWOK's simulated kubelet takes, in milliseconds (plus up to ``jitter``).

    ``start``: a scheduled pod until Running (podIP, container statuses, Ready);
    ``complete``: a Job's Running pod until Succeeded; ``stop``: a deleted pod until gone.
    """

    start: int = 0
    complete: int = 0
    stop: int = 0
    jitter: int = 0

    @classmethod
    def realistic(cls) -> Delays:
        """Roughly what a node does with a cached image and a container that exits on SIGTERM."""
        return cls(start=1500, complete=5000, stop=1000, jitter=1000)

    @classmethod
    def parse(cls, text: str) -> Delays:
        """``none``, ``realistic``, or ``start=MS,complete=MS,stop=MS,jitter=MS`` (any subset).

        The form ``phabmesh dev-cluster --delays`` and ``make dev-cluster DELAYS=...`` take.
        """
        text = text.strip()
        if text in ("", "none"):
            return cls()
        if text == "realistic":
            return cls.realistic()
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, int] = {}
        for part in text.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep or name not in fields:
                raise ValueError(
                    f"delays: {part.strip()!r} is not one of none, realistic or "
                    f"{'|'.join(sorted(fields))}=MILLISECONDS"
                )
            if not value.strip().isdigit() or len(value.strip()) > 7:
                raise ValueError(f"delays: {name} must be milliseconds (0-9999999), not {value!r}")
            values[name] = int(value)
        return cls(**values)


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until(what: str, ready: object, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ControlPlaneError(f"{what} exited with code {proc.returncode} while starting")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise ControlPlaneError(f"{what} was not ready within {timeout:.0f} s")


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK in ``workdir``.

    Use as a context manager; ``stop()`` stops exactly the processes it started.
    Each process's output goes to ``workdir/logs/<name>.log``.
    """

    def __init__(
        self,
        workdir: Path,
        binaries: Binaries | None = None,
        *,
        nodes: int = 2,
        delays: Delays | None = None,
        real_node: bool = False,
        node_setup: Sequence[Callable[[RealNode], None]] = (),
        client_qps: int | None = None,
    ) -> None:
        """``real_node``: also run a real node (``self.real_node``), started last and stopped
        first; each of ``node_setup`` is then called with it once it is Ready (to import
        images and apply manifests: ``RealNode.install``). ``client_qps``: the request rate
        of the controller manager's and the scheduler's clients (``--kube-api-qps``, burst
        twice that; by default theirs, 20 and 50 a second), for pods by the ten thousand."""
        self.workdir = workdir
        self.binaries = binaries or build_binaries()
        self.nodes = [f"kwok-node-{i}" for i in range(nodes)]
        self.delays = delays or Delays()
        self.pki = Pki(workdir / "pki")
        self.kubeconfig = workdir / "kubeconfig"
        self.audit_log = workdir / "logs" / "audit.log"
        self.etcd_port = free_port()
        self.apiserver_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.real_node: RealNode | None = None
        self.node_setup = tuple(node_setup)
        self.client_qps = client_qps
        if real_node:
            from phabmesh.dev.realnode import RealNode

            self.real_node = RealNode(self, workdir / "node")

    # lifecycle

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "logs").mkdir(exist_ok=True)
            if self.real_node is not None:
                self.real_node.prepare()  # root, packages, the lock, the build: fail early
            Pki.create(self.pki.root, node=self._node_identity())
            self._write_kubeconfigs()
            self.start_etcd()
            self.start_apiserver()
            self.start_controller_manager()
            self.start_scheduler()
            self.start_kwok()
            self.create_nodes()
            if self.real_node is not None:
                self.start_real_node()
        except BaseException:
            self.stop()
            raise

    def start_api_only(self) -> None:
        """etcd and kube-apiserver alone: no controller, no scheduler, no node. For a
        benchmark that writes every object, pods and their status included, itself."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "logs").mkdir(exist_ok=True)
            Pki.create(self.pki.root, node=None)
            self._write_kubeconfigs()
            self.start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise

    def pid(self, name: str) -> int | None:
        """The process id of component ``name`` (``etcd``, ``kube-apiserver``...), if it runs."""
        proc = self._procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        try:
            if self.real_node is not None:
                self.real_node.stop()  # first: its pods are deleted through the API server
        finally:
            for name in reversed(list(self._procs)):
                self._stop(name)

    def _node_identity(self) -> tuple[str, str] | None:
        if self.real_node is None:
            return None
        from phabmesh.dev.realnode import NODE_IP

        return self.real_node.name, NODE_IP

    def start_real_node(self) -> None:
        """RBAC for the kubelet, then the node and its cluster DNS (CoreDNS, the kubelet's
        ``clusterDNS``); then ``node_setup``."""
        assert self.real_node is not None
        # The API server authorizes with RBAC only (no Node authorizer): the kubelets' group
        # gets the system:node role. kube-proxy (system:kube-proxy) has its bootstrap binding.
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "phabmesh-dev:nodes"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:node",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": "system:nodes",
                }
            ],
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(binding))
        self.real_node.start()
        from phabmesh.dev import clusterdns

        clusterdns.install(self, self.real_node.import_image, node=self.real_node.name)
        for setup in self.node_setup:
            setup(self.real_node)

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _spawn(
        self, name: str, argv: Sequence[str | Path], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn(argv, self.workdir / "logs" / f"{name}.log", env)
        self._procs[name] = proc
        return proc

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    # components

    def start_etcd(self) -> None:
        peer = free_port()
        data = self.workdir / "etcd"
        proc = self._spawn(
            "etcd",
            [
                self.binaries.etcd,
                f"--data-dir={data}",
                "--name=phabmesh-dev",
                f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=phabmesh-dev=http://127.0.0.1:{peer}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=4294967296",
                "--log-level=warn",
            ],
        )
        _wait_until(
            "etcd", lambda: self._http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), proc, 30
        )

    def start_apiserver(self) -> None:
        crt, key = self.pki.pair("apiserver")
        proc = self._spawn(
            "kube-apiserver",
            [
                self.binaries.kube_apiserver,
                f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={crt}",
                f"--tls-private-key-file={key}",
                f"--client-ca-file={self.pki.ca_cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.pki.sa_pub}",
                f"--service-account-signing-key-file={self.pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
                f"--audit-policy-file={self._write_audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                *self._kubelet_flags(),
                "--v=0",
            ],
        )
        _wait_until("kube-apiserver", self._apiserver_ready, proc, 90)

    def start_controller_manager(self) -> None:
        proc = self._spawn(
            "kube-controller-manager",
            [
                self.binaries.kube_controller_manager,
                f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
                f"--controllers={','.join(self._controllers())}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--concurrent-gc-syncs=20",
                *self._client_qps_flags(),
                "--v=0",
            ],
        )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError("kube-controller-manager exited while starting")

    def _controllers(self) -> tuple[str, ...]:
        return CONTROLLERS + (REAL_NODE_CONTROLLERS if self.real_node is not None else ())

    def _kubelet_flags(self) -> list[str]:
        """The API server's flags for real kubelets: its client certificate, their serving
        certificates checked against the CA, dialled at their InternalIP."""
        if self.real_node is None:
            return []
        crt, key = self.pki.pair("apiserver-kubelet-client")
        return [
            f"--kubelet-client-certificate={crt}",
            f"--kubelet-client-key={key}",
            f"--kubelet-certificate-authority={self.pki.ca_cert}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def start_scheduler(self) -> None:
        kubeconfig = self.workdir / "scheduler.kubeconfig"
        proc = self._spawn(
            "kube-scheduler",
            [
                self.binaries.kube_scheduler,
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                *self._client_qps_flags(),
                "--v=0",
            ],
        )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError("kube-scheduler exited while starting")

    def _client_qps_flags(self) -> list[str]:
        if self.client_qps is None:
            return []
        return [f"--kube-api-qps={self.client_qps}", f"--kube-api-burst={2 * self.client_qps}"]

    def write_kwok_config(self) -> Path:
        """KWOK's stages with this control plane's delays, as one file."""
        stages = list(yaml.safe_load_all(kwok_stages().read_text()))
        delays = {
            "pod-ready": self.delays.start,
            "pod-complete": self.delays.complete,
            "pod-delete": self.delays.stop,
        }
        for stage in stages:
            delay = delays.get(stage["metadata"]["name"])
            if delay is None:
                continue
            stage["spec"]["delay"] = {"durationMilliseconds": delay}
            if self.delays.jitter:
                stage["spec"]["delay"]["jitterDurationMilliseconds"] = delay + self.delays.jitter
        path = self.workdir / "kwok.yaml"
        path.write_text(yaml.safe_dump_all(stages))
        return path

    def start_kwok(self) -> None:
        home = self.workdir / "kwok"
        home.mkdir(exist_ok=True)
        proc = self._spawn(
            "kwok",
            [
                self.binaries.kwok,
                f"--kubeconfig={self.workdir / 'kwok.kubeconfig'}",
                f"--config={self.write_kwok_config()}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.255.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
            env=dict(os.environ, HOME=str(home), KWOK_WORKDIR=str(home)),
        )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError("kwok exited while starting")

    def create_nodes(self, timeout: float = 60) -> None:
        """The simulated nodes, Ready (KWOK initializes each) and schedulable."""
        docs = [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_ANNOTATION: "fake"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "type": "kwok",
                    },
                },
                **({"spec": {"taints": [self._kwok_taint()]}} if self.real_node else {}),
            }
            for name in self.nodes
        ]
        if not docs:
            return
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            f"--timeout={timeout:.0f}s",
            *(f"node/{name}" for name in self.nodes),
        )

    @staticmethod
    def _kwok_taint() -> dict[str, str]:
        from phabmesh.dev.realnode import KWOK_TAINT

        return dict(KWOK_TAINT)

    def stop_apiserver(self) -> None:
        self._stop("kube-apiserver")

    def stop_controller_manager(self) -> None:
        self._stop("kube-controller-manager")

    def stop_etcd(self) -> None:
        self._stop("etcd")

    # helpers

    def _write_audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(AUDIT_POLICY))
        return path

    def audit_events(self) -> list[dict[str, object]]:
        """The audit log so far: one event per completed request made as a ServiceAccount."""
        if not self.audit_log.is_file():
            return []
        with self.audit_log.open() as log:
            return [json.loads(line) for line in log if line.strip()]

    def install_rbac(self, manifests: Path) -> list[dict[str, object]]:
        """The ServiceAccounts, (Cluster)Roles and bindings of a kustomize directory, applied.

        Their namespaces are created first if need be. Returns the applied documents.
        """
        rendered = self.kubectl("kustomize", str(manifests)).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") in RBAC_KINDS]
        for namespace in sorted({d["metadata"].get("namespace") or "" for d in docs} - {""}):
            if self.kubectl("get", "namespace", namespace, check=False).returncode != 0:
                self.kubectl("create", "namespace", namespace)
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        return docs

    def service_account_kubeconfig(self, namespace: str, name: str, duration: str = "24h") -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name``.

        Its token comes from the TokenRequest API (``kubectl create token``), not bound to
        any pod, valid for ``duration``. The file is private to its owner.
        """
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        config = self.pki.kubeconfig(self.server, "admin")
        user = f"system:serviceaccount:{namespace}:{name}"
        config["users"] = [{"name": user, "user": {"token": token}}]
        config["contexts"] = [
            {"name": "phabmesh-dev", "context": {"cluster": "phabmesh-dev", "user": user}}
        ]
        path = self.workdir / f"{namespace}-{name}.kubeconfig"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(config))
        return path

    def _write_kubeconfigs(self) -> None:
        for path, user in (
            (self.kubeconfig, "admin"),
            (self.workdir / "controller-manager.kubeconfig", "controller-manager"),
            (self.workdir / "scheduler.kubeconfig", "scheduler"),
            (self.workdir / "kwok.kubeconfig", "kwok"),
        ):
            path.write_text(yaml.safe_dump(self.pki.kubeconfig(self.server, user)))
            path.chmod(0o600)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        crt, key = self.pki.pair("admin")
        ctx.load_cert_chain(str(crt), str(key))
        return ctx

    def _http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _apiserver_ready(self) -> bool:
        return self._http_ok(f"{self.server}/readyz", self._ssl_context())

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this control plane."""
        return run(
            [self.binaries.kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            input=input,
            timeout=timeout,
            shown=f"kubectl {' '.join(args)}",
        )


@contextlib.contextmanager
def running(
    workdir: Path | None = None, delays: Delays | None = None, real_node: bool = False
) -> Iterator[ControlPlane]:
    """A control plane in ``workdir`` (a fresh temporary directory by default)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phabmesh-")))
        plane = stack.enter_context(ControlPlane(workdir, delays=delays, real_node=real_node))
        yield plane


def serve_forever(
    workdir: Path | None = None,
    crds: Path | None = None,
    delays: Delays | None = None,
    real_node: bool = False,
) -> None:
    """Run a control plane in the foreground until Ctrl-C (or SIGTERM), then stop it."""
    from phabmesh.dev import linkerd

    with running(workdir, delays=delays, real_node=real_node) as plane:
        if crds is not None and crds.exists():
            plane.kubectl("apply", "--server-side", "-f", str(crds))
        # Linkerd's policy CRDs (stand-ins): the chart and manifests/ install their policy
        # objects as on a meshed cluster.
        plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(linkerd.standin_crds()))
        print(
            "  with stand-ins for Linkerd's policy CRDs (policy.linkerd.io), so that the chart "
            "and manifests/ install; no Linkerd runs\n"
            + (_real_node_banner(plane.real_node) if plane.real_node else "")
            + f"Kubernetes control plane ready at {plane.server}\n"
            f"  export KUBECONFIG={plane.kubeconfig}\n"
            f"  kubectl get --raw /readyz   (kubectl: {plane.binaries.kubectl})\n"
            "Press Ctrl-C to stop it.",
            flush=True,
        )
        wait_for_signal()


def _real_node_banner(node: RealNode) -> str:
    from phabmesh.dev.realnode import NODE_LABEL

    return (
        f"  with a real node {node.name} (label {'='.join(NODE_LABEL)}; the KWOK nodes are "
        "tainted kwok.x-k8s.io/node=fake:NoSchedule): import images with\n"
        f"  ctr -a {node.socket} -n k8s.io images import ARCHIVE, "
        "and run them with imagePullPolicy: Never\n"
    )


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = {"now": False}

    def handle(signum: int, frame: object) -> None:
        stop["now"] = True

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop["now"]:
            signal.pause()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phabmesh.dev.devcluster build|kubectl-path|monitoring-tools|helm-path``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["build"]:
        build_binaries()
        return 0
    if args == ["kubectl-path"]:
        print(build_binaries().kubectl)
        return 0
    if args == ["monitoring-tools"]:
        print(promtool())
        print(prometheus_operator_crds())
        return 0
    if args == ["helm-path"]:
        print(helm())
        return 0
    print(
        "usage: python -m phabmesh.dev.devcluster build|kubectl-path|monitoring-tools|helm-path",
        file=sys.stderr,
    )
    return 2


__all__ = [  # the control plane, and the builds callers have always found here
    "Binaries",
    "ControlPlane",
    "ControlPlaneError",
    "Delays",
    "build_binaries",
    "go_tool",
    "helm",
    "kwok_stages",
    "prometheus_operator_crds",
    "promtool",
    "repo_root",
    "running",
    "serve_forever",
    "wait_for_signal",
]


if __name__ == "__main__":
    sys.exit(main())
