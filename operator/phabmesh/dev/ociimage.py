"""Container images without a registry or a daemon: root filesystems written as the layers of
an OCI image archive (an `oci-layout` tar) that `ctr images import` and `podman load` read.

The archive is reproducible: entries sorted, every timestamp the same (`SOURCE_DATE_EPOCH`, 0
by default), gzip without a name or a time, so the same inputs give the same digests.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

LAYOUT = {"imageLayoutVersion": "1.0.0"}
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CHUNK = 1 << 20


def epoch() -> int:
    """The one timestamp every entry and the image carry."""
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """What `docker inspect` shows under `Config`: how a container of the image starts."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    env: tuple[str, ...] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
    workdir: str = "/"
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    def as_json(self) -> dict[str, Any]:
        config: dict[str, Any] = {"Env": list(self.env), "WorkingDir": self.workdir}
        if self.entrypoint:
            config["Entrypoint"] = list(self.entrypoint)
        if self.cmd:
            config["Cmd"] = list(self.cmd)
        if self.user:
            config["User"] = self.user
        if self.exposed_ports:
            config["ExposedPorts"] = {port: {} for port in self.exposed_ports}
        if self.labels:
            config["Labels"] = dict(self.labels)
        return config


@dataclasses.dataclass(frozen=True)
class Layer:
    """One gzip-compressed layer in a file, with the digests an image names it by."""

    path: Path
    digest: str  # of the compressed bytes (the blob)
    diff_id: str  # of the uncompressed tar (the image config's rootfs)
    size: int


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


def _normalized(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = epoch()
    info.uname = info.gname = ""
    info.pax_headers = {}
    return info


def layer_from_tar(source: Path, out: Path) -> Layer:
    """A layer from an uncompressed root filesystem tar (mmdebstrap's, for one): entries
    re-written in sorted order with one timestamp, owners and modes kept."""
    with tarfile.open(source) as src:
        members = sorted(src.getmembers(), key=lambda m: m.name.lstrip("./"))
        return _write_layer(((m, src.extractfile(m) if m.isfile() else None) for m in members), out)


def layer_from_dir(root: Path, out: Path, *, owner: tuple[int, int] = (0, 0)) -> Layer:
    """A layer from a directory tree, every entry owned by `owner` (uid, gid)."""
    paths = sorted(p for p in root.rglob("*"))
    probe = tarfile.TarFile(fileobj=io.BytesIO(), mode="w")

    def entries() -> Iterable[tuple[tarfile.TarInfo, IO[bytes] | None]]:
        for path in paths:
            info = probe.gettarinfo(str(path), arcname=str(path.relative_to(root)))
            info.uid, info.gid = owner
            yield info, path.open("rb") if info.isfile() else None

    return _write_layer(entries(), out)


def _write_layer(entries: Iterable[tuple[tarfile.TarInfo, IO[bytes] | None]], out: Path) -> Layer:
    plain = out.with_name(out.name + ".tar")
    with tarfile.open(plain, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(_normalized(info), data)
            if data is not None:
                data.close()
    diff_id, _ = _sha256_file(plain)
    with (
        plain.open("rb") as src,
        out.open("wb") as f,
        gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as zipped,
    ):
        while chunk := src.read(CHUNK):
            zipped.write(chunk)
    plain.unlink()
    digest, size = _sha256_file(out)
    return Layer(out, digest, diff_id, size)


def _blob(tar: tarfile.TarFile, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    info = _normalized(tarfile.TarInfo(f"blobs/sha256/{digest}"))
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    return "sha256:" + digest, len(data)


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def write_archive(name: str, layers: list[Layer], config: ImageConfig, out: Path) -> str:
    """Write the OCI image archive `out` for image `name` (`localhost/phabmesh:0.1.0`) and
    return its manifest's digest. `ctr -n k8s.io images import out` and `podman load -i out`
    both name the image `name`."""
    created = "1970-01-01T00:00:00Z" if epoch() == 0 else _rfc3339(epoch())
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": config.as_json(),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": "phabmesh.dev.ociimage"} for _ in layers],
    }
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = _normalized(tarfile.TarInfo(directory))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        config_digest, config_size = _blob(tar, _json(image_config))
        for layer in layers:
            info = _normalized(tar.gettarinfo(str(layer.path), f"blobs/sha256/{layer.digest[7:]}"))
            info.uid = info.gid = 0
            info.mode = 0o644
            with layer.path.open("rb") as blob:
                tar.addfile(info, blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
        manifest_digest, manifest_size = _blob(tar, _json(manifest))
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_TYPE,
                    "digest": manifest_digest,
                    "size": manifest_size,
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name,
                    },
                }
            ],
        }
        for file_name, value in (("oci-layout", LAYOUT), ("index.json", index)):
            encoded = _json(value)
            info = _normalized(tarfile.TarInfo(file_name))
            info.size, info.mode = len(encoded), 0o644
            tar.addfile(info, io.BytesIO(encoded))
    partial.replace(out)
    return manifest_digest


def _rfc3339(seconds: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_from_dir(name: str, root: Path, config: ImageConfig, out: Path) -> str:
    """A one-layer image of the directory `root`, every file owned by root."""
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        layer = layer_from_dir(root, Path(scratch) / "layer.tar.gz")
        return write_archive(name, [layer], config, out)
