"""The image's recipe: what a reader of the Dockerfile should be able to rely on.

hadolint (``make lint``) checks Dockerfile practice; these tests check phabmesh's own
promises: pinned bases, a wheel-only runtime, a fixed non-root user, exec-form commands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
        stages[-1].append((keyword, rest))
    return stages


def test_two_stages_on_a_pinned_python_311_slim() -> None:
    stages = _stages()
    assert len(stages) == 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image


def test_the_builder_makes_wheels_with_the_pinned_constraints() -> None:
    build = " ".join(rest for keyword, rest in _stages()[0] if keyword == "RUN")
    assert "pip wheel" in build
    assert "--constraint constraints.txt" in build


def test_the_runtime_installs_only_wheels_and_runs_unprivileged() -> None:
    runtime = _stages()[1]
    installs = [rest for keyword, rest in runtime if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1
    assert "--no-cache-dir" in installs[0]
    assert "--no-index" in installs[0]
    assert not [rest for keyword, rest in runtime if keyword in ("COPY", "ADD")]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users == ["65532:65532"]


def test_entrypoint_and_command_are_exec_form() -> None:
    runtime = dict(_stages()[1])
    assert json.loads(runtime["ENTRYPOINT"]) == ["phabmesh"]
    assert json.loads(runtime["CMD"]) == ["controller"]


def test_the_build_context_leaves_out_what_the_image_does_not_need() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "tests", "build"} <= ignored
    assert not {"operator", "pyproject.toml", "constraints.txt", "README.md"} & ignored
