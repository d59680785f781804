"""docs/install.md, "On the local control plane", walked end to end as its reader walks it.

The commands come from the doc itself: its ``sh`` block, run in order, once with
``kubectl apply -k manifests/`` and once with the Helm command its comment gives instead;
then its "Uninstalling" section (with Helm, docs/helm.md's "Uninstall" block for step 2 on).
A doc change that breaks the path breaks this test.

Everything runs as the doc says, as processes: ``phabmesh dev-cluster`` (what ``make
dev-cluster`` runs) and ``phabmesh dev-conduit`` on a free port (the doc's 8081 is replaced
by it), ``kubectl`` the control plane's, ``kubectl phabmesh`` found by kubectl as the plugin
executable on ``PATH``, ``helm`` the cached build, ``make run`` from the checkout. Between the
doc's steps the test acts as a cluster admin: a bot and a binding (the samples), a meshed pod
that KWOK runs, ``kubectl phabmesh check``, then something broken on purpose.

Both ways share one control plane: each begins by asserting that nothing of phabmesh is on
it (the previous way's uninstall left it clean), and starts a fresh one if something is.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phabmesh.dev import devcluster
from phabmesh.dev.devcluster import free_port
from tests.kube import wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
INSTALL_MD = REPO / "docs" / "install.md"
HELM_MD = REPO / "docs" / "helm.md"
SYSTEM = "phabmesh-system"
DOC_CONDUIT = "127.0.0.1:8081"  # where the doc's dev-conduit listens; the test's own port instead
FIX_INJECTION = "docs/troubleshooting.md#a-pod-has-no-phabmesh-token-volume"
MESHED_POD = """\
apiVersion: v1
kind: Pod
metadata: {name: ci-runner-0, namespace: ci, labels: {app: ci-runner}}
spec:
  serviceAccountName: ci-runner
  initContainers:
    - {name: linkerd-proxy, image: "cr.l5d.io/linkerd/proxy:stable", restartPolicy: Always}
  containers:
    - {name: runner, image: "registry.invalid/ci-runner:1"}
"""


# -- the doc --------------------------------------------------------------------------------


def section(path: Path, title: str) -> str:
    """The text of ``## title`` in ``path``, up to the next ``## `` heading."""
    text = path.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{path.name} has no section {title!r}"
    return match.group(1)


def sh_blocks(text: str) -> list[list[str]]:
    """Each ```sh block of ``text``: its non-empty lines, unindented."""
    blocks = re.findall(r"^[ \t]*```sh\n(.*?)^[ \t]*```", text, re.M | re.S)
    return [[line.strip() for line in block.splitlines() if line.strip()] for block in blocks]


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of a shell line whose comment is `` # ...``."""
    command, _, comment = line.partition(" #")
    return command.strip(), comment.strip()


def walk_commands(way: str) -> list[str]:
    """The local-control-plane block, with the Helm alternative of its comment for "helm"."""
    (block,) = sh_blocks(section(INSTALL_MD, "On the local control plane"))
    commands, alternatives = [], 0
    for line in block:
        command, comment = split_comment(line)
        if way == "helm" and comment.startswith("or: helm "):
            command, alternatives = comment.removeprefix("or: "), alternatives + 1
        commands.append(command)
    assert way == "kustomize" or alternatives == 1, "the doc's helm alternative is gone"
    return commands


def uninstall_commands(way: str) -> tuple[list[str], list[str]]:
    """install.md's "Uninstalling": (step 1, run while the operator runs; the rest, in
    order). Installed with Helm, step 2 on is helm.md's "Uninstall" block."""
    text = section(INSTALL_MD, "Uninstalling")
    step1, kopf = sh_blocks(text)
    assert any("clusterkopfpeerings.kopf.dev" in line for line in kopf)
    if way == "kustomize":
        rest = re.findall(r"^\d+\. `([^`]+)`", text, re.M)
        assert rest == ["make undeploy", "make uninstall"], rest
    else:
        assert "helm.md#uninstall" in text  # the step that says where Helm's way goes on
        rest = sh_blocks(section(HELM_MD, "Uninstall"))[0]
    return [split_comment(line)[0] for line in step1], [
        split_comment(line)[0] for line in [*rest, *kopf]
    ]


# -- the processes the doc starts -----------------------------------------------------------


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _interrupt(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """Ctrl-C in its terminal: SIGINT to its whole process group; its exit code."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


class Terminal:
    """A long-running command of the doc, in its own process group, output to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_for_line(self, text: str, timeout: float, what: str) -> str:
        def said() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{what} exited ({self.proc.returncode}):\n{self.output}")
            out = self.output
            return out if text in out else None

        said_it = wait_for(said, timeout=timeout, interval=0.1, what=what)
        assert said_it is not None
        return said_it

    @property
    def output(self) -> str:
        return _output(self.log)

    def interrupt(self) -> int:
        code = _interrupt(self.proc)
        wait_for(lambda: _group_gone(self.proc.pid), timeout=10, what="its processes to exit")
        return code


def python_env() -> dict[str, str]:
    """This checkout's phabmesh first on the path of every Python process started."""
    paths = [str(REPO / "operator"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


class DevCluster:
    """``phabmesh dev-cluster`` (what ``make dev-cluster`` runs) in the foreground of its own
    terminal; the KUBECONFIG it prints."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True)
        self.terminal = Terminal(
            [sys.executable, "-m", "phabmesh.cli", "dev-cluster", "--data-dir", f"{workdir}/cp"],
            workdir / "dev-cluster.out",
            python_env(),
        )
        said = self.terminal.wait_for_line("Press Ctrl-C", 120, "the control plane")
        (kubeconfig,) = re.findall(r"export KUBECONFIG=(\S+)", said)
        self.kubeconfig = Path(kubeconfig)

    def stop(self) -> None:
        assert self.terminal.interrupt() == 0, self.terminal.output[-2000:]


class Walker:
    """The reader's shell: kubectl, its phabmesh plugin, helm and make on PATH, KUBECONFIG."""

    def __init__(self, home: Path, kubeconfig: Path, conduit_port: int) -> None:
        self.home = home
        self.conduit = f"127.0.0.1:{conduit_port}"
        bin_dir = home / "bin"
        bin_dir.mkdir(parents=True)
        binaries = devcluster.build_binaries()
        (bin_dir / "kubectl").symlink_to(binaries.kubectl)
        (bin_dir / "helm").symlink_to(devcluster.helm())
        # kubectl runs `kubectl phabmesh` as the executable kubectl-phabmesh on PATH: the one
        # the package installs runs `python -m phabmesh.kubectl`, as this one does.
        plugin = f'exec {sys.executable} -m phabmesh.kubectl "$@"'
        self._script(bin_dir / "kubectl-phabmesh", plugin)
        # make, with STAMP empty (as tests/integration/test_uninstall.py runs it): the
        # virtualenv this test runs in is the one to use, not one for make to (re)build.
        make = shutil.which("make")
        assert make, "make is not installed"
        self._script(bin_dir / "make", f'exec {make} STAMP= "$@"')
        self.env = python_env()
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            KUBECONFIG=str(kubeconfig),
            HELM_CONFIG_HOME=str(home / "helm" / "config"),
            HELM_CACHE_HOME=str(home / "helm" / "cache"),
            HELM_DATA_HOME=str(home / "helm" / "data"),
        )
        self.env.pop("KUBECTL", None)

    @staticmethod
    def _script(path: Path, line: str) -> None:
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(0o755)

    def line(self, command: str) -> str:
        """The doc's command as run here: its Conduit address is this test's."""
        return command.replace(DOC_CONDUIT, self.conduit)

    def sh(self, command: str, *, check: bool = True, timeout: float = 120) -> str:
        done = subprocess.run(
            ["bash", "-c", self.line(command)],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        return done.stdout

    def json(self, command: str) -> Any:
        return json.loads(self.sh(command))

    def start(self, command: str, name: str, **env: str) -> Terminal:
        return Terminal(
            ["bash", "-c", self.line(command)], self.home / f"{name}.out", {**self.env, **env}
        )

    def check(self) -> dict[str, dict[str, str]]:
        done = subprocess.run(
            ["kubectl", "phabmesh", "check", "-o", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        answer = json.loads(done.stdout)
        assert done.returncode == (0 if answer["ok"] else 1), done.stderr
        return {c["check"]: c for c in answer["checks"]}

    def leftovers(self) -> list[str]:
        """Every object of phabmesh's on the cluster (Events aside: records of what was)."""
        kinds = self.sh("kubectl api-resources --verbs=list -o name").split()
        kinds = [k for k in kinds if k.split(".")[0] != "events"]
        found = self.json(f"kubectl get {','.join(kinds)} -A -o json")["items"]
        left = []
        for item in found:
            meta = item["metadata"]
            labels = meta.get("labels") or {}
            if (
                "phabmesh" in meta["name"]
                or meta.get("namespace") == SYSTEM
                or labels.get("app.kubernetes.io/part-of") in ("phabmesh", "phabmesh-dev")
                or meta["name"] == "clusterkopfpeerings.kopf.dev"
                or item["kind"] in ("PhabricatorBot", "PhabricatorBinding", "PhabricatorCredential")
            ):
                left.append(f"{item['kind']} {meta.get('namespace') or ''}/{meta['name']}")
        return left


# -- fixtures -------------------------------------------------------------------------------


class Plane:
    """The module's control plane, replaced by a fresh one when a walk left it unclean."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started = 0
        self.current = self._start()

    def _start(self) -> DevCluster:
        self.started += 1
        return DevCluster(self.root / f"plane-{self.started}")

    def clean(self, home: Path) -> DevCluster:
        """The control plane, with nothing of phabmesh on it."""
        if Walker(home, self.current.kubeconfig, 0).leftovers():
            self.current.stop()
            self.current = self._start()
        return self.current


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    holder = Plane(tmp_path_factory.mktemp("walk"))
    yield holder
    holder.current.stop()


# -- the walk -------------------------------------------------------------------------------


def _statuses(checks: dict[str, dict[str, str]]) -> dict[str, str]:
    return {name: c["status"] for name, c in checks.items()}


def _active_leases(walker: Walker) -> list[dict[str, Any]]:
    items = walker.json("kubectl -n ci get phabricatorcredentials -o json")["items"]
    return [i for i in items if (i.get("status") or {}).get("phase") == "Active"]


@pytest.mark.parametrize("way", ["kustomize", "helm"])
def test_install_on_the_local_control_plane_use_break_and_uninstall(
    plane: Plane, tmp_path: Path, way: str
) -> None:
    conduit_port = free_port()
    cluster = plane.clean(tmp_path / "probe")
    walker = Walker(tmp_path / "shell", cluster.kubeconfig, conduit_port)
    assert walker.leftovers() == []
    commands = walk_commands(way)
    assert commands[-1].endswith("make run"), commands  # the one that keeps running

    # The second terminal: dev-conduit, with the KUBECONFIG dev-cluster printed.
    conduit = walker.start(
        f"exec {sys.executable} -m phabmesh.cli dev-conduit --port {conduit_port}", "dev-conduit"
    )
    run: Terminal | None = None
    try:
        conduit.wait_for_line("Ctrl-C stops it.", 30, "dev-conduit")
        assert f"Secret {SYSTEM}/ci-bot-token" in conduit.output

        # The doc's block, in order.
        for command in commands[:-1]:
            out = walker.sh(command)
            if "check --pre" in command:
                rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
                assert rows == {
                    "kubernetes": "OK",
                    "linkerd": "OK",
                    "existing": "OK",
                    "permissions": "OK",
                }, out
        # make run: its listeners on ephemeral ports of 127.0.0.1 (other runs share this
        # machine); the rest is the doc's line.
        ports = {
            f"PHABMESH_{name}": value
            for name, value in (
                ("ENDPOINT_HOST", "127.0.0.1"),
                ("GATEWAY_HOST", "127.0.0.1"),
                ("WEBHOOK_HOST", "127.0.0.1"),
                ("ENDPOINT_PORT", "0"),
                ("GATEWAY_PORT", "0"),
                ("HOOKS_PORT", "0"),
                ("METRICS_PORT", "0"),
                ("WEBHOOK_PORT", "0"),
            )
        }
        run = walker.start(commands[-1], "make-run", **ports)
        said = run.wait_for_line("Ctrl-C stops them", 90, "make run")
        assert f"Phabricator: http://{walker.conduit}" in said
        assert "PHABMESH_REQUIRE_CLIENT_ID=false" in said
        if way == "helm":
            assert "phabmesh" in walker.sh(f"helm list -n {SYSTEM} -q").split()

        # A cluster admin's first bot, binding and meshed pod.
        walker.sh("kubectl apply -f manifests/samples/demo.yaml")
        walker.sh("kubectl wait --for=condition=Ready phabricatorbot/ci-bot --timeout=60s")
        walker.sh(
            "kubectl -n ci wait --for=condition=Ready phabricatorbinding/ci-runners --timeout=60s"
        )

        # Applied together, the binding waited for the bot's first check: no Warning that
        # the bot is not Ready.
        def binding_events() -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = walker.json(
                "kubectl -n ci get events -o json --field-selector=involvedObject.name=ci-runners"
            )["items"]
            said = {(e["type"], e["reason"]) for e in found}
            return found if ("Normal", "Ready") in said else []

        on_binding = wait_for(binding_events, what="the binding's Ready Event")
        assert "BotNotReady" not in {e["reason"] for e in on_binding}, on_binding
        subprocess.run(
            ["kubectl", "apply", "-f", "-"],
            input=MESHED_POD,
            env=walker.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        walker.sh("kubectl -n ci wait --for=condition=Ready pod/ci-runner-0 --timeout=60s")
        (lease,) = wait_for(lambda: _active_leases(walker), timeout=60, what="the pod's lease")
        assert lease["spec"]["podName"] == "ci-runner-0"
        why = walker.json("kubectl phabmesh why ci-runner-0 -n ci -o json")
        assert (why["credential"], why["reason"]) == (True, "Matched"), why

        # check: every line OK but the two the doc names.
        checks = walker.check()
        expected = dict.fromkeys(checks, "OK") | {"config": "WARN", "injection": "FAIL"}
        assert _statuses(checks) == expected, checks
        assert "PHABMESH_REQUIRE_CLIENT_ID is false" in checks["config"]["message"]
        injection = checks["injection"]["message"]
        assert "binding ci/ci-runners" in injection and "NOT injected" in injection, injection
        assert injection.count(FIX_INJECTION) == 1, injection
        assert checks["peering"]["message"].startswith("1 live replica(s)"), checks["peering"]
        url = f"http://{walker.conduit}"
        assert url in checks["phabricator (from here)"]["message"]
        assert url in checks["phabricator (in-cluster)"]["message"]
        assert checks["bots"]["message"] == "1 Ready"

        # Broken on purpose: the bot's token Secret is deleted. The bot is not Ready, the
        # pod's lease is revoked, and check names the reason and where the fix is.
        walker.sh(f"kubectl -n {SYSTEM} delete secret ci-bot-token")
        wait_for(lambda: not _active_leases(walker), timeout=60, what="the lease's revocation")
        revoked = wait_for(
            lambda: walker.json(
                "kubectl -n ci get events -o json "
                "--field-selector=reason=CredentialRevoked,involvedObject.name=ci-runner-0"
            )["items"],
            what="the pod's CredentialRevoked Event",
        )
        assert [e["message"].rsplit(": ", 1)[-1] for e in revoked] == ["BotNotReady"], revoked
        checks = walker.check()
        assert checks["bots"]["status"] == "WARN"
        assert "ci-bot (SecretMissing)" in checks["bots"]["message"]
        assert "(see docs/troubleshooting.md#phabricatorbot-ready)" in checks["bots"]["message"]
        assert "ci/ci-runners (BotNotReady)" in checks["bindings"]["message"]
        # The operator's last check of the bot called no Phabricator: nothing says it reached it.
        in_cluster = checks["phabricator (in-cluster)"]
        assert in_cluster["status"] == "WARN", in_cluster
        assert "SecretMissing" in in_cluster["message"], in_cluster
        why = walker.json("kubectl phabmesh why ci-runner-0 -n ci -o json")
        assert (why["credential"], why["reason"]) == (False, "BotNotReady"), why

        # Uninstalling: step 1 while make run runs, then Ctrl-C, then the rest.
        while_running, after = uninstall_commands(way)
        for command in while_running:
            walker.sh(command, timeout=90)
        # make ends itself with the SIGINT once its command has stopped: an exit by SIGINT
        # is Ctrl-C's usual end of `make run`; what phabmesh said on its way out is below.
        code = run.interrupt()
        assert code in (0, -signal.SIGINT), run.output[-3000:]
        assert "Traceback" not in run.output, run.output[-3000:]
        assert '"level": "error"' not in run.output, run.output[-3000:]
        run = None
        for command in after:
            walker.sh(command, timeout=150)
        # What the admin made: the samples' namespace (its pod with it).
        walker.sh("kubectl delete namespace ci --timeout=60s")
        assert walker.leftovers() == []
    finally:
        if run is not None:
            _interrupt(run.proc)
        _interrupt(conduit.proc)
