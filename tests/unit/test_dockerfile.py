"""The image's recipe: what a reader of the Dockerfile should be able to rely on.

hadolint (``make lint``) checks Dockerfile practice; these tests check phabmesh's own
promises: one recipe with `make image` (phabmesh.dev.image), a wheel-only runtime without
pip, a fixed non-root user, exec-form commands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from phabmesh.dev import image

REPO = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    result = []
    for raw in logical.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def test_two_stages_on_the_debian_release_make_image_builds_from() -> None:
    args = [rest for keyword, rest in _instructions() if keyword == "ARG"]
    assert f"BASE=debian:{image.SUITE}-slim" in args
    stages = _stages()
    assert len(stages) == 2
    assert [stage[0][1].split()[0] for stage in stages] == ["${BASE}", "${BASE}"]


def test_the_builder_installs_the_python_packages_as_make_image_does() -> None:
    build = " ".join(rest for keyword, rest in _stages()[0] if keyword == "RUN")
    assert "python3 -m phabmesh.dev.image python-tree /out" in build


def test_the_runtime_reads_the_same_package_list_and_finishing_script() -> None:
    runtime = _stages()[1]
    runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert "--mount=type=bind,source=operator/phabmesh/dev/imagerecipe,target=/image" in runs
    assert "/image/packages" in runs
    assert "/image/dpkg-excludes" in runs
    assert "/image/finish.sh /" in runs
    assert "--no-install-recommends" in runs
    assert "pip" not in runs
    copies = [rest for keyword, rest in runtime if keyword in ("COPY", "ADD")]
    assert copies == ["--from=build /out/ /"]


def test_how_it_starts_is_what_make_image_writes() -> None:
    runtime = dict(_stages()[1])
    config = image.image_config()
    assert runtime["USER"] == config.user == "65532:65532"
    assert json.loads(runtime["ENTRYPOINT"]) == list(config.entrypoint) == ["phabmesh"]
    assert json.loads(runtime["CMD"]) == list(config.cmd) == ["operator"]
    assert {f"{port}/tcp" for port in runtime["EXPOSE"].split()} == set(config.exposed_ports)
    env = {f"{key}={value}" for key, value in re.findall(r"(\w+)=(\S+)", runtime["ENV"])}
    assert env == {e for e in config.env if not e.startswith("PATH=")}


def test_the_build_context_leaves_out_what_the_image_does_not_need() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "build"} <= ignored
    assert not {"operator", "pyproject.toml", "constraints.txt", "README.md", "image"} & ignored
