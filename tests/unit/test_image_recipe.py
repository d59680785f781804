"""`make image`'s recipe (phabmesh.dev.image) without building: the name the installs
deploy, the package list, and which of the host's apt sources the root filesystem is built
from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from phabmesh import __version__
from phabmesh.dev import image

REPO = Path(__file__).resolve().parents[2]


def test_the_image_is_named_as_the_chart_and_kustomize_deploy_it() -> None:
    values = yaml.safe_load((REPO / "charts/phabmesh/values.yaml").read_text())
    chart = yaml.safe_load((REPO / "charts/phabmesh/Chart.yaml").read_text())
    tag = values["image"]["tag"] or chart["appVersion"]
    assert image.image_name() == f"{values['image']['repository']}:{tag}"
    kustomization = yaml.safe_load((REPO / "manifests/kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization["images"] if i["name"] == "phabmesh"]
    assert image.image_name() == f"{entry['newName']}:{entry['newTag']}"
    assert image.archive_path().name == f"phabmesh-{__version__}.oci.tar"


def test_the_package_list_has_python3_and_names_bad_lines(tmp_path: Path) -> None:
    assert "python3" in image.packages()
    bad = tmp_path / "packages"
    bad.write_text("python3\nPython 3 # oops\n")
    with pytest.raises(image.ImageError, match="'Python 3' is not a Debian package name"):
        image.packages(bad)


def test_host_sources_keep_debian_entries_of_the_suite(tmp_path: Path) -> None:
    listd = tmp_path / "sources.list.d"
    listd.mkdir()
    (listd / "debian.sources").write_text(
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: https://deb.nodesource.example/node_20.x\n"
        "Suites: nodistro\n"
        "Components: main\n"
    )
    (listd / "docker.list").write_text(
        "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] "
        "https://download.example/linux/debian bookworm stable\n"
    )
    (listd / "old.list.disabled").write_text("deb http://elsewhere.example/debian bookworm main\n")
    plain = tmp_path / "sources.list"
    plain.write_text("deb http://plain.example/debian bookworm main # the main one\n")
    found = image.host_sources("bookworm", (plain, listd))
    assert [(s.uris, s.suites, s.components) for s in found] == [
        (("http://plain.example/debian",), ("bookworm",), ("main",)),
        (("http://mirror.example/debian",), ("bookworm", "bookworm-updates"), ("main",)),
        (("http://mirror.example/debian-security",), ("bookworm-security",), ("main",)),
    ]
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" in found[1].deb822()


def test_a_mirror_given_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHABMESH_IMAGE_MIRROR", "http://mirror.example/debian")
    text = image.mirror_sources("bookworm")
    assert "URIs: http://mirror.example/debian\n" in text
    assert "Suites: bookworm bookworm-updates\n" in text
    monkeypatch.setenv("PHABMESH_IMAGE_MIRROR", "mirror.example")
    with pytest.raises(image.ImageError, match="PHABMESH_IMAGE_MIRROR"):
        image.mirror_sources("bookworm")


def test_the_debian_layer_is_keyed_by_its_inputs_not_the_checkout_path() -> None:
    inputs = image.base_inputs("Types: deb\n")
    assert str(REPO) not in inputs["command"]
    assert "--variant=essential" in inputs["command"]
    assert image.base_inputs("Types: deb\n") == inputs
    assert image.base_inputs("Types: deb\nURIs: x\n") != inputs
