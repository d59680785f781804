"""Building the local control plane's binaries (and the other Go tools the tests run) from
pinned Go modules, once, into a cache keyed by each module's version and files."""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
class NodeBinaries:
    """The real node's commands (``tests/controlplane/node_tools.go``)."""

    kubelet: Path
    kube_proxy: Path


# Modules only the node's commands need: their go.sum lines do not key the control plane's
# build, so pinning them in tests/controlplane/go.sum left that cache entry as it was.
NODE_ONLY_MODULES = (
    "github.com/moby/ipvs",
    "github.com/vishvananda/netlink",
    "github.com/vishvananda/netns",
    "go.opentelemetry.io/contrib/instrumentation/github.com/emicklei/go-restful/otelrestful",
    "k8s.io/cri-streaming",
    "sigs.k8s.io/knftables",
)


def run(
    argv: Sequence[str | Path],
    *,
    check: bool = True,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    timeout: float = 60,
    error: type[ControlPlaneError] = ControlPlaneError,
    shown: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command of the dev kit, its output captured; with ``check``, a failure raises
    ``error`` naming the command (``shown``, or the whole command line) and its stderr."""
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        command = shown if shown is not None else " ".join(str(a) for a in argv)
        raise error(f"{command} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def spawn(
    argv: Sequence[str | Path], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process of the dev kit in its own process group (stopped as one), its output
    appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(a) for a in argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


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
            "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and kwok"
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


def etcd_binary(log: Path | None = None) -> Path:
    """etcd, built (once) from ``go.etcd.io/etcd/server/v3`` pinned in
    ``tests/controlplane/etcd/go.mod``. ``PHABMESH_ETCD`` names a prebuilt one instead, and
    otherwise ``PHABMESH_K8S_BIN_DIR`` (prebuilt binaries, all of them) holds it as ``etcd``."""
    env = os.environ.get("PHABMESH_ETCD")
    if env:
        return Path(env)
    bin_dir = os.environ.get("PHABMESH_K8S_BIN_DIR")
    if bin_dir:
        return Path(bin_dir) / "etcd"
    mod = module_dir() / "etcd"
    version = required_version(mod / "go.mod", "go.etcd.io/etcd/server/v3")
    # The main package's path ends in its major version, so Go names the command "server".
    return _build_module(mod, "etcd", version, "-s -w", log) / "server"


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

    Three Go modules: ``tests/controlplane`` (Kubernetes), ``tests/controlplane/etcd`` and
    ``tests/controlplane/kwok``.
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
        k8s_dir = _build_module(
            mod, "kubernetes", version, _ldflags(version), log, sum_skip=NODE_ONLY_MODULES
        )
        kwok_version = required_version(mod / "kwok" / "go.mod", "sigs.k8s.io/kwok")
        kwok_dir = _build_module(mod / "kwok", "kwok", kwok_version, "-s -w", log)
    binaries = Binaries(
        etcd=etcd_binary(log),
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


def node_binaries(log: Path | None = None) -> NodeBinaries:
    """Build (once) and return the real node's kubelet and kube-proxy.

    From the control plane's own module (``tests/controlplane``: the same ``k8s.io/kubernetes``
    version, ``go.mod`` and ``go.sum``), the commands ``node_tools.go`` pins, into a cache
    entry of their own (``node-VERSION-HASH``): building them does not rebuild the control
    plane. ``PHABMESH_K8S_BIN_DIR``, when it also holds ``kubelet`` and ``kube-proxy``,
    skips the build.
    """
    env_dir = os.environ.get("PHABMESH_K8S_BIN_DIR")
    if env_dir and (Path(env_dir) / "kubelet").is_file():
        bindir = Path(env_dir)
    else:
        mod = module_dir()
        version = kubernetes_version(mod / "go.mod")
        bindir = _build_module(mod, "node", version, _ldflags(version), log, tools="node_tools.go")
    binaries = NodeBinaries(kubelet=bindir / "kubelet", kube_proxy=bindir / "kube-proxy")
    for path in dataclasses.astuple(binaries):
        if not Path(path).is_file():
            raise ControlPlaneError(f"missing node binary: {Path(path).name}")
    return binaries


def go_tool(name: str, module: str, ldflags: str = "-s -w", tags: str = "") -> Path:
    """Build (once) the Go module ``tests/controlplane/<name>``; return its binaries' directory.

    The same as the control plane's two modules: ``tools.go`` pins the commands (or, without
    one, the module is itself the main package to build), ``go.mod``
    the version of ``module``, and the cache is keyed by both (and by the build ``tags``,
    comma-separated). Used for the tools the tests run beside the control plane.
    """
    mod = module_dir() / name
    version = required_version(mod / "go.mod", module)
    return _build_module(mod, name, version, ldflags, None, tags)


def _build_module(
    mod: Path,
    name: str,
    version: str,
    ldflags: str,
    log: Path | None,
    tags: str = "",
    *,
    tools: str = "tools.go",
    sum_skip: tuple[str, ...] = (),
) -> Path:
    bindir = cache_home() / f"{name}-{version}-{module_key(mod, tools, tags, sum_skip)}"
    # A module pins its commands in its tools file, or is itself the main package.
    packages = commands(mod / tools) if (mod / tools).is_file() else ["."]
    _build_into(bindir, mod, version, ldflags, packages, log, tags)
    return bindir


def module_key(
    mod: Path, tools: str = "tools.go", tags: str = "", sum_skip: tuple[str, ...] = ()
) -> str:
    """The cache key of a module's build: a hash of its ``go.mod``, ``go.sum`` (without the
    lines of the modules ``sum_skip`` names) and the tools file that pins its commands, or,
    for a module that is itself the main package, its ``*.go`` files."""
    go_sum = b"".join(
        line
        for line in (mod / "go.sum").read_bytes().splitlines(keepends=True)
        if line.split(b" ", 1)[0].decode() not in sum_skip
    )
    sources = [mod / tools] if (mod / tools).is_file() else sorted(mod.glob("*.go"))
    keyed = (mod / "go.mod").read_bytes() + go_sum + b"".join(f.read_bytes() for f in sources)
    keyed += f"tags={tags}".encode() if tags else b""
    return hashlib.sha256(keyed).hexdigest()[:12]


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
            "-v",  # each package's path as it is compiled: what the progress lines count
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
            returncode, tail = _run_with_progress(cmd, mod, out, bindir.name.rsplit("-", 1)[0])
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        if returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise ControlPlaneError(f"building the control plane failed:\n{tail[-4000:]}")
        (staging / ".complete").write_text(version + "\n")
        if bindir.exists():
            shutil.rmtree(bindir)
        staging.rename(bindir)


PROGRESS_EVERY = 15.0  # seconds between progress lines of a build


def _run_with_progress(
    cmd: list[str], cwd: Path, out: Any, what: str, every: float = PROGRESS_EVERY
) -> tuple[int, str]:
    """Run a ``go build -v``, saying every ``every`` seconds how far it is (modules fetched,
    packages compiled, time so far) on stderr. Returns its exit code and the end of its
    stderr (Go's errors)."""
    started = time.monotonic()
    last = started
    downloaded = compiled = 0
    tail: collections.deque[str] = collections.deque(maxlen=80)
    with subprocess.Popen(
        cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            if line.startswith("go: downloading "):
                downloaded += 1
            elif not line.startswith(("go:", "#")) and "/" in line and " " not in line.strip():
                compiled += 1
            now = time.monotonic()
            if now - last >= every:
                last = now
                print(
                    f"  still building {what}: {downloaded} modules fetched, "
                    f"{compiled} packages compiled, {int(now - started)} s so far",
                    file=sys.stderr,
                    flush=True,
                )
        returncode = proc.wait()
    if returncode == 0:
        print(
            f"  built {what} in {int(time.monotonic() - started)} s ({compiled} packages)",
            file=sys.stderr,
            flush=True,
        )
    return returncode, "".join(tail)


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


# -- CoreDNS, the cluster DNS of a real node ----------------------------------------------------

COREDNS_MODULE = "github.com/coredns/coredns"


def coredns() -> Path:
    """CoreDNS, built (once) from ``tests/controlplane/coredns``: a main package of its own
    that registers only the plugins the cluster DNS's Corefile uses (phabmesh.dev.clusterdns).
    Static (CGO off), so it runs alone in an image."""
    return go_tool("coredns", COREDNS_MODULE) / "coredns"
