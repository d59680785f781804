"""A real node beside the local control plane: a kubelet and kube-proxy (built from the same
``k8s.io/kubernetes`` version as the control plane), containerd with runc, and a CNI bridge.

Pods bound to it really run. The machine must be Linux, the user root, and the packages of
``make node-packages`` installed. Only one real node can exist on a machine at a time (the
bridge, the iptables chains, ``/var/log/containers`` and port 10250 are the host's): a lock in
``/run`` says which process runs it, and whatever a previous run left behind (after a crash)
is cleaned up before a new node starts.

Network (nothing leaves the machine; every socket listens on loopback or the bridge address):

- the bridge ``k8sbr0`` with ``10.85.0.1/24``, created before the kubelet starts; pods get
  addresses in ``10.85.0.0/24``, a route to the Service range ``10.96.0.0/16`` via
  ``10.85.0.1`` and no default route (no masquerade);
- the kubelet serves on ``10.85.0.1:10250`` (its Node's InternalIP; the API server prefers
  that address), healthz on ``127.0.0.1:10248``;
- kube-proxy (iptables mode) makes ClusterIP Services work from pods and from the host (the
  host's route to the Service range goes through the bridge with source ``10.85.0.1``);
- the ``kubernetes`` Service: the API server listens on 127.0.0.1 only, so a DNAT rule (nat
  PREROUTING, before kube-proxy's jump) sends pods' ``10.96.0.1:443`` to it, with
  ``route_localnet`` on the bridge; an EndpointSlice for ``default/kubernetes`` keeps
  kube-proxy from rejecting that address;
- cluster DNS is ``10.96.0.10`` (a ``kube-system/kube-dns`` Service installed by whoever
  brings CoreDNS: ``RealNode.install``).

Scheduling: the node is labelled ``phabmesh.dev/node=real``; the control plane taints its
KWOK nodes ``kwok.x-k8s.io/node=fake:NoSchedule`` when the real node is on, so pods without a
toleration for that taint run on the real node, and pods that should be simulated tolerate it.

Images: there is no registry. ``import_image`` imports an OCI archive (``ociimage``) into
containerd; pods use ``imagePullPolicy: Never``. The sandbox image ``localhost/pause:3.10`` is
compiled from Kubernetes' ``pause.c`` (in the Go module cache) with ``gcc -static``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from phabmesh.dev import ociimage
from phabmesh.dev.gobuild import ControlPlaneError, NodeBinaries, node_binaries, run, spawn

if TYPE_CHECKING:
    from phabmesh.dev.devcluster import ControlPlane

NODE_NAME = "phabmesh-node"
NODE_LABEL = ("phabmesh.dev/node", "real")
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
BRIDGE = "k8sbr0"
POD_CIDR = "10.85.0.0/24"
NODE_IP = "10.85.0.1"
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
KUBELET_HEALTHZ_PORT = 10248
PAUSE_IMAGE = "localhost/pause:3.10"
BUSYBOX_IMAGE = "localhost/busybox:local"
CNI_NETWORK = "phabmesh-node"
RULE_COMMENT = "phabmesh-real-node"  # on every iptables rule this module adds
STATE_DIR = Path("/run/phabmesh-real-node")  # the lock and what a crashed run left
CNI_BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
CNI_PLUGINS = ("bridge", "host-local", "loopback")
# Commands the node runs, and the Debian package each comes from (make node-packages).
COMMANDS = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "conntrack": "conntrack",
    "ip": "iproute2",
    "gcc": "gcc",
}
# The kubelet sets these kernel tunables at start (it does not undo them), and the CNI bridge
# plugin (isGateway) turns on IPv4 forwarding: restored at stop.
KUBELET_SYSCTLS = (
    "net/ipv4/ip_forward",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
CONTAINER_LOGS = Path("/var/log/containers")  # the kubelet's, a constant in its code
CNI_CACHE = Path("/var/lib/cni")  # libcni's result cache
RUN_CONTAINERD = Path("/run/containerd")  # containerd's shims put their sockets here
NODE_PROCESSES = ("containerd", "containerd-shim-runc-v2", "kubelet", "kube-proxy")
SOCKET_PATH_MAX = 100  # a unix socket's path must fit in 108 bytes ("...ttrpc" included)


class NodeError(ControlPlaneError):
    """The real node could not be started or stopped."""


def check_host() -> None:
    """Fail with one line naming what to fix when this machine cannot run the node."""
    if os.geteuid() != 0:
        raise NodeError(
            "the real node needs root (it runs containerd, the kubelet and kube-proxy and "
            "changes the network): run as root, or start the control plane without it"
        )
    missing = sorted({pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd) is None})
    if cni_bin_dir() is None:
        missing.append("containernetworking-plugins")
    if not Path("/sys/fs/cgroup").is_dir():
        raise NodeError("the real node needs cgroups mounted at /sys/fs/cgroup")
    if missing:
        raise NodeError(
            f"the real node needs {' '.join(sorted(set(missing)))}: run `make node-packages` "
            "as root (apt-get install)"
        )


def cni_bin_dir() -> Path | None:
    for path in CNI_BIN_DIRS:
        if all((path / plugin).is_file() for plugin in CNI_PLUGINS):
            return path
    return None


def _run(
    *argv: str | Path,
    check: bool = True,
    input: str | None = None,  # noqa: A002 - mirrors subprocess.run
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    return run(argv, check=check, input=input, timeout=timeout, error=NodeError)


# -- images -----------------------------------------------------------------------------------


def pause_archive(out: Path, kubernetes_version: str) -> Path:
    """The sandbox image ``localhost/pause:3.10``: Kubernetes' own pause.c, compiled static."""
    gomodcache = _run("go", "env", "GOMODCACHE").stdout.strip()
    source = Path(gomodcache) / f"k8s.io/kubernetes@{kubernetes_version}/build/pause/linux/pause.c"
    if not source.is_file():
        _run("go", "mod", "download", f"k8s.io/kubernetes@{kubernetes_version}", timeout=600)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        root = Path(scratch) / "rootfs"
        root.mkdir()
        _run("gcc", "-Os", "-static", "-DVERSION=3.10-local", "-o", root / "pause", source)
        config = ociimage.ImageConfig(entrypoint=("/pause",), user="65535:65535", env=())
        ociimage.image_from_dir(PAUSE_IMAGE, root, config, out)
    return out


def busybox_archive(out: Path, busybox: Path = Path("/usr/bin/busybox")) -> Path:
    """``localhost/busybox:local``: a static busybox (Debian's busybox-static) with its applets
    in /bin, a minimal /etc/passwd and /etc/group, and /tmp. Its ``wget`` crashes: use ``nc``
    and ``httpd``."""
    if not busybox.is_file():
        raise NodeError(f"{busybox} is missing: install busybox-static (make node-packages)")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        root = Path(scratch) / "rootfs"
        (root / "bin").mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        for applet in _run(busybox, "--list").stdout.split():
            if applet != "busybox" and "/" not in applet:
                (root / "bin" / applet).symlink_to("busybox")
        for name in ("etc", "proc", "sys", "dev", "root", "var"):
            (root / name).mkdir()
        (root / "tmp").mkdir(mode=0o1777)
        (root / "tmp").chmod(0o1777)
        (root / "etc" / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
        )
        (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        config = ociimage.ImageConfig(cmd=("/bin/sh",), env=("PATH=/bin",))
        ociimage.image_from_dir(BUSYBOX_IMAGE, root, config, out)
    return out


# -- host state: the lock, and cleaning up after this or a crashed run -----------------------


def _read_state() -> dict[str, Any]:
    try:
        data = json.loads((STATE_DIR / "state.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(state: dict[str, Any]) -> None:
    path = STATE_DIR / "state.json"
    path.write_text(json.dumps(state, indent=1))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if Path(f"/proc/{pid}").exists() and not _zombie(pid)}
        if pending:
            time.sleep(0.1)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return True


def _processes_mentioning(text: str, names: Sequence[str]) -> list[int]:
    """The processes called one of ``names`` whose command line contains ``text`` (the node
    dir: containerd's shims name its socket)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmdline = _cmdline(int(entry.name))
        if text in cmdline and Path(cmdline.split(" ", 1)[0]).name in names:
            found.append(int(entry.name))
    return found


def _cgroup_roots() -> list[Path]:
    return sorted(p for p in Path("/sys/fs/cgroup").glob("*/kubepods") if p.is_dir()) + [
        p for p in (Path("/sys/fs/cgroup/kubepods"),) if p.is_dir()
    ]


def _kill_cgroups() -> None:
    """SIGKILL every process left in a kubepods cgroup (containers of a crashed node)."""
    pids: set[int] = set()
    for root in _cgroup_roots():
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    for pid in pids:
        _kill(pid, signal.SIGKILL)
    _wait_gone(pids, 10)


def _remove_cgroups() -> list[str]:
    """rmdir the kubepods cgroups, deepest first; what could not be removed."""
    left = []
    for root in _cgroup_roots():
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for path in [*dirs, root]:
            for _ in range(20):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                left.append(str(path))
    return left


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory.resolve()) + "/"
    targets = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if target.startswith(prefix) or target == prefix[:-1]:
            targets.append(target)
    return targets


def _unmount_under(directory: Path) -> None:
    for _ in range(3):
        targets = _mounts_under(directory)
        if not targets:
            return
        for target in sorted(targets, key=lambda t: -t.count("/")):
            if _run("umount", target, check=False).returncode != 0:
                _run("umount", "-l", target, check=False)


def _iptables_rules(ipt: str, table: str) -> list[str]:
    result = _run(ipt, "-w", "-t", table, "-S", check=False)
    return result.stdout.splitlines() if result.returncode == 0 else []


def _ours(chain: str, rules: list[str]) -> bool:
    """A KUBE-* chain (the kubelet's and kube-proxy's), or a CNI-* chain of our network."""
    if chain.startswith("KUBE-"):
        return True
    if not chain.startswith("CNI-"):
        return False
    needle = f'name: \\"{CNI_NETWORK}\\"'
    return any(needle in rule for rule in rules if f"-j {chain}" in rule or f"-A {chain} " in rule)


def clean_iptables() -> None:
    """Our DNAT rules, then every KUBE-* chain and our network's CNI-* chains (v4 and v6)."""
    for ipt in ("iptables", "ip6tables"):
        if shutil.which(ipt) is None:
            continue
        for table in ("nat", "filter", "mangle"):
            rules = _iptables_rules(ipt, table)
            chains = {r.split()[1] for r in rules if r.startswith("-N ")}
            ours = {c for c in chains if _ours(c, rules)}
            for rule in rules:
                if not rule.startswith("-A "):
                    continue
                chain = rule.split()[1]
                target = rule.split(" -j ", 1)[1].split()[0] if " -j " in rule else ""
                tagged = f"--comment {RULE_COMMENT}" in rule
                if chain not in ours and (target in ours or tagged):
                    _run(ipt, "-w", "-t", table, "-D", *shlex.split(rule[3:]), check=False)
            for chain in ours:
                _run(ipt, "-w", "-t", table, "-F", chain, check=False)
            for chain in ours:
                _run(ipt, "-w", "-t", table, "-X", chain, check=False)


def iptables_leftovers() -> list[str]:
    """What ``clean_iptables`` removes, still present: KUBE-* chains, our network's CNI-*
    chains and rules tagged with our comment (v4 and v6)."""
    left = []
    for ipt in ("iptables", "ip6tables"):
        if shutil.which(ipt) is None:
            continue
        for table in ("nat", "filter", "mangle"):
            rules = _iptables_rules(ipt, table)
            for rule in rules:
                chain = rule.startswith("-N ") and _ours(rule.split()[1], rules)
                if chain or (rule.startswith("-A ") and RULE_COMMENT in rule):
                    left.append(f"{ipt} -t {table} {rule}")
    return left


def _clean_files(node_dirs: Sequence[str], state: dict[str, Any]) -> None:
    if CONTAINER_LOGS.is_dir():
        for link in CONTAINER_LOGS.iterdir():
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if any(target.startswith(d + "/") for d in node_dirs) or not link.exists():
                link.unlink()
        with contextlib.suppress(OSError):
            CONTAINER_LOGS.rmdir()
    results = CNI_CACHE / "results"
    if results.is_dir():
        for entry in results.glob(f"{CNI_NETWORK}-*"):
            entry.unlink()
        for path in (results, CNI_CACHE):
            with contextlib.suppress(OSError):
                path.rmdir()
    if state.get("created_run_containerd"):
        shutil.rmtree(RUN_CONTAINERD, ignore_errors=True)


def _restore_sysctls(values: dict[str, str]) -> None:
    for name, value in values.items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", name).write_text(value)


def clean_host(node_dirs: Sequence[Path], state: dict[str, Any]) -> None:
    """Undo what a node did outside its directory, whatever state it was left in."""
    dirs = [str(d.resolve()) for d in node_dirs]
    # processes: ours by pid (checked by name), then containerd's shims for our socket,
    # then every process left in a pod's cgroup
    for pid, name in sorted((int(p), n) for n, p in state.get("pids", {}).items()):
        if name in _cmdline(pid):
            _kill(pid, signal.SIGKILL)
    for d in dirs:
        for pid in _processes_mentioning(d + "/", NODE_PROCESSES):
            _kill(pid, signal.SIGKILL)
    _kill_cgroups()
    time.sleep(0.2)
    for d in dirs:
        _unmount_under(Path(d))
    _remove_cgroups()
    _run("ip", "link", "del", BRIDGE, check=False)
    clean_iptables()
    _clean_files(dirs, state)
    _restore_sysctls(state.get("sysctls", {}))


@contextlib.contextmanager
def _signals_deferred(note: str) -> Iterator[None]:
    """SIGINT and SIGTERM only noted (on stderr) while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def noted(signum: int, frame: object) -> None:
        print(note, file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- the node ---------------------------------------------------------------------------------


class RealNode:
    """containerd, the kubelet and kube-proxy for ``plane``, with their state in ``root``.

    ``plane`` starts and stops it (``ControlPlane(real_node=True)``); ``start()`` returns once
    the Node is Ready and Services work.
    """

    def __init__(self, plane: ControlPlane, root: Path, name: str = NODE_NAME) -> None:
        self.plane = plane
        self.root = root.resolve()
        self.name = name
        self.binaries: NodeBinaries | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[str] | None = None
        self._state: dict[str, Any] = {}
        self.kube_proxy_ports = (0, 0)

    # paths

    @property
    def socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # lifecycle

    def prepare(self) -> None:
        """Checks, the lock, the build: before the control plane's own processes start."""
        check_host()
        if len(str(self.socket)) + len(".ttrpc") > SOCKET_PATH_MAX:
            raise NodeError(
                f"the node directory {self.root} is too long for containerd's socket path: "
                "use a shorter work directory"
            )
        self._take_lock()
        self.binaries = node_binaries()

    def start(self) -> None:
        """Bring the node up (the control plane must be running): returns once it is Ready."""
        if self._lock is None:
            self.prepare()
        try:
            for sub in ("etc", "logs", "containerd", "cni/net.d", "kubelet", "images"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._state = {
                "node_dir": str(self.root),
                "pids": {},
                "created_run_containerd": not RUN_CONTAINERD.exists(),
                "sysctls": {
                    s: Path("/proc/sys", s).read_text().strip()
                    for s in KUBELET_SYSCTLS
                    if Path("/proc/sys", s).exists()
                },
            }
            _write_state(self._state)
            self._create_bridge()
            self._start_containerd()
            self.import_image(pause_archive(self.root / "images" / "pause.tar", self._k8s()))
            self._start_kubelet()
            self._start_kube_proxy()
            self._route_kubernetes_service()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Pods away through the kubelet, then the processes, then everything on the host.

        Not interrupted by SIGINT or SIGTERM (a second Ctrl-C): they are noted and ignored
        until it is done. If it fails all the same, the state file stays for the next start
        to clean up after this run.
        """
        if self._lock is None:
            return
        with _signals_deferred("stopping the real node first; it takes a few seconds"):
            if self.running("kubelet") and self.plane.running("kube-apiserver"):
                self._delete_pods()
            for name in ("kube-proxy", "kubelet"):
                self._stop(name)
            if self.running("containerd"):
                self._remove_containers()
            self._stop("containerd")
            clean_host([self.root], self._state)
            if self.plane.running("kube-apiserver"):
                self.plane.kubectl("delete", "node", self.name, "--ignore-not-found", check=False)
            self._release_lock()

    def _take_lock(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(STATE_DIR / "lock", "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise NodeError(
                f"a real node already runs on this machine (process {holder}); only one can"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        stale = _read_state()
        if stale or Path("/sys/class/net", BRIDGE).exists():
            dirs = [Path(stale["node_dir"])] if stale.get("node_dir") else []
            clean_host([*dirs, self.root], stale)

    def _release_lock(self) -> None:
        """After a clean stop: the state file, the lock."""
        with contextlib.suppress(OSError):
            (STATE_DIR / "state.json").unlink()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (STATE_DIR / "lock").unlink()
            self._lock.close()
            self._lock = None
        with contextlib.suppress(OSError):
            STATE_DIR.rmdir()

    def _k8s(self) -> str:
        from phabmesh.dev.gobuild import kubernetes_version, module_dir

        return kubernetes_version(module_dir() / "go.mod")

    # processes

    def _spawn(self, name: str, argv: Sequence[str | Path]) -> subprocess.Popen[bytes]:
        proc = spawn(argv, self.log(name))
        self._procs[name] = proc
        self._state["pids"][name] = proc.pid
        _write_state(self._state)
        return proc

    def running(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int | None:
        proc = self._procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def _stop(self, name: str, timeout: float = 15) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def _wait(self, what: str, ready: Callable[[], bool], proc: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running(proc):
                tail = self.log(proc).read_text(errors="replace")[-3000:]
                raise NodeError(f"{proc} exited while starting (see {self.log(proc)}):\n{tail}")
            if ready():
                return
            time.sleep(0.1)
        raise NodeError(f"{what} not within {timeout:.0f} s (see {self.log(proc)})")

    # containerd

    def ctr(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "-a", self.socket, "-n", "k8s.io", *args, check=check, timeout=300)

    def import_image(self, archive: Path) -> None:
        """Import an image archive (OCI layout or docker-archive) into the node's containerd:
        pods can then run it with ``imagePullPolicy: Never``."""
        if not archive.is_file():
            raise NodeError(f"image archive {archive} does not exist")
        self.ctr("images", "import", archive)

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def _render_containerd(self) -> Path:
        runc = shutil.which("runc")
        cni = cni_bin_dir()
        c = self.root / "containerd"

        def q(value: object) -> str:
            return json.dumps(str(value))

        text = f"""# containerd for the real node, rendered by phabmesh.dev.realnode
version = 2
root = {q(c / "root")}
state = {q(c / "state")}
oom_score = 0

[grpc]
  address = {q(self.socket)}

[ttrpc]
  address = {q(str(self.socket) + ".ttrpc")}

[debug]
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = {q(PAUSE_IMAGE)}
    enable_selinux = false
    disable_apparmor = true
    # no CAP_SYS_RESOURCE here: a negative oom_score_adj (the kubelet asks -998 for a
    # sandbox) makes runc fail; this clamps it to containerd's own
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_tls_streaming = false
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = {q(runc)}
          SystemdCgroup = false
          Root = {q(c / "runc")}
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {q(cni)}
      conf_dir = {q(self.root / "cni" / "net.d")}
      max_conf_num = 1
"""
        path = self.root / "etc" / "containerd.toml"
        path.write_text(text)
        return path

    def _render_cni(self) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.root / "cni" / "ipam"),
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                        # Services only: no default route, nothing leaves the machine
                        "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP}],
                    },
                }
            ],
        }
        (self.root / "cni" / "net.d" / "10-phabmesh-node.conflist").write_text(
            json.dumps(conflist, indent=2)
        )

    def _start_containerd(self) -> None:
        config = self._render_containerd()
        self._render_cni()
        self._spawn("containerd", ["containerd", "--config", config])
        self._wait("containerd's socket", self.socket.is_socket, "containerd", 30)
        self._wait(
            "containerd's CRI",
            lambda: self.ctr("version", check=False).returncode == 0,
            "containerd",
            30,
        )

    def _remove_containers(self) -> None:
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
        time.sleep(0.3)
        for task in self.ctr("tasks", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "rm", "-f", task, check=False)
        for container in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("containers", "rm", container, check=False)

    # network

    def _create_bridge(self) -> None:
        """The bridge with the node's address, before the kubelet binds to it."""
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # the host reaches Services through the bridge, as a member of the pod network
        _run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)
        # route_localnet lets the DNAT below reach 127.0.0.1; nothing else from the bridge
        # may (the kubelet's KUBE-FIREWALL says the same, once it runs)
        _run(
            "iptables", "-w", "-I", "INPUT", "1", "-i", BRIDGE, "-d", "127.0.0.0/8",
            "-m", "conntrack", "!", "--ctstate", "DNAT",
            "-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP",
        )  # fmt: skip
        Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")
        # pods have no default route; should one add its own, nothing is forwarded off the
        # bridge (the bridge plugin turns forwarding on for the host)
        _run(
            "iptables", "-w", "-I", "FORWARD", "1", "-i", BRIDGE, "!", "-o", BRIDGE,
            "-m", "comment", "--comment", RULE_COMMENT, "-j", "DROP",
        )  # fmt: skip

    def _route_kubernetes_service(self) -> None:
        """Pods' ``kubernetes`` Service (10.96.0.1:443) to the API server on 127.0.0.1."""
        port = self.plane.apiserver_port
        # kube-proxy's KUBE-SERVICES jump is prepended when it starts: ours goes before it
        self._wait(
            "kube-proxy's rules",
            lambda: any("-j KUBE-SERVICES" in r for r in _iptables_rules("iptables", "nat")),
            "kube-proxy",
            60,
        )
        # from pods (PREROUTING) and from the host (OUTPUT), as every other Service
        for chain, match in (("PREROUTING", ["-i", BRIDGE]), ("OUTPUT", [])):
            _run(
                "iptables", "-w", "-t", "nat", "-I", chain, "1", *match,
                "-d", KUBERNETES_SERVICE_IP, "-p", "tcp", "--dport", "443",
                "-m", "comment", "--comment", RULE_COMMENT,
                "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}",
            )  # fmt: skip
        # an endpoint for the Service (the API server runs --endpoint-reconciler-type=none),
        # so that it looks as in any cluster and kube-proxy writes a DNAT for it, not a
        # "has no endpoints" REJECT; the rules above catch the packets before either
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {
                    "kubernetes.io/service-name": "kubernetes",
                    "endpointslice.kubernetes.io/managed-by": "phabmesh.dev",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        self.plane.kubectl("apply", "-f", "-", input=json.dumps(slice_))

    # kubelet and kube-proxy

    def _write_kubeconfig(self, user: str, name: str) -> Path:
        path = self.root / "etc" / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(self.plane.pki.kubeconfig(self.plane.server, user)))
        path.chmod(0o600)
        return path

    def kubelet_config(self) -> dict[str, Any]:
        pki = self.plane.pki
        crt, key = pki.pair("kubelet-serving")
        sock = f"unix://{self.socket}"
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": KUBELET_HEALTHZ_PORT,
            "tlsCertFile": str(crt),
            "tlsPrivateKeyFile": str(key),
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": sock,
            "imageServiceEndpoint": sock,
            # containerd 1.6 has no CRI RuntimeConfig: the kubelet takes the driver from here
            "cgroupDriver": "cgroupfs",
            # kubelet 1.35+ refuses cgroup v1 hosts unless told otherwise
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(self.root / "pod-logs"),
            "staticPodPath": "",
            "clusterDNS": [CLUSTER_DNS_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": "",
            "registerNode": True,
            "serializeImagePulls": False,
            # a small shared machine: eviction must not fire on a busy disk
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
                "nodefs.inodesFree": "2%",
            },
            "imageGCHighThresholdPercent": 99,
            "imageGCLowThresholdPercent": 98,
            "maxPods": 30,
            "nodeStatusReportFrequency": "10s",
            "nodeStatusUpdateFrequency": "10s",
            "volumePluginDir": str(self.root / "kubelet" / "volume-plugins"),
        }

    def _start_kubelet(self) -> None:
        assert self.binaries is not None
        config = self.root / "etc" / "kubelet.yaml"
        config.write_text(yaml.safe_dump(self.kubelet_config()))
        kubeconfig = self._write_kubeconfig("kubelet-client", "kubelet")
        label = "=".join(NODE_LABEL)
        self._spawn(
            "kubelet",
            [
                self.binaries.kubelet,
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={self.root / 'kubelet'}",
                f"--cert-dir={self.root / 'kubelet' / 'pki'}",
                f"--hostname-override={self.name}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={label}",
                "--v=2",
            ],
        )
        self._wait("the Node Ready", self.ready, "kubelet", 120)

    def ready(self) -> bool:
        result = self.plane.kubectl(
            "get",
            "node",
            self.name,
            "-o",
            'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            check=False,
        )
        return result.returncode == 0 and result.stdout.strip() == "True"

    def _start_kube_proxy(self) -> None:
        assert self.binaries is not None
        from phabmesh.dev.devcluster import free_port

        self.kube_proxy_ports = (free_port(), free_port())
        kubeconfig = self._write_kubeconfig("kube-proxy", "kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": self.name,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{self.kube_proxy_ports[0]}",
            "metricsBindAddress": f"127.0.0.1:{self.kube_proxy_ports[1]}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
            # leave the host's conntrack settings alone
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        path = self.root / "etc" / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._spawn("kube-proxy", [self.binaries.kube_proxy, f"--config={path}", "--v=2"])

    # pods

    def _delete_pods(self, timeout: float = 60, grace_period: int = 3) -> None:
        """Every pod on the node deleted through the API: the kubelet stops each (CNI DEL).
        Each gets at most ``grace_period`` seconds to exit after its SIGTERM."""
        selector = f"spec.nodeName={self.name}"
        self.plane.kubectl(
            "delete", "pods", "-A", f"--field-selector={selector}", "--wait=false",
            f"--grace-period={grace_period}", check=False,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.plane.kubectl(
                "get", "pods", "-A", f"--field-selector={selector}", "-o", "name", check=False
            )
            if left.returncode != 0 or not left.stdout.strip():
                return
            time.sleep(0.5)
        self.plane.kubectl(
            "delete", "pods", "-A", f"--field-selector={selector}", "--force",
            "--grace-period=0", check=False,
        )  # fmt: skip

    def install(self, images: Iterable[Path] = (), manifests: Iterable[Path | str] = ()) -> None:
        """Import image archives, then apply manifests (files, directories or YAML text):
        e.g. CoreDNS (image ``localhost/coredns:...``, Service ``kube-system/kube-dns`` at
        ``CLUSTER_DNS_IP``) or phabmesh's own."""
        for archive in images:
            self.import_image(Path(archive))
        for manifest in manifests:
            if isinstance(manifest, Path):
                self.plane.kubectl("apply", "-f", str(manifest))
            else:
                self.plane.kubectl("apply", "-f", "-", input=manifest)

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of the node's processes, KiB."""
        out = {}
        for name in ("containerd", "kubelet", "kube-proxy"):
            pid = self.pid(name)
            if pid is None:
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = int(line.split()[1])
        return out


def leftovers(node_dir: Path) -> list[str]:
    """What a node with ``node_dir`` left on the host, if anything (after ``stop()``: nothing):
    its processes, mounts under the directory, kubepods cgroups, the bridge, KUBE-* chains,
    our CNI chains and rules, container log links, the lock."""
    root = str(node_dir.resolve())
    left = [f"process {pid}" for pid in _processes_mentioning(root + "/", NODE_PROCESSES)]
    left += [f"mount {target}" for target in _mounts_under(node_dir)]
    left += [f"cgroup {path}" for path in _cgroup_roots()]
    if Path("/sys/class/net", BRIDGE).exists():
        left.append(f"bridge {BRIDGE}")
    left += iptables_leftovers()
    if CONTAINER_LOGS.is_dir():
        left += [
            f"log link {link}"
            for link in CONTAINER_LOGS.iterdir()
            if link.is_symlink() and os.readlink(link).startswith(root + "/")
        ]
    left += [f"CNI cache {p}" for p in (CNI_CACHE / "results").glob(f"{CNI_NETWORK}-*")]
    if STATE_DIR.exists():
        left.append(f"state {STATE_DIR}")
    return left
