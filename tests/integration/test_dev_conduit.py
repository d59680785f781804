"""`phabmesh dev-conduit` (make dev-conduit): the Conduit test server beside a dev cluster,
each bot's token where phabmesh reads it, never printed."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from phabmesh import serving
from tests.kube import Cluster, wait_for


def _start(env: dict[str, str], out: Path, *args: str) -> subprocess.Popen[bytes]:
    with out.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "phabmesh.cli", "dev-conduit", *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _whoami(port: int, token: str) -> str:
    answer = requests.post(
        f"http://127.0.0.1:{port}/api/user.whoami", data={"api.token": token}, timeout=5
    ).json()
    return str(answer["result"]["userName"])


def _stop(proc: subprocess.Popen[bytes], out: Path) -> str:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, out.read_text()
    return out.read_text()


def test_tokens_go_into_secrets_of_the_configured_cluster(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    port = serving.free_port("127.0.0.1")
    env = dict(os.environ, KUBECONFIG=str(cluster.plane.kubeconfig))
    out = tmp_path / "out"
    proc = _start(env, out, "--port", str(port), "--bot", "one-bot", "--bot", "two-bot",
                  "--namespace", namespace)  # fmt: skip
    try:
        wait_for(lambda: "Ctrl-C stops it" in out.read_text(), what="dev-conduit")
        tokens = {}
        for bot in ("one-bot", "two-bot"):
            secret = cluster.core.read_namespaced_secret(f"{bot}-token", namespace)
            tokens[bot] = base64.b64decode(secret.data["token"]).decode()
            assert _whoami(port, tokens[bot]) == bot
    finally:
        text = _stop(proc, out)
    assert f"PHABMESH_PHABRICATOR_URL=http://127.0.0.1:{port}" in text
    assert f"Secret {namespace}/one-bot-token" in text
    assert not any(token in text for token in tokens.values())


def test_without_a_cluster_tokens_go_into_private_files(tmp_path: Path) -> None:
    port = serving.free_port("127.0.0.1")
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "none"), HOME=str(tmp_path))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    out = tmp_path / "out"
    proc = _start(env, out, "--port", str(port))
    try:
        wait_for(lambda: "Ctrl-C stops it" in out.read_text(), what="dev-conduit")
        line = next(x for x in out.read_text().splitlines() if "bot ci-bot" in x)
        path = Path(line.split("is in ")[1].split(" (")[0])
        assert path.stat().st_mode & 0o077 == 0  # its owner's only
        token = path.read_text().strip()
        assert _whoami(port, token) == "ci-bot"
    finally:
        text = _stop(proc, out)
    assert token not in text
