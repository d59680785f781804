"""The OCI image archive writer of the dev kit (phabmesh.dev.ociimage): reproducible, and
self-consistent in the digests that containerd and podman check on import."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from phabmesh.dev import ociimage

CONFIG = ociimage.ImageConfig(
    entrypoint=("/bin/tool",), cmd=("serve",), user="65532:65532", exposed_ports=("8080/tcp",)
)


def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "alias").symlink_to("tool")
    return root


def read_archive(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_the_same_tree_gives_the_same_digests(tmp_path: Path) -> None:
    root = rootfs(tmp_path)
    first = ociimage.image_from_dir("localhost/tool:1", root, CONFIG, tmp_path / "a.tar")
    (root / "bin" / "tool").touch()  # a new mtime only
    second = ociimage.image_from_dir("localhost/tool:1", root, CONFIG, tmp_path / "b.tar")
    assert first == second
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_the_archive_names_the_image_and_its_digests_match_the_blobs(tmp_path: Path) -> None:
    digest = ociimage.image_from_dir(
        "localhost/tool:1", rootfs(tmp_path), CONFIG, tmp_path / "i.tar"
    )
    files = read_archive(tmp_path / "i.tar")
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["digest"] == digest
    assert entry["annotations"]["io.containerd.image.name"] == "localhost/tool:1"
    manifest = json.loads(files["blobs/sha256/" + digest[7:]])
    config = json.loads(files["blobs/sha256/" + manifest["config"]["digest"][7:]])
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Entrypoint"] == ["/bin/tool"]
    (layer,) = manifest["layers"]
    plain = gzip.decompress(files["blobs/sha256/" + layer["digest"][7:]])
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/tool"].mode & 0o111
    assert members["bin/alias"].issym() and members["bin/alias"].linkname == "tool"
    assert {m.uid for m in members.values()} == {0}
