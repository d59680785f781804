"""`phabmesh operator`, `gateway` and `webhook` with no cluster to connect to (as in the
image run outside Kubernetes): one line that says so and what to give, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *args: str, drop: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """`python -m phabmesh.cli ARGS` with the variables starting with ``drop`` unset."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO / "operator"))
    return subprocess.run(
        [sys.executable, "-m", "phabmesh.cli", *args],
        env=env,
        input="",  # the webhook watches its stdin, a pipe from the operator
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["operator", "gateway", "webhook"])
def test_no_cluster_is_one_line_naming_what_to_give(command: str, tmp_path: Path) -> None:
    done = _cli(tmp_path, command, drop=("KUBE", "PHABMESH_"))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"phabmesh {command}: no cluster to connect to"), lines[0]
    assert "--kubeconfig" in lines[0]
    assert "KUBECONFIG" in lines[0]


def test_an_explicit_kubeconfig_that_is_missing_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.yaml"
    done = _cli(tmp_path, "gateway", "--kubeconfig", str(missing), drop=("KUBE",))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("phabmesh gateway: no cluster to connect to"), done.stderr


def test_the_former_command_controller_still_runs_the_operator_and_says_so(
    tmp_path: Path,
) -> None:
    """`phabmesh controller` (the operator's command before `phabmesh operator`): one line on
    stderr naming the new command, a `command_deprecated` log line, then the operator as
    `phabmesh operator` runs it (here: as far as finding no cluster)."""
    done = _cli(tmp_path, "controller", "--peering", drop=("KUBE", "PHABMESH_"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "phabmesh controller: deprecated, use `phabmesh operator` (same flags)"
    logged = [line for line in lines if "command_deprecated" in line]
    assert len(logged) == 1, done.stderr
    assert "old=controller" in logged[0] or '"old": "controller"' in logged[0], logged[0]
    assert lines[-1].startswith("phabmesh controller: no cluster to connect to"), lines[-1]


def test_the_parser_sends_both_names_to_the_operator() -> None:
    from phabmesh import cli

    new = cli.build_parser().parse_args(["operator", "--peering"])
    old = cli.build_parser().parse_args(["controller", "--peering", "--kubeconfig", "k"])
    assert new.func is cli._operator
    assert old.func is cli._controller
    assert (new.peering, old.peering, old.kubeconfig) == (True, True, "k")
    assert cli.DEPRECATED_COMMANDS == {"controller": "operator"}


def test_gateway_workers_with_no_cluster_say_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent says it, before any worker starts (each would say it again)."""
    missing = tmp_path / "nowhere.yaml"
    monkeypatch.setenv("PHABMESH_GATEWAY_WORKERS", "2")
    done = _cli(tmp_path, "gateway", "--kubeconfig", str(missing), drop=("KUBE",))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("phabmesh gateway: no cluster to connect to"), done.stderr
