"""phabmesh's image, built here without Docker or a registry: `make image`.

Three layers in an OCI image archive (``phabmesh.dev.ociimage``) that ``podman load`` and
``ctr -n k8s.io images import`` read, named as the chart and kustomize reference it
(``ghcr.io/phabmesh/phabmesh:<version>``):

1. Debian bookworm from mmdebstrap: the Essential packages (``sh``, ``test``) plus
   ``imagerecipe/packages`` (Debian's python3, 3.11), without documentation or translations
   (``imagerecipe/dpkg-excludes``), finished by ``imagerecipe/finish.sh`` (user and group 65532
   ``phabmesh``, no package lists). No apt, no pip, no compiler. The mirror is the one this
   machine's apt uses (its Debian entries in /etc/apt), so the build works wherever apt does;
   PHABMESH_IMAGE_MIRROR (a mirror URL) overrides it.
   This layer is cached under ~/.cache/phabmesh keyed by all of its inputs.
2. The Python packages (a layer of the dependencies, cached like the first, and one of
   phabmesh itself): the wheel of this checkout and the dependencies constraints.txt pins
   (binary wheels for CPython 3.11 on manylinux x86_64), installed by the host's pip into
   /usr/local/lib/python3.11/dist-packages (where Debian's python3 looks), the console scripts
   in /usr/local/bin, byte-compiled with hash-checked pycs (valid on a read-only root whatever
   the file times). The Dockerfile builds the same tree with the same code
   (``python -m phabmesh.dev.image python-tree``).

Every timestamp is ``SOURCE_DATE_EPOCH`` (0 by default): the same inputs give the same digests.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from phabmesh import __version__
from phabmesh.dev import ociimage
from phabmesh.dev.gobuild import cache_home

REPO = Path(__file__).resolve().parents[3]
IMAGE_FILES = Path(__file__).resolve().parent / "imagerecipe"
# What the chart (values.yaml image.repository, Chart.yaml appVersion) and kustomize
# (manifests/kustomization.yaml images:) deploy.
REPOSITORY = "ghcr.io/phabmesh/phabmesh"
SUITE = "bookworm"
VARIANT = "essential"
PYTHON = "3.11"
SITE = f"/usr/local/lib/python{PYTHON}/dist-packages"
INTERPRETER = "/usr/bin/python3"
USER = "65532:65532"
# 8443 credential endpoint, 8080 Conduit gateway, 9090 metrics and health.
PORTS = ("8443/tcp", "8080/tcp", "9090/tcp")
ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
)
GLIBC_MINOR = 36  # bookworm's glibc 2.36
# pip's view of Debian bookworm's python3: CPython 3.11, glibc 2.36, x86_64. pip does not
# widen an explicit platform to the older manylinux ones it includes, so they are listed.
WHEEL_TARGET = (
    "--only-binary=:all:",
    "--implementation=cp",
    f"--python-version={PYTHON}",
    f"--abi=cp{PYTHON.replace('.', '')}",
    "--abi=abi3",
    "--abi=none",
    *(f"--platform=manylinux_2_{minor}_x86_64" for minor in range(GLIBC_MINOR, 4, -1)),
    *(f"--platform=manylinux{tag}_x86_64" for tag in ("2014", "2010", "1")),
)
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
# Host apt settings that decide how the mirror is reached, passed on to mmdebstrap's apt.
APT_PASS_THROUGH = (
    "Acquire::Check-Valid-Until",
    "Acquire::Check-Date",
    "Acquire::http::Proxy",
    "Acquire::https::Proxy",
)

Log = Callable[[str], None]


class ImageError(RuntimeError):
    """The image could not be built; the message says what to install or fix."""


def image_name() -> str:
    return f"{REPOSITORY}:{__version__}"


def archive_path(build_dir: Path | None = None) -> Path:
    return (build_dir or REPO / "build") / "image" / f"phabmesh-{__version__}.oci.tar"


def image_config() -> ociimage.ImageConfig:
    """How a container of the image starts: as the Dockerfile says."""
    return ociimage.ImageConfig(
        entrypoint=("phabmesh",),
        cmd=("operator",),
        user=USER,
        env=ENV,
        exposed_ports=PORTS,
        labels=(
            ("org.opencontainers.image.title", "phabmesh"),
            ("org.opencontainers.image.version", __version__),
        ),
    )


def packages(path: Path | None = None) -> list[str]:
    """imagerecipe/packages: one Debian package a line, `#` comments."""
    names = []
    for line in (path or IMAGE_FILES / "packages").read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
                raise ImageError(f"imagerecipe/packages: {name!r} is not a Debian package name")
            names.append(name)
    return names


# -- the Debian mirror ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""

    def deb822(self) -> str:
        lines = [
            "Types: deb",
            f"URIs: {' '.join(self.uris)}",
            f"Suites: {' '.join(self.suites)}",
            f"Components: {' '.join(self.components)}",
        ]
        if self.signed_by:
            lines.append(f"Signed-By: {self.signed_by}")
        return "\n".join(lines) + "\n"


def _parse_deb822(text: str) -> Iterator[Source]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:  # a continuation (an inline key, for one)
                fields[key] += "\n" + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        yield Source(
            tuple(fields.get("uris", "").split()),
            tuple(fields.get("suites", "").split()),
            tuple(fields.get("components", "").split()),
            fields.get("signed-by", ""),
        )


def _parse_one_line(text: str) -> Iterator[Source]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        options = ""
        if match := re.match(r"deb\s+\[([^\]]*)\]\s*(.*)", line):
            options, line = match.group(1), "deb " + match.group(2)
        parts = line.split()
        if len(parts) < 3 or parts[0] != "deb":
            continue
        signed = re.search(r"signed-by=(\S+)", options)
        yield Source((parts[1],), (parts[2],), tuple(parts[3:]), signed.group(1) if signed else "")


def host_sources(suite: str = SUITE, places: Sequence[Path] = SOURCES) -> list[Source]:
    """This machine's apt entries for Debian's `suite` (and its -updates and -security):
    main among the components, signed by Debian's archive key (or by nothing named, as in a
    plain sources.list). Other repositories are left out."""
    found: list[Source] = []
    files: list[Path] = []
    for place in places:
        if place.is_dir():
            files += sorted(p for p in place.iterdir() if p.suffix in (".list", ".sources"))
        elif place.is_file():
            files.append(place)
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    for path in files:
        text = path.read_text(errors="replace")
        parsed = _parse_deb822(text) if path.suffix == ".sources" else _parse_one_line(text)
        for source in parsed:
            suites = tuple(s for s in source.suites if s in wanted)
            if not suites or "main" not in source.components:
                continue
            if source.signed_by and "debian-archive-keyring" not in source.signed_by:
                continue
            found.append(dataclasses.replace(source, suites=suites, components=("main",)))
    return found


def mirror_sources(suite: str = SUITE) -> str:
    """The sources list the rootfs is built from: PHABMESH_IMAGE_MIRROR (a Debian mirror URL)
    if set, else the host's Debian entries, else empty (mmdebstrap's default,
    deb.debian.org)."""
    mirror = os.environ.get("PHABMESH_IMAGE_MIRROR", "").strip()
    if mirror:
        if not re.fullmatch(r"https?://\S+", mirror):
            raise ImageError(
                f"PHABMESH_IMAGE_MIRROR={mirror!r}: give a Debian mirror URL "
                "(http://deb.debian.org/debian)"
            )
        return Source((mirror,), (suite, f"{suite}-updates"), ("main",)).deb822()
    return "\n".join(source.deb822() for source in host_sources(suite))


def apt_options() -> list[str]:
    """The host's apt settings among APT_PASS_THROUGH, as mmdebstrap --aptopt values."""
    apt_config = shutil.which("apt-config")
    if apt_config is None:
        return []
    done = subprocess.run([apt_config, "dump"], capture_output=True, text=True, check=False)
    dump = done.stdout if done.returncode == 0 else ""
    options = []
    for line in dump.splitlines():
        key, _, value = line.partition(" ")
        if key in APT_PASS_THROUGH and value.endswith(";"):
            options.append(f"{key} {value}")
    return sorted(options)


# -- layer 1: the Debian root filesystem ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rootfs:
    """A Debian root filesystem made by mmdebstrap: the Essential set plus ``packages``, with
    ``dpkg_excludes`` (a dpkg config file) and ``finish`` (a script given the tree) applied."""

    name: str
    packages: tuple[str, ...]
    dpkg_excludes: Path | None = None
    finish: Path | None = None


def phabmesh_rootfs() -> Rootfs:
    """The Debian layer of phabmesh's image (imagerecipe/)."""
    return Rootfs(
        "image-rootfs",
        tuple(packages()),
        IMAGE_FILES / "dpkg-excludes",
        IMAGE_FILES / "finish.sh",
    )


def base_inputs(sources: str, recipe: Rootfs | None = None) -> dict[str, str]:
    """Everything a Debian layer is made of; its cache key is their digest."""
    recipe = recipe or phabmesh_rootfs()
    return {
        # the command, wherever the checkout is
        "command": shlex.join(mmdebstrap_command(Path("SOURCES"), Path("OUT"), recipe)).replace(
            str(REPO), "REPO"
        ),
        "dpkg-excludes": recipe.dpkg_excludes.read_text() if recipe.dpkg_excludes else "",
        "finish.sh": recipe.finish.read_text() if recipe.finish else "",
        "sources": sources,
        "epoch": str(ociimage.epoch()),
        "layer-writer": hashlib.sha256(Path(ociimage.__file__).read_bytes()).hexdigest(),
    }


def _digest(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _save_layer(layer: ociimage.Layer, meta: Path) -> None:
    meta.write_text(
        json.dumps({"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size})
    )


def _load_layer(path: Path, meta: Path) -> ociimage.Layer | None:
    if not (path.is_file() and meta.is_file()):
        return None
    fields = json.loads(meta.read_text())
    if path.stat().st_size != fields["size"]:
        return None
    return ociimage.Layer(path, fields["digest"], fields["diff_id"], fields["size"])


def mmdebstrap_command(
    sources_file: Path | None, out: Path, recipe: Rootfs | None = None
) -> list[str]:
    recipe = recipe or phabmesh_rootfs()
    command = ["mmdebstrap", f"--variant={VARIANT}", f"--include={','.join(recipe.packages)}"]
    if recipe.dpkg_excludes is not None:
        command.append(f"--dpkgopt={recipe.dpkg_excludes}")
    if recipe.finish is not None:
        command.append(f'--customize-hook={shlex.quote(str(recipe.finish))} "$1"')
    if MERGED_USR_HOOKS.is_dir():
        # usr-is-merged instead of the usrmerge package (which would bring perl).
        command.append(f"--hook-dir={MERGED_USR_HOOKS}")
    command += [f"--aptopt={option}" for option in apt_options()]
    command += ["--format=tar", SUITE, str(out)]
    if sources_file is not None:
        command.append(str(sources_file))
    return command


def base_layer(
    recipe: Rootfs | None = None, *, rebuild: bool = False, log: Log = print
) -> tuple[ociimage.Layer, bool]:
    """A Debian layer (phabmesh's by default), from the cache when its inputs are unchanged.
    Returns the layer and whether it came from the cache."""
    recipe = recipe or phabmesh_rootfs()
    sources = mirror_sources()
    key = _digest(base_inputs(sources, recipe))
    cache = cache_home() / f"{recipe.name}-{SUITE}-{key}"
    layer_path, meta = cache / "rootfs.tar.gz", cache / "rootfs.json"
    with _locked(cache_home() / f"{recipe.name}-{SUITE}-{key}.lock"):
        if not rebuild and (cached := _load_layer(layer_path, meta)):
            return cached, True
        if shutil.which("mmdebstrap") is None:
            raise ImageError(
                "mmdebstrap is missing: as root, apt-get install mmdebstrap "
                "(it builds the image's Debian root filesystem)"
            )
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            sources_file = None
            if sources:
                sources_file = Path(scratch) / "debian.sources"
                sources_file.write_text(sources)
            rootfs = Path(scratch) / "rootfs.tar"
            log(f"image: Debian {SUITE} root filesystem (mmdebstrap, {VARIANT} + packages)")
            env = dict(os.environ, SOURCE_DATE_EPOCH=str(ociimage.epoch()))
            done = subprocess.run(
                mmdebstrap_command(sources_file, rootfs, recipe),
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                tail = "\n".join(done.stderr.splitlines()[-15:])
                raise ImageError(
                    f"mmdebstrap failed (exit {done.returncode}); its last lines:\n{tail}\n"
                    "Does `apt-get update` work on this machine? The image uses the same "
                    "Debian mirror (or PHABMESH_IMAGE_MIRROR)."
                )
            partial = Path(scratch) / "rootfs.tar.gz"
            layer = ociimage.layer_from_tar(rootfs, partial)
            partial.replace(layer_path)
            layer = dataclasses.replace(layer, path=layer_path)
            _save_layer(layer, meta)
        return layer, False


# -- layer 2: the Python packages -----------------------------------------------------------


def _pip(*args: str | Path, log: Log) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise ImageError(f"pip {args[0]} failed (exit {done.returncode}):\n{tail}")


def dependency_wheels(log: Log = print) -> Path:
    """The binary wheels of the dependencies constraints.txt pins, for Debian's python3;
    downloaded once per constraints.txt and pyproject.toml."""
    inputs = {
        "constraints": (REPO / "constraints.txt").read_text(),
        "pyproject": (REPO / "pyproject.toml").read_text(),
        "target": " ".join(WHEEL_TARGET),
    }
    wheels = cache_home() / f"image-wheels-py{PYTHON}-{_digest(inputs)}"
    with _locked(wheels.with_name(wheels.name + ".lock")):
        if (wheels / ".complete").is_file():
            return wheels
        shutil.rmtree(wheels, ignore_errors=True)
        log("image: dependency wheels (pip download, constraints.txt)")
        _pip(
            "download",
            "--quiet",
            *WHEEL_TARGET,
            "--constraint",
            REPO / "constraints.txt",
            "--dest",
            wheels,
            REPO,
            log=log,
        )
        for own in wheels.glob("phabmesh-*"):
            own.unlink()
        (wheels / ".complete").touch()
        return wheels


# What the wheel is built from (as the Dockerfile copies it).
WHEEL_SOURCES = ("pyproject.toml", "README.md", "operator")


def _own_wheel(scratch: Path, log: Log) -> Path:
    """The wheel of this checkout, built from a copy of its sources: setuptools builds in
    the source tree (build/lib), where files left by an earlier build would end up in the
    wheel too."""
    source, own = scratch / "source", scratch / "wheel"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    log("image: phabmesh wheel of this checkout")
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", own, source, log=log)
    return own


def _install(out: Path, find_links: Sequence[Path], *, deps: bool, log: Log) -> Path:
    """pip install phabmesh (and with `deps` its pinned dependencies) into out's SITE; its
    console scripts into out's /usr/local/bin, for Debian's python3; the others dropped."""
    site = out / SITE.lstrip("/")
    log(f"image: install into {SITE}" + ("" if deps else " (phabmesh alone)"))
    links = [arg for path in find_links for arg in ("--find-links", str(path))]
    _pip(
        "install",
        "--quiet",
        "--no-index",
        *links,
        *WHEEL_TARGET,
        *(() if deps else ("--no-deps",)),
        "--target",
        site,
        "--no-compile",
        "--no-warn-script-location",
        "--constraint",
        REPO / "constraints.txt",
        f"phabmesh=={__version__}",
        log=log,
    )
    own = _own_scripts(site)
    bindir = out / "usr/local/bin"
    bindir.mkdir(parents=True)
    for script in sorted((site / "bin").iterdir()):
        if script.name not in own:
            continue
        first, _, rest = script.read_text().partition("\n")
        if not first.startswith("#!"):
            raise ImageError(f"{script.name}: not a console script")
        (bindir / script.name).write_text(f"#!{INTERPRETER}\n{rest}")
        (bindir / script.name).chmod(0o755)
    shutil.rmtree(site / "bin")
    for forbidden in ("phabmesh/dev", "pip", "setuptools", "pytest", "_pytest", "ensurepip"):
        if (site / forbidden).exists():
            raise ImageError(f"{forbidden} must not be in the image")
    _compile(site, log)
    return site


def _own_scripts(site: Path) -> set[str]:
    """phabmesh's console scripts (its entry_points.txt)."""
    (info,) = site.glob(f"phabmesh-{__version__}.dist-info")
    text = (info / "entry_points.txt").read_text()
    section = re.search(r"^\[console_scripts\]\n(.*?)(?:^\[|\Z)", text, re.M | re.S)
    if not section:
        return set()
    return {line.split("=")[0].strip() for line in section.group(1).splitlines() if "=" in line}


def _compile(site: Path, log: Log) -> None:
    if sys.version_info[:2] != tuple(int(n) for n in PYTHON.split(".")):
        log(f"image: not byte-compiled (this Python is not {PYTHON})")
        return
    # Hash-checked pycs: valid whatever the files' times, so never rewritten (the root is
    # read-only, and PYTHONDONTWRITEBYTECODE says not to try). In a fresh interpreter with a
    # fixed hash seed: marshal's output depends on what the compiling process has interned
    # and on set order, and the same sources should give the same bytes.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode=checked-hash",
            "-s",
            str(site),
            "-p",
            SITE,
            str(site),
        ],
        env=dict(os.environ, PYTHONHASHSEED="0"),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:])
        raise ImageError(f"byte-compiling the Python packages failed:\n{tail}")


def python_tree(out: Path, log: Log = print) -> None:
    """Install phabmesh (this checkout's wheel) and its pinned dependencies under `out` as
    the image has them: SITE, console scripts in /usr/local/bin run by Debian's python3.
    What the Dockerfile copies into its image."""
    if any(out.iterdir()):
        raise ImageError(f"{out} is not empty: python-tree writes a fresh tree")
    deps = dependency_wheels(log)
    with tempfile.TemporaryDirectory() as scratch:
        _install(out, [_own_wheel(Path(scratch), log), deps], deps=True, log=log)


def python_layers(scratch: Path, log: Log = print) -> list[ociimage.Layer]:
    """Two layers: the dependencies (cached, keyed by the wheels constraints.txt pins) and
    phabmesh itself (this checkout, every time). Together, what python_tree writes."""
    deps = dependency_wheels(log)
    own_wheel = _own_wheel(scratch, log)
    key = _digest(
        {
            "wheels": deps.name,
            "recipe": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "python": ".".join(map(str, sys.version_info[:2])),
            "layer-writer": hashlib.sha256(Path(ociimage.__file__).read_bytes()).hexdigest(),
        }
    )
    cache = cache_home() / f"image-python-{key}"
    layer_path, meta = cache / "dependencies.tar.gz", cache / "dependencies.json"
    own = scratch / "own"
    own.mkdir()
    with _locked(cache.with_name(cache.name + ".lock")):
        cached = _load_layer(layer_path, meta)
        if cached:
            log("image: Python dependencies from the cache")
            _install(own, [own_wheel], deps=False, log=log)
        else:
            full = scratch / "full"
            full.mkdir()
            site = _install(full, [own_wheel, deps], deps=True, log=log)
            # phabmesh's own files go to the second layer
            own_site = own / SITE.lstrip("/")
            own_site.mkdir(parents=True)
            for name in ("phabmesh", f"phabmesh-{__version__}.dist-info"):
                (site / name).rename(own_site / name)
            (own / "usr/local/bin").parent.mkdir(parents=True, exist_ok=True)
            (full / "usr/local/bin").rename(own / "usr/local/bin")
            cache.mkdir(parents=True, exist_ok=True)
            partial = scratch / "dependencies.tar.gz"
            layer = ociimage.layer_from_dir(full, partial)
            shutil.move(partial, layer_path)
            cached = dataclasses.replace(layer, path=layer_path)
            _save_layer(cached, meta)
    return [cached, ociimage.layer_from_dir(own, scratch / "phabmesh.tar.gz")]


# -- the image ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Built:
    name: str
    path: Path
    digest: str
    compressed: int  # the archive's size
    uncompressed: int  # the layers' tars
    seconds: float
    base_cached: bool


def _uncompressed(layer: ociimage.Layer) -> int:
    size = 0
    with gzip.open(layer.path, "rb") as f:
        while chunk := f.read(ociimage.CHUNK):
            size += len(chunk)
    return size


def build(out: Path | None = None, *, rebuild_base: bool = False, log: Log = print) -> Built:
    """Build the image archive (default: build/image/phabmesh-<version>.oci.tar)."""
    started = time.monotonic()
    out = out or archive_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    base, cached = base_layer(rebuild=rebuild_base, log=log)
    if cached:
        log(f"image: Debian {SUITE} root filesystem from the cache")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        layers = [base, *python_layers(Path(scratch), log)]
        log(f"image: {image_name()} -> {out}")
        digest = ociimage.write_archive(image_name(), layers, image_config(), out)
        uncompressed = sum(_uncompressed(layer) for layer in layers)
    return Built(
        image_name(),
        out,
        digest,
        out.stat().st_size,
        uncompressed,
        time.monotonic() - started,
        cached,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m phabmesh.dev.image build|python-tree OUT|name|path``."""
    parser = argparse.ArgumentParser(prog="python -m phabmesh.dev.image")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image archive (make image)")
    b.add_argument("--out", type=Path, help=f"default: {archive_path().relative_to(REPO)}")
    b.add_argument(
        "--rebuild-base", action="store_true", help="rebuild the Debian layer (new packages)"
    )
    tree = sub.add_parser("python-tree", help="only the Python packages, under OUT (Dockerfile)")
    tree.add_argument("out", type=Path)
    sub.add_parser("name", help="print the image's name")
    sub.add_parser("path", help="print the archive's default path")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        if args.command == "build":
            built = build(args.out, rebuild_base=args.rebuild_base, log=log)
            mib = 1024 * 1024
            print(f"image:        {built.name}")
            print(f"archive:      {built.path}")
            print(f"manifest:     {built.digest}")
            print(f"compressed:   {built.compressed / mib:.1f} MiB")
            print(f"uncompressed: {built.uncompressed / mib:.1f} MiB")
            base = "cached" if built.base_cached else "built"
            print(f"took:         {built.seconds:.1f} s (Debian layer {base})")
            print(
                "import:       podman load -i ARCHIVE, or ctr -n k8s.io images import ARCHIVE; "
                "install with imagePullPolicy: Never"
            )
        elif args.command == "python-tree":
            args.out.mkdir(parents=True, exist_ok=True)
            python_tree(args.out, log)
        elif args.command == "name":
            print(image_name())
        else:
            print(archive_path())
    except ImageError as exc:
        print(f"make image: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
